"""Argument types and options shared by the command-line modules.

Parsers are built without importing a solver backend (torchdiffeq, scipy): solver labels
are taken as text at parse time and checked against the registry when the command runs
(:func:`solver_label`), so ``pflow --help`` stays fast and a bad label still fails with a
one-line error before any model is loaded or any network call is made.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import probe_writable, write_atomic

__all__ = [
    "CommandError",
    "Interrupted",
    "UsageError",
    "add_scale_args",
    "available_memory",
    "check_direction",
    "check_input",
    "check_out",
    "check_tolerances",
    "float_list",
    "int_list",
    "label_list",
    "load_bundle",
    "name_list",
    "positive_int",
    "solver_label",
    "split_labels",
    "write_atomic",
]


# ---------------------------------------------------------------- errors
class UsageError(ValueError):
    """The command line (or an input file named on it) is wrong: ``pflow`` prints the
    message on one line and exits 2, as argparse does."""


class CommandError(RuntimeError):
    """The command ran and failed (a user's model factory raised, a file could not be
    read): ``pflow`` prints the message on one line and exits 1."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C), with what the command did about it ("wrote the 96 finished
    samples of 1000 to x.npy"): ``pflow`` prints it on one line and exits 130."""


# ---------------------------------------------------------------- files
def _nearest_existing(path: Path) -> Path:
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    return anc


def check_out(
    text: str, flag: str = "--out", *, suffixes: Sequence[str] = (), folder: bool = False
) -> Path:
    """``text`` as an output path that can be written, checked before any model is loaded
    or anything is computed: the suffix is one of ``suffixes`` (a file) or the path is
    not a file (``folder``); the nearest existing folder above it (missing folders are
    made when writing) is a folder in which a file can be created (tried, not guessed
    from permission bits: a read-only mount, ``/sys`` and root squash all fail here).
    A :class:`UsageError` naming ``flag`` otherwise."""
    path = Path(text).expanduser()
    if folder:
        if path.exists() and not path.is_dir():
            raise UsageError(f"argument {flag}: {text} is a file; expected a folder")
    else:
        if path.is_dir():
            raise UsageError(f"argument {flag}: {text} is a folder; expected a file name")
        if suffixes and path.suffix.lower() not in suffixes:
            raise UsageError(
                f"argument {flag}: expected a file ending in {', '.join(suffixes)}, "
                f"got {path.name!r}"
            )
    start = path if folder else path.parent
    anc = _nearest_existing(start.absolute())
    if not anc.is_dir():
        raise UsageError(f"argument {flag}: cannot write {text}: {anc} is a file, not a folder")
    try:
        probe_writable(anc)
    except OSError as exc:
        raise UsageError(
            f"argument {flag}: cannot write {text}: folder {anc} is not writable "
            f"({exc.strerror or exc})"
        ) from None
    return path


def check_input(text: str, what: str, suffixes: Sequence[str]) -> Path:
    """``text`` as an existing input file with one of ``suffixes``; a
    :class:`UsageError` naming ``what`` (``"argument input"``) otherwise."""
    path = Path(text).expanduser()
    if path.suffix.lower() not in suffixes:
        raise UsageError(
            f"{what}: expected a file ending in {', '.join(suffixes)}, got {path.name!r}"
        )
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"{what}: {text} {why}")
    return path


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (``MemAvailable`` on Linux,
    else physical memory), or ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------- models
def load_bundle(
    name: str, loader: Callable[[str], Any] | None = None, flag: str = "--model"
) -> Any:
    """``load_model(name)`` (or ``loader(name)``) with its failures on one line: an unknown
    bundled name is a :class:`UsageError`; anything a ``module:factory`` raises (on
    import, in the factory, or a wrong return type) is a :class:`CommandError` naming
    the factory. KeyboardInterrupt passes through."""
    from ..zoo import registry

    if ":" not in name and name not in registry.available_models():
        raise UsageError(
            f"argument {flag}: unknown model {name!r}; expected one of "
            f"{', '.join(registry.available_models())} or module:factory"
        )
    load = loader if loader is not None else registry.load_model
    try:
        return load(name)
    except Exception as exc:  # a user's factory may raise anything
        text = one_line(exc)
        if not text.startswith(f"model {name!r}"):  # registry messages name it already
            text = f"model {name!r} failed to load: {text}"
        raise CommandError(f"argument {flag}: {text}") from exc


