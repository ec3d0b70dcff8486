"""STAC API searches for the processors: one rule, server-side where the API can, client-side always.

A search is described once -- collections, time range, geometry, property
rules (:class:`Rule`) and a sort order -- and :meth:`Catalog.search` sends the
rules as the Query extension, else as a CQL2 filter, and the sort as ``sortby``
only where the API declares conformance to those extensions. The same rules
and sort are then applied to what comes back, so an API that ignores (or does
not offer) an extension still yields exactly the items the rule selects.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pystac
import pystac_client
import requests
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from pystac_client.conformance import ConformanceClasses

from stacchip.catalog.stac_items import structure_problem
from stacchip.errors import ConfigError, ServiceError

logger = logging.getLogger(__name__)

#: Most items fetched when the API cannot sort or filter server-side.
MAX_FETCH = 2000
#: Most result pages one search follows: paging that never repeats a link still ends.
MAX_PAGES = 10_000
#: HTTP statuses worth retrying besides 5xx.
_RETRY_STATUS = {408, 425, 429}

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
}
_CQL2 = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">=", "in": "in"}


@dataclass(frozen=True)
class Rule:
    """``properties[field] <op> value``; ``op`` is eq, neq, lt, lte, gt, gte or in."""

    field: str
    op: str
    value: Any

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ConfigError(f"unknown search operator {self.op!r} for field {self.field!r}")

    def matches(self, item: pystac.Item) -> bool:
        """True when the item's property satisfies the rule (a missing property never does)."""
        value = _property(item, self.field)
        if value is None:
            return False
        try:
            return bool(_OPS[self.op](value, self.value))
        except TypeError:
            return False

    def cql2(self) -> dict[str, Any]:
        """The rule as a CQL2-JSON expression."""
        value = list(self.value) if self.op == "in" else self.value
        return {"op": _CQL2[self.op], "args": [{"property": self.field}, value]}


@dataclass(frozen=True)
class Sort:
    """Sort by ``properties[field]`` (``descending`` for largest first)."""

    field: str
    descending: bool = False

    def sortby(self) -> dict[str, str]:
        """The ``sortby`` entry of a STAC API search."""
        return {"field": f"properties.{self.field}", "direction": "desc" if self.descending else "asc"}


def _property(item: pystac.Item, field: str) -> Any:
    if field == "id":
        return item.id
    if field == "collection":
        return item.collection_id
    if field == "datetime" and item.datetime is not None:
        return item.datetime.isoformat()
    return item.properties.get(field)


def apply(items: Iterable[pystac.Item], rules: Sequence[Rule] = (), sort: Sequence[Sort] = ()) -> list[pystac.Item]:
    """Keep the items matching every rule, ordered by ``sort`` (then by id, for determinism).

    Items missing a sort property go last.
    """
    kept = [item for item in items if all(rule.matches(item) for rule in rules)]
    kept.sort(key=lambda item: item.id)
    for key in reversed(list(sort)):
        present = [i for i in kept if _property(i, key.field) is not None]
        missing = [i for i in kept if _property(i, key.field) is None]
        present.sort(key=lambda i: _property(i, key.field), reverse=key.descending)
        kept = present + missing
    return kept


# --- Planetary Computer signing -------------------------------------------------------------

_SAS_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token/{account}/{container}"
_tokens: dict[tuple[str, str], tuple[str, float]] = {}
_tokens_lock = threading.Lock()


def _sas_token(account: str, container: str) -> str:
    with _tokens_lock:
        cached = _tokens.get((account, container))
        if cached and cached[1] > time.time() + 300:
            return cached[0]
    from stacchip import storage

    url = _SAS_URL.format(account=account, container=container)
    data = json.loads(storage.read_bytes(url))
    token = data["token"]
    expiry = time.time() + 1800
    with _tokens_lock:
        _tokens[(account, container)] = (token, expiry)
    return token


def sign_href(href: str) -> str:
    """A Planetary Computer blob href with a SAS token appended (other hrefs unchanged)."""
    parsed = urllib.parse.urlparse(href)
    if not parsed.netloc.endswith(".blob.core.windows.net") or "sig=" in parsed.query:
        return href
    account = parsed.netloc.split(".")[0]
    container = parsed.path.lstrip("/").split("/", 1)[0]
    token = _sas_token(account, container)
    return f"{href}{'&' if parsed.query else '?'}{token}"


def sign_item(item: pystac.Item) -> pystac.Item:
    """Sign every asset href of ``item`` in place (see :func:`sign_href`); returns it."""
    for asset in item.assets.values():
        asset.href = sign_href(asset.href)
    return item


def wants_signing(api_url: str, mode: str = "auto") -> bool:
    """Whether item hrefs need Planetary Computer signing: ``auto`` signs for its API only."""
    mode = (mode or "auto").lower()
    if mode in ("none", "no", "false", "0"):
        return False
    if mode in ("planetary-computer", "pc", "yes", "true", "1"):
        return True
    if mode != "auto":
        raise ConfigError(f"STACCHIP_SIGN={mode!r}: use auto, none or planetary-computer")
    return "planetarycomputer.microsoft.com" in api_url


