"""``pflow bench --guidance``: classifier-free guidance as an axis of the sweep.

Each scale's rows and reference carry the guidance in their keys (``--resume`` recomputes
only the rows of a changed guidance), peers drive the guided model as a plain network
(diffusers' DDIM equals pflow's Euler on the DDIM grid under guidance), the figure has one
panel per scale, and guidance on an unconditional model is a one-line error.

Most tests use a tiny class-conditional model written here (its prediction depends on the
label, whatever the bundled ``digits-cond`` weights are); one runs ``digits-cond`` itself
through the command line and checks only what does not depend on its weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pflow
import pflow.bench as bench
from pflow.bench import BenchConfig, run_bench
from pflow.cli import main
from pflow.metrics import trajectory_rmse
from pflow.zoo.registry import BundledModel

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 4)
CLASSES = 3


class TinyCondNet(nn.Module):
    """``eps = tanh(W x + (1 + t/1000) e[label])``: a label-dependent field (label
    ``CLASSES`` is the null label, the default without labels)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        d = SHAPE[-1] * SHAPE[-2]
        self.lin = nn.Linear(d, d)
        self.emb = nn.Embedding(CLASSES + 1, d)
        with torch.no_grad():
            self.lin.weight.copy_(0.5 * torch.randn(d, d, generator=g) / d**0.5)
            self.lin.bias.zero_()
            self.emb.weight.copy_(0.7 * torch.randn(CLASSES + 1, d, generator=g))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), CLASSES)
        h = x.reshape(x.shape[0], -1)
        emb = self.emb(class_labels.reshape(-1).long()).to(h.dtype)
        scale = 1 + t.to(h.dtype).reshape(-1, 1) / 1000
        return torch.tanh(self.lin(h) + scale * emb).reshape(x.shape)


def factory() -> BundledModel:
    model = pflow.EpsModel(TinyCondNet(), pflow.NoiseSchedule.linear(), "epsilon")
    return BundledModel("tinycond", model, SHAPE, "tiny conditional", num_classes=CLASSES)


FACTORY = f"{__name__}:factory"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the machine's cores are shared, and tiny networks only lose
    from more."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def config(out: Path, **kw) -> BenchConfig:
    base = dict(
        model=FACTORY,
        solvers=["euler"],
        steps=[2, 4],
        samples=5,
        ref_tol=1e-5,
        plots=False,
        quiet=True,
        out=str(out),
        guidance=[1.0, 4.0],
    )
    return BenchConfig(**{**base, **kw})


def file_data(out: Path) -> dict:
    return json.loads((out / "bench.json").read_text())


def mark_rows(out: Path) -> None:
    """wall_s = -1 for every row of bench.json: a reused row keeps it."""
    data = file_data(out)
    for r in data["rows"]:
        r["wall_s"] = -1.0
    (out / "bench.json").write_text(json.dumps(data))


def cache_files(out: Path) -> list[Path]:
    return sorted((out / ".cache").glob("reference-*.safetensors"))


def test_each_scale_has_its_rows_keys_and_reference(tmp_path):
    rows = run_bench(config(tmp_path, samples=7, labels=[2, 0]))
    assert [(r.guidance, r.steps) for r in rows] == [(1.0, 2), (1.0, 4), (4.0, 2), (4.0, 4)]
    by = {(r.guidance, r.steps): r for r in rows}
    for steps in (2, 4):
        one, four = by[(1.0, steps)], by[(4.0, steps)]
        assert one.nfe == four.nfe == steps
        # w = 1 is the conditional model (one row per sample), w = 4 costs two.
        assert one.rows_per_sample == steps and four.rows_per_sample == 2 * steps
        assert bench.key_changes(one.run_key, four.run_key) == ["guidance.scale changed 1.0 -> 4.0"]
        assert four.run_key["guidance"]["labels"] == [2, 0]
        assert four.run_key["guidance"]["null_label"] == CLASSES
        assert one.rmse != pytest.approx(four.rmse, rel=1e-3)  # another reference, another field
    data = file_data(tmp_path)
    assert [r["guidance"] for r in data["rows"]] == [1.0, 1.0, 4.0, 4.0]
    assert data["guidance"]["scales"] == [1.0, 4.0] and data["guidance"]["labels"] == [2, 0]
    refs = data["reference"]["by_guidance"]
    assert [r["guidance"] for r in refs] == [1.0, 4.0]
    assert [r["key"]["guidance"]["scale"] for r in refs] == [1.0, 4.0]
    assert len(cache_files(tmp_path)) == 2  # one float64 reference per scale

    # The reference is the guided model's: float64 rk45 from the same keyed noise.
    bundle = factory()
    noise = bench._noise(bundle, range(7), 0)
    labels = bench.sample_labels([2, 0], range(7))
    assert labels.tolist() == [2, 0, 2, 0, 2, 0, 2]
    guided = bundle.conditioned(labels, 4.0)
    ref = pflow.sample(guided.to(torch.float64), noise, "rk45", rtol=1e-5, atol=1e-5).x
    x = pflow.sample(guided, noise.float(), "euler", steps=4).x
    assert by[(4.0, 4)].rmse == pytest.approx(trajectory_rmse(x, ref), rel=1e-6)


