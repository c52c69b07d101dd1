"""more_loras, embeddings and vae (issue 15) through predict() on the tiny model: exactness against independent
computations, exact restores, and the errors a user meets (naming the input and the line)."""

from __future__ import annotations

import base64
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

import predict
import utils
import weights
from conftest import predict_inputs
from sdxl import embeddings, prompts
from sdxl import vae as user_vae
from ldm_checkpoint import convert_vae
from lora_fixtures import write_diffusers_lora, write_kohya_lora, write_locon_lora
from test_lora_formats import assert_merged, snapshot
import lora_fixtures as F

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=1, output_format="png", seed=5,
             prompt="1girl, (red:1.2) hat", negative_prompt="bad hands, lowres")


def data_url(tensors: dict[str, torch.Tensor]) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(save(tensors)).decode()


def image(predictor, **overrides) -> tuple[np.ndarray, str]:
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, **overrides}))
    return np.asarray(Image.open(path).convert("RGB")), utils.read_parameters(path) or ""


def pipe_of(predictor):
    return predictor.models.models["illustrious"].txt2img


def word_rows(pipe, text: str) -> dict[str, torch.Tensor]:
    """An SDXL embedding (A1111 keys) whose vectors are copies of the token embeddings of `text`."""
    ids1 = pipe.tokenizer(text, add_special_tokens=False).input_ids
    ids2 = pipe.tokenizer_2(text, add_special_tokens=False).input_ids
    assert ids1 == ids2  # the tiny tokenizers share one vocabulary
    return {"clip_l": pipe.text_encoder.get_input_embeddings().weight[ids1].detach().clone(),
            "clip_g": pipe.text_encoder_2.get_input_embeddings().weight[ids2].detach().clone()}


@pytest.fixture(scope="module")
def control(predictor) -> np.ndarray:
    """The plain image (no LoRA, embedding or VAE input) that the exactness tests compare with."""
    return image(predictor)[0]


@pytest.fixture(scope="module")
def files(predictor, file_host):
    pipe = pipe_of(predictor)
    folder = file_host.folder
    fixtures = {
        "a": write_kohya_lora(folder / "mw_a.safetensors", pipe, seed=11),
        "b": write_diffusers_lora(folder / "mw_b.safetensors", pipe, seed=12),
        "c": write_locon_lora(folder / "mw_c.safetensors", pipe, seed=13),
    }
    save_file(word_rows(pipe, "red"), str(folder / "redTI.safetensors"))
    save_file({"emb_params": torch.zeros(2, 768)}, str(folder / "sd15ti.safetensors"))
    vae_dir = predictor.weights_dir / utils.VAE_DIR
    state = {k: v for k, v in pipe.vae.state_dict().items()}
    config = json.loads((vae_dir / "config.json").read_text())
    ldm = convert_vae(state, config)
    save_file(ldm, str(folder / "same_vae.safetensors"))
    changed = dict(ldm)
    changed["decoder.conv_out.bias"] = changed["decoder.conv_out.bias"] + 0.3
    save_file(changed, str(folder / "other_vae.safetensors"))
    urls = {name: f"{file_host.url}/{path.name}" for name, path in
            {**{k: fx.path for k, fx in fixtures.items()}, "redTI": folder / "redTI.safetensors",
             "sd15ti": folder / "sd15ti.safetensors", "same_vae": folder / "same_vae.safetensors",
             "other_vae": folder / "other_vae.safetensors"}.items()}
    return {"fx": fixtures, "url": urls, "folder": folder}


# ------------------------------------------------------------------------------------------------ more_loras
def test_more_loras_lines_comments_scales_and_limits():
    loras = predict.parse_more_loras("# styles\n\nhf://o/r  0.5\n  owner/model\n# off for now: hf://o/x 2\n")
    assert [(x.input_name, x.ref.display, x.scale) for x in loras] == [
        ("more_loras line 3", "hf://o/r@main", 0.5), ("more_loras line 4", "replicate owner/model", 1.0)]
    for text, message in (
        ("hf://o/r\nhf://o/s 3.5", "more_loras line 2: expected a scale from -1 to 3, got 3.5"),
        ("hf://o/r nan", "more_loras line 1: expected a scale from -1 to 3"),
        ("hf://o/r strong", "more_loras line 1: expected a scale (a number from -1 to 3)"),
        ("hf://o/r 1 2", "more_loras line 1: expected a reference and optionally a scale"),
        ("ftp://x/y.safetensors", "more_loras line 1: "),
        ("\n".join(f"hf://o/r{i}" for i in range(7)), "more_loras line 7: at most 6 LoRAs in more_loras"),
    ):
        with pytest.raises((utils.InputError, weights.InvalidReferenceError), match="^" + re.escape(message)):
            predict.parse_more_loras(text)
    # Eight in all is the most: lora_weights, extra_lora and six lines (comments and blank lines not counted).
    request = predict.check_inputs(**{**CHECK, "lora_weights": "hf://o/a", "extra_lora": "hf://o/b",
                                      "more_loras": "\n".join(f"hf://o/r{i}" for i in range(6)) + "\n#\n\n"})
    assert len(request.loras) == predict.MAX_LORAS == 8


