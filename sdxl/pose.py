"""The openpose preprocessor: people found by RT-DETR, their COCO-17 keypoints by ViTPose, drawn as an OpenPose-18
body skeleton, the map the union ControlNet's openpose mode reads.

How a map is made (`openpose_map`):

1. `PoseEstimator.people`: RT-DETR (`PekingU/rtdetr_r50vd_coco_o365`, transformers' `RTDetrForObjectDetection`)
   finds the people; boxes of its "person" class scoring at least PERSON_THRESHOLD are kept (the threshold of the
   ViTPose model card's own recipe).
2. `PoseEstimator.keypoints`: ViTPose (`usyd-community/vitpose-base-simple`, `VitPoseForPoseEstimation`) estimates
   each person's 17 COCO keypoints (x, y, confidence) inside that person's box.
3. `openpose_keypoints` reorders them into OpenPose's 18 body points (the neck, which COCO lacks, is the midpoint of
   the shoulders), and `draw_openpose` draws them as ControlNet's OpenPose annotator does: on black, at the control
   map's size, each limb a filled ellipse in 60 % of its colour, then each point a disc in its full colour; points
   below KEYPOINT_THRESHOLD and the limbs touching them are left out. The limb width scales with the map
   (`limb_width`: 4 px at 512, ControlNet's stick width at its 512-px detect resolution).

No person found gives a black map (logged): the ControlNet then gets an empty pose and the pose is left to the prompt.

Both models are loaded on first use from their baked folders (script/download_weights, tables below); text-to-image
and the other control types never pay for them. Tests may replace the estimator (`Preprocessors.pose_estimator`)
with any callable of the same shape.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# --- Baked models: where script/download_weights gets them ----------------------------------------------------------
POSE_DIR = "vitpose-base-simple"  # under WEIGHTS_DIR
DETECTOR_DIR = "rtdetr-r50vd-coco-o365"

# ViTPose-B "simple" (COCO-17, 256x192 input). Commit and files from the Hub's tree page of main at a93ac0c ("Upload
# folder using huggingface_hub", 5 commits: config.json 1.8 kB, model.safetensors 344 MB, preprocessor_config.json
# 363 B). The full commit and the sha256 are pinned by two independent public projects that download
# resolve/a93ac0c67e0b7e2c55287d21d4c460c8f3c54d45/model.safetensors and check that sha256; the same sha256 is on the
# Hub's blob page of the HF staff's pre-release copy (danelcsb/vitpose-base-simple, "344 MB"), whose exact size,
# 343,673,076 B, is from docs/components.md §1.4. Apache-2.0 (model card front matter).
POSE_SOURCE: dict[str, Any] = {
    "folder": POSE_DIR,
    "repo": "usyd-community/vitpose-base-simple",
    "revision": "a93ac0c67e0b7e2c55287d21d4c460c8f3c54d45",
    "licence": "apache-2.0 (model card)",
    "files": [
        {"path": "config.json", "dest": "config.json", "sha256": None, "size": None},
        {"path": "preprocessor_config.json", "dest": "preprocessor_config.json", "sha256": None, "size": None},
        {"path": "model.safetensors", "dest": "model.safetensors",
         "sha256": "85375373893ddd3641f3912821073e53f5435f9e966e1dca59d004454bfe4fdf", "size": 343_673_076},
    ],
}

# RT-DETR R50vd trained on COCO + Objects365 (the detector of the ViTPose model card). The commit is the Hub's tree
# page at 457857c ("Update Model Card (#4)", 18 commits: config.json 5.11 kB, model.safetensors 172 MB,
# preprocessor_config.json 841 B), the snapshot several public projects pin. The sha256 is from the Hub's blob page
# of main, whose model.safetensors was last changed by 6d76889, before 457857c (the file's history has two versions,
# fa9d1cc's 831c1c04... and 6d76889's). The exact byte count was not found in any public record ("172 MB" only): the
# size is None, so download_weights checks that file by its sha256 and the Hub's listed size. Apache-2.0 (card).
DETECTOR_SOURCE: dict[str, Any] = {
    "folder": DETECTOR_DIR,
    "repo": "PekingU/rtdetr_r50vd_coco_o365",
    "revision": "457857cec8ac28ddede40ecee9eed2beca321af8",
    "licence": "apache-2.0 (model card)",
    "files": [
        {"path": "config.json", "dest": "config.json", "sha256": None, "size": None},
        {"path": "preprocessor_config.json", "dest": "preprocessor_config.json", "sha256": None, "size": None},
        {"path": "model.safetensors", "dest": "model.safetensors",
         "sha256": "59abc0b00bea0cc8f7e9ce053c29189a348605bb337123609a7fe02e4ea830a0", "size": None},
    ],
}

# script/download_weights' component names for them (`--only pose_detector --only pose`)
POSE_SOURCES: dict[str, dict[str, Any]] = {"pose_detector": DETECTOR_SOURCE, "pose": POSE_SOURCE}

PERSON_THRESHOLD = 0.3  # detector score to keep a person (the ViTPose model card's recipe uses 0.3)
KEYPOINT_THRESHOLD = 0.3  # keypoint confidence below which a point (and its limbs) is not drawn

# --- Keypoint tables ------------------------------------------------------------------------------------------------
# COCO-17 (ViTPose's output order): 0 nose, 1 left eye, 2 right eye, 3 left ear, 4 right ear, 5 left shoulder,
# 6 right shoulder, 7 left elbow, 8 right elbow, 9 left wrist, 10 right wrist, 11 left hip, 12 right hip, 13 left knee,
# 14 right knee, 15 left ankle, 16 right ankle.
# OpenPose-18 body: 0 nose, 1 neck, 2 right shoulder, 3 right elbow, 4 right wrist, 5 left shoulder, 6 left elbow,
# 7 left wrist, 8 right hip, 9 right knee, 10 right ankle, 11 left hip, 12 left knee, 13 left ankle, 14 right eye,
# 15 left eye, 16 right ear, 17 left ear. NECK marks the point COCO lacks.
NECK = -1
COCO_FOR_OPENPOSE = (0, NECK, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
COCO_SHOULDERS = (5, 6)

# OpenPose's 17 drawn limbs (pairs of OpenPose-18 points) in its drawing order; limb i is drawn in LIMB_COLOURS[i]
# at 60 %, point j in POINT_COLOURS[j]: the ControlNet OpenPose annotator's convention, which ControlNets trained on
# its maps (the union model's openpose mode among them) read.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
POINT_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                 (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                 (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
LIMB_COLOURS = tuple(tuple(int(c * 0.6) for c in colour) for colour in POINT_COLOURS[:len(LIMBS)])
REFERENCE_SIZE, REFERENCE_WIDTH = 512, 4  # ControlNet's stick width 4 (and point radius 4) at its 512-px maps


# --- Pure functions: keypoints -> map ---------------------------------------------------------------------------------
def openpose_keypoints(coco: np.ndarray) -> np.ndarray:
    """(people, 17, 3) COCO keypoints (x, y, confidence) -> (people, 18, 3) OpenPose body points. The neck is the
    midpoint of the shoulders, as confident as the less confident shoulder."""
    coco = np.asarray(coco, dtype=np.float64).reshape(-1, 17, 3)
    points = np.zeros((coco.shape[0], len(COCO_FOR_OPENPOSE), 3))
    for j, source in enumerate(COCO_FOR_OPENPOSE):
        if source == NECK:
            left, right = coco[:, COCO_SHOULDERS[0]], coco[:, COCO_SHOULDERS[1]]
            points[:, j, :2] = (left[:, :2] + right[:, :2]) / 2
            points[:, j, 2] = np.minimum(left[:, 2], right[:, 2])
        else:
            points[:, j] = coco[:, source]
    return points


def limb_width(size: tuple[int, int]) -> int:
    """Half the limb thickness (and the point radius) in pixels: ControlNet's 4 px at 512, in proportion to the
    map's shorter side, so the skeleton reads the same at every output size."""
    return max(1, round(REFERENCE_WIDTH * min(size) / REFERENCE_SIZE))


