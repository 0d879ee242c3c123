"""What a benchmark row or a cached reference is reused on: its full key.

Rows carry the key of what produced them and ``resume`` reuses a row only when every part
matches; earlier rows of other settings stay in the files. The reference cache is keyed by
the model's content and the noise/solve settings, checked on load (a corrupt or
mismatched file is recomputed with a warning) and never non-finite. Files are written
with the umask's mode, one run at a time per folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pflow
import pflow.bench as bench
from pflow.bench import BenchConfig, key_changes, plan_resume, read_rows, run_bench
from pflow.errors import NonFiniteError
from pflow.identity import model_identity
from pflow.solvers import parse_solver
from pflow.zoo.registry import BundledModel, builtin_gmm, load_model

# A user's ``module:factory`` model whose weights the tests change: the built-in mixture
# plus a constant shift of eps (a tensor on the model, so it is part of its identity).
SHIFT = 0.0
NAN_IN = None  # a dtype in which the factory model returns NaN


class ShiftedMixture:
    def __init__(self, shift: float) -> None:
        self.inner = builtin_gmm().model
        self.schedule = self.inner.schedule
        self.shift = torch.tensor(shift, dtype=torch.float64)

    def __call__(self, xbar: torch.Tensor, sigma):
        eps = self.inner(xbar, sigma) + self.shift.to(xbar.dtype)
        return torch.full_like(eps, float("nan")) if xbar.dtype == NAN_IN else eps


def factory() -> BundledModel:
    exact = builtin_gmm().exact
    return BundledModel(
        "shifted", ShiftedMixture(SHIFT), (8,), "shifted mixture", last_step="solver", exact=exact
    )


FACTORY = f"{__name__}:factory"


def config(out: Path, **kw) -> BenchConfig:
    base = dict(
        model="gmm",
        solvers=["euler", "heun"],
        steps=[2, 4],
        samples=8,
        ref_tol=1e-4,
        plots=False,
        quiet=True,
        out=str(out),
    )
    return BenchConfig(**{**base, **kw})


def file_rows(out: Path) -> list[dict]:
    return json.loads((out / "bench.json").read_text())["rows"]


def mark_rows(out: Path) -> None:
    """Set every row's wall_s to -1 in bench.json: a reused row keeps it, a recomputed
    one does not."""
    path = out / "bench.json"
    data = json.loads(path.read_text())
    for r in data["rows"]:
        r["wall_s"] = -1.0
    path.write_text(json.dumps(data))


def refuse(*args, **kwargs):
    raise AssertionError("computed something")


def cache_files(out: Path) -> list[Path]:
    return sorted((out / ".cache").glob("reference-*.safetensors"))


# ---------------------------------------------------------------------------- row keys


def test_every_row_carries_its_full_key(tmp_path):
    rows = run_bench(
        config(tmp_path, solvers=["euler", "unipc[order=3]", "rk45"], tols=[1e-2], steps=[3])
    )
    identity = model_identity(load_model("gmm").model)
    by = {r.solver: r.run_key for r in rows}
    for key in by.values():
        assert key["model"]["id"] == identity
        assert key["model"]["shape"] == [8]
        assert (key["samples"], key["seed"], key["noise"]) == (8, 0, "keyed")
        assert key["reference"]["tol"] == 1e-4
        assert key["reference"]["last_step"] == load_model("gmm").last_step
        assert key["dtype"] == "float32" and key["net_dtype"] is None
        assert key["pflow"] == pflow.__version__
    assert by["euler"]["grid"]["spacing"] == "trailing"
    assert by["euler"]["grid"]["steps"] == 3 and by["euler"]["grid"]["steps_offset"] == 0
    unipc = parse_solver("unipc")[0]
    assert by["unipc[order=3]"]["options"]["order"] == 3
    # resolved: the options not written in the label carry their defaults
    for name, value in unipc.defaults().items():
        if name != "order":
            assert by["unipc[order=3]"]["options"][name] == value
    assert by["rk45"]["tol"] == 1e-2
    assert by["rk45"]["options"]["rtol"] == by["rk45"]["options"]["atol"] == 1e-2
    saved = {r["solver"]: r["run_key"] for r in file_rows(tmp_path)}
    assert saved == by  # the files carry the key
    header = (tmp_path / "bench.csv").read_text().splitlines()[0].split(",")
    assert {"kept", "samples", "seed", "model_id", "key"} <= set(header)


def test_key_changes_names_each_part():
    old = {"samples": 16, "reference": {"tol": 1e-4}, "model": {"id": "a" * 64}}
    new = {"samples": 64, "reference": {"tol": 1e-5}, "model": {"id": "b" * 64}}
    assert key_changes(old, old) == []
    changes = key_changes(old, new)
    assert changes[0] == "samples changed 16 -> 64"
    assert "reference.tol changed 0.0001 -> 1e-05" in changes
    assert f"model.id changed {'a' * 12} -> {'b' * 12}" in changes


# ---------------------------------------------------------------------------- resume


def test_resume_with_an_unchanged_key_reuses_every_row(tmp_path, capsys):
    first = run_bench(config(tmp_path))
    mark_rows(tmp_path)
    capsys.readouterr()
    rows = run_bench(config(tmp_path, resume=True))
    assert [r.setting for r in rows] == [r.setting for r in first]
    assert all(r.wall_s == -1.0 for r in rows)
    err = capsys.readouterr().err
    assert f"{len(first)} rows reused; 0 recomputed" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"samples": 12}, "samples changed 8 -> 12"),
        ({"seed": 3}, "seed changed 0 -> 3"),
        ({"ref_tol": 1e-5}, "reference.tol changed 0.0001 -> 1e-05"),
        ({"model": FACTORY}, "model.id changed"),
    ],
    ids=["samples", "seed", "ref_tol", "model"],
)
def test_resume_after_a_changed_setting_recomputes(tmp_path, capsys, change, needle):
    first = run_bench(config(tmp_path))
    mark_rows(tmp_path)
    capsys.readouterr()
    rows = run_bench(config(tmp_path, resume=True, **change))
    fresh = run_bench(config(tmp_path / "fresh", **change))
    assert all(r.wall_s != -1.0 for r in rows)
    assert [r.rmse for r in rows] == pytest.approx([r.rmse for r in fresh])
    err = capsys.readouterr().err
    assert f"0 rows reused; {len(first)} recomputed" in err and needle in err
    assert all(r["wall_s"] != -1.0 for r in file_rows(tmp_path))  # replaced, not doubled
    assert len(file_rows(tmp_path)) == len(first)


@pytest.mark.parametrize(
    "path,value",
    [
        (("pflow",), "0.0.0"),
        (("options", "order"), 1),
        (("grid", "steps_offset"), 1),
        (("reference", "last_step"), "other"),
        (("noise",), "torch.randn"),
        (("dtype",), "float64"),
        (("net_dtype",), "bfloat16"),
        (("model", "id"), "0" * 64),
        (("model", "shape"), [2, 4]),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_resume_recomputes_a_row_made_under_another_key(tmp_path, capsys, path, value):
    """Each part of the stored key, changed in the file as if another run had made the
    row, makes the row be recomputed; the other rows are reused."""
    run_bench(config(tmp_path, solvers=["dpmpp_2m"], steps=[2, 4]))
    mark_rows(tmp_path)
    data = json.loads((tmp_path / "bench.json").read_text())
    target = data["rows"][0]["run_key"]
    for part in path[:-1]:
        target = target[part]
    assert path[-1] in target
    target[path[-1]] = value
    (tmp_path / "bench.json").write_text(json.dumps(data))
    capsys.readouterr()
    rows = run_bench(config(tmp_path, solvers=["dpmpp_2m"], steps=[2, 4], resume=True))
    assert rows[0].wall_s != -1.0 and rows[1].wall_s == -1.0
    err = capsys.readouterr().err
    assert "1 rows reused; 1 recomputed" in err and f"{'.'.join(path)} changed" in err


def test_resume_keeps_rows_this_run_does_not_touch(tmp_path, capsys):
    first = run_bench(config(tmp_path, solvers=["euler", "heun"]))
    rows = run_bench(config(tmp_path, solvers=["euler"], resume=True))
    assert {r.solver for r in rows} == {"euler"}
    saved = file_rows(tmp_path)
    assert len(saved) == len(first)
    assert {(r["solver"], r["steps"], r["kept"]) for r in saved} == {
        (r.solver, r.steps, r.solver == "heun") for r in first
    }
    with open(tmp_path / "bench.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted((r["solver"], r["kept"]) for r in csv_rows) == sorted(
        (r.solver, str(r.solver == "heun")) for r in first
    )
    assert "kept" in capsys.readouterr().err
    # Asked for again, the kept rows are reused (their key matches) and no longer kept.
    mark_rows(tmp_path)
    again = run_bench(config(tmp_path, solvers=["euler", "heun"], resume=True))
    assert all(r.wall_s == -1.0 and not r.kept for r in again)
    assert not any(r["kept"] for r in file_rows(tmp_path))


def test_an_interrupted_resume_loses_no_earlier_row(tmp_path, monkeypatch):
    """Rows of the earlier run stay in the files until this run replaces them."""
    run_bench(config(tmp_path, solvers=["euler"], steps=[2, 4, 6]))
    calls = []
    real = bench.sample

    def interrupt_second(*args, **kwargs):
        if args[2] != "rk45":  # not the reference
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "sample", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config(tmp_path, solvers=["euler"], steps=[2, 4, 6], samples=12, resume=True))
    saved = {(r["steps"], r["run_key"]["samples"]) for r in file_rows(tmp_path)}
    assert saved == {(2, 12), (4, 8), (6, 8)}


def test_plan_resume_matches_whole_keys():
    rows = read_rows_from([("euler", 2, {"samples": 8}), ("euler", 4, {"samples": 8})])
    wanted = {rows[0].setting: {"samples": 8}, rows[1].setting: {"samples": 9}}
    plan = plan_resume(rows, wanted)
    assert set(plan.reused) == {rows[0].setting}
    assert plan.reasons == {rows[1].setting: "samples changed 8 -> 9"}


def read_rows_from(specs):
    return [
        bench.Row("euler", "trailing", steps, None, steps, 0.1, None, "", 0.0, run_key=key)
        for _, steps, key in specs
    ]


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "{}",
        '{"rows": 3}',
        '{"rows": [1]}',
        '{"rows": [{"solver": "euler"}]}',
        "TRUNCATED",
        "BINARY",
    ],
    ids=["empty-list", "no-rows", "rows-not-list", "row-not-object", "row-missing", "trunc", "bin"],
)
def test_a_bad_resume_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, text):
    run_bench(config(tmp_path))
    path = tmp_path / "bench.json"
    if text == "TRUNCATED":
        path.write_text(path.read_text()[:100])
    elif text == "BINARY":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    monkeypatch.setattr(bench, "load_model", refuse)
    monkeypatch.setattr(bench, "reference_endpoint", refuse)
    with pytest.raises(ValueError) as info:
        run_bench(config(tmp_path, resume=True))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(ValueError, match="resume file"):
        read_rows(path)


# ---------------------------------------------------------------------------- reference


def test_the_reference_follows_the_model_weights(tmp_path, monkeypatch):
    """Same model name, other weights: another reference, not the cached one."""
    module = sys.modules[__name__]
    first = run_bench(config(tmp_path, model=FACTORY))
    monkeypatch.setattr(module, "SHIFT", 0.05)
    changed = run_bench(config(tmp_path, model=FACTORY))
    fresh = run_bench(config(tmp_path / "fresh", model=FACTORY))
    assert [r.rmse for r in changed] == pytest.approx([r.rmse for r in fresh], rel=1e-9)
    assert [r.rmse for r in changed] != pytest.approx([r.rmse for r in first], rel=1e-6)
    assert len(cache_files(tmp_path)) == 2


def test_a_cache_file_of_another_setup_is_recomputed_with_a_warning(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run_bench(config(a))
    rows_b = run_bench(config(b, seed=1))
    (cache_b,) = cache_files(b)
    shutil.copy(cache_files(a)[0], cache_b)  # seed 0's endpoint under seed 1's name
    capsys.readouterr()
    again = run_bench(config(b, seed=1))
    assert [r.rmse for r in again] == pytest.approx([r.rmse for r in rows_b], rel=1e-12)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cache_b) in err and "seed changed 0 -> 1" in err
    with safe_open(str(cache_b), "pt") as f:  # rewritten with its own key
        assert json.loads(f.metadata()["key"])["seed"] == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "nan", "no-key"])
def test_a_damaged_cache_file_is_recomputed_with_a_warning(tmp_path, capsys, damage):
    rows = run_bench(config(tmp_path))
    (cache,) = cache_files(tmp_path)
    if damage == "garbage":
        cache.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:60])
    else:
        with safe_open(str(cache), "pt") as f:
            x, nfe, meta = f.get_tensor("x"), f.get_tensor("nfe"), f.metadata()
        if damage == "nan":
            x[0, 0] = float("nan")
        save_file({"x": x, "nfe": nfe}, str(cache), metadata=meta if damage == "nan" else {})
    capsys.readouterr()
    again = run_bench(config(tmp_path))
    assert [r.rmse for r in again] == pytest.approx([r.rmse for r in rows], rel=1e-12)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and str(cache) in err
    assert "n/a" not in bench.format_table(again)


def test_a_non_finite_reference_is_an_error(tmp_path, monkeypatch):
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "NAN_IN", torch.float64)  # the reference's dtype
    with pytest.raises(NonFiniteError) as info:
        run_bench(config(tmp_path, model=FACTORY))
    assert "reference" in str(info.value) and "\n" not in str(info.value)
    assert not file_rows_exist(tmp_path)
    # A reference solve that returns NaN without raising is refused as well.
    monkeypatch.setattr(module, "NAN_IN", None)
    real = bench.sample

    def nan_reference(model, noise, solver, **kw):
        res = real(model, noise, solver, **kw)
        if solver == "rk45":
            res.x[0] = float("nan")
        return res

    monkeypatch.setattr(bench, "sample", nan_reference)
    with pytest.raises(NonFiniteError, match="reference .* not finite for 1 of 8 samples"):
        run_bench(config(tmp_path / "b", model=FACTORY))


def file_rows_exist(out: Path) -> bool:
    return (out / "bench.json").exists()


def test_a_non_finite_row_is_a_one_line_error(tmp_path, monkeypatch):
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "NAN_IN", torch.float32)  # the rows' dtype
    with pytest.raises(NonFiniteError) as info:
        run_bench(config(tmp_path, model=FACTORY))
    assert "solver 'euler'" in str(info.value) and "\n" not in str(info.value)


def test_the_shipped_reference_matches_the_bundled_digits_model(monkeypatch):
    """The default ``pflow bench`` (digits, 128 samples, seed 0) scores against the
    shipped reference: its key (model identity included) is the one the bench asks for."""
    bundle = load_model("digits")
    defaults = BenchConfig()
    part = bench._model_part(defaults.model, bundle)
    key = bench.reference_key(part, bundle, defaults.samples, defaults.seed, bundle.ref_tol)
    shipped = bench._reference_paths(None, key)[-1]
    assert shipped.exists(), f"no shipped reference for the digits key; expected {shipped.name}"
    with safe_open(str(shipped), "pt") as f:
        assert json.loads(f.metadata()["key"]) == key
    monkeypatch.setattr(bench, "sample", refuse)  # a recompute would fail
    noise = bench._noise(bundle, range(defaults.samples), defaults.seed)
    x, nfe = bench.reference_endpoint(bundle, noise, bundle.ref_tol, None, key)
    assert x.shape == (128, 1, 8, 8) and nfe > 0 and bool(torch.isfinite(x).all())


# ---------------------------------------------------------------------------- files


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_get_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        run_bench(config(tmp_path, plots=True))
    finally:
        os.umask(old)
    expected = 0o666 & ~mask
    paths = [tmp_path / "bench.json", tmp_path / "bench.csv", *cache_files(tmp_path)]
    paths += list(tmp_path.glob("*.png"))
    assert len(paths) >= 4
    for path in paths:
        assert path.stat().st_mode & 0o777 == expected, path


def test_a_locked_out_folder_refuses_a_second_run(tmp_path, monkeypatch):
    lock = bench._OutLock(tmp_path)
    try:
        monkeypatch.setattr(bench, "load_model", refuse)
        with pytest.raises(ValueError) as info:
            run_bench(config(tmp_path))
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and str(tmp_path) in message
        assert "\n" not in message and not (tmp_path / "bench.json").exists()
    finally:
        lock.release()
    monkeypatch.undo()
    assert run_bench(config(tmp_path))  # released: the folder is free again


def test_an_unwritable_out_fails_before_any_computation(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(bench, "load_model", refuse)
    with pytest.raises(ValueError, match="not writable") as info:
        run_bench(config(blocker / "out"))
    assert str(blocker / "out") in str(info.value)
