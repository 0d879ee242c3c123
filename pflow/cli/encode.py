"""``pflow encode``, ``pflow decode`` and ``pflow roundtrip``: data to latent noise and back.

``encode`` reads data (a PNG for image models, or ``.npy`` / ``.pt`` holding one sample or
a batch) and writes the latent (``.pt`` or ``.npy``); ``decode`` reads a latent and writes
data (``.png``, ``.npy`` or ``.pt``). A ``.pt`` latent also stores the companion of a
reversible solver and the settings it was encoded with, which ``decode`` uses for the
settings not given on its command line, so that the round trip walks the same grid back.
A ``.npy`` latent stores the companion next to it as ``<name>.companion.npy``.

``roundtrip`` encodes and decodes held-out data (the digits test split, or exact samples
of the Gaussian mixture) with each solver and step count, and prints and plots the
round-trip RMSE and PSNR against NFE.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..grids import SPACINGS
from ..inversion import DDIM_INVERSE, decode, encode
from ..solvers import Solver
from ..zoo.registry import BundledModel, load_model
from .args import (
    check_direction,
    check_tolerances,
    float_list,
    label_list,
    positive_int,
    solver_label,
)

__all__ = ["add_parsers"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DEFAULTS = {"solver": "euler", "steps": 10, "spacing": "trailing"}

# Encode-only solvers and the solver that decodes their latents. This is a pairing, not a
# capability: ``ddim_inverse`` is diffusers' DDIMInverseScheduler, whose latents diffusers
# decodes with DDIMScheduler, which is ``euler`` on the mirrored grid (docs/inversion.md).
# A solver's ``directions`` say that it cannot decode; only this table says what can.
DECODE_PARTNERS = {DDIM_INVERSE: "euler"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "encode",
        help="encode data (PNG, .npy, .pt) into latent noise (.pt, .npy)",
        description="Integrate the PF-ODE from the data (at the grid's first sigma, the "
        "schedule's sigma_min by default) up to sigma_max; write the latent x_T.",
    )
    e.set_defaults(func=_encode_cmd)
    e.add_argument("input", help="data: .png (image models), .npy or .pt")
    e.add_argument("--out", required=True, help="latent file: .pt or .npy")
    _add_solve_options(e, "a solver that runs up (default euler)")

    d = sub.add_parser(
        "decode",
        help="decode latent noise (.pt, .npy) into data (PNG, .npy, .pt)",
        description="Integrate the PF-ODE from the latent down to the sigma encode started "
        "from. Settings not given are taken from a .pt latent, else euler, 10 trailing steps.",
    )
    d.set_defaults(func=_decode_cmd)
    d.add_argument("latent", help="latent: .pt (from pflow encode) or .npy")
    d.add_argument("--out", required=True, help="data file: .png, .npy or .pt")
    _add_solve_options(d, "a solver that runs down (default: the latent's, else euler)")

    r = sub.add_parser(
        "roundtrip",
        help="encode and decode held-out data; round-trip RMSE and PSNR against NFE",
        description="Encode then decode held-out data with each solver and step count (the "
        "same grid both ways; ddim_inverse decodes with euler, as diffusers' DDIMScheduler "
        "does) and report the round-trip error, with a table (.csv, .json) and a plot.",
    )
    r.set_defaults(func=_roundtrip_cmd)
    r.add_argument("--model", default="digits", help="bundled model (default %(default)s)")
    r.add_argument(
        "--solvers",
        type=label_list,
        default=["euler", "heun", "dpm_solver_2", "alf", DDIM_INVERSE],
        help="comma-separated solver labels, with options in brackets "
        "(ddim_inverse: diffusers' DDIM inversion)",
    )
    r.add_argument("--steps", type=_ints, default=[5, 10, 20, 50], help="comma-separated")
    r.add_argument(
        "--tols", type=float_list, default=[1e-3, 1e-5], help="rtol = atol of adaptive solvers"
    )
    r.add_argument("--spacing", choices=SPACINGS, default="trailing")
    r.add_argument("--samples", type=positive_int, default=100, help="number of data samples")
    r.add_argument("--seed", type=int, default=0, help="seed of exact-model samples")
    r.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    r.add_argument(
        "--peers",
        action="store_true",
        help="also run diffusers' DDIMInverseScheduler + DDIMScheduler themselves "
        "(leading/trailing spacing, eps-prediction networks)",
    )
    r.add_argument("--out", default=None, help="folder for roundtrip.csv/.json/.png")


def _add_solve_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", required=True, help="bundled model name or module:factory")
    p.add_argument("--solver", default=None, help=f"{what}; options in brackets: rk45[rtol=1e-3]")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--spacing", choices=SPACINGS, default=None)
    p.add_argument("--rtol", type=float, default=None)
    p.add_argument("--atol", type=float, default=None)
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")


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
def _bundle(name: str, dtype: torch.dtype) -> BundledModel:
    bundle = load_model(name)
    net = getattr(bundle.model, "net", None)
    if isinstance(net, torch.nn.Module):
        net.to(dtype)
    return bundle


def _batch(x: Tensor, shape: tuple[int, ...], what: str, bundle: BundledModel) -> Tensor:
    """``x`` as ``(batch, *shape)``: one sample gets a batch dimension."""
    if tuple(x.shape) == shape:
        return x.unsqueeze(0)
    if x.ndim == len(shape) + 1 and tuple(x.shape[1:]) == shape and x.shape[0] >= 1:
        return x
    raise ValueError(
        f"{what} has shape {tuple(x.shape)}; model {bundle.name!r} takes samples of shape "
        f"{shape} (or a batch of them)"
    )


def _read_png(path: Path, shape: tuple[int, ...]) -> Tensor:
    from PIL import Image

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(
            f"a PNG needs an image model (samples of shape (1 or 3, H, W)); this one takes {shape}"
        )
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L" if shape[0] == 1 else "RGB"), dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    if tuple(arr.shape[1:]) != tuple(shape[1:]):
        raise ValueError(
            f"{path.name} is {arr.shape[2]}x{arr.shape[1]} pixels; the model takes "
            f"{shape[2]}x{shape[1]}"
        )
    return torch.from_numpy(arr / 127.5 - 1.0)  # [0, 255] -> [-1, 1]


def _write_png(path: Path, x: Tensor) -> list[Path]:
    from PIL import Image

    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
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
        Image.fromarray(arr).save(p)
    return paths


def _read_data(path: Path, bundle: BundledModel) -> Tensor:
    suffix = path.suffix.lower()
    if suffix == ".png":
        x = _read_png(path, bundle.shape)
    elif suffix == ".npy":
        x = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".pt":
        x = _tensor_from_pt(path, "x")[0]
    else:
        raise ValueError(f"input must be a .png, .npy or .pt file, got {path.name!r}")
    return _batch(x, bundle.shape, "input", bundle)


def _tensor_from_pt(path: Path, key: str) -> tuple[Tensor, dict[str, Any]]:
    """A tensor from a ``.pt`` file holding a tensor or a dict with ``key``; the dict's
    other entries are returned too. Loaded with ``weights_only=True`` (no pickled code)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Tensor):
        return obj, {}
    if isinstance(obj, dict) and isinstance(obj.get(key), Tensor):
        return obj[key], obj
    raise ValueError(f"{path.name} holds neither a tensor nor a dict with a {key!r} tensor")


