"""Bad input gets an error that names the argument and what was expected, before any
network call where the input is the caller's.

Each test here failed before its fix: with a raw TypeError/IndexError/ZeroDivisionError
from deep inside, an error that blamed something else (the model, rtol/atol), or no error
at all (a silently broadcast eps, a corrupted weights file, a reversed beta range).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import pflow
from pflow.grids import get_sigmas
from pflow.zoo import networks_load
from pflow.zoo.networks_load import WeightsDigestError, file_sha256, load_moons_mlp
from pflow.zoo.registry import load_model

from .conftest import make_gmm

GMM = make_gmm(dim=3, k=2)
X = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))


class Forbidden:
    """A model that must not be called: the error comes from validation."""

    schedule = GMM.schedule

    def __call__(self, xbar, sigma):
        raise AssertionError("the model was called before the input was validated")


# -------------------------------------------------------------------- 1. seed


@pytest.mark.parametrize("seed", [1.5, "x", [0, 1.5], torch.zeros(2), True])
def test_seed_of_a_wrong_type_names_seed(seed):
    with pytest.raises(TypeError, match=r"solver 'ddim': seed.*(int|keys)") as info:
        pflow.sample(Forbidden(), X, "ddim", steps=5, eta=1.0, seed=seed)
    assert "len()" not in str(info.value)


def test_seed_of_a_bad_value_names_seed():
    with pytest.raises(ValueError, match=r"seed: an int seed must lie in \[0, 2\*\*31\), got -1"):
        pflow.sample(Forbidden(), X, "ddim", steps=5, eta=1.0, seed=-1)
    with pytest.raises(ValueError, match="seed: per-sample keys must be a 1-D int64 tensor"):
        pflow.sample(Forbidden(), X, "ddim", steps=5, eta=1.0, seed=torch.zeros(2, 1).long())


def test_good_seeds_still_work():
    want = pflow.sample(GMM, X, "ddim", steps=5, eta=1.0, seed=3).x
    for seed in (np.int64(3), pflow.noise_keys(3, 2), pflow.noise_keys(3, 2).tolist()):
        assert torch.equal(pflow.sample(GMM, X, "ddim", steps=5, eta=1.0, seed=seed).x, want)
    label = pflow.sample(GMM, X, "ddim[eta=1,seed=3]", steps=5).x
    assert torch.equal(label, want)


def test_generator_of_a_wrong_type_names_generator():
    with pytest.raises(TypeError, match="solver 'ddim': generator must be a torch.Generator"):
        pflow.sample(Forbidden(), X, "ddim", steps=5, eta=1.0, generator=0)


# ----------------------------------------------------------------- 2. rho, 3. steps_offset


@pytest.mark.parametrize("rho", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_karras_rho_must_be_positive(rho):
    with pytest.raises(ValueError, match=r"rho \(the karras grid's exponent\) must be .* > 0"):
        pflow.sample(Forbidden(), X, "euler", steps=5, spacing="karras", rho=rho)
    with pytest.raises(ValueError, match="rho"):
        get_sigmas(GMM.schedule, 5, "karras", rho=rho)


def test_karras_rho_must_be_a_number():
    with pytest.raises(TypeError, match="rho .* must be a number > 0, got '7'"):
        pflow.sample(Forbidden(), X, "euler", steps=5, spacing="karras", rho="7")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_steps_offset_must_be_a_non_negative_integer(spacing):
    with pytest.raises(TypeError, match="steps_offset must be a non-negative integer, got 1.5"):
        pflow.sample(Forbidden(), X, "euler", steps=5, spacing=spacing, steps_offset=1.5)
    with pytest.raises(ValueError, match="steps_offset must be a non-negative integer, got -1"):
        pflow.sample(Forbidden(), X, "euler", steps=5, spacing=spacing, steps_offset=-1)
    with pytest.raises(TypeError, match="steps_offset"):
        get_sigmas(GMM.schedule, 5, spacing, steps_offset=1.5)
    # an integer of any kind is fine
    a = get_sigmas(GMM.schedule, 5, spacing, steps_offset=1)
    assert torch.equal(a, get_sigmas(GMM.schedule, 5, spacing, steps_offset=np.int64(1)))


# ------------------------------------------------------------------------ 4. first_step


@pytest.mark.parametrize("first_step", [0, 0.0, -1e-3])
def test_first_step_must_be_positive_and_is_named(first_step):
    for call in (
        lambda: pflow.sample(Forbidden(), X, "rk45", first_step=first_step),
        lambda: pflow.log_likelihood(Forbidden(), X, first_step=first_step),
    ):
        with pytest.raises(ValueError, match="first_step must be a number > 0") as info:
            call()
        assert "rtol" not in str(info.value) and "atol" not in str(info.value)


@pytest.mark.parametrize("solver", ["torchdiffeq:dopri5", "scipy:RK45"])
def test_backend_first_step_must_be_positive(solver):
    with pytest.raises(ValueError, match=r"options: first_step must be a finite number > 0"):
        pflow.sample(Forbidden(), X.double(), solver, options={"first_step": 0})


# ----------------------------------------------------------------------- 5. likelihood


def test_log_likelihood_max_nfe_and_empty_batch():
    with pytest.raises(ValueError, match="max_nfe must be a positive integer, got 0"):
        pflow.log_likelihood(Forbidden(), X, max_nfe=0)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, \.\.\.\) with batch >= 1"):
        pflow.log_likelihood(Forbidden(), torch.zeros(0, 3))


# ---------------------------------------------------------------- 6. schedule parameters


def test_cosine_offset_and_max_beta():
    with pytest.raises(ValueError, match=r"^s \(the cosine schedule's offset\) must be >= 0"):
        pflow.NoiseSchedule.cosine(s=-1)
    with pytest.raises(ValueError, match=r"^s .* must be >= 0"):
        pflow.NoiseSchedule.cosine(s=-0.5)
    with pytest.raises(ValueError, match=r"^s must be finite"):
        pflow.NoiseSchedule.cosine(s=float("nan"))
    for max_beta in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match=r"^max_beta must lie in \(0, 1\)"):
            pflow.NoiseSchedule.cosine(max_beta=max_beta)
    assert pflow.NoiseSchedule.cosine(s=0.0).sigma_max > 0


@pytest.mark.parametrize("make", [pflow.NoiseSchedule.linear, pflow.NoiseSchedule.scaled_linear])
def test_beta_range_and_order(make):
    with pytest.raises(ValueError, match=r"beta_start must be <= beta_end.*swapped"):
        make(beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match=r"^beta_start must lie in \(0, 1\), got -0.1"):
        make(beta_start=-0.1, beta_end=0.02)
    with pytest.raises(ValueError, match=r"^beta_end must lie in \(0, 1\), got 1.5"):
        make(beta_start=1e-4, beta_end=1.5)
    with pytest.raises(TypeError, match="^beta_end must be a number"):
        make(beta_end="0.02")


def test_num_train_timesteps_type_and_value():
    for bad in (1.5, True, "1000"):
        with pytest.raises(TypeError, match="num_train_timesteps must be an integer >= 2"):
            pflow.NoiseSchedule.linear(num_train_timesteps=bad)
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 2"):
        pflow.NoiseSchedule.cosine(num_train_timesteps=1)
    assert pflow.NoiseSchedule.linear(num_train_timesteps=np.int64(100)).num_train_timesteps == 100


# ------------------------------------------------------------------- 7. sigma <-> t maps


@pytest.mark.parametrize(
    "t", [float("nan"), -1.0, 1000.0, float("inf")], ids=["nan", "neg", "past", "inf"]
)
@pytest.mark.parametrize("kind", ["float", "tensor", "array"])
def test_t_to_sigma_needs_a_finite_t_in_range(t, kind):
    s = pflow.NoiseSchedule.linear()
    value = {"float": t, "tensor": torch.tensor([1.0, t]), "array": np.array([1.0, t])}[kind]
    with pytest.raises(ValueError, match=r"^t must be .*finite and in \[0, 999\], got "):
        s.t_to_sigma(value)


@pytest.mark.parametrize("sigma", [float("nan"), -1.0, float("inf")], ids=["nan", "neg", "inf"])
@pytest.mark.parametrize("kind", ["float", "tensor", "array"])
def test_sigma_to_t_needs_a_finite_non_negative_sigma(sigma, kind):
    s = pflow.NoiseSchedule.linear()
    value = {"float": sigma, "tensor": torch.tensor([1.0, sigma]), "array": np.array([sigma])}
    with pytest.raises(ValueError, match=r"^sigma must be a noise level: finite and >= 0"):
        s.sigma_to_t(value[kind])


def test_sigma_t_maps_keep_their_range_behaviour():
    s = pflow.NoiseSchedule.linear()
    assert s.t_to_sigma(0.0) == pytest.approx(s.sigma_min, rel=1e-14)
    assert s.t_to_sigma(999) == pytest.approx(s.sigma_max, rel=1e-14)
    assert s.sigma_to_t(0.0) == 0.0 and s.sigma_to_t(1e9) == 999.0  # clamped, as documented
    assert s.sigma_to_t(torch.tensor([0.0, 1e-9])).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------- 8. t_dtype


@pytest.mark.parametrize("t_dtype", ["float", torch.long, float])
def test_t_dtype_must_be_a_torch_floating_dtype(t_dtype):
    with pytest.raises(TypeError, match="^t_dtype must be a floating torch.dtype"):
        pflow.EpsModel(lambda x, t: x, GMM.schedule, t_dtype=t_dtype)
    assert pflow.EpsModel(lambda x, t: x, GMM.schedule, t_dtype=torch.float64).t_dtype


# ------------------------------------------------------------- 9. singular Newton matrix


class Degenerate:
    """``eps`` with a huge rank-one Jacobian: ``I - h*gamma*J`` rounds to a singular
    matrix in float64 on the first implicit step."""

    schedule = GMM.schedule

    def __call__(self, xbar, sigma):
        return 1e30 * xbar.sum(dim=1, keepdim=True).expand_as(xbar)


@pytest.mark.parametrize("batch", [1, 2], ids=["dense-LU", "sparse-LU"])
@pytest.mark.parametrize("method", ["BDF", "Radau"])
def test_singular_newton_matrix_is_explained(method, batch):
    noise = torch.randn(batch, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="Newton matrix .* was singular at sigma=") as info:
        pflow.sample(Degenerate(), noise, f"scipy:{method}", max_nfe=2000)
    text = str(info.value)
    assert f"scipy {method}" in text and "rtol/atol" in text and "explicit method" in text
    assert not isinstance(info.value, pflow.MaxNFEExceeded)


# ---------------------------------------------------------------- 10. non-finite input


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_argument_not_the_model(bad):
    x = X.clone()
    x[1, 2] = bad
    calls = [
        ("noise", lambda: pflow.sample(Forbidden(), x, "euler", steps=5)),
        ("noise", lambda: pflow.sample(Forbidden(), x, "rk45")),
        ("noise", lambda: pflow.reference(Forbidden(), x)),
        ("x0", lambda: pflow.encode(Forbidden(), x, "euler", steps=5)),
        ("z", lambda: pflow.decode(Forbidden(), x, "euler", steps=5)),
        ("x", lambda: pflow.log_likelihood(Forbidden(), x)),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"^{name} must be finite: it has 1 NaN/inf") as info:
            call()
        assert "(1, 2)" in str(info.value)


def test_non_finite_companion_is_named():
    x = X.double()
    enc = pflow.encode(GMM, x, "alf", steps=4)
    companion = enc.companion.clone()
    companion[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="solver 'alf': companion: must be finite"):
        pflow.decode(Forbidden(), enc.x, "alf", steps=4, companion=companion)


def test_finite_input_of_huge_values_is_not_flagged():
    # float64 values whose sum overflows: the input check must not call them non-finite
    x = torch.full((2, 3), 1e308, dtype=torch.float64)
    seen = []

    def model(xbar, sigma):
        seen.append(1)
        return torch.zeros_like(xbar)

    pflow.sample(model, x, "euler", sigmas=[10.0, 1.0])
    assert seen


# ------------------------------------------------------------- 11. what the model returns


@pytest.mark.parametrize("solver", ["euler", "rk45", "dpmpp_2m", "scipy:RK45"])
def test_model_returning_a_wrong_shape_is_an_error(solver):
    def broadcasting(xbar, sigma):  # one eps for the whole batch: broadcasts silently
        return GMM(xbar, sigma)[:1]

    with pytest.raises(ValueError) as info:
        pflow.sample(broadcasting, X.double(), solver, sigmas=[10.0, 1.0, 0.0])
    text = str(info.value)
    assert "broadcasting" in text and "(1, 3)" in text and "(2, 3)" in text


@pytest.mark.parametrize(
    "returned,what",
    [(lambda xbar: (xbar,), "tuple"), (lambda xbar: 1.0, "float"), (lambda xbar: None, "None")],
)
def test_model_returning_a_non_tensor_is_a_type_error(returned, what):
    class Odd:
        def __call__(self, xbar, sigma):
            return returned(xbar)

    with pytest.raises(
        TypeError, match=rf"the model 'Odd' must return eps as a torch.Tensor.*{what}"
    ):
        pflow.sample(Odd(), X, "euler", sigmas=[10.0, 1.0, 0.0])


def test_likelihood_checks_the_model_output_too():
    with pytest.raises(ValueError, match=r"returned eps of shape \(1, 3\)"):
        pflow.log_likelihood(lambda xb, s: GMM(xb, s)[:1], X.double(), sigma_min=0.1, sigma_max=10)


# ------------------------------------------------------------------ 12. user factories


FACTORIES = """
import torch
from pflow.zoo import GaussianMixture
from pflow.zoo.registry import BundledModel

