"""Settings declared once: one table per command, from which its flags, its ``--help`` and a
frozen, typed settings object are built.

A command's settings are a frozen dataclass (``PrechipConfig``, ``StatsConfig``,
``ProcessorSettings`` and one subclass per source); each field that comes from
the command line carries a :class:`Setting` made by :func:`setting`: its flag,
its environment variable(s), its type (a :class:`Kind`, which reads and checks
the text), its default, its unit and its help line. :func:`add_arguments` puts
the flags on an argparse parser, their help lines saying unit, variable and
default; :func:`resolve` reads every setting -- the flag, else the first
environment variable set, else the default -- and builds the object. A bad
value is a :class:`~stacchip.errors.ConfigError` naming the flag or variable
(``--seed=-1 must be >= 0``); :func:`table` lists the rows (name, flag,
variables, type, default, unit, help) for documentation.

Units. Cloud limits are fractions 0-1 in every API, flag and new variable
(:class:`Fraction`). Upstream's ``STACCHIP_MAX_CLOUD_COVER`` stays a percentage
0-100 (:class:`Percent`, converted to a fraction as it is read). A value that
looks like the other unit is refused, saying so: ``20`` where a fraction is
expected, ``0.2`` in a percent variable (write ``20``, or the fraction ``0.2``
in the fraction variable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from stacchip import index
from stacchip.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "Bool",
    "Env",
    "Custom",
    "Fraction",
    "IndexPath",
    "Integer",
    "Items",
    "Kind",
    "Location",
    "Number",
    "Percent",
    "Setting",
    "Text",
    "add_arguments",
    "check_bounds",
    "check_fraction",
    "output_root",
    "from_json",
    "parse_list",
    "resolve",
    "setting",
    "table",
    "to_json",
]


# --- kinds: how a setting's text reads ------------------------------------------------------------


class Kind:
    """How the text of a flag or variable becomes a value; ``read`` raises :class:`ConfigError`
    naming ``label`` (the flag or variable)."""

    #: The type's name in :func:`table` and ``--help``, and the flag's placeholder.
    name = "text"
    metavar = "TEXT"

    def read(self, text: str, label: str) -> Any:
        return text

    def show(self, value: Any) -> str:
        """A default as ``--help`` prints it."""
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)


class Text(Kind):
    """A string; ``choices`` (compared lower-cased when ``lower``) limit it."""

    def __init__(self, choices: Sequence[str] | None = None, lower: bool = False) -> None:
        self.choices = tuple(choices) if choices is not None else None
        self.lower = lower
        self.name = "|".join(self.choices) if self.choices else "text"
        self.metavar = "{" + ",".join(self.choices) + "}" if self.choices else "TEXT"

    def read(self, text: str, label: str) -> str:
        value = text.strip().lower() if self.lower else text
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{label}={text!r} is not one of {', '.join(self.choices)}")
        return value


def _number(text: str, kind: Callable[[str], Any], what: str, label: str) -> Any:
    try:
        return kind(text.strip())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}={text!r} is not {what}") from exc


def check_bounds(value: Any, label: str, minimum: Any, maximum: Any) -> Any:
    """``value`` if it lies within ``minimum`` .. ``maximum`` (None: unbounded), else :class:`ConfigError`."""
    if minimum is not None and value < minimum:
        raise ConfigError(f"{label}={value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{label}={value} must be <= {maximum}")
    return value


class Integer(Kind):
    """An integer within ``minimum`` .. ``maximum``."""

    name = "integer"
    metavar = "N"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def read(self, text: str, label: str) -> int:
        return int(check_bounds(_number(text, int, "an integer", label), label, self.minimum, self.maximum))


class Number(Kind):
    """A finite number within ``minimum`` .. ``maximum``."""

    name = "number"
    metavar = "X"

    def __init__(self, minimum: float | None = None, maximum: float | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def read(self, text: str, label: str) -> float:
        value = float(_number(text, float, "a number", label))
        if not math.isfinite(value):
            raise ConfigError(f"{label}={value} is not a finite number")
        return float(check_bounds(value, label, self.minimum, self.maximum))


class Fraction(Kind):
    """A fraction 0-1 (``none``/``off`` is no limit when ``optional``); a value that looks like a
    percentage (above 1, at most 100) is refused, saying so."""

    name = "fraction"
    metavar = "FRACTION"

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def read(self, text: str, label: str) -> float | None:
        if self.optional and text.strip().lower() in ("none", "off", ""):
            return None
        try:
            value = float(text)
        except ValueError:
            hint = " (or 'none')" if self.optional else ""
            raise ConfigError(f"{label}={text!r} is not a fraction between 0 and 1{hint}") from None
        return check_fraction(value, label, text)


def check_fraction(value: float, label: str, text: Any = None) -> float:
    """``value`` if it is a fraction 0-1, else :class:`ConfigError` naming ``label`` (which says so
    when the value looks like a percentage: :func:`stacchip.index.fraction_problem`)."""
    problem = index.fraction_problem(value)
    if problem:
        raise ConfigError(f"{label}={text if text is not None else value!r} {problem}")
    return value


class Percent(Kind):
    """A percentage 0-100, read as the fraction it is (``20`` gives ``0.2``); a value between 0
    and 1 (exclusive) looks like a fraction and is refused, saying so."""

    name = "percent"
    metavar = "PERCENT"

    def __init__(self, fraction_var: str | None = None) -> None:
        self.fraction_var = fraction_var

    def read(self, text: str, label: str) -> float:
        value = float(_number(text, float, "a number", label))
        if not (math.isfinite(value) and 0.0 <= value <= 100.0):
            raise ConfigError(f"{label}={text!r} must be a percentage between 0 and 100")
        if 0.0 < value < 1.0:
            other = f", or {self.fraction_var}={value:g} for the fraction" if self.fraction_var else ""
            raise ConfigError(
                f"{label}={text!r} looks like a fraction; {label} is a percentage 0-100 "
                f"(write {value * 100:g} for {value * 100:g} %{other})"
            )
        return value / 100.0


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


class Bool(Kind):
    """``1/true/yes/on`` or ``0/false/no/off``; its flag takes no value."""

    name = "boolean"

    def read(self, text: str, label: str) -> bool:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f"{label}={text!r} is not a boolean (use 1/0, true/false, yes/no)")

    def show(self, value: Any) -> str:
        return "on" if value else "off"


class Items(Kind):
    """A comma-separated list (a tuple) of ``item`` values; ``A-B`` ranges expand for integers."""

    def __init__(self, item: Callable[[str], Any] = str, lower: bool = False) -> None:
        self.item = item
        self.lower = lower
        self.name = f"list of {getattr(item, '__name__', 'values')}"
        self.metavar = "A,B,..."

    def read(self, text: str, label: str) -> tuple[Any, ...]:
        return tuple(parse_list(text.lower() if self.lower else text, self.item, label))


def parse_list(text: str, kind: Callable[[str], Any] = str, label: str = "value") -> list[Any]:
    """Comma-separated list; ``A-B`` ranges are expanded when ``kind`` is ``int``.

    ``"2018-2020,2023"`` with ``kind=int`` gives ``[2018, 2019, 2020, 2023]``.
    """
    out: list[Any] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if kind is int and re.fullmatch(r"-?\d+\s*-\s*-?\d+", part) and not part.startswith("-"):
            lo_text, hi_text = (s.strip() for s in part.split("-", 1))
            lo, hi = int(lo_text), int(hi_text)
            if hi < lo:
                raise ConfigError(f"{label}: range {part!r} is empty (end before start)")
            out.extend(range(lo, hi + 1))
        else:
            out.append(_number(part, kind, f"a list of {getattr(kind, '__name__', 'values')}", label))
    return out


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def output_root(value: str) -> str:
    """Where a job writes: ``s3://`` URL for a bucket name, else the URL or local path as given.

    A bare name that is a valid S3 bucket name (``clay-v1-data``) means that
    bucket, as upstream's ``STACCHIP_BUCKET``. ``s3://`` and ``file://`` URLs
    are taken as they are, other schemes are refused; a name containing ``/``
    or starting with ``.`` or ``~`` is a local path (write ``./out`` for a
    local directory called ``out``).
    """
    text = value.strip()
    if not text:
        raise ConfigError("output location (STACCHIP_BUCKET) is empty")
    if "://" in text:
        if text.startswith("file://"):
            return text[len("file://"):] or "/"
        if not text.startswith("s3://") or len(text.rstrip("/")) <= len("s3://"):
            # storage writes only to S3 and local paths: any other URL would land in a local
            # directory named after its scheme ("gs:/bucket/...") and be lost with the container
            raise ConfigError(
                f"output location {text!r} (STACCHIP_BUCKET): only s3://bucket[/prefix], "
                "a bucket name or a local path can be written"
            )
        return text.rstrip("/")
    if "/" in text or text.startswith((".", "~")) or os.sep in text:
        return os.path.expanduser(text)
    if _BUCKET_NAME.match(text) and ".." not in text:
        return f"s3://{text}"
    raise ConfigError(
        f"output location {text!r} is neither an S3 bucket name, an s3:// URL nor a path "
        "(write ./name for a local directory)"
    )


class Location(Kind):
    """Where a job reads or writes: an S3 bucket name, ``s3://`` URL or local path
    (:func:`output_root`)."""

    name = "location"
    metavar = "LOCATION"

    def read(self, text: str, label: str) -> str:
        return output_root(text)


class IndexPath(Kind):
    """Index file(s), a directory or an ``s3://`` prefix (``~`` expanded in local paths)."""

    name = "path"
    metavar = "PATH"

    def read(self, text: str, label: str) -> str:
        return text if "://" in text else os.path.expanduser(text)


