"""The quality-versus-cost benchmark: solvers x grids x step counts on one model.

Every row solves from the same noise ``x_T`` (float32, keyed per sample: sample ``i``
is ``keyed_randn(noise_keys(seed, i))``) and is judged against the reference endpoint from
that noise: a float64 ``rk45`` solve at a tight tolerance, cached on disk. NFE is what the
wrapped model counted. Each finished row is written at once (atomically), so an
interrupted sweep loses nothing and ``resume`` skips what is done.

Under ``torchrun`` every rank solves its shard of the samples (:mod:`pflow.distributed`);
adaptive solvers share step decisions across ranks, rank 0 gathers the samples, computes
the errors and metrics and writes the files, so the rows equal a single process's.

What a row or a reference is reused on is its full key (:func:`row_key`,
:func:`reference_key`): the model's content hash (:func:`pflow.identity.model_identity`),
the sample shape, samples, seed and noise kind, the grid, the solver with its resolved
options, the tolerance, the reference's tolerance and ``last_step``, the dtypes, device
kind and pflow version. ``resume`` reuses a row of ``bench.json`` only when every part
matches, says on stderr how many rows it reused and why the others were recomputed, and
keeps (marked ``kept``) the earlier rows this run does not produce. A cached reference
carries its key in the file's metadata and is checked on load: a corrupt or mismatched
file is recomputed with a one-line warning; a non-finite reference is an error.

Classifier-free guidance is an axis (``guidance``: scales ``w``) for a class-conditional
model (``digits-cond``): sample ``i`` gets ``labels[i % len(labels)]`` (every class in turn
by default), and for each ``w`` every solver and every peer runs on the same guided model
(:func:`pflow.guide`; peers drive :meth:`pflow.Guided.as_network`), judged against that
``w``'s own float64 reference. A row's key and the reference's key carry the labels, the
scale, the interval and the rescale, so ``resume`` never reuses a row across guidance
settings. Rows record the network rows each sample cost (``rows_per_sample``): a guided
NFE costs two. The table, ``bench.json`` and the figures (one panel per ``w``) are grouped
by guidance.

One run at a time per ``out`` folder: the run holds an exclusive ``flock`` on
``out/.pflow-bench.lock``; a second run into the same folder refuses at once with an
error naming the holder's pid (it does not wait). Files are written atomically with the
mode the umask gives (``0666 & ~umask``).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .distributed import World
from .errors import MaxNFEExceeded, NonFiniteError
from .files import probe_writable, write_atomic
from .guidance import Guided
from .identity import model_identity
from .metrics import digits_fd, gmm_nll, sliced_wasserstein, trajectory_rmse
from .model import EpsModel
from .noise import keyed_randn, noise_keys
from .solve import sample
from .solvers import Solver, parse_solver, resolve_options
from .zoo.registry import BundledModel, load_model

__all__ = [
    "BenchConfig",
    "Row",
    "format_table",
    "key_changes",
    "plan_resume",
    "read_rows",
    "reference_key",
    "row_key",
    "run_bench",
]

LOCK_NAME = ".pflow-bench.lock"


@dataclass
class BenchConfig:
    """What to sweep. Fixed-step solvers run every ``spacing`` x ``steps``; adaptive ones
    run every tolerance in ``tols`` (rtol = atol) and land on the same NFE axis. ``peers``
    names diffusers schedulers (see :mod:`pflow.integrations.diffusers_peers`) that drive
    the same network from the same noise at every ``steps``. ``ref_tol`` defaults to the
    model's own (:class:`~pflow.zoo.registry.BundledModel`). ``grid_nfe``: the NFE near
    which each solver's samples are drawn in ``samples.png``. ``resume`` reuses the rows
    of ``out/bench.json`` whose key matches (see the module docstring).

    ``guidance``: classifier-free guidance scales to sweep (a class-conditional model
    only; empty: the model as it is, unconditioned). ``labels``: the classes, sample ``i``
    getting ``labels[i % len(labels)]`` (default: every class in turn).
    ``guidance_interval`` ``(sigma_lo, sigma_hi)`` and ``guidance_rescale`` ``phi``: see
    :func:`pflow.guide`."""

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
    guidance: Sequence[float] = ()
    labels: Sequence[int] | None = None
    guidance_interval: tuple[float, float] | None = None
    guidance_rescale: float = 0.0


@dataclass
class Row:
    """One solver at one setting. ``run_key`` is everything that produced it
    (:func:`row_key`); ``kept`` marks a row of an earlier run that the run which wrote
    the file did not produce (another configuration: see ``run_key``). ``guidance`` is
    the row's guidance scale (``None``: unguided); ``rows_per_sample`` the network rows
    each sample cost (``nfe`` for a plain model, up to twice that under guidance)."""

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
    kept: bool = False
    run_key: dict[str, Any] = field(default_factory=dict)
    guidance: float | None = None
    rows_per_sample: float | None = None

    @property
    def setting(self) -> str:
        """Which cell of the sweep the row is (solver label, grid, steps or tolerance,
        guidance scale)."""
        return _setting(self.solver, self.spacing, self.steps, self.tol, self.peer, self.guidance)

    @property
    def key(self) -> str:
        """The row's full key as canonical JSON (see :func:`row_key`)."""
        return _canonical(self.run_key)