def draw_openpose(people: np.ndarray, size: tuple[int, int], threshold: float = KEYPOINT_THRESHOLD) -> Image.Image:
    """OpenPose-18 points (people, 18, 3) drawn on a black RGB image of `size` (width, height): every limb whose two
    ends are confident as an ellipse between them, then every confident point as a disc."""
    import cv2

    width = limb_width(size)
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    people = np.asarray(people, dtype=np.float64).reshape(-1, len(POINT_COLOURS), 3)
    for person in people:
        for (a, b), colour in zip(LIMBS, LIMB_COLOURS):
            if person[a, 2] < threshold or person[b, 2] < threshold:
                continue
            (xa, ya), (xb, yb) = person[a, :2], person[b, :2]
            centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
            half_length = int(round(np.hypot(xb - xa, yb - ya) / 2))
            angle = int(round(np.degrees(np.arctan2(yb - ya, xb - xa))))
            polygon = cv2.ellipse2Poly(centre, (half_length, width), angle, 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, colour)
    for person in people:
        for (x, y, confidence), colour in zip(person, POINT_COLOURS):
            if confidence >= threshold:
                cv2.circle(canvas, (int(round(x)), int(round(y))), width, colour, thickness=-1)
    return Image.fromarray(canvas)


def coco_boxes(xyxy: np.ndarray) -> np.ndarray:
    """Detector boxes (x0, y0, x1, y1) -> the (x, y, width, height) boxes ViTPose's processor takes."""
    boxes = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


