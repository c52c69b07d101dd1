"""The Cog interface, through the real Cog HTTP server (coglet) with the generated OpenAPI schema, on loopback."""

from __future__ import annotations

import http.server
import io
import re
import threading
from functools import partial

import numpy as np
import pytest
from PIL import Image

from cog_server import data_uri, decode_output, output_images

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2}


@pytest.mark.parametrize(
    "output_format, mime, pil_format",
    [("webp", "image/webp", "WEBP"), ("jpg", "image/jpeg", "JPEG"), ("png", "image/png", "PNG")],
)
def test_prediction_returns_requested_format(cog_server, output_format, mime, pil_format):
    result = cog_server.predict({"prompt": "1girl, red hat", "output_format": output_format, "seed": 3, **SMALL})
    assert result["status"] == "succeeded", result.get("error")
    assert len(result["output"]) == 1
    kind, payload = decode_output(result["output"][0])
    assert kind == mime
    image = Image.open(io.BytesIO(payload))
    assert image.format == pil_format
    assert image.size == (256, 256)


def test_output_quality_changes_lossy_files(cog_server):
    sizes = []
    for quality in (5, 95):
        result = cog_server.predict({"prompt": "a cat", "seed": 4, "output_format": "jpg", "output_quality": quality, **SMALL})
        sizes.append(len(decode_output(result["output"][0])[1]))
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize(
    "inputs, field, message",
    [
        ({"num_outputs": 9}, "num_outputs", "maximum"),
        ({"num_outputs": 0}, "num_outputs", "minimum"),
        ({"num_inference_steps": 51}, "num_inference_steps", "maximum"),
        ({"guidance": 10.5}, "guidance", "maximum"),
        ({"lora_scale": 3.5}, "lora_scale", "maximum"),
        ({"prompt_strength": 1.5}, "prompt_strength", "maximum"),
        ({"output_quality": 101}, "output_quality", "maximum"),
        ({"width": 4096, "aspect_ratio": "custom"}, "width", "maximum"),
        ({"num_outputs": "two"}, "num_outputs", "integer"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"disable_safety_checker": "yes"}, "disable_safety_checker", "boolean"),
        ({"aspect_ratio": "7:3"}, "aspect_ratio", "not one of"),
        ({"output_format": "gif"}, "output_format", "not one of"),
        ({"scheduler": "Euler b"}, "scheduler", "not one of"),
        ({"megapixels": "2"}, "megapixels", "not one of"),
    ],
)
def test_schema_rejects_bad_inputs_with_422(cog_server, inputs, field, message):
    response = cog_server.post({"prompt": "a cat", **inputs})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in d["loc"] and message in d["msg"] for d in detail), detail


def test_missing_prompt_is_422(cog_server):
    response = cog_server.post({"num_outputs": 1})
    assert response.status_code == 422
    assert any("prompt" in d["loc"] for d in response.json()["detail"])


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"aspect_ratio": "custom", "width": 256}, 'height: required when aspect_ratio is "custom"'),
        ({"aspect_ratio": "custom", "width": 260, "height": 256}, "width: expected a multiple of 8"),
        ({"aspect_ratio": "1:1", "width": 512}, 'only used with aspect_ratio "custom"'),
        ({"mask": "data:image/png;base64,iVBORw0KGgo="}, "mask: inpainting needs an image"),
        ({"seed": -5}, "seed: expected 0 to"),
        ({"prompt": "   "}, "prompt: expected non-empty text"),
        ({"image": "data:text/plain;base64,aGVsbG8=", **SMALL}, "image: expected a PNG, JPEG or WebP image"),
    ],
)
def test_semantic_errors_name_the_input(cog_server, inputs, message):
    result = cog_server.predict({"prompt": "a cat", "num_inference_steps": 1, **inputs})
    assert result["status"] == "failed"
    assert message in result["error"]


def test_num_outputs_four_gives_four_different_images(cog_server):
    result = cog_server.predict({"prompt": "a cat", "num_outputs": 4, "seed": 5, **SMALL})
    assert result["status"] == "succeeded", result.get("error")
    payloads = [decode_output(item)[1] for item in result["output"]]
    assert len(payloads) == 4 and len(set(payloads)) == 4
    assert result["metrics"]["num_outputs"] == 4


