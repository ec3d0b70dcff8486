"""``python -m stacchip.processors SOURCE [flags]``: run a source processor by name."""

from stacchip.processors.base import run_source

if __name__ == "__main__":
    raise SystemExit(run_source())
