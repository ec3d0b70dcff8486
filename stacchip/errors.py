"""The stacchip exception tree.

Every check on user input raises one of these, never a bare ``assert``. Each
error names what was wrong (item id, asset key, href, field) in its message.
Where an upstream caller could have caught a built-in exception, the error
also derives from that built-in (``ValueError``, ``KeyError``, ``IndexError``,
``OSError``) so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class StacchipError(Exception):
    """Base class of every error raised by stacchip."""


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


# --- index files ---------------------------------------------------------------


class IndexFileError(StacchipError, ValueError):
    """An index file or dataset is missing, unreadable or has the wrong schema."""


# --- storage -------------------------------------------------------------------


class StorageError(StacchipError, OSError):
    """Reading or writing a local path or object-store URL failed."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or file does not exist."""


class UnsafePathError(StacchipError, ValueError):
    """A name or href from outside data (STAC item id, asset file name, index row,
    href under a mount) would lead a read or write outside the root it belongs under.

    The rule is in :mod:`stacchip.storage` (:func:`~stacchip.storage.safe_segment`).
    """


# --- configuration ---------------------------------------------------------------


class ConfigError(StacchipError, ValueError):
    """A command-line flag, environment variable or input file is invalid."""
