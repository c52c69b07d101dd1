"""Model side of the predictor: model specs, loading, sizes, schedulers, safety checking and image saving.

Everything here is plain functions and data tables that tests call without Cog. LoRA formats and merging live
in sdxl/lora.py and prompt parsing/encoding in sdxl/prompts.py (see the README's architecture section for why).
"""

from __future__ import annotations

import logging
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch is imported where it is used, so that the layout constants import in milliseconds
    import torch

logger = logging.getLogger(__name__)

# --- On-disk layout of WEIGHTS_DIR (script/download_weights and script/tiny_weights.py both write it) ---------
MODEL_DIRS = {"illustrious": "illustrious-xl", "sdxl": "sdxl-base"}
VAE_DIR = "sdxl-vae-fp16-fix"
SAFETY_DIR = "safety-checker"


# --- Model presets, as data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    key: str
    folder: str
    title: str  # as written into image metadata ("Model: ...")
    guidance: float
    steps: int
    scheduler: str
    negative_prompt: str
    quality_tags: str


MODEL_SPECS: dict[str, ModelSpec] = {
    "illustrious": ModelSpec(
        key="illustrious",
        folder=MODEL_DIRS["illustrious"],
        title="Illustrious-XL-v0.1",
        guidance=6.0,
        steps=28,
        scheduler="Euler a",
        negative_prompt="lowres, worst quality, low quality, bad anatomy, bad hands, jpeg artifacts, signature, "
        "watermark, username, blurry",
        quality_tags="masterpiece, best quality, amazing quality, very aesthetic, absurdres",
    ),
    "sdxl": ModelSpec(
        key="sdxl",
        folder=MODEL_DIRS["sdxl"],
        title="stable-diffusion-xl-base-1.0",
        guidance=7.0,
        steps=30,
        scheduler="DPM++ 2M Karras",
        negative_prompt="",
        quality_tags="high quality, detailed, sharp focus",
    ),
}


def model_spec(use_standard_sdxl: bool) -> ModelSpec:
    return MODEL_SPECS["sdxl" if use_standard_sdxl else "illustrious"]


def checkpoint_spec(key: str, title: str) -> ModelSpec:
    """A custom checkpoint (NoobAI, Pony, Illustrious merges, ...): Illustrious' preset under its own key/title."""
    return dataclasses.replace(MODEL_SPECS["illustrious"], key=key, folder="", title=title)


# --- Sizes --------------------------------------------------------------------------------------------------------
# flux-dev-lora's aspect ratios; every 1 MP entry is a standard SDXL training bucket (multiples of 64).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
MEGAPIXELS = {"1": 1.0, "0.25": 0.25}
MIN_SIDE, MAX_SIDE = 256, 2048
MAX_INPUT_PIXELS = 4096 * 4096  # larger inputs are refused before decoding (a 20000x20000 PNG is 1.2 GB of RGB)


class InputError(ValueError):
    """A user input that cannot be used; the message names the input, what was expected and what came."""


class UnloadableFileError(InputError):
    """A fetched weights file that passed the download's checks but does not load: its cache entry is dropped."""


def preset_size(aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    width, height = ASPECT_RATIOS[aspect_ratio]
    if MEGAPIXELS[megapixels] == 0.25:
        return width // 2, height // 2  # halves stay multiples of 8 for every preset
    return width, height


def size_for_image(image_size: tuple[int, int], megapixels: str) -> tuple[int, int]:
    """Output size for img2img/inpainting: the input's aspect ratio at the requested area.

    Sides are multiples of 32 so the latent divides evenly through the UNet's two downsamplings.
    """
    w, h = image_size
    target = MEGAPIXELS[megapixels] * 1024 * 1024
    scale = math.sqrt(target / (w * h))
    width = min(MAX_SIDE, max(MIN_SIDE, int(round(w * scale / 32)) * 32))
    height = min(MAX_SIDE, max(MIN_SIDE, int(round(h * scale / 32)) * 32))
    return width, height


def check_custom_size(width: int | None, height: int | None) -> tuple[int, int]:
    for name, value in (("width", width), ("height", height)):
        if value is None:
            raise InputError(f'{name}: required when aspect_ratio is "custom", got nothing')
        if value % 8 or not MIN_SIDE <= value <= MAX_SIDE:
            raise InputError(f"{name}: expected a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}, got {value}")
    return width, height


# --- Input images -------------------------------------------------------------------------------------------------
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")  # what the README promises; Pillow's other decoders are never run
# Leading bytes of formats people send by mistake, so that a refusal can say what came (never used to decode).
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"GIF8", "GIF"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x01\xda", "SGI"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"%PDF", "PDF"), (b"<svg", "SVG"), (b"qoif", "QOI"), (b"DDS ", "DDS"),
)
# Background that transparent pixels are flattened onto: white for images (A1111's default img2img background
# colour), black for masks (transparent = not painted = kept).
_IMAGE_BACKGROUND, _MASK_BACKGROUND = (255, 255, 255), 0