d = torch.float64
g = GaussianMixture(torch.zeros(1, 2, dtype=d), torch.ones(1, 2, dtype=d))

def number():
    return 3

def triple():
    return g, (2,), "extra"

def int_shape():
    return g, 2

def zero_shape():
    return g, (0,)

def float_shape():
    return g, (2.0,)

def not_a_model():
    return "gmm", (2,)

def bundled_bad_shape():
    return BundledModel("b", g, (-2,))

def size_shape():
    return g, torch.Size([2])

not_callable = 3
"""


@pytest.mark.parametrize(
    "factory,error,match",
    [
        ("number", TypeError, r"must return a pflow.zoo.BundledModel or a pair .*got int"),
        ("triple", TypeError, r"must return .* got a tuple of 3"),
        ("int_shape", TypeError, r"returned sample_shape 2; it must be a tuple of positive"),
        ("zero_shape", ValueError, r"returned sample_shape \(0,\); it must be a tuple of positive"),
        ("float_shape", TypeError, r"returned sample_shape \(2.0,\)"),
        ("not_a_model", TypeError, r"returned a model that is not callable"),
        ("bundled_bad_shape", ValueError, r"returned sample_shape \(-2,\)"),
        ("not_callable", TypeError, r"'not_callable' in 'clear_factories' must be a factory"),
    ],
)
def test_factory_returning_a_bad_value_names_the_factory(
    tmp_path, monkeypatch, factory, error, match
):
    (tmp_path / "clear_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(error, match=match) as info:
        load_model(f"clear_factories:{factory}")
    assert f"clear_factories:{factory}" in str(info.value)


def test_factory_returning_a_torch_size_is_fine(tmp_path, monkeypatch):
    (tmp_path / "clear_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_model("clear_factories:size_shape").shape == (2,)


# ---------------------------------------------------------------- 13. bundled weights


def test_every_bundled_weights_file_has_a_matching_digest_in_its_card():
    files = sorted(networks_load.WEIGHTS_DIR.glob("*.safetensors"))
    names = {p.name for p in files}
    assert {"digits_unet.safetensors", "digits_cond_unet.safetensors"} <= names, names
    for path in files:
        card = json.loads(path.with_suffix(".json").read_text())
        assert re.fullmatch(r"[0-9a-f]{64}", card["sha256"])
        assert card["sha256"] == file_sha256(path)
        assert networks_load.verify(path.name) == path


def _copy_moons(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(networks_load.WEIGHTS_DIR / f"moons_mlp{suffix}", tmp_path)
    return tmp_path / "moons_mlp.safetensors"


def test_a_flipped_byte_in_bundled_weights_is_an_error(tmp_path):
    from safetensors.torch import load_file

    path = _copy_moons(tmp_path)
    good = load_moons_mlp(weights_dir=tmp_path)  # the unchanged copy loads
    expected = file_sha256(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a byte of the last tensor's data: the file still parses
    path.write_bytes(bytes(data))
    actual = file_sha256(path)
    load_file(str(path))  # safetensors itself does not notice ...
    with pytest.raises(WeightsDigestError) as info:  # ... the loader does
        load_moons_mlp(weights_dir=tmp_path)
    text = str(info.value)
    assert str(path) in text and expected in text and actual in text
    assert isinstance(info.value, ValueError)
    assert next(good.parameters()).dtype == torch.float32


def test_weights_without_a_card_or_digest_are_an_error(tmp_path):
    path = _copy_moons(tmp_path)
    card = path.with_suffix(".json")
    meta = json.loads(card.read_text())
    del meta["sha256"]
    card.write_text(json.dumps(meta))
    with pytest.raises(WeightsDigestError, match="records no sha256 for moons_mlp.safetensors"):
        load_moons_mlp(weights_dir=tmp_path)
    card.unlink()
    with pytest.raises(FileNotFoundError, match="model card .*moons_mlp.json"):
        load_moons_mlp(weights_dir=tmp_path)


# ----------------------------------------------------------- reference needs float64


def test_reference_with_a_float32_network_says_to_pass_a_float64_model():
    net = load_moons_mlp()
    model = pflow.EpsModel(net, pflow.NoiseSchedule.linear())
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"float64 model.*float32.*model\.to\(torch\.float64\)"):
        pflow.reference(model, noise)
    # a plain callable around the network: its dtype error is explained
    with pytest.raises(TypeError, match=r"float64 model.*net\.double\(\)"):
        pflow.reference(
            lambda xb, s: net(xb, torch.full((xb.shape[0],), 500.0)), noise, sigmas=[10.0, 1.0]
        )
    # the user's network was not changed, and the float64 copy solves
    assert next(net.parameters()).dtype == torch.float32
    res = pflow.reference(model.to(torch.float64), noise, rtol=1e-4, atol=1e-4)
    assert res.x.dtype == torch.float64 and torch.isfinite(res.x).all()
