"""``pflow encode``, ``pflow decode`` and ``pflow roundtrip``: data to latent noise and back.

``encode`` reads data (a PNG for image models, or ``.npy`` / ``.pt`` holding one sample or
a batch) and writes the latent; ``decode`` reads a latent and writes data (``.png``,
``.npy`` or ``.pt``).

Latent files:

* ``.pt`` (the pflow latent format, :data:`LATENT_FORMAT`): one file, written with
  ``torch.save`` and read with ``torch.load(weights_only=True)`` (plain tensors, numbers
  and strings, never pickled objects): a dict with the ``latent`` ``(batch, ...)``, the
  ``companion`` of a reversible solver (``alf``) when there is one, and what it was
  encoded with: ``solver`` (the label as given), ``steps``, ``spacing``, ``rtol``,
  ``atol``, ``set_alpha_to_one``, the grid walked (``sigmas``, float64), ``dtype``,
  ``model`` (its name) and ``model_identity`` (:func:`pflow.identity.model_identity`, of
  the model as run: labels and guidance included), ``nfe``, the labels and guidance of a
  class-conditional model (``labels``: int64, one per sample, or ``None``; ``label`` as
  given, ``guidance``, ``guidance_interval``, ``guidance_rescale``), and the sha256 of the
  latent and of the companion (``latent_sha256``, ``companion_sha256``, over dtype, shape
  and bytes). ``decode`` takes every setting not given on its command line from it (the
  model, labels and guidance too), so the round trip walks the same grid back; labels or
  guidance given that differ from the latent's are refused, naming the latent's. It uses
  the companion only when both hashes, the companion's shape, the model's identity, the
  solver, the grid and the dtype all match, and says "exactly" only then; a companion
  that does not match is refused with one line naming the file (``--no-companion``
  decodes without it).
* ``.npy``: the latent alone (no settings, no companion: an ``alf`` latent written to
  ``.npy`` decodes as an ordinary second-order sample, not exactly; ``encode`` says so).
  ``decode`` ignores a ``<name>.companion.npy`` written next to it by older versions.

``roundtrip`` encodes and decodes held-out data (the digits test split, or exact samples
of the Gaussian mixture) with each solver and step count, and prints and plots the
round-trip RMSE and PSNR against NFE.

All three take ``--label`` and the guidance options for a class-conditional model
(``digits-cond``); ``roundtrip --label true`` gives each test digit its own label.

``roundtrip --diffusers DIR --image in.png`` round-trips one image through a local
diffusers pipeline's VAE latent instead (:mod:`pflow.cli.pipeline`).

Every ``--out`` is checked before the model loads; on SIGINT ``encode`` and ``decode``
write nothing and ``roundtrip`` writes the rows it finished.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import pickle
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..grids import SPACINGS
from ..identity import model_identity, tensor_digest
from ..inversion import DDIM_INVERSE, decode, encode
from ..solvers import Solver
from ..solvers.reversible import companion_shape
from ..zoo.registry import BundledModel, load_model
from .args import (
    CommandError,
    Conditioning,
    Interrupted,
    UsageError,
    add_guidance_args,
    check_conditioning,
    check_direction,
    check_input,
    check_out,
    check_tolerances,
    float_list,
    label_list,
    load_bundle,
    one_line,
    positive_int,
    solver_label,
    write_atomic,
)
from .pipeline import add_diffusers_args, check_flags

__all__ = ["LATENT_FORMAT", "add_parsers"]

#: The ``format`` entry of a pflow latent ``.pt`` file (see the module docstring).
LATENT_FORMAT = "pflow-latent-1"

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DEFAULTS = {"solver": "euler", "steps": 10, "spacing": "trailing"}
_SETTINGS = ("solver", "steps", "spacing", "rtol", "atol")
_DATA_SUFFIXES = (".png", ".npy", ".pt")
_LATENT_SUFFIXES = (".pt", ".npy")

# Encode-only solvers and the solver that decodes their latents. This is a pairing, not a
# capability: ``ddim_inverse`` is diffusers' DDIMInverseScheduler, whose latents diffusers
# decodes with DDIMScheduler, which is ``euler`` on the mirrored grid (docs/inversion.md).
# A solver's ``directions`` say that it cannot decode; only this table says what can.
DECODE_PARTNERS = {DDIM_INVERSE: "euler"}

_ROUNDTRIP_SOLVERS = ("euler", "heun", "dpm_solver_2", "alf", DDIM_INVERSE)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "encode",
        help="encode data (PNG, .npy, .pt) into latent noise (.pt, .npy)",
        description="Integrate the PF-ODE from the data (at the grid's first sigma, the "
        "schedule's sigma_min by default) up to sigma_max; write the latent x_T. A .pt "
        "latent stores the settings, the model's identity and alf's companion with it; a "
        ".npy latent is the latent alone.",
    )
    e.set_defaults(func=_encode_cmd)
    e.add_argument("input", help="data: .png (image models), .npy or .pt")
    e.add_argument(
        "--out",
        required=True,
        help="latent file: .pt (latent, companion and settings) or .npy (latent alone)",
    )
    e.add_argument("--model", required=True, help="bundled model name or module:factory")
    _add_solve_options(e, "a solver that runs up (default euler)", "float32")
    add_guidance_args(e)

    d = sub.add_parser(
        "decode",
        help="decode latent noise (.pt, .npy) into data (PNG, .npy, .pt)",
        description="Integrate the PF-ODE from the latent down to the sigma encode started "
        "from. Settings not given (the model too) are taken from a .pt latent, else euler, "
        "10 trailing steps, float32. A .pt latent's alf companion is used only when it "
        "matches the latent, the model and the settings: then the decode is exact.",
    )
    d.set_defaults(func=_decode_cmd)
    d.add_argument("latent", help="latent: .pt (from pflow encode) or .npy")
    d.add_argument("--out", required=True, help="data file: .png, .npy or .pt")
    d.add_argument(
        "--model", default=None, help="bundled model name or module:factory (default: the latent's)"
    )
    _add_solve_options(d, "a solver that runs down (default: the latent's, else euler)", None)
    d.add_argument(
        "--no-companion",
        action="store_true",
        help="decode without the latent's stored companion (alf: a second-order sample)",
    )
    add_guidance_args(d)
    # Not given: the latent's (None tells "not given" from an explicit 0).
    d.set_defaults(guidance_rescale=None)

    r = sub.add_parser(
        "roundtrip",
        help="encode and decode held-out data; round-trip RMSE and PSNR against NFE",
        description="Encode then decode held-out data with each solver and step count (the "
        "same grid both ways; ddim_inverse decodes with euler, as diffusers' DDIMScheduler "
        "does) and report the round-trip error, with a table (.csv, .json) and a plot. On "
        "SIGINT the finished rows are printed and written.",
    )
    r.set_defaults(func=_roundtrip_cmd)
    r.add_argument("--model", default=None, help="bundled model (default digits)")
    r.add_argument(
        "--solvers",
        "--solver",
        dest="solvers",
        type=label_list,
        default=None,
        help="comma-separated solver labels, with options in brackets "
        "(ddim_inverse: diffusers' DDIM inversion; default "
        f"{','.join(_ROUNDTRIP_SOLVERS)}, with --diffusers alf)",
    )
    r.add_argument(
        "--steps",
        type=_ints,
        default=None,
        help="comma-separated (default 5,10,20,50; with --diffusers 50)",
    )
    r.add_argument(
        "--tols", type=float_list, default=[1e-3, 1e-5], help="rtol = atol of adaptive solvers"
    )
    r.add_argument(
        "--spacing",
        choices=SPACINGS,
        default=None,
        help="grid spacing (default trailing; with --diffusers, the scheduler config's)",
    )
    r.add_argument("--samples", type=positive_int, default=100, help="number of data samples")
    r.add_argument("--seed", type=int, default=0, help="seed of exact-model samples")
    r.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    r.add_argument(
        "--peers",
        action="store_true",
        help="also run diffusers' DDIMInverseScheduler + DDIMScheduler themselves "
        "(leading/trailing spacing, eps-prediction networks)",
    )
    r.add_argument(
        "--out",
        default=None,
        help="folder for roundtrip.csv/.json/.png; with --diffusers, the reconstructed "
        "image (.png, .npy, .pt)",
    )
    add_guidance_args(r)
    add_diffusers_args(r, size=False, image=True)


def _add_solve_options(p: argparse.ArgumentParser, what: str, dtype: str | None) -> None:
    p.add_argument("--solver", default=None, help=f"{what}; options in brackets: rk45[rtol=1e-3]")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--spacing", choices=SPACINGS, default=None)
    p.add_argument("--rtol", type=float, default=None)
    p.add_argument("--atol", type=float, default=None)
    p.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default=dtype,
        help="dtype of the state and the network"
        + (f" (default {dtype})" if dtype else " (default: the latent's, else float32)"),
    )


# ---------------------------------------------------------------- argument types
def _ints(text: str) -> list[int]:
    return [positive_int(v) for v in text.split(",") if v.strip()] or _bad(text)


def _bad(text: str) -> Any:
    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")


def _decode_partner(label: str) -> str:
    """The solver that decodes what ``label`` encodes: its pairing partner from
    :data:`DECODE_PARTNERS`, else ``label`` itself."""
    return DECODE_PARTNERS.get(label.partition("[")[0].strip(), label)


# ---------------------------------------------------------------- files
def _model(
    bundle: BundledModel, cond: Conditioning, labels: Tensor | None, dtype: torch.dtype
) -> tuple[Any, str]:
    """The model that runs (``bundle.model`` given ``labels`` under ``cond``'s guidance)
    and its identity (hashed as loaded, before the network is cast to ``dtype``: the
    dtype is a setting of its own; the labels and the guidance are part of it)."""
    model = cond.model(bundle, bundle.model, labels)
    identity = model_identity(model)
    net = getattr(bundle.model, "net", None)
    if isinstance(net, torch.nn.Module):
        net.to(dtype)  # in place: the conditioned copies share it
    return model, identity


def _rows_note(cond: Conditioning, res: Any, n: int) -> str:
    """``" (18 network rows per sample)"`` for a conditioned model, else ``""``."""
    if not cond.conditional:
        return ""
    return f" ({res.rows / n:.4g} network rows per sample)"


def _batch(x: Tensor, shape: tuple[int, ...], what: str, bundle: BundledModel) -> Tensor:
    """``x`` as ``(batch, *shape)``: one sample gets a batch dimension."""
    if tuple(x.shape) == shape:
        return x.unsqueeze(0)
    if x.ndim == len(shape) + 1 and tuple(x.shape[1:]) == shape and x.shape[0] >= 1:
        return x
    raise UsageError(
        f"{what} has shape {tuple(x.shape)}; model {bundle.name!r} takes samples of shape "
        f"{shape} (or a batch of them)"
    )


def _unreadable(path: Path, what: str, kind: str, exc: BaseException) -> CommandError:
    return CommandError(f"{what} {path}: cannot be read as {kind}: {one_line(exc, 300)}")


def _read_png(path: Path, shape: tuple[int, ...]) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UsageError(
            f"a PNG needs an image model (samples of shape (1 or 3, H, W)); this one takes {shape}"
        )
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if shape[0] == 1 else "RGB"), dtype=np.float64)
    except (UnidentifiedImageError, ValueError, EOFError) as exc:
        raise _unreadable(path, "input", "an image", exc) from exc
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    if tuple(arr.shape[1:]) != tuple(shape[1:]):
        raise UsageError(
            f"{path.name} is {arr.shape[2]}x{arr.shape[1]} pixels; the model takes "
            f"{shape[2]}x{shape[1]}"
        )
    return torch.from_numpy(arr / 127.5 - 1.0)  # [0, 255] -> [-1, 1]


def _write_png(path: Path, x: Tensor) -> list[Path]:
    from PIL import Image

    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UsageError(
            f"a PNG needs image samples (batch, 1 or 3, H, W); these have shape {tuple(x.shape)}"
        )
    pixels = ((x.detach().double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    paths = (
        [path]
        if len(x) == 1
        else [path.with_name(f"{path.stem}_{i:03d}.png") for i in range(len(x))]
    )
    for p, img in zip(paths, pixels):
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        write_atomic(p, lambda tmp, arr=arr: Image.fromarray(arr).save(tmp))
    return paths


def _load_npy(path: Path, what: str) -> Tensor:
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise _unreadable(path, what, "a .npy array (no pickled objects)", exc) from exc


def _load_pt(path: Path, what: str) -> Any:
    """A ``.pt`` file's content, loaded with ``weights_only=True`` (tensors and plain data,
    never pickled code); one line naming the file when it cannot be."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CommandError(
            f"{what} {path}: holds objects other than tensors and plain data, which pflow "
            "does not unpickle (torch.load with weights_only=True)"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise _unreadable(path, what, "a torch file (torch.save)", exc) from exc