CHECK = dict(prompt="a cat", negative_prompt=None, aspect_ratio="1:1", width=None, height=None, megapixels="1",
             image=None, mask=None, prompt_strength=0.8, num_outputs=1, num_inference_steps=None, guidance=None,
             scheduler="default", clip_skip=2, guidance_rescale=0.0, quality_tags=False, lora_weights=None,
             lora_scale=1.0, extra_lora=None, extra_lora_scale=1.0, output_format="png", output_quality=80,
             disable_safety_checker=False, use_standard_sdxl=False)


def merge(predictor, **inputs):
    """What predict() does up to the merge, without generating."""
    request = predict.check_inputs(**{**CHECK, **inputs})
    fetched = [predictor.lora_cache.fetch(x.ref, weights.Tokens(), input_name=x.input_name) for x in request.loras]
    predictor.apply_loras(request, fetched)
    return request


def test_three_inputs_merge_to_the_independent_sum_in_any_order(predictor, files, caplog):
    pipe, merger = pipe_of(predictor), predictor.mergers["illustrious"]
    fx, url = files["fx"], files["url"]
    merger.reset()
    base = snapshot(pipe)
    first = dict(lora_weights=url["a"], extra_lora=url["b"], extra_lora_scale=0.8,
                 more_loras=f"# kept\n\n{url['c']} -0.5\n{url['a']} 0.25")
    merge(predictor, **first)
    # Independent reference: float64 W0 + sum(scale * delta) from the files' factors; a twice at 1 + 0.25.
    targets = {t for f in fx.values() for t in f.targets.values()}
    layers = {(c, m): base[(c, m + ".weight")] for c, m in targets}
    expected: dict = {}
    for f, scale in ((fx["a"], 1.25), (fx["b"], 0.8), (fx["c"], -0.5)):
        for key, delta in F.reference_deltas(f, layers).items():
            expected[key] = expected.get(key, 0) + scale * delta
    assert_merged(pipe, base, expected)
    merged = snapshot(pipe)
    caplog.set_level(logging.INFO, logger="predict")
    caplog.clear()
    merge(predictor, lora_weights=url["c"], lora_scale=-0.5, extra_lora=url["a"], extra_lora_scale=0.25,
          more_loras=f"{url['b']} 0.8\n{url['a']}")
    after = snapshot(pipe)
    assert all(torch.equal(merged[k], after[k]) for k in merged)  # another order: bitwise the same weights
    assert not [r for r in caplog.records if r.getMessage().startswith("applied ")]  # and no second merge
    merger.reset()
    assert all(torch.equal(base[k], v) for k, v in snapshot(pipe).items())


def test_order_across_inputs_gives_the_same_image_and_metadata_lists_every_lora(predictor, files):
    url = files["url"]
    one, text = image(predictor, lora_weights=url["a"], more_loras=f"{url['b']} 0.5\n{url['c']} -0.25")
    two, _ = image(predictor, more_loras=f"{url['c']} -0.25\n{url['a']}", extra_lora=url["b"], extra_lora_scale=0.5)
    assert np.array_equal(one, two)
    for name in ("a", "b", "c"):
        sha = weights._sha256_file(files["fx"][name].path)
        assert f"{url[name].replace(':', '_')}: {sha[:10]}" in text  # A1111 writes ':' in names as '_'


