"""Train the bundled models.

Usage::

    python -m pflow.zoo.train digits     --minutes 35 --seed 0 --out pflow/zoo/weights/
    python -m pflow.zoo.train digits-cond --iters 7000 --minutes 55 --seed 0 \
        --out pflow/zoo/weights/
    python -m pflow.zoo.train moons      --minutes 4  --seed 0 --out pflow/zoo/weights/
    python -m pflow.zoo.train classifier --minutes 2  --seed 0 --out pflow/zoo/weights/
    python -m pflow.zoo.train report     --out pflow/zoo/weights/ --img docs/img/

``digits`` and ``moons`` are standard DDPM epsilon-prediction training (linear
betas 1e-4 .. 0.02 over 1000 steps, ``alphas_cumprod`` in float64, integer
``t ~ U{0..999}``, MSE on eps) with AdamW, linear warm-up + cosine decay and an
EMA of the weights (the EMA weights are saved).  ``classifier`` trains the
digits CNN with cross-entropy and light augmentation (1-pixel shifts).

Training stops after ``--iters`` iterations or ``--minutes`` of wall time,
whichever comes first.  The learning-rate schedule follows iterations when
``--iters`` is given (reproducible), otherwise the fraction of the time budget.

Weights are written with ``safetensors`` (float32) with the hyper-parameters in
the safetensors metadata (key ``"pflow"``, a JSON string) and in a JSON sidecar.

``report`` loads the saved weights and prints the numbers used in
``docs/models.md`` (parameter counts, forward times, classifier accuracy,
confident-label fractions) and writes the sample images.  :func:`sample_grid`
is a plain 100-step DDIM (eta=0) loop used only for the model card; the real
samplers live in :mod:`pflow.solvers`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import digits_data, digits_labels, moons_data
from .networks import DigitsClassifier, DigitsUNet, MoonsMLP

NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02

FILENAMES = {
    "digits": "digits_unet.safetensors",
    "digits-cond": "digits_cond_unet.safetensors",
    "moons": "moons_mlp.safetensors",
    "classifier": "digits_classifier.safetensors",
}


# --------------------------------------------------------------------------- schedule
def ddpm_alphas_cumprod() -> Tensor:
    """float64 ``alphas_cumprod`` of the linear DDPM schedule (1e-4 .. 0.02, 1000 steps)."""
    betas = torch.linspace(BETA_START, BETA_END, NUM_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


# --------------------------------------------------------------------------- helpers
class EMA:
    """Exponential moving average of a model's floating-point state."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        # Warm-up of the decay so that early averages are not dominated by the init.
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def lr_factor(progress: float, warmup: float, floor: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` (fraction of training), then cosine to ``floor``."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    p = min((progress - warmup) / max(1.0 - warmup, 1e-8), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def random_shift(x: Tensor, prob: float, gen: torch.Generator, fill: float = -1.0) -> Tensor:
    """Shift each image by one pixel (in x and/or y) with probability ``prob``.

    Pixels shifted in are set to ``fill`` (background); no flips or rotations.
    """
    if prob <= 0:
        return x
    b = x.shape[0]
    apply = torch.rand(b, generator=gen) < prob
    dy = torch.randint(-1, 2, (b,), generator=gen) * apply
    dx = torch.randint(-1, 2, (b,), generator=gen) * apply
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            m = (dy == oy) & (dx == ox)
            if m.any():
                out[m] = padded[m, :, 1 - oy : 1 - oy + h, 1 - ox : 1 - ox + w]
    return out


class BatchSampler:
    """Deterministic epoch-wise shuffling of a fixed data tensor."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self) -> Tensor:
        idx = []
        need = self.batch
        while need > 0:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
            take = self.perm[self.pos : self.pos + need]
            self.pos += len(take)
            need -= len(take)
            idx.append(take)
        return torch.cat(idx)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"pflow": json.dumps(meta, sort_keys=True)})
    # The model card: the same metadata plus the file's digest, checked on every load
    # (pflow.zoo.networks_load.verify).
    from .networks_load import file_sha256

    card = {**meta, "sha256": file_sha256(path)}
    path.with_suffix(".json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def _command() -> str:
    return "python -m pflow.zoo.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# --------------------------------------------------------------------------- DDPM training
def diffusion_loss(
    model: nn.Module,
    x0: Tensor,
    ac: Tensor,
    t: Tensor,
    eps: Tensor,
    labels: Tensor | None = None,
) -> Tensor:
    a = ac[t].to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    xt = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
    if labels is None:
        return F.mse_loss(model(xt, t.to(x0.dtype)), eps)
    return F.mse_loss(model(xt, t.to(x0.dtype), labels), eps)


@torch.no_grad()
def eval_diffusion_loss(
    model: nn.Module,
    x0: Tensor,
    ac: Tensor,
    seed: int = 1234,
    repeats: int = 4,
    labels: Tensor | None = None,
) -> float:
    """Epsilon MSE on fixed data with fixed (t, eps) draws (stratified t), given
    ``labels`` for a class-conditional model."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(repeats):
        n = x0.shape[0]
        t = ((torch.arange(n) + torch.rand(n, generator=gen)) * NUM_TIMESTEPS / n).long()
        t = t[torch.randperm(n, generator=gen)].clamp(0, NUM_TIMESTEPS - 1)
        eps = torch.randn(x0.shape, generator=gen)
        losses.append(diffusion_loss(model, x0, ac, t, eps, labels).item())
    return float(np.mean(losses))


def train_diffusion(
    name: str,
    model: nn.Module,
    data: Tensor,
    eval_data: Tensor,
    args: argparse.Namespace,
    augment: Callable[[Tensor], Tensor] | None = None,
    labels: tuple[Tensor, Tensor] | None = None,
    p_uncond: float = 0.0,
) -> None:
    """DDPM training with an EMA; ``labels`` (train, eval) for a class-conditional model,
    whose label is replaced by the null label (``model.num_classes``) with probability
    ``p_uncond`` (label dropout for classifier-free guidance)."""
    torch.manual_seed(args.seed)
    drop_gen = torch.Generator().manual_seed(args.seed + 2)
    ac = ddpm_alphas_cumprod().to(torch.float32)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99)
    )
    ema = EMA(model, args.ema)
    sampler = BatchSampler(len(data), args.batch, args.seed)
    budget = args.minutes * 60.0
    max_iters = args.iters if args.iters else 10**12
    losses: deque[float] = deque(maxlen=1000)
    print(
        f"[{name}] params={num_params(model):,} batch={args.batch} lr={args.lr} "
        f"iters={args.iters} minutes={args.minutes}",
        flush=True,
    )
    start = time.perf_counter()
    it = 0
    model.train()
    while it < max_iters:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        progress = it / args.iters if args.iters else elapsed / budget
        lr = args.lr * lr_factor(progress, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = sampler.next()
        x0 = data[idx]
        if augment is not None:
            x0 = augment(x0)
        y = None
        if labels is not None:
            y = labels[0][idx].clone()
            y[torch.rand(len(idx), generator=drop_gen) < p_uncond] = model.num_classes
        t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],))
        eps = torch.randn_like(x0)
        loss = diffusion_loss(model, x0, ac, t, eps, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        ema.update(model)
        losses.append(loss.item())
        it += 1
        if it % args.log_every == 0:
            recent = list(losses)[-args.log_every :]
            print(
                f"[{name}] it={it} loss={np.mean(recent):.5f} avg1000={np.mean(losses):.5f} "
                f"lr={lr:.2e} t={time.perf_counter() - start:.0f}s",
                flush=True,
            )
    train_seconds = time.perf_counter() - start
    test_labels = None if labels is None else labels[1]
    ema_eval = eval_diffusion_loss(ema.model, eval_data, ac, labels=test_labels)
    raw_eval = eval_diffusion_loss(model.eval(), eval_data, ac, labels=test_labels)
    extra: dict = {}
    if labels is not None:
        null = torch.full_like(labels[1], model.num_classes)
        extra = {
            "num_classes": model.num_classes,
            "label_dropout": p_uncond,
            "eval_loss_ema_null_label": eval_diffusion_loss(ema.model, eval_data, ac, labels=null),
        }
    final = float(np.mean(losses)) if losses else float("nan")
    print(
        f"[{name}] done: iters={it} time={train_seconds:.0f}s train_loss_last1000={final:.5f} "
        f"eval_loss_ema={ema_eval:.5f} eval_loss_raw={raw_eval:.5f}",
        flush=True,
    )
    meta = {
        "model": type(model).__name__,
        "config": model.config,
        "num_params": num_params(model),
        "iterations": it,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss_last1000": final,
        "eval_loss_ema": ema_eval,
        "eval_loss_raw": raw_eval,
        "schedule": {
            "type": "linear",
            "beta_start": BETA_START,
            "beta_end": BETA_END,
            "num_timesteps": NUM_TIMESTEPS,
            "prediction": "epsilon",
        },
        "optimizer": {
            "name": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "betas": [0.9, 0.99],
            "warmup": args.warmup,
            "clip": args.clip,
            "schedule": "linear warm-up + cosine to 5%",
        },
        "batch": args.batch,
        "ema_decay": args.ema,
        "seed": args.seed,
        "augment_shift_prob": getattr(args, "shift", 0.0),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "command": _command(),
        "weights": "EMA",
        **extra,
    }
    save_model(ema.model, Path(args.out) / FILENAMES[name], meta)


# --------------------------------------------------------------------------- classifier
@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def train_classifier(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    x, y = digits_data("train"), digits_labels("train")
    xt, yt = digits_data("test"), digits_labels("test")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ema = EMA(model, args.ema)
    sampler = BatchSampler(len(x), args.batch, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    budget = args.minutes * 60.0
    max_iters = args.iters if args.iters else 10**12
    losses: deque[float] = deque(maxlen=1000)
    print(f"[classifier] params={num_params(model):,}", flush=True)
    start = time.perf_counter()
    it = 0
    while it < max_iters and time.perf_counter() - start < budget:
        elapsed = time.perf_counter() - start
        progress = it / args.iters if args.iters else elapsed / budget
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(progress, args.warmup, floor=0.01)
        model.train()
        idx = sampler.next()
        xb = random_shift(x[idx], args.shift, gen)
        xb = xb + args.noise * torch.randn(xb.shape, generator=gen)
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        losses.append(loss.item())
        it += 1
        if it % args.log_every == 0:
            print(
                f"[classifier] it={it} loss={np.mean(list(losses)[-args.log_every :]):.4f} "
                f"test_acc_ema={accuracy(ema.model, xt, yt):.4f} "
                f"t={time.perf_counter() - start:.0f}s",
                flush=True,
            )
    train_seconds = time.perf_counter() - start
    test_acc = accuracy(ema.model, xt, yt)
    train_acc = accuracy(ema.model, x, y)
    print(
        f"[classifier] done: iters={it} time={train_seconds:.0f}s "
        f"train_acc={train_acc:.4f} test_acc={test_acc:.4f}",
        flush=True,
    )
    meta = {
        "model": "DigitsClassifier",
        "config": model.config,
        "num_params": num_params(model),
        "iterations": it,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss_last1000": float(np.mean(losses)),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "test_size": len(yt),
        "optimizer": {
            "name": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup": args.warmup,
            "schedule": "linear warm-up + cosine to 1%",
        },
        "loss": "cross-entropy, label smoothing 0.05",
        "augment": {"shift_prob": args.shift, "gaussian_noise_std": args.noise},
        "batch": args.batch,
        "ema_decay": args.ema,
        "seed": args.seed,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "command": _command(),
        "weights": "EMA",
    }
    save_model(ema.model, Path(args.out) / FILENAMES["classifier"], meta)


# --------------------------------------------------------------------------- model card
@torch.no_grad()
def sample_grid(
    model: nn.Module,
    n: int = 64,
    steps: int = 100,
    seed: int = 0,
    shape: tuple[int, ...] = (1, 8, 8),
    clip: bool = True,
) -> Tensor:
    """Plain DDIM (eta=0) sampling with ``steps`` evenly spaced timesteps 999 .. 0.

    Only used for the model card pictures; returns ``[n, *shape]`` float32 samples
    (clipped to ``[-1, 1]`` when ``clip``).
    """
    gen = torch.Generator().manual_seed(seed)
    ac = ddpm_alphas_cumprod()
    ts = np.linspace(NUM_TIMESTEPS - 1, 0, steps).round().astype(np.int64)
    x = torch.randn((n, *shape), generator=gen, dtype=torch.float64).float()
    for i, t in enumerate(ts):
        a_t = ac[t].item()
        a_prev = ac[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = model(x, torch.full((n,), float(t)))
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x


def forward_time_ms(model: nn.Module, x: Tensor, threads: int = 2, reps: int = 30) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    t = torch.rand(x.shape[0]) * (NUM_TIMESTEPS - 1)
    ts = []
    with torch.no_grad():
        for _ in range(5):
            model(x, t)
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x, t)
            ts.append(time.perf_counter() - t0)
    torch.set_num_threads(old)
    ts.sort()
    return {"min_ms": round(ts[0] * 1e3, 2), "median_ms": round(ts[len(ts) // 2] * 1e3, 2)}


def report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .networks_load import load_digits_classifier, load_digits_unet, load_moons_mlp

    torch.set_num_threads(args.threads)
    out: dict = {}
    img_dir = Path(args.img)
    img_dir.mkdir(parents=True, exist_ok=True)

    clf = load_digits_classifier()
    out["classifier"] = {
        "params": num_params(clf),
        "test_accuracy": accuracy(clf, digits_data("test"), digits_labels("test")),
    }

    unet = load_digits_unet()
    out["digits_unet"] = {
        "params": num_params(unet),
        "forward_b256_2threads": forward_time_ms(unet, torch.randn(256, 1, 8, 8)),
    }

    def confident(samples: Tensor) -> dict:
        with torch.no_grad():
            probs = torch.softmax(clf(samples.clamp(-1, 1)), dim=-1)
        conf, lab = probs.max(-1)
        return {
            "n": len(samples),
            "confident_frac": (conf > 0.9).float().mean().item(),
            "label_counts": torch.bincount(lab[conf > 0.9], minlength=10).tolist(),
        }

    s64 = sample_grid(unet, 64, 100, seed=args.seed)
    out["digits_unet"]["samples64"] = confident(s64)
    s512 = sample_grid(unet, 512, 100, seed=args.seed + 1)
    out["digits_unet"]["samples512"] = confident(s512)
    out["digits_data_test_confident"] = confident(digits_data("test"))["confident_frac"]

    grid = torch.full((8 * 9 + 1, 8 * 9 + 1), 1.0)
    for k in range(64):
        r, c = divmod(k, 8)
        grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = s64[k, 0]
    fig = plt.figure(figsize=(4, 4), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.savefig(img_dir / "digits_samples.png")
    plt.close(fig)

    mlp = load_moons_mlp()
    out["moons_mlp"] = {
        "params": num_params(mlp),
        "forward_b256_2threads": forward_time_ms(mlp, torch.randn(256, 2)),
    }
    pts = sample_grid(mlp, 2000, 100, seed=args.seed, shape=(2,), clip=False)
    ref = moons_data(2000, seed=12345)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=100, sharex=True, sharey=True)
    axes[0].scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.6)
    axes[0].set_title("data (standardised moons)")
    axes[1].scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6, color="C1")
    axes[1].set_title("MoonsMLP, DDIM 100 steps")
    for a in axes:
        a.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(img_dir / "moons_samples.png")
    plt.close(fig)
    print(json.dumps(out, indent=2))


# --------------------------------------------------------------------------- CLI
DEFAULTS = {
    "digits": {"batch": 128, "lr": 1e-3, "ema": 0.999, "warmup": 0.02, "log_every": 200},
    "digits-cond": {"batch": 128, "lr": 1e-3, "ema": 0.999, "warmup": 0.02, "log_every": 200},
    "moons": {"batch": 512, "lr": 1e-3, "ema": 0.999, "warmup": 0.02, "log_every": 500},
    "classifier": {"batch": 128, "lr": 2e-3, "ema": 0.99, "warmup": 0.05, "log_every": 200},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pflow.zoo.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=["digits", "digits-cond", "moons", "classifier", "report"])
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-time budget")
    parser.add_argument("--iters", type=int, default=0, help="iteration budget (0: time only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    parser.add_argument("--img", default="docs/img", help="report: image folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--ema", type=float)
    parser.add_argument("--warmup", type=float, help="warm-up as a fraction of training")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    parser.add_argument(
        "--shift",
        type=float,
        default=None,
        help="probability of a random 1-pixel shift (digits/classifier)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="classifier: std of Gaussian input noise augmentation",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="digits UNet dropout")
    parser.add_argument(
        "--p-uncond",
        type=float,
        default=0.1,
        help="digits-cond: probability of training on the null label (label dropout)",
    )
    parser.add_argument("--log-every", type=int)
    parser.add_argument(
        "--arch", default="{}", help="JSON dict of extra constructor kwargs for the network"
    )
    args = parser.parse_args(argv)

    for k, v in DEFAULTS.get(args.what, {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.shift is None:
        args.shift = 0.5 if args.what == "classifier" else 0.0
    torch.set_num_threads(args.threads)
    arch = json.loads(args.arch)

    if args.what == "report":
        report(args)
    elif args.what == "classifier":
        if args.weight_decay == 0.0:
            args.weight_decay = 0.05
        train_classifier(args)
    elif args.what in ("digits", "digits-cond"):
        torch.manual_seed(args.seed)
        if "channels" in arch:
            arch["channels"] = tuple(arch["channels"])
        cond = args.what == "digits-cond"
        if cond:
            arch.setdefault("num_classes", 10)
        model = DigitsUNet(dropout=args.dropout, **arch)
        gen = torch.Generator().manual_seed(args.seed + 1)

        def augment(x: Tensor) -> Tensor:
            return random_shift(x, args.shift, gen)

        train_diffusion(
            args.what,
            model,
            digits_data("train"),
            digits_data("test"),
            args,
            augment if args.shift > 0 else None,
            labels=(digits_labels("train"), digits_labels("test")) if cond else None,
            p_uncond=args.p_uncond if cond else 0.0,
        )
    elif args.what == "moons":
        torch.manual_seed(args.seed)
        model = MoonsMLP(**arch)
        train_diffusion(
            "moons",
            model,
            moons_data(100_000, seed=args.seed),
            moons_data(4096, seed=10_000 + args.seed),
            args,
        )


if __name__ == "__main__":
    main()