def _setting(
    solver: str,
    spacing: str,
    steps: int | None,
    tol: float | None,
    peer: bool,
    guidance: float | None = None,
) -> str:
    text = f"{solver}|{spacing}|{steps}|{tol}" + ("|peer" if peer else "")
    return text if guidance is None else f"{text}|w={float(guidance)!r}"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data that survives a round trip through a file unchanged."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


# ---------------------------------------------------------------------------- files


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _check_out(out: Path) -> None:
    """``out`` exists (made if needed) and a file can be created in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as exc:
        raise ValueError(
            f"out folder {str(out)!r} is not writable ({exc.strerror or exc})"
        ) from None


class _OutLock:
    """An exclusive ``flock`` on ``out/.pflow-bench.lock`` for the run; a second run into
    the same folder gets a ValueError naming the holder's pid (no waiting). The lock goes
    with the process (a killed run leaves no stale lock); the file stays."""

    def __init__(self, out: Path) -> None:
        import fcntl

        path = out / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ValueError(
                f"out folder {str(out)!r}: cannot open its lock file ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise ValueError(
                    f"out folder {str(out)!r}: cannot lock {LOCK_NAME} ({exc.strerror}); "
                    "use a folder on a local file system"
                ) from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"out folder {str(out)!r} is in use by another pflow bench (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _lock_out(out: Path) -> _OutLock | None:
    if importlib.util.find_spec("fcntl") is None:  # no flock (Windows): runs are not guarded
        return None
    return _OutLock(out)


# ---------------------------------------------------------------------------- keys


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    if value is _MISSING:
        return "(none)"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


_MISSING = object()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two keys, one phrase per part in ``new``'s order:
    ``["samples changed 16 -> 64", ...]`` (a 64-hex digest shows its first 12 digits)."""
    a, b = _flat(old), _flat(new)
    names = list(b) + [k for k in a if k not in b]
    return [
        f"{k} changed {_short(a.get(k, _MISSING))} -> {_short(b.get(k, _MISSING))}"
        for k in names
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    ]


def _schedule_ends(model: Any) -> dict[str, float | None]:
    schedule = getattr(model, "schedule", None)
    hi = getattr(schedule, "sigma_max", None)
    lo = getattr(schedule, "sigma_min", None)
    return {
        "from": float(hi) if hi is not None else None,
        "via": float(lo) if lo is not None else None,
        "to": 0.0,
    }


def _factory_source(name: str) -> str | None:
    """For a ``module:factory`` model, a digest of the module's source file (so an edit
    of the factory's code changes the key even where the model's tensors do not)."""
    if ":" not in name:
        return None
    try:
        module = importlib.import_module(name.partition(":")[0])
        source = inspect.getsourcefile(module)
        data = Path(source).read_bytes() if source else None
    except (ImportError, OSError, TypeError):
        return None
    return hashlib.sha256(data).hexdigest() if data is not None else None


def _model_part(config_model: str, bundle: BundledModel) -> dict[str, Any]:
    """The model's part of every key: its content hash, the sample shape, the
    ``last_step`` policy and, for a ``module:factory``, its module's source digest."""
    part: dict[str, Any] = {
        "id": model_identity(bundle.model),
        "shape": [int(n) for n in bundle.shape],
        "last_step": bundle.last_step,
    }
    code = _factory_source(config_model)
    if code is not None:
        part["code"] = code
    return part


