"""Cost of the sampling loop itself: wall time / (NFE x one bare forward at the same batch).

A ratio of 1.00 means the loop costs nothing beyond the network. Each measurement is a
pair: NFE bare forwards, then the loop, so drifting clocks and load cancel. Measured side by side
with diffusers' scheduler loops at the same NFE, on the bundled digits UNet (batch 256)
and on a tiny MLP (batch 1024, the worst case, where the loop's own cost shows). Median
of ``--repeats`` runs. Writes the table to stdout and, with ``--doc``, into
docs/performance.md between the markers.

    python benchmarks/overhead.py --repeats 5 --doc docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import pflow
from pflow.zoo.registry import load_model

SOLVERS = {  # name -> sample() keyword arguments (20 steps, or a tolerance)
    "euler": {"steps": 20},
    "heun": {"steps": 10},
    "rk4": {"steps": 5},
    "dpmpp_2m": {"steps": 20},
    "dpmpp_3m": {"steps": 20},
    "unipc": {"steps": 20},
    "ipndm": {"steps": 20},
    "lms": {"steps": 20},
    "ddim[eta=1]": {"steps": 20},
    "rk45": {"rtol": 1e-3, "atol": 1e-3},
    "bosh3": {"rtol": 1e-3, "atol": 1e-3},
}
PEERS = ["ddim", "dpmpp_2m", "unipc", "euler"]


class TinyMLP(nn.Module):
    """A 2-D eps network small enough that the loop's own cost shows."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype) / 1000], dim=1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _paired_ratio(
    run: Callable[[], object],
    nfe: int,
    bare: Callable[[], object],
    repeats: int,
    device: torch.device,
) -> float:
    """Median over ``repeats`` of (time of ``run``) / (time of ``nfe`` bare forwards timed
    just before it): each pair sees the same machine state (clocks, caches, load)."""
    run()  # warm-up
    ratios = []
    for _ in range(repeats):
        t_bare = _timed(lambda: [bare() for _ in range(nfe)], device)
        ratios.append(_timed(run, device) / t_bare)
    return statistics.median(ratios)


def measure(
    net: nn.Module,
    schedule: pflow.NoiseSchedule,
    shape: tuple[int, ...],
    batch: int,
    repeats: int,
    device: torch.device,
) -> list[tuple[str, int, float]]:
    net = net.to(device)
    model = pflow.EpsModel(net, schedule)
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), 500.0, device=device)

    def bare() -> object:
        with torch.no_grad():
            return net(noise, t)

    for _ in range(3):  # warm up clocks and allocators
        _timed(lambda: [bare() for _ in range(50)], device)
    bare_s = statistics.median(_timed(bare, device) for _ in range(20))
    rows = []
    available = set(pflow.available_solvers())
    for label, kwargs in SOLVERS.items():
        name, _, opts = label.partition("[")
        if name not in available:
            continue
        options = {}
        if opts:
            key, _, value = opts.rstrip("]").partition("=")
            options[key] = float(value)
        if name == "ddim" and options:
            options["seed"] = 0
        res = pflow.sample(model, noise, name, **kwargs, **options)
        ratio = _paired_ratio(
            lambda name=name, kw={**kwargs, **options}: pflow.sample(model, noise, name, **kw),
            res.nfe,
            bare,
            repeats,
            device,
        )
        rows.append((f"pflow {label}", res.nfe, ratio))
    try:
        from pflow.integrations.diffusers_peers import run_peer
    except ImportError:  # pragma: no cover
        return rows
    for peer in PEERS:
        x, nfe = run_peer(peer, net, schedule, noise, 20)
        ratio = _paired_ratio(
            lambda peer=peer: run_peer(peer, net, schedule, noise, 20), nfe, bare, repeats, device
        )
        rows.append((f"diffusers {peer}", nfe, ratio))
    return [(r[0], r[1], r[2]) for r in rows] + [("(bare forward, ms)", 0, bare_s * 1e3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--doc", default=None, help="write the table into this Markdown file")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--marker", default="overhead", help="the doc's marker name")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    digits = load_model("digits")
    tables = {
        "digits UNet, batch 256": measure(
            digits.model.net, digits.model.schedule, (1, 8, 8), 256, args.repeats, device
        ),
        "tiny MLP, batch 1024": measure(
            TinyMLP().eval(), pflow.NoiseSchedule.linear(), (2,), 1024, args.repeats, device
        ),
    }
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    lines = [
        f"torch {torch.__version__}, {where}; ratio = wall time of the loop / time of NFE "
        f"bare forwards timed just before it, median of {args.repeats} such pairs",
        "",
    ]
    for title, rows in tables.items():
        lines += [f"**{title}**", "", "| loop | NFE | ratio |", "|---|---|---|"]
        for name, nfe, ratio in rows:
            lines.append(f"| {name} | {nfe or ''} | {ratio:.3f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.doc:
        path = Path(args.doc)
        begin, end = f"<!-- {args.marker}:begin -->", f"<!-- {args.marker}:end -->"
        doc = path.read_text() if path.exists() else f"{begin}\n{end}\n"
        head, _, rest = doc.partition(begin)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
