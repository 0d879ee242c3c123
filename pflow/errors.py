"""Errors the solve loop raises, each naming what went wrong and where."""

from __future__ import annotations

__all__ = ["MaxNFEExceeded", "NonFiniteError"]


class MaxNFEExceeded(RuntimeError):
    """The solve needed more network evaluations than ``max_nfe`` allows."""


class NonFiniteError(FloatingPointError):
    """The model returned NaN or inf; the message names the sigma at which it happened."""
