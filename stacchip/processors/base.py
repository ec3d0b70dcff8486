"""The frame every source processor shares: settings, validation, the task loop, the CLI.

A source subclasses :class:`Processor`, declares its defaults and extra flags,
and implements :meth:`Processor.run_task` (pick items for one task index and
publish them). :func:`cli` parses flags and environment variables (flags
win), checks everything that can be checked before anything is written (the
output location, the sample file and each task's row), then runs the tasks --
one from the array-job environment, or ``--index`` / ``--range`` locally over a
process pool -- and prints one JSON line per item: what was picked and what
happened to it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from typing import Any, ClassVar, Sequence

from stacchip.console import MAX_CHIP_SIZE, ArgumentParser, echo
from stacchip.errors import ConfigError
from stacchip.processors import jobs
from stacchip.processors.publish import Bucket, Outcome, Publisher

logger = logging.getLogger(__name__)

#: Processor classes by source name, filled by :func:`register`.
REGISTRY: dict[str, type["Processor"]] = {}


def register(cls: type["Processor"]) -> type["Processor"]:
    """Class decorator: make a processor known by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def processor_class(name: str) -> type["Processor"]:
    """The processor for source ``name`` (raises :class:`ConfigError` for an unknown source)."""
    _load_all()
    key = name.strip().lower().replace("_", "-")
    if key not in REGISTRY:
        raise ConfigError(f"unknown source {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


def _load_all() -> None:
    import importlib

    for module in (
        "sentinel_2_processor", "landsat_processor", "naip_processor",
        "linz_processor", "sentinel_1_processor", "modis_processor",
    ):
        importlib.import_module(f"stacchip.processors.{module}")


class Processor:
    """One data source. Subclasses set the class attributes and implement :meth:`run_task`."""

    #: Source name (``sentinel-2``) and console script (``stacchip-sentinel-2``).
    name: ClassVar[str] = ""
    prog: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Public STAC API this source searches by default (None: no STAC API).
    default_api: ClassVar[str | None] = None
    #: Environment variable naming the sample file (None: the source needs none).
    sample_var: ClassVar[str | None] = None
    #: Columns the sample file must have.
    sample_columns: ClassVar[tuple[str, ...]] = ()
    #: Default pool of years, how many to draw per task, and seasons.
    default_years: ClassVar[tuple[int, ...]] = ()
    default_n_years: ClassVar[int] = 1
    default_seasons: ClassVar[tuple[str, ...]] = ()
    #: Scene-level limits in percent (eo:cloud_cover, nodata pixel percentage), None for none.
    default_max_cloud: ClassVar[float | None] = None
    default_max_scene_nodata: ClassVar[float | None] = None
    #: Chip-level nodata limit (fraction 0-1) of the index.
    default_chip_max_nodata: ClassVar[float] = 0.5

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self._catalog: Any = None

    # --- flags ---------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Source-specific flags (override and call super)."""

    @classmethod
    def configure(cls, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        """Resolve source-specific settings from ``args`` and the environment (override)."""

    @classmethod
    def build_parser(cls) -> argparse.ArgumentParser:
        """The console script's argument parser."""
        parser = ArgumentParser(prog=cls.prog, description=cls.description)
        parser.add_argument(
            "--bucket", default=None,
            help="output: S3 bucket name, s3://bucket/prefix or local path (env STACCHIP_BUCKET)",
        )
        if cls.default_api is not None:
            parser.add_argument(
                "--stac-api", default=None,
                help=f"STAC API URL (env STACCHIP_STAC_API; default {cls.default_api})",
            )
            parser.add_argument(
                "--sign", default=None,
                help="sign asset hrefs: auto (Planetary Computer API only), none, planetary-computer "
                "(env STACCHIP_SIGN)",
            )
        if cls.sample_var:
            parser.add_argument(
                "--sample-source", default=None,
                help=f"sample file (FlatGeobuf, GeoJSON, ...): local path, s3:// or https:// (env {cls.sample_var})",
            )
        if cls.default_years:
            parser.add_argument(
                "--years", default=None,
                help="years to sample from, e.g. 2018-2022 or 2018,2020 (env STACCHIP_YEARS; default "
                f"{cls.default_years[0]}-{cls.default_years[-1]})",
            )
            parser.add_argument(
                "--n-years", type=int, default=None,
                help=f"years drawn per task (env STACCHIP_N_YEARS; default {cls.default_n_years})",
            )
        if cls.default_seasons:
            parser.add_argument(
                "--seasons", default=None,
                help="seasons per year: q1..q4, djf/mam/jja/son or MM-DD/MM-DD, comma separated "
                f"(env STACCHIP_SEASONS; default {','.join(cls.default_seasons)})",
            )
        if cls.default_max_cloud is not None:
            parser.add_argument(
                "--max-cloud-cover", type=float, default=None,
                help="largest scene cloud cover in percent, 0-100 (env STACCHIP_MAX_CLOUD_COVER; "
                f"default {cls.default_max_cloud:g})",
            )
        if cls.default_max_scene_nodata is not None:
            parser.add_argument(
                "--max-scene-nodata", type=float, default=None,
                help="largest scene nodata in percent, 0-100 (env STACCHIP_MAX_SCENE_NODATA; "
                f"default {cls.default_max_scene_nodata:g})",
            )
        parser.add_argument(
            "--chip-size", type=int, default=None,
            help=f"chip size in pixels, 1-{MAX_CHIP_SIZE} (env STACCHIP_CHIP_SIZE; default 256)",
        )
        parser.add_argument(
            "--chip-max-nodata", type=float, default=None,
            help="largest nodata fraction (0-1) of an indexed chip (env STACCHIP_CHIP_MAX_NODATA; "
            f"default {cls.default_chip_max_nodata:g})",
        )
        from stacchip.processors import layout

        parser.add_argument(
            "--layout", default=None, choices=layout.LAYOUTS,
            help=f"asset files in the bucket: copy (byte for byte) or aligned (re-tiled to the chip grid, ZSTD) "
            f"(env {layout.LAYOUT_VAR}; default {layout.DEFAULT_LAYOUT})",
        )
        parser.add_argument(
            "--zstd-level", type=int, default=None,
            help=f"ZSTD level 1-22 of aligned files (env {layout.ZSTD_LEVEL_VAR}; default {layout.ZSTD_LEVEL})",
        )
        parser.add_argument(
            "--overviews", action="store_true", default=None,
            help=f"write overviews into aligned files (env {layout.OVERVIEWS_VAR}; default off)",
        )
        cls.add_arguments(parser)
        jobs.add_job_arguments(parser)
        return parser

    @classmethod
    def settings_from(cls, args: argparse.Namespace) -> dict[str, Any]:
        """Every setting, flag over environment over default; raises :class:`ConfigError`."""
        s: dict[str, Any] = {"source": cls.name}
        s["bucket"] = jobs.output_root(
            jobs.env_str(args.bucket, "STACCHIP_BUCKET", required=True, flag="--bucket") or ""
        )
        if cls.default_api is not None:
            s["stac_api"] = jobs.env_str(args.stac_api, "STACCHIP_STAC_API", cls.default_api)
            s["sign"] = jobs.env_str(args.sign, "STACCHIP_SIGN", "auto")
        if cls.sample_var:
            s["sample_source"] = jobs.env_str(
                args.sample_source, cls.sample_var, required=True, flag="--sample-source"
            )
        if cls.default_years:
            s["years"] = jobs.env_list(args.years, "STACCHIP_YEARS", cls.default_years, kind=int, flag="--years")
            s["n_years"] = jobs.env_int(args.n_years, "STACCHIP_N_YEARS", cls.default_n_years, flag="--n-years", minimum=1)
            if s["n_years"] > len(set(s["years"])):
                raise ConfigError(f"--n-years {s['n_years']} is more than the {len(set(s['years']))} years given")
        if cls.default_seasons:
            from stacchip.processors.sampling import season_bounds

            s["seasons"] = jobs.env_list(args.seasons, "STACCHIP_SEASONS", cls.default_seasons, flag="--seasons")
            for season in s["seasons"]:
                season_bounds(season)
        if cls.default_max_cloud is not None:
            s["max_cloud"] = jobs.env_float(
                args.max_cloud_cover, "STACCHIP_MAX_CLOUD_COVER", cls.default_max_cloud, flag="--max-cloud-cover", minimum=0, maximum=100
            )
        if cls.default_max_scene_nodata is not None:
            s["max_scene_nodata"] = jobs.env_float(
                args.max_scene_nodata, "STACCHIP_MAX_SCENE_NODATA", cls.default_max_scene_nodata,
                flag="--max-scene-nodata", minimum=0, maximum=100,
            )
        s["chip_size"] = jobs.env_int(
            args.chip_size, "STACCHIP_CHIP_SIZE", 256, flag="--chip-size", minimum=1, maximum=MAX_CHIP_SIZE
        )
        s["chip_max_nodata"] = jobs.env_float(
            args.chip_max_nodata, "STACCHIP_CHIP_MAX_NODATA", cls.default_chip_max_nodata,
            flag="--chip-max-nodata", minimum=0, maximum=1,
        )
        s["dry_run"] = jobs.env_bool(args.dry_run, "STACCHIP_DRY_RUN", False)
        _layout_settings(args, s)
        cls.configure(args, s)
        return s

    # --- checks before anything is written ---------------------------------------------------

    def validate(self, indices: Sequence[int]) -> None:
        """Check every task index can run (sample rows exist, ...); raise :class:`ConfigError`."""
        if self.sample_var:
            from stacchip.processors.sampling import sample_row

            for index in indices:
                sample_row(self.settings["sample_source"], index, self.sample_columns)

    # --- helpers for run_task -------------------------------------------------------------------

    @property
    def catalog(self) -> Any:
        """The STAC API (opened on first use, once per process)."""
        if self._catalog is None:
            from stacchip.processors.catalog import Catalog

            self._catalog = Catalog(self.settings["stac_api"], self.settings.get("sign", "auto"))
        return self._catalog

    def publisher(self, index: int) -> Publisher:
        """The publisher for task ``index`` (in the layout the settings ask for)."""
        from stacchip.processors.layout import layout_from

        return Publisher(
            Bucket(self.settings["bucket"]), f"{self.name}/{index}", self.settings["dry_run"],
            layout=layout_from(self.settings),
        )

    def sample(self, index: int) -> Any:
        """Row ``index`` of the sample file."""
        from stacchip.processors.sampling import sample_row

        return sample_row(self.settings["sample_source"], index, self.sample_columns)

    def run_task(self, index: int) -> list[Outcome]:
        """Pick and publish the items of task ``index``."""
        raise NotImplementedError


def _layout_settings(args: argparse.Namespace, s: dict[str, Any]) -> None:
    """``layout``, ``zstd_level``, ``overviews`` into ``s``; checks the chip size for the aligned layout."""
    from stacchip.processors import layout

    s["layout"] = layout.check_layout(
        jobs.env_str(getattr(args, "layout", None), layout.LAYOUT_VAR, layout.DEFAULT_LAYOUT)
    )
    s["zstd_level"] = jobs.env_int(
        getattr(args, "zstd_level", None), layout.ZSTD_LEVEL_VAR, layout.ZSTD_LEVEL, flag="--zstd-level", minimum=1
    )
    s["overviews"] = jobs.env_bool(getattr(args, "overviews", None), layout.OVERVIEWS_VAR, False)
    layout.layout_from(s)  # raises ConfigError for a chip size or level the layout cannot write


@functools.lru_cache(maxsize=4)
def _processor(name: str, settings_json: str) -> Processor:
    return processor_class(name)(json.loads(settings_json))


def run_index(name: str, settings_json: str, index: int) -> list[dict[str, Any]]:
    """Run task ``index`` of source ``name`` (module-level so process pools can pickle it)."""
    proc = _processor(name, settings_json)
    records = [o.as_dict() for o in proc.run_task(index)]
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        raise jobs.TaskFailed(
            f"{len(failed)} of {len(records)} items failed: "
            + "; ".join(f"{r['item_id']}: {r.get('note', '')}" for r in failed),
            records,
        )
    return records


def run_upstream(cls: type[Processor], argv: Sequence[str]) -> list[dict[str, Any]]:
    """Body of the upstream-compatible ``process_*_tile`` functions: one task from flags.

    ``argv`` must hold ``--index``. Returns the item records; raises
    :class:`~stacchip.processors.jobs.TaskFailed` when an item failed (as
    upstream's functions raised), :class:`ConfigError` for bad settings.
    """
    args = cls.build_parser().parse_args(list(argv))
    settings = cls.settings_from(args)
    indices = jobs.resolve_indices(args.index, None)
    Bucket(settings["bucket"]).check()
    cls(settings).validate(indices)
    return run_index(cls.name, json.dumps(settings, sort_keys=True), indices[0])


def cli(cls: type[Processor], argv: Sequence[str] | None = None) -> jobs.RunSummary:
    """Parse, validate, run, print; used by every console script through :func:`main`."""
    args = cls.build_parser().parse_args(argv)
    jobs.setup_logging(args.verbose, args.quiet)
    settings = cls.settings_from(args)
    indices = jobs.resolve_indices(args.index, args.range_spec)
    workers = jobs.resolve_workers(args.workers)
    proc = cls(settings)
    Bucket(settings["bucket"]).check()
    proc.validate(indices)
    settings_json = json.dumps(settings, sort_keys=True)
    summary = jobs.run_tasks(
        functools.partial(run_index, cls.name, settings_json), indices, workers=workers, desc=cls.prog
    )
    for outcome in summary.outcomes:
        for record in outcome.result or []:
            echo(json.dumps({"task": outcome.index, **record}))
    return summary


def main(cls: type[Processor], argv: Sequence[str] | None = None) -> int:
    """Entry point body: exit status 0, 1 (worth retrying) or 2 (bad input or configuration)."""
    return jobs.main(lambda a: cli(cls, a), argv, prog=cls.prog)


def run_source(argv: Sequence[str] | None = None) -> int:
    """``python -m stacchip.processors SOURCE [flags]``: run any processor by source name."""
    args = list(sys.argv[1:] if argv is None else argv)

    def go(_: Any) -> jobs.RunSummary:
        if not args or args[0].startswith("-"):
            raise ConfigError("usage: python -m stacchip.processors SOURCE [flags]; sources: "
                              + ", ".join(sorted(_names())))
        return cli(processor_class(args[0]), args[1:])

    prog = "python -m stacchip.processors"
    if args and not args[0].startswith("-"):
        prog = f"stacchip-{args[0].strip().lower().replace('_', '-')}"
    return jobs.main(go, args, prog=prog)


def _names() -> list[str]:
    _load_all()
    return list(REGISTRY)
