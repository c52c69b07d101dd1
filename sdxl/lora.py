"""Apply LoRA files to a live SDXL pipeline by exact, in-place weight merging.

weights.py delivers verified files; this module turns them into weights. The design answers the ways LoRA
support usually goes wrong:

* Every LoRA is merged into the live weights (no PEFT adapter layers), so a denoising step costs the same with
  LoRAs as without.
* The untouched base weight of every layer a LoRA touches is kept (once, on the module's device); the live
  weight is always recomputed as ``W0 + sum_i scale_i * delta_i`` and written with ``copy_`` into the same
  storage. Nothing is ever subtracted, so there is no drift, and restoring a layer is a bitwise copy.
* Each scale is applied exactly once: the delta of a layer at strength 1 is computed from the file, then
  multiplied by the user's scale and nothing else.
* All parsing and validation happens before the first weight changes; a "loading" flag is set while weights
  change, so a failure or cancellation mid-way forces a full restore on the next call.
* Parsed files stay in a bounded in-memory cache (keyed by weights.py's canonical key), so repeating a LoRA or
  changing only its scale costs no parse, only the merge arithmetic.

Formats (naming styles): kohya / A1111 (``lora_unet_*`` with SGM or diffusers block names, ``lora_te1_*``,
``lora_te2_*``), diffusers / PEFT (``unet.``, ``text_encoder.``, ``text_encoder_2.`` with ``lora_A``/``lora_B``
or ``lora.down``/``lora.up``), and the old attention-processor style of Replicate's SDXL trainer
(``...attn1.processor.to_q_lora.down.weight``). Algorithms: LoRA, LoCon (conv), LoCon-Tucker (``lora_mid``),
DoRA (``dora_scale`` / ``lora_magnitude_vector``, on top of any algorithm), LyCORIS LoHa and LoKr, and full
weight differences (``diff``). Anything else raises a clear ``LoraError``: other bases (SD1.x/SD2.x, Flux, SD3),
full checkpoints, OFT/BOFT/GLoRA/(IA)^3, kohya ``bundle_emb.*``, keys matching no layer, shape mismatches.
OneTrainer's ``lora_te2_text_projection*`` is merged into text_encoder_2's projection like any layer.

Replicate trainer outputs: ``embeddings.pti`` rows are appended to both token-embedding matrices and the tokens
(``<s0>``, ``<s1>``, ...) added to copies of both tokenizers, which replace ``pipe.tokenizer``/``pipe.tokenizer_2``
while active (so read the tokenizers from the pipeline at call time); ``expand_prompt`` turns ``TOK`` into them.
``reset()``/``apply([])`` put back the very same tokenizer objects and embedding parameters.

Usage (one merger per base model)::

    merger = LoraMerger(pipe)
    report = merger.apply([LoraRequest(key, path, 0.8, "lora_weights (hf:owner/repo)")])  # logs one line per LoRA
    prompt = merger.expand_prompt(prompt)
    merger.apply([])  # bitwise base again
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

SCALE_MIN, SCALE_MAX = -1.0, 3.0  # the user-facing range of lora_scale / extra_lora_scale (predict.py enforces it)
COMPONENTS = ("unet", "te1", "te2")
_PIPE_ATTR = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}

# Parsed files are shared by all mergers (both base models read the same file); bounded by count and bytes.
PARSE_CACHE_MAX_ENTRIES = 8
PARSE_CACHE_MAX_BYTES = 3 * 1024**3
# Per merger, resolved LoRAs hold their factors on the model's device; a few cover lora + extra_lora swaps.
RESOLVED_CACHE_MAX_ENTRIES = 4
RESOLVED_CACHE_MAX_BYTES = 2 * 1024**3


# --------------------------------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA to apply, as delivered by weights.py."""

    key: str  # canonical id from weights.py (cache key; never a raw URL)
    path: Path  # verified .safetensors on disk
    scale: float
    name: str  # safe display name for errors/logs (e.g. "lora_weights (hf:owner/repo)")
    embeddings_path: Path | None = None  # embeddings.pti (Replicate SDXL trainer)
    token_map: Mapping[str, str] = field(default_factory=dict)  # special_params.json, e.g. {"TOK": "<s0><s1>"}


class LoraError(Exception):
    """A LoRA could not be applied; the message names the LoRA and what was found."""


class IncompatibleLoraError(LoraError):
    """The LoRA was made for another base model (SD1.x, SD2, Flux, SD3, ...) or its shapes don't fit."""


class UnsupportedLoraError(LoraError):
    """The file uses an algorithm or feature this module does not merge (OFT, GLoRA, (IA)^3, ...)."""


class EmptyLoraError(LoraError):
    """The file holds no LoRA tensors at all."""


class UnmatchedLoraKeysError(LoraError):
    """Some keys of the file match no layer of the model (never silently skipped)."""


@dataclass(frozen=True)
class LoraStat:
    """What one LoRA did: layers touched per component and the time it took (parse+resolve+merge share)."""

    name: str
    key: str
    format: str  # naming style: kohya | diffusers | replicate-attn-procs
    algorithms: tuple[str, ...]  # e.g. ("lora", "locon", "dora")
    scale: float
    layers: Mapping[str, int]  # component (unet / te1 / te2) -> layers touched
    pti_tokens: tuple[str, ...]
    cached: bool  # the parse came from the cache
    seconds: float

    def line(self) -> str:
        counts = " ".join(f"{c}={self.layers.get(c, 0)}" for c in COMPONENTS)
        tokens = f" pti={''.join(self.pti_tokens)}" if self.pti_tokens else ""
        return (
            f"LoRA {self.name}: format={self.format} algorithms={','.join(self.algorithms)} scale={self.scale:g} "
            f"layers {counts}{tokens} ({self.seconds * 1000:.1f} ms{', cached parse' if self.cached else ''})"
        )


@dataclass(frozen=True)
class ApplyReport:
    """Result of LoraMerger.apply: one LoraStat per request, the layers rewritten and the total time."""

    loras: tuple[LoraStat, ...]
    changed: bool  # False when the request equalled the live state (no work done)
    layers_written: int
    seconds: float

    def by_name(self) -> dict[str, LoraStat]:
        return {s.name: s for s in self.loras}


# --------------------------------------------------------------------------------------------------- parsing

# Key suffix -> role. Longest suffix wins, so ".lora_down.weight" is never mistaken for a bare ".weight".
_ROLE_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t1": "lokr_t1",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",
    # Roles of algorithms that are recognised only to be rejected with their name.
    ".oft_blocks": "oft",
    ".oft_diag": "oft",
    ".oft_R.weight": "oft",
    ".boft_R": "boft",
    ".a1.weight": "glora",
    ".a2.weight": "glora",
    ".b1.weight": "glora",
    ".b2.weight": "glora",
    ".on_input": "ia3",
    ".diff_b": "diff_b",
    ".w_norm": "norm",
    ".b_norm": "norm",
    ".weight": "bare_weight",
    ".bias": "bare_bias",
}
_SUFFIXES_LONGEST_FIRST = sorted(_ROLE_SUFFIXES, key=len, reverse=True)

# Roles that name an algorithm we refuse, with the name users know it by.
_UNSUPPORTED_ROLES: dict[str, str] = {
    "oft": "OFT (oft_blocks/oft_diag)",
    "boft": "BOFT",
    "glora": "GLoRA (a1/a2/b1/b2)",
    "ia3": "(IA)^3",
    "diff_b": "full bias difference (diff_b)",
    "norm": "LyCORIS norm-layer training (w_norm/b_norm)",
    "bare_weight": "(IA)^3 or full weights (bare .weight tensors)",
    "bare_bias": "bias tensors (.bias)",
    "lokr_t1": "LoKr with Tucker on w1 (lokr_t1)",
}

# The old attention-processor style (Replicate's SDXL trainer, diffusers < 0.21):
# "...attn1.processor.to_q_lora.down.weight" targets "...attn1.to_q".
_ATTN_PROC_RE = re.compile(r"\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")

# Substrings of keys that betray another base model or a full checkpoint, with what to tell the user.
_FOREIGN_MARKERS: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda k: k.startswith("lora_te_"), "an SD1.x/SD2.x LoRA (single text encoder prefix 'lora_te_')"),
    (lambda k: "double_blocks" in k or "single_blocks" in k, "a Flux LoRA (double_blocks/single_blocks)"),
    (lambda k: "single_transformer_blocks" in k, "a Flux LoRA (single_transformer_blocks)"),
    (lambda k: "joint_blocks" in k or "context_block" in k, "an SD3 LoRA (joint_blocks/context_block)"),
    (lambda k: k.startswith("transformer."), "a DiT (Flux/SD3) LoRA (transformer.*)"),
    (lambda k: k.startswith("model.diffusion_model."), "a full model checkpoint (model.diffusion_model.*)"),
    (lambda k: k.startswith("first_stage_model."), "a full model checkpoint (first_stage_model.*, a VAE)"),
    (lambda k: k.startswith("conditioner.embedders"), "a full SDXL checkpoint (conditioner.embedders.*)"),
    (lambda k: k.startswith("cond_stage_model."), "a full SD1.x/SD2 checkpoint (cond_stage_model.*)"),
)

