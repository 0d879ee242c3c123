"""Memory of a solve: a solver's working set does not grow with the number of steps unless
the trajectory is asked for, and ``batch_size=`` caps the batch the network sees without
changing the samples.

How memory is measured here (deterministic, no RSS, no timing). :class:`LiveStorages` is
a ``TorchDispatchMode``: it sees every aten operation run while it is active, including
those inside the network. An operation's output whose storage aliases none of the
operation's inputs is a new allocation (views, in-place and ``out=`` results alias an
input and are not); the mode keeps a weak reference to that storage
(``StorageWeakRef``), which expires exactly when the storage is freed, whoever held it
(Python, a closure, a list, or C++). After every operation it adds up the bytes of the
storages still alive and keeps the maximum. The peak is thus the most memory held at once
by tensors the solve itself allocated: the network's activations, the solver's stages and
history, the result and the trajectory. The noise, the parameters and the schedule were
allocated before the solve and are not counted. The byte comparisons count storages of
at least one state's bytes: the grid (8 bytes per step) and the NaN/inf watch's record
(a float64 scalar per evaluation, folded into a bool tensor every 256) are smaller, and
their number, which matters to a CPU heap, is checked on its own
(``test_number_of_live_allocations_does_not_grow_with_steps``).

Why not ``gc.get_objects()`` at each network call: it only finds tensors that have a live
Python object (not those held only by C++), misses the peaks between calls, and scanning
every object at every call of a 100-step RK4 solve takes tens of seconds. The dispatch
mode is exact and cheap (the whole file runs in seconds).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pflow

BATCH, DIM = 16, 32
STATE_BYTES = BATCH * DIM * 4  # one float32 state of the batch


class LiveStorages(TorchDispatchMode):
    """Peak bytes of live storages allocated while the mode is active.

    Args:
        min_bytes: storages smaller than this are not counted.
    """

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.peak_count = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs or {}))
            if isinstance(t, Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage._cdata, storage.nbytes()
            if key in inputs or key in self.live or size < self.min_bytes:
                continue
            self.live[key] = (StorageWeakRef(storage), size)
        # A weak reference keeps the StorageImpl's address reserved until it is dropped
        # here, so a key cannot be reused by a new storage while it is in self.live.
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        self.peak_count = max(self.peak_count, len(self.live))
        return out


class TinyEps(nn.Module):
    """An elementwise eps network (plus a roll across features): each sample's output
    depends on that sample only, with no batch-dependent reduction, so splitting the
    batch cannot change a single bit."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(0.5 * torch.randn(dim, generator=g))
        self.v = nn.Parameter(0.5 * torch.randn(dim, generator=g))
        self.b = nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        tt = (t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(self.w * x + self.v * x.roll(1, -1) + self.b * tt)


class BatchRecorder(nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.batches: list[int] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return self.net(x, t)


def _model(net: nn.Module | None = None) -> pflow.EpsModel:
    net = TinyEps() if net is None else net
    return pflow.EpsModel(net.requires_grad_(False), pflow.NoiseSchedule.linear())


MODEL = _model()


def _noise(batch: int = BATCH) -> Tensor:
    return torch.randn(batch, DIM, generator=torch.Generator().manual_seed(0))


def _peak(noise: Tensor, solver: str, **kw: Any) -> tuple[int, pflow.SolveResult]:
    """Peak bytes the solve allocated, and its result (alive while measured)."""
    tracker = LiveStorages(STATE_BYTES)
    with tracker:
        res = pflow.sample(MODEL, noise, solver, **kw)
    return tracker.peak, res


# Every native fixed-grid solver (options as given to sample()).
FIXED: list[tuple[str, dict[str, Any]]] = [
    ("euler", {}),
    ("heun", {}),
    ("midpoint", {}),
    ("rk4", {}),
    ("ipndm", {}),
    ("lms", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("dpm_solver_2", {}),
    ("dpm_solver_3", {}),
    ("unipc", {}),
    ("alf", {}),
    ("ddim", {"eta": 1.0, "seed": 0}),
    ("ddpm", {"seed": 0}),
]
ADAPTIVE: list[tuple[str, dict[str, Any]]] = [
    ("rk45", {}),
    ("bosh3", {}),
    ("rk45", {"per_sample": True}),
]


def _ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in cases]


def test_tracker_counts_what_is_alive() -> None:
    """The measure itself: k live new states count k; freed ones and views count 0."""
    x = _noise()
    tracker = LiveStorages(STATE_BYTES)
    with tracker:
        kept = [x * i for i in range(5)]
        for _ in range(20):
            y = x + 1  # freed at the next iteration's assignment
            del y
        views = [k[:, :4] for k in kept]
        kept[0].add_(1.0)
    assert tracker.peak == 6 * STATE_BYTES  # five kept, plus one temporary at a time
    assert len(views) == 5
    tracker = LiveStorages(STATE_BYTES)
    with tracker:
        torch.ones(4)  # below min_bytes
    assert tracker.peak == 0


class Leaky(nn.Module):
    """A network that keeps every output it made: what a leaking solver would do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyEps()
        self.kept: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.net(x, t)
        self.kept.append(out)
        return out


def test_a_leak_is_caught() -> None:
    """The comparison below fails for a solve that keeps one state per evaluation."""
    noise = _noise()
    peaks = []
    for steps in (10, 100):
        model, tracker = _model(Leaky()), LiveStorages(STATE_BYTES)
        with tracker:
            pflow.sample(model, noise, "euler", steps=steps)
        peaks.append(tracker.peak)
    assert peaks[1] - peaks[0] >= 90 * STATE_BYTES


@pytest.mark.parametrize("solver,kw", FIXED, ids=_ids(FIXED))
def test_fixed_grid_memory_does_not_grow_with_steps(solver: str, kw: dict[str, Any]) -> None:
    """The peak working set of a 100-step solve is that of a 10-step one, to the byte:
    what a solver keeps is bounded by its stages and history, not by the steps taken."""
    noise = _noise()
    short, res10 = _peak(noise, solver, steps=10, **kw)
    long, res100 = _peak(noise, solver, steps=100, **kw)
    assert res100.nfe >= 9 * res10.nfe
    assert short >= 3 * STATE_BYTES  # the measure sees the solve at all
    assert long == short, (
        f"{solver}: peak {long / STATE_BYTES:.2f} states at 100 steps, "
        f"{short / STATE_BYTES:.2f} at 10"
    )


@pytest.mark.parametrize("solver,kw", ADAPTIVE, ids=_ids(ADAPTIVE))
def test_adaptive_memory_does_not_grow_with_steps(solver: str, kw: dict[str, Any]) -> None:
    """An adaptive solver's steps are set by the tolerance: many more steps at 1e-5 than
    at 1e-2, the same peak."""
    noise = _noise()
    loose, res_loose = _peak(noise, solver, rtol=1e-2, atol=1e-2, **kw)
    tight, res_tight = _peak(noise, solver, rtol=1e-5, atol=1e-5, **kw)
    assert res_tight.nfe >= 2 * res_loose.nfe
    assert res_tight.n_accepted >= 2 * res_loose.n_accepted
    assert loose >= 3 * STATE_BYTES
    assert tight == loose, (
        f"{solver}: peak {tight / STATE_BYTES:.2f} states at NFE {res_tight.nfe}, "
        f"{loose / STATE_BYTES:.2f} at NFE {res_loose.nfe}"
    )


TRAJECTORY = [case for case in FIXED if case[0] in ("euler", "rk4", "dpmpp_3m", "unipc", "ddim")]


_FEW, _MANY = {"steps": 10}, {"steps": 100}
_LOOSE, _TIGHT = {"rtol": 1e-2, "atol": 1e-2}, {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize(
    "solver,few,many,check_finite",
    [
        pytest.param("euler", _FEW, _MANY, True, id="euler"),
        pytest.param("dpmpp_2m", _FEW, _MANY, True, id="dpmpp_2m"),
        pytest.param("euler", _FEW, _MANY, False, id="euler-check_finite=False"),
        pytest.param("rk45", _LOOSE, _TIGHT, True, id="rk45"),
    ],
)
def test_number_of_live_allocations_does_not_grow_with_steps(
    solver: str, few: dict[str, Any], many: dict[str, Any], check_finite: bool
) -> None:
    """Not only the bytes: the number of live tensors the solve allocated, of any size,
    is bounded too. Small allocations that outlive their step, one per evaluation, count
    even though their bytes do not: among each step's transient activations they fragment
    the CPU heap. When the NaN/inf watch kept one 0-d float64 tensor per evaluation, the
    peak RSS of 256 digits samples with euler (median of fresh processes) went from 23 MiB
    at 10 steps to 37 MiB at 200 steps (26 MiB with ``check_finite=False``)."""
    noise = _noise()
    counts = []
    for kw in (few, many):
        tracker = LiveStorages(1)
        with tracker:
            pflow.sample(MODEL, noise, solver, check_finite=check_finite, **kw)
        counts.append(tracker.peak_count)
    assert counts[1] == counts[0], f"{counts[0]} live tensors at most, then {counts[1]}"


@pytest.mark.parametrize("solver,kw", TRAJECTORY, ids=_ids(TRAJECTORY))
def test_trajectory_memory_grows_with_steps(solver: str, kw: dict[str, Any]) -> None:
    """With ``return_trajectory=True`` memory must grow by at least one state per extra
    step: the same measure that finds no growth above does find it here (a stage-based,
    a multistep, a predictor-corrector and a stochastic solver)."""
    noise = _noise()
    short, res10 = _peak(noise, solver, steps=10, return_trajectory=True, **kw)
    long, res50 = _peak(noise, solver, steps=50, return_trajectory=True, **kw)
    assert res50.trajectory is not None and res10.trajectory is not None
    extra = res50.trajectory.shape[0] - res10.trajectory.shape[0]
    assert extra == 40
    assert long - short >= extra * STATE_BYTES


def test_batch_size_bounds_the_working_memory() -> None:
    """With ``batch_size=8`` the memory beyond the result (the chunks' results and their
    concatenation, two results' worth) is that of one chunk, whatever the batch; without
    it the working set grows with the batch."""
    chunk, _ = _peak(_noise(8), "dpmpp_2m", steps=10)
    for batch in (32, 128):
        result_bytes = batch * DIM * 4
        split, _ = _peak(_noise(batch), "dpmpp_2m", steps=10, batch_size=8)
        whole, _ = _peak(_noise(batch), "dpmpp_2m", steps=10)
        assert split <= chunk + 2 * result_bytes
        assert whole >= (batch // 8) * (chunk - 8 * DIM * 4)


@pytest.mark.parametrize("solver,kw", FIXED, ids=_ids(FIXED))
def test_batch_size_caps_the_network_batch_and_keeps_the_samples(
    solver: str, kw: dict[str, Any]
) -> None:
    """``batch_size=4`` on 10 samples: the network sees batches of 4, 4 and 2, and the
    samples and trajectories are bit for bit those of the unsplit solve (stochastic
    solvers draw per-sample keyed noise from ``seed=``)."""
    noise = _noise(10)
    whole_net, split_net = BatchRecorder(TinyEps()), BatchRecorder(TinyEps())
    whole = pflow.sample(_model(whole_net), noise, solver, steps=7, return_trajectory=True, **kw)
    split = pflow.sample(
        _model(split_net), noise, solver, steps=7, return_trajectory=True, batch_size=4, **kw
    )
    assert set(whole_net.batches) == {10}
    assert max(split_net.batches) == 4
    assert sorted(set(split_net.batches)) == [2, 4]
    assert split_net.batches.count(2) == len(whole_net.batches)
    assert torch.equal(split.x, whole.x)
    assert split.trajectory is not None and whole.trajectory is not None
    assert torch.equal(split.trajectory, whole.trajectory)
    assert split.nfe == whole.nfe and torch.equal(split.sigmas, whole.sigmas)


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_batch_size_with_per_sample_keys(solver: str) -> None:
    """Keys from ``noise_keys`` are split with the batch as an int seed is."""
    noise = _noise(10)
    keys = pflow.noise_keys(3, range(100, 110))
    kw: dict[str, Any] = {"eta": 1.0} if solver == "ddim" else {}
    whole = pflow.sample(MODEL, noise, solver, steps=6, seed=keys, **kw)
    split = pflow.sample(MODEL, noise, solver, steps=6, seed=keys, batch_size=3, **kw)
    assert torch.equal(split.x, whole.x)


@pytest.mark.parametrize("per_sample", [False, True])
def test_batch_size_caps_the_network_batch_of_adaptive_solvers(per_sample: bool) -> None:
    """Adaptive solvers see at most ``batch_size`` samples per call too. Per-sample steps
    do not depend on the other samples, so they give the same samples; shared steps are
    chosen per chunk, so they only agree to the tolerance."""
    noise = _noise(10)
    net = BatchRecorder(TinyEps())
    kw: dict[str, Any] = {"rtol": 1e-4, "atol": 1e-4, "per_sample": per_sample}
    split = pflow.sample(_model(net), noise, "rk45", batch_size=4, **kw)
    whole = pflow.sample(MODEL, noise, "rk45", **kw)
    assert max(net.batches) <= 4
    if per_sample:
        torch.testing.assert_close(split.x, whole.x, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(split.x, whole.x, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2"])
def test_bad_batch_size_raises(bad: Any) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        pflow.sample(MODEL, _noise(5), "euler", steps=3, batch_size=bad)


def test_integral_float_batch_size_acts_as_the_integer() -> None:
    """``batch_size=2.0`` passes the integer check, so it must slice as 2."""
    noise = _noise(5)
    split = pflow.sample(MODEL, noise, "euler", steps=3, batch_size=2.0)  # type: ignore[arg-type]
    assert torch.equal(split.x, pflow.sample(MODEL, noise, "euler", steps=3).x)


def test_batch_size_at_least_the_batch_is_one_solve() -> None:
    noise = _noise(5)
    net = BatchRecorder(TinyEps())
    res = pflow.sample(_model(net), noise, "euler", steps=3, batch_size=64)
    assert set(net.batches) == {5}
    assert torch.equal(res.x, pflow.sample(MODEL, noise, "euler", steps=3).x)
