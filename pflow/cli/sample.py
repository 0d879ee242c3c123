"""``pflow sample``: draw samples with one solver; write PNG, .npy or .pt."""

from __future__ import annotations

import argparse
import time

from ..grids import SPACINGS
from .args import add_scale_args, check_direction, check_tolerances, solver_label

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="draw samples with one solver; write PNG, .npy or .pt")
    s.set_defaults(func=_sample)
    s.add_argument("--model", default="digits", help="bundled model name or module:factory")
    s.add_argument(
        "--solver",
        default="heun",
        help="a solver name, with options in brackets: ddim[eta=1], rk45[rtol=1e-3]",
    )
    s.add_argument("--steps", type=int, default=None, help="steps of a fixed-step solver")
    s.add_argument("--spacing", default="trailing", choices=SPACINGS)
    s.add_argument("--rtol", type=float, default=None, help="adaptive solvers' rtol")
    s.add_argument("--atol", type=float, default=None, help="adaptive solvers' atol")
    s.add_argument("--samples", "--n", dest="n", type=int, default=64, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output file: .png, .npy or .pt")
    add_scale_args(s)


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from ..bench import check_label, last_step_for, prepare_model, shard_options
    from ..distributed import init
    from ..noise import keyed_randn, noise_keys
    from ..solve import sample
    from ..zoo.registry import load_model

    spec, options = solver_label(args.solver, "--solver")
    check_direction(spec, args.solver, "down", "--solver", "sample")
    tolerances = check_tolerances(
        spec, options, args.solver, "--solver", rtol=args.rtol, atol=args.atol
    )
    check_label(spec, options, args.solver, sweep_tols=False)  # noise is keyed by --seed
    if args.n < 1:
        raise ValueError(f"--samples must be >= 1, got {args.n}")
    out = Path(args.out)
    if out.suffix not in (".png", ".npy", ".pt"):
        raise ValueError(f"--out must end in .png, .npy or .pt, got {out.name!r}")
    bundle = load_model(args.model)
    if args.steps is None and not spec.adaptive:
        args.steps = 10
    world = init(args.device)
    try:
        if args.n < world.size:
            raise ValueError(f"--samples ({args.n}) must be at least the number of ranks")
        indices = world.shard(args.n)
        keys = noise_keys(args.seed, indices)
        noise = keyed_randn(keys, bundle.shape, device=world.device)
        model = prepare_model(bundle.model, world.device, args.net_dtype, args.compile)
        t0 = time.perf_counter()
        # The label goes to sample() as written (it applies its options); the flags add
        # only what the user gave.
        res = sample(
            model,
            noise,
            args.solver,
            steps=args.steps,
            spacing=args.spacing,
            last_step=last_step_for(spec, bundle.last_step),  # type: ignore[arg-type]
            **tolerances,
            **shard_options(spec, world, keys, args.batch_size),
        )
        wall = world.max(time.perf_counter() - t0)
        x = world.gather(res.x, args.n)
        nfe = int(world.max(res.nfe))
    finally:
        world.close()
    if x is None:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from ..plots import plot_samples

        plot_samples(
            {f"{args.solver}, NFE {nfe}": x},
            out,
            max_images=args.n,
            title=bundle.description,
        )
    elif out.suffix == ".npy":
        np.save(out, x.numpy())
    else:
        torch.save(x, out)
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    print(
        f"{args.n} samples from {bundle.name} with {args.solver}{ranks}: NFE {nfe}, "
        f"{wall:.2f}s; written to {out}"
    )
    return 0
