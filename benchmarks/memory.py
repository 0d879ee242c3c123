"""Peak memory of sampling on the bundled digits UNet: against the number of steps (with
and without ``return_trajectory``) and against the number of samples (with and without
``batch_size=``).

On the CPU each configuration runs in a fresh Python process (this script with
``--one``), so no configuration inherits memory that an earlier one left in the C
allocator, and the order of the runs cannot change a number; on CUDA the allocator's own
counters are exact, and the configurations run one after another in this process. For
each, the model and the noise are loaded, one small warm-up solve initialises the
libraries (and CUDA's library workspaces), and then one ``pflow.sample`` call is measured:

- CUDA: ``torch.cuda.max_memory_allocated()`` after the call (peak statistics reset just
  before it) minus ``torch.cuda.memory_allocated()`` before it, i.e. bytes of tensors
  allocated by the call, at their most.
- CPU (Linux): the peak resident set size of the call minus the resident set size before
  it. Freed heap memory is first handed back to the system (``malloc_trim(0)``), then the
  kernel's peak (``VmHWM``) is reset to the current size by writing ``5`` to
  ``/proc/self/clear_refs``; after the call ``VmHWM`` is read from ``/proc/self/status``.
  A calibration run (a 100 MiB tensor allocated and freed) is reported with the tables.
  RSS also counts what the C allocator holds but does not use (a fragmented heap), so it
  varies from run to run by a few MiB: ``--repeats 3`` shows the median of three.

Either way the number is what the call added on top of the model's weights and the input
noise (both resident before it): the network's activations, the solver's stages and
history, and the result ``x`` and trajectory, which are still held when the call
returns. The result's own size is given in its own column, and ``working`` is the peak
less the result. Writes the tables to stdout and, with ``--doc``, into that Markdown file
between the markers ``<!-- memory:begin -->`` and ``<!-- memory:end -->``.

    python benchmarks/memory.py --repeats 3 --doc docs/performance.md
    python benchmarks/memory.py --quick
    python benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

MIB = 2**20
BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class Config:
    """One measured call: ``pflow.sample(model, noise[samples], solver, ...)``.

    ``steps`` is ``None`` for an adaptive solver, which takes ``tol`` as rtol and atol.
    ``solver == "calibrate"`` measures a 100 MiB tensor allocated and freed instead.
    """

    solver: str
    samples: int
    steps: int | None = None
    tol: float | None = None
    batch_size: int | None = None
    trajectory: bool = False
    check_finite: bool = True


# ---------------------------------------------------------------------------------------
# The measurement, inside the child process.


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in KiB."""
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


