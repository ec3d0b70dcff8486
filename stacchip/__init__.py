"""stacchip: index STAC items into GeoParquet chip tables and read chips on demand."""

from __future__ import annotations

import logging

__version__ = "1.0.0.dev0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
