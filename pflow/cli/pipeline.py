"""``--diffusers DIR``: ``pflow sample``, ``roundtrip`` and ``bench`` on a local diffusers
pipeline folder (one written by ``save_pretrained``, or a downloaded snapshot).

The folder is read with ``DiffusionPipeline.from_pretrained(DIR, local_files_only=True)``
(:func:`pflow.integrations.diffusers.load_pipeline`: nothing is fetched). Two kinds of
pipeline run:

* text-to-image UNet pipelines with a VAE (Stable Diffusion 1.x/2.x: ``text_encoder``,
  ``tokenizer``, ``unet``, ``vae``, ``scheduler``), which need ``--prompt`` and take
  ``--negative-prompt``, ``--guidance`` (default: the pipeline's own ``guidance_scale``,
  7.5 for Stable Diffusion; ``roundtrip``: 1) and ``--guidance-rescale``;
* unconditional pixel-space UNet pipelines (``DDPMPipeline``, ``DDIMPipeline``: ``unet``,
  ``scheduler``), which take no prompt.

The model is the pipeline's UNet on its scheduler config's schedule
(:func:`~pflow.integrations.diffusers.from_unet`), conditioned on the prompt's
embeddings with the pipeline's classifier-free guidance
(:func:`~pflow.integrations.diffusers.pipeline_model`); fixed-step grids follow the
scheduler config (spacing, ``steps_offset``, the end at 0 or at the first training step)
unless ``--spacing`` says otherwise.

* ``sample``: the noise is the pipeline's own draw (``torch.randn`` of the latent shape
  from ``torch.Generator().manual_seed(seed)`` on the CPU, in the UNet's dtype), so
  ``--seed s`` gives the images ``pipe(prompt, num_images_per_prompt=n,
  generator=torch.Generator().manual_seed(s))`` would start from. ``--out x.png`` writes
  one PNG for one image, else ``x_000.png``, ``x_001.png``, ...; ``.npy`` holds the images
  as the pipeline's ``output_type="np"`` gives them (``(n, H, W, C)`` float32 in
  ``[0, 1]``); ``.pt`` a dict of those ``images`` and the ``latents`` the VAE decoded.
  ``--batch-size`` solves the images in chunks of the same noise.
* ``roundtrip --image in.png``: the VAE's latent of the image (its mean), ``pflow
  encode`` up, ``pflow decode`` down on the same grid (``alf`` hands its companion over:
  exact), the VAE. It prints the latent round-trip error, the PSNR of the decoded image
  against the VAE's own decode of the image's latent (the ODE's part) and against the
  input; ``--out`` writes the reconstructed image.
* ``bench``: the benchmark of :mod:`pflow.bench` on the pipeline's guided UNet in latent
  space, unchanged: the model is registered as a bundled model (``shape``: the latent
  shape) for the run. Rows and diffusers peers drive the same guided network from the
  same keyed noise against a float64 reference (``--ref-tol``, default 1e-7). Peers need
  an ``eps``: under guidance (``--guidance`` > 1) they drive the guided ``eps``
  (:meth:`pflow.Guided.as_network`) whatever the UNet's prediction type; an unguided
  v- or x0-prediction UNet gets no peers (``--peers auto``), and named ones are refused.
  One guidance scale per run.

Everything the command line decides (flags, solver labels, ``--out``, the folder's
``model_index.json`` and what the pipeline is conditioned on) is checked before any
weight is loaded; failures are one line (:mod:`pflow.cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .args import (
    CommandError,
    Interrupted,
    UsageError,
    check_direction,
    check_input,
    check_out,
    check_tolerances,
    one_line,
    positive_int,
    solver_label,
    write_atomic,
)

__all__ = [
    "Loaded",
    "PipelineFolder",
    "add_diffusers_args",
    "bench_command",
    "check_flags",
    "read_folder",
    "roundtrip_command",
    "sample_command",
]

_IMAGE_SUFFIXES = (".png", ".npy", ".pt")
_INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Fixed-step solvers' steps with ``--diffusers`` (diffusers' ``num_inference_steps``).
DEFAULT_STEPS = 50
#: rtol = atol of the float64 reference of ``bench --diffusers`` (``--ref-tol``).
REF_TOL = 1e-7
#: ``bench --diffusers`` samples unless ``--samples`` says otherwise.
BENCH_SAMPLES = 8
_DIFFUSERS_ONLY = (
    ("--prompt", "prompt"),
    ("--negative-prompt", "negative_prompt"),
    ("--height", "height"),
    ("--width", "width"),
    ("--image", "image"),
)


# ---------------------------------------------------------------- arguments
def add_diffusers_args(
    p: argparse.ArgumentParser, *, size: bool = True, image: bool = False
) -> None:
    """``--diffusers``, ``--prompt``, ``--negative-prompt`` and, with ``size``,
    ``--height``/``--width``; with ``image``, ``--image``."""
    g = p.add_argument_group("a diffusers pipeline (instead of --model)")
    g.add_argument(
        "--diffusers",
        metavar="DIR",
        default=None,
        help="a local diffusers pipeline folder (with model_index.json; loaded with "
        "local_files_only): Stable Diffusion 1.x/2.x or an unconditional DDPM/DDIM pipeline",
    )
    g.add_argument("--prompt", default=None, help="the prompt of a text-to-image pipeline")
    g.add_argument("--negative-prompt", default=None, help="its negative prompt (default: '')")
    if size:
        g.add_argument("--height", type=positive_int, default=None, help="image height in pixels")
        g.add_argument("--width", type=positive_int, default=None, help="image width in pixels")
    if image:
        g.add_argument("--image", default=None, help="the image to invert (PNG, JPEG, ...)")


def check_flags(args: argparse.Namespace) -> bool:
    """Whether ``args`` run a diffusers pipeline (``--diffusers``); one-line
    :class:`UsageError` for the flags that go only with it, or only without it."""
    if args.diffusers is None:
        for flag, dest in _DIFFUSERS_ONLY:
            if getattr(args, dest, None) is not None:
                raise UsageError(f"argument {flag}: needs --diffusers DIR (a pipeline folder)")
        return False
    if getattr(args, "model", None) is not None:
        raise UsageError(
            "argument --diffusers: not allowed with --model (the pipeline's own UNet is the "
            "model); give one of them"
        )
    if getattr(args, "label", None) is not None:
        raise UsageError("argument --label: a diffusers pipeline takes --prompt, not class labels")
    if getattr(args, "guidance_interval", None) is not None:
        raise UsageError(
            "argument --guidance-interval: not available with --diffusers (the pipeline's "
            "guidance applies at every sigma)"
        )
    if getattr(args, "compile", False):
        raise UsageError("argument --compile: not available with --diffusers")
    return True


# ---------------------------------------------------------------- the folder
def _present(entry: Any) -> bool:
    """A ``model_index.json`` component that is there (``["diffusers", "UNet2DModel"]``),
    not an optional one left out (``[null, null]``) or a plain setting."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


