"""``pflow bench`` as a user runs it, under faults: a resume after each kind of change,
two runs into one folder, a corrupted reference cache, Ctrl-C then ``--resume``, and bad
inputs that must end in one line on stderr, never a traceback.

The model is a user's ``module:factory`` written into the test's folder: the built-in
8-D mixture plus a constant ``SHIFT`` of eps (editing the file changes the model), which
sleeps ``PFLOW_TEST_DELAY`` seconds per float32 evaluation (to keep a run busy; the
environment is not part of the model) and returns NaN in float64 under
``PFLOW_TEST_NAN`` (a reference that cannot be solved)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FACTORY = """
import os
import time

import torch

from pflow.zoo.registry import BundledModel, builtin_gmm

SHIFT = {shift!r}


class Shifted:
    def __init__(self, inner, shift):
        self.inner = inner
        self.schedule = inner.schedule
        self.shift = torch.tensor(shift, dtype=torch.float64)

    def __call__(self, xbar, sigma):
        if xbar.dtype == torch.float32:
            time.sleep(float(os.environ.get("PFLOW_TEST_DELAY", "0")))
        elif os.environ.get("PFLOW_TEST_NAN"):
            return torch.full_like(xbar, float("nan"))
        return self.inner(xbar, sigma) + self.shift.to(xbar.dtype)


def factory():
    gmm = builtin_gmm()
    return BundledModel(
        "shifted", Shifted(gmm.model, SHIFT), (8,), "test", last_step="solver",
        exact=gmm.exact, ref_tol=1e-4,
    )
