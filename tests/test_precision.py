"""EpsModel's reduced-precision network (``net_dtype``, ``with_network_precision``) and
``compile``: the network runs in bfloat16/float16 or compiled while the ODE state, the
eps/x0 conversion and the solver's steps stay in the caller's dtype."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pflow

from .conftest import tiny_unet
from .reference import rms

STEPS = 4
SOLVERS = ("euler", "heun", "dpmpp_2m")
# Relative RMS error allowed for a network run in a dtype of unit round-off eps. Each
# evaluation rounds its input to the dtype (eps / 2) and every layer rounds its output
# (another ~eps / 2 each, adding up like a random walk over the tiny UNet's ~10 layers),
# and a bfloat16 t is off by up to 2 near t = 1000; a few steps mix these errors without
# amplifying them. The largest error seen here is 1.6 eps (bfloat16 with a bfloat16 t,
# dpmpp_2m), so 8 eps leaves a 5x margin and still fails for any real mistake (a wrong t
# or an output not converted exactly is an O(1) error).
ERR_PER_EPS = 8.0


def _noise(shape: tuple[int, ...] = (4, 3, 8, 8), dtype: torch.dtype = torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(
        dtype
    )


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(channels=3, size=8)


@pytest.fixture(scope="module")
def truth(unet):
    """The float64 network's samples from float64 noise, per solver."""
    model = pflow.EpsModel(unet, pflow.NoiseSchedule.linear()).to(torch.float64)
    return {s: pflow.sample(model, _noise(dtype=torch.float64), s, steps=STEPS).x for s in SOLVERS}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("net_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_reduced_precision_network_close_to_full_precision(
    unet, truth, solver, net_dtype, state_dtype
):
    model = pflow.EpsModel(unet, pflow.NoiseSchedule.linear()).with_network_precision(net_dtype)
    assert model.net_dtype == net_dtype
    assert next(model.net.parameters()).dtype == net_dtype
    assert next(unet.parameters()).dtype == torch.float32  # the original is not cast

    res = pflow.sample(model, _noise(dtype=state_dtype), solver, steps=STEPS)
    assert res.x.dtype == state_dtype
    eps = torch.finfo(net_dtype).eps
    err = float(rms(res.x.double() - truth[solver]) / rms(truth[solver]))
    assert err <= ERR_PER_EPS * eps, f"relative error {err:.3g} = {err / eps:.2f} eps"
    # ... and the network did run in net_dtype: the result carries its round-off, far
    # above float64 agreement (float32's error is ~1e-7 = eps_f32, bfloat16's ~1e-3).
    assert err >= eps / 100, f"relative error {err:.3g} too small for {net_dtype}"


def test_bf16_network_with_bf16_t(unet, truth):
    """``t_dtype=bfloat16`` opts into a rounded ``t`` (multiples of 4 near 1000): still
    within the bound, for networks that need ``t`` in their own dtype."""
    model = pflow.EpsModel(unet, pflow.NoiseSchedule.linear(), t_dtype=torch.bfloat16)
    model = model.with_network_precision(torch.bfloat16)
    assert model.t_dtype == torch.bfloat16
    res = pflow.sample(model, _noise(), "dpmpp_2m", steps=STEPS)
    err = float(rms(res.x.double() - truth["dpmpp_2m"]) / rms(truth["dpmpp_2m"]))
    eps = torch.finfo(torch.bfloat16).eps
    assert eps / 100 <= err <= ERR_PER_EPS * eps


