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


class BatchSizes:
    """The batch size of every forward call of the real UNet (a forward pre-hook; removed on exit)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.sizes = module, []

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(
            lambda _m, args, kwargs: self.sizes.append((args[0] if args else kwargs["sample"]).shape[0]),
            with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_below_the_cutoff_the_guided_batch_runs_its_conditional_half_only(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    cached = stepcache.StepCachedUNet(unet, interval=1)
    x = unet_inputs(unet, batch=2)
    x["sample"] = torch.cat([x["sample"][1:]] * 2)  # the pipeline's guided batch: the same latents twice
    cut = stepcache.GUIDANCE_CUTOFF_TIMESTEP
    cond = {k: stepcache.conditional_half(v, 1) for k, v in x.items()}
    with torch.no_grad(), BatchSizes(unet) as seen:
        cached.begin(guided_images=1)
        late = cached(**{**x, "timestep": torch.tensor(cut - 1.0)}).sample
        alone = unet(**{**cond, "timestep": torch.tensor(cut - 1.0)}).sample  # the independent computation
        early = cached(**{**x, "timestep": torch.tensor(float(cut))}).sample
        guided = unet(**{**x, "timestep": torch.tensor(float(cut))}).sample
    assert seen.sizes == [1, 1, 2, 2]
    assert torch.equal(late[:1], alone) and torch.equal(late[1:], alone)  # both halves: the conditional prediction
    assert torch.equal(early, guided)  # at and above the cutoff: guided as before
    assert cached.unguided_calls == 1


def test_go_fast_guidance_cutoff_equals_diffusers_cfg_cutoff_callback(predictor):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    pipe = predictor.models.models["illustrious"].txt2img
    steps = 9
    pipe.scheduler.set_timesteps(steps)
    first_unguided = int((pipe.scheduler.timesteps < stepcache.GUIDANCE_CUTOFF_TIMESTEP).nonzero()[0])
    assert 0 < first_unguided < steps
    cached = stepcache.StepCachedUNet(pipe.unet, interval=1)  # a full step every step: only the cutoff differs
    twin = type(pipe).from_pipe(pipe, unet=cached)
    common = dict(prompt="1girl, red hat", negative_prompt="lowres", num_inference_steps=steps, guidance_scale=5.0,
                  width=256, height=192, output_type="latent")
    with torch.no_grad(), BatchSizes(pipe.unet) as seen:
        cached.begin(guided_images=1)
        ours = twin(**common, generator=torch.Generator().manual_seed(3)).images
    # diffusers' callback cuts guidance after the step it is called at: the step before the first unguided one.
    theirs = pipe(**common, generator=torch.Generator().manual_seed(3),
                  callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=first_unguided - 1)).images
    plain = pipe(**common, generator=torch.Generator().manual_seed(3)).images
    assert seen.sizes == [2] * first_unguided + [1] * (steps - first_unguided)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)


def test_go_fast_records_the_cutoff_and_cuts_only_guided_loops(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, "go_fast": True}))
    assert f"Guidance cutoff timestep: {stepcache.GUIDANCE_CUTOFF_TIMESTEP}" in utils.read_parameters(path)
    with BatchSizes(unet) as seen:
        paths = predictor.predict(**predict_inputs(**{**SMALL, "go_fast": True, "num_outputs": 2}))
    assert seen.sizes[0] == 4 and seen.sizes[-1] == 2  # two images: guided batch 4, then their conditional half
    with BatchSizes(unet) as seen:
        (path,) = predictor.predict(**predict_inputs(**{**SMALL, "go_fast": True, "guidance": 1.0}))
    assert set(seen.sizes) == {1}  # no guidance to cut
    assert "Guidance cutoff timestep" not in utils.read_parameters(path)
    (path,) = predictor.predict(**predict_inputs(**SMALL))
    assert "Guidance cutoff timestep" not in utils.read_parameters(path)
    assert len(paths) == 2


def test_go_fast_with_a_reference_cuts_the_image_embeddings_too_and_graphs_replay_it(predictor):
    from cog_server import data_uri
    from test_control import drawn_image
    from test_graphs import rerun_capture, use_graphs

    unet = predictor.models.models["illustrious"].txt2img.unet
    inputs = {**SMALL, "go_fast": True, "reference_image": data_uri(drawn_image((48, 64)))}
    with BatchSizes(unet) as seen:
        (path,) = predictor.predict(**predict_inputs(**inputs))
    eager = np.asarray(Image.open(path).convert("RGB"))
    assert seen.sizes[0] == 2 and seen.sizes[-1] == 1  # guided, then the conditional half with its image embeds
    assert not np.array_equal(eager, image(predictor, go_fast=True))  # the reference acts in the cut steps too
    use_graphs(predictor, rerun_capture)
    try:
        (path,) = predictor.predict(**predict_inputs(**inputs))
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), eager)
    finally:
        use_graphs(predictor, None)
