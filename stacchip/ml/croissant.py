"""``croissant.json`` for a chip index: Croissant 1.1 + GeoCroissant + RAI.

The document describes

* the index GeoParquet file(s) as the distribution (a ``cr:FileObject`` with
  its SHA-256 for one file, a ``cr:FileSet`` with ``includes`` globs for many),
  and optionally exported cubes (``.npz`` files, a second FileSet);
* one ``cr:RecordSet`` named ``chips`` whose fields are the index columns
  (``chipid`` is its key), so ``mlcroissant`` reads the index rows as records;
* GeoCroissant terms (namespace ``http://mlcommons.org/croissant/geo/``):
  ``geocr:coordinateReferenceSystem`` (the imagery's CRS when there is one,
  else ``OGC:CRS84`` of the index geometry), ``geocr:spatialResolution``
  (metres of the finest grid), ``geocr:bandConfiguration`` and
  ``geocr:spectralBandMetadata`` (from the items' ``eo:bands``),
  ``geocr:samplingStrategy``; schema.org ``spatialCoverage`` (a GeoShape box,
  "south west north east" in degrees) and ``temporalCoverage`` (ISO 8601
  interval);
* Croissant-RAI fields (namespace ``http://mlcommons.org/croissant/RAI/``) the
  user supplies (``rai:dataCollection``, ``rai:dataBiases``, ...); the
  collection time frame and the chipping protocol are filled from the index.

Vocabulary sources: the Croissant 1.1 context as mlcroissant 1.1 emits it, the
GeoCroissant 1.0 property reference and the Croissant RAI 1.0 specification.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from stacchip.console import echo
from stacchip import storage
from stacchip.errors import ConfigError, IndexFileError, StorageError
from stacchip.index import index_files

logger = logging.getLogger(__name__)

CROISSANT_1_1 = "http://mlcommons.org/croissant/1.1"
CROISSANT_RAI_1_0 = "http://mlcommons.org/croissant/RAI/1.0"
GEOCROISSANT_1_0 = "http://mlcommons.org/croissant/geo/1.0"
GEOCR_NS = "http://mlcommons.org/croissant/geo/"
PARQUET_MEDIA_TYPE = "application/x-parquet"
NPZ_MEDIA_TYPE = "application/x-npz"
#: Tar archives, compressed or not (mlcroissant extracts both by this type).
TAR_MEDIA_TYPE = "application/x-tar"
JSON_MEDIA_TYPE = "application/json"
#: numpy's ``.npy`` format (no registered media type: its specification's address).
NPY_FORMAT = "https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html"
RECORD_SET = "chips"
#: Record set over the samples of WebDataset shards (one record per sample's ``.json``).
SHARD_RECORD_SET = "samples"
#: What a shard sample's ``.json`` holds (the record set reads it whole; mlcroissant reads members
#: of archives as files, so the key comes from the file name and the fields are in the JSON text).
SHARD_JSON_FIELDS = ("chipid", "item_id", "platform", "datetime", "lon", "lat", "bbox", "cloud_fraction",
                     "nodata_fraction", "chip_index_x", "chip_index_y", "chip_size", "bands", "lat_norm",
                     "lon_norm", "week_norm", "hour_norm")

#: Croissant RAI 1.0 properties (``rai:`` prefix) and whether they take many values.
RAI_FIELDS: dict[str, bool] = {
    "dataCollection": False,
    "dataCollectionType": True,
    "dataCollectionMissingData": False,
    "dataCollectionRawData": False,
    "dataCollectionTimeFrame": True,
    "dataImputationProtocol": False,
    "dataPreprocessingProtocol": True,
    "dataDataManipulationProtocol": False,
    "dataAnnotationProtocol": True,
    "dataAnnotationPlatform": True,
    "dataAnnotationAnalysis": True,
    "annotationsPerItem": False,
    "annotatorDemographics": True,
    "machineAnnotationTools": True,
    "dataUseCases": True,
    "dataBiases": True,
    "dataLimitations": True,
    "dataSocialImpact": False,
    "personalSensitiveInformation": True,
    "dataReleaseMaintenancePlan": False,
}

#: Croissant data types of index columns by Arrow type.
_ARROW_TYPES: list[tuple[Any, str]] = [
    (pa.types.is_string, "sc:Text"),
    (pa.types.is_large_string, "sc:Text"),
    (pa.types.is_date, "sc:Date"),
    (pa.types.is_timestamp, "sc:DateTime"),
    (pa.types.is_integer, "sc:Integer"),
    (pa.types.is_floating, "sc:Float"),
    (pa.types.is_boolean, "sc:Boolean"),
    (pa.types.is_binary, "sc:Text"),
]

COLUMN_DESCRIPTIONS = {
    "chipid": "Chip id, {item_id}-{x}-{y}.",
    "date": "UTC date of the item.",
    "chip_index_x": "Chip column in the item's chip grid (chips).",
    "chip_index_y": "Chip row in the item's chip grid (chips).",
    "cloud_cover_percentage": "Cloud fraction of the chip, 0-1 (a fraction despite the name).",
    "nodata_percentage": "Nodata fraction of the chip, 0-1 (a fraction despite the name).",
    "geometry": "Chip footprint polygon, WKB, lon/lat (OGC:CRS84).",
    "item_id": "STAC item id.",
    "platform": "Platform (STAC collection) of the item.",
    "datetime": "Acquisition datetime of the item (UTC).",
    "chip_size": "Chip side in pixels of the item's finest grid.",
    "split": "Spatial split (train/val/test) of the chip's block.",
    "split_block": "Spatial block id the split was drawn for.",
}


def context() -> dict[str, Any]:
    """The JSON-LD ``@context``: Croissant 1.1 plus the ``geocr`` prefix."""
    return {
        "@language": "en",
        "@vocab": "https://schema.org/",
        "arrayShape": "cr:arrayShape",
        "citeAs": "cr:citeAs",
        "column": "cr:column",
        "conformsTo": "dct:conformsTo",
        "containedIn": "cr:containedIn",
        "cr": "http://mlcommons.org/croissant/",
        "rai": "http://mlcommons.org/croissant/RAI/",
        "geocr": GEOCR_NS,
        "data": {"@id": "cr:data", "@type": "@json"},
        "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
        "dct": "http://purl.org/dc/terms/",
        "description": {"@container": "@language"},
        "equivalentProperty": "cr:equivalentProperty",
        "examples": {"@id": "cr:examples", "@type": "@json"},
        "extract": "cr:extract",
        "field": "cr:field",
        "fileProperty": "cr:fileProperty",
        "fileObject": "cr:fileObject",
        "fileSet": "cr:fileSet",
        "format": "cr:format",
        "includes": "cr:includes",
        "isArray": "cr:isArray",
        "isLiveDataset": "cr:isLiveDataset",
        "jsonPath": "cr:jsonPath",
        "key": "cr:key",
        "md5": "cr:md5",
        "name": {"@container": "@language"},
        "parentField": "cr:parentField",
        "path": "cr:path",
        "recordSet": "cr:recordSet",
        "references": "cr:references",
        "regex": "cr:regex",
        "repeated": "cr:repeated",
        "replace": "cr:replace",
        "samplingRate": "cr:samplingRate",
        "sc": "https://schema.org/",
        "separator": "cr:separator",
        "source": "cr:source",
        "subField": "cr:subField",
        "transform": "cr:transform",
    }


def _sha256(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def _relative(path: str, base: Path | None) -> str:
    if storage.is_s3(path) or "://" in path or base is None:
        return str(path)
    rel = os.path.relpath(storage.local_path(path).resolve(), base.resolve())
    return Path(rel).as_posix()


def _data_type(arrow_type: pa.DataType) -> str | None:
    for test, name in _ARROW_TYPES:
        if test(arrow_type):
            return name
    return None


def _fields(schema: pa.Schema, source: dict[str, Any]) -> list[dict[str, Any]]:
    fields = []
    for f in schema:
        typ = f.type.storage_type if isinstance(f.type, pa.ExtensionType) else f.type
        if pa.types.is_struct(typ):
            sub = []
            for child in typ:
                dtype = _data_type(child.type)
                if dtype is None:
                    continue
                sub.append({
                    "@type": "cr:Field",
                    "@id": f"{RECORD_SET}/{f.name}/{child.name}",
                    "name": child.name,
                    "description": f"{f.name}.{child.name}" + (" (degrees)" if f.name == "bbox" else ""),
                    "dataType": dtype,
                    "source": {**source, "extract": {"column": f.name}, "transform": {"jsonPath": child.name}},
                })
            if sub:
                fields.append({
                    "@type": "cr:Field",
                    "@id": f"{RECORD_SET}/{f.name}",
                    "name": f.name,
                    "description": "Chip bounding box in degrees (lon/lat)." if f.name == "bbox" else f.name,
                    "subField": sub,
                })
            continue
        dtype = _data_type(typ)
        if dtype is None:
            logger.info("croissant: column %r of type %s has no Croissant type; left out", f.name, typ)
            continue
        fields.append({
            "@type": "cr:Field",
            "@id": f"{RECORD_SET}/{f.name}",
            "name": f.name,
            "description": COLUMN_DESCRIPTIONS.get(f.name, f.name),
            "dataType": dtype,
            "source": {**source, "extract": {"column": f.name}},
        })
    return fields


def _iso(ts_us: int) -> str:
    when = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(ts_us))
    return when.isoformat().replace("+00:00", "Z")


def _coverage(table: pa.Table) -> tuple[list[float], tuple[str, str]]:
    bbox = table.column("bbox").combine_chunks()
    box = [
        float(pc.min(bbox.field("xmin")).as_py()), float(pc.min(bbox.field("ymin")).as_py()),
        float(pc.max(bbox.field("xmax")).as_py()), float(pc.max(bbox.field("ymax")).as_py()),
    ]
    ts = pc.cast(pc.cast(table.column("datetime"), pa.timestamp("us", tz="UTC")), pa.int64())
    return box, (_iso(pc.min(ts).as_py()), _iso(pc.max(ts).as_py()))


def imagery_facts(table: pa.Table, items: Any) -> dict[str, Any]:
    """CRS codes, finest resolution (m) and bands of the items behind an index.

    ``items`` is a :class:`stacchip.ml.items.ItemSource`; every distinct item is
    read once.
    """
    from stacchip.chipper import is_raster_asset
    from stacchip.projection import item_grid

    crs: list[str] = []
    res: list[float] = []
    bands: dict[str, dict[str, Any]] = {}
    platforms, item_ids = table.column("platform").to_pylist(), table.column("item_id").to_pylist()
    pairs = set(zip(platforms, item_ids, strict=True))
    for platform, item_id in sorted(pairs):
        item = items.get(platform, item_id)
        grid = item_grid(item)
        epsg = grid.crs.to_epsg()
        code = f"EPSG:{epsg}" if epsg else grid.crs.to_string()
        if code not in crs:
            crs.append(code)
        res.append(float(min(grid.res)))
        for key, asset in item.assets.items():
            if not is_raster_asset(asset):
                continue
            eo = asset.extra_fields.get("eo:bands") or []
            if not eo:
                bands.setdefault(key, {"name": key})
            for k, band in enumerate(eo):
                name = key if len(eo) == 1 else f"{key}:{band.get('name') or k}"
                entry = {"name": name, "asset": key}
                if band.get("common_name"):
                    entry["common_name"] = band["common_name"]
                if band.get("center_wavelength") is not None:
                    entry["center_wavelength_um"] = float(band["center_wavelength"])
                if band.get("full_width_half_max") is not None:
                    entry["fwhm_um"] = float(band["full_width_half_max"])
                bands.setdefault(name, entry)
    return {"crs": crs, "resolution_m": min(res) if res else None, "bands": list(bands.values())}


def _band_terms(bands: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "geocr:bandConfiguration": {
            "@type": "geocr:BandConfiguration",
            "geocr:totalBands": len(bands),
            "geocr:bandNameList": [b["name"] for b in bands],
        }
    }
    spectral = []
    for b in bands:
        if "center_wavelength_um" not in b:
            continue
        entry: dict[str, Any] = {
            "@type": "geocr:SpectralBand",
            "name": b["name"],
            "geocr:centerWavelength": {
                "@type": "QuantitativeValue", "value": round(b["center_wavelength_um"] * 1000, 3), "unitText": "nm",
            },
        }
        if "fwhm_um" in b:
            entry["geocr:bandwidth"] = {
                "@type": "QuantitativeValue", "value": round(b["fwhm_um"] * 1000, 3), "unitText": "nm",
            }
        spectral.append(entry)
    if spectral:
        out["geocr:spectralBandMetadata"] = spectral
    return out


def _rai_terms(rai: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rai.items():
        name = key[4:] if key.startswith("rai:") else key
        if name not in RAI_FIELDS:
            raise ConfigError(f"unknown RAI field {key!r}; known: {', '.join(RAI_FIELDS)}")
        if value is None or value == [] or value == "":
            continue
        if RAI_FIELDS[name]:
            value = [value] if isinstance(value, str) else list(value)
        elif not isinstance(value, str):
            value = "; ".join(str(v) for v in value)
        out[f"rai:{name}"] = value
    return out


def croissant_metadata(
    index: Any,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    name: str = "stacchip-chips",
    description: str | None = None,
    license: str = "https://creativecommons.org/licenses/by/4.0/",
    url: str | None = None,
    version: str = "1.0.0",
    cite_as: str | None = None,
    creators: Sequence[str] = (),
    keywords: Sequence[str] = (),
    date_published: str | None = None,
    items: Any = None,
    crs: str | None = None,
    resolution_m: float | None = None,
    band_names: Sequence[str] | None = None,
    cubes: Sequence[str] | str | None = None,
    shards: str | None = None,
    rai: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Croissant JSON-LD document (a dict) for index files ``index``.

    ``index``: index files, directories or ``s3://`` prefixes. ``out_dir`` is
    where the document will live; local paths are written relative to it (one
    file may be anywhere; several must lie under ``out_dir``, since a FileSet
    is matched within the document's folder).
    ``items`` (an :class:`~stacchip.ml.items.ItemSource`) supplies CRS,
    resolution and bands; ``crs``/``resolution_m``/``band_names`` override or
    stand in for them. ``cubes``: directories (or globs) of exported ``.npz``
    cubes to list in the distribution. ``shards``: the folder of WebDataset shards
    ``stacchip-prechip --format webdataset`` wrote (``{chips}/{VERSION}/{platform}``,
    holding ``prechip_manifest.json``): each shard becomes a ``cr:FileObject`` (tar,
    with its size and SHA-256 from its checksum record), their members FileSets
    (``.json``, ``.npy``, ``.mask.npy``), and a record set ``samples`` reads every
    sample's ``.json``. ``rai``: RAI field values by name
    (``dataCollection``, ``dataBiases``, ... see :data:`RAI_FIELDS`).
    """
    files = index_files(index)
    base = Path(out_dir) if out_dir is not None else None
    from stacchip.ml.dataset import open_with_extra_columns

    dataset = open_with_extra_columns(files)
    table = dataset.to_table()
    if table.num_rows == 0:
        raise IndexFileError(f"index {files[:3]} has no rows")
    schema = dataset.schema

    distribution: list[dict[str, Any]] = []
    if len(files) == 1:
        file_id = "index-file"
        distribution.append({
            "@type": "cr:FileObject",
            "@id": file_id,
            "name": Path(files[0]).name,
            "description": "Chip index (GeoParquet 1.1, one row per chip).",
            "contentUrl": _relative(files[0], base),
            "encodingFormat": PARQUET_MEDIA_TYPE,
            "sha256": _sha256(files[0]),
        })
        source = {"fileObject": {"@id": file_id}}
    else:
        file_id = "index-files"
        outside = [f for f in files if _relative(f, base).startswith("../")]
        if outside:
            raise ConfigError(
                f"{len(outside)} index files (e.g. {outside[0]!r}) are not under {str(base)!r}: a FileSet "
                "is read relative to the folder of croissant.json, so write it at or above the index directory"
            )
        distribution.append({
            "@type": "cr:FileSet",
            "@id": file_id,
            "name": "index-files",
            "description": f"Chip index, {len(files)} GeoParquet 1.1 files (one row per chip).",
            "encodingFormat": PARQUET_MEDIA_TYPE,
            "includes": [_relative(f, base) for f in files],
        })
        source = {"fileSet": {"@id": file_id}}
    for k, cube in enumerate([cubes] if isinstance(cubes, str) else list(cubes or [])):
        pattern = cube if cube.endswith(".npz") else storage.join(cube, "*.npz")
        distribution.append({
            "@type": "cr:FileSet",
            "@id": f"cubes-{k}",
            "name": f"cubes-{k}",
            "description": "Exported chip cubes (numpy .npz archives of pixel arrays and chip metadata).",
            "encodingFormat": NPZ_MEDIA_TYPE,
            "includes": _relative(pattern, base),
        })

    shard_sets: list[dict[str, Any]] = []
    if shards:
        files_, shard_sets = _shard_terms(shards, base)
        distribution.extend(files_)

    box, (start, end) = _coverage(table)
    facts: dict[str, Any] = {"crs": [], "resolution_m": None, "bands": []}
    if items is not None:
        facts = imagery_facts(table, items)
    else:
        missing = [what for what, given in (("crs", crs), ("resolution_m", resolution_m),
                                              ("band_names", band_names)) if not given]
        if missing:
            logger.warning(
                "croissant: no items= given, so %s are left out of the metadata (CRS falls back to the "
                "index geometry's OGC:CRS84); pass items=ItemSource(root=<data root>) or %s",
                ", ".join(missing), "=, ".join(missing) + "=",
            )
    if band_names:
        facts["bands"] = [{"name": b} for b in band_names]
    crs_value = crs or (facts["crs"][0] if len(facts["crs"]) == 1 else "OGC:CRS84")
    res_value = resolution_m if resolution_m is not None else facts["resolution_m"]
    chip_sizes = sorted({int(v) for v in table.column("chip_size").to_numpy()})
    platforms = sorted(set(table.column("platform").to_pylist()))
    n_items = len(set(table.column("item_id").to_pylist()))
    max_nodata = float(pc.max(table.column("nodata_percentage")).as_py())

    doc: dict[str, Any] = {
        "@context": context(),
        "@type": "sc:Dataset",
        "conformsTo": [CROISSANT_1_1, CROISSANT_RAI_1_0, GEOCROISSANT_1_0],
        "name": name,
        "description": description or (
            f"{table.num_rows} image chips of {', '.join(map(str, chip_sizes))} px from {n_items} "
            f"STAC items ({', '.join(platforms)}), indexed by stacchip; pixels are read on demand "
            "from the items' Cloud-Optimized GeoTIFFs."
        ),
        "license": license,
        "version": version,
        "datePublished": date_published or dt.date.today().isoformat(),
        "keywords": list(keywords) or ["earth observation", "satellite imagery", "chips", *platforms],
        "spatialCoverage": {
            "@type": "Place",
            "geo": {"@type": "GeoShape", "box": f"{box[1]:.6f} {box[0]:.6f} {box[3]:.6f} {box[2]:.6f}"},
        },
        "temporalCoverage": f"{start}/{end}",
        "geocr:coordinateReferenceSystem": crs_value,
        "geocr:samplingStrategy": (
            f"Every whole chip of {', '.join(map(str, chip_sizes))} px on each item's finest pixel grid "
            f"(non-overlapping, row-major); chips above the indexer's nodata limit are left out "
            f"(largest kept nodata fraction {max_nodata:.3f})."
        ),
    }
    if url:
        doc["url"] = url
    doc["citeAs"] = cite_as or (
        f"{name}, version {version}" + (f", {url}" if url else "") + ". Chip index built with stacchip."
    )
    if creators:
        doc["creator"] = [{"@type": "sc:Person", "name": c} for c in creators]
    if res_value is not None:
        doc["geocr:spatialResolution"] = {"@type": "QuantitativeValue", "value": float(res_value), "unitText": "m"}
    if facts["bands"]:
        doc.update(_band_terms(facts["bands"]))
    rai_values: dict[str, Any] = {
        "dataCollectionTimeFrame": [start, end],
        "dataPreprocessingProtocol": [
            f"Chip grid of {', '.join(map(str, chip_sizes))} px per STAC item; per-chip cloud and nodata "
            "fractions from the source's QA band; all bands resampled by nearest neighbour onto the "
            "finest grid when read."
        ],
    }
    rai_values.update(dict(rai or {}))
    doc.update(_rai_terms(rai_values))
    doc["distribution"] = distribution
    fields = _fields(schema, source)
    doc["recordSet"] = [{
        "@type": "cr:RecordSet",
        "@id": RECORD_SET,
        "name": RECORD_SET,
        "description": "One record per chip: the rows of the chip index.",
        "key": {"@id": f"{RECORD_SET}/chipid"},
        "field": fields,
    }, *shard_sets]
    return doc


