"""Argument types and options shared by the command-line modules.

Parsers are built without importing a solver backend (torchdiffeq, scipy): solver labels
are taken as text at parse time and checked against the registry when the command runs
(:func:`solver_label`), so ``pflow --help`` stays fast and a bad label still fails with a
one-line error before any model is loaded or any network call is made.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = [
    "add_scale_args",
    "check_direction",
    "check_tolerances",
    "float_list",
    "int_list",
    "label_list",
    "name_list",
    "positive_int",
    "solver_label",
    "split_labels",
]


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
    with a one-line ValueError naming ``flag`` for an unknown solver, an unknown option
    or a bad value. Called when the command runs (it may load the solver backends)."""
    from ..solvers import get_solver, parse_solver

    name = label.partition("[")[0].strip()
    try:
        get_solver(name)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"argument {flag}: unknown solver in {label!r}: {exc}") from None
    try:
        return parse_solver(label)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"argument {flag}: {exc}") from None


def check_direction(solver: Any, label: str, direction: str, flag: str, command: str) -> None:
    """A one-line error when ``solver`` cannot run ``direction`` (``"down"``: sample,
    decode; ``"up"``: encode), read from its declared ``directions``."""
    if direction not in solver.directions:
        way = "up (encode)" if direction == "down" else "down (sample, decode)"
        raise ValueError(
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
            raise ValueError(
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
