"""A1111-style prompt text -> SDXL conditioning for the diffusers StableDiffusionXL pipelines.

Illustrious/Pony users paste prompts from AUTOMATIC1111 / Forge / ComfyUI. This module reproduces what A1111 does
with such text, and returns tensors that every diffusers SDXL pipeline (txt2img, img2img, inpainting) accepts as
``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``::

    embeds = encode_prompts(pipe, prompt, negative_prompt, clip_skip=2, num_images_per_prompt=n)
    images = pipe(**embeds.as_pipeline_kwargs(), ...)   # batch n already; do not pass num_images_per_prompt again

Prompt syntax (A1111's ``parse_prompt_attention``; see :func:`parse_prompt_attention`)
    ``(word)`` x1.1, ``((word))`` x1.1*1.1, ``(word:1.3)`` (a plain decimal number, optional sign; ``(a:1e1)`` is
    not a number, so it is the literal text ``a:1e1`` with weight 1.1, and ``(word:abc)`` is ``word:abc`` x1.1),
    ``[word]`` /1.1, escapes ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` (Danbooru names such as
    ``hatsune miku \\(vocaloid\\)``), a lone backslash before any other character is dropped (as A1111 does),
    unbalanced brackets close at the end of the text, adjacent fragments of equal weight merge, and ``BREAK``
    (uppercase, a separate word) starts a new 77-token chunk.

    Limits (so that hostile text cannot stall the server): every parser here runs in time linear in the text (no
    regular expression that backtracks over runs of whitespace or unclosed tags), at most :data:`MAX_BRACKET_DEPTH`
    brackets may be open at once, and predict.py refuses prompts over :data:`MAX_PROMPT_CHARS` characters
    (:func:`check_prompt_length`) before anything else reads them.

    Not handled here (the caller's job, or not supported):
      * LoRA / extra-network tags ``<lora:name:weight>``: A1111 removes them before parsing. This module encodes
        them as ordinary text (the parser does not drop them, so a mistake is visible); the caller must strip them
        and load the LoRA itself. :func:`encode_prompts` logs a warning when it sees one.
      * Prompt editing ``[from:to:when]`` and alternation ``[a|b]`` are not implemented: they are parsed as plain
        text inside square brackets (weight /1.1), with the ``:``/``|`` kept as text.

Long prompts
    The text is tokenised without truncation (per fragment, as A1111 does) and split into chunks of 75 tokens. When
    a chunk is full and the next token is not a comma, and the last comma of the chunk is within its last 20 tokens,
    the tokens after that comma move to the next chunk (A1111's ``comma_padding_backtrack`` = 20). ``BREAK`` closes the
    current chunk (even an empty one, so a leading ``BREAK`` gives an empty chunk; a trailing one does nothing).
    Each chunk is wrapped as ``[BOS] tokens [EOS] pad...`` to 77 tokens with the tokenizer's own pad token (CLIP-L:
    ``<|endoftext|>``, SDXL's ``tokenizer_2``: ``!``, id 0), encoded through both text encoders, and the chunks are
    concatenated along the sequence axis (77*k tokens). The pooled embedding (text_encoder_2's projected
    ``text_embeds``, from its final layer) comes from the first chunk only. Positive and negative are padded to the
    same number of chunks with chunks of the empty prompt (A1111's ``pad_cond_uncond``). At most
    :data:`MAX_CHUNKS` chunks per prompt.

Weighting (A1111's default emphasis, "Original")
    Each token's hidden state is multiplied by its weight, then the chunk is rescaled so that its mean equals the
    mean before weighting. As in A1111 (where each SDXL text encoder is its own embedder), this is done per chunk and
    per text encoder, in float32, before casting back. A chunk whose weights are all 1 is left untouched, so a plain
    prompt of <= 75 tokens at ``clip_skip=2`` gives embeddings bitwise equal to stock
    ``StableDiffusionXLPipeline.encode_prompt(prompt, negative_prompt=...)``.

clip_skip (A1111's meaning)
    ``clip_skip=n`` uses ``hidden_states[-n]`` of BOTH text encoders: 1 = the last layer's output (before the final
    layer norm, as diffusers does), 2 = the penultimate layer (SDXL's default, what Illustrious/Pony ask for). The
    pooled embedding always comes from text_encoder_2's final layer. diffusers' own ``clip_skip`` argument counts
    differently: diffusers ``clip_skip=k`` == A1111 ``clip_skip=k+2`` here (diffusers ``None`` == A1111 2; note that
    stock diffusers applies its clip_skip to the positive prompt only, this module applies it to both).
    Valid range: 1 .. the smaller number of hidden layers of the two encoders.

Empty negative prompt
    ``zero_empty_negative=True`` returns all-zero negative embeddings when the negative prompt is empty or only
    whitespace (diffusers' ``force_zeros_for_empty_prompt``); ``False`` encodes the empty string (A1111).

Textual-inversion / PTI tokens added at runtime (e.g. Replicate's ``<s0>``) tokenise as single tokens because the
tokenizers are read from the pipeline (``pipe.tokenizer``, ``pipe.tokenizer_2``) on every call; nothing is cached.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_BRACKET_DEPTH",
    "MAX_CHUNKS",
    "MAX_PROMPT_CHARS",
    "PromptEmbeds",
    "PromptError",
    "TokenChunk",
    "check_prompt_length",
    "encode_prompts",
    "find_extra_network_tag",
    "parse_prompt_attention",
    "token_spans",
]

CHUNK_TOKENS = 75  # text tokens per chunk; + BOS + EOS = 77, CLIP's context length
CONTEXT_LENGTH = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20  # A1111's default opts.comma_padding_backtrack
MAX_CHUNKS = 16  # 1200 text tokens per prompt
# Characters per prompt. 1200 tokens (MAX_CHUNKS) of even heavily weighted Danbooru text, "(long hair:1.2), " at
# about 8 characters a token, is under 10 000 characters, so no prompt that could be encoded is refused; and the
# bound keeps the work of every parser below (all linear) and the A1111 metadata of the outputs small.
MAX_PROMPT_CHARS = 10_000
# Brackets open at once. A1111 has no limit, but 1.1**100 is already a weight of 13 780 (garbage), and the
# depth bounds how often a fragment's weight is multiplied: parsing stays O(length x depth), never quadratic.
MAX_BRACKET_DEPTH = 100
# What the parser itself accepts: room beyond MAX_PROMPT_CHARS (which predict.py checks on the user's text) for
# quality tags and LoRA trigger words expanded into PTI tokens (TOK -> <s0><s1>).
MAX_PARSE_CHARS = 4 * MAX_PROMPT_CHARS
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1


class PromptError(ValueError):
    """A prompt (or a prompt-encoding argument) that cannot be encoded. ``input_name`` names the input."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}")


