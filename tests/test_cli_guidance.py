"""Labels and classifier-free guidance on the command line (``digits-cond``): ``sample``,
``encode``/``decode``, ``roundtrip`` and ``nll`` take ``--label``, ``--guidance``,
``--guidance-interval`` and ``--guidance-rescale``; labels follow the sample indices (a
sample does not depend on ``--batch-size``), a latent records the labels and guidance it
was made with (a decode under others is refused, naming them), ``nll --label true``
reports bits/dim per class, and every misuse is one line naming the option.

Each run is a few samples and a few steps: what is asserted is what the command computes
against the library call on the same noise and data. The bundled ``digits-cond`` weights
may be a placeholder whose output does not depend on the label (zero-initialised
residual branches), so the module swaps in the same network with every parameter drawn
at random (seeded): labels then change every prediction, and no assertion depends on
which weights are bundled.
"""

from __future__ import annotations

import json

import pytest
import torch

import pflow
from pflow.cli import main
from pflow.identity import model_identity
from pflow.noise import keyed_randn, noise_keys
from pflow.zoo import registry
from pflow.zoo.data import digits_data, digits_labels
from pflow.zoo.registry import BundledModel


def _label_sensitive() -> BundledModel:
    """``digits-cond`` with every network parameter redrawn from a seeded generator."""
    bundle = registry.bundled_digits_cond()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bundle.model.net.parameters():  # type: ignore[attr-defined]
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return bundle


@pytest.fixture(autouse=True)
def _random_weights(monkeypatch):
    monkeypatch.setitem(registry._FACTORIES, "digits-cond", _label_sensitive)


@pytest.fixture
def cond_bundle() -> BundledModel:
    return _label_sensitive()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ sample
def test_guided_samples_follow_their_indices_not_the_batches(tmp_path, capsys, cond_bundle):
    """Sample i gets label i % 10 and the noise keyed (seed, i), whatever --batch-size:
    the whole run is the library's guided solve of the 7 samples, and the chunked run
    is the library's solve of each chunk (bit for bit), which agree to round-off."""
    common = ["sample", "--model", "digits-cond", "--label", "0-9", "--guidance", "3"]
    common += ["--solver", "euler", "--steps", "3", "--samples", "7"]
    assert main([*common, "--out", str(tmp_path / "whole.pt")]) == 0
    line = capsys.readouterr().out.strip()
    assert "labels 0-9, guidance 3" in line and "NFE 3 (6 network rows per sample)" in line
    assert main([*common, "--batch-size", "3", "--out", str(tmp_path / "split.pt")]) == 0
    whole = torch.load(tmp_path / "whole.pt")
    split = torch.load(tmp_path / "split.pt")

    def library(lo: int, hi: int) -> torch.Tensor:
        noise = keyed_randn(noise_keys(0, torch.arange(lo, hi)), cond_bundle.shape)
        model = cond_bundle.conditioned(torch.arange(lo, hi) % 10, 3.0)
        return pflow.sample(model, noise, "euler", steps=3).x

    assert torch.equal(whole, library(0, 7))
    assert torch.equal(split, torch.cat([library(0, 3), library(3, 6), library(6, 7)]))
    scale = float(whole.abs().max())
    assert float((whole - split).abs().max()) <= 1e-5 * max(scale, 1.0)
    # The labels reach the network: another label gives another sample.
    other = cond_bundle.conditioned(torch.arange(1, 8) % 10, 3.0)
    noise = keyed_randn(noise_keys(0, 7), cond_bundle.shape)
    diff = (pflow.sample(other, noise, "euler", steps=3).x - whole).abs().max()
    assert float(diff) > 1e-3 * max(scale, 1.0)