def reference_key(
    model_part: dict[str, Any],
    bundle: BundledModel,
    samples: int,
    seed: int,
    ref_tol: float,
    guidance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that changes the reference endpoint: the model (``model_part``, see
    :func:`run_bench`), the noise (seed, samples, kind), the grid ends, the solve (float64
    ``rk45`` at ``rtol = atol = ref_tol``), ``last_step`` and, for a guided model, its
    guidance (``guidance``, see :func:`guidance_key`)."""
    extra = {} if guidance is None else {"guidance": dict(guidance)}
    return _jsonable(
        {
            "kind": "pflow-reference",
            "version": 1,
            "model": dict(model_part),
            "samples": int(samples),
            "seed": int(seed),
            "noise": "keyed",
            "grid": _schedule_ends(bundle.model),
            "solver": "rk45",
            "dtype": "float64",
            "tol": float(ref_tol),
            "last_step": bundle.last_step,
            **extra,
        }
    )


def guidance_key(
    bundle: BundledModel,
    labels: Sequence[int],
    scale: float,
    interval: tuple[float, float] | None,
    rescale: float,
) -> dict[str, Any]:
    """The guidance part of a row's and a reference's key: the labels (sample ``i`` gets
    ``labels[i % len(labels)]``), the null label and the network's keyword for them, the
    scale, the sigma interval, the rescale and the batched (one network call) evaluation."""
    return _jsonable(
        {
            "scale": float(scale),
            "labels": [int(v) for v in labels],
            "assign": "index mod len(labels)",
            "null_label": int(bundle.null_label),
            "label_key": bundle.label_key,
            "interval": None if interval is None else [float(v) for v in interval],
            "rescale": float(rescale),
            "batched": True,
        }
    )


def _metric_kind(bundle: BundledModel) -> str | None:
    if bundle.exact is not None:
        return "nll"
    return {"digits": "fd", "digits-cond": "fd", "moons": "sw2"}.get(bundle.name)


def run_key_base(
    config: BenchConfig,
    bundle: BundledModel,
    model_part: dict[str, Any],
    ref_tol: float,
    device: torch.device,
) -> dict[str, Any]:
    """The parts of a row's key that the whole run shares."""
    from . import __version__

    metric: dict[str, Any] = {"name": _metric_kind(bundle)}
    if bundle.exact is not None and bundle.exact is not bundle.model:
        metric["exact"] = model_identity(bundle.exact)
    return _jsonable(
        {
            "model": model_part,
            "samples": int(config.samples),
            "seed": int(config.seed),
            "noise": "keyed",
            "dtype": "float32",
            "net_dtype": config.net_dtype,
            "compile": bool(config.compile),
            "device": device.type,
            "reference": {
                "solver": "rk45",
                "dtype": "float64",
                "tol": float(ref_tol),
                "last_step": bundle.last_step,
            },
            "metric": metric,
            "pflow": __version__,
        }
    )


def row_key(
    base: dict[str, Any],
    solver: str,
    spacing: str,
    steps: int | None,
    tol: float | None,
    peer: bool,
    model_last_step: str,
) -> dict[str, Any]:
    """A row's full key: the run's parts (:func:`run_key_base`), the solver label with
    its resolved options and ``last_step``, the grid options, the tolerance. Two rows with
    equal keys are the same computation."""
    key = dict(base)
    if peer:
        from importlib.metadata import PackageNotFoundError, version

        try:
            lib = version("diffusers")
        except PackageNotFoundError:  # not installed: the run fails later, naming it
            lib = None
        key.update(solver=solver, peer=True, options={"diffusers": lib})
        key["grid"] = {"spacing": "diffusers", "steps": int(steps or 0)}
        key["tol"] = None
        return _jsonable(key)
    spec, from_label = parse_solver(solver)
    options = resolve_options(spec, from_label, {}, solver)
    if spec.stochastic:  # the noise is keyed by the run's seed and each sample's index
        options.pop("seed", None)
        options.pop("generator", None)
    if tol is not None:
        options.update(rtol=float(tol), atol=float(tol))
        grid: dict[str, Any] = {"spacing": "adaptive"}
    else:
        grid = {"spacing": spacing, "steps": int(steps or 0), "steps_offset": 0}
        grid["set_alpha_to_one"] = True
        if spacing == "karras":
            grid["rho"] = 7.0
    key.update(
        solver=solver,
        peer=False,
        options=options,
        last_step=last_step_for(spec, model_last_step),
        grid=grid,
        tol=None if tol is None else float(tol),
    )
    return _jsonable(key)


# ---------------------------------------------------------------------------- resume

_ROW_TYPES: dict[str, tuple[tuple[type, ...], str, bool]] = {
    # name: (accepted types, what is expected, may be null)
    "solver": ((str,), "a string", False),
    "spacing": ((str,), "a string", False),
    "steps": ((int,), "an integer or null", True),
    "tol": ((int, float), "a number or null", True),
    "nfe": ((int,), "an integer", False),
    "rmse": ((int, float), "a number", False),
    "metric": ((int, float), "a number or null", True),
    "metric_name": ((str,), "a string", False),
    "wall_s": ((int, float), "a number", False),
    "peer": ((bool,), "true or false", False),
    "extra": ((dict,), "an object", False),
    "kept": ((bool,), "true or false", False),
    "run_key": ((dict,), "an object", False),
    "guidance": ((int, float), "a number or null", True),
    "rows_per_sample": ((int, float), "a number or null", True),
}
_ROW_OPTIONAL = {"peer", "extra", "kept", "run_key", "guidance", "rows_per_sample"}


def _describe(data: Any) -> str:
    if isinstance(data, list):
        return f"a JSON list of {len(data)} items"
    if isinstance(data, dict):
        return "a JSON object without a 'rows' list"
    return f"JSON {type(data).__name__} {str(data)[:40]!r}"


def _row_from_dict(r: Any, where: str) -> Row:
    if not isinstance(r, dict):
        raise ValueError(f"{where}: expected a row object, got {_describe(r)}")
    values: dict[str, Any] = {}
    for name, (types, what, nullable) in _ROW_TYPES.items():
        if name not in r:
            if name in _ROW_OPTIONAL:
                continue
            raise ValueError(f"{where}: field {name!r} is missing (expected {what})")
        v = r[name]
        ok = (v is None and nullable) or (
            isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        )
        if not ok:
            raise ValueError(f"{where}: field {name!r} must be {what}, got {v!r}")
        values[name] = v
    return Row(**values)


def read_rows(path: Path) -> list[Row]:
    """The rows of a ``bench.json``; a file that is not one gives a ValueError naming
    it and what was expected."""
    where = f"resume file {str(path)!r}"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{where} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(
            f"{where} is not text (expected bench.json written by pflow bench)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "delete it or run without --resume"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(
            f"{where}: expected a JSON object with a 'rows' list (pflow bench's bench.json), "
            f"got {_describe(data)}"
        )
    return [_row_from_dict(r, f"{where}: row {i}") for i, r in enumerate(data["rows"])]


@dataclass
class ResumePlan:
    """Which of this run's rows an earlier file provides (``reused``, by setting), why
    the others are computed (``reasons``), and the earlier rows by setting."""

    reused: dict[str, Row]
    reasons: dict[str, str]
    earlier: dict[str, Row]

    @property
    def untouched(self) -> list[Row]:
        """Earlier rows of settings this run does not have: kept in the files."""
        touched = set(self.reused) | set(self.reasons)
        return [r for s, r in self.earlier.items() if s not in touched]

    def summary(self) -> str:
        counts = Counter(self.reasons.values())
        line = f"{len(self.reused)} rows reused; {len(self.reasons)} recomputed"
        if counts:
            parts = [f"{why} ({n})" if len(counts) > 1 else why for why, n in counts.items()]
            line += ": " + "; ".join(parts)
        kept = len(self.untouched)
        if kept:
            line += f"; {kept} earlier rows of other settings kept in the files"
        return line


def plan_resume(earlier: Sequence[Row], wanted: dict[str, dict[str, Any]]) -> ResumePlan:
    """Match ``earlier`` rows against this run's ``wanted`` keys (setting -> key): a row
    is reused only when its whole key equals the wanted one."""
    by_setting = {r.setting: r for r in earlier}
    reused: dict[str, Row] = {}
    reasons: dict[str, str] = {}
    for setting, key in wanted.items():
        old = by_setting.get(setting)
        if old is None:
            reasons[setting] = "not in the earlier run"
        elif not old.run_key:
            reasons[setting] = "earlier row has no key (older pflow)"
        elif _canonical(old.run_key) == _canonical(key):
            reused[setting] = old
        else:
            reasons[setting] = ", ".join(key_changes(old.run_key, key))
    return ResumePlan(reused, reasons, by_setting)


# ---------------------------------------------------------------------------- reference


def _noise(bundle: BundledModel, indices: range, seed: int) -> torch.Tensor:
    keys = noise_keys(seed, indices)
    return keyed_randn(keys, bundle.shape, dtype=torch.float64)


def _reference_paths(cache_dir: Path | None, key: dict[str, Any]) -> list[Path]:
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]
    # The package ships the reference of the default benchmark (digits, 128 samples,
    # seed 0, rtol = atol = 1e-7), made by benchmarks/published.py; a run's own cache
    # comes first.
    shipped = Path(__file__).parent / "zoo" / "references" / f"reference-{digest}.safetensors"
    own = [cache_dir / f"reference-{digest}.safetensors"] if cache_dir is not None else []
    return [*own, shipped]