# Keys that are harmless extras: dropped with a debug log.
# (text_encoder_2's text_projection is a real layer - it shapes the pooled embedding - so OneTrainer's
# lora_te2_text_projection is merged like any other layer, never dropped.)
_IGNORED_KEY_RES: tuple[re.Pattern[str], ...] = ()

# Cross-attention input width of LoRAs for other bases (used when the shape does not fit the live model).
_CROSS_ATTN_DIMS = {768: "SD1.x", 1024: "SD2.x", 4096: "a T5-conditioned model (Flux/SD3)"}


@dataclass(frozen=True)
class LayerSpec:
    """The factors of one layer's delta, exactly as found in the file (any dtype, any device)."""

    algo: str  # lora | loha | lokr | full
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None  # None: alpha = rank (scale 1)
    magnitude: torch.Tensor | None = None  # DoRA magnitude
    magnitude_style: str = ""  # "lycoris" (dora_scale) or "peft" (lora_magnitude_vector, one per output)
    rslora: bool = False  # PEFT use_rslora: alpha / sqrt(rank)
    # The file stored the LoRA factors in float16 or bfloat16: they are exact in TF32, so the batched merge may
    # multiply them on tensor cores (products exact, float32 sums) after they were widened to float32.
    half_factors: bool = False

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LayerSpec:
        tensors = {k: v.to(device, dtype) for k, v in self.tensors.items()}
        mag = self.magnitude.to(device, dtype) if self.magnitude is not None else None
        return replace(self, tensors=tensors, magnitude=mag)

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return total + (self.magnitude.numel() * self.magnitude.element_size() if self.magnitude is not None else 0)


@dataclass(frozen=True)
class ParsedLora:
    """A file split into per-layer specs, keyed by the layer prefix as written in the file."""

    style: str  # kohya | diffusers | replicate-attn-procs
    layers: Mapping[str, LayerSpec]
    metadata: Mapping[str, str]
    nbytes: int
    ignored: tuple[str, ...]
    serial: int = 0  # distinct per parse, so a file re-parsed under the same key is never taken as unchanged


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _alpha_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """alpha / rank (kohya, PEFT), alpha / sqrt(rank) with rsLoRA; no alpha means alpha = rank."""
    if alpha is None:
        return 1.0
    return alpha / (math.sqrt(rank) if rslora else rank)


def _delta_lora(spec: LayerSpec, shape: torch.Size) -> torch.Tensor:
    """up @ down * alpha/rank; conv (LoCon) flattens to matrices; lora_mid is the Tucker core of LoCon."""
    up, down = _f32(spec.tensors["up"]), _f32(spec.tensors["down"])
    rank = down.shape[0]
    mid = spec.tensors.get("mid")
    if mid is not None:
        # down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
        delta = torch.einsum("or,rskl,si->oikl", up.flatten(1), _f32(mid), down.flatten(1))
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return delta * _alpha_scale(spec.alpha, rank, spec.rslora)


def _delta_loha(spec: LayerSpec, shape: torch.Size) -> torch.Tensor:
    """(w1a @ w1b) * (w2a @ w2b) (Hadamard product) * alpha/rank; optional Tucker cores t1/t2 for convs."""
    t = {k: _f32(v) for k, v in spec.tensors.items()}
    rank = t["hada_w1_b"].shape[0]

    def side(a: str, b: str, core: str) -> torch.Tensor:
        if core in t:  # Tucker: a is (r, out), b is (r, in), core (r, r, kh, kw)
            return torch.einsum("abkl,ao,bi->oikl", t[core], t[a], t[b])
        return t[a] @ t[b]

    w1 = side("hada_w1_a", "hada_w1_b", "hada_t1")
    w2 = side("hada_w2_a", "hada_w2_b", "hada_t2")
    return w1 * w2 * _alpha_scale(spec.alpha, rank)


def _delta_lokr(spec: LayerSpec, shape: torch.Size) -> torch.Tensor:
    """kron(W1, W2) * scale; scale = alpha/rank only when a side is factorised (a @ b), else 1."""
    t = {k: _f32(v) for k, v in spec.tensors.items()}
    rank = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
        rank = t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:  # Tucker: a is (r, out2), b is (r, in2), core (r, r, kh, kw)
        w2 = torch.einsum("abkl,ao,bi->oikl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        rank = t["lokr_w2_b"].shape[0]
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        rank = t["lokr_w2_b"].shape[0]
    if len(shape) == 4:
        # Conv: kron over (out, in) with the kernel carried by W2, so W1 becomes (o1, i1, 1, 1).
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        w1 = w1.reshape(w1.shape[0], w1.shape[1], 1, 1)
    scale = _alpha_scale(spec.alpha, rank) if rank is not None else 1.0
    return torch.kron(w1, w2) * scale


def _delta_full(spec: LayerSpec, shape: torch.Size) -> torch.Tensor:
    """A full weight difference (LyCORIS 'full' / kohya 'diff')."""
    return _f32(spec.tensors["diff"])


# Algorithm table: name -> (roles that identify it, all roles it may use, delta function).
_ALGORITHMS: dict[str, tuple[tuple[frozenset[str], ...], frozenset[str], Callable[[LayerSpec, torch.Size], torch.Tensor]]] = {
    "lora": ((frozenset({"down", "up"}),), frozenset({"down", "up", "mid"}), _delta_lora),
    "loha": (
        (frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),),
        frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
        _delta_loha,
    ),
    "lokr": (
        tuple(
            frozenset(a | b)
            for a in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
            for b in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})
        ),
        frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
        _delta_lokr,
    ),
    "full": ((frozenset({"diff"}),), frozenset({"diff"}), _delta_full),
}
_META_ROLES = frozenset({"alpha", "dora_scale", "magnitude"})


def split_key(key: str) -> tuple[str, str] | None:
    """(layer prefix, role) of a tensor key, or None when no known suffix ends it."""
    m = _ATTN_PROC_RE.search(key)
    if m:
        target = m.group(1) + (".0" if m.group(1) == "to_out" else "")
        return key[: m.start()] + "." + target, m.group(2)
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix):
            return key[: -len(suffix)], _ROLE_SUFFIXES[suffix]
    return None


def detect_foreign_base(keys: Iterable[str]) -> tuple[str, str] | None:
    """(what the file is, an example key) when the keys belong to another base model or a checkpoint."""
    for key in keys:
        for test, what in _FOREIGN_MARKERS:
            if test(key):
                return what, key
    return None