"""

MODEL = "benchfactory:factory"
BASE = ["--model", MODEL, "--solvers", "euler,heun", "--steps", "2,4", "--samples", "8"]
BASE += ["--peers", "none", "--no-plots", "--quiet"]


@pytest.fixture
def env(tmp_path):
    write_factory(tmp_path, 0.0)
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(tmp_path), str(root), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PFLOW_TEST_DELAY": "0"}


def write_factory(folder: Path, shift: float) -> None:
    (folder / "benchfactory.py").write_text(FACTORY.format(shift=shift))
    for cached in (folder / "__pycache__").glob("benchfactory*"):
        cached.unlink()


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pflow.cli", "bench", *BASE, "--out", str(out), *extra]


def bench(env, out: Path, *extra: str, code: int = 0, **env_extra) -> str:
    proc = subprocess.run(
        command(out, *extra),
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def rows(out: Path) -> dict[tuple, dict]:
    data = json.loads((out / "bench.json").read_text())
    return {(r["solver"], r["steps"], r["tol"]): r for r in data["rows"]}


def csv_settings(out: Path) -> list[tuple[str, str]]:
    lines = (out / "bench.csv").read_text().strip().splitlines()[1:]
    return sorted((line.split(",")[0], line.split(",")[2]) for line in lines)


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    return stderr.strip()


def test_resume_after_each_kind_of_change(tmp_path, env):
    out = tmp_path / "out"
    bench(env, out)
    first = rows(out)
    assert len(first) == 4 and csv_settings(out) == sorted((s, str(n)) for s, n, _ in first)

    def resume(*extra: str) -> tuple[str, dict]:
        err = bench(env, out, "--resume", *extra)
        return one_line(err), rows(out)

    steps = [
        (["--samples", "12"], "samples changed 8 -> 12"),
        (["--samples", "12", "--seed", "1"], "seed changed 0 -> 1"),
        (["--samples", "12", "--seed", "1", "--ref-tol", "1e-5"], "reference.tol changed"),
    ]
    previous = first
    for extra, needle in steps:
        line, now = resume(*extra)
        assert "0 rows reused; 4 recomputed" in line and needle in line, line
        assert set(now) == set(previous)
        assert all(now[k]["wall_s"] != previous[k]["wall_s"] for k in now)
        assert all(now[k]["rmse"] != previous[k]["rmse"] for k in now)
        previous = now

    # The factory's file edited (other weights under the same name).
    write_factory(tmp_path, 0.05)
    last = ["--samples", "12", "--seed", "1", "--ref-tol", "1e-5"]
    line, now = resume(*last)
    assert "0 rows reused; 4 recomputed" in line and "model.id changed" in line, line
    assert all(now[k]["rmse"] != previous[k]["rmse"] for k in now)

    # Fewer solvers: the other rows stay in both files, marked kept.
    line, fewer = resume(*last, "--solvers", "euler")
    assert "2 rows reused; 0 recomputed" in line and "2 earlier rows" in line, line
    assert set(fewer) == set(now)
    assert {k: r["kept"] for k, r in fewer.items()} == {k: k[0] == "heun" for k in now}
    assert len(csv_settings(out)) == 4


def test_two_runs_into_one_folder(tmp_path, env):
    """The second run refuses at once, naming the first one's pid; the first one's rows
    are all there and nothing of the second's."""
    out = tmp_path / "out"
    first_cmd = command(out, "--solvers", "euler", "--steps", "1,2,3,4,5,6")
    first = subprocess.Popen(
        first_cmd,
        env={**env, "PFLOW_TEST_DELAY": "0.3"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_rows(out, 1, first)
        second = subprocess.Popen(
            command(out, "--solvers", "heun", "--steps", "2"),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err2 = second.communicate(timeout=120)
        assert first.poll() is None, "the first run ended before the second was refused"
        _, err1 = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err1
    assert second.returncode == 2
    line = one_line(err2)
    assert "in use" in line and f"pid {first.pid}" in line and str(out) in line
    assert sorted(rows(out)) == [("euler", n, None) for n in range(1, 7)]
    assert csv_settings(out) == sorted(("euler", str(n)) for n in range(1, 7))


def wait_for_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    path = out / "bench.csv"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and len(path.read_text().strip().splitlines()) > n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError(f"no {n} rows in {path} after {timeout} s")


def test_interrupt_then_resume_loses_and_redoes_nothing(tmp_path, env):
    out = tmp_path / "out"
    args = ["--solvers", "euler", "--steps", "1,2,3,4,5,6,7,8"]
    proc = subprocess.Popen(
        command(out, *args),
        env={**env, "PFLOW_TEST_DELAY": "0.1"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a child of a background job inherits SIGINT ignored: give it the default back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for_rows(out, 1, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in one_line(err)
    done = rows(out)
    assert 1 <= len(done) < 8, "the interrupt came too late to test anything"
    line = one_line(bench(env, out, *args, "--resume"))
    n = len(done)
    assert f"{n} rows reused; {8 - n} recomputed" in line, line
    final = rows(out)
    assert sorted(final) == [("euler", s, None) for s in range(1, 9)]
    assert all(final[k] == done[k] for k in done)  # not recomputed: the very same rows
    assert len(csv_settings(out)) == 8


def test_a_corrupted_reference_cache_is_recomputed_with_one_warning(tmp_path, env):
    out = tmp_path / "out"
    bench(env, out)
    before = rows(out)
    (cache,) = (out / ".cache").glob("reference-*.safetensors")
    cache.write_bytes(cache.read_bytes()[:40] + b"\x00" * 40)
    line = one_line(bench(env, out))
    assert "warning" in line and str(cache) in line and "recomputing" in line
    after = rows(out)
    assert {k: r["rmse"] for k, r in after.items()} == {k: r["rmse"] for k, r in before.items()}


@pytest.mark.parametrize(
    "case",
    ["truncated-resume", "list-resume", "unwritable-out", "nan-reference"],
)
def test_errors_are_one_line(tmp_path, env, case):
    out = tmp_path / "out"
    extra: list[str] = []
    env_extra: dict[str, str] = {}
    needle = str(out / "bench.json")
    if case in ("truncated-resume", "list-resume"):
        out.mkdir()
        text = '{"rows": [{"solver": "eu' if case == "truncated-resume" else "[]"
        (out / "bench.json").write_text(text)
        extra = ["--resume"]
    elif case == "unwritable-out":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
        needle = "not writable"
    else:
        env_extra = {"PFLOW_TEST_NAN": "1"}
        needle = "reference"
    # 2: the command line or a file named on it is wrong; 1: the solve failed.
    code = 1 if case == "nan-reference" else 2
    line = one_line(bench(env, out, *extra, code=code, **env_extra))
    assert line.startswith("pflow bench: error: ") and needle in line, line
