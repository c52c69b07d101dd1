"""Line preprocessors with a model: softedge (HED), lineart (Informative Drawings) and lineart_anime (Anime2Sketch).

Each is a small convolutional network from lllyasviel/Annotators, the files A1111's ControlNet extension downloads
for the same modules. The networks are written here in torch from the public facts of their checkpoints (layer
shapes, state-dict key names); every hyperparameter is read back from the tensors' shapes, so the tiny stand-ins of
script/tiny_weights.py load through the same code as the real files. The Annotators files are pickles:
script/download_weights verifies each one's sha256, loads it once with torch.load(weights_only=True) and writes the
same tensors, names unchanged, as `model.safetensors` in a folder of its own under WEIGHTS_DIR; only that file is
read here, on the first request that needs it (text-to-image never pays).

How a map is made, as A1111's modules do with their default "Preprocessor resolution" of 512 (`detect_map`):
the control image (already crop-and-resized to the output size) is scaled so that its short side is 512 (cubic up,
area down), padded at the right and bottom to a multiple of 64 by repeating its edge pixels, run through the network
in float32, the padding cut off again, and the map resized back to the image's size (cubic up, area down, as A1111's
high-quality map resize). Each module's own pre- and post-processing is in its `*_lines` function.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

PROCESSOR_RES = 512  # A1111 ControlNet's default "Preprocessor resolution" (the short side the network sees)
PAD_MULTIPLE = 64  # A1111's resize_image_with_pad pads to a multiple of 64 with the edge pixels
WEIGHTS_FILE = "model.safetensors"  # in each folder; converted from the pinned pickle by script/download_weights

# --- Sources --------------------------------------------------------------------------------------------------------
# lllyasviel/Annotators at 982e7edaec38759d914a963c48c4726685de7d96: the head of main ("Upload clip_g.pth", 2023-08-27,
# on the stored commits/main page; the full hash from public Hub cache snapshot paths of that head). None of the three
# files changed after its upload commit (their stored per-file commit histories show one commit each). Sizes and
# sha256 from the Git LFS pointers on the stored pages of those upload commits:
#   ControlNetHED.pth  commit 9cf9fa959ab9a81454b68a082c57052e671677e6 ("Upload ControlNetHED.pth", 2023-04-19)
#   sk_model.pth       commit ffc2f17a31243e30cde16177175ea04f350b35f4 ("Upload 2 files", 2023-03-17)
#   netG.pth           commit 850be791e8f704b2fa2e55ec9cc33a6ae3e28832 ("Upload netG.pth", 2023-03-16)
# each also pinned with the same size and sha256 by independent public projects (docs/components.md §1.4).
# The repo card says only "license: other": each file's licence is its origin's:
#   ControlNetHED.pth: lllyasviel's own re-trained HED, Apache-2.0 (the annotator's header: "an improved version and
#     model of HED edge detection with Apache License, Version 2.0. Please use this implementation in your products").
#   sk_model.pth: an Informative Drawings generator (Chan et al. 2022; ControlNet 1.1's README: the lineart model "is
#     trained on awacke1/Image-to-Line-Drawings", the demo of these generators), MIT, (c) 2022 Caroline Chan
#     (carolineec/informative-drawings' LICENSE; the same text ships with lllyasviel's lineart annotator).
#   netG.pth: Anime2Sketch (Mukosame/Anime2Sketch), MIT, (c) 2021 Xiaoyu Xiang: its LICENSE, and its README: "The
#     repository contains the testing codes and pretrained weights ... This project is released under the MIT
#     License"; its test script loads the default weights from weights/netG.pth into the same U-Net (3 -> 1, 8 levels,
#     64 filters, instance norm) that ControlNet 1.1's lineart_anime annotator builds for Annotators' netG.pth.
ANNOTATORS_REPO = "lllyasviel/Annotators"
ANNOTATORS_REVISION = "982e7edaec38759d914a963c48c4726685de7d96"

SOFTEDGE_DIR = "softedge-hed"  # under WEIGHTS_DIR
LINEART_DIR = "lineart-informative-drawings"
LINEART_ANIME_DIR = "lineart-anime2sketch"


def _annotator_source(folder: str, path: str, size: int, sha256: str, licence: str) -> dict[str, Any]:
    """A source table in the form of preprocess.DEPTH_SOURCE; `convert`: the file is a pickle that
    script/download_weights writes as `dest` in safetensors (tensors and names unchanged)."""
    return {
        "folder": folder,
        "repo": ANNOTATORS_REPO,
        "revision": ANNOTATORS_REVISION,
        "licence": licence,
        "convert": "safetensors",
        "files": [{"path": path, "dest": WEIGHTS_FILE, "sha256": sha256, "size": size}],
    }


SOFTEDGE_SOURCE = _annotator_source(
    SOFTEDGE_DIR, "ControlNetHED.pth", 29_444_406, "5ca93762ffd68a29fee1af9d495bf6aab80ae86f08905fb35472a083a4c7a8fa",
    "apache-2.0 (lllyasviel's HED re-training; the annotator's header)")
LINEART_SOURCE = _annotator_source(
    LINEART_DIR, "sk_model.pth", 17_173_511, "c686ced2a666b4850b4bb6ccf0748031c3eda9f822de73a34b8979970d90f0c6",
    "mit (carolineec/informative-drawings LICENSE)")
LINEART_ANIME_SOURCE = _annotator_source(
    LINEART_ANIME_DIR, "netG.pth", 217_631_959, "ccabdcc3f5cf3c07cf65d58776acb21df7dfda825cdc70c9766a93fd62bfc488",
    "mit (Mukosame/Anime2Sketch LICENSE and README)")


# --- Networks -------------------------------------------------------------------------------------------------------
def _count(state: dict[str, torch.Tensor], template: str) -> int:
    """How many consecutive indices i have `template.format(i)` in the state dict."""
    n = 0
    while template.format(n) in state:
        n += 1
    return n


class _HEDBlock(nn.Module):
    """`layers` 3x3 convolutions with ReLU, and a 1x1 projection of the result to one edge channel."""

    def __init__(self, channels_in: int, channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels_in if i == 0 else channels, channels, 3, padding=1) for i in range(layers))
        self.projection = nn.Conv2d(channels, 1, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h, self.projection(h)


class SoftEdgeHED(nn.Module):
    """lllyasviel's HED (ControlNetHED.pth): a VGG-16-style trunk of five blocks (2, 2, 3, 3, 3 convolutions; 64,
    128, 256, 512, 512 channels), 2x max-pooling before blocks 2-5, and a one-channel side output per block. The
    input is RGB in 0-255 minus a learned per-channel offset (`norm`)."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512, 512), layers: tuple[int, ...] = (2, 2, 3, 3, 3)):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        channels_in = (3, *widths[:-1])
        for i, (cin, cout, n) in enumerate(zip(channels_in, widths, layers), start=1):
            self.add_module(f"block{i}", _HEDBlock(cin, cout, n))
        self.blocks = len(widths)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "SoftEdgeHED":
        blocks = 0
        while f"block{blocks + 1}.convs.0.weight" in state:
            blocks += 1
        widths = tuple(state[f"block{i}.convs.0.weight"].shape[0] for i in range(1, blocks + 1))
        layers = tuple(_count(state, f"block{i}.convs.{{}}.weight") for i in range(1, blocks + 1))
        return cls(widths, layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for i in range(1, self.blocks + 1):
            if i > 1:
                h = nn.functional.max_pool2d(h, kernel_size=2, stride=2)
            h, side = getattr(self, f"block{i}")(h)
            sides.append(side)
        return sides


class _ResidualBlock(nn.Module):
    """x + (reflection-padded 3x3 conv, instance norm, ReLU, reflection-padded 3x3 conv, instance norm)(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class InformativeDrawings(nn.Module):
    """The Informative Drawings generator (sk_model.pth): a 7x7 stem to `width` channels, two stride-2 3x3
    convolutions (width x2, x4), `residual` residual blocks, two stride-2 transposed convolutions back to `width`
    and a 7x7 convolution to one channel with a sigmoid: the drawing, dark lines on white, in 0-1. Instance norms
    without affine parameters; the real file has width 64 and 3 residual blocks."""

    def __init__(self, width: int = 64, residual: int = 3) -> None:
        super().__init__()
        norm = nn.InstanceNorm2d
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7), norm(width), nn.ReLU())
        self.model1 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), norm(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), norm(4 * width), nn.ReLU())
        self.model2 = nn.Sequential(*(_ResidualBlock(4 * width) for _ in range(residual)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 3, stride=2, padding=1, output_padding=1), norm(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1), norm(width), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, 1, 7), nn.Sigmoid())

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "InformativeDrawings":
        return cls(state["model0.1.weight"].shape[0], _count(state, "model2.{}.conv_block.1.weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class _UNetLevel(nn.Module):
    """One level of a pix2pix U-Net: a stride-2 4x4 convolution down, the inner levels, a stride-2 4x4 transposed
    convolution up; every level but the outermost returns its input concatenated with its output (the skip)."""

    def __init__(self, outer: int, inner: int, channels_in: int | None = None, sub: nn.Module | None = None,
                 outermost: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(channels_in or outer, inner, 4, stride=2, padding=1)
        up = nn.ConvTranspose2d(inner if sub is None else 2 * inner, outer, 4, stride=2, padding=1)
        if outermost:
            layers = [down, sub, nn.ReLU(), up, nn.Tanh()]
        elif sub is None:  # innermost: no norm at the bottleneck
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), up, nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), sub, nn.ReLU(), up, nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class Anime2Sketch(nn.Module):
    """The Anime2Sketch generator (netG.pth): a pix2pix U-Net from RGB to one channel with `levels` stride-2 levels
    (`width` filters at the outermost, doubling to 8x `width`, which the inner levels keep), instance norms without
    affine parameters and a tanh output in -1..1 (dark lines on white). The real file has width 64 and 8 levels, so
    its input sides must be multiples of 256."""

    def __init__(self, width: int = 64, levels: int = 8) -> None:
        super().__init__()
        if levels < 5:
            raise ValueError(f"Anime2Sketch needs at least 5 levels, got {levels}")
        level = _UNetLevel(8 * width, 8 * width)
        for _ in range(levels - 5):
            level = _UNetLevel(8 * width, 8 * width, sub=level)
        for outer, inner in ((4, 8), (2, 4), (1, 2)):
            level = _UNetLevel(outer * width, inner * width, sub=level)
        self.model = _UNetLevel(1, width, channels_in=3, sub=level, outermost=True)
        self.levels = levels

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Anime2Sketch":
        # Two convolutions per level, each with a weight and a bias (instance norms hold no tensors).
        return cls(state["model.model.0.weight"].shape[0], len(state) // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def strip_data_parallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names without the `module.` prefix that torch.nn.DataParallel training leaves (the original Anime2Sketch and
    ControlNet loaders drop it the same way); names without it are kept."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


# --- Each module's pre- and post-processing ------------------------------------------------------------------------
def _to_tensor(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in 0-255."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device, torch.float32).permute(2, 0, 1)[None]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Clip to 0-255 and truncate, as numpy's astype(uint8) after clip does in A1111's annotators."""
    return np.clip(values, 0, 255).astype(np.uint8)


def softedge_lines(net: SoftEdgeHED, pixels: np.ndarray) -> np.ndarray:
    """A1111's softedge_hed: the network on RGB 0-255, each side output resized bilinearly to the input size, their
    mean through a sigmoid, times 255: white soft edges on black (no inversion, no "safe" quantisation)."""
    height, width = pixels.shape[:2]
    with torch.no_grad():
        sides = net(_to_tensor(pixels, next(net.parameters()).device))
        sides = [nn.functional.interpolate(s, size=(height, width), mode="bilinear", align_corners=False)
                 for s in sides]
        edge = torch.sigmoid(torch.cat(sides, 1).mean(1).double())[0]  # float64, as A1111's numpy sigmoid
    return _to_uint8(edge.cpu().numpy() * 255.0)


def lineart_lines(net: InformativeDrawings, pixels: np.ndarray) -> np.ndarray:
    """A1111's lineart_realistic: the network on RGB scaled to 0-1, its drawing times 255, then inverted (A1111's
    "auto inversion"): white lines on black."""
    with torch.no_grad():
        drawing = net(_to_tensor(pixels, next(net.parameters()).device) / 255.0)[0, 0]
    return 255 - _to_uint8(drawing.cpu().numpy() * 255.0)


def lineart_anime_lines(net: Anime2Sketch, pixels: np.ndarray) -> np.ndarray:
    """A1111's lineart_anime: the image resized (cubic) to sides that are multiples of 256 (the U-Net's 8 levels),
    RGB scaled to -1..1, the sketch mapped back to 0-255 and resized (cubic) to the input size, then inverted: white
    lines on black."""
    import cv2

    height, width = pixels.shape[:2]
    step = 2 ** net.levels
    size = (step * math.ceil(width / step), step * math.ceil(height / step))
    fed = cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC)
    with torch.no_grad():
        sketch = net(_to_tensor(fed, next(net.parameters()).device) / 127.5 - 1.0)[0, 0] * 127.5 + 127.5
    sketch = cv2.resize(sketch.cpu().numpy(), (width, height), interpolation=cv2.INTER_CUBIC)
    return 255 - _to_uint8(sketch)


