"""Samplers that keep reads local, on one process or across distributed ranks.

Random access over an index scatters reads across scenes and COG blocks.
Both samplers here group chips by item and by a square block of neighbouring
chip positions, shuffle the groups (and the chips inside each), and take
chips group after group. Consecutive reads in a worker then hit the same open
file and neighbouring COG tiles, while every chip still appears once per epoch.

* :class:`ItemBlockBatchSampler` yields batches (lists of row numbers):
  ``DataLoader(dataset, batch_sampler=...)``.
* :class:`DistributedChipSampler` yields row numbers, like
  ``torch.utils.data.DistributedSampler``: ``DataLoader(dataset, sampler=...,
  batch_size=...)``.

Distributed training (DDP): both split each epoch across ranks. The epoch
order is computed identically on every rank (from ``seed`` and the epoch set
with :meth:`set_epoch`; it depends on the chips' item ids and positions, not
on the row order of the index, so ranks that list index files differently
still agree), then cut into ``num_replicas`` *contiguous* equal shares, one per
rank: the shares are disjoint, their union is the epoch, and each rank keeps
block locality (at most one group per share boundary is split between two
ranks). When the chip count does not divide evenly, the remainder is either
padded (default: the first chips of the epoch order are repeated on the last
rank(s), so every chip is seen and a few twice) or dropped (the last chips of
the epoch order are left out this epoch; with shuffling, different chips each
epoch), as torch's ``DistributedSampler(drop_last=...)``. Equal shares give
every rank the same number of batches, which DDP needs to avoid a hang.

``num_replicas`` and ``rank`` come from ``torch.distributed`` when a process
group is initialised, else from the arguments (explicit arguments win, as in
torch); without either the sampler covers the whole epoch (one replica). Pass
the same ``seed`` on every rank and call ``set_epoch(epoch)`` before each epoch.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from stacchip.errors import ConfigError

#: How an epoch that does not divide by the number of replicas is evened out.
REMAINDERS = ("pad", "drop")


def _row_arrays(source: Any, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(item_id, x, y)`` arrays from a ChipDataset or an index table."""
    if isinstance(source, pa.Table):
        return (
            np.asarray(source.column("item_id").to_pylist(), dtype=object),
            source.column("chip_index_x").to_numpy().astype(np.int64),
            source.column("chip_index_y").to_numpy().astype(np.int64),
        )
    if all(hasattr(source, a) for a in ("item_id", "x", "y")):
        return np.asarray(source.item_id, dtype=object), np.asarray(source.x), np.asarray(source.y)
    raise ConfigError(f"{what} needs a ChipDataset or an index table, got {type(source).__name__}")


