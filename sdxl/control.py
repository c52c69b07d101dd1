"""ControlNet: the baked union ControlNet, ControlNets by reference (`control_model`), control maps sized to the
output, and the controlled denoising step.

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

A `control_model` (fetched and key-checked by weights.py's ControlNet kind) is loaded by `load_user_controlnet`:
plain ControlNetModel or ControlNetUnionModel, from a single file in diffusers or original (ldm) names or from a
diffusers folder, its architecture read from the tensors and checked against the base model's UNet. `ControlNets`
keeps the last USER_CONTROLNETS_KEPT of them loaded; the stand-in gets each loop's ControlNet with its
ControlStep, so one twin per model and mode serves the baked and every user ControlNet.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import re
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
    source: Optional[Image.Image] = None  # RGB at its own size: the hires pass fits and preprocesses it again


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
                          source=rgb, strength=float(strength), start=float(start), end=float(end))


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
    """The baked ControlNet, loaded on the first request that uses it (text-to-image never pays for it), and the
    user ControlNets of `control_model`, the last USER_CONTROLNETS_KEPT of them kept loaded on the device."""

    def __init__(self, weights_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.folder = Path(weights_dir) / CONTROLNET_DIR
        self.device, self.dtype = device, dtype
        self.model = None
        self.title = CONTROLNET_TITLE
        self.users: "collections.OrderedDict[str, UserControlNet]" = collections.OrderedDict()

    def get(self):
        if self.model is None:
            phase = time.perf_counter()
            self.model = load_controlnet(self.folder, self.device, self.dtype)
            self.title = f"{CONTROLNET_TITLE} [{legacy_model_hash(self.folder / 'diffusion_pytorch_model.safetensors')}]"
            logger.info("loaded ControlNet %s in %.2fs (first use)", self.title, time.perf_counter() - phase)
        return self.model

    def user(self, file, unet_config: Any, control_type: str) -> "UserControlNet":
        """The loaded ControlNet of a fetched `control_model` file (weights.LoraFile), checked to fit `unet_config`
        (the request's base model) and to know `control_type` (union models)."""
        key = f"{file.ref.canonical_id}:{file.sha256}"
        loaded = self.users.get(key)
        if loaded is None:
            while len(self.users) >= USER_CONTROLNETS_KEPT:  # the previous one goes before the next is loaded
                forget(self.users.popitem(last=False)[1])
            phase = time.perf_counter()
            loaded = load_user_controlnet(file, key, unet_config, self.union_defaults(), self.device, self.dtype)
            logger.info("loaded control_model %s (%s) in %.2fs", loaded.title, type(loaded.model).__name__,
                        time.perf_counter() - phase)
        self.users[key] = loaded
        self.users.move_to_end(key)
        check_fits(controlnet_fields(loaded.model.config), unet_config, file.ref.display)
        check_mode(loaded.model, control_type, file.ref.display)
        return loaded

    def union_defaults(self) -> dict:
        """The baked union model's config.json, read (not loaded): the union settings a single file cannot show
        (num_trans_head, the attention heads of its transformer layer)."""
        try:
            config = json.loads((self.folder / "config.json").read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}


# --- ControlNets by reference (the control_model input) -------------------------------------------------------------
INPUT = "control_model"
USER_CONTROLNETS_KEPT = 1  # user ControlNets kept loaded on the device (a full SDXL one is 2.5 GB in fp16)
# What a ControlNet must share with the base model's UNet, its residuals being added to the UNet's own: the same
# input, blocks and channels, the same text width and the same text-time embedding.
FIT_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "projection_class_embeddings_input_dim", "addition_time_embed_dim")
# Settings a file's tensors do not show. Taken from a diffusers folder's config.json when it has them, else from the
# base model's UNet (SDXL ControlNets are built from SDXL's UNet config) or the baked union model's config.
UNET_SETTINGS = ("attention_head_dim", "num_attention_heads", "norm_num_groups", "norm_eps", "upcast_attention",
                 "flip_sin_to_cos", "freq_shift", "addition_time_embed_dim", "resnet_time_scale_shift")
OWN_SETTINGS = {"global_pool_conditions": False, "controlnet_conditioning_channel_order": "rgb"}
UNION_SETTINGS = {"num_trans_head": 8}  # xinsir's union models (config_promax.json) and diffusers' default


