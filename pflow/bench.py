"""The quality-versus-cost benchmark: solvers x grids x step counts on one model.

Every row solves from the same noise ``x_T`` (float32, keyed per sample: sample ``i``
is ``keyed_randn(noise_keys(seed, i))``) and is judged against the reference endpoint from
that noise: a float64 ``rk45`` solve at a tight tolerance, cached on disk. NFE is what the
wrapped model counted. Each finished row is written at once (atomically), so an
interrupted sweep loses nothing and ``resume`` skips what is done.

Under ``torchrun`` every rank solves its shard of the samples (:mod:`pflow.distributed`);
adaptive solvers share step decisions across ranks, rank 0 gathers the samples, computes
the errors and metrics and writes the files, so the rows equal a single process's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .distributed import World
from .metrics import digits_fd, gmm_nll, sliced_wasserstein, trajectory_rmse
from .model import EpsModel
from .noise import keyed_randn, noise_keys
from .solve import sample
from .solvers import Solver, parse_solver
from .zoo.registry import BundledModel, load_model

__all__ = ["BenchConfig", "Row", "run_bench", "format_table"]


@dataclass
class BenchConfig:
    """What to sweep. Fixed-step solvers run every ``spacing`` x ``steps``; adaptive ones
    run every tolerance in ``tols`` (rtol = atol) and land on the same NFE axis. ``peers``
    names diffusers schedulers (see :mod:`pflow.integrations.diffusers_peers`) that drive
    the same network from the same noise at every ``steps``. ``ref_tol`` defaults to the
    model's own (:class:`~pflow.zoo.registry.BundledModel`). ``grid_nfe``: the NFE near
    which each solver's samples are drawn in ``samples.png``."""

    model: str = "digits"
    solvers: Sequence[str] = ("euler", "heun", "dpmpp_2m", "unipc", "ipndm", "rk45")
    steps: Sequence[int] = (5, 10, 20, 50)
    spacings: Sequence[str] = ("trailing",)
    tols: Sequence[float] = (1e-2, 1e-3)
    samples: int = 128
    seed: int = 0
    ref_tol: float | None = None
    peers: Sequence[str] = ()
    plots: bool = True
    grid_nfe: int = 10
    out: str | None = None
    resume: bool = False
    quiet: bool = False
    batch_size: int | None = None
    device: str = "cpu"
    net_dtype: str | None = None
    compile: bool = False


@dataclass
class Row:
    """One solver at one setting."""

    solver: str
    spacing: str
    steps: int | None
    tol: float | None
    nfe: int
    rmse: float
    metric: float | None
    metric_name: str
    wall_s: float
    peer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.solver}|{self.spacing}|{self.steps}|{self.tol}"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _noise(bundle: BundledModel, indices: range, seed: int) -> torch.Tensor:
    keys = noise_keys(seed, indices)
    return keyed_randn(keys, bundle.shape, dtype=torch.float64)


def _reference_paths(cache_dir: Path | None, cache_key: str) -> list[Path]:
    digest = hashlib.sha256(cache_key.encode()).hexdigest()[:16]
    # The package ships the reference of the default benchmark (digits, 128 samples,
    # seed 0, rtol = atol = 1e-7), made by benchmarks/published.py; a run's own cache
    # comes first.
    shipped = Path(__file__).parent / "zoo" / "references" / f"reference-{digest}.safetensors"
    own = [cache_dir / f"reference-{digest}.safetensors"] if cache_dir is not None else []
    return [*own, shipped]


def _load_reference(paths: list[Path], shape: torch.Size) -> tuple[torch.Tensor, int] | None:
    for candidate in paths:
        if candidate.exists():
            loaded = load_file(str(candidate))
            if loaded["x"].shape == shape:
                return loaded["x"], int(loaded["nfe"].item())
    return None


