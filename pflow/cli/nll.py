"""``pflow nll``: bits/dim of held-out data through the probability-flow ODE.

The samples are solved in batches of ``--batch-size``; on SIGINT the bits/dim over the
finished batches is printed (and written to ``--out``, marked incomplete), exit 130.

A class-conditional model (``digits-cond``) takes ``--label``: ``true`` evaluates each
sample under its own label (``log p(x | y)``), classes (``3``, ``0-9``) under those; the
result is then also reported per class of the data. Guidance other than 1 is allowed
and said so: the guided field is not the score of the conditional model, and the
"likelihood" is then that of the guided ODE's flow.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..likelihood import Divergence, bits_per_dim, log_likelihood
from ..zoo.registry import BundledModel
from .args import (
    Interrupted,
    UsageError,
    add_guidance_args,
    check_conditioning,
    check_out,
    load_bundle,
    positive_int,
    write_atomic,
)

__all__ = ["add_parsers"]


@dataclass(frozen=True)
class _Dataset:
    """Held-out data for a bundled model: ``load(split) -> (N, *shape)`` in the model's
    data scale, the width of one quantisation bin there (``None``: continuous), and
    ``labels(split) -> (N,)`` int64 class labels when the data has them."""

    load: Callable[[str], Tensor]
    bin_width: float | None
    labels: Callable[[str], Tensor] | None = None


def _digits(split: str) -> Tensor:
    from ..zoo.data import digits_data

    return digits_data(split)


def _digit_labels(split: str) -> Tensor:
    from ..zoo.data import digits_labels

    return digits_labels(split)


# Digits: 17 grey levels 0..16 mapped to pixel / 8 - 1, so one bin is 2 / 16 wide.
_DIGITS = _Dataset(_digits, 2.0 / 16.0, _digit_labels)
_DATASETS: dict[str, _Dataset] = {"digits": _DIGITS, "digits-cond": _DIGITS}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nll",
        help="log-likelihood (bits/dim) of held-out data through the PF-ODE",
        description="Integrate the PF-ODE and its divergence from the data up to sigma_max "
        "and report mean bits/dim with its standard error over the samples, and the cost.",
    )
    p.set_defaults(func=_nll)
    p.add_argument(
        "--model",
        default="digits",
        help="bundled model name or module:factory (default %(default)s)",
    )
    p.add_argument("--data", default="test", help="data split (default %(default)s)")
    p.add_argument("--n", type=positive_int, default=256, help="number of samples")
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per solve")
    p.add_argument(
        "--hutchinson", action="store_true", help="Hutchinson trace estimate (default: exact)"
    )
    p.add_argument(
        "--probes", type=positive_int, default=None, help="Hutchinson probes (default 1)"
    )
    p.add_argument(
        "--noise",
        choices=("rademacher", "gaussian"),
        default=None,
        help="Hutchinson probe distribution (default rademacher)",
    )
    # log_likelihood carries the divergence through these embedded Runge-Kutta pairs
    # (pflow.likelihood); a fixed list of plain names, no backend is imported for it.
    p.add_argument("--solver", choices=("rk45", "bosh3"), default="rk45")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0, help="seeds data draws, dequantisation, probes")
    p.add_argument(
        "--no-dequantize",
        action="store_true",
        help="evaluate the density at the grid levels instead of uniformly dequantised data",
    )
    p.add_argument(
        "--out",
        default=None,
        help="also write the result to this .json file (summary and per-sample bits/dim)",
    )
    add_guidance_args(p)


def _load_data(
    bundled: BundledModel, split: str, n: int, seed: int
) -> tuple[Tensor, str, Tensor | None]:
    """``n`` samples of ``split``, what they are, and their labels (``None``: none)."""
    if bundled.exact is not None:
        g = torch.Generator().manual_seed(seed)
        return bundled.exact.sample(n, generator=g), "exact samples", None
    dataset = _DATASETS.get(bundled.name)
    if dataset is None:
        raise UsageError(
            f"argument --model: no held-out data known for model {bundled.name!r} (known: "
            f"{', '.join(_DATASETS)} and models with an exact distribution)"
        )
    x = dataset.load(split)
    if n > len(x):
        raise UsageError(f"argument --n: {n} exceeds the {len(x)} samples of split {split!r}")
    labels = dataset.labels(split)[:n] if dataset.labels is not None else None
    return x[:n], f"split {split!r}", labels


def _per_class(bpd: Tensor, labels: Tensor) -> dict[int, tuple[int, float, float]]:
    """``{class: (samples, mean bits/dim, standard error)}`` over the data's classes."""
    out: dict[int, tuple[int, float, float]] = {}
    for c in sorted({int(v) for v in labels}):
        v = bpd[labels == c]
        se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        out[c] = (len(v), float(v.mean()), se)
    return out