@dataclasses.dataclass(frozen=True)
class UserControlNet:
    """A loaded `control_model`: the model, A1111's title for it ("name [hash]") and the label of its graphs."""

    key: str  # the file's canonical id and sha256
    model: torch.nn.Module
    title: str
    label: str


def is_union(model: torch.nn.Module) -> bool:
    return "num_control_type" in model.config


def controlnet_fields(config: Any) -> dict:
    return {name: config.get(name) for name in FIT_FIELDS}


def _input_error(display: str, what: str):
    import utils

    return utils.InputError(f"{INPUT}: {display} {what}")


def _unloadable(display: str, what: str):
    import utils

    return utils.UnloadableFileError(f"{INPUT}: {display} {what}")


def check_fits(fields: dict, unet_config: Any, display: str) -> None:
    """The ControlNet's residuals fit the base model's UNet: else an error naming control_model."""
    def norm(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    wrong = [name for name in FIT_FIELDS if norm(fields.get(name)) != norm(unet_config.get(name))]
    if wrong:
        expected = ", ".join(f"{n} {norm(unet_config.get(n))}" for n in wrong)
        got = ", ".join(f"{n} {norm(fields.get(n))}" for n in wrong)
        raise _input_error(display, f"is not a ControlNet for this base model (expected an SDXL ControlNet with "
                                    f"{expected}; got {got})")


def check_mode(model: torch.nn.Module, control_type: str, display: str) -> None:
    """A union model knows the control type's mode (a plain ControlNet has one type: control_type only picks the
    preprocessor)."""
    if is_union(model) and CONTROL_TYPES[control_type].mode >= model.config.num_control_type:
        raise _input_error(display, f"cannot do control_type {control_type} (expected a union ControlNet with mode "
                                    f"{CONTROL_TYPES[control_type].mode}, as the promax model's 8 control types have; "
                                    f"got a union model of {model.config.num_control_type} control types)")


def controlnet_title(file) -> str:
    """A1111's ControlNet "Model" value: the file's name without extension and its short hash (the diffusers
    folder's weights file for a folder), e.g. "controlnet-canny-sdxl-1.0 [a1b2c3d4]"."""
    weights_file = file.path / "diffusion_pytorch_model.safetensors" if file.path.is_dir() else file.path
    ref = file.ref
    if file.file_name:
        name = Path(file.file_name).stem
    elif ref.path:  # a folder of a Hugging Face repo
        name = ref.path.rstrip("/").rsplit("/", 1)[-1]
    elif ref.repo:
        name = ref.repo.rsplit("/", 1)[-1]
    else:
        name = ref.display
    return f"{name} [{legacy_model_hash(weights_file)}]"


def diffusers_names(names: list[str], layers_per_block: int) -> dict[str, str]:
    """{diffusers name: the file's name} of a ControlNet's tensors. A file in the original ControlNet layout
    ("control_model." + ldm names, or the same without the prefix) is renamed by diffusers' own converter (it only
    moves values, so it maps names as well as tensors), plus SDXL's text-time embedding (label_emb), which that
    converter leaves out."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    import weights

    layout, prefix = weights.controlnet_layout(names) or ("diffusers", "")
    own = {k[len(prefix):]: k for k in names if k.startswith(prefix)}
    if layout == "diffusers":
        return own
    renamed = convert_controlnet_checkpoint(own, {"layers_per_block": layers_per_block})
    for new, old in (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")):
        for param in ("weight", "bias"):
            if f"{old}.{param}" in own:
                renamed[f"{new}.{param}"] = own[f"{old}.{param}"]
    return {k: v for k, v in renamed.items() if v is not None}


def derive_config(shapes: dict[str, tuple], unet_config: Any, given: dict, union_defaults: dict,
                  display: str) -> tuple[bool, dict]:
    """(is it a union model, the constructor config) of a ControlNet from its tensors' names and shapes, with the
    settings no tensor shows from `given` (the folder's config.json), else the base UNet's / the baked union
    model's. Fewer transformer layers (diffusers' -mid / -small SDXL ControlNets) and blocks without attention are
    read from the names."""
    def shape(key: str) -> tuple:
        if key not in shapes:
            raise _unloadable(display, f"does not load as an SDXL ControlNet (expected a tensor {key!r}; got none)")
        return shapes[key]

    def indices(pattern: str) -> list[int]:
        rx = re.compile(pattern)
        return sorted({int(m[1]) for k in shapes if (m := rx.match(k))})

    blocks = indices(r"down_blocks\.(\d+)\.")
    if not blocks:
        raise _unloadable(display, "does not load as an SDXL ControlNet (expected down_blocks.*; got none)")
    # A block has attention when it has an attentions module, even of 0 transformer layers (diffusers' -mid models).
    attention = [any(k.startswith(f"down_blocks.{b}.attentions.") for k in shapes) for b in blocks]
    depth = [len(indices(rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for b in blocks]
    mid_attention = any(k.startswith("mid_block.attentions.") for k in shapes)
    mid_depth = len(indices(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    if not attention[-1]:  # the mid block takes the last entry (ControlNetModel); a block without attention none
        depth[-1] = mid_depth
    proj_in = next((shapes[k] for k in shapes if k.endswith("attentions.0.proj_in.weight")), (0, 0))
    cross = next((shapes[k] for k in shapes if k.endswith("attn2.to_k.weight")), (0, 0))
    hint_out = [shape("controlnet_cond_embedding.conv_in.weight")[0]] + [
        shapes[f"controlnet_cond_embedding.blocks.{i}.weight"][0]
        for i in indices(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight") if i % 2 == 1]
    config = {
        "in_channels": shape("conv_in.weight")[1],
        "conditioning_channels": shape("controlnet_cond_embedding.conv_in.weight")[1],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "block_out_channels": [shape(f"down_blocks.{b}.resnets.0.conv1.weight")[0] for b in blocks],
        "layers_per_block": len(indices(r"down_blocks\.0\.resnets\.(\d+)\.")),
        "transformer_layers_per_block": depth,
        "cross_attention_dim": cross[1] if len(cross) == 2 else None,
        "use_linear_projection": len(proj_in) == 2,
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": shape("add_embedding.linear_1.weight")[1],
        "conditioning_embedding_out_channels": hint_out,
    }
    union = "task_embedding" in shapes
    if (mid_attention or union) and mid_depth != depth[-1]:
        raise _unloadable(display, f"does not load as an SDXL ControlNet (expected a mid block of {depth[-1]} "
                                    f"transformer layers, as its last down block; got {mid_depth})")
    if not union:
        config["mid_block_type"] = "UNetMidBlock2DCrossAttn" if mid_attention else "UNetMidBlock2D"
    for name in UNET_SETTINGS:
        config[name] = given.get(name, unet_config.get(name))
    for name, default in OWN_SETTINGS.items():
        config[name] = given.get(name, default)
    if union:
        config.update(num_control_type=shapes["task_embedding"][0], num_trans_channel=shapes["task_embedding"][1],
                      num_trans_layer=len(indices(r"transformer_layes\.(\d+)\.")),
                      num_proj_channel=shape("spatial_ch_projs.weight")[0])
        for name, default in UNION_SETTINGS.items():
            config[name] = given.get(name, union_defaults.get(name, default))
    return union, config


def load_user_controlnet(file, key: str, unet_config: Any, union_defaults: dict, device: torch.device,
                         dtype: torch.dtype) -> UserControlNet:
    """A fetched `control_model` (single file in diffusers or original names, or a diffusers folder; plain or
    union) as a ControlNetModel / ControlNetUnionModel on `device` in `dtype`.

    Nothing is fetched and no config is guessed: the architecture is read from the tensors' shapes (derive_config),
    checked against the base model before anything is built, the model is built without memory (meta device) and
    every weight must be in the file and every tensor of the file must be used (a strict load), so a file that
    passed the download's key check but does not fit fails here, naming control_model."""
    from diffusers import ControlNetModel, ControlNetUnionModel
    from safetensors import safe_open

    import weights

    display = file.ref.display
    folder = file.path if file.path.is_dir() else None
    weights_file = folder / "diffusion_pytorch_model.safetensors" if folder else file.path
    given = {}
    if folder is not None:
        given = json.loads((folder / "config.json").read_text("utf-8"))  # checked to be an object at download
    header = weights.check_safetensors(weights_file)  # names and shapes only: nothing is loaded before it fits
    names = diffusers_names([k for k in header if k != "__metadata__"], int(unet_config.get("layers_per_block") or 2))
    union, config = derive_config({new: tuple(header[old]["shape"]) for new, old in names.items()}, unet_config,
                                  given, union_defaults, display)
    check_fits(config, unet_config, display)
    state = {}
    with safe_open(str(weights_file), "pt", device="cpu") as f:  # tensor by tensor: no second copy in memory
        for new, old in names.items():
            tensor = f.get_tensor(old)
            state[new] = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
    cls = ControlNetUnionModel if union else ControlNetModel
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        unexpected += sorted(set(header) - {"__metadata__"} - set(names.values()))  # names no converter knows
    except Exception as err:  # noqa: BLE001 - a config or shape that does not fit, whatever diffusers raises
        raise _unloadable(display, f"does not load as an SDXL ControlNet ({type(err).__name__}: "
                                    f"{str(err)[:200]})") from err
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        raise _unloadable(display, f"does not load as an SDXL ControlNet (expected the weights of a {cls.__name__}; "
                                    f"got {len(missing or left)} missing, e.g. {(missing or left or [''])[0]!r}, and "
                                    f"{len(unexpected)} unexpected, e.g. {(unexpected or [''])[0]!r})")
    # eval() only: requires_grad stays as from_pretrained leaves it, since it steers PyTorch's choice of matmul
    # kernels (seen on CPU: a linear layer on a strided input), so the same weights compute the same bits.
    model.eval()
    label = "user-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return UserControlNet(key=key, model=model, title=controlnet_title(file), label=label)


# --- The controlled step ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ControlStep:
    """What the stand-in needs for one denoising loop."""

    map: Image.Image  # the control map at this pass's output size
    mode: int
    strength: float
    start: float
    end: float
    controlnet: Any = None  # the ControlNet of this loop (the baked union model or a user's)
    label: str = ""  # names a user ControlNet's graphs ("" for the baked model)

    def acts_at(self, step: int, total: int) -> bool:
        # diffusers' ControlNet pipelines' rule (controlnet_keep): the whole step lies inside [start, end].
        return self.strength != 0.0 and not (step / total < self.start or (step + 1) / total > self.end)


def _fingerprint(module: torch.nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


# Where each ControlNet's weights were when each runner's graphs of it were captured, by label (the runner itself
# checks the UNet's), and every stand-in, so that a user ControlNet that is let go leaves no graph or reference.
_controlnet_fingerprints: "weakref.WeakKeyDictionary[graphs.GraphRunner, dict]" = weakref.WeakKeyDictionary()
_stand_ins: "weakref.WeakSet[ControlledUNet]" = weakref.WeakSet()


def forget(user: UserControlNet) -> None:
    """A user ControlNet leaves memory: the stand-ins drop their reference to it and the runners that captured
    graphs of it forget those graphs (they would hold pool memory, or replay into freed weights); the UNet's graphs
    stay."""
    for stand_in in list(_stand_ins):
        if stand_in.step is not None and stand_in.step.controlnet is user.model:
            stand_in.step, stand_in._conds = None, {}
    for runner, seen in list(_controlnet_fingerprints.items()):
        if seen.pop(user.label, None) is not None:
            runner.forget(f"controlnet:{user.label}")


class ControlledUNet(graphs.UNetStandIn):
    """Stands in for the UNet of a pipeline: a ControlNet step before each UNet step of the guidance window."""

    def __init__(self, unet: torch.nn.Module, runner: Optional[graphs.GraphRunner] = None) -> None:
        super().__init__(unet)
        self.runner = runner
        self.pipeline_ref = None  # weakref to the pipeline that owns this stand-in (its num_timesteps)
        self.step: Optional[ControlStep] = None
        self.calls = 0
        self.controlled_calls = 0
        self.eager_calls = 0
        self._conds: dict[int, torch.Tensor] = {}
        _stand_ins.add(self)

    @property
    def controlnet(self) -> Optional[torch.nn.Module]:
        return self.step.controlnet if self.step is not None else None

    def begin(self, step: Optional[ControlStep] = None) -> None:
        """Before a denoising loop: the control of this loop (None: plain UNet steps)."""
        from diffusers.image_processor import VaeImageProcessor

        self.step, self.calls, self.controlled_calls, self._conds = step, 0, 0, {}
        if step is not None:
            # The processor and settings diffusers' ControlNet pipelines use: RGB in [0, 1], not normalised.
            processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
            image = processor.preprocess(step.map, height=step.map.height, width=step.map.width).to(torch.float32)
            self._conds[1] = image.to(step.controlnet.device, step.controlnet.dtype)
        if self.runner is not None:
            self.runner.begin(self.unet)
            if step is not None:
                fingerprint = _fingerprint(step.controlnet)
                seen = _controlnet_fingerprints.setdefault(self.runner, {})
                if seen.get(step.label, fingerprint) != fingerprint:  # moved: graphs are stale
                    self.runner.drop()
                    seen.clear()
                seen[step.label] = fingerprint

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
        controlnet = step.controlnet
        union = is_union(controlnet)
        cond = self._cond(sample.shape[0])
        extra = {}
        if union:  # the union model is told the control type; a plain ControlNet knows only its own
            control_type = torch.zeros(controlnet.config.num_control_type)
            control_type[step.mode] = 1
            extra["control_type"] = control_type.reshape(1, -1).to(sample.device, encoder_hidden_states.dtype).repeat(
                sample.shape[0], 1)
        added = {k: added[k] for k in ("text_embeds", "time_ids") if k in added}

        def run(s, conditioning_scale: float):
            kwargs = dict(control_type=s["control_type"], control_type_idx=[step.mode], controlnet_cond=[s["cond"]]) \
                if union else dict(controlnet_cond=s["cond"])
            down, mid = controlnet(
                s["sample"], s["timestep"], s["encoder_hidden_states"], conditioning_scale=conditioning_scale,
                added_cond_kwargs=dict(text_embeds=s["text_embeds"], time_ids=s["time_ids"]), return_dict=False,
                **kwargs)
            return (*down, mid)

        inputs = graphs.graph_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs=added)
        if self.runner is None or inputs is None:
            eager = dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states, cond=cond,
                         **extra, **added)
            return run(eager, step.strength)
        inputs.update(cond=cond, **extra)
        # Captured at scale 1 (x * 1.0 is x), scaled here by the same multiplication the ControlNet does itself.
        tag = f"controlnet:{step.mode}" if not step.label else \
            f"controlnet:{step.label}" + (f":{step.mode}" if union else "")
        outputs = self.runner.run(tag, lambda s: run(s, 1.0), inputs)
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