def _warn(message: str) -> None:
    print(f"pflow bench: warning: {message}", file=sys.stderr, flush=True)


def _read_reference(
    path: Path, shape: torch.Size, key: dict[str, Any]
) -> tuple[torch.Tensor, int] | str:
    """The cached endpoint and its NFE, or why the file cannot be used."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if not {"x", "nfe"} <= names:
                return "it lacks the tensors 'x' and 'nfe'"
            stored = json.loads(meta["key"]) if "key" in meta else None
            if not isinstance(stored, dict):
                return "it has no key in its metadata"
            if _canonical(stored) != _canonical(key):
                return "it was made for another setup (" + ", ".join(key_changes(stored, key)) + ")"
            x, nfe = f.get_tensor("x"), f.get_tensor("nfe")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recomputed
        return f"it is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    if x.shape != shape or x.dtype != torch.float64:
        return f"it holds {x.dtype} {tuple(x.shape)}, expected float64 {tuple(shape)}"
    if not bool(torch.isfinite(x).all()):
        return "it holds non-finite values"
    return x, int(nfe.item())


def _load_reference(
    paths: list[Path], shape: torch.Size, key: dict[str, Any]
) -> tuple[torch.Tensor, int] | None:
    for candidate in paths:
        if candidate.exists():
            got = _read_reference(candidate, shape, key)
            if not isinstance(got, str):
                return got
            _warn(f"reference cache {str(candidate)!r} not used: {got}; recomputing")
    return None


def _save_reference(path: Path, x: torch.Tensor, nfe: int, key: dict[str, Any]) -> None:
    tensors = {"x": x.contiguous(), "nfe": torch.tensor(nfe)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"key": _canonical(key)}))


def reference_endpoint(
    bundle: BundledModel,
    noise64: torch.Tensor,
    ref_tol: float,
    cache_dir: Path | None,
    cache_key: dict[str, Any],
    world: World | None = None,
    n_total: int | None = None,
    model64: Any = None,
    what: str = "",
) -> tuple[torch.Tensor | None, int]:
    """The ODE's endpoint from ``noise64``: float64 ``rk45`` at ``rtol = atol = ref_tol``,
    from ``sigma_max`` into 0 under the model's ``last_step`` policy. ``model64`` is the
    model to solve, already in float64 (a guided one; default: ``bundle.model`` cast to
    float64); ``what`` says which in error messages (``"under guidance 4"``). Cached on
    disk under ``cache_key`` (:func:`reference_key`), which the file's metadata carries
    and a load checks: a corrupt or mismatched file is recomputed with a warning on
    stderr. A solve that fails or ends non-finite raises
    :class:`~pflow.errors.NonFiniteError` (or :class:`~pflow.errors.MaxNFEExceeded`)
    naming the reference.

    Under a :class:`~pflow.distributed.World` of several ranks ``noise64`` is this rank's
    shard of ``n_total`` samples; the solve shares its steps across ranks and the whole
    endpoint is returned on rank 0 (``None`` elsewhere)."""
    world = world or World()
    n_total = noise64.shape[0] if n_total is None else n_total
    paths = _reference_paths(cache_dir, cache_key)
    cached = None
    if world.is_main:
        cached = _load_reference(paths, torch.Size([n_total, *noise64.shape[1:]]), cache_key)
    if world.broadcast(cached is not None):
        return (cached[0], cached[1]) if cached is not None else (None, 0)
    if model64 is None:
        model = bundle.model
        model64 = (
            model.to(dtype=torch.float64, device=world.device)
            if isinstance(model, (EpsModel, Guided))  # a guided network: a float64 copy too
            else model
        )
    what = f"reference solve (float64 rk45, tol {ref_tol:g}) of model {bundle.name!r}" + (
        f" {what}" if what else ""
    )
    try:
        res = sample(
            model64,  # type: ignore[arg-type]
            noise64.to(world.device),
            "rk45",
            rtol=ref_tol,
            atol=ref_tol,
            last_step=bundle.last_step,  # type: ignore[arg-type]
            process_group=world.group,
        )
    except (NonFiniteError, MaxNFEExceeded) as exc:
        raise type(exc)(f"{what}: {_one_line(exc)}") from None
    x = world.gather(res.x, n_total)
    bad = world.broadcast(None if x is None else int((~torch.isfinite(x)).flatten(1).any(1).sum()))
    if bad:
        raise NonFiniteError(
            f"{what} is not finite for {bad} of {n_total} samples; no row can be scored against it"
        )
    if x is not None and cache_dir is not None:
        _save_reference(paths[0], x, res.nfe, cache_key)
    return x, res.nfe


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    """Every diffusers peer when diffusers is installed and the model is an eps network,
    or a guided network (:class:`~pflow.Guided` over an :class:`EpsModel` of any
    prediction type: the peers drive its guided ``eps``, :meth:`~pflow.Guided.as_network`)."""
    from .integrations import diffusers_peers

    model = bundle.model
    eps_net = (isinstance(model, EpsModel) and model.prediction == "epsilon") or (
        isinstance(model, Guided) and isinstance(model.conditional, EpsModel)
    )
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
    if config.resume and not config.out:
        raise ValueError("resume needs an out folder (out, --out) holding the earlier bench.json")
    bs = config.batch_size
    if bs is not None and (isinstance(bs, bool) or int(bs) != bs or bs < 1):
        raise ValueError(f"batch_size must be a positive integer, got {bs!r}")
    _validate_guidance(config)
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


def _validate_guidance(config: BenchConfig) -> None:
    """The guidance options, before a model is loaded (the labels' classes and the
    interval's range are checked against the model once it is)."""
    scales = list(config.guidance)
    for w in scales:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"guidance scales must be finite numbers >= 0, got {w!r}")
    twice = [w for w, n in Counter(float(w) for w in scales).items() if n > 1]
    if twice:
        raise ValueError(f"guidance scales must differ, got {twice[0]:g} twice")
    if not scales:
        given = [
            name
            for name, is_set in (
                ("labels", config.labels is not None),
                ("guidance_interval", config.guidance_interval is not None),
                ("guidance_rescale", config.guidance_rescale != 0.0),
            )
            if is_set
        ]
        if given:
            raise ValueError(
                f"{given[0]} needs guidance scales (guidance, --guidance; 1 is the "
                "conditional model)"
            )
        return
    if config.labels is not None:
        labels = list(config.labels)
        if not labels:
            raise ValueError("labels must name at least one class, got none")
        for v in labels:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"labels must be integer classes, got {v!r}")


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
    kind = _metric_kind(bundle)
    if kind == "nll":
        return gmm_nll(bundle.exact, x), "nll"  # type: ignore[arg-type]
    if kind == "fd":
        return digits_fd(x), "fd"
    if kind == "sw2":
        from .zoo.data import moons_data

        return sliced_wasserstein(x, moons_data(4096, seed=1)), "sw2"
    return None, ""