# ----------------------------------------------------------------------------------------------------------- parsing

# Tokens of A1111's attention syntax, in priority order: escapes, a lone backslash, open brackets, ":number)" (an
# explicit weight closing a round bracket), close brackets, runs of ordinary text, and a ':' that is just text.
_ATTENTION_RE = re.compile(
    r"""
    \\[()\[\]\\]            # escaped bracket or backslash
  | \\                      # a lone backslash (dropped, as in A1111)
  | [(\[]                   # open bracket
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # explicit weight
  | [)\]]                   # close bracket
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight
    """,
    re.VERBOSE,
)
# A word-bounded BREAK; the whitespace around it is stripped by _split_breaks in Python. (The regex
# "\s*\bBREAK\b\s*" that split it before re-scans a whitespace run from every one of its positions: quadratic,
# 16 s for 16 000 spaces.) A fixed word between two \b checks is found in linear time.
_BREAK_RE = re.compile(r"\bBREAK\b")
# The opening of an A1111 extra-network tag <lora:name:weight>; the closing ">" is looked for with str.find, once
# (the regex "<lora:[^>]*>" scans to the end of the text from every "<lora:" when there is no ">": quadratic).
_EXTRA_NETWORK_OPEN_RE = re.compile(r"<(?:lora|lyco|hypernet):", re.IGNORECASE)


