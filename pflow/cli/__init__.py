"""The ``pflow`` command line: ``bench``, ``sample``, ``nll``, ``encode``, ``decode`` and
``roundtrip``.

One module per command (:mod:`pflow.cli.bench`, :mod:`pflow.cli.sample`,
:mod:`pflow.cli.nll`, :mod:`pflow.cli.encode`), each exposing
``add_parsers(subparsers)`` that sets ``func=handler(args) -> int``; shared argument
types live in :mod:`pflow.cli.args`. Building the parser imports no solver backend
(torchdiffeq, scipy): solver labels are checked when a command runs.

Failures are one line on stderr, ``pflow <command>: error: <what, naming the argument or
file>``; ``pflow --debug <command>`` (or ``PFLOW_DEBUG=1``) prints the traceback instead.
Exit codes:

* 0: done.
* 1: the command ran and failed: the solver (``NonFiniteError``, ``MaxNFEExceeded``), a
  user's ``module:factory``, a file that cannot be read or written, out of memory, or
  any other exception (an internal error says so).
* 2: usage: the command line is wrong (argparse's own errors, an unknown solver or
  option, conflicting flags, an ``--out`` that cannot be written, checked before any
  model is loaded) or an input file named on it does not fit (a latent of another shape,
  a companion that does not belong to its latent).
* 130: interrupted (SIGINT, Ctrl-C). What each command keeps:

  - ``sample``: the samples of every finished chunk (``--batch-size``), in index order,
    are written to ``--out`` (they are the first rows of the full run); under
    ``torchrun`` nothing is written.
  - ``roundtrip``: the finished rows are printed and, with ``--out``, written.
  - ``nll``: bits/dim over the finished batches (``--batch-size``) is printed and, with
    ``--out``, written (marked incomplete).
  - ``encode``, ``decode``: one solve; nothing is written.
  - ``bench``: every finished row is already in ``bench.json``; ``--resume`` goes on.

  Outputs are written to a temporary file and renamed, so an interruption never leaves
  a half-written file.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from . import bench, encode, nll, sample
from .args import CommandError, Interrupted, UsageError, one_line

__all__ = ["main"]

_DESCRIPTION = (
    "Probability-flow ODE solvers for diffusion models: sample, benchmark, encode and "
    "decode, likelihood."
)

# Each command module exposes add_parsers(subparsers), setting func=handler(args) -> int.
_COMMAND_ADDERS = [bench.add_parsers, sample.add_parsers, nll.add_parsers, encode.add_parsers]

# What an interrupted command leaves when it does not say so itself (Interrupted).
_ON_INTERRUPT = {"bench": "finished rows are in bench.json; rerun with --resume to go on"}

_DEBUG_HELP = "print the traceback of a failure instead of one line (also PFLOW_DEBUG=1)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pflow",
        description=_DESCRIPTION,
        epilog="Exit codes: 0 done, 1 failed while running, 2 usage error, 130 interrupted.",
    )
    p.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMAND_ADDERS:
        add(sub)
    for command in sub.choices.values():  # `pflow sample --debug` works too
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
    return p


def _exit_code(exc: BaseException) -> int:
    """2 for usage errors (a bad argument, an input that does not fit), 1 otherwise."""
    if isinstance(exc, CommandError):
        return 1
    if isinstance(exc, (UsageError, ValueError, TypeError)):
        return 2
    return 1


def _message(exc: BaseException) -> str:
    from ..errors import MaxNFEExceeded, NonFiniteError

    text = one_line(exc)
    if isinstance(exc, (UsageError, CommandError)):
        return text
    if isinstance(exc, NonFiniteError):
        return f"the solve failed: {text}"
    if isinstance(exc, MaxNFEExceeded):
        return f"the solve failed: {text}"
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in type(exc).__name__:
        return f"out of memory: {text} (lower --samples or --batch-size)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, (ValueError, TypeError, OSError, RuntimeError)):
        return text
    return f"internal error: {text} (rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the exit code."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("PFLOW_DEBUG", "") not in ("", "0")
    prefix = f"pflow {args.command}"
    try:
        return int(args.func(args))
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        what = str(exc) if isinstance(exc, Interrupted) and str(exc) else None
        what = what or _ON_INTERRUPT.get(args.command, "nothing written")
        print(f"{prefix}: interrupted; {what}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            print(f"{prefix}: error: {_message(exc)}", file=sys.stderr)
        return _exit_code(exc)