def _sniff_format(path: str | os.PathLike) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "an unreadable file"
    name = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)
    if name is None and head[4:8] == b"ftyp":
        name = "HEIF/AVIF"
    if name is None and len(head) > 2 and head[0] == 0x0A and head[1] in (0, 2, 3, 4, 5) and head[2] == 1:
        name = "PCX"  # manufacturer byte, version, RLE encoding
    if name is not None:
        return f"a file in {name} format"
    return "a file that is not one" if head else "an empty file"


def open_image(path: str | os.PathLike, input_name: str) -> Image.Image:
    """Open a user image lazily, only as PNG, JPEG or WebP, and refuse others and oversized ones before decoding
    the pixels."""
    try:
        image = Image.open(path, formats=INPUT_FORMATS)
    except Image.DecompressionBombError as err:  # PIL refuses over 2x its own limit before we see the size
        raise InputError(f"{input_name}: expected at most {MAX_INPUT_PIXELS} pixels (4096x4096), got a larger "
                         f"image ({err})") from err
    except (OSError, ValueError) as err:
        raise InputError(f"{input_name}: expected a PNG, JPEG or WebP image, got {_sniff_format(path)}") from err
    w, h = image.size
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"{input_name}: expected at most {MAX_INPUT_PIXELS} pixels (4096x4096), got {w}x{h}")
    return image


def _to_8bit(image: Image.Image, input_name: str) -> Image.Image:
    """16- and 32-bit integer grayscale to 8-bit L by value range (Pillow's convert("L") clips them at 255, so a
    16-bit PNG came out nearly all white); other modes unchanged. Float images cannot come from PNG/JPEG/WebP."""
    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np

        values = np.asarray(image.convert("I") if image.mode != "I" else image, dtype=np.int64)
        # PNG's 16-bit grayscale (Pillow gives "I;16", or "I" in some versions) spans 0..65535.
        scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode == "F":
        raise InputError(f"{input_name}: expected an 8- or 16-bit image, got 32-bit floating point pixels")
    return image


def _flatten(image: Image.Image, input_name: str, mode: str, background) -> Image.Image:
    """`image` in `mode` ("RGB" or "L"), every pixel mode handled by value: 16-bit scaled, 1-bit to 0/255, palette
    through its colours, CMYK through Pillow's conversion, and transparency (alpha, or a palette's or grayscale
    image's transparent colour) flattened onto `background`."""
    try:
        image = ImageOps.exif_transpose(image)
        image = _to_8bit(image, input_name)
        transparent = "A" in image.getbands() or "transparency" in image.info
        if transparent:
            rgba = image.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (*background, 255) if isinstance(background, tuple)
                             else (background, background, background, 255))
            image = Image.alpha_composite(flat, rgba)
        return image.convert(mode)
    except (OSError, ValueError) as err:
        raise InputError(f"{input_name}: expected a complete PNG, JPEG or WebP image, got one that could not be "
                         f"decoded ({err})") from err


def load_rgb(image: Image.Image, size: tuple[int, int], input_name: str) -> Image.Image:
    return _flatten(image, input_name, "RGB", _IMAGE_BACKGROUND).resize(size, Image.Resampling.LANCZOS)