@dataclass(frozen=True)
class PipelineFolder:
    """A pipeline folder as its ``model_index.json`` describes it (nothing loaded)."""

    path: Path
    text: str
    class_name: str
    components: dict[str, Any] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        """Whether the pipeline is text-conditioned (it has a text encoder)."""
        return "text_encoder" in self.components or "tokenizer" in self.components

    def describe(self) -> str:
        return f"{self.class_name} in {self.text}"


def read_folder(text: str, flag: str = "--diffusers") -> PipelineFolder:
    """``text`` as a pipeline folder the command line can run, from its
    ``model_index.json`` alone; a one-line :class:`UsageError` naming the folder otherwise
    (no folder, no ``model_index.json``, a pipeline of another kind)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise UsageError(f"argument {flag}: {text} does not exist")
    if not path.is_dir():
        raise UsageError(
            f"argument {flag}: {text} is a file; expected a diffusers pipeline folder "
            "(with model_index.json)"
        )
    index = path / "model_index.json"
    if not index.is_file():
        hint = ""
        if (path / "config.json").is_file() or (path / "scheduler_config.json").is_file():
            hint = " (it holds one component of a pipeline: give the folder above it)"
        raise UsageError(
            f"argument {flag}: {text} is not a diffusers pipeline folder: it has no "
            f"model_index.json{hint}"
        )
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(
            f"argument {flag}: {index} cannot be read as JSON: {one_line(exc, 200)}"
        ) from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str):
        raise UsageError(f"argument {flag}: {index} names no pipeline class (_class_name)")
    folder = PipelineFolder(
        path, text, name, {k: v for k, v in data.items() if not k.startswith("_") and _present(v)}
    )
    has = folder.components
    python = "build its model with pflow.integrations.diffusers.from_unet in Python"
    if "unet" not in has or "scheduler" not in has:
        what = "a transformer denoiser" if "transformer" in has else "no unet and scheduler"
        raise UsageError(
            f"argument {flag}: {folder.describe()} has {what}; the command line runs UNet "
            f"pipelines (Stable Diffusion 1.x/2.x, DDPM, DDIM): {python}"
        )
    if "text_encoder_2" in has:
        raise UsageError(
            f"argument {flag}: {folder.describe()} has two text encoders (SDXL-style pooled "
            f"embeddings), which the command line does not condition yet: {python}"
        )
    if folder.conditional and "vae" not in has:
        raise UsageError(
            f"argument {flag}: {folder.describe()} has a text encoder but no vae; the "
            f"command line runs latent text-to-image pipelines (Stable Diffusion): {python}"
        )
    if not folder.conditional and ("vae" in has or "vqvae" in has):
        raise UsageError(
            f"argument {flag}: {folder.describe()} is an unconditional latent pipeline, "
            f"which the command line does not decode: {python}"
        )
    return folder


def check_prompts(folder: PipelineFolder, args: argparse.Namespace) -> None:
    """``--prompt`` for a text pipeline; no prompt or guidance for an unconditional one."""
    if folder.conditional:
        if args.prompt is None:
            raise UsageError(
                f"argument --prompt: {folder.describe()} is text-conditioned; give --prompt "
                "(--prompt '' for the empty prompt)"
            )
        return
    given = [
        ("--prompt", args.prompt is not None),
        ("--negative-prompt", args.negative_prompt is not None),
        ("--guidance", args.guidance is not None),
        ("--guidance-rescale", bool(args.guidance_rescale)),
    ]
    for flag, is_set in given:
        if is_set:
            raise UsageError(
                f"argument {flag}: {folder.describe()} is unconditional and takes no prompt "
                "or guidance"
            )


# ---------------------------------------------------------------- the loaded pipeline


@dataclass
class Loaded:
    """A loaded pipeline and what the commands ask of it."""

    folder: PipelineFolder
    pipe: Any

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def factor(self) -> int:
        """Pixels per latent pixel: the VAE's scale factor (1 in pixel space)."""
        return int(getattr(self.pipe, "vae_scale_factor", 8)) if self.folder.conditional else 1

    def default_guidance(self) -> float:
        """The pipeline's own ``guidance_scale`` default (7.5 when it says none)."""
        import inspect

        param = inspect.signature(self.pipe.__call__).parameters.get("guidance_scale")
        default = getattr(param, "default", inspect.Parameter.empty)
        return float(default) if isinstance(default, (int, float)) else 7.5

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, ...]:
        """The shape of one latent ``(C, H / f, W / f)`` for images ``height x width``
        (default: the UNet's ``sample_size`` times the VAE's factor ``f``)."""
        size = self.unet.config.sample_size
        h0, w0 = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        f = self.factor
        dims = []
        for flag, given, default in (("--height", height, h0 * f), ("--width", width, w0 * f)):
            value = default if given is None else given
            if value % f:
                raise UsageError(
                    f"argument {flag}: {value} is not a multiple of {f}, the VAE's scale factor"
                )
            dims.append(value // f)
        return (int(self.unet.config.in_channels), *dims)

    def noise(self, n: int, seed: int, shape: tuple[int, ...]) -> Any:
        """``x_T``: the pipeline's own draw for ``n`` images from
        ``torch.Generator().manual_seed(seed)`` (diffusers' ``randn_tensor`` with a CPU
        generator: one ``torch.randn`` of the whole batch, in the UNet's dtype)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randn((n, *shape), generator=g, dtype=self.unet.dtype)

    def model(
        self, prompt: str | None, negative: str | None, guidance: float, rescale: float
    ) -> Any:
        """The ODE's model: the guided UNet on the prompt's embeddings (one row shared by
        all samples), or the unconditional UNet."""
        import torch

        from ..integrations.diffusers import from_unet, pipeline_model

        with torch.no_grad():
            if not self.folder.conditional:
                return from_unet(self.unet, self.pipe.scheduler)
            return pipeline_model(
                self.pipe,
                prompt,
                negative_prompt=negative,
                guidance_scale=guidance,
                guidance_rescale=rescale,
            )

    def grid(self, spacing: str | None, *, to_zero: bool | None = None) -> dict[str, Any]:
        """The grid keywords (:func:`~pflow.integrations.diffusers.pipeline_grid`)."""
        from ..integrations.diffusers import pipeline_grid

        return pipeline_grid(self.pipe, spacing=spacing, set_alpha_to_one=to_zero)

    def state(self, x: Any) -> Any:
        """``x`` on the pipeline's device in the state's dtype (float32 for a half UNet)."""
        import torch

        dtype = self.unet.dtype
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        return x.to(self.pipe.device, dtype)

    def to_images(self, x: Any) -> Any:
        """Latents (or pixels) to images as ``output_type="np"`` gives them: ``(n, H, W,
        C)`` float32 in ``[0, 1]``."""
        import torch

        from ..integrations.diffusers import decode_latents

        with torch.no_grad():
            if self.folder.conditional:
                return decode_latents(self.pipe, x, "np")
            return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy()


def load(folder: PipelineFolder, device: str = "cpu", dtype: str | None = None) -> Loaded:
    """The pipeline of ``folder`` on ``device`` (weights in ``dtype``), gradients off; a
    one-line :class:`CommandError` naming the folder when it fails to load."""
    import torch

    from ..integrations.diffusers import load_pipeline

    torch_dtype = None if dtype is None else getattr(torch, dtype)
    try:
        pipe = load_pipeline(folder.path, device=device, torch_dtype=torch_dtype)
    except Exception as exc:  # a broken folder may raise anything
        raise CommandError(
            f"argument --diffusers: {folder.describe()} failed to load: {one_line(exc, 400)}"
        ) from exc
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return Loaded(folder, pipe)


def _conditioning_words(
    folder: PipelineFolder, prompt: str | None, negative: str | None, w: float, rescale: float
) -> str:
    if not folder.conditional:
        return ""
    text = f", prompt {prompt!r}"
    if negative:
        text += f", negative prompt {negative!r}"
    text += f", guidance {w:g}"
    if rescale:
        text += f", rescale {rescale:g}"
    return text


def _guidance(loaded: Loaded, given: float | None) -> float:
    if not loaded.folder.conditional:
        return 1.0
    return loaded.default_guidance() if given is None else float(given)


def _grid_words(solver: Any, label: str, steps: int | None, spacing: str, tol: str = "") -> str:
    if solver.adaptive:
        return f"{label}{tol}"
    return f"{label}, {steps} {spacing} steps"


# ---------------------------------------------------------------- images
def write_images(out: Path, images: Any, latents: Any) -> list[Path]:
    """``images`` (``(n, H, W, C)`` float32 in ``[0, 1]``) to ``out``: PNG (one file for
    one image, else ``<stem>_000.png``, ...), ``.npy`` (the array) or ``.pt`` (the images
    and the latents). Each file is written atomically; the paths written."""
    import numpy as np
    import torch

    suffix = out.suffix.lower()
    if suffix == ".npy":
        write_atomic(out, lambda p: np.save(p, images))
        return [out]
    if suffix == ".pt":
        record = {"images": torch.from_numpy(np.ascontiguousarray(images)), "latents": latents}
        write_atomic(out, lambda p: torch.save(record, p))
        return [out]
    from PIL import Image

    pixels = (images * 255).round().astype("uint8")  # as diffusers' numpy_to_pil
    paths = (
        [out]
        if len(pixels) == 1
        else [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(len(pixels))]
    )
    for path, arr in zip(paths, pixels):
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
        write_atomic(path, lambda p, arr=arr: Image.fromarray(arr).save(p, format="PNG"))
    return paths


def _written(paths: list[Path]) -> str:
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0]} ... {paths[-1].name} ({len(paths)} files)"


# ---------------------------------------------------------------- sample
def sample_command(args: argparse.Namespace) -> int:
    """``pflow sample --diffusers DIR``."""
    import torch

    from ..bench import check_label
    from ..integrations.diffusers import sample_pipeline
    from ..noise import noise_keys
    from ..solve import sample

    spec, options = solver_label(args.solver, "--solver")
    check_direction(spec, args.solver, "down", "--solver", "sample")
    tolerances = check_tolerances(
        spec, options, args.solver, "--solver", rtol=args.rtol, atol=args.atol
    )
    check_label(spec, options, args.solver, sweep_tols=False)  # noise is keyed by --seed
    for flag, value in (("--samples", args.n), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"argument {flag}: expected an integer >= 1, got {value}")
    if args.max_nfe is not None and args.max_nfe < 1:
        raise UsageError(f"argument --max-nfe: expected an integer >= 1, got {args.max_nfe}")
    out = check_out(args.out, "--out", suffixes=_IMAGE_SUFFIXES)
    folder = read_folder(args.diffusers)
    check_prompts(folder, args)
    n = args.n or 1
    steps = None if spec.adaptive else (args.steps or DEFAULT_STEPS)
    loaded = load(folder, args.device, args.net_dtype)
    w = _guidance(loaded, args.guidance)
    shape = loaded.latent_shape(args.height, args.width)
    noise = loaded.noise(n, args.seed, shape)
    grid = loaded.grid(args.spacing)
    chunk = min(args.batch_size or n, n)
    plain = None if folder.conditional else loaded.model(None, None, 1.0, 0.0)
    images: list[Any] = []
    latents: list[Any] = []
    nfe = rows = 0
    t0 = time.perf_counter()
    try:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            kw: dict[str, Any] = {}
            if spec.stochastic:
                kw["seed"] = noise_keys(args.seed, torch.arange(start, stop, dtype=torch.int64))
            if folder.conditional:
                res = sample_pipeline(
                    loaded.pipe,
                    args.prompt,
                    negative_prompt=args.negative_prompt,
                    guidance_scale=w,
                    guidance_rescale=args.guidance_rescale,
                    num_images_per_prompt=stop - start,
                    latents=noise[start:stop],
                    solver=args.solver,
                    steps=steps,
                    spacing=args.spacing,
                    max_nfe=args.max_nfe,
                    output_type="np",
                    **tolerances,
                    **kw,
                )
                x, n_eval, n_rows, imgs = res.latents, res.nfe, res.rows, res.images
            else:
                with torch.no_grad():
                    solved = sample(
                        plain,
                        loaded.state(noise[start:stop]),
                        args.solver,
                        steps=steps,
                        max_nfe=args.max_nfe,
                        **grid,
                        **tolerances,
                        **kw,
                    )
                x, n_eval, n_rows = solved.x, solved.nfe, solved.rows
                imgs = loaded.to_images(x)
            images.append(imgs)
            latents.append(x.cpu())
            nfe, rows = max(nfe, n_eval), rows + n_rows
    except KeyboardInterrupt:
        if not images:
            raise Interrupted("no chunk had finished; nothing written") from None
        import numpy as np

        done = np.concatenate(images)
        paths = write_images(out, done, torch.cat(latents))
        raise Interrupted(
            f"wrote the {len(done)} finished images (0-{len(done) - 1}) of {n} to {_written(paths)}"
        ) from None
    wall = time.perf_counter() - t0
    import numpy as np

    paths = write_images(out, np.concatenate(images), torch.cat(latents))
    what = _conditioning_words(folder, args.prompt, args.negative_prompt, w, args.guidance_rescale)
    tol = "".join(f", {k} {v:g}" for k, v in tolerances.items())
    setting = _grid_words(spec, args.solver, steps, grid["spacing"], tol)
    noun = "image" if n == 1 else "images"
    print(
        f"{n} {noun} from {folder.describe()} with {setting}{what}: NFE {nfe} "
        f"({rows / n:.4g} network rows per image), {wall:.2f}s; written to {_written(paths)}"
    )
    return 0


# ---------------------------------------------------------------- roundtrip
@dataclass
class PipelineRoundTrip:
    """One round trip of the image through the pipeline's latent: the latent error and
    the PSNR of the decoded image against the VAE's decode of the image latent (``nan``
    in pixel space) and against the input (``inf``: equal)."""

    solver: str
    setting: str
    nfe_encode: int
    nfe_decode: int
    latent_rmse: float
    latent_max_abs: float
    exact: bool
    psnr_vae: float
    psnr_input: float


def _psnr(a: Any, b: Any) -> float:
    """PSNR in dB of images in ``[0, 1]`` (peak 1), ``inf`` when equal."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else -10.0 * math.log10(mse)