def _nll(args: argparse.Namespace) -> int:
    if not args.hutchinson:
        given = [f for f, v in (("--probes", args.probes), ("--noise", args.noise)) if v]
        if given:
            raise UsageError(
                f"argument {given[0]}: applies to the Hutchinson estimate; add --hutchinson "
                "(the default divergence is exact)"
            )
    probes, noise = args.probes or 1, args.noise or "rademacher"
    out = check_out(args.out, "--out", suffixes=(".json",)) if args.out else None
    bundled = load_bundle(args.model)
    cond = check_conditioning(args, bundled, data_labels=True)
    x, source, data_labels = _load_data(bundled, args.data, args.n, args.seed)
    if cond.spec == "true" and data_labels is None:
        raise UsageError(
            f"argument --label: 'true' means the data's own labels, and the {source} of "
            f"model {bundled.name!r} have none; give classes (3, 0-9, 1,4,7)"
        )
    dataset = _DATASETS.get(bundled.name) if bundled.exact is None else None
    bin_width = dataset.bin_width if dataset is not None else None
    dequantize = bin_width is not None and not args.no_dequantize
    divergence: Divergence = "hutchinson" if args.hutchinson else "exact"
    how = (
        f"hutchinson ({probes} {noise} probe{'s' if probes > 1 else ''})"
        if args.hutchinson
        else "exact divergence"
    )
    print(
        f"pflow nll: model {bundled.name}, {source}, {len(x)} samples"
        + (f", dequantised (bin width {bin_width:g})" if dequantize else "")
        + f"; {how}; {args.solver} rtol={args.rtol:g} atol={args.atol:g}"
    )
    if cond.conditional:
        print(
            f"conditioned on {cond.describe()}"
            + (
                ": the conditional model's log p(x | y)"
                if not cond.guided
                else ": not the conditional model's likelihood, the density of the guided "
                "ODE's flow"
            )
        )
    t0 = time.perf_counter()
    log_p, nfe, n_vjp, batches = [], 0, 0, 0
    sigma_min = 0.0
    try:
        for start in range(0, len(x), args.batch_size):
            stop = min(start + args.batch_size, len(x))
            labels = cond.labels(torch.arange(start, stop), data_labels)
            res = log_likelihood(
                cond.model(bundled, bundled.model, labels),
                x[start:stop],
                solver=args.solver,
                rtol=args.rtol,
                atol=args.atol,
                divergence=divergence,
                probes=probes,
                noise=noise,
                seed=args.seed + start,
                dequantize=dequantize,
                bin_width=bin_width,
            )
            log_p.append(res.log_p)
            nfe, n_vjp, batches = nfe + res.nfe, n_vjp + res.n_vjp, batches + 1
            sigma_min = res.sigma_min
    except KeyboardInterrupt:
        if not log_p:
            raise Interrupted("no batch had finished; nothing reported") from None
        done = sum(len(v) for v in log_p)
        print(f"interrupted: {done} of {len(x)} samples in {batches} finished batches")
    lp = torch.cat(log_p)
    complete = len(lp) == len(x)
    dims = x[0].numel()
    bpd = bits_per_dim(lp, dims, bin_width)
    se = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    print(
        f"bits/dim: {float(bpd.mean()):.4f} +- {se:.4f} (standard error over {len(bpd)} "
        f"samples; sigma_min={sigma_min:.4g}, D={dims})"
    )
    print(
        f"NFE: {nfe} forward passes + {n_vjp} vector-Jacobian products in {batches} "
        f"batch{'es' if batches > 1 else ''} ({nfe / batches:.0f} forward per batch), "
        f"{time.perf_counter() - t0:.1f}s"
    )
    per_class = None
    if cond.conditional and data_labels is not None:
        per_class = _per_class(bpd, data_labels[: len(bpd)])
        print(_format_per_class(per_class, cond.spec == "true"))
    exact_bpd = None
    if bundled.exact is not None:
        exact = bundled.exact.log_prob(x[: len(lp)], sigma_min)
        exact_bpd = float(bits_per_dim(exact, dims).mean())
        print(
            f"exact log p at sigma_min: {exact_bpd:.4f} bits/dim; "
            f"mean |ODE - exact| = {float((lp - exact).abs().mean()):.2e} nats "
            "(includes the Gaussian prior's mismatch)"
        )
    if out is not None:
        record: dict[str, Any] = {
            "model": bundled.name,
            "data": source,
            "samples": len(x),
            "complete": complete,
            "divergence": divergence,
            "probes": probes if args.hutchinson else None,
            "noise": noise if args.hutchinson else None,
            "solver": args.solver,
            "rtol": args.rtol,
            "atol": args.atol,
            "seed": args.seed,
            "dequantized": dequantize,
            "bin_width": bin_width,
            "sigma_min": sigma_min,
            "dims": dims,
            "bits_per_dim": float(bpd.mean()),
            "stderr": se if se == se else None,
            "exact_bits_per_dim": exact_bpd,
            "nfe": nfe,
            "n_vjp": n_vjp,
            "per_sample_bits_per_dim": [float(v) for v in bpd],
            **cond.record(),
            "per_class": None
            if per_class is None
            else {
                str(c): {"samples": k, "bits_per_dim": m, "stderr": se if se == se else None}
                for c, (k, m, se) in per_class.items()
            },
        }
        write_atomic(out, lambda p: Path(p).write_text(json.dumps(record, indent=1)))
        print(f"written to {out}")
    if not complete:
        raise Interrupted(
            f"reported the {len(lp)} finished samples of {len(x)}"
            + (f"; written to {out}" if out is not None else "")
        )
    return 0


def _format_per_class(per_class: dict[int, tuple[int, float, float]], own: bool) -> str:
    """The per-class table: one line per class of the data."""
    head = (
        "per class of the data (each under its own label):"
        if own
        else "per class of the data (under the labels given):"
    )
    lines = [head, f"  {'class':>5} {'samples':>7} {'bits/dim':>9} {'+- se':>8}"]
    for c, (k, m, se) in per_class.items():
        lines.append(f"  {c:>5} {k:>7} {m:>9.4f} {se:>8.4f}")
    return "\n".join(lines)
