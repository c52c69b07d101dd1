"""The openpose preprocessor (sdxl/pose.py): the skeleton drawing against hand-computed pixels, the real transformers
path (RT-DETR people, ViTPose keypoints) on the tiny models through predict(), no person, missing weights, and
script/download_weights on the two pinned repos."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import utils
from conftest import predict_inputs
from sdxl import pose, preprocess

BLACK = (0, 0, 0)
COCO = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
        "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
        "right_ankle")
# Each COCO keypoint's disc colour in an OpenPose drawing, written out by hand from the OpenPose-18 order (nose,
# neck, right arm, left arm, right leg, left leg, right eye, left eye, right ear, left ear) and its palette.
POINT_COLOUR = {
    "nose": (255, 0, 0), "right_shoulder": (255, 170, 0), "right_elbow": (255, 255, 0), "right_wrist": (170, 255, 0),
    "left_shoulder": (85, 255, 0), "left_elbow": (0, 255, 0), "left_wrist": (0, 255, 85), "right_hip": (0, 255, 170),
    "right_knee": (0, 255, 255), "right_ankle": (0, 170, 255), "left_hip": (0, 85, 255), "left_knee": (0, 0, 255),
    "left_ankle": (85, 0, 255), "right_eye": (170, 0, 255), "left_eye": (255, 0, 255), "right_ear": (255, 0, 170),
    "left_ear": (255, 0, 85),
}
NECK_COLOUR = (255, 85, 0)


def person(**points: tuple[float, float, float]) -> np.ndarray:
    """One person's (17, 3) COCO keypoints: the named ones at (x, y, confidence), the others absent (confidence 0)."""
    keypoints = np.zeros((17, 3))
    for name, value in points.items():
        keypoints[COCO.index(name)] = value
    return keypoints


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.asarray(image)[y, x])