@dataclasses.dataclass(frozen=True)
class LineModel:
    source: dict[str, Any]  # where script/download_weights gets its weights
    network: Callable[[dict[str, torch.Tensor]], nn.Module]  # built from the state dict's shapes
    lines: Callable[[Any, np.ndarray], np.ndarray]  # HxWx3 uint8 at the processor size -> HxW uint8 map
    module: str  # A1111's name of what runs (sdxl/control.py's CONTROL_TYPES writes it to the infotext)


LINE_MODELS: dict[str, LineModel] = {
    "softedge": LineModel(SOFTEDGE_SOURCE, SoftEdgeHED.from_state, softedge_lines, "softedge_hed"),
    "lineart": LineModel(LINEART_SOURCE, InformativeDrawings.from_state, lineart_lines, "lineart_realistic"),
    "lineart_anime": LineModel(LINEART_ANIME_SOURCE, Anime2Sketch.from_state, lineart_anime_lines, "lineart_anime"),
}


# --- Loading --------------------------------------------------------------------------------------------------------
def check_layout(control_type: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The network of `control_type` that `state` fits (on the meta device: no memory), built from its shapes;
    anything missing, extra or mis-shaped is a ValueError naming it. Tensors on the meta device are enough, so
    script/download_weights --check runs it on a file's header alone."""
    state = strip_data_parallel(state)
    name = LINE_MODELS[control_type].module
    try:
        with torch.device("meta"):
            net = LINE_MODELS[control_type].network(state)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"not a {name} state dict ({type(err).__name__}: {err})") from None
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        missing = sorted(want.keys() - got.keys())
        extra = sorted(got.keys() - want.keys())
        shapes = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
        raise ValueError(f"not a {name} state dict: missing {missing[:4]}, unexpected {extra[:4]}, mis-shaped "
                         f"{[(k, got[k], want[k]) for k in shapes[:4]]}")
    return net


