"""The command line under faults, driven as a subprocess: a latent and its companion
cannot come apart, an unwritable ``--out`` fails before the model loads, every failure
is one line on stderr (a traceback only with ``--debug``), an impossible ``--samples``
fails before allocating, ``nll --probes`` needs ``--hutchinson``, and SIGINT on
``pflow sample`` writes the finished chunks without a traceback.

Each ``python -m pflow.cli`` start imports torch (seconds), so the scenarios that run
several commands run them through :func:`pflow.cli.main` in one subprocess (a batch), and
the fixture ``started`` starts every independent subprocess at once; each test waits for
its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pflow
from pflow.zoo.registry import builtin_gmm

# Factories for --model module:factory, written into tmp_path and imported from there.
_FACTORIES = '''
import os, time, pathlib
from pflow.zoo.registry import builtin_gmm

HERE = pathlib.Path(__file__).parent


class Wrap:
    """The bundled mixture, counting (calls.txt), slowed (SLOW seconds) or poisoned."""

    def __init__(self, inner, nan=False):
        self.inner, self.schedule, self.nan, self.calls = inner, inner.schedule, nan, 0

    def __call__(self, x, sigma):
        self.calls += 1
        (HERE / "calls.txt").write_text(str(self.calls))
        time.sleep(float(os.environ.get("SLOW", "0")))
        eps = self.inner(x, sigma)
        return eps * float("nan") if self.nan else eps


def marked():
    (HERE / "loaded.txt").write_text("a model was loaded")
    b = builtin_gmm()
    return Wrap(b.model), b.shape


def slow():
    b = builtin_gmm()
    return Wrap(b.model), b.shape


def poisoned():
    b = builtin_gmm()
    return Wrap(b.model, nan=True), b.shape


def broken():
    raise RuntimeError("checkpoint missing:\\n  /nowhere/weights.safetensors")
'''

# Runs pflow.cli.main on each argv of a JSON list, in one process: code, stdout, stderr
# and wall time of each.
_DRIVER = r"""
import contextlib, io, json, sys, time
from pflow.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append(
        {"code": code, "out": out.getvalue(), "err": err.getvalue(),
         "seconds": time.perf_counter() - t0}
    )
print(json.dumps(results))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PFLOW_DEBUG": "", **extra}


def _default_sigint() -> None:
    # A child of a shell's background job inherits SIGINT ignored; Python then never
    # raises KeyboardInterrupt. The test wants what a terminal's Ctrl-C does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Job:
    """A started subprocess: ``python -m pflow.cli ARGS`` (``result()``: returncode,
    stdout, stderr) or a batch of ``main(argv)`` calls (``result()``: one dict per argv:
    code, out, err, seconds)."""

    def __init__(self, cwd: Path, cmd: list[str], env: dict[str, str], batch: bool) -> None:
        self.cwd, self.batch = cwd, batch
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._result: Any = None

    def result(self) -> Any:
        if self._result is None:
            out, err = self.proc.communicate(timeout=300)
            if self.batch:
                assert self.proc.returncode == 0, err[-3000:]
                self._result = json.loads(out)
            else:
                self._result = subprocess.CompletedProcess([], self.proc.returncode, out, err)
        return self._result


def _workdir(root: Path) -> Path:
    (root / "factories.py").write_text(_FACTORIES)
    return root


def _cli(cwd: Path, *args: str, **env: str) -> _Job:
    return _Job(cwd, [sys.executable, "-m", "pflow.cli", *args], _env(**env), batch=False)


def _batch(cwd: Path, *argvs: list[str], **env: str) -> _Job:
    cmd = [sys.executable, "-c", _DRIVER, json.dumps(list(argvs))]
    return _Job(cwd, cmd, _env(**env), batch=True)