def controlled_pipeline(model, mode: str):
    """`model`'s pipeline for `mode` over a ControlledUNet of its UNet, built once per model and mode (kept in
    model.runs, so it goes when the model goes); each loop's ControlNet comes with its ControlStep."""
    key = ("control", mode)
    twin = model.runs.get(key)
    if twin is None:
        exact = {"txt2img": model.txt2img, "img2img": model.img2img, "inpaint": model.inpaint}[mode]
        stand_in = ControlledUNet(exact.unet, model.graph_runner())
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
    label: str = ""  # a user ControlNet's (UserControlNet.label); "" for the baked model


def pipeline(model, mode: str, fast: bool, run: Optional[ControlRun], size: tuple[int, int],
             guided_images: Optional[int] = None):
    """The pipeline that runs `mode` for a loop at `size`: `model`'s own (LoadedModel.pipeline; guided_images as
    there) without control, else its controlled twin, ready for a new denoising loop."""
    if run is None:
        return model.pipeline(mode, fast=fast, guided_images=guided_images)
    twin = controlled_pipeline(model, mode)
    twin.unet.begin(control_step(run, size))
    return twin


def control_step(run: ControlRun, size: tuple[int, int]) -> ControlStep:
    """The loop's control at `size`; a map of another size is fitted to it (Predictor.control_run_at makes the hires
    pass's map at its own size first, so this only matters for callers that do not)."""
    control_map = run.map if run.map.size == tuple(size) else crop_and_resize(run.map, size)
    request = run.request
    return ControlStep(map=control_map, mode=CONTROL_TYPES[request.type].mode, strength=request.strength,
                       start=request.start, end=request.end, controlnet=run.controlnet, label=run.label)


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
