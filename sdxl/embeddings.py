"""Textual-inversion embeddings (the `embeddings` input): parsing its lines, loading SDXL embedding files, and
applying them to one prompt encoding with an exact restore.

    items = parse_embeddings(text)                      # pure; raises utils.InputError naming the line
    loaded = [load(item, cache.fetch(item.ref, ...)) for item in items]
    check_names(loaded)                                 # duplicates are an error
    with applied(pipe, loaded) as expand:               # tokens added to both tokenizers, rows to both tables
        embeds = prompts.encode_prompts(pipe, expand(prompt, "prompt"), expand(negative, "negative_prompt"))
    # here pipe.tokenizer/_2 and both token-embedding parameters are the very objects they were before

A1111's rules: an embedding stands for the word `name` (the file's name without its extension unless given), matched
case-insensitively as a whole word wherever it appears, also inside emphasis `(name:1.2)`, in both prompts; an
embedding of n vectors becomes n tokens in place. SDXL files hold `clip_l` [n, 768] (CLIP-L, text_encoder) and
`clip_g` [n, 1280] (CLIP-G, text_encoder_2); the diffusers two-file form (learned_embeds.safetensors and
learned_embeds_2.safetensors, each one [n, width] table named by its token) is accepted as a folder. SD 1.x/2.x
embeddings are refused when downloaded (weights.describe_embedding_keys).

The tokens added are ``<ti{k}v{i}>`` (k: the embedding's position, i: its vector), never text from the user, on
copies of the tokenizers; the tables get new Parameters (base rows + embedding rows). Both are swapped in only for
the encoding and put back in a ``finally``, so the next request tokenises and encodes bitwise as before.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import utils
import weights

logger = logging.getLogger(__name__)

INPUT = "embeddings"
MAX_EMBEDDINGS = 8
MAX_TOTAL_BYTES = 64 * 1024 * 1024  # all embedding files of one request together
MAX_NAME_CHARS = 64
# A name is one prompt word: no spaces nor A1111 prompt syntax, and not starting like a URL or reference.
_NAME_RE = re.compile(r"[^\s=:/\\()\[\]{}<>,|\"']{1,64}")
_LINE_NAME_RE = re.compile(r"\s*([^\s=:/\\()\[\]{}<>,|\"']+)\s*=\s*(\S.*)")
_TOKEN_NAME_RE = re.compile(r"<[\w.-]{1,62}>")  # a diffusers placeholder token such as <cat-toy>
VECTOR_CACHE_BYTES = 256 * 1024 * 1024  # loaded vectors kept in memory (by file sha256), least recently used out


@dataclasses.dataclass(frozen=True)
class EmbeddingInput:
    """One parsed line of `embeddings`."""

    line: int  # 1-based line number in the input text
    name: str | None  # given with `name=`; else taken from the file
    ref: weights.WeightsRef

    @property
    def input_name(self) -> str:
        return f"{INPUT} line {self.line}"


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A loaded embedding: its prompt word and one [n, width] table per text encoder (CPU, as stored)."""

    name: str
    vectors: tuple[torch.Tensor, torch.Tensor]  # (CLIP-L rows, CLIP-G rows)
    sha256: str
    input_name: str

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])


def _error(input_name: str, message: str) -> utils.InputError:
    return utils.InputError(f"{input_name}: {message}")