def stick_figure(size=(256, 256)) -> Image.Image:
    """A person-like drawing: head, body, arms and legs in dark strokes on a light wall."""
    image = Image.new("RGB", size, (225, 220, 205))
    draw = ImageDraw.Draw(image)
    w, h = size
    cx = w // 2
    draw.ellipse((cx - w // 12, h // 10, cx + w // 12, h // 10 + w // 6), fill=(60, 40, 30))
    for line in ((cx, h // 4, cx, 3 * h // 5), (cx, h // 3, cx - w // 4, h // 2), (cx, h // 3, cx + w // 4, h // 4),
                 (cx, 3 * h // 5, cx - w // 6, 9 * h // 10), (cx, 3 * h // 5, cx + w // 6, 9 * h // 10)):
        draw.line(line, fill=(30, 30, 60), width=max(3, w // 40))
    return image


def test_skeleton_drawing_matches_hand_computed_points_limbs_and_colours():
    # Every COCO keypoint alone (no limb can be drawn): a disc of its OpenPose colour, radius 4 at 512 px.
    alone = np.stack([person(**{name: (24 + 28 * i, 40, 0.9)}) for i, name in enumerate(COCO)])
    drawn = pose.draw_openpose(pose.openpose_keypoints(alone), (512, 512))
    for i, name in enumerate(COCO):
        x = 24 + 28 * i
        assert pixel(drawn, x, 40) == POINT_COLOUR[name], name
        assert pixel(drawn, x, 43) == POINT_COLOUR[name] and pixel(drawn, x, 46) == BLACK, name
    # Limbs, at 60 % of their colour, 4 px either side of the axis at 512 px, under the points' discs.
    arm = person(right_shoulder=(100, 200, 0.9), right_elbow=(100, 300, 0.9), right_wrist=(100, 400, 0.2))
    shoulders = person(right_shoulder=(300, 100, 0.9), left_shoulder=(400, 100, 0.8))
    people = pose.openpose_keypoints(np.stack([arm, shoulders]))
    drawn = pose.draw_openpose(people, (512, 512))
    expected = {
        (100, 250): (153, 102, 0), (103, 250): (153, 102, 0), (106, 250): BLACK,  # right upper arm
        (100, 200): POINT_COLOUR["right_shoulder"], (100, 300): POINT_COLOUR["right_elbow"], (100, 306): BLACK,
        (100, 400): BLACK, (100, 350): BLACK,  # the wrist is below the threshold: no point, no forearm
        (50, 100): BLACK,  # no neck without both shoulders
        (350, 100): NECK_COLOUR,  # the neck: the shoulders' midpoint
        (325, 100): (153, 0, 0), (325, 103): (153, 0, 0), (325, 106): BLACK,  # neck - right shoulder
        (375, 100): (153, 51, 0),  # neck - left shoulder
        (300, 100): POINT_COLOUR["right_shoulder"], (400, 100): POINT_COLOUR["left_shoulder"],
    }
    assert {xy: pixel(drawn, *xy) for xy in expected} == expected
    colours = {tuple(c) for c in np.asarray(drawn).reshape(-1, 3)}
    assert colours == {BLACK, *(colour for xy, colour in expected.items() if colour != BLACK)}  # no other colour
    # Twice the size: twice the width (7 px off the axis is inside at 1024 px, outside at 512).
    wide = pose.draw_openpose(people * [2, 2, 1], (1024, 1024))
    assert pixel(wide, 207, 500) == (153, 102, 0) and pixel(wide, 212, 500) == BLACK
    assert pixel(drawn, 107, 250) == BLACK
    assert pose.limb_width((1024, 512)) == 4 and pose.limb_width((64, 64)) == 1  # the shorter side decides
    assert np.asarray(pose.draw_openpose(np.zeros((0, 18, 3)), (96, 64))).shape == (64, 96, 3)


@pytest.fixture
def preprocessors(predictor):
    """The predictor's preprocessors with their pose estimator not yet loaded; put back as they were afterwards."""
    saved = predictor.preprocessors.pose_estimator
    predictor.preprocessors.pose_estimator = None
    yield predictor.preprocessors
    predictor.preprocessors.pose_estimator = saved


def model_card_keypoints(weights: Path, image: Image.Image) -> np.ndarray:
    """The ViTPose model card's two stages written out here with transformers' classes: RT-DETR boxes of class
    "person" (score 0.3), converted to COCO (x, y, w, h), then ViTPose in each box."""
    from transformers import AutoImageProcessor, RTDetrForObjectDetection, VitPoseForPoseEstimation

    detector_dir, estimator_dir = weights / pose.DETECTOR_DIR, weights / pose.POSE_DIR
    processor, detector = AutoImageProcessor.from_pretrained(detector_dir), RTDetrForObjectDetection.from_pretrained(
        detector_dir)
    with torch.no_grad():
        found = processor.post_process_object_detection(detector(**processor(images=image, return_tensors="pt")),
                                                         target_sizes=[(image.height, image.width)], threshold=0.3)[0]
    boxes = found["boxes"][found["labels"] == detector.config.label2id["person"]].numpy()
    boxes[:, 2:] -= boxes[:, :2]
    processor, estimator = AutoImageProcessor.from_pretrained(estimator_dir), VitPoseForPoseEstimation.from_pretrained(
        estimator_dir)
    with torch.no_grad():
        heatmaps = estimator(**processor(image, boxes=[boxes], return_tensors="pt"))
    poses = processor.post_process_pose_estimation(heatmaps, boxes=[boxes])[0]
    return np.stack([np.column_stack([p["keypoints"].numpy(), p["scores"].numpy()]) for p in poses])


def test_openpose_through_predict_runs_the_tiny_models_and_equals_passing_their_map(predictor, preprocessors,
                                                                                   tiny_weights, tmp_path):
    small = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=1, output_format="png",
                 prompt="1girl", seed=5)

    def image(**kwargs):
        (out,) = predictor.predict(**predict_inputs(**small, **kwargs))
        with Image.open(out) as result:
            return np.asarray(result.convert("RGB")), result.info["parameters"]

    photo = tmp_path / "photo.png"
    stick_figure().save(photo)
    extracted, text = image(control_image=photo, control_type="openpose")
    assert isinstance(preprocessors.pose_estimator, pose.PoseEstimator)  # loaded by the first openpose request
    assert 'ControlNet 0: "Module: openpose, Model: controlnet-union-sdxl-1.0-promax [' in text
    # The map it used: the skeleton of the keypoints the model card's recipe gets from the tiny models.
    keypoints = model_card_keypoints(tiny_weights, Image.open(photo).convert("RGB"))
    assert len(keypoints) > 0 and (keypoints[..., 2] >= pose.KEYPOINT_THRESHOLD).any()
    expected = pose.draw_openpose(pose.openpose_keypoints(keypoints), (256, 256))
    assert np.asarray(expected).any()
    skeleton = tmp_path / "skeleton.png"
    expected.save(skeleton)
    given, text = image(control_image=skeleton, control_type="openpose", control_preprocess=False)
    assert np.array_equal(extracted, given)
    assert 'ControlNet 0: "Module: none,' in text
    plain, _ = image()
    assert not np.array_equal(extracted, plain)


def test_no_person_gives_a_black_map_and_says_so(caplog):
    found = []

    def nobody(image: Image.Image) -> np.ndarray:
        found.append(image.size)
        return np.zeros((0, 17, 3))

    preprocessors = preprocess.Preprocessors(Path("/nonexistent"), torch.device("cpu"), torch.float32)
    preprocessors.pose_estimator = nobody
    with caplog.at_level(logging.WARNING, logger="sdxl.pose"):
        drawn = preprocessors.map("openpose", stick_figure((96, 64)), True)
    assert found == [(96, 64)] and drawn.size == (96, 64) and not np.asarray(drawn).any()
    assert "no person found" in caplog.text


def test_missing_pose_weights_is_an_error_naming_the_folder_and_the_fix(tiny_weights, tmp_path):
    (tmp_path / pose.DETECTOR_DIR).symlink_to(tiny_weights / pose.DETECTOR_DIR)  # the detector only
    preprocessors = preprocess.Preprocessors(tmp_path, torch.device("cpu"), torch.float32)
    with pytest.raises(utils.WeightsMissingError) as raised:
        preprocessors.map("openpose", stick_figure((64, 64)), True)
    message = str(raised.value)
    assert "usyd-community/vitpose-base-simple" in message and str(tmp_path / pose.POSE_DIR) in message
    assert "script/download_weights --only pose_detector --only pose" in message
    assert preprocessors.pose_estimator is None  # nothing half-loaded: the next request tries again


def test_download_weights_lays_out_and_checks_the_pinned_pose_models(tiny_weights, tmp_path, monkeypatch):
    """script/download_weights against a fake Hub serving the real listings of both repos, with the tiny models
    where the script fetches: refused under the real pins; with the pins set to the tiny files, laid out, loaded,
    and passed by --check, which then catches a changed byte."""
    from fakes import FakeHFHub
    from hub_listings import HUB_LISTINGS, placeholder
    from test_hf_download import _load_script

    script = _load_script()
    names = {"pose_detector": pose.DETECTOR_DIR, "pose": pose.POSE_DIR}
    dest = tmp_path / "weights"
    with FakeHFHub() as hub:
        for name, folder in names.items():
            repo = script.SOURCES[name]["repo"]
            for path, size in HUB_LISTINGS[repo]["files"].items():
                tiny = tiny_weights / folder / path
                data = tiny.read_bytes() if path in script.SOURCES[name]["files"] else placeholder(path, size)
                hub.add_file(repo, path, data, lfs=path.endswith(".safetensors"))
            hub.set_commit(repo, HUB_LISTINGS[repo]["commit"])
        for key, value in (("HF_ENDPOINT", hub.url), ("NO_PROXY", "127.0.0.1,localhost"),
                           ("HF_HOME", str(tmp_path / "hf-home")), ("HF_HUB_DISABLE_XET", "1")):
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(script.DownloadError, match="pinned sha256 mismatch: usyd-community/vitpose-base-simple/"
                                                        "model.safetensors"):
            script.install("pose", dest, script.Hub, force=False)
        assert not dest.exists() or not list(dest.iterdir())
        for name, folder in names.items():
            weights = (tiny_weights / folder / "model.safetensors").read_bytes()
            monkeypatch.setitem(script.PINS, name, {"commit": script.PINS[name]["commit"], "files": {
                "model.safetensors": (len(weights), hashlib.sha256(weights).hexdigest())}})
            script.install(name, dest, script.Hub, force=False)
    for folder in names.values():
        assert sorted(p.name for p in (dest / folder).iterdir()) == ["MANIFEST.json", "config.json",
                                                                      "model.safetensors", "preprocessor_config.json"]
    only = ["--only", "pose_detector", "--only", "pose"]
    assert script.main(["--dest", str(dest), "--check", *only]) == 0
    loaded = pose.PoseEstimator.load(dest, torch.device("cpu"), torch.float32)  # what the predictor will load
    assert loaded.person == 0
    weights = dest / pose.POSE_DIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert script.main(["--dest", str(dest), "--check", *only]) == 1


def test_a_preprocessor_that_fails_on_the_image_is_an_error_naming_control_image():
    def broken(image: Image.Image) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    preprocessors = preprocess.Preprocessors(Path("/nonexistent"), torch.device("cpu"), torch.float32)
    preprocessors.pose_estimator = broken
    with pytest.raises(utils.InputError, match=r"^control_image: the openpose preprocessor failed on this image "
                                               r"\(RuntimeError: CUDA error.*control_preprocess=false"):
        preprocessors.map("openpose", stick_figure((64, 64)), True)
