"""ControlNet: the baked union ControlNet, control maps sized to the output, and the controlled denoising step.

How a controlled image is made. The request's pipeline stays the plain SDXL pipeline of its mode (txt2img,
img2img, inpainting, the hires fix's second pass), with every feature it has (guidance rescale, v-prediction,
LoRAs merged into its UNet). Only its UNet is replaced, through `from_pipe(..., unet=ControlledUNet(...))` as
graphs.py and stepcache.py do: on each step inside the guidance window the stand-in first runs the ControlNet on
the step's inputs and the control map, then the UNet with the ControlNet's residuals, exactly as diffusers'
ControlNet pipelines call the two (test_control.py compares with StableDiffusionXLControlNetUnionPipeline bit for
bit). Outside the window, or at strength 0, the UNet runs alone, so those steps are bitwise the plain ones.

On CUDA both calls replay CUDA graphs of the model's GraphRunner (graphs.py): the ControlNet's graph is captured
at conditioning scale 1 and its residuals are scaled after the replay, with the same multiplication the ControlNet
does itself, so a new strength needs no new graph.

The control map is fitted to the output as A1111's ControlNet "Crop and Resize" does: scaled to cover the output
size, keeping its aspect ratio, and the overflow cut off equally on both sides (`crop_and_resize`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import weakref
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from sdxl import graphs
logger = logging.getLogger(__name__)

# --- The baked ControlNet ---------------------------------------------------------------------------------------
CONTROLNET_DIR = "controlnet-union-promax"  # under WEIGHTS_DIR; written by script/download_weights and tiny_weights
CONTROLNET_TITLE = "controlnet-union-sdxl-1.0-promax"  # the name A1111 users give the file (infotext "Model")

# Where script/download_weights gets it. Facts from docs/components.md §1.1 (stored Hub tree page of the revision;
# the sha256 and size from the InvokeAI repack's blob page and four independent mirrors' LFS pointers). The repo
# keeps the promax files under non-diffusers names: they are written as a diffusers folder (`dest`), as xinsir's
# own promax scripts say to do. config_promax.json is a small git file: it is checked against the Hub's git blob
# id at download, and its num_control_type (8 for promax) when loaded (load_controlnet).
CONTROLNET_SOURCE: dict[str, Any] = {
    "folder": CONTROLNET_DIR,
    "repo": "xinsir/controlnet-union-sdxl-1.0",
    "revision": "801a4a3fa3d4c936f4feea95b98607bc6726f80c",
    "licence": "apache-2.0 (model card front matter)",
    "files": [
        {"path": "config_promax.json", "dest": "config.json", "sha256": None, "size": None},
        {"path": "diffusion_pytorch_model_promax.safetensors", "dest": "diffusion_pytorch_model.safetensors",
         "sha256": "9fae2e50cb431bfcbe05822b59ec2228df545ef27f711dea8949e9f4ed9f7cdc", "size": 2_513_342_408},
    ],
}


@dataclasses.dataclass(frozen=True)
class ControlType:
    mode: int  # the union model's control_mode index (xinsir6/ControlNetPlus README, "ControlMode")
    module: str  # the A1111 ControlNet extension's preprocessor name for what we run (infotext "Module")
    processor_res: Optional[int] = None  # the short side its map is made at; None: the output size ("Pixel Perfect")


# Union promax modes: 0 openpose, 1 depth, 2 thick line (scribble/hed/softedge), 3 thin line (canny/lineart),
# 4 normal, 5 segment, 6 tile, 7 repaint.
CONTROL_TYPES: dict[str, ControlType] = {
    "canny": ControlType(3, "canny"),
    "depth": ControlType(1, "depth_anything_v2"),
    "openpose": ControlType(0, "openpose"),  # body only (sdxl/pose.py), as A1111's "openpose" module draws
    "lineart": ControlType(3, "lineart_realistic", processor_res=512),  # sdxl/lines.py, at A1111's default res
    "lineart_anime": ControlType(3, "lineart_anime", processor_res=512),
    "softedge": ControlType(2, "softedge_hed", processor_res=512),
    "scribble": ControlType(2, "scribble_xdog"),
    "tile": ControlType(6, "tile_resample"),
}
DEFAULT_CONTROL_TYPE = "canny"  # needs no preprocessor model, and "thin line" is the union model's broadest mode


# --- Requests -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """A validated control unit: the control image already fitted to the output size."""

    image: Image.Image  # RGB, crop-and-resized to the (first pass) output size
    type: str
    preprocess: bool
    strength: float
    start: float
    end: float


def check_control(image_path, control_type: str, preprocess: bool, strength: float, start: float, end: float,
                  size: tuple[int, int]) -> Optional[ControlRequest]:
    """Validate the control inputs; None when there is no control image, or when the control cannot act (strength 0
    or an empty guidance window), which then gives exactly the image without control."""
    import utils

    if control_type not in CONTROL_TYPES:
        raise utils.InputError(f"control_type: expected one of {list(CONTROL_TYPES)}, got {control_type!r}")
    if not 0.0 <= strength <= 2.0:
        raise utils.InputError(f"control_strength: expected 0 to 2, got {strength}")
    for name, value in (("control_start", start), ("control_end", end)):
        if not 0.0 <= value <= 1.0:
            raise utils.InputError(f"{name}: expected 0 to 1, got {value}")
    if image_path is None:
        return None
    source = utils.open_image(image_path, "control_image")
    rgb = utils.load_rgb(source, source.size, "control_image")  # decoded (and EXIF-rotated) at its own size
    if strength == 0.0 or end <= start:
        return None
    return ControlRequest(image=crop_and_resize(rgb, size), type=control_type, preprocess=bool(preprocess),
                          strength=float(strength), start=float(start), end=float(end))


def crop_and_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A1111 ControlNet's "Crop and Resize": scale to cover `size` with the aspect ratio kept, then cut the overflow
    off equally on both sides (the centre of the image stays)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


# --- Loading ------------------------------------------------------------------------------------------------------
def legacy_model_hash(path: Path) -> str:
    """A1111's short model hash (sd_models.model_hash, what the ControlNet extension shows in "Model"): sha256 of
    the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def load_controlnet(folder: Path, device: torch.device, dtype: torch.dtype):
    """The baked union ControlNet (diffusers folder), checked to know every control type of CONTROL_TYPES."""
    from diffusers import ControlNetUnionModel

    import utils

    if not (folder / "config.json").is_file():
        raise utils.WeightsMissingError(
            f"ControlNet not found in {folder}: run script/download_weights (or script/tiny_weights.py for tests)")
    model = ControlNetUnionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    needed = max(t.mode for t in CONTROL_TYPES.values()) + 1
    if model.config.num_control_type < needed:
        raise utils.WeightsMissingError(f"the ControlNet in {folder} has {model.config.num_control_type} control "
                                        f"types; the union promax model ({needed}+) is expected")
    return model