# --- The models ---------------------------------------------------------------------------------------------------
KeypointEstimator = Callable[[Image.Image], np.ndarray]  # image -> (people, 17, 3) COCO keypoints in its pixels


class PoseEstimator:
    """RT-DETR person boxes, then ViTPose keypoints inside each box (the ViTPose model card's two stages)."""

    def __init__(self, detector, detector_processor, estimator, estimator_processor) -> None:
        self.detector, self.detector_processor = detector, detector_processor
        self.estimator, self.estimator_processor = estimator, estimator_processor
        labels = {name.lower(): int(i) for i, name in detector.config.id2label.items()}
        if "person" not in labels:
            raise ValueError(f"the pose detector has no 'person' class (its classes: {sorted(labels)[:8]}...)")
        self.person = labels["person"]

    @classmethod
    def load(cls, weights_dir: Path, device, dtype) -> "PoseEstimator":
        """Both models from their baked folders; a missing folder is an error that says how to get it."""
        from transformers import AutoImageProcessor, RTDetrForObjectDetection, VitPoseForPoseEstimation

        import utils

        folders = {"pose_detector": Path(weights_dir) / DETECTOR_DIR, "pose": Path(weights_dir) / POSE_DIR}
        for name, folder in folders.items():
            if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
                raise utils.WeightsMissingError(
                    f"openpose preprocessor: {POSE_SOURCES[name]['repo']} not found in {folder}; run "
                    "`script/download_weights --only pose_detector --only pose`")
        phase = time.perf_counter()
        detector = RTDetrForObjectDetection.from_pretrained(folders["pose_detector"], dtype=dtype).to(device).eval()
        estimator = VitPoseForPoseEstimation.from_pretrained(folders["pose"], dtype=dtype).to(device).eval()
        loaded = cls(detector, AutoImageProcessor.from_pretrained(folders["pose_detector"]),
                     estimator, AutoImageProcessor.from_pretrained(folders["pose"]))
        logger.info("loaded pose models %s + %s in %.2fs (first use)", DETECTOR_DIR, POSE_DIR,
                    time.perf_counter() - phase)
        return loaded

    def people(self, image: Image.Image) -> np.ndarray:
        """(people, 4) boxes (x0, y0, x1, y1) in image pixels of the detector's confident "person" detections."""
        import torch

        inputs = self.detector_processor(images=image, return_tensors="pt").to(self.detector.device,
                                                                               self.detector.dtype)
        with torch.no_grad():
            outputs = self.detector(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        found = self.detector_processor.post_process_object_detection(
            outputs, target_sizes=[(image.height, image.width)], threshold=PERSON_THRESHOLD)[0]
        return found["boxes"][found["labels"] == self.person].cpu().numpy().reshape(-1, 4)

    def keypoints(self, image: Image.Image, people: np.ndarray) -> np.ndarray:
        """(people, 17, 3) COCO keypoints (x, y, confidence) in image pixels, one row per box."""
        import torch

        if len(people) == 0:
            return np.zeros((0, 17, 3))
        boxes = [coco_boxes(people)]
        inputs = self.estimator_processor(image, boxes=boxes, return_tensors="pt").to(self.estimator.device,
                                                                                      self.estimator.dtype)
        with torch.no_grad():
            outputs = self.estimator(**inputs)
        outputs.heatmaps = outputs.heatmaps.float()
        poses = self.estimator_processor.post_process_pose_estimation(outputs, boxes=boxes)[0]
        return np.stack([np.concatenate([p["keypoints"].numpy(), p["scores"].numpy().reshape(-1, 1)], axis=1)
                         for p in poses])

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        return self.keypoints(image, self.people(image))


def openpose_map(estimator: KeypointEstimator, image: Image.Image) -> Image.Image:
    """The OpenPose-18 skeleton of every person `estimator` finds in `image`, drawn at the image's size; black when
    it finds nobody."""
    phase = time.perf_counter()
    coco = np.asarray(estimator(image.convert("RGB")), dtype=np.float64).reshape(-1, 17, 3)
    if len(coco) == 0:
        logger.warning("openpose: no person found in control_image; the pose map is black (the ControlNet gets an "
                       "empty pose)")
    else:
        logger.info("openpose: %d people in %.3fs", len(coco), time.perf_counter() - phase)
    return draw_openpose(openpose_keypoints(coco), image.size)