def check_prompt_length(text: str, input_name: str, limit: int = MAX_PROMPT_CHARS) -> None:
    """Refuse a prompt over `limit` characters, before any parsing or tokenising."""
    if isinstance(text, str) and len(text) > limit:
        raise PromptError(input_name, f"too long: expected at most {limit:,} characters, got {len(text):,} (at "
                          f"most {MAX_CHUNKS * CHUNK_TOKENS} tokens are encoded)")


def find_extra_network_tag(text: str) -> str | None:
    """The first A1111 extra-network tag (``<lora:name:0.8>``, ``<lyco:...>``, ``<hypernet:...>``) in the text, or
    None; the same match as ``re.search(r"<(?:lora|lyco|hypernet):[^>]*>", text, re.I)``, in linear time."""
    opening = _EXTRA_NETWORK_OPEN_RE.search(text)
    if opening is None:
        return None
    end = text.find(">", opening.end())
    # No ">" after the first opening means none after any later one either: no tag at all.
    return None if end < 0 else text[opening.start() : end + 1]


def _split_breaks(piece: str) -> list[str]:
    """``re.split(r"\s*\bBREAK\b\s*", piece)`` in linear time: the parts around each BREAK, whitespace at the
    BREAK side stripped (str.strip's whitespace is re's \s for str patterns)."""
    parts = _BREAK_RE.split(piece)
    if len(parts) == 1:
        return parts
    return [
        part.lstrip() if i == len(parts) - 1 else (part.rstrip() if i == 0 else part.strip())
        for i, part in enumerate(parts)
    ]


@dataclass
class _Fragment:
    text: str
    weight: float
    is_break: bool = False


def _parse(text: str, input_name: str) -> list[_Fragment]:
    if not isinstance(text, str):
        raise PromptError(input_name, f"must be a string, got {type(text).__name__}")
    check_prompt_length(text, input_name, MAX_PARSE_CHARS)
    res: list[_Fragment] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        # Only fragments added while this bracket was open: with at most MAX_BRACKET_DEPTH brackets open, a
        # fragment is multiplied at most that many times, so the whole parse is linear in the text.
        for frag in res[start:]:
            if not frag.is_break:  # A1111 would scale the BREAK marker too and then encode "BREAK" as text
                frag.weight *= multiplier

    for m in _ATTENTION_RE.finditer(text):
        piece, weight = m.group(0), m.group("weight")
        if piece.startswith("\\"):
            res.append(_Fragment(piece[1:], 1.0))
        elif piece in ("(", "["):
            if len(round_open) + len(square_open) >= MAX_BRACKET_DEPTH:
                raise PromptError(input_name, f"brackets nested too deep: expected at most {MAX_BRACKET_DEPTH} "
                                  f"open brackets at once, got more at character {m.start()}")
            (round_open if piece == "(" else square_open).append(len(res))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:  # e.g. "(a:1.2.3)" or "(a:.)": A1111 crashes; say what is wrong instead
                raise PromptError(input_name, f"attention weight {weight!r} in {piece!r} is not a number") from None
            multiply_from(round_open.pop(), value)
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # text, a stray ':' / ')' / ']' or ':number)' without an open '(': all literal text
            for i, part in enumerate(_split_breaks(piece)):
                if i > 0:
                    res.append(_Fragment("BREAK", -1.0, is_break=True))
                res.append(_Fragment(part, 1.0))

    # Unbalanced brackets close at the end of the text (outermost first, then square brackets, as A1111 does).
    for pos in round_open:
        multiply_from(pos, ROUND_MULTIPLIER)
    for pos in square_open:
        multiply_from(pos, SQUARE_MULTIPLIER)

    # A weight of 400 digits, or nested weights whose product overflows, is infinite (or NaN): the embeddings would
    # be NaN and the image silently black.
    for frag in res:
        if not math.isfinite(frag.weight):
            raise PromptError(input_name, f"the attention weight of {frag.text.strip()[:40]!r} is too large (it "
                              "overflows to infinity); expected weights like (word:1.5)")

    if not res:
        res = [_Fragment("", 1.0)]

    # Adjacent fragments of equal weight merge; texts are joined once per run (not "+=" per fragment, which copies
    # the growing text again for each of thousands of one-character fragments).
    merged: list[_Fragment] = []
    texts: list[list[str]] = []
    for frag in res:
        last = merged[-1] if merged else None
        if last is not None and not frag.is_break and not last.is_break and frag.weight == last.weight:
            texts[-1].append(frag.text)
        else:
            merged.append(frag)
            texts.append([frag.text])
    for frag, parts in zip(merged, texts):
        frag.text = "".join(parts)
    return merged


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split A1111 prompt text into ``(text, weight)`` fragments; a ``BREAK`` is returned as ``("BREAK", -1.0)``.

    >>> parse_prompt_attention("a (cat:1.5) [hat] hatsune miku \\\\(vocaloid\\\\)")
    [('a ', 1.0), ('cat', 1.5), (' ', 1.0), ('hat', 0.9090909090909091), (' hatsune miku (vocaloid)', 1.0)]

    Deviation from A1111: a ``BREAK`` inside brackets still breaks (A1111 scales its marker with the brackets and
    then encodes the word "BREAK" with a negative weight). A malformed explicit weight such as ``(a:1.2.3)``
    raises :class:`PromptError` (A1111 crashes with a bare ValueError).
    """
    return [(f.text, f.weight) for f in _parse(text, "text")]


# ---------------------------------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class TokenChunk:
    """One 77-token chunk: ``[BOS] tokens [EOS] pad...`` and the weight of each position (1.0 for BOS/EOS/pad)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    length: int  # number of text tokens (without BOS/EOS/pad)

    @property
    def text_ids(self) -> tuple[int, ...]:
        return self.ids[1 : 1 + self.length]

    @property
    def text_weights(self) -> tuple[float, ...]:
        return self.weights[1 : 1 + self.length]