def one_line(exc: BaseException, limit: int = 600) -> str:
    """``exc`` as one line: ``Type: message`` with its whitespace (newlines) collapsed,
    cut at ``limit`` characters. pflow's own messages are kept without the type."""
    text = " ".join(str(exc).split())
    if type(exc) in (UsageError, CommandError, ValueError, TypeError) and text:
        out = text
    else:
        out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


# ---------------------------------------------------------------- numbers
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


# ---------------------------------------------------------------- names and labels
def name_list(known: Sequence[str], what: str) -> Any:
    """An argparse type: comma-separated names, each one of ``known``."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or repr(text)}; known: {', '.join(known)}"
            )
        return names

    return parse


def split_labels(text: str) -> list[str]:
    """``"unipc[order=3,corrector=false],ddim[eta=1]"`` -> ``["unipc[order=3,corrector=false]",
    "ddim[eta=1]"]``: split on the commas outside brackets (a label's options are separated
    by commas too). Empty items are dropped; an unbalanced bracket is an error."""
    labels: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in solver list {text!r}")
        elif ch == "," and depth == 0:
            labels.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in solver list {text!r}")
    labels.append(text[start:])
    return [v.strip() for v in labels if v.strip()]


def label_list(text: str) -> list[str]:
    """An argparse type: a comma-separated list of solver labels (see
    :func:`split_labels`), checked only for its shape; :func:`solver_label` checks each
    against the registry when the command runs."""
    try:
        labels = split_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not labels:
        raise argparse.ArgumentTypeError("no solver given")
    return labels


def solver_label(label: str, flag: str) -> tuple[Any, dict[str, Any]]:
    """The solver and the options written in ``label`` (``pflow.solvers.parse_solver``),
    with a one-line :class:`UsageError` naming ``flag`` for an unknown solver, an unknown option
    or a bad value. Called when the command runs (it may load the solver backends)."""
    from ..solvers import get_solver, parse_solver

    name = label.partition("[")[0].strip()
    try:
        get_solver(name)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"argument {flag}: unknown solver in {label!r}: {exc}") from None
    try:
        return parse_solver(label)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"argument {flag}: {exc}") from None


def check_direction(solver: Any, label: str, direction: str, flag: str, command: str) -> None:
    """A one-line error when ``solver`` cannot run ``direction`` (``"down"``: sample,
    decode; ``"up"``: encode), read from its declared ``directions``."""
    if direction not in solver.directions:
        way = "up (encode)" if direction == "down" else "down (sample, decode)"
        raise UsageError(
            f"argument {flag}: solver {label!r} only runs {way}; {command} cannot use it"
        )


def check_tolerances(
    solver: Any, options: dict[str, Any], label: str, flag: str, **given: float | None
) -> dict[str, Any]:
    """The tolerance keywords to pass on: those given on the command line (``--rtol``,
    ``--atol``), never one the user did not give. One given both in the label and as a
    flag is an error naming both."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key in options:
            raise UsageError(
                f"{key} is given twice: in {flag} {label!r} ({key}={options[key]!r}) and as "
                f"--{key} {value!r}; give it once"
            )
        out[key] = value
    return out


