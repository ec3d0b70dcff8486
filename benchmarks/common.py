"""Shared plumbing of the benchmark scripts: every case runs in a fresh process
(``python -m benchmarks.X --worker NAME --args JSON``) that prints its result as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Mapping, Sequence


def parse_with_worker(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the hidden ``--worker``/``--args`` flags of a worker process added."""
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def serve_worker(workers: Mapping[str, Callable[..., Any]], args: argparse.Namespace) -> int:
    """Run the worker ``args.worker`` names with its JSON arguments; print its result as JSON."""
    print(json.dumps(workers[args.worker](**json.loads(args.args))))
    return 0