def _special_ids(tokenizer) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if bos is None or eos is None:
        raise TypeError(f"{type(tokenizer).__name__} has no BOS/EOS token; a CLIP tokenizer is required")
    return bos, eos, pad


def _comma_id(tokenizer) -> int | None:
    ids = tokenizer(",", add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _has_multi_vector_tokens(tokenizer) -> bool:
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    return any(f"{token}_1" in added for token in added)


def _chunk(tokenizer, fragments: list[_Fragment], input_name: str, pipe: Any = None) -> list[TokenChunk]:
    """A1111's ``tokenize_line``: fragments -> chunks of 75 tokens with comma backtracking, wrapped to 77.

    With ``pipe``, multi-vector textual-inversion tokens are expanded by ``pipe.maybe_convert_prompt`` (per fragment),
    as stock diffusers' ``encode_prompt`` does."""
    bos, eos, pad = _special_ids(tokenizer)
    comma = _comma_id(tokenizer)
    texts = [f.text for f in fragments if not f.is_break]
    if pipe is not None and hasattr(pipe, "maybe_convert_prompt") and _has_multi_vector_tokens(tokenizer):
        texts = [pipe.maybe_convert_prompt(t, tokenizer) if t else t for t in texts]
    tokenized = iter(tokenizer(texts, add_special_tokens=False, verbose=False).input_ids if texts else [])

    chunks: list[TokenChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        n = len(tokens)
        fill = CHUNK_TOKENS - n
        chunks.append(
            TokenChunk(
                ids=tuple([bos, *tokens, eos] + [pad] * fill),
                weights=tuple([1.0, *weights, 1.0] + [1.0] * fill),
                length=n,
            )
        )
        if len(chunks) > MAX_CHUNKS:
            raise PromptError(
                input_name,
                f"too long: more than {MAX_CHUNKS} chunks of {CHUNK_TOKENS} tokens "
                f"({MAX_CHUNKS * CHUNK_TOKENS} tokens, counting BREAKs and comma padding)",
            )
        tokens, weights, last_comma = [], [], -1

    for frag in fragments:
        if frag.is_break:
            close_chunk()
            continue
        for token in next(tokenized):
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_TOKENS:
                close_chunk()
            tokens.append(token)
            weights.append(frag.weight)

    if tokens or not chunks:
        close_chunk()
    return chunks


def token_spans(pipe_or_tokenizer: Any, text: str, *, input_name: str = "text") -> list[TokenChunk]:
    """The 77-token chunks (token ids and per-token weights) that :func:`encode_prompts` would encode for ``text``.

    ``pipe_or_tokenizer`` is a CLIP tokenizer, or an SDXL pipeline (then ``pipe.tokenizer``, CLIP-L, is used; pass
    ``pipe.tokenizer_2`` for CLIP-G). Raises :class:`PromptError` naming ``input_name`` for unparsable or too long
    text.
    """
    if hasattr(pipe_or_tokenizer, "text_encoder_2"):  # an SDXL pipeline
        pipe = pipe_or_tokenizer
        tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
    else:
        pipe, tokenizer = None, pipe_or_tokenizer
    return _chunk(tokenizer, _parse(text, input_name), input_name, pipe)


# -------------------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class PromptEmbeds:
    prompt_embeds: torch.Tensor  # (num_images_per_prompt, 77*chunks, 2048)
    pooled_prompt_embeds: torch.Tensor  # (num_images_per_prompt, 1280)
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor
    chunks: int  # how many 77-token chunks (the same for positive and negative)

    def as_pipeline_kwargs(self) -> dict:
        """The four embedding kwargs. They already have batch ``num_images_per_prompt``: call the pipeline with its
        default ``num_images_per_prompt=1`` (a larger value would multiply the batch again)."""
        return {
            "prompt_embeds": self.prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds,
        }


def _encoder_device(module) -> torch.device:
    try:  # honours accelerate offload hooks, as diffusers' encode_prompt does
        from diffusers.utils.torch_utils import get_module_execution_device

        return get_module_execution_device(module)
    except ImportError:  # pragma: no cover - older diffusers
        return next(module.parameters()).device


def _check_clip_skip(clip_skip: Any, encoders: list) -> None:
    layers = min(te.config.num_hidden_layers for te in encoders)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
        raise PromptError(
            "clip_skip",
            f"must be an integer from 1 (last layer) to {layers} (the text encoders' layer count), got {clip_skip!r}",
        )


def _apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis for one chunk of one encoder: scale tokens, then restore the chunk's mean."""
    if bool((weights == 1.0).all()):
        return z  # bitwise no-op, so plain prompts match stock diffusers exactly
    z32 = z.float()
    original_mean = z32.mean()
    z32 = z32 * weights.to(z32.device, torch.float32)[:, None]
    new_mean = z32.mean()
    if new_mean != 0:
        z32 = z32 * (original_mean / new_mean)
    return z32.to(z.dtype)


def _encode_chunks(
    text_encoder, chunks: list[TokenChunk], clip_skip: int, want_pooled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode the chunks of one prompt with one encoder -> ((1, 77*k, d), pooled of chunk 0 or None)."""
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=_encoder_device(text_encoder))
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]  # (k, 77, d)
    pieces = [_apply_emphasis(hidden[i], torch.tensor(c.weights)) for i, c in enumerate(chunks)]
    pooled = None
    if want_pooled:
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out[0]
        if pooled.ndim != 2:
            raise TypeError("text_encoder_2 must return a projected pooled embedding (CLIPTextModelWithProjection)")
        pooled = pooled[:1]
    return torch.cat(pieces, dim=0).unsqueeze(0), pooled


def _pad_chunks(chunks: list[TokenChunk], count: int, empty: TokenChunk) -> list[TokenChunk]:
    return chunks + [empty] * (count - len(chunks))


def encode_prompts(
    pipe: Any,
    prompt: str,
    negative_prompt: str | None = "",
    *,
    clip_skip: int = 2,
    num_images_per_prompt: int = 1,
    zero_empty_negative: bool = False,
    device: torch.device | str | None = None,
) -> PromptEmbeds:
    """Encode an A1111-syntax prompt and negative prompt for a diffusers SDXL pipeline (see the module docstring).

    Uses ``pipe.tokenizer``, ``pipe.tokenizer_2``, ``pipe.text_encoder`` and ``pipe.text_encoder_2`` as they are at
    call time (``pipe.text_encoder`` may be None, as for the SDXL refiner). ``negative_prompt=None`` means "".
    Returns tensors on ``device`` (default: text_encoder_2's execution device) in text_encoder_2's dtype, each with
    batch ``num_images_per_prompt``. LoRA tags such as ``<lora:name:0.8>`` must be removed by the caller.
    Raises :class:`PromptError` naming ``prompt``, ``negative_prompt`` or ``clip_skip``.
    """
    if negative_prompt is None:
        negative_prompt = ""
    if (
        isinstance(num_images_per_prompt, bool)
        or not isinstance(num_images_per_prompt, int)
        or num_images_per_prompt < 1
    ):
        raise PromptError("num_images_per_prompt", f"must be a positive integer, got {num_images_per_prompt!r}")
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    pairs = [(tok, te) for tok, te in pairs if te is not None]
    if not pairs or pipe.text_encoder_2 is None:
        raise TypeError("encode_prompts needs an SDXL pipeline with text_encoder_2")
    _check_clip_skip(clip_skip, [te for _, te in pairs])

    parsed = {name: _parse(text, name) for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt))}
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        tag = find_extra_network_tag(text)
        if tag is not None:
            logger.warning(
                "%s contains an extra-network tag (%s) that will be encoded as text; strip LoRA tags before encoding",
                name,
                tag[:80],
            )
    zero_negative = zero_empty_negative and not negative_prompt.strip()

    # Chunk per tokenizer (tokens added at runtime to only one of them may give different lengths), then pad every
    # sequence -- both prompts, both encoders -- to the same number of chunks with chunks of the empty prompt.
    chunked = []  # per encoder: {"prompt": [...], "negative_prompt": [...]}
    for tok, _ in pairs:
        chunked.append({name: _chunk(tok, frags, name, pipe) for name, frags in parsed.items()})
    count = max(
        len(c)
        for per_encoder in chunked
        for name, c in per_encoder.items()
        if not (zero_negative and name == "negative_prompt")
    )

    target_device = torch.device(device) if device is not None else _encoder_device(pipe.text_encoder_2)
    dtype = pipe.text_encoder_2.dtype
    embeds: dict[str, list[torch.Tensor]] = {"prompt": [], "negative_prompt": []}
    pooled: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for (tok, te), per_encoder in zip(pairs, chunked):
            empty = _chunk(tok, [_Fragment("", 1.0)], "prompt")[0]
            for name in ("prompt", "negative_prompt"):
                if name == "negative_prompt" and zero_negative:
                    continue
                z, p = _encode_chunks(
                    te, _pad_chunks(per_encoder[name], count, empty), clip_skip, want_pooled=te is pipe.text_encoder_2
                )
                embeds[name].append(z)
                if p is not None:
                    pooled[name] = p

    prompt_embeds = torch.cat(embeds["prompt"], dim=-1).to(dtype=dtype, device=target_device)
    pooled_prompt = pooled["prompt"].to(dtype=dtype, device=target_device)
    if zero_negative:
        negative_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled = torch.zeros_like(pooled_prompt)
    else:
        negative_embeds = torch.cat(embeds["negative_prompt"], dim=-1).to(dtype=dtype, device=target_device)
        negative_pooled = pooled["negative_prompt"].to(dtype=dtype, device=target_device)

    # Finite but huge weights (say (word:10000000000000000000000000000000000000)) overflow the weighted hidden
    # states in float32 or the pipeline's dtype; NaN or inf conditioning would give a black image without a word.
    for name, tensor in (("prompt", prompt_embeds), ("negative_prompt", negative_embeds)):
        if not bool(torch.isfinite(tensor).all()):
            raise PromptError(name, f"the attention weights are too large: the weighted text embeddings overflow "
                              f"{str(dtype).replace('torch.', '')}; expected weights like (word:1.5)")
    n = num_images_per_prompt

    def repeat(x: torch.Tensor) -> torch.Tensor:  # exactly as diffusers' encode_prompt duplicates per prompt
        if x.ndim == 3:
            return x.repeat(1, n, 1).view(x.shape[0] * n, x.shape[1], -1)
        return x.repeat(1, n).view(x.shape[0] * n, -1)

    return PromptEmbeds(
        prompt_embeds=repeat(prompt_embeds),
        pooled_prompt_embeds=repeat(pooled_prompt),
        negative_prompt_embeds=repeat(negative_embeds),
        negative_pooled_prompt_embeds=repeat(negative_pooled),
        chunks=count,
    )