def run_bench(config: BenchConfig, world: World | None = None) -> list[Row]:
    """Run the sweep; with ``config.out`` set, write ``bench.json`` and ``bench.csv`` after
    every row, then the plots. Under a :class:`~pflow.distributed.World` of several ranks
    every rank must call it; rank 0 returns the rows and writes the files, the others
    return an empty list.

    The out folder is checked (writable), locked (one run at a time; a second gets a
    ValueError naming the holder's pid) and, with ``resume``, its ``bench.json`` read
    before the model is loaded. The rows returned are this run's (reused or computed);
    the files also keep the earlier rows this run does not produce, marked ``kept``."""
    world = world or World()
    _validate(config)
    out = Path(config.out) if config.out else None
    lock: _OutLock | None = None
    earlier: list[Row] | None = None
    error: str | None = None
    if out is not None and world.is_main:
        try:
            _check_out(out)
            lock = _lock_out(out)
            if config.resume:
                json_path = out / "bench.json"
                earlier = read_rows(json_path) if json_path.exists() else []
        except ValueError as exc:
            error = str(exc)
    try:
        error = world.broadcast(error)
        if error is not None:
            raise ValueError(error)
        return _sweep(config, world, out, earlier)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Group:
    """The rows of one guidance scale (``scale`` None: unguided): their key base, the
    guidance part of their keys, the model the rows run and the float64 reference's."""

    scale: float | None
    base: dict[str, Any]
    part: dict[str, Any] | None
    model: Any
    model64: Any