def _one_line(err: str) -> str:
    """The single line of ``err`` (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _gmm_data(cwd: Path, n: int = 6) -> Path:
    x0 = builtin_gmm().exact.sample(n, torch.Generator().manual_seed(0))
    np.save(cwd / "x.npy", x0.numpy())
    return cwd / "x.npy"


# ------------------------------------------------------------------ every subprocess at once
_OTHER = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
_GMM_COMMON = ["--model", "gmm", "--steps", "8", "--dtype", "float64"]
_OUT_CASES = [
    (["sample", "--samples", "4", "--out", "/sys/pflow-test/x.npy"], "/sys"),
    (["sample", "--samples", "4", "--out", "a_folder"], "is a folder"),
    (["encode", "x.npy", "--out", "x.npy/z.pt"], "is a file, not a folder"),
    (["decode", "z.pt", "--out", "/sys/back.npy"], "/sys"),
    (["roundtrip", "--solvers", "euler", "--steps", "2", "--out", "x.npy"], "is a file"),
    (["nll", "--n", "2", "--out", "/sys/pflow-test/nll.json"], "/sys"),
]
_UNREADABLE = ("pickled.pt", "cut.pt", "text.npy")
_POISONED = ["sample", "--model", "factories:poisoned", "--samples", "4", "--out", "x.npy"]


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every independent subprocess of this file, started together (each in its own
    folder, set up first); a test waits for the ones it reads."""
    import pickle

    def workdir(name: str) -> Path:
        return _workdir(tmp_path_factory.mktemp(name))

    jobs: dict[str, _Job] = {}

    # The stale-companion scenario, with the sibling older versions left planted first.
    d = workdir("stale")
    _gmm_data(d)
    stale = pflow.encode(builtin_gmm().model, _OTHER, "alf", steps=8).companion
    np.save(d / "z.companion.npy", stale.numpy())
    jobs["stale"] = _batch(
        d,
        ["encode", "x.npy", "--out", "z.npy", "--solver", "alf", *_GMM_COMMON],
        ["encode", "x.npy", "--out", "z.npy", "--solver", "euler", *_GMM_COMMON],
        ["decode", "z.npy", "--out", "back.npy", "--solver", "alf", *_GMM_COMMON],
    )

    d = workdir("refused")
    _gmm_data(d)
    encode = ["encode", "x.npy", "--out", "z.pt", "--solver", "alf", "--steps", "8"]
    jobs["refused"] = _batch(d, [*encode, "--model", "gmm", "--dtype", "float64"])

    d = workdir("unreadable")
    with open(d / "pickled.pt", "wb") as f:
        pickle.dump({"latent": object()}, f)
    (d / "cut.pt").write_bytes(b"PK\x03\x04 not a whole file")
    (d / "text.npy").write_text("not an array")
    argvs = [["decode", name, "--model", "gmm", "--out", "o.npy"] for name in _UNREADABLE]
    jobs["unreadable"] = _batch(d, *argvs)

    # --out checks: each network call would take 1 s, and loading writes loaded.txt.
    d = workdir("out")
    _gmm_data(d)
    torch.save(torch.zeros(2, 8), d / "z.pt")
    (d / "a_folder").mkdir()
    model = ["--model", "factories:marked"]
    jobs["out"] = _batch(d, *([*argv, *model] for argv, _ in _OUT_CASES), SLOW="1")

    d = workdir("errors")
    np.save(d / "ints.npy", np.zeros((2, 8), dtype=np.int64))
    jobs["errors"] = _batch(
        d,
        ["sample", "--model", "gmm", "--solver", "rk45", "--max-nfe", "5", "--out", "x.npy"],
        ["sample", "--model", "no_such_model", "--out", "x.npy"],
        ["sample", "--model", "gmm", "--samples", "4", "--batch-size", "0", "--out", "x.npy"],
        ["encode", "ints.npy", "--model", "gmm", "--out", "z.pt"],
        ["encode", "missing.npy", "--model", "gmm", "--out", "z.pt"],
    )

    jobs["poisoned"] = _cli(workdir("poisoned"), *_POISONED)
    jobs["poisoned_debug"] = _cli(workdir("poisoned_debug"), "--debug", *_POISONED)
    jobs["broken"] = _cli(
        workdir("broken"), "sample", "--model", "factories:broken", "--out", "x.npy"
    )
    jobs["billion"] = _cli(
        workdir("billion"), "sample", "--model", "gmm", "--samples", "1000000000", "--out", "x.npy"
    )
    jobs["probes"] = _cli(workdir("probes"), "nll", "--model", "gmm", "--n", "2", "--probes", "3")
    yield jobs
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.communicate()