def _read_data(path: Path, bundle: BundledModel) -> Tensor:
    suffix = path.suffix.lower()
    if suffix == ".png":
        x = _read_png(path, bundle.shape)
    elif suffix == ".npy":
        x = _load_npy(path, "input")
    else:
        obj = _load_pt(path, "input")
        if isinstance(obj, dict) and isinstance(obj.get("x"), Tensor):
            obj = obj["x"]
        if not isinstance(obj, Tensor):
            raise UsageError(f"input {path}: holds neither a tensor nor a dict with an 'x' tensor")
        x = obj
    if not x.is_floating_point():
        raise UsageError(f"input {path}: holds {x.dtype} values; expected floating point data")
    return _batch(x, bundle.shape, "input", bundle)


def _digest(t: Tensor) -> str:
    """sha256 over ``t``'s dtype, shape and bytes."""
    h = hashlib.sha256()
    tensor_digest(h, "t", t)
    return h.hexdigest()


@dataclass
class _Latent:
    """A latent file read: the latent, the stored companion (unchecked against the model
    and the settings yet), the record's other entries, and why the companion cannot be
    trusted whatever the settings (``None``: its hashes and shape check out)."""

    z: Tensor
    companion: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


def _read_latent(src: Path) -> _Latent:
    if src.suffix.lower() == ".npy":
        return _Latent(_load_npy(src, "latent"))
    obj = _load_pt(src, "latent")
    if isinstance(obj, Tensor):
        return _Latent(obj)
    if not isinstance(obj, dict) or not isinstance(obj.get("latent"), Tensor):
        raise UsageError(f"latent {src}: holds neither a tensor nor a dict with a 'latent' tensor")
    z, companion = obj["latent"], obj.get("companion")
    meta = {k: v for k, v in obj.items() if k not in ("latent", "companion")}
    if companion is None:
        return _Latent(z, None, meta)
    problem = None
    if not isinstance(companion, Tensor) or not companion.is_floating_point():
        problem = "its companion is not a floating-point tensor"
    elif meta.get("format") != LATENT_FORMAT:
        problem = (
            "its companion carries no latent hash or model identity (written by an older "
            "pflow or by hand)"
        )
    elif meta.get("latent_sha256") != _digest(z):
        problem = "its latent is not the one the companion was stored with (latent hash differs)"
    elif meta.get("companion_sha256") != _digest(companion):
        problem = "its companion was changed after encoding (companion hash differs)"
    elif tuple(companion.shape) != companion_shape(z):
        problem = (
            f"its companion has shape {tuple(companion.shape)} but the latent has "
            f"{tuple(z.shape)} (expected {companion_shape(z)})"
        )
    return _Latent(z, companion, meta, problem)


