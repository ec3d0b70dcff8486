"""Local paths, ``file://``, ``s3://``, ``http(s)://``, ``gs://`` and ``az://``: one I/O layer.

* :mod:`stacchip.storage.config` -- the one configuration (credentials and region from
  boto3's session, endpoint, CA bundle, proxies, requester-pays, the retry policy,
  timeouts), read once per environment and handed to every client and to GDAL.
* :mod:`stacchip.storage.clients` -- obstore's store per root (bucket, origin, signed
  URL), the synchronous client of forked children, one error classification.
* :mod:`stacchip.storage.files` -- whole files and objects: read, write atomically,
  exists, list, delete, copy, create-if-absent, checksum records, temporary files.
* :mod:`stacchip.storage.paths` -- URLs and paths, and the path-safety rule for names
  that come from outside data (:func:`safe_segment`, :func:`join_under`,
  :func:`under_root`).

Everything is importable from ``stacchip.storage`` as before.
"""

from stacchip.errors import StorageError, StorageNotFoundError  # noqa: F401 (importable here as before)
from stacchip.storage.clients import client_for, locate, obstore_usable
from stacchip.storage.config import IOSettings, settings
from stacchip.storage.files import (
    DAMAGED,
    MISSING,
    FileInfo,
    list_file_infos,
    list_info,
    presign,
    prune_empty_dirs,
    move,
    remove,
    remove_tree,
    temp_stem,
    SHA256_ATTRIBUTE,
    UNRECORDED,
    VERIFIED,
    Verification,
    arrow_filesystem,
    arrow_path,
    bucket_exists,
    copy,
    create_if_absent,
    delete,
    exists,
    exists_retry,
    list_files,
    open_input,
    put_file,
    read_bytes,
    read_bytes_retry,
    record_url,
    remove_stale_temps,
    remove_stale_temps_in,
    s3_client,
    s3_endpoint,
    s3_region,
    sha256_of,
    verify,
    verify_retry,
    whole_or_damaged,
    write_bytes,
    write_bytes_retry,
    write_recorded,
    write_recorded_retry,
)
from stacchip.storage.paths import (
    MAX_SEGMENT_BYTES,
    is_http,
    is_remote,
    is_s3,
    join,
    join_under,
    local_path,
    safe_segment,
    split_s3,
    under_root,
)


def reset() -> None:
    """Forget the settings and every client built from them (read again on next use)."""
    from stacchip.storage import clients, config

    config.reset()
    clients.reset()


__all__ = [
    "DAMAGED", "FileInfo", "IOSettings", "MAX_SEGMENT_BYTES", "MISSING", "SHA256_ATTRIBUTE", "UNRECORDED",
    "VERIFIED", "Verification", "arrow_filesystem", "arrow_path", "bucket_exists", "client_for", "copy",
    "create_if_absent", "delete", "exists", "exists_retry", "is_http", "is_remote", "is_s3", "join",
    "join_under", "list_file_infos", "list_files", "list_info", "local_path", "locate", "move",
    "obstore_usable", "open_input", "presign", "prune_empty_dirs", "put_file", "read_bytes",
    "read_bytes_retry", "record_url", "remove", "remove_stale_temps", "remove_stale_temps_in", "remove_tree",
    "reset", "s3_client", "s3_endpoint", "s3_region", "safe_segment", "settings", "sha256_of", "split_s3",
    "temp_stem", "under_root", "verify", "verify_retry", "whole_or_damaged", "write_bytes",
    "write_bytes_retry", "write_recorded", "write_recorded_retry",
]