def detect_style(keys: Iterable[str]) -> str:
    """Naming style for the log: kohya (lora_unet_/lora_te1_/lora_te2_), replicate-attn-procs, or diffusers."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(_ATTN_PROC_RE.search(k) for k in keys):
        return "replicate-attn-procs"
    return "diffusers"


# ------------------------------------------------------------------------------------------- PEFT metadata
#
# PEFT's LoraConfig.alpha_pattern / rank_pattern map a pattern to a value. PEFT (get_pattern_key in
# peft/utils/other.py; older releases used re.match(rf".*\.{key}$")) takes the first key, in the mapping's order,
# for which re.match(rf"(.*\.)?({key})$", module_name) succeeds: the key is a regular expression that must match the whole
# module name or a dot-separated tail of it. Running a key from a downloaded file through Python's backtracking
# engine lets a 1 KB file wedge the process ("(.*.*)*Z"), so keys are parsed here into a form matched in linear
# time instead: each key becomes a few "globs", sequences of fixed-length segments of one-character atoms (a
# literal, ".", a class like [0-9] or \d) separated by ".*"; a glob is matched by finding each segment once, left
# to right (leftmost is optimal for segments joined by ".*"), with compiled quantifier-free regexes, O(name x key).
# Supported: literals, ".", "\."-style escapes, \d \w \s \D \W \S, [...] classes, ".*", ".+", a leading "^", a
# trailing "$", "|" and (non-capturing) groups without quantifiers. Other syntax (quantifiers on anything but ".",
# {m,n}, back-references, look-arounds) is refused with an error naming the LoRA: PEFT and diffusers write plain
# module names (diffusers' get_peft_kwargs) and hand-written configs use these simple forms.

MAX_PATTERN_KEYS = 2048  # diffusers writes one per module whose alpha differs; SDXL LoRAs target under 1 000
MAX_PATTERN_CHARS = 512  # the longest SDXL module name is under 80 characters
MAX_PATTERN_STARS = 8  # ".*" / ".+" in one key
MAX_PATTERN_GLOBS = 16  # alternatives a key may expand to: "(a|b)(c|d)" is 4
# Segments (the pieces between ".*") of all alpha_pattern alternatives that contain ".*": each costs a regex search
# per layer, so this bounds the matching of a whole file (about 1 s for 1 000 layers on one slow core). Keys
# without ".*" (all that diffusers writes) are looked up by length and cost next to nothing.
MAX_STARRED_SEGMENTS = 2048
# The largest |lora_alpha| accepted. kohya and PEFT trainers write alpha = rank or a fraction of it (ranks <= 1024);
# alpha / rank beyond this would be a multiplier of thousands on the delta, which only yields a destroyed image.
ALPHA_MAX_ABS = 1e4
# The largest |value| accepted in a factor, DoRA magnitude or full difference. Trained LoRA factors are below 10
# (weights of SDXL are below 20); 1e30 factors overflow every 16-bit weight and blacken the image.
FACTOR_MAX_ABS = 1e4
_STAR, _ANCHOR, _END = object(), object(), object()  # ".*", "^" and "$" in a parsed pattern


class _PatternSyntaxError(ValueError):
    pass


def _parse_pattern_alternatives(key: str, pos: int, in_group: bool) -> tuple[list[list], int]:
    """Globs (lists of one-character regex atoms and _STAR) for key[pos:] up to ')' (in a group) or the end."""
    current: list[list] = [[]]  # the expansions of the alternative being read

    def extend(options: list[list]) -> None:
        nonlocal current
        current = [a + b for a in current for b in options]
        if len(current) > MAX_PATTERN_GLOBS:
            raise _PatternSyntaxError(f"expands to more than {MAX_PATTERN_GLOBS} alternatives")

    done: list[list] = []
    while pos < len(key):
        c = key[pos]
        if c == ")":
            if not in_group:
                raise _PatternSyntaxError(f"unbalanced ')' at {pos}")
            break
        if c == "|":
            done += current
            current = [[]]
            pos += 1
            continue
        if c == "(":
            inner = pos + 1
            if key.startswith("?:", inner):
                inner += 2
            elif key.startswith("?", inner):
                raise _PatternSyntaxError(f"group extension '(?' at {pos}")
            options, close = _parse_pattern_alternatives(key, inner, in_group=True)
            if close >= len(key):
                raise _PatternSyntaxError(f"missing ')' for the group at {pos}")
            pos = close + 1
            if pos < len(key) and key[pos] in "*+?{":
                raise _PatternSyntaxError(f"quantifier {key[pos]!r} after a group at {pos}")
            extend(options)
            continue
        if c in "^$":  # placed as markers; PeftPattern.parse checks they start / end their alternative
            extend([[_ANCHOR if c == "^" else _END]])
            pos += 1
            continue
        if c in "*+?{}":
            raise _PatternSyntaxError(f"quantifier {c!r} at {pos} (only '.*' and '.+' are supported)")
        if c == ".":
            nxt = key[pos + 1] if pos + 1 < len(key) else ""
            if nxt == "*":
                extend([[_STAR]])
                pos += 2
            elif nxt == "+":
                extend([[".", _STAR]])
                pos += 2
            else:
                extend([["."]])
                pos += 1
            continue
        if c == "\\":
            if pos + 1 >= len(key):
                raise _PatternSyntaxError("trailing backslash")
            e = key[pos + 1]
            if e in "dwsDWS":
                atom = "\\" + e
            elif not e.isalnum() and e != "_":
                atom = re.escape(e)
            else:
                raise _PatternSyntaxError(f"escape '\\{e}' at {pos}")
            extend([[atom]])
            pos += 2
        elif c == "[":
            close = pos + 1
            if key.startswith("^", close):
                close += 1
            if key.startswith("]", close):
                close += 1
            while close < len(key) and key[close] != "]":
                close += 2 if key[close] == "\\" else 1
            if close >= len(key):
                raise _PatternSyntaxError(f"unterminated '[' at {pos}")
            atom = key[pos : close + 1]
            if "[" in atom[1:-1]:
                raise _PatternSyntaxError(f"nested '[' in the class at {pos}")
            try:
                re.compile(atom)  # one character class: cannot backtrack
            except re.error as err:
                raise _PatternSyntaxError(f"bad class {atom!r}: {err}") from None
            extend([[atom]])
            pos = close + 1
        else:
            extend([[re.escape(c)]])
            pos += 1
        if pos < len(key) and key[pos] in "*+?{":
            raise _PatternSyntaxError(f"quantifier {key[pos]!r} at {pos} (only '.*' and '.+' are supported)")
    done += current
    return done, pos


@dataclass(frozen=True)
class _Glob:
    """Fixed-length segments joined by ".*": head, middles, tail (one regex each, no quantifiers)."""

    segments: tuple[tuple[re.Pattern[str], int], ...]  # (regex, length)
    stars: bool

    def fullmatch(self, text: str) -> bool:
        segs = self.segments
        if not self.stars:
            regex, length = segs[0]
            return len(text) == length and regex.fullmatch(text) is not None
        (head, head_len), (tail, tail_len) = segs[0], segs[-1]
        end = len(text) - tail_len
        if end < head_len or head.match(text, 0, head_len) is None or tail.fullmatch(text, end) is None:
            return False
        pos = head_len
        for regex, length in segs[1:-1]:
            found = regex.search(text, pos, end)
            if found is None:
                return False
            pos = found.end()
        return True


def _glob(atoms: list) -> _Glob:
    segments: list[list[str]] = [[]]
    for atom in atoms:
        if atom is _STAR:
            segments.append([])
        else:
            segments[-1].append(atom)
    return _Glob(tuple((re.compile("".join(s)), len(s)) for s in segments), len(segments) > 1)


@dataclass(frozen=True)
class PeftPattern:
    """One alpha_pattern / rank_pattern key, matched as PEFT matches it: the whole module name or a tail after a dot."""

    key: str
    globs: tuple[_Glob, ...]  # every alternative, as a glob (and with PEFT's prefix unless anchored)
    fixed: tuple[tuple[re.Pattern[str], int, bool], ...]  # alternatives without ".*": (regex, length, anchored)
    starred: tuple[_Glob, ...]  # globs of the alternatives with ".*"

    @classmethod
    def parse(cls, key: str) -> PeftPattern:
        if not isinstance(key, str) or not key:
            raise _PatternSyntaxError("empty pattern")
        if len(key) > MAX_PATTERN_CHARS:
            raise _PatternSyntaxError(f"longer than {MAX_PATTERN_CHARS} characters")
        alternatives, _ = _parse_pattern_alternatives(key, 0, in_group=False)
        globs: list[_Glob] = []
        fixed: list[tuple[re.Pattern[str], int, bool]] = []
        starred: list[_Glob] = []
        for atoms in alternatives:
            anchored = bool(atoms) and atoms[0] is _ANCHOR
            atoms = atoms[1:] if anchored else atoms
            while atoms and atoms[-1] is _END:  # PEFT appends "$" itself
                atoms = atoms[:-1]
            if any(a is _ANCHOR or a is _END for a in atoms):
                raise _PatternSyntaxError("'^' only at the start and '$' only at the end of an alternative")
            globs.append(_glob(atoms))
            if not anchored:  # PEFT's "(.*\.)?" prefix: any text ending in a dot
                globs.append(_glob([_STAR, re.escape(".")] + atoms))
            if any(a is _STAR for a in atoms):
                starred += globs[-2 if not anchored else -1 :]
            else:  # one fixed-length alternative: the tail of that length (after a dot, unless anchored)
                fixed.append((re.compile("".join(atoms)), len(atoms), anchored))
        if sum(1 for a in key if a == "*") + key.count(".+") > MAX_PATTERN_STARS:
            raise _PatternSyntaxError(f"more than {MAX_PATTERN_STARS} '.*' / '.+'")
        return cls(key, tuple(globs), tuple(fixed), tuple(starred))

    def matches(self, module_name: str) -> bool:
        return any(g.fullmatch(module_name) for g in self.globs)

    @property
    def starred_segments(self) -> int:
        return sum(len(g.segments) for g in self.starred)


class _AlphaPatterns:
    """An ordered alpha_pattern, answering "the value of the first key that matches this module" quickly: keys
    without ".*" are indexed by the length of the name tail they can match (a tail starts at the name's start or
    after a dot, so a name has few), keys with ".*" are tried in order up to the best index found so far."""

    def __init__(self, entries: Sequence[tuple[PeftPattern, float]]) -> None:
        self.values = [value for _, value in entries]
        self.by_length: dict[int, list[tuple[int, re.Pattern[str], bool]]] = {}
        self.starred: list[tuple[int, tuple[_Glob, ...]]] = []
        for index, (pattern, _) in enumerate(entries):
            for regex, length, anchored in pattern.fixed:
                self.by_length.setdefault(length, []).append((index, regex, anchored))
            if pattern.starred:
                self.starred.append((index, pattern.starred))

    def first(self, module_name: str) -> float | None:
        best = len(self.values)
        starts = [0] + [i + 1 for i, c in enumerate(module_name) if c == "."]
        for start in starts:
            for index, regex, anchored in self.by_length.get(len(module_name) - start, ()):
                if index >= best:
                    break
                if (start == 0 or not anchored) and regex.fullmatch(module_name, start):
                    best = index
                    break
        for index, globs in self.starred:
            if index >= best:
                break
            if any(g.fullmatch(module_name) for g in globs):
                best = index
                break
        return self.values[best] if best < len(self.values) else None


def _metadata_number(value: Any, what: str, name: str, *, integer: bool = False) -> float:
    """A finite, sane number from PEFT metadata (a JSON number, or its text as safetensors metadata stores it)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise LoraError(f"{name}: PEFT metadata {what}: expected a number, got {str(value)[:40]!r}")
    number = float(number)
    if not math.isfinite(number) or abs(number) > ALPHA_MAX_ABS or (integer and (number != int(number) or number < 1)):
        kind = "a positive integer" if integer else f"a finite number of magnitude at most {ALPHA_MAX_ABS:g}"
        raise LoraError(f"{name}: PEFT metadata {what}: expected {kind}, got {str(value)[:40]}")
    return number


