"""Shared plumbing of the batch-job console scripts.

* **Which task am I?** :func:`resolve_indices` reads the array-job index from
  ``--range A:B`` or ``--index N`` (flags win), else from the scheduler's
  environment: ``AWS_BATCH_JOB_ARRAY_INDEX`` (AWS Batch),
  ``JOB_COMPLETION_INDEX`` (Kubernetes Indexed Job) or ``SLURM_ARRAY_TASK_ID``
  (Slurm), plus an optional ``STACCHIP_INDEX_OFFSET`` so arrays larger than
  the scheduler's limit can be submitted in slices.
* **Settings** come from a flag or an environment variable (flag wins) through
  :func:`env_str`, :func:`env_int`, :func:`env_float`, :func:`env_bool`,
  :func:`env_list`; bad values raise :class:`~stacchip.errors.ConfigError`
  naming the variable.
* **Output location**: :func:`output_root` accepts an S3 bucket name (as
  upstream's ``STACCHIP_BUCKET``), any ``s3://bucket/prefix`` or a local path.
* **Running**: :func:`run_tasks` runs one function over many indices, in a
  process pool when more than one worker is asked for, with a tqdm progress
  bar; :func:`main` wraps a console script in the exit-status contract of
  :mod:`stacchip.console`: 0 done, 1 worth retrying (a task failed on storage,
  the network or a service, or part of its items failed), 2 bad input or
  configuration -- one line on stderr, the traceback with ``-v``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from tqdm import tqdm

from stacchip import console
from stacchip.console import echo
from stacchip.processors import settings
from stacchip.errors import ConfigError, StacchipError, TaskFailed  # (TaskFailed: importable here as before)

logger = logging.getLogger(__name__)

#: Environment variables that carry the array-job index, in order of precedence.
ARRAY_INDEX_VARS: tuple[str, ...] = (
    "AWS_BATCH_JOB_ARRAY_INDEX",
    "JOB_COMPLETION_INDEX",
    "SLURM_ARRAY_TASK_ID",
)
#: Added to an index read from the environment (not to ``--index``/``--range``).
INDEX_OFFSET_VAR = "STACCHIP_INDEX_OFFSET"
#: Number of worker processes for local runs over a range.
POOL_SIZE_VAR = "STACCHIP_POOL_SIZE"

#: Exit status of a run where some task failed (worth retrying).
EXIT_TASK_FAILED = console.EXIT_RETRY
#: Exit status of a configuration error (bad flag, variable or input file).
EXIT_CONFIG_ERROR = console.EXIT_INPUT

# --- settings from flags and environment ---------------------------------------


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def env_str(
    value: str | None,
    var: str | None,
    default: str | None = None,
    *,
    required: bool = False,
    flag: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """A setting from its flag ``value``, else environment variable ``var``, else ``default``.

    With ``required=True`` a missing setting raises :class:`ConfigError` naming
    both the flag and the variable.
    """
    if value is not None and value != "":
        return value
    env = _environ(environ)
    if var and env.get(var, "") != "":
        return env[var]
    if default is None and required:
        names = " or ".join(n for n in (flag, f"environment variable {var}" if var else None) if n)
        raise ConfigError(f"missing setting: set {names}")
    return default


def env_int(
    value: int | None,
    var: str | None,
    default: int | None = None,
    *,
    required: bool = False,
    flag: str | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int | None:
    """An integer setting (flag, else environment, else default), checked against
    ``minimum``/``maximum``; see :func:`env_str` (read as :class:`~stacchip.processors.settings.Integer`)."""
    if value is not None:
        return int(settings.check_bounds(value, flag or "value", minimum, maximum))
    text = env_str(None, var, None, required=required and default is None, flag=flag, environ=environ)
    if text is None:
        return default
    return settings.Integer(minimum, maximum).read(text, var or "value")


def env_float(
    value: float | None,
    var: str | None,
    default: float | None = None,
    *,
    flag: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> float | None:
    """A finite float setting (flag, else environment, else default), checked against bounds
    (read as :class:`~stacchip.processors.settings.Number`)."""
    if value is not None:
        return settings.Number(minimum, maximum).read(repr(float(value)), flag or "value")
    text = env_str(None, var, None, environ=environ)
    if text is None:
        return None if default is None else float(default)
    return settings.Number(minimum, maximum).read(text, var or "value")


def env_fraction(value: str | None, var: str, default: float | None, flag: str = "") -> float | None:
    """A 0-1 fraction from a flag ``value`` or environment variable ``var`` (flag wins), else
    ``default``; ``none``/``off`` disables it (None), ``0`` means 0; a value that looks like a
    percentage is refused, saying so. Raises :class:`ConfigError` naming the flag or variable."""
    text = env_str(value, var, None)
    if text is None:
        return default
    label = (flag or "flag") if value is not None else var
    return settings.Fraction(optional=True).read(text, label)


def env_bool(
    value: bool | None,
    var: str | None,
    default: bool = False,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """A boolean setting: flag if given, else ``1/true/yes/on`` or ``0/false/no/off`` in ``var``."""
    if value is not None:
        return bool(value)
    env = _environ(environ)
    if not var or var not in env:
        return default
    return settings.Bool().read(env[var], var)


#: Comma-separated lists (moved to :mod:`stacchip.processors.settings`).
parse_list = settings.parse_list


def env_list(
    value: str | Sequence[Any] | None,
    var: str | None,
    default: Sequence[Any] | None = None,
    *,
    kind: Callable[[str], Any] = str,
    flag: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Any] | None:
    """A comma-separated list setting (flag, else environment, else default); see :func:`parse_list`."""
    if value is not None and not isinstance(value, str):
        return list(value)
    if value:
        return parse_list(value, kind, flag or "value")
    text = env_str(None, var, None, environ=environ)
    if text is None:
        return None if default is None else list(default)
    return parse_list(text, kind, var or "value")


#: Where a job writes (moved to :mod:`stacchip.processors.settings`, which reads locations; importable here as before).
output_root = settings.output_root


# --- array-job index ---------------------------------------------------------------


def parse_range(text: str) -> range:
    """``"A:B"`` (B exclusive) or ``"A-B"`` (B inclusive) or ``"N"`` as a range of task indices."""
    spec = text.strip()
    try:
        if ":" in spec:
            lo, hi = spec.split(":", 1)
            result = range(int(lo), int(hi))
        elif re.fullmatch(r"\d+\s*-\s*\d+", spec):
            lo, hi = spec.split("-", 1)
            result = range(int(lo), int(hi) + 1)
        else:
            n = int(spec)
            result = range(n, n + 1)
    except ValueError as exc:
        raise ConfigError(f"--range {text!r} is not A:B (end exclusive)") from exc
    if result.start < 0 or len(result) == 0:
        raise ConfigError(f"--range {text!r} is empty or negative")
    return result


def env_array_index(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """``(variable, index)`` of the first array-index variable set, offset applied; else None."""
    env = _environ(environ)
    for var in ARRAY_INDEX_VARS:
        text = env.get(var, "").strip()
        if text:
            index = settings.Integer().read(text, var)
            offset = env_int(None, INDEX_OFFSET_VAR, 0, environ=env) or 0
            if index + offset < 0:
                raise ConfigError(f"{var}={text} plus {INDEX_OFFSET_VAR}={offset} is negative")
            return var, index + offset
    return None


def resolve_indices(
    index: int | None = None,
    range_spec: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[int]:
    """Task indices to run: ``--range``, else ``--index``, else the scheduler's variable.

    Raises :class:`ConfigError` when none is given.
    """
    if range_spec:
        return list(parse_range(range_spec))
    if index is not None:
        if index < 0:
            raise ConfigError(f"--index {index} must be >= 0")
        return [index]
    found = env_array_index(environ)
    if found is None:
        raise ConfigError(
            "no task index: pass --index N or --range A:B, or set one of "
            + ", ".join(ARRAY_INDEX_VARS)
        )
    logger.debug("task index %d from %s", found[1], found[0])
    return [found[1]]


def add_job_arguments(parser: argparse.ArgumentParser, workers_help: str | None = None) -> None:
    """Flags every job shares: ``--index``, ``--range``, ``--workers``, ``--dry-run``, ``-v``
    (``workers_help``: what ``--workers`` means for this command, if not processes for ``--range``)."""
    group = parser.add_argument_group("array job")
    group.add_argument(
        "--index", type=int, default=None, metavar="N",
        help="task index to run (default: AWS_BATCH_JOB_ARRAY_INDEX, JOB_COMPLETION_INDEX "
        f"or SLURM_ARRAY_TASK_ID, plus {INDEX_OFFSET_VAR})",
    )
    group.add_argument(
        "--range", dest="range_spec", default=None, metavar="A:B",
        help="run tasks A..B-1 locally over a process pool",
    )
    group.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help=f"{workers_help or 'worker processes for --range'} (env {POOL_SIZE_VAR}; default 1)",
    )
    group.add_argument(
        "--dry-run", action="store_true", default=None,
        help="print what would be picked and written; write nothing (env STACCHIP_DRY_RUN)",
    )
    group.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def resolve_workers(value: int | None, environ: Mapping[str, str] | None = None) -> int:
    """Worker processes: ``--workers``, else ``STACCHIP_POOL_SIZE``, else 1."""
    return env_int(value, POOL_SIZE_VAR, 1, flag="--workers", minimum=1, environ=environ) or 1


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr at WARNING (quiet), INFO (default) or DEBUG (``-v``)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level > logging.DEBUG:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "rasterio", "pystac_client"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


# --- running tasks -----------------------------------------------------------------------


@dataclass
class TaskOutcome:
    """What one task did: its index, whether it succeeded, its result or error text.

    A failed task also carries the exit status its error calls for (``code``,
    see :func:`stacchip.console.classify`), whether that error was foreseen
    (``expected``; False for a bug) and its formatted traceback (``trace``,
    printed with ``-v``).
    """

    index: int
    ok: bool
    result: Any = None
    error: str | None = None
    code: int = EXIT_TASK_FAILED
    expected: bool = True
    trace: str | None = None


@dataclass
class RunSummary:
    """Outcomes of a run over many task indices."""

    outcomes: list[TaskOutcome] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every task succeeded; 2 when every failure is bad input (re-running
        cannot help); else 1 (worth retrying)."""
        failed = self.failed
        if not failed:
            return console.EXIT_OK
        if all(o.code == EXIT_CONFIG_ERROR for o in failed):
            return EXIT_CONFIG_ERROR
        return EXIT_TASK_FAILED

    @property
    def failed(self) -> list[TaskOutcome]:
        """Tasks that raised."""
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        """True when every task succeeded."""
        return not self.failed