def reference_endpoint(
    bundle: BundledModel,
    noise64: torch.Tensor,
    ref_tol: float,
    cache_dir: Path | None,
    cache_key: str,
    world: World | None = None,
    n_total: int | None = None,
) -> tuple[torch.Tensor | None, int]:
    """The ODE's endpoint from ``noise64``: float64 ``rk45`` at ``rtol = atol = ref_tol``,
    from ``sigma_max`` into 0 under the model's ``last_step`` policy. Cached on disk.

    Under a :class:`~pflow.distributed.World` of several ranks ``noise64`` is this rank's
    shard of ``n_total`` samples; the solve shares its steps across ranks and the whole
    endpoint is returned on rank 0 (``None`` elsewhere)."""
    world = world or World()
    n_total = noise64.shape[0] if n_total is None else n_total
    paths = _reference_paths(cache_dir, cache_key)
    cached = None
    if world.is_main:
        cached = _load_reference(paths, torch.Size([n_total, *noise64.shape[1:]]))
    if world.broadcast(cached is not None):
        return (cached[0], cached[1]) if cached is not None else (None, 0)
    model = bundle.model
    model64 = (
        model.to(dtype=torch.float64, device=world.device) if isinstance(model, EpsModel) else model
    )
    res = sample(
        model64,  # type: ignore[arg-type]
        noise64.to(world.device),
        "rk45",
        rtol=ref_tol,
        atol=ref_tol,
        last_step=bundle.last_step,  # type: ignore[arg-type]
        process_group=world.group,
    )
    x = world.gather(res.x, n_total)
    if x is not None and cache_dir is not None:
        path = paths[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(
            {"x": x.contiguous(), "nfe": torch.tensor(res.nfe)},
            str(tmp),
            metadata={"key": cache_key},
        )
        os.replace(tmp, path)
    return x, res.nfe


def check_label(
    solver: Solver, options: dict[str, Any], label: str, *, sweep_tols: bool = True
) -> None:
    """What the bench (and ``pflow sample``) set themselves may not be in a label: a
    stochastic solver's ``seed``/``generator`` (each sample's noise is keyed by its index,
    see :func:`shard_options`) and, with ``sweep_tols``, an adaptive solver's
    ``rtol``/``atol`` (the sweep sets rtol = atol from ``tols``)."""
    if sweep_tols and solver.adaptive:
        fixed = [k for k in ("rtol", "atol") if k in options]
        if fixed:
            raise ValueError(
                f"solver {label!r}: rtol = atol are swept over the tolerances (tols, "
                f"--tols); drop {' and '.join(fixed)} from the label"
            )
    if solver.stochastic:
        keyed = [k for k in ("seed", "generator") if k in options]
        if keyed:
            raise ValueError(
                f"solver {label!r}: each sample's noise is keyed by the seed (seed, --seed) "
                f"and its index; drop {' and '.join(keyed)} from the label"
            )


def last_step_for(solver: Solver, wanted: str) -> str:
    """The model's ``last_step`` where ``solver`` supports it, else ``"euler"`` (every
    solver supports the Euler step into ``sigma = 0``)."""
    return wanted if wanted in solver.last_steps else "euler"


def _settings(config: BenchConfig) -> Iterable[tuple[str, str, int | None, float | None, bool]]:
    for solver in config.solvers:
        if parse_solver(solver)[0].adaptive:
            for tol in config.tols:
                yield solver, "adaptive", None, tol, False
        else:
            for spacing in config.spacings:
                for steps in config.steps:
                    yield solver, spacing, steps, None, False
    for peer in config.peers:
        for steps in config.steps:
            yield peer, "diffusers", steps, None, True


def _auto_peers(bundle: BundledModel) -> list[str]:
    """Every diffusers peer when diffusers is installed and the model is an eps network."""
    from .integrations import diffusers_peers

    model = bundle.model
    eps_net = isinstance(model, EpsModel) and model.prediction == "epsilon"
    return list(diffusers_peers.PEERS) if eps_net and diffusers_peers.available() else []


def _draws_noise(label: str) -> bool:
    """Whether the solver of ``label``, with its options, has a random endpoint."""
    solver, options = parse_solver(label)
    return solver.draws_noise({**solver.defaults(), **options})


def _validate(config: BenchConfig) -> None:
    for label in config.solvers:
        check_label(*parse_solver(label), label)
    for n in config.steps:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"steps must be integers >= 1, got {n!r}")
    for tol in config.tols:
        if not tol > 0:
            raise ValueError(f"tols must be > 0, got {tol!r}")
    if config.samples < 1:
        raise ValueError(f"samples must be >= 1, got {config.samples}")
    bs = config.batch_size
    if bs is not None and (isinstance(bs, bool) or int(bs) != bs or bs < 1):
        raise ValueError(f"batch_size must be a positive integer, got {bs!r}")
    if config.peers and list(config.peers) != ["auto"]:
        from .integrations import diffusers_peers

        if not diffusers_peers.available():
            raise ValueError("peers need diffusers installed (pip install diffusers)")
        unknown = [p for p in config.peers if p not in diffusers_peers.PEERS]
        if unknown:
            raise ValueError(
                f"unknown peer {', '.join(unknown)}; known peers: "
                f"{', '.join(diffusers_peers.PEERS)}"
            )


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done = total, 0
        self.live = not quiet and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.live:
            elapsed = time.perf_counter() - self.t0
            bar = "#" * int(30 * self.done / self.total)
            sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} {elapsed:6.1f}s {label:<28}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def distribution_metric(bundle: BundledModel, x: torch.Tensor) -> tuple[float | None, str]:
    """The model's distribution-quality number for samples ``x``: the exact mixture's NLL,
    the digits classifier's Fréchet distance, or the sliced Wasserstein distance to the
    2-D data."""
    if bundle.exact is not None:
        return gmm_nll(bundle.exact, x), "nll"
    if bundle.name == "digits":
        return digits_fd(x), "fd"
    if bundle.name == "moons":
        from .zoo.data import moons_data

        return sliced_wasserstein(x, moons_data(4096, seed=1)), "sw2"
    return None, ""


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"out folder {str(out)!r} is not writable ({exc.strerror})") from None