# ------------------------------------------------------------------ latents and companions
def test_a_stale_companion_cannot_reach_a_decode(started):
    """The reported scenario: encode alf to z.npy, encode euler to z.npy, decode z.npy
    with alf. A .npy latent is the latent alone: encode writes no companion next to it
    (the one already there, as older versions left it, stays untouched), decode ignores
    it, decodes as plain alf and says nothing of exactness."""
    job = started["stale"]
    alf, euler, dec = job.result()
    assert alf["code"] == euler["code"] == dec["code"] == 0, alf["err"] + euler["err"] + dec["err"]
    assert "companion is not stored in a .npy" in alf["out"]
    stale = pflow.encode(builtin_gmm().model, _OTHER, "alf", steps=8).companion
    assert np.array_equal(np.load(job.cwd / "z.companion.npy"), stale.numpy())  # untouched
    assert "exactly" not in dec["out"] and "no companion stored in z.npy" in dec["out"]
    assert "z.companion.npy ignored" in dec["out"]
    z = torch.from_numpy(np.load(job.cwd / "z.npy"))
    plain = pflow.decode(builtin_gmm().model, z, "alf", steps=8).x
    torch.testing.assert_close(torch.from_numpy(np.load(job.cwd / "back.npy")), plain)


def test_a_companion_that_does_not_match_is_refused(started):
    """One .pt file holds the latent, the companion and what they were made with; a
    companion whose latent, model identity or grid differs is refused naming the file,
    and only a matching one decodes 'exactly' (to round-off)."""
    job = started["refused"]
    (enc,) = job.result()
    assert enc["code"] == 0, enc["err"]
    cwd = job.cwd
    record = torch.load(cwd / "z.pt", weights_only=True)
    assert record["format"] == "pflow-latent-1" and record["solver"] == "alf"
    assert record["steps"] == 8 and record["dtype"] == "float64" and record["model"] == "gmm"
    assert record["companion"].shape == (2, 6, 8) and len(record["model_identity"]) == 64
    assert record["sigmas"].dtype == torch.float64 and len(record["sigmas"]) == 9
    torch.save({**record, "latent": record["latent"] + 1e-3}, cwd / "moved.pt")
    torch.save({**record, "model_identity": "0" * 64}, cwd / "other_model.pt")
    legacy = {k: v for k, v in record.items() if k not in ("format", "latent_sha256")}
    torch.save(legacy, cwd / "legacy.pt")
    exact, moved, other, legacy_, steps, freed = _batch(
        cwd,
        ["decode", "z.pt", "--out", "back.npy"],  # model, solver, grid, dtype: the file's
        ["decode", "moved.pt", "--out", "b1.npy"],
        ["decode", "other_model.pt", "--out", "b2.npy"],
        ["decode", "legacy.pt", "--out", "b3.npy"],
        ["decode", "z.pt", "--out", "b4.npy", "--steps", "9"],
        ["decode", "moved.pt", "--out", "b5.npy", "--no-companion"],
    ).result()
    assert exact["code"] == 0, exact["err"]
    assert "exactly, with the stored companion" in exact["out"]
    x0 = np.load(cwd / "x.npy")
    assert np.sqrt(np.mean((np.load(cwd / "back.npy") - x0) ** 2)) < 1e-10
    for res, name, needle in [
        (moved, "moved.pt", "latent hash differs"),
        (other, "other_model.pt", "identity"),
        (legacy_, "legacy.pt", "no latent hash"),
        (steps, "z.pt", "steps 9 (encoded with 8)"),
    ]:
        assert res["code"] == 2, res
        line = _one_line(res["err"])
        assert name in line and needle in line and "--no-companion" in line, line
        assert res["out"] == ""  # refused before anything ran
    assert freed["code"] == 0, freed["err"]
    assert "exactly" not in freed["out"] and "--no-companion" in freed["out"]


