"""The ``pflow`` command line: ``pflow bench`` (and more as the package grows)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .bench import BenchConfig, format_table, run_bench
from .grids import SPACINGS
from .solvers import available_solvers

__all__ = ["main"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _name_list(known: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or repr(text)}; known: {', '.join(known)}"
            )
        return names

    return parse


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="sweep solvers x grids x steps; error vs NFE table")
    b.set_defaults(func=_bench)
    defaults = BenchConfig()
    b.add_argument(
        "--model",
        default=defaults.model,
        help="bundled model name or module:factory (default %(default)s)",
    )
    b.add_argument(
        "--solvers",
        type=_name_list(available_solvers(), "solver"),
        default=list(defaults.solvers),
        help="comma-separated solver names",
    )
    b.add_argument(
        "--steps",
        type=_int_list,
        default=list(defaults.steps),
        help="comma-separated step counts for fixed-step solvers",
    )
    b.add_argument(
        "--spacing",
        type=_name_list(SPACINGS, "spacing"),
        default=list(defaults.spacings),
        help="comma-separated grid spacings",
    )
    b.add_argument(
        "--tols",
        type=_float_list,
        default=list(defaults.tols),
        help="comma-separated tolerances (rtol = atol) for adaptive solvers",
    )
    b.add_argument("--samples", type=int, default=defaults.samples)
    b.add_argument("--seed", type=int, default=defaults.seed)
    b.add_argument(
        "--ref-tol",
        type=float,
        default=defaults.ref_tol,
        help="tolerance of the float64 reference solve",
    )
    b.add_argument("--out", default=None, help="folder for bench.json / bench.csv")
    b.add_argument("--resume", action="store_true", help="skip rows already in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


# Each command module exposes add_parsers(subparsers), setting func=handler(args) -> int.
_COMMAND_ADDERS = [_add_bench]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMAND_ADDERS:
        add(sub)
    return p


def _bench(args: argparse.Namespace) -> int:
    config = BenchConfig(
        model=args.model,
        solvers=args.solvers,
        steps=args.steps,
        spacings=args.spacing,
        tols=args.tols,
        samples=args.samples,
        seed=args.seed,
        ref_tol=args.ref_tol,
        out=args.out,
        resume=args.resume,
        quiet=args.quiet,
    )
    t0 = time.perf_counter()
    rows = run_bench(config)
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows, {args.samples} samples, seed {args.seed}, "
        f"{time.perf_counter() - t0:.1f}s" + (f"; written to {args.out}" if args.out else "")
    )
    return 0


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
