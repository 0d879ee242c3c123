"""The step interface every solver implements (diffrax's ``AbstractSolver.step``, in the
variables of the PF-ODE), its declared capabilities and its typed options.

A solver is an object with

- ``init(ode, x, sigma, options) -> State``: the state at the grid's first sigma
  (a multistep history starts empty; a reversible solver takes its companion here);
- ``step(ode, state, sigma_next, options, i, n) -> State``: one step from ``state.sigma``
  to ``sigma_next``, the ``i``-th of a grid of ``n`` steps; an adaptive solver instead
  offers ``attempt(ode, state, sigma_next, options) -> (State, ratio)`` with the
  per-sample error ratio of its embedded estimate;
- capabilities the driver (:mod:`pflow.solvers.driver`) and every plan over it read:
  ``order``, ``nfe_per_step``, ``adaptive``, ``stochastic``, ``reversible``,
  ``history``, ``last_steps``, ``directions``, ``per_sample``, ``differentiable``,
  and its ``options`` with types, ranges and defaults.

The driver owns everything else: the grid, the step into ``sigma = 0`` under
``last_step="euler"``, the NFE budget and partial results, the trajectory, the NaN watch,
batch chunks and rank shards. A step never sees any of those.

Sigmas reach a step as Python floats (the fast path), as float64 tensors of shape
``(batch,)`` (per-sample adaptive steps) or as 0-d float64 tensors that require grad (a
grid being fitted by backpropagation). The helpers here (:func:`scale`, :func:`lincomb`,
``exp``/``log``/``sqrt``/``expm1``) take any of the three, so one step serves them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .ode import PFODE, Evaluation

__all__ = [
    "Option",
    "Solver",
    "State",
    "Sigma",
    "lincomb",
    "scale",
    "exp",
    "log",
    "sqrt",
    "expm1",
]

Sigma = float | Tensor

# ---------------------------------------------------------------------------------- maths


def scale(sigma: Sigma) -> Sigma:
    """``C(sigma) = 1 / sqrt(1 + sigma^2) = sqrt(a)``: from ``xbar`` to the network's scale."""
    if isinstance(sigma, Tensor):
        return (1.0 + sigma * sigma).rsqrt()
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def exp(v: Sigma) -> Sigma:
    return torch.exp(v) if isinstance(v, Tensor) else math.exp(v)


def log(v: Sigma) -> Sigma:
    return torch.log(v) if isinstance(v, Tensor) else math.log(v)


def sqrt(v: Sigma) -> Sigma:
    return torch.sqrt(v) if isinstance(v, Tensor) else math.sqrt(v)


def expm1(v: Sigma) -> Sigma:
    return torch.expm1(v) if isinstance(v, Tensor) else math.expm1(v)


def as_float(sigma: Sigma) -> float:
    """A sigma as a Python float (detached from any graph)."""
    return float(sigma.detach()) if isinstance(sigma, Tensor) else float(sigma)


def is_zero(sigma: Sigma) -> bool:
    """``sigma == 0`` (the end of a sampling grid), for floats and tensors alike."""
    return as_float(sigma) == 0.0


def column(c: Tensor, like: Tensor) -> Tensor:
    """A float64 coefficient tensor as something that multiplies ``like``: a 0-d tensor in
    ``like``'s dtype, or one value per sample shaped ``(batch, 1, ..., 1)``."""
    c = c.to(like.device)
    if c.ndim == 1:
        c = c.reshape((-1,) + (1,) * (like.ndim - 1))
    return c.to(like.dtype)


def lincomb(terms: Sequence[tuple[Sigma, Tensor]]) -> Tensor:
    """``sum_j c_j * t_j``, a new tensor. Python-float coefficients (float64, the fast
    path) are applied with ``add_(t, alpha=c)`` and skipped when zero after the first;
    tensor coefficients (per-sample columns, or 0-d tensors in a graph) as columns in the
    state's dtype. The in-place adds are safe for autograd: no term's backward needs
    the running sum."""
    c0, t0 = terms[0]
    out = t0 * (column(c0, t0) if isinstance(c0, Tensor) else c0)
    for j in range(1, len(terms)):
        c, t = terms[j]
        if isinstance(c, Tensor):
            out.add_(t * column(c, t))
        elif c != 0.0:
            out.add_(t, alpha=c)
    return out


