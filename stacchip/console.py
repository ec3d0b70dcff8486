"""What every stacchip console command shares: output lines and the exit-status contract.

Every console script (``stacchip`` and its subcommands, the six source
processors, ``stacchip-prechip``, ``stacchip-stats``) ends through
:func:`run_main`, so they all keep one contract:

=====  ==========================================================================
``0``  done
``1``  a failure worth retrying: storage, network, a service
       (:class:`~stacchip.errors.StorageError`, :class:`~stacchip.errors.AssetReadError`,
       :class:`~stacchip.errors.ServiceError`, connection errors and timeouts, HTTP 5xx/429),
       a task that failed part of its work -- and any unexpected error (a bug)
``2``  bad input or configuration: :class:`~stacchip.errors.ConfigError`,
       :class:`~stacchip.errors.ItemError`, :class:`~stacchip.errors.IndexFileError`,
       :class:`~stacchip.errors.ProjectionError`, any other
       :class:`~stacchip.errors.StacchipError`, a missing file, HTTP 4xx, a bad flag
``130`` interrupted (Ctrl-C)
=====  ==========================================================================

An error is reported as one line on stderr, ``{prog}: error: {message}``, the
message naming the file, item, asset, variable or flag; no traceback unless
``-v``/``--verbose`` is given (or ``STACCHIP_TRACEBACK=1`` is set, for batch
jobs whose command line is fixed). An unexpected error says so on its line,
``{prog}: internal error: {type}: {message}``, with a hint to re-run with ``-v``.

The status of an error comes from the innermost exception of its chain
(``raise ... from ...``) that decides one: an ``IndexFileError`` raised because
the S3 listing behind it could not connect is a retryable failure (1), the same
error over a missing file is bad input (2). :class:`~stacchip.errors.StacchipError`
subclasses state their status in ``exit_code``.

This module imports nothing heavy: the command-line entry points load it
before they know which subcommand runs. Library code logs; only commands echo.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import traceback
import urllib.error
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from stacchip.errors import EXIT_INPUT, EXIT_RETRY, StacchipError

#: Exit status of a command that did what it was asked.
EXIT_OK = 0
#: Exit status after Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
#: Environment variable that turns tracebacks on without ``-v``.
TRACEBACK_VAR = "STACCHIP_TRACEBACK"
#: Largest ``--chip-size`` any command accepts, pixels (the index stores chip sizes
#: and chip positions as uint16).
MAX_CHIP_SIZE = 65535

__all__ = [
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RETRY",
    "MAX_CHIP_SIZE",
    "TRACEBACK_VAR",
    "ArgumentParser",
    "Verdict",
    "classify",
    "echo",
    "message",
    "report",
    "run_main",
    "wants_traceback",
]


def echo(message: str = "", *, err: bool = False) -> None:
    """Write one line of command output: results to stdout, errors to stderr.

    Every stacchip console command writes through this; library code logs.
    """
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (exit status 2).

    ``{prog}: error: {message} (see {prog} --help)``: the message names the flag.
    Subparsers made from it are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


# --- classifying errors -------------------------------------------------------------------

#: Exceptions about a path the user gave (not worth retrying).
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
#: Network failures (worth retrying).
_NETWORK_ERRORS = (ConnectionError, TimeoutError, socket.gaierror, socket.herror)
#: botocore / requests errors that mean the configuration is wrong (credentials, region,
#: parameters, URL); their other errors are network failures.
_BOTO_CONFIG_ERRORS = {
    "NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError",
    "ProfileNotFound", "UnknownServiceError", "InvalidS3AddressingStyleError", "InvalidConfigError",
    "UnknownCredentialError", "InvalidRegionError",
    "MissingSchema", "InvalidSchema", "InvalidURL", "InvalidHeader", "LocationParseError",
}
#: HTTP statuses worth retrying.
_RETRY_STATUS = {408, 425, 429}


@dataclass(frozen=True)
class Verdict:
    """How a command ends on an error: its exit status and whether the error was foreseen."""

    code: int
    expected: bool = True


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from, outermost first (as a traceback prints them)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in out) and len(out) < 32:
        out.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return out


def _http_status(exc: BaseException) -> int | None:
    """HTTP status an exception carries (urllib, botocore, requests, pystac-client), if any."""
    if isinstance(exc, urllib.error.HTTPError):
        return int(exc.code)
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    status = getattr(response, "status_code", None) if response is not None else None
    if status is None:
        status = getattr(exc, "status_code", None)  # pystac_client APIError
    try:
        return int(status) if status is not None else None
    except (TypeError, ValueError):
        return None


def _verdict(exc: BaseException) -> int | None:
    """The exit status one exception decides, or None when it decides nothing."""
    if isinstance(exc, StacchipError):
        return int(getattr(exc, "exit_code", EXIT_INPUT))
    status = _http_status(exc)
    if status is not None and 400 <= status < 600:
        return EXIT_RETRY if status >= 500 or status in _RETRY_STATUS else EXIT_INPUT
    if isinstance(exc, _PATH_ERRORS):
        return EXIT_INPUT
    if isinstance(exc, (*_NETWORK_ERRORS, urllib.error.URLError)):
        return EXIT_RETRY
    kind = type(exc)
    if kind.__module__.split(".")[0] in ("botocore", "boto3", "s3transfer", "urllib3", "requests"):
        return EXIT_INPUT if kind.__name__ in _BOTO_CONFIG_ERRORS else EXIT_RETRY
    return None


def classify(exc: BaseException) -> Verdict:
    """Exit status of a command stopped by ``exc`` (see the module docstring).

    The innermost exception of the chain that decides a status wins; a chain
    where none does is an unexpected error (status 1, ``expected=False``).
    """
    if isinstance(exc, KeyboardInterrupt):
        return Verdict(EXIT_INTERRUPTED)
    for link in reversed(_chain(exc)):
        code = _verdict(link)
        if code is not None:
            return Verdict(code)
    return Verdict(EXIT_RETRY, expected=False)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def message(exc: BaseException) -> str:
    """One-line text of ``exc``: its message (stacchip errors), else ``Type: message``."""
    text = _one_line(str(exc))
    if isinstance(exc, StacchipError) and text:
        return text
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def wants_traceback(argv: Sequence[str] | None = None) -> bool:
    """True when ``-v``/``--verbose`` is among ``argv`` (default ``sys.argv``) or
    ``STACCHIP_TRACEBACK`` is set to a true value."""
    if os.environ.get(TRACEBACK_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    for token in sys.argv[1:] if argv is None else argv:
        if token == "--":
            break
        if token == "--verbose" or re.fullmatch(r"-v+", str(token)):
            return True
    return False


def report(exc: BaseException, prog: str, verbose: bool = False) -> int:
    """Print ``exc`` as the one error line of ``prog`` (the traceback first if ``verbose``);
    returns the exit status."""
    verdict = classify(exc)
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    if verdict.expected:
        echo(f"{prog}: error: {message(exc)}", err=True)
    else:
        hint = "" if verbose else "; run again with -v for the traceback"
        echo(f"{prog}: internal error: {message(exc)} (unexpected{hint})", err=True)
    return verdict.code


def _system_exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    echo(_one_line(str(code)), err=True)
    return EXIT_RETRY


def run_main(body: Callable[[], int | None], prog: str, argv: Sequence[str] | None = None) -> int:
    """Run a command's ``body`` and return its exit status under the contract above.

    ``body()`` returns the status (None means 0) or raises; ``argv`` (default
    ``sys.argv[1:]``) is only looked at for ``-v``/``--verbose``, so a traceback
    can be shown even for errors raised while the flags are parsed.
    """
    verbose = wants_traceback(argv)
    try:
        result = body()
    except KeyboardInterrupt:
        echo(f"{prog}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return _system_exit_status(exc)
    except Exception as exc:  # noqa: BLE001 - every error ends as one line and a status
        return report(exc, prog, verbose)
    return EXIT_OK if result is None else int(result)