def _read_image(loaded: Loaded, path: Path) -> tuple[Any, Any]:
    """The image as the pipeline takes it (a PIL image for a VAE pipeline, whose image
    processor rounds the size down to the VAE's factor; ``(1, C, H, W)`` in ``[-1, 1]``
    in pixel space) and as ``(1, H, W, C)`` in ``[0, 1]``, as the pipeline sees it, for
    the PSNR."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    channels = 3 if loaded.folder.conditional else int(loaded.unet.config.in_channels)
    if channels not in (1, 3):
        raise UsageError(f"argument --image: the pipeline's images have {channels} channels")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CommandError(
            f"argument --image: {path} cannot be read as an image: {one_line(exc, 200)}"
        ) from None
    if loaded.folder.conditional:
        pixels = loaded.pipe.image_processor.preprocess(img)
        given: Any = img
    else:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        pixels = given = torch.from_numpy(arr / 127.5 - 1.0)[None]
    reference = (pixels.double() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return given, reference


def roundtrip_command(args: argparse.Namespace) -> int:
    """``pflow roundtrip --diffusers DIR --image in.png``."""
    import torch

    from ..bench import check_label
    from ..integrations.diffusers import invert_pipeline, reconstruct
    from ..inversion import decode, encode
    from .encode import DECODE_PARTNERS

    if args.image is None:
        raise UsageError("argument --image: roundtrip --diffusers needs --image (the image)")
    if args.peers:
        raise UsageError(
            "argument --peers: not available with --diffusers (--solvers ddim_inverse is "
            "diffusers' DDIMInverseScheduler and DDIMScheduler pair)"
        )
    solvers = args.solvers or ["alf"]
    settings: list[tuple[str, str, dict[str, Any]]] = []
    for label in solvers:
        spec, options = solver_label(label, "--solvers")
        check_direction(spec, label, "up", "--solvers", "roundtrip")
        partner = DECODE_PARTNERS.get(label.partition("[")[0].strip(), label)
        down = spec if partner == label else solver_label(partner, "--solvers")[0]
        check_direction(down, partner, "down", "--solvers", "roundtrip")
        check_label(spec, options, label)
        if spec.adaptive:
            settings += [(label, f"tol {t:g}", {"rtol": t, "atol": t}) for t in args.tols]
        else:
            steps = args.steps or [DEFAULT_STEPS]
            settings += [(label, f"{s} steps", {"steps": s}) for s in steps]
    out = None
    if args.out is not None:
        out = check_out(args.out, "--out", suffixes=_IMAGE_SUFFIXES)
        if len(settings) > 1:
            raise UsageError(
                "argument --out: with --diffusers it is the reconstructed image of one round "
                f"trip; give one solver and one step count (or tolerance), got {len(settings)}"
            )
    image = check_input(args.image, "argument --image", _INPUT_SUFFIXES)
    folder = read_folder(args.diffusers)
    check_prompts(folder, args)
    loaded = load(folder, "cpu", None if args.dtype == "float32" else args.dtype)
    w = 1.0 if args.guidance is None else float(args.guidance)
    if not folder.conditional:
        w = 1.0
    pixels, reference = _read_image(loaded, image)
    text = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "guidance_scale": w,
        "guidance_rescale": args.guidance_rescale,
    }
    grid = loaded.grid(args.spacing, to_zero=False)
    x0 = None
    model = None
    if not folder.conditional:
        x0 = loaded.state(pixels)
        model = loaded.model(None, None, 1.0, 0.0)
    rows: list[PipelineRoundTrip] = []
    vae = folder.conditional  # a latent pipeline: the VAE's own round trip is a baseline
    vae_image = None
    last: Any = None
    for label, setting, kw in settings:
        spec = solver_label(label, "--solvers")[0]
        partner = DECODE_PARTNERS.get(label.partition("[")[0].strip(), label)
        plan = dict(kw)
        if folder.conditional:
            inv = invert_pipeline(
                loaded.pipe, pixels, solver=label, spacing=args.spacing, **text, **plan
            )
            x0 = inv.image_latents
            rec = reconstruct(
                loaded.pipe,
                inv.latents,
                companion=inv.companion,
                solver=partner,
                spacing=args.spacing,
                output_type="np",
                **text,
                **plan,
            )
            x, nfe_up, nfe_down, rec_image = rec.latents, inv.nfe, rec.nfe, rec.images
        else:
            if spec.adaptive:
                plan["steps"] = None
            with torch.no_grad():
                enc = encode(model, x0, label, **grid, **plan)
                dec = decode(model, enc.x, partner, companion=enc.companion, **grid, **plan)
            x, nfe_up, nfe_down = dec.x, enc.nfe, dec.nfe
            rec_image = loaded.to_images(x)
        if vae and vae_image is None:
            vae_image = loaded.to_images(x0)
        err = (x.double() - x0.double()).flatten()
        rows.append(
            PipelineRoundTrip(
                label,
                setting,
                nfe_up,
                nfe_down,
                float(err.pow(2).mean().sqrt()),
                float(err.abs().max()),
                bool(torch.equal(x, x0)),
                _psnr(rec_image, vae_image) if vae else math.nan,
                _psnr(rec_image, reference),
            )
        )
        last = (rec_image, x)
    space = "latent" if folder.conditional else "pixel"
    shape = tuple(x0.shape[1:]) if x0 is not None else ()
    what = _conditioning_words(folder, args.prompt, args.negative_prompt, w, args.guidance_rescale)
    against = "the VAE's own decode of the image's latent and the input" if vae else "the input"
    print(
        f"pflow roundtrip: {folder.describe()}{what}, image {image.name} "
        f"({reference.shape[2]}x{reference.shape[1]}), {space} {shape}, {args.dtype}, "
        f"{grid['spacing']} grids from the first training step; the {space} error and the "
        f"PSNR (dB) of the decoded image against {against}"
    )
    print(format_rows(rows))
    if out is not None and last is not None:
        paths = write_images(out, last[0], last[1].cpu())
        print(f"reconstructed image written to {_written(paths)}")
    return 0


def format_rows(rows: list[PipelineRoundTrip]) -> str:
    head = (
        f"{'solver':<16} {'setting':<12} {'NFE enc+dec':>12} {'RMSE':>10} {'max |err|':>10} "
        f"{'PSNR vs VAE':>11} {'PSNR vs input':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        max_abs = "0 (exact)" if r.exact else f"{r.latent_max_abs:.2e}"
        vae = "n/a" if math.isnan(r.psnr_vae) else f"{r.psnr_vae:.1f}"
        lines.append(
            f"{r.solver:<16} {r.setting:<12} {f'{r.nfe_encode}+{r.nfe_decode}':>12} "
            f"{r.latent_rmse:>10.3e} {max_abs:>10} {vae:>11} {r.psnr_input:>13.1f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- bench
@contextlib.contextmanager
def registered(name: str, bundle: Any) -> Iterator[None]:
    """``bundle`` as the bundled model ``name`` for the block (what ``pflow.bench`` loads
    by name), unregistered after, so a process running several commands (tests) keeps
    only the bundled names."""
    from ..zoo import registry

    registry.register_model(name, lambda: bundle)
    try:
        yield
    finally:
        registry._FACTORIES.pop(name, None)  # no public unregister: the run is over


def bench_bundle(
    loaded: Loaded,
    prompt: str | None,
    negative: str | None,
    w: float,
    rescale: float,
    height: int | None,
    width: int | None,
) -> Any:
    """The pipeline as a :class:`~pflow.zoo.registry.BundledModel`: ``model`` the guided
    UNet on the prompt's embeddings (or the unconditional UNet), ``shape`` one latent's;
    networks take the Euler step into 0; the reference's tolerance :data:`REF_TOL`."""
    from ..zoo.registry import BundledModel

    folder = loaded.folder
    shape = loaded.latent_shape(height, width)
    model = loaded.model(prompt, negative, w, rescale)
    prediction = loaded.pipe.scheduler.config.get("prediction_type", "epsilon")
    words = _conditioning_words(folder, prompt, negative, w, rescale)
    space = "latents" if folder.conditional else "pixels"
    description = (
        f"{folder.class_name} {folder.path.name} ({prediction}; {space} "
        f"{'x'.join(map(str, shape))}{words})"
    )
    return BundledModel(
        f"diffusers[{folder.path.resolve()}]",
        model,
        shape,
        description,
        last_step="euler",
        ref_tol=REF_TOL,
    )