def load_mask(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Inpainting mask: white is repainted, black is kept (diffusers' and Replicate SDXL's convention); transparent
    parts count as black."""
    return _flatten(image, "mask", "L", _MASK_BACKGROUND).resize(size, Image.Resampling.NEAREST)


# --- Schedulers (A1111 names -> diffusers class and overrides), as data --------------------------------------------
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 3M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
}


def make_scheduler(name: str, base_config):
    """The named sampler on the model's own scheduler config, so prediction_type (epsilon or v_prediction),
    zero-terminal-SNR rescaling and timestep spacing of the checkpoint are kept."""
    import inspect

    import diffusers

    class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    if cls is diffusers.EulerAncestralDiscreteScheduler:
        from sdxl.samplers import EulerAncestral  # the same steps without a GPU stall per step

        cls = EulerAncestral
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        supported = [n for n, (c, _) in SCHEDULERS.items()
                     if "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, c)).parameters]
        raise InputError(
            f"scheduler: this model is zero-terminal-SNR v-prediction, which {name!r} cannot sample; expected one "
            f"of {supported}"
        )
    return cls.from_config(base_config, **overrides)


# --- Hires fix ----------------------------------------------------------------------------------------------------
HIRES_UPSCALERS = ("latent", "lanczos", "esrgan")


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Second-pass size: each side scaled and rounded to a multiple of 8, refused above MAX_SIDE."""
    w, h = int(round(width * scale / 8)) * 8, int(round(height * scale / 8)) * 8
    if max(w, h) > MAX_SIDE:
        raise InputError(f"hires_scale: {width}x{height} x {scale:g} = {w}x{h}; expected at most {MAX_SIDE} per side")
    return w, h


def upscale_latents(latents, size: tuple[int, int]):
    """A1111's "Latent" upscaler: bilinear interpolation of the (scaled) latents to the second-pass size / 8."""
    import torch.nn.functional as F

    width, height = size
    return F.interpolate(latents.float(), size=(height // 8, width // 8), mode="bilinear").to(latents.dtype)


def upscale_images(images: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    return [image.resize(size, Image.Resampling.LANCZOS) for image in images]


def hires_upscale(first, upscaler: str, size: tuple[int, int], model=None):
    """The first pass's output brought to the hires size by `upscaler` (a HIRES_UPSCALERS name): latents for
    "latent", PIL images otherwise; "esrgan" runs `model` (an sdxl.upscale.Upscaler) and then Lanczos."""
    if upscaler == "latent":
        return upscale_latents(first, size)
    if upscaler == "esrgan":
        from sdxl.upscale import upscale_to

        return upscale_to(model, first, size)
    return upscale_images(first, size)


# --- Device and loading -------------------------------------------------------------------------------------------
def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA, then MPS, then CPU, each with the dtype it runs fastest without changing the image materially."""
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps"), torch.float16
    return torch.device("cpu"), torch.float32


class WeightsMissingError(RuntimeError):
    pass


def check_weights_dir(weights_dir: Path) -> None:
    required = [
        weights_dir / d / part
        for d in MODEL_DIRS.values()
        for part in ("model_index.json", "unet/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                     "tokenizer/vocab.json", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json")
    ]
    required += [weights_dir / VAE_DIR / "config.json", weights_dir / SAFETY_DIR / "config.json",
                 weights_dir / SAFETY_DIR / "preprocessor_config.json"]
    missing = [str(p.relative_to(weights_dir)) for p in required if not p.exists()]
    checker = weights_dir / SAFETY_DIR
    if not missing and not (checker / "model.safetensors").is_file():
        # setup() loads safetensors only: a pickle (.bin) is never unpickled at run time.
        pickles = sorted(p.name for p in checker.glob("*.bin"))
        raise WeightsMissingError(
            f"the safety checker in {checker} has no model.safetensors"
            + (f" (only {', '.join(pickles)}, a pickle, which setup() never loads)" if pickles else "")
            + ". Run `script/download_weights --only safety` to fetch it and convert it to safetensors, then "
            "`script/download_weights --check`."
        )
    if missing:
        raise WeightsMissingError(
            f"weights not found in {weights_dir} (missing: {', '.join(missing)}). Run `script/download_weights` "
            "to fetch the real weights before `cog build`, or `python script/tiny_weights.py DIR` and "
            "WEIGHTS_DIR=DIR for the tiny offline test model."
        )


@dataclass
class LoadedModel:
    spec: ModelSpec
    txt2img: object  # StableDiffusionXLPipeline
    img2img: object
    inpaint: object
    # The checkpoint's own scheduler config, kept apart from the pipelines' (replaced every request), so that one
    # request's sampler options (Karras sigmas, SDE, order) never leak into the next.
    scheduler_config: dict

    # How UNet steps are captured as CUDA graphs (sdxl/graphs.py); None: eager (CPU, MPS, or SDXL_CUDA_GRAPHS=0).
    graph_capture: object = None
    # The pipelines that run a request: one per (mode, go_fast) over a UNet stand-in (graphs.GraphedUNet or
    # stepcache.StepCachedUNet) that shares this model's UNet, built on first use. The pipelines above stay the
    # owners of the modules (LoRA merges, placement, prompt encoding).
    runs: dict = field(default_factory=dict)
    runner: object = None  # the graphs.GraphRunner shared by this model's stand-ins

    def pipeline(self, mode: str, fast: bool = False, guided_images: Optional[int] = None):
        """The pipeline that runs `mode` (fast=True: its step-cached twin), ready for a new denoising loop.
        guided_images (fast only): the loop guides 2 x guided_images rows, and go_fast stops that guidance late in
        the schedule (stepcache.GUIDANCE_CUTOFF_TIMESTEP)."""
        exact = {"txt2img": self.txt2img, "img2img": self.img2img, "inpaint": self.inpaint}[mode]
        if not fast and self.graph_capture is None:
            return exact
        if (mode, fast) not in self.runs:
            from sdxl.graphs import GraphedUNet, GraphRunner, cuda_graph_pool
            from sdxl.stepcache import StepCachedUNet, supports_step_cache

            if fast and not supports_step_cache(exact.unet):
                raise InputError(f"go_fast: {self.spec.title}'s UNet has no SDXL layout, so step caching cannot "
                                 "run on it; set go_fast to false")
            if self.runner is None and self.graph_capture is not None:
                pool = cuda_graph_pool if exact.unet.device.type == "cuda" else (lambda: None)
                self.runner = GraphRunner(self.graph_capture, pool)
            stand_in = (StepCachedUNet(exact.unet, runner=self.runner) if fast
                        else GraphedUNet(exact.unet, self.runner))
            twin = type(exact).from_pipe(exact, unet=stand_in, add_watermarker=False, torch_dtype=exact.unet.dtype)
            twin.set_progress_bar_config(disable=True)
            self.runs[(mode, fast)] = twin
        twin = self.runs[(mode, fast)]
        if fast:
            twin.unet.begin(guided_images)
        else:
            twin.unet.begin()
        return twin

    def drop_graphs(self) -> None:
        """Free this model's CUDA graphs (it is leaving accelerator memory)."""
        if self.runner is not None:
            self.runner.drop()

    def graph_runner(self):
        """This model's graphs.GraphRunner (created on first use); None where graphs are off. For stand-ins built
        outside pipeline() (control.ControlledUNet), so that all of a model's graphs go when it leaves."""
        if self.runner is None and self.graph_capture is not None:
            from sdxl.graphs import GraphRunner, cuda_graph_pool

            pool = cuda_graph_pool if self.txt2img.unet.device.type == "cuda" else (lambda: None)
            self.runner = GraphRunner(self.graph_capture, pool)
        return self.runner


@dataclass
class Models:
    device: torch.device
    dtype: torch.dtype
    models: dict[str, LoadedModel]
    safety_checker: object
    feature_extractor: object
    resident: str | None = None  # the model whose modules are in accelerator memory (make_resident)


def fast_vae(vae, device: "torch.device"):
    """The VAE with group norms that use the whole GPU (sdxl/groupnorm.py) on CUDA; as it is elsewhere."""
    if device.type == "cuda":
        from sdxl import groupnorm
        groupnorm.parallelize(vae)
    return vae


def graph_capture_for(device: "torch.device"):
    """CUDA graphs on CUDA devices unless SDXL_CUDA_GRAPHS=0; eager elsewhere (sdxl/graphs.py)."""
    if device.type != "cuda" or os.environ.get("SDXL_CUDA_GRAPHS", "1").strip() == "0":
        return None
    from sdxl.graphs import capture_cuda_graph

    return capture_cuda_graph


def _loaded_model(spec: ModelSpec, txt2img, device: "torch.device", scheduler_config: dict | None = None) -> LoadedModel:
    """img2img and inpainting pipelines sharing txt2img's modules (from_pipe), progress bars off."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    txt2img.set_progress_bar_config(disable=True)
    # from_pipe without torch_dtype casts the SHARED modules to float32 (diffusers 0.42.1): txt2img included.
    dtype = txt2img.unet.dtype
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img, add_watermarker=False, torch_dtype=dtype)
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(txt2img, add_watermarker=False, torch_dtype=dtype)
    for pipe in (img2img, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return LoadedModel(spec=spec, txt2img=txt2img, img2img=img2img, inpaint=inpaint,
                       scheduler_config=scheduler_config or dict(txt2img.scheduler.config),
                       graph_capture=graph_capture_for(device))


def load_models(weights_dir: Path, device: torch.device, dtype: torch.dtype) -> Models:
    """Load both base models once; the VAE and the safety checker are shared, img2img/inpaint share modules."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    check_weights_dir(weights_dir)
    start = time.perf_counter()
    vae = fast_vae(AutoencoderKL.from_pretrained(weights_dir / VAE_DIR, torch_dtype=dtype, use_safetensors=True)
                   .to(device), device)
    models = {}
    for key, spec in MODEL_SPECS.items():
        # Loaded into CPU memory; make_resident below moves the default model's modules to the device.
        txt2img = StableDiffusionXLPipeline.from_pretrained(
            weights_dir / spec.folder, vae=vae, torch_dtype=dtype, add_watermarker=False, use_safetensors=True
        )
        models[key] = _loaded_model(spec, txt2img, device)
    checker = StableDiffusionSafetyChecker.from_pretrained(weights_dir / SAFETY_DIR, torch_dtype=dtype,
                                                           use_safetensors=True).to(device)
    extractor = CLIPImageProcessor.from_pretrained(weights_dir / SAFETY_DIR)
    loaded = Models(device=device, dtype=dtype, models=models, safety_checker=checker, feature_extractor=extractor)
    make_resident(loaded, next(iter(MODEL_SPECS)))
    logger.info("loaded models from %s on %s/%s in %.2fs", weights_dir, device, dtype, time.perf_counter() - start)
    return loaded


# --- Residency: one model in accelerator memory at a time ---------------------------------------------------------
def model_modules(model: LoadedModel) -> list:
    pipe = model.txt2img
    return [m for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae) if m is not None]


def placement(models: dict[str, LoadedModel], active: str | None) -> tuple[list, list]:
    """(modules for the accelerator, modules for CPU memory): every module of the active model, shared ones
    included, goes to the accelerator; every other model's own modules wait in CPU memory."""
    keep = {id(m): m for m in model_modules(models[active])} if active in models else {}
    away = {id(m): m for model in models.values() for m in model_modules(model) if id(m) not in keep}
    return list(keep.values()), list(away.values())


def make_resident(models: Models, active: str | None) -> bool:
    """Hold only `active`'s modules in accelerator memory (None: none), so that peak memory is one model's, not
    two; on the CPU everything already is where it runs. Returns whether anything moved."""
    if models.device.type == "cpu" or models.resident == active:
        return False
    keep, away = placement(models.models, active)
    for key, model in models.models.items():
        if key != active:
            model.drop_graphs()
    models.resident = None  # until every move is done: a failure half-way is redone in full next time
    for module in away:  # out first: the peak is never two models
        module.to("cpu")
    for module in keep:
        module.to(models.device)
    models.resident = active
    if models.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    return True


# --- Custom checkpoints (the `checkpoint` input) --------------------------------------------------------------------
# What a single file's keys say it is: (key prefix, what it is), first match wins; SDXL needs both SDXL_PREFIXES.
SDXL_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.1.")
OTHER_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    ("lora_", "a LoRA (kohya keys); pass it in lora_weights"),
    ("lycoris_", "a LyCORIS LoRA; pass it in lora_weights"),
    ("unet.", "a diffusers LoRA; pass it in lora_weights"),
    ("double_blocks.", "a Flux model"),
    ("model.diffusion_model.double_blocks.", "a Flux model"),
    ("model.diffusion_model.joint_blocks.", "an SD3 model"),
    ("joint_blocks.", "an SD3 model"),
    ("cond_stage_model.transformer.", "an SD 1.x model"),
    ("cond_stage_model.model.", "an SD 2.x model"),
    ("conditioner.embedders.0.", "an SDXL refiner or another SGM model"),
    ("encoder.down.", "a VAE"),
)


@dataclass(frozen=True)
class CheckpointInfo:
    v_prediction: bool
    zero_snr: bool
    has_vae: bool


def inspect_checkpoint(path: Path, *, v_prediction: bool = False) -> CheckpointInfo:
    """What a single-file checkpoint is, from its safetensors header only (no tensor is read).

    SDXL needs UNet (`model.diffusion_model.`) and OpenCLIP-G (`conditioner.embedders.1.`) keys; anything else is
    an InputError naming `checkpoint` and what the keys look like.  ComfyUI / sd-scripts mark v-prediction with a
    `v_pred` key and zero-terminal-SNR with a `ztsnr` key; `v_prediction` (CivitAI metadata) is OR-ed in.
    A diffusers folder must be an SDXL pipeline; its scheduler config says whether it is v-prediction."""
    import json

    from safetensors import safe_open

    if path.is_dir():
        kind = json.loads((path / "model_index.json").read_text()).get("_class_name")
        if kind != "StableDiffusionXLPipeline":
            raise InputError(f"checkpoint: expected a diffusers StableDiffusionXLPipeline folder, got {kind!r}")
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        zero_snr = bool(scheduler.get("rescale_betas_zero_snr"))
        return CheckpointInfo(v_prediction=v_prediction or scheduler.get("prediction_type") == "v_prediction",
                              zero_snr=zero_snr, has_vae=(path / "vae" / "config.json").is_file())

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    if not all(any(k.startswith(p) for k in keys) for p in SDXL_PREFIXES):
        found = next((what for prefix, what in OTHER_ARCHITECTURES if any(k.startswith(prefix) for k in keys)),
                     f"an unknown layout (keys like {sorted(keys)[:3]})")
        raise InputError(f"checkpoint: expected a full SDXL-family checkpoint (model.diffusion_model.* and "
                         f"conditioner.embedders.1.* keys), got {found}")
    zero_snr = "ztsnr" in keys
    return CheckpointInfo(v_prediction=v_prediction or zero_snr or "v_pred" in keys, zero_snr=zero_snr,
                          has_vae=any(k.startswith("first_stage_model.") for k in keys))


def load_open_clip_g(path: Path, config_dir: Path, dtype, input_name: str = "checkpoint"):
    """The CLIP-G text encoder of an SDXL single file, converted by diffusers' own OpenCLIP converter and loaded
    strictly; passed to from_single_file explicitly, which tells the two text encoders apart by width only.
    Used for custom checkpoints and by script/download_weights."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    prefix = "conditioner.embedders.1.model."
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not tensors:
        raise InputError(f"{input_name}: {Path(path).name} has no {prefix}* tensors: not an SDXL checkpoint")
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2", local_files_only=True))
    result = model.load_state_dict(convert_open_clip_checkpoint(model, tensors, prefix=prefix), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise InputError(f"{input_name}: its CLIP-G text encoder does not fit SDXL's (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")
    return model.to(dtype).eval()


def vae_needs_upcast(vae, fp16_fix_vae) -> bool:
    """Whether `vae` must be decoded in fp32 when the model runs in fp16: True unless it holds exactly the
    fp16-fix VAE's tensors (same names, shapes, dtypes and values). Most single-file checkpoints bake in the
    original SDXL VAE, whose activations overflow fp16 (NaN, black images on T4/V100); no cheaper test tells a
    safe VAE from an unsafe one, so anything but the fp16-fix VAE itself is upcast. bf16 and fp32 never need it."""
    return not _same_module(vae, fp16_fix_vae)


def _same_module(a, b) -> bool:
    """Same class, same tensor names, shapes, dtypes and values (compared on a's device)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    import torch

    return all(x.shape == sb[k].shape and x.dtype == sb[k].dtype and torch.equal(x, sb[k].to(x.device))
               for k, x in sa.items())


def load_checkpoint_model(source: Path, weights_dir: Path, device, dtype, shared_vae, info: CheckpointInfo,
                          spec: ModelSpec, baked: list[LoadedModel] = ()) -> LoadedModel:
    """A single-file SDXL checkpoint converted with the local sdxl-base configs (nothing fetched), or a diffusers
    folder, with its own VAE (else the shared one); text encoders and VAE identical to a baked model's are replaced
    by that model's module, so they are not held twice."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    config = weights_dir / MODEL_DIRS["sdxl"]
    try:
        if source.is_dir():
            own_vae = {} if info.has_vae else {"vae": shared_vae}
            pipe = StableDiffusionXLPipeline.from_pretrained(source, torch_dtype=dtype, add_watermarker=False,
                                                             use_safetensors=True, **own_vae)
        else:
            vae = shared_vae
            if info.has_vae:  # the local sdxl-base folder has no vae/: convert with the fp16-fix VAE's config
                vae = AutoencoderKL.from_single_file(str(source), config=str(weights_dir / VAE_DIR),
                                                     local_files_only=True, torch_dtype=dtype)
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(source), config=str(config), local_files_only=True, torch_dtype=dtype, vae=vae,
                text_encoder_2=load_open_clip_g(source, config, dtype), add_watermarker=False,
            )
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise InputError(f"checkpoint: {spec.title} could not be converted as an SDXL checkpoint "
                         f"({type(err).__name__}: {str(err)[:200]})") from err
    if info.has_vae and vae_needs_upcast(pipe.vae, shared_vae):
        # Decoded in fp32 when the model runs in fp16 (diffusers upcasts on force_upcast): black/NaN otherwise.
        pipe.vae.register_to_config(force_upcast=True)
    reused = []
    for name in ("text_encoder", "text_encoder_2", "vae"):
        mine = getattr(pipe, name)
        same = next((getattr(m.txt2img, name) for m in baked if _same_module(getattr(m.txt2img, name), mine)), None)
        if same is not None:
            pipe.register_modules(**{name: same})
            reused.append(name)
    pipe = pipe.to(device)
    fast_vae(pipe.vae, device)  # a no-op for the shared VAE, already done
    scheduler_config = dict(pipe.scheduler.config)
    if info.v_prediction:
        scheduler_config["prediction_type"] = "v_prediction"
        if info.zero_snr:
            scheduler_config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    logger.info("checkpoint %s: %s%s, reusing %s", spec.title, "v-prediction" if info.v_prediction else "epsilon",
                " zero-terminal-SNR" if info.zero_snr else "", ", ".join(reused) or "nothing")
    return _loaded_model(spec, pipe, device, scheduler_config)


# --- Safety checker --------------------------------------------------------------------------------------------
def nsfw_flags(models: Models, images: list[Image.Image]) -> list[bool]:
    import numpy as np

    clip_input = models.feature_extractor(images, return_tensors="pt").pixel_values
    clip_input = clip_input.to(models.device, models.dtype)
    arrays = [np.asarray(image) for image in images]
    _, flags = models.safety_checker(images=arrays, clip_input=clip_input)
    return [bool(flag) for flag in flags]


# --- Generation parameters in the files (A1111 "parameters", read by A1111's PNG Info and CivitAI) ----------------
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """A1111's infotext: the prompt, a "Negative prompt:" line, then "Key: value" pairs in A1111's key names."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = []
    for key, value in settings.items():
        if value is None or value == "":
            continue
        text = str(value)
        if any(c in text for c in ',:"\n'):
            # A1111 quotes values that contain separators; a newline would end the one-line settings, so it is
            # written as the two characters \n, as A1111's JSON quoting writes it.
            text = '"' + text.replace('"', "'").replace("\n", "\\n") + '"'
        pairs.append(f"{key}: {text}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def lora_hashes(names_and_sha256: list[tuple[str, str]]) -> str:
    """A1111's "Lora hashes" value: name: first 10 hex digits of the file's sha256 (CivitAI's AutoV2)."""
    return ", ".join(f"{name.replace(':', '_').replace(',', '_')}: {sha[:10]}" for name, sha in names_and_sha256)


# A JPEG APP1 segment holds at most 65 533 bytes of EXIF (Pillow refuses more with "EXIF data is too long"); WebP's
# EXIF chunk and PNG's text chunk have no such limit.
EXIF_MAX_BYTES = 65_533
# Room kept for the settings line of the infotext (sampler, sizes, LoRA names and hashes) when predict.py checks,
# before generating, that a prompt fits.
INFOTEXT_SETTINGS_ROOM = 4096
_TRUNCATED = " [truncated: the full text does not fit in EXIF]"


def _exif_bytes(parameters: str) -> bytes:
    exif = Image.Exif()
    exif.endian = ">"  # big-endian TIFF header, matching the UTF-16-BE comment (as A1111/piexif write it)
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    return exif.tobytes()


def infotext_fits(output_format: str, prompt: str, negative_prompt: str) -> bool:
    """Whether the A1111 infotext of these prompts (with INFOTEXT_SETTINGS_ROOM bytes for the settings line) fits
    the output format's metadata: only JPEG's EXIF is bounded. Checked before generation, so that a prompt whose
    metadata cannot be written is refused at once, not after the whole generation."""
    if OUTPUT_FORMATS.get(output_format, ("PNG",))[0] != "JPEG":
        return True
    text = a1111_parameters(prompt, negative_prompt, {})
    return len(_exif_bytes(text)) + INFOTEXT_SETTINGS_ROOM <= EXIF_MAX_BYTES


def _fit_exif(parameters: str) -> bytes:
    """EXIF bytes of the infotext; should it not fit (predict.py refuses such prompts before generation, so only
    a settings line beyond INFOTEXT_SETTINGS_ROOM could do it), the prompt part is cut with a visible note and the
    settings line kept, rather than failing a finished generation."""
    data = _exif_bytes(parameters)
    if len(data) <= EXIF_MAX_BYTES:
        return data
    head, _, settings = parameters.rpartition("\n")
    excess_units = (len(data) - EXIF_MAX_BYTES) // 2 + len(_TRUNCATED) + 1
    keep = head.encode("utf-16-be")[: max(0, 2 * (len(head.encode("utf-16-be")) // 2 - excess_units))]
    text = keep.decode("utf-16-be", errors="ignore") + _TRUNCATED + "\n" + settings
    data = _exif_bytes(text)
    if len(data) > EXIF_MAX_BYTES:  # the settings line alone is too long: keep what fits of it
        data = _exif_bytes(text[: (EXIF_MAX_BYTES - 200) // 2])
    logger.warning("infotext of %d characters cut to fit JPEG's EXIF limit", len(parameters))
    return data


def _metadata_kwargs(pil_format: str, parameters: str | None) -> dict:
    if parameters is None:
        return {}
    if pil_format == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", parameters)
        return {"pnginfo": info}
    if pil_format == "JPEG":
        return {"exif": _fit_exif(parameters)}
    return {"exif": _exif_bytes(parameters)}


def read_parameters(path: str | os.PathLike) -> str | None:
    """The A1111 parameters of an output file (PNG text chunk, or EXIF UserComment in JPEG/WebP)."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        exif = image.getexif()
        comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not comment:
        return None
    prefix, body = comment[:8], comment[8:]
    if prefix == b"UNICODE\0":
        return body.decode("utf-16-be" if exif.endian == ">" else "utf-16-le")
    return body.decode("utf-8", errors="replace")


# --- Output files -------------------------------------------------------------------------------------------------
OUTPUT_FORMATS = {"webp": ("WEBP", "webp"), "jpg": ("JPEG", "jpg"), "png": ("PNG", "png")}
# Encoder effort: the least that keeps the image (WebP at the same quality, PNG lossless). At 1024x1024 Pillow's
# defaults (WebP method 4, PNG level 6) cost 0.3-1 s of CPU per image for 10-30 % smaller files.
ENCODER_EFFORT = {"WEBP": {"method": 0}, "PNG": {"compress_level": 1}, "JPEG": {}}


def save_images(
    images: list[Image.Image],
    out_dir: Path,
    output_format: str,
    quality: int,
    parameters: list[str] | None = None,
) -> list[Path]:
    """Write out-{i}.{ext} (with image i's A1111 parameters when given); each file is written under a temporary
    name and renamed, so none is ever partial. Images are encoded in parallel (Pillow's encoders release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    pil_format, ext = OUTPUT_FORMATS[output_format]

    def write(i: int) -> Path:
        path = out_dir / f"out-{i}.{ext}"
        tmp = out_dir / f".out-{i}.{ext}.partial"
        kwargs = dict(ENCODER_EFFORT[pil_format])
        if pil_format != "PNG":
            kwargs["quality"] = quality
        kwargs.update(_metadata_kwargs(pil_format, parameters[i] if parameters else None))
        try:
            images[i].save(tmp, format=pil_format, **kwargs)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    if len(images) <= 1:
        return [write(i) for i in range(len(images))]
    with ThreadPoolExecutor(max_workers=min(len(images), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(write, range(len(images))))


def keep_unflagged(paths: list[Path], flags: list[bool]) -> list[Path]:
    """Delete the files of flagged images and renumber the others out-0, out-1, ... in their order (save_images
    wrote them before the safety checker had answered)."""
    for path, flagged in zip(paths, flags):
        if flagged:
            path.unlink(missing_ok=True)
    kept = []
    for path in (p for p, flagged in zip(paths, flags) if not flagged):
        target = path.with_name(f"out-{len(kept)}{path.suffix}")
        if target != path:
            os.replace(path, target)  # its old occupant was flagged (deleted) or moved down already
        kept.append(target)
    return kept