# ------------------------------------------------------------------------------------------------ embeddings
def test_embedding_lines_parse_names_and_references():
    items = embeddings.parse_embeddings(
        "# negatives\nneg=civitai.com/models/118418?modelVersionId=134583\n\n"
        "https://example.com/a/b.safetensors?x=1&y=2\nurn:air:sdxl:embedding:civitai:1@2\n"
        "pos = hf://o/r/pos.safetensors")
    assert [(i.line, i.name, i.ref.canonical_id) for i in items] == [
        (2, "neg", "civitai:134583"), (4, None, items[1].ref.canonical_id), (5, None, "civitai:2"),
        (6, "pos", "hf:o/r@main:pos.safetensors")]
    assert items[1].ref.source == "url"
    for text, message in (
        ("neg=owner/model", "embeddings line 1: Replicate models, .tar files are not embeddings"),
        ("\n\nurn:air:sdxl:lora:civitai:1@2", "embeddings line 3: .*not an embedding"),
        ("\n".join(f"n{i}=hf://o/r{i}/x.safetensors" for i in range(9)), "embeddings line 9: at most 8 embeddings"),
    ):
        with pytest.raises((utils.InputError, weights.InvalidReferenceError), match="^" + message):
            embeddings.parse_embeddings(text)


@pytest.mark.parametrize("header, says", [
    ({"emb_params": {"shape": [2, 768]}}, "an SD 1.x textual-inversion embedding"),
    ({"emb_params": {"shape": [4, 1024]}}, "an SD 2.x textual-inversion embedding"),
    ({"string_to_param.*": {"shape": [1, 768]}}, "SD 1.x/2.x"),
    ({"<cat-toy>": {"shape": [768]}}, "an SD 1.x textual-inversion embedding"),
    ({"clip_l": {"shape": [2, 768]}, "clip_g": {"shape": [3, 1280]}}, "the same n"),
    ({"clip_l": {"shape": [2, 768]}, "clip_g": {"shape": [2, 1280]}}, None),
])
def test_embedding_files_are_told_apart_by_their_keys(header, says):
    what = weights.describe_embedding_keys(header)
    assert (what is None) if says is None else (says in what)


def test_an_embedding_of_copied_word_vectors_gives_the_image_of_the_word(predictor, control):
    """One-vector in the prompt, multi-vector in the negative prompt; the name inside emphasis, upper case. Then
    the tokenizers and tables are the very objects they were, and the next image is bitwise the plain one."""
    pipe = pipe_of(predictor)
    before = (pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder.get_input_embeddings().weight,
              pipe.text_encoder_2.get_input_embeddings().weight, len(pipe.tokenizer), len(pipe.tokenizer_2))
    plain = control
    spec = f"myRed={data_url(word_rows(pipe, 'red'))}\nbadstuff = {data_url(word_rows(pipe, 'bad hands'))}"
    with_ti, text = image(predictor, prompt="1girl, (MYRED:1.2) hat", negative_prompt="badstuff, lowres",
                          embeddings=spec)
    assert np.array_equal(plain, with_ti)
    assert (pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder.get_input_embeddings().weight,
            pipe.text_encoder_2.get_input_embeddings().weight, len(pipe.tokenizer), len(pipe.tokenizer_2)) == before
    again, _ = image(predictor)
    assert np.array_equal(plain, again)
    hashes = {name: weights.hashlib.sha256(save(word_rows(pipe, words))).hexdigest()[:10]
              for name, words in (("myRed", "red"), ("badstuff", "bad hands"))}
    assert f'TI hashes: "myRed: {hashes["myRed"]}, badstuff: {hashes["badstuff"]}"' in text


def encode(pipe, prompt: str, negative: str, clip_skip: int, loaded=()) -> prompts.PromptEmbeds:
    with embeddings.applied(pipe, list(loaded)) as expand:
        return prompts.encode_prompts(pipe, expand(prompt, "prompt"), expand(negative, "negative_prompt"),
                                      clip_skip=clip_skip)


