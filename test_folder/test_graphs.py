"""CUDA graphs (sdxl/graphs.py) on the tiny model. There is no GPU here, so the capture is replaced by one that re-runs
the captured function on the graph's static buffers when replayed: everything around a real graph (static inputs
copied in, outputs copied out, one graph per shape, stale graphs dropped, calls a graph cannot cover left eager)
runs as on CUDA, and a mistake in it gives a wrong image. That a real graph replays bitwise what eager computes is
checked on the GPU by bench/run_benchmark.py (graphs_equal_eager)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl import graphs
from sdxl import stepcache
import utils
from conftest import predict_inputs
from lora_fixtures import write_kohya_lora

SMALL = dict(aspect_ratio="custom", width=320, height=256, num_inference_steps=3, output_format="png",
             prompt="1girl, blue sky", seed=5)


def rerun_capture(fn, static, pool):
    """Stands in for capture_cuda_graph: 'replaying' runs fn again on the static inputs, into the static outputs.
    Like a real capture, capturing computes nothing: the outputs hold NaN until the first replay."""
    outputs = fn(static)
    for out in outputs:
        out.fill_(float("nan"))

    def replay():
        for out, new in zip(outputs, fn(static)):
            out.copy_(new)

    return replay, outputs


def images(predictor, **overrides) -> list[np.ndarray]:
    paths = predictor.predict(**predict_inputs(**{**SMALL, **overrides}))
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def use_graphs(predictor, capture) -> None:
    for model in predictor.models.models.values():
        model.graph_capture, model.runs, model.runner = capture, {}, None


@pytest.fixture()
def graphed(predictor):
    use_graphs(predictor, rerun_capture)
    yield predictor.models.models["illustrious"]
    use_graphs(predictor, None)


def unet_inputs(unet, batch: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(sample=torch.randn(batch, 4, 24, width // 8, generator=g), timestep=torch.tensor(400.0 + seed),
                encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, text, generator=g),
                                       time_ids=torch.tensor([[192.0, width, 0, 0, 192, width]] * batch)))


def test_graph_captures_are_used_only_on_cuda_and_can_be_turned_off(monkeypatch):
    assert utils.graph_capture_for(torch.device("cpu")) is None
    assert utils.graph_capture_for(torch.device("cuda")) is graphs.capture_cuda_graph
    monkeypatch.setenv("SDXL_CUDA_GRAPHS", "0")
    assert utils.graph_capture_for(torch.device("cuda")) is None


def test_each_shape_gets_one_graph_and_every_replay_computes_its_own_inputs(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    runner = graphs.GraphRunner(rerun_capture)
    graphed = graphs.GraphedUNet(unet, runner)
    graphed.begin()
    calls = [(2, 256, 0), (2, 256, 1), (4, 256, 2), (2, 320, 3), (2, 256, 4), (1, 256, 5), (4, 256, 6)]
    with torch.no_grad():
        outs = []
        for batch, width, seed in calls:
            x = unet_inputs(unet, batch, width, seed)
            out = graphed(**x).sample
            assert torch.equal(out, unet(**x).sample), (batch, width, seed)
            outs.append(out)
        # Handed-out outputs are copies: later replays of the same graph leave them alone.
        assert torch.equal(outs[0], unet(**unet_inputs(unet, 2, 256, 0)).sample)
    assert len(runner.graphs) == 4  # (2, 256), (4, 256), (2, 320), (1, 256)
    assert runner.stats["captures"] == 4 and runner.stats["replays"] == 7  # each capture is replayed once too
    assert graphed.eager_calls == 0


def test_a_call_no_graph_covers_runs_eagerly(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    runner = graphs.GraphRunner(rerun_capture)
    graphed = graphs.GraphedUNet(unet, runner)
    x = unet_inputs(unet, 2, 256, 7)
    with torch.no_grad():
        out = graphed(**x, cross_attention_kwargs={"scale": 0.5}, return_dict=False)[0]
        assert torch.equal(out, unet(**x, cross_attention_kwargs={"scale": 0.5}).sample)
    assert graphed.eager_calls == 1 and not runner.graphs


def test_graphs_are_dropped_when_the_weights_move(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    runner = graphs.GraphRunner(rerun_capture)
    graphed = graphs.GraphedUNet(unet, runner)
    x = unet_inputs(unet, 2, 256, 8)
    graphed.begin()
    with torch.no_grad():
        graphed(**x)
        graphed.begin()  # nothing moved: the graph stays
        assert len(runner.graphs) == 1 and runner.stats["dropped"] == 0
        param = unet.conv_in.weight
        before = param.data
        param.data = before.clone()  # what a move to another device and back does: new addresses
        try:
            graphed.begin()
            assert not runner.graphs and runner.stats["dropped"] == 1
            assert torch.equal(graphed(**x).sample, unet(**x).sample)
        finally:
            param.data = before


def test_go_fast_full_and_shallow_steps_run_through_graphs(predictor):
    unet = predictor.models.models["illustrious"].txt2img.unet
    runner = graphs.GraphRunner(rerun_capture)
    with_graphs = stepcache.StepCachedUNet(unet, interval=3, runner=runner)
    eager = stepcache.StepCachedUNet(unet, interval=3)
    with_graphs.begin()
    with torch.no_grad():
        for step in range(7):
            x = unet_inputs(unet, 2, 256, step)
            assert torch.equal(with_graphs(**x).sample, eager(**x).sample), step
    assert {key[0] for key in runner.graphs} == {"full", "shallow"}
    assert (with_graphs.full_calls, eager.full_calls) == (3, 3)


def test_predictions_with_graphs_are_the_same_images(predictor, file_host):
    pipe = predictor.models.models["illustrious"].txt2img
    write_kohya_lora(file_host.folder / "graphs.safetensors", pipe)
    lora = dict(lora_weights=f"{file_host.url}/graphs.safetensors", lora_scale=0.8)
    init_path = file_host.folder / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 320, 3), np.uint8)).save(init_path)
    init = dict(image=init_path, prompt_strength=0.7)
    cases = {
        "txt2img": {},
        "LoRA": lora,
        "no CFG (batch 1)": dict(guidance=1.0),
        "num_outputs 2": dict(num_outputs=2),
        "img2img": init,
        "go_fast with a LoRA": dict(go_fast=True, **lora),
        "hires fix": dict(hires_scale=1.5, hires_steps=3),
    }
    eager = {name: images(predictor, **case) for name, case in cases.items()}
    use_graphs(predictor, rerun_capture)
    try:
        model = predictor.models.models["illustrious"]
        for name, case in cases.items():
            got = images(predictor, **case)
            assert len(got) == len(eager[name]) and all(map(np.array_equal, got, eager[name])), name
        assert model.runner.stats["replays"] > 0
        assert all(getattr(twin.unet, "eager_calls", 0) == 0 for twin in model.runs.values())
        shapes = {tuple(g.inputs["sample"].shape) for g in model.runner.graphs.values()}
        assert (2, 4, 32, 40) in shapes and (1, 4, 32, 40) in shapes and (4, 4, 32, 40) in shapes
    finally:
        use_graphs(predictor, None)
    assert np.array_equal(images(predictor)[0], eager["txt2img"][0])


def test_setup_captures_every_1mp_preset_so_a_first_request_captures_nothing(predictor, monkeypatch):
    # Two small presets stand in for the eleven 1 MP ones (each 1024² step costs seconds on this CPU).
    monkeypatch.setattr(utils, "ASPECT_RATIOS", {"1:1": (256, 256), "9:21": (256, 384)})
    use_graphs(predictor, rerun_capture)
    try:
        model = predictor.models.models["illustrious"]
        predictor.warm_graphs()
        shapes = {tuple(g.inputs["sample"].shape) for g in model.runner.graphs.values()}
        assert shapes == {(2, 4, 32, 32), (2, 4, 48, 32)}  # num_outputs 1 with CFG: batch 2
        captures = model.runner.stats["captures"]
        for aspect_ratio in ("1:1", "9:21"):
            (path,) = predictor.predict(**predict_inputs(prompt="a fox", aspect_ratio=aspect_ratio,
                                                         num_inference_steps=2, output_format="png"))
            assert Image.open(path).size == utils.ASPECT_RATIOS[aspect_ratio]
        assert model.runner.stats["captures"] == captures
    finally:
        use_graphs(predictor, None)