def test_unreadable_latents_are_one_line(started):
    results = started["unreadable"].result()
    for res, name in zip(results, _UNREADABLE):
        assert res["code"] == 1, res
        assert name in _one_line(res["err"])
    assert "does not unpickle" in results[0]["err"]


# ------------------------------------------------------------------ --out before the model
def test_an_unwritable_out_fails_before_the_model_loads(started):
    """Every command checks --out before it loads the model: the factory never runs (no
    loaded.txt) and the command returns at once (each network call takes 1 s, so a
    command that computed first would take 10 s or more)."""
    job = started["out"]
    for (argv, needle), res in zip(_OUT_CASES, job.result()):
        assert res["code"] == 2, (argv, res)
        line = _one_line(res["err"])
        assert "argument --out" in line and needle in line, (argv, line)
        assert res["seconds"] < 5, (argv, res["seconds"])
    assert not (job.cwd / "loaded.txt").exists(), "a model was loaded before --out was checked"


# ------------------------------------------------------------------ one line, or --debug
def test_a_solver_failure_is_one_line_and_debug_shows_the_traceback(started):
    plain = started["poisoned"].result()
    assert plain.returncode == 1
    line = _one_line(plain.stderr)
    assert line.startswith("pflow sample: error: ") and "NonFiniteError" in line
    assert "NaN" in line
    assert not (started["poisoned"].cwd / "x.npy").exists()
    debug = started["poisoned_debug"].result()
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "NonFiniteError" in debug.stderr


def test_max_nfe_model_errors_and_bad_input_are_one_line(started):
    results = started["errors"].result()
    codes = [r["code"] for r in results]
    assert codes == [1, 2, 2, 2, 2], results
    lines = [_one_line(r["err"]) for r in results]
    assert "MaxNFEExceeded" in lines[0] and "max_nfe=5" in lines[0]
    assert "unknown model 'no_such_model'" in lines[1]
    assert "argument --batch-size" in lines[2]
    assert "ints.npy" in lines[3] and "floating point" in lines[3]
    assert "missing.npy does not exist" in lines[4]


def test_a_factory_that_raises_is_one_line(started):
    proc = started["broken"].result()
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert "--model" in line and "factories:broken" in line and "checkpoint missing" in line


def test_a_billion_samples_fail_before_allocating(started):
    proc = started["billion"].result()
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert "argument --samples" in line and "GiB" in line
    assert not (started["billion"].cwd / "x.npy").exists()


def test_nll_probes_without_hutchinson_is_a_usage_error(started):
    proc = started["probes"].result()
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert "--probes" in line and "--hutchinson" in line
    assert proc.stdout == ""  # nothing ran


# ------------------------------------------------------------------ SIGINT
def test_sigint_writes_the_finished_chunks(tmp_path):
    """Ctrl-C during ``pflow sample --batch-size 4`` (euler, 4 NFE a chunk): exit 130, one
    line, no traceback, and --out holds the finished chunks: the first samples of the
    run, the same as an uninterrupted solve gives them."""
    cwd = _workdir(tmp_path)
    out = cwd / "s.npy"
    args = ["sample", "--model", "factories:slow", "--solver", "euler", "--steps", "4"]
    args += ["--samples", "40", "--batch-size", "4", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pflow.cli", *args],
        cwd=cwd,
        env=_env(SLOW="0.05"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    calls = cwd / "calls.txt"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if int(calls.read_text()) >= 10:  # two chunks done, the third under way
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    line = _one_line(stderr)
    assert line.startswith("pflow sample: interrupted; wrote the ") and "of 40" in line
    x = torch.from_numpy(np.load(out))
    assert 8 <= len(x) < 40 and len(x) % 4 == 0, len(x)
    noise = pflow.keyed_randn(pflow.noise_keys(0, len(x)), (8,))
    full = pflow.sample(builtin_gmm().model, noise, "euler", steps=4, last_step="euler").x
    torch.testing.assert_close(x, full, rtol=1e-5, atol=1e-5)
