"""Other libraries' integrators on pflow's ODE: ``solver="torchdiffeq:<method>"`` runs any
``torchdiffeq.odeint`` method, ``solver="scipy:<method>"`` any ``scipy.integrate`` solver
(RK23, RK45, DOP853, Radau, BDF, LSODA).

**The variable they integrate** is ``xbar`` itself, in float64, with the PF-ODE exactly as
written in the paper, ``d xbar / d sigma = eps(xbar / sqrt(1 + sigma^2), sigma)``:

- The ODE is the one pflow's own solvers discretise, so a fixed-step method walks the same
  steps: ``torchdiffeq:euler`` on a DDIM grid is DDIM, ``torchdiffeq:midpoint`` is pflow's
  ``midpoint`` (``tests/test_backends.py`` checks both to round-off).
- float64 removes the float32 conditioning problem of ``xbar`` (up to ~2e4 on the cosine
  schedule): its 16 digits keep ``xbar + h * eps`` within ~1e-12 relative. Rewriting the
  ODE for the network-scale state instead would change the discretisation (Euler would no
  longer be DDIM) for no gain once the state is float64.
- It is also the time precision: torchdiffeq casts ``t`` to the state's dtype before each
  evaluation, so a float32 state would round ``sigma`` to 7 digits.
- Tolerances mean what pflow's mean: ``rtol`` is scale-free, so relative error in ``xbar``
  is relative error in the network-scale state; ``atol`` is in ``xbar``'s units, which
  equal the state's below ``sigma ~ 1`` where absolute error matters, and above it the
  relative term dominates. torchdiffeq's error norm is set (overridable with
  ``options={"norm": ...}``) to pflow's: the largest per-sample RMS, so that accuracy does
  not depend on the batch size; scipy uses its own RMS over the flattened batch.

The network is still called in the input's dtype (``x = xbar / sqrt(1 + sigma^2)`` is cast
to it before each evaluation, ``eps`` cast back), and the result is cast back to it.

**Grid points.** The integration passes through every point of ``grid``: torchdiffeq's
adaptive methods are told to step onto them (``step_t``; they would otherwise step past the
last point and interpolate back, evaluating the network beyond the grid), its fixed-grid
methods take one step per interval unless given ``step_size`` (then steps of that size from
``grid[0]``, as torchdiffeq makes them, and the inner grid points are not stepped onto), and
scipy's solvers run interval by interval (each interval a fresh solver, costing one
evaluation at its start and one for scipy's initial-step probe).

**Visited sigmas.** As for pflow's own solvers, ``sigmas`` are every point the state visited:
the end of every accepted step, the grid points among them, recorded as the library goes
(scipy: after each ``solver.step()``; torchdiffeq: through its step callbacks, where an
accepted step ends where the next attempt starts, and the last at the end of the grid), so
that ``n_accepted == len(sigmas) - 1``: each is visited on the driver's
:class:`~pflow.solvers.driver.Walk`, which keeps the trajectory when asked for and, when
``max_nfe`` runs out inside the library, makes the result the last visited point.

**The step into sigma = 0** is the driver's, as for every pflow solver: one Euler step by
default (``last_step="euler"``), ``x0_hat`` of one evaluation at the last positive sigma
(one NFE; neither library hands back its last derivative).

**Cost** is counted by :class:`~pflow.solvers.PFODE` on every evaluation, never taken from
the library. Accepted/rejected steps come from torchdiffeq's step callbacks; scipy does not
report rejections, so for its explicit Runge-Kutta methods they are inferred from its own
evaluation count (``n_stages`` per attempt) and reported as 0 for the implicit ones.
``nfe_per_step`` (evaluations per step, per attempt for the adaptive ones) is the library's
own number where it has one: the stages a torchdiffeq tableau evaluates per attempt
(``len(tableau.alpha)``; its first stage is the previous step's last, at that step's end),
scipy's ``n_stages``; else a documented table (:data:`_TORCHDIFFEQ_FIXED_NFE`,
:data:`_SCIPY_IMPLICIT_NFE`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from functools import cache, partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import MaxNFEExceeded
from . import register_backend
from .base import Option, Solver, State
from .driver import Walk
from .ode import PFODE, scale

__all__ = [
    "Backend",
    "SCIPY_METHODS",
    "scipy_methods",
    "scipy_solver",
    "torchdiffeq_methods",
    "torchdiffeq_solver",
]

# solve_ivp's documented methods. Orders: LSODA switches between Adams (up to 12) and BDF
# (up to 5); BDF's order varies up to 5.
SCIPY_METHODS: dict[str, int] = {
    "RK23": 3,
    "RK45": 5,
    "DOP853": 8,
    "Radau": 5,
    "BDF": 5,
    "LSODA": 12,
}
# Left out of the torchdiffeq listing: an alias (fixed_adams = implicit_adams) and its
# wrapper around scipy (use the scipy backend instead).
_TORCHDIFFEQ_SKIP = ("fixed_adams", "scipy_solver")
_TORCHDIFFEQ_DEFAULT_TOL = (1e-7, 1e-9)  # odeint's own defaults, for fixed-grid methods
# Evaluations per step of torchdiffeq's fixed-grid methods, whose stages are written out in
# their step functions (torchdiffeq/_impl/fixed_grid.py, fixed_adams.py) rather than kept
# in a tableau. The Adams methods once started (their first steps are RK4's): the
# explicit one evaluates at the step's start only; the implicit one adds one corrector
# evaluation per iteration, 1 to ``max_iters`` (4) of them, so 2 is its least.
_TORCHDIFFEQ_FIXED_NFE: dict[str, int] = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "explicit_adams": 1,
    "implicit_adams": 2,
}
# scipy's implicit methods evaluate per Newton iteration (a step takes one or more): Radau
# at its 3 collocation points, BDF at the new point; LSODA (Adams or BDF, chosen by
# ODEPACK) once per corrector iteration.
_SCIPY_IMPLICIT_NFE: dict[str, int] = {"Radau": 3, "BDF": 1, "LSODA": 1}


# ----------------------------------------------------------------------------- shared
def _to_xbar(x: Tensor, sigma: float) -> Tensor:
    return x.to(torch.float64) * math.sqrt(1.0 + sigma * sigma)


def _to_x(xbar: Tensor, sigma: float, dtype: torch.dtype) -> Tensor:
    return (xbar * scale(sigma)).to(dtype)


def _allowed(cls: type, exclude: set[str]) -> list[str]:
    """Keyword arguments of ``cls.__init__`` along its MRO, less ``exclude``."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in exclude:
                continue
            if p.name not in names:
                names.append(p.name)
    return names


