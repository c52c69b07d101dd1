"""Generation in-process on the tiny model: stock-diffusers equality, sizes, seeds, defaults and model switching."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import utils
from conftest import predict_inputs

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=3, output_format="png")


def run(predictor, **overrides) -> list[np.ndarray]:
    paths = predictor.predict(**predict_inputs(**{**SMALL, **overrides}))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_no_lora_image_equals_stock_diffusers(predictor, tiny_weights):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    (ours,) = run(predictor, prompt="1girl, red hat", negative_prompt="lowres", seed=7)
    vae = AutoencoderKL.from_pretrained(tiny_weights / utils.VAE_DIR)
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_weights / "illustrious-xl", vae=vae)
    stock.scheduler = EulerAncestralDiscreteScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    image = stock(
        "1girl, red hat", negative_prompt="lowres", guidance_scale=6.0, num_inference_steps=3, width=256,
        height=256, generator=[torch.Generator("cpu").manual_seed(7)],
    ).images[0]
    assert np.array_equal(ours, np.asarray(image))


def test_image_i_uses_seed_plus_i(predictor):
    batch = run(predictor, prompt="a cat", seed=100, num_outputs=2)
    single = run(predictor, prompt="a cat", seed=101)[0]
    # Batched and single convolutions may round differently on CPU; the images must still be the same picture.
    assert np.abs(batch[1].astype(int) - single.astype(int)).max() <= 2
    assert np.abs(batch[0].astype(int) - single.astype(int)).mean() > 5


def test_seed_zero_is_a_real_seed(predictor):
    assert np.array_equal(run(predictor, prompt="a cat", seed=0)[0], run(predictor, prompt="a cat", seed=0)[0])


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "9:21"])
def test_aspect_ratio_presets_give_sdxl_bucket_sizes(predictor, ratio):
    paths = predictor.predict(**predict_inputs(prompt="a cat", aspect_ratio=ratio, megapixels="0.25",
                                               num_inference_steps=1, seed=1))
    width, height = utils.ASPECT_RATIOS[ratio]
    assert Image.open(paths[0]).size == (width // 2, height // 2)


def test_one_megapixel_preset_is_the_bucket_size(predictor):
    paths = predictor.predict(**predict_inputs(prompt="a cat", aspect_ratio="3:2", num_inference_steps=1, seed=1))
    assert Image.open(paths[0]).size == (1216, 832)


def test_guidance_left_blank_uses_each_models_default(predictor):
    assert np.array_equal(run(predictor, prompt="a cat", seed=3), run(predictor, prompt="a cat", seed=3, guidance=6.0))
    sdxl_blank = run(predictor, prompt="a cat", seed=3, use_standard_sdxl=True)
    assert np.array_equal(sdxl_blank, run(predictor, prompt="a cat", seed=3, use_standard_sdxl=True, guidance=7.0))
    assert not np.array_equal(sdxl_blank, run(predictor, prompt="a cat", seed=3, use_standard_sdxl=True, guidance=6.0))


def test_use_standard_sdxl_switches_model_and_back(predictor):
    illustrious = run(predictor, prompt="a cat", seed=9, guidance=5.0)
    sdxl = run(predictor, prompt="a cat", seed=9, guidance=5.0, use_standard_sdxl=True)
    assert not np.array_equal(illustrious, sdxl)
    assert np.array_equal(illustrious, run(predictor, prompt="a cat", seed=9, guidance=5.0))


def test_default_scheduler_is_the_models_preset(predictor):
    default = run(predictor, prompt="a cat", seed=5)
    assert np.array_equal(default, run(predictor, prompt="a cat", seed=5, scheduler="Euler a"))
    assert not np.array_equal(default, run(predictor, prompt="a cat", seed=5, scheduler="Euler"))


@pytest.mark.parametrize("name", [n for n in predict.SCHEDULER_CHOICES if n != "default"])
def test_every_scheduler_runs(predictor, name):
    (image,) = run(predictor, prompt="a cat", seed=1, scheduler=name, num_inference_steps=3)
    assert image.shape == (256, 256, 3) and image.std() > 0


def test_default_negative_prompt_is_the_presets(predictor):
    default = run(predictor, prompt="a cat", seed=11)
    explicit = run(predictor, prompt="a cat", seed=11, negative_prompt=utils.MODEL_SPECS["illustrious"].negative_prompt)
    empty = run(predictor, prompt="a cat", seed=11, negative_prompt="")
    assert np.array_equal(default, explicit)
    assert not np.array_equal(default, empty)


def test_each_prediction_writes_a_fresh_folder(predictor):
    first = predictor.predict(**predict_inputs(prompt="a cat", seed=1, **SMALL))
    second = predictor.predict(**predict_inputs(prompt="a cat", seed=1, **SMALL))
    assert first[0].parent != second[0].parent
    assert first[0].name == second[0].name == "out-0.png"
    assert first[0].exists() and second[0].exists()


def test_setup_without_weights_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "missing"))
    with pytest.raises(utils.WeightsMissingError, match="script/download_weights"):
        predict.Predictor().setup()


def test_cpu_device_runs_in_float32():
    device, dtype = utils.pick_device()
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert (device.type, dtype) == ("cpu", torch.float32)


def test_keep_unflagged_deletes_flagged_files_and_renumbers_the_rest(tmp_path):
    images = [Image.new("RGB", (8, 8), (c, c, c)) for c in (10, 20, 30, 40)]
    paths = utils.save_images(images, tmp_path, "png", 100)
    kept = utils.keep_unflagged(paths, [True, False, True, False])
    assert [p.name for p in kept] == ["out-0.png", "out-1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png"]
    assert [Image.open(p).getpixel((0, 0)) for p in kept] == [(20, 20, 20), (40, 40, 40)]


def test_flagged_images_are_removed_and_the_others_keep_their_seeds(predictor, monkeypatch, tmp_path):

    small = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=2, output_format="png",
                 prompt="a cat", seed=5, num_outputs=3)
    plain = [np.asarray(Image.open(p)) for p in predictor.predict(**predict_inputs(**small))]
    monkeypatch.setattr(utils, "nsfw_flags", lambda models, images: [False, True, False])
    paths = predictor.predict(**predict_inputs(**small))
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["out-0.png", "out-1.png"]  # nothing partial
    assert np.array_equal(np.asarray(Image.open(paths[0])), plain[0])
    assert np.array_equal(np.asarray(Image.open(paths[1])), plain[2])
    assert "Seed: 7," in utils.read_parameters(paths[1])
    monkeypatch.setattr(utils, "nsfw_flags", lambda models, images: [True] * len(images))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="flagged as NSFW"):
        predictor.predict(**predict_inputs(**small))
    assert list(tmp_path.iterdir()) == []  # the written files went with the failed prediction


def test_low_prompt_strength_stays_closer_to_the_input(predictor, tmp_path):
    import torch

    source = tmp_path / "in.png"
    Image.new("RGB", (256, 256), (30, 90, 200)).save(source)
    # What the model can reproduce of the input: its own VAE round trip (the tiny VAE is random).
    pipe = predictor.models.models["illustrious"].img2img
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(Image.open(source))
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        reference = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="np")[0] * 255

    def distance(strength: float) -> float:
        (image,) = run(predictor, prompt="a cat", seed=1, image=source, prompt_strength=strength, num_inference_steps=20)
        return float(np.abs(image.astype(float) - reference).mean())

    assert distance(0.1) < distance(1.0)


def check(**overrides) -> predict.Request:
    """predict.check_inputs with every input at its default, as the server would pass them."""
    import inspect

    names = inspect.signature(predict.check_inputs).parameters
    return predict.check_inputs(**{k: v for k, v in predict_inputs(prompt="a cat", **overrides).items() if k in names})


def test_steps_left_blank_use_each_models_preset():
    assert check().steps == utils.MODEL_SPECS["illustrious"].steps == 28
    assert check(use_standard_sdxl=True).steps == utils.MODEL_SPECS["sdxl"].steps == 30
    assert check(num_inference_steps=12).steps == 12


def test_sampler_options_never_leak_into_the_next_prediction(predictor):
    first = run(predictor, prompt="a cat", seed=1, scheduler="Euler")
    run(predictor, prompt="a cat", seed=1, scheduler="DPM++ 3M SDE Karras")
    assert np.array_equal(first, run(predictor, prompt="a cat", seed=1, scheduler="Euler"))


def test_sdxl_defaults_equal_stock_diffusers_sdxl(predictor, tiny_weights):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    (ours,) = run(predictor, prompt="a photo of a cat", seed=8, use_standard_sdxl=True)
    vae = AutoencoderKL.from_pretrained(tiny_weights / utils.VAE_DIR)
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_weights / "sdxl-base", vae=vae)
    stock.scheduler = DPMSolverMultistepScheduler.from_config(stock.scheduler.config, use_karras_sigmas=True)
    stock.set_progress_bar_config(disable=True)
    image = stock("a photo of a cat", guidance_scale=7.0, num_inference_steps=3, width=256, height=256,
                  generator=[torch.Generator("cpu").manual_seed(8)]).images[0]
    assert np.array_equal(ours, np.asarray(image))


def test_prompt_errors_come_before_any_lora_download(predictor):
    misses = predictor.lora_cache.stats["misses"]
    with pytest.raises(ValueError, match="prompt: .*1.2.3"):
        run(predictor, prompt="(cat:1.2.3)", seed=1, lora_weights="https://example.invalid/x.safetensors")
    with pytest.raises(ValueError, match="negative_prompt"):
        run(predictor, prompt="a cat", negative_prompt="lowres " * 1300, seed=1,
            lora_weights="https://example.invalid/x.safetensors")
    with pytest.raises(utils.InputError, match="clip_skip: expected 1 to 4"):
        run(predictor, prompt="a cat", seed=1, clip_skip=5, lora_weights="https://example.invalid/x.safetensors")
    assert predictor.lora_cache.stats["misses"] == misses


def test_every_pipeline_keeps_the_device_dtype(tiny_weights):
    # On a GPU the models load in bf16/fp16; building the img2img/inpainting pipelines must not cast the shared
    # modules (diffusers' from_pipe defaults to float32, which doubled memory and time on an H200).
    models = utils.load_models(tiny_weights, torch.device("cpu"), torch.bfloat16)
    for model in models.models.values():
        for pipe in (model.txt2img, model.img2img, model.inpaint):
            for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
                assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
