"""Per-sample Gaussian noise that does not depend on the batch, the device or the rank.

A sample is named by a 64-bit key, ``key = seed * 2**32 + index`` (:func:`noise_keys`),
and every random number it ever uses is a pure function of ``(key, stream, element)``:
stream 0 is its ``x_T``, stream ``k >= 1`` the noise of a stochastic sampler's ``k``-th
step. So sample 17 of seed 0 is the same whether it is drawn alone, in a batch of 4096,
split by ``batch_size=`` or on rank 3 of 8 (EDM draws each sample from its own seed for
the same reason, with one generator object per sample; here the draw is vectorised).

The generator is counter-based, in the spirit of Philox (Salmon et al., SC'11). A sample
and stream get a 64-bit state ``(h1, h2)`` from chains of a 32-bit integer mixer (the
xor-shift-multiply "lowbias32" form of Wellons' hash-prospector, with multipliers below
``2**31`` so 32-bit lanes held in int64 never overflow); element ``j`` is the word
``mix(mix(h1 ^ mix(j)) ^ h2)``. Two samples share noise only if both halves of their
states collide (about ``2**-64`` per pair, so never in practice; a 32-bit state would
collide once in ~10^4 samples). Two words make a pair of normals by the Box-Muller
transform in float64. Integer arithmetic is exact on every device, so CPU and CUDA draw
the same numbers up to the last bit of float64 ``log``/``cos``. Uniforms have 32 bits:
tails are cut at about 6.7 sigma, beyond anything a sampler's step can see
(``torch.randn`` in float32 uses 24 bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["KeyedNormal", "keyed_randn", "noise_keys"]

_MASK = 0xFFFFFFFF
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # odd, < 2**31: x * m < 2**63 for x < 2**32
_GOLDEN, _OTHER = 0x9E3779B9, 0x7F4A7C15
_MAX_SEED = 2**31 - 1


def _mix(x: Tensor) -> Tensor:
    """A bijection of 32-bit words with full avalanche (xor-shift-multiply)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    return x ^ (x >> 15)


def noise_keys(seed: int, indices: int | range | Sequence[int] | Tensor) -> Tensor:
    """The 64-bit keys ``seed * 2**32 + index`` of the samples ``indices`` of a run.

    ``indices`` is a count ``n`` (samples ``0 .. n-1``), a range, or explicit indices
    (``0 <= index < 2**32``). ``seed`` is in ``[0, 2**31)``. With ``seed = 0`` the key is
    the index itself, so keys ``0 .. 49999`` are EDM's "seeds 0-49999".
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    if isinstance(indices, bool):
        raise TypeError("indices must be a count, a range or a sequence of integers")
    if isinstance(indices, int):
        if indices < 1:
            raise ValueError(f"indices: the number of samples must be >= 1, got {indices}")
        idx = torch.arange(indices, dtype=torch.int64)
    elif isinstance(indices, Tensor):
        if indices.dtype.is_floating_point or indices.ndim != 1:
            raise ValueError("indices must be a 1-D integer tensor")
        idx = indices.to(device="cpu", dtype=torch.int64)
    else:
        idx = torch.as_tensor(list(indices), dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > _MASK):
        raise ValueError("indices must lie in [0, 2**32)")
    return idx + (seed << 32)


def _check_keys(keys: Tensor | Sequence[int]) -> Tensor:
    k = keys if isinstance(keys, Tensor) else torch.as_tensor(list(keys), dtype=torch.int64)
    if k.dtype != torch.int64 or k.ndim != 1 or k.numel() < 1:
        raise ValueError(
            f"keys must be a non-empty 1-D int64 tensor (see pflow.noise_keys), got "
            f"dtype {k.dtype} and shape {tuple(k.shape)}"
        )
    if int(k.min()) < 0:
        raise ValueError("keys must be >= 0 (see pflow.noise_keys)")
    return k


class KeyedNormal:
    """Standard normal draws for a batch of keyed samples, vectorised over the batch.

    The element part of the hash is cached per shape, so a draw costs about twenty
    elementwise integer operations on the batch and a Box-Muller transform.
    """

    def __init__(self, keys: Tensor | Sequence[int], device: torch.device | str | None = None):
        k = _check_keys(keys)
        self.keys = k.cpu()
        self.device = torch.device(device) if device is not None else k.device
        k = k.to(self.device)
        lo, hi = k & _MASK, k >> 32
        self._a1 = _mix(_mix(lo ^ _GOLDEN) ^ hi).reshape(-1, 1)
        self._a2 = _mix(_mix(hi ^ _OTHER) ^ lo).reshape(-1, 1)
        self._elements: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.keys.numel()

    def _element_words(self, n_words: int) -> Tensor:
        if n_words not in self._elements:
            j = torch.arange(n_words, dtype=torch.int64, device=self.device)
            self._elements[n_words] = _mix(j ^ _OTHER).reshape(1, -1)
        return self._elements[n_words]

    def words(self, n_words: int, stream: int) -> Tensor:
        """``(batch, n_words)`` hashed 32-bit words (held in int64) of ``stream``."""
        if not 0 <= stream <= _MASK:
            raise ValueError(f"stream must be in [0, 2**32), got {stream}")
        h1, h2 = _mix(self._a1 ^ stream), _mix(self._a2 ^ (stream ^ _GOLDEN))
        return _mix(_mix(h1 ^ self._element_words(n_words)) ^ h2)

    def randn(
        self,
        shape: Sequence[int],
        *,
        stream: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Normals of shape ``(batch, *shape)`` for ``stream``."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        pairs = (n + 1) // 2
        w = self.words(2 * pairs, stream).to(torch.float64)
        u1 = (w[:, :pairs] + 0.5) * 2.0**-32  # in (0, 1): log is finite
        u2 = w[:, pairs:] * 2.0**-32
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = (2 * math.pi) * u2
        z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n]
        out = z.reshape(len(self), *shape).to(dtype)
        return out.to(device) if device is not None else out


def keyed_randn(
    keys: Tensor | Sequence[int],
    shape: Sequence[int],
    *,
    stream: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normals of shape ``(len(keys), *shape)``: row ``i`` depends on ``keys[i]``
    and ``stream`` only. ``x_T`` for samples ``0 .. n-1`` of a run seeded ``s`` is
    ``keyed_randn(noise_keys(s, n), shape)``."""
    return KeyedNormal(keys, device=device).randn(shape, stream=stream, dtype=dtype)