def run_bench(config: BenchConfig, world: World | None = None) -> list[Row]:
    """Run the sweep; with ``config.out`` set, write ``bench.json`` and ``bench.csv`` after
    every row, then the plots. Under a :class:`~pflow.distributed.World` of several ranks
    every rank must call it; rank 0 returns the rows and writes the files, the others
    return an empty list."""
    world = world or World()
    _validate(config)
    out = Path(config.out) if config.out else None
    if out is not None and world.is_main:
        _check_out(out)
    bundle = load_model(config.model)
    if list(config.peers) == ["auto"]:
        config.peers = _auto_peers(bundle)
    ref_tol = config.ref_tol if config.ref_tol is not None else bundle.ref_tol
    if config.samples < world.size:
        raise ValueError(f"samples ({config.samples}) must be at least the number of ranks")
    indices = world.shard(config.samples)
    noise64 = _noise(bundle, indices, config.seed).to(world.device)
    noise = noise64.float()
    model = prepare_model(bundle.model, world.device, config.net_dtype, config.compile)
    key = json.dumps(
        {
            "model": config.model,
            "samples": config.samples,
            "seed": config.seed,
            "noise": "keyed",
            "ref_tol": ref_tol,
            "last_step": bundle.last_step,
        }
    )
    ref, ref_nfe = reference_endpoint(
        bundle,
        noise64,
        ref_tol,
        out / ".cache" if out else None,
        key,
        world=world,
        n_total=config.samples,
    )
    done: dict[str, Row] = {}
    json_path = out / "bench.json" if out else None
    if world.is_main and config.resume and json_path is not None and json_path.exists():
        for r in json.loads(json_path.read_text()).get("rows", []):
            row = Row(**r)
            done[row.key] = row
    done = world.broadcast(done)
    rows: list[Row] = []
    grid_samples: dict[str, tuple[int, torch.Tensor]] = {}
    todo = list(_settings(config))
    progress = _Progress(len(todo), config.quiet or not world.is_main)
    for solver, spacing, steps, tol, peer in todo:
        probe_key = Row(solver, spacing, steps, tol, 0, 0.0, None, "", 0.0).key
        if probe_key in done:
            rows.append(done[probe_key])
            progress.step(f"{solver} (resumed)")
            continue
        t0 = time.perf_counter()
        if peer:
            x, nfe = _run_peer(model, solver, noise, int(steps or 0), config.batch_size)
            n_rej = 0
        else:
            spec = parse_solver(solver)[0]
            kwargs: dict[str, Any] = {"last_step": last_step_for(spec, bundle.last_step)}
            if tol is None:
                kwargs.update(steps=steps, spacing=spacing)
            else:
                kwargs.update(rtol=tol, atol=tol)
            keys = noise_keys(config.seed, indices)
            kwargs.update(shard_options(solver, world, keys, config.batch_size))
            # The label goes to sample() as written: it parses and applies its options.
            res = sample(model, noise, solver, **kwargs)
            x, nfe, n_rej = res.x, res.nfe, res.n_rejected
        wall = world.max(time.perf_counter() - t0)
        gathered = world.gather(x, config.samples)
        if gathered is None or ref is None:
            continue
        x = gathered
        metric, metric_name = distribution_metric(bundle, x)
        # A stochastic sampler's endpoint is not the ODE's: no trajectory error.
        stochastic = not peer and _draws_noise(solver)
        row = Row(
            solver,
            spacing,
            steps,
            tol,
            nfe,
            math.nan if stochastic else trajectory_rmse(x, ref),
            metric,
            metric_name,
            wall,
            peer=peer,
            extra={"n_rejected": n_rej},
        )
        rows.append(row)
        label = f"{solver} ({spacing})" if not peer else f"{solver} (diffusers)"
        best = grid_samples.get(label)
        if best is None or abs(nfe - config.grid_nfe) < abs(best[0] - config.grid_nfe):
            grid_samples[label] = (nfe, x[:32].clone())
        if out is not None:
            _write(out, config, bundle, rows, ref_nfe)
        progress.step(f"{solver} {spacing} {steps or tol}")
    if not world.is_main:
        return []
    if out is not None:
        _write(out, config, bundle, rows, ref_nfe)
        if config.plots:
            _plots(out, bundle, rows, grid_samples, config)
    return rows