# -------------------------------------------------------------------------------- options

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """A typed solver option.

    Attributes:
        name: the keyword.
        kind: ``bool``, ``int``, ``float``, ``str`` (one of ``choices``) or ``object``
            (passed through: a generator, per-sample keys, a dict for a backend).
        default: the value when not given.
        doc: one line for listings and errors.
        choices: the allowed values of a ``str`` option.
        low, high: inclusive bounds of a number; ``low_open`` / ``high_open`` make them
            exclusive.
        allow_none: ``None`` is a valid value (e.g. ``first_step``: choose it).
        batch_dim: the value holds one entry per sample along this dimension (per-sample
            noise keys, a companion): batch chunks and rank shards slice it with the samples.
        expand: ``expand(value, batch)`` makes a batch-wide value per-sample before it is
            sliced (an int seed into one noise key per sample).
        check: for an ``object`` option, ``check(value)`` returns the value (converted if
            need be) or raises TypeError (wrong type) or ValueError (bad value): with a
            message, the error is that message after ``solver '<name>': <option>:``;
            without one, the option's usual "must be ..., got ..." error.
    """

    name: str
    kind: type
    default: Any
    doc: str = ""
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_none: bool = False
    batch_dim: int | None = None
    expand: Callable[[Any, int], Any] | None = None
    check: Callable[[Any], Any] | None = None

    def expected(self) -> str:
        """What this option accepts, in words: ``True or False``, ``> 0``, ``one of ...``."""
        if self.choices:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.kind is bool:
            return "True or False (true/false/1/0 in a label)"
        if self.kind in (int, float):
            what = "an integer" if self.kind is int else "a number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
            if self.low is not None:
                return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
            if self.high is not None:
                return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
            return what
        return self.doc or "a value"

    def describe(self) -> str:
        """``name: expected (default ...)`` for listings and errors."""
        return f"{self.name}: {self.expected()} (default {self.default!r})"

    def parse(self, value: Any, solver: str, text: bool = False) -> Any:
        """``value`` checked and converted to this option's type. ``text=True`` for the
        text of a label (``name[key=value]``), which is converted (``"false"``, ``"1e-3"``);
        a Python keyword must already have the type. A value of the wrong type is a
        TypeError, one out of range a ValueError; both name the solver, the option and
        what it accepts."""

        def bad(error: type[Exception] = ValueError, why: str = "") -> Exception:
            return error(
                f"solver {solver!r}: {self.name} must be {self.expected()}{why}, got {value!r}"
            )

        if value is None:
            if self.allow_none or self.default is None:
                return None
            raise bad(TypeError)
        if text and isinstance(value, str):
            return self._checked_object(self._from_text(value.strip(), bad), bad, solver)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad(TypeError)
            return value
        if self.kind is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(TypeError)
            return self._in_range(int(value), bad)
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(TypeError)
            if not math.isfinite(value):
                raise bad()
            return self._in_range(float(value), bad)
        if self.choices and value not in self.choices:
            raise bad()
        return self._checked_object(value, bad, solver)

    def _checked_object(self, value: Any, bad: Any, solver: str) -> Any:
        if self.check is None or self.kind is not object:
            return value
        try:
            return self.check(value)
        except (TypeError, ValueError) as exc:
            if not str(exc):
                raise bad(type(exc)) from None
            raise type(exc)(f"solver {solver!r}: {self.name}: {exc}") from None

    def _from_text(self, text: str, bad: Any) -> Any:
        if self.kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise bad()
        if self.kind in (int, float):
            try:
                number = float(text) if self.kind is float else int(text)
            except ValueError:
                raise bad() from None
            return self._checked(number, bad)
        if self.choices:
            if text not in self.choices:
                raise bad()
            return text
        try:  # a seed written in a label
            return int(text)
        except ValueError:
            raise bad(why=" (this option cannot be written in a label)") from None

    def _checked(self, number: float, bad: Any) -> Any:
        if not math.isfinite(number):
            raise bad()
        return self._in_range(number, bad)

    def _in_range(self, value: float, bad: Any) -> Any:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad()
        return value


