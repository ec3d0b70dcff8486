"""Batch samplers that keep reads local.

Random access over an index scatters reads across scenes and COG blocks.
:class:`ItemBlockBatchSampler` groups chips by item and by a square block of
neighbouring chip positions, shuffles the groups (and the chips inside each),
and fills batches group after group. Consecutive reads in a worker then hit
the same open file and neighbouring COG tiles, while every chip still appears
exactly once per epoch.

It is a plain iterable of index lists, so it needs no torch import; pass it as
``DataLoader(dataset, batch_sampler=...)``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from stacchip.errors import ConfigError


def _row_arrays(source: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(item_id, x, y)`` arrays from a ChipDataset or an index table."""
    if isinstance(source, pa.Table):
        return (
            np.asarray(source.column("item_id").to_pylist(), dtype=object),
            source.column("chip_index_x").to_numpy().astype(np.int64),
            source.column("chip_index_y").to_numpy().astype(np.int64),
        )
    if all(hasattr(source, a) for a in ("item_id", "x", "y")):
        return np.asarray(source.item_id, dtype=object), np.asarray(source.x), np.asarray(source.y)
    raise ConfigError(
        f"ItemBlockBatchSampler needs a ChipDataset or an index table, got {type(source).__name__}"
    )


def block_groups(item_id: np.ndarray, x: np.ndarray, y: np.ndarray, block: int) -> list[np.ndarray]:
    """Row numbers grouped by ``(item_id, x // block, y // block)``, in first-seen order.

    ``block`` is the block side in chips (a block larger than the chip grid
    groups whole items).
    """
    if block < 1:
        raise ConfigError(f"block must be >= 1 chip, got {block}")
    _, item_codes = np.unique(item_id.astype(str), return_inverse=True)
    keys = np.stack([item_codes, x // block, y // block], axis=1)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return [g for g in np.split(order, bounds) if len(g)]


class ItemBlockBatchSampler:
    """Batches of row numbers grouped by item and block of chips.

    ``block`` is the side of a block in chips (chips ``x // block, y // block``
    share a group); ``shuffle`` shuffles group order and chips within groups
    with a generator seeded by ``seed`` and the epoch (:meth:`set_epoch`);
    ``drop_last`` drops a final short batch. Batches may span groups.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        block: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        item_id, x, y = _row_arrays(source)
        self.groups = block_groups(item_id, x, y, int(block))
        self.n = len(item_id)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use a different (deterministic) shuffle for ``epoch``."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def order(self) -> np.ndarray:
        """All row numbers in the order batches take them."""
        if not self.groups:
            return np.zeros(0, dtype=np.int64)
        if not self.shuffle:
            return np.concatenate(self.groups).astype(np.int64)
        rng = self._rng()
        groups = [self.groups[k] for k in rng.permutation(len(self.groups))]
        return np.concatenate([rng.permutation(g) for g in groups]).astype(np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch.tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return (self.n + self.batch_size - 1) // self.batch_size