def _labels(config: BenchConfig, bundle: BundledModel) -> list[int]:
    """The classes cycled over the samples: ``config.labels``, or every class in turn."""
    if config.labels is not None:
        return [int(v) for v in config.labels]
    return list(range(int(bundle.num_classes or 0)))


def _check_conditional(config: BenchConfig, bundle: BundledModel) -> list[int]:
    """The labels of a guided sweep, checked against the model (a class-conditional one)."""
    if getattr(bundle, "num_classes", None) is None:
        raise ValueError(
            f"guidance and labels (--guidance, --label): model {bundle.name!r} is "
            "unconditional; classifier-free guidance needs a class-conditional model "
            "(digits-cond)"
        )
    labels = _labels(config, bundle)
    bundle.check_labels(torch.tensor(labels, dtype=torch.int64), "labels (--label)")
    return labels


def sample_labels(labels: Sequence[int], indices: range) -> torch.Tensor:
    """The labels of the samples ``indices``: sample ``i`` gets ``labels[i % len(labels)]``."""
    table = torch.tensor(list(labels), dtype=torch.int64)
    return table[torch.arange(indices.start, indices.stop, dtype=torch.int64) % len(table)]


def _groups(
    config: BenchConfig,
    bundle: BundledModel,
    base: dict[str, Any],
    model: Any,
    indices: range,
    device: torch.device,
) -> list[_Group]:
    """One group per guidance scale (one unguided group without guidance); every guided
    model is built (and so checked: interval, rescale) before anything is computed."""
    if not config.guidance:
        return [_Group(None, base, None, model, None)]
    labels = _labels(config, bundle)
    mine = sample_labels(labels, indices).to(device)
    prepared = replace(bundle, model=model)
    # One float64 copy of the network, conditioned per scale (the reference solves).
    base64 = bundle.model.to(dtype=torch.float64, device=device)  # type: ignore[union-attr]
    bundle64 = replace(bundle, model=base64)
    interval, rescale = config.guidance_interval, float(config.guidance_rescale)
    groups = []
    for w in config.guidance:
        scale = float(w)
        part = guidance_key(bundle, labels, scale, interval, rescale)
        options: dict[str, Any] = {"interval": interval, "rescale": rescale}
        groups.append(
            _Group(
                scale,
                {**base, "guidance": part},
                part,
                prepared.conditioned(mine, scale, **options),
                bundle64.conditioned(mine, scale, **options),
            )
        )
    return groups


def _per_sample(world: World, total: float, n_local: int, n_total: int) -> float | None:
    """``total`` (this rank's sum over its ``n_local`` samples) summed over the ranks and
    divided by ``n_total``, on rank 0 (``None`` elsewhere)."""
    share = torch.full((n_local,), total / max(n_local, 1), dtype=torch.float64)
    gathered = world.gather(share, n_total)
    return None if gathered is None else float(gathered.mean())


