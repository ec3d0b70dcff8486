"""The index schema: one row per chip, its column names and types, and the constants the
readers and writers of index files share.

The lowest module of the index code: :mod:`stacchip.filters`, :mod:`stacchip.scan`,
:mod:`stacchip.compacted` and :mod:`stacchip.index` import it, it imports none of them.
Every name stays importable from :mod:`stacchip.index`.

============================  =========================================
``chipid``                    string, ``{item_id}-{x}-{y}``
``date``                      date32 (UTC date of the item)
``chip_index_x/_y``           uint16, chip position in the grid
``cloud_cover_percentage``    float32, a *fraction* 0-1 despite the name
``nodata_percentage``         float32, a *fraction* 0-1 despite the name
``geometry``                  chip polygon in lon/lat, WKB
``item_id``                   string
``platform``                  string
``datetime``                  timestamp[us, UTC]
``chip_size``                 uint16, pixels of the finest grid
``bbox``                      struct<xmin, ymin, xmax, ymax: double>, degrees
``collection``                string, the item's STAC collection id (null when unknown)
============================  =========================================
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa

GEOPARQUET_VERSION = "1.1.0"
GEOMETRY_COLUMN = "geometry"
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
#: Key of the ``stacchip`` JSON in a Parquet file's key-value metadata.
STACCHIP_METADATA_KEY = b"stacchip"

EPOCH = dt.date(1970, 1, 1)
BBOX_TYPE = pa.struct([(name, pa.float64()) for name in BBOX_FIELDS])

#: Arrow schema of an index table as written to Parquet.
SCHEMA = pa.schema(
    [
        ("chipid", pa.string()),
        ("date", pa.date32()),
        ("chip_index_x", pa.uint16()),
        ("chip_index_y", pa.uint16()),
        ("cloud_cover_percentage", pa.float32()),
        ("nodata_percentage", pa.float32()),
        (GEOMETRY_COLUMN, pa.binary()),
        ("item_id", pa.string()),
        ("platform", pa.string()),
        ("datetime", pa.timestamp("us", tz="UTC")),
        ("chip_size", pa.uint16()),
        ("bbox", BBOX_TYPE),
        ("collection", pa.string()),
    ]
)
#: Columns a file may lack and still be scanned as it is (read as nulls): added
#: after files were first written.
OPTIONAL_COLUMNS = frozenset({"collection"})

#: The seven columns upstream's ``create_index()`` returns, in its order.
UPSTREAM_COLUMNS = (
    "chipid",
    "date",
    "chip_index_x",
    "chip_index_y",
    "cloud_cover_percentage",
    "nodata_percentage",
    GEOMETRY_COLUMN,
)
#: Chip size assumed for index files that do not record one (upstream's processors
#: and prechip only ever used 256-pixel chips).
UPSTREAM_CHIP_SIZE = 256


def is_current(schema: pa.Schema) -> bool:
    """True when a file schema holds every :data:`SCHEMA` column with its type
    (a file read as it is, without normalisation); :data:`OPTIONAL_COLUMNS` may be missing."""
    for field in SCHEMA:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            if field.name in OPTIONAL_COLUMNS:
                continue
            return False
        typ = schema.field(idx).type
        if isinstance(typ, pa.ExtensionType):
            typ = typ.storage_type
        if typ != field.type:
            return False
    return True


# --- Arrow values from buffers ------------------------------------------------------------------
# ``pa.array``, ``pa.scalar``, ``Array.to_numpy``, ``Schema.empty_table`` and Python scalars in
# ``pyarrow.compute`` calls make pyarrow import pandas (~0.3 s, ~45 MB of RSS) when it is
# installed; an indexing job or a query never needs it. These build the same values from buffers.


def fixed_array(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """Arrow array of a fixed-width type over a contiguous numpy array (no nulls)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(values)])


def binary_array(items: list[bytes], typ: pa.DataType) -> pa.Array:
    """Arrow binary/string array from a list of bytes (no nulls)."""
    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, items), np.int64, len(items)), out=offsets[1:])
    return pa.Array.from_buffers(typ, len(items), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items))])


def string_array(values: list[str]) -> pa.Array:
    """Arrow string array of Python strings (no nulls)."""
    return binary_array([v.encode("utf-8", "surrogatepass") for v in values], pa.string())


def bool_array(mask: np.ndarray) -> pa.Array:
    """Arrow boolean array of a numpy boolean array (no nulls)."""
    mask = np.asarray(mask, dtype=bool).ravel()
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(np.packbits(mask, bitorder="little"))])


_NUMPY = {pa.float64(): np.float64, pa.float32(): np.float32, pa.int64(): np.int64, pa.uint64(): np.uint64,
          pa.int32(): np.int32, pa.uint16(): np.uint16}


def scalar(value: Any, typ: pa.DataType) -> pa.Scalar:
    """An Arrow scalar of a numeric type or boolean."""
    if typ == pa.bool_():
        return bool_array(np.array([bool(value)]))[0]
    if pa.types.is_timestamp(typ):
        return fixed_array(np.array([int(value)], dtype=np.int64), typ)[0]
    return fixed_array(np.array([value], dtype=_NUMPY[typ]), typ)[0]


def empty_table(schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` with no rows."""
    return pa.Table.from_batches([], schema=schema)


_KERNELS: Any = None


def _kernels() -> Any:
    """The module of Arrow's compute kernels: ``pyarrow._compute`` (compiled), whose
    ``call_function`` and option classes ``pyarrow.compute`` re-exports; importing
    ``pyarrow.compute`` itself costs ~30 ms more (it builds a wrapper for every kernel). Falls
    back to ``pyarrow.compute`` where the compiled module is not there."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import pyarrow._compute as kernels
        except ImportError:  # pragma: no cover - every pyarrow since 4 has it
            import pyarrow.compute as kernels
        _KERNELS = kernels
    return _KERNELS


def compute(name: str, *args: Any, options: Any = None) -> Any:
    """Arrow compute kernel ``name`` on ``args`` (``pyarrow.compute.call_function``)."""
    return _kernels().call_function(name, list(args), options)


def compute_options(kind: str, *args: Any) -> Any:
    """An options object of the compute kernels (``SetLookupOptions``, ``StructFieldOptions``, ...)."""
    return getattr(_kernels(), kind)(*args)


def cast(array: Any, typ: pa.DataType) -> Any:
    """``array`` cast to ``typ`` (safe cast)."""
    return compute("cast", array, options=_kernels().CastOptions.safe(typ))
