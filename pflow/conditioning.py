"""Conditioning that travels with its samples.

A conditional network takes extra inputs, ``net(x_t, t, **cond)``: class labels,
``encoder_hidden_states``, or nested dicts such as SDXL's ``added_cond_kwargs``. pflow
keeps them as a mapping ``cond`` whose tensor leaves hold one row per sample along
dimension 0, so that everything that splits a batch (``batch_size`` chunks, torchrun
shards, the per-sample adaptive driver, which evaluates only the samples still running)
splits the conditioning the same way and a sample gets the same answer whatever the split.

The rules, checked by :func:`cond_rows` before any network call:

- a tensor leaf with at least one dimension holds either one row per sample or exactly
  one row, which every sample shares (one prompt for the whole batch);
- 0-d tensors and plain values (``True``, ``None``, strings, numbers) are passed as they
  are, to every call;
- mappings nest (``{"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Cond",
    "cond_rows",
    "check_keywords",
    "take_cond",
    "expand_cond",
    "concat_cond",
    "cast_cond",
]

Cond = Mapping[str, Any]


def _leaves(cond: Cond, prefix: str = "") -> list[tuple[str, Tensor]]:
    out: list[tuple[str, Tensor]] = []
    for key, value in cond.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_leaves(value, name + "."))
        elif isinstance(value, Tensor) and value.ndim > 0:
            out.append((name, value))
    return out


def cond_rows(cond: Cond | None, name: str = "cond") -> int | None:
    """The number of samples ``cond`` is for: the common leading size of its per-sample
    tensor leaves, or ``None`` when every leaf is shared (one row, 0-d, or not a tensor).

    Raises:
        TypeError: ``cond`` is not a mapping with string keys.
        ValueError: two tensor leaves disagree on the number of rows (naming both).
    """
    if cond is None:
        return None
    if not isinstance(cond, Mapping):
        raise TypeError(
            f"{name} must be a mapping of keyword arguments for the network "
            f"(e.g. {{'class_labels': labels}}), got {type(cond).__name__}"
        )
    _check_keys(cond, name)
    rows: int | None = None
    first = ""
    for leaf, value in _leaves(cond):
        n = int(value.shape[0])
        if n == 1:
            continue
        if rows is None:
            rows, first = n, leaf
        elif n != rows:
            raise ValueError(
                f"{name}: {first!r} has {rows} rows but {leaf!r} has {n}; every per-sample "
                "tensor needs one row per sample (or exactly one row, shared by all)"
            )
    return rows


def check_keywords(net: Any, cond: Cond | None, name: str = "cond") -> None:
    """A ``TypeError`` now, before any network call, when ``net``'s signature shows that
    it cannot take one of ``cond``'s keywords (``net(x_t, t, **cond)`` would fail at the
    first call). A network whose signature cannot be read, or that takes ``**kwargs``,
    passes: what it does with a keyword is its own business."""
    if not cond:
        return
    fn = net.forward if isinstance(net, torch.nn.Module) else net
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {p.name for p in params if p.kind in named}
    for key in cond:
        if key not in accepted:
            what = getattr(fn, "__qualname__", None) or type(net).__name__
            raise TypeError(
                f"{name}: the network does not accept the keyword {key!r} ({what}{signature} "
                "is called as net(x_t, t, **cond)); is it a conditional network, and is "
                f"{key!r} the name its forward gives that input?"
            )


def _check_keys(cond: Mapping[Any, Any], name: str) -> None:
    for key, value in cond.items():
        if not isinstance(key, str):
            raise TypeError(f"{name}: keys must be strings (keyword names), got {key!r}")
        if isinstance(value, Mapping):
            _check_keys(value, f"{name}.{key}")


def _map(cond: Cond, fn: Any, scalars: bool = False) -> dict[str, Any]:
    """``cond`` with ``fn`` applied to its tensor leaves (with ``scalars``, 0-d ones too)."""
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, Mapping):
            out[key] = _map(value, fn, scalars)
        elif isinstance(value, Tensor) and (scalars or value.ndim > 0):
            out[key] = fn(value)
        else:
            out[key] = value
    return out


def take_cond(cond: Cond, index: slice | Tensor, rows: int) -> dict[str, Any]:
    """The rows ``index`` (a slice or an index tensor) of every per-sample leaf of
    ``cond`` (those with ``rows`` rows); shared leaves are kept whole."""

    def take(value: Tensor) -> Tensor:
        if value.shape[0] != rows:
            return value
        if isinstance(index, slice):
            return value[index]
        return value.index_select(0, index.to(value.device))

    return _map(cond, take)


def expand_cond(cond: Cond, n: int) -> dict[str, Any]:
    """``cond`` with every shared (one-row) tensor leaf expanded to ``n`` rows."""
    return _map(cond, lambda v: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v)


def concat_cond(first: Cond, second: Cond, n_first: int, n_second: int) -> dict[str, Any]:
    """The two conditionings stacked along the batch, for one network call on
    ``cat([x_first, x_second])``: the same keys are required, tensor leaves are expanded to
    ``n_first`` and ``n_second`` rows and concatenated, plain values must be equal."""
    if set(first) != set(second):
        raise ValueError(
            "batched guidance needs the same keywords for the conditional and the "
            f"unconditional call, got {sorted(first)} and {sorted(second)}; give the "
            "unconditional input explicitly (e.g. the null label) or use batched=False"
        )
    out: dict[str, Any] = {}
    for key in first:
        a, b = first[key], second[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out[key] = concat_cond(a, b, n_first, n_second)
        elif isinstance(a, Tensor) and isinstance(b, Tensor) and a.ndim > 0 and b.ndim > 0:
            ea = a.expand(n_first, *a.shape[1:]) if a.shape[0] == 1 else a
            eb = b.expand(n_second, *b.shape[1:]) if b.shape[0] == 1 else b
            out[key] = torch.cat([ea, eb.to(ea.device)])
        elif a is b or (not isinstance(a, Tensor) and a == b):
            out[key] = a
        else:
            raise ValueError(
                f"batched guidance: {key!r} differs between the conditional and the "
                "unconditional call and cannot be stacked along the batch; use batched=False"
            )
    return out


def cast_cond(cond: Cond, dtype: torch.dtype | None, device: Any = None) -> dict[str, Any]:
    """``cond`` with its floating tensors cast to ``dtype`` and every tensor moved to
    ``device`` (integer labels keep their dtype)."""

    def cast(value: Tensor) -> Tensor:
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value if device is None else value.to(device)

    return _map(cond, cast, scalars=True)
