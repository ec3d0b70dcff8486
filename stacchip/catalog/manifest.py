"""The manifest of a compacted index (moved to the core, :mod:`stacchip.compacted`, which
:func:`stacchip.index.query` and the training side read it through; every name stays
importable from here)."""

from stacchip.compacted import (  # noqa: F401
    FORMAT_KEY,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TIME_MARGIN,
    check_relative,
    dataset,
    empty_manifest,
    encode_schema,
    hrefs_for,
    item_hrefs,
    iso_from_micros,
    load,
    manifest_url,
    open_compacted,
    parse_time,
    plan,
    root_of,
    schema_of,
)
