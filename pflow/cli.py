"""The ``pflow`` command line: ``pflow bench`` (and more as the package grows)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .bench import BenchConfig, format_table, run_bench
from .cli_args import float_list, int_list
from .cli_inversion import add_parsers as _add_inversion
from .cli_likelihood import add_parsers as _add_likelihood
from .grids import SPACINGS

__all__ = ["main"]


def _solver_list(text: str) -> list[str]:
    from .bench import parse_solver

    labels = [v.strip() for v in text.split(",") if v.strip()]
    for label in labels:
        try:
            parse_solver(label)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"unknown solver in {label!r}: {exc}") from None
    if not labels:
        raise argparse.ArgumentTypeError("no solver given")
    return labels


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
        type=_solver_list,
        default=list(defaults.solvers),
        help="comma-separated solver names",
    )
    b.add_argument(
        "--steps",
        type=int_list,
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
    b.add_argument("--out", default="results/bench", help="output folder (default %(default)s)")
    b.add_argument("--resume", action="store_true", help="skip rows already in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_scale_args(b)


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="solve at most this many samples at a time (memory stays flat as samples grow)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda (under torchrun: cuda:LOCAL_RANK) or cuda:N (default %(default)s)",
    )
    p.add_argument(
        "--net-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="run the network in this dtype; the ODE state stays float32",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="draw samples with one solver; write PNG, .npy or .pt")
    s.set_defaults(func=_sample)
    s.add_argument("--model", default="digits", help="bundled model name or module:factory")
    s.add_argument("--solver", default="heun", help="a solver name, with options: ddim[eta=1]")
    s.add_argument("--steps", type=int, default=None, help="steps of a fixed-step solver")
    s.add_argument("--spacing", default="trailing", choices=SPACINGS)
    s.add_argument("--rtol", type=float, default=None, help="adaptive solvers' rtol")
    s.add_argument("--atol", type=float, default=None, help="adaptive solvers' atol")
    s.add_argument("--samples", "--n", dest="n", type=int, default=64, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output file: .png, .npy or .pt")
    _add_scale_args(s)


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from .bench import parse_solver, prepare_model, shard_options
    from .distributed import init
    from .noise import keyed_randn, noise_keys
    from .solve import sample
    from .solvers import get_solver
    from .zoo.registry import load_model

    name, options = parse_solver(args.solver)
    spec = get_solver(name)
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
        options.update(shard_options(name, world, keys, args.batch_size))
        t0 = time.perf_counter()
        res = sample(
            model,
            noise,
            name,
            steps=args.steps,
            spacing=args.spacing,
            rtol=args.rtol,
            atol=args.atol,
            last_step=bundle.last_step,  # type: ignore[arg-type]
            **options,
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
        from .plots import plot_samples

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


# Each command module exposes add_parsers(subparsers), setting func=handler(args) -> int.
_COMMAND_ADDERS = [_add_bench, _add_sample]
_COMMAND_ADDERS.append(_add_likelihood)
_COMMAND_ADDERS.append(_add_inversion)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMAND_ADDERS:
        add(sub)
    return p


def _peers(text: str, model: str) -> list[str]:
    from .integrations import diffusers_peers

    if text == "none":
        return []
    if text == "auto":
        return ["auto"]  # resolved by run_bench once the model is loaded
    if text == "diffusers":
        return list(diffusers_peers.PEERS)
    return [v.strip() for v in text.split(",") if v.strip()]


def _bench(args: argparse.Namespace) -> int:
    from .distributed import init

    config = BenchConfig(
        model=args.model,
        solvers=args.solvers,
        steps=args.steps,
        spacings=args.spacing,
        tols=args.tols,
        samples=args.samples,
        seed=args.seed,
        ref_tol=args.ref_tol,
        peers=_peers(args.peers, args.model),
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
