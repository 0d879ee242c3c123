"""The solver registry: every name accepted by ``solver=`` and how to run it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from .ode import PFODE, Outcome
from .per_sample import run_adaptive
from .runge_kutta import solve_fixed
from .tableau import BOSH3, DOPRI5, EULER, HEUN, MIDPOINT, RK4, ButcherTableau

__all__ = ["SolverSpec", "available_solvers", "get_solver", "ButcherTableau"]

Runner = Callable[..., Outcome]


@dataclass(frozen=True)
class SolverSpec:
    """A named solver.

    Attributes:
        name: the name accepted by ``solver=``.
        adaptive: chooses its own steps (takes ``rtol``/``atol``) rather than walking a grid.
        order: order of accuracy on a smooth problem.
        run: ``run(ode, x, grid, *, last_step, record, partial, **options) -> Outcome``.
        options: extra keyword options the runner accepts.
        summary: one line for listings.
        stochastic: draws random noise (its endpoint is not the ODE's).
    """

    name: str
    adaptive: bool
    order: int
    run: Runner
    options: tuple[str, ...] = ()
    summary: str = ""
    stochastic: bool = False


def _rk_fixed(tab: ButcherTableau, summary: str) -> SolverSpec:
    return SolverSpec(
        tab.name, False, tab.order, partial(solve_fixed, tableau=tab), summary=summary
    )


def _rk_adaptive(name: str, tab: ButcherTableau, summary: str) -> SolverSpec:
    return SolverSpec(
        name,
        True,
        tab.order,
        partial(run_adaptive, tableau=tab),
        options=("rtol", "atol", "first_step", "per_sample"),
        summary=summary,
    )


_REGISTRY: dict[str, SolverSpec] = {
    s.name: s
    for s in (
        _rk_fixed(EULER, "Euler; on a DDIM grid this is DDIM (eta = 0)"),
        _rk_fixed(HEUN, "Heun's 2nd order (EDM Algorithm 1), 2 NFE per step, Euler into 0"),
        _rk_fixed(MIDPOINT, "explicit midpoint, 2nd order, 2 NFE per step"),
        _rk_fixed(RK4, "classical Runge-Kutta, 4th order, 4 NFE per step"),
        _rk_adaptive("rk45", DOPRI5, "Dormand-Prince 5(4), FSAL, PI step control"),
        _rk_adaptive("bosh3", BOSH3, "Bogacki-Shampine 3(2), FSAL, PI step control"),
    )
}


# Backends: ``solver="<prefix>:<method>"`` resolves through ``factory(method) -> SolverSpec``
# (which raises ValueError naming the backend's methods for an unknown one); ``methods()``
# lists the methods for available_solvers(). See pflow/solvers/backends.py.
_BACKENDS: dict[str, tuple[Callable[[str], SolverSpec], Callable[[], list[str]]]] = {}


def register_backend(
    prefix: str, factory: Callable[[str], SolverSpec], methods: Callable[[], list[str]]
) -> None:
    """Make ``solver="<prefix>:<method>"`` resolve to ``factory(method)``."""
    _BACKENDS[prefix] = (factory, methods)


def _load_backends() -> None:
    """Register torchdiffeq and scipy on first use (importing them costs ~0.5 s)."""
    from . import backends  # noqa: F401


def available_solvers() -> list[str]:
    """The names accepted by ``solver=``: pflow's own, then each backend's methods as
    ``"<backend>:<method>"``."""
    _load_backends()
    names = list(_REGISTRY)
    for prefix, (_, methods) in _BACKENDS.items():
        names += [f"{prefix}:{m}" for m in methods()]
    return names


def get_solver(name: str) -> SolverSpec:
    """The solver called ``name``; the error lists the known names."""
    if isinstance(name, str):
        if name in _REGISTRY:
            return _REGISTRY[name]
        prefix, sep, method = name.partition(":")
        _load_backends()
        if sep and prefix in _BACKENDS:
            return _BACKENDS[prefix][0](method)
    known = available_solvers()
    prefixes = " or ".join(f"'{p}:<method>'" for p in _BACKENDS)
    raise ValueError(
        f"solver must be one of {', '.join(known)}"
        + (f" (any {prefixes})" if prefixes else "")
        + f"; got {name!r}"
    )


def register(spec: SolverSpec) -> None:
    """Add a solver to the registry (used by solver families in other modules)."""
    _REGISTRY[spec.name] = spec


def _options(spec: SolverSpec, given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise TypeError(
            f"solver {spec.name!r} does not take {', '.join(unknown)} (its options: {allowed})"
        )
    return given


__all__ += ["PFODE", "Outcome", "register", "register_backend"]

from . import exponential, multistep, reversible, stochastic  # noqa: E402,F401