@pytest.mark.parametrize(
    "command,argv,needles",
    [
        ("sample", ["--model", "digits", "--label", "3"], ["--label", "unconditional"]),
        ("sample", ["--label", "12"], ["--label", "unknown label 12", "0-9"]),
        ("sample", ["--label", "3", "--guidance", "-1"], ["--guidance", "'-1'"]),
        ("sample", ["--label", "3", "--guidance", "nan"], ["--guidance", "'nan'"]),
        ("sample", ["--guidance", "2"], ["--guidance", "needs --label"]),
        ("sample", ["--guidance-rescale", "0.5"], ["needs --label"]),
        (
            "sample",
            ["--label", "3", "--guidance", "2", "--guidance-interval", "1000,2000"],
            ["--guidance-interval", "(1000, 2000)", "sigma range [0.01, 157.4]"],
        ),
        ("sample", ["--label", "true"], ["--label", "'true'", "reads no labelled data"]),
        ("nll", ["--model", "digits", "--label", "true"], ["--label", "unconditional"]),
        ("roundtrip", ["--model", "gmm", "--label", "1"], ["--label", "unconditional"]),
        ("encode", ["--label", "true"], ["--label", "reads no labelled data"]),
    ],
)
def test_misuse_is_one_line_naming_the_option(tmp_path, capsys, command, argv, needles):
    if command in ("sample", "encode") and "--model" not in argv:
        argv = ["--model", "digits-cond", *argv]
    extra = {
        "sample": ["--samples", "2", "--steps", "2", "--out", str(tmp_path / "x.npy")],
        "nll": ["--n", "2"],
        "roundtrip": ["--samples", "2", "--steps", "2"],
        "encode": ["--out", str(tmp_path / "z.pt")],
    }[command]
    if command == "encode":
        torch.save(digits_data("test")[:2].float(), tmp_path / "x.pt")
        extra = [str(tmp_path / "x.pt"), *extra]
    try:
        code = main([command, *argv, *extra])
    except SystemExit as exc:  # argparse's own check of a value
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert err.strip().count("\n") == 0 or err.startswith("usage:"), err
    for needle in needles:
        assert needle in line, line
    assert not list(tmp_path.glob("*.npy")) and not (tmp_path / "z.pt").exists()


# ------------------------------------------------------------------ encode / decode
def test_a_labelled_latent_decodes_exactly_and_only_under_its_labels(tmp_path, capsys, cond_bundle):
    """encode with labels and guidance (interval, rescale) records them and the identity
    of the guided model; decode takes them from the latent and retraces alf exactly; a
    decode under other labels or another guidance is refused, naming the latent's."""
    x0 = digits_data("test")[:3].float()
    torch.save(x0, tmp_path / "x.pt")
    z, back = str(tmp_path / "z.pt"), str(tmp_path / "back.pt")
    guide = ["--guidance", "2", "--guidance-interval", "0.5,20", "--guidance-rescale", "0.5"]
    enc = ["encode", str(tmp_path / "x.pt"), "--model", "digits-cond", "--out", z]
    assert main([*enc, "--solver", "alf", "--steps", "4", "--label", "3,1,4", *guide]) == 0
    out = capsys.readouterr().out
    assert "labels 3,1,4, guidance 2 for sigma in (0.5, 20], rescale 0.5" in out

    labels = torch.tensor([3, 1, 4])
    model = cond_bundle.conditioned(labels, 2.0, interval=(0.5, 20.0), rescale=0.5)
    record = torch.load(z, weights_only=True)
    assert torch.equal(record["labels"], labels) and record["label"] == "3,1,4"
    assert record["guidance"] == 2.0 and record["guidance_interval"] == [0.5, 20.0]
    assert record["guidance_rescale"] == 0.5
    assert record["model_identity"] == model_identity(model)
    assert record["model_identity"] != model_identity(cond_bundle.model)
    assert torch.equal(record["latent"], pflow.encode(model, x0, "alf", steps=4).x)

    assert main(["decode", z, "--out", back]) == 0
    out = capsys.readouterr().out
    assert "exactly, with the stored companion" in out and "labels 3,1,4, guidance 2" in out
    torch.testing.assert_close(torch.load(back), x0, rtol=0, atol=1e-5)
    # The same conditioning given again is the latent's: accepted.
    again = ["--label", "3,1,4", *guide]
    assert main(["decode", z, "--out", str(tmp_path / "b2.pt"), *again]) == 0
    assert torch.equal(torch.load(tmp_path / "b2.pt"), torch.load(back))
    capsys.readouterr()

    made = "was encoded with labels 3,1,4, guidance 2 for sigma in (0.5, 20], rescale 0.5, "
    for flags, asked in [
        (["--guidance", "3"], "not labels 3,1,4, guidance 3 for sigma in (0.5, 20], rescale"),
        (["--label", "3"], "not labels 3, guidance 2 for sigma"),
        (["--guidance-rescale", "0"], "not labels 3,1,4, guidance 2 for sigma in (0.5, 20]:"),
    ]:
        assert main(["decode", z, "--out", str(tmp_path / "no.pt"), *flags]) == 2, flags
        line = _one_line(capsys.readouterr().err)
        assert made in line and asked in line, line
    assert not (tmp_path / "no.pt").exists()


