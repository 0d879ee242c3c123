"""``pflow sample``: draw samples with one solver; write PNG, .npy or .pt.

Sample ``i`` of a run seeded ``s`` starts from the noise keyed ``(s, i)``
(:mod:`pflow.noise`), so the run can be solved in chunks of ``--batch-size`` (one after
the other, each chunk's noise drawn when it starts) without changing any sample. On
SIGINT the finished chunks are written to ``--out``: they are the first samples of the
full run, in order (exit code 130; under ``torchrun`` nothing is written).

A class-conditional model (``digits-cond``) takes ``--label`` (sample ``i`` gets the
``i``-th label of the list, cycling: labels follow the indices as the noise does) and
classifier-free guidance (``--guidance``, ``--guidance-interval``,
``--guidance-rescale``); the summary then reports the network rows per sample next to
the NFE (two rows per evaluation where guidance applies).

``--diffusers DIR`` samples a local diffusers pipeline folder instead (its UNet, prompt
encoding, guidance and VAE; :mod:`pflow.cli.pipeline`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from ..grids import SPACINGS
from .args import (
    Interrupted,
    UsageError,
    add_guidance_args,
    add_scale_args,
    available_memory,
    check_conditioning,
    check_direction,
    check_out,
    check_tolerances,
    load_bundle,
    solver_label,
    write_atomic,
)
from .pipeline import add_diffusers_args, check_flags

__all__ = ["add_parsers"]

_SUFFIXES = (".png", ".npy", ".pt")
# Copies of the state a solve holds per sample (the state, derivatives, a multistep
# history): a lower bound on its working memory; a network's activations come on top.
_STATE_COPIES = 8


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sample",
        help="draw samples with one solver; write PNG, .npy or .pt",
        description="Draw samples with one solver and write them to --out. On SIGINT "
        "(Ctrl-C) the samples of the finished --batch-size chunks are written (exit 130).",
    )
    s.set_defaults(func=_sample)
    s.add_argument(
        "--model", default=None, help="bundled model name or module:factory (default digits)"
    )
    s.add_argument(
        "--solver",
        default="heun",
        help="a solver name, with options in brackets: ddim[eta=1], rk45[rtol=1e-3]",
    )
    s.add_argument("--steps", type=int, default=None, help="steps of a fixed-step solver")
    s.add_argument(
        "--spacing",
        default=None,
        choices=SPACINGS,
        help="grid spacing (default trailing; with --diffusers, the scheduler config's)",
    )
    s.add_argument("--rtol", type=float, default=None, help="adaptive solvers' rtol")
    s.add_argument("--atol", type=float, default=None, help="adaptive solvers' atol")
    s.add_argument(
        "--max-nfe",
        type=int,
        default=None,
        help="fail when a chunk needs more network evaluations (adaptive solvers: 100000)",
    )
    s.add_argument(
        "--samples",
        "--n",
        dest="n",
        type=int,
        default=None,
        help="number of samples (default 64; with --diffusers 1)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--out",
        required=True,
        help="output file: .png, .npy or .pt (with --diffusers: one PNG per image, "
        "x_000.png, ... for several; .npy the images in [0, 1]; .pt images and latents)",
    )
    add_scale_args(s)
    add_guidance_args(s)
    add_diffusers_args(s)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"argument {flag}: expected an integer >= 1, got {value}")


def _check_memory(n: int, shard: int, chunk: int, shape: tuple[int, ...], world: Any) -> None:
    """A one-line error, before anything is allocated, when the samples (gathered on the
    CPU) and the state of one chunk cannot fit in the memory available."""
    import torch

    per_sample = math.prod(shape) * 4  # float32 state
    host = n * per_sample + (
        chunk * per_sample * _STATE_COPIES if world.device.type == "cpu" else 0
    )
    have = available_memory()
    gib = 2.0**30
    if have is not None and host > have:
        raise UsageError(
            f"argument --samples: {n} samples of shape {tuple(shape)} in float32 need at least "
            f"{host / gib:.1f} GiB of memory and {have / gib:.1f} GiB is available; draw fewer "
            "(several runs with different --seed)"
            + (
                " or solve them in chunks with --batch-size"
                if chunk == shard and n * per_sample < have
                else ""
            )
        )
    if world.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(world.device)
        need = chunk * per_sample * _STATE_COPIES
        if need > free:
            raise UsageError(
                f"argument --batch-size: a chunk of {chunk} samples of shape {tuple(shape)} "
                f"needs at least {need / gib:.1f} GiB on {world.device} and "
                f"{free / gib:.1f} GiB is free; pass a smaller --batch-size"
            )


def _write(out: Path, x: Any, title: str, label: str) -> None:
    import numpy as np
    import torch

    if out.suffix == ".png":
        from ..plots import plot_samples

        write_atomic(out, lambda p: plot_samples({label: x}, p, max_images=len(x), title=title))
    elif out.suffix == ".npy":
        write_atomic(out, lambda p: np.save(p, x.numpy()))
    else:
        write_atomic(out, lambda p: torch.save(x, p))


def _sample(args: argparse.Namespace) -> int:
    import torch

    from ..bench import check_label, last_step_for, prepare_model, shard_options
    from ..distributed import init
    from ..noise import keyed_randn, noise_keys
    from ..solve import sample

    if check_flags(args):
        from .pipeline import sample_command

        return sample_command(args)
    args.model = "digits" if args.model is None else args.model
    args.spacing = "trailing" if args.spacing is None else args.spacing
    args.n = 64 if args.n is None else args.n
    # Everything the command line decides is checked before a model is loaded.
    spec, options = solver_label(args.solver, "--solver")
    check_direction(spec, args.solver, "down", "--solver", "sample")
    tolerances = check_tolerances(
        spec, options, args.solver, "--solver", rtol=args.rtol, atol=args.atol
    )
    check_label(spec, options, args.solver, sweep_tols=False)  # noise is keyed by --seed
    _positive(args.n, "--samples")
    _positive(args.batch_size, "--batch-size")
    _positive(args.max_nfe, "--max-nfe")
    out = check_out(args.out, "--out", suffixes=_SUFFIXES)
    if args.steps is None and not spec.adaptive:
        args.steps = 10
    bundle = load_bundle(args.model)
    cond = check_conditioning(args, bundle)
    world = init(args.device)
    try:
        if args.n < world.size:
            raise UsageError(
                f"argument --samples: {args.n} samples for {world.size} ranks; give at least "
                "one per rank"
            )
        indices = world.shard(args.n)
        # Adaptive solvers on several ranks share their steps: each rank solves its shard
        # at once. Otherwise the shard is solved in chunks of --batch-size.
        together = spec.adaptive and world.size > 1
        chunk = len(indices) if together or args.batch_size is None else args.batch_size
        chunk = min(chunk, len(indices))
        _check_memory(args.n, len(indices), chunk, bundle.shape, world)
        model = prepare_model(bundle.model, world.device, args.net_dtype, args.compile)
        last_step = last_step_for(spec, bundle.last_step)
        given = f"\n{cond.describe()}" if cond.conditional else ""  # a second line
        parts: list[torch.Tensor] = []
        nfe = rows = 0
        t0 = time.perf_counter()
        try:
            for start in range(indices.start, indices.stop, chunk):
                stop = min(start + chunk, indices.stop)
                keys = noise_keys(args.seed, torch.arange(start, stop, dtype=torch.int64))
                noise = keyed_randn(keys, bundle.shape, device=world.device)
                # Labels follow the sample indices, as the noise does: a sample is the
                # same whatever --batch-size and the number of ranks.
                labels = cond.labels(torch.arange(start, stop, dtype=torch.int64))
                kw = shard_options(spec, world, keys, None)
                kw.pop("batch_size", None)  # chunked here
                # The label goes to sample() as written (it applies its options); the
                # flags add only what the user gave.
                res = sample(
                    cond.model(bundle, model, labels),
                    noise,
                    args.solver,
                    steps=args.steps,
                    spacing=args.spacing,
                    last_step=last_step,  # type: ignore[arg-type]
                    max_nfe=args.max_nfe,
                    **tolerances,
                    **kw,
                )
                parts.append(res.x.cpu())
                nfe, rows = max(nfe, res.nfe), rows + res.rows
        except KeyboardInterrupt:
            if world.size > 1:
                raise Interrupted("under torchrun nothing is written") from None
            if not parts:
                raise Interrupted("no chunk had finished; nothing written") from None
            x = torch.cat(parts)
            _write(out, x, bundle.description, f"{args.solver}, NFE {nfe}{given}")
            raise Interrupted(
                f"wrote the {len(x)} finished samples (0-{len(x) - 1}) of {args.n} to {out}"
            ) from None
        wall = world.max(time.perf_counter() - t0)
        x = world.gather(torch.cat(parts), args.n)
        nfe = int(world.max(nfe))
        every = world.gather(torch.tensor([float(rows)]), world.size)  # each rank's rows
    finally:
        world.close()
    if x is None:
        return 0
    _write(out, x, bundle.description, f"{args.solver}, NFE {nfe}{given}")
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    what = ""
    if cond.conditional:
        # NFE counts evaluations of the ODE's right-hand side; a guided one runs the
        # network on two rows per sample (one outside --guidance-interval).
        per_sample = float(every.sum()) / args.n if every is not None else float("nan")
        what = f", {cond.describe()}"
        nfe_text = f"NFE {nfe} ({per_sample:.4g} network rows per sample)"
    else:
        nfe_text = f"NFE {nfe}"
    print(
        f"{args.n} samples from {bundle.name} with {args.solver}{ranks}{what}: {nfe_text}, "
        f"{wall:.2f}s; written to {out}"
    )
    return 0
