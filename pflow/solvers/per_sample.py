"""Per-sample adaptive steps: ``rk45`` / ``bosh3`` with ``per_sample=True``.

The shared-step solver (:func:`~pflow.solvers.runge_kutta.solve_adaptive`) takes one step for
the whole batch, so every sample pays for the hardest one at every sigma. Here each sample
has its own sigma, step size, PI-controller memory and FSAL evaluation (Gotta Go Fast,
arXiv 2105.14080, steps each sample on its own for the same reason). The network is still
called once per stage on the whole batch of samples still running, with one sigma per
sample (``ode.eval(x_active, sigma)``, ``sigma`` a float64 tensor of shape ``(n_active,)``);
a step is accepted or rejected per sample; a sample that reaches the end of the grid drops
out of the batch and stops costing anything. Every sample steps exactly onto every grid
point (its step is clipped to the point), so the trajectory is recorded at the grid points.

A step is the same arithmetic as :func:`~pflow.solvers.runge_kutta.rk_step`, written around
the first stage's denoised estimate,

    x_i = C(sigma_i) * (x0_hat + (sigma + h a_i1) eps_1 + h sum_{j>1} a_ij eps_j),

with the coefficients now per-sample columns, computed in float64 and cast to the state's
dtype. The error ratio is pflow's per-sample RMS (:func:`~pflow.solvers.controller.error_ratio`)
and the PI controller is :class:`~pflow.solvers.controller.PIController`'s, vectorised over
samples. So each sample takes exactly the steps it would take alone in a batch of one (up to
the network's own batch-dependent round-off).

Cost: one NFE per batched call, as everywhere; a step costs ``stages - 1`` calls (FSAL) for
all running samples together, so the NFE is set by the sample that needs the most steps, and
the work per call shrinks as samples finish. ``n_accepted`` / ``n_rejected`` are totals over
samples; ``sigmas`` are the grid points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import MaxNFEExceeded
from .controller import PIController, error_ratio, rms_per_sample
from .ode import PFODE, Outcome
from .runge_kutta import solve_adaptive
from .tableau import ButcherTableau

__all__ = ["run_adaptive", "solve_per_sample"]

_F64 = torch.float64


def run_adaptive(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    tableau: ButcherTableau,
    per_sample: bool = False,
    **options: object,
) -> Outcome:
    """Runner of the adaptive pairs: one step for the batch, or one per sample."""
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be True or False, got {per_sample!r}")
    run = solve_per_sample if per_sample else solve_adaptive
    return run(ode, x, grid, tableau=tableau, **options)  # type: ignore[arg-type]


def _scale(sigma: Tensor) -> Tensor:
    """``C(sigma) = 1 / sqrt(1 + sigma^2)`` per sample (float64)."""
    return (1.0 + sigma * sigma).rsqrt()


class _Columns:
    """Float64 per-sample coefficients as ``(n, 1, ..., 1)`` columns in the state's dtype."""

    def __init__(self, like: Tensor) -> None:
        self.shape = (-1,) + (1,) * (like.ndim - 1)
        self.device, self.dtype = like.device, like.dtype

    def __call__(self, v: Tensor) -> Tensor:
        return v.to(self.device, _F64).reshape(self.shape).to(self.dtype)