def _call(payload: tuple[Callable[[int], Any], int]) -> TaskOutcome:
    func, index = payload
    try:
        return TaskOutcome(index, True, func(index))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the others
        verdict = console.classify(exc)
        return TaskOutcome(
            index, False, result=exc.result if isinstance(exc, TaskFailed) else None,
            error=console.message(exc), code=verdict.code, expected=verdict.expected,
            trace="".join(traceback.format_exception(exc)),
        )


def run_tasks(
    func: Callable[[int], Any],
    indices: Iterable[int],
    workers: int = 1,
    desc: str = "tasks",
    fail_fast: bool = False,
) -> RunSummary:
    """Run ``func(index)`` for every index; a process pool when ``workers > 1``.

    ``func`` must be picklable (a module-level function or a
    ``functools.partial`` of one) when ``workers > 1``. A task that raises is
    recorded as failed (and logged as it happens when there are several); the
    other tasks still run (unless ``fail_fast``). A :class:`ConfigError` stops
    the run at once, since every task would hit it. The progress bar is shown
    for more than one task.
    """
    todo = list(indices)
    summary = RunSummary()
    show = len(todo) > 1

    def note(outcome: TaskOutcome) -> None:
        if show and not outcome.ok:
            logger.error("task %d failed: %s", outcome.index, outcome.error)

    if workers <= 1 or len(todo) <= 1:
        for index in tqdm(todo, desc=desc, unit="task", disable=not show):
            outcome = _call((func, index))
            note(outcome)
            summary.outcomes.append(outcome)
            if fail_fast and not outcome.ok:
                break
        return summary
    # spawn: GDAL, boto3 and thread pools in the parent are not fork-safe.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=min(workers, len(todo))) as pool:
        results = pool.imap_unordered(_call, [(func, i) for i in todo])
        for outcome in tqdm(results, total=len(todo), desc=desc, unit="task", disable=not show):
            note(outcome)
            summary.outcomes.append(outcome)
            if fail_fast and not outcome.ok:
                pool.terminate()
                break
    summary.outcomes.sort(key=lambda o: o.index)
    return summary