def check_peft_metadata(metadata: Mapping[str, str], name: str = "LoRA") -> None:
    """The PEFT alpha metadata checks of a merge, for the download: a file that could never merge is not cached."""
    _peft_alpha_config(metadata, name)


def _peft_alpha_config(metadata: Mapping[str, str], name: str = "LoRA") -> dict[str, Any]:
    """Alpha settings of PEFT/diffusers adapters from safetensors metadata (flat or in lora_adapter_metadata),
    checked: lora_alpha values are finite numbers, alpha_pattern / rank_pattern are mappings of supported patterns
    (PeftPattern) to numbers; anything else is a LoraError naming the LoRA."""
    config: dict[str, Any] = {}
    for k in ("lora_alpha", "r", "use_rslora", "alpha_pattern", "rank_pattern"):
        if k in metadata:
            config[k] = metadata[k]
    packed = metadata.get("lora_adapter_metadata")
    if packed:
        try:
            unpacked = json.loads(packed)
        except (TypeError, ValueError, RecursionError):
            raise LoraError(f"{name}: its lora_adapter_metadata is not readable JSON, so its alphas are unknown") from None
        if not isinstance(unpacked, dict):
            raise LoraError(f"{name}: its lora_adapter_metadata should be a JSON object, got {type(unpacked).__name__}")
        config.update(unpacked)
    for k, v in list(config.items()):  # metadata values are strings
        if isinstance(v, str):
            try:
                config[k] = json.loads(v)
            except (ValueError, RecursionError):
                pass
    checked: dict[str, Any] = {}
    for k, v in config.items():
        field_name = k.rsplit(".", 1)[-1]
        if field_name == "lora_alpha" and v is not None:
            checked[k] = _metadata_number(v, k, name)
        elif field_name in ("alpha_pattern", "rank_pattern") and v:
            if not isinstance(v, dict):
                raise LoraError(f"{name}: PEFT metadata {k}: expected a mapping of module patterns to numbers, "
                                f"got {type(v).__name__}")
            if len(v) > MAX_PATTERN_KEYS:
                raise LoraError(f"{name}: PEFT metadata {k}: {len(v)} patterns, expected at most {MAX_PATTERN_KEYS}")
            entries = []
            for pattern, value in v.items():
                try:
                    compiled = PeftPattern.parse(pattern)
                except _PatternSyntaxError as err:
                    raise LoraError(f"{name}: PEFT metadata {k}: pattern {str(pattern)[:60]!r} is not supported "
                                    f"({err}); expected module names, optionally with '.', '.*', [classes], "
                                    "'^', '$', '|' or groups") from None
                entries.append((compiled, _metadata_number(value, f"{k}[{str(pattern)[:60]!r}]", name,
                                                           integer=field_name == "rank_pattern")))
            if field_name == "alpha_pattern":  # rank_pattern is only checked: ranks come from the tensors' shapes
                segments = sum(p.starred_segments for p, _ in entries)
                if segments > MAX_STARRED_SEGMENTS:
                    raise LoraError(f"{name}: PEFT metadata {k}: its '.*' patterns are too many or too complex "
                                    f"({segments} segments, expected at most {MAX_STARRED_SEGMENTS})")
                checked[k] = _AlphaPatterns(entries)
        else:
            checked[k] = v
    return checked


def _metadata_alpha(config: Mapping[str, Any], prefix: str) -> tuple[float | None, bool]:
    """PEFT alpha for a layer: alpha_pattern, then the component's lora_alpha, then the global one."""
    component = next((c for c in ("text_encoder_2", "text_encoder", "unet") if prefix.startswith(c + ".")), "")
    rel = prefix[len(component) + 1 :] if component else prefix
    rslora = bool(config.get(f"{component}.use_rslora", config.get("use_rslora", False)))
    for pattern_key in (f"{component}.alpha_pattern", "alpha_pattern"):
        patterns = config.get(pattern_key)
        value = patterns.first(rel) if isinstance(patterns, _AlphaPatterns) else None
        if value is not None:
            return value, rslora
    for alpha_key in (f"{component}.lora_alpha", "lora_alpha"):
        if alpha_key in config and config[alpha_key] is not None:
            return config[alpha_key], rslora
    return None, rslora


def _key_summary(keys: Iterable[str], limit: int = 4) -> str:
    """A short description of what a file holds: counts by leading name, for error messages."""
    counts: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        head = "_".join(head.split("_")[:2]) + "_*" if head.startswith("lora_") else head + ".*"
        counts[head] = counts.get(head, 0) + 1
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{n} {h}" for h, n in parts[:limit]) + (", ..." if len(parts) > limit else "")


_PARSE_SERIAL = itertools.count(1)


def _alpha_value(tensor: torch.Tensor, prefix: str, name: str) -> float:
    """A layer's .alpha tensor: one finite number of sane size (kohya writes a 0-d tensor)."""
    if tensor.numel() != 1:
        raise LoraError(f"{name}: layer '{prefix}' alpha should hold one number, got a tensor of shape "
                        f"{list(tensor.shape)}")
    alpha = float(tensor.float().item())
    if not math.isfinite(alpha) or abs(alpha) > ALPHA_MAX_ABS:
        raise LoraError(f"{name}: layer '{prefix}' alpha is {alpha:g}; expected a finite number of magnitude at "
                        f"most {ALPHA_MAX_ABS:g}")
    return alpha


def _check_values(tensor: torch.Tensor, what: str, name: str) -> None:
    """Refuse NaN, infinite or absurdly large values (they give a black or destroyed image, never an error)."""
    if not tensor.is_floating_point():
        raise LoraError(f"{name}: {what} has dtype {str(tensor.dtype).replace('torch.', '')}; expected floating-point "
                        "values")
    if tensor.numel() == 0:
        return
    peak = float(torch.amax(tensor.detach().abs()))  # NaN propagates, inf stays inf
    if math.isnan(peak) or math.isinf(peak):
        raise LoraError(f"{name}: {what} holds {'NaN' if math.isnan(peak) else 'infinite'} values; the file is "
                        "corrupt or was saved from a diverged training")
    if peak > FACTOR_MAX_ABS:
        raise LoraError(f"{name}: {what} holds values up to {peak:.3g}; expected at most {FACTOR_MAX_ABS:g} "
                        "(trained LoRA factors are below 10)")


def parse_lora_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str
) -> ParsedLora:
    """Group a file's tensors into per-layer specs; raise LoraError for foreign bases and unknown algorithms."""
    if not tensors:
        raise EmptyLoraError(f"{name}: the file holds no tensors")
    foreign = detect_foreign_base(tensors)
    if foreign:
        what, example = foreign
        raise IncompatibleLoraError(
            f"{name}: this is {what}, not an SDXL LoRA (e.g. key '{example}'; file holds {_key_summary(tensors)})"
        )
    if any(k.startswith("bundle_emb.") for k in tensors):
        raise UnsupportedLoraError(
            f"{name}: bundled textual-inversion embeddings (bundle_emb.*) are not supported; "
            "use a LoRA without embeddings or a Replicate trainer tar with embeddings.pti"
        )

    ignored: list[str] = []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        if any(p.search(key) for p in _IGNORED_KEY_RES):
            ignored.append(key)
            continue
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        prefix, role = split
        prefix = prefix.removeprefix("base_model.model.")  # raw PEFT save
        groups.setdefault(prefix, {})[role] = tensor
    if ignored:
        logger.debug("%s: ignored %d harmless keys (e.g. %s)", name, len(ignored), ignored[0])
    if unknown:
        raise UnsupportedLoraError(
            f"{name}: {len(unknown)} keys of an unknown kind, e.g. {unknown[:3]} (file holds {_key_summary(tensors)})"
        )

    peft_config = _peft_alpha_config(metadata, name)
    layers: dict[str, LayerSpec] = {}
    for prefix, roles in groups.items():
        bad = sorted({_UNSUPPORTED_ROLES[r] for r in roles if r in _UNSUPPORTED_ROLES})
        if bad:
            raise UnsupportedLoraError(
                f"{name}: unsupported LoRA algorithm {', '.join(bad)} found (e.g. layer '{prefix}', "
                f"tensors {sorted(roles)}); supported: LoRA, LoCon, DoRA, LoHa, LoKr, full diff"
            )
        algo_roles = set(roles) - _META_ROLES
        if not algo_roles:
            logger.debug("%s: layer %s has only %s, ignored", name, prefix, sorted(roles))
            continue
        algo = next(
            (a for a, (ids, allowed, _) in _ALGORITHMS.items() if algo_roles <= allowed and any(i <= algo_roles for i in ids)),
            None,
        )
        if algo is None:
            raise UnsupportedLoraError(
                f"{name}: layer '{prefix}' has an incomplete or mixed set of tensors {sorted(roles)}"
            )
        if "alpha" in roles:
            alpha, rslora = _alpha_value(roles["alpha"], prefix, name), False
        else:
            alpha, rslora = _metadata_alpha(peft_config, prefix)
        for role in sorted(algo_roles | ({"dora_scale", "magnitude"} & set(roles))):
            _check_values(roles[role], f"layer '{prefix}' {role}", name)
        magnitude, style = None, ""
        if "dora_scale" in roles:
            magnitude, style = roles["dora_scale"], "lycoris"
        elif "magnitude" in roles:
            magnitude, style = roles["magnitude"], "peft"
        layers[prefix] = LayerSpec(
            algo=algo,
            tensors={r: roles[r] for r in algo_roles},
            alpha=alpha,
            magnitude=magnitude,
            magnitude_style=style,
            rslora=rslora,
        )
    if not layers:
        raise EmptyLoraError(f"{name}: no LoRA layers found (file holds {_key_summary(tensors)})")
    nbytes = sum(s.nbytes for s in layers.values())
    return ParsedLora(detect_style(tensors), layers, dict(metadata), nbytes, tuple(ignored), next(_PARSE_SERIAL))


