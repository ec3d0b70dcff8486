"""The manifest of a compacted index, and reading a compacted index through it.

Core: :func:`stacchip.index.open_index` / :func:`~stacchip.index.query` and the
training side read compacted indexes through this module; the catalog package
writes them (:func:`stacchip.catalog.compact`) and re-exports it as
:mod:`stacchip.catalog.manifest`.

A compacted index (written by :func:`stacchip.catalog.compact`) is a directory or
``s3://`` prefix holding one directory per platform and year, a manifest and the
per-item provenance beside it::

    {dest}/_manifest.json
    {dest}/_items-{run}.pq                      (format 2: per-item provenance, Parquet)
    {dest}/{platform}/year={year}/part-{run}-{n:05d}.parquet

The manifest is the commit point of a compaction and the table of contents of
the dataset: readers take the file list from it (never from a listing, which
may hold files of an unfinished run) and choose files and row groups by the
extents it records, before opening any Parquet footer. Its keys:

``stacchip_compacted_index``  format version (``2``; ``1`` is still read)
``created`` / ``updated``      ISO 8601 UTC times of the first and the last run
``rows``, ``bbox``, ``datetime`` rows, ``[xmin, ymin, xmax, ymax]`` (degrees) and
                              ``[first, last]`` (ISO 8601 UTC) of the whole dataset
``sort``                      how rows are ordered within a run of part files
``row_group_rows``, ``file_rows``  the size settings of the last run (rows)
``arrow_schema``              base64 of the Arrow IPC schema of the files
                              (:data:`stacchip.schema.SCHEMA` plus extra columns)
``partitions``                ``{"{platform}/year={year}": {"platform", "year", "rows",
                              "bbox", "datetime", "files": [...]}}``; each file
                              ``{"path" (relative to the root), "run", "rows",
                              "bytes", "bbox", "datetime", "row_groups": [{"rows",
                              "bbox", "datetime", "cloud": [min, max],
                              "nodata": [min, max]}]}``
``items``                     (format 2) the provenance file: ``{"path", "rows", "bytes",
                              "items", "sources"}``
``pending``                   (only while a run moves its files into place)
                              ``{"staging": "_staging/{run}", "files": [paths]}``: files
                              of this manifest that may still be at ``{staging}/{path}``
``sources``                   (format 1 only) ``{source URL: {"size", "mtime_ns", "rows",
                              "partitions", "items": {item_id: href or null}}}``

The provenance file (format 2; :data:`PROVENANCE_SCHEMA`) has one row per item and
partition of every compacted source: ``item_id``, ``partition``, ``source`` (the source
index file's URL), ``fingerprint`` (``"{size}:{mtime_ns}"`` of the source when it was
read), ``source_rows``, ``item_href`` (the STAC item's location, null when unknown). A
source without rows has one row with null ``item_id``. Only readers that need it read it
(:func:`item_hrefs`, an ``item_id`` query, the next compaction). Its name ends in ``.pq``,
not ``.parquet``, and starts with ``_``, so ``**/*.parquet`` globs (DuckDB) and
``pyarrow.dataset`` discovery never take it for index rows.

bbox extents are those of the rows' ``bbox`` covering column (min of ``xmin``
... max of ``ymax``), the same values the Parquet row-group statistics hold.

Confinement: everything a manifest names is untrusted. Part files and the provenance file
must be plain relative paths inside the index root (and, locally, still inside it with
symbolic links resolved); item hrefs must lie under the index root or under a root the
caller allows (``item_roots``). Anything else raises
:class:`~stacchip.errors.UnsafePathError` (exit status 2); a malformed manifest entry raises
:class:`~stacchip.errors.IndexFileError` naming it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from stacchip import storage
from stacchip.errors import IndexFileError, StorageError, UnsafePathError
from stacchip.filters import TIME_MARGIN, QueryFilters, Selection, parse_time  # noqa: F401  (re-exported)
from stacchip.scan import Extent, Fragment, IndexDataset
from stacchip.schema import SCHEMA, empty_table

if TYPE_CHECKING:
    from typing import Unpack

    import pyarrow as pa

MANIFEST_NAME = "_manifest.json"
FORMAT_KEY = "stacchip_compacted_index"
#: Format written; :data:`READ_VERSIONS` are read.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
#: Name of a run's provenance file, and of its staged part files (``.pq``: not ``*.parquet``).
PROVENANCE_NAME = "_items-{run}.pq"
STAGING_DIR = "_staging"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def provenance_schema() -> pa.Schema:
    """Arrow schema of the provenance file (see the module docstring)."""
    import pyarrow as pa

    return pa.schema([
        ("item_id", pa.string()),
        ("partition", pa.string()),
        ("source", pa.string()),
        ("fingerprint", pa.string()),
        ("source_rows", pa.int64()),
        ("item_href", pa.string()),
    ])


# --- times --------------------------------------------------------------------------------


def iso_from_micros(micros: int) -> str:
    """ISO 8601 UTC (``...Z``) of microseconds since the epoch."""
    return (_EPOCH + dt.timedelta(microseconds=int(micros))).isoformat().replace("+00:00", "Z")


# --- finding, loading, checking -------------------------------------------------------------


def manifest_url(source: Any) -> str | None:
    """The manifest URL of ``source`` when it names a compacted index, else None.

    ``source`` is the index root (directory, ``file://`` or ``s3://`` prefix),
    the ``_manifest.json`` itself, or a one-element list of either. Lists of
    several sources and ``.parquet`` files are never a compacted index. On S3
    this costs one HEAD request.
    """
    if isinstance(source, (list, tuple)) and len(source) == 1:
        source = source[0]
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = str(source).rstrip("/")
    if not text or text.endswith(".parquet"):
        return None
    if text.endswith(MANIFEST_NAME):
        return text
    if not storage.is_s3(text) and not storage.local_path(text).is_dir():
        return None
    candidate = storage.join(text, MANIFEST_NAME)
    try:
        return candidate if storage.exists(candidate) else None
    except StorageError:
        return None


def root_of(url: str) -> str:
    """The index root of a manifest URL."""
    text = str(url)
    return text[: -len(MANIFEST_NAME)].rstrip("/") or "."


def empty_manifest() -> dict[str, Any]:
    """A manifest with no rows (what a first compaction starts from)."""
    return {FORMAT_KEY: FORMAT_VERSION, "rows": 0, "bbox": None, "datetime": None, "partitions": {}}


def check_relative(path: Any, what: str) -> str:
    """``path`` if it is a plain relative path inside the root (no ``..``, no absolute path),
    else :class:`~stacchip.errors.UnsafePathError` naming ``what``."""
    if not isinstance(path, str):
        raise IndexFileError(f"{what}: file path {path!r} is not a string")
    text = path
    parts = text.split("/")
    if (not text or text.startswith("/") or "\\" in text or "://" in text
            or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in text)):
        raise UnsafePathError(f"{what}: file path {text!r} is not a relative path inside the index root")
    return text


def file_url(root: str, path: str, what: str) -> str:
    """The URL of the manifest-relative ``path`` under ``root``: checked lexically
    (:func:`check_relative`) and, for a local root, with symbolic links resolved: a path that
    leads outside the root raises :class:`~stacchip.errors.UnsafePathError`."""
    rel = check_relative(path, what)
    url = storage.join(root, rel)
    if storage.is_s3(root) or "://" in root and not root.startswith("file://"):
        return url
    base = os.path.realpath(storage.local_path(root))
    real = os.path.realpath(storage.local_path(url))
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"{what}: {path!r} leads outside the index root {root!r} (to {real!r})")
    return url


def _number(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IndexFileError(f"{what} is {value!r}, not a row or byte count")
    return value


def _check(manifest: Any, url: str) -> dict[str, Any]:
    """The manifest, its structure checked: an entry that lacks a field or holds the wrong
    type raises :class:`IndexFileError` naming the entry."""
    if not isinstance(manifest, dict) or manifest.get(FORMAT_KEY) not in READ_VERSIONS:
        raise IndexFileError(
            f"{url}: not a stacchip compacted-index manifest (versions {', '.join(map(str, READ_VERSIONS))})")
    parts = manifest.get("partitions")
    if not isinstance(parts, dict):
        raise IndexFileError(f"{url}: manifest lacks 'partitions'")
    if manifest[FORMAT_KEY] == 1 and not isinstance(manifest.get("sources"), dict):
        raise IndexFileError(f"{url}: manifest lacks 'sources'")
    for key, part in parts.items():
        where = f"{url}: partition {key!r}"
        check_relative(key, where)
        if not isinstance(part, dict) or not isinstance(part.get("files"), list):
            raise IndexFileError(f"{where} has no 'files' list")
        for n, entry in enumerate(part["files"]):
            what = f"{where} file #{n}"
            if not isinstance(entry, dict):
                raise IndexFileError(f"{what} is not an object")
            if "path" not in entry:
                raise IndexFileError(f"{what} has no 'path'")
            check_relative(entry["path"], what)
            if not entry["path"].startswith(key + "/"):
                raise IndexFileError(f"{what}: {entry['path']!r} is not in the partition's directory")
            _number(entry.get("rows"), f"{what} 'rows'")
            groups = entry.get("row_groups", [])
            if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
                raise IndexFileError(f"{what}: 'row_groups' is not a list of objects")
    items = manifest.get("items")
    if items is not None:
        if not isinstance(items, dict) or "path" not in items:
            raise IndexFileError(f"{url}: 'items' has no 'path'")
        check_relative(items["path"], f"{url}: 'items'")
    pending = manifest.get("pending")
    if pending is not None:
        if not isinstance(pending, dict) or not isinstance(pending.get("files"), list):
            raise IndexFileError(f"{url}: 'pending' has no 'files' list")
        check_relative(pending.get("staging"), f"{url}: 'pending'")
    return manifest


def load(url: str) -> dict[str, Any]:
    """The manifest at ``url``, checked (format version, structure, relative file paths)."""
    raw = storage.read_bytes(url)  # StorageNotFoundError when there is none
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise IndexFileError(f"{url}: not a JSON manifest: {exc}") from exc
    return _check(manifest, url)


def schema_of(manifest: Mapping[str, Any]) -> pa.Schema:
    """Arrow schema of a compacted index: :data:`stacchip.schema.SCHEMA` plus the extra columns it holds."""
    import pyarrow as pa

    encoded = manifest.get("arrow_schema")
    if not encoded:
        return SCHEMA
    try:
        stored = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))
    except (ValueError, pa.ArrowException) as exc:
        raise IndexFileError(f"manifest 'arrow_schema' cannot be read: {exc}") from exc
    extra = [f for f in stored if f.name not in SCHEMA.names]
    return pa.schema(list(SCHEMA) + extra)


def encode_schema(schema: pa.Schema) -> str:
    """base64 of the Arrow IPC serialisation of ``schema`` (without metadata)."""
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


# --- provenance -------------------------------------------------------------------------------


def provenance(root: str, manifest: Mapping[str, Any], columns: Sequence[str] | None = None) -> pa.Table:
    """The provenance rows of a compacted index (see the module docstring): from its
    provenance file (format 2) or the ``sources`` of a format-1 manifest.

    ``columns``: the columns wanted (all by default); only those are read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = provenance_schema()
    names = list(columns) if columns is not None else schema.names
    if manifest.get(FORMAT_KEY) == 1:
        rows: dict[str, list[Any]] = {n: [] for n in schema.names}
        for source, rec in manifest.get("sources", {}).items():
            items = rec.get("items") or {None: None}
            for key in rec.get("partitions") or [None]:
                for item_id, href in items.items():
                    rows["item_id"].append(item_id)
                    rows["partition"].append(key)
                    rows["source"].append(source)
                    rows["fingerprint"].append(f"{rec.get('size')}:{rec.get('mtime_ns')}")
                    rows["source_rows"].append(rec.get("rows"))
                    rows["item_href"].append(href)
        return pa.table(rows, schema=schema).select(names)
    items = manifest.get("items")
    if items is None:
        return empty_table(schema).select(names)
    url = file_url(root, items["path"], "manifest 'items'")
    try:
        with storage.open_input(url) as source:
            table = pq.ParquetFile(source, pre_buffer=False).read(columns=names, use_threads=False)
    except StorageError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IndexFileError(f"provenance file {url!r} cannot be read: {exc}") from exc
    want = pa.schema([schema.field(n) for n in names])
    if not table.schema.equals(want, check_metadata=False):
        try:
            table = table.cast(want)
        except (pa.ArrowException, ValueError) as exc:
            raise IndexFileError(f"provenance file {url!r} has the wrong columns: {exc}") from exc
    return table


def _under(href: str, root: str) -> bool:
    """True when ``href`` lies under ``root`` (both URLs or local paths; local ones with
    symbolic links resolved, remote ones normalised lexically)."""
    local = not ("://" in href and not href.startswith("file://"))
    root_local = not ("://" in root and not root.startswith("file://"))
    if local != root_local:
        return False
    if local:
        base = os.path.realpath(storage.local_path(root))
        real = os.path.realpath(storage.local_path(href))
        return real == base or real.startswith(base.rstrip(os.sep) + os.sep)
    scheme, _, rest = href.partition("://")
    rscheme, _, rrest = root.partition("://")
    if scheme.lower() != rscheme.lower():
        return False
    host, _, path = rest.partition("/")
    rhost, _, rpath = rrest.partition("/")
    if host.lower() != rhost.lower() or "?" in host or "#" in host:
        return False
    try:
        storage.under_root("/" + rpath, path.split("?")[0].split("#")[0], "href")
    except UnsafePathError:
        return False
    prefix = rpath.strip("/")
    clean = path.split("?")[0].split("#")[0].strip("/")
    return not prefix or clean == prefix or clean.startswith(prefix + "/")


def confine_href(href: str, roots: Sequence[str], what: str) -> str:
    """``href`` (relative ones resolved against ``roots[0]``, the index root) when it lies under
    one of ``roots``, else :class:`~stacchip.errors.UnsafePathError` naming ``what``."""
    text = str(href)
    if not text or any(ord(c) < 32 for c in text):
        raise UnsafePathError(f"{what}: item href {text!r} is not a usable location")
    if "://" not in text and not text.startswith("/"):
        text = storage.under_root(roots[0], text, what)
    for root in roots:
        if _under(text, str(root).rstrip("/") or "/"):
            return text
    raise UnsafePathError(
        f"{what}: item href {href!r} lies outside the index root {roots[0]!r}"
        + (f" and the allowed item roots {list(roots[1:])}" if len(roots) > 1 else "")
        + " (pass item_roots= naming where the STAC items are to allow it)")


def item_hrefs(
    manifest: Mapping[str, Any], root: str | None = None, item_roots: Sequence[str] | None = None
) -> dict[str, str]:
    """``item_id -> item href`` for every item whose STAC item location is known.

    ``root``: the index root (needed for format 2, whose hrefs live in the provenance file;
    relative hrefs resolve against it). Each href must lie under ``root`` or one of
    ``item_roots`` (:func:`confine_href`), else :class:`~stacchip.errors.UnsafePathError`.
    Without ``root`` (a format-1 manifest only) hrefs are returned as recorded.
    """
    if root is None:
        if manifest.get(FORMAT_KEY) != 1:
            raise IndexFileError("item_hrefs of a format-2 manifest needs the index root")
        pairs: Iterable[tuple[Any, Any]] = (
            (item_id, href) for source in manifest.get("sources", {}).values()
            for item_id, href in source.get("items", {}).items())
        return {str(i): str(h) for i, h in pairs if h}
    table = provenance(root, manifest, ["item_id", "item_href"])
    roots = [root, *(item_roots or [])]
    hrefs: dict[str, str] = {}
    for item_id, href in zip(table.column("item_id").to_pylist(), table.column("item_href").to_pylist(),
                             strict=True):
        if item_id is None or not href:
            continue
        hrefs[str(item_id)] = confine_href(str(href), roots, f"item {item_id!r} of {root}")
    return hrefs


def hrefs_for(index: Any, item_roots: Sequence[str] | None = None) -> dict[str, str] | None:
    """``item_id -> item href`` from the manifest when ``index`` names a compacted index, else
    None; hrefs confined to the index root and ``item_roots`` (:func:`item_hrefs`)."""
    url = manifest_url(index)
    return None if url is None else item_hrefs(load(url), root_of(url), item_roots)


# --- choosing files and row groups ------------------------------------------------------------


def _extent(entry: Mapping[str, Any]) -> Extent:
    return Extent(rows=entry.get("rows"), bbox=entry.get("bbox"), when=entry.get("datetime"),
                  cloud=entry.get("cloud"), nodata=entry.get("nodata"))


def _partition_items(root: str | None, manifest: Mapping[str, Any]) -> dict[str, set[str]]:
    """``{partition key: ids of its items}`` (from the provenance)."""
    if root is None and manifest.get(FORMAT_KEY) != 1:
        return {}
    if manifest.get(FORMAT_KEY) == 1:
        table_items: dict[str, set[str]] = {}
        for source in manifest.get("sources", {}).values():
            for key in source.get("partitions", []):
                table_items.setdefault(key, set()).update(source.get("items", {}))
        return table_items
    table = provenance(str(root), manifest, ["item_id", "partition"])
    out: dict[str, set[str]] = {}
    for item_id, key in zip(table.column("item_id").to_pylist(), table.column("partition").to_pylist(),
                            strict=True):
        if item_id is not None and key is not None:
            out.setdefault(key, set()).add(item_id)
    return out


def select(
    manifest: Mapping[str, Any], selection: Selection, root: str | None = None
) -> list[tuple[str, list[int]]]:
    """Files (relative paths) and row groups that may hold rows passing ``selection``
    (partitions by platform, items and extents; files and row groups by extents)."""
    partition_items = _partition_items(root, manifest) if selection.item_ids is not None else None
    out: list[tuple[str, list[int]]] = []
    for key, part in manifest.get("partitions", {}).items():
        if selection.platforms is not None and part.get("platform") not in selection.platforms:
            continue
        if (partition_items is not None and selection.item_ids is not None
                and (root is not None or manifest.get(FORMAT_KEY) == 1)
                and not partition_items.get(key, set()) & selection.item_ids):
            continue
        if not _extent(part).may_hold(selection):
            continue
        for entry in part.get("files", []):
            if not _extent(entry).may_hold(selection):
                continue
            may_hold = selection.may_hold
            groups = [i for i, rg in enumerate(entry.get("row_groups", []))
                      if may_hold(rg.get("bbox"), rg.get("datetime"), rg.get("cloud"), rg.get("nodata"))]
            if groups:
                out.append((entry["path"], groups))
    return out


def plan(manifest: Mapping[str, Any], root: str | None = None,
         **filters: Unpack[QueryFilters]) -> list[tuple[str, list[int]]]:
    """Files (relative paths) and row groups that may hold rows passing the filters.

    Filters mean what they mean in :func:`stacchip.index.query`
    (:class:`~stacchip.filters.QueryFilters`). Pruning is conservative: a row group
    is left out only when its recorded extents prove no row in it can pass (time
    ranges widened by :data:`~stacchip.filters.TIME_MARGIN`); the rows of the kept ones
    still go through the exact filters of the query. ``root`` (the index root) lets an
    ``item_id`` filter prune partitions by the provenance of a format-2 manifest.
    """
    return select(manifest, Selection.of(filters, "plan"), root)


# --- datasets ---------------------------------------------------------------------------------


def staged_name(rel: str) -> str:
    """The name a part file has while staged (``.parquet`` -> ``.pq``: no ``*.parquet`` glob takes it)."""
    return rel[: -len(".parquet")] + ".pq" if rel.endswith(".parquet") else rel + ".pq"


def _pending(root: str, manifest: Mapping[str, Any]) -> dict[str, str]:
    """``{path: staged URL}`` of the files a run had still to move into place."""
    pending = manifest.get("pending")
    if not pending:
        return {}
    staging = check_relative(pending["staging"], "manifest 'pending'")
    return {str(p): storage.join(root, staging, staged_name(check_relative(p, "manifest 'pending'")))
            for p in pending.get("files", [])}


def fragments_of(
    root: str, manifest: Mapping[str, Any], selection: Iterable[tuple[str, Sequence[int] | None]] | None = None
) -> list[Fragment]:
    """Fragments over a compacted index's files: every file, or ``selection``'s row groups
    (what :func:`select` returns). File paths are confined to the root (:func:`file_url`);
    a file a run has not yet moved into place is read where it is staged."""
    entries = {f["path"]: f for part in manifest.get("partitions", {}).values() for f in part["files"]}
    if selection is None:
        selection = [(path, None) for path in entries]
    staged = _pending(root, manifest)
    out = []
    for path, groups in selection:
        entry = entries.get(path, {})
        url = file_url(root, path, f"manifest of {root}")
        if path in staged and not storage.exists(url):
            url = staged[path]
        extents = tuple(_extent(rg) for rg in entry.get("row_groups", [])) or None
        out.append(Fragment(url=url, row_groups=None if groups is None else tuple(groups), extents=extents,
                            name=url))
    return out


def open_compacted(sources: Any, **filters: Unpack[QueryFilters]) -> IndexDataset | None:
    """The compacted index named by ``sources`` as an :class:`~stacchip.scan.IndexDataset`
    (None when ``sources`` is not a compacted index); with ``filters``, only the files and
    row groups they may hit (see :func:`plan`)."""
    url = manifest_url(sources)
    if url is None:
        return None
    manifest = load(url)
    root = root_of(url)
    schema = schema_of(manifest)
    selection = Selection.of(filters, "open_compacted")
    chosen = None if selection.empty else select(manifest, selection, root)
    paths = [p for p, _ in chosen] if chosen is not None else [
        f["path"] for part in manifest["partitions"].values() for f in part["files"]]
    fragments = fragments_of(root, manifest, chosen)
    by_path = dict(zip(paths, fragments, strict=True))

    def planner(asked: Selection) -> list[Fragment]:
        if asked.empty:
            return fragments
        out = []
        for path, groups in select(manifest, asked, root):
            fragment = by_path.get(path)
            if fragment is None:
                continue
            if fragment.row_groups is not None:
                allowed = set(fragment.row_groups)
                groups = [g for g in groups if g in allowed]
                if not groups:
                    continue
            out.append(Fragment(url=fragment.url, row_groups=tuple(groups), extents=fragment.extents,
                                name=fragment.name))
        return out

    return IndexDataset(fragments, schema, description=f"compacted index {root}", planner=planner)
