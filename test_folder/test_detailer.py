"""The face/hand detailer (sdxl/detailer.py): YOLO decoding and NMS on hand-built outputs, masks/crops/blending
against independent computations, the tiny ONNX detectors through ONNX Runtime, predict() on the tiny model with
injected boxes (repaints stay inside their feathered regions, off and no detection give the plain image bit for
bit), metadata, errors with the model state clean, the download script, and one request through the Cog server."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from PIL import Image

import predict
import utils
from conftest import predict_inputs
from sdxl import detailer
from sdxl.detailer import Box

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=4, output_format="png",
             prompt="1girl, red hat", seed=21)
# How far a repaint may reach beyond its box: the 4x4 dilation adds at most 2 px, the 21-px blur kernel 10 px.
REACH = 2 + 10


class FixedBoxes:
    """A Detector that finds the same boxes in every image, and counts its calls."""

    def __init__(self, boxes):
        self.boxes, self.calls = list(boxes), 0

    def detect(self, image):
        self.calls += 1
        return list(self.boxes)


class Failing:
    def detect(self, image):
        raise RuntimeError("onnxruntime: Non-zero status code returned while running Conv node")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def run(predictor, monkeypatch=None, detectors=None, **overrides):
    """(pixels, infotext) of one prediction; `detectors` maps units to injected Detectors."""
    for unit, detector in (detectors or {}).items():
        monkeypatch.setitem(predictor.detectors.loaded, unit, detector)
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, **overrides}))
    return pixels(path), utils.read_parameters(path)


def outside(boxes, shape, reach=REACH) -> np.ndarray:
    """True where no box, grown by `reach` pixels, can touch the image."""
    keep = np.ones(shape[:2], bool)
    for b in boxes:
        keep[max(0, math.floor(b.y1) - reach):math.ceil(b.y2) + reach + 1,
             max(0, math.floor(b.x1) - reach):math.ceil(b.x2) + reach + 1] = False
    return keep


# --- Pure functions -----------------------------------------------------------------------------------------------
def test_yolo_decoding_and_nms_on_a_hand_built_output():
    # Columns are anchors: rows cx, cy, w, h, then the score of class 0 and class 1.
    output = np.array([
        # A: strong   B: A shifted 1 px   C: elsewhere   D: below 0.3   E: over A, class 1
        [50.0, 51.0, 150.0, 80.0, 50.0],
        [40.0, 40.0, 100.0, 20.0, 40.0],
        [20.0, 20.0, 30.0, 10.0, 20.0],
        [10.0, 10.0, 40.0, 10.0, 10.0],
        [0.9, 0.8, 0.5, 0.2, 0.05],
        [0.0, 0.1, 0.0, 0.1, 0.7],
    ], dtype=np.float32)
    corners, scores, classes = detailer.decode_yolo(output, confidence=0.3)
    np.testing.assert_allclose(corners, [[40, 35, 60, 45], [41, 35, 61, 45], [135, 80, 165, 120], [40, 35, 60, 45]])
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.5, 0.7], rtol=1e-6)
    assert classes.tolist() == [0, 0, 0, 1]
    # B overlaps A with IoU 190/210 > 0.7: dropped; E has A's box but another class: kept; best first.
    assert detailer.nms(corners, scores, 0.7, classes) == [0, 3, 2]
    assert detailer.nms(corners, scores, 0.7) == [0, 2]  # class-agnostic: E goes with B
    # IoU exactly at the threshold is kept (a box is dropped only above it).
    half = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=np.float64)
    assert detailer.nms(half, np.array([0.9, 0.8]), 0.5) == [0, 1]
    assert detailer.nms(half, np.array([0.9, 0.8]), 0.49) == [0]
    assert detailer.nms(np.zeros((0, 4)), np.zeros(0), 0.7) == []


def test_detector_input_size_and_boxes_back_in_image_pixels():
    assert detailer.detector_input_size((1024, 768), 640) == (640, 480)
    assert detailer.detector_input_size((1000, 800), 640) == (640, 512)  # 512 = 800 * 0.64
    assert detailer.detector_input_size((300, 200), 640) == (320, 224)  # never upscaled, rounded up to 32
    boxes = detailer.boxes_in_image(np.array([[64.0, 48.0, 320.0, 240.0], [600.0, 400.0, 700.0, 500.0]]),
                                    np.array([0.9, 0.4]), (640, 480), (1024, 768))
    got = [(b.x1, b.y1, b.x2, b.y2, b.score) for b in boxes]
    np.testing.assert_allclose(got, [(102.4, 76.8, 512.0, 384.0, 0.9), (960.0, 640.0, 1024.0, 768.0, 0.4)])  # clipped


def test_mask_crop_and_work_size_follow_adetailer():
    box = Box(100.2, 50.0, 140.0, 90.6, 0.9)
    mask = detailer.box_mask((256, 192), box)
    ys, xs = np.nonzero(mask)
    # The rectangle 100..140 x 50..91 (corners inclusive), dilated by OpenCV's 4x4 kernel (anchored at its centre,
    # (2, 2)): 1 px up/left, 2 px down/right.
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (99, 142, 49, 93)
    assert set(np.unique(mask)) == {0, 255}
    soft = detailer.blur_mask(mask)
    ys, xs = np.nonzero(soft)
    assert xs.min() >= 99 - 10 and xs.max() <= 142 + 10 and ys.min() >= 49 - 10 and ys.max() <= 93 + 10
    assert soft[70, 120] == 255 and 0 < soft[49, 120] < 255  # solid inside, feathered at the edge
    region = detailer.crop_region(soft)
    assert region == (xs.min() - 32, ys.min() - 32, xs.max() + 1 + 32, ys.max() + 1 + 32)
    assert detailer.crop_region(np.zeros((8, 8), np.uint8)) is None
    assert detailer.crop_region(soft, padding=500) == (0, 0, 256, 192)  # clipped to the image
    # Work sizes: the nearest SDXL training size at 1024² area, or the image's area when smaller.
    assert detailer.work_size((100, 100), (1024, 1024)) == (1024, 1024)
    assert detailer.work_size((150, 100), (2048, 2048)) == (1216, 832)  # 3:2
    assert detailer.work_size((100, 180), (1344, 768)) == (768, 1344)  # 9:16
    assert detailer.work_size((100, 100), (256, 256)) == (256, 256)
    # The crop grows to the work size's aspect around its centre, shifted back inside the image.
    assert detailer.fit_region((100, 100, 140, 180), 1.0, (256, 256)) == (80, 100, 160, 180)
    assert detailer.fit_region((0, 0, 40, 80), 1.0, (256, 256)) == (0, 0, 80, 80)
    assert detailer.fit_region((0, 0, 40, 80), 4.0, (256, 256)) == (0, 0, 256, 80)  # stops at the edge


def test_blend_keeps_every_pixel_where_the_mask_is_zero():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = detailer.blur_mask(detailer.box_mask((64, 64), Box(20, 20, 30, 34, 1.0)))
    region = detailer.crop_region(mask, padding=4)
    repaint = Image.new("RGB", (128, 128), (255, 0, 255))
    out = np.asarray(detailer.blend(image, repaint, region, mask)).astype(int)
    before = np.asarray(image).astype(int)
    assert np.array_equal(out[mask == 0], before[mask == 0])
    assert np.array_equal(out[mask == 255], np.broadcast_to([255, 0, 255], out[mask == 255].shape))
    soft = (mask > 0) & (mask < 255)
    expected = before[soft] + (np.array([255, 0, 255]) - before[soft]) * mask[soft, None] / 255.0
    assert np.abs(out[soft] - expected).max() <= 1  # a linear blend through the mask


def test_the_pass_repaints_boxes_best_first_with_adetailers_seeds(capsys):
    """Seeds: image i's seed + the box's index within its unit; boxes by confidence; the hand unit sees the image
    the face unit left. The crops advance a tqdm-style progress line in the log."""
    seen = []

    def paint(crop, mask, seed):
        seen.append((seed, crop.size))
        return Image.new("RGB", crop.size, (seed, 0, 0))

    faces = FixedBoxes([Box(10, 10, 30, 30, 0.5), Box(200, 200, 230, 230, 0.9)])
    hands = FixedBoxes([Box(100, 100, 120, 120, 0.8)])
    images = [Image.new("RGB", (256, 256), (0, 0, 0)), Image.new("RGB", (256, 256), (0, 0, 0))]
    out = detailer.run(images, 40, [("face", faces), ("hands", hands)], paint, native=1024)
    assert [seed for seed, _ in seen] == [40, 41, 40, 41, 42, 41]
    assert all(size == (256, 256) for _, size in seen)  # a 256² image repaints at its own area
    # The 0.9 box was painted first (seed 40), the 0.5 one second (seed 41).
    assert np.asarray(out[0])[215, 215, 0] == 40 and np.asarray(out[0])[20, 20, 0] == 41
    assert np.asarray(out[1])[215, 215, 0] == 41 and np.asarray(out[1])[110, 110, 0] == 41
    assert faces.calls == hands.calls == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("detailer crops:")]
    assert lines and lines[-1].startswith("detailer crops: 100%|") and "| 6/6 [" in lines[-1]


def test_infotext_has_the_adetailer_extensions_keys():
    both = detailer.check_detailer("face_and_hands", 0.35, "detailed eyes, [PROMPT]", steps=20)
    assert detailer.infotext(both) == {
        "ADetailer model": "face_detect_v1.4_s.onnx",
        "ADetailer prompt": "detailed eyes, [PROMPT]",
        "ADetailer confidence": 0.3,
        "ADetailer dilate erode": 4,
        "ADetailer mask blur": 4,
        "ADetailer denoising strength": 0.35,
        "ADetailer inpaint only masked": True,
        "ADetailer inpaint padding": 32,
        "ADetailer model 2nd": "hand_detect_v1.0_s.onnx",
        "ADetailer prompt 2nd": "detailed eyes, [PROMPT]",
        "ADetailer confidence 2nd": 0.3,
        "ADetailer dilate erode 2nd": 4,
        "ADetailer mask blur 2nd": 4,
        "ADetailer denoising strength 2nd": 0.35,
        "ADetailer inpaint only masked 2nd": True,
        "ADetailer inpaint padding 2nd": 32,
        "ADetailer version": detailer.VERSION,
    }
    assert detailer.unit_prompt(both, "1girl") == "detailed eyes, 1girl"
    hands = detailer.check_detailer("hands", 0.4, "  ", steps=20)
    assert hands.prompt is None and detailer.unit_prompt(hands, "1girl") == "1girl"
    assert detailer.infotext(hands)["ADetailer model"] == "hand_detect_v1.0_s.onnx"
    assert "ADetailer prompt" not in detailer.infotext(hands) and "ADetailer model 2nd" not in detailer.infotext(hands)
    assert detailer.check_detailer("off", 0.9, None, steps=20) is None
    # A prompt over two lines stays inside its quoted value: the settings line of the infotext is one line.
    text = utils.a1111_parameters("1girl", "", detailer.infotext(detailer.check_detailer(
        "face", 0.4, "detailed eyes,\nsmile", steps=20)))
    assert text.splitlines()[1].startswith("ADetailer model: face_detect_v1.4_s.onnx, ADetailer prompt: "
                                           '"detailed eyes,\\nsmile", ADetailer confidence: 0.3')


# --- The tiny ONNX detectors --------------------------------------------------------------------------------------
def test_tiny_onnx_detectors_run_through_onnx_runtime(tiny_weights):
    """The stand-ins' fixed detections (script/tiny_weights.py) come back in image pixels: the duplicate removed by
    NMS, the weak one by the confidence; a detector of another class is refused."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("tiny_weights", REPO / "script" / "tiny_weights.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    image = Image.new("RGB", (1000, 600), (200, 180, 170))
    for unit, (folder, file, label) in detailer.DETECTOR_FILES.items():
        found = detailer.Detectors(tiny_weights).get(unit).detect(image)
        cx, cy, w, h, score = tiny.TINY_DETECTIONS[unit][0]
        assert len(found) == 1
        (box,) = found
        np.testing.assert_allclose([box.x1, box.y1, box.x2, box.y2], [(cx - w / 2) * 1000, (cy - h / 2) * 600,
                                                                       (cx + w / 2) * 1000, (cy + h / 2) * 600],
                                   atol=1e-3)
        assert box.score == pytest.approx(score)
    with pytest.raises(ValueError, match="expected a detector of 'hand'"):
        detailer.OnnxDetector(tiny_weights / detailer.FACE_DETECTOR_DIR / detailer.FACE_DETECTOR_FILE, "hand")


