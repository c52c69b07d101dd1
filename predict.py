"""Cog surface of the SDXL / Illustrious XL LoRA model: inputs, validation and orchestration only.

The model side (loading, sizes, schedulers, safety, saving) is in utils.py, weights files (LoRAs, checkpoints,
embeddings, VAEs, ControlNets, upscalers) in weights.py, and each model-side capability in a module of the sdxl/
package (README, "Architecture").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path as FsPath
from typing import Optional

import torch
from cog import BasePredictor, Input, Path, Secret

import utils
import weights
from sdxl import (control, detailer, embeddings, lora, preprocess, prompts, reference, stepcache, tiled_vae, upscale,
                  vae)
from sdxl.progress import Progress

logger = logging.getLogger("predict")

# Literal lists: Cog's static schema generator (cog build) only resolves literal choices.
ASPECT_RATIO_CHOICES = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"]
MEGAPIXEL_CHOICES = ["1", "0.25"]
OUTPUT_FORMAT_CHOICES = ["webp", "jpg", "png"]
HIRES_UPSCALER_CHOICES = ["latent", "lanczos", "esrgan"]
REFERENCE_MODE_CHOICES = ["full", "style", "composition"]
DETAILER_CHOICES = ["off", "face", "hands", "face_and_hands"]  # sdxl/detailer.py MODES
CONTROL_TYPE_CHOICES = ["canny", "depth", "openpose", "lineart", "lineart_anime", "softedge", "scribble", "tile"]
SCHEDULER_CHOICES = [
    "default",
    "Euler a",
    "Euler",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE Karras",
    "DPM++ SDE Karras",
    "DPM++ 3M SDE Karras",
    "DDIM",
    "UniPC",
    "Heun",
    "LMS",
    "DPM2 a",
]
MAX_SEED = 2**32 - 1
MAX_MORE_LORAS = 6  # more_loras lines
MAX_LORAS = 8  # LoRAs of one request, lora_weights and extra_lora included
MAX_LORA_TOTAL_BYTES = weights._env_int("LORA_MAX_TOTAL_BYTES", 6 * weights.GiB)  # all LoRA files of one request


@dataclasses.dataclass(frozen=True)
class LoraInput:
    input_name: str  # lora_weights | extra_lora | "more_loras line <n>"
    ref: weights.WeightsRef
    scale: float


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything predict() needs, validated and resolved before any download or GPU work."""

    spec: utils.ModelSpec
    mode: str  # txt2img | img2img | inpaint
    prompt: str
    negative_prompt: str
    zero_negative: bool
    width: int
    height: int
    init_image: object  # PIL image or None
    mask_image: object
    strength: float
    steps: int
    guidance: float
    scheduler: str
    clip_skip: int
    guidance_rescale: float
    loras: tuple[LoraInput, ...]
    hires_scale: float
    hires_size: Optional[tuple[int, int]]  # second-pass size, None when hires fix is off
    hires_upscaler: str
    hires_strength: float
    hires_steps: int
    embed_metadata: bool
    num_outputs: int
    output_format: str
    output_quality: int
    safety_checker: bool
    checkpoint: Optional[weights.WeightsRef] = None  # a custom checkpoint instead of the baked models
    go_fast: bool = False  # step caching (sdxl/stepcache.py): faster, changes the image
    embeddings: tuple[embeddings.EmbeddingInput, ...] = ()  # textual inversions, one per `embeddings` line
    vae: Optional[weights.WeightsRef] = None  # a user VAE instead of the model's own
    control: Optional[control.ControlRequest] = None  # a ControlNet unit (sdxl/control.py); None: no control acts
    control_model: Optional[weights.WeightsRef] = None  # a user ControlNet for the unit; None: the baked one
    reference: Optional[reference.ReferenceRequest] = None  # an IP-Adapter reference (sdxl/reference.py)
    upscaler: Optional[weights.WeightsRef] = None  # `upscaler_model`: the hires fix's model upscaler instead of the baked one
    detailer: Optional[detailer.DetailerRequest] = None  # the face/hand detailer (sdxl/detailer.py); None: off

    @property
    def guided_images(self) -> Optional[int]:
        """Rows per half of a go_fast loop's guided batch (its guidance stops late in the schedule,
        sdxl/stepcache.py); None where nothing is cut: exact mode, or no classifier-free guidance (scale <= 1)."""
        return self.num_outputs if self.go_fast and self.guidance > 1.0 else None


