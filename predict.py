"""Cog surface of the SDXL / Illustrious XL LoRA model: inputs, validation and orchestration only.

The model side (loading, sizes, schedulers, safety, saving) is in utils.py, LoRA sources in weights.py, LoRA
merging in lora.py and prompt encoding in prompts.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Optional

import torch
from cog import BasePredictor, Input, Path, Secret

import utils

logger = logging.getLogger("predict")

# Literal lists: Cog's static schema generator (cog build) only resolves literal choices.
ASPECT_RATIO_CHOICES = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"]
MEGAPIXEL_CHOICES = ["1", "0.25"]
OUTPUT_FORMAT_CHOICES = ["webp", "jpg", "png"]
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


@dataclass(frozen=True)
class Request:
    """Everything predict() needs, validated and resolved before any download or GPU work."""

    spec: utils.ModelSpec
    mode: str  # txt2img | img2img | inpaint
    prompt: str
    negative_prompt: str
    width: int
    height: int
    init_image: object  # PIL image or None
    mask_image: object
    strength: float
    steps: int
    guidance: float
    scheduler: str
    num_outputs: int
    output_format: str
    output_quality: int
    safety_checker: bool


def check_inputs(
    *,
    prompt: str,
    negative_prompt: Optional[str],
    aspect_ratio: str,
    width: Optional[int],
    height: Optional[int],
    megapixels: str,
    image,
    mask,
    prompt_strength: float,
    num_outputs: int,
    num_inference_steps: int,
    guidance: Optional[float],
    scheduler: str,
    output_format: str,
    output_quality: int,
    disable_safety_checker: bool,
    use_standard_sdxl: bool,
) -> Request:
    """Validate every input (also when called without the server's schema checks) and resolve defaults."""

    def expect(ok: bool, message: str) -> None:
        if not ok:
            raise utils.InputError(message)

    expect(isinstance(prompt, str) and prompt.strip() != "", f"prompt: expected non-empty text, got {prompt!r}")
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
    if aspect_ratio != "custom":
        expect(width is None and height is None,
               f'width/height: only used with aspect_ratio "custom", got aspect_ratio {aspect_ratio!r} '
               f"with width={width} height={height}")

    spec = utils.model_spec(use_standard_sdxl)
    init_image = mask_image = None
    mode = "txt2img"
    if aspect_ratio == "custom":
        size = utils.check_custom_size(width, height)
    else:
        size = utils.preset_size(aspect_ratio, megapixels)
    if image is not None:
        mode = "inpaint" if mask is not None else "img2img"
        source = utils.open_image(image, "image")
        if aspect_ratio != "custom":
            size = utils.size_for_image(source.size, megapixels)
        init_image = utils.load_rgb(source, size, "image")
        if mask is not None:
            mask_image = utils.load_mask(utils.open_image(mask, "mask"), size)
        effective_steps = int(num_inference_steps * prompt_strength)
        expect(effective_steps >= 1,
               f"prompt_strength: with num_inference_steps={num_inference_steps} a strength of {prompt_strength} "
               "runs no denoising step; expected num_inference_steps x prompt_strength >= 1")

    return Request(
        spec=spec,
        mode=mode,
        prompt=prompt,
        negative_prompt=spec.negative_prompt if negative_prompt is None else negative_prompt,
        width=size[0],
        height=size[1],
        init_image=init_image,
        mask_image=mask_image,
        strength=float(prompt_strength),
        steps=int(num_inference_steps),
        guidance=spec.guidance if guidance is None else float(guidance),
        scheduler=spec.scheduler if scheduler == "default" else scheduler,
        num_outputs=int(num_outputs),
        output_format=output_format,
        output_quality=int(output_quality),
        safety_checker=not disable_safety_checker,
    )


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
        self.models = utils.load_models(weights_dir, device, dtype)

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
        image: Optional[Path] = Input(
            description="Input image for img2img (or inpainting with mask). The output keeps its aspect ratio "
            "at the megapixels size, unless aspect_ratio is custom.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Inpainting mask for image: white is repainted, black is kept.", default=None
        ),
        prompt_strength: float = Input(
            description="img2img/inpainting strength: 1.0 fully repaints the image, 0 keeps it.",
            default=0.8,
            ge=0.0,
            le=1.0,
        ),
        num_outputs: int = Input(description="Number of images; image i uses seed + i.", default=1, ge=1, le=4),
        num_inference_steps: int = Input(description="Denoising steps; 25-30 is typical.", default=28, ge=1, le=50),
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
            description="Allow speed optimisations that may change the image slightly. This build has no lossy "
            "fast path yet, so images are identical either way.",
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
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            use_standard_sdxl=use_standard_sdxl,
        )
        for name, value in (("lora_weights", lora_weights), ("extra_lora", extra_lora)):
            if value:
                raise utils.InputError(f"{name}: LoRAs are not supported yet by this build, got {value!r}")
        seed = resolve_seed(seed)
        print(f"Using seed: {seed}")
        logger.info("validated inputs in %.3fs", time.perf_counter() - started)

        images = self.generate(request, seed)
        if request.safety_checker:
            phase = time.perf_counter()
            flags = utils.nsfw_flags(self.models, images)
            images = utils.drop_flagged(images, flags)
            logger.info("safety checker: %d of %d flagged in %.3fs", sum(flags), len(flags), time.perf_counter() - phase)
            if sum(flags):
                print(f"{sum(flags)} of {len(flags)} images were flagged by the safety checker and removed")
            if not images:
                raise RuntimeError(
                    "All generated images were flagged as NSFW by the safety checker. Try a different prompt or "
                    "seed, or set disable_safety_checker (API only)."
                )

        phase = time.perf_counter()
        out_dir = FsPath(tempfile.mkdtemp(prefix="predict-"))
        paths = utils.save_images(images, out_dir, request.output_format, request.output_quality)
        logger.info("saved %d %s images in %.3fs", len(paths), request.output_format, time.perf_counter() - phase)
        self.record_metric("num_outputs", len(paths))
        self.record_metric("total_inference_steps", request.steps * request.num_outputs)
        logger.info("prediction done in %.2fs", time.perf_counter() - started)
        return [Path(p) for p in paths]

    def generate(self, request: Request, seed: int) -> list:
        """Run the diffusers pipeline for the request; image i uses its own CPU generator seeded seed + i."""
        phase = time.perf_counter()
        model = self.models.models[request.spec.key]
        pipe = model.pipeline(request.mode)
        pipe.scheduler = utils.make_scheduler(request.scheduler, model.txt2img.scheduler.config)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(request.num_outputs)]
        kwargs = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_images_per_prompt=request.num_outputs,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=generators,
            width=request.width,
            height=request.height,
        )
        if request.mode != "txt2img":
            kwargs.update(image=request.init_image, strength=request.strength)
        if request.mode == "inpaint":
            kwargs.update(mask_image=request.mask_image)
        images = pipe(**kwargs).images
        logger.info(
            "generated %d %dx%d images (%s, %s, %d steps) in %.2fs",
            len(images), request.width, request.height, request.mode, request.scheduler, request.steps,
            time.perf_counter() - phase,
        )
        return images
