"""The network in reduced precision or compiled: time per ``sample()`` call and how far the
samples move, on the bundled digits UNet (``euler``, 20 steps, float32 state).

Each variant's first call (which compiles, for compiled ones) and the median of
``--repeats`` later calls are reported, with the relative RMS difference of its samples
from the eager float32 network's. Writes the table to stdout and, with ``--doc``, into
that Markdown file between ``<!-- precision-<device>:begin/end -->``.

    python benchmarks/precision.py --device cuda --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import pflow
from pflow.zoo.registry import load_model


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    x = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return x, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--doc", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    model = load_model("digits").model.to(device=device)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, 1, 8, 8, generator=g).to(device)
    variants = {
        "eager float32": model,
        "eager bfloat16": model.with_network_precision(torch.bfloat16),
        "eager float16": model.with_network_precision(torch.float16),
    }
    if not args.no_compile:
        variants["compiled float32"] = model.compile()
        variants["compiled bfloat16"] = model.with_network_precision(torch.bfloat16).compile()
    ref: torch.Tensor | None = None
    rows = []
    for name, m in variants.items():

        def run(m: pflow.EpsModel = m) -> torch.Tensor:
            return pflow.sample(m, noise, "euler", steps=20).x

        x, first = _timed(run, device)
        times = [_timed(run, device)[1] for _ in range(args.repeats)]
        if ref is None:
            ref = x.double()
        rel = float((x.double() - ref).norm() / ref.norm())
        rows.append((name, first, statistics.median(times), rel))
        print(f"{name:20s} first {first:8.3f} s  median {rows[-1][2] * 1e3:9.2f} ms  rel {rel:.1e}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} CPU threads; digits "
        f"UNet, batch {args.batch}, euler 20 steps, float32 state; median of {args.repeats}",
        "",
        "| network | first call (s) | per call (ms) | rel. RMS diff vs eager float32 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {f:.2f} | {t * 1e3:.1f} | {r:.1e} |" for n, f, t, r in rows]
    text = "\n".join(lines)
    if args.doc:
        path = Path(args.doc)
        marker = f"precision-{device.type}"
        begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
        doc = path.read_text() if path.exists() else ""
        if begin not in doc:
            doc += f"\n{begin}\n{end}\n"
        head, _, rest = doc.partition(begin)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