class Custom(Kind):
    """Text read by ``reader(text, label)`` (e.g. a file the setting names)."""

    def __init__(self, reader: Callable[[str, str], Any], name: str = "text") -> None:
        self.reader = reader
        self.name = name
        self.metavar = name.upper()

    def read(self, text: str, label: str) -> Any:
        return self.reader(text, label)


# --- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """An environment variable of a setting, read with ``kind`` (default: the setting's own)."""

    name: str
    kind: Kind | None = None


@dataclass(frozen=True)
class Setting:
    """One row: flag, environment variables (the first set wins), type, unit, help, and whether
    the setting is required. ``shown`` is the default as ``--help`` prints it (default: the
    field's default); ``default_for(context, values)`` computes a default from the command's
    context (a processor class) and the settings read before it; ``when(context)`` says whether
    the row exists for that context."""

    flag: str | None
    env: tuple[Env, ...]
    kind: Kind
    unit: str = ""
    help: str = ""
    required: bool = False
    shown: str | None = None
    default_for: Callable[[Any, Mapping[str, Any]], Any] | None = None
    when: Callable[[Any], bool] | None = None
    metavar: str | None = None
    #: The flag is one of the array-job flags every command shares
    #: (:func:`stacchip.processors.jobs.add_job_arguments`; its value in ``args.{name}``).
    shared: bool = False
    #: Environment variables that depend on the context (a processor class), instead of ``env``.
    env_for: Callable[[Any], Sequence[str | Env]] | None = None

    def exists(self, context: Any) -> bool:
        return self.when is None or bool(self.when(context))

    def variables(self, context: Any) -> tuple[Env, ...]:
        """The environment variables of this setting (for ``context``), first set wins."""
        if self.env_for is None:
            return self.env
        return tuple(e if isinstance(e, Env) else Env(e) for e in self.env_for(context))