def test_same_seed_gives_byte_identical_images_and_is_logged(cog_server):
    first = cog_server.predict({"prompt": "a cat", "seed": 42, **SMALL})
    second = cog_server.predict({"prompt": "a cat", "seed": 42, **SMALL})
    other = cog_server.predict({"prompt": "a cat", "seed": 43, **SMALL})
    assert "Using seed: 42" in first["logs"]
    assert first["output"] == second["output"]
    assert first["output"] != other["output"]


def test_random_seed_is_printed_and_reproduces(cog_server):
    first = cog_server.predict({"prompt": "a cat", **SMALL})
    seed = int(re.search(r"Using seed: (\d+)", first["logs"]).group(1))
    again = cog_server.predict({"prompt": "a cat", "seed": seed, **SMALL})
    assert again["output"] == first["output"]


def test_img2img_from_data_uri_keeps_aspect_ratio(cog_server):
    source = Image.new("RGB", (300, 200), (200, 40, 40))
    result = cog_server.predict({"prompt": "a cat", "image": data_uri(source), "megapixels": "0.25",
                                 "num_inference_steps": 2, "seed": 1})
    assert result["status"] == "succeeded", result.get("error")
    (image,) = output_images(result)
    assert image.size == (640, 416)  # 3:2 at 0.25 MP, sides multiples of 32


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (256, 256), (30, 90, 200)).save(folder / "blue.png")
    Image.new("RGB", (256, 256), (220, 200, 30)).save(folder / "yellow.png")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_img2img_from_http_url_uses_the_image(cog_server, image_host):
    results = [
        cog_server.predict({"prompt": "a cat", "image": f"{image_host}/{name}.png", "prompt_strength": 0.5,
                            "seed": 1, **SMALL})
        for name in ("blue", "yellow")
    ]
    assert all(r["status"] == "succeeded" for r in results), [r.get("error") for r in results]
    blue, yellow = (np.asarray(output_images(r)[0].convert("RGB"), dtype=float) for r in results)
    assert blue.shape == (256, 256, 3)
    assert np.abs(blue - yellow).mean() > 10


def test_img2img_missing_url_is_a_clear_failure(cog_server, image_host):
    result = cog_server.predict({"prompt": "a cat", "image": f"{image_host}/missing.png", **SMALL})
    assert result["status"] == "failed"
    assert "404" in result["error"]


def test_inpainting_repaints_only_the_white_area(cog_server):
    source = Image.new("RGB", (256, 256), (20, 160, 60))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 128, 256))  # repaint the left half only
    outputs = []
    for seed in (2, 3):
        result = cog_server.predict({"prompt": "a cat", "image": data_uri(source), "mask": data_uri(mask),
                                     "prompt_strength": 1.0, "seed": seed, **SMALL})
        assert result["status"] == "succeeded", result.get("error")
        (image,) = output_images(result)
        assert image.size == (256, 256)
        outputs.append(np.asarray(image.convert("RGB"), dtype=float))
    change = np.abs(outputs[0] - outputs[1])
    # Another seed repaints the white half differently; the black half keeps the input's latents.
    assert change[:, 192:].mean() < change[:, :128].mean() / 2


def test_safety_checker_flags_fail_the_prediction_unless_disabled(flag_all_server):
    flagged = flag_all_server.predict({"prompt": "a cat", "seed": 1, **SMALL})
    assert flagged["status"] == "failed"
    assert "flagged as NSFW" in flagged["error"]
    allowed = flag_all_server.predict({"prompt": "a cat", "seed": 1, "disable_safety_checker": True, **SMALL})
    assert allowed["status"] == "succeeded", allowed.get("error")
    assert len(allowed["output"]) == 1


def test_secrets_are_accepted_as_cog_secrets(cog_server):
    result = cog_server.predict({"prompt": "a cat", "hf_api_token": "hf_secret_value_123",
                                 "civitai_api_token": "civ_secret_value_456", **SMALL})
    assert result["status"] == "succeeded", result.get("error")
    assert "secret_value" not in result["logs"]
