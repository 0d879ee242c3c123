"""Bad input gets an error that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import pflow

from .conftest import make_gmm

GMM = make_gmm(dim=3, k=2)


def test_unknown_solver_lists_known_names():
    with pytest.raises(ValueError, match="solver must be one of euler, heun.*rk45") as info:
        pflow.sample(GMM, torch.randn(2, 3), "dpm++", steps=5)
    for name in pflow.available_solvers():
        assert name in str(info.value)


def test_grid_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        pflow.sample(GMM, x, "euler", steps=0)
    with pytest.raises(ValueError, match="steps is required"):
        pflow.sample(GMM, x, "euler")
    with pytest.raises(ValueError, match="sigmas must be strictly monotone"):
        pflow.sample(GMM, x, "euler", sigmas=[10.0, 1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="sigmas leaves the schedule's range"):
        pflow.sample(GMM, x, "euler", sigmas=[1000.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="sigmas must decrease for sample"):
        pflow.sample(GMM, x, "euler", sigmas=[0.1, 1.0, 10.0])
    with pytest.raises(ValueError, match="either steps or sigmas"):
        pflow.sample(GMM, x, "euler", steps=3, sigmas=[10.0, 0.0])
    with pytest.raises(ValueError, match="steps is for fixed-step solvers"):
        pflow.sample(GMM, x, "rk45", steps=10)
    with pytest.raises(ValueError, match="rtol/atol apply to adaptive solvers"):
        pflow.sample(GMM, x, "heun", steps=10, rtol=1e-3)
    with pytest.raises(ValueError, match="rtol must be > 0"):
        pflow.sample(GMM, x, "rk45", rtol=-1.0)
    with pytest.raises(ValueError, match="last_step must be"):
        pflow.sample(GMM, x, "euler", steps=3, last_step="exact")
    with pytest.raises(TypeError, match="does not take first_step"):
        pflow.sample(GMM, x, "euler", steps=3, first_step=0.1)


def test_state_errors():
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        pflow.sample(GMM, [[0.0, 1.0, 2.0]], "euler", steps=3)
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        pflow.sample(GMM, torch.zeros(2, 3, dtype=torch.long), "euler", steps=3)
    with pytest.raises(ValueError, match="noise has 4 values per sample .* expects 3"):
        pflow.sample(GMM, torch.randn(2, 4), "euler", steps=3)


def test_model_without_schedule_needs_sigmas():
    model = lambda xbar, sigma: GMM(xbar, sigma)  # noqa: E731
    with pytest.raises(ValueError, match="no NoiseSchedule .* pass sigmas="):
        pflow.sample(model, torch.randn(2, 3), "euler", steps=3)
    res = pflow.sample(model, torch.randn(2, 3), "euler", sigmas=[10.0, 1.0, 0.0])
    assert res.nfe == 2


@pytest.mark.parametrize(
    "solver,kw", [("euler", {"steps": 20}), ("rk4", {"steps": 20}), ("rk45", {})]
)
def test_nan_from_the_model_names_the_sigma(solver, kw):
    class Broken:
        schedule = GMM.schedule

        def __call__(self, xbar, sigma):
            eps = GMM(xbar, sigma)
            return eps * float("nan") if float(sigma) < 3.0 else eps

    with pytest.raises(pflow.NonFiniteError, match="NaN or inf at sigma=") as info:
        pflow.sample(Broken(), torch.randn(2, 3), solver, **kw)
    first_bad = float(str(info.value).split("sigma=")[1].split()[0])
    assert first_bad < 3.0


def test_max_nfe_raises_or_returns_partial():
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(pflow.MaxNFEExceeded, match="max_nfe=50"):
        pflow.sample(GMM, x, "rk45", rtol=1e-10, atol=1e-10, max_nfe=50)
    res = pflow.sample(GMM, x, "rk45", rtol=1e-10, atol=1e-10, max_nfe=50, return_partial=True)
    assert not res.finished and res.nfe <= 50 and "max_nfe" in res.message
    assert res.sigmas[-1] > 0 and torch.isfinite(res.x).all()
    full = pflow.sample(GMM, x, "rk45", rtol=1e-10, atol=1e-10)
    assert full.finished and full.nfe > 50
    with pytest.raises(pflow.MaxNFEExceeded):
        pflow.sample(GMM, x, "euler", steps=10, max_nfe=5)
    with pytest.raises(ValueError, match="max_nfe must be a positive integer"):
        pflow.sample(GMM, x, "rk45", max_nfe=0)
