"""stacchip.processors.settings: one table per command (flag, variable, type, default, unit, help)
gives the parser, the --help text and a frozen typed settings object; cloud limits are fractions."""

from __future__ import annotations

import dataclasses

import pytest

from stacchip.errors import ConfigError
from stacchip.index import query
from stacchip.processors import prechip, settings, stats
from stacchip.processors.base import ProcessorSettings, processor_class

S2 = processor_class("sentinel-2")


def s2_settings(argv: list[str], environ: dict[str, str]) -> ProcessorSettings:
    args = S2.build_parser().parse_args(argv)
    return settings.resolve(S2.settings_type, args, context=S2, environ=environ, source=S2.name)


BASE = {"STACCHIP_BUCKET": "./out", "STACCHIP_MGRS_SOURCE": "x.fgb"}


def test_processor_settings_are_frozen_typed_and_travel_as_json():
    s = s2_settings(["--years", "2019-2021", "--chip-size", "128"], BASE)
    assert (s.years, s.n_years, s.chip_size, s.bucket, s.source) == ((2019, 2020, 2021), 2, 128, "./out", "sentinel-2")
    assert s.seasons == ("q1", "q2", "q3", "q4") and s.collection == "sentinel-2-l2a"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.chip_size = 64  # type: ignore[misc]
    assert settings.from_json(S2.settings_type, settings.to_json(s)) == s


def test_flag_over_new_variable_over_upstream_percent_variable_over_default():
    assert s2_settings([], BASE).max_cloud == pytest.approx(0.75)  # the processor's default
    assert s2_settings([], {**BASE, "STACCHIP_MAX_CLOUD_COVER": "20"}).max_cloud == pytest.approx(0.2)
    both = {**BASE, "STACCHIP_MAX_CLOUD_COVER": "20", "STACCHIP_MAX_SCENE_CLOUD": "0.3"}
    assert s2_settings([], both).max_cloud == pytest.approx(0.3)
    assert s2_settings(["--max-cloud", "0.1"], both).max_cloud == pytest.approx(0.1)
    # the STAC field eo:cloud_cover is a percentage: the limit is converted at that edge
    assert s2_settings(["--max-cloud", "0.1"], BASE).max_cloud_cover == pytest.approx(10.0)


@pytest.mark.parametrize(("argv", "environ", "words"), [
    (["--max-cloud", "20"], {}, ["--max-cloud='20'", "looks like a percentage", "0.2"]),
    ([], {"STACCHIP_MAX_SCENE_CLOUD": "35"}, ["STACCHIP_MAX_SCENE_CLOUD='35'", "looks like a percentage"]),
    ([], {"STACCHIP_MAX_CLOUD_COVER": "0.2"}, ["STACCHIP_MAX_CLOUD_COVER='0.2'", "looks like a fraction", "20"]),
    ([], {"STACCHIP_MAX_CLOUD_COVER": "150"}, ["STACCHIP_MAX_CLOUD_COVER", "between 0 and 100"]),
    (["--chip-max-nodata", "50"], {}, ["--chip-max-nodata", "looks like a percentage"]),
])
def test_a_value_in_the_other_unit_is_refused_saying_so(argv, environ, words):
    with pytest.raises(ConfigError) as err:
        s2_settings(argv, {**BASE, **environ})
    for word in words:
        assert word in str(err.value)


def test_cloud_limits_are_fractions_in_every_api(tmp_path):
    with pytest.raises(ConfigError, match="max_cloud = 20 looks like a percentage"):
        query(tmp_path, max_cloud=20)
    with pytest.raises(ConfigError, match="looks like a percentage"):
        dataclasses.replace(s2_settings([], BASE), max_cloud=75.0)
    with pytest.raises(ConfigError, match="--max-cloud='20' looks like a percentage"):
        prechip.config_from_args(prechip.build_parser().parse_args(
            ["--data", "./d", "--indexpath", "i", "--chips", "./c", "--max-cloud", "20"]))


@pytest.mark.parametrize("command", ["prechip", "stats", "sentinel-2", "landsat", "naip", "linz", "sentinel-1",
                                     "modis"])
def test_every_row_is_in_the_help_with_its_variable_and_unit(command):
    if command == "prechip":
        cls, context, parser = prechip.PrechipConfig, None, prechip.build_parser()
    elif command == "stats":
        cls, context, parser = stats.StatsConfig, None, stats.build_parser()
    else:
        context = processor_class(command)
        cls, parser = context.settings_type, context.build_parser()
    text = " ".join(parser.format_help().split())
    rows = settings.table(cls, context)
    assert rows and len({r["name"] for r in rows}) == len(rows)
    for row in rows:
        assert row["flag"] in text, row
        for var in row["env"]:
            assert var in text, row
        assert row["unit"].split(",")[0] in text, row
        assert row["help"] and row["type"]


def test_prechip_and_stats_settings_are_frozen():
    cfg = prechip.PrechipConfig(data="d", index="i", output="o")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="percentile 150"):
        stats.StatsConfig(platform="sentinel-2-l2a", output="o", percentiles=[150])
