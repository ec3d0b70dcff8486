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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import pystac
import pystac_client
import requests
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from pystac_client.conformance import ConformanceClasses

from stacchip.errors import ConfigError, ServiceError

logger = logging.getLogger(__name__)

#: Most items fetched when the API cannot sort or filter server-side.
MAX_FETCH = 2000

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

    def _fetch(self, params: dict[str, Any]) -> list[pystac.Item]:
        def once() -> list[pystac.Item]:
            try:
                return list(self.client.search(**params).items())
            except APIError as exc:
                status = getattr(exc, "status_code", None)
                if status is not None and 400 <= int(status) < 500 and int(status) != 429:
                    raise _Rejected(f"HTTP {status}: {str(exc)[:300]}") from exc
                raise _Transient(f"STAC search on {self.url} failed: {exc}") from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Transient(f"STAC search on {self.url} failed: {exc}") from exc

        try:
            return once()
        except _Rejected:
            raise
        except _Transient as exc:
            raise ServiceError(f"STAC search on {self.url} failed ({params}): {exc.__cause__}") from exc

    def search(
        self,
        collections: Sequence[str],
        datetime: str | None = None,
        intersects: dict[str, Any] | None = None,
        rules: Sequence[Rule] = (),
        sort: Sequence[Sort] = (),
        limit: int | None = None,
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
        params["max_items"] = limit if (complete and limit) else MAX_FETCH
        params["limit"] = min(params["max_items"], 100)
        try:
            found = self._fetch(params)
        except _Rejected as exc:
            # The API declared the extension but refused this use of it (e.g. an operator
            # it does not implement): ask without it and apply the rule here instead.
            logger.warning("STAC API %s refused %s; applying rules and sort client-side", self.url, exc)
            for key in ("query", "filter", "filter_lang", "sortby"):
                params.pop(key, None)
            params["max_items"] = MAX_FETCH
            found = self._fetch(params)
        items = apply(found, rules, sort)
        if limit is not None:
            items = items[:limit]
        if self.sign:
            for item in items:
                sign_item(item)
        logger.debug("search %s -> %d items (%d before client-side rules)", params, len(items), len(found))
        return items