class _RecordingNet:
    """Records the dtypes and values of its inputs; predicts ``tanh(x_t) * (1 + t/1000)``
    computed in float64, returned in ``x_t``'s dtype."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.double().reshape(-1, *([1] * (x_t.ndim - 1)))
        out = (x_t.double().tanh() * (1 + tt / 1000)).to(x_t.dtype)
        self.calls.append((x_t.clone(), t.clone(), out.clone()))
        return out


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("net_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_network_receives_net_dtype_inputs(state_dtype, net_dtype, per_sample):
    schedule = pflow.NoiseSchedule.linear()
    x_t = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(
        state_dtype
    )
    sig64 = torch.tensor([0.3, 2.0, 40.0], dtype=torch.float64)
    sigma: float | torch.Tensor = sig64 if per_sample else 2.0
    col = sig64.reshape(-1, 1) if per_sample else torch.tensor(2.0, dtype=torch.float64)

    net = _RecordingNet()
    eps, x0 = pflow.EpsModel(net, schedule, net_dtype=net_dtype).predict_xt(x_t, sigma)
    x_in, t, out = net.calls[-1]
    assert x_in.dtype == net_dtype and torch.equal(x_in, x_t.to(net_dtype))
    assert t.dtype == state_dtype  # t is not rounded to net_dtype
    expected_t = schedule.sigma_to_t(sig64 if per_sample else 2.0)
    want_t = torch.as_tensor(expected_t, dtype=torch.float64).expand(3).to(state_dtype)
    assert torch.equal(t, want_t)
    # the prediction comes back in the state's dtype, exactly; x0 in the state's dtype
    assert eps.dtype == state_dtype and x0.dtype == state_dtype
    assert torch.equal(eps, out.to(state_dtype))
    x0_64 = x_t.double() * (1 + col**2).sqrt() - col * out.double()
    tol = 8 * torch.finfo(state_dtype).eps * float(x0_64.abs().max())
    assert float((x0.double() - x0_64).abs().max()) <= tol

    # t_dtype sets t's dtype; a quantized t stays int64
    net = _RecordingNet()
    pflow.EpsModel(net, schedule, net_dtype=net_dtype, t_dtype=torch.float32).predict_xt(x_t, sigma)
    assert net.calls[-1][0].dtype == net_dtype and net.calls[-1][1].dtype == torch.float32
    net = _RecordingNet()
    pflow.EpsModel(net, schedule, net_dtype=net_dtype, quantize=True).predict_xt(x_t, sigma)
    assert net.calls[-1][0].dtype == net_dtype and net.calls[-1][1].dtype == torch.int64


def test_default_network_sees_the_state_dtype():
    """Without net_dtype nothing changes: net gets the state's dtype, t included."""
    net = _RecordingNet()
    model = pflow.EpsModel(net, pflow.NoiseSchedule.linear())
    assert model.net_dtype is None and not model.is_compiled and model.eager_net is net
    assert "net_dtype" not in repr(model) and "compiled" not in repr(model)
    for dtype in (torch.float32, torch.float64):
        pflow.sample(model, torch.randn(2, 3, dtype=dtype), "euler", steps=2)
        assert {c[0].dtype for c in net.calls} == {dtype} == {c[1].dtype for c in net.calls}
        net.calls.clear()


@pytest.mark.parametrize("bad", [torch.int32, torch.int64, torch.complex64, "bf16", 16, float])
def test_bad_net_dtype_raises(bad):
    with pytest.raises(TypeError, match="net_dtype must be a floating torch.dtype"):
        pflow.EpsModel(_RecordingNet(), pflow.NoiseSchedule.linear(), net_dtype=bad)


def test_with_network_precision_errors():
    model = pflow.EpsModel(nn.Identity(), pflow.NoiseSchedule.linear())
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        model.with_network_precision(torch.int8)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        model.with_network_precision("bfloat16")  # type: ignore[arg-type]
    plain = pflow.EpsModel(_RecordingNet(), pflow.NoiseSchedule.linear())
    with pytest.raises(TypeError, match=r"needs net to be a torch\.nn\.Module.*net_dtype="):
        plain.with_network_precision(torch.bfloat16)


def test_to_carries_the_options(unet):
    schedule = pflow.NoiseSchedule.cosine()
    model = pflow.EpsModel(unet, schedule, "v_prediction", t_dtype=torch.float32)
    low = model.with_network_precision(torch.bfloat16)
    assert "net_dtype=torch.bfloat16" in repr(low) and "UNet2DModel" in repr(low)
    moved = low.to(device="cpu")  # no dtype: the network stays in bfloat16
    assert moved.net_dtype == torch.bfloat16 and moved.net is not low.net
    assert next(moved.net.parameters()).dtype == torch.bfloat16
    assert (moved.schedule, moved.prediction, moved.t_dtype, moved.quantize) == (
        schedule,
        "v_prediction",
        torch.float32,
        False,
    )
    # casting the network makes it run in the new dtype (net_dtype follows)
    wide = low.to(torch.float64)
    assert wide.net_dtype == torch.float64 and next(wide.net.parameters()).dtype == torch.float64
    res = pflow.sample(wide, _noise(dtype=torch.float32), "euler", steps=2)
    assert res.x.dtype == torch.float32
    # a model without net_dtype keeps none (the float64 reference solve)
    assert model.to(torch.float64).net_dtype is None


