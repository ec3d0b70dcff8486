"""stacchip.export.chip_reader: the per-process chipper cache the export and ChipDataset share."""

from __future__ import annotations

import os
import threading

import pytest

from stacchip.export.chip_reader import CHIPPERS, ChipperCache


class Entry:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_each_owner_keeps_its_own_bound_least_recently_used_closed_first():
    cache = ChipperCache()
    a, b = cache.new_owner(), cache.new_owner()
    made = {k: Entry(k) for k in "wxyz"}
    for k in "wxy":
        cache.get(a, k, lambda k=k: made[k], limit=2)
    assert list(cache.held(a)) == ["x", "y"] and made["w"].closed
    cache.get(b, "z", lambda: made["z"], limit=1)
    assert list(cache.held(a)) == ["x", "y"] and list(cache.held(b)) == ["z"]
    # a hit builds nothing and makes the entry the most recent
    assert cache.get(a, "x", lambda: pytest.fail("built again"), limit=2) is made["x"]
    assert list(cache.held(a)) == ["y", "x"]
    cache.close(a)
    assert made["x"].closed and made["y"].closed and not made["z"].closed
    assert cache.held(a) == {} and list(cache.held(b)) == ["z"]


def test_a_forked_child_starts_empty_and_leaves_the_parents_entries_alone():
    cache = ChipperCache()
    owner = cache.new_owner()
    entry = Entry("parent")
    cache.get(owner, "k", lambda: entry, limit=4)
    cache._pid = os.getpid() + 1  # as seen from a forked child
    assert cache.held(owner) == {}
    assert not entry.closed


def test_owner_released_by_a_finalizer_while_the_cache_is_locked():
    """The garbage collector may run a dataset's finalizer inside the cache's own
    critical section: releasing must not wait for the lock (it would wait for
    itself), and the owner's entries close at the next use of the cache."""
    cache = ChipperCache()
    owner, other = cache.new_owner(), cache.new_owner()
    entry = Entry("dropped")
    cache.get(owner, "k", lambda: entry, limit=4)
    done = threading.Event()

    def finalizer_inside_the_lock():
        with cache._lock:
            cache.release(owner)
        done.set()

    worker = threading.Thread(target=finalizer_inside_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert done.is_set() and not entry.closed
    cache.get(other, "k", lambda: Entry("next"), limit=4)
    assert entry.closed and cache.held(owner) == {}


def test_dropped_datasets_close_their_chippers(tmp_path):
    pytest.importorskip("rasterio")
    import gc

    from stacchip.ml.dataset import ChipDataset
    from tests.ml_scenes import build_scene

    scene = build_scene(tmp_path, dates_a=2, dates_b=0, label=False)
    ds = ChipDataset(scene.index_dir, root=scene.root, assets=["red"], max_open_items=1)
    ds[0]
    owner, (chipper,) = ds._owner, ds._chippers.values()
    assert chipper._tiles.open_count() > 0
    del ds
    gc.collect()
    CHIPPERS.held(CHIPPERS.new_owner())  # any next use of the cache
    assert CHIPPERS.held(owner) == {}
    assert chipper._tiles.open_count() == 0  # closed, not only forgotten


def test_chip_dataset_and_export_share_one_cache(tmp_path):
    pytest.importorskip("rasterio")
    from stacchip.ml.dataset import ChipDataset
    from tests.ml_scenes import build_scene

    scene = build_scene(tmp_path, dates_a=2, dates_b=0, label=False)
    ds = ChipDataset(scene.index_dir, root=scene.root, assets=["red"], max_open_items=1)
    ds[0]
    (key,) = ds._chippers
    assert CHIPPERS.held(ds._owner)[key] is ds._chippers[key]
    ds.close()
    assert CHIPPERS.held(ds._owner) == {}