def read_safetensors(path: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a .safetensors file (never pickle)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise LoraError(f"{name}: file not found") from None
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise LoraError(f"{name}: not a readable .safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors, metadata


# --------------------------------------------------------------------------------------------------- parse cache


class _ParseCache:
    """LRU of ParsedLora, bounded by entries and bytes, shared by all mergers (thread-safe)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple, ParsedLora] = OrderedDict()
        self._lock = threading.Lock()
        self.parses = 0  # number of files actually read (tests use it to prove cache hits)

    def get(self, req: LoraRequest) -> tuple[ParsedLora, bool]:
        try:
            st = Path(req.path).stat()
        except FileNotFoundError:
            raise LoraError(f"{req.name}: file not found") from None
        cache_key = (req.key, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._items.get(cache_key)
            if hit is not None:
                self._items.move_to_end(cache_key)
                return hit, True
        tensors, metadata = read_safetensors(Path(req.path), req.name)
        parsed = parse_lora_tensors(tensors, metadata, req.name)
        with self._lock:
            self.parses += 1
            self._items[cache_key] = parsed
            while len(self._items) > self.max_entries or (
                len(self._items) > 1 and sum(p.nbytes for p in self._items.values()) > self.max_bytes
            ):
                self._items.popitem(last=False)
        return parsed, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


PARSE_CACHE = _ParseCache(PARSE_CACHE_MAX_ENTRIES, PARSE_CACHE_MAX_BYTES)


# --------------------------------------------------------------------------------------------------- name mapping


def _unet_sgm_name(name: str, layers_per_block: int, up_has_attn: Sequence[bool]) -> str | None:
    """The original SGM/LDM name of a diffusers SDXL UNet module (None for names with no SGM twin)."""
    top = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    if name in top:
        return top[name]
    resnet_parts = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    parts = name.split(".")
    L = layers_per_block

    def inner(kind: str, rest: list[str]) -> str | None:
        if kind == "resnets":
            sub = ".".join(rest)
            return resnet_parts.get(sub)
        return ".".join(rest)  # attentions: same names inside

    if parts[0] == "down_blocks" and len(parts) >= 4:
        b, kind, j = int(parts[1]), parts[2], int(parts[3])
        if kind == "downsamplers":
            if parts[4:] != ["conv"]:
                return None
            return f"input_blocks.{1 + b * (L + 1) + L}.0.op"
        sub = inner(kind, parts[4:])
        if sub is None:
            return None
        return f"input_blocks.{1 + b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{sub}"
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, j = parts[1], int(parts[2])
        sub = inner(kind, parts[3:])
        if sub is None:
            return None
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, j))
        return None if index is None else f"middle_block.{index}.{sub}"
    if parts[0] == "up_blocks" and len(parts) >= 4:
        b, kind, j = int(parts[1]), parts[2], int(parts[3])
        if kind == "upsamplers":
            if parts[4:] != ["conv"]:
                return None
            return f"output_blocks.{b * (L + 1) + L}.{2 if up_has_attn[b] else 1}.conv"
        sub = inner(kind, parts[4:])
        if sub is None:
            return None
        return f"output_blocks.{b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{sub}"
    return None


def _weight_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules a LoRA can target: those with a 2-D (linear) or 4-D (conv) weight."""
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() in (2, 4) and not isinstance(m, torch.nn.Embedding):
            out[n] = m
    return out


def build_unet_lookup(unet: torch.nn.Module) -> dict[str, str]:
    """Every accepted spelling of a UNet layer -> its module name: diffusers dotted, diffusers flattened (kohya
    variant), SGM dotted and SGM flattened (kohya). Built from the live model, so it fits any SDXL-shaped UNet."""
    config = getattr(unet, "config", None)
    L = int(getattr(config, "layers_per_block", 2)) if config is not None else 2
    up_has_attn = [hasattr(b, "attentions") for b in getattr(unet, "up_blocks", [])]
    lookup: dict[str, str] = {}
    for name in _weight_modules(unet):
        spellings = {name, name.replace(".", "_")}
        sgm = _unet_sgm_name(name, L, up_has_attn)
        if sgm:
            spellings |= {sgm, sgm.replace(".", "_")}
        for s in spellings:
            lookup[s] = name
    return lookup


def build_text_encoder_lookup(te: torch.nn.Module) -> dict[str, str]:
    """Text-encoder layer spellings -> module name, with and without the `text_model.` wrapper (transformers 5
    dropped it from CLIPTextModel; LoRA files still carry it)."""
    # Old diffusers attention-processor files name CLIP's projections like the UNet's (to_q_lora -> to_q).
    old_names = {"self_attn.q_proj": "self_attn.to_q", "self_attn.k_proj": "self_attn.to_k",
                 "self_attn.v_proj": "self_attn.to_v", "self_attn.out_proj": "self_attn.to_out.0"}
    lookup: dict[str, str] = {}
    for name in _weight_modules(te):
        canonical = name.removeprefix("text_model.")
        spellings = [canonical]
        for new, old in old_names.items():
            if canonical.endswith(new):
                spellings.append(canonical[: -len(new)] + old)
        for s in spellings:
            for spelling in (s, "text_model." + s):
                lookup[spelling] = name
                lookup[spelling.replace(".", "_")] = name
    return lookup


def locate(prefix: str) -> tuple[str, str]:
    """(component, name inside the component) from a layer prefix of any supported style."""
    for head, component in (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2")):
        if prefix.startswith(head):
            return component, prefix[len(head) :]
    for head, component in (
        ("unet.", "unet"),
        ("text_encoder_2.", "te2"),
        ("text_encoder.", "te1"),
        ("lora_unet.", "unet"),
        ("lora_te1.", "te1"),
        ("lora_te2.", "te2"),
    ):
        if prefix.startswith(head):
            return component, prefix[len(head) :]
    return "unet", prefix  # UNet-only adapters (PEFT raw, Replicate attention processors) carry no prefix


# --------------------------------------------------------------------------------------------------- merging

LayerId = tuple[str, str]  # (component, module name)


@dataclass(frozen=True)
class _Resolved:
    layers: tuple[tuple[LayerId, LayerSpec], ...]
    counts: Mapping[str, int]
    style: str
    algorithms: tuple[str, ...]
    serial: int


@dataclass
class _Pti:
    tokens: tuple[str, ...]
    rows: tuple[torch.Tensor, torch.Tensor]
    triggers: dict[str, str]


def _dora_target(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, style: str) -> torch.Tensor:
    """DoRA at strength 1: m * (W + dW) / ||W + dW||, per output row when m has one entry per output, per input
    column when it has one per input (LyCORIS wd_on_out=False)."""
    merged = w0 + delta
    out_dim, in_dim = merged.shape[0], merged.shape[1]
    m = _f32(magnitude)
    per_output = style == "peft" or (m.shape[0] == out_dim and (m.dim() == 1 or m.shape[1] == 1))
    if per_output:
        norm = merged.reshape(out_dim, -1).norm(dim=1).reshape(out_dim, *([1] * (merged.dim() - 1)))
        return m.reshape(norm.shape) * merged / norm
    norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1)
    norm = norm.reshape(1, in_dim, *([1] * (merged.dim() - 2)))
    return m.reshape(norm.shape) * merged / norm


def _is_plain_lora(spec: LayerSpec) -> bool:
    """LoRA / LoCon without a Tucker core or DoRA magnitude: merged with a single addmm."""
    return spec.algo == "lora" and "mid" not in spec.tensors and spec.magnitude is None


BATCH_BYTES = 256 << 20  # the float32 accumulator of one batch of same-shape layers


@contextlib.contextmanager
def _tf32_matmul(enabled: bool):
    """float32 matmuls on TF32 tensor cores inside the block (only where the inputs are exact in TF32)."""
    if not enabled:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _batch_key(weight: torch.Tensor, contributions: Sequence[tuple[float, LayerSpec]]) -> tuple | None:
    """What layers must share to be merged in one batch (None: this layer takes the per-layer path)."""
    if not contributions or weight.dim() < 2:
        return None
    shapes = []
    for _, spec in contributions:
        if not _is_plain_lora(spec):
            return None
        up, down = spec.tensors["up"], spec.tensors["down"]
        if up.device != weight.device or down.device != weight.device:
            return None
        shapes.append((up.shape, down.shape, up.dtype, down.dtype))
    return tuple(weight.shape), weight.dtype, weight.device, tuple(shapes)


def _write_batch(members: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[tuple[float, LayerSpec]]]]) -> None:
    """live_i = (W0_i.float() + sum_j s_j * alpha_ij/rank_j * up_ij @ down_ij).to(dtype) for same-shape layers i."""
    weights = [weight for weight, _, _ in members]
    acc = torch.empty((len(members), *weights[0].shape), dtype=torch.float32, device=weights[0].device)
    torch._foreach_copy_(list(acc.unbind(0)), [base for _, base, _ in members])  # one widening pass
    flat = acc.view(len(members), acc.shape[1], -1)
    for j in range(len(members[0][2])):
        specs = [contributions[j] for _, _, contributions in members]
        ups = torch.stack([spec.tensors["up"].flatten(1) for _, spec in specs]).float()
        downs = torch.stack([spec.tensors["down"].flatten(1) for _, spec in specs]).float()
        factors = [scale * _alpha_scale(spec.alpha, downs.shape[1], spec.rslora) for scale, spec in specs]
        if len(set(factors)) == 1:
            # The scale goes in as alpha (applied to the float32 product), so 16-bit factors stay exact in TF32:
            # tensor cores instead of float32 FMA units (on the H100, 722 layers x 2 LoRAs: GEMMs 19.5 -> 14 ms,
            # now bound by the accumulator's memory traffic; bench/NOTES.md, session 4).
            with _tf32_matmul(flat.is_cuda and all(spec.half_factors for _, spec in specs)):
                flat.baddbmm_(ups, downs, alpha=factors[0])
        else:  # per-layer alphas (kohya files may carry one per layer): scaled factors, float32 FMA
            flat.baddbmm_(ups * torch.tensor(factors, device=ups.device).view(-1, 1, 1), downs)
    torch._foreach_copy_(weights, list(acc.unbind(0)))  # rounds to each weight's dtype


