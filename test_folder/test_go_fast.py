"""go_fast: step caching (sdxl/stepcache.py) on the tiny model: fewer full UNet evaluations, the same picture, exact mode
untouched, LoRAs and hires fix still applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl import stepcache
import utils
from conftest import predict_inputs
from lora_fixtures import write_kohya_lora

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=7, output_format="png",
             prompt="1girl, red hat", seed=11)


def image(predictor, **overrides) -> np.ndarray:
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, **overrides}))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


class CountCalls:
    """Counts forward calls of the real UNet (a forward hook; removed on exit)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def unet_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(sample=torch.randn(batch, 4, 32, 24, generator=g), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, text, generator=g),
                                       time_ids=torch.tensor([[256.0, 192.0, 0, 0, 256, 192]] * batch)))


@pytest.fixture(scope="module")
def exact(predictor):
    return image(predictor)


def test_the_shallow_step_equals_the_full_unet_when_its_deep_features_are_fresh(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    cached = stepcache.StepCachedUNet(unet, interval=3)
    x = unet_inputs(unet)
    with torch.no_grad():
        full = cached(**x).sample
        shallow = cached(**x).sample
        reference = unet(**x).sample
    assert (cached.calls, cached.full_calls) == (2, 1)
    assert torch.equal(full, reference)
    assert torch.equal(shallow, reference)


def test_a_new_batch_size_or_a_reset_forces_a_full_step(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    cached = stepcache.StepCachedUNet(unet, interval=3)
    with torch.no_grad():
        cached(**unet_inputs(unet, batch=2))
        cached(**unet_inputs(unet, batch=4))  # features of another batch cannot be reused
        assert (cached.calls, cached.full_calls) == (2, 2)
        cached(**unet_inputs(unet, batch=4))
        assert (cached.calls, cached.full_calls) == (3, 2)
        cached.reset()
        cached(**unet_inputs(unet, batch=4))
    assert (cached.calls, cached.full_calls) == (1, 1)


def test_go_fast_runs_the_full_unet_on_every_third_step_only(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    with CountCalls(unet) as exact_count:
        image(predictor)
    with CountCalls(unet) as fast_count:
        image(predictor, go_fast=True)
    assert exact_count.calls == 7
    assert fast_count.calls == 3  # steps 0, 3 and 6


def test_go_fast_keeps_the_picture_and_exact_mode_is_untouched(predictor, exact):
    fast = image(predictor, go_fast=True)
    other_seed = image(predictor, seed=12)
    assert not np.array_equal(fast, exact)  # lossy: the image changes...
    # ...but far less than another seed changes it.
    assert np.abs(fast - exact).mean() < 0.5 * np.abs(other_seed - exact).mean()
    assert np.array_equal(image(predictor, go_fast=True), fast)  # deterministic
    assert np.array_equal(image(predictor), exact)  # the exact pipeline never sees the step cache


def test_go_fast_applies_loras_and_hires_fix(predictor, file_host, exact):
    pipe = predictor.models.models["illustrious"].txt2img
    write_kohya_lora(file_host.folder / "gofast.safetensors", pipe)
    url = f"{file_host.url}/gofast.safetensors"
    plain = image(predictor, go_fast=True)
    with_lora = image(predictor, go_fast=True, lora_weights=url)
    assert not np.array_equal(with_lora, plain)
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, "go_fast": True, "hires_scale": 1.5, "hires_steps": 4}))
    assert Image.open(path).size == (384, 384)
    assert "Step cache interval: 3" in utils.read_parameters(path)
    assert np.array_equal(image(predictor), exact)  # LoRA out again, exact mode as before