def input_lines(text: str | None) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of a multi-line input, without blank lines and `#` comments."""
    for number, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def check_name(name: str, input_name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise _error(input_name, f"expected an embedding name of 1 to {MAX_NAME_CHARS} characters without spaces or "
                     f"prompt syntax ( ) [ ] : , < > = /, got {name[:80]!r}")
    return name


def parse_embeddings(text: str | None) -> tuple[EmbeddingInput, ...]:
    """Parse the `embeddings` input (no network): one `[name=]reference` per line, `#` comments, blank lines."""
    items = []
    for number, line in input_lines(text):
        input_name = f"{INPUT} line {number}"
        name = None
        m = _LINE_NAME_RE.fullmatch(line)
        # `name=` only when what precedes `=` is a plain word: URLs and data: URLs carry `=` in their query/payload.
        if m and not line.lower().startswith(("data:", "http:", "https:", "hf:", "urn:")):
            name, line = check_name(m.group(1), input_name), m.group(2).strip()
        items.append(EmbeddingInput(number, name, weights.parse_ref(line, "embedding", input_name=input_name)))
        if len(items) > MAX_EMBEDDINGS:
            raise _error(f"{INPUT} line {number}", f"at most {MAX_EMBEDDINGS} embeddings per request, got more")
    return tuple(items)


def default_name(file: weights.LoraFile, input_name: str) -> str:
    """A1111's name: the file's name without its extension (a CivitAI model: its primary file's name)."""
    if file.file_name:
        stem = file.file_name.rsplit("/", 1)[-1]
        stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem.rsplit(".", 1)[0]
        if _NAME_RE.fullmatch(stem):
            return stem
        raise _error(input_name, f"the file name {stem[:80]!r} is not usable as a prompt word; give a name: "
                     "name=reference")
    raise _error(input_name, f"{file.ref.display} has no file name to call the embedding by; write name=reference")


# ------------------------------------------------------------------------------------------------ loading
class _VectorCache:
    """Loaded tables by file sha256, bounded in bytes (least recently used dropped first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[str | None, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: str, load: Callable[[], tuple[str | None, tuple[torch.Tensor, torch.Tensor]]]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = load()
        with self._lock:
            self._items[key] = value
            while sum(t.numel() * t.element_size() for _, pair in self._items.values() for t in pair) > self.max_bytes \
                    and len(self._items) > 1:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


VECTORS = _VectorCache(VECTOR_CACHE_BYTES)


def _read(path: Path, input_name: str, display: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # a cached file that no longer reads: say which input
        raise _error(input_name, f"{display} could not be read as safetensors ({type(err).__name__})") from err


def _single_table(path: Path, input_name: str, display: str) -> tuple[str, torch.Tensor]:
    tensors = _read(path, input_name, display)
    if len(tensors) != 1:
        raise _error(input_name, f"{display}: {path.name} should hold one table (the diffusers form), got "
                     f"{len(tensors)}")
    (token, table), = tensors.items()
    return token, table.reshape(1, -1) if table.dim() == 1 else table


def _load_tables(file: weights.LoraFile, input_name: str) -> tuple[str | None, tuple[torch.Tensor, torch.Tensor]]:
    """(the diffusers token if any, (CLIP-L rows, CLIP-G rows)) of a fetched embedding."""
    display = file.ref.display
    if file.path.is_dir():  # the diffusers two-file form
        token, first = _single_table(file.path / weights.DIFFUSERS_EMBEDDING_FILES[0], input_name, display)
        _, second = _single_table(file.path / weights.DIFFUSERS_EMBEDDING_FILES[1], input_name, display)
        tables = (first, second)
    else:
        token = None
        tensors = _read(file.path, input_name, display)
        header = {k: {"shape": list(v.shape)} for k, v in tensors.items()}
        what = weights.describe_embedding_keys(header)
        if what is not None:
            raise _error(input_name, f"{display} is not an SDXL embedding: {what}")
        tables = (tensors["clip_l"], tensors["clip_g"])
    for table in tables:
        if table.dim() != 2 or not table.is_floating_point() or not torch.isfinite(table).all():
            raise _error(input_name, f"{display}: expected finite float [n, width] tables, got {table.dtype} "
                         f"{list(table.shape)}")
    if tables[0].shape[0] != tables[1].shape[0] or not 1 <= tables[0].shape[0] <= weights.MAX_EMBEDDING_VECTORS:
        raise _error(input_name, f"{display}: expected 1 to {weights.MAX_EMBEDDING_VECTORS} vectors for both text "
                     f"encoders, got {tables[0].shape[0]} and {tables[1].shape[0]}")
    return token, (tables[0].detach().clone(), tables[1].detach().clone())


def load(item: EmbeddingInput, file: weights.LoraFile) -> Embedding:
    """The embedding of one `embeddings` line from its fetched file (vectors from the in-memory cache if seen)."""
    token, tables = VECTORS.get(file.sha256, lambda: _load_tables(file, item.input_name))
    if item.name is not None:
        name = item.name
    elif token is not None and (_NAME_RE.fullmatch(token) or _TOKEN_NAME_RE.fullmatch(token)):
        name = token  # diffusers names the embedding by its token, e.g. <cat-toy>
    else:
        name = default_name(file, item.input_name)
    return Embedding(name, tables, file.sha256, item.input_name)


def check_names(loaded: Sequence[Embedding]) -> None:
    """Two embeddings may not share a name (compared as A1111 does: case-insensitively)."""
    seen: dict[str, Embedding] = {}
    for emb in loaded:
        other = seen.get(emb.name.lower())
        if other is not None:
            raise _error(emb.input_name, f"the name {emb.name!r} is already used by {other.input_name}; give one of "
                         "them another name with name=reference")
        seen[emb.name.lower()] = emb
    total = sum(t.numel() * t.element_size() for emb in loaded for t in emb.vectors)
    if total > MAX_TOTAL_BYTES:
        raise _error(INPUT, f"at most {MAX_TOTAL_BYTES // (1024 * 1024)} MiB of embeddings per request, got "
                     f"{total / (1024 * 1024):.1f} MiB")


def check_fits(pipe: Any, loaded: Sequence[Embedding]) -> None:
    """Each table's width matches its text encoder (768 / 1280 for SDXL) before anything is changed."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for emb in loaded:
        for which, (encoder, table) in enumerate(zip(encoders, emb.vectors)):
            width = encoder.get_input_embeddings().weight.shape[1]
            if table.shape[1] != width:
                key = ("clip_l", "clip_g")[which]
                raise _error(emb.input_name, f"{emb.name}: its {key} table is {table.shape[1]} wide, this model's "
                             f"{'CLIP-L' if which == 0 else 'CLIP-G'} text encoder takes {width} (not an SDXL "
                             "embedding for this model)")


# ------------------------------------------------------------------------------------------------ applying
def tokens_for(index: int, count: int) -> list[str]:
    return [f"<ti{index}v{i}>" for i in range(count)]


def _pattern(name: str) -> re.Pattern:
    # Whole word, case-insensitive; never inside another added token such as <s0> or <ti0v0>.
    return re.compile(rf"(?<![\w<]){re.escape(name)}(?![\w>])", re.IGNORECASE)


_TOKENIZERS: OrderedDict[tuple, tuple[Any, Any, Any, Any]] = OrderedDict()  # (base1, base2, copy1, copy2)
_TOKENIZER_COPIES = 4


def _tokenizers_with(pipe: Any, counts: tuple[int, ...]) -> tuple[Any, Any]:
    """Copies of the pipeline's current tokenizers with the tokens for `counts` added (kept for reuse: the added
    tokens depend only on the counts, and the copies are never changed after)."""
    base1, base2 = pipe.tokenizer, pipe.tokenizer_2
    key = (id(base1), id(base2), counts)
    hit = _TOKENIZERS.get(key)
    if hit is not None and hit[0] is base1 and hit[1] is base2:
        _TOKENIZERS.move_to_end(key)
        return hit[2], hit[3]
    tokens = [t for index, count in enumerate(counts) for t in tokens_for(index, count)]
    copies = []
    for base in (base1, base2):
        tok = copy.deepcopy(base)
        clash = [t for t in tokens if t in tok.get_vocab()]
        if clash or tok.add_tokens(tokens) != len(tokens):
            raise RuntimeError(f"embedding tokens {clash or tokens} clash with the tokenizer vocabulary")
        copies.append(tok)
    _TOKENIZERS[key] = (base1, base2, copies[0], copies[1])
    while len(_TOKENIZERS) > _TOKENIZER_COPIES:
        _TOKENIZERS.popitem(last=False)
    return copies[0], copies[1]


@contextlib.contextmanager
def applied(pipe: Any, loaded: Sequence[Embedding], *, warn_unused: bool = True) -> Iterator[Callable[[str, str], str]]:
    """Within the block the pipeline's tokenizers and text encoders know the embeddings; yields `expand(text,
    input_name)`, which writes each embedding's tokens where its name stands. Afterwards the tokenizers and both
    token-embedding Parameters are the very objects they were before (also when the block raises)."""
    if not loaded:
        yield lambda text, _input_name: text
        return
    check_fits(pipe, loaded)
    tok1, tok2 = _tokenizers_with(pipe, tuple(emb.count for emb in loaded))
    tables = [encoder.get_input_embeddings() for encoder in (pipe.text_encoder, pipe.text_encoder_2)]
    saved = (pipe.tokenizer, pipe.tokenizer_2, [(t.weight, t.num_embeddings) for t in tables])
    patterns = [(_pattern(emb.name), " ".join(tokens_for(index, emb.count)), emb) for index, emb in
                sorted(enumerate(loaded), key=lambda pair: -len(pair[1].name))]
    used: set[str] = set()

    def expand(text: str, _input_name: str) -> str:
        for pattern, replacement, emb in patterns:
            text, n = pattern.subn(lambda _m, r=replacement: r, text)
            if n:
                used.add(emb.name)
        return text

    try:
        for which, table in enumerate(tables):
            base, _ = saved[2][which]
            rows = torch.cat([emb.vectors[which] for emb in loaded]).to(device=base.device, dtype=base.dtype)
            # A new Parameter: the base one stays untouched, so the restore below is exact.
            table.weight = torch.nn.Parameter(torch.cat([base.detach(), rows]), requires_grad=False)
            table.num_embeddings = table.weight.shape[0]
        pipe.tokenizer, pipe.tokenizer_2 = tok1, tok2
        yield expand
        unused = [emb for emb in loaded if emb.name not in used] if warn_unused else []
        for emb in unused:
            # Negative embeddings are often listed once and used sometimes: a warning, not an error.
            logger.warning("%s: the embedding %r appears in neither prompt nor negative_prompt", emb.input_name,
                           emb.name)
    finally:
        pipe.tokenizer, pipe.tokenizer_2 = saved[0], saved[1]
        for table, (weight, count) in zip(tables, saved[2]):
            table.weight = weight
            table.num_embeddings = count
