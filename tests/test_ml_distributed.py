"""Distributed sampling: each rank a disjoint, equal, block-local share of every epoch.

In-process tests give rank and world size as arguments; the two-process test
runs real gloo ranks (tests/ml_ddp_rank.py) with DataLoader workers inside
each rank and takes rank and world size from torch.distributed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from stacchip.errors import ConfigError
from stacchip.index import read_index
from stacchip.ml.samplers import DistributedChipSampler, ItemBlockBatchSampler, replicas
from tests.ml_scenes import CHIP_SIZE, scene_fixture

REPO = Path(__file__).resolve().parents[1]
BLOCK = 2
RANK_TIMEOUT_S = 240


scene = scene_fixture("ml_ddp", dates_a=1, dates_b=1, label=False)


@pytest.fixture(scope="module")
def table(scene) -> pa.Table:
    return read_index(scene.index_dir)


def _keys(table: pa.Table, rows, block: int = BLOCK) -> list[tuple]:
    item = table.column("item_id").to_pylist()
    x = table.column("chip_index_x").to_pylist()
    y = table.column("chip_index_y").to_pylist()
    return [(item[r], x[r] // block, y[r] // block) for r in rows]


def _runs(keys: list[tuple]) -> int:
    """Number of maximal runs of equal consecutive keys."""
    return 1 + sum(1 for a, b in pairwise(keys) if a != b) if keys else 0


@pytest.mark.parametrize("world", [2, 3, 7])
@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_shares_are_equal_disjoint_and_cover_the_epoch(table, world, remainder):
    n = table.num_rows
    shares = [
        ItemBlockBatchSampler(table, batch_size=4, block=BLOCK, seed=5, num_replicas=world, rank=r,
                              remainder=remainder).order()
        for r in range(world)
    ]
    per = -(-n // world) if remainder == "pad" else n // world
    assert [len(s) for s in shares] == [per] * world
    flat = np.concatenate(shares)
    counts = Counter(flat.tolist())
    if remainder == "drop":
        assert max(counts.values()) == 1  # disjoint
        assert len(counts) == per * world == n - n % world
    else:
        assert set(counts) == set(range(n))  # every chip seen
        assert sum(c - 1 for c in counts.values()) == per * world - n  # only the padding repeats
    # the shares are the consecutive pieces of one epoch order, the same on every rank
    whole = ItemBlockBatchSampler(table, batch_size=4, block=BLOCK, seed=5, num_replicas=world, rank=0,
                                  remainder=remainder).epoch_order()
    assert np.array_equal(np.concatenate(shares)[: min(n, per * world)], whole[: min(n, per * world)])
    # every rank yields the same number of batches, and len() says how many
    lens = []
    for r in range(world):
        s = ItemBlockBatchSampler(table, batch_size=4, block=BLOCK, seed=5, num_replicas=world, rank=r,
                                  remainder=remainder)
        lens.append((len(list(s)), len(s)))
    assert len({a for a, _ in lens}) == 1 and all(a == b for a, b in lens)


def _shared_groups(shares: list[list[tuple]]) -> int:
    """Groups that more than one rank reads."""
    owners = Counter(k for keys in shares for k in set(keys))
    return sum(1 for c in owners.values() if c > 1)


@pytest.mark.parametrize("world", [2, 3])
def test_block_locality_within_a_rank(table, world):
    shares = []
    for r in range(world):
        s = ItemBlockBatchSampler(table, batch_size=4, block=BLOCK, seed=1, num_replicas=world, rank=r)
        keys = _keys(table, s.order())
        # every (item, block) group the rank holds is read in one run
        assert _runs(keys) == len(set(keys))
        shares.append(keys)
    # a group is split between ranks only at a share boundary
    assert _shared_groups(shares) <= world - 1
    whole = _keys(table, ItemBlockBatchSampler(table, 4, BLOCK, seed=1).order())
    assert _runs(whole) == len(set(whole))


def test_set_epoch_reshuffles_deterministically(table):
    a = DistributedChipSampler(table, num_replicas=2, rank=1, seed=3, block=BLOCK)
    b = DistributedChipSampler(table, num_replicas=2, rank=1, seed=3, block=BLOCK)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(DistributedChipSampler(table, num_replicas=2, rank=1, seed=4, block=BLOCK)) != first
    unshuffled = DistributedChipSampler(table, num_replicas=2, rank=0, shuffle=False, block=BLOCK)
    before = list(unshuffled)
    unshuffled.set_epoch(9)
    assert list(unshuffled) == before


def test_epoch_order_ignores_the_row_order_of_the_index(table):
    """Ranks that read the index files in another order still agree on the chips of each share."""
    perm = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(pa.array(perm))
    ids = np.asarray(table.column("chipid").to_pylist(), dtype=object)
    ids_shuffled = np.asarray(shuffled.column("chipid").to_pylist(), dtype=object)
    for r in range(2):
        a = ItemBlockBatchSampler(table, 4, BLOCK, seed=2, num_replicas=2, rank=r)
        b = ItemBlockBatchSampler(shuffled, 4, BLOCK, seed=2, num_replicas=2, rank=r)
        a.set_epoch(3)
        b.set_epoch(3)
        assert ids[a.order()].tolist() == ids_shuffled[b.order()].tolist()


def test_plain_sampler_matches_torch_distributed_sampler_shapes(table):
    torch_data = pytest.importorskip("torch.utils.data")
    n = table.num_rows
    for world in (2, 7):
        for drop_last in (False, True):
            ours = [len(DistributedChipSampler(table, num_replicas=world, rank=r, drop_last=drop_last))
                    for r in range(world)]
            theirs = [len(torch_data.DistributedSampler(range(n), num_replicas=world, rank=r, drop_last=drop_last))
                      for r in range(world)]
            assert ours == theirs
    # any sized dataset works, without locality
    sized = DistributedChipSampler(list(range(11)), num_replicas=2, rank=0, seed=0)
    other = DistributedChipSampler(list(range(11)), num_replicas=2, rank=1, seed=0)
    assert len(sized) == len(other) == 6
    assert set(sized) | set(other) == set(range(11))


def test_rank_and_world_size_are_validated(table):
    with pytest.raises(ConfigError, match="rank=2 is outside 0..1"):
        ItemBlockBatchSampler(table, 4, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="rank=-1"):
        DistributedChipSampler(table, num_replicas=2, rank=-1)
    with pytest.raises(ConfigError, match="num_replicas must be >= 1"):
        DistributedChipSampler(table, num_replicas=0, rank=0)
    with pytest.raises(ConfigError, match="without rank="):
        DistributedChipSampler(table, num_replicas=2)
    with pytest.raises(ConfigError, match="pass num_replicas="):
        DistributedChipSampler(table, rank=1)
    with pytest.raises(ConfigError, match="whole number"):
        DistributedChipSampler(table, num_replicas=2.0, rank=0)
    with pytest.raises(ConfigError, match="remainder"):
        ItemBlockBatchSampler(table, 4, remainder="wrap")
    with pytest.raises(ConfigError, match="block"):
        DistributedChipSampler(table, block=0)
    assert replicas() == (1, 0)  # no process group in this process
    assert replicas(4, 3) == (4, 3)


def _free_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_two_gloo_ranks_with_dataloader_workers(scene, table, tmp_path):
    pytest.importorskip("torch.distributed")
    world = 2
    n = table.num_rows
    assert n % world == 0  # so "pad" adds nothing and the shares must be disjoint
    out = tmp_path / "seen.json"
    base = {
        "init": f"file://{tmp_path / 'store'}", "world": world, "index": str(scene.index_dir),
        "root": str(scene.root), "batch_size": 4, "block": BLOCK, "seed": 11, "epochs": [0, 1],
        "chip_size": CHIP_SIZE, "out": str(out), "timeout": RANK_TIMEOUT_S // 2,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ml_ddp_rank", json.dumps({**base, "rank": r})],
            cwd=REPO, env=_free_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            _, stderr = p.communicate(timeout=RANK_TIMEOUT_S)
            logs.append(stderr[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * world, "\n".join(logs)
    gathered = json.loads(out.read_text())
    assert [g["rank"] for g in gathered] == list(range(world))
    all_ids = sorted(table.column("chipid").to_pylist())
    for g in gathered:
        # rank and world size came from torch.distributed, not from arguments
        assert all(s[:2] == [g["rank"], world] for s in g["sampler"].values())
        assert g["shapes_ok"]
        assert g["reader_pids"] and g["pid"] not in g["reader_pids"]  # read in DataLoader workers
    key_of = dict(zip(table.column("chipid").to_pylist(), _keys(table, range(n))))
    for kind in ("batch", "plain"):
        orders = {}
        for epoch in (0, 1):
            seen = [g["chipids"][f"{kind}:{epoch}"] for g in gathered]
            assert len({len(s) for s in seen}) == 1 and len(seen[0]) == n // world
            assert len({g["batches"][f"{kind}:{epoch}"] for g in gathered}) == 1
            per_rank = gathered[0]["sampler"][kind][2]  # len(sampler): batches, or samples for "plain"
            batches = per_rank if kind == "batch" else -(-per_rank // base["batch_size"])
            assert gathered[0]["batches"][f"{kind}:{epoch}"] == batches
            assert not set(seen[0]) & set(seen[1])
            assert sorted(seen[0] + seen[1]) == all_ids
            shares = [[key_of[c] for c in ids] for ids in seen]
            for keys in shares:  # block locality inside each rank
                assert _runs(keys) == len(set(keys))
            assert _shared_groups(shares) <= world - 1
            orders[epoch] = seen
        assert orders[0] != orders[1]
        assert all(set(a) != set(b) for a, b in zip(orders[0], orders[1]))  # ranks get other chips next epoch