def _companion_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.companion.npy")


# ---------------------------------------------------------------- encode / decode
def _encode_cmd(args: argparse.Namespace) -> int:
    settings, _ = _settings(args, {}, "up")  # the solver is checked before any model loads
    dtype = _DTYPES[args.dtype]
    bundle = _bundle(args.model, dtype)
    out = Path(args.out)
    if out.suffix not in (".pt", ".npy"):
        raise ValueError(f"--out must end in .pt or .npy, got {out.name!r}")
    x0 = _read_data(Path(args.input), bundle).to(dtype)
    t0 = time.perf_counter()
    res = encode(bundle.model, x0, **_solve_kwargs(settings))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        record: dict[str, Any] = {"latent": res.x, "model": bundle.name, **settings}
        if res.companion is not None:
            record["companion"] = res.companion
        torch.save(record, out)
    else:
        np.save(out, res.x.numpy())
        if res.companion is not None:
            np.save(_companion_path(out), res.companion.numpy())
    print(
        f"encoded {len(x0)} sample(s) with {_describe(settings)}: NFE {res.nfe}, "
        f"{time.perf_counter() - t0:.2f}s; latent written to {out}"
        + (" (with its companion)" if res.companion is not None else "")
    )
    return 0


def _decode_cmd(args: argparse.Namespace) -> int:
    if args.solver is not None:  # checked before any model loads
        _check_solver(args.solver, "down")
    dtype = _DTYPES[args.dtype]
    bundle = _bundle(args.model, dtype)
    src, out = Path(args.latent), Path(args.out)
    if out.suffix not in (".png", ".npy", ".pt"):
        raise ValueError(f"--out must end in .png, .npy or .pt, got {out.name!r}")
    companion: Tensor | None = None
    stored: dict[str, Any] = {}
    if src.suffix == ".pt":
        z, record = _tensor_from_pt(src, "latent")
        if record.get("model", bundle.name) != bundle.name:
            raise ValueError(
                f"{src.name} was encoded with model {record['model']!r}, not {bundle.name!r}"
            )
        stored = {
            k: record[k] for k in ("solver", "steps", "spacing", "rtol", "atol") if k in record
        }
        if "solver" in stored:  # an encode-only solver's latents: decode with its partner
            stored["solver"] = _decode_partner(stored["solver"])
        companion = record.get("companion")
    elif src.suffix == ".npy":
        z = torch.from_numpy(np.load(src, allow_pickle=False))
        if _companion_path(src).is_file():
            companion = torch.from_numpy(np.load(_companion_path(src), allow_pickle=False))
    else:
        raise ValueError(f"latent must be a .pt or .npy file, got {src.name!r}")
    z = _batch(z, bundle.shape, "latent", bundle).to(dtype)
    settings, spec = _settings(args, stored, "down")
    if not spec.reversible:
        companion = None
    elif companion is not None and companion.ndim == z.ndim:  # one sample, stored unbatched
        companion = companion.unsqueeze(1)
    t0 = time.perf_counter()
    res = decode(bundle.model, z, companion=companion, **_solve_kwargs(settings))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        written = _write_png(out, res.x)
    elif out.suffix == ".npy":
        np.save(out, res.x.numpy())
        written = [out]
    else:
        torch.save(res.x, out)
        written = [out]
    how = "exactly, with the stored companion" if companion is not None else ""
    print(
        f"decoded {len(z)} latent(s) with {_describe(settings)}{' ' + how if how else ''}: "
        f"NFE {res.nfe}, {time.perf_counter() - t0:.2f}s; written to "
        + (str(written[0]) if len(written) == 1 else f"{written[0]} ... {written[-1].name}")
    )
    return 0


