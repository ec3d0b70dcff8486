"""The console scripts that fill a bucket (one module per source, on a shared task frame) and the
commands over :mod:`stacchip.export`: ``stacchip-prechip`` and ``stacchip-stats``."""
