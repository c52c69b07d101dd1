"""sdxl/prompts.py: A1111 prompt syntax, 75-token chunking, weighting and clip skip on the tiny SDXL model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sdxl.prompts import (
    MAX_CHUNKS,
    PromptEmbeds,
    PromptError,
    encode_prompts,
    parse_prompt_attention,
    token_spans,
)

R = 1.1  # A1111's round-bracket multiplier
S = 1 / 1.1  # square-bracket multiplier


# --------------------------------------------------------------------------------------------------------- parser

PARSER_CASES = [
    ("plain", "a cat, 1girl", [("a cat, 1girl", 1.0)]),
    ("empty", "", [("", 1.0)]),
    ("round", "a (cat) hat", [("a ", 1.0), ("cat", R), (" hat", 1.0)]),
    ("nested round", "((cat))", [("cat", R * R)]),
    ("triple round", "(((cat)))", [("cat", R * R * R)]),
    ("explicit", "(cat:1.3)", [("cat", 1.3)]),
    ("explicit spaces", "(cat : 0.5 )", [("cat ", 0.5)]),
    ("explicit sign", "(cat:+1.5) (dog:-1)", [("cat", 1.5), (" ", 1.0), ("dog", -1.0)]),
    ("explicit leading dot", "(cat:.5)", [("cat", 0.5)]),
    ("explicit nested", "((cat:1.5) dog)", [("cat", 1.5 * R), (" dog", R)]),
    ("exponent is text", "(a:1e1)", [("a:1e1", R)]),
    ("word weight is text", "(word:abc)", [("word:abc", R)]),
    ("square", "[cat]", [("cat", S)]),
    ("nested square", "[[cat]]", [("cat", S * S)]),
    ("mixed", "(a [b])", [("a ", R), ("b", S * R)]),
    ("escaped round", r"hatsune miku \(vocaloid\)", [("hatsune miku (vocaloid)", 1.0)]),
    ("escaped in weight", r"(hatsune miku \(vocaloid\):1.2)", [("hatsune miku (vocaloid)", 1.2)]),
    ("escaped square and backslash", r"\[x\] a\\b", [(r"[x] a\b", 1.0)]),
    ("lone backslash dropped", r"a\b", [("ab", 1.0)]),
    ("unbalanced round", "a (cat", [("a ", 1.0), ("cat", R)]),
    ("unbalanced square", "a [cat", [("a ", 1.0), ("cat", S)]),
    ("unbalanced nested", "((cat", [("cat", R * R)]),
    ("stray close", "cat) dog]", [("cat) dog]", 1.0)]),
    ("stray weight", "cat:1.2)", [("cat:1.2)", 1.0)]),
    ("colon is text", "score_9, rating:safe", [("score_9, rating:safe", 1.0)]),
    ("merge equal", "(a)(b)", [("ab", R)]),
    ("no merge across space", "(a) (b)", [("a", R), (" ", 1.0), ("b", R)]),
    ("break", "a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("break after comma", "a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ("break in word", "aBREAKb BREAKFAST", [("aBREAKb BREAKFAST", 1.0)]),
    ("lowercase break", "a break b", [("a break b", 1.0)]),
    ("break in brackets", "(a BREAK b)", [("a", R), ("BREAK", -1.0), ("b", R)]),
    ("lora tag kept", "<lora:foo:0.8> cat", [("<lora:foo:0.8> cat", 1.0)]),
    ("prompt editing is text", "[cat:dog:0.5]", [("cat:dog:0.5", S)]),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in PARSER_CASES], ids=[c[0] for c in PARSER_CASES])
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parser_malformed_weight_raises_prompt_error():
    with pytest.raises(PromptError) as err:
        parse_prompt_attention("(cat:1.2.3)")
    assert isinstance(err.value, ValueError)
    assert "1.2.3" in str(err.value)


OVERFLOWING_WEIGHTS = [
    ("400 digits", "(cat:" + "9" * 400 + ")"),
    ("nested product", "((cat:" + "9" * 200 + "):" + "9" * 200 + ")"),
    ("zero times infinity", "((cat:0):" + "9" * 400 + ")"),
]


@pytest.mark.parametrize("text", [c[1] for c in OVERFLOWING_WEIGHTS], ids=[c[0] for c in OVERFLOWING_WEIGHTS])
def test_infinite_attention_weight_is_a_prompt_error_not_a_black_image(text):
    """Found by bench/fuzz_server.py: a weight that overflows to inf/NaN made NaN embeddings and a silently black
    image; it is refused at parse time (predict's preflight, before any download) with the fragment named."""
    with pytest.raises(PromptError, match=r"attention weight of 'cat' is too large") as err:
        parse_prompt_attention(text)
    assert err.value.input_name == "text"


# ----------------------------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def pipe(tiny_weights):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(
        tiny_weights / "illustrious-xl", vae=AutoencoderKL.from_pretrained(tiny_weights / "sdxl-vae-fp16-fix")
    )
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def fresh_pipe(tiny_weights):
    """A pipeline this test may modify (added tokens, resized embeddings)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(
        tiny_weights / "illustrious-xl", vae=AutoencoderKL.from_pretrained(tiny_weights / "sdxl-vae-fp16-fix")
    )
    p.set_progress_bar_config(disable=True)
    return p


def one_token_word(tokenizer) -> str:
    """A word of the tiny vocabulary that is a single token (and not a comma)."""
    for word in ("dog", "solo", "red", "girl", "hair"):
        if len(tokenizer(word, add_special_tokens=False).input_ids) == 1:
            return word
    raise AssertionError("no single-token word in the tiny vocabulary")


def words(pipe, n: int) -> str:
    return " ".join([one_token_word(pipe.tokenizer)] * n)


def hidden(text_encoder, ids, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]


def pooled_of(text_encoder_2, ids) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder_2(torch.tensor([ids])).text_embeds[0]


# ---------------------------------------------------------------------------------------------------- chunking


def test_chunks_are_77_tokens_with_bos_eos_and_the_tokenizers_own_pad(pipe):
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        (chunk,) = token_spans(tok, "masterpiece, 1girl")
        expected = tok("masterpiece, 1girl", padding="max_length", max_length=77, truncation=True).input_ids
        assert list(chunk.ids) == expected
        assert chunk.ids[-1] == tok.pad_token_id
    # CLIP-L pads with <|endoftext|>, CLIP-G ("!") with id 0
    assert token_spans(pipe.tokenizer, "dog")[0].ids[-1] == pipe.tokenizer.eos_token_id
    assert token_spans(pipe.tokenizer_2, "dog")[0].ids[-1] == 0


def test_75_tokens_fit_one_chunk_76_need_two(pipe):
    word_id = pipe.tokenizer(one_token_word(pipe.tokenizer), add_special_tokens=False).input_ids[0]
    one = token_spans(pipe, words(pipe, 75))
    assert len(one) == 1 and one[0].length == 75 and one[0].ids[76] == pipe.tokenizer.eos_token_id
    two = token_spans(pipe, words(pipe, 76))
    assert [c.length for c in two] == [75, 1]
    assert two[1].text_ids == (word_id,)
    assert all(len(c.ids) == 77 and len(c.weights) == 77 for c in two)


@pytest.mark.parametrize("comma_at,first_len", [(70, 71), (55, 56), (54, 75)])
def test_comma_backtrack_within_last_20_tokens(pipe, comma_at, first_len):
    # comma_at words, a comma, then enough words to overflow the first chunk
    text = words(pipe, comma_at) + " , " + words(pipe, 80 - comma_at)
    chunks = token_spans(pipe, text)
    comma_id = pipe.tokenizer(",", add_special_tokens=False).input_ids[0]
    assert chunks[0].length == first_len
    if first_len < 75:  # moved: the first chunk ends with the comma, the rest starts the next chunk
        assert chunks[0].text_ids[-1] == comma_id
    assert sum(c.length for c in chunks) == 81  # nothing lost


def test_break_starts_a_new_chunk(pipe):
    w = one_token_word(pipe.tokenizer)
    assert [c.length for c in token_spans(pipe, f"{w} BREAK {w} {w}")] == [1, 2]
    assert [c.length for c in token_spans(pipe, f"BREAK {w}")] == [0, 1]  # leading BREAK: an empty chunk
    assert [c.length for c in token_spans(pipe, f"{w} BREAK")] == [1]  # trailing BREAK: nothing
    assert [c.length for c in token_spans(pipe, f"{w} BREAK BREAK {w}")] == [1, 0, 1]
    assert [c.length for c in token_spans(pipe, words(pipe, 75) + f" BREAK {w}")] == [75, 1]
    lowercase = len(pipe.tokenizer(f"{w} break {w}", add_special_tokens=False).input_ids)
    assert [c.length for c in token_spans(pipe, f"{w} break {w}")] == [lowercase]  # lowercase is text


def test_token_weights_follow_the_syntax(pipe):
    w = one_token_word(pipe.tokenizer)
    (chunk,) = token_spans(pipe, f"({w}:1.5) {w} [{w}]")
    assert chunk.text_weights == pytest.approx((1.5, 1.0, S))
    assert chunk.weights[0] == 1.0 and set(chunk.weights[4:]) == {1.0}  # BOS, EOS, padding


def test_escaped_brackets_are_encoded_as_text(pipe):
    (escaped,) = token_spans(pipe, r"miku \(vocaloid\)")
    plain_ids = pipe.tokenizer("miku (vocaloid)", add_special_tokens=False).input_ids
    assert escaped.text_ids == tuple(plain_ids)  # the brackets are tokens of the text
    assert set(escaped.text_weights) == {1.0}
    (unescaped,) = token_spans(pipe, "miku (vocaloid)")  # without escapes: emphasis, no bracket tokens
    assert max(unescaped.text_weights) == pytest.approx(R) and unescaped.length < escaped.length


def test_too_long_prompt_raises_naming_the_input(pipe):
    too_long = words(pipe, MAX_CHUNKS * 75 + 1)
    assert len(token_spans(pipe, words(pipe, MAX_CHUNKS * 75))) == MAX_CHUNKS
    with pytest.raises(PromptError) as err:
        encode_prompts(pipe, too_long, "")
    assert err.value.input_name == "prompt" and "prompt" in str(err.value)
    with pytest.raises(PromptError) as err:
        encode_prompts(pipe, "dog", too_long)
    assert err.value.input_name == "negative_prompt" and str(err.value).startswith("negative_prompt")


def test_bad_inputs_raise_prompt_error_naming_the_input(pipe):
    with pytest.raises(PromptError) as err:
        encode_prompts(pipe, "cat", "(bad:1.2.3)")
    assert err.value.input_name == "negative_prompt"
    with pytest.raises(PromptError) as err:
        encode_prompts(pipe, 42, "")
    assert err.value.input_name == "prompt"


@pytest.mark.parametrize("which", ["prompt", "negative_prompt"])
def test_finite_weight_that_overflows_the_embeddings_is_a_prompt_error(pipe, which):
    """(cat:1e38) parses (finite) but the weighted hidden states overflow float32: refused naming the input."""
    huge = "(cat:1" + "0" * 38 + ")"
    texts = {"prompt": "cat", "negative_prompt": ""}
    texts[which] = huge
    with pytest.raises(PromptError, match="weighted text embeddings overflow float32") as err:
        encode_prompts(pipe, texts["prompt"], texts["negative_prompt"])
    assert err.value.input_name == which


# ------------------------------------------------------------------------------------------------------ encoding


def stock(pipe, prompt, negative_prompt, n=1):
    with torch.no_grad():
        return pipe.encode_prompt(
            prompt,
            device=torch.device("cpu"),
            num_images_per_prompt=n,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
        )


def width(pipe) -> int:
    """Width of the concatenated conditioning: text_encoder's hidden size + text_encoder_2's."""
    return pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size


def half_slice(pipe, half: int) -> slice:
    """The columns of one text encoder in the concatenated conditioning (0: CLIP-L, 1: CLIP-G)."""
    w1 = pipe.text_encoder.config.hidden_size
    return slice(0, w1) if half == 0 else slice(w1, width(pipe))


def ours_tuple(e: PromptEmbeds):
    return e.prompt_embeds, e.negative_prompt_embeds, e.pooled_prompt_embeds, e.negative_pooled_prompt_embeds


@pytest.mark.parametrize("n", [1, 3])
def test_plain_prompt_is_bitwise_equal_to_stock_diffusers(pipe, n):
    prompt = "masterpiece, best quality, 1girl, solo, red hair, rating:safe, score_9"
    negative = "worst quality, lowres, bad anatomy"
    ours = encode_prompts(pipe, prompt, negative, clip_skip=2, num_images_per_prompt=n)
    ref = stock(pipe, prompt, negative, n)
    assert ours.chunks == 1
    for a, b in zip(ours_tuple(ours), ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    assert ours.prompt_embeds.shape == (n, 77, width(pipe))


def test_empty_negative_encodes_empty_string_or_zeros(pipe):
    prompt = "1girl, solo"
    encoded = encode_prompts(pipe, prompt, "", zero_empty_negative=False)
    for a, b in zip(ours_tuple(encoded), stock(pipe, prompt, "")):  # A1111: the empty string is encoded
        assert torch.equal(a, b)
    assert encoded.negative_prompt_embeds.abs().sum() > 0
    zeroed = encode_prompts(pipe, prompt, "  ", zero_empty_negative=True)
    for a, b in zip(ours_tuple(zeroed), stock(pipe, prompt, None)):  # diffusers' force_zeros_for_empty_prompt
        assert torch.equal(a, b)
    assert not zeroed.negative_prompt_embeds.any() and not zeroed.negative_pooled_prompt_embeds.any()
    # a non-empty negative is encoded even with the flag
    assert encode_prompts(pipe, prompt, "lowres", zero_empty_negative=True).negative_prompt_embeds.any()


def test_long_prompt_concatenates_chunks_and_pools_from_the_first(pipe):
    text = words(pipe, 70) + ", masterpiece, best quality, 1girl, red hair, blue eyes, smile"
    spans = [token_spans(tok, text) for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    assert len(spans[0]) == 2
    e = encode_prompts(pipe, text, "lowres")
    assert e.chunks == 2 and e.prompt_embeds.shape == (1, 154, width(pipe))
    for half, (te, chunks) in enumerate(zip((pipe.text_encoder, pipe.text_encoder_2), spans)):
        for k, chunk in enumerate(chunks):  # each chunk encoded on its own, placed at 77*k
            got = e.prompt_embeds[0, 77 * k : 77 * (k + 1), half_slice(pipe, half)]
            torch.testing.assert_close(got, hidden(te, chunk.ids, -2))
    torch.testing.assert_close(e.pooled_prompt_embeds[0], pooled_of(pipe.text_encoder_2, spans[1][0].ids))
    # text in the second chunk changes the embeddings but not the pooled embedding
    other = encode_prompts(pipe, text.replace("blue eyes", "black hair"), "lowres")
    assert not torch.equal(other.prompt_embeds[:, 77:], e.prompt_embeds[:, 77:])
    torch.testing.assert_close(other.prompt_embeds[:, :77], e.prompt_embeds[:, :77])
    assert torch.equal(other.pooled_prompt_embeds, e.pooled_prompt_embeds)


@pytest.mark.parametrize("long_side", ["prompt", "negative_prompt"])
def test_positive_and_negative_are_padded_to_the_same_chunks(pipe, long_side):
    long_text, short_text = words(pipe, 160), "lowres"
    prompt, negative = (long_text, short_text) if long_side == "prompt" else (short_text, long_text)
    e = encode_prompts(pipe, prompt, negative, num_images_per_prompt=2)
    assert e.chunks == 3
    assert e.prompt_embeds.shape == e.negative_prompt_embeds.shape == (2, 231, width(pipe))
    short = e.negative_prompt_embeds if long_side == "prompt" else e.prompt_embeds
    single = encode_prompts(pipe, short_text, "")
    empty = encode_prompts(pipe, "", "")
    torch.testing.assert_close(short[:1, :77], single.prompt_embeds)
    torch.testing.assert_close(short[:1, 77:154], empty.prompt_embeds)  # padding = the empty prompt
    torch.testing.assert_close(short[:1, 154:], empty.prompt_embeds)
    assert torch.equal(e.prompt_embeds[0], e.prompt_embeds[1])


def test_zero_negative_matches_the_positive_chunk_count(pipe):
    e = encode_prompts(pipe, words(pipe, 100), "", zero_empty_negative=True)
    assert e.chunks == 2 and e.negative_prompt_embeds.shape == (1, 154, width(pipe))
    assert not e.negative_prompt_embeds.any()


@pytest.mark.parametrize("clip_skip", [1, 2, 3, 4])
def test_clip_skip_picks_hidden_states_minus_n_of_both_encoders(pipe, clip_skip):
    text = "masterpiece, 1girl, (red hair:1.0)"
    e = encode_prompts(pipe, text, "lowres", clip_skip=clip_skip)
    for half, tok, te in ((0, pipe.tokenizer, pipe.text_encoder), (1, pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = token_spans(tok, text)[0].ids
        assert torch.equal(e.prompt_embeds[0, :, half_slice(pipe, half)], hidden(te, ids, -clip_skip))
        neg_ids = token_spans(tok, "lowres")[0].ids
        assert torch.equal(e.negative_prompt_embeds[0, :, half_slice(pipe, half)], hidden(te, neg_ids, -clip_skip))
    # the pooled embedding is always the final layer's projection
    assert torch.equal(e.pooled_prompt_embeds, encode_prompts(pipe, text, "lowres", clip_skip=2).pooled_prompt_embeds)


def test_clip_skip_changes_the_result_and_is_validated(pipe):
    one = encode_prompts(pipe, "1girl", "", clip_skip=1).prompt_embeds
    two = encode_prompts(pipe, "1girl", "", clip_skip=2).prompt_embeds
    assert not torch.allclose(one, two)
    layers = pipe.text_encoder.config.num_hidden_layers
    for bad in (0, -1, layers + 1, "2", 2.0, True):
        with pytest.raises(PromptError) as err:
            encode_prompts(pipe, "1girl", "", clip_skip=bad)
        assert err.value.input_name == "clip_skip" and "clip_skip" in str(err.value)


def test_weighting_scales_only_weighted_tokens_and_keeps_the_mean(pipe):
    plain_text, weighted_text = "masterpiece, 1girl, solo, smile", "masterpiece, (1girl:1.5), solo, smile"
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert token_spans(tok, plain_text)[0].ids == token_spans(tok, weighted_text)[0].ids
    weights = torch.tensor(token_spans(pipe, weighted_text)[0].weights)
    up = weights == 1.5
    assert up.sum() == 2  # "1girl" is two tokens here
    plain = encode_prompts(pipe, plain_text, "").prompt_embeds[0].double()
    weighted = encode_prompts(pipe, weighted_text, "").prompt_embeds[0].double()
    assert not torch.allclose(plain, weighted)
    for half in (0, 1):  # per text encoder, as A1111 (each SDXL encoder is its own embedder)
        z0, z1 = plain[:, half_slice(pipe, half)], weighted[:, half_slice(pipe, half)]
        assert z1.mean().item() == pytest.approx(z0.mean().item(), rel=1e-5)
        ratio = z1 / z0  # per token a single factor: the direction of every token is unchanged
        c = ratio[~up].mean()
        torch.testing.assert_close(ratio[~up], torch.full_like(ratio[~up], c.item()), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ratio[up], torch.full_like(ratio[up], 1.5 * c.item()), rtol=1e-4, atol=1e-4)
    # negative prompts are weighted too
    neg_plain = encode_prompts(pipe, "dog", "lowres").negative_prompt_embeds
    neg_weighted = encode_prompts(pipe, "dog", "(lowres:1.4)").negative_prompt_embeds
    assert not torch.allclose(neg_plain, neg_weighted)


def test_break_changes_the_conditioning(pipe):
    joined = encode_prompts(pipe, "1girl, red hair", "")
    broken = encode_prompts(pipe, "1girl BREAK red hair", "")
    assert joined.chunks == 1 and broken.chunks == 2
    assert broken.prompt_embeds.shape[1] == broken.negative_prompt_embeds.shape[1] == 154


def test_tokens_added_at_runtime_are_single_tokens(fresh_pipe):
    pipe = fresh_pipe
    before = token_spans(pipe, "<s0> dog")[0].length
    assert before > 2  # not yet known: characters
    encode_prompts(pipe, "<s0> dog", "")  # a first call must not cache the tokenizers
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        tok.add_tokens(["<s0>", "<s1>"])
        te.resize_token_embeddings(len(tok))
    s0 = pipe.tokenizer.convert_tokens_to_ids("<s0>")
    assert token_spans(pipe, "<s0> dog")[0].text_ids[0] == s0
    assert token_spans(pipe, "<s0> dog")[0].length == 2
    assert token_spans(pipe.tokenizer_2, "(<s0><s1>:1.2) dog")[0].length == 3
    first = encode_prompts(pipe, "<s0> dog", "").prompt_embeds
    with torch.no_grad():  # the embedding row of <s0> is what gets encoded
        pipe.text_encoder.get_input_embeddings().weight[s0] += 1.0
    second = encode_prompts(pipe, "<s0> dog", "").prompt_embeds
    assert not torch.allclose(first[..., half_slice(pipe, 0)], second[..., half_slice(pipe, 0)])
    torch.testing.assert_close(first[..., half_slice(pipe, 1)], second[..., half_slice(pipe, 1)])


def test_multi_vector_textual_inversion_tokens_expand_like_stock(fresh_pipe):
    pipe = fresh_pipe
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        tok.add_tokens(["<ti>", "<ti>_1", "<ti>_2"])  # the layout pipe.load_textual_inversion writes
        te.resize_token_embeddings(len(tok))
    ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in ("<ti>", "<ti>_1", "<ti>_2")]
    chunk = token_spans(pipe, "(<ti>:1.2), 1girl")[0]
    assert chunk.text_ids[:3] == tuple(ids) and chunk.text_weights[:3] == pytest.approx((1.2,) * 3)
    ours = encode_prompts(pipe, "<ti>, 1girl", "lowres")
    for a, b in zip(ours_tuple(ours), stock(pipe, "<ti>, 1girl", "lowres")):
        assert torch.equal(a, b)


def test_lora_tags_are_not_dropped_and_warned_about(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="sdxl.prompts"):
        e = encode_prompts(pipe, "<lora:foo:0.8> 1girl", "")
    assert "<lora:foo:0.8>" in caplog.text
    assert not torch.equal(e.prompt_embeds, encode_prompts(pipe, "1girl", "").prompt_embeds)


def test_output_dtype_and_device(pipe):
    e = encode_prompts(pipe, "1girl", "lowres", device="cpu")
    for t in ours_tuple(e):
        assert t.device.type == "cpu" and t.dtype == pipe.text_encoder_2.dtype and not t.requires_grad


def test_pipeline_image_equals_stock_for_plain_prompt_and_runs_long_prompts(pipe):
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 1, "guidance_scale": 5.0, "output_type": "latent"}
    prompt, negative = "masterpiece, 1girl, solo", "lowres"
    ref = pipe(prompt=prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(1), **kwargs).images
    e = encode_prompts(pipe, prompt, negative)
    got = pipe(**e.as_pipeline_kwargs(), generator=torch.Generator().manual_seed(1), **kwargs).images
    assert torch.equal(ref, got)

    e = encode_prompts(pipe, words(pipe, 100) + ", (1girl:1.3)", "lowres BREAK bad anatomy", num_images_per_prompt=2)
    out = pipe(**e.as_pipeline_kwargs(), **kwargs).images  # the embeddings already carry the batch
    assert out.shape[0] == 2 and torch.isfinite(out).all()
