"""The stacchip exception tree.

Every check on user input raises one of these, never a bare ``assert``. Each
error names what was wrong (item id, asset key, href, field) in its message.
Where an upstream caller could have caught a built-in exception, the error
also derives from that built-in (``ValueError``, ``KeyError``, ``IndexError``,
``OSError``) so existing ``except`` clauses keep working.

Each class also states the exit status a console command ends with when it
reports the error (:attr:`StacchipError.exit_code`, read by
:mod:`stacchip.console`): ``2`` for bad input or configuration (the default:
retrying the same command cannot help), ``1`` for a failure worth retrying
(storage, network, a service).
"""

from __future__ import annotations

#: Exit status of a failure worth retrying (network, service, storage).
EXIT_RETRY = 1
#: Exit status of bad input or configuration.
EXIT_INPUT = 2


class StacchipError(Exception):
    """Base class of every error raised by stacchip."""

    #: Exit status of a command that stops on this error (see the module docstring).
    exit_code: int = EXIT_INPUT


# --- STAC item problems -----------------------------------------------------


class ItemError(StacchipError, ValueError):
    """A STAC item cannot be used as given."""


class ProjectionError(ItemError):
    """Projection information of an item or asset is missing or invalid."""


class UnsupportedTransformError(ProjectionError):
    """The affine transform is rotated, sheared or otherwise not north-up."""


class UnsupportedUnitsError(ProjectionError):
    """The CRS does not use metres as its linear unit."""


class GridMismatchError(ProjectionError):
    """A raster file's own CRS, size or georeferencing contradicts the item's grid."""


class DatetimeError(ItemError):
    """An item has neither ``datetime`` nor ``start_datetime``."""


class AssetNotFoundError(StacchipError, KeyError):
    """An asset key is not present in the item."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


# --- reading pixels ----------------------------------------------------------


class ChipError(StacchipError):
    """A chip request cannot be served."""


class ChipOutOfRangeError(ChipError, IndexError):
    """Chip indices lie outside the item's chip grid."""


class AssetReadError(StacchipError, OSError):
    """An asset's href could not be opened or read."""

    exit_code = EXIT_RETRY


class AssetNotRasterError(AssetReadError):
    """An asset's href does not exist or is not a raster GDAL can read: bad input,
    not worth retrying."""

    exit_code = EXIT_INPUT


class LayoutError(StacchipError, ValueError):
    """A stored tile layout (an index file's ``layouts`` metadata, a JSON sidecar)
    is corrupt, edited or invalid; the tile reader reads the file's header again
    instead of using it."""


class LayoutVersionError(LayoutError):
    """A stored tile layout of another format version (read again, not a fault)."""


# --- index files ---------------------------------------------------------------


class IndexFileError(StacchipError, ValueError):
    """An index file or dataset is missing, unreadable or has the wrong schema."""


class IndexLockedError(StacchipError):
    """Another writer holds the lock of a compacted index (one compaction at a time).

    The message names the holder (host, process id, start time, run); exit status 2:
    running the same command again while the holder works cannot help.
    """


class EmptySelectionError(StacchipError, ValueError):
    """A job, command or dataset selected nothing from a non-empty input.

    The message says how many rows were read and which filter removed them.
    Commands accept an empty selection only when told (``--allow-empty``).
    """


# --- storage -------------------------------------------------------------------


class StorageError(StacchipError, OSError):
    """Reading or writing a local path or object-store URL failed."""

    exit_code = EXIT_RETRY


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or file does not exist."""

    exit_code = EXIT_INPUT


class StorageRefusedError(StorageError):
    """The store refused the request for a reason a retry cannot fix: credentials,
    permissions, a certificate the CA bundle does not trust, the wrong region, clock skew,
    another HTTP 4xx. Never retried."""

    exit_code = EXIT_INPUT


class StoragePreconditionError(StorageError):
    """A conditional request lost: the object changed since its ETag was recorded
    (``If-Match``), or something was created first (create-if-absent)."""


class StorageRangeError(StorageError):
    """A ranged read cannot be served: the server ignores ``Range`` requests, or the
    range lies beyond the object's end."""


# --- services --------------------------------------------------------------------


class ServiceError(StacchipError, RuntimeError):
    """A remote service (STAC API, ...) is unreachable or failing; worth retrying later."""

    exit_code = EXIT_RETRY


class UnsafePathError(StacchipError, ValueError):
    """A name or href from outside data (STAC item id, asset file name, index row,
    href under a mount) would lead a read or write outside the root it belongs under.

    The rule is in :mod:`stacchip.storage` (:func:`~stacchip.storage.safe_segment`).
    """


# --- batch tasks ------------------------------------------------------------------


class TaskFailed(StacchipError):
    """A batch task did part of its work and failed the rest; ``result`` is what it did.

    Exit status 1: the scheduler re-runs the task, which skips what is done.
    """

    exit_code = EXIT_RETRY

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


# --- configuration ---------------------------------------------------------------


class ConfigError(StacchipError, ValueError):
    """A command-line flag, environment variable or input file is invalid."""