def bench_command(args: argparse.Namespace, config_kwargs: dict[str, Any]) -> int:
    """``pflow bench --diffusers DIR``: ``config_kwargs`` are the
    :class:`~pflow.bench.BenchConfig` fields the command line gives (all but the model
    and the guidance)."""
    from ..bench import BenchConfig, format_table, run_bench
    from ..distributed import init

    folder = read_folder(args.diffusers)
    scales = args.guidance
    if scales is not None and len(scales) > 1:
        raise UsageError(
            f"argument --guidance: --diffusers benches one guidance scale per run, got "
            f"{len(scales)}; run once per scale (each with its own --out)"
        )
    args.guidance = None if scales is None else scales[0]
    check_prompts(folder, args)
    loaded = load(folder, "cpu", None)  # the bench moves and casts the model itself
    w = _guidance(loaded, args.guidance)
    bundle = bench_bundle(
        loaded, args.prompt, args.negative_prompt, w, args.guidance_rescale, args.height, args.width
    )
    config = BenchConfig(model=bundle.name, **config_kwargs)
    if config.samples is None:
        config.samples = BENCH_SAMPLES
    if config.ref_tol is None:
        config.ref_tol = bundle.ref_tol
    t0 = time.perf_counter()
    world = init(args.device)
    try:
        with registered(bundle.name, bundle):
            rows = run_bench(config, world)
    finally:
        world.close()
    if not world.is_main:
        return 0
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows on {bundle.description}, {config.samples} samples, seed "
        f"{config.seed}, {time.perf_counter() - t0:.1f}s"
        + (f"; written to {config.out}" if config.out else "")
    )
    return 0