def shard_options(
    solver: str | Solver, world: World, keys: torch.Tensor, batch_size: int | None
) -> dict[str, Any]:
    """The ``sample()`` options with which a rank solves its shard, read from the
    capabilities of the solver of the label ``solver``: stochastic solvers draw from the
    samples' ``keys``; adaptive ones on several ranks share their steps through the
    process group and so solve the shard at once; others split it by ``batch_size``."""
    spec = parse_solver(solver)[0]  # type: ignore[arg-type]  # a Solver passes through
    options: dict[str, Any] = {"seed": keys} if spec.stochastic else {}
    if spec.adaptive and world.size > 1:
        options["process_group"] = world.group
    else:
        options["batch_size"] = batch_size
    return options


NET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prepare_model(
    model: Any, device: torch.device, net_dtype: str | None = None, compile: bool = False
) -> Any:
    """The model on ``device``, its network in ``net_dtype`` (a name from ``NET_DTYPES``)
    and compiled when asked; the ODE state keeps its own dtype."""
    if net_dtype is not None and net_dtype not in NET_DTYPES:
        raise ValueError(f"net_dtype must be one of {', '.join(NET_DTYPES)}, got {net_dtype!r}")
    if not isinstance(model, EpsModel):
        if net_dtype is not None or compile or device.type != "cpu":
            raise ValueError("net_dtype, compile and device need an EpsModel")
        return model
    if device.type != "cpu":
        model = model.to(device=device)
    if net_dtype is not None:
        model = model.with_network_precision(NET_DTYPES[net_dtype])
    return model.compile() if compile else model