# --- predict() on the tiny model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(predictor):
    return run(predictor)


def test_off_and_no_detection_give_the_plain_image_bit_for_bit(predictor, plain, monkeypatch):
    off, text = run(predictor, detailer="off", detailer_strength=0.9)  # (a detailer_prompt with it is an error)
    assert np.array_equal(off, plain[0]) and "ADetailer" not in text
    nothing = FixedBoxes([])
    found_none, text = run(predictor, monkeypatch, {"face": nothing}, detailer="face")
    assert nothing.calls == 1
    assert np.array_equal(found_none, plain[0])
    assert "ADetailer model: face_detect_v1.4_s.onnx" in text  # the settings are recorded all the same


def test_repaints_change_only_their_feathered_regions(predictor, plain, monkeypatch):
    faces = [Box(40, 30, 90, 80, 0.9), Box(150, 40, 190, 90, 0.6)]
    hands = [Box(170, 180, 205, 215, 0.8)]
    out, text = run(predictor, monkeypatch, {"face": FixedBoxes(faces), "hands": FixedBoxes(hands)},
                    detailer="face_and_hands", detailer_strength=0.6, detailer_prompt="smile, [PROMPT]")
    keep = outside(faces + hands, out.shape)
    assert np.array_equal(out[keep], plain[0][keep])
    for b in faces + hands:  # every box was repainted
        inner = (slice(int(b.y1) + 4, int(b.y2) - 4), slice(int(b.x1) + 4, int(b.x2) - 4))
        assert np.abs(out[inner] - plain[0][inner]).mean() > 2
    assert ("ADetailer model: face_detect_v1.4_s.onnx, ADetailer prompt: \"smile, [PROMPT]\", ADetailer confidence: "
            "0.3, ADetailer dilate erode: 4, ADetailer mask blur: 4, ADetailer denoising strength: 0.6, ADetailer "
            "inpaint only masked: True, ADetailer inpaint padding: 32, ADetailer model 2nd: hand_detect_v1.0_s.onnx"
            in text)
    assert f"ADetailer version: {detailer.VERSION}" in text
    # Reproducible: the same request gives the same image.
    again, _ = run(predictor, monkeypatch, {"face": FixedBoxes(faces), "hands": FixedBoxes(hands)},
                   detailer="face_and_hands", detailer_strength=0.6, detailer_prompt="smile, [PROMPT]")
    assert np.array_equal(again, out)


