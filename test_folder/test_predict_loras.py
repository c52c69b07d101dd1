"""LoRAs end to end through predict(): fetched from a loopback URL, merged, restored, reported and refused."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import utils
import weights
from conftest import predict_inputs
from lora_fixtures import write_diffusers_lora, write_foreign_lora, write_kohya_lora, write_replicate_tar

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=3, output_format="png")


@pytest.fixture(scope="module")
def loras(predictor, file_host):
    """URLs of LoRA files written for the tiny model and served from loopback."""
    pipe = predictor.models.models["illustrious"].txt2img
    folder = file_host.folder
    write_kohya_lora(folder / "kohya.safetensors", pipe)
    write_diffusers_lora(folder / "peft.safetensors", pipe)
    write_foreign_lora(folder / "sd15.safetensors", pipe, "sd15")
    write_replicate_tar(folder / "trained_model.tar", pipe)
    (folder / "login.safetensors").write_text("<html><body>Please log in</body></html>")
    return {name: f"{file_host.url}/{name}" for name in
            ("kohya.safetensors", "peft.safetensors", "sd15.safetensors", "trained_model.tar", "login.safetensors")}


def image(predictor, **overrides) -> np.ndarray:
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, "prompt": "1girl, red hat", "seed": 1, **overrides}))
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def control(predictor):
    return image(predictor)


def unet_state(predictor, key="illustrious") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in predictor.models.models[key].txt2img.unet.state_dict().items()}


def test_lora_changes_the_image_and_the_base_comes_back_bitwise(predictor, loras, control):
    before = unet_state(predictor)
    with_lora = image(predictor, lora_weights=loras["kohya.safetensors"])
    assert not np.array_equal(with_lora, control)
    assert np.array_equal(image(predictor), control)
    after = unet_state(predictor)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_scale_zero_is_the_base_model_and_scale_changes_the_image(predictor, loras, control):
    url = loras["kohya.safetensors"]
    assert np.array_equal(image(predictor, lora_weights=url, lora_scale=0.0), control)
    assert not np.array_equal(image(predictor, lora_weights=url, lora_scale=0.5), image(predictor, lora_weights=url))


def test_two_loras_combine_and_extra_lora_works_alone(predictor, loras, control):
    first, second = loras["kohya.safetensors"], loras["peft.safetensors"]
    both = image(predictor, lora_weights=first, extra_lora=second, extra_lora_scale=0.8)
    only_first = image(predictor, lora_weights=first)
    only_second = image(predictor, extra_lora=second, extra_lora_scale=0.8)
    assert not np.array_equal(both, only_first) and not np.array_equal(both, only_second)
    assert np.array_equal(only_second, image(predictor, lora_weights=second, lora_scale=0.8))


def test_the_same_lora_twice_adds_its_scales(predictor, loras):
    url = loras["kohya.safetensors"]
    twice = image(predictor, lora_weights=url, lora_scale=0.5, extra_lora=url, extra_lora_scale=0.25)
    assert np.array_equal(twice, image(predictor, lora_weights=url, lora_scale=0.75))


def test_a_lora_for_another_base_is_an_error_and_leaves_the_model_clean(predictor, loras, control):
    # Refused when the download is verified, so the file never enters the LoRA cache.
    with pytest.raises(weights.IncompatibleError, match=r"^lora_weights: .*SD ?1"):
        image(predictor, lora_weights=loras["sd15.safetensors"])
    assert np.array_equal(image(predictor), control)


def test_a_login_page_instead_of_a_lora_is_an_error_naming_the_input(predictor, loras, control):
    with pytest.raises(weights.WeightsError, match="extra_lora"):
        image(predictor, extra_lora=loras["login.safetensors"])
    assert np.array_equal(image(predictor), control)


def test_an_unparseable_reference_is_refused_before_any_work(predictor):
    with pytest.raises(weights.InvalidReferenceError, match="lora_weights"):
        image(predictor, lora_weights="not a lora reference at all")


def test_replicate_trainer_tar_brings_its_trigger_token(predictor, loras):
    url = loras["trained_model.tar"]
    with_token = image(predictor, prompt="a photo of TOK", lora_weights=url)
    without_token = image(predictor, prompt="a photo of", lora_weights=url)
    assert not np.array_equal(with_token, without_token)
    base_tokenizer = predictor.mergers["illustrious"]._orig_tokenizers[0]
    image(predictor, prompt="a photo of TOK")  # no LoRA: tokens gone again
    assert predictor.models.models["illustrious"].txt2img.tokenizer is base_tokenizer


def test_switching_models_with_loras_keeps_each_model_correct(predictor, loras, control):
    sdxl_control = image(predictor, use_standard_sdxl=True)
    url = loras["kohya.safetensors"]
    illustrious_lora = image(predictor, lora_weights=url)
    sdxl_lora = image(predictor, lora_weights=url, use_standard_sdxl=True)
    assert not np.array_equal(sdxl_lora, sdxl_control)
    assert np.array_equal(image(predictor, lora_weights=url), illustrious_lora)
    assert np.array_equal(image(predictor, use_standard_sdxl=True), sdxl_control)
    assert np.array_equal(image(predictor), control)


def test_lora_hashes_are_written_into_the_metadata(predictor, loras):
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, "prompt": "a cat", "seed": 1,
                                                   "lora_weights": loras["kohya.safetensors"]}))
    parameters = utils.read_parameters(path)
    cached = predictor.lora_cache.fetch(weights.parse_lora_ref(loras["kohya.safetensors"]))
    predictor.lora_cache.release(cached.ref)
    assert f"{cached.sha256[:10]}" in parameters and "Lora hashes" in parameters


def test_a_repeat_is_a_cache_hit(predictor, loras):
    url = loras["peft.safetensors"]
    image(predictor, lora_weights=url)
    hits = predictor.lora_cache.stats["hits"]
    image(predictor, lora_weights=url, lora_scale=0.7)
    assert predictor.lora_cache.stats["hits"] == hits + 1


def test_lora_through_the_real_server(cog_server, loras, tmp_path):
    base = {**SMALL, "prompt": "1girl, red hat", "seed": 1}
    control = cog_server.predict(base)
    applied = cog_server.predict({**base, "lora_weights": loras["kohya.safetensors"], "lora_scale": 0.9})
    refused = cog_server.predict({**base, "lora_weights": loras["sd15.safetensors"]})
    after = cog_server.predict(base)
    assert applied["status"] == "succeeded", applied.get("error")
    assert applied["output"] != control["output"]
    assert "lora_weights" in applied["logs"] and "layers" in applied["logs"]
    assert refused["status"] == "failed" and "lora_weights" in refused["error"]
    assert after["output"] == control["output"]
    assert applied["metrics"]["lora_cache_misses"] >= 1
