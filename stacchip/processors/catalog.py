"""The STAC API client, moved to :mod:`stacchip.catalog.stac_api` (bulk indexing uses it
too). This name stays the same module object, so ``from stacchip.processors.catalog
import Catalog`` and monkeypatching its attributes keep working."""

import sys

from stacchip.catalog import stac_api

sys.modules[__name__] = stac_api
