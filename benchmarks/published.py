"""Regenerate the published benchmark: every pflow solver and grid, and diffusers' peers,
on the bundled digits model, from the same noise, against a float64 reference.

    python benchmarks/published.py            # ~10-20 min on 2 cores

Writes benchmarks/results/digits/{bench.json,bench.csv,*.png} and the tables of
docs/benchmarks.md (between the markers), with figures copied to docs/img/.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

from pflow.bench import BenchConfig, Row, format_table, run_bench

SOLVERS = [
    "euler",
    "heun",
    "dpmpp_2m",
    "dpmpp_3m",
    "unipc",
    "unipc[order=3]",
    "ipndm",
    "lms",
    "dpm_solver_2",
    "dpm_solver_3",
    "rk4",
    "rk45",
]
SPACINGS = ["trailing", "linspace", "logsnr", "karras"]
PEERS = ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m_karras", "unipc", "lms"]
BUDGETS = [5, 10, 20, 50]


def best_at(rows: list[Row], budget: int, peer: bool) -> Row | None:
    """The lowest-error row with NFE <= budget (peers or pflow)."""
    fits = [r for r in rows if r.peer == peer and r.nfe <= budget and not math.isnan(r.rmse)]
    return min(fits, key=lambda r: r.rmse) if fits else None


def summary(rows: list[Row]) -> str:
    lines = [
        "| NFE budget | best pflow (solver, grid, NFE) | error | best peer (diffusers) | "
        "error | pflow / peer |",
        "|---|---|---|---|---|---|",
    ]
    for budget in BUDGETS:
        ours, peer = best_at(rows, budget, False), best_at(rows, budget, True)
        if ours is None or peer is None:
            continue
        lines.append(
            f"| {budget} | {ours.solver} [{ours.spacing}], {ours.nfe} | {ours.rmse:.4f} | "
            f"{peer.solver}, {peer.nfe} | {peer.rmse:.4f} | {ours.rmse / peer.rmse:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--steps", default="5,10,20,50")
    p.add_argument("--ref-tol", type=float, default=None, help="default: the model's (1e-7)")
    p.add_argument("--out", default="benchmarks/results/digits")
    p.add_argument("--doc", default="docs/benchmarks.md")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    config = BenchConfig(
        model="digits",
        solvers=SOLVERS,
        steps=steps,
        spacings=SPACINGS,
        tols=[1e-2, 3e-3, 1e-3, 3e-4, 1e-4],
        ref_tol=args.ref_tol,
        samples=args.samples,
        seed=0,
        peers=PEERS,
        out=args.out,
        resume=args.resume,
        grid_nfe=10,
    )
    t0 = time.perf_counter()
    rows = run_bench(config)
    wall = time.perf_counter() - t0
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    img = Path(args.doc).parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    for name in ("error_vs_nfe.png", "metric_vs_nfe.png", "samples.png"):
        if (out / name).exists():
            shutil.copy(out / name, img / f"bench_digits_{name}")
    text = (
        f"Command: `python benchmarks/published.py` ({wall / 60:.1f} min on this machine); "
        f"{args.samples} samples, seed 0, reference float64 rk45 at rtol = atol = "
        f"{args.ref_tol or 1e-7:g}, steps {args.steps}, grids "
        f"{', '.join(SPACINGS)}.\n\n### Best error within an NFE budget\n\n{summary(rows)}"
        f"\n\n### Every row\n\n```\n{table}\n```\n"
    )
    doc = Path(args.doc)
    begin, end = "<!-- published:begin -->", "<!-- published:end -->"
    current = doc.read_text() if doc.exists() else f"{begin}\n{end}\n"
    head, _, rest = current.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{begin}\n{text}{end}{tail}")


if __name__ == "__main__":
    main()