def setting(
    default: Any = dataclasses.MISSING,
    *,
    flag: str | None = None,
    env: str | Env | Sequence[str | Env] = (),
    kind: Kind | None = None,
    unit: str = "",
    help: str = "",
    required: bool = False,
    shown: str | None = None,
    default_for: Callable[[Any, Mapping[str, Any]], Any] | None = None,
    when: Callable[[Any], bool] | None = None,
    metavar: str | None = None,
    shared: bool = False,
    env_for: Callable[[Any], Sequence[str | Env]] | None = None,
) -> Any:
    """A dataclass field that is a setting (see :class:`Setting`); ``default`` is its value when
    neither the flag nor a variable gives one (none: the field must be given, as a required
    setting's)."""
    names = [env] if isinstance(env, (str, Env)) else list(env)
    row = Setting(
        flag=flag, env=tuple(e if isinstance(e, Env) else Env(e) for e in names), kind=kind or Text(),
        unit=unit, help=help, required=required, shown=shown, default_for=default_for, when=when,
        metavar=metavar, shared=shared, env_for=env_for,
    )
    return dataclasses.field(default=default, metadata={"setting": row})


def rows(cls: type, context: Any = None) -> list[tuple[dataclasses.Field[Any], Setting]]:
    """``(field, setting)`` of every setting of dataclass ``cls`` that exists for ``context``."""
    out = []
    for f in dataclasses.fields(cls):
        row = f.metadata.get("setting")
        if isinstance(row, Setting) and row.exists(context):
            out.append((f, row))
    return out