def test_detailer_with_img2img_hires_lora_and_go_fast(predictor, file_host, monkeypatch):
    from lora_fixtures import write_kohya_lora

    write_kohya_lora(file_host.folder / "detailer.safetensors", predictor.models.models["illustrious"].txt2img)
    source = Image.fromarray(np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    source.save(file_host.folder / "source.png")
    request = dict(image=f"{file_host.url}/source.png", prompt_strength=0.7, hires_scale=1.5, hires_steps=4,
                   go_fast=True, lora_weights=f"{file_host.url}/detailer.safetensors")
    base, _ = run(predictor, **request)
    assert base.shape == (384, 384, 3)  # 256² img2img, hires fix x1.5
    faces = [Box(150, 100, 230, 180, 0.9)]
    out, text = run(predictor, monkeypatch, {"face": FixedBoxes(faces)}, detailer="face", **request)
    keep = outside(faces, out.shape)
    assert np.array_equal(out[keep], base[keep])
    assert np.abs(out[~keep] - base[~keep]).mean() > 1
    assert "ADetailer model: face_detect_v1.4_s.onnx" in text and "Hires upscale: 1.5" in text


def test_the_detailer_prompt_reads_the_requests_embeddings(predictor, monkeypatch):
    """An embedding of the word "red"'s own vectors, named in detailer_prompt only: the repaint is bitwise the one
    with the word itself, so the pass encoded its prompt with the request's embeddings."""
    from test_more_weights import data_url, word_rows

    faces = [Box(60, 60, 140, 140, 0.9)]
    spec = f"myRed={data_url(word_rows(predictor.models.models['illustrious'].txt2img, 'red'))}"
    with_word, _ = run(predictor, monkeypatch, {"face": FixedBoxes(faces)}, detailer="face",
                       detailer_prompt="1girl, red hat")
    with_ti, text = run(predictor, monkeypatch, {"face": FixedBoxes(faces)}, detailer="face",
                        detailer_prompt="1girl, myRed hat", embeddings=spec)
    assert np.array_equal(with_ti, with_word)
    assert "TI hashes:" in text


def test_a_failing_detector_is_an_error_naming_detailer_and_leaves_the_model_clean(predictor, plain, monkeypatch):
    with pytest.raises(detailer.DetailerError, match=r"detailer: the face detector failed on image 1 "
                                                     r"\(RuntimeError: onnxruntime"):
        run(predictor, monkeypatch, {"face": Failing()}, detailer="face")
    assert np.array_equal(run(predictor)[0], plain[0])


def test_an_unparsable_detailer_prompt_is_refused_before_generation(predictor):
    calls = []
    unet = predictor.models.models["illustrious"].txt2img.unet
    hook = unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="detailer_prompt: brackets nested too deep"):
            run(predictor, detailer="face", detailer_prompt="(" * 101 + "smile")
    finally:
        hook.remove()
    assert calls == []  # refused by the preflight, before any denoising step