def check_inputs(
    *,
    prompt: str,
    negative_prompt: Optional[str],
    aspect_ratio: str,
    width: Optional[int],
    height: Optional[int],
    megapixels: str,
    image: Optional[str],
    mask: Optional[str],
    prompt_strength: float,
    num_outputs: int,
    num_inference_steps: Optional[int],
    guidance: Optional[float],
    scheduler: str,
    clip_skip: int,
    guidance_rescale: float,
    quality_tags: bool,
    lora_weights: Optional[str],
    lora_scale: float,
    extra_lora: Optional[str],
    extra_lora_scale: float,
    hires_scale: float = 1.0,
    hires_upscaler: str = "latent",
    hires_strength: float = 0.5,
    hires_steps: Optional[int] = None,
    upscaler_model: Optional[str] = None,
    embed_metadata: bool = True,
    output_format: str,
    output_quality: int,
    disable_safety_checker: bool,
    use_standard_sdxl: bool,
    checkpoint: Optional[str] = None,
    go_fast: bool = False,
    more_loras: Optional[str] = None,
    embeddings_text: Optional[str] = None,
    vae_ref: Optional[str] = None,
    control_image: Optional[str] = None,
    control_type: str = control.DEFAULT_CONTROL_TYPE,
    control_preprocess: bool = True,
    control_strength: float = 1.0,
    control_start: float = 0.0,
    control_end: float = 1.0,
    control_model: Optional[str] = None,
    reference_image: Optional[str] = None,
    reference_strength: float = 0.6,
    reference_mode: str = "full",
    detailer_mode: str = "off",
    detailer_strength: float = detailer.DEFAULT_STRENGTH,
    detailer_prompt: Optional[str] = None,
) -> Request:
    """Validate every input (also when called without the server's schema checks) and resolve defaults."""

    def expect(ok: bool, message: str) -> None:
        if not ok:
            raise utils.InputError(message)

    image, mask, control_image, reference_image = (  # "" from a form is no image
        None if isinstance(v, str) and not v.strip() else v for v in (image, mask, control_image, reference_image))

    spec = utils.model_spec(use_standard_sdxl)
    checkpoint_ref = None
    if checkpoint is not None and checkpoint.strip():
        expect(not use_standard_sdxl, "checkpoint: a custom checkpoint replaces the base model; got it together with "
               "use_standard_sdxl=true (leave one of them out)")
        checkpoint_ref = weights.parse_checkpoint_ref(checkpoint.strip())
        spec = utils.checkpoint_spec(checkpoint_ref.canonical_id, checkpoint_ref.display)
    num_inference_steps = spec.steps if num_inference_steps is None else num_inference_steps
    # Length first: everything after this reads the text, and all of it must stay cheap.
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
        prompts.check_prompt_length(text, name)
    expect(isinstance(prompt, str) and prompt.strip() != "", f"prompt: expected non-empty text, got {prompt!r:.60}")
    expect(aspect_ratio in ASPECT_RATIO_CHOICES, f"aspect_ratio: expected one of {ASPECT_RATIO_CHOICES}, got {aspect_ratio!r}")
    expect(megapixels in MEGAPIXEL_CHOICES, f"megapixels: expected one of {MEGAPIXEL_CHOICES}, got {megapixels!r}")
    expect(output_format in OUTPUT_FORMAT_CHOICES, f"output_format: expected one of {OUTPUT_FORMAT_CHOICES}, got {output_format!r}")
    expect(scheduler in SCHEDULER_CHOICES, f"scheduler: expected one of {SCHEDULER_CHOICES}, got {scheduler!r}")
    expect(1 <= num_outputs <= 4, f"num_outputs: expected 1 to 4, got {num_outputs}")
    expect(1 <= num_inference_steps <= 50, f"num_inference_steps: expected 1 to 50, got {num_inference_steps}")
    expect(0.0 <= prompt_strength <= 1.0, f"prompt_strength: expected 0 to 1, got {prompt_strength}")
    expect(0 <= output_quality <= 100, f"output_quality: expected 0 to 100, got {output_quality}")
    expect(guidance is None or 0.0 <= guidance <= 10.0, f"guidance: expected 0 to 10, got {guidance}")
    expect(mask is None or image is not None, "mask: inpainting needs an image as well; got a mask without an image")
    expect(1 <= clip_skip <= 12, f"clip_skip: expected 1 to 12, got {clip_skip}")
    expect(0.0 <= guidance_rescale <= 1.0, f"guidance_rescale: expected 0 to 1, got {guidance_rescale}")
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
        # A1111 UI syntax for LoRAs inside the prompt: we cannot resolve names, and ignoring them would be silent.
        tag = prompts.find_extra_network_tag(text)
        expect(tag is None, f"{name}: A1111 LoRA tags like {(tag or '')[:80]} are not read from the "
               "prompt; pass the LoRA in lora_weights / extra_lora instead")
    loras = parse_loras(lora_weights, lora_scale, extra_lora, extra_lora_scale) + parse_more_loras(more_loras)
    expect(len(loras) <= MAX_LORAS, f"more_loras: at most {MAX_LORAS} LoRAs per request (lora_weights, extra_lora "
           f"and up to {MAX_MORE_LORAS} more_loras lines), got {len(loras)}")
    embedding_items = embeddings.parse_embeddings(embeddings_text)
    user_vae = weights.parse_ref(vae_ref.strip(), "VAE", input_name="vae") if vae_ref and vae_ref.strip() else None
    control_ref = None
    if control_model is not None and control_model.strip():
        control_ref = weights.parse_ref(control_model.strip(), "ControlNet", input_name="control_model")
        expect(control_image is not None, "control_model: a ControlNet controls with a control_image; got "
               "control_model without one (add control_image, or leave control_model blank)")
    expect(1.0 <= hires_scale <= 2.0, f"hires_scale: expected 1 (off) to 2, got {hires_scale}")
    expect(hires_upscaler in HIRES_UPSCALER_CHOICES,
           f"hires_upscaler: expected one of {HIRES_UPSCALER_CHOICES}, got {hires_upscaler!r}")
    expect(0.0 < hires_strength <= 1.0, f"hires_strength: expected above 0 and at most 1, got {hires_strength}")
    expect(hires_steps is None or 1 <= hires_steps <= 50, f"hires_steps: expected 1 to 50, got {hires_steps}")
    hires_steps = num_inference_steps if hires_steps is None else hires_steps
    upscaler_ref = None
    if upscaler_model is not None and upscaler_model.strip():
        # Never silently unused: the model upscaler is the hires fix's `esrgan` step.
        expect(hires_scale > 1.0, f"upscaler_model: the model upscaler runs in the hires fix; got hires_scale "
               f"{hires_scale:g} (off): set hires_scale above 1, or leave upscaler_model blank")
        expect(hires_upscaler == "esrgan", f"upscaler_model: the model upscaler replaces the baked one of "
               f"hires_upscaler esrgan; got hires_upscaler {hires_upscaler!r}: set it to esrgan, or leave "
               "upscaler_model blank")
        upscaler_ref = weights.parse_ref(upscaler_model.strip(), "upscaler", input_name="upscaler_model")
    if hires_scale > 1.0:
        expect(mask is None, "hires_scale: the hires fix works for text-to-image and img2img, not inpainting; "
               "got a mask")
        expect(int(hires_steps * hires_strength) >= 1,
               f"hires_strength: with hires_steps={hires_steps} a strength of {hires_strength} runs no step; "
               "expected hires_steps x hires_strength >= 1")
    if aspect_ratio != "custom":
        expect(width is None and height is None,
               f'width/height: only used with aspect_ratio "custom", got aspect_ratio {aspect_ratio!r} '
               f"with width={width} height={height}")

    init_image = mask_image = None
    mode = "txt2img"
    if aspect_ratio == "custom":
        size = utils.check_custom_size(width, height)
    else:
        size = utils.preset_size(aspect_ratio, megapixels)
    if image is not None:
        mode = "inpaint" if mask is not None else "img2img"
        # URLs are fetched by weights.input_file (address guard, deadline, size cap, no query in errors), not coglet.
        with weights.input_file(image, "image") as image_path:
            source = utils.open_image(image_path, "image")
            if aspect_ratio != "custom":
                size = utils.size_for_image(source.size, megapixels)
            init_image = utils.load_rgb(source, size, "image")
        if mask is not None:
            with weights.input_file(mask, "mask") as mask_path:
                mask_image = utils.load_mask(utils.open_image(mask_path, "mask"), size)
        effective_steps = int(num_inference_steps * prompt_strength)
        expect(effective_steps >= 1,
               f"prompt_strength: with num_inference_steps={num_inference_steps} a strength of {prompt_strength} "
               "runs no denoising step; expected num_inference_steps x prompt_strength >= 1")

    with contextlib.ExitStack() as files:  # fetched as `image` is; each request holds its decoded image
        # An image whose unit cannot act (strength 0, an empty window) is not fetched: no unit, the plain image.
        control_acts = control_strength > 0 and control_end > control_start
        control_path, reference_path = (
            files.enter_context(weights.input_file(value, name)) if value is not None and acts else None
            for name, value, acts in (("control_image", control_image, control_acts),
                                      ("reference_image", reference_image, reference_strength > 0)))
        control_request = control.check_control(control_path, control_type, control_preprocess, control_strength,
                                                control_start, control_end, size)
        reference_request = reference.check_reference(reference_path, reference_strength, reference_mode)
    expect(control_request is None or not go_fast, "go_fast: step caching does not run with a control_image; set "
           "go_fast to false")

    detailer_request = detailer.check_detailer(detailer_mode, detailer_strength, detailer_prompt, num_inference_steps)

    if quality_tags and spec.quality_tags:
        prompt = f"{spec.quality_tags}, {prompt}"
    zero_negative = negative_prompt is None and not spec.negative_prompt
    negative_prompt = spec.negative_prompt if negative_prompt is None else negative_prompt
    if embed_metadata and not utils.infotext_fits(output_format, prompt, negative_prompt):
        raise utils.InputError(
            f"prompt: with output_format {output_format!r} the generation parameters are written to EXIF, which "
            f"holds at most {utils.EXIF_MAX_BYTES:,} bytes, and this prompt and negative_prompt need more; use "
            "output_format png (no limit) or webp, or embed_metadata false")
    if embed_metadata and detailer_request is not None and detailer_request.prompt is not None:
        # Written once per detailer unit (ADetailer prompt, ADetailer prompt 2nd), beside the prompts.
        written = prompt + "".join(f", {detailer_request.prompt}" for _ in detailer_request.units)
        if not utils.infotext_fits(output_format, written, negative_prompt):
            raise utils.InputError(
                f"detailer_prompt: with output_format {output_format!r} the generation parameters are written to "
                f"EXIF, which holds at most {utils.EXIF_MAX_BYTES:,} bytes, and with this detailer_prompt (written "
                "once per detailer unit) they need more; use output_format png or webp, or embed_metadata false")
    return Request(
        hires_scale=float(hires_scale),
        hires_size=utils.hires_size(size[0], size[1], hires_scale) if hires_scale > 1.0 else None,
        hires_upscaler=hires_upscaler,
        hires_strength=float(hires_strength),
        hires_steps=int(hires_steps),
        embed_metadata=embed_metadata,
        spec=spec,
        mode=mode,
        prompt=prompt,
        negative_prompt=negative_prompt,
        # Omitted and empty in the preset: zero embeddings, as stock diffusers SDXL does; an explicit "" is encoded
        # (A1111's behaviour).
        zero_negative=zero_negative,
        width=size[0],
        height=size[1],
        init_image=init_image,
        mask_image=mask_image,
        strength=float(prompt_strength),
        steps=int(num_inference_steps),
        guidance=spec.guidance if guidance is None else float(guidance),
        scheduler=spec.scheduler if scheduler == "default" else scheduler,
        clip_skip=int(clip_skip),
        guidance_rescale=float(guidance_rescale),
        loras=loras,
        num_outputs=int(num_outputs),
        output_format=output_format,
        output_quality=int(output_quality),
        safety_checker=not disable_safety_checker,
        checkpoint=checkpoint_ref,
        go_fast=bool(go_fast),
        embeddings=embedding_items,
        vae=user_vae,
        control=control_request,
        control_model=control_ref if control_request is not None else None,  # a unit that cannot act fetches nothing
        reference=reference_request,
        upscaler=upscaler_ref,
        detailer=detailer_request,
    )


