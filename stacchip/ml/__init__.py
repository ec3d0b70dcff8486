"""Training-side helpers: datasets, samplers, spatial splits, time stacks,
labels, Croissant metadata and quicklooks.

Nothing here imports torch: datasets return numpy arrays that
``torch.utils.data.DataLoader`` collates, and samplers are plain iterables.
Install the ``ml`` extra (``pip install stacchip[ml]``) for torch, mlcroissant
and the plotting libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChipDataset": "stacchip.ml.dataset",
    "load_index": "stacchip.ml.dataset",
    "ItemSource": "stacchip.ml.items",
    "ItemBlockBatchSampler": "stacchip.ml.samplers",
    "DistributedChipSampler": "stacchip.ml.samplers",
    "assign_splits": "stacchip.ml.splits",
    "split_report": "stacchip.ml.splits",
    "label_class_report": "stacchip.ml.splits",
    "format_report": "stacchip.ml.splits",
    "TimeStack": "stacchip.ml.stacks",
    "TimeStackDataset": "stacchip.ml.stacks",
    "build_stacks": "stacchip.ml.stacks",
    "LabelRaster": "stacchip.ml.labels",
    "croissant_metadata": "stacchip.ml.croissant",
    "write_croissant": "stacchip.ml.croissant",
    "render_quicklook": "stacchip.ml.preview",
    "render_mosaic": "stacchip.ml.preview",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stacchip.ml' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