def layer_delta(spec: LayerSpec, w0: torch.Tensor) -> torch.Tensor:
    """The float32 delta of one layer at strength 1 (before the user's scale), shaped like the weight."""
    raw = _ALGORITHMS[spec.algo][2](spec, w0.shape)
    delta = raw.reshape(w0.shape)
    if spec.magnitude is not None:
        base = _f32(w0)
        delta = _dora_target(base, delta, spec.magnitude, spec.magnitude_style) - base
    return delta


def _factor_shape(spec: LayerSpec) -> tuple[int, int]:
    """(rows, numel) of the raw delta an algorithm produces, from the factor shapes alone (no arithmetic), after
    checking that the factors fit each other; a malformed file is a LoraError here, not a crash mid-merge."""
    t = spec.tensors

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise LoraError(f"inconsistent factor shapes ({what}): " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in t.items()))

    def kernel(core: torch.Tensor) -> int:
        return core.shape[2] * core.shape[3] if core.dim() == 4 else 1

    if spec.algo == "lora":
        up, down, mid = t["up"], t["down"], t.get("mid")
        need(up.dim() >= 2 and down.dim() >= 2 and up.shape[1] == (mid.shape[0] if mid is not None else down.shape[0]), "up/down rank")
        if mid is not None:
            need(mid.dim() == 4 and mid.shape[1] == down.shape[0], "lora_mid")
            return up.shape[0], up.shape[0] * down.shape[1] * kernel(mid)
        return up.shape[0], up.shape[0] * down[0].numel()
    if spec.algo == "loha":
        sides = []
        for side in ("1", "2"):
            a, b, core = t[f"hada_w{side}_a"], t[f"hada_w{side}_b"], t.get(f"hada_t{side}")
            if core is not None:
                need(core.dim() == 4 and a.shape[0] == core.shape[0] and b.shape[0] == core.shape[1], "hada_t")
                sides.append((a.shape[1], b.shape[1] * kernel(core)))
            else:
                need(a.shape[1] == b.shape[0], "hada_w a/b rank")
                sides.append((a.shape[0], b[0].numel()))
        need(sides[0] == sides[1], "hada_w1 vs hada_w2")
        return sides[0][0], sides[0][0] * sides[0][1]
    if spec.algo == "lokr":
        if "lokr_w1" in t:
            o1, i1 = t["lokr_w1"].shape[0], t["lokr_w1"][0].numel()
        else:
            need(t["lokr_w1_a"].shape[1] == t["lokr_w1_b"].shape[0], "lokr_w1 a/b rank")
            o1, i1 = t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]
        if "lokr_w2" in t:
            o2, i2 = t["lokr_w2"].shape[0], t["lokr_w2"][0].numel()
        elif "lokr_t2" in t:
            core = t["lokr_t2"]
            need(t["lokr_w2_a"].shape[0] == core.shape[0] and t["lokr_w2_b"].shape[0] == core.shape[1], "lokr_t2")
            o2, i2 = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * kernel(core)
        else:
            need(t["lokr_w2_a"].shape[1] == t["lokr_w2_b"].shape[0], "lokr_w2 a/b rank")
            o2, i2 = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1]
        return o1 * o2, o1 * o2 * i1 * i2
    diff = t["diff"]
    return diff.shape[0], diff.numel()


def _check_shape(spec: LayerSpec, weight: torch.Tensor, where: str, name: str, component: str, module: str) -> None:
    """Shape check before any weight changes: a mismatch is an error naming the LoRA, never a skip."""
    try:
        rows, numel = _factor_shape(spec)
    except LoraError as exc:
        raise IncompatibleLoraError(f"{name}: layer '{where}': {exc}") from None
    fits = rows == weight.shape[0] and numel == weight.numel()
    if fits and (spec.magnitude is None or spec.magnitude.numel() in (weight.shape[0], weight.shape[1])):
        return
    in_dim = numel // max(rows, 1)
    hint = ""
    if module.split(".")[-1] in ("to_k", "to_v") and ".attn2" in module and in_dim in _CROSS_ATTN_DIMS:
        hint = f"; cross-attention input width {in_dim} means {_CROSS_ATTN_DIMS[in_dim]}, not SDXL"
    found = f"a delta of {rows} x {in_dim}" + (
        f" with a DoRA magnitude of {spec.magnitude.numel()}" if spec.magnitude is not None and fits else ""
    )
    raise IncompatibleLoraError(
        f"{name}: layer '{where}' ({component} {module}) has {found} but the model's weight is "
        f"{tuple(weight.shape)}{hint}"
    )