def _check_solver(label: str, direction: str) -> tuple[Solver, dict[str, Any]]:
    """The solver of ``--solver`` and its label's options; a one-line error for a bad
    label or a solver that cannot run ``direction`` (``"up"``: encode, ``"down"``:
    decode), naming the partner that decodes an encode-only solver's latents."""
    command = "encode" if direction == "up" else "decode"
    spec, options = solver_label(label, "--solver")
    partner = _decode_partner(label)
    if direction == "down" and "down" not in spec.directions and partner != label:
        raise ValueError(
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
    for key in ("solver", "steps", "spacing", "rtol", "atol"):
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


def _held_out(bundle: BundledModel, n: int, seed: int) -> tuple[Tensor, str]:
    if bundle.exact is not None:
        g = torch.Generator().manual_seed(seed)
        x = bundle.exact.sample(n, generator=g).reshape(n, *bundle.shape)
        return x, "exact samples"
    if bundle.name == "digits":
        from ..zoo.data import digits_data

        x = digits_data("test")
        if n > len(x):
            raise ValueError(f"--samples {n} exceeds the {len(x)} held-out test digits")
        return x[:n], "held-out test digits"
    if bundle.name == "moons":
        from ..zoo.data import moons_data

        # Training drew seed 0 and evaluation seed 10000; 12345 + seed is held out.
        return moons_data(n, seed=12345 + seed), "held-out two-moons points"
    raise ValueError(
        f"no held-out data known for model {bundle.name!r}: roundtrip knows 'digits', "
        "'moons' and models with an exact distribution (gmm)"
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
) -> tuple[Tensor, int, int]:
    """Encode ``x0`` and decode it back on the same grid; ``(x, nfe_encode, nfe_decode)``.
    An encode-only solver decodes with its partner (``ddim_inverse`` with ``euler``,
    diffusers' DDIMScheduler; see :data:`DECODE_PARTNERS`); a reversible one (``alf``)
    hands its companion over."""
    kw: dict[str, Any] = (
        {"rtol": tol, "atol": tol} if tol is not None else {"steps": steps, "spacing": spacing}
    )
    enc = encode(bundle.model, x0, solver, **kw)
    dec = decode(bundle.model, enc.x, _decode_partner(solver), companion=enc.companion, **kw)
    return dec.x, enc.nfe, dec.nfe


def _peer_net(bundle: BundledModel, spacing: str) -> Any:
    """The network that ``--peers`` drives with diffusers' schedulers (checked before any
    row runs)."""
    from ..integrations import diffusers_peers

    model: Any = bundle.model
    net = getattr(model, "net", None)
    if net is None or getattr(model, "prediction", None) is None:
        raise ValueError(f"--peers needs a network model (EpsModel); {bundle.name!r} is not one")
    if spacing not in ("leading", "trailing"):
        raise ValueError(f"--peers supports leading and trailing spacing, got {spacing!r}")
    if not diffusers_peers.available():
        raise ValueError("--peers needs diffusers installed (pip install diffusers)")
    return net


def _peer_round_trip(
    bundle: BundledModel, x0: Tensor, steps: int, spacing: str
) -> tuple[Tensor, int, int]:
    """diffusers' DDIMInverseScheduler then DDIMScheduler on the same network
    (:func:`pflow.integrations.diffusers_peers.ddim_round_trip`)."""
    from ..integrations.diffusers_peers import ddim_round_trip

    net = _peer_net(bundle, spacing)
    model: Any = bundle.model
    return ddim_round_trip(net, model.schedule, model.prediction, x0, steps, spacing)


def _roundtrip_cmd(args: argparse.Namespace) -> int:
    from ..bench import check_label

    # Every label is checked before a model is loaded: it encodes, its partner decodes,
    # and an adaptive one leaves rtol = atol to --tols.
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
    dtype = _DTYPES[args.dtype]
    bundle = _bundle(args.model, dtype)
    if args.peers:
        _peer_net(bundle, args.spacing)
    x0, source = _held_out(bundle, args.samples, args.seed)
    x0 = x0.to(dtype)
    peak = float(x0.max() - x0.min())
    print(
        f"pflow roundtrip: model {bundle.name}, {len(x0)} {source}, {args.dtype}, "
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
    for solver, setting, kw in jobs:
        t0 = time.perf_counter()
        if "peer" in kw:
            x, n_enc, n_dec = _peer_round_trip(bundle, x0, kw["peer"], args.spacing)
        else:
            x, n_enc, n_dec = round_trip(bundle, x0, solver, **kw)
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
    print(format_rows(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_rows(rows, out)
        plot_rows(
            rows,
            out / "roundtrip.png",
            title=f"{bundle.description}: {len(x0)} {source}, {args.dtype}",
        )
        print(f"written to {out}/roundtrip.csv, .json, .png")
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
    (out / "roundtrip.json").write_text(json.dumps(records, indent=1))
    with (out / "roundtrip.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)


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