def test_missing_or_broken_detector_weights_are_errors_naming_detailer(predictor, tmp_path, monkeypatch):
    empty = detailer.Detectors(tmp_path)
    monkeypatch.setattr(predictor, "detectors", empty)
    with pytest.raises(utils.WeightsMissingError, match=r"detailer: the hands detector .*hand_detect_v1.0_s.onnx is "
                                                        r"missing; run `script/download_weights --only hand_detector`"):
        run(predictor, detailer="hands", detailer_strength=0.5)
    broken = tmp_path / detailer.FACE_DETECTOR_DIR / detailer.FACE_DETECTOR_FILE
    broken.parent.mkdir()
    broken.write_bytes(b"<html>not a model</html>")
    with pytest.raises(detailer.DetailerError, match="detailer: the face detector face_detect_v1.4_s.onnx could "
                                                     "not be loaded"):
        empty.get("face")
    assert empty.loaded == {}


def check(**overrides) -> predict.Request:
    """predict.check_inputs with the other inputs at the server's defaults (no model needed)."""
    inputs = dict(prompt="1girl", negative_prompt=None, aspect_ratio="1:1", width=None, height=None, megapixels="1",
                  image=None, mask=None, prompt_strength=0.8, num_outputs=1, num_inference_steps=20, guidance=None,
                  scheduler="default", clip_skip=2, guidance_rescale=0.0, quality_tags=False, lora_weights=None,
                  lora_scale=1.0, extra_lora=None, extra_lora_scale=1.0, output_format="png", output_quality=80,
                  disable_safety_checker=False, use_standard_sdxl=False)
    return predict.check_inputs(**{**inputs, **overrides})


