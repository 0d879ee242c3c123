"""``pflow bench``: sweep solvers x grids x steps on one model; error against NFE."""

from __future__ import annotations

import argparse
import time

from ..grids import SPACINGS
from .args import add_scale_args, float_list, int_list, label_list, name_list, solver_label

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..bench import BenchConfig

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
        type=label_list,
        default=list(defaults.solvers),
        help="comma-separated solver labels, with options in brackets: "
        "'unipc[order=3,corrector=false],ddim[eta=1]'",
    )
    b.add_argument(
        "--steps",
        type=int_list,
        default=list(defaults.steps),
        help="comma-separated step counts for fixed-step solvers",
    )
    b.add_argument(
        "--spacing",
        type=name_list(SPACINGS, "spacing"),
        default=list(defaults.spacings),
        help="comma-separated grid spacings",
    )
    b.add_argument(
        "--tols",
        type=float_list,
        default=list(defaults.tols),
        help="comma-separated tolerances (rtol = atol) for adaptive solvers",
    )
    b.add_argument("--samples", type=int, default=defaults.samples)
    b.add_argument("--seed", type=int, default=defaults.seed)
    b.add_argument(
        "--ref-tol",
        type=float,
        default=None,
        help="tolerance of the float64 reference solve (default: the model's)",
    )
    b.add_argument(
        "--peers",
        default="auto",
        help="diffusers schedulers run on the same network and noise: comma-separated names "
        "(ddim, euler, heun, dpmpp_2m, dpmpp_3m_karras, unipc, lms), 'diffusers' for all, "
        "'none', or 'auto' (all when diffusers is installed and the model is an "
        "eps-prediction network; default)",
    )
    b.add_argument("--grid-nfe", type=int, default=10, help="NFE of the samples.png panels")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    b.add_argument(
        "--out",
        default="results/bench",
        help="output folder (default %(default)s); one run at a time: a second bench into "
        "the same folder exits at once with an error naming the running one's pid",
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="reuse the rows of --out/bench.json made with the same key (model content, "
        "samples, seed, grid, solver options, tolerance, reference, dtypes, pflow version); "
        "says on stderr how many were reused and why the others were recomputed; earlier "
        "rows of other settings stay in the files, marked kept",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scale_args(b)


def _peers(text: str) -> list[str]:
    if text == "none":
        return []
    if text == "auto":
        return ["auto"]  # resolved by run_bench once the model is loaded
    if text == "diffusers":
        from ..integrations import diffusers_peers

        return list(diffusers_peers.PEERS)
    return [v.strip() for v in text.split(",") if v.strip()]


def _bench(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, check_label, format_table, run_bench
    from ..distributed import init

    # Every label is checked (name, options, values) before a model is loaded.
    for label in args.solvers:
        check_label(*solver_label(label, "--solvers"), label)
    config = BenchConfig(
        model=args.model,
        solvers=args.solvers,
        steps=args.steps,
        spacings=args.spacing,
        tols=args.tols,
        samples=args.samples,
        seed=args.seed,
        ref_tol=args.ref_tol,
        peers=_peers(args.peers),
        plots=not args.no_plots,
        grid_nfe=args.grid_nfe,
        out=args.out,
        resume=args.resume,
        quiet=args.quiet,
        batch_size=args.batch_size,
        device=args.device,
        net_dtype=args.net_dtype,
        compile=args.compile,
    )
    t0 = time.perf_counter()
    world = init(args.device)
    try:
        rows = run_bench(config, world)
    finally:
        world.close()
    if not world.is_main:
        return 0
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows, {args.samples} samples, seed {args.seed}, "
        + (f"{world.size} ranks, " if world.size > 1 else "")
        + f"{time.perf_counter() - t0:.1f}s"
        + (f"; written to {args.out}" if args.out else "")
    )
    return 0