def test_resume_recomputes_only_the_rows_of_a_changed_guidance(tmp_path, capsys):
    run_bench(config(tmp_path))
    mark_rows(tmp_path)
    capsys.readouterr()
    rows = run_bench(config(tmp_path, guidance=[1.0, 2.0], resume=True))
    assert [(r.guidance, r.wall_s == -1.0) for r in rows] == [
        (1.0, True),
        (1.0, True),
        (2.0, False),
        (2.0, False),
    ]
    err = capsys.readouterr().err
    assert "2 rows reused; 2 recomputed" in err and "2 earlier rows of other settings kept" in err
    saved = file_data(tmp_path)["rows"]
    assert sorted((r["guidance"], r["kept"]) for r in saved) == [
        (1.0, False),
        (1.0, False),
        (2.0, False),
        (2.0, False),
        (4.0, True),
        (4.0, True),
    ]
    # Interval, rescale and labels are part of every row's key.
    for change, needle in [
        ({"guidance_rescale": 0.5}, "guidance.rescale changed 0.0 -> 0.5"),
        ({"guidance_interval": (0.5, 20.0)}, "guidance.interval changed None -> [0.5, 20.0]"),
        ({"labels": [1]}, "guidance.labels changed [0, 1, 2] -> [1]"),
    ]:
        mark_rows(tmp_path)
        again = run_bench(config(tmp_path, guidance=[1.0, 2.0], resume=True, **change))
        assert all(r.wall_s != -1.0 for r in again)
        err = capsys.readouterr().err
        assert "0 rows reused; 4 recomputed" in err and needle in err


def test_ddim_peer_equals_euler_on_the_ddim_grid_under_guidance(tmp_path, monkeypatch):
    """diffusers' DDIM (leading spacing, set_alpha_to_one) driving the guided network
    equals pflow's Euler on the same grid, guided the same way, interval included; the
    peer is handed a plain ``net(x_t, t)`` per chunk, with the chunk's labels."""
    from pflow.integrations import diffusers_peers

    bundle = factory()
    n, steps = 8, 6
    noise = bench._noise(bundle, range(n), 3).float()
    labels = bench.sample_labels([0, 1, 2], range(n))
    seen = []
    real = diffusers_peers.run_peer

    def spy(name, net, schedule, x, k):
        seen.append(net)
        return real(name, net, schedule, x, k)

    monkeypatch.setattr(diffusers_peers, "run_peer", spy)
    for w, interval in [(3.0, None), (2.5, (0.3, 8.0)), (1.0, None)]:
        guided = bundle.conditioned(labels, w, interval=interval, rescale=0.0)
        x_peer, nfe, rows = bench._run_peer(guided, "ddim", noise, steps, batch_size=3)
        res = pflow.sample(guided, noise, "euler", steps=steps, spacing="leading")
        scale = max(1.0, res.x.abs().max().item())
        assert (x_peer - res.x).abs().max().item() <= 1e-5 * scale, w
        assert nfe == res.nfe == steps
        assert rows == res.rows  # network rows: the same count, the interval included
        if w == 1.0:
            assert rows == n * steps  # the conditional model alone
        elif interval is None:
            assert rows == 2 * n * steps
        else:  # unguided (one row) outside the interval
            assert n * steps < rows < 2 * n * steps
    assert len(seen) == 9  # three chunks (3, 3, 2 samples) per model
    assert all(callable(net) and not hasattr(net, "schedule") for net in seen)

    # In the sweep: the DDIM peer's rows land on Euler [leading]'s, scale by scale.
    rows = run_bench(
        config(
            tmp_path,
            samples=n,
            steps=[steps],
            spacings=["leading"],
            peers=["ddim"],
            guidance=[0.0, 3.0],
            guidance_interval=(0.3, 8.0),
        )
    )
    by = {(r.guidance, r.peer): r for r in rows}
    for w in (0.0, 3.0):
        assert by[(w, True)].rmse == pytest.approx(by[(w, False)].rmse, rel=1e-4)
        assert by[(w, True)].rows_per_sample == by[(w, False)].rows_per_sample
    assert by[(0.0, True)].rows_per_sample == steps  # w = 0: the unconditional model only