def parse_loras(
    lora_weights: Optional[str], lora_scale: float, extra_lora: Optional[str], extra_lora_scale: float
) -> tuple[LoraInput, ...]:
    """Parse both LoRA references once (no network); an extra_lora alone works like lora_weights."""
    loras = []
    for name, text, scale in (("lora_weights", lora_weights, lora_scale), ("extra_lora", extra_lora, extra_lora_scale)):
        if text is None or not text.strip():
            continue
        if not -1.0 <= scale <= 3.0:
            scale_name = "lora_scale" if name == "lora_weights" else "extra_lora_scale"
            raise utils.InputError(f"{scale_name}: expected -1 to 3, got {scale}")
        loras.append(LoraInput(name, weights.parse_lora_ref(text.strip(), input_name=name), float(scale)))
    return tuple(loras)


def parse_more_loras(text: Optional[str]) -> tuple[LoraInput, ...]:
    """`more_loras`: one `reference [scale]` per line (scale -1 to 3, default 1); `#` comments and blank lines
    are skipped. Errors name the line."""
    loras = []
    for number, line in embeddings.input_lines(text):
        name = f"more_loras line {number}"
        parts = line.split()
        if len(parts) > 2:
            raise utils.InputError(f"{name}: expected a reference and optionally a scale, got {len(parts)} words "
                                   f"({line[:80]!r})")
        scale = 1.0
        if len(parts) == 2:
            try:
                scale = float(parts[1])
            except ValueError:
                raise utils.InputError(f"{name}: expected a scale (a number from -1 to 3) after the reference, got "
                                       f"{parts[1][:40]!r}") from None
            if not -1.0 <= scale <= 3.0:  # also refuses nan
                raise utils.InputError(f"{name}: expected a scale from -1 to 3, got {parts[1][:40]}")
        loras.append(LoraInput(name, weights.parse_lora_ref(parts[0], input_name=name), scale))
        if len(loras) > MAX_MORE_LORAS:
            raise utils.InputError(f"{name}: at most {MAX_MORE_LORAS} LoRAs in more_loras ({MAX_LORAS} per request "
                                   "with lora_weights and extra_lora), got more")
    return tuple(loras)


def check_lora_total(request: Request, fetched: list[weights.LoraFile]) -> None:
    """All LoRA files of a request together stay within MAX_LORA_TOTAL_BYTES (checked before merging)."""
    total = sum(file.size for file in fetched)
    if total > MAX_LORA_TOTAL_BYTES:
        raise utils.InputError(f"more_loras: the LoRAs of one request may total at most "
                               f"{MAX_LORA_TOTAL_BYTES / weights.MiB:.0f} MiB (LORA_MAX_TOTAL_BYTES), got "
                               f"{total / weights.MiB:.0f} MiB from {len(fetched)} LoRAs")


def detailer_prompts(request: Request) -> tuple[tuple[str, str], ...]:
    """(("detailer_prompt", its text),) when the request has its own detailer prompt: checked like the prompts."""
    if request.detailer is None or request.detailer.prompt is None:
        return ()
    return (("detailer_prompt", detailer.unit_prompt(request.detailer, request.prompt)),)


def resolve_seed(seed: Optional[int]) -> int:
    if seed is None or seed == -1:
        return secrets.randbelow(MAX_SEED + 1)
    if not 0 <= seed <= MAX_SEED:
        raise utils.InputError(f"seed: expected 0 to {MAX_SEED} (or -1 / blank for random), got {seed}")
    return seed