@pytest.mark.parametrize("overrides, message", [
    (dict(detailer_mode="eyes"), "detailer: expected one of ['off', 'face', 'hands', 'face_and_hands'], got 'eyes'"),
    (dict(detailer_mode="face", detailer_strength=0.01), "detailer_strength: expected 0.05 to 1, got 0.01"),
    (dict(detailer_mode="face", detailer_strength=0.1, num_inference_steps=5),
     "detailer_strength: with num_inference_steps=5 a strength of 0.1 runs no denoising step"),
    (dict(detailer_mode="hands", detailer_prompt="hands, <lora:fix:1>"), "detailer_prompt: A1111 LoRA tags like "
                                                                         "<lora:fix:1>"),
    (dict(detailer_mode="face", detailer_prompt="x" * 10_001), "detailer_prompt: too long"),
    (dict(detailer_prompt="detailed face"), "detailer_prompt: used only by the detailer, which is off"),
    # 9 000 emoji are 36 KB of UTF-16: once fits JPEG's EXIF, twice (face and hands units) does not.
    (dict(detailer_mode="face_and_hands", detailer_prompt="\U0001F642" * 9000, output_format="jpg"),
     "detailer_prompt: with output_format 'jpg' the generation parameters are written to EXIF"),
])
def test_bad_detailer_inputs_are_refused_before_any_work(overrides, message):
    with pytest.raises(ValueError) as info:
        check(**overrides)
    assert message in str(info.value)