class PeakMeter:
    """Bytes a block of code added at its most, on ``device``.

    ``start()`` marks the baseline and resets the peak; ``stop()`` returns the peak above
    the baseline. ``method`` says how it was measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self._resettable = os.path.exists(_CLEAR_REFS) and os.path.exists(_STATUS)
        try:
            self._trim: Any = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._trim = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated() - memory_allocated() before"
        elif self._resettable:
            self.method = (
                "peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim(0)) "
                "- RSS before"
            )
        else:
            self.method = "ru_maxrss after - ru_maxrss before (not resettable: a lower bound)"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._trim is not None:
            self._trim(0)  # hand freed heap memory back, so RSS is what is live
        if self._resettable:
            self.base = _status_kib("VmRSS") * 1024
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # VmHWM := VmRSS
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self._resettable:
            return _status_kib("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def _calibrate(meter: PeakMeter) -> dict[str, Any]:
    """Allocate, fill and free a 100 MiB tensor: the meter should read about 100 MiB."""
    meter.start()
    t = torch.ones(100 * MIB // 4, device=meter.device)
    del t
    return {"peak": meter.stop(), "result": 0, "nfe": 0, "n_accepted": 0, "wall": 0.0}


def measure_one(cfg: Config, device: torch.device) -> dict[str, Any]:
    """Measure one configuration in this process (meant to be a fresh one)."""
    import pflow
    from pflow.zoo.registry import load_model

    meter = PeakMeter(device)
    if cfg.solver == "calibrate":
        return {**_calibrate(meter), "method": meter.method}
    bundle = load_model("digits")
    assert isinstance(bundle.model, pflow.EpsModel)
    model = bundle.model.to(device=device)
    noise = torch.randn(cfg.samples, *bundle.shape, generator=torch.Generator().manual_seed(0)).to(
        device
    )
    kw: dict[str, Any] = {
        "return_trajectory": cfg.trajectory,
        "batch_size": cfg.batch_size,
        "check_finite": cfg.check_finite,
    }
    if cfg.steps is None:
        kw.update(rtol=cfg.tol, atol=cfg.tol)
        warm: dict[str, Any] = {"rtol": 0.1, "atol": 0.1}
    else:
        kw["steps"] = cfg.steps
        warm = {"steps": 3}
    pflow.sample(model, noise[:2], cfg.solver, **warm)  # load kernels, lazy state
    meter.start()
    t0 = time.perf_counter()
    res = pflow.sample(model, noise, cfg.solver, **kw)
    wall = time.perf_counter() - t0
    peak = meter.stop()
    result = res.x.nbytes + (res.trajectory.nbytes if res.trajectory is not None else 0)
    return {
        "peak": peak,
        "result": result,
        "noise": noise.nbytes,
        "nfe": res.nfe,
        "n_accepted": res.n_accepted,
        "wall": wall,
        "method": meter.method,
    }


# ---------------------------------------------------------------------------------------
# The driver: one child process per configuration, then the tables.


def run_isolated(cfg: Config, device: str) -> dict[str, Any]:
    """Measure ``cfg`` in a fresh interpreter running this file with ``--one``."""
    cmd = [sys.executable, __file__, "--one", json.dumps(asdict(cfg)), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{cfg} failed:\n{out.stderr[-2000:]}")
    line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def steps_configs(quick: bool) -> list[Config]:
    """Peak memory against steps at 256 samples (64 with ``quick``); euler also without
    the NaN/inf watch (``check_finite=False``), whose per-evaluation record fragments
    the CPU heap."""
    samples = 64 if quick else 256
    steps = (5, 10, 20) if quick else (10, 20, 50, 100, 200)
    out = []
    for solver in ("euler", "dpmpp_2m"):
        for n in steps:
            for traj in (False, True):
                out.append(Config(solver, samples, steps=n, trajectory=traj))
    for n in steps:
        out.append(Config("euler", samples, steps=n, check_finite=False))
    for traj in (False, True):
        out.append(Config("rk45", samples, tol=1e-1 if quick else 1e-3, trajectory=traj))
    return out


def samples_configs(quick: bool) -> tuple[list[Config], int]:
    """Peak memory against samples, euler with 10 steps, with and without batch_size."""
    sizes = (64, 256, 1024) if quick else (256, 1024, 4096, 16384)
    chunk = 64 if quick else 256
    out = []
    for n in sizes:
        for bs in (chunk, None):
            out.append(Config("euler", n, steps=5 if quick else 10, batch_size=bs))
    return out, chunk


def run(cfg: Config, device: str, repeats: int = 1) -> dict[str, Any]:
    """Measure ``cfg`` ``repeats`` times (in a fresh process each on the CPU, in this one
    on CUDA) and return the run with the median peak, with ``spread`` = max - min peak."""
    runs = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            runs.append(measure_one(cfg, torch.device(device)))
        else:
            runs.append(run_isolated(cfg, device))
    runs.sort(key=lambda r: r["peak"])
    return {**runs[len(runs) // 2], "spread": runs[-1]["peak"] - runs[0]["peak"]}


def _run_all(
    configs: list[Config], device: str, repeats: int
) -> list[tuple[Config, dict[str, Any]]]:
    rows = []
    for cfg in configs:
        r = run(cfg, device, repeats)
        print(
            f"  {cfg.solver} samples={cfg.samples} steps={cfg.steps} tol={cfg.tol} "
            f"batch_size={cfg.batch_size} trajectory={cfg.trajectory} "
            f"check_finite={cfg.check_finite}: peak "
            f"{_mib(r['peak'])} MiB, result {_mib(r['result'])} MiB ({r['wall']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        rows.append((cfg, r))
    return rows


def steps_table(rows: list[tuple[Config, dict[str, Any]]]) -> list[str]:
    lines = [
        "| solver | steps | NFE | peak (MiB) | working (MiB) | with trajectory: peak (MiB) "
        "| trajectory + x (MiB) | working (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = {(c.solver, c.steps, c.tol, c.check_finite): r for c, r in rows if not c.trajectory}
    traj = {(c.solver, c.steps, c.tol, c.check_finite): r for c, r in rows if c.trajectory}
    for key, r in plain.items():
        solver, steps, tol, check_finite = key
        name = solver if tol is None else f"{solver} (rtol=atol={tol:g})"
        if not check_finite:
            name += " (check_finite=False)"
        t = traj.get(key)
        with_traj = (
            f"{_mib(t['peak'])} | {_mib(t['result'])} | {_mib(t['peak'] - t['result'])}"
            if t is not None
            else "- | - | -"
        )
        lines.append(
            f"| {name} | {steps if steps is not None else r['n_accepted']} | {r['nfe']} "
            f"| {_mib(r['peak'])} | {_mib(r['peak'] - r['result'])} | {with_traj} |"
        )
    return lines


def samples_table(rows: list[tuple[Config, dict[str, Any]]], chunk: int) -> list[str]:
    lines = [
        f"| samples | x (MiB) | batch_size={chunk}: peak (MiB) | working (MiB) "
        "| no batch_size: peak (MiB) | working (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    split = {c.samples: r for c, r in rows if c.batch_size is not None}
    whole = {c.samples: r for c, r in rows if c.batch_size is None}
    for n, s in split.items():
        w = whole[n]
        lines.append(
            f"| {n} | {_mib(s['result'])} | {_mib(s['peak'])} | {_mib(s['peak'] - s['result'])} "
            f"| {_mib(w['peak'])} | {_mib(w['peak'] - w['result'])} |"
        )
    return lines


def write_doc(path: Path, text: str) -> None:
    """Put ``text`` between the markers of ``path``, adding them at the end if absent."""
    doc = path.read_text() if path.exists() else ""
    if BEGIN not in doc or END not in doc:
        doc = f"{doc.rstrip()}\n\n{BEGIN}\n{END}\n" if doc.strip() else f"{BEGIN}\n{END}\n"
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--doc", default=None, help="write the tables into this Markdown file")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration; the median is shown"
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.one is not None:
        result = measure_one(Config(**json.loads(args.one)), device)
        print("RESULT " + json.dumps(result))
        return

    t0 = time.perf_counter()
    calib = run(Config("calibrate", 0), args.device)
    by_steps = _run_all(steps_configs(args.quick), args.device, args.repeats)
    sample_cfgs, chunk = samples_configs(args.quick)
    by_samples = _run_all(sample_cfgs, args.device, args.repeats)
    steps_samples = by_steps[0][0].samples
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    where = "each run a fresh process" if device.type == "cpu" else "one process"
    if args.repeats > 1:
        spread = max(r["spread"] for _, r in by_steps + by_samples)
        where += f"; median of {args.repeats} runs (largest spread {_mib(spread)} MiB)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"torch {torch.__version__}, {name}, {threads} thread(s); {where}. "
        f"Peak = {calib['method']}: what one `pflow.sample` call added on "
        "top of the digits UNet's weights and the input noise (activations, solver state, "
        "and the result still held at return). Working = peak - result (x, and the "
        f"trajectory when returned). Calibration: a 100.0 MiB tensor allocated and freed "
        f"reads {_mib(calib['peak'])} MiB.",
        "",
        f"**Peak memory vs steps** ({steps_samples} samples; rk45's steps are its accepted steps)",
        "",
        *steps_table(by_steps),
        "",
        f"**Peak memory vs samples** (euler, {sample_cfgs[0].steps} steps)",
        "",
        *samples_table(by_samples, chunk),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.doc:
        write_doc(Path(args.doc), text)


if __name__ == "__main__":
    main()