# --- paging (independent of the HTTP transport) ---------------------------------------------


def status_kind(status: int | None) -> str:
    """How a search failure with HTTP ``status`` ends: ``"retry"`` (5xx, 408, 425, 429, or no
    status at all: the connection failed) -- exit status 1 once retries are spent -- or
    ``"refused"`` (any other 4xx: the request itself is wrong, exit status 2)."""
    if status is None:
        return "retry"
    code = int(status)
    return "retry" if code >= 500 or code in _RETRY_STATUS else "refused"


def link_key(link: Mapping[str, Any]) -> str:
    """What identifies the request a link asks for: method, href and body (POST paging)."""
    method = str(link.get("method") or "GET").upper()
    return json.dumps([method, str(link.get("href")), link.get("body")], sort_keys=True, default=str)


@dataclass
class Pager:
    """When to stop following ``next`` links, whatever fetches the pages.

    Feed it every page (a GeoJSON FeatureCollection as a dict) with :meth:`take`: it returns
    the features to keep and whether to ask for the next page. Paging stops at the last page,
    after ``max_items`` features, after ``max_pages`` pages, or when a page's ``next`` link
    asks for a page already asked for (an API that loops); :attr:`stopped` then says why
    (None when the results simply ended).
    """

    max_items: int | None = None
    max_pages: int = MAX_PAGES
    pages: int = 0
    items: int = 0
    stopped: str | None = None
    _seen: set[str] = field(default_factory=set)

    def take(self, page: Any) -> tuple[list[Any], bool]:
        """The features of ``page`` to keep, and whether to fetch the next page."""
        if not isinstance(page, Mapping) or not isinstance(page.get("features", []), list):
            raise ServiceError(f"search page {self.pages + 1} is not a GeoJSON FeatureCollection")
        self.pages += 1
        features = list(page.get("features") or [])
        if self.max_items is not None:
            features = features[: max(0, self.max_items - self.items)]
        self.items += len(features)
        if self.max_items is not None and self.items >= self.max_items:
            self.stopped = f"--max-items {self.max_items} reached"
            return features, False
        links = page.get("links") or []
        nxt = next((link for link in links if isinstance(link, Mapping) and link.get("rel") == "next"), None)
        if nxt is None or not (page.get("features") or []):
            return features, False
        key = link_key(nxt)
        if key in self._seen:
            self.stopped = (f"page {self.pages} links to a page already fetched ({nxt.get('href')}): "
                            "the API repeats itself, paging stopped")
            return features, False
        self._seen.add(key)
        if self.pages >= self.max_pages:
            self.stopped = f"--max-pages {self.max_pages} reached (more results may exist)"
            return features, False
        return features, True

    def follow(self, pages: Iterable[Any]) -> Iterator[Any]:
        """The features of ``pages`` (an iterator that fetches the next page only when asked),
        stopping as :meth:`take` decides."""
        for page in pages:
            features, more = self.take(page)
            yield from features
            if not more:
                return


# --- the catalog -------------------------------------------------------------------------------


class _Rejected(Exception):
    """The API refused the request (HTTP 4xx)."""


class _Transient(ConnectionError):
    """A search failure worth retrying (5xx, 429, dropped connection)."""


def stac_io() -> StacApiIO:
    """pystac_client's I/O with the one I/O configuration: the retry policy (searches
    are POSTs, retried too), the CA bundle, the proxies and the timeouts."""
    from stacchip.storage import settings

    conf = settings()
    io = StacApiIO(max_retries=None, timeout=(conf.connect_timeout, conf.read_timeout))
    conf.requests_session(io.session)
    return io