def test_a_long_detailer_prompt_that_fits_the_metadata_is_accepted():
    request = check(detailer_mode="face", detailer_prompt="\U0001F642" * 9000, output_format="jpg")
    assert request.detailer == detailer.DetailerRequest(units=("face",), strength=0.4, prompt="\U0001F642" * 9000)


# --- Weights and the Cog interface --------------------------------------------------------------------------------
def test_download_weights_fetches_and_checks_the_pinned_detectors(tiny_weights, tmp_path, monkeypatch):
    """Against a fake Hub serving the tiny detectors under the real repo paths: refused while the pin is the real
    file's sha256; with the pins set to the tiny files, laid out under the file names the predictor loads, and
    `--check` passes offline."""
    from fakes import FakeHFHub
    from test_hf_download import _load_script

    script = _load_script()
    for name, value in (("NO_PROXY", "127.0.0.1,localhost"), ("HF_HOME", str(tmp_path / "hf-home")),
                        ("HF_HUB_DISABLE_XET", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    dest = tmp_path / "weights"
    with FakeHFHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        files = {}
        for name, source in detailer.DETECTOR_SOURCES.items():
            (entry,) = source["files"]
            files[name] = (tiny_weights / source["folder"] / entry["dest"]).read_bytes()
            hub.add_file(source["repo"], entry["path"], files[name], lfs=True)
            hub.set_commit(source["repo"], source["revision"])
        with pytest.raises(script.DownloadError, match="pinned sha256 mismatch: deepghs/anime_face_detection/"
                                                        "face_detect_v1.4_s/model.onnx"):
            script.install("face_detector", dest, script.Hub, force=False)
        assert not dest.exists() or not list(dest.iterdir())
        for name, source in detailer.DETECTOR_SOURCES.items():
            (entry,) = source["files"]
            monkeypatch.setitem(script.PINS, name, {"commit": source["revision"], "files": {
                entry["path"]: (len(files[name]), hashlib.sha256(files[name]).hexdigest())}})
            script.install(name, dest, script.Hub, force=False)
    assert script.main(["--dest", str(dest), "--check", "--only", "face_detector", "--only", "hand_detector"]) == 0
    for unit, (folder, file, label) in detailer.DETECTOR_FILES.items():
        assert sorted(p.name for p in (dest / folder).iterdir()) == ["MANIFEST.json", file]
        assert detailer.Detectors(dest).get(unit).detect(Image.new("RGB", (320, 320)))  # loads and detects


def test_one_request_through_the_cog_server(cog_server):
    """The real detectors path end to end: the tiny ONNX stand-ins find one face and one hand in any image."""
    from cog_server import output_images

    result = cog_server.predict({"prompt": "1girl", "aspect_ratio": "custom", "width": 256, "height": 256,
                                 "num_inference_steps": 4, "seed": 5, "output_format": "png",
                                 "detailer": "face_and_hands", "detailer_strength": 0.5})
    assert result["status"] == "succeeded", result.get("error")
    (image,) = output_images(result)
    assert image.size == (256, 256)
    text = image.info["parameters"]
    assert "ADetailer model: face_detect_v1.4_s.onnx" in text and "ADetailer model 2nd: hand_detect_v1.0_s.onnx" in text
    assert "ADetailer denoising strength: 0.5" in text and "ADetailer prompt" not in text
    refused = cog_server.post({"prompt": "1girl", "detailer": "eyes"})
    assert refused.status_code == 422 and "detailer" in refused.text
