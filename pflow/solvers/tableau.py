"""Butcher tableaux: an explicit Runge–Kutta method is data (diffrax, torchdiffeq).

A tableau holds nodes ``c``, the strictly lower-triangular matrix ``a`` (row ``i`` has
``i`` entries), weights ``b`` and, for embedded pairs, the weights ``b_hat`` of the
lower-order solution used only to estimate the local error. It checks its own
consistency when built: every row of ``a`` sums to its node, ``b`` and ``b_hat`` sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["ButcherTableau", "EULER", "MIDPOINT", "HEUN", "RK4", "BOSH3", "DOPRI5"]

_TOL = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method.

    Attributes:
        name: short name.
        order: order of the propagated solution (``b``).
        c: nodes, ``c[0] == 0``.
        a: lower-triangular stage matrix, row ``i`` of length ``i``.
        b: weights of the solution.
        b_hat: weights of the embedded solution (adaptive pairs), or ``None``.
        error_order: order of the embedded solution.
        fsal: the last stage is evaluated at the step's result ("first same as last"),
            so the next step reuses it as its first stage.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_hat: tuple[float, ...] | None = None
    error_order: int | None = None
    fsal: bool = False
    e: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        if self.c[0] != 0:
            raise ValueError(f"{self.name}: c[0] must be 0 for an explicit method")
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular with {s} rows")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > _TOL:
                raise ValueError(f"{self.name}: row {i} of a sums to {sum(row)}, not c[{i}]")
        if len(self.b) != s or abs(sum(self.b) - 1) > _TOL:
            raise ValueError(f"{self.name}: b must have {s} entries summing to 1")
        if self.b_hat is not None:
            if len(self.b_hat) != s or abs(sum(self.b_hat) - 1) > _TOL:
                raise ValueError(f"{self.name}: b_hat must have {s} entries summing to 1")
            if self.error_order is None:
                raise ValueError(f"{self.name}: an embedded pair needs error_order")
        if self.fsal and (
            self.c[-1] != 1 or tuple(self.a[-1]) != tuple(self.b[:-1]) or self.b[-1] != 0
        ):
            raise ValueError(f"{self.name}: fsal needs c[-1] = 1, a[-1] = b[:-1], b[-1] = 0")
        e = tuple(bi - bh for bi, bh in zip(self.b, self.b_hat)) if self.b_hat else ()
        object.__setattr__(self, "e", e)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_hat is not None


def _f(*values: str | int) -> tuple[float, ...]:
    """Exact rationals written as strings, stored as floats."""
    return tuple(float(Fraction(v)) for v in values)


EULER = ButcherTableau("euler", 1, c=(0.0,), a=((),), b=(1.0,))

MIDPOINT = ButcherTableau("midpoint", 2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0))

# Heun's second-order method, EDM's Algorithm 1 (arXiv 2206.00364).
HEUN = ButcherTableau("heun", 2, c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5))

RK4 = ButcherTableau(
    "rk4",
    4,
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=_f("1/6", "1/3", "1/3", "1/6"),
)

# Bogacki & Shampine (1989): a 3(2) pair with FSAL.
BOSH3 = ButcherTableau(
    "bosh3",
    3,
    c=_f(0, "1/2", "3/4", 1),
    a=((), _f("1/2"), _f(0, "3/4"), _f("2/9", "1/3", "4/9")),
    b=_f("2/9", "1/3", "4/9", 0),
    b_hat=_f("7/24", "1/4", "1/3", "1/8"),
    error_order=2,
    fsal=True,
)

# Dormand & Prince (1980): the 5(4) pair behind ode45 / RK45 / dopri5, FSAL.
DOPRI5 = ButcherTableau(
    "dopri5",
    5,
    c=_f(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    a=(
        (),
        _f("1/5"),
        _f("3/40", "9/40"),
        _f("44/45", "-56/15", "32/9"),
        _f("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        _f("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"),
    ),
    b=_f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0),
    b_hat=_f("5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40"),
    error_order=4,
    fsal=True,
)