def _shard_terms(folder: str, base: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Distribution entries and the ``samples`` record set of the shards in ``folder``."""
    from stacchip.export.shards import shard_name

    manifest_path = storage.join(folder, "prechip_manifest.json")
    try:
        manifest = json.loads(storage.read_bytes(manifest_path))
        outputs = manifest["outputs"]
    except (StorageError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--shards {folder!r}: no readable prechip manifest ({manifest_path}): {exc}") from exc
    if manifest.get("format") != "webdataset":
        raise ConfigError(f"--shards {folder!r}: the outputs there are {manifest.get('format', 'npz')!r}, "
                          "not WebDataset shards")
    sizes = {info.url.rsplit("/", 1)[-1]: info.size for info in storage.list_file_infos(folder)}
    entries: list[dict[str, Any]] = []
    for k, entry in enumerate(outputs):
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        if name not in (shard_name(k, 0), shard_name(k, 1)):
            raise ConfigError(f"{manifest_path}: output {k} is {name!r}, not a shard name")
        url = storage.join(folder, name)
        if name not in sizes:
            raise ConfigError(f"--shards {folder!r}: shard {name} is not there (stacchip-prechip not finished?)")
        try:
            record = json.loads(storage.read_bytes(storage.record_url(url)))
            size, sha = int(record["size"]), str(record["sha256"])
        except (StorageError, ValueError, KeyError, TypeError):
            size, sha = sizes[name], _sha256(url)
        if size != sizes[name]:
            raise ConfigError(f"shard {url} is {sizes[name]} bytes; its checksum record says {size}")
        entries.append({
            "@type": "cr:FileObject", "@id": f"shard-{k}", "name": name,
            "description": f"WebDataset shard {k}: {entry.get('samples', '?')} samples (tar"
                           + (", gzip" if name.endswith(".gz") else "") + ").",
            "contentUrl": _relative(url, base), "contentSize": f"{size} B",
            "encodingFormat": TAR_MEDIA_TYPE, "sha256": sha,
        })
    contained = [{"@id": e["@id"]} for e in entries]
    members = [
        ("shard-json", "*.json", JSON_MEDIA_TYPE, "Per-sample metadata (.json) inside the shards."),
        ("shard-pixels", "*[0-9].npy", NPY_FORMAT, "Per-sample pixels (C, H, W) in band order (.npy)."),
        ("shard-masks", "*.mask.npy", NPY_FORMAT, "Per-sample nodata masks (C, H, W), True = nodata (.mask.npy)."),
    ]
    for set_id, pattern, media, text in members:
        entries.append({"@type": "cr:FileSet", "@id": set_id, "name": set_id, "description": text,
                        "containedIn": contained, "encodingFormat": media, "includes": pattern})
    fields = [
        {"@type": "cr:Field", "@id": f"{SHARD_RECORD_SET}/key", "name": "key", "dataType": "sc:Text",
         "description": "WebDataset key of the sample, {shard:06d}-{position:05d} (its members are "
                        "{key}.json, {key}.npy and {key}.mask.npy).",
         "source": {"fileSet": {"@id": "shard-json"}, "extract": {"fileProperty": "filename"},
                    "transform": {"regex": "^([0-9]+-[0-9]+)\\.json$"}}},
        {"@type": "cr:Field", "@id": f"{SHARD_RECORD_SET}/metadata", "name": "metadata", "dataType": "sc:Text",
         "description": "The sample's .json: " + ", ".join(SHARD_JSON_FIELDS) + " (see stacchip.export.shards).",
         "source": {"fileSet": {"@id": "shard-json"}, "extract": {"fileProperty": "content"}}},
    ]
    record_set = {
        "@type": "cr:RecordSet", "@id": SHARD_RECORD_SET, "name": SHARD_RECORD_SET,
        "description": "One record per sample of the WebDataset shards (its .json); the sample's pixels "
                       "and nodata mask are the .npy and .mask.npy members of the same key.",
        "key": {"@id": f"{SHARD_RECORD_SET}/key"}, "field": fields,
    }
    return entries, [record_set]


def write_croissant(index: Any, dest: str | os.PathLike[str] = "croissant.json", **kwargs: Any) -> str:
    """Write :func:`croissant_metadata` to ``dest`` (local or ``s3://``); returns ``dest``."""
    out_dir = None if storage.is_s3(str(dest)) else storage.local_path(dest).resolve().parent
    doc = croissant_metadata(index, out_dir=out_dir, **kwargs)
    storage.write_bytes(str(dest), (json.dumps(doc, indent=2) + "\n").encode())
    return str(dest)


def validate(path: str | os.PathLike[str]) -> Any:
    """Validate with mlcroissant (raises on errors); returns the ``mlcroissant.Dataset``."""
    try:
        import mlcroissant as mlc
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ConfigError("validation needs mlcroissant: pip install 'stacchip[ml]'") from exc
    return mlc.Dataset(jsonld=str(path))


# --- command line -----------------------------------------------------------------------


def _flag(name: str) -> str:
    out = "".join("-" + c.lower() if c.isupper() else c for c in name)
    return "--rai-" + out


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stacchip croissant`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "croissant",
        help="write croissant.json (Croissant 1.1 + GeoCroissant + RAI) describing an index",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("index", nargs="+", help="index .parquet files, directories or s3:// prefixes")
    p.add_argument("--out", default="croissant.json", help="output JSON (default croissant.json)")
    p.add_argument("--name", default=None, help="dataset name (default: output directory name)")
    p.add_argument("--description", default=None)
    p.add_argument("--license", default="https://creativecommons.org/licenses/by/4.0/", help="license URL or SPDX id")
    p.add_argument("--url", default=None, help="dataset landing page")
    p.add_argument("--version", default="1.0.0", help="dataset version, MAJOR.MINOR.PATCH")
    p.add_argument("--cite-as", default=None, help="citation (BibTeX or text)")
    p.add_argument("--creator", action="append", default=[], help="creator name (repeatable)")
    p.add_argument("--keyword", action="append", default=[], help="keyword (repeatable)")
    p.add_argument("--data-root", default=None,
                   help="data root with {platform}/{item_id}/stac_item.json (for CRS, resolution, bands); "
                        "needed unless the index files record item_href or --crs, --resolution and --bands "
                        "are all given")
    p.add_argument("--crs", default=None, help="CRS to state, e.g. EPSG:32720 (default: from the items)")
    p.add_argument("--resolution", type=float, default=None, help="spatial resolution in metres")
    p.add_argument("--bands", default=None, help="comma-separated band names")
    p.add_argument("--cubes", action="append", default=[], help="directory of exported .npz cubes (repeatable)")
    p.add_argument("--shards", default=None,
                   help="folder of WebDataset shards from stacchip-prechip --format webdataset "
                        "({chips}/mode_v1_chipper_v2/{platform}): described as tar files and a 'samples' record set")
    p.add_argument("--validate", action="store_true", help="validate the result with mlcroissant")
    for name, many in RAI_FIELDS.items():
        flags = [_flag(name)]
        if name == "dataDataManipulationProtocol":  # mlcroissant's spelling; offer the plain one too
            flags.append("--rai-data-manipulation-protocol")
        p.add_argument(
            *flags, dest=f"rai_{name}", action="append" if many else "store", default=None,
            metavar="TEXT", help=f"rai:{name}" + (" (repeatable)" if many else ""),
        )
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``stacchip croissant``."""
    from stacchip.ml.items import ItemSource, hrefs_from_index

    files = index_files(args.index)
    items = None
    if args.data_root:
        items = ItemSource(root=args.data_root)
    else:
        hrefs = hrefs_from_index(files)
        if hrefs:
            items = ItemSource(hrefs=hrefs)
        elif args.crs is None or args.resolution is None or not args.bands:
            raise ConfigError(
                "cannot describe the imagery (CRS, resolution, bands): the index files record no item_href, "
                "so the STAC items are unknown; pass --data-root <root holding "
                "{platform}/{item_id}/stac_item.json> (the bucket the processors filled), or state all three "
                "with --crs, --resolution and --bands"
            )
    out = str(args.out)
    name = args.name or (storage.local_path(out).resolve().parent.name if not storage.is_s3(out) else "stacchip-chips")
    rai = {k: getattr(args, f"rai_{k}") for k in RAI_FIELDS if getattr(args, f"rai_{k}") is not None}
    write_croissant(
        files, out, name=name or "stacchip-chips", description=args.description, license=args.license,
        url=args.url, version=args.version, cite_as=args.cite_as, creators=args.creator,
        keywords=args.keyword, items=items, crs=args.crs, resolution_m=args.resolution,
        band_names=args.bands.split(",") if args.bands else None, cubes=args.cubes or None, shards=args.shards,
        rai=rai,
    )
    echo(f"wrote {out} ({len(files)} index file(s))")
    if args.validate:
        validate(out)
        echo(f"{out}: valid (mlcroissant)")
    return 0
