"""Anime-grade prompting and sampling through predict(): clip skip, weighting, hires fix, metadata, v-prediction."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
import pytest
from PIL import Image

import utils
from conftest import make_predictor, predict_inputs

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=3, output_format="png")


def run_paths(predictor, **overrides):
    return predictor.predict(**predict_inputs(**{**SMALL, **overrides}))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_clip_skip_changes_the_image_and_two_is_the_default(predictor):
    default = pixels(run_paths(predictor, prompt="1girl, red hat", seed=1)[0])
    assert np.array_equal(default, pixels(run_paths(predictor, prompt="1girl, red hat", seed=1, clip_skip=2)[0]))
    assert not np.array_equal(default, pixels(run_paths(predictor, prompt="1girl, red hat", seed=1, clip_skip=1)[0]))


def test_clip_skip_beyond_the_encoders_layers_is_a_clear_error(predictor):
    with pytest.raises(ValueError, match="clip_skip"):
        run_paths(predictor, prompt="a cat", seed=1, clip_skip=12)


def test_prompt_weighting_changes_the_image(predictor):
    plain = pixels(run_paths(predictor, prompt="1girl, red hat", seed=2)[0])
    weighted = pixels(run_paths(predictor, prompt="1girl, (red hat:1.5)", seed=2)[0])
    assert not np.array_equal(plain, weighted)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_long_weighted_prompts_work_in_img2img_and_inpainting(predictor, tmp_path, mode):
    long_prompt = ", ".join(["(masterpiece:1.2)", "best quality", "1girl", "red hair"] * 12) + " BREAK a cat"
    source = tmp_path / "in.png"
    Image.new("RGB", (256, 256), (90, 20, 20)).save(source)
    extra = {"image": source}
    if mode == "inpaint":
        mask = tmp_path / "mask.png"
        Image.new("L", (256, 256), 255).save(mask)
        extra["mask"] = mask
    paths = run_paths(predictor, prompt=long_prompt, negative_prompt="lowres, " * 40, seed=3, **extra)
    assert Image.open(paths[0]).size == (256, 256)
    assert "masterpiece:1.2" in utils.read_parameters(paths[0])


def test_a1111_lora_tags_in_the_prompt_are_refused(predictor):
    with pytest.raises(utils.InputError, match="prompt: A1111 LoRA tags like <lora:mylora:0.8>"):
        run_paths(predictor, prompt="1girl <lora:mylora:0.8>", seed=1)


def test_quality_tags_are_prepended(predictor):
    (path,) = run_paths(predictor, prompt="1girl", seed=4, quality_tags=True)
    expected = utils.MODEL_SPECS["illustrious"].quality_tags + ", 1girl"
    assert utils.read_parameters(path).splitlines()[0] == expected
    assert not np.array_equal(pixels(path), pixels(run_paths(predictor, prompt="1girl", seed=4)[0]))


def test_guidance_rescale_changes_the_image(predictor):
    plain = pixels(run_paths(predictor, prompt="a cat", seed=5)[0])
    assert not np.array_equal(plain, pixels(run_paths(predictor, prompt="a cat", seed=5, guidance_rescale=0.7)[0]))


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_gives_the_requested_final_size(predictor, upscaler):
    (path,) = run_paths(predictor, prompt="a cat", seed=6, hires_scale=1.5, hires_upscaler=upscaler,
                        hires_strength=0.6, hires_steps=4)
    assert Image.open(path).size == (384, 384)
    parameters = utils.read_parameters(path)
    assert "Hires upscale: 1.5" in parameters and "Size: 256x256" in parameters
    assert "Denoising strength: 0.6" in parameters


def test_hires_fix_refuses_sizes_over_the_limit(predictor):
    with pytest.raises(utils.InputError, match="hires_scale"):
        run_paths(predictor, prompt="a cat", seed=1, aspect_ratio="custom", width=1600, height=256, hires_scale=1.5)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_generation_parameters_round_trip_in_every_format(predictor, fmt):
    paths = run_paths(predictor, prompt="1girl, (red hat:1.2)", negative_prompt="lowres", seed=10, num_outputs=2,
                      output_format=fmt, guidance=5.5, scheduler="DPM++ 2M Karras")
    for i, path in enumerate(paths):
        lines = utils.read_parameters(path).splitlines()
        assert lines[0] == "1girl, (red hat:1.2)"
        assert lines[1] == "Negative prompt: lowres"
        fields = dict(item.split(": ", 1) for item in lines[2].split(", "))
        assert fields["Steps"] == "3" and fields["Sampler"] == "DPM++ 2M Karras" and fields["CFG scale"] == "5.5"
        assert fields["Seed"] == str(10 + i) and fields["Size"] == "256x256" and fields["Clip skip"] == "2"
        assert fields["Model"] == utils.MODEL_SPECS["illustrious"].title


def test_metadata_can_be_turned_off(predictor):
    (path,) = run_paths(predictor, prompt="a cat", seed=1, embed_metadata=False)
    assert utils.read_parameters(path) is None


@pytest.fixture(scope="module")
def vpred_predictor(tiny_weights, tmp_path_factory):
    """The tiny weights with a v-prediction, zero-terminal-SNR scheduler config (as NoobAI-XL v-pred ships)."""
    root = tmp_path_factory.mktemp("vpred-weights")
    for entry in tiny_weights.iterdir():
        if entry.name == "illustrious-xl":
            shutil.copytree(entry, root / entry.name)
        else:
            (root / entry.name).symlink_to(entry)
    config_path = root / "illustrious-xl" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    return make_predictor(root, tmp_path_factory.mktemp("lora-cache"))


def test_v_prediction_checkpoints_sample_as_v_prediction(vpred_predictor, predictor):
    v = pixels(run_paths(vpred_predictor, prompt="a cat", seed=1, scheduler="Euler")[0])
    eps = pixels(run_paths(predictor, prompt="a cat", seed=1, scheduler="Euler")[0])
    assert not np.array_equal(v, eps)
    scheduler = vpred_predictor.models.models["illustrious"].txt2img.scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr


def test_v_prediction_refuses_schedulers_without_zero_snr(vpred_predictor):
    with pytest.raises(utils.InputError, match="scheduler: this model is zero-terminal-SNR v-prediction"):
        run_paths(vpred_predictor, prompt="a cat", seed=1, scheduler="Heun")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("images", [1, 2])
def test_our_euler_a_steps_bit_for_bit_like_diffusers(prediction_type, images):
    from diffusers import EulerAncestralDiscreteScheduler

    from sdxl.samplers import EulerAncestral

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
                  steps_offset=1, prediction_type=prediction_type)
    ours, theirs = EulerAncestral(**config), EulerAncestralDiscreteScheduler(**config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(images, 4, 16, 12, generator=g, dtype=torch.bfloat16)
    outputs = [torch.randn(images, 4, 16, 12, generator=g, dtype=torch.bfloat16) for _ in ours.timesteps]
    seeds = [torch.Generator().manual_seed(40 + i) for i in range(images)]
    mirror = [torch.Generator().manual_seed(40 + i) for i in range(images)]
    a = b = sample
    for t, out in zip(ours.timesteps, outputs):
        step_a = ours.step(out, t, a, generator=seeds if images > 1 else seeds[0])
        step_b = theirs.step(out, t, b, generator=mirror if images > 1 else mirror[0])
        assert torch.equal(step_a.pred_original_sample, step_b.pred_original_sample)
        a, b = step_a.prev_sample, step_b.prev_sample
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, sample)


def test_euler_a_is_ours_and_other_samplers_are_diffusers(predictor):
    from diffusers import EulerAncestralDiscreteScheduler

    from sdxl.samplers import EulerAncestral

    config = predictor.models.models["illustrious"].scheduler_config
    assert type(utils.make_scheduler("Euler a", config)) is EulerAncestral
    assert isinstance(utils.make_scheduler("Euler a", config), EulerAncestralDiscreteScheduler)
    assert type(utils.make_scheduler("Euler", config)).__module__.startswith("diffusers.")