def loaded_embedding(pipe, name: str, words: str, line: int = 1) -> embeddings.Embedding:
    rows = word_rows(pipe, words)
    return embeddings.Embedding(name, (rows["clip_l"], rows["clip_g"]), "0" * 64, f"embeddings line {line}")


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_embeddings_work_with_weighting_break_long_prompts_and_whole_words_only(predictor, clip_skip):
    pipe = pipe_of(predictor)
    loaded = [loaded_embedding(pipe, "hatty", "red hat", 1), loaded_embedding(pipe, "neg", "lowres", 2)]
    long_tail = ", ".join(["cat"] * 40)  # past one 75-token chunk
    cases = [
        ("[hatty], (1girl:1.1) BREAK hatty, " + long_tail, "(neg:1.4), hattyx",
         "[red hat], (1girl:1.1) BREAK red hat, " + long_tail, "(lowres:1.4), hattyx"),
    ]
    for prompt, negative, want_prompt, want_negative in cases:
        got = encode(pipe, prompt, negative, clip_skip, loaded)
        want = encode(pipe, want_prompt, want_negative, clip_skip)
        assert got.chunks == want.chunks >= 2
        for field in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                      "negative_pooled_prompt_embeds"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_embeddings_and_replicate_pti_tokens_work_together(predictor, tmp_path):
    pipe, merger = pipe_of(predictor), predictor.mergers["illustrious"]
    fx = F.write_replicate_dir(tmp_path / "rep", pipe, seed=21)
    try:
        from sdxl.lora import LoraRequest

        merger.apply([LoraRequest("rep", fx.path, 1.0, "rep", embeddings_path=fx.embeddings_path,
                                  token_map=fx.token_map)])
        loaded = [loaded_embedding(pipe, "hatty", "red hat")]
        got = encode(pipe, merger.expand_prompt("TOK, hatty"), "", 2, loaded)
        want = encode(pipe, merger.expand_prompt("TOK, red hat"), "", 2)
        assert torch.equal(got.prompt_embeds, want.prompt_embeds)
    finally:
        merger.reset()


def test_a_failure_inside_the_block_still_restores_exactly(predictor):
    pipe = pipe_of(predictor)
    before = (pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight,
              pipe.text_encoder_2.get_input_embeddings().num_embeddings)
    with pytest.raises(RuntimeError, match="boom"):
        emb = loaded_embedding(pipe, "hatty", "red hat")
        with embeddings.applied(pipe, [emb]):
            assert len(pipe.tokenizer) == len(before[0]) + emb.count > len(before[0]) + 1
            raise RuntimeError("boom")
    assert (pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight,
            pipe.text_encoder_2.get_input_embeddings().num_embeddings) == before