def _default(f: dataclasses.Field[Any], row: Setting, context: Any, values: Mapping[str, Any]) -> Any:
    if row.default_for is not None:
        return row.default_for(context, values)
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _dest(f: dataclasses.Field[Any]) -> str:
    return f"setting_{f.name}"


def _help(f: dataclasses.Field[Any], row: Setting, context: Any) -> str:
    parts = [row.help]
    if row.unit:
        parts.append(row.unit)
    variables = row.variables(context)
    if variables:
        parts.append("env " + " or ".join(
            e.name + (f" ({e.kind.name})" if e.kind is not None and e.kind.name != row.kind.name else "")
            for e in variables
        ))
    default = row.shown
    if default is None and not row.required:
        value = _default(f, row, context, {}) if row.default_for is None or context is not None else None
        if value is not None and value != () and value != "":
            default = row.kind.show(value)
        elif value is None and not isinstance(row.kind, Bool):
            default = "none"
    if row.required:
        parts.append("required")
    elif default is not None:
        parts.append(f"default {default}")
    text = parts[0]
    if len(parts) > 1:
        text += " (" + "; ".join(parts[1:]) + ")"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type, context: Any = None) -> None:
    """Add the flag of every setting of ``cls`` (that exists for ``context``) to ``parser``."""
    for f, row in rows(cls, context):
        if row.flag is None or row.shared:
            continue
        if isinstance(row.kind, Bool):
            parser.add_argument(row.flag, dest=_dest(f), action="store_true", default=None,
                                help=_help(f, row, context))
        else:
            choices = row.kind.choices if isinstance(row.kind, Text) else None
            parser.add_argument(row.flag, dest=_dest(f), default=None, metavar=row.metavar or row.kind.metavar,
                                choices=choices, help=_help(f, row, context))


def resolve(
    cls: type[T],
    args: argparse.Namespace | None = None,
    *,
    context: Any = None,
    environ: Mapping[str, str] | None = None,
    **fixed: Any,
) -> T:
    """The settings object of ``cls``: each setting from its flag in ``args``, else the first of its
    environment variables set (in ``environ``, default ``os.environ``), else its default;
    ``fixed`` values are taken as they are. Settings with a ``default_for`` are read
    last, so their computed defaults see every other setting."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    later = [f for f in fields if getattr(f.metadata.get("setting"), "default_for", None) is not None]
    for f in [f for f in fields if f not in later] + later:  # computed defaults see the rest
        if f.name in fixed:
            values[f.name] = fixed[f.name]
            continue
        row = f.metadata.get("setting")
        if not isinstance(row, Setting) or not row.exists(context):
            continue
        given = getattr(args, f.name if row.shared else _dest(f), None) if args is not None else None
        if given is not None and given != "":
            values[f.name] = given if isinstance(row.kind, Bool) else row.kind.read(str(given), row.flag or f.name)
            continue
        variables = row.variables(context)
        source = next((e for e in variables if env.get(e.name, "") != ""), None)
        if source is not None:
            values[f.name] = (source.kind or row.kind).read(env[source.name], source.name)
            continue
        if row.required:
            names = " or ".join(
                n for n in (row.flag, "environment variable " + " or ".join(e.name for e in variables) if variables
                            else None) if n
            )
            raise ConfigError(f"missing setting: set {names}")
        values[f.name] = _default(f, row, context, values)
    return cls(**{f.name: values[f.name] for f in fields if f.name in values})


def table(cls: type, context: Any = None) -> list[dict[str, Any]]:
    """The rows of ``cls`` as dicts: ``name``, ``flag``, ``env``, ``type``, ``default``, ``unit``, ``help``."""
    out = []
    for f, row in rows(cls, context):
        default = row.shown if row.shown is not None else (
            None if row.required else _default(f, row, context, {}) if row.default_for is None or context else None
        )
        out.append({
            "name": f.name, "flag": row.flag, "env": [e.name for e in row.variables(context)], "type": row.kind.name,
            "default": default, "unit": row.unit, "help": row.help, "required": row.required,
        })
    return out


def to_json(settings: Any) -> str:
    """JSON text of a settings object (lists for tuples), for worker processes."""
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def from_json(cls: type[T], text: str) -> T:
    """The settings object of ``cls`` from :func:`to_json` text (lists become tuples)."""
    return cls(**{k: _tuples(v) for k, v in json.loads(text).items()})
