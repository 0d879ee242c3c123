"""Models by name, for the benchmark and the command line.

``load_model("gmm")`` gives the built-in exact Gaussian mixture; ``"module:factory"``
imports a user's factory, which returns a :class:`BundledModel` or a pair
``(model, sample_shape)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model import EpsModel, ODEModel
from ..schedule import NoiseSchedule
from .gmm import GaussianMixture

__all__ = ["BundledModel", "available_models", "load_model", "register_model"]


@dataclass
class BundledModel:
    """A model ready for benchmarking.

    Attributes:
        name: registry name.
        model: ``eps = model(xbar, sigma)`` with a ``schedule`` attribute.
        shape: shape of one sample (without the batch dimension).
        description: one line for tables and plots.
        last_step: how solvers take the step into ``sigma = 0``: ``"euler"`` for networks
            (undefined below the schedule's ``sigma_min``), ``"solver"`` for exact models.
        exact: the exact data distribution, when known.
        ref_tol: rtol = atol of the float64 reference solve the benchmark measures against.
        num_classes: for a class-conditional model, the number of classes: ``model`` is
            then the unconditioned :class:`~pflow.EpsModel` (its network called without
            labels is the unconditional model) and :meth:`conditioned` binds labels and
            guidance.
        label_key: the network's keyword for the labels.
    """

    name: str
    model: ODEModel
    shape: tuple[int, ...]
    description: str = ""
    last_step: str = "euler"
    exact: GaussianMixture | None = field(default=None, repr=False)
    ref_tol: float = 1e-9
    num_classes: int | None = None
    label_key: str = "class_labels"

    @property
    def null_label(self) -> int:
        """The label that means "no class" (trained by label dropout): ``num_classes``."""
        if self.num_classes is None:
            raise ValueError(f"model {self.name!r} is not class-conditional")
        return self.num_classes

    def check_labels(self, labels: torch.Tensor, name: str = "labels") -> torch.Tensor:
        """``labels`` as int64, each a class in ``[0, num_classes)``; a ValueError naming
        ``name`` otherwise (or for an unconditional model)."""
        if self.num_classes is None:
            raise ValueError(
                f"{name}: model {self.name!r} is unconditional and takes no labels "
                "(class-conditional bundled models: digits-cond)"
            )
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must be integer class labels, got dtype {labels.dtype}")
        labels = labels.to(torch.int64).reshape(-1)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"{name}: unknown label {int(labels[bad][0])} for model {self.name!r}; its "
                f"classes are 0-{self.num_classes - 1}"
            )
        return labels

    def conditioned(
        self,
        labels: torch.Tensor,
        guidance: float = 1.0,
        *,
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
        batched: bool = True,
    ) -> ODEModel:
        """The model given ``labels`` (one per sample, or one for all) under
        classifier-free guidance ``guidance`` (1: the conditional model itself, no
        unconditional call), with an optional sigma ``interval`` and ``rescale`` (see
        :func:`pflow.guide`)."""
        from ..guidance import guide

        labels = self.check_labels(labels)
        model = self.model
        if not isinstance(model, EpsModel):
            raise TypeError(f"model {self.name!r}: labels need an EpsModel")
        params = getattr(model.eager_net, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        device = first.device if first is not None else labels.device
        labels = labels.to(device)  # the network's device, for any network
        cond = model.condition(**{self.label_key: labels})
        if guidance == 1.0 and interval is None and rescale == 0.0:
            return cond
        null = torch.tensor([self.null_label], device=device)
        return guide(
            cond,
            guidance,
            {self.label_key: null},
            interval=interval,
            rescale=rescale,
            batched=batched,
        )


def builtin_gmm() -> BundledModel:
    """An 8-D mixture of 5 Gaussians with full covariances, fixed by seed 0: well
    separated modes with thin (variance ~0.02-0.3) directions, so that the flow bends."""
    g = torch.Generator().manual_seed(0)
    dim, k = 8, 5
    means = 2.0 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
    covs = 0.15 * a @ a.transpose(1, 2) / dim + 0.02 * torch.eye(dim, dtype=torch.float64)
    weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    gmm = GaussianMixture(means, covs, weights)
    return BundledModel(
        "gmm",
        gmm,
        (dim,),
        "exact 8-D Gaussian mixture (5 components, full covariances)",
        last_step="solver",
        exact=gmm,
    )


def bundled_digits() -> BundledModel:
    """The bundled 8x8 digits UNet (eps-prediction, linear betas 1e-4..0.02, 1000 steps)."""
    from .networks_load import load_digits_unet

    model = EpsModel(load_digits_unet(), NoiseSchedule.linear(), "epsilon")
    return BundledModel(
        "digits", model, (1, 8, 8), "8x8 digits UNet (eps, linear betas)", ref_tol=1e-7
    )


def bundled_digits_cond() -> BundledModel:
    """The class-conditional 8x8 digits UNet (labels 0-9, null label 10, trained with 10%
    label dropout for classifier-free guidance; eps, linear betas)."""
    from .networks_load import load_digits_cond_unet

    model = EpsModel(load_digits_cond_unet(), NoiseSchedule.linear(), "epsilon")
    return BundledModel(
        "digits-cond",
        model,
        (1, 8, 8),
        "8x8 class-conditional digits UNet (eps, linear betas, CFG)",
        ref_tol=1e-7,
        num_classes=10,
    )


def bundled_moons() -> BundledModel:
    """The bundled two-moons MLP (eps-prediction, linear betas), for 2-D trajectory plots."""
    from .networks_load import load_moons_mlp

    model = EpsModel(load_moons_mlp(), NoiseSchedule.linear(), "epsilon")
    return BundledModel("moons", model, (2,), "2-D two-moons MLP (eps, linear betas)", ref_tol=1e-8)


_FACTORIES: dict[str, Callable[[], BundledModel]] = {
    "digits": bundled_digits,
    "digits-cond": bundled_digits_cond,
    "gmm": builtin_gmm,
    "moons": bundled_moons,
}


def register_model(name: str, factory: Callable[[], BundledModel]) -> None:
    """Make ``load_model(name)`` call ``factory``."""
    _FACTORIES[name] = factory


def available_models() -> list[str]:
    return list(_FACTORIES)


def load_model(name: str) -> BundledModel:
    """A bundled model by name, or a user's ``module:factory``."""
    if name in _FACTORIES:
        return _FACTORIES[name]()
    if ":" not in name:
        raise ValueError(
            f"model must be one of {', '.join(_FACTORIES)} or 'module:factory'; got {name!r}"
        )
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"model {name!r}: cannot import {attr!r} from {module_name!r} ({exc})"
        ) from None
    if not callable(factory):
        raise TypeError(
            f"model {name!r}: {attr!r} in {module_name!r} must be a factory (a callable "
            f"returning a model), got {type(factory).__name__}"
        )
    return _check_made(name, factory())


