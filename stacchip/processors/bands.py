"""Per-platform band order (moved to :mod:`stacchip.platforms`; re-exported here
for code that imports it from ``stacchip.processors.bands``)."""

from stacchip.platforms import *  # noqa: F403
from stacchip.platforms import __all__  # noqa: F401
