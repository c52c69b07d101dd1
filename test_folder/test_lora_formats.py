"""Every LoRA format sdxl/lora.py accepts merges to exactly W + sum(scale_i * delta_i), computed here independently from
the file's own tensors (lora_fixtures.reference_deltas), and changes the image; foreign files give clear errors."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import lora_fixtures as F
import pytest
import torch

from sdxl.lora import (
    EmptyLoraError,
    IncompatibleLoraError,
    LoraError,
    LoraMerger,
    LoraRequest,
    UnmatchedLoraKeysError,
    UnsupportedLoraError,
    build_text_encoder_lookup,
    build_unet_lookup,
)

COMPONENTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def load_tiny_pipe(weights: Path, model: str = "illustrious-xl"):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_pretrained(weights / "sdxl-vae-fp16-fix")
    pipe = StableDiffusionXLPipeline.from_pretrained(weights / model, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str = "a photo of a cat") -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt, height=64, width=64, num_inference_steps=2, generator=gen, output_type="pt").images


def snapshot(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """Every parameter of the UNet and both text encoders, cloned."""
    return {
        (c, n): p.detach().clone()
        for c, attr in COMPONENTS.items()
        for n, p in getattr(pipe, attr).named_parameters()
    }


def layer_weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module) -> live weight, for the reference computation."""
    out = {}
    for c, attr in COMPONENTS.items():
        for n, p in getattr(pipe, attr).named_parameters():
            if n.endswith(".weight"):
                out[(c, n[: -len(".weight")])] = p
    return out


def assert_merged(pipe, base: dict, expected: dict[tuple[str, str], torch.Tensor], allowed_extra=frozenset()) -> None:
    """Targets equal W0 + expected delta (float64 reference); every other parameter (but `allowed_extra` layers,
    checked by the caller) is bitwise the base."""
    live = layer_weights(pipe)
    for (c, module), delta in expected.items():
        w0 = base[(c, module + ".weight")].double()
        got = live[(c, module)].detach().double()
        torch.testing.assert_close(got, w0 + delta, rtol=1e-5, atol=1e-5, msg=lambda m, c=c, module=module: f"{c} {module}: {m}")
    touched = {(c, m + ".weight") for c, m in expected} | {(c, m + ".weight") for c, m in allowed_extra}
    for key, value in base.items():
        if key not in touched:
            p = getattr(pipe, COMPONENTS[key[0]]).get_parameter(key[1])
            if key[1].endswith("token_embedding.weight") and p.shape[0] > value.shape[0]:
                p = p[: value.shape[0]]  # PTI appends rows; the original rows must stay bitwise equal
            assert torch.equal(p, value), f"untouched parameter {key} changed"


def assert_base(pipe, base: dict) -> None:
    for (c, n), value in base.items():
        p = getattr(pipe, COMPONENTS[c]).get_parameter(n)
        assert p.shape == value.shape and torch.equal(p, value), f"{c} {n} not bitwise base"


def request(fx: F.LoraFixture, scale: float, name: str | None = None) -> LoraRequest:
    return LoraRequest(
        key=f"test:{fx.path}",
        path=fx.path,
        scale=scale,
        name=name or f"lora_weights ({fx.kind})",
        embeddings_path=fx.embeddings_path,
        token_map=dict(fx.token_map),
    )