def _latent_record(
    res: Any,
    bundle: BundledModel,
    identity: str,
    settings: dict[str, Any],
    dtype: str,
    cond: Conditioning,
    labels: Tensor | None,
) -> dict[str, Any]:
    """The pflow latent ``.pt`` record (see the module docstring)."""
    z = res.x.detach().cpu().contiguous()
    record: dict[str, Any] = {
        "format": LATENT_FORMAT,
        "latent": z,
        "latent_sha256": _digest(z),
        **{k: settings[k] for k in _SETTINGS},
        "set_alpha_to_one": False,
        "sigmas": res.sigmas.detach().cpu().to(torch.float64),
        "dtype": dtype,
        "model": bundle.name,
        "model_identity": identity,
        "nfe": int(res.nfe),
        # What a class-conditional model was given (labels: one per sample, or None).
        "labels": None if labels is None else labels.detach().cpu().to(torch.int64),
        **cond.record(),
    }
    if res.companion is not None:
        companion = res.companion.detach().cpu().contiguous()
        record["companion"] = companion
        record["companion_sha256"] = _digest(companion)
    return record


# ---------------------------------------------------------------- encode / decode
def _encode_cmd(args: argparse.Namespace) -> int:
    # Everything the command line decides is checked before the model loads.
    settings, _ = _settings(args, {}, "up")
    out = check_out(args.out, "--out", suffixes=_LATENT_SUFFIXES)
    src = check_input(args.input, "argument input", _DATA_SUFFIXES)
    dtype = _DTYPES[args.dtype]
    bundle = load_bundle(args.model, load_model)
    cond = check_conditioning(args, bundle)
    x0 = _read_data(src, bundle)
    labels = cond.labels(torch.arange(len(x0)))
    model, identity = _model(bundle, cond, labels, dtype)
    x0 = x0.to(dtype)
    t0 = time.perf_counter()
    res = encode(model, x0, **_solve_kwargs(settings))
    seconds = time.perf_counter() - t0
    note = ""
    if out.suffix.lower() == ".pt":
        record = _latent_record(res, bundle, identity, settings, args.dtype, cond, labels)
        write_atomic(out, lambda p: torch.save(record, p))
        if res.companion is not None:
            note = " (with its companion: decode retraces it exactly)"
    else:
        latent = res.x.detach().cpu().numpy()
        write_atomic(out, lambda p: np.save(p, latent))
        note = " (the latent alone"
        if cond.conditional:
            note += "; its labels and guidance are not stored: give them to decode"
        if res.companion is not None:
            note += (
                f"; {settings['solver']}'s companion is not stored in a .npy, so decode will "
                "not be exact: write a .pt to keep it"
            )
        note += ")"
    given = f", {cond.describe()}" if cond.conditional else ""
    print(
        f"encoded {len(x0)} sample(s) with {_describe(settings)}{given}: NFE {res.nfe}"
        f"{_rows_note(cond, res, len(x0))}, {seconds:.2f}s; latent written to {out}{note}"
    )
    return 0


