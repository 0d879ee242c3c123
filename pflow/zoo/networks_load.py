"""Load the bundled trained networks (safetensors only, never pickle).

Each loader returns the network in eval mode with ``requires_grad`` off, on the
CPU in float32; use ``.to(device, dtype)`` to move it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .networks import DigitsClassifier, DigitsUNet, MoonsMLP

__all__ = [
    "WEIGHTS_DIR",
    "load_digits_classifier",
    "load_digits_unet",
    "load_moons_mlp",
    "read_metadata",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _path(filename: str) -> Path:
    path = WEIGHTS_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled weights not found: {path}; train them with `python -m pflow.zoo.train`"
        )
    return path


def read_metadata(filename: str) -> dict[str, Any]:
    """The training metadata stored in a weights file (``"pflow"`` JSON entry)."""
    from safetensors import safe_open

    with safe_open(str(_path(filename)), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("pflow", "{}"))


def _load(model_cls: type[nn.Module], filename: str) -> Any:
    from safetensors.torch import load_file

    meta = read_metadata(filename)
    config = dict(meta.get("config", {}))
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
    model = model_cls(**config)
    state = load_file(str(_path(filename)), device="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_digits_unet() -> DigitsUNet:
    """The epsilon-prediction UNet for 1x8x8 digits (EMA weights)."""
    return _load(DigitsUNet, "digits_unet.safetensors")


def load_moons_mlp() -> MoonsMLP:
    """The epsilon-prediction MLP for the standardised two-moons data (EMA weights)."""
    return _load(MoonsMLP, "moons_mlp.safetensors")


def load_digits_classifier() -> DigitsClassifier:
    """The digits CNN classifier (``forward`` -> logits, ``features`` -> 128-d)."""
    return _load(DigitsClassifier, "digits_classifier.safetensors")