class Catalog:
    """A STAC API, opened once per process, with its conformance looked up once."""

    def __init__(self, url: str, sign: str = "auto") -> None:
        self.url = url
        #: search results that were no STAC item: ``(id or label, reason)``
        self.rejected: list[tuple[str, str]] = []
        #: how the last search's paging ended (see :class:`Pager`)
        self.paging: Pager | None = None
        self.client = self._open(url)
        self.sign = wants_signing(url, sign)
        self.can_sort = self._conforms(ConformanceClasses.SORT)
        self.can_query = self._conforms(ConformanceClasses.QUERY)
        self.can_filter = self._conforms(ConformanceClasses.FILTER)
        logger.info(
            "STAC API %s: sort=%s query=%s filter=%s", url, self.can_sort, self.can_query, self.can_filter
        )

    @staticmethod
    def _open(url: str) -> pystac_client.Client:
        """Open the API; its session retries transient failures (5xx, 429, dropped
        connections) with the one retry policy (:mod:`stacchip.storage.config`).

        A refusal (4xx) or a response that is not a STAC API is a configuration
        error; an API still unreachable after the retries is not (the task
        fails with exit status 1 and can be re-run).
        """
        def once() -> pystac_client.Client:
            try:
                return pystac_client.Client.open(url, stac_io=stac_io())
            except APIError as exc:
                status = getattr(exc, "status_code", None)
                if status is None or int(status) >= 500 or int(status) == 429:
                    raise _Transient(f"HTTP {status}: {str(exc)[:300]}") from exc
                raise
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Transient(str(exc)) from exc

        try:
            return once()
        except _Transient as exc:
            raise ServiceError(f"STAC API {url!r} is unreachable: {exc}") from exc
        except Exception as exc:  # pystac_client raises APIError, pystac errors, ...
            raise ConfigError(f"cannot open STAC API {url!r}: {exc}") from exc

    def _conforms(self, cls: ConformanceClasses) -> bool:
        try:
            return bool(self.client.conforms_to(cls))
        except Exception:  # noqa: BLE001 - an API without conformance info conforms to nothing
            return False

    def _fetch(self, params: dict[str, Any], max_items: int | None = None,
               max_pages: int = MAX_PAGES) -> list[pystac.Item]:
        """The items of a search, paged by a :class:`Pager` (``max_items``, ``max_pages``,
        repeated ``next`` links); the session retries transient failures with the one retry
        policy. Features that are not STAC items are left out and listed in :attr:`rejected`
        (``(id or label, reason)``)."""
        def once() -> tuple[list[Any], Pager]:
            pager = Pager(max_items=max_items, max_pages=max_pages)
            try:
                return list(pager.follow(self.client.search(**params).pages_as_dicts())), pager
            except APIError as exc:
                status = getattr(exc, "status_code", None)
                if status_kind(status) == "refused":
                    raise _Rejected(f"HTTP {status}: {str(exc)[:300]}") from exc
                raise _Transient(f"HTTP {status}: {str(exc)[:300]}") from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Transient(f"STAC search on {self.url} failed: {exc}") from exc
            except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a page of the wrong shape
                raise ServiceError(f"STAC search on {self.url} answered a page that is not a STAC "
                                   f"ItemCollection: {type(exc).__name__}: {exc}") from exc

        try:
            features, pager = once()
        except _Rejected:
            raise
        except _Transient as exc:
            raise ServiceError(f"STAC search on {self.url} failed ({params}): {exc}") from exc
        if pager.stopped:
            logger.warning("STAC search on %s: %s, after %d page(s) and %d item(s)",
                           self.url, pager.stopped, pager.pages, pager.items)
        self.paging = pager
        return self._items(features)

    def _items(self, features: Sequence[Any]) -> list[pystac.Item]:
        items = []
        for n, feature in enumerate(features):
            label = feature.get("id") if isinstance(feature, Mapping) and isinstance(feature.get("id"), str) \
                else f"search result #{n}"
            problem = structure_problem(feature) if isinstance(feature, Mapping) else "it is not a JSON object"
            if problem is None:
                try:
                    items.append(pystac.Item.from_dict(dict(feature), preserve_dict=True))
                    continue
                except Exception as exc:  # noqa: BLE001 - pystac raises many kinds on bad items
                    problem = f"{type(exc).__name__}: {exc}"
            self.rejected.append((str(label), str(problem)))
        return items

    def search(
        self,
        collections: Sequence[str],
        datetime: str | None = None,
        intersects: dict[str, Any] | None = None,
        rules: Sequence[Rule] = (),
        sort: Sequence[Sort] = (),
        limit: int | None = None,
        max_pages: int = MAX_PAGES,
    ) -> list[pystac.Item]:
        """Items matching everything, in ``sort`` order, at most ``limit`` of them.

        ``datetime`` is a STAC interval (``start/end``); ``intersects`` a GeoJSON
        geometry in degrees. Rules and sort go to the server where it conforms,
        and are applied again here.
        """
        params: dict[str, Any] = {"collections": list(collections)}
        if datetime:
            params["datetime"] = datetime
        if intersects is not None:
            params["intersects"] = intersects
        pushed_rules = not rules
        if rules and self.can_filter:
            args = [rule.cql2() for rule in rules]
            params["filter"] = args[0] if len(args) == 1 else {"op": "and", "args": args}
            params["filter_lang"] = "cql2-json"
            pushed_rules = True
        elif rules and self.can_query:
            query: dict[str, dict[str, Any]] = {}
            for rule in rules:
                query.setdefault(rule.field, {})[rule.op] = list(rule.value) if rule.op == "in" else rule.value
            params["query"] = query
            pushed_rules = True
        pushed_sort = not sort
        if sort and self.can_sort:
            params["sortby"] = [s.sortby() for s in sort]
            pushed_sort = True
        complete = pushed_rules and pushed_sort
        max_items = limit if (complete and limit) else MAX_FETCH
        params["limit"] = min(max_items, 100)
        try:
            found = self._fetch(params, max_items, max_pages)
        except _Rejected as exc:
            # The API declared the extension but refused this use of it (e.g. an operator
            # it does not implement): ask without it and apply the rule here instead.
            logger.warning("STAC API %s refused %s; applying rules and sort client-side", self.url, exc)
            for key in ("query", "filter", "filter_lang", "sortby"):
                params.pop(key, None)
            found = self._fetch(params, MAX_FETCH, max_pages)
        items = apply(found, rules, sort)
        if limit is not None:
            items = items[:limit]
        if self.sign:
            for item in items:
                sign_item(item)
        logger.debug("search %s -> %d items (%d before client-side rules)", params, len(items), len(found))
        return items
