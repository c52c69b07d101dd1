"""Control map preprocessors: from a control image (already at the output size) to the map its control type reads.

Model-free ones are small pure functions of an RGB image: canny (OpenCV's Canny at A1111's default thresholds
100/200), scribble (an XDoG edge sketch, A1111's "scribble_xdog") and tile (A1111's "tile_resample" at its default
rate 1: the image itself). depth runs the baked Depth Anything V2 Small through transformers, loaded on first use
(`Preprocessors`), and so does openpose (RT-DETR people, ViTPose keypoints, an OpenPose skeleton: sdxl/pose.py).
lineart, lineart_anime and softedge run their baked line networks (sdxl/lines.py), loaded on first use too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from sdxl import lines, pose

CANNY_THRESHOLDS = (100, 200)  # A1111 ControlNet's defaults (infotext "Threshold A: 100, Threshold B: 200")
XDOG_THRESHOLD = 32  # A1111's scribble_xdog default
XDOG_SIGMAS = (0.5, 5.0)  # the narrow and the wide Gaussian of the difference


def canny(image: Image.Image) -> Image.Image:
    """White edges on black (OpenCV's Canny on the RGB image: the strongest channel's gradient)."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), *CANNY_THRESHOLDS)
    return Image.fromarray(edges).convert("RGB")


def scribble(image: Image.Image) -> Image.Image:
    """White strokes on black where the image has dark lines or edges: a difference of Gaussians (the narrow blur
    minus the wide one) over the threshold in every channel."""
    import cv2

    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    narrow = cv2.GaussianBlur(pixels, (0, 0), XDOG_SIGMAS[0])
    wide = cv2.GaussianBlur(pixels, (0, 0), XDOG_SIGMAS[1])
    difference = (wide - narrow).min(axis=2)  # darker than the surroundings in every channel: a line
    strokes = np.where(difference > XDOG_THRESHOLD, 255, 0).astype(np.uint8)
    return Image.fromarray(strokes).convert("RGB")


def tile(image: Image.Image) -> Image.Image:
    """The image itself: the tile model reads it as a low-detail version of the output."""
    return image.convert("RGB")


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "canny": canny,
    "scribble": scribble,
    "tile": tile,
}
MODEL_PREPROCESSORS = ("depth", "openpose", *lines.LINE_MODELS)  # run by Preprocessors with baked models
BUILT_IN = tuple(sorted((*PREPROCESSORS, *MODEL_PREPROCESSORS)))

# --- Depth: Depth Anything V2 Small (transformers' DepthAnythingForDepthEstimation) ------------------------------
DEPTH_DIR = "depth-anything-v2-small"  # under WEIGHTS_DIR
# Where script/download_weights gets it; facts from docs/components.md §1.4 (stored HF tree and blob pages of the
# revision). Only the Small model is Apache-2.0 (model card); Base/Large/Giant are CC-BY-NC-4.0: never swap them in.
DEPTH_SOURCE: dict[str, Any] = {
    "folder": DEPTH_DIR,
    "repo": "depth-anything/Depth-Anything-V2-Small-hf",
    "revision": "5426e4f0f36572d16453bbda7a8389317b1bef99",
    "licence": "apache-2.0 (model card)",
    "files": [
        {"path": "config.json", "dest": "config.json", "sha256": None, "size": None},
        {"path": "preprocessor_config.json", "dest": "preprocessor_config.json", "sha256": None, "size": None},
        {"path": "model.safetensors", "dest": "model.safetensors",
         "sha256": "3152477ce0d8d6978d76b995120de97cb5b928701fd0f817769f59e249a16b70", "size": 99_173_660},
    ],
}

logger = logging.getLogger(__name__)


def depth_map(model, processor, image: Image.Image) -> Image.Image:
    """Relative inverse depth (near is bright), resized to the image by the processor's own post-processing
    (bicubic) and stretched to 0-255, as A1111's depth_anything preprocessors show it."""
    import torch

    inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(model.device, model.dtype)
    with torch.no_grad():
        outputs = model(**inputs)
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
    depth = depth[0]["predicted_depth"].float()
    low, high = depth.min(), depth.max()
    scaled = (depth - low) / (high - low) * 255.0 if high > low else torch.zeros_like(depth)
    return Image.fromarray(scaled.round().clamp(0, 255).to(torch.uint8).cpu().numpy()).convert("RGB")


class Preprocessors:
    """Every built-in preprocessor; the ones with a model load it on first use (text-to-image never pays)."""

    def __init__(self, weights_dir: Path, device, dtype) -> None:
        self.weights_dir = Path(weights_dir)
        self.device, self.dtype = device, dtype
        self._depth: tuple | None = None
        self.pose_estimator: pose.KeypointEstimator | None = None  # sdxl/pose.py's, loaded on first use
        self.lines = lines.LineDetectors(self.weights_dir, device)  # softedge, lineart, lineart_anime

    def map(self, control_type: str, image: Image.Image, preprocess: bool) -> Image.Image:
        """The map for `control_type`; with preprocess false the image already is the map. A preprocessor that
        fails on the image is an error naming control_image (missing weights stay a deployment error)."""
        import utils

        if not preprocess:
            return image.convert("RGB")
        run = self._runner(control_type)
        try:
            return run(image)
        except (utils.InputError, utils.WeightsMissingError):
            raise
        except Exception as err:  # noqa: BLE001 - the model's own errors, said in one line
            raise utils.InputError(
                f"control_image: the {control_type} preprocessor failed on this image ({type(err).__name__}: "
                f"{str(err)[:200]}); pass the {control_type} map itself with control_preprocess=false") from err

    def _runner(self, control_type: str) -> Callable[[Image.Image], Image.Image]:
        """The preprocessor of `control_type` as a function of an image, its model loaded first if it has one."""
        if control_type == "depth":
            model, processor = self.depth()
            return lambda image: depth_map(model, processor, image)
        if control_type == "openpose":
            if self.pose_estimator is None:
                self.pose_estimator = pose.PoseEstimator.load(self.weights_dir, self.device, self.dtype)
            estimator = self.pose_estimator
            return lambda image: pose.openpose_map(estimator, image)
        if control_type in lines.LINE_MODELS:
            return lambda image: self.lines.map(control_type, image)
        return lambda image: control_map(control_type, image, True)

    def depth(self) -> tuple:
        if self._depth is None:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            import utils

            folder = self.weights_dir / DEPTH_DIR
            if not (folder / "config.json").is_file():
                raise utils.WeightsMissingError(f"depth model not found in {folder}: run script/download_weights")
            phase = time.perf_counter()
            model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
            self._depth = (model, AutoImageProcessor.from_pretrained(folder))
            logger.info("loaded depth model %s in %.2fs (first use)", DEPTH_DIR, time.perf_counter() - phase)
        return self._depth


def control_map(control_type: str, image: Image.Image, preprocess: bool) -> Image.Image:
    """The map of a model-free preprocessor; with preprocess false the image already is the map."""
    import utils

    if not preprocess:
        return image.convert("RGB")
    if control_type not in PREPROCESSORS:
        raise utils.InputError(
            f"control_preprocess: no built-in {control_type} preprocessor yet (built in: {list(BUILT_IN)}); "
            f"pass the {control_type} map itself as control_image with control_preprocess=false")
    return PREPROCESSORS[control_type](image)