def _check_options(backend: str, method: str, given: Any, allowed: list[str]) -> dict[str, Any]:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise TypeError(f"options must be a dict of {backend} options, got {type(given).__name__}")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(
            f"{backend} method {method!r} does not take option(s) {', '.join(unknown)} "
            f"(its options: {', '.join(allowed) or 'none'})"
        )
    _check_first_step(given)
    return dict(given)


def _check_first_step(options: Any) -> Any:
    """``options["first_step"]``, when given, is a finite number > 0 (the libraries would
    reject 0 as an underflow of the step size, or not at all)."""
    if not isinstance(options, dict):
        raise TypeError()  # the option's own message: "options must be a dict ..., got ..."
    step = options.get("first_step")
    if step is None:
        return options
    if isinstance(step, bool) or not isinstance(step, (int, float, np.integer, np.floating)):
        raise TypeError(f"first_step must be a number > 0, got {step!r}")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"first_step must be a finite number > 0, got {step!r}")
    return options


def _unknown_method(backend: str, method: str, known: list[str]) -> ValueError:
    return ValueError(f"{backend} has no method {method!r}; its methods: {', '.join(known)}")


def _per_sample_rms_max(ratio: Tensor) -> Tensor:
    """pflow's error norm: the largest per-sample RMS (batch first)."""
    return ratio.reshape(ratio.shape[0], -1).pow(2).mean(dim=1).sqrt().max()