def _sweep(
    config: BenchConfig, world: World, out: Path | None, earlier: list[Row] | None
) -> list[Row]:
    bundle = load_model(config.model)
    if config.guidance:
        _check_conditional(config, bundle)
    if list(config.peers) == ["auto"]:
        config.peers = _auto_peers(bundle)
    ref_tol = config.ref_tol if config.ref_tol is not None else bundle.ref_tol
    if config.samples < world.size:
        raise ValueError(f"samples ({config.samples}) must be at least the number of ranks")
    model_part = _model_part(config.model, bundle)
    base = run_key_base(config, bundle, model_part, ref_tol, world.device)

    indices = world.shard(config.samples)
    model = prepare_model(bundle.model, world.device, config.net_dtype, config.compile)
    groups = _groups(config, bundle, base, model, indices, world.device)
    todo = [
        (group, setting, row_key(group.base, *setting, bundle.last_step))
        for group in groups
        for setting in _settings(config)
    ]
    plan: ResumePlan | None = None
    if world.is_main and earlier is not None and out is not None:
        plan = plan_resume(earlier, {_setting(*s, g.scale): k for g, s, k in todo})
        where = str(out / "bench.json")
        print(
            f"pflow bench: resume from {where!r}: {plan.summary()}"
            if (out / "bench.json").exists()
            else f"pflow bench: resume: no {where!r} yet; computing all {len(todo)} rows",
            file=sys.stderr,
            flush=True,
        )
    reuse: set[str] = world.broadcast(set(plan.reused) if plan is not None else set())
    # Earlier rows stay in the files until this run replaces them: an interrupted resume
    # loses nothing.
    pending: dict[str, Row] = dict(plan.earlier) if plan is not None else {}

    noise64 = _noise(bundle, indices, config.seed).to(world.device)
    noise = noise64.float()
    references: dict[float | None, dict[str, Any]] = {}

    def write(rows: list[Row]) -> None:
        kept = [Row(**{**asdict(r), "kept": True}) for r in pending.values()]
        _write(out, config, bundle, [*rows, *kept], references)  # type: ignore[arg-type]

    rows: list[Row] = []
    grid_samples: dict[str, tuple[int, torch.Tensor]] = {}
    progress = _Progress(len(todo), config.quiet or not world.is_main)
    ref: torch.Tensor | None = None
    for group in groups:
        w = group.scale
        ref_key = reference_key(
            model_part, bundle, config.samples, config.seed, ref_tol, guidance=group.part
        )
        ref, ref_nfe = reference_endpoint(
            bundle,
            noise64,
            ref_tol,
            out / ".cache" if out else None,
            ref_key,
            world=world,
            n_total=config.samples,
            model64=group.model64,
            what="" if w is None else f"under guidance {w:g}",
        )
        references[w] = {
            "solver": "rk45",
            "dtype": "float64",
            "tol": ref_tol,
            "last_step": bundle.last_step,
            "nfe": ref_nfe,
            "key": ref_key,
        }
        for (solver, spacing, steps, tol, peer), key in ((s, k) for g, s, k in todo if g is group):
            setting = _setting(solver, spacing, steps, tol, peer, w)
            if setting in reuse:
                if plan is not None:
                    rows.append(Row(**{**asdict(plan.reused[setting]), "kept": False}))
                    pending.pop(setting, None)
                progress.step(f"{solver} (resumed)")
                continue
            t0 = time.perf_counter()
            where = f"solver {solver!r} ({spacing}, {steps if tol is None else f'tol {tol:g}'}"
            where += ")" if w is None else f", guidance {w:g})"
            try:
                if peer:
                    x, nfe, n_rows = _run_peer(
                        group.model, solver, noise, int(steps or 0), config.batch_size
                    )
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
                    res = sample(group.model, noise, solver, **kwargs)
                    x, nfe, n_rej, n_rows = res.x, res.nfe, res.n_rejected, res.rows
            except (NonFiniteError, MaxNFEExceeded) as exc:  # the same error, naming the row
                raise type(exc)(f"{where}: {_one_line(exc)}") from None
            wall = world.max(time.perf_counter() - t0)
            per_sample = _per_sample(world, float(n_rows), len(indices), config.samples)
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
                extra={"n_rejected": n_rej, "stochastic": stochastic},
                run_key=key,
                guidance=w,
                rows_per_sample=per_sample,
            )
            rows.append(row)
            pending.pop(setting, None)
            label = f"{solver} ({spacing})" if not peer else f"{solver} (diffusers)"
            if w is not None:
                label += f", w={w:g}"
            best = grid_samples.get(label)
            if best is None or abs(nfe - config.grid_nfe) < abs(best[0] - config.grid_nfe):
                grid_samples[label] = (nfe, x[:32].clone())
            if out is not None:
                write(rows)
            progress.step(f"{solver} {spacing} {steps or tol}" + ("" if w is None else f" w={w:g}"))
    if not world.is_main:
        return []
    if out is not None:
        write(rows)
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
    if not isinstance(model, (EpsModel, Guided)):
        if net_dtype is not None or compile or device.type != "cpu":
            raise ValueError("net_dtype, compile and device need an EpsModel (or a guided one)")
        return model
    if device.type != "cpu":
        model = model.to(device=device)
    if net_dtype is not None:
        model = model.with_network_precision(NET_DTYPES[net_dtype])
    return model.compile() if compile else model


def _run_peer(
    model: Any, name: str, noise: torch.Tensor, steps: int, batch_size: int | None
) -> tuple[torch.Tensor, int, int]:
    """diffusers' scheduler ``name`` driving ``model``'s network (a plain ``net(x_t, t)``,
    see :func:`~pflow.integrations.diffusers_peers.peer_network`: a guided model's
    :meth:`~pflow.Guided.as_network`) from ``noise`` in ``batch_size`` chunks, each with
    its samples' conditioning. Returns the samples, the network calls of a chunk and the
    network rows of all chunks."""
    from .integrations.diffusers_peers import peer_network, run_peer

    size = batch_size or noise.shape[0]
    per_sample = getattr(model, "cond_rows", None) is not None
    parts = []
    for i in range(0, noise.shape[0], size):
        chunk = model.take(slice(i, i + size)) if per_sample else model
        net, rows = peer_network(chunk)
        parts.append((*run_peer(name, net, model.schedule, noise[i : i + size], steps), rows))
    return (
        torch.cat([p[0] for p in parts]),
        max(p[1] for p in parts),
        sum(p[2].total for p in parts),
    )


def _plots(
    out: Path,
    bundle: BundledModel,
    rows: list[Row],
    grid_samples: dict[str, tuple[int, torch.Tensor]],
    config: BenchConfig,
) -> None:
    from .plots import plot_samples, plot_vs_nfe

    title = f"{bundle.description}; {config.samples} samples, seed {config.seed}"
    if config.guidance:
        title += "; " + _guidance_words(rows[0].run_key.get("guidance", {}) if rows else {}, True)
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


