"""Control map preprocessors: from a control image (already at the output size) to the map its control type reads.

Each is a small pure function of an RGB image. Only model-free ones are built in so far: canny (OpenCV's Canny at
A1111's default thresholds 100/200), scribble (an XDoG edge sketch, A1111's "scribble_xdog") and tile (A1111's
"tile_resample" at its default rate 1: the image itself). The other types need their map passed in with
control_preprocess=false until their models are baked (README, "ControlNet").
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

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


def control_map(control_type: str, image: Image.Image, preprocess: bool) -> Image.Image:
    """The map for `control_type`; with preprocess false the image already is the map."""
    import utils

    if not preprocess:
        return image.convert("RGB")
    if control_type not in PREPROCESSORS:
        raise utils.InputError(
            f"control_preprocess: no built-in {control_type} preprocessor yet (built in: {sorted(PREPROCESSORS)}); "
            f"pass the {control_type} map itself as control_image with control_preprocess=false")
    return PREPROCESSORS[control_type](image)
