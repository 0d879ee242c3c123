"""Small data sets used by the bundled models.

* sklearn's 8x8 digits (1,797 images), scaled to ``[-1, 1]`` with a fixed,
  seeded train/test split (1,497 / 300).
* Two moons, standardised per axis with fixed constants.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE",
    "MOONS_MEAN",
    "MOONS_NOISE",
    "MOONS_STD",
    "digits_data",
    "digits_labels",
    "moons_data",
]

DIGITS_SPLIT_SEED = 20240517
DIGITS_TEST_SIZE = 300

# Affine map for the moons: (x - MOONS_MEAN) / MOONS_STD.  The constants are the
# per-axis mean / standard deviation of make_moons(noise=0.05), rounded and frozen.
MOONS_NOISE = 0.05
MOONS_MEAN = (0.5, 0.25)
MOONS_STD = (0.87, 0.5)

_SPLITS = ("train", "test", "all")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _split_indices(split: str, n: int) -> np.ndarray:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if split == "all":
        return np.arange(n)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    test = np.sort(perm[:DIGITS_TEST_SIZE])
    train = np.sort(perm[DIGITS_TEST_SIZE:])
    return train if split == "train" else test


def digits_data(split: str = "train") -> Tensor:
    """Digits as float32 ``[N, 1, 8, 8]`` in ``[-1, 1]`` (``pixel / 8 - 1``).

    ``split`` is ``"train"`` (1,497 images), ``"test"`` (300 held-out images) or
    ``"all"`` (1,797).  The split is fixed by :data:`DIGITS_SPLIT_SEED`.
    """
    images, _ = _digits_arrays()
    idx = _split_indices(split, len(images))
    x = images[idx] / 8.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)


def digits_labels(split: str = "train") -> Tensor:
    """Integer labels (int64 ``[N]``) matching :func:`digits_data` for the same split."""
    images, labels = _digits_arrays()
    idx = _split_indices(split, len(images))
    return torch.from_numpy(np.ascontiguousarray(labels[idx]))


def moons_data(n: int, seed: int = 0) -> Tensor:
    """``n`` two-moons points (float32 ``[n, 2]``), standardised to roughly unit scale."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=MOONS_NOISE, random_state=seed)
    x = (x - np.asarray(MOONS_MEAN)) / np.asarray(MOONS_STD)
    return torch.from_numpy(x.astype(np.float32))