def _by_guidance(rows: Sequence[Row]) -> list[Row]:
    """``rows`` grouped by guidance scale (unguided first, then by scale), each group in
    its own order."""
    return sorted(rows, key=lambda r: (r.guidance is not None, r.guidance or 0.0))


def _write(
    out: Path,
    config: BenchConfig,
    bundle: BundledModel,
    rows: list[Row],
    references: dict[float | None, dict[str, Any]],
) -> None:
    """``bench.json`` and ``bench.csv``. Unguided: one ``reference``. Guided: the
    reference's common settings with one entry per scale (``reference.by_guidance``), the
    guidance settings (``guidance``), and the rows grouped by scale."""
    guided = bool(config.guidance)
    payload: dict[str, Any] = {
        "config": asdict(config),
        "model": {
            "name": bundle.name,
            "description": bundle.description,
            "shape": list(bundle.shape),
            "last_step": bundle.last_step,
        },
    }
    if not guided:
        payload["reference"] = references.get(None, {})
    else:
        first = next(iter(references.values()), {})
        payload["reference"] = {
            **{k: first.get(k) for k in ("solver", "dtype", "tol", "last_step")},
            "by_guidance": [{"guidance": w, **ref} for w, ref in references.items()],
        }
        part = first.get("key", {}).get("guidance", {})
        payload["guidance"] = {
            "scales": [float(w) for w in config.guidance],
            **{k: v for k, v in part.items() if k != "scale"},
        }
    rows = _by_guidance(rows) if guided or any(r.guidance is not None for r in rows) else rows
    payload["rows"] = [asdict(r) for r in rows]
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
        "kept",
        *(["guidance", "rows_per_sample"] if any(r.guidance is not None for r in rows) else []),
        "samples",
        "seed",
        "model_id",
        "key",
    ]
    lines: list[str] = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    writer = csv.DictWriter(_Sink(), fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        k = r.run_key
        writer.writerow(
            {
                **asdict(r),
                "samples": k.get("samples"),
                "seed": k.get("seed"),
                "model_id": str((k.get("model") or {}).get("id", ""))[:12],
                "key": hashlib.sha256(r.key.encode()).hexdigest()[:16] if k else "",
            }
        )
    _atomic_write(out / "bench.csv", "".join(lines))


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 7]`` as ``"0-3,7"``."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(
            f"{values[i]}-{values[j]}" if j > i + 1 else ",".join(map(str, values[i : j + 1]))
        )
        i = j + 1
    return ",".join(parts)


def _guidance_words(part: dict[str, Any], short: bool = False) -> str:
    """A guidance key part (:func:`guidance_key`) in words, without the scale."""
    labels = part.get("labels") or []
    words = f"labels {_ranges(labels)}" + (
        " cycled" if short else f" (sample i: labels[i mod {len(labels)}])"
    )
    if part.get("interval") is not None:
        lo, hi = (f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in part["interval"])
        words += f", sigma in ({lo}, {hi}]"
    if part.get("rescale"):
        words += f", rescale {part['rescale']:g}"
    return words


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table, one row per solver and setting, sorted by solver then NFE.
    Rows with a guidance scale are grouped by it, one section per scale headed by the
    scale, labels, interval and rescale, with a column of the network rows per sample."""
    metric_name = next((r.metric_name for r in rows if r.metric_name), "")
    guided = any(r.guidance is not None for r in rows)
    head = ["solver", "grid", "steps/tol", "NFE"] + (["rows/sample"] if guided else [])
    head += ["RMSE vs ref", metric_name or "metric", "time s"]
    groups: dict[float | None, list[list[str]]] = {}
    for r in sorted(rows, key=lambda r: (r.peer, r.solver, r.spacing, r.nfe)):
        setting = str(r.steps) if r.steps is not None else f"{r.tol:g}"
        metric = "" if r.metric is None or math.isnan(r.metric) else f"{r.metric:.4f}"
        name = r.solver + (" (diffusers)" if r.peer else "")
        if math.isnan(r.rmse):
            rmse = "n/a (stochastic)" if r.extra.get("stochastic", True) else "nan"
        else:
            rmse = f"{r.rmse:.3e}"
        cells = [name, r.spacing, setting, str(r.nfe)]
        if guided:
            cells.append("" if r.rows_per_sample is None else f"{r.rows_per_sample:g}")
        cells += [rmse, metric, f"{r.wall_s:.2f}"]
        groups.setdefault(r.guidance, []).append(cells)
    body = [cells for group in groups.values() for cells in group]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    top = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    if not guided:
        return "\n".join(top + [fmt.format(*b) for b in body])
    first = {r.guidance: r for r in reversed(rows)}
    lines: list[str] = []
    for w in sorted(groups, key=lambda g: (g is not None, g or 0.0)):
        if lines:
            lines.append("")
        if w is None:
            lines.append("no guidance")
        else:
            words = _guidance_words(first[w].run_key.get("guidance") or {})
            lines.append(f"guidance w = {w:g}: {words}")
        lines += top + [fmt.format(*b) for b in groups[w]]
    return "\n".join(lines)
