"""Where the WebDataset shards of ``stacchip-prechip --format webdataset`` are, for the loaders
that stream them (``webdataset``, Hugging Face ``datasets``, any tar reader).

:func:`shard_urls` reads ``prechip_manifest.json`` beside the shards and returns
their URLs in shard order: local paths as they are, ``s3://`` objects as presigned
HTTP(S) URLs (``webdataset`` opens those with ``curl``, ``datasets`` with fsspec's
HTTP file system; neither needs credentials) or, with ``expires=None``, as
``s3://`` URLs for a reader of your own.

.. code-block:: python

    import webdataset as wds
    from stacchip.ml.shards import shard_urls

    urls = shard_urls("s3://bucket/chips", "sentinel-2-l2a")
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker)
               .decode().to_tuple("npy", "mask.npy", "json"))

    from datasets import load_dataset
    chips = load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
"""

from __future__ import annotations

import json
from typing import Any

from stacchip import storage
from stacchip.errors import ConfigError, StorageNotFoundError
from stacchip.export.cube import manifest_url
from stacchip.export.outputs import WEBDATASET
from stacchip.export.shards import shard_name

#: Seconds a presigned shard URL stays valid by default.
DEFAULT_EXPIRES = 6 * 3600.0


def manifest(chips: str, platform: str) -> dict[str, Any]:
    """``prechip_manifest.json`` of the outputs under ``chips`` (prechip's ``--chips``)."""
    url = manifest_url(chips, platform)
    try:
        record = json.loads(storage.read_bytes(url))
    except StorageNotFoundError as exc:
        raise ConfigError(f"no prechip manifest at {url!r}: run stacchip-prechip into {chips!r} first") from exc
    except ValueError as exc:
        raise ConfigError(f"{url!r} is not a prechip manifest: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("outputs"), list):
        raise ConfigError(f"{url!r} lists no outputs (written by an older stacchip-prechip?)")
    return dict(record)


def shard_urls(chips: str, platform: str, *, expires: float | None = DEFAULT_EXPIRES,
               allow_missing: bool = False) -> list[str]:
    """URLs of the shards under ``chips`` in shard order (see the module docstring).

    The manifest's file names are checked to be shard names (``shard-{k:06d}.tar[.gz]``)
    before they are joined to ``chips``: a manifest names nothing outside it. A shard the
    manifest lists but the folder lacks (array tasks not finished) is a :class:`ConfigError`
    saying how many, unless ``allow_missing`` (then only the shards there are listed).
    """
    record = manifest(chips, platform)
    if record.get("format") != WEBDATASET:
        raise ConfigError(f"the outputs under {chips!r} are {record.get('format', 'npz')!r}, not WebDataset "
                          "shards (stacchip-prechip --format webdataset)")
    urls = []
    for k, entry in enumerate(record["outputs"]):
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        if name not in (shard_name(k, 0), shard_name(k, 1)):
            raise ConfigError(f"manifest {manifest_url(chips, platform)!r}: output {k} is {name!r}, not a shard name")
        url = manifest_url(chips, platform).rsplit("/", 1)[0] + "/" + name if storage.is_s3(chips) else \
            storage.join(storage.local_path(manifest_url(chips, platform)).parent, name)
        urls.append(url)
    there = {info.url.rsplit("/", 1)[-1] for info in storage.list_file_infos(urls[0].rsplit("/", 1)[0])} \
        if urls else set()
    missing = [u for u in urls if u.rsplit("/", 1)[-1] not in there]
    if missing and not allow_missing:
        raise ConfigError(f"{len(missing)} of the {len(urls)} shards the manifest of {chips!r} lists are not there "
                          f"(e.g. {missing[0]}): the array tasks have not all finished")
    return [storage.presign(u, expires) if expires is not None else u for u in urls if u not in set(missing)]
