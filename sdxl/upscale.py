"""Model upscalers for the hires fix: the baked R-ESRGAN 4x+ Anime6B and any `upscaler_model` spandrel loads.

    upscalers = Upscalers(weights_dir, device)          # nothing loaded until the first request that needs one
    model = upscalers.baked()                            # or upscalers.user(fetched_file)
    images = upscale_to(model, images, (2048, 2048))     # model's 4x in tiles, then Lanczos to the hires size

A1111's hires fix with an ESRGAN upscaler decodes the first pass, upscales the image with the model (by its own
scale, 4x), resizes that to the hires size with Lanczos and encodes it for the second pass; predict.py's hires fix
does the same. Models are read from safetensors only (spandrel would unpickle .pth files and run TorchScript .pt
files): the baked .pth is converted once by script/download_weights with torch.load(weights_only=True), and a
user's file is refused unless it is safetensors that spandrel builds into a 3-channel super-resolution model
(describe_upscaler, weights.py's key check for the "upscaler" kind, before anything is cached).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

from PIL import Image

if TYPE_CHECKING:
    import torch

    import weights

logger = logging.getLogger(__name__)

INPUT = "upscaler_model"
UPSCALER_DIR = "upscalers"  # in WEIGHTS_DIR
ESRGAN_FILE = "RealESRGAN_x4plus_anime_6B.safetensors"
ESRGAN_TITLE = "R-ESRGAN 4x+ Anime6B"  # A1111's name for this model (modules/realesrgan_model.py's model list)
# The baked model's source: the official Real-ESRGAN release asset (xinntao/Real-ESRGAN v0.2.2.4; repository
# licence BSD-3-Clause). Size and sha256 as public download scripts and manifests pin them for that release URL
# (several independent projects agree on both; re-checked 2027-01 with the search tools, see docs/components.md 2.2).
# script/download_weights fetches it, verifies both, converts the pickle's `params_ema` tensors to safetensors
# with torch.load(weights_only=True) and records the sha256 of what it wrote in MANIFEST.json.
UPSCALER_SOURCE = {
    "folder": UPSCALER_DIR,
    "url": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
    "file": "RealESRGAN_x4plus_anime_6B.pth",
    "size": 17_938_799,
    "sha256": "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
    "dest": ESRGAN_FILE,
    "state_key": "params_ema",  # the release pickle holds {"params_ema": state_dict}
}
# hires_upscaler -> A1111's "Hires upscaler" name (a user model is written under its own name).
A1111_NAMES = {"latent": "Latent", "lanczos": "Lanczos", "esrgan": ESRGAN_TITLE}
# Tiles of the input image: A1111 runs ESRGAN in 192 px tiles with 8 px overlap; larger tiles are faster on a GPU
# and a wider overlap hides the seams of models with a large receptive field. Each tile's output is blended into
# its neighbours with linear ramps over the overlap.
TILE = 512
TILE_OVERLAP = 32
MIN_SCALE, MAX_SCALE = 2, 8  # a 1x model (denoiser, colouriser) is no upscaler


class UpscalerError(ValueError):
    """An upscaler that cannot be used; the message names the input."""


# --- spandrel ------------------------------------------------------------------------------------------------
def spandrel_module():
    """spandrel, imported once. Its package imports every architecture it knows, and two of them (LaMa inpainting,
    RestoreFormer face restoration, neither an upscaler we load) import torchvision at import time. The Cog image
    has the torchvision wheel of its CUDA torch; PyPI's torchvision cannot load beside the CPU torch wheel of the
    test venv ('operator torchvision::nms does not exist', and then transformers' image processors fail too), so
    script/setup leaves it out there. Without torchvision, those two modules get the three names they import
    (raising if ever called) while spandrel imports, and the stand-ins leave sys.modules right after, so that
    nothing else sees a torchvision."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("torchvision") is not None:
        import spandrel

        return spandrel
    with _torchvision_names():
        import spandrel
    return spandrel


@contextlib.contextmanager
def _torchvision_names() -> Iterator[None]:
    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed (spandrel's LaMa/RestoreFormer need it; upscalers do not)")

    import enum

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    stand_ins = {"torchvision": root, "torchvision.transforms": transforms,
                 "torchvision.transforms.functional": functional}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _build(state: Mapping[str, Any]):
    """spandrel's descriptor for a state dict, or a text saying what the file is instead."""
    spandrel = spandrel_module()
    try:
        return spandrel.ModelLoader().load_from_state_dict(dict(state))
    except spandrel.UnsupportedModelError:
        keys = ", ".join(repr(k[:40]) for k in sorted(state)[:3])
        return f"no architecture spandrel {spandrel.__version__} knows (keys like {keys})"
    except Exception as err:  # noqa: BLE001 - a detected architecture whose shapes do not fit it
        return f"a file spandrel cannot build ({type(err).__name__}: {str(err)[:160]})"


def _refusal(model) -> Optional[str]:
    """Why a built descriptor is no hires upscaler, or None."""
    spandrel = spandrel_module()
    arch = model.architecture.name if hasattr(model, "architecture") else type(model).__name__
    if not isinstance(model, spandrel.ImageModelDescriptor):
        return f"a {arch} model that needs more than an image (e.g. an inpainting mask)"
    if model.purpose != "SR":
        return f"a {arch} {model.purpose} model, not super-resolution"
    if (model.input_channels, model.output_channels) != (3, 3):
        return f"a {arch} model of {model.input_channels} -> {model.output_channels} channels (expected RGB, 3 -> 3)"
    if not MIN_SCALE <= model.scale <= MAX_SCALE:
        return f"a {arch} model of scale {model.scale}x (expected {MIN_SCALE}x to {MAX_SCALE}x)"
    return None


def describe_upscaler(header: Mapping[str, Any]) -> Optional[str]:
    """None when spandrel builds the file of this safetensors header into an RGB super-resolution model of 2x-8x;
    else what the file is. Built from zero tensors of the header's shapes and dtypes (the values were checked
    already), so that the refusal comes before anything is cached."""
    import torch

    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            return f"a tensor of dtype {info.get('dtype')!r} ({name[:60]!r}), which no upscaler has"
        state[name] = torch.zeros(info["shape"], dtype=getattr(torch, dtype))
    built = _build(state)
    return built if isinstance(built, str) else _refusal(built)


# --- loading -------------------------------------------------------------------------------------------------
@dataclass
class Upscaler:
    title: str  # A1111's "Hires upscaler" value
    model: Any  # spandrel ImageModelDescriptor, on its device in its dtype
    key: str  # what it was loaded from (a file's canonical id and sha256, or the baked file)

    @property
    def scale(self) -> int:
        return int(self.model.scale)


def run_dtype(model, device: "torch.device"):
    """Half precision on CUDA where the architecture supports it (RealESRGAN does), float32 elsewhere."""
    import torch

    if device.type != "cuda":
        return torch.float32
    if model.supports_half:
        return torch.float16
    return torch.bfloat16 if model.supports_bfloat16 else torch.float32


def load_upscaler(path: Path, device: "torch.device", *, title: str, key: str, input_name: str = INPUT) -> Upscaler:
    """The upscaler in a safetensors file (never a pickle), checked as describe_upscaler checks a header."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise UpscalerError(f"{input_name}: expected a .safetensors upscaler, got {path.name} (pickles are never "
                            "loaded: loading one can run code)")
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a corrupt file
        raise UpscalerError(f"{input_name}: {title} does not read as safetensors ({type(err).__name__}: "
                            f"{str(err)[:160]})") from err
    built = _build(state)
    problem = built if isinstance(built, str) else _refusal(built)
    if problem:
        raise UpscalerError(f"{input_name}: {title} is not an upscaler spandrel can run: expected an RGB "
                            f"super-resolution model (ESRGAN, RealESRGAN, SwinIR, HAT, ...), got {problem}")
    model = built.to(device).eval()
    model = model.to(run_dtype(model, device))
    return Upscaler(title=title, model=model, key=key)


def title_of(file: "weights.LoraFile") -> str:
    """A user model's name in the metadata: its file name without extension (A1111 lists upscalers so)."""
    name = file.file_name or file.ref.display.rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if name.lower().endswith((".safetensors", ".pth", ".pt")) else name
    return stem.replace(",", " ").replace(":", " ")[:80] or "upscaler"


class Upscalers:
    """The baked upscaler and the last user upscaler, loaded on first use and kept."""

    def __init__(self, weights_dir: Path, device: "torch.device") -> None:
        self.weights_dir = weights_dir
        self.device = device
        self._baked: Optional[Upscaler] = None
        self._user: Optional[Upscaler] = None

    @property
    def baked_path(self) -> Path:
        return self.weights_dir / UPSCALER_DIR / ESRGAN_FILE

    def baked(self) -> Upscaler:
        if self._baked is None:
            if not self.baked_path.is_file():
                raise UpscalerError(f"hires_upscaler: the baked {ESRGAN_TITLE} model is not in {self.baked_path}; "
                                    "run `script/download_weights --only upscaler` before `cog build`")
            started = time.perf_counter()
            self._baked = load_upscaler(self.baked_path, self.device, title=ESRGAN_TITLE, key="baked",
                                        input_name="hires_upscaler")
            logger.info("loaded %s in %.2fs", ESRGAN_TITLE, time.perf_counter() - started)
        return self._baked

    def user(self, file: "weights.LoraFile") -> Upscaler:
        """The fetched `upscaler_model`; the previous user model goes before the next is loaded."""
        key = f"{file.ref.canonical_id}:{file.sha256}"
        if self._user is None or self._user.key != key:
            self._user = None
            started = time.perf_counter()
            self._user = load_upscaler(file.path, self.device, title=title_of(file), key=key)
            logger.info("loaded upscaler %s (%s %dx) in %.2fs", file.ref.display, self._user.model.architecture.name,
                        self._user.scale, time.perf_counter() - started)
        return self._user


# --- running -------------------------------------------------------------------------------------------------
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` px covering `length` with at least `overlap` px shared by neighbours."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1)
    return [round(i * step) for i in range(count)]


def count_tiles(upscaler: Upscaler, size: tuple[int, int], tile: int = TILE, overlap: int = TILE_OVERLAP) -> int:
    if not _tiled(upscaler):
        return 1
    return len(tile_starts(size[0], tile, overlap)) * len(tile_starts(size[1], tile, overlap))


def _tiled(upscaler: Upscaler) -> bool:
    spandrel = spandrel_module()
    return upscaler.model.tiling == spandrel.ModelTiling.SUPPORTED


def upscale_image(upscaler: Upscaler, image: Image.Image, *, tile: int = TILE, overlap: int = TILE_OVERLAP,
                  progress=None) -> Image.Image:
    """`image` upscaled by the model's own scale, in overlapping tiles blended linearly (one pass for models
    that tile internally or should not be tiled)."""
    import numpy as np
    import torch

    from sdxl.tiled_vae import ramp

    model = upscaler.model
    scale = upscaler.scale
    param = next(model.model.parameters())
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1).unsqueeze(0).to(param.device, param.dtype)
    _, _, h, w = x.shape
    with torch.inference_mode():
        if not _tiled(upscaler) or (h <= tile and w <= tile):
            out = model(x).float()
            if progress is not None:
                progress.update()
        else:
            out = torch.zeros(1, 3, h * scale, w * scale, device=param.device)
            weight = torch.zeros(1, 1, h * scale, w * scale, device=param.device)
            ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
            for i, y0 in enumerate(ys):
                for j, x0 in enumerate(xs):
                    y1, x1 = min(h, y0 + tile), min(w, x0 + tile)
                    up = model(x[..., y0:y1, x0:x1]).float()
                    # Ramps only where a neighbour overlaps, as wide as the overlap actually is.
                    top = (ys[i - 1] + tile - y0) * scale if i else 0
                    bottom = (y1 - ys[i + 1]) * scale if i + 1 < len(ys) else 0
                    left = (xs[j - 1] + tile - x0) * scale if j else 0
                    right = (x1 - xs[j + 1]) * scale if j + 1 < len(xs) else 0
                    mask = (ramp(up.shape[-2], top, bottom, up.device)[:, None] *
                            ramp(up.shape[-1], left, right, up.device)[None, :])
                    out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] += up * mask
                    weight[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] += mask
                    if progress is not None:
                        progress.update()
            out = out / weight
    pixels = (out.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(pixels)


def upscale_to(upscaler: Upscaler, images: list[Image.Image], size: tuple[int, int], *,
               tile: int = TILE, overlap: int = TILE_OVERLAP) -> list[Image.Image]:
    """A1111's hires fix with a model upscaler: the model's own scale (repeated while still below the hires size,
    as A1111 does for 2x models), then Lanczos to exactly `size`."""
    from sdxl.progress import Progress

    started = time.perf_counter()
    passes = 1
    while images and max(images[0].width, images[0].height) * upscaler.scale ** passes < max(size):
        passes += 1
    total = 0
    width, height = images[0].size if images else (0, 0)
    for _ in range(passes):
        total += count_tiles(upscaler, (height, width), tile, overlap) * len(images)
        width, height = width * upscaler.scale, height * upscaler.scale
    progress = Progress(f"upscale ({upscaler.title})", total)
    out = []
    for image in images:
        for _ in range(passes):
            image = upscale_image(upscaler, image, tile=tile, overlap=overlap, progress=progress)
        out.append(image.resize(size, Image.Resampling.LANCZOS))
    logger.info("upscaled %d images with %s (%dx, %d pass%s) to %dx%d in %.2fs", len(images), upscaler.title,
                upscaler.scale, passes, "" if passes == 1 else "es", *size, time.perf_counter() - started)
    return out
