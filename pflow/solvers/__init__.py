"""The solver registry: every name accepted by ``solver=``, its capabilities and options.

A solver (:class:`~pflow.solvers.base.Solver`) declares what it can do and takes one step;
:func:`~pflow.solvers.driver.integrate` owns the loop. ``solver=`` takes a name, optionally
with options written in brackets, ``"unipc[order=3,corrector=false]"``: they are parsed
against the solver's declared options (:func:`parse_solver`) before any network call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import Option, Outcome, Solver, State, StepInfo
from .ode import PFODE, Evaluation
from .tableau import ButcherTableau

__all__ = [
    "ButcherTableau",
    "Evaluation",
    "Option",
    "Outcome",
    "PFODE",
    "Solver",
    "State",
    "StepInfo",
    "available_solvers",
    "get_solver",
    "parse_solver",
    "register",
    "register_backend",
    "resolve_options",
]

_REGISTRY: dict[str, Solver] = {}

# Backends: ``solver="<prefix>:<method>"`` resolves through ``factory(method) -> Solver``
# (which raises ValueError naming the backend's methods for an unknown one); ``methods()``
# lists the methods for available_solvers(). See pflow/solvers/backends.py.
_BACKENDS: dict[str, tuple[Callable[[str], Solver], Callable[[], list[str]]]] = {}
_BACKEND_PREFIXES = ("torchdiffeq", "scipy")


def register(solver: Solver) -> Solver:
    """Add a solver to the registry (each solver family registers its own)."""
    if not solver.name or "[" in solver.name or "," in solver.name:
        raise ValueError(f"a solver needs a plain name, got {solver.name!r}")
    names = [o.name for o in solver.options]
    if len(set(names)) != len(names):
        raise ValueError(f"solver {solver.name!r} declares an option twice: {names}")
    if solver.adaptive and not {"rtol", "atol"} <= set(names):
        raise ValueError(f"adaptive solver {solver.name!r} must declare rtol and atol")
    _REGISTRY[solver.name] = solver
    return solver


def register_backend(
    prefix: str, factory: Callable[[str], Solver], methods: Callable[[], list[str]]
) -> None:
    """Make ``solver="<prefix>:<method>"`` resolve to ``factory(method)``."""
    _BACKENDS[prefix] = (factory, methods)


def _load_backends() -> None:
    """Register torchdiffeq and scipy on first use (importing them costs ~0.5 s)."""
    from . import backends  # noqa: F401


def available_solvers(backends: bool = True) -> list[str]:
    """The names accepted by ``solver=``: pflow's own, then (unless ``backends=False``,
    which imports nothing) each backend's methods as ``"<backend>:<method>"``."""
    names = list(_REGISTRY)
    if backends:
        _load_backends()
        for prefix, (_, methods) in _BACKENDS.items():
            names += [f"{prefix}:{m}" for m in methods()]
    return names


def _unknown(name: object) -> ValueError:
    known = available_solvers()
    prefixes = " or ".join(f"'{p}:<method>'" for p in _BACKENDS)
    return ValueError(
        f"solver must be one of {', '.join(known)}"
        + (f" (any {prefixes})" if prefixes else "")
        + f"; got {name!r}"
    )


def get_solver(name: str) -> Solver:
    """The solver called ``name`` (a plain name; see :func:`parse_solver` for options)."""
    if isinstance(name, Solver):
        return name
    if isinstance(name, str):
        if name in _REGISTRY:
            return _REGISTRY[name]
        prefix, sep, method = name.partition(":")
        if sep and prefix in _BACKEND_PREFIXES:
            _load_backends()
            if prefix in _BACKENDS:
                return _BACKENDS[prefix][0](method)
    raise _unknown(name)


def _split_label(label: str) -> tuple[str, list[tuple[str, str]]]:
    name, sep, rest = label.strip().partition("[")
    items: list[tuple[str, str]] = []
    if sep:
        if not rest.endswith("]"):
            raise ValueError(
                f"solver {label!r}: options go in brackets at the end, e.g. 'ddim[eta=1]'"
            )
        # ``,`` or ``;`` separate options (``;`` keeps a comma-separated list intact).
        for item in filter(None, (s.strip() for s in rest[:-1].replace(";", ",").split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"solver {label!r}: option {item!r} is not key=value")
            items.append((key.strip(), value.strip()))
    return name.strip(), items


def parse_solver(label: str) -> tuple[Solver, dict[str, Any]]:
    """``"ddim[eta=1]"`` -> ``(ddim, {"eta": 1.0})``: the solver and the options written in
    the label, each checked and converted against the solver's declared options (bools
    accept true/false/1/0/yes/no, numbers are range-checked, an unknown key is an error
    naming the solver's options)."""
    if isinstance(label, Solver):
        return label, {}
    if not isinstance(label, str):
        raise _unknown(label)
    name, items = _split_label(label)
    solver = get_solver(name)
    options: dict[str, Any] = {}
    for key, value in items:
        if key in options:
            raise ValueError(f"solver {label!r}: option {key} is given twice")
        options[key] = _option(solver, key).parse(value, solver.name, text=True)
    return solver, options


def _option(solver: Solver, key: str) -> Option:
    opt = solver.option(key)
    if opt is None:
        allowed = "; ".join(o.describe() for o in solver.options) or "none"
        raise TypeError(f"solver {solver.name!r} does not take {key} (its options: {allowed})")
    return opt


def resolve_options(
    solver: Solver, from_label: dict[str, Any], given: dict[str, Any], label: str = ""
) -> dict[str, Any]:
    """Every declared option of ``solver`` with its value: the label's, else the keyword's
    (``given``; ``None`` means "not given" there), else the default. An option in both the
    label and the keywords is an error naming both."""
    unknown = sorted(k for k in given if solver.option(k) is None and given[k] is not None)
    if unknown:
        _option(solver, unknown[0])
    both = sorted(k for k in from_label if given.get(k) is not None)
    if both:
        k = both[0]
        raise ValueError(
            f"option {k} is given twice: in solver={label or solver.name!r} ({k}="
            f"{from_label[k]!r}) and as the keyword {k}={given[k]!r}; give it once"
        )
    out = solver.defaults()
    for k, v in given.items():
        if v is not None:
            out[k] = solver.option(k).parse(v, solver.name)  # type: ignore[union-attr]
    out.update(from_label)
    return out


# Solver families, one module each; a module lists its solvers in ``SOLVERS``. Adding a
# family is one module and its name here.
FAMILIES = ("runge_kutta", "exponential", "singlestep", "multistep", "stochastic", "reversible")


def _register_all() -> None:
    for family in FAMILIES:
        for solver in importlib.import_module(f"{__name__}.{family}").SOLVERS:
            register(solver)


_register_all()
