"""Distribution metrics against closed forms, and the bundled models loaded offline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pflow
from pflow.metrics import (
    digits_confident_fraction,
    digits_fd,
    frechet_distance,
    gmm_nll,
    sliced_wasserstein,
)
from pflow.zoo import GaussianMixture
from pflow.zoo.registry import load_model

from .conftest import make_gmm


def test_frechet_distance_is_zero_for_identical_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 16, generator=g, dtype=torch.float64) @ torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    assert abs(frechet_distance(feats, feats)) < 1e-8
    dists = [
        frechet_distance(feats, feats + s * torch.randn(500, 16, generator=g, dtype=torch.float64))
        for s in (0.1, 0.5, 2.0)
    ]
    assert dists[0] < dists[1] < dists[2]
    # Closed form for two Gaussians with equal covariance: |mu_a - mu_b|^2.
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = a + torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(9.0, rel=1e-9)


def test_gmm_nll_of_true_samples_matches_entropy():
    # one Gaussian: H = 0.5 log det(2 pi e S)
    single = make_gmm(dim=3, k=1, seed=1, full=True)
    x = single.sample(40000, torch.Generator().manual_seed(0))
    nll = -single.log_prob(x)
    h = 0.5 * torch.logdet(2 * math.pi * math.e * single.covs[0]).item()
    se = float(nll.std()) / math.sqrt(len(nll))
    assert abs(gmm_nll(single, x) - h) < 4 * se
    # well separated components: H = sum_k w_k H_k - sum_k w_k log w_k
    means = torch.tensor([[-20.0, 0.0], [20.0, 0.0], [0.0, 20.0]], dtype=torch.float64)
    covs = torch.tensor([[1.0, 0.5], [0.3, 0.3], [2.0, 1.0]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mix = GaussianMixture(means, covs, w)
    x = mix.sample(40000, torch.Generator().manual_seed(1))
    h_k = 0.5 * (2 * math.log(2 * math.pi * math.e) + covs.log().sum(1))
    h = float((w * h_k).sum() - (w * w.log()).sum())
    nll = -mix.log_prob(x)
    assert abs(float(nll.mean()) - h) < 4 * float(nll.std()) / math.sqrt(len(nll))


def test_sliced_wasserstein_closed_form_for_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(a, a) == 0.0
    shift = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    # for a pure shift m, each projection moves by u.m: SW2 = sqrt(E (u.m)^2) = |m| / sqrt(d)
    sw = sliced_wasserstein(a, a + shift, projections=4000)
    assert sw == pytest.approx(2.0 / math.sqrt(4), rel=0.05)
    other = torch.randn(3000, 4, generator=g, dtype=torch.float64)  # same law, other size
    assert sliced_wasserstein(a, other) < 0.1 < sw


def test_moons_model_loads_offline_and_samples_near_the_data():
    from pflow.zoo.data import moons_data

    bundle = load_model("moons")
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    res = pflow.sample(bundle.model, noise, "heun", steps=25)
    assert torch.isfinite(res.x).all()
    data = moons_data(2048, seed=3)
    sw_model = sliced_wasserstein(res.x, data)
    sw_noise = sliced_wasserstein(noise, data)
    # measured 0.082 vs 0.315 for N(0, I) itself; the floor is well above it
    assert sw_model < 0.4 * sw_noise, (sw_model, sw_noise)


def test_classifier_recognises_held_out_digits():
    from pflow.zoo.data import digits_data, digits_labels
    from pflow.zoo.networks_load import load_digits_classifier

    net = load_digits_classifier()
    with torch.no_grad():
        pred = net(digits_data("test")).argmax(-1)
    assert float((pred == digits_labels("test")).double().mean()) > 0.95
    assert digits_fd(digits_data("test")) < 1e-6  # the reference set against itself
    assert digits_fd(digits_data("train")) < digits_fd(torch.rand(300, 1, 8, 8) * 2 - 1)


def test_digits_model_samples_are_recognised():
    bundle = load_model("digits")
    noise = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = pflow.sample(bundle.model, noise, "heun", steps=25)  # 49 NFE
    assert torch.isfinite(res.x).all()
    frac = digits_confident_fraction(res.x)
    # measured 0.9x with the bundled weights; the floor is well below it
    assert frac > 0.7, frac
    assert digits_fd(res.x) < 0.5 * digits_fd(torch.rand(128, 1, 8, 8) * 2 - 1)


def test_registry_errors():
    with pytest.raises(ValueError, match="model must be one of"):
        load_model("nope")
    with pytest.raises(ValueError, match="cannot import"):
        load_model("no_such_module_xyz:factory")


def test_user_factory_plugs_in(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import pflow, torch\n"
        "from pflow.zoo import GaussianMixture\n"
        "def make():\n"
        "    d = torch.float64\n"
        "    g = GaussianMixture(torch.zeros(1, 2, dtype=d), torch.ones(1, 2, dtype=d))\n"
        "    return g, (2,)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = load_model("my_models:make")
    assert bundle.shape == (2,)
    res = pflow.sample(bundle.model, torch.randn(4, 2), "euler", steps=3)
    assert np.isfinite(res.x.numpy()).all()
