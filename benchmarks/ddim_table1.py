"""The DDIM paper's Table 1, in kind, on the bundled digits model.

Fréchet distance (bundled classifier's features, against the 300 held-out test digits)
for DDIM with eta = 0, 0.2, 0.5, 1 and DDPM with the larger variance sigma_hat, at
10, 20, 50, 100 steps on the paper's uniform ("linear") grid, each repeated over several
seeds for a standard error. Results go to benchmarks/results/ddim_table1.json and a
Markdown table on stdout (pasted into docs/benchmarks.md).

    python benchmarks/ddim_table1.py --samples 1000 --seeds 3 --steps 10,20,50,100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import pflow
from pflow.metrics import digits_fd
from pflow.zoo.registry import load_model

# DDIM paper (arXiv 2010.02502), Table 1, CIFAR-10 FID, S = 10, 20, 50, 100, 1000.
PAPER_CIFAR10 = {
    "eta=0.0": [13.36, 6.84, 4.67, 4.16, 4.04],
    "eta=0.2": [14.04, 7.11, 4.77, 4.25, 4.09],
    "eta=0.5": [16.66, 8.35, 5.25, 4.46, 4.29],
    "eta=1.0": [41.07, 18.36, 8.01, 5.78, 4.73],
    "sigma_hat": [367.43, 133.37, 32.72, 9.99, 3.17],
}
PAPER_STEPS = [10, 20, 50, 100, 1000]

ROWS = {
    "eta=0.0": ("ddim", {"eta": 0.0}),
    "eta=0.2": ("ddim", {"eta": 0.2}),
    "eta=0.5": ("ddim", {"eta": 0.5}),
    "eta=1.0": ("ddim", {"eta": 1.0}),
    "sigma_hat": ("ddpm", {"variance": "sigma_hat"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", default="10,20,50,100")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results/ddim_table1.json")
    args = p.parse_args()
    steps_list = [int(s) for s in args.steps.split(",")]
    bundle = load_model("digits")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[float]]] = {}
    if out.exists():  # resume: keep what an interrupted run finished
        results = json.loads(out.read_text()).get("fd", {})
    t_start = time.perf_counter()
    for label, (solver, options) in ROWS.items():
        for steps in steps_list:
            key = str(steps)
            done = results.setdefault(label, {}).get(key, [])
            for seed in range(len(done), args.seeds):
                chunks = []
                for start in range(0, args.samples, args.batch):
                    n = min(args.batch, args.samples - start)
                    g = torch.Generator().manual_seed(10_000 * seed + start)
                    noise = torch.randn(n, *bundle.shape, generator=g)
                    res = pflow.sample(
                        bundle.model,
                        noise,
                        solver,
                        steps=steps,
                        spacing="uniform",
                        seed=10_000 * seed + start,
                        **options,
                    )
                    chunks.append(res.x)
                done.append(digits_fd(torch.cat(chunks)))
                results[label][key] = done
                tmp = out.with_suffix(".tmp")
                tmp.write_text(
                    json.dumps(
                        {
                            "fd": results,
                            "samples": args.samples,
                            "seeds": args.seeds,
                            "grid": "uniform",
                        },
                        indent=1,
                    )
                )
                os.replace(tmp, out)
            print(
                f"{label:10s} {steps:5d} steps: FD {mean_se(done)}  "
                f"({time.perf_counter() - t_start:.0f}s)",
                flush=True,
            )
    print()
    print(markdown(results, steps_list, args.samples, args.seeds))


def mean_se(values: list[float]) -> str:
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.3f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.3f} ± {sd / math.sqrt(len(values)):.3f}"


def markdown(
    results: dict[str, dict[str, list[float]]], steps_list: list[int], samples: int, seeds: int
) -> str:
    head = "| sampler | " + " | ".join(f"S={s} (digits FD)" for s in steps_list)
    head += " | " + " | ".join(f"S={s} (CIFAR-10 FID, paper)" for s in PAPER_STEPS) + " |"
    sep = "|---" * (1 + len(steps_list) + len(PAPER_STEPS)) + "|"
    lines = [head, sep]
    for label in ROWS:
        ours = [mean_se(results.get(label, {}).get(str(s), [math.nan])) for s in steps_list]
        paper = [f"{v:g}" for v in PAPER_CIFAR10[label]]
        lines.append(f"| {label} | " + " | ".join(ours) + " | " + " | ".join(paper) + " |")
    lines.append("")
    lines.append(
        f"Digits: mean ± standard error over {seeds} seeds of {samples} samples each, "
        "uniform grid, Fréchet distance in the bundled classifier's feature space "
        "against the 300 held-out test digits."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
