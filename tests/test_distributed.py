"""Sweeps across processes: ``torchrun`` with 2 CPU ranks (gloo) gives the samples and the
benchmark rows of a single process; batch size and rank do not change a sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pflow
from pflow.cli import main
from pflow.distributed import World, init, shard

from .conftest import make_gmm

distributed = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, "-m", "pflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("n,world", [(1, 1), (7, 2), (37, 2), (100, 8), (5, 5)])
def test_shards_partition_the_samples_in_order(n, world):
    parts = [shard(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_plain_process_is_a_world_of_one():
    w = init("cpu")
    assert (w.rank, w.size, w.group, w.is_main) == (0, 1, None, True)
    x = torch.randn(4, 2)
    assert torch.equal(w.gather(x, 4), x) and w.broadcast(3) == 3 and w.max(2.0) == 2.0
    with pytest.raises(ValueError, match="device"):
        init("tpu")
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)
    assert isinstance(w, World)


@distributed
@pytest.mark.parametrize("solver", ["rk45", "ddim[eta=1]"], ids=["adaptive", "stochastic"])
def test_torchrun_sample_equals_one_process(tmp_path, solver):
    """Adaptive steps are shared across ranks (same NFE, same steps); stochastic noise is
    keyed per sample. The network's float32 GEMMs may round differently for a batch of
    19 than for 37 (or another thread count), so equality is to ~100 float32 ulps
    (bit-equal on the machine we measured); a wrong shard or key moves samples by O(1)."""
    args = ["sample", "--model", "moons", "--solver", solver, "--samples", "37"]
    args += ["--rtol", "1e-3", "--atol", "1e-3"] if solver == "rk45" else ["--steps", "6"]
    assert main([*args, "--out", str(tmp_path / "one.pt")]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two.pt")], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.shape == two.shape == (37, 2)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)


@distributed
def test_torchrun_bench_equals_one_process(tmp_path):
    args = ["bench", "--model", "moons", "--solvers", "euler,rk45,ddim[eta=1]"]
    args += ["--steps", "4,8", "--tols", "1e-2", "--samples", "37", "--ref-tol", "1e-5"]
    args += ["--peers", "none", "--no-plots", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "bench.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "bench.json").read_text())["rows"]
    assert [(r["solver"], r["steps"], r["tol"]) for r in one] == [
        (r["solver"], r["steps"], r["tol"]) for r in two
    ]
    for a, b in zip(one, two):
        assert a["nfe"] == b["nfe"], (a, b)
        assert a["extra"] == b["extra"]
        for field in ("rmse", "metric"):
            if a[field] == a[field]:  # NaN rmse for the stochastic rows
                assert b[field] == pytest.approx(a[field], rel=1e-5), (field, a, b)


@pytest.mark.parametrize("solver,kw", [("dpmpp_2m", {}), ("ddim", {"eta": 1.0, "seed": 5})])
def test_a_sample_does_not_depend_on_its_batch(solver, kw):
    """Same seed, same sample: alone, in a batch, split by batch_size or drawn on another
    rank (the keys say which sample it is). Exact with an elementwise float64 model."""
    gmm = make_gmm(dim=3, k=3, seed=2)
    keys = pflow.noise_keys(5, 12)
    noise = pflow.keyed_randn(keys, (3,), dtype=torch.float64)
    if "seed" in kw:
        kw = {**kw, "seed": keys}
    whole = pflow.sample(gmm, noise, solver, steps=7, **kw).x
    split = pflow.sample(gmm, noise, solver, steps=7, batch_size=5, **kw).x
    assert torch.equal(whole, split)
    rank1 = range(6, 12)  # the second rank of two
    kw1 = {**kw, "seed": pflow.noise_keys(5, rank1)} if "seed" in kw else kw
    noise1 = pflow.keyed_randn(pflow.noise_keys(5, rank1), (3,), dtype=torch.float64)
    assert torch.equal(pflow.sample(gmm, noise1, solver, steps=7, **kw1).x, whole[6:])
