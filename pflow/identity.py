"""What a model *is*, as a content hash: the key under which results computed with it
(a benchmark row, a cached reference, a latent) may be reused.

``model_identity(model)`` hashes, in a fixed order, everything that changes the model's
``eps(xbar, sigma)``: the class, every tensor it holds (a network's parameters and
buffers with their names, dtypes and shapes; a schedule's table; an exact model's means
and covariances) and its plain settings (prediction type, quantisation, t dtype). Two
models with the same identity compute the same function; changing one weight, the
schedule or the prediction type changes it. Hashing reads every parameter once (a few ms
for the bundled networks).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["model_identity", "tensor_digest"]

_PLAIN = (bool, int, float, str, type(None))


def tensor_digest(h: Any, name: str, t: Tensor) -> None:
    """Feed ``name``, dtype, shape and the bytes of ``t`` into the hash ``h``."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _feed(h: Any, name: str, value: Any, depth: int, seen: set[int]) -> None:
    if id(value) in seen or depth > 4:
        return
    if isinstance(value, Tensor):
        tensor_digest(h, name, value)
    elif isinstance(value, _PLAIN) or isinstance(value, torch.dtype):
        h.update(f"{name}={value!r};".encode())
    elif isinstance(value, nn.Module):
        seen.add(id(value))
        h.update(f"{name}<{type(value).__qualname__}>".encode())
        for key, t in value.state_dict().items():
            tensor_digest(h, f"{name}.{key}", t)
    elif isinstance(value, (list, tuple)):
        seen.add(id(value))
        for i, v in enumerate(value):
            _feed(h, f"{name}[{i}]", v, depth + 1, seen)
    elif isinstance(value, dict):
        seen.add(id(value))
        for k in sorted(value, key=str):
            _feed(h, f"{name}[{k!r}]", value[k], depth + 1, seen)
    elif callable(value) and not hasattr(value, "__self__") and hasattr(value, "__code__"):
        h.update(f"{name}=<function {value.__module__}.{value.__qualname__}>;".encode())
    elif hasattr(value, "__dict__"):
        seen.add(id(value))
        h.update(f"{name}<{type(value).__module__}.{type(value).__qualname__}>".encode())
        skip = getattr(type(value), "_identity_skip", ())
        for k in sorted(vars(value)):
            if k.startswith("__") or k in skip:
                continue
            _feed(h, f"{name}.{k}", vars(value)[k], depth + 1, seen)


def model_identity(model: Any) -> str:
    """A sha256 hex digest of everything that determines ``model``'s ``eps``: its class,
    its tensors (a network's state dict, a schedule's table) and its plain settings.
    Functions (a factory's closure) are identified by their module and qualified name
    only: wrap weights in an ``nn.Module`` or keep them as tensors on the model object to
    have them hashed. A class may name attributes derived from others (caches) in
    ``_identity_skip``; they are left out."""
    h = hashlib.sha256()
    _feed(h, "model", model, 0, set())
    return h.hexdigest()