def _check_made(name: str, made: object) -> BundledModel:
    """What the factory ``name`` returned, as a :class:`BundledModel`: a TypeError (wrong
    type) or ValueError (bad sample shape) naming the factory otherwise."""
    where = f"model {name!r}: the factory"
    if isinstance(made, BundledModel):
        model, shape = made.model, made.shape
    elif isinstance(made, (tuple, list)) and len(made) == 2:
        model, shape = made
    else:
        got = type(made).__name__
        if isinstance(made, (tuple, list)):
            got = f"a {got} of {len(made)}"
        raise TypeError(
            f"{where} must return a pflow.zoo.BundledModel or a pair (model, sample_shape), "
            f"got {got}"
        )
    if not callable(model):
        raise TypeError(
            f"{where} returned a model that is not callable as model(xbar, sigma): "
            f"{type(model).__name__}"
        )
    expected = "a tuple of positive ints, the shape of one sample without the batch, e.g. (2,)"
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in shape
    ):
        raise TypeError(f"{where} returned sample_shape {shape!r}; it must be {expected}")
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"{where} returned sample_shape {shape!r}; it must be {expected}")
    if isinstance(made, BundledModel):
        made.shape = tuple(shape)
        return made
    return BundledModel(name, model, tuple(shape), f"user model {name}")
