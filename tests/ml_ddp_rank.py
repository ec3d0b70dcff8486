"""One rank of the two-process distributed sampler test (tests/test_ml_distributed.py).

Run as ``python -m tests.ml_ddp_rank '<json config>'``: joins a gloo process
group through a ``file://`` store, reads two epochs of a ChipDataset through
``DataLoader(num_workers=2)`` with :class:`ItemBlockBatchSampler` and with
:class:`DistributedChipSampler` (rank and world size taken from
``torch.distributed``), gathers what every rank saw with ``all_gather_object``
and rank 0 writes it to the config's ``out`` JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys


def with_reader_pid(sample: dict) -> dict:
    """Transform: record which process read the sample (a DataLoader worker, not the rank)."""
    sample["reader_pid"] = os.getpid()
    return sample


def run(cfg: dict) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from stacchip.ml.dataset import ChipDataset
    from stacchip.ml.samplers import DistributedChipSampler, ItemBlockBatchSampler

    dist.init_process_group(
        "gloo", init_method=cfg["init"], rank=cfg["rank"], world_size=cfg["world"],
        timeout=dt.timedelta(seconds=cfg["timeout"]),
    )
    try:
        ds = ChipDataset(cfg["index"], root=cfg["root"], assets=["red"], transform=with_reader_pid)
        samplers = {
            "batch": ItemBlockBatchSampler(ds, batch_size=cfg["batch_size"], block=cfg["block"], seed=cfg["seed"]),
            "plain": DistributedChipSampler(ds, seed=cfg["seed"], block=cfg["block"]),
        }
        loaders = {
            "batch": DataLoader(ds, batch_sampler=samplers["batch"], num_workers=2,
                                multiprocessing_context="fork", persistent_workers=True),
            "plain": DataLoader(ds, sampler=samplers["plain"], batch_size=cfg["batch_size"], num_workers=2,
                                multiprocessing_context="fork", persistent_workers=True),
        }
        out: dict = {
            "rank": dist.get_rank(),
            "sampler": {k: [s.rank, s.num_replicas, len(s)] for k, s in samplers.items()},
            "chipids": {},
            "batches": {},
            "shapes_ok": True,
            "pid": os.getpid(),
            "reader_pids": [],
        }
        for kind, loader in loaders.items():
            for epoch in cfg["epochs"]:
                samplers[kind].set_epoch(epoch)
                ids: list[str] = []
                batches = 0
                for batch in loader:
                    batches += 1
                    ids.extend(batch["chipid"])
                    out["reader_pids"].extend(sorted(set(batch["reader_pid"].tolist()) - set(out["reader_pids"])))
                    out["shapes_ok"] &= tuple(batch["pixels"].shape[1:]) == (1, cfg["chip_size"], cfg["chip_size"])
                out["chipids"][f"{kind}:{epoch}"] = ids
                out["batches"][f"{kind}:{epoch}"] = batches
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