def _same_solver(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    if a == b:
        return True
    try:
        spec_a, opt_a = solver_label(a, "--solver")
        spec_b, opt_b = solver_label(b, "--solver")
    except ValueError:
        return False
    return spec_a.name == spec_b.name and opt_a == opt_b


def _companion_mismatch(
    settings: dict[str, Any], dtype: str, stored: dict[str, Any], meta: dict[str, Any]
) -> list[str]:
    """What differs between the decode's settings and those the companion was stored
    with (the encode's solver, grid and dtype)."""
    diff = []
    if not _same_solver(settings["solver"], stored.get("solver")):
        diff.append(f"solver {settings['solver']!r} (encoded with {stored.get('solver')!r})")
    for key in ("steps", "spacing", "rtol", "atol"):
        if settings[key] != stored.get(key):
            diff.append(f"{key} {settings[key]!r} (encoded with {stored.get(key)!r})")
    if dtype != meta.get("dtype"):
        diff.append(f"dtype {dtype} (encoded in {meta.get('dtype')})")
    if meta.get("set_alpha_to_one", False):
        diff.append("set_alpha_to_one (the command line decodes with False)")
    return diff


def _decode_cmd(args: argparse.Namespace) -> int:
    # Everything the command line and the latent file decide is checked before the
    # model loads.
    if args.solver is not None:
        _check_solver(args.solver, "down")
    out = check_out(args.out, "--out", suffixes=_DATA_SUFFIXES)
    src = check_input(args.latent, "argument latent", _LATENT_SUFFIXES)
    latent = _read_latent(src)
    meta = latent.meta
    stored_model = meta.get("model") if isinstance(meta.get("model"), str) else None
    model_name = args.model or stored_model
    if model_name is None:
        raise UsageError(f"argument --model: latent {src} stores no model; give --model")
    if stored_model is not None and model_name != stored_model:
        raise UsageError(
            f"latent {src} was encoded with model {stored_model!r}, not {model_name!r}"
        )
    stored = {k: meta[k] for k in _SETTINGS if k in meta}
    if isinstance(stored.get("solver"), str):  # an encode-only solver: its partner decodes
        stored["solver"] = _decode_partner(stored["solver"])
    dtype_name = args.dtype or meta.get("dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise UsageError(f"latent {src}: stores dtype {dtype_name!r}; pass --dtype")
    settings, spec = _settings(args, stored, "down")
    companion: Tensor | None = None
    why_not = ""
    if latent.companion is not None and spec.reversible:
        if args.no_companion:
            why_not = "the stored companion not used (--no-companion)"
        elif latent.problem is not None:
            raise UsageError(
                f"latent {src}: {latent.problem}; it would not retrace the encode: "
                "re-encode, or pass --no-companion to decode without it"
            )
        else:
            diff = _companion_mismatch(settings, dtype_name, stored, meta)
            if diff:
                raise UsageError(
                    f"latent {src}: its companion belongs to the encode's settings; "
                    f"decoding with {', '.join(diff)} would not retrace it: drop those "
                    "flags, or pass --no-companion"
                )
            companion = latent.companion
    elif spec.reversible:
        why_not = (
            f"no companion stored in {src.name}: {settings['solver']} decodes as an "
            "ordinary sampler, not an exact inverse"
        )
    stale = src.with_name(f"{src.stem}.companion.npy")
    if src.suffix.lower() == ".npy" and stale.is_file():
        why_not += ("; " if why_not else "") + f"{stale.name} ignored (.npy latents are alone)"
    dtype = _DTYPES[dtype_name]
    bundle = load_bundle(model_name, load_model)
    z = _batch(latent.z, bundle.shape, "latent", bundle)
    cond, labels = _decode_conditioning(args, meta, bundle, len(z), src)
    model, identity = _model(bundle, cond, labels, dtype)
    z = z.to(dtype)
    stored_identity = meta.get("model_identity")
    other_model = isinstance(stored_identity, str) and stored_identity != identity
    if other_model and companion is not None:
        raise UsageError(
            f"latent {src}: its companion was stored for model {model_name!r} with identity "
            f"{stored_identity[:12]}, but this one is {identity[:12]} (its weights or settings "
            "changed); re-encode, or pass --no-companion"
        )
    if companion is not None and tuple(companion.shape) != companion_shape(z):
        raise UsageError(
            f"latent {src}: its companion has shape {tuple(companion.shape)}, expected "
            f"{companion_shape(z)}; re-encode, or pass --no-companion"
        )
    t0 = time.perf_counter()
    res = decode(model, z, companion=companion, **_solve_kwargs(settings))
    seconds = time.perf_counter() - t0
    if out.suffix.lower() == ".png":
        written = _write_png(out, res.x)
    else:
        x = res.x.detach().cpu()
        if out.suffix.lower() == ".npy":
            write_atomic(out, lambda p: np.save(p, x.numpy()))
        else:
            write_atomic(out, lambda p: torch.save(x, p))
        written = [out]
    how = ""
    if companion is not None:
        grid = meta.get("sigmas")
        if isinstance(grid, Tensor) and torch.equal(res.sigmas.cpu(), grid.flip(0)):
            how = "exactly, with the stored companion"
        else:
            how = "with the stored companion, but not on the encode's grid (not exact)"
    notes = "; ".join(
        n
        for n in (
            why_not,
            f"note: {src.name} was encoded with another identity of this model"
            if other_model
            else "",
        )
        if n
    )
    given = f", {cond.describe()}" if cond.conditional else ""
    print(
        f"decoded {len(z)} latent(s) with {_describe(settings)}{given}"
        f"{' ' + how if how else ''}: NFE {res.nfe}{_rows_note(cond, res, len(z))}, "
        f"{seconds:.2f}s; written to "
        + (str(written[0]) if len(written) == 1 else f"{written[0]} ... {written[-1].name}")
        + (f" ({notes})" if notes else "")
    )
    return 0


def _stored_conditioning(meta: dict[str, Any]) -> tuple[Conditioning, Tensor | None]:
    """The labels and guidance a pflow latent record was encoded with (no labels: the
    model as it is, which is also what a record written before labels existed means)."""
    labels = meta.get("labels")
    if not isinstance(labels, Tensor):
        return Conditioning(), None
    scale, interval, rescale = (
        meta.get("guidance"),
        meta.get("guidance_interval"),
        meta.get("guidance_rescale"),
    )
    text = meta.get("label")
    return (
        Conditioning(
            text if isinstance(text, str) else "(stored)",
            1.0 if scale is None else float(scale),
            None if interval is None else (float(interval[0]), float(interval[1])),
            0.0 if rescale is None else float(rescale),
        ),
        labels.reshape(-1).to(torch.int64),
    )


def _decode_conditioning(
    args: argparse.Namespace, meta: dict[str, Any], bundle: BundledModel, n: int, src: Path
) -> tuple[Conditioning, Tensor | None]:
    """The labels and guidance of a decode: the command line's, else the latent's.

    A pflow ``.pt`` latent decodes only under the labels and guidance it was encoded
    with (another conditioning is another model, whose flow does not invert this one's):
    one given on the command line that differs is a :class:`UsageError` saying what the
    latent was made with. A ``.npy`` latent stores none: the command line's apply."""
    recorded = meta.get("format") == LATENT_FORMAT
    stored, stored_labels = _stored_conditioning(meta) if recorded else (Conditioning(), None)
    if stored_labels is not None and len(stored_labels) != n:
        raise UsageError(
            f"latent {src}: stores {len(stored_labels)} labels for {n} latents; re-encode"
        )
    spec = args.label
    if spec is None and stored_labels is not None:
        spec = [int(v) for v in stored_labels]
    given = argparse.Namespace(
        label=spec,
        guidance=args.guidance
        if args.guidance is not None
        else (stored.scale if stored.conditional and spec is not None else None),
        guidance_interval=args.guidance_interval
        if args.guidance_interval is not None
        else stored.interval,
        guidance_rescale=args.guidance_rescale
        if args.guidance_rescale is not None
        else stored.rescale,
    )
    cond = check_conditioning(given, bundle)
    labels = cond.labels(torch.arange(n))
    if not recorded:
        return cond, labels
    if stored_labels is None or labels is None:
        same = stored_labels is None and labels is None
    else:
        same = torch.equal(labels.cpu(), stored_labels) and (
            cond.scale,
            cond.interval,
            cond.rescale,
        ) == (stored.scale, stored.interval, stored.rescale)
    if not same:
        asked = cond.describe()
        if args.label is None and stored.conditional:
            asked = Conditioning(stored.spec, cond.scale, cond.interval, cond.rescale).describe()
        made = stored.describe() if stored.conditional else "no labels (the model as it is)"
        raise UsageError(
            f"latent {src} was encoded with {made}, not {asked}: a latent decodes under "
            "the labels and guidance it was encoded with (drop --label and the --guidance "
            "options to take them from it)"
        )
    return cond, labels


def _check_solver(label: str, direction: str) -> tuple[Solver, dict[str, Any]]:
    """The solver of ``--solver`` and its label's options; a one-line error for a bad
    label or a solver that cannot run ``direction`` (``"up"``: encode, ``"down"``:
    decode), naming the partner that decodes an encode-only solver's latents."""
    command = "encode" if direction == "up" else "decode"
    spec, options = solver_label(label, "--solver")
    partner = _decode_partner(label)
    if direction == "down" and "down" not in spec.directions and partner != label:
        raise UsageError(
            f"argument --solver: solver {label!r} only encodes; decode its latents with "
            f"--solver {partner}"
        )
    check_direction(spec, label, direction, "--solver", command)
    return spec, options


def _settings(
    args: argparse.Namespace, stored: dict[str, Any], direction: str
) -> tuple[dict[str, Any], Solver]:
    """Command line first, then what the latent file stored, then the defaults; and the
    solver they name. Tolerances written in the solver's label are not repeated here
    (one given both there and as ``--rtol``/``--atol`` is an error naming both)."""
    settings: dict[str, Any] = {}
    for key in _SETTINGS:
        given = getattr(args, key)
        settings[key] = given if given is not None else stored.get(key, _DEFAULTS.get(key))
    label = settings["solver"]
    spec, options = _check_solver(label, direction)
    if spec.adaptive:
        settings["steps"] = None
        where = "--solver" if args.solver is not None else "the latent's solver"
        check_tolerances(spec, options, label, where, rtol=args.rtol, atol=args.atol)
        for key in ("rtol", "atol"):
            if key in options:
                settings[key] = None  # the label's, not a stored one
    else:
        settings["rtol"] = settings["atol"] = None
    return settings, spec


def _solve_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if v is not None}


def _describe(settings: dict[str, Any]) -> str:
    if settings["steps"] is None:
        spec, options = solver_label(settings["solver"], "--solver")
        values = {**spec.defaults(), **options}
        rtol = settings["rtol"] or values.get("rtol") or 1e-5
        atol = settings["atol"] or values.get("atol") or 1e-5
        return f"{settings['solver']} (rtol={rtol:g}, atol={atol:g})"
    return f"{settings['solver']}, {settings['steps']} {settings['spacing']} steps"


# ---------------------------------------------------------------- roundtrip
@dataclass
class RoundTripRow:
    """One round trip: encode then decode ``samples`` data points."""

    solver: str
    setting: str
    nfe_encode: int
    nfe_decode: int
    rmse: float
    psnr: float
    max_abs: float
    seconds: float

    @property
    def nfe(self) -> int:
        return self.nfe_encode + self.nfe_decode


def _held_out(bundle: BundledModel, n: int, seed: int) -> tuple[Tensor, str, Tensor | None]:
    """``n`` held-out data points for ``bundle``, what they are, and their class labels
    (``None`` when the data has none)."""
    if bundle.exact is not None:
        g = torch.Generator().manual_seed(seed)
        x = bundle.exact.sample(n, generator=g).reshape(n, *bundle.shape)
        return x, "exact samples", None
    if bundle.name in ("digits", "digits-cond"):
        from ..zoo.data import digits_data, digits_labels

        x = digits_data("test")
        if n > len(x):
            raise UsageError(f"argument --samples: {n} exceeds the {len(x)} held-out test digits")
        return x[:n], "held-out test digits", digits_labels("test")[:n]
    if bundle.name == "moons":
        from ..zoo.data import moons_data

        # Training drew seed 0 and evaluation seed 10000; 12345 + seed is held out.
        return moons_data(n, seed=12345 + seed), "held-out two-moons points", None
    raise UsageError(
        f"argument --model: no held-out data known for model {bundle.name!r}: roundtrip "
        "knows 'digits', 'digits-cond', 'moons' and models with an exact distribution (gmm)"
    )


def _psnr(rmse: float, peak: float) -> float:
    return math.inf if rmse == 0 else 20.0 * math.log10(peak / rmse)


def round_trip(
    bundle: BundledModel,
    x0: Tensor,
    solver: str,
    *,
    steps: int | None = None,
    tol: float | None = None,
    spacing: str = "trailing",
    model: Any = None,
) -> tuple[Tensor, int, int]:
    """Encode ``x0`` and decode it back on the same grid; ``(x, nfe_encode, nfe_decode)``.
    An encode-only solver decodes with its partner (``ddim_inverse`` with ``euler``,
    diffusers' DDIMScheduler; see :data:`DECODE_PARTNERS`); a reversible one (``alf``)
    hands its companion over. ``model``: the model to use (default ``bundle.model``; a
    conditioned or guided one for labelled data)."""
    kw: dict[str, Any] = (
        {"rtol": tol, "atol": tol} if tol is not None else {"steps": steps, "spacing": spacing}
    )
    model = bundle.model if model is None else model
    enc = encode(model, x0, solver, **kw)
    dec = decode(model, enc.x, _decode_partner(solver), companion=enc.companion, **kw)
    return dec.x, enc.nfe, dec.nfe


def _peer_net(bundle: BundledModel, spacing: str, model: Any = None) -> tuple[Any, str]:
    """The network that ``--peers`` drives with diffusers' schedulers, ``net(x_t, t)``,
    and its prediction type (checked before any row runs). ``model``: a conditioned or
    guided copy of ``bundle.model``, whose labels (and guidance) the network then applies,
    as a diffusers pipeline does."""
    from ..guidance import Guided
    from ..integrations import diffusers_peers

    base: Any = bundle.model
    net = getattr(base, "net", None)
    if net is None or getattr(base, "prediction", None) is None:
        raise ValueError(f"--peers needs a network model (EpsModel); {bundle.name!r} is not one")
    if spacing not in ("leading", "trailing"):
        raise ValueError(f"--peers supports leading and trailing spacing, got {spacing!r}")
    if not diffusers_peers.available():
        raise ValueError("--peers needs diffusers installed (pip install diffusers)")
    if isinstance(model, Guided):
        return model.as_network(), "epsilon"
    if model is not None and getattr(model, "cond", None):
        cond = model.cond

        def conditioned(x_t: Tensor, t: Tensor) -> Tensor:
            return model.net(x_t, t, **cond)

        return conditioned, model.prediction
    return net, base.prediction


def _peer_round_trip(
    bundle: BundledModel, x0: Tensor, steps: int, spacing: str, model: Any = None
) -> tuple[Tensor, int, int]:
    """diffusers' DDIMInverseScheduler then DDIMScheduler on the same network
    (:func:`pflow.integrations.diffusers_peers.ddim_round_trip`), given ``model``'s labels
    and guidance when it is a conditioned copy of ``bundle.model``."""
    from ..integrations.diffusers_peers import ddim_round_trip

    net, prediction = _peer_net(bundle, spacing, model)
    base: Any = bundle.model
    return ddim_round_trip(net, base.schedule, prediction, x0, steps, spacing)


def _roundtrip_cmd(args: argparse.Namespace) -> int:
    from ..bench import check_label

    if check_flags(args):
        from .pipeline import roundtrip_command

        return roundtrip_command(args)
    args.model = "digits" if args.model is None else args.model
    args.solvers = list(_ROUNDTRIP_SOLVERS) if args.solvers is None else args.solvers
    args.steps = [5, 10, 20, 50] if args.steps is None else args.steps
    args.spacing = "trailing" if args.spacing is None else args.spacing

    # Every label is checked before a model is loaded: it encodes, its partner decodes,
    # and an adaptive one leaves rtol = atol to --tols. So is --out.
    adaptive: dict[str, bool] = {}
    for label in args.solvers:
        spec, options = solver_label(label, "--solvers")
        check_direction(spec, label, "up", "--solvers", "roundtrip")
        partner = _decode_partner(label)
        if partner != label:
            check_direction(
                solver_label(partner, "--solvers")[0], partner, "down", "--solvers", "roundtrip"
            )
        else:
            check_direction(spec, label, "down", "--solvers", "roundtrip")
        check_label(spec, options, label)
        adaptive[label] = spec.adaptive
    out = check_out(args.out, "--out", folder=True) if args.out else None
    dtype = _DTYPES[args.dtype]
    bundle = load_bundle(args.model, load_model)
    cond = check_conditioning(args, bundle, data_labels=True)
    x0, source, data_labels = _held_out(bundle, args.samples, args.seed)
    if cond.spec == "true" and data_labels is None:
        raise UsageError(
            f"argument --label: 'true' means the data's own labels, and the {source} of "
            f"model {bundle.name!r} have none; give classes (3, 0-9, 1,4,7)"
        )
    labels = cond.labels(torch.arange(len(x0)), data_labels)
    model, _ = _model(bundle, cond, labels, dtype)
    if args.peers:
        _peer_net(bundle, args.spacing, model)
    x0 = x0.to(dtype)
    peak = float(x0.max() - x0.min())
    given = f", {cond.describe()}" if cond.conditional else ""
    print(
        f"pflow roundtrip: model {bundle.name}{given}, {len(x0)} {source}, {args.dtype}, "
        f"{args.spacing} grids from sigma_min; PSNR against the data's range {peak:.3g}"
    )
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for solver in args.solvers:
        if adaptive[solver]:
            jobs += [(solver, f"tol {t:g}", {"tol": t}) for t in args.tols]
        else:
            jobs += [
                (solver, f"{s} steps", {"steps": s, "spacing": args.spacing}) for s in args.steps
            ]
    if args.peers:
        jobs += [("diffusers:ddim_inverse", f"{s} steps", {"peer": s}) for s in args.steps]
    rows: list[RoundTripRow] = []
    interrupted = False
    try:
        for solver, setting, kw in jobs:
            t0 = time.perf_counter()
            if "peer" in kw:
                x, n_enc, n_dec = _peer_round_trip(bundle, x0, kw["peer"], args.spacing, model)
            else:
                x, n_enc, n_dec = round_trip(bundle, x0, solver, model=model, **kw)
            err = (x.double() - x0.double()).flatten()
            rmse = float(err.pow(2).mean().sqrt())
            rows.append(
                RoundTripRow(
                    solver,
                    setting,
                    n_enc,
                    n_dec,
                    rmse,
                    _psnr(rmse, peak),
                    float(err.abs().max()),
                    time.perf_counter() - t0,
                )
            )
    except KeyboardInterrupt:
        if not rows:
            raise Interrupted("no row had finished; nothing written") from None
        interrupted = True
    print(format_rows(rows))
    if out is not None:
        _write_rows(rows, out)
        plot_rows(
            rows,
            out / "roundtrip.png",
            title=f"{bundle.description}: {len(x0)} {source}, {args.dtype}",
        )
        print(f"written to {out}/roundtrip.csv, .json, .png")
    if interrupted:
        where = f" to {out}" if out is not None else ""
        raise Interrupted(f"wrote the {len(rows)} finished rows of {len(jobs)}{where}")
    return 0


def format_rows(rows: list[RoundTripRow]) -> str:
    head = (
        f"{'solver':<24} {'setting':<12} {'NFE enc+dec':>12} {'RMSE':>10} {'PSNR dB':>8} "
        f"{'max |err|':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.solver:<24} {r.setting:<12} {f'{r.nfe_encode}+{r.nfe_decode}':>12} "
            f"{r.rmse:>10.3e} {r.psnr:>8.1f} {r.max_abs:>10.2e}"
        )
    return "\n".join(lines)


def _write_rows(rows: list[RoundTripRow], out: Path) -> None:
    records = [{**asdict(r), "nfe": r.nfe} for r in rows]
    write_atomic(out / "roundtrip.json", lambda p: p.write_text(json.dumps(records, indent=1)))

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)

    write_atomic(out / "roundtrip.csv", write_csv)


