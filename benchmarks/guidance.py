"""Classifier-free guidance on the bundled class-conditional digits UNet: what guidance
does to the samples, and what it does to inversion.

Two measurements, both on CPU in float32 with keyed noise (:func:`pflow.noise_keys`):

``accuracy``
    For each label 0-9 and guidance scale ``w``, ``--samples`` samples of
    ``pflow sample --model digits-cond --label L --guidance w`` (the same solver and grid
    for every ``w``), classified by the bundled digits classifier. Reports the label
    accuracy, the mean classifier confidence in the label, and the per-pixel standard
    deviation of the samples of one label (diversity, which guidance trades away).

``roundtrip``
    Round trips ``decode(encode(x0))`` of held-out test digits, each guided towards its
    own label, for ``euler`` (DDIM both ways), ``ddim_inverse`` + ``euler``, ``heun``,
    ``dpm_solver_2`` and ``alf`` at 10/20/50 steps (trailing grid from ``sigma_min``, as
    ``pflow roundtrip`` does), against the guidance scale. RMSE, with the round trip's NFE.

    python benchmarks/guidance.py accuracy --out benchmarks/results/guidance
    python benchmarks/guidance.py roundtrip --out benchmarks/results/guidance
    python benchmarks/guidance.py difficulty --out benchmarks/results/guidance

Each writes a JSON file and prints a Markdown table (the ones in docs/guidance.md and
docs/inversion.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import pflow
from pflow.zoo.data import digits_data, digits_labels
from pflow.zoo.networks_load import load_digits_classifier
from pflow.zoo.registry import load_model

ROUNDTRIP_SOLVERS = ("euler", "ddim_inverse", "heun", "dpm_solver_2", "alf")
DECODER = {"ddim_inverse": "euler"}


def _fmt(v: float) -> str:
    return "0" if v == 0 else f"{v:.1e}"


def accuracy(args: argparse.Namespace) -> dict:
    bundle = load_model("digits-cond")
    clf = load_digits_classifier()
    rows = []
    for w in args.guidance:
        per_label = []
        t0 = time.perf_counter()
        for label in range(10):
            keys = pflow.noise_keys(args.seed + label, torch.arange(args.samples))
            noise = pflow.keyed_randn(keys, bundle.shape)
            model = bundle.conditioned(torch.tensor([label]), w)
            res = pflow.sample(model, noise, args.solver, steps=args.steps)
            with torch.no_grad():
                prob = clf(res.x.clamp(-1, 1)).softmax(-1)
            per_label.append(
                {
                    "label": label,
                    "accuracy": float((prob.argmax(-1) == label).float().mean()),
                    "confidence": float(prob[:, label].mean()),
                    "pixel_std": float(res.x.clamp(-1, 1).std(0).mean()),
                    "nfe": res.nfe,
                    "rows_per_sample": res.rows / args.samples,
                }
            )
        rows.append(
            {
                "guidance": w,
                "labels": per_label,
                "accuracy": sum(r["accuracy"] for r in per_label) / 10,
                "accuracy_label3": per_label[3]["accuracy"],
                "confidence": sum(r["confidence"] for r in per_label) / 10,
                "pixel_std": sum(r["pixel_std"] for r in per_label) / 10,
                "nfe": per_label[0]["nfe"],
                "rows_per_sample": per_label[0]["rows_per_sample"],
                "seconds": time.perf_counter() - t0,
            }
        )
        r = rows[-1]
        print(
            f"w={w:g}: label-3 accuracy {r['accuracy_label3']:.3f}, all labels "
            f"{r['accuracy']:.3f}, confidence {r['confidence']:.3f}, pixel std "
            f"{r['pixel_std']:.3f}, NFE {r['nfe']}, rows/sample {r['rows_per_sample']:g} "
            f"({r['seconds']:.0f}s)",
            flush=True,
        )
    print()
    print(
        "| guidance w | label 3 accuracy | accuracy, labels 0-9 | confidence in the label "
        "| pixel std (diversity) | NFE | network rows per sample |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['guidance']:g} | {r['accuracy_label3']:.3f} | {r['accuracy']:.3f} | "
            f"{r['confidence']:.3f} | {r['pixel_std']:.3f} | {r['nfe']} | "
            f"{r['rows_per_sample']:g} |"
        )
    return {
        "command": "accuracy",
        "solver": args.solver,
        "steps": args.steps,
        "samples_per_label": args.samples,
        "seed": args.seed,
        "rows": rows,
    }


def roundtrip(args: argparse.Namespace) -> dict:
    bundle = load_model("digits-cond")
    x0 = digits_data("test")[: args.samples]
    labels = digits_labels("test")[: args.samples]
    rows = []
    for w in args.guidance:
        model = bundle.conditioned(labels, w)
        for solver in ROUNDTRIP_SOLVERS:
            for steps in args.steps_list:
                t0 = time.perf_counter()
                enc = pflow.encode(model, x0, solver, steps=steps)
                dec = pflow.decode(
                    model, enc.x, DECODER.get(solver, solver), steps=steps, companion=enc.companion
                )
                err = dec.x - x0
                rmse = float(err.pow(2).mean().sqrt())
                rows.append(
                    {
                        "guidance": w,
                        "solver": solver,
                        "steps": steps,
                        "rmse": rmse,
                        "max_abs": float(err.abs().max()),
                        "psnr": math.inf if rmse == 0 else 20 * math.log10(2.0 / rmse),
                        "nfe": enc.nfe + dec.nfe,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(
                    f"w={w:g} {solver:>12} {steps:>3} steps: RMSE {_fmt(rmse)} "
                    f"[{enc.nfe + dec.nfe} NFE]",
                    flush=True,
                )
    print()
    steps_head = " | ".join(f"{s} steps" for s in args.steps_list)
    print(f"| solver | w | {steps_head} |")
    print("| --- | --- |" + " --- |" * len(args.steps_list))
    for solver in ROUNDTRIP_SOLVERS:
        name = "`ddim_inverse` + `euler`" if solver == "ddim_inverse" else f"`{solver}`"
        if solver == "euler":
            name = "`euler` (DDIM both ways)"
        for w in args.guidance:
            cells = []
            for steps in args.steps_list:
                r = next(
                    r
                    for r in rows
                    if r["guidance"] == w and r["solver"] == solver and r["steps"] == steps
                )
                cells.append(f"{_fmt(r['rmse'])} [{r['nfe']}]")
            print(f"| {name} | {w:g} | " + " | ".join(cells) + " |")
    return {
        "command": "roundtrip",
        "samples": args.samples,
        "spacing": "trailing",
        "rows": rows,
    }


def _jacobian_norm(model: object, x_t: torch.Tensor, sigma: float, iters: int = 20) -> torch.Tensor:
    """Per-sample spectral norm of ``d eps / d x_t`` at ``(x_t, sigma)`` by power iteration
    on ``J^T J`` (one forward and one backward pass an iteration)."""
    v = torch.randn_like(x_t)
    v = v / v.flatten(1).norm(dim=1).reshape(-1, *[1] * (x_t.ndim - 1))
    norm = torch.zeros(x_t.shape[0])
    for _ in range(iters):
        x = x_t.detach().requires_grad_(True)
        eps = model.eps_from_xt(x, sigma)  # type: ignore[attr-defined]
        (jv,) = torch.autograd.grad(eps, x, v, create_graph=False)  # v^T J
        # v^T J is J^T v: iterate v <- J^T J v through a forward-mode product of J.
        _, jjv = torch.func.jvp(lambda y: model.eps_from_xt(y, sigma), (x_t,), (jv,))  # type: ignore[attr-defined]
        n = jjv.flatten(1).norm(dim=1)
        norm = n.sqrt()
        v = jjv / n.reshape(-1, *[1] * (x_t.ndim - 1))
    return norm


def difficulty(args: argparse.Namespace) -> dict:
    """How hard the guided field is to integrate: adaptive ``rk45``'s NFE at two
    tolerances, and the spectral norm of ``d eps / d x_t`` along the reference trajectory."""
    bundle = load_model("digits-cond")
    labels = torch.arange(args.samples) % 10
    keys = pflow.noise_keys(args.seed, torch.arange(args.samples))
    noise = pflow.keyed_randn(keys, bundle.shape)
    rows = []
    for w in args.guidance:
        model = bundle.conditioned(labels, w)
        row: dict = {"guidance": w}
        for tol in (1e-3, 1e-5):
            res = pflow.sample(model, noise, "rk45", rtol=tol, atol=tol)
            row[f"rk45_nfe_{tol:g}"] = res.nfe
        s = bundle.model.schedule  # type: ignore[attr-defined]
        points = [50.0, 5.0, 1.0, 0.3, 0.1]
        grid = torch.tensor([s.sigma_max, *points, s.sigma_min, 0.0], dtype=torch.float64)
        ref = pflow.sample(
            model, noise, "rk45", rtol=1e-5, atol=1e-5, sigmas=grid, return_trajectory=True
        )
        norms = {}
        for sigma in points:
            i = int((ref.sigmas - sigma).abs().argmin())  # a grid point: visited exactly
            norms[f"{sigma:g}"] = float(_jacobian_norm(model, ref.trajectory[i], sigma).mean())
        row["jacobian_norm"] = norms
        row["x0_abs_max"] = float(ref.x.abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    sig = list(rows[0]["jacobian_norm"])
    print("| guidance w | rk45 NFE, tol 1e-3 | rk45 NFE, tol 1e-5 | "
          + " | ".join(f"‖∂eps/∂x_t‖ at sigma {s}" for s in sig) + " | max |x0| |")  # fmt: skip
    print("| --- | --- | --- |" + " --- |" * len(sig) + " --- |")
    for r in rows:
        cells = " | ".join(f"{r['jacobian_norm'].get(s, float('nan')):.2f}" for s in sig)
        print(
            f"| {r['guidance']:g} | {r['rk45_nfe_0.001']} | {r['rk45_nfe_1e-05']} | {cells} | "
            f"{r['x0_abs_max']:.2f} |"
        )
    return {"command": "difficulty", "samples": args.samples, "seed": args.seed, "rows": rows}


def summary(args: argparse.Namespace) -> dict:
    """Tables from a guided ``pflow bench`` run's ``bench.json``: for each guidance scale and
    NFE budget the best pflow row and the best peer row within the budget, and the error of
    each solver family at its best grid within the budget (the DPM-Solver++ claim)."""
    data = json.loads(Path(args.bench).read_text())
    rows = [r for r in data["rows"] if not r.get("kept") and r.get("guidance") is not None]
    scales = sorted({r["guidance"] for r in rows})

    def best(candidates: list[dict]) -> dict | None:
        ok = [r for r in candidates if math.isfinite(r["rmse"])]
        return min(ok, key=lambda r: r["rmse"]) if ok else None

    def name(r: dict) -> str:
        return f"{r['solver']} [{r['spacing']}], {r['nfe']}"

    print("| w | NFE budget | best pflow (solver [grid], NFE) | error | best peer | error | "
          "pflow / peer |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    table = []
    for w in scales:
        for budget in args.budgets:
            within = [r for r in rows if r["guidance"] == w and r["nfe"] <= budget]
            bp = best([r for r in within if not r["peer"]])
            bq = best([r for r in within if r["peer"]])
            ratio = bp["rmse"] / bq["rmse"] if bp and bq else float("nan")
            table.append({"guidance": w, "budget": budget, "pflow": bp, "peer": bq})
            print(
                f"| {w:g} | {budget} | {name(bp) if bp else '-'} | "
                f"{bp['rmse']:.4f} | {name(bq) if bq else '-'} | "
                f"{bq['rmse']:.4f} | {ratio:.2f} |"
                if bp and bq
                else f"| {w:g} | {budget} | - | - | - | - | - |"
            )
    solvers = [s for s in args.families if any(r["solver"] == s for r in rows)]
    print()
    for b in args.budgets:
        print(f"Best error with NFE <= {b}, each solver on its best grid (grid, NFE):")
        print()
        print("| solver | " + " | ".join(f"w = {w:g}" for w in scales) + " |")
        print("| --- |" + " --- |" * len(scales))
        for solver in solvers:
            cells = []
            for w in scales:
                r = best([x for x in rows if x["guidance"] == w and x["solver"] == solver
                          and not x["peer"] and x["nfe"] <= b])  # fmt: skip
                cells.append(f"{r['rmse']:.3f} ({r['spacing']}, {r['nfe']})" if r else "-")
            print(f"| `{solver}` | " + " | ".join(cells) + " |")
        print()
    return {"command": "summary", "bench": args.bench, "rows": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--guidance", type=lambda s: [float(v) for v in s.split(",")],
                   default=[0.0, 1.0, 1.5, 2.0, 4.0, 8.0])  # fmt: skip
    a.add_argument("--solver", default="heun")
    a.add_argument("--steps", type=int, default=25)
    a.add_argument("--samples", type=int, default=100, help="per label")
    a.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("roundtrip")
    r.add_argument("--guidance", type=lambda s: [float(v) for v in s.split(",")],
                   default=[1.0, 2.0, 4.0, 8.0])  # fmt: skip
    r.add_argument("--steps", dest="steps_list", type=lambda s: [int(v) for v in s.split(",")],
                   default=[10, 20, 50])  # fmt: skip
    r.add_argument("--samples", type=int, default=100)
    d = sub.add_parser("difficulty")
    d.add_argument("--guidance", type=lambda s: [float(v) for v in s.split(",")],
                   default=[0.0, 1.0, 2.0, 4.0, 8.0])  # fmt: skip
    d.add_argument("--samples", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("summary")
    s.add_argument("--bench", default="benchmarks/results/digits-cond/bench.json")
    s.add_argument("--budgets", type=lambda v: [int(x) for x in v.split(",")],
                   default=[5, 10, 20])  # fmt: skip
    s.add_argument("--families", type=lambda v: v.split(","),
                   default=["euler", "heun", "dpm_solver_2", "dpmpp_2s", "dpm_solver_3",
                            "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"])  # fmt: skip
    s.add_argument("--out", default=None)
    for q in (a, r, d):
        q.add_argument("--out", default=None, help="folder for the JSON result")
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    commands = {
        "accuracy": accuracy,
        "roundtrip": roundtrip,
        "difficulty": difficulty,
        "summary": summary,
    }
    result = commands[args.what](args)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.what}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
