"""Load the bundled trained networks (safetensors only, never pickle).

Each loader returns the network in eval mode with ``requires_grad`` off, on the
CPU in float32; use ``.to(device, dtype)`` to move it.

Every weights file ships with a model card next to it (``<name>.json``: the training
metadata that the file also carries, plus ``"sha256"``, the file's digest). The digest is
checked before the file is read: a changed or corrupted file is an error naming the file
and both digests, never a network that loads and quietly computes something else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from .networks import DigitsClassifier, DigitsUNet, MoonsMLP

__all__ = [
    "WEIGHTS_DIR",
    "WeightsDigestError",
    "file_sha256",
    "load_digits_classifier",
    "load_digits_cond_unet",
    "load_digits_unet",
    "load_moons_mlp",
    "read_metadata",
    "verify",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class WeightsDigestError(ValueError):
    """A bundled weights file does not have the sha256 digest its model card records."""


def file_sha256(path: str | Path) -> str:
    """The hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _path(filename: str, weights_dir: str | Path | None = None) -> Path:
    path = Path(WEIGHTS_DIR if weights_dir is None else weights_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled weights not found: {path}; train them with `python -m pflow.zoo.train`"
        )
    return path


def verify(filename: str, weights_dir: str | Path | None = None) -> Path:
    """The weights file's path once its sha256 matches the one in its model card.

    Raises:
        FileNotFoundError: the file or its card (``<name>.json``) is missing.
        WeightsDigestError: the card records no digest, or a different one.
    """
    path = _path(filename, weights_dir)
    card = path.with_suffix(".json")
    if not card.is_file():
        raise FileNotFoundError(
            f"the model card {card} of the bundled weights {path.name} is missing; it records "
            "the file's sha256 (`python -m pflow.zoo.train` writes both)"
        )
    expected = json.loads(card.read_text()).get("sha256")
    if not isinstance(expected, str):
        raise WeightsDigestError(
            f"the model card {card} records no sha256 for {path.name}; the file cannot be "
            "checked (`python -m pflow.zoo.train` writes it)"
        )
    actual = file_sha256(path)
    if actual != expected.lower():
        raise WeightsDigestError(
            f"bundled weights {path} are corrupted or were changed: their sha256 is {actual}, "
            f"but the model card {card.name} records {expected}; reinstall pflow (or "
            "retrain with `python -m pflow.zoo.train`, which writes a new card)"
        )
    return path


def read_metadata(filename: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The training metadata stored in a weights file (``"pflow"`` JSON entry)."""
    from safetensors import safe_open

    with safe_open(str(_path(filename, weights_dir)), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("pflow", "{}"))


def _load(model_cls: type[nn.Module], filename: str, weights_dir: str | Path | None = None) -> Any:
    from safetensors.torch import load_file

    path = verify(filename, weights_dir)
    meta = read_metadata(filename, weights_dir)
    config = dict(meta.get("config", {}))
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
    model = model_cls(**config)
    state = load_file(str(path), device="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_digits_unet(weights_dir: str | Path | None = None) -> DigitsUNet:
    """The epsilon-prediction UNet for 1x8x8 digits (EMA weights); ``weights_dir``: a
    folder holding ``digits_unet.safetensors`` and its card (the bundled one by default)."""
    return _load(DigitsUNet, "digits_unet.safetensors", weights_dir)


def load_digits_cond_unet(weights_dir: str | Path | None = None) -> DigitsUNet:
    """The class-conditional UNet for 1x8x8 digits (labels 0-9, null label 10; EMA
    weights)."""
    return _load(DigitsUNet, "digits_cond_unet.safetensors", weights_dir)


def load_moons_mlp(weights_dir: str | Path | None = None) -> MoonsMLP:
    """The epsilon-prediction MLP for the standardised two-moons data (EMA weights)."""
    return _load(MoonsMLP, "moons_mlp.safetensors", weights_dir)


def load_digits_classifier(weights_dir: str | Path | None = None) -> DigitsClassifier:
    """The digits CNN classifier (``forward`` -> logits, ``features`` -> 128-d)."""
    return _load(DigitsClassifier, "digits_classifier.safetensors", weights_dir)