# ---------------------------------------------------------------- shared options
def add_scale_args(p: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device``, ``--net-dtype`` and ``--compile``."""
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=None,
        help="solve at most this many samples at a time (memory stays flat as samples grow)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda (under torchrun: cuda:LOCAL_RANK) or cuda:N (default %(default)s)",
    )
    p.add_argument(
        "--net-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="run the network in this dtype; the ODE state stays float32",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network")


# ---------------------------------------------------------------- labels and guidance
def label_spec(text: str) -> list[int] | str:
    """An argparse type for ``--label``: one class (``3``), a range (``0-9``), a list
    (``1,4,7``; ranges allowed inside), or ``true`` (the data's own labels, for commands
    that read data). Classes are checked against the model when it is loaded."""
    text = text.strip()
    if text.lower() == "true":
        return "true"
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            if dash and lo:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class (3), a range (0-9), a list (1,4,7) or 'true', got {text!r}"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError(f"no label given in {text!r}")
    return out


def guidance_value(text: str) -> float:
    """An argparse type: one guidance scale ``w >= 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def guidance_list(text: str) -> list[float]:
    """An argparse type: comma-separated guidance scales, each ``>= 0``."""
    values = [guidance_value(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"no guidance scale given in {text!r}")
    return values


def sigma_interval(text: str) -> tuple[float, float]:
    """An argparse type for ``--guidance-interval lo,hi`` (sigmas, ``0 <= lo < hi``;
    ``inf`` allowed for ``hi``)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two sigmas lo,hi (e.g. 0.3,5), got {text!r}"
        ) from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= lo < hi, got {text!r}")
    return lo, hi


def unit_interval(text: str) -> float:
    """An argparse type: a number in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def add_guidance_args(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """``--label``, ``--guidance`` (a list with ``sweep``), ``--guidance-interval`` and
    ``--guidance-rescale`` for class-conditional models (``digits-cond``)."""
    p.add_argument(
        "--label",
        type=label_spec,
        default=None,
        help="class labels of a class-conditional model: 3, 0-9 (sample i gets the "
        "i-th, cycling), 1,4,7, or true (the data's own labels)",
    )
    p.add_argument(
        "--guidance",
        type=guidance_list if sweep else guidance_value,
        default=None,
        metavar="W,W,..." if sweep else "W",
        help="classifier-free guidance scale"
        + ("s, swept as an axis" if sweep else "")
        + " (1: the conditional model; default 1 when --label is given)",
    )
    p.add_argument(
        "--guidance-interval",
        type=sigma_interval,
        default=None,
        metavar="LO,HI",
        help="guide only for LO < sigma <= HI (Kynkaanniemi et al. 2024)",
    )
    p.add_argument(
        "--guidance-rescale",
        type=unit_interval,
        default=0.0,
        metavar="PHI",
        help="guidance rescale phi in [0, 1] (Lin et al. 2023; default 0: off)",
    )


def check_guidance_args(args: argparse.Namespace, bundle: Any) -> None:
    """A one-line :class:`UsageError` when guidance options are given without a label,
    or labels to an unconditional model."""
    guided = (
        args.guidance is not None
        or args.guidance_interval is not None
        or args.guidance_rescale != 0.0
    )
    if args.label is None:
        if guided:
            raise UsageError(
                "argument --guidance: classifier-free guidance needs --label (the class to "
                "guide towards)"
            )
        return
    if getattr(bundle, "num_classes", None) is None:
        raise UsageError(
            f"argument --label: model {bundle.name!r} is unconditional and takes no labels "
            "(class-conditional bundled models: digits-cond)"
        )
    if args.label != "true":
        bad = [v for v in args.label if not 0 <= v < bundle.num_classes]
        if bad:
            raise UsageError(
                f"argument --label: unknown label {bad[0]} for model {bundle.name!r}; its "
                f"classes are 0-{bundle.num_classes - 1}"
            )


def labels_for(
    spec: list[int] | str, indices: Any, data_labels: Any = None, flag: str = "--label"
) -> Any:
    """The labels of samples ``indices`` (an int64 tensor): sample ``i`` gets
    ``spec[i % len(spec)]``, or its own data label for ``true``."""
    import torch

    if spec == "true":
        if data_labels is None:
            raise UsageError(
                f"argument {flag}: 'true' means the data's own labels, and this command "
                "reads no labelled data; give classes (3, 0-9, 1,4,7)"
            )
        return torch.as_tensor(data_labels)[indices]
    table = torch.tensor(spec, dtype=torch.int64)
    return table[torch.as_tensor(indices) % len(table)]


# ---------------------------------------------------------------- conditioned models
@dataclass(frozen=True)
class Conditioning:
    """The labels and classifier-free guidance a command runs a class-conditional model
    with: from ``--label``, ``--guidance``, ``--guidance-interval`` and
    ``--guidance-rescale`` (:meth:`from_args`), or from a latent file's record.

    ``spec`` is :func:`label_spec`'s value (``None``: no labels, the model as it is).
    """

    spec: list[int] | str | None = None
    scale: float = 1.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Conditioning:
        """The options of ``args`` (those of :func:`add_guidance_args`, one scale)."""
        return cls(
            args.label,
            1.0 if args.guidance is None else float(args.guidance),
            None if args.guidance_interval is None else tuple(args.guidance_interval),  # type: ignore[arg-type]
            float(args.guidance_rescale or 0.0),
        )

    @property
    def conditional(self) -> bool:
        """Whether labels are given (else the model runs as it is)."""
        return self.spec is not None

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance changes the conditional model."""
        return self.scale != 1.0 or self.interval is not None or self.rescale != 0.0

    def labels(self, indices: Any, data_labels: Any = None) -> Any:
        """The labels of samples ``indices`` (:func:`labels_for`); ``None`` without labels."""
        if self.spec is None:
            return None
        return labels_for(self.spec, indices, data_labels)

    def model(self, bundle: Any, model: Any, labels: Any) -> Any:
        """``model`` (``bundle.model`` as prepared: moved, cast or compiled) given
        ``labels`` (one per sample) under this guidance; ``model`` itself without labels.

        What :meth:`pflow.zoo.registry.BundledModel.conditioned` builds, with the labels
        and the null label on the network's device: the conditioned model when guidance
        changes nothing, else :func:`pflow.guide` of it."""
        if labels is None:
            return model
        import torch

        from ..guidance import guide

        labels = bundle.check_labels(labels, "argument --label").to(_net_device(model))
        cond = model.condition(**{bundle.label_key: labels})
        if not self.guided:
            return cond
        null = torch.full((1,), bundle.null_label, dtype=torch.int64, device=labels.device)
        return guide(
            cond,
            self.scale,
            {bundle.label_key: null},
            interval=self.interval,
            rescale=self.rescale,
        )

    def describe(self) -> str:
        """``"labels 0-9, guidance 4 for sigma in (0.3, 5], rescale 0.7"``, ``"the data's own
        labels, guidance 1"``; ``"no labels"``."""
        if self.spec is None:
            return "no labels"
        own = self.spec == "true"
        text = "the data's own labels" if own else f"labels {spec_text(self.spec)}"
        text += f", guidance {self.scale:g}"
        if self.interval is not None:
            text += f" for sigma in ({self.interval[0]:g}, {self.interval[1]:g}]"
        if self.rescale:
            text += f", rescale {self.rescale:g}"
        return text

    def record(self) -> dict[str, Any]:
        """Plain values for a JSON or latent record (``label`` as written by
        :func:`spec_text`)."""
        return {
            "label": None if self.spec is None else spec_text(self.spec),
            "guidance": self.scale if self.spec is not None else None,
            "guidance_interval": None if self.interval is None else list(self.interval),
            "guidance_rescale": self.rescale,
        }


def _net_device(model: Any) -> Any:
    """The device of ``model``'s network parameters (the CPU when it has none)."""
    import torch

    net = getattr(model, "eager_net", getattr(model, "net", None))
    if isinstance(net, torch.nn.Module):
        first = next(iter(net.parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def spec_text(spec: list[int] | str) -> str:
    """A :func:`label_spec` value written back compactly: ``[0, 1, ..., 9]`` -> ``"0-9"``,
    ``[1, 4, 7]`` -> ``"1,4,7"``, ``"true"`` -> ``"true"``."""
    if isinstance(spec, str):
        return spec
    parts: list[str] = []
    i = 0
    while i < len(spec):
        j = i
        while j + 1 < len(spec) and spec[j + 1] == spec[j] + 1:
            j += 1
        parts.append(f"{spec[i]}-{spec[j]}" if j > i + 1 else ",".join(map(str, spec[i : j + 1])))
        i = j + 1
    return ",".join(parts)


def check_conditioning(
    args: argparse.Namespace, bundle: Any, *, data_labels: bool = False
) -> Conditioning:
    """The :class:`Conditioning` of ``args``, checked against the loaded ``bundle``
    (:func:`check_guidance_args`), with one-line :class:`UsageError` for ``--label true``
    in a command that reads no labelled data (``data_labels`` False) and for a
    ``--guidance-interval`` that lies outside the model's sigma range."""
    check_guidance_args(args, bundle)
    cond = Conditioning.from_args(args)
    if cond.spec == "true" and not data_labels:
        labels_for("true", [], None)  # raises its one-line error
    if cond.interval is not None:
        schedule = getattr(bundle.model, "schedule", None)
        if schedule is not None:
            lo, hi = cond.interval
            s_min, s_max = float(schedule.sigma_min), float(schedule.sigma_max)
            if hi < s_min or lo >= s_max:
                raise UsageError(
                    f"argument --guidance-interval: ({lo:g}, {hi:g}) lies outside the sigma "
                    f"range [{s_min:.4g}, {s_max:.4g}] of model {bundle.name!r}; guidance "
                    "would never apply"
                )
    return cond