class Predictor(BasePredictor):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        weights_dir = FsPath(os.environ.get("WEIGHTS_DIR") or FsPath(__file__).resolve().parent / "weights")
        device, dtype = utils.pick_device()
        self.weights_dir = weights_dir
        self.models = utils.load_models(weights_dir, device, dtype)
        self.mergers = {key: lora.LoraMerger(model.txt2img) for key, model in self.models.models.items()}
        self.lora_cache = weights.LoraCache.from_env()
        self.checkpoint_cache: Optional[weights.CheckpointCache] = None  # created on the first `checkpoint` request
        self.custom_key: Optional[str] = None  # the one custom checkpoint resident beside the baked models
        # Embedding, VAE and ControlNet caches (in the LoRA cache's folder unless set apart); the user VAE last used
        # stays loaded, keyed by its file (user ControlNets: self.controlnets).
        self.caches: dict[str, weights.LoraCache] = {kind: weights.CACHE_CLASSES[kind].from_env()
                                                     for kind in ("embedding", "VAE", "ControlNet")}
        self.user_vae: Optional[tuple[str, object]] = None
        self.controlnets = control.ControlNets(weights_dir, device, dtype)  # loaded on the first control request
        self.preprocessors = preprocess.Preprocessors(weights_dir, device, dtype)  # their models too
        self.references = reference.References(weights_dir)  # IP-Adapter, loaded on the first reference request
        self.upscalers = upscale.Upscalers(weights_dir, device)  # the hires fix's model upscalers, loaded on first use
        self.detectors = detailer.Detectors(weights_dir)  # face/hand detectors, loaded on the first detailer request
        self.warm_graphs()

    def warm_graphs(self) -> None:
        """Capture the resident model's UNet graphs for every 1 MP aspect-ratio preset at num_outputs 1 (one
        denoising step each, through the request path), so that no common first request pays for a capture.
        Nothing to do where graphs are off (CPU, MPS, SDXL_CUDA_GRAPHS=0)."""
        model = self.models.models[self.models.resident or next(iter(utils.MODEL_SPECS))]  # CPU: none is "resident"
        if model.graph_capture is None:
            return
        phase = time.perf_counter()
        embeds = prompts.encode_prompts(model.txt2img, "", model.spec.negative_prompt)
        pipe = model.pipeline("txt2img")
        pipe.scheduler = utils.make_scheduler(model.spec.scheduler, model.scheduler_config)
        for aspect_ratio in utils.ASPECT_RATIOS:
            width, height = utils.preset_size(aspect_ratio, "1")
            pipe(**embeds.as_pipeline_kwargs(), width=width, height=height, num_inference_steps=1,
                 guidance_scale=model.spec.guidance, output_type="latent")
        logger.info("captured %d UNet graphs in %.2fs", len(model.runner.graphs), time.perf_counter() - phase)

    def predict(
        self,
        prompt: str = Input(description="Text prompt. Danbooru-style tags work best with Illustrious XL."),
        negative_prompt: Optional[str] = Input(
            description="What to avoid. Leave blank for the model's default negative prompt; send an empty "
            "string for none.",
            default=None,
        ),
        aspect_ratio: str = Input(
            description='Aspect ratio of the output (SDXL training sizes). "custom" uses width and height.',
            choices=ASPECT_RATIO_CHOICES,
            default="1:1",
        ),
        width: Optional[int] = Input(
            description='Width for aspect_ratio "custom": a multiple of 8, 256 to 2048.', default=None, ge=256, le=2048
        ),
        height: Optional[int] = Input(
            description='Height for aspect_ratio "custom": a multiple of 8, 256 to 2048.', default=None, ge=256, le=2048
        ),
        megapixels: str = Input(
            description="Approximate size of the output: 1 MP (SDXL's native size) or 0.25 MP (half each side).",
            choices=MEGAPIXEL_CHOICES,
            default="1",
        ),
        # Strings, not cog.Path: coglet would download a Path URL itself, past our address guard and size cap.
        image: Optional[str] = Input(
            description="Input image for img2img (or inpainting with mask): an http(s) URL or a data: URL of a PNG, "
            "JPEG or WebP. The output keeps its aspect ratio at the megapixels size, unless aspect_ratio is custom.",
            default=None,
        ),
        mask: Optional[str] = Input(
            description="Inpainting mask for image (an http(s) or data: URL): white is repainted, black is kept.",
            default=None,
        ),
        prompt_strength: float = Input(
            description="img2img/inpainting strength: 1.0 fully repaints the image, 0 keeps it.",
            default=0.8,
            ge=0.0,
            le=1.0,
        ),
        num_outputs: int = Input(description="Number of images; image i uses seed + i.", default=1, ge=1, le=4),
        num_inference_steps: Optional[int] = Input(
            description="Denoising steps. Leave blank for the model's preset: 28 for Illustrious XL, 30 for SDXL.",
            default=None,
            ge=1,
            le=50,
        ),
        guidance: Optional[float] = Input(
            description="Classifier-free guidance (CFG) scale. Leave blank for the model's default: 6.0 for "
            "Illustrious XL, 7.0 for SDXL.",
            default=None,
            ge=0.0,
            le=10.0,
        ),
        scheduler: str = Input(
            description='Sampler by its A1111 name. "default" is Euler a for Illustrious XL and DPM++ 2M Karras '
            "for SDXL.",
            choices=SCHEDULER_CHOICES,
            default="default",
        ),
        clip_skip: int = Input(
            description="CLIP layers to skip, A1111 meaning: 2 = penultimate layer (SDXL's standard, what Illustrious "
            "and Pony ask for), 1 = last layer.",
            default=2,
            ge=1,
            le=12,
        ),
        guidance_rescale: float = Input(
            description="Rescales guidance to fix over-exposure (0.7 is typical for v-prediction models); 0 = off.",
            default=0.0,
            ge=0.0,
            le=1.0,
        ),
        quality_tags: bool = Input(
            description='Prepend the model\'s quality tags (e.g. "masterpiece, best quality, ...") to the prompt.',
            default=False,
        ),
        hires_scale: float = Input(
            description="Hires fix: upscale the first pass by this factor and refine it with a second img2img pass "
            "(A1111's hires fix). 1 = off; 1.5 is typical.",
            default=1.0,
            ge=1.0,
            le=2.0,
        ),
        hires_upscaler: str = Input(
            description="Hires fix upscaler: latent (A1111's Latent, bilinear on the latents; use hires_strength "
            ">= 0.5), lanczos (on the decoded image) or esrgan (the decoded image through a 4x model upscaler, "
            "then Lanczos to the hires size: the baked R-ESRGAN 4x+ Anime6B, or upscaler_model when given).",
            choices=HIRES_UPSCALER_CHOICES,
            default="latent",
        ),
        hires_strength: float = Input(
            description="Denoising strength of the hires fix pass.", default=0.5, ge=0.01, le=1.0
        ),
        hires_steps: Optional[int] = Input(
            description="Steps of the hires fix pass (before strength, as in img2img). Blank = num_inference_steps.",
            default=None,
            ge=1,
            le=50,
        ),
        upscaler_model: Optional[str] = Input(
            description="The model upscaler for hires_upscaler esrgan instead of the baked R-ESRGAN 4x+ Anime6B: any "
            "super-resolution model spandrel loads (ESRGAN, RealESRGAN, SwinIR, HAT, DAT, SPAN, ...) as one "
            ".safetensors file, in the forms of lora_weights (huggingface.co/..., hf://, civitai.com/models/<id> of "
            "type Upscaler, a URL, a Replicate model). Pickles (.pth) are refused. Downloaded once, then cached.",
            default=None,
        ),
        seed: Optional[int] = Input(
            description="Random seed. Leave blank (or -1) for a random one; the seed used is printed in the logs.",
            default=None,
        ),
        output_format: str = Input(description="Format of the output images.", choices=OUTPUT_FORMAT_CHOICES, default="webp"),
        output_quality: int = Input(
            description="Quality of webp/jpg outputs, 0 to 100 (not used for png).", default=80, ge=0, le=100
        ),
        disable_safety_checker: bool = Input(
            description="Disable the safety checker for generated images.", default=False
        ),
        go_fast: bool = Input(
            description="Faster denoising by step caching: the full UNet runs on every third step and the steps "
            "between reuse its deep features (about 2x faster sampling). Changes the image slightly; off gives the "
            "exact result.",
            default=False,
        ),
        lora_weights: Optional[str] = Input(
            description="LoRA to apply: a Replicate owner/model[:version], huggingface.co/owner/repo[/file], "
            "hf://owner/repo, civitai.com/models/<id>, an AIR urn, or any .safetensors / .tar / data: URL.",
            default=None,
        ),
        lora_scale: float = Input(description="Strength of lora_weights.", default=1.0, ge=-1.0, le=3.0),
        extra_lora: Optional[str] = Input(
            description="A second LoRA, in any of the forms of lora_weights.", default=None
        ),
        extra_lora_scale: float = Input(description="Strength of extra_lora.", default=1.0, ge=-1.0, le=3.0),
        more_loras: Optional[str] = Input(
            description="Up to 6 more LoRAs, one per line: a reference in any form of lora_weights, then optionally "
            "a space and a scale (-1 to 3, default 1). Blank lines and lines starting with # are skipped.",
            default=None,
        ),
        embeddings: Optional[str] = Input(
            description="Up to 8 SDXL textual-inversion embeddings, one per line: [name=]reference (any form of "
            "lora_weights but Replicate models; CivitAI type TextualInversion). Write the name in prompt or "
            "negative_prompt to use it; without name= it is the file's name without extension (A1111's rule).",
            default=None,
        ),
        vae: Optional[str] = Input(
            description="An SDXL VAE to use instead of the model's own: a single .safetensors file (A1111 layout) "
            "or a diffusers VAE folder, in the forms of lora_weights (huggingface.co/..., hf://, civitai.com/models/"
            "<id> of type VAE, a URL). Downloaded once, then cached.",
            default=None,
        ),
        hf_api_token: Optional[Secret] = Input(
            description="Hugging Face token for gated or private LoRAs.", default=None
        ),
        civitai_api_token: Optional[Secret] = Input(
            description="CivitAI API token for LoRAs that need a login.", default=None
        ),
        use_standard_sdxl: bool = Input(
            description="Use standard SDXL base 1.0 instead of Illustrious XL (for realistic content).",
            default=False,
        ),
        checkpoint: Optional[str] = Input(
            description="A full SDXL-family checkpoint to use instead of Illustrious XL: NoobAI-XL (also "
            "v-prediction), Pony, Illustrious merges, ... as a single .safetensors file (A1111 layout), in the same "
            "forms as lora_weights: huggingface.co/owner/repo[/file], hf://, civitai.com/models/<id>, or a "
            ".safetensors URL. Downloaded once, then cached.",
            default=None,
        ),
        embed_metadata: bool = Input(
            description="Write the generation parameters into each file in A1111's format (PNG text / EXIF "
            "UserComment), readable by A1111's PNG Info and CivitAI.",
            default=True,
        ),
        control_image: Optional[str] = Input(
            description="ControlNet: an image (an http(s) or data: URL, fetched as image is) to control the composition with (edges, depth, pose, ... are "
            "extracted from it as control_type says). Fitted to the output size as A1111's \"Crop and Resize\": "
            "scaled to cover it, the overflow cut off equally on both sides.",
            default=None,
        ),
        control_type: str = Input(
            description="What control_image controls: canny edges, depth, openpose, lineart, lineart_anime, "
            "softedge, scribble or tile (all served by the baked union ControlNet); each has a built-in "
            "preprocessor (control_preprocess).",
            choices=CONTROL_TYPE_CHOICES,
            default=control.DEFAULT_CONTROL_TYPE,
        ),
        control_preprocess: bool = Input(
            description="Extract the control_type map from control_image (edges, depth, pose skeleton, line art, "
            "...); false: control_image already is that map (e.g. a pose skeleton from another tool).",
            default=True,
        ),
        control_strength: float = Input(
            description="ControlNet strength (A1111's control weight); 0 = no control.", default=1.0, ge=0.0, le=2.0
        ),
        control_start: float = Input(
            description="Fraction of the denoising steps where the control starts acting.", default=0.0, ge=0.0,
            le=1.0,
        ),
        control_end: float = Input(
            description="Fraction of the denoising steps where the control stops acting.", default=1.0, ge=0.0,
            le=1.0,
        ),
        control_model: Optional[str] = Input(
            description="ControlNet: any SDXL ControlNet to use instead of the baked union model: a single "
            ".safetensors file (diffusers or original ControlNet names) or a diffusers ControlNet folder, plain or "
            "union, in the forms of lora_weights (huggingface.co/..., hf://, civitai.com/models/<id> of type "
            "Controlnet, a Replicate model, a URL). Downloaded once, then cached. For a plain ControlNet, "
            "control_type only picks the preprocessor. Blank = the baked union ControlNet.",
            default=None,
        ),
        reference_image: Optional[str] = Input(
            description="IP-Adapter reference: an image (an http(s) or data: URL) whose character or style the output "
            "follows.", default=None
        ),
        reference_strength: float = Input(
            description="How strongly the output follows reference_image; 0 = not at all.", default=0.6, ge=0.0,
            le=1.0,
        ),
        reference_mode: str = Input(
            description="What of reference_image is followed: full (everything), style (only the style blocks, as "
            "InstantStyle does), composition (only the layout block).",
            choices=REFERENCE_MODE_CHOICES,
            default="full",
        ),
        detailer: str = Input(
            description="Face/hand detailer (A1111's ADetailer): detect each face and/or hand of the finished image "
            "(anime detectors), repaint it at full resolution with the same model, LoRAs and settings, and blend it "
            "back. off = the image as it is.",
            choices=DETAILER_CHOICES,
            default="off",
        ),
        detailer_strength: float = Input(
            description="Denoising strength of each detailer repaint (ADetailer's default 0.4).",
            default=0.4,
            ge=0.05,
            le=1.0,
        ),
        detailer_prompt: Optional[str] = Input(
            description="Prompt of the detailer repaints (e.g. \"detailed eyes, smile\"); [PROMPT] stands for the "
            "main prompt. Blank = the main prompt. LoRAs and embeddings of the request apply.",
            default=None,
        ),
    ) -> list[Path]:
        started = time.perf_counter()
        request = check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            aspect_ratio=aspect_ratio,
            width=width,
            height=height,
            megapixels=megapixels,
            image=image,
            mask=mask,
            prompt_strength=prompt_strength,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance=guidance,
            scheduler=scheduler,
            clip_skip=clip_skip,
            guidance_rescale=guidance_rescale,
            quality_tags=quality_tags,
            lora_weights=lora_weights,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
            hires_scale=hires_scale,
            hires_upscaler=hires_upscaler,
            hires_strength=hires_strength,
            hires_steps=hires_steps,
            upscaler_model=upscaler_model,
            embed_metadata=embed_metadata,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            use_standard_sdxl=use_standard_sdxl,
            checkpoint=checkpoint,
            go_fast=go_fast,
            more_loras=more_loras,
            embeddings_text=embeddings,
            vae_ref=vae,
            control_image=control_image,
            control_type=control_type,
            control_preprocess=control_preprocess,
            control_strength=control_strength,
            control_start=control_start,
            control_end=control_end,
            control_model=control_model,
            reference_image=reference_image,
            reference_strength=reference_strength,
            reference_mode=reference_mode,
            detailer_mode=detailer,
            detailer_strength=detailer_strength,
            detailer_prompt=detailer_prompt,
        )
        seed = resolve_seed(seed)
        print(f"Using seed: {seed}")
        logger.info("validated inputs in %.3fs", time.perf_counter() - started)

        tokens = weights.Tokens.from_inputs(hf_api_token, civitai_api_token)
        if request.checkpoint is None:
            self.preflight(request)
        detectors = self.detector_units(request)  # loaded (or refused) before any download or GPU work
        fetched: list[weights.LoraFile] = []
        # The files stay pinned in their caches until the prediction ends, also when it is cancelled (the pins are
        # released by the caches, not from `fetched`, which a cancellation can reach before the file is kept).
        with self.lora_cache.pinning(), self.checkpoint_pinning(request), self.extra_pinning(request):
            if request.checkpoint is not None:
                custom = self.fetch_checkpoint(request.checkpoint, tokens)
                request = dataclasses.replace(request, spec=self.use_checkpoint(custom))
                self.preflight(request)
            phase = time.perf_counter()
            before = self.lora_cache.stats
            for item in request.loras:
                fetched.append(self.lora_cache.fetch(item.ref, tokens, input_name=item.input_name))
            if request.loras:
                after = self.lora_cache.stats
                hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
                logger.info("fetched %d LoRAs in %.2fs (cache: %d hits, %d misses)", len(fetched),
                            time.perf_counter() - phase, hits, misses)
                self.record_metric("lora_cache_hits", hits)
                self.record_metric("lora_cache_misses", misses)
            check_lora_total(request, fetched)
            loaded = self.fetch_embeddings(request, tokens)
            user_vae = self.fetch_vae(request, tokens)
            upscaler = self.fetch_upscaler(request, tokens)
            user_controlnet = self.fetch_control_model(request, tokens)
            self.activate(request.spec.key)
            self.apply_loras(request, fetched)
            images = self.generate(request, seed, loaded, user_vae[1] if user_vae else None, upscaler=upscaler,
                                   user_controlnet=user_controlnet)
            images = self.detail(request, seed, images, detectors, loaded, user_vae[1] if user_vae else None)
        parameters = (self.parameters(request, seed, fetched, loaded, user_vae[0] if user_vae else None,
                                      self.unit_parameters(request, user_controlnet),
                                      upscaler.title if upscaler else None)
                      if request.embed_metadata else None)

        # The files are written while the safety checker runs (encoders on CPU threads, the checker mostly on the
        # accelerator); a flagged image's file is deleted before anything is returned.
        phase = time.perf_counter()
        out_dir = FsPath(tempfile.mkdtemp(prefix="predict-"))
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                saving = pool.submit(utils.save_images, images, out_dir, request.output_format,
                                     request.output_quality, parameters)
                try:
                    flags = self.safety_flags(request, images)
                finally:
                    paths = saving.result()
            paths = utils.keep_unflagged(paths, flags)
            if sum(flags):
                print(f"{sum(flags)} of {len(flags)} images were flagged by the safety checker and removed")
            if not paths:
                raise RuntimeError(
                    "All generated images were flagged as NSFW by the safety checker. Try a different prompt or "
                    "seed, or set disable_safety_checker (API only)."
                )
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing of a failed prediction stays on disk
            raise
        logger.info("saved %d %s images in %.3fs", len(paths), request.output_format, time.perf_counter() - phase)
        self.record_metric("num_outputs", len(paths))
        self.record_metric("total_inference_steps", request.steps * request.num_outputs)
        logger.info("prediction done in %.2fs", time.perf_counter() - started)
        return [Path(p) for p in paths]

    def safety_flags(self, request: Request, images: list) -> list[bool]:
        """Which images the safety checker flags (none when it is off for the request)."""
        if not request.safety_checker:
            return [False] * len(images)
        phase = time.perf_counter()
        flags = utils.nsfw_flags(self.models, images)
        logger.info("safety checker: %d of %d flagged in %.3fs", sum(flags), len(flags), time.perf_counter() - phase)
        return flags

    def cache(self, kind: str) -> weights.LoraCache:
        """The cache for files of `kind` (a weights.KINDS key), created on first use."""
        if kind not in self.caches:
            self.caches[kind] = weights.CACHE_CLASSES[kind].from_env()
        return self.caches[kind]

    def extra_pinning(self, request: Request) -> contextlib.AbstractContextManager:
        """The pinning() scopes of the embedding and VAE caches, for the kinds the request uses."""
        stack = contextlib.ExitStack()
        for kind, used in (("embedding", request.embeddings), ("VAE", request.vae), ("upscaler", request.upscaler),
                           ("ControlNet", request.control_model)):
            if used:
                stack.enter_context(self.cache(kind).pinning())
        return stack

    def fetch_embeddings(self, request: Request, tokens: weights.Tokens) -> list[embeddings.Embedding]:
        """Fetch and load every `embeddings` line, then check names and widths: all before any GPU work."""
        if not request.embeddings:
            return []
        phase = time.perf_counter()
        cache = self.cache("embedding")
        loaded = [embeddings.load(item, cache.fetch(item.ref, tokens, input_name=item.input_name))
                  for item in request.embeddings]
        embeddings.check_names(loaded)
        pipe = self.models.models[request.spec.key].txt2img
        embeddings.check_fits(pipe, loaded)
        # n-vector embeddings lengthen the prompts: they must still fit (prompts.MAX_CHUNKS) before any GPU work.
        with embeddings.applied(pipe, loaded, warn_unused=False) as expand:
            for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt),
                               *detailer_prompts(request)):
                for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
                    prompts.token_spans(tokenizer, expand(text, name), input_name=name)
        logger.info("fetched %d embeddings in %.2fs", len(loaded), time.perf_counter() - phase)
        return loaded

    def fetch_vae(self, request: Request, tokens: weights.Tokens) -> Optional[tuple[weights.LoraFile, object]]:
        """(the fetched `vae` file, its loaded AutoencoderKL); the last one used stays loaded."""
        if request.vae is None:
            return None
        phase = time.perf_counter()
        file = self.cache("VAE").fetch(request.vae, tokens, input_name="vae")
        key = f"{file.ref.canonical_id}:{file.sha256}"
        if self.user_vae is None or self.user_vae[0] != key:
            self.user_vae = None  # the previous one goes before the next is loaded
            baked = self.models.models[next(iter(utils.MODEL_SPECS))].txt2img.vae
            loaded = vae.load_vae(file, self.weights_dir, self.models.device, self.models.dtype, baked)
            self.user_vae = (key, loaded)
            logger.info("loaded vae %s in %.2fs (force_upcast=%s)", file.ref.display, time.perf_counter() - phase,
                        loaded.config.force_upcast)
        return file, self.user_vae[1]

    def fetch_upscaler(self, request: Request, tokens: weights.Tokens) -> Optional[upscale.Upscaler]:
        """The hires fix's model upscaler, fetched and loaded before any GPU work: `upscaler_model` (the last one
        used stays loaded), else the baked one for hires_upscaler esrgan; None for the other upscalers."""
        if request.hires_size is None or request.hires_upscaler != "esrgan":
            return None
        if request.upscaler is None:
            return self.upscalers.baked()
        cache = self.cache("upscaler")
        file = cache.fetch(request.upscaler, tokens, input_name="upscaler_model")
        try:
            return self.upscalers.user(file)
        except upscale.UpscalerError as err:
            cache.discard(file.ref)  # as for control_model: a file that does not load is not kept
            raise utils.InputError(str(err)) from err

    def fetch_control_model(self, request: Request, tokens: weights.Tokens) -> Optional[control.UserControlNet]:
        """The request's `control_model`, fetched and loaded (kept loaded for the next request: ControlNets.user),
        checked to fit the request's base model; None for the baked ControlNet."""
        if request.control_model is None:
            return None
        phase = time.perf_counter()
        cache = self.cache("ControlNet")
        file = cache.fetch(request.control_model, tokens, input_name="control_model")
        unet_config = self.models.models[request.spec.key].txt2img.unet.config
        try:
            loaded = self.controlnets.user(file, unet_config, request.control.type)
        except utils.UnloadableFileError:
            # Passed the download's key check but does not load (a partial file, say): not kept, so the next
            # request fetches it again rather than failing on the cached file. (A ControlNet that loads but does not
            # fit this base model or control_type stays: it may fit another request.)
            cache.discard(file.ref)
            raise
        logger.info("control_model %s ready in %.2fs", file.ref.display, time.perf_counter() - phase)
        return loaded

    def checkpoint_pinning(self, request: Request) -> contextlib.AbstractContextManager:
        """The checkpoint cache's pinning() scope (creating the cache) when the request names a checkpoint."""
        if request.checkpoint is None:
            return contextlib.nullcontext()
        if self.checkpoint_cache is None:
            self.checkpoint_cache = weights.CheckpointCache.from_env()
        return self.checkpoint_cache.pinning()

    def fetch_checkpoint(self, ref: weights.WeightsRef, tokens: weights.Tokens) -> weights.LoraFile:
        """The verified checkpoint file, pinned until the prediction ends (see checkpoint_pinning)."""
        if self.checkpoint_cache is None:
            self.checkpoint_cache = weights.CheckpointCache.from_env()
        phase = time.perf_counter()
        before = self.checkpoint_cache.stats["misses"]
        file = self.checkpoint_cache.fetch(ref, tokens, input_name="checkpoint")
        miss = self.checkpoint_cache.stats["misses"] - before
        logger.info("fetched checkpoint %s in %.2fs (%s)", file.ref.display, time.perf_counter() - phase,
                    "downloaded" if miss else "cache hit")
        self.record_metric("checkpoint_cache_misses", miss)
        return file

    def use_checkpoint(self, file: weights.LoraFile) -> utils.ModelSpec:
        """Make `file` the resident custom model (loading it unless it already is) and return its spec. At most one
        custom model is kept beside the baked ones: the previous one is dropped first."""
        key = file.ref.canonical_id
        if key in self.models.models:
            return self.models.models[key].spec
        phase = time.perf_counter()
        info = utils.inspect_checkpoint(file.path, v_prediction=file.v_prediction)  # before dropping anything
        self.drop_custom()
        self.activate(None)  # the new model loads straight into accelerator memory: make room first
        baked = [self.models.models[k] for k in utils.MODEL_SPECS]
        model = utils.load_checkpoint_model(
            file.path, self.weights_dir, self.models.device, self.models.dtype, baked[0].txt2img.vae, info,
            utils.checkpoint_spec(key, file.ref.display), baked,
        )
        self.models.models[key] = model
        self.mergers[key] = lora.LoraMerger(model.txt2img)
        self.custom_key = key
        seconds = time.perf_counter() - phase
        logger.info("loaded checkpoint %s in %.2fs", file.ref.display, seconds)
        self.record_metric("checkpoint_load_seconds", seconds)
        return model.spec

    def drop_custom(self) -> None:
        """Unload the resident custom model; its LoRAs are taken out first (its text encoders or VAE may be a
        baked model's)."""
        if self.custom_key is None:
            return
        self.mergers.pop(self.custom_key).release()
        del self.models.models[self.custom_key]
        if self.models.resident == self.custom_key:
            self.models.resident = None
        self.custom_key = None
        gc.collect()
        if self.models.device.type == "cuda":
            torch.cuda.empty_cache()

    def activate(self, key: Optional[str]) -> None:
        """Make `key`'s model the one in accelerator memory (None: none); the outgoing model's LoRAs are taken out
        first, so it waits in CPU memory as its base weights. No-op on the CPU."""
        previous = self.models.resident
        if previous == key or self.models.device.type == "cpu":
            return
        phase = time.perf_counter()
        if previous in self.mergers:
            self.mergers[previous].release()
        utils.make_resident(self.models, key)
        logger.info("moved %s into %s memory in %.2fs (%s out)", key or "nothing", self.models.device.type,
                    time.perf_counter() - phase, previous or "nothing")

    def preflight(self, request: Request) -> None:
        """Checks that need the loaded model, still before any download or GPU work: the prompts parse and fit
        (A1111 syntax, at most prompts.MAX_CHUNKS chunks), clip_skip fits the text encoders, the sampler can
        sample this checkpoint (v-prediction)."""
        model = self.models.models[request.spec.key]
        for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt),
                           *detailer_prompts(request)):
            for tokenizer in (model.txt2img.tokenizer, model.txt2img.tokenizer_2):
                prompts.token_spans(tokenizer, text, input_name=name)
        layers = min(model.txt2img.text_encoder.config.num_hidden_layers,
                     model.txt2img.text_encoder_2.config.num_hidden_layers)
        if request.clip_skip > layers:
            raise utils.InputError(f"clip_skip: expected 1 to {layers} for this model's text encoders, "
                                   f"got {request.clip_skip}")
        utils.make_scheduler(request.scheduler, model.scheduler_config)

    def unit_parameters(self, request: Request,
                        user_controlnet: Optional[control.UserControlNet] = None) -> dict[str, str]:
        """The A1111 extensions' infotext entries of this request's control unit."""
        units = []
        if request.control is not None:
            title = user_controlnet.title if user_controlnet is not None else self.controlnets.title
            units.append(control.infotext(request.control, title, (request.width, request.height)))
        if request.reference is not None:
            units.append(reference.infotext(request.reference, self.references.title))
        entries = {f"ControlNet {i}": unit for i, unit in enumerate(units)}
        if request.reference is not None and request.reference.mode != "full":
            entries["IP-Adapter mode"] = request.reference.mode  # InstantStyle blocks: no A1111 field for it
        if request.detailer is not None:
            entries.update(detailer.infotext(request.detailer))
        return entries

    @staticmethod
    def parameters(request: Request, seed: int, fetched: list[weights.LoraFile],
                   loaded: Optional[list] = None, vae_file: Optional[weights.LoraFile] = None,
                   extra: Optional[dict[str, str]] = None, upscaler_title: Optional[str] = None) -> list[str]:
        """Each image's A1111 infotext (its own seed); built from token-free values only."""
        hashes = utils.lora_hashes([(file.ref.display, file.sha256) for file in fetched])
        ti_hashes = utils.lora_hashes([(emb.name, emb.sha256) for emb in loaded or []])
        texts = []
        for i in range(request.num_outputs):
            settings = {
                "Steps": request.steps,
                "Sampler": request.scheduler,
                "CFG scale": request.guidance,
                "Seed": seed + i,
                "Size": f"{request.width}x{request.height}",
                "Model": request.spec.title,
                "Denoising strength": request.strength if request.mode != "txt2img" else None,
                "Clip skip": request.clip_skip,
                "CFG Rescale phi": request.guidance_rescale or None,
                "Hires upscale": request.hires_scale if request.hires_size else None,
                "Hires steps": request.hires_steps if request.hires_size else None,
                "Hires upscaler": (upscaler_title or upscale.A1111_NAMES[request.hires_upscaler])
                if request.hires_size else None,
                "Lora hashes": hashes or None,
                "TI hashes": ti_hashes or None,
                "VAE hash": vae_file.sha256[:10] if vae_file else None,
                "VAE": vae_file.ref.display if vae_file else None,
                "Step cache interval": stepcache.DEFAULT_INTERVAL if request.go_fast else None,
                "Guidance cutoff timestep": (stepcache.GUIDANCE_CUTOFF_TIMESTEP if request.guided_images is not None
                                             else None),
                **(extra or {}),
                "Version": "sdxl-lora-cog",
            }
            if request.hires_size:
                settings["Denoising strength"] = request.hires_strength
            texts.append(utils.a1111_parameters(request.prompt, request.negative_prompt, settings))
        return texts

    def apply_loras(self, request: Request, fetched: list[weights.LoraFile]) -> None:
        """Merge the requested LoRAs into the selected model (the same file twice adds its scales)."""
        by_key: dict[str, lora.LoraRequest] = {}
        for item, file in zip(request.loras, fetched):
            key = file.ref.canonical_id
            if key in by_key:
                previous = by_key[key]
                by_key[key] = dataclasses.replace(previous, scale=previous.scale + item.scale)
                continue
            by_key[key] = lora.LoraRequest(
                key=key,
                path=file.path,
                scale=item.scale,
                name=f"{item.input_name} ({file.ref.display})",
                embeddings_path=file.embeddings_path,
                token_map=file.special_params or {},
            )
            if file.trigger_words:
                print(f"{item.input_name} trigger words: {', '.join(file.trigger_words)}")
        # A module shared with another model (identical text encoders) must hold only this model's LoRAs, and each
        # merger must capture true base weights: take the other models' LoRAs out of shared modules first.
        mine = self._lora_modules(request.spec.key)
        for key, merger in self.mergers.items():
            if key != request.spec.key and mine & self._lora_modules(key):
                merger.reset()
        # In a fixed order (by file), so that the order of LoRAs across the three inputs cannot change the sums.
        report = self.mergers[request.spec.key].apply(sorted(by_key.values(), key=lambda r: r.key))
        if report.changed:
            logger.info("applied %d LoRAs to %s (%d layers written) in %.3fs", len(by_key), request.spec.key,
                        report.layers_written, report.seconds)

    def _lora_modules(self, key: str) -> set[int]:
        pipe = self.models.models[key].txt2img
        return {id(getattr(pipe, name)) for name in ("unet", "text_encoder", "text_encoder_2")}

    def generate(self, request: Request, seed: int, loaded: Optional[list] = None, user_vae=None,
                 upscaler: Optional[upscale.Upscaler] = None,
                 user_controlnet: Optional[control.UserControlNet] = None) -> list:
        """Run the diffusers pipeline for the request; image i uses its own CPU generator seeded seed + i."""
        phase = time.perf_counter()
        model = self.models.models[request.spec.key]
        run = self.control_run(request, user_controlnet)
        pipe = control.pipeline(model, request.mode, request.go_fast, run, (request.width, request.height),
                                guided_images=request.guided_images)
        pipe.scheduler = utils.make_scheduler(request.scheduler, model.scheduler_config)
        merger = self.mergers[request.spec.key]
        # Encoded with the txt2img pipeline: it holds the tokenizers that LoRA PTI tokens were added to. Embedding
        # tokens exist only while encoding (embeddings.applied restores tokenizers and tables exactly).
        with embeddings.applied(model.txt2img, loaded or []) as expand:
            embeds = prompts.encode_prompts(
                model.txt2img,
                merger.expand_prompt(expand(request.prompt, "prompt")),
                merger.expand_prompt(expand(request.negative_prompt, "negative_prompt")),
                clip_skip=request.clip_skip,
                zero_empty_negative=request.zero_negative,
                num_images_per_prompt=request.num_outputs,
            )
            if request.detailer is not None and request.detailer.prompt is not None:
                expand(request.detailer.prompt, "detailer_prompt")  # an embedding used there only is used, too
        logger.info("encoded prompts (%d chunks) in %.3fs", embeds.chunks, time.perf_counter() - phase)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(request.num_outputs)]
        kwargs = dict(
            **embeds.as_pipeline_kwargs(),
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            guidance_rescale=request.guidance_rescale,
            generator=generators,
            callback_on_step_end=Progress("denoising").step_callback(),
        )
        if request.mode != "img2img":  # img2img takes its size from the (already resized) image
            kwargs.update(width=request.width, height=request.height)
        if request.mode != "txt2img":
            kwargs.update(image=request.init_image, strength=request.strength)
        if request.mode == "inpaint":
            kwargs.update(mask_image=request.mask_image)
        with vae.swapped(model, user_vae), \
                self.references.attached(model.txt2img, request.reference, request.guidance > 1.0,
                                         model.runner) as extra:
            kwargs.update(extra)
            if request.hires_size is None:
                images = pipe(**kwargs).images
            else:
                images = self.hires_fix(request, model, pipe, kwargs, run, upscaler)
        width, height = request.hires_size or (request.width, request.height)
        logger.info(
            "generated %d %dx%d images (%s, %s, %d steps) in %.2fs",
            len(images), width, height, request.mode, request.scheduler, request.steps,
            time.perf_counter() - phase,
        )
        return images

    def control_run(self, request: Request,
                    user_controlnet: Optional[control.UserControlNet] = None) -> Optional[control.ControlRun]:
        """The request's ControlNet (the user's, else the baked one, loaded on first use) and control map, or None
        without control."""
        if request.control is None:
            return None
        phase = time.perf_counter()
        controlnet = user_controlnet.model if user_controlnet is not None else self.controlnets.get()
        unit = request.control
        control_map = self.preprocessors.map(unit.type, unit.image, unit.preprocess)
        logger.info("control map %s (%s) in %.3fs", unit.type, "extracted" if unit.preprocess else "given",
                    time.perf_counter() - phase)
        return control.ControlRun(request=unit, controlnet=controlnet, map=control_map,
                                  label=user_controlnet.label if user_controlnet is not None else "")

    def detector_units(self, request: Request) -> list[tuple[str, detailer.Detector]]:
        """The detailer's (unit, detector) pairs in the order they run; the detectors load on first use."""
        if request.detailer is None:
            return []
        return [(unit, self.detectors.get(unit)) for unit in request.detailer.units]

    def detail(self, request: Request, seed: int, images: list, units: list[tuple[str, detailer.Detector]],
               loaded: Optional[list] = None, user_vae=None) -> list:
        """The face/hand detailer over the finished images (after the hires fix): each detected box repainted by an
        inpainting pass of the request's model, its LoRAs and embeddings, sampler, steps and guidance. As ADetailer
        does by default, the pass runs without the request's ControlNet unit and reference image."""
        if request.detailer is None:
            return images
        model = self.models.models[request.spec.key]
        merger = self.mergers[request.spec.key]
        with embeddings.applied(model.txt2img, loaded or [], warn_unused=False) as expand:
            embeds = prompts.encode_prompts(
                model.txt2img,
                merger.expand_prompt(expand(detailer.unit_prompt(request.detailer, request.prompt), "detailer_prompt")),
                merger.expand_prompt(expand(request.negative_prompt, "negative_prompt")),
                clip_skip=request.clip_skip,
                zero_empty_negative=request.zero_negative,
            )
        painter = detailer.Painter(
            pipeline=lambda: model.pipeline("inpaint", request.go_fast),
            scheduler=lambda: utils.make_scheduler(request.scheduler, model.scheduler_config),
            embeds=embeds.as_pipeline_kwargs(),
            steps=request.steps,
            guidance=request.guidance,
            guidance_rescale=request.guidance_rescale,
            strength=request.detailer.strength,
        )
        native = model.txt2img.unet.config.sample_size * model.txt2img.vae_scale_factor  # 1024 for SDXL
        with vae.swapped(model, user_vae):
            return detailer.run(images, seed, units, painter, native)

    def control_run_at(self, run: Optional[control.ControlRun], size: tuple[int, int]) -> Optional[control.ControlRun]:
        """`run` with its map made again at `size` (the hires pass), as A1111's "Hr Option: Both" does: the control
        image fitted to that size and preprocessed there, not the first pass's map enlarged."""
        if run is None or run.map.size == tuple(size):
            return run
        unit = run.request
        phase = time.perf_counter()
        image = control.crop_and_resize(unit.source or unit.image, size)
        control_map = self.preprocessors.map(unit.type, image, unit.preprocess)
        logger.info("control map %s at %dx%d (hires pass) in %.3fs", unit.type, *size, time.perf_counter() - phase)
        return dataclasses.replace(run, map=control_map)

    def hires_fix(self, request: Request, model: utils.LoadedModel, pipe, kwargs: dict,
                  run: Optional[control.ControlRun] = None, upscaler: Optional[upscale.Upscaler] = None) -> list:
        """A1111's hires fix: first pass, upscale (latents, or pixels with Lanczos or a model upscaler), then an
        img2img pass at the final size; its VAE encode and decode run in tiles when the size needs it
        (sdxl/tiled_vae.py)."""
        phase = time.perf_counter()
        latent = request.hires_upscaler == "latent"
        first = pipe(**kwargs, output_type="latent" if latent else "pil").images
        refine = control.pipeline(model, "img2img", request.go_fast, self.control_run_at(run, request.hires_size),
                                  request.hires_size, guided_images=request.guided_images)
        tiled = tiled_vae.should_tile(refine.vae, request.hires_size, refine._execution_device,
                                      batch=request.num_outputs)
        upscaled = utils.hires_upscale(first, request.hires_upscaler, request.hires_size, upscaler)
        if tiled and not latent:  # what the pipeline would encode, encoded in tiles
            upscaled = tiled_vae.encode_images(refine, upscaled, kwargs["generator"])
        refine.scheduler = utils.make_scheduler(request.scheduler, model.scheduler_config)
        second = {k: v for k, v in kwargs.items() if k not in ("width", "height", "image", "strength", "mask_image")}
        second.update(image=upscaled, strength=request.hires_strength, num_inference_steps=request.hires_steps,
                      callback_on_step_end=Progress("hires pass").step_callback())
        if tiled:
            latents = refine(**second, output_type="latent").images
            images = tiled_vae.decode_latents(refine, latents)
        else:
            images = refine(**second).images
        logger.info("hires fix pass to %dx%d in %.2fs%s", *request.hires_size, time.perf_counter() - phase,
                    " (tiled VAE)" if tiled else "")
        return images
