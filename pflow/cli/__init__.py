"""The ``pflow`` command line: ``bench``, ``sample``, ``nll``, ``encode``, ``decode`` and
``roundtrip``.

One module per command (:mod:`pflow.cli.bench`, :mod:`pflow.cli.sample`,
:mod:`pflow.cli.nll`, :mod:`pflow.cli.encode`), each exposing
``add_parsers(subparsers)`` that sets ``func=handler(args) -> int``; shared argument
types live in :mod:`pflow.cli.args`. Building the parser imports no solver backend
(torchdiffeq, scipy): solver labels are checked when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, encode, nll, sample

__all__ = ["main"]

_DESCRIPTION = (
    "Probability-flow ODE solvers for diffusion models: sample, benchmark, encode and "
    "decode, likelihood."
)

# Each command module exposes add_parsers(subparsers), setting func=handler(args) -> int.
_COMMAND_ADDERS = [bench.add_parsers, sample.add_parsers, nll.add_parsers, encode.add_parsers]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pflow", description=_DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMAND_ADDERS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError) as exc:
        print(f"pflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pflow {args.command}: interrupted; finished rows are on disk", file=sys.stderr)
        return 130