class LoraMerger:
    """Keeps one pipeline's live weights equal to base + sum(scale_i * delta_i) for the requested LoRAs.

    One merger per base model. Not re-entrant; calls are serialised by a lock.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._lock = threading.RLock()
        self._models: dict[str, torch.nn.Module] = {}
        self._lookups: dict[str, dict[str, str]] = {}
        for component, attr in _PIPE_ATTR.items():
            model = getattr(pipe, attr, None)
            if model is None:
                continue
            model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: same parameters, plain names
            self._models[component] = model
            self._lookups[component] = (
                build_unet_lookup(model) if component == "unet" else build_text_encoder_lookup(model)
            )
        self._module_cache: dict[LayerId, torch.nn.Module] = {}
        self._base: dict[LayerId, torch.Tensor] = {}  # untouched weights, kept the first time a layer is touched
        self._live: dict[LayerId, tuple] = {}  # layer -> contributions signature currently in its weight
        self._resolved: OrderedDict[tuple, tuple[ParsedLora, _Resolved]] = OrderedDict()
        self._signature: tuple | None = ()
        self._last_report = ApplyReport((), False, 0, 0.0)
        self.loading = False  # True while weights change; a leftover True forces a full restore
        # Pristine tokenizers and token-embedding parameters (never mutated; PTI works on copies).
        self._orig_tokenizers = (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
        self._orig_embeddings: dict[str, tuple[torch.nn.Parameter, int]] = {}
        for component in ("te1", "te2"):
            if component in self._models:
                emb = self._models[component].get_input_embeddings()
                self._orig_embeddings[component] = (emb.weight, emb.num_embeddings)
        self._pti_signature: tuple = ()
        self._triggers: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ public

    def apply(self, loras: Sequence[LoraRequest]) -> ApplyReport:
        """Make the live weights base + sum(scale_i * delta_i). Unchanged request: returns at once. [] = base."""
        t_start = time.perf_counter()
        for req in loras:
            # The -1..3 input range is enforced by the predictor's inputs; a caller may sum the scales of one file
            # requested twice, so only a non-finite scale is refused here.
            if not math.isfinite(req.scale):
                raise LoraError(f"{req.name}: scale {req.scale} is not a finite number")
        signature = tuple(self._request_signature(r) for r in loras)
        with self._lock:
            if not self.loading and signature == self._signature:
                return replace(self._last_report, changed=False, layers_written=0, seconds=time.perf_counter() - t_start)

            # Phase 1: read, parse and check everything; the model is untouched if anything is wrong.
            prepared = []
            for req in loras:
                t0 = time.perf_counter()
                parsed, cached = PARSE_CACHE.get(req)
                resolved = self._resolve(req, parsed)
                pti = self._read_pti(req) if req.embeddings_path is not None and req.scale != 0 else None
                prepared.append((req, resolved, pti, cached, time.perf_counter() - t0))

            # Phase 2: write. From here until the end a failure leaves `loading` set for the next call.
            self.loading = True
            if self._signature is None:  # an earlier call failed mid-way: start from a clean base
                self._restore_all()
            desired: dict[LayerId, list[tuple[float, LayerSpec, tuple]]] = {}
            for req, resolved, _, _, _ in prepared:
                if req.scale == 0:
                    continue
                for layer_id, spec in resolved.layers:
                    desired.setdefault(layer_id, []).append((req.scale, spec, (req.key, resolved.serial, req.scale)))
            self._signature = None
            t_merge = time.perf_counter()
            todo = []
            for layer_id in list(self._live.keys() | desired.keys()):
                contributions = desired.get(layer_id, [])
                sig = tuple(c[2] for c in contributions)
                if self._live.get(layer_id, ()) != sig:  # else this layer already holds exactly this sum
                    todo.append((layer_id, [(s, spec) for s, spec, _ in contributions], sig))
            self._write_layers([(layer_id, contributions) for layer_id, contributions, _ in todo])
            overflowed = self._nonfinite([layer_id for layer_id, contributions, _ in todo if contributions])
            if overflowed:
                # Every factor was finite and bounded, but their sum does not fit the weights' dtype (float16
                # tops out at 65 504): put the base back, bit for bit, and name the LoRAs that touch the layer.
                self._restore_all()
                self._signature = ()
                self._last_report = ApplyReport((), False, 0, 0.0)
                self.loading = False
                culprits = [req.name for req, resolved, _, _, _ in prepared
                            if req.scale != 0 and any(lid == overflowed[0] for lid, _ in resolved.layers)]
                component, module = overflowed[0]
                raise LoraError(
                    f"{' + '.join(culprits) or 'LoRA'}: merged into {component} {module} (and {len(overflowed) - 1} "
                    f"other layers) the weights overflow to infinity or NaN in "
                    f"{str(self._param(overflowed[0]).dtype).replace('torch.', '')}; the LoRA's values or scale are "
                    "far too large. The model is unchanged"
                )
            for layer_id, _, sig in todo:
                if sig:
                    self._live[layer_id] = sig
                else:
                    self._live.pop(layer_id, None)
            written = len(todo)
            self._sync_device()
            merge_seconds = time.perf_counter() - t_merge
            self._set_pti([(req, pti) for req, _, pti, _, _ in prepared if pti is not None])
            self._signature = signature
            self.loading = False

            total_layers = sum(sum(r.counts.values()) for q, r, _, _, _ in prepared if q.scale != 0) or 1
            stats = []
            for req, resolved, pti, cached, seconds in prepared:
                share = merge_seconds * (sum(resolved.counts.values()) / total_layers if req.scale != 0 else 0)
                stat = LoraStat(
                    name=req.name,
                    key=req.key,
                    format=resolved.style,
                    algorithms=resolved.algorithms,
                    scale=req.scale,
                    layers=dict(resolved.counts) if req.scale != 0 else {c: 0 for c in COMPONENTS},
                    pti_tokens=pti.tokens if pti else (),
                    cached=cached,
                    seconds=seconds + share,
                )
                logger.info(stat.line())
                stats.append(stat)
            report = ApplyReport(tuple(stats), True, written, time.perf_counter() - t_start)
            self._last_report = report
            if not loras:
                logger.info("LoRAs: none active (%d layers restored, %.1f ms)", written, report.seconds * 1000)
            return report

    def reset(self) -> None:
        """Bitwise base state: every touched weight, the tokenizers and the token embeddings."""
        with self._lock:
            self.loading = True
            self._restore_all()
            self._signature = ()
            self._last_report = ApplyReport((), False, 0, 0.0)
            self.loading = False

    def release(self) -> None:
        """reset(), then drop what is kept beside the model for speed (base copies of touched layers, factors on
        the device): called before the model leaves accelerator memory; the next apply() captures them again."""
        with self._lock:
            self.reset()
            self._base.clear()
            self._resolved.clear()

    def expand_prompt(self, prompt: str) -> str:
        """Replace trigger words (e.g. TOK) of the active LoRAs with their inserted PTI tokens (e.g. <s0><s1>)."""
        for trigger, tokens in self._triggers:
            prompt = re.sub(rf"(?<![\w<]){re.escape(trigger)}(?![\w>])", lambda _m, t=tokens: t, prompt)
        return prompt

    @property
    def active(self) -> tuple:
        """(key, scale, ...) of the LoRAs in the live weights; () for the base model."""
        return self._signature or ()

    def base_weight(self, component: str, module: str) -> torch.Tensor:
        """The untouched weight of a layer (the kept copy if a LoRA ever touched it, else the live weight)."""
        layer_id = (component, module)
        if layer_id in self._base:
            return self._base[layer_id]
        return self._models[component].get_submodule(module).weight

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _request_signature(req: LoraRequest) -> tuple:
        return (
            req.key,
            float(req.scale),
            str(req.embeddings_path) if req.embeddings_path else None,
            tuple(sorted(req.token_map.items())),
        )

    def _resolve(self, req: LoraRequest, parsed: ParsedLora) -> _Resolved:
        """Map each layer of a parsed file onto this model's modules (cached; factors moved to their device)."""
        cache_key = (req.key, id(parsed))
        hit = self._resolved.get(cache_key)
        if hit is not None and hit[0] is parsed:  # identity check: id() alone could be reused after eviction
            self._resolved.move_to_end(cache_key)
            return hit[1]
        layers: list[tuple[LayerId, LayerSpec]] = []
        unmatched: list[str] = []
        counts = {c: 0 for c in COMPONENTS}
        algorithms: set[str] = set()
        for prefix, spec in parsed.layers.items():
            component, rel = locate(prefix)
            lookup = self._lookups.get(component)
            module_name = lookup.get(rel) if lookup is not None else None
            if module_name is None:
                unmatched.append(prefix)
                continue
            weight = self._models[component].get_submodule(module_name).weight
            _check_shape(spec, weight, prefix, req.name, component, module_name)
            # Factors live on the layer's device, so a swap or a scale change costs no host-to-device copy. Plain
            # LoRA factors are kept in float32, the dtype the merge accumulates in (they are small next to the
            # weight), which saves two casts per layer on every switch or scale change; other algorithms keep
            # the file's dtype to bound memory.
            dtype = torch.float32 if _is_plain_lora(spec) else None
            half = all(t.dtype in (torch.float16, torch.bfloat16) for t in spec.tensors.values())
            layers.append(((component, module_name), replace(spec.to(weight.device, dtype), half_factors=half)))
            counts[component] += 1
            algorithms.add("locon" if spec.algo == "lora" and weight.dim() == 4 else spec.algo)
            if spec.magnitude is not None:
                algorithms.add("dora")
        if unmatched:
            missing = sorted({locate(p)[0] for p in unmatched} - set(self._lookups))
            hint = f"; the model has no {'/'.join(missing)}" if missing else ""
            sd1 = any(re.search(r"(down_blocks[._]0[._]attentions|input_blocks[._][12][._]1)", p) for p in unmatched)
            if sd1:
                hint += "; attention in the first UNet block means an SD1.x/SD2.x LoRA, not SDXL"
            raise UnmatchedLoraKeysError(
                f"{req.name}: {len(unmatched)} of {len(parsed.layers)} layers match nothing in the model, "
                f"e.g. {unmatched[:4]}{hint}"
            )
        # Stable order so that the sum is always accumulated the same way.
        resolved = _Resolved(
            tuple(sorted(layers, key=lambda x: x[0])), counts, parsed.style, tuple(sorted(algorithms)), parsed.serial
        )
        self._resolved[cache_key] = (parsed, resolved)
        while len(self._resolved) > RESOLVED_CACHE_MAX_ENTRIES or (
            len(self._resolved) > 1 and sum(p.nbytes for p, _ in self._resolved.values()) > RESOLVED_CACHE_MAX_BYTES
        ):
            self._resolved.popitem(last=False)
        return resolved

    def _param(self, layer_id: LayerId) -> torch.nn.Parameter:
        module = self._module_cache.get(layer_id)
        if module is None:
            component, name = layer_id
            module = self._module_cache[layer_id] = self._models[component].get_submodule(name)
        return module.weight

    def _kept_base(self, layer_id: LayerId, weight: torch.Tensor) -> torch.Tensor:
        base = self._base.get(layer_id)
        if base is None:
            base = weight.detach().clone()
            self._base[layer_id] = base
        elif base.device != weight.device:  # the pipeline was moved (offload); follow it
            base = base.to(weight.device)
            self._base[layer_id] = base
        return base

    @torch.no_grad()
    def _write_layers(self, todo: Sequence[tuple[LayerId, Sequence[tuple[float, LayerSpec]]]]) -> None:
        """Write every layer of `todo`. Layers of one shape whose contributions are all plain LoRA (with the same
        ranks) are written together, a few batched kernels per group instead of four launches and ~80 us of Python
        per layer (60 ms for SDXL's 722 layers on an H100 host, where the GPU work is ~10 ms)."""
        groups: dict[tuple, list] = {}
        for layer_id, contributions in todo:
            weight = self._param(layer_id)
            key = _batch_key(weight, contributions)
            if key is None:
                self._write_layer(layer_id, contributions)
            else:
                groups.setdefault(key, []).append((weight, self._kept_base(layer_id, weight), contributions))
        for members in groups.values():
            per_batch = max(1, BATCH_BYTES // (members[0][0].numel() * 4))
            for start in range(0, len(members), per_batch):
                self._write_batch(members[start:start + per_batch])

    _write_batch = staticmethod(_write_batch)  # an attribute, so that a test probe can wrap it per merger

    @torch.no_grad()
    def _write_layer(self, layer_id: LayerId, contributions: Sequence[tuple[float, LayerSpec]]) -> None:
        """live = (W0.float() + sum s_i * dW_i).to(dtype), written in place; no contributions = bitwise W0."""
        weight = self._param(layer_id)
        base = self._kept_base(layer_id, weight)
        if not contributions:
            weight.copy_(base)
            return
        acc = base.to(torch.float32, copy=True)
        for scale, spec in contributions:
            if next(iter(spec.tensors.values())).device != weight.device:  # the pipeline moved since resolve
                spec = spec.to(weight.device)
            if _is_plain_lora(spec):
                # Plain LoRA / LoCon: one fused kernel, acc += (scale * alpha/rank) * up @ down.
                up, down = spec.tensors["up"].flatten(1), spec.tensors["down"].flatten(1)
                factor = scale * _alpha_scale(spec.alpha, down.shape[0], spec.rslora)
                acc.view(acc.shape[0], -1).addmm_(up.float(), down.float(), alpha=factor)
            else:
                acc += scale * layer_delta(spec, base)
        weight.copy_(acc)  # copy_ rounds to the weight's dtype itself: no intermediate tensor

    @torch.no_grad()
    def _nonfinite(self, layer_ids: Sequence[LayerId]) -> list[LayerId]:
        """The layers among `layer_ids` whose live weight holds NaN or inf: one multi-tensor max-norm per device
        and dtype and a single device sync (a few ms for all SDXL layers on a GPU)."""
        groups: dict[tuple, list[LayerId]] = {}
        for layer_id in layer_ids:
            weight = self._param(layer_id)
            groups.setdefault((weight.device, weight.dtype), []).append(layer_id)
        bad: list[LayerId] = []
        for ids in groups.values():
            peaks = torch.stack(torch._foreach_norm([self._param(i) for i in ids], float("inf")))
            finite = torch.isfinite(peaks).cpu()
            bad += [i for i, ok in zip(ids, finite.tolist()) if not ok]
        return sorted(bad)

    def _sync_device(self) -> None:
        """Wait for queued GPU copies so timings and the loading flag reflect finished work."""
        if torch.cuda.is_available() and any(b.is_cuda for b in self._base.values()):
            torch.cuda.synchronize()

    @torch.no_grad()
    def _restore_all(self) -> None:
        for layer_id in list(self._base):
            weight = self._param(layer_id)
            weight.copy_(self._kept_base(layer_id, weight))
        self._live.clear()
        self._reset_pti()
        self._sync_device()

    # ------------------------------------------------------------------ PTI (Replicate trainer embeddings)

    def _read_pti(self, req: LoraRequest) -> _Pti:
        tensors, _ = read_safetensors(Path(req.embeddings_path), f"{req.name} embeddings")
        if "text_encoders_0" not in tensors or "text_encoders_1" not in tensors:
            raise LoraError(
                f"{req.name}: embeddings file should hold text_encoders_0 and text_encoders_1, found {sorted(tensors)[:4]}"
            )
        rows0, rows1 = tensors["text_encoders_0"], tensors["text_encoders_1"]
        for component, rows in (("te1", rows0), ("te2", rows1)):
            if component not in self._orig_embeddings:
                raise IncompatibleLoraError(f"{req.name}: embeddings for {component} but the model has none")
            dim = self._orig_embeddings[component][0].shape[1]
            if rows.dim() != 2 or rows.shape[1] != dim:
                raise IncompatibleLoraError(
                    f"{req.name}: embeddings rows of shape {tuple(rows.shape)} do not fit {component} width {dim}"
                )
        if rows0.shape[0] != rows1.shape[0]:
            raise IncompatibleLoraError(f"{req.name}: embeddings have {rows0.shape[0]} and {rows1.shape[0]} rows")
        for key, rows in (("text_encoders_0", rows0), ("text_encoders_1", rows1)):
            _check_values(rows, f"embeddings (embeddings.pti) {key}", req.name)
        # Trigger words are replaced in the prompt: an empty or huge one would multiply the prompt's length.
        bad_map = {k: v for k, v in req.token_map.items()
                   if not isinstance(k, str) or not isinstance(v, str) or not k.strip() or len(k) > 100 or len(v) > 1000}
        if bad_map:
            raise LoraError(f"{req.name}: special_params should map trigger words to token strings (like "
                            f'{{"TOK": "<s0><s1>"}}, words of 1 to 100 characters), got {str(bad_map)[:80]}')
        n = rows0.shape[0]
        named = [t for v in req.token_map.values() for t in re.findall(r"<[^<>\s]+>", v)]
        tokens = tuple(dict.fromkeys(named)) if len(dict.fromkeys(named)) == n else tuple(f"<s{i}>" for i in range(n))
        return _Pti(tokens, (rows0, rows1), dict(req.token_map))

    def _reset_pti(self) -> None:
        """Put back the pristine tokenizers and embedding parameters (the very same objects)."""
        tok1, tok2 = self._orig_tokenizers
        if tok1 is not None and getattr(self.pipe, "tokenizer", None) is not tok1:
            self.pipe.tokenizer = tok1
        if tok2 is not None and getattr(self.pipe, "tokenizer_2", None) is not tok2:
            self.pipe.tokenizer_2 = tok2
        for component, (param, n) in self._orig_embeddings.items():
            emb = self._models[component].get_input_embeddings()
            if emb.weight is not param:
                emb.weight = param
                emb.num_embeddings = n
        self._pti_signature = ()
        self._triggers = []

    def _set_pti(self, items: Sequence[tuple[LoraRequest, _Pti]]) -> None:
        signature = tuple((req.key, str(req.embeddings_path), tuple(sorted(req.token_map.items()))) for req, _ in items)
        if signature == self._pti_signature:
            return
        self._reset_pti()
        if not items:
            return
        tok1, tok2 = (copy.deepcopy(t) for t in self._orig_tokenizers)
        taken = set(tok1.get_vocab())
        new_rows: dict[str, list[torch.Tensor]] = {"te1": [], "te2": []}
        all_tokens: list[str] = []
        triggers: dict[str, list[str]] = {}
        for index, (req, pti) in enumerate(items):
            tokens = list(pti.tokens)
            if any(t in taken for t in tokens):  # two Replicate LoRAs both use <s0><s1>: rename the later one
                tokens = [f"<lora{index}_s{i}>" for i in range(len(tokens))]
            rename = dict(zip(pti.tokens, tokens))
            taken.update(tokens)
            all_tokens += tokens
            new_rows["te1"].append(pti.rows[0])
            new_rows["te2"].append(pti.rows[1])
            for trigger, value in pti.triggers.items():
                for old, new in rename.items():
                    value = value.replace(old, new)
                triggers.setdefault(trigger, []).append(value)
        for tok in (tok1, tok2):
            added = tok.add_tokens(all_tokens)
            if added != len(all_tokens):
                raise LoraError(f"PTI tokens {all_tokens} clash with the tokenizer vocabulary")
        for component in ("te1", "te2"):
            param, n = self._orig_embeddings[component]
            rows = torch.cat([r.to(param.dtype) for r in new_rows[component]]).to(param.device)
            emb = self._models[component].get_input_embeddings()
            # A new Parameter (the pristine one stays untouched for a bitwise reset).
            emb.weight = torch.nn.Parameter(torch.cat([param.detach(), rows]), requires_grad=False)
            emb.num_embeddings = n + rows.shape[0]
        self.pipe.tokenizer, self.pipe.tokenizer_2 = tok1, tok2
        self._triggers = [(t, " ".join(v)) for t, v in triggers.items()]
        self._pti_signature = signature
