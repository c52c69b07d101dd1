"""The face and hand detailer: an ADetailer-style pass that repaints each detected face or hand at full resolution.

What a detailed image is, as A1111's ADetailer extension makes it with its defaults:

1. A detector (an anime face or hand YOLO model run through ONNX Runtime, or any `Detector`) finds boxes with a
   confidence above 0.3; they are repainted in the detector's order, highest confidence first (ADetailer's default
   "Sort bounding boxes by: None" keeps the order in which ultralytics returns them, which is that one).
2. Each box becomes a rectangle mask, dilated by 4 px (a 4x4 rectangle kernel, ADetailer's "dilate erode") and
   blurred (A1111's mask blur 4: a Gaussian of sigma 4 over a 21-pixel kernel, horizontally then vertically).
3. "Inpaint only masked": the crop is the blurred mask's bounding box plus 32 px of padding, grown to the aspect
   ratio of the nearest SDXL training size and upscaled to it (`work_size`: 1024² area, never more pixels than
   the image itself has, as ADetailer repaints at the image's size), repainted by the request's own model as an
   inpainting pass (same LoRAs, embeddings, sampler, steps, guidance; strength `detailer_strength`; seed = the
   image's seed + the box's index), scaled back and blended in through the blurred mask. A pixel where the blurred
   mask is 0 is never touched, so everything outside the feathered regions stays bit for bit what it was.
4. With `face_and_hands` the face unit runs first and the hand detector then looks at the detailed image
   (ADetailer's units run in order, each on the previous one's result).

Detection, cropping and blending are small pure functions of images and arrays (tested on their own); the
repaint itself is a callable (`Painter`) that runs the model's inpainting pipeline, which predict.py builds from
the request, so that tests can inject boxes (`Detector`) and keep the real repaint.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# --- ADetailer's defaults (Bing-su/adetailer adetailer/args.py, ADetailerArgs; docs/components.md §2.4) -----------
CONFIDENCE = 0.3  # ad_confidence
IOU = 0.7  # ultralytics' NMS default, which ADetailer's YOLO call keeps
DILATION = 4  # ad_dilate_erode: a 4x4 rectangle kernel
MASK_BLUR = 4  # ad_mask_blur (A1111's mask_blur: sigma 4)
PADDING = 32  # ad_inpaint_only_masked_padding
DEFAULT_STRENGTH = 0.4  # ad_denoising_strength
MIN_STRENGTH = 0.05
PROMPT_PLACEHOLDER = "[PROMPT]"  # ADetailer writes the main prompt where its prompt says [PROMPT]
# ADetailer writes its own version; ours names this implementation, so a reader can tell the two apart.
VERSION = "sdxl-lora-cog-1"

# The `detailer` input: which units run, in ADetailer's unit order (face first, hands as the "2nd" unit).
MODES: dict[str, tuple[str, ...]] = {
    "off": (),
    "face": ("face",),
    "hands": ("hands",),
    "face_and_hands": ("face", "hands"),
}

# --- The baked detectors ----------------------------------------------------------------------------------------
# Where script/download_weights gets them (the same table form as sdxl/preprocess.py's DEPTH_SOURCE). Repos, files
# and licences from docs/components.md §2.1, re-checked on the Hub's stored pages: deepghs/anime_face_detection's
# main is 784dc4c ("Sync README ... 2024-09-24", 14 commits, licence: mit); deepghs/anime_hand_detection's main is
# dba2c5b ("Update README.md", 16 commits, licence: openrail). No Hub page shows the ONNX files' sha256; the values
# below are the ones several independent public projects pin for these exact paths (the face file at 784dc4c, the
# hand file at dba2c5b and at the earlier 0c4ab4d, whose model files dba2c5b keeps), each 44,583,229 bytes;
# script/download_weights checks both the Hub's LFS record and these pins. Both are YOLOv8s models trained with
# Ultralytics, exported to ONNX by deepghs: input `images` [1, 3, H, W] (dynamic, RGB in 0-1), output `output0`
# [1, 4 + classes, anchors], ultralytics' `names` and `imgsz` metadata.
FACE_DETECTOR_DIR = "anime-face-detector"  # under WEIGHTS_DIR
HAND_DETECTOR_DIR = "anime-hand-detector"
FACE_DETECTOR_FILE = "face_detect_v1.4_s.onnx"  # the repo's folder name: what the infotext's "ADetailer model" shows
HAND_DETECTOR_FILE = "hand_detect_v1.0_s.onnx"
FACE_DETECTOR_SOURCE: dict[str, Any] = {
    "folder": FACE_DETECTOR_DIR,
    "label": "face",  # the class the model predicts (its `names` metadata)
    "repo": "deepghs/anime_face_detection",
    "revision": "784dc4c0bb692351ddcdbe6131a050b17d3025d5",
    "licence": "mit (model card)",
    "files": [
        {"path": "face_detect_v1.4_s/model.onnx", "dest": FACE_DETECTOR_FILE,
         "sha256": "403b5bc93b6ff789b7d183418df4a1364049bac00c24acd927604a7ff6891483", "size": 44_583_229},
    ],
}
HAND_DETECTOR_SOURCE: dict[str, Any] = {
    "folder": HAND_DETECTOR_DIR,
    "label": "hand",  # the class the model predicts (its `names` metadata)
    "repo": "deepghs/anime_hand_detection",
    "revision": "dba2c5bec15fcee9ac4909b244a84e8783cf46a2",
    "licence": "openrail (model card; the licence text itself is not in the repo)",
    "files": [
        {"path": "hand_detect_v1.0_s/model.onnx", "dest": HAND_DETECTOR_FILE,
         "sha256": "408750ad39645fcdc0c5e774aa45a73941b2e785fc5611fb7d3d9790a41899c0", "size": 44_583_229},
    ],
}
# script/download_weights' component of each unit's detector
DETECTOR_SOURCES: dict[str, dict[str, Any]] = {"face_detector": FACE_DETECTOR_SOURCE,
                                               "hand_detector": HAND_DETECTOR_SOURCE}
UNIT_COMPONENTS = {"face": "face_detector", "hands": "hand_detector"}
# unit -> (folder, file, the class name the model must predict)
DETECTOR_FILES: dict[str, tuple[str, str, str]] = {
    unit: (DETECTOR_SOURCES[c]["folder"], DETECTOR_SOURCES[c]["files"][0]["dest"], DETECTOR_SOURCES[c]["label"])
    for unit, c in UNIT_COMPONENTS.items()
}
DETECTOR_MAX_SIDE = 640  # when the model carries no `imgsz` metadata (ultralytics writes it; 640 is its default)
DETECTOR_ALIGN = 32  # the YOLOv8 strides divide a side that is a multiple of 32


class DetailerError(RuntimeError):
    """The detailer could not run (a detector failed or is not a YOLO detector); the message names `detailer`."""


# --- Requests -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DetailerRequest:
    units: tuple[str, ...]  # "face", "hands", in the order they run
    strength: float
    prompt: Optional[str]  # None: the main prompt


def check_detailer(mode: str, strength: float, prompt: Optional[str], steps: int) -> Optional[DetailerRequest]:
    """Validate the detailer inputs; None when the detailer is off (then the other two are not used)."""
    import utils
    from sdxl import prompts

    if mode not in MODES:
        raise utils.InputError(f"detailer: expected one of {list(MODES)}, got {mode!r}")
    if not MIN_STRENGTH <= strength <= 1.0:  # also refuses nan
        raise utils.InputError(f"detailer_strength: expected {MIN_STRENGTH} to 1, got {strength}")
    prompt = prompt if prompt is not None and prompt.strip() else None
    if prompt is not None:
        prompts.check_prompt_length(prompt, "detailer_prompt")
        tag = prompts.find_extra_network_tag(prompt)
        if tag is not None:
            raise utils.InputError(f"detailer_prompt: A1111 LoRA tags like {tag[:80]} are not read from the prompt; "
                                   "the LoRAs of lora_weights / extra_lora / more_loras apply to the detailer too")
    if not MODES[mode]:
        if prompt is not None:  # a prompt for a pass that does not run: the caller meant something else
            raise utils.InputError("detailer_prompt: used only by the detailer, which is off; set detailer to face, "
                                   "hands or face_and_hands, or leave detailer_prompt empty")
        return None
    if int(steps * strength) < 1:
        raise utils.InputError(f"detailer_strength: with num_inference_steps={steps} a strength of {strength} runs no "
                               "denoising step; expected num_inference_steps x detailer_strength >= 1")
    return DetailerRequest(units=MODES[mode], strength=float(strength), prompt=prompt)


def unit_prompt(request: DetailerRequest, main_prompt: str) -> str:
    """The prompt of the repaint: detailer_prompt ([PROMPT] standing for the main prompt), else the main prompt."""
    if request.prompt is None:
        return main_prompt
    return request.prompt.replace(PROMPT_PLACEHOLDER, main_prompt)


def infotext(request: DetailerRequest) -> dict[str, object]:
    """The ADetailer extension's infotext entries: per unit the keys it writes for its defaults (the first unit
    without a suffix, the second with " 2nd"), then its version."""
    entries: dict[str, object] = {}
    for index, unit in enumerate(request.units):
        suffix = "" if index == 0 else f" {_ordinal(index + 1)}"  # ADetailer's unit suffixes: "", " 2nd", ...
        unit_entries = {
            "ADetailer model": DETECTOR_FILES[unit][1],
            "ADetailer prompt": request.prompt,  # dropped when None (blank: the main prompt)
            "ADetailer confidence": CONFIDENCE,
            "ADetailer dilate erode": DILATION,
            "ADetailer mask blur": MASK_BLUR,
            "ADetailer denoising strength": request.strength,
            "ADetailer inpaint only masked": True,
            "ADetailer inpaint padding": PADDING,
        }
        entries.update({key + suffix: value for key, value in unit_entries.items() if value is not None})
    entries["ADetailer version"] = VERSION
    return entries


def _ordinal(n: int) -> str:
    if n % 100 in (11, 12, 13):
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# --- Detection ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Box:
    """A detection in image pixels: its corners (YOLO's xyxy) and the detector's confidence."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float


class Detector(Protocol):
    def detect(self, image: Image.Image) -> list[Box]:
        """Boxes of what the detector finds in the image (any order; the pass sorts them)."""


def decode_yolo(output: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A YOLOv8 detection head's output [4 + classes, anchors] (rows cx, cy, w, h, then one score per class) as
    (corners [k, 4] x1 y1 x2 y2, scores [k], classes [k]) of the anchors whose best score is above `confidence`."""
    if output.ndim != 2 or output.shape[0] < 5:
        raise ValueError(f"expected a [4 + classes, anchors] array, got shape {tuple(output.shape)}")
    class_scores = output[4:]
    classes = class_scores.argmax(axis=0)
    scores = class_scores.max(axis=0)
    keep = scores > confidence  # strictly above, as ultralytics' non_max_suppression filters
    cx, cy, w, h = output[:4, keep]
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return corners.astype(np.float64), scores[keep].astype(np.float64), classes[keep]


def nms(corners: np.ndarray, scores: np.ndarray, iou: float, classes: Optional[np.ndarray] = None) -> list[int]:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first. A box is dropped when its IoU
    with a kept box of the same class is above `iou` (torchvision's nms rule, which ultralytics uses)."""
    if len(scores) == 0:
        return []
    boxes = corners.astype(np.float64)
    if classes is not None:  # shifted apart by class (as ultralytics does), boxes of two classes never overlap
        boxes = boxes + (classes.astype(np.float64) * (boxes.max() - boxes.min() + 1.0))[:, None]
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        low = np.maximum(boxes[best, :2], boxes[rest, :2])
        high = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        union = areas[best] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return kept


def detector_input_size(image_size: tuple[int, int], max_side: int, align: int = DETECTOR_ALIGN) -> tuple[int, int]:
    """The size the detector sees: scaled down (never up) to fit `max_side`, each side rounded up to `align`."""
    width, height = image_size
    scale = min(1.0, max_side / max(width, height))
    return (int(math.ceil(width * scale / align)) * align, int(math.ceil(height * scale / align)) * align)


def boxes_in_image(corners: np.ndarray, scores: np.ndarray, input_size: tuple[int, int],
                   image_size: tuple[int, int]) -> list[Box]:
    """Corners in the detector's input pixels as Boxes in the image's pixels (clipped to it)."""
    sx, sy = image_size[0] / input_size[0], image_size[1] / input_size[1]
    boxes = []
    for (x1, y1, x2, y2), score in zip(corners, scores):
        x1, x2 = (float(np.clip(v * sx, 0, image_size[0])) for v in (x1, x2))
        y1, y2 = (float(np.clip(v * sy, 0, image_size[1])) for v in (y1, y2))
        if x2 > x1 and y2 > y1:
            boxes.append(Box(x1, y1, x2, y2, float(score)))
    return boxes


class OnnxDetector:
    """A YOLOv8 detector exported to ONNX (ultralytics' layout), run on the CPU by ONNX Runtime: a 640² detection
    takes tens of milliseconds there, and the GPU stays with the UNet."""

    def __init__(self, path: Path, label: str, confidence: float = CONFIDENCE, iou: float = IOU) -> None:
        import onnxruntime
        import torch

        self.path, self.name, self.confidence, self.iou = Path(path), Path(path).name, confidence, iou
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())  # the process's thread budget, not all cores
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        image_input = len(inputs) == 1 and len(inputs[0].shape) == 4
        if not image_input or isinstance(inputs[0].shape[1], int) and inputs[0].shape[1] != 3:  # a name: dynamic
            raise ValueError(f"expected one image input [1, 3, H, W], got {[(i.name, i.shape) for i in inputs]}")
        if not outputs or len(outputs[0].shape) != 3:
            raise ValueError(f"expected a YOLO output [1, 4 + classes, anchors], got "
                             f"{[(o.name, o.shape) for o in outputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        height, width = inputs[0].shape[2:]
        self.fixed_size = (width, height) if isinstance(width, int) and isinstance(height, int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.max_side = max(json.loads(meta["imgsz"])) if "imgsz" in meta else DETECTOR_MAX_SIDE
        names = ast.literal_eval(meta["names"]) if "names" in meta else {0: label}  # a dict literal, never code
        if not isinstance(names, dict) or label not in names.values():
            raise ValueError(f"expected a detector of {label!r}, its classes are {names!r}")
        self.class_index = next(k for k, v in names.items() if v == label)

    def detect(self, image: Image.Image) -> list[Box]:
        size = self.fixed_size or detector_input_size(image.size, self.max_side)
        pixels = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        (output,) = self.session.run([self.output_name], {self.input_name: pixels.transpose(2, 0, 1)[None]})
        if output.ndim != 3 or output.shape[0] != 1:
            raise ValueError(f"expected an output [1, 4 + classes, anchors], got shape {tuple(output.shape)}")
        corners, scores, classes = decode_yolo(output[0], self.confidence)
        keep = [i for i in nms(corners, scores, self.iou, classes) if classes[i] == self.class_index]
        return boxes_in_image(corners[keep], scores[keep], size, image.size)


def check_detector_file(path: Path, label: str) -> None:
    """Load a detector file as the predictor does and run it once (script/download_weights' load check)."""
    OnnxDetector(path, label).detect(Image.new("RGB", (64, 64)))


class Detectors:
    """The baked detectors, each loaded on first use (a request without the detailer never pays). `loaded` maps a
    unit to its Detector; tests put their own Detector there to give the pass known boxes."""

    def __init__(self, weights_dir: Path) -> None:
        self.weights_dir = Path(weights_dir)
        self.loaded: dict[str, Detector] = {}

    def get(self, unit: str) -> Detector:
        if unit not in self.loaded:
            import utils

            folder, file, label = DETECTOR_FILES[unit]
            path = self.weights_dir / folder / file
            if not path.is_file():
                raise utils.WeightsMissingError(
                    f"detailer: the {unit} detector {path} is missing; run `script/download_weights --only "
                    f"{UNIT_COMPONENTS[unit]}` before `cog build` (or "
                    "`python script/tiny_weights.py DIR` for the tiny test model)")
            phase = time.perf_counter()
            try:
                self.loaded[unit] = OnnxDetector(path, label)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own (Fail, InvalidGraph, ...)
                raise DetailerError(f"detailer: the {unit} detector {path.name} could not be loaded "
                                    f"({type(err).__name__}: {str(err)[:300]}); run `script/download_weights "
                                    "--check`") from err
            logger.info("loaded the %s detector %s in %.2fs (first use)", unit, file, time.perf_counter() - phase)
        return self.loaded[unit]


def detect(detector: Detector, image: Image.Image, unit: str, index: int) -> list[Box]:
    """The detector's boxes, best first; any failure of the detector is a DetailerError naming `detailer`."""
    try:
        boxes = list(detector.detect(image))
    except Exception as err:  # noqa: BLE001 - whatever the detector raised, the request fails with its cause
        raise DetailerError(f"detailer: the {unit} detector failed on image {index + 1} "
                            f"({type(err).__name__}: {str(err)[:300]})") from err
    return sorted(boxes, key=lambda box: -box.score)


# --- Masks, crops and blending (pure) -----------------------------------------------------------------------------
Region = tuple[int, int, int, int]  # x1, y1, x2, y2 in image pixels, x2 and y2 exclusive


def box_mask(size: tuple[int, int], box: Box, dilation: int = DILATION) -> np.ndarray:
    """ADetailer's mask of a box: the filled rectangle (corners inclusive, as PIL draws it) dilated by a
    `dilation` x `dilation` rectangle kernel. uint8, 0 or 255, [height, width]."""
    import cv2

    width, height = size
    mask = np.zeros((height, width), np.uint8)
    x1, y1 = max(0, int(round(box.x1))), max(0, int(round(box.y1)))
    x2, y2 = min(width - 1, int(round(box.x2))), min(height - 1, int(round(box.y2)))
    mask[y1:y2 + 1, x1:x2 + 1] = 255
    if dilation > 0:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (dilation, dilation)), iterations=1)
    return mask


def blur_mask(mask: np.ndarray, blur: int = MASK_BLUR) -> np.ndarray:
    """A1111's inpainting mask blur: a Gaussian of sigma `blur` over 2*int(2.5*blur + 0.5) + 1 pixels, along x then
    along y. uint8."""
    import cv2

    if blur <= 0:
        return mask
    kernel = 2 * int(2.5 * blur + 0.5) + 1
    blurred = cv2.GaussianBlur(mask, (kernel, 1), blur)
    return cv2.GaussianBlur(blurred, (1, kernel), blur)


def crop_region(mask: np.ndarray, padding: int = PADDING) -> Optional[Region]:
    """The bounding box (x1, y1, x2, y2; x2, y2 exclusive) of the mask's non-zero pixels plus `padding` on every
    side, clipped to the image; None for an empty mask."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (max(0, int(cols[0]) - padding), max(0, int(rows[0]) - padding),
            min(width, int(cols[-1]) + 1 + padding), min(height, int(rows[-1]) + 1 + padding))


def work_size(region_size: tuple[int, int], image_size: tuple[int, int], native: int = 1024) -> tuple[int, int]:
    """The size a crop is repainted at: the SDXL training size (utils.ASPECT_RATIOS) nearest to the crop's aspect
    ratio, at the model's native area `native`² (so that on CUDA the repaints need at most 11 UNet graph shapes,
    each captured once), or at the image's own area when that is smaller (ADetailer repaints at the image's size);
    sides are multiples of 32."""
    import utils

    aspect = math.log(region_size[0] / region_size[1])
    base = min(utils.ASPECT_RATIOS.values(), key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))
    scale = math.sqrt(min(native * native, image_size[0] * image_size[1]) / (1024 * 1024))
    return tuple(max(32, int(round(side * scale / 32)) * 32) for side in base)


def fit_region(region: Region, aspect: float, image_size: tuple[int, int]) -> Region:
    """Grow the region's shorter side to `aspect` (width / height) around its centre, shifted back inside the image
    (A1111's expand_crop_region idea): the repaint then sees undistorted pixels. Where the image is too small the
    region stops at its edge."""
    x1, y1, x2, y2 = region
    width, height = image_size
    w, h = x2 - x1, y2 - y1
    if w / h < aspect:
        grow = min(width, int(round(h * aspect))) - w
        x1, x2 = _grow(x1, x2, grow, width)
    else:
        grow = min(height, int(round(w / aspect))) - h
        y1, y2 = _grow(y1, y2, grow, height)
    return x1, y1, x2, y2


def _grow(start: int, end: int, grow: int, limit: int) -> tuple[int, int]:
    if grow <= 0:
        return start, end
    start, end = start - grow // 2, end + grow - grow // 2
    if start < 0:
        start, end = 0, end - start
    if end > limit:
        start, end = start - (end - limit), limit
    return max(0, start), end


def blend(image: Image.Image, repainted: Image.Image, region: Region, mask: np.ndarray) -> Image.Image:
    """The repainted crop, scaled back to its region, blended into the image through the (blurred) mask: where the
    mask is 0 the result is the image's pixel, where it is 255 the repaint's."""
    x1, y1, x2, y2 = region
    canvas = image.copy()
    canvas.paste(repainted.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    return Image.composite(canvas, image, Image.fromarray(mask))


# --- The pass -----------------------------------------------------------------------------------------------------
# paint(crop, mask, seed) -> the repainted crop at the crop's size: one inpainting pass of the request's model.
Paint = Callable[[Image.Image, Image.Image, int], Image.Image]


@dataclasses.dataclass
class Painter:
    """One inpainting pass of the request's model over a crop: its pipeline (with its CUDA graphs / go_fast twin),
    sampler, prompt embeddings, steps and guidance; `strength` is detailer_strength."""

    pipeline: Callable[[], Any]  # a pipeline ready for a new denoising loop (LoadedModel.pipeline("inpaint", fast))
    scheduler: Callable[[], Any]  # a fresh scheduler of the request's sampler
    embeds: dict  # prompt embedding kwargs for one image
    steps: int
    guidance: float
    guidance_rescale: float
    strength: float

    def __call__(self, crop: Image.Image, mask: Image.Image, seed: int) -> Image.Image:
        import torch

        pipe = self.pipeline()
        pipe.scheduler = self.scheduler()
        return pipe(**self.embeds, image=crop, mask_image=mask, width=crop.width, height=crop.height,
                    strength=self.strength, num_inference_steps=self.steps, guidance_scale=self.guidance,
                    guidance_rescale=self.guidance_rescale,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def repaint_box(image: Image.Image, box: Box, paint: Paint, seed: int, native: int = 1024) -> Image.Image:
    """Repaint one box as ADetailer's "inpaint only masked" does (module docstring, steps 2-3)."""
    mask = blur_mask(box_mask(image.size, box))
    region = crop_region(mask)
    if region is None:
        return image
    size = work_size((region[2] - region[0], region[3] - region[1]), image.size, native)
    region = fit_region(region, size[0] / size[1], image.size)
    crop = image.crop(region).resize(size, Image.Resampling.LANCZOS)
    crop_mask = Image.fromarray(mask).crop(region).resize(size, Image.Resampling.LANCZOS)
    return blend(image, paint(crop, crop_mask, seed), region, mask)


def run(images: Sequence[Image.Image], seed: int, units: Sequence[tuple[str, Detector]], paint: Paint,
        native: int = 1024) -> list[Image.Image]:
    """Detail every image (image i has seed + i): each unit detects on the image as the previous unit left it and
    repaints its boxes in order, box j with seed + i + j (ADetailer's seed per box)."""
    from sdxl.progress import Progress

    phase = time.perf_counter()
    out, counts = [], {unit: 0 for unit, _ in units}
    progress = Progress("detailer crops")  # its total grows as each unit finds its boxes
    for i, image in enumerate(images):
        for unit, detector in units:
            boxes = detect(detector, image, unit, i)
            counts[unit] += len(boxes)
            total = sum(counts.values())
            for j, box in enumerate(boxes):
                image = repaint_box(image, box, paint, seed + i + j, native)
                progress.set(total - len(boxes) + j + 1, total)
        out.append(image)
    logger.info("detailer: repainted %s in %.2fs", ", ".join(f"{unit} boxes: {n}" for unit, n in counts.items()),
                time.perf_counter() - phase)
    return out
