"""One rank of the WebDataset DDP test (tests/test_prechip_webdataset.py).

Run as ``python -m tests.wds_ddp_rank '<json config>'``: joins a gloo process group
through a ``file://`` store, streams the shard URLs (presigned, from the loopback S3
server) with ``webdataset`` -- shards split by node, then by DataLoader worker --
through ``DataLoader(num_workers=2)`` for two epochs, gathers the keys every rank saw
with ``all_gather_object``, and rank 0 writes them to the config's ``out`` JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys


def with_reader_pid(sample: dict) -> dict:
    """Record which process decoded the sample (a DataLoader worker, not the rank)."""
    sample["pid"] = os.getpid()
    return sample


def keys_and_shapes(batch: list[dict]) -> list[tuple[str, str, list[int], str, int]]:
    """A batch of samples as plain values (no tensors cross the worker boundary)."""
    return [(s["__key__"], s["json"]["chipid"], list(s["npy"].shape), str(s["npy"].dtype), s["pid"]) for s in batch]


def run(cfg: dict) -> None:
    import torch.distributed as dist
    import webdataset as wds
    from torch.utils.data import DataLoader

    dist.init_process_group(
        "gloo", init_method=cfg["init"], rank=cfg["rank"], world_size=cfg["world"],
        timeout=dt.timedelta(seconds=cfg["timeout"]),
    )
    try:
        dataset = (
            wds.WebDataset(cfg["urls"], shardshuffle=False, nodesplitter=wds.split_by_node,
                           workersplitter=wds.split_by_worker, empty_check=False)
            .decode()
            .map(with_reader_pid)
        )
        loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=keys_and_shapes,
                            multiprocessing_context="fork")
        out: dict = {"rank": dist.get_rank(), "pid": os.getpid(), "epochs": {}}
        for epoch in range(2):
            seen = []
            for batch in loader:
                seen.extend(batch)
            out["epochs"][str(epoch)] = seen
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        if dist.get_rank() == 0:
            with open(cfg["out"] + ".part", "w") as f:
                json.dump(gathered, f)
            os.replace(cfg["out"] + ".part", cfg["out"])
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