class ControlNets:
    """The baked ControlNet, loaded on the first request that uses it (text-to-image never pays for it)."""

    def __init__(self, weights_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.folder = Path(weights_dir) / CONTROLNET_DIR
        self.device, self.dtype = device, dtype
        self.model = None
        self.title = CONTROLNET_TITLE

    def get(self):
        if self.model is None:
            phase = time.perf_counter()
            self.model = load_controlnet(self.folder, self.device, self.dtype)
            self.title = f"{CONTROLNET_TITLE} [{legacy_model_hash(self.folder / 'diffusion_pytorch_model.safetensors')}]"
            logger.info("loaded ControlNet %s in %.2fs (first use)", self.title, time.perf_counter() - phase)
        return self.model


# --- The controlled step ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ControlStep:
    """What the stand-in needs for one denoising loop."""

    map: Image.Image  # the control map at this pass's output size
    mode: int
    strength: float
    start: float
    end: float

    def acts_at(self, step: int, total: int) -> bool:
        # diffusers' ControlNet pipelines' rule (controlnet_keep): the whole step lies inside [start, end].
        return self.strength != 0.0 and not (step / total < self.start or (step + 1) / total > self.end)


def _fingerprint(module: torch.nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


# Where the ControlNet's weights were when each runner's graphs were captured (the runner itself checks the UNet's).
_controlnet_fingerprints: "weakref.WeakKeyDictionary[graphs.GraphRunner, tuple]" = weakref.WeakKeyDictionary()


class ControlledUNet(graphs.UNetStandIn):
    """Stands in for the UNet of a pipeline: a ControlNet step before each UNet step of the guidance window."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module,
                 runner: Optional[graphs.GraphRunner] = None) -> None:
        super().__init__(unet)
        self.controlnet = controlnet
        self.runner = runner
        self.pipeline_ref = None  # weakref to the pipeline that owns this stand-in (its num_timesteps)
        self.step: Optional[ControlStep] = None
        self.calls = 0
        self.controlled_calls = 0
        self.eager_calls = 0
        self._conds: dict[int, torch.Tensor] = {}

    def begin(self, step: Optional[ControlStep] = None) -> None:
        """Before a denoising loop: the control of this loop (None: plain UNet steps)."""
        from diffusers.image_processor import VaeImageProcessor

        self.step, self.calls, self.controlled_calls, self._conds = step, 0, 0, {}
        if step is not None:
            # The processor and settings diffusers' ControlNet pipelines use: RGB in [0, 1], not normalised.
            processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
            image = processor.preprocess(step.map, height=step.map.height, width=step.map.width).to(torch.float32)
            self._conds[1] = image.to(self.controlnet.device, self.controlnet.dtype)
        if self.runner is not None:
            self.runner.begin(self.unet)
            fingerprint = _fingerprint(self.controlnet)
            if _controlnet_fingerprints.get(self.runner, fingerprint) != fingerprint:  # moved: graphs are stale
                self.runner.drop()
            _controlnet_fingerprints[self.runner] = fingerprint

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs: Any):
        index = self.calls
        self.calls += 1
        total = self.pipeline_ref().num_timesteps if self.pipeline_ref is not None else index + 1
        if self.step is None or not self.step.acts_at(index, total):
            return self._unet(sample, timestep, encoder_hidden_states, return_dict, kwargs, None)
        self.controlled_calls += 1
        residuals = self._controlnet(sample, timestep, encoder_hidden_states, kwargs.get("added_cond_kwargs") or {})
        return self._unet(sample, timestep, encoder_hidden_states, return_dict, kwargs, residuals)

    def _cond(self, batch: int) -> torch.Tensor:
        if batch not in self._conds:
            self._conds[batch] = self._conds[1].repeat(batch, 1, 1, 1)
        return self._conds[batch]

    def _controlnet(self, sample, timestep, encoder_hidden_states, added: dict) -> tuple:
        """(down residuals..., mid residual) of the ControlNet, scaled by the strength."""
        step = self.step
        cond = self._cond(sample.shape[0])
        control_type = torch.zeros(self.controlnet.config.num_control_type)
        control_type[step.mode] = 1
        control_type = control_type.reshape(1, -1).to(sample.device, encoder_hidden_states.dtype).repeat(
            sample.shape[0], 1)
        added = {k: added[k] for k in ("text_embeds", "time_ids") if k in added}

        def run(s, conditioning_scale: float):
            down, mid = self.controlnet(
                s["sample"], s["timestep"], s["encoder_hidden_states"], controlnet_cond=[s["cond"]],
                control_type=s["control_type"], control_type_idx=[step.mode], conditioning_scale=conditioning_scale,
                added_cond_kwargs=dict(text_embeds=s["text_embeds"], time_ids=s["time_ids"]), return_dict=False)
            return (*down, mid)

        inputs = graphs.graph_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs=added)
        if self.runner is None or inputs is None:
            eager = dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states, cond=cond,
                         control_type=control_type, **added)
            return run(eager, step.strength)
        inputs.update(cond=cond, control_type=control_type)
        # Captured at scale 1 (x * 1.0 is x), scaled here by the same multiplication the ControlNet does itself.
        outputs = self.runner.run(f"controlnet:{step.mode}", lambda s: run(s, 1.0), inputs)
        return tuple(out * step.strength for out in outputs)

    def _unet(self, sample, timestep, encoder_hidden_states, return_dict: bool, kwargs: dict, residuals):
        extra = {}
        if residuals is not None:
            extra = dict(down_block_additional_residuals=list(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1])
        inputs = (graphs.graph_inputs(sample, timestep, encoder_hidden_states, **kwargs)
                  if self.runner is not None else None)
        if inputs is None:
            self.eager_calls += self.runner is not None
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs, **extra)
        if residuals is None:  # the same graph as graphs.GraphedUNet's plain steps
            (out,) = self.runner.run("unet", lambda s: (graphs.unet_call(self.unet, s).sample,), inputs)
            return graphs.unet_output(out, return_dict)
        count = len(residuals) - 1
        inputs.update({f"down_{i}": r for i, r in enumerate(residuals[:-1])}, mid=residuals[-1])
        (out,) = self.runner.run("unet+control", lambda s: (graphs.unet_call(
            self.unet, s, down_block_additional_residuals=[s[f"down_{i}"] for i in range(count)],
            mid_block_additional_residual=s["mid"]).sample,), inputs)
        return graphs.unet_output(out, return_dict)


def controlled_pipeline(model, mode: str, controlnet: torch.nn.Module):
    """`model`'s pipeline for `mode` over a ControlledUNet of its UNet, built once per model and mode (kept in
    model.runs, so it goes when the model goes)."""
    key = ("control", mode)
    twin = model.runs.get(key)
    if twin is None or twin.unet.controlnet is not controlnet:
        exact = {"txt2img": model.txt2img, "img2img": model.img2img, "inpaint": model.inpaint}[mode]
        stand_in = ControlledUNet(exact.unet, controlnet, model.graph_runner())
        twin = type(exact).from_pipe(exact, unet=stand_in, add_watermarker=False, torch_dtype=exact.unet.dtype)
        twin.set_progress_bar_config(disable=True)
        stand_in.pipeline_ref = weakref.ref(twin)
        model.runs[key] = twin
    return twin


@dataclasses.dataclass(frozen=True)
class ControlRun:
    """One request's control: its unit, the loaded ControlNet and the control map at the first pass's size."""

    request: ControlRequest
    controlnet: torch.nn.Module
    map: Image.Image


def pipeline(model, mode: str, fast: bool, run: Optional[ControlRun], size: tuple[int, int]):
    """The pipeline that runs `mode` for a loop at `size`: `model`'s own (LoadedModel.pipeline) without control,
    else its controlled twin, ready for a new denoising loop."""
    if run is None:
        return model.pipeline(mode, fast=fast)
    twin = controlled_pipeline(model, mode, run.controlnet)
    twin.unet.begin(control_step(run.request, run.map, size))
    return twin


def control_step(request: ControlRequest, control_map: Image.Image, size: tuple[int, int]) -> ControlStep:
    """The loop's control at `size` (the hires fix's second pass gets the map resized to its size)."""
    if control_map.size != tuple(size):
        control_map = crop_and_resize(control_map, size)
    return ControlStep(map=control_map, mode=CONTROL_TYPES[request.type].mode, strength=request.strength,
                       start=request.start, end=request.end)


# --- Metadata -----------------------------------------------------------------------------------------------------
def infotext(request: ControlRequest, model_title: str, size: tuple[int, int]) -> str:
    """The A1111 ControlNet extension's unit value (written under "ControlNet 0"), fields in its order."""
    module = CONTROL_TYPES[request.type].module if request.preprocess else "none"
    resolution = CONTROL_TYPES[request.type].processor_res if request.preprocess else None
    fields = {
        "Module": module,
        "Model": model_title,
        "Weight": request.strength,
        "Resize Mode": "Crop and Resize",
        "Low Vram": False,
        "Processor Res": resolution or min(size),  # by default maps are made at the output size ("Pixel Perfect")
        "Threshold A": 100 if module == "canny" else None,
        "Threshold B": 200 if module == "canny" else None,
        "Guidance Start": request.start,
        "Guidance End": request.end,
        "Pixel Perfect": resolution is None,
        "Control Mode": "Balanced",
        "Hr Option": "Both",  # the hires fix's second pass is controlled too
        "Save Detected Map": True,
    }
    return ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