# ---------------------------------------------------------------------------------- state


@dataclass(slots=True)
class State:
    """A solver's state at ``sigma``.

    Attributes:
        x: the ODE state in the network's scale (what the driver records and returns).
        sigma: where it is (a float, or a tensor of per-sample sigmas).
        ev: the evaluation a next step starts from, when already known (FSAL, or
            UniPC's evaluation at its predictor); the driver's Euler step into 0 uses it.
        history: a multistep method's memory, newest last (solver-defined entries).
        aux: anything else the solver carries between steps (a companion, a noise source).
    """

    x: Tensor
    sigma: Sigma
    ev: Evaluation | None = None
    history: tuple[Any, ...] = ()
    aux: Any = None


class StepInfo(NamedTuple):
    """Where a fixed-grid step sits: the ``i``-th of ``n``; ``final`` when it lands on the
    grid's end (no evaluation is worth making there)."""

    i: int
    n: int

    @property
    def final(self) -> bool:
        return self.i == self.n - 1


class Solver:
    """Base class of pflow's solvers: capabilities as class attributes (the driver and the
    plans read them; ``docs/internals.md`` has the table), one step as a method."""

    name: str = ""  # the name accepted by ``solver=``
    summary: str = ""  # one line for listings
    order: int = 1  # order of accuracy with the default options
    nfe_per_step: int = 1  # network evaluations per step once started (adaptive: per attempt)
    adaptive: bool = False  # has ``attempt`` and chooses its steps from rtol/atol
    stochastic: bool = False  # may draw noise (see ``draws_noise``)
    reversible: bool = False  # has an exact inverse step (a companion state, ``alf``)
    history: int = 0  # past evaluations a step uses (multistep methods)
    last_steps: tuple[str, ...] = ("euler",)  # also "solver" where it integrates into 0 itself
    last_step_note: str = ""  # why a last_step mode is missing (the error says it)
    directions: tuple[str, ...] = ("down", "up")  # sample/decode, encode
    starts_at_zero: bool = False  # may start at sigma = 0 (never evaluates there)
    per_sample: bool = False  # can step each sample at its own sigma
    differentiable: bool = False  # takes 0-d float64 sigma tensors that require grad
    ddim_options: dict[str, Any] | None = None  # options under which it is DDIM, if any
    options: tuple[Option, ...] = ()  # its typed options
    external: bool = False  # runs its own loop (another library): ``solve`` not ``step``

    def init(self, ode: PFODE, x: Tensor, sigma: Sigma, options: dict[str, Any]) -> State:
        """The state at the grid's first sigma."""
        return State(x, sigma)

    def step(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any], info: StepInfo
    ) -> State:
        """One step to ``sigma_next``."""
        if self.adaptive:
            return self.attempt(ode, state, sigma_next, options)[0]
        raise NotImplementedError(f"{type(self).__name__}.step")

    def attempt(
        self, ode: PFODE, state: State, sigma_next: Sigma, options: dict[str, Any]
    ) -> tuple[State, Tensor]:
        """One trial step of an adaptive solver and its per-sample error ratio (accept
        where ``<= 1``)."""
        raise NotImplementedError(f"{type(self).__name__} is not adaptive")

    def draws_noise(self, options: dict[str, Any]) -> bool:
        """Whether, with these options, the endpoint is random (not the ODE's)."""
        return self.stochastic

    def extras(self, state: State) -> dict[str, Any]:
        """What the result carries beyond ``x`` (e.g. ``companion``)."""
        return {}

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def __repr__(self) -> str:
        return f"<solver {self.name}: order {self.order}, {self.summary}>"


@dataclass
class Outcome:
    """What a solve hands back to the plan that asked for it."""

    x: Tensor
    sigmas: list[float]
    n_accepted: int
    n_rejected: int = 0
    trajectory: list[Tensor] | None = None
    finished: bool = True
    message: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