def build_network(control_type: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The network of `control_type` with exactly the tensors of `state` (check_layout), in float32 on the CPU."""
    net = check_layout(control_type, state).to_empty(device="cpu")
    net.load_state_dict({k: v.float() for k, v in strip_data_parallel(state).items()}, strict=True)
    return net.eval()


def load_network(control_type: str, folder: Path, device: torch.device) -> nn.Module:
    """The baked network of `control_type` from its folder, in float32 on `device` (as A1111 runs them)."""
    from safetensors.torch import load_file

    import utils

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise utils.WeightsMissingError(f"{control_type} preprocessor model not found at {path}: run "
                                        f"script/download_weights (or script/tiny_weights.py for tests)")
    try:
        net = build_network(control_type, load_file(str(path)))
    except Exception as err:  # noqa: BLE001 - an unreadable file or another layout: either way, fetch it again
        raise utils.WeightsMissingError(f"{path}: {err}; run script/download_weights --only {control_type} "
                                        "--force") from None
    return net.to(device)


# --- Maps -----------------------------------------------------------------------------------------------------------
def resize_with_pad(pixels: np.ndarray, resolution: int = PROCESSOR_RES) -> tuple[np.ndarray, tuple[int, int]]:
    """A1111's resize_image_with_pad: the short side scaled to `resolution` (cubic up, area down), then the right and
    bottom padded with edge pixels to multiples of 64. Returns the padded image and the (height, width) to keep."""
    import cv2

    height, width = pixels.shape[:2]
    scale = resolution / min(height, width)
    size = (int(round(width * scale)), int(round(height * scale)))
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    pad = [(0, -size[1] % PAD_MULTIPLE), (0, -size[0] % PAD_MULTIPLE), (0, 0)]
    return np.pad(resized, pad, mode="edge"), (size[1], size[0])


def resize_map(lines: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map to `size` (width, height): cubic when it grows, area when it shrinks (A1111's map resize)."""
    import cv2

    if (lines.shape[1], lines.shape[0]) == tuple(size):
        return lines
    grows = size[0] * size[1] > lines.shape[0] * lines.shape[1]
    return _to_uint8(cv2.resize(lines.astype(np.float32), tuple(size),
                                interpolation=cv2.INTER_CUBIC if grows else cv2.INTER_AREA))


def detect_map(control_type: str, net: nn.Module, image: Image.Image) -> Image.Image:
    """The `control_type` map of `image` at the image's size (RGB, white lines on black)."""
    pixels = np.asarray(image.convert("RGB"))
    padded, (height, width) = resize_with_pad(pixels)
    lines = LINE_MODELS[control_type].lines(net, padded)[:height, :width]
    return Image.fromarray(resize_map(lines, image.size)).convert("RGB")


class LineDetectors:
    """The line networks of one predictor, each loaded from WEIGHTS_DIR on its first request."""

    def __init__(self, weights_dir: Path, device: torch.device) -> None:
        self.weights_dir = Path(weights_dir)
        self.device = device
        self.networks: dict[str, nn.Module] = {}

    def network(self, control_type: str) -> nn.Module:
        if control_type not in self.networks:
            phase = time.perf_counter()
            folder = self.weights_dir / LINE_MODELS[control_type].source["folder"]
            self.networks[control_type] = load_network(control_type, folder, self.device)
            logger.info("loaded %s preprocessor (%s) in %.2fs (first use)", control_type, folder.name,
                        time.perf_counter() - phase)
        return self.networks[control_type]

    def map(self, control_type: str, image: Image.Image) -> Image.Image:
        phase = time.perf_counter()
        result = detect_map(control_type, self.network(control_type), image)
        logger.info("%s map %dx%d in %.2fs", LINE_MODELS[control_type].module, *image.size,
                    time.perf_counter() - phase)
        return result