def test_one_panel_per_scale_same_colours(tmp_path):
    from pflow.plots import figure_vs_nfe, plt

    rows = run_bench(
        config(tmp_path, solvers=["euler", "dpmpp_2m"], peers=["ddim"], guidance=[1, 2, 4])
    )
    fig = figure_vs_nfe(rows)
    try:
        assert [ax.get_title() for ax in fig.axes] == [f"guidance w = {w}" for w in (1, 2, 4)]
        colours = [
            {ln.get_label(): (ln.get_color(), ln.get_linestyle()) for ln in ax.get_lines()}
            for ax in fig.axes
        ]
        assert colours[0] == colours[1] == colours[2]
        assert colours[0]["ddim (diffusers)"][1] == "--"
        assert colours[0]["euler [trailing]"][1] == "-"
        assert "dashed: diffusers" in fig.legends[0].get_title().get_text()
    finally:
        plt.close(fig)
    unguided = figure_vs_nfe([bench.Row(**{**vars(r), "guidance": None}) for r in rows[:2]])
    assert len(unguided.axes) == 1
    plt.close(unguided)

    table = bench.format_table(rows)
    assert table.count("rows/sample") == 3
    assert "guidance w = 2: labels 0-2" in table
    bench._plots(tmp_path, factory(), rows, {}, config(tmp_path, guidance=[1, 2, 4]))
    assert (tmp_path / "error_vs_nfe.png").stat().st_size > 1000


def test_guidance_on_digits_cond_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--model", "digits-cond", "--guidance", "1,3", "--solvers", "euler"]
    args += ["--steps", "2", "--samples", "4", "--peers", "ddim", "--ref-tol", "1e-3"]
    args += ["--quiet", "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "guidance w = 1: labels 0-9" in table and "guidance w = 3: labels 0-9" in table
    data = file_data(out)
    got = sorted(
        (r["guidance"], r["solver"], r["peer"], r["rows_per_sample"]) for r in data["rows"]
    )
    assert got == [
        (1.0, "ddim", True, 2.0),
        (1.0, "euler", False, 2.0),
        (3.0, "ddim", True, 4.0),
        (3.0, "euler", False, 4.0),
    ]
    assert all(r["run_key"]["guidance"]["labels"] == list(range(10)) for r in data["rows"])
    assert (out / "error_vs_nfe.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--model", "digits", "--guidance", "2"], "model 'digits' is unconditional"),
        (["--model", "digits", "--label", "3"], "model 'digits' is unconditional"),
        (["--model", FACTORY, "--guidance", "2", "--label", "5"], "unknown label 5"),
        (["--model", FACTORY, "--guidance-interval", "0.1,2"], "--guidance-interval: needs"),
        (["--model", FACTORY, "--guidance-rescale", "0.5"], "--guidance-rescale: needs"),
        (["--model", FACTORY, "--guidance", "2", "--label", "true"], "--label: 'true'"),
        (["--model", FACTORY, "--guidance", "2,2"], "guidance scales must differ"),
    ],
    ids=["guidance-digits", "label-digits", "label-range", "interval", "rescale", "true", "twice"],
)
def test_bad_guidance_is_a_one_line_error(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr(bench, "reference_endpoint", refuse)
    args = ["bench", *extra, "--solvers", "euler", "--steps", "2", "--samples", "2"]
    assert main([*args, "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "bench.json").exists()


def refuse(*args, **kwargs):
    raise AssertionError("computed something")


def test_guidance_options_without_scales_are_refused(tmp_path):
    for kw, needle in [
        ({"labels": [1]}, "labels needs guidance scales"),
        ({"guidance_interval": (0.1, 2.0)}, "guidance_interval needs guidance scales"),
        ({"guidance": [float("nan")]}, "finite numbers >= 0"),
        ({"guidance": [1.0], "labels": []}, "at least one class"),
    ]:
        kw = {"guidance": [], **kw}
        with pytest.raises(ValueError, match=needle):
            run_bench(config(tmp_path, **kw))
