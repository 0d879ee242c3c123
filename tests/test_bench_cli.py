"""The benchmark and the command line: a tiny sweep writes its rows; bad arguments give
a one-line error and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pflow.bench import BenchConfig, run_bench
from pflow.cli import main

TINY = [
    "--model",
    "gmm",
    "--solvers",
    "euler,heun,rk45",
    "--steps",
    "3,6",
    "--tols",
    "1e-2",
    "--samples",
    "16",
    "--quiet",
]


def test_tiny_sweep_writes_json_and_csv(tmp_path, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "RMSE vs ref" in table and "rk45" in table
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    assert {(r["solver"], r["steps"], r["tol"]) for r in rows} == {
        ("euler", 3, None),
        ("euler", 6, None),
        ("heun", 3, None),
        ("heun", 6, None),
        ("rk45", None, 0.01),
    }
    by = {(r["solver"], r["steps"]): r for r in rows}
    assert by[("euler", 3)]["nfe"] == 3 and by[("heun", 3)]["nfe"] == 6  # GMM: no Euler hop
    assert by[("euler", 6)]["rmse"] < by[("euler", 3)]["rmse"]
    assert data["reference"]["dtype"] == "float64"
    csv_lines = (tmp_path / "bench.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("solver,") and len(csv_lines) == 6


def test_resume_skips_finished_rows(tmp_path):
    config = BenchConfig(
        model="gmm", solvers=["euler"], steps=[2, 4], samples=8, out=str(tmp_path), quiet=True
    )
    first = run_bench(config)
    # Mark the finished rows so a re-run that redid them would be visible.
    path = tmp_path / "bench.json"
    data = json.loads(path.read_text())
    data["rows"] = data["rows"][:1]
    data["rows"][0]["wall_s"] = -1.0
    path.write_text(json.dumps(data))
    config.resume = True
    config.steps = [2, 4, 8]
    rows = run_bench(config)
    assert [r.steps for r in rows] == [2, 4, 8]
    assert rows[0].wall_s == -1.0  # resumed, not recomputed
    assert rows[1].rmse == pytest.approx(first[1].rmse)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["bench", "--solvers", "euler,nope"], "unknown solver in 'nope'"),
        (["bench", "--model", "nosuchmodel"], "model must be one of"),
        (["bench", "--steps", "0"], "integers >= 1"),
        (["bench", "--steps", "abc"], "comma-separated integers"),
        (["bench", "--out", "/proc/pflow-cannot-write", "--samples", "4"], "not writable"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "pflow.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_peers_plots_and_sample_command(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench"
    args = [
        "bench",
        "--model",
        "moons",
        "--solvers",
        "euler,heun",
        "--steps",
        "4,8",
        "--samples",
        "8",
        "--ref-tol",
        "1e-5",
        "--peers",
        "ddim,dpmpp_2m",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads((out / "bench.json").read_text())
    peers = [(r["solver"], r["steps"]) for r in data["rows"] if r["peer"]]
    assert sorted(peers) == [("ddim", 4), ("ddim", 8), ("dpmpp_2m", 4), ("dpmpp_2m", 8)]
    by = {(r["solver"], r["peer"], r["steps"]): r for r in data["rows"]}
    assert by[("ddim", True, 4)]["nfe"] == 4
    assert all(r["metric_name"] == "sw2" for r in data["rows"])
    for name in ("error_vs_nfe.png", "metric_vs_nfe.png", "samples.png"):
        assert (out / name).stat().st_size > 1000
    assert "(diffusers)" in capsys.readouterr().out

    npy = tmp_path / "s.npy"
    assert (
        main(
            [
                "sample",
                "--model",
                "gmm",
                "--solver",
                "rk4",
                "--steps",
                "3",
                "--n",
                "5",
                "--out",
                str(npy),
            ]
        )
        == 0
    )
    import numpy as np

    assert np.load(npy).shape == (5, 8)
    assert "NFE 12" in capsys.readouterr().out
    assert (
        main(["sample", "--model", "gmm", "--solver", "euler", "--out", str(tmp_path / "x.txt")])
        == 2
    )


def test_sample_batch_size_and_network_precision(tmp_path):
    """--batch-size splits without changing the samples (to the network's float32
    round-off across batch shapes); --net-dtype bfloat16 runs the network in bfloat16:
    the samples move by about bfloat16's epsilon, not float32's, and stay float32."""
    import torch

    base = ["sample", "--model", "moons", "--solver", "dpmpp_2m", "--steps", "8"]
    base += ["--samples", "40"]
    runs = {
        "one": [],
        "split": ["--batch-size", "7"],
        "bf16": ["--net-dtype", "bfloat16"],
    }
    x = {}
    for name, extra in runs.items():
        assert main([*base, *extra, "--out", str(tmp_path / f"{name}.pt")]) == 0
        x[name] = torch.load(tmp_path / f"{name}.pt")
    # float32 GEMMs may sum in another order for another batch size (and thread count):
    # ~100 ulps after 8 steps; a wrong split or key would move samples by O(1).
    torch.testing.assert_close(x["split"], x["one"], rtol=1e-5, atol=1e-5)
    assert x["bf16"].dtype == torch.float32
    rel = float((x["bf16"] - x["one"]).norm() / x["one"].norm())
    eps = torch.finfo(torch.bfloat16).eps
    assert eps / 50 < rel < 10 * eps, rel
    assert main([*base, "--batch-size", "0", "--out", str(tmp_path / "bad.pt")]) == 2
