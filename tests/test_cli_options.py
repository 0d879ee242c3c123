"""Solver labels with options on the command line: ``--solver "rk45[rtol=1e-3]"``,
``--solvers "unipc[order=3,corrector=false],ddim[eta=1]"``. The options reach the solver;
a bad label fails with one line before any model is loaded; ``--help`` imports no
solver backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import pflow
from pflow.bench import shard_options
from pflow.cli import main
from pflow.cli.args import split_labels
from pflow.distributed import World
from pflow.noise import keyed_randn, noise_keys
from pflow.zoo.registry import load_model

_HELP = """
import contextlib, io, sys
from pflow.cli import main
for cmd in ([], ["bench"], ["sample"], ["nll"], ["encode"], ["decode"], ["roundtrip"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*cmd, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (cmd, exc.code)
print(sorted(m for m in ("torchdiffeq", "scipy") if m in sys.modules))
"""


def test_help_imports_no_solver_backend():
    proc = subprocess.run(
        [sys.executable, "-c", _HELP], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_solver_lists_split_on_commas_outside_brackets():
    text = "unipc[order=3,corrector=false], ddim[eta=1],euler,,torchdiffeq:dopri5"
    assert split_labels(text) == [
        "unipc[order=3,corrector=false]",
        "ddim[eta=1]",
        "euler",
        "torchdiffeq:dopri5",
    ]
    for bad in ("ddim[eta=1", "ddim]eta=1["):
        with pytest.raises(ValueError, match="unbalanced"):
            split_labels(bad)


def _cli_sample(tmp_path, label, *extra):
    out = tmp_path / "x.pt"
    args = ["sample", "--model", "gmm", "--solver", label, "--n", "6", *extra]
    assert main([*args, "--out", str(out)]) == 0
    return torch.load(out)


def _api_sample(solver, last_step, **kw):
    bundle = load_model("gmm")
    noise = keyed_randn(noise_keys(0, range(6)), bundle.shape)
    return pflow.sample(bundle.model, noise, solver, last_step=last_step, **kw).x


@pytest.mark.parametrize(
    "label,name,kw,last_step",
    [
        # The gmm model asks for last_step="solver"; UniPC supports "euler" only, iPNDM both.
        ("unipc[corrector=false]", "unipc", {"corrector": False}, "euler"),
        ("ipndm[variable_step=False]", "ipndm", {"variable_step": False}, "solver"),
    ],
)
def test_label_options_reach_the_solver(tmp_path, label, name, kw, last_step):
    assert load_model("gmm").last_step == "solver"
    x = _cli_sample(tmp_path, label, "--steps", "6")
    assert torch.equal(x, _api_sample(name, last_step, steps=6, **kw))
    default = _api_sample(name, last_step, steps=6)
    assert (x - default).abs().max() > 1e-4  # the option changed the solve


def test_adaptive_label_tolerances(tmp_path, capsys):
    x = _cli_sample(tmp_path, "rk45[rtol=1e-3]")
    assert torch.equal(x, _cli_sample(tmp_path, "rk45", "--rtol", "1e-3"))
    assert torch.equal(x, _api_sample("rk45", "solver", rtol=1e-3))
    capsys.readouterr()
    out = str(tmp_path / "y.pt")
    args = ["sample", "--model", "gmm", "--solver", "rk45[rtol=1e-3]", "--rtol", "1e-4"]
    assert main([*args, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--rtol" in err and "rk45[rtol=1e-3]" in err and err.count("\n") == 1


def test_bench_labels_with_options(tmp_path, capsys):
    labels = "unipc[order=3,corrector=false],unipc,ddim,ddim[eta=1],ipndm[variable_step=false]"
    args = ["bench", "--model", "gmm", "--solvers", labels, "--steps", "4", "--samples", "8"]
    args += ["--peers", "none", "--no-plots", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = {r["solver"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert list(rows) == split_labels(labels)
    assert rows["unipc[order=3,corrector=false]"]["rmse"] != rows["unipc"]["rmse"]
    # draws_noise(options): ddim at eta=0 is the ODE's DDIM, at eta=1 it is not.
    assert rows["ddim"]["rmse"] == rows["ddim"]["rmse"]
    assert rows["ddim[eta=1]"]["rmse"] != rows["ddim[eta=1]"]["rmse"]  # NaN
    assert "n/a (stochastic)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command,label,needles",
    [
        ("bench", "ddim[eat=1]", ["does not take eat", "eta"]),
        ("bench", "euler,ddim[eta=abc]", ["eta", "'abc'"]),
        ("bench", "rk45[rtol=1e-3]", ["drop rtol"]),
        ("bench", "ddim[eta=1", ["unbalanced"]),
        ("sample", "ddim[eat=1]", ["does not take eat", "eta"]),
        ("sample", "ddim[eta=abc]", ["eta", "'abc'"]),
        ("sample", "nope[eta=1]", ["unknown solver in 'nope[eta=1]'"]),
        ("sample", "ddim_inverse", ["only runs up"]),
        ("encode", "ddim[eta=abc]", ["eta", "'abc'"]),
        ("decode", "ddim_inverse", ["decode its latents with --solver euler"]),
        ("roundtrip", "euler,ddim", ["'ddim' only runs down"]),
    ],
)
def test_bad_labels_fail_before_any_model_loads(
    tmp_path, capsys, monkeypatch, command, label, needles
):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a reference solved")

    import pflow.bench
    import pflow.cli.encode

    monkeypatch.setattr(pflow.zoo.registry, "load_model", refuse)
    monkeypatch.setattr(pflow.bench, "load_model", refuse)
    monkeypatch.setattr(pflow.cli.encode, "load_model", refuse)
    monkeypatch.setattr(pflow.bench, "reference_endpoint", refuse)
    out = tmp_path / "out"
    args = {
        "bench": ["bench", "--solvers", label, "--out", str(out)],
        "sample": ["sample", "--solver", label, "--out", str(out / "x.pt")],
        "encode": ["encode", "x.npy", "--model", "gmm", "--solver", label, "--out", "z.pt"],
        "decode": ["decode", "z.pt", "--model", "gmm", "--solver", label, "--out", "x.npy"],
        "roundtrip": ["roundtrip", "--solvers", label, "--out", str(out)],
    }[command]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse: a list that does not parse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 or "usage:" in err
    for needle in needles:
        assert needle in err
    assert not out.exists()  # no reference cache, no rows


def test_shard_options_read_the_parsed_label():
    keys = noise_keys(0, 4)
    assert torch.equal(shard_options("ddim[eta=1]", World(), keys, 2)["seed"], keys)
    assert "seed" not in shard_options("unipc[order=3,corrector=false]", World(), keys, 2)
    assert shard_options("rk45[rtol=1e-3]", World(), keys, 2) == {"batch_size": 2}


def test_encode_label_is_stored_for_decode(tmp_path, capsys):
    x0 = load_model("gmm").exact.sample(4, torch.Generator().manual_seed(0))
    torch.save(x0, tmp_path / "x.pt")
    common = ["--model", "gmm", "--dtype", "float64"]
    label = "rk45[rtol=1e-7,atol=1e-7]"
    z = str(tmp_path / "z.pt")
    assert main(["encode", str(tmp_path / "x.pt"), "--out", z, "--solver", label, *common]) == 0
    assert torch.load(z, weights_only=True)["solver"] == label
    assert main(["decode", z, "--out", str(tmp_path / "back.pt"), *common]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert float((back - x0).abs().max()) < 1e-4
    out = capsys.readouterr().out
    assert "rtol=1e-07, atol=1e-07" in out
    assert main(["decode", z, "--out", str(tmp_path / "b.pt"), "--atol", "1e-3", *common]) == 2
    assert "atol is given twice" in capsys.readouterr().err
