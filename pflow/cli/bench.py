"""``pflow bench``: sweep solvers x grids x steps on one model; error against NFE.

With ``--guidance W,W,...`` on a class-conditional model (``digits-cond``) the guidance
scale is one more axis: every solver and peer runs at every scale, each scale judged
against its own float64 reference (see :mod:`pflow.bench`).

``--diffusers DIR --prompt ...`` benches a local diffusers pipeline's guided UNet in latent
space instead (:mod:`pflow.cli.pipeline`)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..grids import SPACINGS
from .args import (
    UsageError,
    add_guidance_args,
    add_scale_args,
    float_list,
    int_list,
    label_list,
    name_list,
    solver_label,
)
from .pipeline import add_diffusers_args, check_flags

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..bench import BenchConfig

    b = sub.add_parser("bench", help="sweep solvers x grids x steps; error vs NFE table")
    b.set_defaults(func=_bench)
    defaults = BenchConfig()
    b.add_argument(
        "--model",
        default=None,
        help=f"bundled model name or module:factory (default {defaults.model})",
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
    b.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"number of samples (default {defaults.samples}; with --diffusers 8)",
    )
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
    add_guidance_args(b, sweep=True)
    add_diffusers_args(b)
    # What the bench does with them (the shared help speaks of commands that read data).
    helps = {
        "label": "classes of a class-conditional model, cycled over the samples (sample i "
        "gets the (i mod n)-th): 3, 0-9, 1,4,7; default with --guidance: every class in "
        "turn (0-9 for digits-cond); alone it means --guidance 1",
        "guidance": "classifier-free guidance scales swept as an axis, e.g. 1,2,4,8 "
        "(class-conditional models only; 1 is the conditional model): every solver and "
        "peer runs at each scale against that scale's own float64 reference; labels "
        "default to every class in turn (see --label)",
    }
    for action in b._actions:
        if action.dest in helps:
            action.help = helps[action.dest]


def _peers(text: str) -> list[str]:
    if text == "none":
        return []
    if text == "auto":
        return ["auto"]  # resolved by run_bench once the model is loaded
    if text == "diffusers":
        from ..integrations import diffusers_peers

        return list(diffusers_peers.PEERS)
    return [v.strip() for v in text.split(",") if v.strip()]


def _guidance(args: argparse.Namespace) -> list[float]:
    """The guidance scales to sweep: ``--guidance``, or 1 when only ``--label`` is given;
    a one-line usage error for guidance options without scales, or ``--label true``."""
    if args.label == "true":
        raise UsageError(
            "argument --label: 'true' means the data's own labels, and pflow bench reads no "
            "labelled data; give classes (3, 0-9, 1,4,7)"
        )
    if args.guidance is not None:
        return list(args.guidance)
    if args.label is not None:
        return [1.0]
    for flag, given in (
        ("--guidance-interval", args.guidance_interval is not None),
        ("--guidance-rescale", args.guidance_rescale != 0.0),
    ):
        if given:
            raise UsageError(f"argument {flag}: needs --guidance (the scales to sweep)")
    return []


def _bench(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, check_label, format_table, run_bench
    from ..distributed import init

    # Every label is checked (name, options, values) before a model is loaded.
    for label in args.solvers:
        check_label(*solver_label(label, "--solvers"), label)
    common: dict[str, Any] = dict(
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
    if check_flags(args):
        from .pipeline import bench_command

        return bench_command(args, common)
    defaults = BenchConfig()
    args.model = defaults.model if args.model is None else args.model
    if common["samples"] is None:
        args.samples = common["samples"] = defaults.samples
    guidance = _guidance(args)
    config = BenchConfig(
        model=args.model,
        **common,  # type: ignore[arg-type]
        guidance=guidance,
        labels=args.label,
        guidance_interval=args.guidance_interval,
        guidance_rescale=args.guidance_rescale,
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
        + (f"guidance {','.join(f'{w:g}' for w in guidance)}, " if guidance else "")
        + (f"{world.size} ranks, " if world.size > 1 else "")
        + f"{time.perf_counter() - t0:.1f}s"
        + (f"; written to {args.out}" if args.out else "")
    )
    return 0
