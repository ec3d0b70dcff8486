"""The manifest of a compacted index (in the core, :mod:`stacchip.compacted`, which
:func:`stacchip.index.query` and the training side read it through; every name stays
importable from here)."""

from stacchip.compacted import (  # noqa: F401
    FORMAT_KEY,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PROVENANCE_NAME,
    READ_VERSIONS,
    STAGING_DIR,
    TIME_MARGIN,
    check_relative,
    confine_href,
    empty_manifest,
    encode_schema,
    file_url,
    fragments_of,
    hrefs_for,
    item_hrefs,
    iso_from_micros,
    load,
    manifest_url,
    open_compacted,
    parse_time,
    plan,
    provenance,
    provenance_schema,
    root_of,
    schema_of,
    select,
    staged_name,
)
