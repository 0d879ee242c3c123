"""Network definitions for the bundled models (pure ``torch.nn``).

* :class:`DigitsUNet` -- epsilon-prediction UNet for 1x8x8 images (sklearn digits).
* :class:`MoonsMLP` -- epsilon-prediction MLP for 2-D points (two moons).
* :class:`DigitsClassifier` -- small CNN classifier for 1x8x8 digits, with a
  ``features`` method (penultimate layer) for Frechet distances.

All modules are dtype/device agnostic: they follow the dtype and device of their
parameters, and the timestep ``t`` may be a float or integer tensor of (possibly
fractional) DDPM timesteps in ``[0, 999]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DigitsClassifier",
    "DigitsUNet",
    "MoonsMLP",
    "timestep_embedding",
]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps.

    ``t`` has shape ``[B]`` (or is a scalar); the result has shape ``[B, dim]`` and
    the dtype of ``t`` (which must be floating point).
    """
    if t.dim() == 0:
        t = t[None]
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half
    )
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _prepare_t(t: Tensor | float | int, x: Tensor) -> Tensor:
    """Cast ``t`` to ``x``'s dtype/device and broadcast it to the batch size."""
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    t = t.to(device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t.reshape(x.shape[0])


def _groups(channels: int, max_groups: int = 8) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class TimeMLP(nn.Module):
    """Sinusoidal embedding followed by a two-layer SiLU MLP."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.net = nn.Sequential(
            nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.net(timestep_embedding(t, self.freq_dim))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 with an additive time-embedding and a residual path."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions, with a residual path."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hh * ww).unbind(1)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        h = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
        return x + self.proj(h)


class DenseResBlock(nn.Module):
    """Residual block on flattened features: (GroupNorm-SiLU-Linear) x2 + time embedding.

    Used at the 2x2 bottleneck, where a 3x3 convolution would mostly multiply
    zero padding; a dense layer over all ``4 * C`` features is cheaper per useful
    multiply-add and mixes the whole image.
    """

    def __init__(self, dim: int, temb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(dim, 32), dim)
        self.lin1 = nn.Linear(dim, dim)
        self.temb = nn.Linear(temb_dim, dim)
        self.norm2 = nn.GroupNorm(_groups(dim, 32), dim)
        self.dropout = nn.Dropout(dropout)
        self.lin2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.lin2.weight)
        nn.init.zeros_(self.lin2.bias)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.lin1(F.silu(self.norm1(x))) + self.temb(F.silu(temb))
        h = self.lin2(self.dropout(F.silu(self.norm2(h))))
        return x + h


class DigitsUNet(nn.Module):
    """Epsilon-prediction UNet for 1x8x8 images.

    ``forward(x_t [B,1,8,8], t [B]) -> eps [B,1,8,8]`` with ``t`` in DDPM timestep
    units (float or integer, possibly fractional).

    Class-conditional when ``num_classes > 0``: ``forward(x_t, t, class_labels)`` with
    int64 labels in ``[0, num_classes]``, where ``num_classes`` itself is the "null" label
    (trained by label dropout, Ho & Salimans 2022, arXiv 2207.12598) and ``None`` means
    null for every sample. A learned embedding of the label is added to the time
    embedding.

    Layout (``channels = (c8, c4, c2)``)::

        conv_in -> [ResBlock x n]@8x8 --skip--------------------------------+
          -> stride-2 conv -> [ResBlock(+Attn) x n]@4x4 --skip---------+      |
          -> stride-2 conv -> 2x2 bottleneck, flattened to 4*c2:       |      |
             DenseResBlock x mid_blocks -> unflatten                   |      |
          -> transposed conv -> cat -> [ResBlock(+Attn) x n]@4x4 <-----+      |
          -> transposed conv -> cat -> [ResBlock x n]@8x8 <-------------------+
          -> GroupNorm, SiLU, conv_out

    The 8x8 level is kept narrow and most parameters sit in the dense 2x2
    bottleneck (global mixing, cheap per parameter), which keeps a batch-256
    forward pass around 40 ms on two CPU threads.  Attention (single head) runs
    at 4x4 when ``attn_4x4``.
    """

    def __init__(
        self,
        in_ch: int = 1,
        channels: tuple[int, int, int] = (24, 48, 128),
        num_res_blocks: int = 1,
        attn_4x4: bool = True,
        mid_blocks: int = 2,
        temb_dim: int = 128,
        dropout: float = 0.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        c8, c4, c2 = channels
        n = num_res_blocks
        self.config = {
            "in_ch": in_ch,
            "channels": list(channels),
            "num_res_blocks": n,
            "attn_4x4": attn_4x4,
            "mid_blocks": mid_blocks,
            "temb_dim": temb_dim,
            "dropout": dropout,
        }
        self.num_classes = int(num_classes)
        if self.num_classes:
            self.config["num_classes"] = self.num_classes
            # One row per class plus the null label (index num_classes).
            self.class_emb = nn.Embedding(self.num_classes + 1, temb_dim)
            nn.init.normal_(self.class_emb.weight, std=0.02)
        self.time_mlp = TimeMLP(c8, temb_dim)
        self.conv_in = nn.Conv2d(in_ch, c8, 3, padding=1)

        def rb(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, temb_dim, dropout)

        def attn(c: int) -> nn.Module:
            return AttnBlock(c) if attn_4x4 else nn.Identity()

        self.down8 = nn.ModuleList([rb(c8, c8) for _ in range(n)])
        self.ds8 = nn.Conv2d(c8, c4, 3, stride=2, padding=1)
        self.down4 = nn.ModuleList([rb(c4, c4) for _ in range(n)])
        self.down4_attn = nn.ModuleList([attn(c4) for _ in range(n)])
        self.ds4 = nn.Conv2d(c4, c2, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(
            [DenseResBlock(4 * c2, temb_dim, dropout) for _ in range(mid_blocks)]
        )
        self.us2 = nn.ConvTranspose2d(c2, c4, 2, stride=2)
        self.up4 = nn.ModuleList([rb(2 * c4, c4) for _ in range(n)])
        self.up4_attn = nn.ModuleList([attn(c4) for _ in range(n)])
        self.us4 = nn.ConvTranspose2d(c4, c8, 2, stride=2)
        self.up8 = nn.ModuleList([rb(2 * c8, c8) for _ in range(n)])
        self.norm_out = nn.GroupNorm(_groups(c8), c8)
        self.conv_out = nn.Conv2d(c8, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        temb = self.time_mlp(_prepare_t(t, x))
        if self.num_classes:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
            temb = temb + self.class_emb(class_labels.to(x.device).long().reshape(-1)).to(
                temb.dtype
            )
        elif class_labels is not None:
            raise TypeError("this DigitsUNet is unconditional (num_classes=0): no class_labels")
        h = self.conv_in(x)
        skips8 = []
        for block in self.down8:
            h = block(h, temb)
            skips8.append(h)
        h = self.ds8(h)
        skips4 = []
        for block, att in zip(self.down4, self.down4_attn, strict=True):
            h = att(block(h, temb))
            skips4.append(h)
        h = self.ds4(h)
        shape = h.shape
        h = h.flatten(1)
        for block in self.mid:
            h = block(h, temb)
        h = h.reshape(shape)
        h = self.us2(h)
        for block, att in zip(self.up4, self.up4_attn, strict=True):
            h = att(block(torch.cat([h, skips4.pop()], dim=1), temb))
        h = self.us4(h)
        for block in self.up8:
            h = block(torch.cat([h, skips8.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class MoonsMLP(nn.Module):
    """Epsilon-prediction MLP for 2-D points: ``forward(x_t [B,2], t [B]) -> [B,2]``.

    The time embedding is projected and added to every hidden layer's input; hidden
    layers are residual (``h + Linear(SiLU(h + temb_i))``).
    """

    def __init__(
        self, dim: int = 2, hidden: int = 256, depth: int = 4, temb_dim: int = 128
    ) -> None:
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "temb_dim": temb_dim}
        self.time_mlp = TimeMLP(temb_dim, temb_dim)
        self.inp = nn.Linear(dim, hidden)
        self.temb_proj = nn.ModuleList([nn.Linear(temb_dim, hidden) for _ in range(depth)])
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = F.silu(self.time_mlp(_prepare_t(t, x)))
        h = self.inp(x)
        for lin, proj in zip(self.layers, self.temb_proj, strict=True):
            h = h + lin(F.silu(h + proj(temb)))
        return self.out(F.silu(h))


class DigitsClassifier(nn.Module):
    """Small CNN classifier for 1x8x8 digits in ``[-1, 1]``.

    ``forward(x) -> logits [B, 10]``; ``features(x) -> [B, feat_dim]`` is the
    penultimate (post-activation) layer, used for Frechet distances.
    """

    def __init__(
        self, width: int = 32, feat_dim: int = 128, num_classes: int = 10, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.config = {
            "width": width,
            "feat_dim": feat_dim,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.GroupNorm(_groups(w), w),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.GroupNorm(_groups(w), w),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GroupNorm(_groups(2 * w), 2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(_groups(2 * w), 2 * w),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(2 * w * 4, feat_dim),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.body(x)))