def _run_peer(
    model: Any, name: str, noise: torch.Tensor, steps: int, batch_size: int | None
) -> tuple[torch.Tensor, int]:
    from .integrations.diffusers_peers import run_peer

    if not isinstance(model, EpsModel) or model.prediction != "epsilon":
        raise ValueError("diffusers peers need an EpsModel with prediction='epsilon'")
    net = model.net
    if model.net_dtype is not None:  # the same reduced-precision network as pflow's rows
        dtype = model.net_dtype

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.net(x.to(dtype), t).to(x.dtype)

    size = batch_size or noise.shape[0]
    parts = [
        run_peer(name, net, model.schedule, noise[i : i + size], steps)
        for i in range(0, noise.shape[0], size)
    ]
    return torch.cat([p[0] for p in parts]), max(p[1] for p in parts)


def _plots(
    out: Path,
    bundle: BundledModel,
    rows: list[Row],
    grid_samples: dict[str, tuple[int, torch.Tensor]],
    config: BenchConfig,
) -> None:
    from .plots import plot_samples, plot_vs_nfe

    title = f"{bundle.description}; {config.samples} samples, seed {config.seed}"
    plot_vs_nfe(rows, out / "error_vs_nfe.png", title=title)
    if any(r.metric is not None for r in rows):
        name = next(r.metric_name for r in rows if r.metric_name)
        ylabel = {
            "fd": "Fréchet distance (classifier features)",
            "nll": "NLL under the exact mixture (nats)",
            "sw2": "sliced Wasserstein-2 to data",
        }.get(name, name)
        plot_vs_nfe(rows, out / "metric_vs_nfe.png", field="metric", ylabel=ylabel, title=title)
    panels = {f"{k}, NFE {v[0]}": v[1] for k, v in grid_samples.items()}
    plot_samples(
        panels,
        out / "samples.png",
        title=f"{bundle.description}: samples near NFE {config.grid_nfe}",
    )


def _write(
    out: Path, config: BenchConfig, bundle: BundledModel, rows: list[Row], ref_nfe: int
) -> None:
    payload = {
        "config": asdict(config),
        "model": {
            "name": bundle.name,
            "description": bundle.description,
            "shape": list(bundle.shape),
            "last_step": bundle.last_step,
        },
        "reference": {"solver": "rk45", "dtype": "float64", "tol": config.ref_tol, "nfe": ref_nfe},
        "rows": [asdict(r) for r in rows],
    }
    _atomic_write(out / "bench.json", json.dumps(payload, indent=1))
    fields = [
        "solver",
        "spacing",
        "steps",
        "tol",
        "nfe",
        "rmse",
        "metric",
        "metric_name",
        "wall_s",
        "peer",
    ]
    lines: list[str] = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    writer = csv.DictWriter(_Sink(), fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    _atomic_write(out / "bench.csv", "".join(lines))


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table, one row per solver and setting, sorted by solver then NFE."""
    metric_name = next((r.metric_name for r in rows if r.metric_name), "")
    head = ["solver", "grid", "steps/tol", "NFE", "RMSE vs ref", metric_name or "metric", "time s"]
    body = []
    for r in sorted(rows, key=lambda r: (r.peer, r.solver, r.spacing, r.nfe)):
        setting = str(r.steps) if r.steps is not None else f"{r.tol:g}"
        metric = "" if r.metric is None or math.isnan(r.metric) else f"{r.metric:.4f}"
        name = r.solver + (" (diffusers)" if r.peer else "")
        rmse = "n/a (stochastic)" if math.isnan(r.rmse) else f"{r.rmse:.3e}"
        body.append([name, r.spacing, setting, str(r.nfe), rmse, metric, f"{r.wall_s:.2f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)