def _step(
    ode: PFODE,
    tab: ButcherTableau,
    x: Tensor,
    x0: Tensor,
    eps: Tensor,
    sigma: Tensor,
    h: Tensor,
    sigma_next: Tensor,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """One step of ``tab`` for each sample from ``(x, sigma)`` by its own ``h``.

    ``x0``, ``eps``: the evaluation at ``(x, sigma)``. Returns ``(x_next, err, last)`` with
    ``last = (eps, x0_hat)`` of the evaluation at ``(x_next, sigma_next)`` for an FSAL pair.
    """
    col = _Columns(x)
    ks = [eps]
    x_next: Tensor | None = None
    last = None
    for i in range(1, tab.stages):
        s_i = sigma_next if tab.c[i] == 1.0 else sigma + tab.c[i] * h
        c_i = _scale(s_i)
        row = tab.a[i]
        x_i = x0 * col(c_i)
        x_i.add_(ks[0] * col(c_i * (sigma + h * row[0])))
        for j in range(1, i):
            if row[j] != 0.0:
                x_i.add_(ks[j] * col(c_i * h * row[j]))
        ev = ode.eval(x_i, s_i.to(x.device))
        ks.append(ev.eps)
        if tab.fsal and i == tab.stages - 1:
            x_next, last = x_i, (ev.eps, ev.x0)
    c_next = _scale(sigma_next)
    if x_next is None:
        x_next = x0 * col(c_next)
        x_next.add_(ks[0] * col(c_next * (sigma + h * tab.b[0])))
        for j in range(1, tab.stages):
            if tab.b[j] != 0.0:
                x_next.add_(ks[j] * col(c_next * h * tab.b[j]))
    err = torch.zeros_like(x)
    for k, e in zip(ks, tab.e):
        if e != 0.0:
            err.add_(k * col(c_next * h * e))
    return x_next, err, last


def _initial_steps(
    ode: PFODE,
    tab: ButcherTableau,
    x: Tensor,
    sigma: Tensor,
    eps: Tensor,
    direction: float,
    span: Tensor,
    rtol: float,
    atol: float,
) -> Tensor:
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4) for each sample, in
    the network's scale, as :func:`~pflow.solvers.runge_kutta._initial_step` computes it
    for a batch. One evaluation for all samples. Returns float64 on the host."""
    col = _Columns(x)
    sc = atol + rtol * x.abs()
    c0 = _scale(sigma)
    # d x / d sigma in the network's scale: -sigma / (1 + sigma^2) * x + C(sigma) * eps.
    f0 = x * col(-sigma * c0 * c0) + eps * col(c0)
    d0 = rms_per_sample(x / sc).cpu()
    d1 = rms_per_sample(f0 / sc).cpu()
    h0 = torch.where((d0 > 1e-5) & (d1 > 1e-5), 0.01 * d0 / d1, torch.full_like(d0, 1e-6))
    h0 = torch.minimum(h0, span)
    s1 = sigma + direction * h0
    c1 = _scale(s1)
    x1 = x + f0 * col(direction * h0)
    k1 = ode.eps(x1, s1.to(x.device))
    f1 = x1 * col(-s1 * c1 * c1) + k1 * col(c1)
    d2 = rms_per_sample((f1 - f0) / sc).cpu() / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax > 1e-15,
        (0.01 / dmax) ** (1.0 / (tab.order + 1)),
        torch.clamp(h0 * 1e-3, min=1e-6),
    )
    return torch.minimum(torch.minimum(100 * h0, h1), span)


def _pi_factor(c: PIController, ratio: Tensor, prev: Tensor, accepted: Tensor) -> Tensor:
    """:meth:`PIController.propose`'s factor, per sample."""
    assert c.beta1 is not None and c.beta2 is not None
    r = ratio.clamp(min=1e-10)
    grow = (c.safety * r ** (-c.beta1) * prev**c.beta2).clamp(c.factor_min, c.factor_max)
    shrink = (c.safety * r ** (-1.0 / c.order)).clamp(max=1.0).clamp(min=c.factor_min)
    factor = torch.where(accepted, grow, shrink)
    return torch.where(torch.isfinite(ratio), factor, torch.full_like(factor, c.factor_min))


