"""Figures for the benchmark: error and quality against NFE, and sample grids.

Only the benchmark and the command line import this module (and so matplotlib).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["figure_vs_nfe", "plot_vs_nfe", "plot_samples"]


def _series(rows: Sequence[Any]) -> dict[tuple[str, str, bool], list[Any]]:
    lines: dict[tuple[str, str, bool], list[Any]] = defaultdict(list)
    for r in rows:
        lines[(r.solver, r.spacing, r.peer)].append(r)
    return lines


def _best_grid_per_solver(
    lines: dict[tuple[str, str, bool], list[Any]], field: str
) -> dict[tuple[str, str, bool], list[Any]]:
    """Keep, for each solver, the grid with the lowest geometric-mean ``field``."""
    best: dict[tuple[str, bool], tuple[float, tuple[str, str, bool]]] = {}
    for key, rs in lines.items():
        vals = [getattr(r, field) for r in rs]
        vals = [v for v in vals if v is not None and v > 0 and math.isfinite(v)]
        if not vals:
            continue
        score = sum(math.log(v) for v in vals) / len(vals)
        solver_key = (key[0], key[2])
        if solver_key not in best or score < best[solver_key][0]:
            best[solver_key] = (score, key)
    return {key: lines[key] for _, key in best.values()}


_LINE_STYLES = "solid: pflow, dashed: diffusers peer"


def _points(rs: Sequence[Any], field: str) -> list[tuple[int, float]]:
    return sorted(
        (r.nfe, getattr(r, field))
        for r in rs
        if getattr(r, field) is not None and getattr(r, field) > 0
    )


def _label(solver: str, spacing: str, peer: bool) -> str:
    return f"{solver} (diffusers)" if peer else f"{solver} [{spacing}]"


def _draw(ax: Any, lines: Mapping[tuple[str, str, bool], list[Any]], field: str, colours: Any):
    for key, rs in sorted(lines.items()):
        pts = _points(rs, field)
        if not pts:
            continue
        solver, spacing, peer = key
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            ("--" if peer else "-") + "o",
            ms=3.5,
            lw=1.4,
            label=_label(solver, spacing, peer),
            alpha=0.9 if not peer else 0.7,
            color=colours[key],
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.25)


def figure_vs_nfe(
    rows: Sequence[Any],
    *,
    field: str = "rmse",
    ylabel: str = "endpoint RMSE vs reference",
    title: str = "",
    max_lines: int = 14,
) -> Any:
    """The figure of :func:`plot_vs_nfe` (a matplotlib ``Figure``; the caller closes it).

    Rows without guidance: one panel. Rows with a ``guidance`` scale: one panel per scale,
    in increasing order, sharing both axes, each solver and grid in the same colour in
    every panel, and one legend for the figure."""
    lines_all = _series(rows)
    if len(lines_all) > max_lines:
        lines_all = _best_grid_per_solver(lines_all, field)
        title = (title + "; " if title else "") + "best grid per solver"
    keep = set(lines_all)
    drawn = [k for k in sorted(keep) if _points(lines_all[k], field)]
    colours = {k: f"C{i % 10}" for i, k in enumerate(drawn)}
    scales = sorted({r.guidance for r in rows if getattr(r, "guidance", None) is not None})
    if not scales:
        fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
        _draw(ax, lines_all, field, colours)
        ax.set_xlabel("NFE (network evaluations, counted)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2, loc="best")
        fig.tight_layout()
        return fig
    cols = min(4, len(scales))
    n_rows = (len(scales) + cols - 1) // cols
    fig, axes = plt.subplots(
        n_rows,
        cols,
        figsize=(3.8 * cols + 0.6, 3.4 * n_rows + 1.2),
        dpi=120,
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax in list(axes.flat)[len(scales) :]:
        fig.delaxes(ax)
    handles: dict[str, Any] = {}
    for ax, w in zip(axes.flat, scales):
        panel = _series([r for r in rows if getattr(r, "guidance", None) == w])
        _draw(ax, {k: v for k, v in panel.items() if k in keep}, field, colours)
        ax.set_title(f"guidance w = {w:g}", fontsize=9)
        ax.set_xlabel("NFE (counted)", fontsize=8)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncol=min(4, max(1, len(handles))),
        fontsize=7,
        title=_LINE_STYLES,
        title_fontsize=7,
    )
    return fig


def plot_vs_nfe(
    rows: Sequence[Any],
    path: Path,
    *,
    field: str = "rmse",
    ylabel: str = "endpoint RMSE vs reference",
    title: str = "",
    max_lines: int = 14,
) -> int:
    """Log-log ``field`` against NFE, one line per solver and grid; peers dashed. With more
    than ``max_lines`` lines, each solver keeps only its best grid. Rows with a guidance
    scale get one panel per scale (:func:`figure_vs_nfe`). Returns the number of panels."""
    fig = figure_vs_nfe(rows, field=field, ylabel=ylabel, title=title, max_lines=max_lines)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return len(fig.axes)
    finally:
        plt.close(fig)


def plot_samples(
    samples: Mapping[str, torch.Tensor],
    path: Path,
    *,
    title: str = "",
    per_row: int = 8,
    max_images: int = 32,
) -> None:
    """One panel per solver: an image grid for ``(n, 1, H, W)`` samples, a scatter for 2-D."""
    names = list(samples)
    if not names:
        return
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        x = samples[name].detach().float().cpu()
        if x.ndim == 4:
            imgs = x[:max_images].clamp(-1, 1)
            n, _, h, w = imgs.shape
            n_rows = (n + per_row - 1) // per_row
            canvas = torch.ones(n_rows * (h + 1) + 1, per_row * (w + 1) + 1)
            for i in range(n):
                r, c = divmod(i, per_row)
                canvas[
                    1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w
                ] = imgs[i, 0]
            ax.imshow(canvas.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        else:
            pts = x.reshape(len(x), -1)[:, :2]
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6)
            ax.set_aspect("equal")
            ax.axis("on")
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