class Backend(Solver):
    """Another library's integrator on pflow's ODE: it runs its own loop (``external``),
    so the driver hands it the whole grid; validation, chunks, the NaN watch's final
    check and the result are still the driver's and the plan's."""

    external = True
    last_steps = ("euler", "solver")

    def __init__(
        self, name: str, adaptive: bool, order: int, nfe_per_step: int, run: Any, summary: str
    ) -> None:
        self.name, self.adaptive, self.order, self.summary = name, adaptive, order, summary
        self.nfe_per_step = nfe_per_step
        self._run = run
        opts = [
            Option(
                "options",
                object,
                None,
                "a dict of the library's own options",
                allow_none=True,
                check=_check_first_step,
            )
        ]
        if adaptive:
            tol = dict(kind=float, default=1e-5, low=0.0, low_open=True)
            opts = [Option("rtol", **tol), Option("atol", **tol), *opts]  # type: ignore[arg-type]
        self.options = tuple(opts)

    def solve(
        self, ode: PFODE, x: Tensor, grid: list[float], options: dict[str, Any], walk: Walk
    ) -> None:
        """Integrate from ``x`` at ``grid[0]`` through ``grid`` (which the driver has cut
        before a final Euler step into 0), visiting every accepted step's end on ``walk``."""
        self._run(ode, x, grid, walk, **options)


# ----------------------------------------------------------------------------- torchdiffeq
def _torchdiffeq_classes() -> dict[str, Any]:
    from torchdiffeq._impl.odeint import SOLVERS  # the table odeint dispatches on

    return {k: v for k, v in SOLVERS.items() if k not in _TORCHDIFFEQ_SKIP}


def torchdiffeq_methods() -> list[str]:
    """torchdiffeq's method names (empty when torchdiffeq is not installed)."""
    try:
        return list(_torchdiffeq_classes())
    except ImportError:
        return []


def _is_fixed_grid(cls: type) -> bool:
    from torchdiffeq._impl.solvers import FixedGridODESolver

    return issubclass(cls, FixedGridODESolver)