class TinyConvNet(nn.Module):
    """Conv - GroupNorm - SiLU - Conv with a sinusoidal time embedding: small enough for
    the inductor backend to compile in seconds."""

    def __init__(self, channels: int = 2, hidden: int = 16, freqs: int = 8) -> None:
        super().__init__()
        self.freqs = freqs
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.temb = nn.Linear(2 * freqs, hidden)
        self.norm = nn.GroupNorm(4, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.freqs, device=x.device, dtype=x.dtype)
        args = t.to(x.dtype)[:, None] * torch.exp(-math.log(1000.0) * k / self.freqs)
        emb = self.temb(torch.cat([args.cos(), args.sin()], dim=1))
        return self.out(F.silu(self.norm(self.inp(x) + emb[:, :, None, None])))


class _RecordingBackend:
    """A torch.compile backend that counts compilations and runs the graph eagerly."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.compiles += 1
        return gm.forward


@pytest.fixture
def conv_net():
    """A fresh TinyConvNet, with dynamo's caches cleared before and after so that no test
    hits the recompile limit (past it dynamo silently runs the network eagerly)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield TinyConvNet().eval().requires_grad_(False)
    torch._dynamo.reset()


def test_compile_passes_kwargs_and_recompiles_on_new_shapes(conv_net):
    model = pflow.EpsModel(conv_net, pflow.NoiseSchedule.linear())
    backend = _RecordingBackend()
    compiled = model.compile(backend=backend, dynamic=False)
    assert compiled.is_compiled and compiled.eager_net is conv_net and compiled.net is not conv_net
    assert "compiled=True" in repr(compiled) and "TinyConvNet" in repr(compiled)
    assert backend.compiles == 0  # lazy
    for batch in (4, 4, 3):
        noise = _noise((batch, 2, 8, 8))
        got = pflow.sample(compiled, noise, "heun", steps=3).x
        assert torch.equal(got, pflow.sample(model, noise, "heun", steps=3).x)
    assert backend.compiles == 2  # batch 4 once for every step and call, then batch 3


def test_compile_eager_backend_and_copies(conv_net):
    """Plumbing with the fast ``eager`` backend: same samples, and to() /
    with_network_precision() / compile() act on the uncompiled network."""
    model = pflow.EpsModel(conv_net, pflow.NoiseSchedule.linear())
    compiled = model.compile(backend="eager")
    noise = _noise((4, 2, 8, 8))
    assert torch.equal(
        pflow.sample(compiled, noise, "dpmpp_2m", steps=3).x,
        pflow.sample(model, noise, "dpmpp_2m", steps=3).x,
    )

    wide = compiled.to(torch.float64)
    assert wide.is_compiled and wide.eager_net is not conv_net
    assert next(wide.eager_net.parameters()).dtype == torch.float64
    n64 = noise.double()
    assert torch.equal(
        pflow.sample(wide, n64, "heun", steps=3).x,
        pflow.sample(model.to(torch.float64), n64, "heun", steps=3).x,
    )

    low = compiled.with_network_precision(torch.bfloat16)
    assert low.is_compiled and low.net_dtype == torch.bfloat16
    got = pflow.sample(low, noise, "heun", steps=3).x
    assert got.dtype == torch.float32
    want = pflow.sample(model.with_network_precision(torch.bfloat16), noise, "heun", steps=3).x
    assert torch.equal(got, want)

    again = compiled.compile(backend="eager", dynamic=False)  # recompiles, never nests
    assert again.eager_net is conv_net and again._compile_kwargs == {
        "backend": "eager",
        "dynamic": False,
    }


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="the inductor backend needs a C++ compiler on the CPU",
)
def test_compile_inductor_matches_eager(conv_net):
    model = pflow.EpsModel(conv_net, pflow.NoiseSchedule.linear())
    noise = _noise((4, 2, 8, 8))
    want = pflow.sample(model, noise, "heun", steps=3).x
    counters = torch._dynamo.utils.counters
    counters.clear()
    got = pflow.sample(model.compile(), noise, "heun", steps=3).x
    assert got.dtype == torch.float32
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, not run eagerly
    # fused kernels reorder float32 sums: agreement to float32 round-off, not bitwise
    assert float(rms(got - want) / rms(want)) <= 1e-5
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
