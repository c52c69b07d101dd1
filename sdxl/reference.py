"""IP-Adapter reference images: h94's IP-Adapter Plus for SDXL (ViT-H image encoder), through diffusers' own loader.

The adapter changes a UNet: diffusers' `load_ip_adapter` swaps every cross-attention processor for an IP-Adapter
one and sets the UNet's image projection (`encoder_hid_proj`), after which the UNet requires image embeddings. So
the adapter is loaded once, on the first reference request (into that request's UNet, then taken out again), and
kept apart: every SDXL-family UNet has the same attention layout, so the one adapter serves every base model and
custom checkpoint. `attached()` puts its processors and projection into the request's UNet and always restores the
UNet's own processors afterwards, so a request without a reference runs the very same UNet as before (bitwise the
same image).

Modes (InstantStyle's block choice, through diffusers' `set_ip_adapter_scale`): `full` = every cross-attention
layer at the strength; `style` = only up_blocks.0's middle attention; `composition` = only down_blocks.2's second.
On CUDA steps with a reference replay CUDA graphs too: the image embeddings are graph inputs, and the scales the
IP-Adapter processors multiply by (Python numbers, baked into a capture) are the graph runner's variant, so a
graph captured at one strength or mode is never replayed at another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from PIL import Image

logger = logging.getLogger(__name__)

REFERENCE_DIR = "ip-adapter"  # under WEIGHTS_DIR: the h94 repo's own layout (the two folders below)
ADAPTER_SUBFOLDER = "sdxl_models"
ADAPTER_FILE = "ip-adapter-plus_sdxl_vit-h.safetensors"
ENCODER_FOLDER = "models/image_encoder"  # ViT-H; NOT sdxl_models/image_encoder (ViT-bigG, for other adapters)
ADAPTER_TITLE = "ip-adapter-plus_sdxl_vit-h"
ADAPTER_MODULE = "ip-adapter_clip_sdxl_plus_vith"  # the A1111 ControlNet extension's module name for it

# Where script/download_weights gets them; facts from docs/components.md §1.5 (h94 blob page and mirror LFS pointers
# for the adapter; copies of h94's models/image_encoder for the encoder; the revision is the one two public projects
# pin and the last commit touching sdxl_models/).
REFERENCE_SOURCE: dict[str, Any] = {
    "folder": REFERENCE_DIR,
    "repo": "h94/IP-Adapter",
    "revision": "018e402774aeeddd60609b4ecdb7e298259dc729",
    "licence": "apache-2.0 (model card); the image encoder is OpenCLIP ViT-H-14 (laion2B-s32B-b79K)",
    "files": [
        {"path": f"{ADAPTER_SUBFOLDER}/{ADAPTER_FILE}", "dest": f"{ADAPTER_SUBFOLDER}/{ADAPTER_FILE}",
         "sha256": "3f5062b8400c94b7159665b21ba5c62acdcd7682262743d7f2aefedef00e6581", "size": 847_517_512},
        {"path": f"{ENCODER_FOLDER}/config.json", "dest": f"{ENCODER_FOLDER}/config.json", "sha256": None,
         "size": None},
        {"path": f"{ENCODER_FOLDER}/model.safetensors", "dest": f"{ENCODER_FOLDER}/model.safetensors",
         "sha256": "6ca9667da1ca9e0b0f75e46bb030f7e011f44f86cbfb8d5a36590fcd7507b030", "size": 2_528_373_448},
    ],
}

REFERENCE_MODES = ("full", "style", "composition")


def mode_scale(mode: str, strength: float):
    """The set_ip_adapter_scale argument of a mode (InstantStyle's blocks; blocks not named get 0)."""
    if mode == "full":
        return strength
    if mode == "style":
        return {"up": {"block_0": [0.0, strength, 0.0]}}
    return {"down": {"block_2": [0.0, strength]}}


@dataclasses.dataclass(frozen=True)
class ReferenceRequest:
    image: Image.Image  # RGB
    strength: float
    mode: str


def check_reference(image_path, strength: float, mode: str) -> Optional[ReferenceRequest]:
    """Validate the reference inputs; None without a reference image or at strength 0 (exactly no reference)."""
    import utils

    if mode not in REFERENCE_MODES:
        raise utils.InputError(f"reference_mode: expected one of {list(REFERENCE_MODES)}, got {mode!r}")
    if not 0.0 <= strength <= 1.0:
        raise utils.InputError(f"reference_strength: expected 0 to 1, got {strength}")
    if image_path is None:
        return None
    source = utils.open_image(image_path, "reference_image")
    rgb = utils.load_rgb(source, source.size, "reference_image")
    if strength == 0.0:
        return None
    return ReferenceRequest(image=rgb, strength=float(strength), mode=mode)


@dataclasses.dataclass
class _Adapter:
    processors: dict  # the UNet's attention processors with the adapter (name -> processor)
    projection: torch.nn.Module  # the UNet's encoder_hid_proj with the adapter


class References:
    """The IP-Adapter and its image encoder, loaded on the first reference request."""

    def __init__(self, weights_dir: Path) -> None:
        self.root = Path(weights_dir) / REFERENCE_DIR
        self.encoder = None
        self.feature_extractor = None
        self.adapter: Optional[_Adapter] = None
        self.title = ADAPTER_TITLE

    def _load(self, pipe) -> _Adapter:
        """diffusers' load_ip_adapter on `pipe`, then the UNet given back its own processors."""
        from transformers import CLIPImageProcessor

        import utils

        if not (self.root / ADAPTER_SUBFOLDER / ADAPTER_FILE).is_file():
            raise utils.WeightsMissingError(f"IP-Adapter not found in {self.root}: run script/download_weights")
        from sdxl.control import legacy_model_hash

        phase = time.perf_counter()
        unet = pipe.unet
        own = dict(unet.attn_processors)
        components = {"image_encoder": pipe.image_encoder, "feature_extractor": pipe.feature_extractor}
        try:
            pipe.load_ip_adapter(str(self.root), subfolder=ADAPTER_SUBFOLDER, weight_name=ADAPTER_FILE,
                                 image_encoder_folder=ENCODER_FOLDER)
            adapter = _Adapter(processors=dict(unet.attn_processors), projection=unet.encoder_hid_proj)
            self.encoder = pipe.image_encoder
        finally:  # also when loading failed half-way: the UNet and the pipeline as they were
            self._detach(unet, own)
            pipe.register_modules(**components)
        size = self.encoder.config.image_size
        self.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)  # diffusers' own default at 224
        self.title = f"{ADAPTER_TITLE} [{legacy_model_hash(self.root / ADAPTER_SUBFOLDER / ADAPTER_FILE)}]"
        logger.info("loaded IP-Adapter %s for %s in %.2fs (first use)", ADAPTER_TITLE, type(unet).__name__,
                    time.perf_counter() - phase)
        return adapter

    @staticmethod
    def _detach(unet, processors: dict) -> None:
        unet.encoder_hid_proj = None  # first: its resampler's attention layers count as the UNet's
        unet.register_to_config(encoder_hid_dim_type=None)
        unet.set_attn_processor(processors)

    @contextlib.contextmanager
    def attached(self, pipe, request: Optional[ReferenceRequest], do_cfg: bool,
                 runner: Optional[Any] = None) -> Iterator[dict]:
        """The pipeline kwargs of the reference (ip_adapter_image_embeds) while the adapter is in pipe's UNet; the
        UNet's own processors are back afterwards, also on an error. Nothing happens without a reference. With the
        model's graphs.GraphRunner, its graphs are keyed by the adapter's scales meanwhile."""
        if request is None:
            yield {}
            return
        unet = pipe.unet
        if self.adapter is None:
            self.adapter = self._load(pipe)
        adapter = self.adapter
        own = dict(unet.attn_processors)
        try:
            for module in (*adapter.processors.values(), adapter.projection, self.encoder):
                if isinstance(module, torch.nn.Module):  # the IP-Adapter ones; they stay where they were when the
                    module.to(unet.device, unet.dtype)  # UNet moved
            unet.encoder_hid_proj = adapter.projection
            unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
            unet.set_attn_processor(dict(adapter.processors))
            pipe.set_ip_adapter_scale(mode_scale(request.mode, request.strength))
            kwargs = {"ip_adapter_image_embeds": [self.embeds(request.image, unet.device, unet.dtype, do_cfg)]}
            if runner is None:
                yield kwargs
            else:
                from sdxl.graphs import weight_addresses

                where = weight_addresses((*adapter.processors.values(), adapter.projection))
                with runner.variant_of(("ip-adapter", adapter_scales(adapter.processors), where)):
                    yield kwargs
        finally:
            self._detach(unet, own)

    def embeds(self, image: Image.Image, device, dtype, do_cfg: bool) -> torch.Tensor:
        """What diffusers' encode_image gives a Plus adapter: the encoder's penultimate hidden states, with those of
        a black image first when guidance is on (the pipeline splits them)."""
        pixels = self.feature_extractor(image, return_tensors="pt").pixel_values.to(device, dtype)
        with torch.no_grad():  # (1, tokens, width) each, given a num_images axis as diffusers does: (1, 1, ...)
            hidden = self.encoder(pixels, output_hidden_states=True).hidden_states[-2][None]
            if not do_cfg:
                return hidden
            negative = self.encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2][None]
        return torch.cat([negative, hidden])


def adapter_scales(processors: dict) -> tuple:
    """The scales the IP-Adapter processors multiply by now (per processor, per adapter; InstantStyle modes give
    per-layer values)."""
    return tuple(repr(getattr(p, "scale", None)) for p in processors.values())


def infotext(request: ReferenceRequest, title: str) -> str:
    """The A1111 ControlNet extension's unit value for an IP-Adapter unit (it writes IP-Adapter as a ControlNet
    unit); the mode has no field there and gets its own key (reference_infotext_mode)."""
    fields = {"Module": ADAPTER_MODULE, "Model": title, "Weight": request.strength, "Resize Mode": "Crop and Resize",
              "Low Vram": False, "Guidance Start": 0.0, "Guidance End": 1.0, "Pixel Perfect": False,
              "Control Mode": "Balanced", "Hr Option": "Both", "Save Detected Map": True}
    return ", ".join(f"{key}: {value}" for key, value in fields.items())