def _diffusers_pair(solver: str) -> bool:
    """A row of diffusers' own schedulers, or of a solver paired as they are (dashed)."""
    return solver.startswith("diffusers:") or _decode_partner(solver) != solver


def plot_rows(rows: list[RoundTripRow], path: Path, *, title: str = "") -> None:
    """Round-trip RMSE (log) and PSNR against the round trip's NFE, one line per solver.
    Errors below 1e-12 (exact inversion: round-off or bit-exact) are drawn on that floor
    and their PSNR capped at 150 dB, both marked by a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor, cap = 1e-12, 150.0
    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for solver in dict.fromkeys(r.solver for r in rows):
        pts = sorted((r.nfe, r.rmse, r.psnr) for r in rows if r.solver == solver)
        style = "--o" if _diffusers_pair(solver) else "-o"
        nfe = [p[0] for p in pts]
        ax_r.plot(nfe, [max(p[1], floor) for p in pts], style, ms=3.5, label=solver)
        ax_p.plot(nfe, [min(p[2], cap) for p in pts], style, ms=3.5, label=solver)
    ax_r.axhline(floor, ls=":", lw=1, color="gray")
    ax_r.text(0.55, 0.06, "exact: RMSE <= 1e-12 drawn here", transform=ax_r.transAxes, fontsize=7)
    ax_p.axhline(cap, ls=":", lw=1, color="gray")
    ax_p.text(0.55, 0.88, "exact: PSNR capped at 150 dB", transform=ax_p.transAxes, fontsize=7)
    for ax in (ax_r, ax_p):
        ax.set_xscale("log")
        ax.set_xlabel("NFE of the round trip (encode + decode, counted)")
        ax.grid(True, which="both", alpha=0.25)
    ax_r.set_yscale("log")
    ax_r.set_ylabel("round-trip RMSE")
    ax_p.set_ylabel("round-trip PSNR (dB)")
    ax_r.legend(fontsize=7, loc="center right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
