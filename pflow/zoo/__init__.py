"""Models with known truth or shipped weights: the exact Gaussian mixture and the
bundled networks trained by this project."""

from .gmm import GaussianMixture

__all__ = ["GaussianMixture"]