def block_groups(item_id: np.ndarray, x: np.ndarray, y: np.ndarray, block: int) -> list[np.ndarray]:
    """Row numbers grouped by ``(item_id, x // block, y // block)``.

    Groups come sorted by item id, then block; rows inside a group by chip
    position ``(y, x)`` (then row number), so the grouping depends on the chips,
    not on the order of the rows. ``block`` is the block side in chips (a block
    larger than the chip grid groups whole items).
    """
    if isinstance(block, bool) or int(block) != block or block < 1:
        raise ConfigError(f"block must be a whole number >= 1 of chips, got {block!r}")
    if len(item_id) == 0:
        return []
    block = int(block)
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    _, item_codes = np.unique(item_id.astype(str), return_inverse=True)
    keys = np.stack([item_codes.ravel(), x // block, y // block], axis=1)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.lexsort((np.arange(len(inverse)), x, y, inverse))
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return [g for g in np.split(order, bounds) if len(g)]


def _process_group() -> Any:
    """``torch.distributed`` when it is imported and a process group is initialised, else ``None``.

    torch is never imported here: a process group can only exist if it already is.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if dist.is_available() and dist.is_initialized():
            return dist
    except (AttributeError, RuntimeError):
        return None
    return None


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def replicas(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """``(num_replicas, rank)`` of this process, validated.

    Explicit arguments win; missing ones come from an initialised
    ``torch.distributed`` process group; without one the default is a single
    replica (``(1, 0)``). Raises :class:`ConfigError` for a world size below 1,
    a rank outside ``0 .. num_replicas - 1``, or ``num_replicas > 1`` without a
    rank.
    """
    dist = _process_group()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist is not None else 1
    world = _whole(num_replicas, "num_replicas")
    if world < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {world}")
    if rank is None:
        if dist is not None:
            rank = dist.get_rank()
        elif world == 1:
            rank = 0
        else:
            raise ConfigError(
                f"num_replicas={world} given without rank=: pass rank= (0..{world - 1}) or initialise "
                "torch.distributed (init_process_group) before building the sampler"
            )
    r = _whole(rank, "rank")
    if not 0 <= r < world:
        hint = "" if world > 1 else " (no torch.distributed process group: pass num_replicas= too)"
        raise ConfigError(f"rank={r} is outside 0..{world - 1} for num_replicas={world}{hint}")
    return world, r


def shard(order: np.ndarray, num_replicas: int, rank: int, remainder: str = "pad") -> np.ndarray:
    """The contiguous share of ``order`` that ``rank`` of ``num_replicas`` takes.

    Every share has the same length: ``ceil(n / num_replicas)`` with
    ``remainder="pad"`` (the order is extended by repeating it from its start),
    ``n // num_replicas`` with ``remainder="drop"`` (the tail is left out).
    """
    if remainder not in REMAINDERS:
        raise ConfigError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
    n = len(order)
    per = n // num_replicas if remainder == "drop" else -(-n // num_replicas)
    total = per * num_replicas
    if total > n:
        order = np.tile(order, -(-total // n))[:total]
    return order[rank * per:(rank + 1) * per]


class _EpochOrder:
    """Shared part of the samplers: groups, deterministic epoch shuffle, rank share.

    ``groups=None`` means every row is its own group (no locality).
    """

    def __init__(
        self, groups: list[np.ndarray] | None, n: int, shuffle: bool, seed: int,
        num_replicas: int | None, rank: int | None, remainder: str,
    ) -> None:
        if remainder not in REMAINDERS:
            raise ConfigError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
        self.groups = groups
        self.n = int(n)
        self.shuffle = bool(shuffle)
        self.seed = _whole(seed, "seed")
        self.num_replicas, self.rank = replicas(num_replicas, rank)
        self.remainder = remainder
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the (deterministic) shuffle of ``epoch``; call it on every rank before each epoch."""
        self.epoch = _whole(epoch, "epoch")

    def _rng(self) -> np.random.Generator:
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def epoch_order(self) -> np.ndarray:
        """Row numbers of the whole epoch (all ranks), in order; the same on every rank."""
        if self.groups is None:
            return self._rng().permutation(self.n) if self.shuffle else np.arange(self.n, dtype=np.int64)
        if not self.groups:
            return np.zeros(0, dtype=np.int64)
        if not self.shuffle:
            return np.concatenate(self.groups).astype(np.int64)
        rng = self._rng()
        groups = [self.groups[k] for k in rng.permutation(len(self.groups))]
        return np.concatenate([rng.permutation(g) for g in groups]).astype(np.int64)

    def order(self) -> np.ndarray:
        """Row numbers this rank takes this epoch, in the order it takes them."""
        return shard(self.epoch_order(), self.num_replicas, self.rank, self.remainder)

    @property
    def num_samples(self) -> int:
        """Rows per rank per epoch (the same on every rank)."""
        if self.remainder == "drop":
            return self.n // self.num_replicas
        return -(-self.n // self.num_replicas)


class ItemBlockBatchSampler(_EpochOrder):
    """Batches of row numbers grouped by item and block of chips.

    ``block`` is the side of a block in chips (chips ``x // block, y // block``
    share a group); ``shuffle`` shuffles group order and chips within groups
    with a generator seeded by ``seed`` and the epoch (:meth:`set_epoch`);
    ``drop_last`` drops a final short batch. Batches may span groups.

    Distributed: ``num_replicas`` and ``rank`` (default: from an initialised
    ``torch.distributed``) give each rank a disjoint, equally long, contiguous
    share of the epoch; ``remainder`` (``"pad"`` or ``"drop"``) evens out an
    epoch that does not divide (see the module docs). Every rank then yields
    ``len(sampler)`` batches.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        block: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        remainder: str = "pad",
    ) -> None:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        item_id, x, y = _row_arrays(source, "ItemBlockBatchSampler")
        super().__init__(block_groups(item_id, x, y, block), len(item_id), shuffle, seed,
                         num_replicas, rank, remainder)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch.tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return (self.num_samples + self.batch_size - 1) // self.batch_size


class DistributedChipSampler(_EpochOrder):
    """Row numbers of this rank's share of the epoch, for ``DataLoader(sampler=...)``.

    A drop-in for ``torch.utils.data.DistributedSampler`` (same ``num_replicas``,
    ``rank``, ``shuffle``, ``seed``, ``drop_last`` and :meth:`set_epoch`) that
    keeps block locality: the epoch order takes chips group after group
    (``block`` chips square per item, as :class:`ItemBlockBatchSampler`) and
    each rank takes a contiguous share of it, so consecutive samples, and hence
    a batch, come from one item and neighbouring COG tiles. ``block=1`` makes
    each chip its own group (a plain shuffle). ``drop_last=False`` pads the
    epoch by repeating its first chips, ``True`` drops the tail (see the module
    docs). ``source`` is a ChipDataset or an index table; any other sized
    dataset is sampled without locality (every row its own group).
    """

    def __init__(
        self,
        source: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        block: int = 4,
    ) -> None:
        if isinstance(source, pa.Table) or all(hasattr(source, a) for a in ("item_id", "x", "y")):
            item_id, x, y = _row_arrays(source, "DistributedChipSampler")
            groups = block_groups(item_id, x, y, block)
            n = len(item_id)
        elif hasattr(source, "__len__"):
            n = len(source)
            groups = None
        else:
            raise ConfigError(
                f"DistributedChipSampler needs a ChipDataset, an index table or a sized dataset, "
                f"got {type(source).__name__}"
            )
        super().__init__(groups, n, shuffle, seed, num_replicas, rank, "drop" if drop_last else "pad")
        self.drop_last = bool(drop_last)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.num_samples