def solve_per_sample(
    ode: PFODE,
    x: Tensor,
    grid: list[float],
    *,
    tableau: ButcherTableau,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    last_step: str = "euler",
    record: bool = False,
    partial: bool = False,
) -> Outcome:
    """Integrate each sample through every point of ``grid`` with its own steps.

    Same arguments and tolerances as :func:`~pflow.solvers.runge_kutta.solve_adaptive`.
    With ``partial=True`` and ``max_nfe`` exhausted, ``x`` holds each sample at the sigma it
    had reached (the message gives their range) and ``sigmas`` the grid points every sample
    had passed.
    """
    tab = tableau
    if not tab.adaptive:
        raise ValueError(f"per-sample steps need an embedded pair; {tab.name} has none")
    gains = PIController(order=1 + min(tab.order, tab.error_order or 1))
    n, dev = x.shape[0], x.device
    direction = 1.0 if grid[-1] > grid[0] else -1.0
    points = torch.tensor(grid, dtype=_F64)
    euler_end = last_step == "euler" and grid[-1] == 0.0
    end = len(grid)

    # Per-sample control state on the host (the accept/reject decision syncs once a step).
    sigma = torch.full((n,), grid[0], dtype=_F64)
    nxt = torch.ones(n, dtype=torch.long)  # index of each sample's next grid point
    h_abs = torch.zeros(n, dtype=_F64)
    prev_ratio = torch.ones(n, dtype=_F64)
    n_acc = torch.zeros(n, dtype=torch.long)
    n_rej = torch.zeros(n, dtype=torch.long)
    x = x.clone()
    traj = [x.clone()] + [torch.full_like(x, float("nan")) for _ in grid[1:]] if record else None
    finished, message = True, ""

    def land(ids: Tensor) -> None:
        """``ids`` have just reached ``grid[nxt]``: record them and aim at the next point."""
        if traj is not None:
            for j in nxt[ids].unique().tolist():
                at = ids[nxt[ids] == j].to(dev)
                traj[j].index_copy_(0, at, x[at])
        nxt[ids] += 1

    def euler_into_zero(ids: Tensor) -> None:
        """Those of ``ids`` whose next point is the final 0 take it as one Euler step: the
        cached (FSAL) evaluation's ``x0_hat``, no new NFE."""
        if not euler_end:
            return
        due = ids[nxt[ids] == end - 1]
        if due.numel():
            dd = due.to(dev)
            x.index_copy_(0, dd, x0_k[dd])
            sigma[due] = 0.0
            n_acc[due] += 1
            nxt[due] += 1
            if traj is not None:
                traj[-1].index_copy_(0, dd, x[dd])

    try:
        first = ode.eval(x, sigma.to(dev))
        eps_k, x0_k = first.eps.clone(), first.x0.clone()
        euler_into_zero(torch.arange(n))  # a grid that is one step into 0
        active = (nxt < end).nonzero().squeeze(1)
        if active.numel():
            span = (points[nxt[active]] - sigma[active]).abs()
            if first_step is not None:
                h_abs[active] = torch.minimum(torch.full_like(span, float(first_step)), span)
            else:
                ad = active.to(dev)
                h_abs[active] = _initial_steps(
                    ode, tab, x[ad], sigma[active], eps_k[ad], direction, span, rtol, atol
                )
        while active.numel():
            ad = active.to(dev)
            s = sigma[active]
            target = points[nxt[active]]
            remaining = (target - s).abs()
            ha = h_abs[active]
            clipped = ha >= remaining * (1 - 1e-12)
            h = torch.where(clipped, target - s, direction * ha)
            s_next = torch.where(clipped, target, s + h)
            xa = x[ad]
            x_next, err, last = _step(ode, tab, xa, x0_k[ad], eps_k[ad], s, h, s_next)
            ratio = error_ratio(err, xa, x_next, rtol, atol).cpu()
            if not bool(torch.isfinite(ratio).all()):
                ode.raise_if_nonfinite()
            ode.forget_finite()
            acc = ratio <= 1.0
            h_new = h.abs() * _pi_factor(gains, ratio, prev_ratio[active], acc)
            prev_ratio[active] = torch.where(acc, ratio.clamp(min=1e-4), prev_ratio[active])
            n_acc[active] += acc.long()
            n_rej[active] += (~acc).long()
            # A step cut short to land on a grid point says nothing about the step size the
            # error allows: keep the longer proposal.
            h_abs[active] = torch.where(acc & clipped, torch.maximum(h_new, ha), h_new)
            if bool(acc.any()):
                pos = acc.nonzero().squeeze(1)
                ids, posd = active[pos], pos.to(dev)
                idd = ids.to(dev)
                x.index_copy_(0, idd, x_next[posd])
                if last is not None:
                    eps_k.index_copy_(0, idd, last[0][posd])
                    x0_k.index_copy_(0, idd, last[1][posd])
                sigma[ids] = s_next[pos]
                landed = ids[clipped[pos]]
                if landed.numel():
                    land(landed)
                if last is None:  # not FSAL: evaluate where the samples still running are
                    going = ids[nxt[ids] < end]
                    if going.numel():
                        gd = going.to(dev)
                        ev = ode.eval(x[gd], sigma[going].to(dev))
                        eps_k.index_copy_(0, gd, ev.eps)
                        x0_k.index_copy_(0, gd, ev.x0)
                if landed.numel():
                    euler_into_zero(landed)
            active = (nxt < end).nonzero().squeeze(1)
            tiny = h_abs[active] < 1e-14 * sigma[active].abs().clamp(min=1.0)
            if bool(tiny.any()):
                i = int(active[tiny.nonzero()[0, 0]])
                raise FloatingPointError(
                    f"step size underflow for sample {i} at sigma={float(sigma[i]):.6g}: the "
                    f"error estimate does not fall as the step shrinks (rtol={rtol}, "
                    f"atol={atol} may be below the dtype's round-off)"
                )
    except MaxNFEExceeded as exc:
        if not partial:
            raise
        reached = sigma.tolist()
        finished = False
        message = (
            f"{exc} (per-sample steps: res.x holds each sample at the sigma it reached, "
            f"from {min(reached):.6g} to {max(reached):.6g})"
        )
    ode.raise_if_nonfinite()
    passed = end if finished else int(nxt.min())
    return Outcome(
        x,
        list(grid[:passed]),
        n_accepted=int(n_acc.sum()),
        n_rejected=int(n_rej.sum()),
        trajectory=traj[:passed] if traj is not None else None,
        finished=finished,
        message=message,
    )