def test_roundtrip_with_the_data_labels(tmp_path, capsys, cond_bundle):
    """roundtrip --label true runs each test digit under its own label: alf returns the
    data to round-off, euler's error is the library's round trip of the guided model."""
    argv = ["roundtrip", "--model", "digits-cond", "--label", "true", "--guidance", "2"]
    argv += ["--solvers", "alf,euler", "--steps", "2", "--samples", "3"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert "the data's own labels, guidance 2" in capsys.readouterr().out
    rows = {r["solver"]: r for r in json.loads((tmp_path / "roundtrip.json").read_text())}
    x0 = digits_data("test")[:3].float()
    model = cond_bundle.conditioned(digits_labels("test")[:3], 2.0)
    enc = pflow.encode(model, x0, "euler", steps=2)
    dec = pflow.decode(model, enc.x, "euler", steps=2)
    rmse = float((dec.x.double() - x0.double()).pow(2).mean().sqrt())
    assert rows["euler"]["rmse"] == pytest.approx(rmse, rel=1e-12)
    assert rows["alf"]["rmse"] <= 1e-5 * max(1.0, rmse)


# ------------------------------------------------------------------ nll
def test_nll_with_the_data_labels_reports_each_class(tmp_path, capsys, cond_bundle):
    """nll --label true: each sample under its own label at guidance 1 (the conditional
    model), batch by batch (the labels follow the samples into each batch), with a line
    per class of the data whose means are those of its samples."""
    out = tmp_path / "nll.json"
    argv = ["nll", "--model", "digits-cond", "--label", "true", "--n", "4", "--batch-size", "2"]
    argv += ["--hutchinson", "--solver", "bosh3", "--rtol", "1", "--atol", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the data's own labels, guidance 1: the conditional model's log p(x | y)" in text
    record = json.loads(out.read_text())
    labels = digits_labels("test")[:4]
    bpd = torch.tensor(record["per_sample_bits_per_dim"], dtype=torch.float64)
    # The second batch is the library's likelihood of those samples under their labels.
    res = pflow.log_likelihood(
        cond_bundle.conditioned(labels[2:4]),
        digits_data("test")[2:4],
        solver="bosh3",
        rtol=1.0,
        atol=1.0,
        divergence="hutchinson",
        seed=2,
        dequantize=True,
        bin_width=1 / 8,
    )
    torch.testing.assert_close(bpd[2:4], res.bpd, rtol=1e-9, atol=0)
    assert record["label"] == "true" and record["guidance"] == 1.0
    lines = text.splitlines()
    start = lines.index("per class of the data (each under its own label):")
    table = {int(ln.split()[0]): ln.split() for ln in lines[start + 2 :] if ln.startswith("  ")}
    assert set(table) == {int(c) for c in labels}
    for c, cols in table.items():
        mean = float(bpd[labels == c].mean())
        assert int(cols[1]) == int((labels == c).sum())
        assert float(cols[2]) == pytest.approx(mean, abs=6e-5)
        assert record["per_class"][str(c)]["bits_per_dim"] == pytest.approx(mean, rel=1e-12)
    assert f"bits/dim: {float(bpd.mean()):.4f}" in text