def test_embedding_errors_name_the_line_and_nothing_stays_applied(predictor, files, control, caplog):
    pipe = pipe_of(predictor)
    url = files["url"]
    tokenizer = pipe.tokenizer
    cases = [
        # SD 1.5 embedding: refused when downloaded, so never cached.
        (f"{url['redTI']}\n{url['sd15ti']}", weights.IncompatibleError,
         r"^embeddings line 2: .* is not an SDXL embedding .*an SD 1.x textual-inversion embedding"),
        # Two embeddings, one name (the first takes its name from the file: redTI).
        (f"{url['redTI']}\n\nredti={data_url(word_rows(pipe, 'hat'))}", utils.InputError,
         r"^embeddings line 3: the name 'redti' is already used by embeddings line 1"),
        # Widths of real SDXL (768 / 1280) on the tiny model's 32 / 64-wide encoders.
        (f"big={data_url({'clip_l': torch.zeros(1, 768), 'clip_g': torch.zeros(1, 1280)})}", utils.InputError,
         r"^embeddings line 1: big: its clip_l table is 768 wide, this model's CLIP-L text encoder takes 32"),
        ("x=data:application/octet-stream;base64," + base64.b64encode(b"\x80\x04K\x01.").decode(),
         weights.IncompatibleError, r"^embeddings line 1: .*pickle"),
    ]
    for spec, error, message in cases:
        with pytest.raises(error, match=message):
            image(predictor, embeddings=spec)
        assert pipe.tokenizer is tokenizer
    caplog.set_level(logging.WARNING, logger="sdxl.embeddings")
    hits = embeddings.VECTORS.hits
    unused, _ = image(predictor, embeddings=url["redTI"])  # redTI never appears: a warning, the same image
    assert np.array_equal(control, unused)
    assert embeddings.VECTORS.hits == hits + 1  # its vectors came from memory, not from the file again
    assert any("embeddings line 1: the embedding 'redTI' appears in neither prompt" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------------------------------------ vae
def test_vae_in_a1111_layout_decodes_like_the_baked_one_and_another_changes_the_image(predictor, files, control):
    pipe = pipe_of(predictor)
    own = pipe.vae
    plain = control
    same, text = image(predictor, vae=files["url"]["same_vae"])
    assert np.array_equal(plain, same)  # the baked VAE's weights in A1111 layout: bitwise the same decode
    assert f"VAE hash: {weights._sha256_file(files['folder'] / 'same_vae.safetensors')[:10]}" in text
    other, _ = image(predictor, vae=files["url"]["other_vae"])
    assert not np.array_equal(plain, other)
    # The model's own VAE is back in every pipeline (the next plain request decodes with it).
    model = predictor.models.models["illustrious"]
    assert all(p.vae is own for p in (model.txt2img, model.img2img, model.inpaint, *model.runs.values()))


def test_vae_refusals_name_the_input(predictor, files):
    for ref, message in (
        (files["url"]["a"], r"^vae: .* is not an SDXL VAE .*a LoRA, not a VAE"),
        (files["url"]["redTI"], r"^vae: .* is not an SDXL VAE .*not a VAE"),
        ("owner/model", r"^vae: Replicate models, .tar files and data: URLs are not VAEs"),
    ):
        with pytest.raises((weights.WeightsError, utils.InputError), match=message):
            image(predictor, vae=ref)
    header = {"decoder.conv_in.weight": {"shape": [512, 16, 3, 3]}, "encoder.conv_in.weight": {"shape": [1]}}
    assert "16 latent channels" in weights.describe_vae_keys(header)


@pytest.mark.parametrize("dtype, config_upcast, single, same, upcast", [
    (torch.float16, False, True, False, True),  # a single file that is not the fp16-fix VAE
    (torch.float16, False, True, True, False),  # the fp16-fix VAE's own weights
    (torch.float16, True, False, False, True),  # stabilityai/sdxl-vae folder
    (torch.float16, False, False, False, False),  # madebyollin/sdxl-vae-fp16-fix folder
    (torch.bfloat16, True, True, False, False),
    (torch.float32, True, False, False, False),
])
def test_user_vae_upcast_decision(dtype, config_upcast, single, same, upcast):
    assert user_vae.user_vae_needs_upcast(dtype, config_upcast, single, same) is upcast


# ------------------------------------------------------------------------------------------------ the Cog server
def test_the_cog_server_takes_the_three_inputs(cog_server, predictor, files):
    from cog_server import decode_output

    url = files["url"]
    pipe = pipe_of(predictor)
    result = cog_server.predict({**SMALL, "prompt": "1girl, myhat", "more_loras": f"# two more\n{url['a']} 0.5\n\n{url['c']}",
                                 "embeddings": f"myhat={data_url(word_rows(pipe, 'red hat'))}",
                                 "vae": url["other_vae"]})
    assert result["status"] == "succeeded", result.get("error")
    _, png = decode_output(result["output"][0])
    from io import BytesIO

    text = Image.open(BytesIO(png)).info.get("parameters", "")
    assert "TI hashes: " in text and "myhat: " in text and text.count(": ", text.index("Lora hashes")) >= 2
    assert "VAE hash: " in text


SD15_TI = data_url({"emb_params": torch.zeros(1, 768)})


@pytest.mark.parametrize("inputs, message", [
    ({"more_loras": "hf://o/r\n# c\nhf://o/s 9"}, "more_loras line 3: expected a scale from -1 to 3, got 9"),
    ({"more_loras": "\n".join(f"hf://o/r{i}" for i in range(7))}, "more_loras line 7: at most 6 LoRAs in more_loras"),
    ({"embeddings": "\n".join(f"n{i}=hf://o/r{i}/x.safetensors" for i in range(9))},
     "embeddings line 9: at most 8 embeddings per request"),
    ({"embeddings": "bad name=hf://o/r/x.safetensors"}, "embeddings line 1: "),
    ({"embeddings": f"# SD 1.5\nold={SD15_TI}"}, "embeddings line 2: data: URL"),
    ({"vae": "owner/model"}, "vae: Replicate models, .tar files and data: URLs are not VAEs"),
])
def test_the_cog_server_reports_bad_lines_and_limits(cog_server, inputs, message):
    result = cog_server.predict({**SMALL, **inputs})
    assert result["status"] == "failed"
    assert message in result["error"], result["error"]
    if "SD 1.5" in inputs.get("embeddings", ""):
        assert "an SD 1.x textual-inversion embedding" in result["error"]


# ------------------------------------------------------------------------------------------------ folder forms
def test_diffusers_folder_forms_from_the_hub(predictor, tmp_path, monkeypatch):
    """The diffusers two-file embedding (named by its token) and a diffusers VAE folder, from a Hugging Face repo."""
    from fakes import FakeHFHub

    pipe = pipe_of(predictor)
    rows = word_rows(pipe, "red hat")
    vae_dir = predictor.weights_dir / utils.VAE_DIR
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHFHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.add_file("acme/ti", "learned_embeds.safetensors", save({"<red-hat>": rows["clip_l"]}))
        hub.add_file("acme/ti", "learned_embeds_2.safetensors", save({"<red-hat>": rows["clip_g"]}))
        hub.add_file("acme/ti", "README.md", b"a textual inversion")
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            hub.add_file("acme/vae", f"vae-folder/{name}", (vae_dir / name).read_bytes())
        hub.add_file("acme/vae", "sdxl_vae.safetensors", b"not this: the folder is asked for")
        (item,) = embeddings.parse_embeddings("huggingface.co/acme/ti")
        cache = weights.EmbeddingCache(tmp_path / "emb")
        emb = embeddings.load(item, cache.fetch(item.ref, weights.Tokens(), input_name=item.input_name))
        vae_ref = weights.parse_ref("hf://acme/vae/vae-folder", "VAE", input_name="vae")
        vae_file = weights.VaeCache(tmp_path / "vae").fetch(vae_ref, weights.Tokens(), input_name="vae")
    assert emb.name == "<red-hat>" and emb.count == rows["clip_l"].shape[0]
    got = encode(pipe, "1girl, (<red-hat>:1.1)", "", 2, [emb])
    assert torch.equal(got.prompt_embeds, encode(pipe, "1girl, (red hat:1.1)", "", 2).prompt_embeds)
    loaded = user_vae.load_vae(vae_file, predictor.weights_dir, torch.device("cpu"), torch.float32, pipe.vae)
    assert vae_file.path.is_dir() and not utils.vae_needs_upcast(loaded, pipe.vae)


def test_civitai_embeddings_take_the_primary_files_name_and_must_be_textual_inversions(predictor, tmp_path,
                                                                                         monkeypatch):
    from fakes import FakeCivitai

    pipe = pipe_of(predictor)
    with FakeCivitai() as civitai:
        monkeypatch.setenv("CIVITAI_API_BASE", civitai.url)
        civitai.add_version(118418, 134583, save(word_rows(pipe, "lowres")), base_model="SDXL 1.0",
                            file_name="negativeXL_D.safetensors", model_type="TextualInversion")
        civitai.add_version(7, 70, save(word_rows(pipe, "lowres")), model_type="LORA")
        civitai.add_version(8, 80, save(word_rows(pipe, "lowres")), base_model="SD 1.5",
                            model_type="TextualInversion")
        cache = weights.EmbeddingCache(tmp_path / "emb")
        items = embeddings.parse_embeddings("civitai.com/models/118418\n\ncivitai.com/models/7\n"
                                            "https://civitai.com/models/8?modelVersionId=80")
        first = embeddings.load(items[0], cache.fetch(items[0].ref, weights.Tokens(), input_name=items[0].input_name))
        assert first.name == "negativeXL_D"
        with pytest.raises(weights.IncompatibleError, match=r"^embeddings line 3: civitai model 7 is not an embedding "
                           r"\(expected a TextualInversion \(embedding\) model; got a LORA model\)"):
            cache.fetch(items[1].ref, weights.Tokens(), input_name=items[1].input_name)
        with pytest.raises(weights.IncompatibleError, match=r"^embeddings line 4: .*another base model.*'SD 1.5'"):
            cache.fetch(items[2].ref, weights.Tokens(), input_name=items[2].input_name)


def test_the_loras_of_a_request_stay_within_the_total_size_limit(monkeypatch):
    monkeypatch.setattr(predict, "MAX_LORA_TOTAL_BYTES", 3 * weights.MiB)
    request = predict.check_inputs(**{**CHECK, "more_loras": "hf://o/a\nhf://o/b"})
    fetched = [weights.LoraFile(x.ref, None, "0" * 64, 2 * weights.MiB) for x in request.loras]
    predict.check_lora_total(request, fetched[:1])
    with pytest.raises(utils.InputError, match=r"^more_loras: the LoRAs of one request may total at most 3 MiB "
                       r"\(LORA_MAX_TOTAL_BYTES\), got 4 MiB from 2 LoRAs"):
        predict.check_lora_total(request, fetched)


def test_a_prompt_made_too_long_by_embeddings_fails_before_any_merge(predictor, files, caplog):
    wide = data_url({"clip_l": torch.zeros(75, 32), "clip_g": torch.zeros(75, 64)})  # 75 vectors: one chunk each
    caplog.set_level(logging.INFO, logger="predict")
    with pytest.raises(prompts.PromptError, match=r"^prompt: too long: more than 16 chunks"):
        image(predictor, prompt=", ".join(["big"] * 17), embeddings=f"big={wide}", lora_weights=files["url"]["a"])
    assert not [r for r in caplog.records if r.getMessage().startswith(("applied ", "encoded prompts"))]
