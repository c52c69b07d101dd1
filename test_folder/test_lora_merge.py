"""The merge state machine: bitwise return to base after many swaps, in-place writes, no fp16 drift, the loading
flag after a failure, the parse cache, logging, and two base models each with its own merger."""

from __future__ import annotations

import logging
import random

import lora_fixtures as F
import pytest
import torch
from test_lora_formats import (
    COMPONENTS,
    assert_base,
    assert_merged,
    load_tiny_pipe,
    render,
    request,
    snapshot,
)

from sdxl import lora
from sdxl.lora import LoraMerger, LoraRequest


@pytest.fixture(scope="module")
def env(tiny_weights, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared 2-core runner
    pipe = load_tiny_pipe(tiny_weights)
    folder = tmp_path_factory.mktemp("lora_merge")
    pool = [
        F.write_kohya_lora(folder / "kohya.safetensors", pipe, seed=1),
        F.write_locon_lora(folder / "locon.safetensors", pipe, seed=2),
        F.write_diffusers_lora(folder / "peft.safetensors", pipe, seed=3),
        F.write_dora_lora(folder / "dora.safetensors", pipe, seed=4),
        F.write_loha_lora(folder / "loha.safetensors", pipe, seed=5),
        F.write_lokr_lora(folder / "lokr.safetensors", pipe, seed=6),
        F.write_replicate_dir(folder / "replicate", pipe, seed=7),
    ]
    env = {
        "pipe": pipe,
        "merger": LoraMerger(pipe),
        "dir": folder,
        "pool": pool,
        "base": snapshot(pipe),
        "image": render(pipe),
        "weights": tiny_weights,
    }
    yield env
    torch.set_num_threads(threads)


def expected_for(env, pairs):
    """W0 + sum(scale * delta) per layer, from the reference maths, for (fixture, scale) pairs."""
    base = env["base"]
    targets = {t for fx, _ in pairs for t in fx.targets.values()}
    base_layers = {(c, m): base[(c, m + ".weight")] for c, m in targets}
    total: dict = {}
    for fx, scale in pairs:
        for k, d in F.reference_deltas(fx, base_layers).items():
            total[k] = total.get(k, 0) + scale * d
    return total


def test_100_random_swaps_return_bitwise_to_base(env):
    pipe, merger, pool = env["pipe"], env["merger"], env["pool"]
    ptrs = {k: getattr(pipe, COMPONENTS[k[0]]).get_parameter(k[1]).data_ptr() for k in env["base"]}
    rng = random.Random(1234)
    current: list = []
    for step in range(100):
        if current and rng.random() < 0.3:  # only a scale change
            current = [(fx, rng.uniform(-1, 3)) for fx, _ in current]
        else:
            current = [(fx, rng.uniform(-1, 3)) for fx in rng.sample(pool, rng.randint(0, 2))]
        names = ("lora_weights", "extra_lora")
        merger.apply([request(fx, round(s, 3), f"{names[i]} ({fx.kind})") for i, (fx, s) in enumerate(current)])
        if step % 20 == 19 and current:  # spot-check the sum against the reference along the way
            assert_merged(pipe, env["base"], expected_for(env, [(fx, round(s, 3)) for fx, s in current]))
    merger.apply([])
    assert_base(pipe, env["base"])
    # In place: every parameter still lives in the same storage (a CUDA-graphed model reads the same memory).
    for k, ptr in ptrs.items():
        assert getattr(pipe, COMPONENTS[k[0]]).get_parameter(k[1]).data_ptr() == ptr, k
    assert torch.equal(render(pipe), env["image"])


def test_merge_is_in_place_and_adds_no_modules(env):
    pipe, merger = env["pipe"], env["merger"]
    fx = env["pool"][1]  # LoCon: linears and convs
    module_types = [type(m) for m in pipe.unet.modules()]
    name, module = next((n, m) for n, m in pipe.unet.named_modules() if n == fx.targets[next(iter(fx.targets))][1])
    weight, ptr = module.weight, module.weight.data_ptr()
    merger.apply([request(fx, 1.0)])
    try:
        assert module.weight is weight and weight.data_ptr() == ptr
        assert not torch.equal(weight, env["base"][("unet", name + ".weight")])
        assert [type(m) for m in pipe.unet.modules()] == module_types  # no PEFT wrappers: same cost per step
    finally:
        merger.reset()
    assert module.weight is weight and weight.data_ptr() == ptr
    assert_base(pipe, env["base"])


def test_repeat_is_a_no_op_and_scale_change_needs_no_parse(env):
    merger, fx = env["merger"], env["pool"][0]
    lora.PARSE_CACHE.clear()
    parses = lora.PARSE_CACHE.parses
    merger.apply([request(fx, 0.5)])
    try:
        again = merger.apply([request(fx, 0.5)])
        assert again.changed is False and again.layers_written == 0
        rescaled = merger.apply([request(fx, 0.8)])
        assert rescaled.changed and rescaled.loras[0].cached
        swapped = merger.apply([request(fx, 0.8), request(env["pool"][2], 0.3)])
        assert all(s.cached for s in swapped.loras[:1])
        merger.apply([request(fx, 0.8)])
        merger.apply([request(env["pool"][2], 0.3), request(fx, 0.8)])
        assert lora.PARSE_CACHE.parses == parses + 2  # each file was read once
        assert_merged(env["pipe"], env["base"], expected_for(env, [(env["pool"][2], 0.3), (fx, 0.8)]))
    finally:
        merger.apply([])


def test_failure_mid_merge_forces_clean_state(env, monkeypatch):
    pipe, merger = env["pipe"], env["merger"]
    merger.apply([request(env["pool"][0], 1.0)])
    calls = {"n": 0}
    real = LoraMerger._write_layer

    class Cancelled(BaseException):  # like a cancellation: not even an Exception
        pass

    def flaky(self, layer_id, contributions):
        calls["n"] += 1
        if calls["n"] == 25:
            raise Cancelled()
        return real(self, layer_id, contributions)

    monkeypatch.setattr(LoraMerger, "_write_layer", flaky)
    with pytest.raises(Cancelled):
        merger.apply([request(env["pool"][2], 2.0), request(env["pool"][4], -1.0)])
    assert merger.loading  # weights are half-written and the merger knows it
    monkeypatch.setattr(LoraMerger, "_write_layer", real)
    # Asking again for the very same set must not be taken as "unchanged".
    merger.apply([request(env["pool"][2], 2.0), request(env["pool"][4], -1.0)])
    assert not merger.loading
    assert_merged(pipe, env["base"], expected_for(env, [(env["pool"][2], 2.0), (env["pool"][4], -1.0)]))
    monkeypatch.setattr(LoraMerger, "_write_layer", flaky)
    calls["n"] = 0
    with pytest.raises(Cancelled):
        merger.apply([request(env["pool"][0], 0.5)])
    monkeypatch.setattr(LoraMerger, "_write_layer", real)
    merger.apply([])
    assert not merger.loading
    assert_base(pipe, env["base"])


def test_error_leaves_live_loras_untouched(env):
    pipe, merger, fx = env["pipe"], env["merger"], env["pool"][0]
    merger.apply([request(fx, 0.6)])
    try:
        bad = F.write_foreign_lora(env["dir"] / "flux.safetensors", pipe, "flux")
        with pytest.raises(lora.IncompatibleLoraError):
            merger.apply([request(fx, 0.6), LoraRequest("k:flux", bad, 1.0, "extra_lora (flux)")])
        assert not merger.loading
        assert_merged(pipe, env["base"], expected_for(env, [(fx, 0.6)]))
    finally:
        merger.apply([])


def test_log_line_per_lora_with_counts(env, caplog):
    fx_a, fx_b = env["pool"][0], env["pool"][6]
    with caplog.at_level(logging.INFO, logger="sdxl.lora"):
        env["merger"].apply([request(fx_a, 0.5, "lora_weights (a)"), request(fx_b, 1.0, "extra_lora (b)")])
    try:
        lines = [r.getMessage() for r in caplog.records if r.name == "sdxl.lora"]
        a = next(line for line in lines if line.startswith("LoRA lora_weights (a):"))
        counts = {c: sum(1 for t, _ in fx_a.targets.values() if t == c) for c in ("unet", "te1", "te2")}
        assert counts["unet"] > 0 and counts["te1"] > 0 and counts["te2"] > 0
        assert "format=kohya" in a and " ms" in a
        assert f"unet={counts['unet']} te1={counts['te1']} te2={counts['te2']}" in a
        b = next(line for line in lines if line.startswith("LoRA extra_lora (b):"))
        assert "format=replicate-attn-procs" in b and "te1=0 te2=0" in b and "pti=<s0><s1>" in b
    finally:
        env["merger"].apply([])


def test_fp16_no_drift_after_many_cycles(env):
    """fp16 weights: every cycle recomputes from the kept W0, so 60 apply/reset cycles leave no trace."""
    pipe16 = load_tiny_pipe(env["weights"])
    pipe16.unet.to(torch.float16)
    pipe16.text_encoder.to(torch.float16)
    pipe16.text_encoder_2.to(torch.float16)
    base16 = snapshot(pipe16)
    merger = LoraMerger(pipe16)
    rng = random.Random(7)
    fx = env["pool"][0]
    for i in range(60):
        merger.apply([request(fx, rng.uniform(-1, 3)), request(env["pool"][5], rng.uniform(-1, 3))])
        if i % 3 == 0:
            merger.reset()
    merger.apply([request(fx, 1.5)])
    base_layers = {(c, m): base16[(c, m + ".weight")] for c, m in fx.targets.values()}
    for (c, m), d in F.reference_deltas(fx, base_layers).items():
        got = getattr(pipe16, COMPONENTS[c]).get_submodule(m).weight
        assert got.dtype == torch.float16
        want = (base16[(c, m + ".weight")].double() + 1.5 * d).to(torch.float16)
        # One fp16 rounding of the exact sum (float32 vs float64 accumulation may differ by one ulp).
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
    merger.apply([])
    for (c, n), value in base16.items():
        assert torch.equal(getattr(pipe16, COMPONENTS[c]).get_parameter(n), value), (c, n)


def test_two_base_models_each_stay_correct(env, tiny_weights):
    """One merger per base model; applying or switching LoRAs on one never disturbs the other."""
    pipe_a, merger_a = env["pipe"], env["merger"]
    pipe_b = load_tiny_pipe(tiny_weights, "sdxl-base")
    env_b = {"base": snapshot(pipe_b)}
    merger_b = LoraMerger(pipe_b)
    fx_a = env["pool"][0]
    fx_b = F.write_kohya_lora(env["dir"] / "for_b.safetensors", pipe_b, seed=99)
    try:
        merger_a.apply([request(fx_a, 0.9)])
        merger_b.apply([request(fx_b, 1.1), request(fx_a, 0.4)])  # the same file on both models
        assert_merged(pipe_a, env["base"], expected_for(env, [(fx_a, 0.9)]))
        assert_merged(pipe_b, env_b["base"], expected_for(env_b, [(fx_b, 1.1), (fx_a, 0.4)]))
        merger_a.apply([])
        assert_merged(pipe_b, env_b["base"], expected_for(env_b, [(fx_b, 1.1), (fx_a, 0.4)]))
        merger_a.apply([request(fx_b, -0.5)])
        merger_b.apply([])
        assert_base(pipe_b, env_b["base"])
        assert_merged(pipe_a, env["base"], expected_for(env, [(fx_b, -0.5)]))
    finally:
        merger_a.apply([])
        merger_b.apply([])
    assert_base(pipe_a, env["base"])


def test_release_gives_the_base_back_and_the_next_apply_merges_again(env):
    """Before a model leaves GPU memory its merger lets go of kept copies; the weights must be the base and a
    later apply must merge exactly as before."""
    merger, fx = env["merger"], env["pool"][0]
    merger.apply([request(fx, 0.7)])
    merger.release()
    assert merger.active == ()
    assert_base(env["pipe"], env["base"])
    try:
        merger.apply([request(fx, 0.7)])
        assert_merged(env["pipe"], env["base"], expected_for(env, [(fx, 0.7)]))
    finally:
        merger.apply([])
    assert_base(env["pipe"], env["base"])


def test_same_shape_layers_are_merged_in_batches_with_their_own_alphas_and_ranks(env, monkeypatch):
    from safetensors.torch import load_file, save_file

    pipe, merger = env["pipe"], env["merger"]
    varied = F.write_kohya_lora(env["dir"] / "alphas.safetensors", pipe, seed=21, rank=4)
    tensors = load_file(str(varied.path))
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
        tensors[key] = torch.tensor(1.0 + i % 3)  # a different alpha from layer to layer, within a shape group
    save_file(tensors, str(varied.path), metadata={"ss_network_module": "networks.lora"})
    other = F.write_kohya_lora(env["dir"] / "rank2.safetensors", pipe, seed=22, rank=2, alpha=None)
    pairs = [(varied, 0.7), (other, -0.5)]
    batches = []
    monkeypatch.setattr(merger, "_write_batch", lambda members: (batches.append(len(members)), lora._write_batch(members)))

    report = merger.apply([request(fx, s, f"lora {i}") for i, (fx, s) in enumerate(pairs)])
    assert_merged(pipe, env["base"], expected_for(env, pairs))
    assert sum(batches) == report.layers_written and len(batches) < report.layers_written  # batched, all of them
    batched = snapshot(pipe)

    merger.apply([])
    batches.clear()
    monkeypatch.setattr(lora, "BATCH_BYTES", 1)  # one layer per batch: the same sums
    merger.apply([request(fx, s, f"lora {i}") for i, (fx, s) in enumerate(pairs)])
    assert set(batches) == {1}
    one_by_one = snapshot(pipe)
    for key, value in batched.items():
        torch.testing.assert_close(one_by_one[key], value, rtol=1e-6, atol=1e-6)
    merger.apply([])
    assert_base(pipe, env["base"])


def test_only_factors_stored_in_16_bits_are_marked_exact_in_tf32(env):
    # The batched merge multiplies such factors on TF32 tensor cores (CUDA only): exact for fp16/bf16 values,
    # rounding for float32 ones, which must stay on float32 units.
    for dtype, exact in ((torch.float16, True), (torch.bfloat16, True), (torch.float32, False)):
        fx = F.write_kohya_lora(env["dir"] / f"tf32-{str(dtype)[6:]}.safetensors", env["pipe"], seed=31, dtype=dtype)
        req = request(fx, 0.5)
        parsed, _ = lora.PARSE_CACHE.get(req)
        resolved = env["merger"]._resolve(req, parsed)
        assert {spec.half_factors for _, spec in resolved.layers} == {exact}, dtype
