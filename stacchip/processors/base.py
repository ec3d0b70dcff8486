"""The frame every source processor shares: settings, validation, the task loop, the CLI.

A source subclasses :class:`Processor`, declares its defaults, its settings
(a subclass of :class:`ProcessorSettings`, the table of flag, environment
variable, type, default, unit and help of every setting:
:mod:`stacchip.processors.settings`) and implements :meth:`Processor.run_task`
(pick items for one task index and publish them). :func:`cli` parses flags and environment variables (flags
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
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from stacchip.console import MAX_CHIP_SIZE, ArgumentParser, echo
from stacchip.errors import ConfigError
from stacchip.index import check_fraction
from stacchip.processors import jobs, settings
from stacchip.processors import layout as layouts
from stacchip.processors.publish import Bucket, Outcome, Publisher
from stacchip.processors.settings import Env, setting

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


def _has_api(cls: Any) -> bool:
    return cls is None or cls.default_api is not None


def _has_years(cls: Any) -> bool:
    return cls is None or bool(cls.default_years)


def _layout(text: str, label: str) -> str:
    return layouts.check_layout(text)


@dataclass(frozen=True)
class ProcessorSettings:
    """The settings every source processor shares, frozen and typed; also their table (flag,
    environment variable, type, default, unit, help). Rows that need a processor feature exist
    only for processors that have it (a STAC API, a sample file, years, seasons, scene
    limits), with the processor's defaults. A source adds its own rows in a subclass
    (:attr:`Processor.settings_type`).

    Cloud limits are fractions: ``max_cloud`` (``--max-cloud``, ``STACCHIP_MAX_SCENE_CLOUD``)
    is the largest scene cloud cover 0-1; upstream's ``STACCHIP_MAX_CLOUD_COVER`` is read as
    the percentage it is (``75`` is ``0.75``) and compared with the items' ``eo:cloud_cover``
    (a percentage) after conversion.
    """

    bucket: str = setting(
        flag="--bucket", env="STACCHIP_BUCKET", kind=settings.Location(), required=True,
        help="output: S3 bucket name, s3://bucket/prefix or local path")
    #: The processor's source name (not a flag).
    source: str = ""
    stac_api: str | None = setting(
        None, flag="--stac-api", env="STACCHIP_STAC_API", when=_has_api, help="STAC API URL",
        default_for=lambda cls, values: cls.default_api)
    sign: str = setting(
        "auto", flag="--sign", env="STACCHIP_SIGN", when=_has_api,
        help="sign asset hrefs: auto (Planetary Computer API only), none, planetary-computer")
    sample_source: str | None = setting(
        None, flag="--sample-source", env_for=lambda cls: [cls.sample_var] if cls is not None else [],
        when=lambda cls: cls is None or bool(cls.sample_var), required=True,
        help="sample file (FlatGeobuf, GeoJSON, ...): local path, s3:// or https://")
    years: tuple[int, ...] = setting(
        (), flag="--years", env="STACCHIP_YEARS", kind=settings.Items(int), when=_has_years,
        default_for=lambda cls, values: tuple(cls.default_years),
        help="years to sample from, e.g. 2018-2022 or 2018,2020")
    n_years: int = setting(
        1, flag="--n-years", env="STACCHIP_N_YEARS", kind=settings.Integer(1), when=_has_years,
        default_for=lambda cls, values: cls.default_n_years, help="years drawn per task")
    seasons: tuple[str, ...] = setting(
        (), flag="--seasons", env="STACCHIP_SEASONS", kind=settings.Items(str),
        when=lambda cls: cls is None or bool(cls.default_seasons),
        default_for=lambda cls, values: tuple(cls.default_seasons),
        help="seasons per year: q1..q4, djf/mam/jja/son or MM-DD/MM-DD, comma separated")
    max_cloud: float | None = setting(
        None, flag="--max-cloud",
        env=("STACCHIP_MAX_SCENE_CLOUD", Env("STACCHIP_MAX_CLOUD_COVER",
                                              settings.Percent(fraction_var="STACCHIP_MAX_SCENE_CLOUD"))),
        kind=settings.Fraction(), unit="fraction 0-1",
        when=lambda cls: cls is None or cls.default_max_cloud is not None,
        default_for=lambda cls, values: cls.default_max_cloud,
        help="largest scene cloud cover (eo:cloud_cover)")
    max_scene_nodata: float | None = setting(
        None, flag="--max-scene-nodata", env="STACCHIP_MAX_SCENE_NODATA", kind=settings.Number(0, 100),
        unit="percent 0-100", when=lambda cls: cls is None or cls.default_max_scene_nodata is not None,
        default_for=lambda cls, values: cls.default_max_scene_nodata, help="largest scene nodata")
    chip_size: int = setting(
        256, flag="--chip-size", env="STACCHIP_CHIP_SIZE", kind=settings.Integer(1, MAX_CHIP_SIZE),
        unit=f"pixels, 1-{MAX_CHIP_SIZE}", help="chip size")
    chip_max_nodata: float = setting(
        0.5, flag="--chip-max-nodata", env="STACCHIP_CHIP_MAX_NODATA", kind=settings.Fraction(),
        unit="fraction 0-1", default_for=lambda cls, values: cls.default_chip_max_nodata,
        help="largest nodata fraction of an indexed chip")
    dry_run: bool = setting(
        False, flag="--dry-run", env="STACCHIP_DRY_RUN", kind=settings.Bool(), shared=True,
        help="print what would be picked and written; write nothing")
    layout: str = setting(
        layouts.DEFAULT_LAYOUT, flag="--layout", env=layouts.LAYOUT_VAR, kind=settings.Custom(_layout, "layout"),
        metavar="{" + ",".join(layouts.LAYOUTS) + "}",
        help="asset files in the bucket: copy (byte for byte) or aligned (re-tiled to the chip grid, ZSTD)")
    zstd_level: int = setting(
        layouts.ZSTD_LEVEL, flag="--zstd-level", env=layouts.ZSTD_LEVEL_VAR, kind=settings.Integer(1),
        unit="1-22", help="ZSTD level of aligned files")
    overviews: bool = setting(
        False, flag="--overviews", env=layouts.OVERVIEWS_VAR, kind=settings.Bool(),
        help="write overviews into aligned files")

    def __post_init__(self) -> None:
        if self.max_cloud is not None:
            check_fraction(self.max_cloud, "max_cloud")
        if self.years and self.n_years > len(set(self.years)):
            raise ConfigError(f"--n-years {self.n_years} is more than the {len(set(self.years))} years given")
        if self.seasons:
            from stacchip.processors.sampling import season_bounds

            for season in self.seasons:
                season_bounds(season)
        layouts.layout_from(self)  # raises ConfigError for a chip size or level the layout cannot write

    @property
    def max_cloud_cover(self) -> float | None:
        """``max_cloud`` in percent, the unit of the items' ``eo:cloud_cover`` (None: no limit)."""
        return None if self.max_cloud is None else self.max_cloud * 100.0


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
    #: Scene-level limits, None for none: cloud cover as a fraction 0-1 (compared with
    #: ``eo:cloud_cover`` in percent), nodata pixels in percent.
    default_max_cloud: ClassVar[float | None] = None
    default_max_scene_nodata: ClassVar[float | None] = None
    #: Chip-level nodata limit (fraction 0-1) of the index.
    default_chip_max_nodata: ClassVar[float] = 0.5
    #: The source's settings: their table and the frozen object a task runs with.
    settings_type: ClassVar[type[ProcessorSettings]] = ProcessorSettings

    def __init__(self, settings: ProcessorSettings) -> None:
        self.settings = settings
        self._catalog: Any = None

    # --- flags ---------------------------------------------------------------------------

    @classmethod
    def build_parser(cls) -> argparse.ArgumentParser:
        """The console script's argument parser (from the rows of :attr:`settings_type`)."""
        parser = ArgumentParser(prog=cls.prog, description=cls.description)
        settings.add_arguments(parser, cls.settings_type, context=cls)
        jobs.add_job_arguments(parser)
        return parser

    @classmethod
    def settings_from(cls, args: argparse.Namespace) -> ProcessorSettings:
        """Every setting, flag over environment over default; raises :class:`ConfigError`."""
        return settings.resolve(cls.settings_type, args, context=cls, source=cls.name)

    # --- checks before anything is written ---------------------------------------------------

    def validate(self, indices: Sequence[int]) -> None:
        """Check every task index can run (sample rows exist, ...); raise :class:`ConfigError`."""
        if self.sample_var:
            from stacchip.processors.sampling import sample_row

            for index in indices:
                sample_row(str(self.settings.sample_source), index, self.sample_columns)

    # --- helpers for run_task -------------------------------------------------------------------

    @property
    def catalog(self) -> Any:
        """The STAC API (opened on first use, once per process)."""
        if self._catalog is None:
            from stacchip.catalog.stac_api import Catalog

            self._catalog = Catalog(str(self.settings.stac_api), self.settings.sign)
        return self._catalog

    def publisher(self, index: int) -> Publisher:
        """The publisher for task ``index`` (in the layout the settings ask for)."""
        return Publisher(
            Bucket(self.settings.bucket), f"{self.name}/{index}", self.settings.dry_run,
            layout=layouts.layout_from(self.settings),
        )

    def sample(self, index: int) -> Any:
        """Row ``index`` of the sample file."""
        from stacchip.processors.sampling import sample_row

        return sample_row(str(self.settings.sample_source), index, self.sample_columns)

    def run_task(self, index: int) -> list[Outcome]:
        """Pick and publish the items of task ``index``."""
        raise NotImplementedError


@functools.lru_cache(maxsize=4)
def _processor(name: str, settings_json: str) -> Processor:
    cls = processor_class(name)
    return cls(settings.from_json(cls.settings_type, settings_json))


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
    s = cls.settings_from(args)
    indices = jobs.resolve_indices(args.index, None)
    Bucket(s.bucket).check()
    cls(s).validate(indices)
    return run_index(cls.name, settings.to_json(s), indices[0])


def cli(cls: type[Processor], argv: Sequence[str] | None = None) -> jobs.RunSummary:
    """Parse, validate, run, print; used by every console script through :func:`main`."""
    args = cls.build_parser().parse_args(argv)
    jobs.setup_logging(args.verbose, args.quiet)
    s = cls.settings_from(args)
    indices = jobs.resolve_indices(args.index, args.range_spec)
    workers = jobs.resolve_workers(args.workers)
    proc = cls(s)
    Bucket(s.bucket).check()
    proc.validate(indices)
    settings_json = settings.to_json(s)
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