@pytest.fixture(scope="module")
def env(tiny_weights, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared 2-core runner
    pipe = load_tiny_pipe(tiny_weights)
    merger = LoraMerger(pipe)
    folder = tmp_path_factory.mktemp("lora_formats")
    env = {"pipe": pipe, "merger": merger, "dir": folder, "base": snapshot(pipe), "image": render(pipe)}
    yield env
    torch.set_num_threads(threads)


WRITERS = {
    "kohya-sgm": lambda p, pipe: F.write_kohya_lora(p, pipe, seed=11),
    "kohya-diffusers-names-no-alpha": lambda p, pipe: F.write_kohya_lora(p, pipe, seed=12, naming="diffusers", alpha=None),
    "locon": lambda p, pipe: F.write_locon_lora(p, pipe, seed=13),
    "diffusers-peft": lambda p, pipe: F.write_diffusers_lora(p, pipe, seed=14),
    "diffusers-lora-dot-no-alpha": lambda p, pipe: F.write_diffusers_lora(p, pipe, seed=15, style="lora_dot", lora_alpha=None),
    "dora-kohya": lambda p, pipe: F.write_dora_lora(p, pipe, seed=16, style="kohya"),
    "dora-peft": lambda p, pipe: F.write_dora_lora(p, pipe, seed=17, style="peft"),
    "loha": lambda p, pipe: F.write_loha_lora(p, pipe, seed=18),
    "loha-tucker": lambda p, pipe: F.write_loha_lora(p, pipe, seed=19, tucker=True),
    "lokr": lambda p, pipe: F.write_lokr_lora(p, pipe, seed=20),
    "replicate-attn-procs": lambda p, pipe: F.write_replicate_lora(p, pipe, seed=21),
    "locon-tucker": lambda p, pipe: F.write_locon_tucker_lora(p, pipe, seed=22),
    "full-diff": lambda p, pipe: F.write_full_diff_lora(p, pipe, seed=23),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_format_merges_exactly_and_changes_image(env, fmt):
    pipe, merger, base = env["pipe"], env["merger"], env["base"]
    fx = WRITERS[fmt](env["dir"] / f"{fmt}.safetensors", pipe)
    scale = 0.7
    report = merger.apply([request(fx, scale)])
    try:
        base_layers = {(c, m): base[(c, m + ".weight")] for c, m in fx.targets.values()}
        expected = {k: scale * d for k, d in F.reference_deltas(fx, base_layers).items()}
        assert_merged(pipe, base, expected)
        stat = report.loras[0]
        for component in ("unet", "te1", "te2"):
            assert stat.layers[component] == sum(1 for c, _ in fx.targets.values() if c == component)
        assert not torch.equal(render(pipe), env["image"]), "the LoRA did not change the image"
    finally:
        merger.apply([])
    assert_base(pipe, base)


def test_two_loras_each_scale_applied_once(env):
    """lora_weights + extra_lora on the same layers: W0 + s1*d1 + s2*d2, including DoRA and a negative scale."""
    pipe, merger, base = env["pipe"], env["merger"], env["base"]
    a = F.write_kohya_lora(env["dir"] / "two_a.safetensors", pipe, seed=31)
    b = F.write_dora_lora(env["dir"] / "two_b.safetensors", pipe, seed=32, style="peft")
    merger.apply([request(a, 1.3, "lora_weights (a)"), request(b, -0.6, "extra_lora (b)")])
    try:
        base_layers = {k: base[(k[0], k[1] + ".weight")] for k in set(a.targets.values()) | set(b.targets.values())}
        da, db = F.reference_deltas(a, base_layers), F.reference_deltas(b, base_layers)
        expected = {k: 1.3 * da.get(k, 0) + -0.6 * db.get(k, 0) for k in set(da) | set(db)}
        assert_merged(pipe, base, expected)
        # Only a scale change: recomputed from W0, never stacked on the previous merge.
        merger.apply([request(a, 3.0, "lora_weights (a)"), request(b, -1.0, "extra_lora (b)")])
        expected = {k: 3.0 * da.get(k, 0) + -1.0 * db.get(k, 0) for k in set(da) | set(db)}
        assert_merged(pipe, base, expected)
    finally:
        merger.apply([])
    assert_base(pipe, base)


def test_replicate_tar_with_pti_tokens(env):
    pipe, merger, base = env["pipe"], env["merger"], env["base"]
    fx = F.write_replicate_tar(env["dir"] / "trained.tar", pipe, seed=41)
    with tarfile.open(env["dir"] / "trained.tar") as tar:
        assert sorted(tar.getnames()) == ["embeddings.pti", "lora.safetensors", "special_params.json"]
    assert json.loads((fx.path.parent / "special_params.json").read_text()) == {"TOK": "<s0><s1>"}
    tok1, tok2, n1 = pipe.tokenizer, pipe.tokenizer_2, len(pipe.tokenizer)
    emb1 = pipe.text_encoder.get_input_embeddings().weight

    report = merger.apply([request(fx, 0.9)])
    try:
        assert report.loras[0].pti_tokens == ("<s0>", "<s1>")
        assert merger.expand_prompt("a photo of TOK, TOK's hat, TOKYO") == "a photo of <s0><s1>, <s0><s1>'s hat, TOKYO"
        rows, _ = F._file_tensors(fx.embeddings_path)
        for tok, emb, key in ((pipe.tokenizer, pipe.text_encoder, "text_encoders_0"), (pipe.tokenizer_2, pipe.text_encoder_2, "text_encoders_1")):
            ids = tok.convert_tokens_to_ids(["<s0>", "<s1>"])
            assert ids == [n1, n1 + 1]
            assert ids[0] in tok("a photo of <s0><s1>").input_ids
            assert torch.equal(emb.get_input_embeddings().weight[ids], rows[key])
        base_layers = {(c, m): base[(c, m + ".weight")] for c, m in fx.targets.values()}
        assert_merged(pipe, base, {k: 0.9 * d for k, d in F.reference_deltas(fx, base_layers).items()})
        # The PTI tokens reach the text encoders: the expanded prompt renders differently from the literal one.
        with_tokens = render(pipe, merger.expand_prompt("a photo of TOK"))
        assert not torch.equal(with_tokens, render(pipe, "a photo of TOK"))
    finally:
        merger.apply([])
    assert pipe.tokenizer is tok1 and pipe.tokenizer_2 is tok2 and len(pipe.tokenizer) == n1
    assert pipe.text_encoder.get_input_embeddings().weight is emb1
    assert merger.expand_prompt("a photo of TOK") == "a photo of TOK"
    assert_base(pipe, base)
    assert torch.equal(render(pipe), env["image"])


def test_two_replicate_loras_get_distinct_tokens(env):
    pipe, merger = env["pipe"], env["merger"]
    a = F.write_replicate_dir(env["dir"] / "rep_a", pipe, seed=51)
    b = F.write_replicate_dir(env["dir"] / "rep_b", pipe, seed=52, trigger="SKS")
    n = len(pipe.tokenizer)
    merger.apply([request(a, 1.0, "lora_weights (a)"), request(b, 0.5, "extra_lora (b)")])
    try:
        assert len(pipe.tokenizer) == n + 4 and len(pipe.tokenizer_2) == n + 4
        expanded = merger.expand_prompt("TOK and SKS")
        assert expanded.startswith("<s0><s1> and ") and "<s0>" not in expanded.split(" and ")[1]
    finally:
        merger.apply([])
    assert len(pipe.tokenizer) == n


def test_sgm_names_map_to_the_tiny_unet(env):
    """The kohya SGM spellings of the brief's table resolve to the right diffusers modules."""
    lookup = build_unet_lookup(env["pipe"].unet)
    cases = {
        "input_blocks_0_0": "conv_in",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
        "input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
        "input_blocks_8_1_transformer_blocks_1_ff_net_0_proj": "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj",
        "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
        "middle_block_1_transformer_blocks_1_attn2_to_out_0": "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0",
        "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
        "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
        "output_blocks_2_1_proj_out": "up_blocks.0.attentions.2.proj_out",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_4_1_transformer_blocks_0_attn2_to_k": "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
        "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
        "time_embed_0": "time_embedding.linear_1",
        "time_embed_2": "time_embedding.linear_2",
        "label_emb_0_0": "add_embedding.linear_1",
        "label_emb_0_2": "add_embedding.linear_2",
        "out_2": "conv_out",
        "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    }
    for kohya, module in cases.items():
        assert lookup.get(kohya) == module, kohya
    # Every UNet linear/conv has an SGM spelling (so no kohya layer of a real SDXL LoRA can be unmatched).
    for name, m in env["pipe"].unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            assert lookup.get(F.sgm_name(name).replace(".", "_")) == name


def test_text_encoder_names_with_and_without_text_model(env):
    for te in (env["pipe"].text_encoder, env["pipe"].text_encoder_2):
        lookup = build_text_encoder_lookup(te)
        live = next(n for n, _ in te.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        for spelling in (
            "text_model_encoder_layers_0_self_attn_q_proj",
            "text_model.encoder.layers.0.self_attn.q_proj",
            "encoder.layers.0.self_attn.q_proj",
        ):
            assert lookup[spelling] == live


FOREIGN = {
    "sd15": (IncompatibleLoraError, "SD1.x"),
    "sd15_dims": (IncompatibleLoraError, "768 means SD1.x"),
    "flux": (IncompatibleLoraError, "Flux"),
    "flux_diffusers": (IncompatibleLoraError, "Flux"),
    "sd3": (IncompatibleLoraError, "SD3"),
    "checkpoint": (IncompatibleLoraError, "checkpoint"),
}
UNSUPPORTED = {"oft": "OFT", "glora": "GLoRA", "ia3": "(IA)^3", "bundle_emb": "bundle_emb"}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_base_is_a_clear_error(env, kind):
    pipe, merger = env["pipe"], env["merger"]
    path = F.write_foreign_lora(env["dir"] / f"foreign_{kind}.safetensors", pipe, kind)
    exc_type, words = FOREIGN[kind]
    with pytest.raises(exc_type, match=r"^extra_lora \(civitai:123\): .*" + __import__("re").escape(words)):
        merger.apply([LoraRequest(f"k:{kind}", path, 1.0, "extra_lora (civitai:123)")])
    assert_base(pipe, env["base"])


@pytest.mark.parametrize("algo", list(UNSUPPORTED))
def test_unsupported_algorithm_is_a_clear_error(env, algo):
    path = F.write_unsupported_lora(env["dir"] / f"algo_{algo}.safetensors", env["pipe"], algo)
    with pytest.raises(UnsupportedLoraError) as info:
        env["merger"].apply([LoraRequest(f"k:{algo}", path, 1.0, "lora_weights (hf:me/x)")])
    assert str(info.value).startswith("lora_weights (hf:me/x): ") and UNSUPPORTED[algo] in str(info.value)
    assert_base(env["pipe"], env["base"])


def test_unmatched_keys_and_shape_mismatch_and_empty(env):
    pipe, merger = env["pipe"], env["merger"]
    path = F.write_lora_with_unmatched_keys(env["dir"] / "unmatched.safetensors", pipe)
    with pytest.raises(UnmatchedLoraKeysError, match=r"^lora_weights \(x\): 2 of \d+ layers match nothing.*no_such_layer"):
        merger.apply([LoraRequest("k:unmatched", path, 1.0, "lora_weights (x)")])
    path = F.write_shape_mismatch_lora(env["dir"] / "shape.safetensors", pipe)
    with pytest.raises(IncompatibleLoraError, match=r"^lora_weights \(x\): .*32 x 33.*\(32, 32\)"):
        merger.apply([LoraRequest("k:shape", path, 1.0, "lora_weights (x)")])
    from safetensors.torch import save_file

    save_file({}, str(env["dir"] / "empty.safetensors"))
    with pytest.raises(EmptyLoraError, match=r"^lora_weights \(x\)"):
        merger.apply([LoraRequest("k:empty", env["dir"] / "empty.safetensors", 1.0, "lora_weights (x)")])
    (env["dir"] / "pickle.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(LoraError, match=r"^lora_weights \(x\): not a readable .safetensors"):
        merger.apply([LoraRequest("k:pickle", env["dir"] / "pickle.safetensors", 1.0, "lora_weights (x)")])
    ok = F.write_kohya_lora(env["dir"] / "ok.safetensors", pipe, seed=3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(LoraError, match="not a finite number"):
            merger.apply([request(ok, bad)])
    assert_base(pipe, env["base"])


def test_diffusers_own_loader_agrees(env, tiny_weights):
    """A second, independent implementation: diffusers' load_lora_weights + fuse_lora (its kohya converter and
    PEFT) gives the same merged weights as sdxl/lora.py for a kohya LoCon file and a PEFT file with metadata alpha."""
    pipe, merger = env["pipe"], env["merger"]
    kohya = F.write_locon_lora(env["dir"] / "oracle_kohya.safetensors", pipe, seed=61)
    peft = F.write_diffusers_lora(env["dir"] / "oracle_peft.safetensors", pipe, seed=62, te=False, lora_alpha=8.0)
    other = load_tiny_pipe(tiny_weights)
    for fx, scale in ((kohya, 0.7), (peft, -0.4)):
        merger.apply([request(fx, scale)])
        try:
            ours = snapshot(pipe)
        finally:
            merger.apply([])
        other.load_lora_weights(str(fx.path), adapter_name="oracle")
        other.fuse_lora(lora_scale=scale)
        other.unload_lora_weights()
        theirs = snapshot(other)
        changed = 0
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
            changed += not torch.equal(value, env["base"][key])
        assert changed == len(fx.targets)
        other = load_tiny_pipe(tiny_weights)  # fresh weights for the next file


def test_text_projection_is_merged_and_alpha_only_layers_are_ignored(env):
    """OneTrainer's lora_te2_text_projection changes the pooled embedding, so it is merged (never dropped);
    a layer that carries only an alpha has nothing to merge."""
    from safetensors.torch import load_file, save_file

    pipe, merger, base = env["pipe"], env["merger"], env["base"]
    fx = F.write_kohya_lora(env["dir"] / "extras.safetensors", pipe, seed=71, te=False)
    tensors = load_file(str(fx.path))
    width = pipe.text_encoder_2.text_projection.weight.shape
    down, up = torch.randn(4, width[1]) * 0.3, torch.randn(width[0], 4) * 0.3
    tensors["lora_te2_text_projection.lora_down.weight"] = down
    tensors["lora_te2_text_projection.lora_up.weight"] = up
    tensors["lora_unet_input_blocks_4_1_proj_out_unused.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(fx.path))
    merger.apply([request(fx, 1.0)])
    try:
        base_projection = merger.base_weight("te2", "text_projection")
        expected = (base_projection.double() + up.double() @ down.double()).to(base_projection.dtype)
        torch.testing.assert_close(pipe.text_encoder_2.text_projection.weight.data, expected, rtol=1e-5, atol=1e-5)
        base_layers = {(c, m): base[(c, m + ".weight")] for c, m in fx.targets.values()}
        assert_merged(pipe, base, F.reference_deltas(fx, base_layers), allowed_extra={("te2", "text_projection")})
    finally:
        merger.apply([])