def report_summary(summary: RunSummary, prog: str, verbose: bool = False) -> int:
    """Print one line per failed task (its traceback first if ``verbose``); the run's exit status."""
    for outcome in summary.failed:
        if verbose and outcome.trace:
            echo(outcome.trace.rstrip("\n"), err=True)
        if outcome.expected:
            echo(f"{prog}: task {outcome.index} failed: {outcome.error}", err=True)
        else:
            hint = "" if verbose else "; run again with -v for the traceback"
            echo(f"{prog}: task {outcome.index} failed: internal error: {outcome.error} (unexpected{hint})",
                 err=True)
    return summary.exit_code


def main(
    run: Callable[[Sequence[str] | None], RunSummary | int | None],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
) -> int:
    """Console-script wrapper: the exit-status contract of :mod:`stacchip.console`.

    ``run(argv)`` parses its arguments and does the work. An error it raises
    (a :class:`ConfigError` or any other) is printed as ``{prog}: error:
    {message}`` on stderr and decides the status (2 bad input, 1 worth
    retrying); a :class:`RunSummary` with failed tasks prints one line per
    failure and exits 2 when every failure is bad input, else 1.
    """
    if prog is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "stacchip"
    verbose = console.wants_traceback(argv)

    def body() -> int:
        result = run(argv)
        if isinstance(result, RunSummary):
            return report_summary(result, str(prog), verbose)
        return 0 if result is None else int(result)

    return console.run_main(body, prog, argv)


__all__ = [
    "ARRAY_INDEX_VARS",
    "EXIT_CONFIG_ERROR",
    "EXIT_TASK_FAILED",
    "INDEX_OFFSET_VAR",
    "POOL_SIZE_VAR",
    "RunSummary",
    "StacchipError",
    "TaskFailed",
    "TaskOutcome",
    "add_job_arguments",
    "env_array_index",
    "env_bool",
    "env_float",
    "env_fraction",
    "env_int",
    "env_list",
    "env_str",
    "main",
    "output_root",
    "parse_list",
    "parse_range",
    "report_summary",
    "resolve_indices",
    "resolve_workers",
    "run_tasks",
    "setup_logging",
]