class _XbarRHS:
    """``d xbar / d sigma`` for torchdiffeq: float64 ``xbar`` in, float64 ``eps`` out, one
    counted network evaluation in the input's dtype. Records the visited points through
    torchdiffeq's step callbacks (only those the method supports are defined, so odeint
    does not warn): ``callback_step(t0, y0, dt)`` opens every attempt, at the state it
    starts from; an adaptive method then calls ``callback_accept_step`` or
    ``callback_reject_step`` for it, a fixed-grid method takes every step. An accepted step
    thus ends where the next attempt starts (recorded there); the last one ends at the end
    of the grid (recorded by the caller, from odeint's result)."""

    def __init__(self, ode: PFODE, dtype: torch.dtype, callbacks: set[str], walk: Walk) -> None:
        self.ode, self.dtype, self.walk = ode, dtype, walk
        self.every_step_taken = "callback_accept_step" not in callbacks
        self.pending = False  # the current attempt was accepted: its end is not recorded yet
        self.n_rejected = 0
        if "callback_step" in callbacks:
            self.callback_step = self._on_step
        if "callback_accept_step" in callbacks:
            self.callback_accept_step = self._on_accept
        if "callback_reject_step" in callbacks:
            self.callback_reject_step = self._on_reject

    def __call__(self, t: Tensor, xbar: Tensor) -> Tensor:
        sigma = float(t)
        return self.ode.eval(_to_x(xbar, sigma, self.dtype), sigma).eps.to(torch.float64)

    def _on_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.ode.raise_if_nonfinite()  # names the sigma of a NaN early; keeps the record short
        if self.pending:  # t0 (the real sigma: odeint un-negates a decreasing grid's)
            self.walk.visit(State(_to_x(y0, float(t0), self.dtype), float(t0)))
        self.pending = self.every_step_taken

    def _on_accept(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.pending = True

    def _on_reject(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.n_rejected += 1


def _run_torchdiffeq(
    ode: PFODE,
    x: Tensor,
    points: list[float],
    walk: Walk,
    *,
    method: str,
    rtol: float | None = None,
    atol: float | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Integrate ``xbar`` in float64 with ``torchdiffeq.odeint(method=method)`` through
    ``grid`` (see the module docstring). odeint is asked for the end point only (its
    solution holds a state per requested time): the steps land on the grid points through
    ``step_t`` (adaptive) or the time grid (fixed-grid), and the callbacks record them."""
    from torchdiffeq import odeint

    cls = _torchdiffeq_classes()[method]
    fixed = _is_fixed_grid(cls)
    opts = _check_options("torchdiffeq", method, options, _torchdiffeq_options(method))
    if fixed:  # implicit_adams takes rtol/atol (as options); the others ignore them
        rtol = opts.pop("rtol", _TORCHDIFFEQ_DEFAULT_TOL[0])
        atol = opts.pop("atol", _TORCHDIFFEQ_DEFAULT_TOL[1])
    dev, dtype = x.device, x.dtype
    rhs = _XbarRHS(ode, dtype, cls.valid_callbacks(), walk)  # type: ignore[attr-defined]
    try:
        every = torch.tensor(points, dtype=torch.float64, device=dev)
        t = every[[0, -1]]
        if fixed and opts.get("grid_constructor") is not None:
            t = every  # the user's constructor sees the whole grid, as in odeint
        elif fixed and opts.get("step_size") is None:  # one step per interval
            opts["grid_constructor"] = lambda func, y0, t: every
        if not fixed:
            opts.setdefault("norm", _per_sample_rms_max)
            # Step onto every grid point, the end included: without it the solver steps past
            # the end and interpolates back. Points also in jump_t must not repeat there.
            if "jump_t" in opts:  # odeint flips only tensors for a decreasing grid
                opts["jump_t"] = torch.as_tensor(opts["jump_t"], dtype=torch.float64, device=dev)
            jumps = set(torch.as_tensor(opts.get("jump_t", [])).reshape(-1).tolist())
            extra = torch.as_tensor(opts.get("step_t", []), dtype=torch.float64).reshape(-1)
            step_t = sorted({*points[1:], *extra.tolist()} - jumps)
            opts["step_t"] = torch.tensor(step_t, dtype=torch.float64, device=dev)
        xbars = odeint(
            rhs, _to_xbar(x, points[0]), t, rtol=rtol, atol=atol, method=method, options=opts
        )
        if rhs.pending or walk.sigmas[-1] != points[-1]:  # the last step's end
            walk.visit(State(_to_x(xbars[-1], points[-1], dtype), points[-1]))
    except AssertionError:
        ode.raise_if_nonfinite()  # NaN from the model shows up as a step-size assertion
        raise
    finally:
        walk.n_rejected += rhs.n_rejected


def _torchdiffeq_options(method: str) -> list[str]:
    cls = _torchdiffeq_classes()[method]
    exclude = {"self", "func", "y0", "dtype", "implicit"}  # the method decides these
    if not _is_fixed_grid(cls):
        exclude |= {"rtol", "atol"}  # given as solve arguments
    return _allowed(cls, exclude)


@cache
def torchdiffeq_solver(method: str) -> Backend:
    """The solver ``"torchdiffeq:<method>"``."""
    try:
        classes = _torchdiffeq_classes()
    except ImportError as exc:
        raise ValueError(f"solver 'torchdiffeq:{method}' needs torchdiffeq ({exc})") from None
    if method not in classes:
        raise _unknown_method("torchdiffeq", method, list(classes))
    cls = classes[method]
    adaptive = not _is_fixed_grid(cls)
    kind = "adaptive" if adaptive else "fixed-grid"
    tableau = getattr(cls, "tableau", None)  # its first stage is the previous step's last
    nfe = len(tableau.alpha) if tableau is not None else _TORCHDIFFEQ_FIXED_NFE.get(method, 1)
    return Backend(
        f"torchdiffeq:{method}",
        adaptive,
        int(getattr(cls, "order", 0)),
        nfe,
        partial(_run_torchdiffeq, method=method),
        summary=f"torchdiffeq.odeint method={method!r} ({kind}) on xbar in float64",
    )


# ----------------------------------------------------------------------------- scipy
def scipy_methods() -> list[str]:
    """scipy.integrate.solve_ivp's methods."""
    return list(SCIPY_METHODS)


def _scipy_class(method: str) -> type:
    import scipy.integrate

    return getattr(scipy.integrate, method)


def _scipy_options(method: str) -> list[str]:
    exclude = {"self", "fun", "t0", "y0", "t_bound", "rtol", "atol", "vectorized"}
    return _allowed(_scipy_class(method), exclude)


def _block_diagonal(batch: int, dim: int) -> Any:
    """Samples do not interact: the Jacobian is block diagonal, so a finite-difference
    Jacobian needs ``dim`` evaluations instead of ``batch * dim``."""
    from scipy.sparse import block_diag

    return block_diag([np.ones((dim, dim))] * batch, format="csc")


def _run_scipy(
    ode: PFODE,
    x: Tensor,
    points: list[float],
    walk: Walk,
    *,
    method: str,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    options: dict[str, Any] | None = None,
) -> None:
    """Integrate the flattened batch's ``xbar`` in float64 with ``scipy.integrate.<method>``,
    one grid interval at a time (see the module docstring)."""
    cls = _scipy_class(method)
    opts = _check_options("scipy", method, options, _scipy_options(method))
    batch, dim = x.shape[0], x[0].numel()
    if (
        method in ("Radau", "BDF")
        and batch > 1
        and not {"jac", "jac_sparsity"} & set(opts)
        and batch * dim * dim <= 2**24
    ):
        opts["jac_sparsity"] = _block_diagonal(batch, dim)
    first_step = opts.pop("first_step", None)
    shape, dev, dtype = x.shape, x.device, x.dtype

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        sigma = float(t)
        xbar = torch.from_numpy(y).reshape(shape).to(dev)
        eps = ode.eval(_to_x(xbar, sigma, dtype), sigma).eps
        return eps.to(torch.float64).reshape(-1).cpu().numpy()

    y = _to_xbar(x, points[0]).reshape(-1).cpu().numpy()
    implicit = method in _SCIPY_IMPLICIT_NFE
    for s0, s1 in zip(points[:-1], points[1:]):
        step0 = None if first_step is None else min(float(first_step), abs(s1 - s0))
        steps = 0
        solver = cls(fun, s0, y, s1, rtol=rtol, atol=atol, first_step=step0, **opts)
        while solver.status == "running":
            sigma_at = float(solver.t)
            try:
                with _singular_as_error() if implicit else contextlib.nullcontext():
                    message = solver.step()
            except (RuntimeError, RuntimeWarning, np.linalg.LinAlgError) as exc:
                if isinstance(exc, MaxNFEExceeded) or not _is_singular(exc):
                    raise
                ode.raise_if_nonfinite()
                raise RuntimeError(
                    f"scipy {method}: the implicit solver's Newton matrix (I - h*gamma*J, "
                    f"J the Jacobian of eps in xbar) was singular at sigma={sigma_at:.6g} "
                    f"({type(exc).__name__}: {exc}); the model's Jacobian is degenerate or "
                    "very large there. Tighten rtol/atol (smaller steps keep the matrix "
                    "near I) or use an explicit method (rk45, scipy:RK45, scipy:DOP853)"
                ) from exc
            if solver.status == "failed":
                ode.raise_if_nonfinite()
                raise RuntimeError(f"scipy {method} failed at sigma={solver.t:.6g}: {message}")
            ode.raise_if_nonfinite()
            steps += 1
            y = np.array(solver.y)  # a copy no later step changes (LSODA reuses one)
            sigma = s1 if solver.status == "finished" else float(solver.t)
            xbar = torch.from_numpy(y).reshape(shape).to(dev)
            walk.visit(State(_to_x(xbar, sigma, dtype), sigma))
        n_stages = getattr(solver, "n_stages", None)
        if n_stages is not None:  # explicit RK: n_stages evaluations per attempt
            start = 1 + (step0 is None)  # f at the start, and the initial-step probe
            walk.n_rejected += max(0, (solver.nfev - start) // n_stages - steps)


@contextlib.contextmanager
def _singular_as_error() -> Any:
    """scipy's dense LU only warns on a singular matrix (then solves with inf/NaN); make
    that warning an exception so the step stops where the matrix was singular."""
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", LinAlgWarning)
        yield


def _is_singular(exc: BaseException) -> bool:
    """Whether a step failed on a singular Newton matrix: the sparse LU's RuntimeError
    ("Factor is exactly singular"), the dense LU's LinAlgWarning ("... Singular matrix.")
    or numpy's LinAlgError."""
    return "singular" in str(exc).lower() or isinstance(exc, np.linalg.LinAlgError)


@cache
def scipy_solver(method: str) -> Backend:
    """The solver ``"scipy:<method>"``."""
    if method not in SCIPY_METHODS:
        raise _unknown_method("scipy", method, scipy_methods())
    n_stages = getattr(_scipy_class(method), "n_stages", None)  # explicit Runge-Kutta
    return Backend(
        f"scipy:{method}",
        True,
        SCIPY_METHODS[method],
        int(n_stages) if n_stages is not None else _SCIPY_IMPLICIT_NFE[method],
        partial(_run_scipy, method=method),
        summary=f"scipy.integrate.{method} on the flattened batch's xbar in float64",
    )


register_backend("torchdiffeq", torchdiffeq_solver, torchdiffeq_methods)
register_backend("scipy", scipy_solver, scipy_methods)
