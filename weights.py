"""LoRA references -> verified .safetensors files on local disk, cached across predictions.

    ref = parse_lora_ref(text, input_name="lora_weights")   # pure, no network; raises InvalidReferenceError
    cache = LoraCache.from_env()
    lora = cache.fetch(ref, Tokens.from_inputs(hf_api_token, civitai_api_token))
    try: ... use lora.path, lora.trigger_words, lora.embeddings_path, lora.special_params ...
    finally: cache.release(ref)

Full SDXL checkpoints (the `checkpoint` input) go through the same code: `parse_checkpoint_ref` and a
`CheckpointCache` (its own folder and byte cap, a file-size window, CivitAI "Checkpoint" models; a Hugging Face repo
with model_index.json is fetched as a diffusers folder, entries/<key>/diffusers/).
So do the other kinds of `KINDS` (embeddings, VAEs, ControlNets for `control_model`), each with its cache class
(`CACHE_CLASSES`), CivitAI types, size cap and a key check that refuses files of another kind or base model before
anything is cached.

Sources: Hugging Face (huggingface_hub against HF_ENDPOINT), CivitAI (CIVITAI_API_BASE), Replicate
(REPLICATE_API_BASE / REPLICATE_WEB_BASE), plain http(s) URLs and data: URLs.  See REFERENCE_FORMS for the
accepted spellings.  Secrets (tokens, signed query strings) never reach logs, error messages (nor their
__cause__ / __context__ chains), cache keys or file names: everything user-visible is built from `WeightsRef.display`.
A plain URL's cache key is a hash of its normalised URL and its query minus signing parameters (auth parameters
such as token= stay in, hashed); a URL with signing parameters is keyed on the host's ETag for it as well.

Network safety:
  * SSRF guard (`_check_host`), before every request hop, before pget gets a URL and for the API bases: hosts
    resolving (any address) into REFUSED_NETWORKS (one table: metadata and link-local, multicast, unspecified,
    reserved always; loopback and private unless LORA_ALLOW_LOCAL_HOSTS=1) or named like a metadata service are
    refused.  (A name is resolved here and again by the HTTP client: DNS rebinding between the two is not prevented.)
  * Redirects are followed by our client, hop by hop; pget only ever gets the final, checked URL, and only for a
    known size within LORA_MAX_BYTES (else the Python path streams with the cap enforced as bytes arrive).
  * Retries (408/429/5xx, connection errors, Retry-After) for downloads and Hugging Face metadata calls; one whole
    download may take at most LORA_DOWNLOAD_TIMEOUT seconds (default 1800), headers included: a timer shuts the
    sockets down at the deadline (`_DeadlineSession`), so neither a slow drip nor endless `100 Continue` lasts.
    Bodies are taken only unencoded (Accept-Encoding: identity; a Content-Encoding is refused), so the size cap
    counts the bytes that land on disk.

Cache layout (LORA_CACHE_DIR):
    entries/<sha256(canonical_id)[:32]>/lora.safetensors [+ embeddings.pti, special_params.json] + meta.json
    locks/<same>.lock      per-key inter-process lock (an optimisation: installs are atomic renames anyway)
    tmp/                   in-flight downloads, removed on failure or cancellation, swept on start
meta.json is the sidecar index entry (written before the entry directory is renamed into place); its mtime is
the last-use time for LRU eviction, so the index is rebuilt from disk after a restart.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import email.utils
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import parse_qs, parse_qsl, quote, unquote, unquote_to_bytes, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3

logger = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2

# Network behaviour.  Module-level so tests can shrink them (never sleep long in tests).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
MAX_RETRIES = 4
RETRY_BACKOFF = float(os.environ.get("LORA_RETRY_BACKOFF", "1.0"))  # seconds, doubled each attempt
MAX_RETRY_AFTER = 30.0  # a server asking for more than this is treated as down
MAX_REDIRECTS = 10
CHUNK = 256 * 1024
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_SAFETENSORS_HEADER = 100 * MiB
MAX_SIDE_FILE_BYTES = 64 * MiB  # embeddings.pti / special_params.json in a trainer tar
LORA_FILE_NAME = "lora.safetensors"
DIFFUSERS_DIR = "diffusers"  # a cache entry holding a diffusers pipeline folder (a checkpoint from a HF repo)
# The parts of a diffusers SDXL folder a checkpoint needs: small files verbatim, weights as .safetensors only.
DIFFUSERS_CONFIG_DIRS = ("scheduler", "tokenizer", "tokenizer_2")
DIFFUSERS_WEIGHT_DIRS = ("unet", "text_encoder", "text_encoder_2", "vae")
USER_AGENT = "sdxl-lora-cog/1"

DEFAULT_DOWNLOAD_TIMEOUT = 1800.0  # seconds for one whole download (LORA_DOWNLOAD_TIMEOUT), retries included

# CivitAI baseModel values accepted as SDXL-family (compared lower-case, runs of spaces collapsed, exact match).
# An explicit table, not a prefix: "Pony V7" is AuraFlow-based, "SDXL" lookalikes may not be.
SDXL_FAMILY = frozenset({
    "sdxl", "sdxl 1.0", "sdxl1.0", "sdxl 1", "sdxl 0.9", "sdxl 1.0 lcm", "sdxl lcm", "sdxl distilled", "sdxl turbo",
    "sdxl lightning", "sdxl hyper",
    "pony", "pony diffusion", "pony diffusion v6", "pony diffusion v6 xl", "pony v6", "pony xl",
    "illustrious", "illustrious xl", "noobai", "noob ai", "noobai xl",
})
CIVITAI_LORA_TYPES = frozenset({"lora", "locon", "dora", "lycoris"})
CIVITAI_CHECKPOINT_TYPES = frozenset({"checkpoint"})
CIVITAI_EMBEDDING_TYPES = frozenset({"textualinversion"})
CIVITAI_VAE_TYPES = frozenset({"vae"})
CIVITAI_CONTROLNET_TYPES = frozenset({"controlnet"})  # CivitAI's model type "Controlnet"
# CivitAI version names / baseModelType values that mark a v-prediction checkpoint (NoobAI-XL V-Pred, ...).
_VPRED_MARK = re.compile(r"v[-_ ]?pred", re.IGNORECASE)
CIVITAI_HOSTS = frozenset({"civitai.com", "www.civitai.com", "civitai.red", "civitai.green"})
HF_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
REPLICATE_WEB_HOSTS = frozenset({"replicate.com", "www.replicate.com"})
# Hugging Face files that are training state, not a LoRA: anything under a checkpoint folder (checkpoint-500/,
# checkpoints/) and optimizer / scheduler state files.  A file merely *named* "...checkpoint..." is a candidate.
_HF_SKIP_FOLDER = re.compile(r"checkpoints?(?:[-_]\d+)?", re.IGNORECASE)
_HF_SKIP_FILE = re.compile(r"(?:optimizer|scheduler)(?:[._-][^/]*)?\.safetensors", re.IGNORECASE)

# URL query parameters that sign, authenticate, expire or only label a download: not part of what the URL names,
# so they are left out of the cache key (every other parameter is kept, sorted).  Lower-case.
VOLATILE_QUERY_PREFIXES = ("x-amz-", "x-goog-", "x-ms-")
VOLATILE_QUERY_NAMES = frozenset({
    "signature", "sig", "se", "sp", "sv", "sr", "st", "skoid", "sktid", "skt", "ske", "sks", "skv", "expires",
    "key-pair-id", "policy", "token", "access_token", "auth", "authorization", "api_key", "apikey",
    "response-content-disposition", "response-content-type", "download",
})

# Query parameters that authenticate the caller: never part of a key in clear, but their value *is* (hashed), so
# `?token=A` and `?token=B` never share an entry (B's host is asked with B's token).  Lower-case.
AUTH_QUERY_NAMES = frozenset({"token", "access_token", "auth", "authorization", "api_key", "apikey"})

# SSRF guard: names of cloud metadata services, refused whatever they resolve to.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal",
                            "metadata.tencentyun.com"})
_METADATA = "a link-local / cloud metadata address"
_LOCAL_REASONS = ("a loopback address", "a private-network address")
# The one table of refused addresses: (network, why, always).  `always` rows are refused even with
# LORA_ALLOW_LOCAL_HOSTS=1 (that switch opens loopback and private networks for tests and LAN mirrors, never a
# metadata service).  Checked first to last; an address in no row is refused as private unless it is global.
# Sources: AWS IMDS (169.254.169.254, IPv6 fd00:ec2::254), ECS task metadata (169.254.170.2), GCP/Azure
# (169.254.169.254), Alibaba Cloud (100.100.100.200), Oracle Cloud / OpenStack-style (192.0.0.192).
REFUSED_NETWORKS: tuple[tuple[str, str, bool], ...] = (
    ("169.254.0.0/16", _METADATA, True),
    ("fe80::/10", _METADATA, True),
    ("fd00:ec2::254/128", _METADATA, True),
    ("100.100.100.200/32", _METADATA, True),
    ("192.0.0.192/32", _METADATA, True),
    ("224.0.0.0/4", "a multicast address", True),
    ("ff00::/8", "a multicast address", True),
    ("0.0.0.0/8", "an unspecified address", True),
    ("::/128", "an unspecified address", True),
    ("240.0.0.0/4", "a reserved address", True),
    ("127.0.0.0/8", "a loopback address", False),
    ("::1/128", "a loopback address", False),
    ("10.0.0.0/8", "a private-network address", False),
    ("172.16.0.0/12", "a private-network address", False),
    ("192.168.0.0/16", "a private-network address", False),
    ("100.64.0.0/10", "a private-network address", False),  # carrier-grade NAT
    ("fc00::/7", "a private-network address", False),
)
_REFUSED = tuple((ipaddress.ip_network(net), why, always) for net, why, always in REFUSED_NETWORKS)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses that carry an IPv4 one in their last 32 bits
HF_PREFERRED = "pytorch_lora_weights.safetensors"


# --------------------------------------------------------------------------------------------------- errors
class WeightsError(Exception):
    """Base of every error this module raises; the message is safe to show to the user."""

    def __init__(self, message: str, *, input_name: str | None = None):
        super().__init__(message)
        self.input_name = input_name


class InvalidReferenceError(WeightsError, ValueError):
    """The text is not a reference form we understand."""


class NotFoundError(WeightsError):
    """The repo, model, version or file does not exist (or is invisible without a token)."""


class AuthRequiredError(WeightsError):
    """The source wants a (different) token."""


class ChecksumError(WeightsError):
    """The bytes differ from what the source published, or the file is truncated/corrupt."""


class IncompatibleError(WeightsError):
    """Not an SDXL-family LoRA in safetensors format (wrong base model, pickle, HTML page...)."""


class TooLargeError(WeightsError):
    """Over the per-file cap (most likely a full checkpoint), or no room on disk."""


class NetworkError(WeightsError):
    """The source could not be reached after retries."""


class BlockedHostError(InvalidReferenceError):
    """The URL (or a redirect) points into the machine's own network: link-local / metadata, loopback, private."""


class _RedactedCause(Exception):
    """Stands in for a library exception whose text carried a secret (e.g. a signed URL)."""


def _err(cls: type[WeightsError], input_name: str, what: str, *, expected: str, got: str, hint: str = "") -> WeightsError:
    """One message shape for every error: which input, what happened, what was expected, what came, what to do."""
    msg = f"{input_name}: {what} (expected {expected}; got {got})."
    if hint:
        msg += f" {hint}"
    return cls(msg, input_name=input_name)


def _scrub_chain(err: BaseException, secrets: tuple[str, ...]) -> None:
    """Replace every exception linked from `err` (as __cause__ or __context__, transitively) whose text would leak a
    secret by a redacted stand-in, so neither chain carries it (the stand-in has no chain of its own)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for attr in ("__cause__", "__context__"):
            linked = getattr(node, attr)
            if linked is None:
                continue
            safe = _scrub(linked, secrets)
            if safe is not linked:
                setattr(node, attr, safe)
                if attr == "__context__":
                    node.__suppress_context__ = True
            todo.append(safe)


def _scrub(err: BaseException, secrets: tuple[str, ...]) -> BaseException:
    """Keep `err` as the cause unless its text would leak a secret; then chain a redacted stand-in instead."""
    text = f"{type(err).__name__}: {err}"
    leaked = [s for s in secrets if s and s in text]
    if not leaked:
        return err
    for s in leaked:
        text = text.replace(s, "<redacted>")
    return _RedactedCause(text)


# ------------------------------------------------------------------------------------------------ references
@dataclass(frozen=True)
class WeightsRef:
    """A parsed reference.  `canonical_id` is stable, token-free and query-free; `display` is safe to log.

    Some references still need a look-up before the exact file is known (a CivitAI model id, a Replicate model
    without a version, a Hugging Face branch); `LoraCache.fetch` resolves them and returns the resolved ref in
    `LoraFile.ref`.
    """

    source: str  # "huggingface" | "civitai" | "replicate" | "url" | "data"
    canonical_id: str
    display: str
    repo: str | None = None  # HF "owner/repo" or Replicate "owner/model"
    revision: str | None = None  # HF revision (branch, tag or commit)
    path: str | None = None  # HF file path (or folder to search when `path_is_dir`)
    path_is_dir: bool = False
    model_id: int | None = None  # CivitAI model id
    version_id: str | None = None  # CivitAI model-version id or Replicate version id
    is_tar: bool = False  # the download is a trainer tar to extract
    url: str | None = field(default=None, repr=False, compare=False)  # full URL incl. signed query: never log
    signed: bool = False  # the URL carries signing parameters: which file it is gets asked of the host (ETag)

    @property
    def resolved(self) -> bool:
        """True when the canonical id names exactly one immutable file (no look-up needed)."""
        if self.source == "civitai":
            return self.version_id is not None
        if self.source == "replicate":
            return self.version_id is not None or (self.url is not None and not self.signed)
        if self.source == "huggingface":
            return bool(self.revision and _COMMIT_RE.fullmatch(self.revision) and self.path and not self.path_is_dir)
        return not self.signed


_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"


def _hf_ref(repo: str, revision: str | None, path: str | None, *, is_dir: bool = False) -> WeightsRef:
    revision = unquote(revision) if revision else "main"
    path = unquote(path).strip("/") if path else None
    if path and (path.startswith("/") or ".." in path.split("/")):
        raise InvalidReferenceError(f"bad path in repo: {path!r}")
    if path and not is_dir and not path.endswith(".safetensors"):
        # A path without the extension is a folder to search (e.g. hf://o/r/subfolder).
        is_dir = "." not in path.rsplit("/", 1)[-1]
        if not is_dir:
            raise InvalidReferenceError(f"the file {path!r} is not a .safetensors file")
    where = f"{path}/" if is_dir and path else (path or "")
    cid = f"hf:{repo}@{revision}:{where}"
    display = f"hf://{repo}@{revision}" + (f"/{path}" if path else "")
    return WeightsRef("huggingface", cid, display, repo=repo, revision=revision, path=path, path_is_dir=is_dir or not path)


def _civitai_ref(model_id: str | None, version_id: str | None) -> WeightsRef:
    if version_id is not None and not version_id.isdigit():
        raise InvalidReferenceError(f"modelVersionId must be a number, not {version_id[:20]!r}")
    mid = int(model_id) if model_id else None
    if version_id:
        display = f"civitai model-version {version_id}" + (f" (model {mid})" if mid else "")
        return WeightsRef("civitai", f"civitai:{int(version_id)}", display, model_id=mid, version_id=str(int(version_id)))
    return WeightsRef("civitai", f"civitai-model:{mid}", f"civitai model {mid}", model_id=mid)


def _replicate_ref(repo: str, version: str | None) -> WeightsRef:
    if version:
        return WeightsRef("replicate", f"replicate:{repo}:{version}", f"replicate {repo}:{version}", repo=repo, version_id=version, is_tar=True)
    return WeightsRef("replicate", f"replicate:{repo}", f"replicate {repo}", repo=repo, is_tar=True)


def _volatile(name: str) -> bool:
    return name.lower().startswith(VOLATILE_QUERY_PREFIXES) or name.lower() in VOLATILE_QUERY_NAMES


def _key_query(query: str) -> tuple[str, bool]:
    """(the query parameters that name the file, sorted; whether signing parameters were dropped) for the key.

    Auth parameters (AUTH_QUERY_NAMES: token=...) stay in, value and all: the key is hashed before it is stored
    anywhere, and `?token=A` / `?token=B` must not share an entry (B's host would never be asked).  Signing
    parameters are left out, but a URL that has them is `signed`: the host is asked for the file's ETag on every
    fetch, and only the same ETag shares an entry (see `_resolve_signed`).
    """
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = sorted((k, v) for k, v in pairs if k.lower() in AUTH_QUERY_NAMES or not _volatile(k))
    signed = any(_volatile(k) and k.lower() not in AUTH_QUERY_NAMES and k.lower() not in _LABEL_QUERY_NAMES
                 for k, _ in pairs)
    return urlencode(kept), signed


# Volatile parameters that only label a download (a file name, a content type): dropped, and no sign of signing.
_LABEL_QUERY_NAMES = frozenset({"response-content-disposition", "response-content-type", "download"})
MAX_URL_CHARS = 8192  # longer "URLs" are refused: no weights host needs one, and they would fill logs


def _url_ref(url: str, parts) -> WeightsRef:
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    clean = urlunsplit((parts.scheme.lower(), host + port, parts.path or "/", "", ""))  # no userinfo, query, fragment
    # `.../download?id=1` and `...?id=2` are different files: the remaining query is part of the (hashed) key, while
    # a fresh signature on the same object is not.  The display stays query-free (a query may carry secrets).
    kept, signed = _key_query(parts.query)
    digest = hashlib.sha256((clean + (f"?{kept}" if kept else "")).encode()).hexdigest()
    is_tar = parts.path.lower().endswith(".tar")
    source = "replicate" if host == "replicate.delivery" or host.endswith(".replicate.delivery") else "url"
    prefix = "replicate-delivery" if source == "replicate" else "url"
    return WeightsRef(source, f"{prefix}:{digest}", _short(clean), is_tar=is_tar, url=url, signed=signed)


def _data_ref(text: str) -> WeightsRef:
    payload = _decode_data_url(text)
    digest = hashlib.sha256(payload).hexdigest()
    return WeightsRef("data", f"data:{digest}", f"data: URL ({len(payload)} bytes, sha256 {digest[:12]})", url=text)


def _decode_data_url(text: str) -> bytes:
    head, sep, body = text.partition(",")
    if not sep:
        raise InvalidReferenceError("a data: URL needs a comma before its payload")
    if head.lower().endswith(";base64"):
        try:
            return base64.b64decode(body.strip(), validate=False)
        except (binascii.Error, ValueError) as err:
            raise InvalidReferenceError("the data: URL's base64 payload does not decode") from err
    return unquote_to_bytes(body)


# The reference forms, tried in order against the whole (scheme-normalised) text.  Each builder gets the match.
_HOST_HF = r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)"
_HOST_CIVITAI = r"https?://(?:www\.)?civitai\.(?:com|red|green)"
_HOST_REPLICATE = r"https?://(?:www\.)?replicate\.com"
_PATTERNS: tuple[tuple[str, re.Pattern, Callable[[re.Match], WeightsRef]], ...] = tuple(
    (name, re.compile(rx, re.IGNORECASE if name.startswith("civitai") else 0), build)
    for name, rx, build in (
        ("hf-file", rf"{_HOST_HF}/{_REPO}/(?:blob|resolve)/(?P<rev>[^/?#]+)/(?P<path>[^?#]+)(?:[?#].*)?",
         lambda m: _hf_ref(m["repo"], m["rev"], m["path"])),
        ("hf-tree", rf"{_HOST_HF}/{_REPO}/tree/(?P<rev>[^/?#]+)(?:/(?P<path>[^?#]*))?/?(?:[?#].*)?",
         lambda m: _hf_ref(m["repo"], m["rev"], m["path"], is_dir=True)),
        ("hf-repo", rf"{_HOST_HF}/{_REPO}/?(?:[?#].*)?", lambda m: _hf_ref(m["repo"], None, None)),
        ("hf-scheme", rf"hf://{_REPO}(?:@(?P<rev>[^/]+))?(?:/(?P<path>.+))?",
         lambda m: _hf_ref(m["repo"], m["rev"], m["path"])),
        ("civitai-download", rf"{_HOST_CIVITAI}/api/download/models/(?P<v>\d+)/?(?:[?#].*)?",
         lambda m: _civitai_ref(None, m["v"])),
        ("civitai-model", rf"{_HOST_CIVITAI}/models/(?P<id>\d+)(?:/[^?#]*)?(?:\?(?P<q>[^#]*))?(?:#.*)?",
         lambda m: _civitai_ref(m["id"], _query_value(m["q"], "modelversionid"))),
        ("civitai-air", r"(?:urn:)?(?:air:)?(?P<eco>[a-z0-9]+):(?P<type>[a-z]+):civitai:(?P<id>\d+)(?:@(?P<v>\d+))?",
         lambda m: _air_ref(m)),
        ("replicate-web", rf"{_HOST_REPLICATE}/{_REPO}(?:/versions/(?P<v>[A-Za-z0-9]+))?(?:/_weights)?/?(?:[?#].*)?",
         lambda m: _replicate_ref(m["repo"], m["v"])),
        ("replicate-versions", rf"{_REPO}/versions/(?P<v>[A-Za-z0-9]+)", lambda m: _replicate_ref(m["repo"], m["v"])),
        ("replicate-version", rf"{_REPO}:(?P<v>[A-Za-z0-9]+)", lambda m: _replicate_ref(m["repo"], m["v"])),
        ("replicate-model", _REPO, lambda m: _replicate_ref(m["repo"], None)),
    )
)

# Human-readable list for error messages and the README.
REFERENCE_FORMS = (
    "huggingface.co/owner/repo[/blob|resolve/<rev>/<path>.safetensors]",
    "hf://owner/repo[@rev][/path]",
    "civitai.com/models/<id>[?modelVersionId=<v>]",
    "civitai.com/api/download/models/<v>",
    "urn:air:sdxl:lora:civitai:<id>@<v>",
    "owner/model[:version] (Replicate)",
    "https://.../file.safetensors or .tar",
    "data:...;base64,...",
)

_AIR_ECOSYSTEMS = {"sdxl", "pony", "illustrious", "noobai", "sdxl1"}
_AIR_TYPES = {"lora", "lycoris", "locon", "dora"}


def _query_value(query: str | None, name: str) -> str | None:
    """The first value of a query parameter, the name compared case-insensitively (modelVersionId, modelversionid)."""
    for key, values in parse_qs(query or "").items():
        if key.lower() == name:
            return values[0]
    return None


def _a(kind: str) -> str:
    """The kind with its article, for messages: "a LoRA", "an embedding", "a VAE"."""
    return f"{'an' if kind in ('embedding', 'upscaler') else 'a'} {kind}"


def _air_ref(m: re.Match, types: frozenset[str] | set[str] = _AIR_TYPES, kind: str = "LoRA") -> WeightsRef:
    eco, typ = m["eco"].lower(), m["type"].lower()
    if typ not in types:
        raise InvalidReferenceError(f"the AIR names a {typ!r}, not {_a(kind)}")
    if eco not in _AIR_ECOSYSTEMS:
        raise InvalidReferenceError(f"the AIR is for the {eco!r} ecosystem, not SDXL/Illustrious/Pony")
    return _civitai_ref(m["id"], m["v"])


def _normalise_text(text: str) -> str:
    text = text.strip()
    lower = text.lower()
    bare_hosts = tuple(f"{h}/" for h in (*HF_HOSTS, *CIVITAI_HOSTS, *REPLICATE_WEB_HOSTS, "replicate.delivery"))
    if lower.startswith(bare_hosts):
        text = "https://" + text
    # Scheme and host are case-insensitive (HTTPS://HUGGINGFACE.co/o/r is Hugging Face); userinfo and path are not.
    return re.sub(r"^(https?://)([^@/?#]*@)?([^/?#]*)", lambda m: m[1].lower() + (m[2] or "") + m[3].lower(), text,
                  count=1, flags=re.IGNORECASE)


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _civitai_base() -> str:
    return os.environ.get("CIVITAI_API_BASE", "https://civitai.com").rstrip("/")


def _replicate_api_base() -> str:
    return os.environ.get("REPLICATE_API_BASE", "https://api.replicate.com").rstrip("/")


def _replicate_web_base() -> str:
    """REPLICATE_WEB_BASE, else derived from the API base (api.replicate.com -> replicate.com; a test server as is)."""
    web = os.environ.get("REPLICATE_WEB_BASE")
    if web:
        return web.rstrip("/")
    api = urlsplit(_replicate_api_base())
    host = api.netloc[4:] if api.netloc.startswith("api.") else api.netloc
    return urlunsplit((api.scheme, host, "", "", ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return (p.scheme.lower(), (p.hostname or "").lower(), p.port)


# ------------------------------------------------------------------------------------------------ SSRF guard
def _allow_local_hosts() -> bool:
    """LORA_ALLOW_LOCAL_HOSTS=1: loopback and private-network hosts may be fetched (tests, a LAN mirror)."""
    return os.environ.get("LORA_ALLOW_LOCAL_HOSTS", "").strip().lower() in ("1", "true", "yes", "on")


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d), 6to4 (2002::)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _blocked_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be fetched from (a REFUSED_NETWORKS row, or not global), or None when it may."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        return _blocked_reason(inner)  # ::ffff:169.254.169.254 is 169.254.169.254
    local_ok = _allow_local_hosts()
    for net, why, always in _REFUSED:
        if ip.version == net.version and ip in net:
            return why if always or not local_ok else None
    # Ranges the table does not list (IPv6 link-local scopes, reserved blocks...) by the standard library's flags.
    for flag, why in (("is_link_local", _METADATA), ("is_multicast", "a multicast address"),
                      ("is_unspecified", "an unspecified address"), ("is_reserved", "a reserved address")):
        if getattr(ip, flag):
            return why
    if not ip.is_global and not local_ok:
        return "a private-network address"
    return None


def _check_host(url: str, ctx: "_Context", *, what: str | None = None) -> None:
    """Refuse a URL whose host is, or resolves to (any of its addresses), an address inside the machine's network.

    Called before every request hop (first URL, each redirect target), before pget gets a URL and for the configured
    API bases.  A name that does not resolve is not refused here: the request then fails as a network error.
    `what` names the URL in the message (default: the URL itself, without query or userinfo).
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        return

    def refuse(reason: str, got: str) -> BlockedHostError:
        local = reason in _LOCAL_REASONS
        hint = "Set LORA_ALLOW_LOCAL_HOSTS=1 to allow loopback and private-network hosts." if local else ""
        return _err(BlockedHostError, ctx.input_name, f"{what or _safe_text(url)} points to {reason}",
                    expected="a public http(s) URL", got=got, hint=hint)

    if host in METADATA_HOSTS:
        raise refuse(_METADATA, f"the metadata host name {host!r}")
    try:
        addresses = [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            port = 80
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return  # does not resolve: the request itself fails as a network error, as before
        addresses = []
        for info in infos:
            with contextlib.suppress(ValueError):
                addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
    for ip in addresses:
        reason = _blocked_reason(ip)
        if reason:
            raise refuse(reason, str(ip))


def _rebase(text: str) -> str:
    """A URL on a configured HF_ENDPOINT / CIVITAI_API_BASE host (a mirror or a test server) means that source."""
    for env, public in (("HF_ENDPOINT", "https://huggingface.co"), ("CIVITAI_API_BASE", "https://civitai.com")):
        base = os.environ.get(env, "").rstrip("/")
        if base and text.startswith(base + "/"):
            return public + text[len(base):]
    return text


def parse_lora_ref(text: str, *, input_name: str = "lora_weights", kind: str = "LoRA") -> WeightsRef:
    """Parse what the user pasted into a `WeightsRef` (no network).  Raises InvalidReferenceError.  `kind` (a KINDS
    key) decides which AIR types are accepted."""
    if not isinstance(text, str) or not text.strip():
        raise _err(InvalidReferenceError, input_name, "empty reference", expected="one of " + ", ".join(REFERENCE_FORMS), got="nothing")
    raw = text.strip()
    if raw.lower().startswith("data:"):
        try:
            return _data_ref(raw)
        except InvalidReferenceError as err:
            raise _err(InvalidReferenceError, input_name, str(err), expected="data:[<type>][;base64],<payload>", got="a malformed data: URL") from err
    if len(raw) > MAX_URL_CHARS:
        raise _err(InvalidReferenceError, input_name, "the reference is too long",
                   expected=f"at most {MAX_URL_CHARS} characters (a data: URL may be longer)",
                   got=f"{len(raw)} characters starting {_safe_text(raw)[:60]!r}")
    norm = _rebase(_normalise_text(raw))
    for _name, rx, build in _PATTERNS:
        m = rx.fullmatch(norm)
        if m:
            try:
                return _air_ref(m, KINDS[kind].air_types, kind) if _name == "civitai-air" else build(m)
            except InvalidReferenceError as err:
                raise _err(InvalidReferenceError, input_name, str(err), expected="one of " + ", ".join(REFERENCE_FORMS), got=repr(_safe_text(raw))) from err
    parts = urlsplit(norm)
    if parts.scheme in ("http", "https") and parts.hostname:
        return _url_ref(norm, parts)
    hint = ""
    if parts.scheme and parts.scheme not in ("http", "https", "hf", "data", "urn", "air"):
        hint = "Only http(s), hf:// and data: URLs are accepted."
    elif re.fullmatch(rf"{_NAME}/{_NAME}/.+", raw):
        hint = "For a file in a Hugging Face repo write hf://owner/repo/path or huggingface.co/owner/repo/blob/main/path."
    raise _err(InvalidReferenceError, input_name, f"not a {kind} reference we understand", expected="one of " + ", ".join(REFERENCE_FORMS), got=repr(_safe_text(raw)), hint=hint)


def _short(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters: whatever a caller sent, an error stays a line, not 60 KB."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _safe_text(text: str) -> str:
    """The user's text without query string or userinfo, cut short: fit for an error message."""
    parts = urlsplit(text)
    if parts.scheme in ("http", "https") and parts.hostname:
        port = f":{parts.port}" if parts.port else ""
        text = urlunsplit((parts.scheme, parts.hostname + port, parts.path, "", ""))
    return _short(text)


# ---------------------------------------------------------------------------------------------------- tokens
def _secret_value(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    value = str(value).strip() if value is not None else ""
    return value or None


@dataclass(frozen=True)
class Tokens:
    """Per-request API tokens.  repr shows only which are set."""

    hf: str | None = field(default=None, repr=False)
    civitai: str | None = field(default=None, repr=False)
    replicate: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        flags = ", ".join(f"{k}={'set' if getattr(self, k) else None}" for k in ("hf", "civitai", "replicate"))
        return f"Tokens({flags})"

    @classmethod
    def from_inputs(cls, hf_api_token: Any = None, civitai_api_token: Any = None, replicate_api_token: Any = None) -> "Tokens":
        """From cog.Secret / str / None inputs, falling back to HF_TOKEN / CIVITAI_API_TOKEN / REPLICATE_API_TOKEN."""
        return cls(
            hf=_secret_value(hf_api_token) or _secret_value(os.environ.get("HF_TOKEN")),
            civitai=_secret_value(civitai_api_token) or _secret_value(os.environ.get("CIVITAI_API_TOKEN")),
            replicate=_secret_value(replicate_api_token) or _secret_value(os.environ.get("REPLICATE_API_TOKEN")),
        )

    def secrets(self) -> tuple[str, ...]:
        return tuple(t for t in (self.hf, self.civitai, self.replicate) if t)


# ------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LoraFile:
    ref: WeightsRef
    path: Path
    sha256: str
    size: int
    base_model: str | None = None
    trigger_words: tuple[str, ...] = ()
    embeddings_path: Path | None = None
    special_params: dict = field(default_factory=dict)
    v_prediction: bool = False  # the source's metadata marks a v-prediction checkpoint
    file_name: str | None = None  # the file's name at the source, e.g. "negativeXL_D.safetensors"


@dataclass
class _Context:
    """What one fetch carries through the helpers."""

    input_name: str
    display: str
    tokens: Tokens
    max_bytes: int
    secrets: tuple[str, ...] = ()
    kind: str = "LoRA"  # a KINDS key: what the file must be (messages, CivitAI types, size window, keys)
    min_bytes: int = 0


@dataclass
class _Staged:
    """A verified download sitting in a temporary folder, ready to be renamed into the cache."""

    folder: Path
    sha256: str
    size: int
    base_model: str | None = None
    trigger_words: tuple[str, ...] = ()
    has_embeddings: bool = False
    special_params: dict = field(default_factory=dict)
    v_prediction: bool = False  # CivitAI metadata says v-prediction (checkpoints)
    file_name: str | None = None  # the file's name at the source (an embedding's default name)


# ------------------------------------------------------------------------------------------ verification
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1}


def _describe_body(head: bytes) -> str:
    """What a non-safetensors file most likely is, from its first bytes."""
    s = head.lstrip()[:1]
    if not head:
        return "an empty file"
    if s == b"<":
        return "an HTML/XML page (often a login or error page)"
    if s in (b"{", b"["):
        return "a JSON document (often an API error)"
    if head[:1] == b"\x80":
        return "a Python pickle (.ckpt/.pt/.bin), refused because unpickling can run code"
    if head[:2] == b"PK":
        return "a zip archive (a torch .pt/.pth file)"
    return "a file that is not safetensors"


_SUB_BYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # dtypes smaller than a byte: sizes in bits


def _check_entry(name: str, info: Any) -> tuple[int, int]:
    """(begin, end) of one tensor entry, checked as safetensors' own loader does: a known dtype, a shape of
    non-negative integers, integer offsets with begin <= end, and exactly the bytes the shape needs."""
    if not isinstance(info, dict):
        raise ValueError(f"a corrupt safetensors file (entry {name[:60]!r} is not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731 (no bool, float)
    if not isinstance(dtype, str) or not ints(shape) or not ints(offsets) or len(offsets) != 2:
        raise ValueError(f"a corrupt safetensors file (bad entry {name[:60]!r}: dtype, shape and data_offsets "
                         "must be a string, a list of non-negative integers and two of them)")
    begin, end = offsets
    bits = _SUB_BYTE_BITS.get(dtype) or 8 * _DTYPE_SIZES.get(dtype, 0)
    if not bits:
        raise ValueError(f"a corrupt safetensors file (unknown dtype {dtype[:20]!r} in {name[:60]!r})")
    count = 1
    for d in shape:
        count *= d
    if begin > end or count * bits % 8 or end - begin != count * bits // 8:
        raise ValueError(f"a corrupt safetensors file (inconsistent entry {name[:60]!r})")
    return begin, end


def check_safetensors(path: Path) -> dict:
    """Structural safetensors check without loading tensors; returns the header.  Raises ValueError naming what it is.

    As strict as the safetensors loader, so a file that passes here also loads: the header is a JSON object
    (padding spaces allowed), `__metadata__` maps strings to strings, and the tensors' byte ranges tile the data
    exactly - no overlap, no gap, no trailing bytes.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if size < 8:
            raise ValueError(_describe_body(head))
        # The structure decides, not the first byte: a valid header length can start with any byte (0x80, "<", ...).
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER and f.read(1) == b"{":  # a JSON header follows: safetensors, oversized
            raise ValueError(f"a safetensors header of {n} bytes (at most {MAX_SAFETENSORS_HEADER})")
        if n == 0 or n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise ValueError(_describe_body(head) if n > size else "a truncated or corrupt safetensors file (bad header length)")
        f.seek(8)
        raw = f.read(n)
    try:
        if not raw.startswith(b"{"):
            raise ValueError("not an object")
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: [[[[...]]]] thousands deep
        described = _describe_body(head)
        if described != "a file that is not safetensors":
            raise ValueError(described) from None
        raise ValueError("a corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("a corrupt safetensors file (header is not an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("a corrupt safetensors file (__metadata__ must map strings to strings)")
    data_len = size - 8 - n
    spans = sorted(_check_entry(name, info) for name, info in header.items() if name != "__metadata__")
    if not spans:
        raise ValueError("a safetensors file with no tensors")
    end_max = max(end for _, end in spans)
    if end_max > data_len:
        raise ValueError(f"a truncated safetensors file ({data_len} data bytes, header needs {end_max})")
    at = 0
    for begin, end in spans:
        if begin != at:
            raise ValueError(f"a corrupt safetensors file (tensor data {'overlaps' if begin < at else 'leaves a gap'} "
                             f"at byte {min(begin, at)})")
        at = end
    if at != data_len:
        raise ValueError(f"a corrupt safetensors file ({data_len - at} bytes after the last tensor)")
    return header


# The largest |value| a verified file may hold, by kind (VALUE_BOUNDS).  A LoRA factor, alpha or DoRA scale, and a
# textual-inversion row, are O(1)-O(100) in real files (alpha up to the rank, at most a few hundred): 1e4 leaves
# two orders of margin and still stops 1e30 factors that would turn every activation into Inf.  A checkpoint's
# weights are cast to fp16/bf16 for the GPU: anything past fp16's largest finite value (65504) is Inf there.
VALUE_BOUNDS = {"LoRA": 1e4, "embedding": 1e4, "checkpoint": 65504.0, "VAE": 65504.0}
# dtype -> (unsigned view, mask of the magnitude bits, pattern of +Inf): for IEEE formats the magnitude bits of
# |x| order like |x| itself, with Inf and NaN above every finite value, so one integer max per tensor is the check.
_FLOAT_BITS = {
    "F64": ("<u8", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": ("<u4", 0x7FFF_FFFF, 0x7F80_0000),
    "F16": ("<u2", 0x7FFF, 0x7C00),
    "BF16": ("<u2", 0x7FFF, 0x7F80),
    "F8_E5M2": ("u1", 0x7F, 0x7C),
    "F8_E4M3": ("u1", 0x7F, 0x7F),  # no Inf; 0x7F is NaN, 448 the largest finite value
}


def _bound_bits(dtype: str, bound: float) -> int:
    """The magnitude bits of the largest value of `dtype` that is <= bound (fp8: of its largest finite value, so
    only NaN / Inf are refused in fp8 files; their range, 448 or 57344, is the bound)."""
    import numpy as np

    if dtype == "BF16":
        return int(np.array(bound, "<f4").view("<u4")) >> 16
    if dtype.startswith("F8"):
        return _FLOAT_BITS[dtype][2] - 1
    return int(np.array(bound, {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]).view(_FLOAT_BITS[dtype][0]))


def check_tensor_values(path: Path, header: dict, bound: float) -> None:
    """Every floating-point value in the file is finite with |x| <= bound; raises ValueError naming the tensor.

    Reads the raw bytes tensor by tensor (memory-mapped, in blocks) and compares magnitude bits as integers: about
    0.1 s for a 200 MB fp16 file on one core, against about 3.5 s for a float reduction in PyTorch.
    """
    import numpy as np

    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] not in _FLOAT_BITS:
                continue
            view, mask, inf = _FLOAT_BITS[info["dtype"]]
            limit = _bound_bits(info["dtype"], bound)
            begin, end = info["data_offsets"]
            width = np.dtype(view).itemsize
            step = 16 * MiB * width
            top = 0
            for at in range(8 + n + begin, 8 + n + end, step):
                block = np.asarray(data[at:min(at + step, 8 + n + end)]).view(view)
                if block.size:
                    top = max(top, int((block & mask).max()))
            if top >= inf:
                raise ValueError(f"NaN or Inf values in tensor {name[:80]!r}")
            if top > limit:
                raise ValueError(f"values beyond +-{bound:g} in tensor {name[:80]!r}")
    finally:
        del data


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify_lora(path: Path, ctx: _Context, *, expected_sha256: str | None = None, auth_hint: str = "") -> str:
    """sha256 (when published) + size cap + safetensors structure.  Returns the sha256."""
    size = path.stat().st_size
    if size > ctx.max_bytes:
        raise _too_large(ctx, size)
    if size < ctx.min_bytes:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is too small for a full SDXL {ctx.kind}",
                   expected=f"at least {ctx.min_bytes / MiB:.0f} MiB ({KINDS[ctx.kind].min_env})", got=f"{size / MiB:.1f} MiB",
                   hint="A file this small is most likely a LoRA: pass it in lora_weights instead.")
    if expected_sha256:
        got = _sha256_file(path)
        if got.lower() != expected_sha256.lower():
            # Check the structure first: a login page explains a mismatch better than the checksum does.
            try:
                check_safetensors(path)
            except ValueError as err:
                raise _not_safetensors(ctx, str(err), auth_hint) from err
            raise _err(ChecksumError, ctx.input_name, f"the file from {ctx.display} failed its checksum",
                       expected=f"sha256 {expected_sha256.lower()[:16]}...", got=f"sha256 {got[:16]}... ({size} bytes)",
                       hint="The download was corrupted or the file changed at the source; try again.")
    try:
        header = check_safetensors(path)
    except ValueError as err:
        raise _not_safetensors(ctx, str(err), auth_hint) from err
    _check_values(path, header, ctx)
    # Refused here rather than when used, so a file no SDXL model can use is never cached.
    KINDS[ctx.kind].check_keys(header, ctx)
    return expected_sha256.lower() if expected_sha256 else _sha256_file(path)


def _check_lora_keys(header: dict, ctx: _Context) -> None:
    from sdxl.lora import LoraError, check_peft_metadata, detect_foreign_base

    try:  # hostile or broken PEFT metadata (alpha_pattern, lora_alpha) fails every merge: keep it out of the cache
        check_peft_metadata(header.get("__metadata__") or {}, ctx.display)
    except LoraError as err:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} has unusable PEFT metadata",
                   expected="PEFT lora_alpha / alpha_pattern / rank_pattern as PEFT writes them",
                   got=_short(str(err), 300)) from None
    foreign = detect_foreign_base(k for k in header if k != "__metadata__")
    if foreign:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not an SDXL LoRA",
                   expected="an SDXL-family LoRA (SDXL, Illustrious, NoobAI, Pony)",
                   got=f"{foreign[0]}, e.g. key {foreign[1][:80]!r}",
                   hint="A full SDXL checkpoint goes in the checkpoint input." if "checkpoint" in foreign[0]
                   else "Pick the SDXL/Illustrious version of this LoRA.")


def _check_values(path: Path, header: dict, ctx: _Context, *, what: str = "") -> None:
    """NaN, Inf or absurd values would give a black image reported as success: refuse them at download."""
    bound = VALUE_BOUNDS.get(ctx.kind, VALUE_BOUNDS["checkpoint"])
    try:
        check_tensor_values(path, header, bound)
    except ValueError as err:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display}{what} holds unusable weights",
                   expected=f"finite values within +-{bound:g}", got=str(err),
                   hint=f"The {ctx.kind} file is broken (a diverged training?); use another version.") from None


def _not_safetensors(ctx: _Context, what: str, auth_hint: str) -> WeightsError:
    looks_like_page = what.startswith(("an HTML", "a JSON", "an empty"))
    if auth_hint and looks_like_page:
        return _err(AuthRequiredError, ctx.input_name, f"{ctx.display} answered with a page instead of the file",
                    expected=f"a .safetensors {ctx.kind}", got=what, hint=auth_hint)
    cls = ChecksumError if "truncated" in what or "corrupt" in what else IncompatibleError
    return _err(cls, ctx.input_name, f"{ctx.display} is not a usable {ctx.kind} file", expected=f"a .safetensors {ctx.kind}", got=what,
                hint="Link the .safetensors file itself (pickle .ckpt/.pt files are not accepted).")


def _too_large(ctx: _Context, size: int) -> WeightsError:
    if ctx.kind != "LoRA":
        kind = KINDS[ctx.kind]
        return _err(TooLargeError, ctx.input_name, f"{ctx.display} is too large for an SDXL {ctx.kind}",
                    expected=f"at most {ctx.max_bytes / MiB:.0f} MiB ({kind.max_env})", got=f"{size / MiB:.0f} MiB",
                    hint=kind.too_large_hint)
    return _err(TooLargeError, ctx.input_name, f"{ctx.display} is too large for a LoRA",
                expected=f"at most {ctx.max_bytes / MiB:.0f} MiB (LORA_MAX_BYTES)", got=f"{size / MiB:.0f} MiB",
                hint="A file this large is most likely a full checkpoint, not a LoRA.")


# ------------------------------------------------------------------------------------------ kinds of file
# A1111's SDXL embedding keys (also what CivitAI serves): one table per text encoder, [n_vectors, width].
EMBEDDING_KEYS = ("clip_l", "clip_g")
MAX_EMBEDDING_VECTORS = 75  # one 75-token chunk: A1111's limit for a single embedding to be usable
# The diffusers two-file SDXL form (train_textual_inversion_sdxl.py: learned_embeds.safetensors for the CLIP-L
# encoder, learned_embeds_2.safetensors for CLIP-G), fetched as a folder from a Hugging Face repo.
DIFFUSERS_EMBEDDING_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
_SD1_EMBEDDING_WIDTHS = {768: "an SD 1.x", 1024: "an SD 2.x"}


def _shape(info: Any) -> list:
    return list(info.get("shape") or []) if isinstance(info, dict) else []


def describe_embedding_keys(header: Mapping[str, Any]) -> str | None:
    """None for an SDXL embedding in A1111 form (clip_l + clip_g, 2-D, the same vector count); else what it is."""
    keys = [k for k in header if k != "__metadata__"]
    if all(k in keys for k in EMBEDDING_KEYS):
        shapes = [_shape(header[k]) for k in EMBEDDING_KEYS]
        if any(len(s) != 2 for s in shapes) or shapes[0][0] != shapes[1][0]:
            return f"clip_l/clip_g tables of shapes {shapes[0]} and {shapes[1]} (expected [n, width] with the same n)"
        if not 1 <= shapes[0][0] <= MAX_EMBEDDING_VECTORS:
            return f"an embedding of {shapes[0][0]} vectors (1 to {MAX_EMBEDDING_VECTORS} fit a prompt)"
        return None
    if "emb_params" in keys or "string_to_param" in keys or any(k.startswith("string_to_param.") for k in keys):
        width = (_shape(header.get("emb_params")) or [0])[-1]
        return (f"{_SD1_EMBEDDING_WIDTHS.get(width, 'an SD 1.x/2.x')} textual-inversion embedding "
                f"(A1111's emb_params/string_to_param form, one {width or '?'}-wide table), not SDXL")
    if len(keys) == 1:
        width = (_shape(header[keys[0]]) or [0])[-1]
        sd1 = _SD1_EMBEDDING_WIDTHS.get(width)
        what = f"{sd1} textual-inversion embedding" if sd1 else "one vector table"
        return (f"{what} (a single {width}-wide table {keys[0][:40]!r}), not an SDXL embedding with clip_l and "
                "clip_g (for a diffusers SDXL pair, link the folder holding learned_embeds.safetensors and "
                "learned_embeds_2.safetensors)")
    return f"not an embedding (keys like {', '.join(repr(k[:40]) for k in keys[:3])})"


def _check_embedding_keys(header: dict, ctx: _Context) -> None:
    what = describe_embedding_keys(header)
    if what is not None:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not an SDXL embedding",
                   expected="an SDXL textual-inversion embedding (clip_l [n, 768] and clip_g [n, 1280])", got=what,
                   hint="Pick the SDXL/Illustrious/Pony version of this embedding.")


# The prefix a VAE's keys carry when cut out of an A1111/SGM checkpoint (diffusers' single-file loader strips it).
_VAE_PREFIXES = ("first_stage_model.",)
SDXL_LATENT_CHANNELS = 4


def describe_vae_keys(header: Mapping[str, Any]) -> str | None:
    """None for an SDXL-family VAE (A1111/SGM single-file layout or diffusers names); else what the file is."""
    keys = [k for k in header if k != "__metadata__"]
    if any(k.startswith(("model.diffusion_model.", "conditioner.")) for k in keys):
        return "a full checkpoint (it has a UNet), not a VAE: use the checkpoint input"
    if any(".lora_" in k or "lora_down" in k or k.startswith("lora_") for k in keys):
        return "a LoRA, not a VAE"
    for prefix in ("",) + _VAE_PREFIXES:
        conv_in = header.get(prefix + "decoder.conv_in.weight")
        if conv_in is not None:
            shape = _shape(conv_in)
            if len(shape) != 4 or shape[1] != SDXL_LATENT_CHANNELS:
                return (f"a VAE with {shape[1] if len(shape) == 4 else '?'} latent channels (SDXL's has "
                        f"{SDXL_LATENT_CHANNELS}; 16 is Flux/SD3)")
            if not any(k.startswith(prefix + "encoder.") for k in keys):
                return "a VAE decoder without its encoder (img2img needs both)"
            return None
    return f"not a VAE (keys like {', '.join(repr(k[:40]) for k in keys[:3])})"


def _check_vae_keys(header: dict, ctx: _Context) -> None:
    what = describe_vae_keys(header)
    if what is not None:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not an SDXL VAE",
                   expected="an SDXL VAE (single .safetensors file or a diffusers folder)", got=what)


def _hf_files_in(files: list, prefix: str, names: tuple[str, ...]) -> list | None:
    """The files `names` directly in `prefix`, or None when one is missing."""
    found = {f.path[len(prefix):]: f for f in files if f.path.startswith(prefix) and "/" not in f.path[len(prefix):]}
    return [found[n] for n in names] if all(n in found for n in names) else None


def _hf_vae_folder(files: list, prefix: str) -> list | None:
    """A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""
    for weights_name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        chosen = _hf_files_in(files, prefix, ("config.json", weights_name))
        if chosen:
            return chosen
    return None


def _hf_embedding_folder(files: list, prefix: str) -> list | None:
    return _hf_files_in(files, prefix, DIFFUSERS_EMBEDDING_FILES)


# --- ControlNets (the `control_model` input) ---
# What a file's keys say it is when it is no SDXL ControlNet, first match wins: (test on one key, what it is).
# Key names from diffusers' own loaders (single_file_utils.py CHECKPOINT_KEY_NAMES, the Flux / SD3 ControlNet and
# T2I-Adapter classes) and the layouts of kohya's ControlNet-LLLite and Stability AI's Control-LoRA files.
_NOT_A_CONTROLNET: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda k: k.startswith(("model.diffusion_model.", "conditioner.", "cond_stage_model.")),
     "a full checkpoint (it has a UNet), not a ControlNet: use the checkpoint input"),
    (lambda k: k == "lora_controlnet", "a Control-LoRA (Stability AI's LoRA-style ControlNet), not a full ControlNet"),
    (lambda k: k.startswith("lllite_"), "a ControlNet-LLLite (kohya), not a full ControlNet"),
    (lambda k: ".lora_" in k or "lora_down" in k or "lora_A." in k or k.startswith(("lora_", "lycoris_")),
     "a LoRA, not a ControlNet: use lora_weights"),
    (lambda k: k.startswith(("ip_adapter.", "image_proj.")), "an IP-Adapter, not a ControlNet"),
    (lambda k: k.startswith(("adapter.body.", "body.0.")), "a T2I-Adapter, not a ControlNet"),
    (lambda k: k.startswith(("pos_embed_input.", "joint_blocks.")), "an SD3 ControlNet (a transformer), not SDXL"),
    (lambda k: k.startswith(("single_transformer_blocks.", "controlnet_single_blocks.", "x_embedder.",
                             "controlnet_x_embedder.", "double_blocks.", "single_blocks.")),
     "a Flux ControlNet (a transformer), not SDXL"),
    (lambda k: k.startswith("transformer_blocks."), "a transformer (DiT) ControlNet for Flux/SD3, not SDXL"),
    (lambda k: k.startswith(("decoder.conv_in.", "first_stage_model.")), "a VAE, not a ControlNet"),
)
# The two layouts of an SDXL ControlNet file: diffusers names (what diffusers folders and most single files on the
# Hub / CivitAI hold), and the original ControlNet training layout (ldm names, "control_model." prefix or none).
# (the key of the hint encoder's first conv, the key of SDXL's text-time embedding)
CONTROLNET_LAYOUTS = {
    "diffusers": ("controlnet_cond_embedding.conv_in.weight", "add_embedding.linear_1.weight"),
    "ldm": ("input_hint_block.0.weight", "label_emb.0.0.weight"),
}
_CONTROLNET_LDM_PREFIX = "control_model."
_CROSS_ATTENTION_BASES = {768: "an SD1.x ControlNet (768-wide cross-attention)",
                          1024: "an SD2.x ControlNet (1024-wide cross-attention)"}


def controlnet_layout(keys: Any) -> tuple[str, str] | None:
    """(layout, key prefix) of a ControlNet state dict's names, or None when it is in neither layout."""
    keys = set(keys)
    for prefix in ("", _CONTROLNET_LDM_PREFIX):
        for layout, (hint, _) in CONTROLNET_LAYOUTS.items():
            if prefix + hint in keys:
                return layout, prefix
    return None


def describe_controlnet_keys(header: Mapping[str, Any]) -> str | None:
    """None for an SDXL ControlNet (plain or union, diffusers or ldm names); else what the file is.

    What SDXL needs of a ControlNet, read from names and shapes only (its weights are never loaded here): a hint
    encoder for RGB maps, the text-time embedding SDXL's UNet is conditioned on (SD1.x/2.x ControlNets have none)
    and a cross-attention width other than SD1.x's 768 / SD2.x's 1024. Whether it fits the base model exactly
    (channels, blocks, 2048-wide text) is checked when it is loaded (sdxl/control.py)."""
    keys = [k for k in header if k != "__metadata__"]
    for test, what in _NOT_A_CONTROLNET:
        example = next((k for k in keys if test(k)), None)
        if example is not None:
            return f"{what} (e.g. key {example[:60]!r})"
    found = controlnet_layout(keys)
    if found is None:
        if "conv_in.weight" in keys and any(k.startswith("up_blocks.") for k in keys):
            return "a UNet (diffusers names), not a ControlNet"
        return f"not a ControlNet (keys like {', '.join(repr(k[:40]) for k in keys[:3])})"
    layout, prefix = found
    hint_key, text_time_key = (prefix + k for k in CONTROLNET_LAYOUTS[layout])
    cross = next((_shape(header[k]) for k in keys if k.endswith("attn2.to_k.weight")), [])
    if len(cross) == 2 and cross[1] in _CROSS_ATTENTION_BASES:
        return _CROSS_ATTENTION_BASES[cross[1]]
    if text_time_key not in keys:
        return "a ControlNet without SDXL's text-time embedding (an SD1.x/SD2.x ControlNet)"
    hint = _shape(header[hint_key])
    if len(hint) != 4 or hint[1] != 3:
        return f"a ControlNet for {hint[1] if len(hint) == 4 else '?'}-channel control maps (RGB maps have 3)"
    return None


def _check_controlnet_keys(header: dict, ctx: _Context) -> None:
    what = describe_controlnet_keys(header)
    if what is not None:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not an SDXL ControlNet",
                   expected="an SDXL ControlNet (a single .safetensors file or a diffusers ControlNet folder)",
                   got=what, hint="Pick the SDXL/Illustrious/Pony version of this ControlNet.")


def _check_controlnet_config(path: Path, ctx: _Context) -> None:
    """A diffusers ControlNet folder's config.json: a JSON object naming a ControlNet class (when it names one)."""
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        config = None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(config, dict) or (name is not None and "controlnet" not in str(name).lower()):
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not an SDXL ControlNet",
                   expected="a diffusers ControlNet folder (config.json of a ControlNetModel or ControlNetUnionModel)",
                   got=f"a config.json for {_short(str(name), 60)}" if isinstance(config, dict)
                   else "a config.json that is not a JSON object")


def _hf_controlnet_folder(files: list, prefix: str) -> list | None:
    """A diffusers ControlNet folder: config.json + diffusion_pytorch_model[.fp16].safetensors, fp16 first (a
    ControlNet runs in half precision: half the download of the 5 GB float32 file of a full SDXL ControlNet)."""
    for weights_name in ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"):
        chosen = _hf_files_in(files, prefix, ("config.json", weights_name))
        if chosen:
            return chosen
    return None


@dataclass(frozen=True)
class WeightsKind:
    """What one kind of weights file is, as data: the download path is the same for every kind."""

    name: str  # in messages: "a .safetensors {name}"
    civitai_types: frozenset[str]  # CivitAI model `type`, lower-case
    civitai_label: str  # what a CivitAI model of this kind is called, for messages
    air_types: frozenset[str]  # the type part of an AIR (urn:air:sdxl:<type>:civitai:...)
    max_env: str  # the per-file size cap's environment variable ...
    max_bytes: int  # ... and its default
    min_env: str | None  # the per-file floor (a file below it is not of this kind)
    min_bytes: int
    cache_env: str  # the cache folder's environment variable
    cache_dirs: tuple[str, str]  # default folder: /src/<first> in the Cog image, else ~/.cache/sdxl-lora-cog/<second>
    # (embeddings and VAEs: <LoRA cache folder>/<second>, see _default_kind_dir)
    cache_bytes_env: str  # the cache's byte cap
    cache_bytes: int
    check_keys: Callable[[dict, _Context], None]  # refuses a file of another kind or base model, before caching
    hf_folder: Callable[[list, str], list | None] | None = None  # a Hugging Face folder fetched whole, not one file
    accepts_tar: bool = True  # Replicate trainer outputs, .tar URLs
    accepts_data: bool = True  # data: URLs
    too_large_hint: str = ""
    any_base_model: bool = False  # not tied to a base model (upscalers: CivitAI says baseModel "Other")


def _no_key_check(header: dict, ctx: _Context) -> None:
    """Checkpoints are checked when loaded (utils.inspect_checkpoint), which names what is missing."""


KINDS: dict[str, WeightsKind] = {k.name: k for k in (
    WeightsKind("LoRA", CIVITAI_LORA_TYPES, "a LoRA/LyCORIS model", frozenset({"lora", "lycoris", "locon", "dora"}), "LORA_MAX_BYTES",
                2 * GiB, None, 0, "LORA_CACHE_DIR", ("lora-cache", "loras"), "LORA_CACHE_MAX_BYTES", 20 * GiB,
                _check_lora_keys, too_large_hint="A file this large is most likely a full checkpoint, not a LoRA."),
    WeightsKind("checkpoint", CIVITAI_CHECKPOINT_TYPES, "a Checkpoint model", frozenset({"checkpoint"}), "CHECKPOINT_MAX_BYTES", 16 * GiB,
                "CHECKPOINT_MIN_BYTES", 2 * GiB, "CHECKPOINT_CACHE_DIR", ("checkpoint-cache", "checkpoints"),
                "CHECKPOINT_CACHE_MAX_BYTES", 40 * GiB, _no_key_check, accepts_tar=False, accepts_data=False),
    WeightsKind("embedding", CIVITAI_EMBEDDING_TYPES, "a TextualInversion (embedding) model", frozenset({"embedding", "embeddings", "textualinversion", "ti"}),
                "EMBEDDING_MAX_BYTES", 8 * MiB, None, 0, "EMBEDDING_CACHE_DIR", ("embedding-cache", "embeddings"),
                "EMBEDDING_CACHE_MAX_BYTES", 1 * GiB, _check_embedding_keys, hf_folder=_hf_embedding_folder,
                accepts_tar=False, too_large_hint="An SDXL embedding is a few KB to a few hundred KB."),
    WeightsKind("VAE", CIVITAI_VAE_TYPES, "a VAE model", frozenset({"vae"}), "VAE_MAX_BYTES", 1 * GiB, None, 0, "VAE_CACHE_DIR",
                ("vae-cache", "vaes"), "VAE_CACHE_MAX_BYTES", 4 * GiB, _check_vae_keys, hf_folder=_hf_vae_folder,
                accepts_tar=False, accepts_data=False, too_large_hint="An SDXL VAE is about 160 MB (fp16) or 320 MB."),
    # A full SDXL ControlNet is 2.5 GB in fp16, 5 GB in float32; mid / small variants are smaller. Replicate models
    # and .tar files are taken (a tar holding one .safetensors); data: URLs are not (no input is that large).
    WeightsKind("ControlNet", CIVITAI_CONTROLNET_TYPES, "a Controlnet model", frozenset({"controlnet"}),
                "CONTROLNET_MAX_BYTES", 6 * GiB, None, 0, "CONTROLNET_CACHE_DIR", ("controlnet-cache", "controlnets"),
                "CONTROLNET_CACHE_MAX_BYTES", 20 * GiB, _check_controlnet_keys, hf_folder=_hf_controlnet_folder,
                accepts_data=False, too_large_hint="A full SDXL ControlNet is about 2.5 GB (fp16) or 5 GB (float32)."),
)}


def _check_upscaler_keys(header: dict, ctx: _Context) -> None:
    """spandrel must build the file into an RGB super-resolution model (sdxl/upscale.py), before it is cached."""
    from sdxl.upscale import describe_upscaler

    what = describe_upscaler(header)
    if what is not None:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not an upscaler spandrel can load",
                   expected="an RGB super-resolution model as .safetensors (ESRGAN, RealESRGAN, SwinIR, HAT, DAT, "
                   "SPAN, ...)", got=_short(what, 300))


# Upscalers (the `upscaler_model` input): ESRGAN-family 4x models are 5-70 MB, transformer ones (HAT-L, DAT) up to
# about 200 MB; the cap leaves room and keeps out full checkpoints.
KINDS["upscaler"] = WeightsKind(
    "upscaler", frozenset({"upscaler"}), "an Upscaler model", frozenset({"upscaler"}), "UPSCALER_MAX_BYTES",
    512 * MiB, None, 0, "UPSCALER_CACHE_DIR", ("upscaler-cache", "upscalers"), "UPSCALER_CACHE_MAX_BYTES", 4 * GiB,
    _check_upscaler_keys, any_base_model=True,
    too_large_hint="ESRGAN-family upscalers are 5-70 MB; transformer ones up to about 200 MB.")


# ------------------------------------------------------------------------------------------- HTTP download
def _retry_after(resp: requests.Response | None, attempt: int) -> float:
    """Seconds to wait before the next attempt: Retry-After when given (seconds or HTTP date), else backoff."""
    backoff = RETRY_BACKOFF * (2**attempt)
    if resp is None:
        return backoff
    value = resp.headers.get("Retry-After")
    if not value:
        return backoff
    try:
        wait = float(value)
    except ValueError:
        try:
            wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return backoff
    return max(0.0, min(wait, MAX_RETRY_AFTER))


# ----------------------------------------------------------------------------------- the fetch's deadline
_watched = threading.local()  # .session: the _DeadlineSession whose request is being sent on this thread


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    """Registers each socket it opens with the session sending the request, so the deadline can end it."""

    def _new_conn(self):
        sock = super()._new_conn()
        _watch_socket(sock)
        return sock


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self):
        sock = super()._new_conn()
        _watch_socket(sock)
        return sock


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def _watch_socket(sock: socket.socket) -> None:
    session = getattr(_watched, "session", None)
    if session is not None:
        session.watch(sock)


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, with connection pools whose sockets are watched by the session's deadline."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _DeadlineSession(requests.Session):
    """A session for one fetch that may last until `deadline` (time.monotonic) and not a moment longer.

    Socket timeouts bound each read, not a response: a host dripping its headers a byte a second, or sending
    `100 Continue` forever, keeps every read short and the request alive.  So a timer shuts down every socket the
    session opened when the deadline passes; the blocked read returns at once and the caller reports the timeout.
    """

    def __init__(self, started: float, deadline: float):
        super().__init__()
        self.started, self.deadline = started, deadline
        self.expired = False
        self._sockets: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        adapter = _DeadlineAdapter(max_retries=0)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self._timer: threading.Timer | None = None
        self.rearm(started, deadline)

    def rearm(self, started: float, deadline: float) -> None:
        """A new deadline for the next phase (the download, once the look-ups and the cache lock are done)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self.started, self.deadline, self.expired = started, deadline, False
            self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on a worker thread while this thread waits in short slices.

        Cog cancels a prediction by raising an exception in the predicting thread between two bytecodes, which
        never happens while that thread is blocked in a socket read: a host that stops sending held a cancel for
        up to READ_TIMEOUT.  Here the blocked read is the worker's; the cancellation lands at once, shuts every
        socket of the session (the worker's read returns and it unwinds), and goes on once the worker is done
        (so its files are closed before the caller removes them)."""
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread as it is
                box["error"] = err

        worker = threading.Thread(target=work, name="weights-fetch", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.05)
        except BaseException:
            self._expire()
            worker.join(READ_TIMEOUT)  # only reads outside this session (the Hub client's) can take this long
            raise
        if "error" in box:
            raise box["error"]
        return box["value"]

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in list(self._sockets):
                _shutdown(sock)

    def request(self, *args, **kwargs) -> requests.Response:
        _watched.session = self
        try:
            return super().request(*args, **kwargs)
        finally:
            _watched.session = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _session_deadline(session: requests.Session, ctx: "_Context", have: int = 0) -> None:
    """Raise the timeout error when the fetch's deadline (a _DeadlineSession's) has passed."""
    if isinstance(session, _DeadlineSession) and (session.expired or time.monotonic() > session.deadline):
        _check_deadline(min(session.deadline, time.monotonic() - 1e-6), session.started, ctx, have)


def _wait(session: requests.Session, seconds: float) -> None:
    """Sleep before a retry, never past the fetch's deadline."""
    if isinstance(session, _DeadlineSession):
        seconds = min(seconds, max(0.0, session.deadline - time.monotonic()))
    time.sleep(seconds)


@dataclass
class _Auth:
    """Headers that may only go to one origin (dropped on a cross-host redirect)."""

    headers: dict[str, str]
    origin: tuple[str, str, int | None] | None


def _status_error(resp: requests.Response, ctx: _Context, *, auth_hint: str, not_found: str = "") -> WeightsError:
    code = resp.status_code
    got = f"HTTP {code}"
    if code in (401, 403):
        return _err(AuthRequiredError, ctx.input_name, f"{ctx.display} refused access", expected="the file", got=got,
                    hint=auth_hint or "Check that the link is public.")
    if code in (404, 410):
        return _err(NotFoundError, ctx.input_name, f"{ctx.display} was not found", expected="an existing file", got=got,
                    hint=not_found or "Check the link.")
    if code in RETRY_STATUS:
        return _err(NetworkError, ctx.input_name, f"{ctx.display} kept failing", expected="a successful download",
                    got=f"{got} after {MAX_RETRIES + 1} attempts", hint="The source seems down; try again later.")
    return _err(NetworkError, ctx.input_name, f"{ctx.display} answered with an error", expected="HTTP 200", got=got)


def _open(session: requests.Session, url: str, ctx: _Context, auth: _Auth, *, extra: Mapping[str, str] | None = None,
          auth_hint: str = "", not_found: str = "", method: str = "GET", follow: bool = True) -> requests.Response:
    """One request with retries (408/429/5xx, connection errors, Retry-After) and manual, bounded redirects.

    Redirects are followed here rather than by requests so that http(s) is enforced on every hop and the auth
    headers are only sent to the origin they belong to (CivitAI redirects to a pre-signed storage URL).
    Returns a streaming response with a 2xx status (or the redirect itself when follow=False).
    """
    attempt = 0
    hops = 0
    while True:
        _session_deadline(session, ctx)
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise _err(InvalidReferenceError, ctx.input_name, f"{ctx.display} redirected to a non-http URL",
                       expected="http(s)", got=f"{scheme}:")
        _check_host(url, ctx, what=f"{ctx.display} redirected to {_safe_text(url)}, which" if hops else None)
        headers = {"User-Agent": USER_AGENT, **(extra or {})}
        if auth.origin is not None and _origin(url) == auth.origin:
            headers.update(auth.headers)
        try:
            resp = session.request(method, url, headers=headers, stream=True, allow_redirects=False,
                                   timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            # Headers cut by the deadline's shutdown end like complete ones (EOF ends the header block): check.
            _session_deadline(session, ctx)
        except (requests.ConnectionError, requests.Timeout) as err:
            _session_deadline(session, ctx)
            if attempt >= MAX_RETRIES:
                raise _err(NetworkError, ctx.input_name, f"could not reach {ctx.display}", expected="a response",
                           got=f"{type(err).__name__} after {attempt + 1} attempts", hint="Check the link or try again later.") from _scrub(err, ctx.secrets)
            _wait(session, _retry_after(None, attempt))
            attempt += 1
            continue
        except requests.RequestException as err:
            _session_deadline(session, ctx)
            raise _err(NetworkError, ctx.input_name, f"request to {ctx.display} failed", expected="a response",
                       got=type(err).__name__) from _scrub(err, ctx.secrets)
        if resp.is_redirect and follow:
            resp.close()
            hops += 1
            if hops > MAX_REDIRECTS:
                raise _err(NetworkError, ctx.input_name, f"{ctx.display} redirected too often", expected=f"at most {MAX_REDIRECTS} redirects", got=f"{hops}")
            url = urljoin(url, resp.headers.get("Location", ""))
            query = urlsplit(url).query
            if query and query not in ctx.secrets:
                ctx.secrets = ctx.secrets + (query,)  # a pre-signed location: keep it out of error causes
            if "login" in urlsplit(url).path.lower() or "signin" in urlsplit(url).path.lower():
                raise _err(AuthRequiredError, ctx.input_name, f"{ctx.display} redirected to a login page", expected="the file",
                           got="a login redirect", hint=auth_hint or "The file is not public.")
            continue
        if resp.status_code in RETRY_STATUS and attempt < MAX_RETRIES:
            wait = _retry_after(resp, attempt)
            resp.close()
            logger.info("%s: HTTP %s, retrying in %.2fs", ctx.display, resp.status_code, wait)
            _wait(session, wait)
            attempt += 1
            continue
        if resp.status_code >= 400:
            resp.close()
            raise _status_error(resp, ctx, auth_hint=auth_hint, not_found=not_found)
        return resp


def _json(session: requests.Session, url: str, ctx: _Context, auth: _Auth, *, auth_hint: str = "", not_found: str = "") -> Any:
    resp = _open(session, url, ctx, auth, extra={"Accept": "application/json"}, auth_hint=auth_hint, not_found=not_found)
    try:
        return resp.json()
    except ValueError:
        _session_deadline(session, ctx)  # a body cut by the deadline is not JSON: say what happened
        raise _err(NetworkError, ctx.input_name, f"{ctx.display}: the API answered with something that is not JSON",
                   expected="JSON", got=resp.headers.get("Content-Type", "no content type")) from None
    finally:
        resp.close()


def _download_timeout() -> float:
    """LORA_DOWNLOAD_TIMEOUT: seconds one download may take in all (retries and resumes included)."""
    value = os.environ.get("LORA_DOWNLOAD_TIMEOUT", "").strip()
    try:
        return float(value) if value else DEFAULT_DOWNLOAD_TIMEOUT
    except ValueError:
        logger.warning("LORA_DOWNLOAD_TIMEOUT=%r is not a number; using %.0f", value, DEFAULT_DOWNLOAD_TIMEOUT)
        return DEFAULT_DOWNLOAD_TIMEOUT


def _check_deadline(deadline: float, started: float, ctx: _Context, have: int) -> None:
    if time.monotonic() > deadline:
        raise _err(NetworkError, ctx.input_name, f"the download of {ctx.display} took too long",
                   expected=f"at most {deadline - started:.3g}s "
                            f"({'INPUT' if ctx.kind == 'image' else 'LORA'}_DOWNLOAD_TIMEOUT)",
                   got=f"{have} bytes after {time.monotonic() - started:.3g}s",
                   hint="The source is too slow; try again later or use another mirror.")


def _body_chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: a block is returned as soon as *some* bytes came (read1), not after CHUNK bytes,
    so the caller sees every trickle and can enforce its deadline.  Errors are mapped like iter_content does."""
    raw = resp.raw
    read = raw.read1 if hasattr(raw, "read1") else raw.read
    while True:
        try:
            block = read(CHUNK, decode_content=False)  # we ask for identity; an encoded body is refused first
        except urllib3.exceptions.ReadTimeoutError as err:
            raise requests.ConnectionError(err) from err
        except urllib3.exceptions.ProtocolError as err:
            raise requests.exceptions.ChunkedEncodingError(err) from err
        except urllib3.exceptions.DecodeError as err:
            raise requests.exceptions.ContentDecodingError(err) from err
        except urllib3.exceptions.SSLError as err:
            raise requests.exceptions.SSLError(err) from err
        if not block:
            return
        yield block


def _http_download(session: requests.Session, url: str, dest: Path, ctx: _Context, auth: _Auth, *, auth_hint: str = "",
                   not_found: str = "", max_bytes: int | None = None, deadline: float | None = None) -> None:
    """Stream `url` to `dest`, resuming with Range after a dropped connection, enforcing the size cap early and an
    overall deadline (LORA_DOWNLOAD_TIMEOUT) on every block, so a server dripping bytes forever is cut off."""
    cap = max_bytes or ctx.max_bytes
    started = session.started if isinstance(session, _DeadlineSession) else time.monotonic()
    deadline = deadline if deadline is not None else started + _download_timeout()
    attempt = 0
    with dest.open("wb") as out:
        total: int | None = None
        while True:
            _check_deadline(deadline, started, ctx, out.tell())
            have = out.tell()
            extra = {"Accept-Encoding": "identity"}
            if have:
                extra["Range"] = f"bytes={have}-"
            resp = _open(session, url, ctx, auth, extra=extra, auth_hint=auth_hint, not_found=not_found)
            try:
                if have and resp.status_code != 206:
                    out.seek(0)  # the server ignored Range: start over
                    out.truncate()
                    have = 0
                encoding = resp.headers.get("Content-Encoding", "").strip().lower()
                if encoding not in ("", "identity"):
                    # Decoding would let a few hundred bytes become gigabytes (gzip of gzip of zeros), past any cap
                    # on what came over the wire.  No weights host needs it: they send the file as it is.
                    raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} sent an encoded body",
                               expected="the file itself (we ask for Accept-Encoding: identity)",
                               got=f"Content-Encoding: {_short(encoding, 40)}")
                ctype = resp.headers.get("Content-Type", "").lower()
                if ctype.startswith("text/html"):
                    raise _not_safetensors(ctx, "an HTML/XML page (often a login or error page)", auth_hint)
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit():
                    total = have + int(length)
                    if total > cap:
                        raise _too_large(ctx, total)
                try:
                    for block in _body_chunks(resp):
                        out.write(block)
                        if out.tell() > cap:
                            raise _too_large(ctx, out.tell())
                        _check_deadline(deadline, started, ctx, out.tell())
                    _session_deadline(session, ctx, out.tell())  # a body ended by the deadline's shutdown
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                    _session_deadline(session, ctx, out.tell())
                    if attempt >= MAX_RETRIES:
                        raise _err(NetworkError, ctx.input_name, f"the download of {ctx.display} kept breaking off",
                                   expected=f"{total or '?'} bytes", got=f"{out.tell()} bytes") from _scrub(err, ctx.secrets)
                    attempt += 1
                    _wait(session, _retry_after(None, attempt - 1))
                    continue
            finally:
                resp.close()
            if total is not None and out.tell() < total:
                _session_deadline(session, ctx, out.tell())
                if attempt >= MAX_RETRIES:
                    raise _err(NetworkError, ctx.input_name, f"the download of {ctx.display} was cut short",
                               expected=f"{total} bytes", got=f"{out.tell()} bytes", hint="Try again later.")
                attempt += 1
                _wait(session, _retry_after(None, attempt - 1))
                continue
            return


# ------------------------------------------------------------------------------------------------- pget
PGET_MIN_BYTES = int(os.environ.get("LORA_PGET_MIN_BYTES", str(64 * MiB)))  # below this the Python path is as fast
PGET_TIMEOUT = 30 * 60.0


def _pget(url: str, dest: Path, ctx: _Context, *, timeout: float | None = None) -> bool:
    """Download with pget when it is on PATH.  Returns False (caller falls back to Python) when pget fails.

    Only hand it a URL whose redirects our own client has already followed and checked (see `_pget_target`):
    pget follows redirects by itself, past the SSRF guard.  Only used for URLs that need no auth header: the URL
    (maybe pre-signed) is in pget's argv, never in logs.
    """
    exe = shutil.which("pget")
    if not exe:
        return False
    _check_host(url, ctx)
    started = time.monotonic()
    try:
        proc = subprocess.run([exe, url, str(dest)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=max(1.0, min(PGET_TIMEOUT, timeout if timeout is not None else PGET_TIMEOUT)))
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("%s: pget failed (%s); using the Python downloader", ctx.display, type(err).__name__)
        dest.unlink(missing_ok=True)
        return False
    if proc.returncode != 0 or not dest.is_file():
        logger.warning("%s: pget exited with %s; using the Python downloader", ctx.display, proc.returncode)
        dest.unlink(missing_ok=True)
        return False
    logger.debug("%s: pget took %.1fs", ctx.display, time.monotonic() - started)
    return True


def _probe_size(resp: requests.Response) -> int | None:
    """The full size from a 200's Content-Length (None when absent, or for a partial answer)."""
    if resp.status_code != 200:
        return None
    length = resp.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _pget_target(session: requests.Session, url: str, ctx: _Context, auth: _Auth, *, size_hint: int | None, cap: int,
                 auth_hint: str = "", not_found: str = "") -> str | None:
    """The URL to hand pget, or None to use the Python downloader.

    Our client follows (and checks, hop by hop) the redirects with a GET that is closed after the headers, so pget
    only ever gets the final, already-checked location; the size comes from that answer's Content-Length.  pget is used only for a known size (the
    answer's, else `size_hint`) within the cap; an oversize answer is refused here, before pget runs.
    """
    resp = _open(session, url, ctx, auth, extra={"Accept-Encoding": "identity"}, auth_hint=auth_hint, not_found=not_found)
    try:
        final = resp.url or url
        size = _probe_size(resp)
        html = resp.headers.get("Content-Type", "").lower().startswith("text/html")
    finally:
        resp.close()
    size = size if size is not None else size_hint
    if size is not None and size > cap:
        raise _too_large(ctx, size)
    if size is None or size < PGET_MIN_BYTES or html:
        return None  # unknown size: stream in Python with the cap enforced as it arrives
    if auth.headers and auth.origin is not None and _origin(final) == auth.origin:
        return None  # would need the auth header, which never goes into pget's argv
    return final


def _download_url(session: requests.Session, url: str, dest: Path, ctx: _Context, auth: _Auth, *, size_hint: int | None,
                  auth_hint: str = "", not_found: str = "", cap: int | None = None) -> None:
    """pget for large files of known size when possible, the Python path otherwise (and as the fallback)."""
    cap = cap or ctx.max_bytes
    if size_hint is not None and size_hint > cap:
        raise _too_large(ctx, size_hint)
    deadline = session.deadline if isinstance(session, _DeadlineSession) else time.monotonic() + _download_timeout()
    if shutil.which("pget") and (size_hint is None or size_hint >= PGET_MIN_BYTES):
        target = _pget_target(session, url, ctx, auth, size_hint=size_hint, cap=cap, auth_hint=auth_hint, not_found=not_found)
        if target and _pget(target, dest, ctx, timeout=deadline - time.monotonic()):
            if dest.stat().st_size > cap:
                raise _too_large(ctx, dest.stat().st_size)
            return
    _http_download(session, url, dest, ctx, auth, auth_hint=auth_hint, not_found=not_found, max_bytes=cap, deadline=deadline)


# -------------------------------------------------------------------------------------------- tar files
@contextlib.contextmanager
def _tar_errors(ctx: _Context) -> Iterator[None]:
    """A tar cut short or corrupt fails only when its members are read: say so, naming the input."""
    try:
        yield
    except (tarfile.TarError, EOFError) as err:
        raise _not_safetensors(ctx, f"a truncated or corrupt tar archive ({err})", "") from err


MAX_TAR_MEMBERS = 256  # a trainer tar holds 3 files and a folder or two; thousands of members are a bomb
# What a trainer tar is not: the archive kinds that expand (a few KB of bzip2 can claim terabytes), by magic bytes.
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                     (b"PK\x03\x04", "zip"), (b"7z\xbc\xaf", "7z"))


def _is_plain_tar(head: bytes) -> bool:
    """A ustar / GNU / PAX tar header: 'ustar' at offset 257 (Python, GNU tar and Replicate's trainers write it)."""
    return len(head) >= 262 and head[257:262] == b"ustar"


def _tar_member_problem(m: tarfile.TarInfo) -> str | None:
    """Why a member has no place in a trainer tar (None: a regular file or a folder)."""
    if m.issparse() or any(k.startswith("GNU.sparse") for k in m.pax_headers):
        return f"a sparse file {_short(m.name, 60)!r} (its holes would expand on extraction)"
    if m.islnk() or m.issym():
        return f"a link {_short(m.name, 60)!r}"
    if not (m.isreg() or m.isdir()):
        return f"a device, FIFO or other special member {_short(m.name, 60)!r}"
    return None


def _extract_trainer_tar(tar_path: Path, folder: Path, ctx: _Context, *, deadline: float | None = None,
                         started: float | None = None) -> tuple[bool, dict]:
    """Safely pull lora.safetensors (+ embeddings.pti, special_params.json) out of a trainer tar into `folder`.

    Only what a trainer tar holds is accepted: an uncompressed tar (Replicate's trainers write `tarfile.open(...,
    "w")`), so nothing expands and the extracted bytes never exceed the downloaded ones; at most MAX_TAR_MEMBERS
    members, each a regular file or a folder (no sparse files, links or devices); read within the download's
    deadline.  Only regular files are read, by name, never extracted as given: absolute paths and `..` can't
    escape the folder.  Flux-style tars with exactly one .safetensors are accepted too.
    """
    started = started if started is not None else time.monotonic()
    with tar_path.open("rb") as f:
        head = f.read(512)
    packed = next((name for magic, name in _COMPRESSED_MAGIC if head.startswith(magic)), None)
    if packed or not _is_plain_tar(head):
        what = f"a {packed}-compressed archive" if packed else f"not a tar archive ({_describe_body(head[:16])})"
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not a usable trainer output",
                   expected="an uncompressed .tar holding lora.safetensors (what Replicate's trainers write)",
                   got=what, hint="Link the .safetensors file itself, or the trainer's .tar as it is.")
    archive_bytes = tar_path.stat().st_size

    def refuse(what: str) -> WeightsError:
        return _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not a usable trainer output",
                    expected=f"a trainer tar: at most {MAX_TAR_MEMBERS} regular files and folders", got=what)

    with _tar_errors(ctx), tarfile.open(tar_path, "r:") as tf:
        members: list[tarfile.TarInfo] = []
        count = 0
        while True:
            if deadline is not None:
                _check_deadline(deadline, started, ctx, archive_bytes)
            m = tf.next()  # one header at a time: a stream of 450 000 members stops at MAX_TAR_MEMBERS
            if m is None:
                break
            count += 1
            if count > MAX_TAR_MEMBERS:
                raise refuse(f"more than {MAX_TAR_MEMBERS} members")
            problem = _tar_member_problem(m)
            if problem:
                raise refuse(problem)
            if m.offset_data + m.size > archive_bytes:
                raise _not_safetensors(ctx, f"a truncated or corrupt tar archive ({_short(m.name, 60)!r} runs past "
                                            "the end)", "")
            if m.isreg():
                members.append(m)

        def safe(m: tarfile.TarInfo) -> bool:
            parts = Path(m.name).parts
            return not m.name.startswith("/") and ".." not in parts

        by_base: dict[str, list[tarfile.TarInfo]] = {}
        for m in members:
            if safe(m):
                by_base.setdefault(Path(m.name).name, []).append(m)
        weights = by_base.get("lora.safetensors") or [m for m in members if safe(m) and m.name.endswith(".safetensors")]
        if len(weights) != 1:
            names = sorted(_short(m.name, 60) for m in members if m.name.endswith(".safetensors"))[:10]
            raise _err(IncompatibleError, ctx.input_name, f"{ctx.display}: can't tell which file in the tar is the {ctx.kind}",
                       expected="lora.safetensors or a single .safetensors", got=", ".join(names) or "no .safetensors file")

        def copy(m: tarfile.TarInfo, name: str, cap: int) -> None:
            if m.size > cap:
                raise _too_large(ctx, m.size)
            src = tf.extractfile(m)
            assert src is not None
            with src, (folder / name).open("wb") as out:
                for block in iter(lambda: src.read(CHUNK), b""):
                    out.write(block)
                    if deadline is not None:
                        _check_deadline(deadline, started, ctx, out.tell())

        copy(weights[0], LORA_FILE_NAME, ctx.max_bytes)
        has_emb = False
        params: dict = {}
        if by_base.get("embeddings.pti"):
            copy(by_base["embeddings.pti"][0], "embeddings.pti", MAX_SIDE_FILE_BYTES)
            has_emb = True
        if by_base.get("special_params.json"):
            copy(by_base["special_params.json"][0], "special_params.json", MAX_SIDE_FILE_BYTES)
            try:
                loaded = json.loads((folder / "special_params.json").read_text("utf-8"))
                params = loaded if isinstance(loaded, dict) else {}
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                logger.warning("%s: special_params.json is not valid JSON; ignored", ctx.display)
    if has_emb:
        _check_embeddings(folder / "embeddings.pti", ctx)
    return has_emb, params


def _check_embeddings(path: Path, ctx: _Context) -> None:
    """embeddings.pti is a safetensors file of token rows: as strict a check as the LoRA's, values included."""
    try:
        header = check_safetensors(path)
    except ValueError as err:
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display}: the trainer's embeddings.pti is unusable",
                   expected="a safetensors file of token embeddings", got=str(err)) from None
    _check_values(path, header, ctx, what=" (embeddings.pti)")


# ------------------------------------------------------------------------------------------------- sources
_HF_TOKEN_HINT = "If the repo is private or gated, accept its terms on Hugging Face and pass hf_api_token."
_CIVITAI_TOKEN_HINT = "This CivitAI model needs a token: pass civitai_api_token (CivitAI > Account settings > API keys)."
_REPLICATE_TOKEN_HINT = "If the Replicate model is private, set REPLICATE_API_TOKEN."


def _hf_error(err: Exception, ctx: _Context, ref: WeightsRef) -> WeightsError:
    """Map huggingface_hub's exceptions onto ours."""
    from huggingface_hub import errors as hf_errors

    resp = getattr(err, "response", None)
    code = getattr(resp, "status_code", None)
    got = f"HTTP {code}" if code else type(err).__name__
    if isinstance(err, hf_errors.GatedRepoError):
        return _err(AuthRequiredError, ctx.input_name, f"{ctx.display} is a gated repo", expected="access to the repo", got=got,
                    hint="Accept the model's terms on Hugging Face, then pass hf_api_token.")
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        if code == 401 and not ctx.tokens.hf:
            return _err(AuthRequiredError, ctx.input_name, f"{ctx.display} needs a Hugging Face token (or does not exist)",
                        expected="a public repo or hf_api_token", got=got, hint="Pass hf_api_token if the repo is private.")
        return _err(NotFoundError, ctx.input_name, f"Hugging Face repo {ref.repo} was not found", expected="an existing repo",
                    got=got, hint=_HF_TOKEN_HINT)
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return _err(NotFoundError, ctx.input_name, f"revision {ref.revision!r} of {ref.repo} was not found",
                    expected="a branch, tag or commit of the repo", got=got)
    if isinstance(err, (hf_errors.RemoteEntryNotFoundError, hf_errors.EntryNotFoundError)):
        return _err(NotFoundError, ctx.input_name, f"{ctx.display} was not found in the repo", expected="an existing file", got=got)
    if code in (401, 403):
        return _err(AuthRequiredError, ctx.input_name, f"{ctx.display} refused access", expected="the file", got=got, hint=_HF_TOKEN_HINT)
    if code == 404:
        return _err(NotFoundError, ctx.input_name, f"{ctx.display} was not found", expected="an existing file", got=got)
    return _err(NetworkError, ctx.input_name, f"could not download {ctx.display} from Hugging Face", expected="a response",
                got=got, hint="Try again later.")


@contextlib.contextmanager
def _hf_catch(ctx: _Context, ref: WeightsRef) -> Iterator[None]:
    """Turn huggingface_hub / httpx2 failures into our errors (keeping the cause)."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, hf_errors.EntryNotFoundError,
            hf_errors.FileMetadataError, httpx2.HTTPError) as err:
        raise _hf_error(err, ctx, ref) from _scrub(err, ctx.secrets)
    except OSError as err:
        if err.errno is not None:  # a real I/O error (a full disk...): the cache maps it
            raise
        # huggingface_hub's "Consistency check failed": the body's size is not the one the Hub lists.
        size = re.search(r"has size (\d+)", str(err))
        raise _err(ChecksumError, ctx.input_name, f"the download of {ctx.display} does not match the Hub's listing",
                   expected="the size the Hub lists", got=f"{size[1]} bytes" if size else "another size",
                   hint="The download was cut short or replaced (a login or error page?); try again.") from _scrub(err, ctx.secrets)


def _hf_retry(call: Callable[[], Any], ctx: _Context, *, retries: int | None = None) -> Any:
    """A Hugging Face metadata call with the module's retry policy: 408/429/5xx and connection errors are retried
    (at most `retries`, default MAX_RETRIES, times; Retry-After honoured, else RETRY_BACKOFF doubled each time)."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    limit = MAX_RETRIES if retries is None else retries
    attempt = 0
    while True:
        try:
            return call()
        except hf_errors.HfHubHTTPError as err:
            resp = getattr(err, "response", None)
            if getattr(resp, "status_code", None) not in RETRY_STATUS or attempt >= limit:
                raise
            wait = _retry_after(resp, attempt)
            logger.info("%s: Hugging Face answered HTTP %s, retrying in %.2fs", ctx.display, resp.status_code, wait)
        except (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError):
            if attempt >= limit:
                raise
            wait = _retry_after(None, attempt)
        time.sleep(wait)
        attempt += 1


@dataclass(frozen=True)
class _Plan:
    """A resolved reference: the cache key and how to produce the file."""

    ref: WeightsRef  # resolved
    produce: Callable[[Path, requests.Session, _Context], _Staged]  # writes into a temp folder


def _hf_training_state(path: str) -> bool:
    """True for files of a training run rather than a LoRA: inside checkpoint-500/ or checkpoints/ folders, and
    optimizer / scheduler state files.  "my_checkpoint_style.safetensors" is not skipped."""
    *folders, name = path.split("/")
    return any(_HF_SKIP_FOLDER.fullmatch(d) for d in folders) or bool(_HF_SKIP_FILE.fullmatch(name))


def _pick_hf_file(files: list, ref: WeightsRef, ctx: _Context):
    prefix = (ref.path + "/") if ref.path else ""
    in_scope = [f for f in files if f.path.startswith(prefix)]
    cands = [f for f in in_scope if f.path.endswith(".safetensors") and not _hf_training_state(f.path)]
    preferred = [f for f in cands if f.path.rsplit("/", 1)[-1] == HF_PREFERRED and ctx.kind == "LoRA"]
    if preferred:
        return min(preferred, key=lambda f: f.path.count("/"))  # top-most wins over a copy in a subfolder
    if len(cands) == 1:
        return cands[0]
    where = f"{ref.repo}" + (f"/{ref.path}" if ref.path else "")
    if not cands:
        raise _err(NotFoundError, ctx.input_name, f"no .safetensors file in Hugging Face repo {where}",
                   expected="a .safetensors LoRA", got=f"{len(in_scope)} other files")
    names = ", ".join(sorted(f.path for f in cands)[:12])
    raise _err(InvalidReferenceError, ctx.input_name, f"Hugging Face repo {where} has several .safetensors files",
               expected=f"one file, or {HF_PREFERRED}", got=names,
               hint=f"Name the file, e.g. hf://{ref.repo}@{ref.revision}/{sorted(f.path for f in cands)[0]}.")


def _resolve_hf(ref: WeightsRef, ctx: _Context) -> _Plan:
    """Pin the revision to a commit and the file to one path (2 API calls), so the cache key is immutable."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    endpoint = _hf_endpoint()
    _check_host(endpoint + "/", ctx, what=f"HF_ENDPOINT {_safe_text(endpoint)}")
    api = HfApi(endpoint=endpoint)
    token = ctx.tokens.hf or False  # False: never fall back to a global login
    with _hf_catch(ctx, ref):
        sha = ref.revision if _COMMIT_RE.fullmatch(ref.revision or "") else \
            _hf_retry(lambda: api.model_info(ref.repo, revision=ref.revision, token=token), ctx).sha
        # list_repo_tree already retries 429/5xx inside huggingface_hub (http_backoff, 5 tries): one more outer
        # attempt covers what it does not (408, other transport errors) without multiplying the waits.
        tree = _hf_retry(lambda: list(api.list_repo_tree(ref.repo, recursive=True, revision=sha, token=token)), ctx,
                         retries=1)
        files = [f for f in tree if isinstance(f, RepoFile)]
    if ref.path_is_dir:
        prefix = (ref.path + "/") if ref.path else ""
        if ctx.kind == "checkpoint" and any(f.path == prefix + "model_index.json" for f in files):
            return _hf_diffusers_plan(ref, ctx, sha, files, prefix, endpoint, token)
        folder = KINDS[ctx.kind].hf_folder
        if folder is not None and folder(files, prefix):
            return _hf_files_plan(ref, ctx, sha, folder(files, prefix), prefix, endpoint, token)
        chosen = _pick_hf_file(files, ref, ctx)
    else:
        chosen = next((f for f in files if f.path == ref.path), None)
        if chosen is None:
            raise _err(NotFoundError, ctx.input_name, f"{ref.path} is not in Hugging Face repo {ref.repo}@{ref.revision}",
                       expected="an existing file", got="no such path",
                       hint="Files there: " + ", ".join(sorted(f.path for f in files if f.path.endswith(".safetensors"))[:10]))
    resolved = dataclasses.replace(ref, canonical_id=f"hf:{ref.repo}@{sha}:{chosen.path}", revision=sha, path=chosen.path,
                                   path_is_dir=False, display=f"hf://{ref.repo}@{ref.revision}/{chosen.path}")
    lfs_sha = chosen.lfs.sha256 if getattr(chosen, "lfs", None) else None
    size = chosen.lfs.size if getattr(chosen, "lfs", None) else chosen.size

    def produce(tmp: Path, session: requests.Session, c: _Context) -> _Staged:
        from huggingface_hub import hf_hub_download

        if size > c.max_bytes:
            raise _too_large(c, size)
        dest = tmp / LORA_FILE_NAME
        url = f"{endpoint}/{ref.repo}/resolve/{sha}/{quote(chosen.path)}"
        target = None
        if not ctx.tokens.hf and size >= PGET_MIN_BYTES and shutil.which("pget"):
            # The resolve URL redirects (to a CDN): follow and check the hops ourselves, then give pget the end.
            try:
                target = _pget_target(session, url, c, _Auth({}, None), size_hint=size, cap=c.max_bytes)
            except (NetworkError, NotFoundError, AuthRequiredError):
                target = None  # let huggingface_hub try, and explain its failure
        if target and _pget(target, dest, c, timeout=_download_timeout()):
            pass
        else:
            with _hf_catch(c, resolved):
                got = hf_hub_download(ref.repo, chosen.path, revision=sha, local_dir=tmp / "hf", token=token,
                                      endpoint=endpoint, etag_timeout=CONNECT_TIMEOUT)
            os.replace(got, dest)
            shutil.rmtree(tmp / "hf", ignore_errors=True)
        if lfs_sha is None and _git_blob_sha1(dest) != chosen.blob_id:
            raise _err(ChecksumError, c.input_name, f"the file from {c.display} failed its checksum",
                       expected=f"git blob {chosen.blob_id[:12]}", got="different bytes", hint="Try again.")
        digest = _verify_lora(dest, c, expected_sha256=lfs_sha)
        return _Staged(tmp, digest, dest.stat().st_size, file_name=chosen.path.rsplit("/", 1)[-1])

    return _Plan(resolved, produce)


def _variant(name: str) -> str | None:
    return "fp16" if ".fp16." in name or ".fp16-" in name else None


def _diffusers_files(files: list, prefix: str, ctx: _Context) -> list:
    """model_index.json, the configs/tokenizers, and each component's .safetensors weights (no variant, else fp16)."""
    chosen = [f for f in files if f.path == prefix + "model_index.json"]
    for sub in DIFFUSERS_CONFIG_DIRS:
        chosen += [f for f in files if f.path.startswith(f"{prefix}{sub}/")]
    for sub in DIFFUSERS_WEIGHT_DIRS:
        here = [f for f in files if f.path.rsplit("/", 1)[0] == prefix + sub]
        safes = [f for f in here if f.path.endswith(".safetensors")]
        if not here and sub == "vae":
            continue  # no VAE of its own: the shared one is used
        if not safes:
            raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} has no .safetensors weights for {sub}",
                       expected="safetensors weights for unet, text_encoder, text_encoder_2",
                       got=", ".join(sorted(f.path.rsplit("/", 1)[-1] for f in here)) or "nothing",
                       hint="Pickle (.bin) weights are refused because loading them can run code.")
        variant = None if any(_variant(f.path) is None for f in safes) else "fp16"
        picked = [f for f in safes if _variant(f.path) == variant]
        if variant and len(picked) > 1:
            raise _err(IncompatibleError, ctx.input_name, f"{ctx.display}: sharded fp16 {sub} weights",
                       expected="unsharded weights", got=f"{len(picked)} shards")
        chosen += picked + [f for f in here if f.path.endswith(".safetensors.index.json") and variant is None]
        chosen += [f for f in here if f.path.endswith("config.json")]
    return chosen


def _hf_diffusers_plan(ref: WeightsRef, ctx: _Context, sha: str, files: list, prefix: str, endpoint: str,
                       token) -> _Plan:
    """A diffusers pipeline folder (a checkpoint repo with model_index.json), downloaded file by file, each checked
    against the Hub's LFS sha256 (or git blob sha1 for small files); fp16-variant names lose their `.fp16`."""
    return _hf_files_plan(ref, ctx, sha, _diffusers_files(files, prefix, ctx), prefix, endpoint, token)


def _hf_files_plan(ref: WeightsRef, ctx: _Context, sha: str, chosen: list, prefix: str, endpoint: str,
                   token) -> _Plan:
    """Several files of one folder (a diffusers pipeline or VAE, a two-file embedding) into entries/<key>/diffusers/."""
    total = sum(f.lfs.size if getattr(f, "lfs", None) else f.size for f in chosen)
    resolved = dataclasses.replace(ref, canonical_id=f"hf:{ref.repo}@{sha}:{prefix}", revision=sha,
                                   display=f"hf://{ref.repo}@{ref.revision}" + (f"/{ref.path}" if ref.path else ""))

    def produce(tmp: Path, session: requests.Session, c: _Context) -> _Staged:
        from huggingface_hub import hf_hub_download

        if total > c.max_bytes:
            raise _too_large(c, total)
        if total < c.min_bytes:
            raise _err(IncompatibleError, c.input_name, f"{c.display} is too small for a full SDXL {c.kind}",
                       expected=f"at least {c.min_bytes / MiB:.0f} MiB ({KINDS[c.kind].min_env})", got=f"{total / MiB:.1f} MiB")
        digest = hashlib.sha256()
        for f in chosen:
            with _hf_catch(c, resolved):
                got = Path(hf_hub_download(ref.repo, f.path, revision=sha, local_dir=tmp / "hf", token=token,
                                           endpoint=endpoint, etag_timeout=CONNECT_TIMEOUT))
            lfs_sha = f.lfs.sha256 if getattr(f, "lfs", None) else None
            ok = _sha256_file(got) == lfs_sha if lfs_sha else _git_blob_sha1(got) == f.blob_id
            if not ok:
                raise _err(ChecksumError, c.input_name, f"{f.path} from {c.display} failed its checksum",
                           expected=f"the Hub's {'sha256' if lfs_sha else 'git blob sha1'}", got="different bytes",
                           hint="Try again.")
            if f.path.endswith(".safetensors"):
                try:
                    header = check_safetensors(got)
                except ValueError as err:
                    raise _not_safetensors(c, f"{f.path}: {err}", "") from err
                _check_values(got, header, c, what=f" ({f.path})")
                if c.kind in ("VAE", "ControlNet"):  # one weights file: its keys say whether it is of this kind
                    KINDS[c.kind].check_keys(header, c)
            rel = f.path[len(prefix):].replace(".fp16.safetensors", ".safetensors")
            target = tmp / DIFFUSERS_DIR / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, target)
            digest.update(f"{rel}\0{lfs_sha or f.blob_id}\n".encode())
        shutil.rmtree(tmp / "hf", ignore_errors=True)
        if c.kind == "ControlNet":
            _check_controlnet_config(tmp / DIFFUSERS_DIR / "config.json", c)
        return _Staged(tmp, digest.hexdigest(), total)

    return _Plan(resolved, produce)


def _is_sdxl_family(base_model: str | None) -> bool:
    """An exact (case-insensitive, spaces normalised) match in SDXL_FAMILY: "Pony" yes, "Pony V7" (AuraFlow) no."""
    return " ".join(str(base_model or "").lower().split()) in SDXL_FAMILY


def _civitai_auth(ctx: _Context) -> _Auth:
    if not ctx.tokens.civitai:
        return _Auth({}, None)
    return _Auth({"Authorization": f"Bearer {ctx.tokens.civitai}"}, _origin(_civitai_base()))


def _resolve_civitai(ref: WeightsRef, ctx: _Context, session: requests.Session) -> _Plan:
    base = _civitai_base()
    auth = _civitai_auth(ctx)
    version_id = ref.version_id
    if version_id is None:
        # A model id is never a version id: ask for the model's newest published version.
        model = _json(session, f"{base}/api/v1/models/{ref.model_id}", ctx, auth, auth_hint=_CIVITAI_TOKEN_HINT,
                      not_found=f"No CivitAI model {ref.model_id}; copy the link from the model page.")
        mtype = str(model.get("type", "")).lower()
        checkpoint = ctx.kind == "checkpoint"
        if mtype and mtype not in KINDS[ctx.kind].civitai_types:
            raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not {_a(ctx.kind)}",
                       expected=KINDS[ctx.kind].civitai_label, got=f"a {model.get('type')} model",
                       hint="Pass LoRAs in lora_weights." if checkpoint else f"Pick {_a(ctx.kind)} model.")
        versions = [v for v in model.get("modelVersions") or [] if v.get("status", "Published") == "Published"]
        if not versions:
            raise _err(NotFoundError, ctx.input_name, f"{ctx.display} has no published version", expected="a published version", got="none")
        newest = max(versions, key=lambda v: (v.get("publishedAt") or "", int(v["id"])))
        version_id = str(int(newest["id"]))
    vctx_display = f"civitai model-version {version_id}" + (f" (model {ref.model_id})" if ref.model_id else "")
    ctx.display = vctx_display
    info = _json(session, f"{base}/api/v1/model-versions/{version_id}", ctx, auth, auth_hint=_CIVITAI_TOKEN_HINT,
                 not_found="No such CivitAI model version; copy the link from the model page.")
    vtype = str((info.get("model") or {}).get("type") or "").lower()  # the version API names its model's type too
    if vtype and vtype not in KINDS[ctx.kind].civitai_types and ctx.kind in ("embedding", "VAE", "upscaler", "ControlNet"):
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} is not {_a(ctx.kind)}",
                   expected=KINDS[ctx.kind].civitai_label,
                   got=f"a {(info.get('model') or {}).get('type')} model", hint=f"Pick {_a(ctx.kind)} model.")
    base_model = info.get("baseModel")
    if not KINDS[ctx.kind].any_base_model and not _is_sdxl_family(base_model):
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} was trained for another base model",
                   expected=f"an SDXL-family {ctx.kind} (SDXL, Illustrious, NoobAI, Pony)", got=f"baseModel {base_model!r}",
                   hint=f"Pick the SDXL/Illustrious version of this {ctx.kind}.")
    v_prediction = any(_VPRED_MARK.search(str(info.get(k) or "")) for k in ("name", "baseModelType"))
    file_types = ("model", "pruned model", "vae") if ctx.kind == "VAE" else ("model", "pruned model")
    files = [f for f in info.get("files") or [] if str(f.get("type", "Model")).lower() in file_types]
    safes = [f for f in files if (f.get("metadata") or {}).get("format", "SafeTensor") == "SafeTensor"]
    if not safes:
        formats = ", ".join(sorted({str((f.get('metadata') or {}).get('format')) for f in files})) or "no model file"
        raise _err(IncompatibleError, ctx.input_name, f"{ctx.display} has no safetensors file", expected="a SafeTensor file",
                   got=formats, hint="Pickle files are refused because loading them can run code.")
    chosen = next((f for f in safes if f.get("primary")), safes[0])
    expected_sha = (chosen.get("hashes") or {}).get("SHA256")
    size_hint = int(float(chosen["sizeKB"]) * 1024) if chosen.get("sizeKB") else None
    trained = tuple(w.strip() for w in info.get("trainedWords") or [] if isinstance(w, str) and w.strip())
    model_id = ref.model_id or info.get("modelId")
    resolved = WeightsRef("civitai", f"civitai:{version_id}", vctx_display, model_id=int(model_id) if model_id else None, version_id=version_id)
    query = "" if chosen.get("primary") or len(safes) == len(files) == 1 else "?type=Model&format=SafeTensor"
    url = f"{base}/api/download/models/{version_id}{query}"

    def produce(tmp: Path, session: requests.Session, c: _Context) -> _Staged:
        dest = tmp / LORA_FILE_NAME
        hint = _CIVITAI_TOKEN_HINT if not c.tokens.civitai else "Check that your civitai_api_token is valid and may download this model."
        _download_url(session, url, dest, c, auth, size_hint=size_hint, auth_hint=hint,
                      not_found="The CivitAI file is gone; pick another version.")
        digest = _verify_lora(dest, c, expected_sha256=expected_sha, auth_hint=hint)
        return _Staged(tmp, digest, dest.stat().st_size, base_model=base_model, trigger_words=trained,
                       v_prediction=v_prediction, file_name=str(chosen.get("name") or "") or None)

    return _Plan(resolved, produce)


def _replicate_auth(ctx: _Context) -> _Auth:
    if not ctx.tokens.replicate:
        return _Auth({}, None)
    return _Auth({"Authorization": f"Bearer {ctx.tokens.replicate}"}, _origin(_replicate_api_base()))


def _deadline_of(session: requests.Session) -> dict:
    """The fetch's deadline, for work done outside the session (extracting a tar)."""
    if isinstance(session, _DeadlineSession):
        return {"deadline": session.deadline, "started": session.started}
    return {}


def _tar_producer(url: str, auth: _Auth, *, auth_hint: str, is_tar: bool = True):
    def produce(tmp: Path, session: requests.Session, c: _Context) -> _Staged:
        download = tmp / ("download.tar" if is_tar else LORA_FILE_NAME)
        # A tar holds the LoRA plus small side files; allow a little slack over the LoRA cap.
        cap = c.max_bytes + 2 * MAX_SIDE_FILE_BYTES if is_tar else c.max_bytes
        _download_url(session, url, download, c, auth, size_hint=None, auth_hint=auth_hint, cap=cap)
        if not is_tar:
            digest = _verify_lora(download, c, auth_hint=auth_hint)
            name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or None
            return _Staged(tmp, digest, download.stat().st_size, file_name=name)
        has_emb, params = _extract_trainer_tar(download, tmp, c, **_deadline_of(session))
        download.unlink()
        digest = _verify_lora(tmp / LORA_FILE_NAME, c, auth_hint=auth_hint)
        return _Staged(tmp, digest, (tmp / LORA_FILE_NAME).stat().st_size, has_embeddings=has_emb, special_params=params)

    return produce


def _resolve_replicate(ref: WeightsRef, ctx: _Context, session: requests.Session) -> _Plan:
    """owner/model[:version] -> the trainer tar behind replicate.com/<owner>/<model>[/versions/<v>]/_weights.

    With REPLICATE_API_TOKEN the latest version id comes from the models API, so the key is
    "replicate:owner/model:<version>" and a new training is picked up.  Without a token the web `_weights` URL
    is asked (without following) where it redirects; the key is "replicate:owner/model@<sha256 of that
    location without query>[:16]" (each training is a new delivery URL), or its ETag when it does not redirect.
    """
    web = _replicate_web_base()
    if ref.url is not None:  # replicate.delivery URL
        if ref.signed:
            ref = _resolve_signed(ref, ctx, session)
        return _Plan(ref, _tar_producer(ref.url, _Auth({}, None), auth_hint="", is_tar=ref.is_tar))
    version = ref.version_id
    if version is None and ctx.tokens.replicate:
        info = _json(session, f"{_replicate_api_base()}/v1/models/{ref.repo}", ctx, _replicate_auth(ctx),
                     auth_hint="Check REPLICATE_API_TOKEN.", not_found=f"No Replicate model {ref.repo}.")
        version = ((info or {}).get("latest_version") or {}).get("id")
        if not version:
            raise _err(NotFoundError, ctx.input_name, f"{ctx.display} has no version yet", expected="a trained model", got="no latest_version")
    if version:
        resolved = _replicate_ref(ref.repo, version)
        web_auth = _Auth({"Authorization": f"Bearer {ctx.tokens.replicate}"}, _origin(web)) if ctx.tokens.replicate else _Auth({}, None)
        return _Plan(resolved, _tar_producer(f"{web}/{ref.repo}/versions/{version}/_weights", web_auth, auth_hint=_REPLICATE_TOKEN_HINT))
    url = f"{web}/{ref.repo}/_weights"
    resp = _open(session, url, ctx, _Auth({}, None), follow=False, auth_hint=_REPLICATE_TOKEN_HINT,
                 not_found=f"No Replicate model {ref.repo} with weights; check owner/model.")
    resp.close()
    if resp.is_redirect:
        loc = urljoin(url, resp.headers.get("Location", ""))
        p = urlsplit(loc)
        tag = hashlib.sha256(urlunsplit((p.scheme, p.netloc, p.path, "", "")).encode()).hexdigest()[:16]
        target = loc
    else:
        etag = resp.headers.get("ETag", "").strip('"')
        tag = hashlib.sha256(etag.encode()).hexdigest()[:16] if etag else "latest"
        target = url
    resolved = dataclasses.replace(ref, canonical_id=f"replicate:{ref.repo}@{tag}")
    return _Plan(resolved, _tar_producer(target, _Auth({}, None), auth_hint=_REPLICATE_TOKEN_HINT))


def _resolve_url(ref: WeightsRef, ctx: _Context, session: requests.Session | None = None) -> _Plan:
    if ref.signed and session is not None:
        ref = _resolve_signed(ref, ctx, session)
    return _Plan(ref, _tar_producer(ref.url or ref.display, _Auth({}, None), auth_hint="", is_tar=ref.is_tar))


def _resolve_signed(ref: WeightsRef, ctx: _Context, session: requests.Session) -> WeightsRef:
    """A signed URL names its file only together with the host's answer: ask for it (headers only) and key the
    entry on the file's strong ETag, so a re-signed URL of the same file is a hit - once the host has accepted the
    new signature - and anything else (no ETag, a weak one, another file) gets an entry of its own."""
    resp = _open(session, ref.url or "", ctx, _Auth({}, None), extra={"Accept-Encoding": "identity"})
    resp.close()
    etag = resp.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        tag = "etag:" + hashlib.sha256(etag.encode()).hexdigest()[:32]
    else:  # no proof the content is the same: this signature's own entry (hashed: a signature is a secret)
        tag = "sig:" + hashlib.sha256(urlsplit(ref.url or "").query.encode()).hexdigest()[:32]
    return dataclasses.replace(ref, canonical_id=f"{ref.canonical_id}@{tag}", signed=False)


def _resolve_data(ref: WeightsRef, ctx: _Context) -> _Plan:
    def produce(tmp: Path, session: requests.Session, c: _Context) -> _Staged:
        payload = _decode_data_url(ref.url or "")
        if KINDS[c.kind].accepts_tar and _is_plain_tar(payload[:512]):  # a trainer tar inlined (README: data: URLs of .safetensors or .tar)
            if len(payload) > c.max_bytes + 2 * MAX_SIDE_FILE_BYTES:
                raise _too_large(c, len(payload))
            download = tmp / "download.tar"
            download.write_bytes(payload)
            has_emb, params = _extract_trainer_tar(download, tmp, c, **_deadline_of(session))
            download.unlink()
            digest = _verify_lora(tmp / LORA_FILE_NAME, c)
            return _Staged(tmp, digest, (tmp / LORA_FILE_NAME).stat().st_size, has_embeddings=has_emb,
                           special_params=params)
        if len(payload) > c.max_bytes:
            raise _too_large(c, len(payload))
        dest = tmp / LORA_FILE_NAME
        dest.write_bytes(payload)
        digest = _verify_lora(dest, c, expected_sha256=ref.canonical_id.split(":", 1)[1])
        return _Staged(tmp, digest, len(payload))

    return _Plan(ref, produce)


def _resolve(ref: WeightsRef, ctx: _Context, session: requests.Session) -> _Plan:
    resolvers = {
        "huggingface": lambda: _resolve_hf(ref, ctx),
        "civitai": lambda: _resolve_civitai(ref, ctx, session),
        "replicate": lambda: _resolve_replicate(ref, ctx, session),
        "url": lambda: _resolve_url(ref, ctx, session),
        "data": lambda: _resolve_data(ref, ctx),
    }
    return resolvers[ref.source]()


# --------------------------------------------------------------------------------------------------- cache
def _default_cache_dir() -> Path:
    if Path("/src/predict.py").exists():  # inside the Cog image
        return Path("/src/lora-cache")
    return Path.home() / ".cache" / "sdxl-lora-cog" / "loras"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(float(value))
    except ValueError:
        logger.warning("%s=%r is not a number; using %d", name, value, default)
        return default


def _payload(folder: Path) -> Path | None:
    """What an entry holds: its .safetensors file, or a diffusers folder (checkpoints); None if neither is there."""
    if (folder / LORA_FILE_NAME).is_file():
        return folder / LORA_FILE_NAME
    if any((folder / DIFFUSERS_DIR / marker).is_file()
           for marker in ("model_index.json", "config.json", DIFFUSERS_EMBEDDING_FILES[0])):
        return folder / DIFFUSERS_DIR
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class _Entry:
    key: str
    folder: Path
    meta: dict
    size: int
    last_used: float


class LoraCache:
    """On-disk LRU cache of verified LoRA files keyed by canonical id, safe across threads and processes."""

    kind = "LoRA"
    min_file_bytes = 0

    def __init__(self, root: Path | str, *, max_bytes: int = 20 * GiB, min_free_bytes: int = 2 * GiB, max_file_bytes: int = 2 * GiB):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.max_file_bytes = max_file_bytes
        self._lock = threading.RLock()
        self._pins: Counter[str] = Counter()
        self._aliases: dict[str, str] = {}  # unresolved canonical id -> resolved key last fetched for it
        self._hits = 0
        self._misses = 0
        for sub in ("entries", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()
        self._index: dict[str, _Entry] = self._scan()

    @classmethod
    def from_env(cls) -> "LoraCache":
        """A cache of this class's kind, configured from the environment variables its KINDS entry names."""
        kind = KINDS[cls.kind]
        root = os.environ.get(kind.cache_env) or str(_default_kind_dir(kind))
        sizes = {"min_file_bytes": _env_int(kind.min_env, kind.min_bytes)} if kind.min_env else {}
        return cls(root, max_bytes=_env_int(kind.cache_bytes_env, kind.cache_bytes),
                   min_free_bytes=_env_int("LORA_CACHE_MIN_FREE_BYTES", 2 * GiB),
                   max_file_bytes=_env_int(kind.max_env, kind.max_bytes), **sizes)

    # ---- index
    @staticmethod
    def key_name(canonical_id: str) -> str:
        """File-system name of a key: a hash, so nothing from the user's text becomes a path."""
        return hashlib.sha256(canonical_id.encode()).hexdigest()[:32]

    def _scan(self) -> dict[str, _Entry]:
        """Rebuild the index from the sidecars on disk (after a restart, or when another process changed it)."""
        index: dict[str, _Entry] = {}
        for folder in (self.root / "entries").iterdir():
            meta_path = folder / "meta.json"
            try:
                meta = json.loads(meta_path.read_text("utf-8"))
                if _payload(folder) is None or self.key_name(meta["canonical_id"]) != folder.name:
                    raise ValueError("inconsistent entry")
                size = _folder_bytes(folder)
                index[meta["canonical_id"]] = _Entry(meta["canonical_id"], folder, meta, size, meta_path.stat().st_mtime)
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("lora cache: removing unreadable entry %s", folder.name)
                self._remove_folder(folder)
        return index

    def _sweep_tmp(self) -> None:
        """Remove temp folders left by a killed process (older than an hour, so live downloads are spared)."""
        now = time.time()
        for p in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    def _remove_folder(self, folder: Path) -> None:
        # Rename first so a half-deleted entry is never seen as an entry.
        doomed = self.root / "tmp" / f"del-{uuid.uuid4().hex}"
        with contextlib.suppress(OSError):
            os.replace(folder, doomed)
            folder = doomed
        shutil.rmtree(folder, ignore_errors=True)

    @property
    def stats(self) -> dict:
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "bytes": sum(e.size for e in self._index.values()),
                    "entries": len(self._index)}

    def _lookup(self, key: str) -> _Entry | None:
        entry = self._index.get(key)
        if entry is None:
            folder = self.root / "entries" / self.key_name(key)
            if (folder / "meta.json").is_file():  # installed by another process since our scan
                self._index.update({k: e for k, e in self._scan().items() if k == key})
                entry = self._index.get(key)
        if entry is not None and _payload(entry.folder) is None:
            self._index.pop(key, None)  # evicted by another process
            return None
        return entry

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = time.time()
        with contextlib.suppress(OSError):
            os.utime(entry.folder / "meta.json", (entry.last_used, entry.last_used))

    def _make_room(self, incoming: int, ctx: _Context) -> None:
        """Evict least recently used, unpinned entries until the byte cap and the free-disk floor hold."""
        with self._lock:
            def over() -> bool:
                used = sum(e.size for e in self._index.values())
                free = shutil.disk_usage(self.root).free
                return used + incoming > self.max_bytes or free - incoming < self.min_free_bytes

            # When evicting every unpinned entry could not reach the free-disk floor, keep the cache and fail below.
            evictable = sum(e.size for e in self._index.values() if not self._pins[e.key])
            hopeless = shutil.disk_usage(self.root).free + evictable - incoming < self.min_free_bytes
            for entry in [] if hopeless else sorted(self._index.values(), key=lambda e: e.last_used):
                if not over():
                    break
                if self._pins[entry.key]:
                    continue
                logger.info("lora cache: evicting %s (%d bytes)", entry.meta.get("display", entry.folder.name), entry.size)
                self._index.pop(entry.key, None)
                self._remove_folder(entry.folder)
            if shutil.disk_usage(self.root).free - incoming < self.min_free_bytes:
                raise _err(TooLargeError, ctx.input_name, f"not enough disk space for {ctx.display}",
                           expected=f"{(incoming + self.min_free_bytes) / MiB:.0f} MiB free (LORA_CACHE_MIN_FREE_BYTES)",
                           got=f"{shutil.disk_usage(self.root).free / MiB:.0f} MiB free")

    def _lora_file(self, ref: WeightsRef, entry: _Entry) -> LoraFile:
        m = entry.meta
        emb = entry.folder / "embeddings.pti"
        return LoraFile(ref=ref, path=_payload(entry.folder), sha256=m["sha256"], size=m["size"],
                        base_model=m.get("base_model"), trigger_words=tuple(m.get("trigger_words") or ()),
                        embeddings_path=emb if emb.is_file() else None, special_params=dict(m.get("special_params") or {}),
                        v_prediction=bool(m.get("v_prediction")), file_name=m.get("file_name"))

    def _install(self, plan: _Plan, staged: _Staged, ctx: _Context, *, asked: WeightsRef) -> _Entry:
        """Rename the staged folder into place (atomic) and pin it in the same breath, so no eviction sneaks in."""
        meta = {"canonical_id": plan.ref.canonical_id, "display": plan.ref.display, "source": plan.ref.source,
                "sha256": staged.sha256, "size": staged.size, "base_model": staged.base_model,
                "trigger_words": list(staged.trigger_words), "special_params": staged.special_params,
                "v_prediction": staged.v_prediction, "file_name": staged.file_name, "fetched_at": time.time()}
        (staged.folder / "meta.json").write_text(json.dumps(meta, indent=1), "utf-8")
        total = _folder_bytes(staged.folder)
        self._make_room(total, ctx)
        target = self.root / "entries" / self.key_name(plan.ref.canonical_id)
        try:
            os.rename(staged.folder, target)  # atomic; fails if another process installed it first
        except OSError:
            if not (target / "meta.json").is_file():
                raise
        with self._lock:
            entry = self._scan_one(target)
            self._index[entry.key] = entry
            self._misses += 1
            self._pin(asked, entry.key)
            self._touch(entry)
        return entry

    def _scan_one(self, folder: Path) -> _Entry:
        meta = json.loads((folder / "meta.json").read_text("utf-8"))
        size = _folder_bytes(folder)
        return _Entry(meta["canonical_id"], folder, meta, size, time.time())

    # ---- public
    def fetch(self, ref: WeightsRef, tokens: Tokens | None = None, *, input_name: str = "lora_weights") -> LoraFile:
        """The verified file for `ref`: from the cache, or downloaded, verified and installed.  Pins the entry."""
        started = time.monotonic()
        try:
            return self._fetch(ref, tokens or Tokens(), input_name, started)
        except WeightsError as err:
            logger.warning("lora %s (%s): failed with %s after %.2fs", ref.display, ref.source, type(err).__name__,
                           time.monotonic() - started)
            raise

    def _fetch(self, ref: WeightsRef, tokens: Tokens, input_name: str, started: float) -> LoraFile:
        url_parts = urlsplit(ref.url) if ref.url and ref.source != "data" else None
        secrets = tokens.secrets() + tuple(s for s in (url_parts.query, url_parts.password) if s) if url_parts else tokens.secrets()
        ctx = _Context(input_name, ref.display, tokens, self.max_file_bytes, secrets, self.kind, self.min_file_bytes)
        try:
            return self._fetch_in(ref, ctx, started)
        except WeightsError as err:
            # `raise X from _scrub(e)` still leaves `e` (maybe quoting a signed URL) in X.__context__: clean the chain.
            _scrub_chain(err, ctx.secrets)
            raise

    def _fetch_in(self, ref: WeightsRef, ctx: _Context, started: float) -> LoraFile:
        input_name = ctx.input_name
        with _DeadlineSession(started, started + _download_timeout()) as session:
            session.trust_env = True
            # A resolved ref (immutable version/commit, URL, data) is looked up before any network call.
            plan = None if ref.resolved else session.call(lambda: _resolve(ref, ctx, session))
            key = ref.canonical_id if plan is None else plan.ref.canonical_id
            with self._lock:
                entry = self._lookup(key)
                if entry is not None:
                    return self._hit(plan.ref if plan else ref, key, entry, started, ref)
            if plan is None:
                plan = session.call(lambda: _resolve(ref, ctx, session))
            lock = self._file_lock(key)
            with lock:
                with self._lock:
                    entry = self._lookup(key)  # another process may have finished while we waited
                    if entry is not None:
                        return self._hit(plan.ref, key, entry, started, ref)
                self._make_room(0, ctx)  # fail early when the disk is already below the floor
                tmp = Path(tempfile.mkdtemp(prefix="dl-", dir=self.root / "tmp"))
                try:
                    now = time.monotonic()
                    session.rearm(now, now + _download_timeout())  # download, verification and extraction
                    staged = session.call(lambda: plan.produce(tmp, session, ctx))
                    entry = self._install(plan, staged, ctx, asked=ref)
                except OSError as err:
                    # EFBIG: over the file-size limit of the file system or of this process (RLIMIT_FSIZE).
                    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise
                    raise _err(TooLargeError, input_name, f"the disk filled up while fetching {ref.display}",
                               expected="free space for the file", got=os.strerror(err.errno),
                               hint="Lower LORA_CACHE_MAX_BYTES or free disk space.") from err
                finally:
                    # Runs on errors and on cancellation (a BaseException) alike: no partial file survives.
                    shutil.rmtree(tmp, ignore_errors=True)
        logger.info("lora %s (%s): miss, %d bytes in %.2fs", plan.ref.display, ref.source, entry.meta["size"], time.monotonic() - started)
        return self._lora_file(plan.ref, entry)

    def _hit(self, ref: WeightsRef, key: str, entry: _Entry, started: float, asked: WeightsRef | None = None) -> LoraFile:
        self._hits += 1
        self._pin(asked or ref, key)
        self._touch(entry)
        logger.info("lora %s (%s): hit, %d bytes in %.2fs", ref.display, ref.source, entry.meta["size"], time.monotonic() - started)
        return self._lora_file(ref, entry)

    def _pin(self, ref: WeightsRef, key: str) -> None:
        self._pins[key] += 1
        if ref.canonical_id != key:
            self._aliases[ref.canonical_id] = key

    def _file_lock(self, key: str):
        try:
            from filelock import FileLock, Timeout
        except ImportError:  # correctness never depends on the lock
            return contextlib.nullcontext()

        lock = FileLock(str(self.root / "locks" / f"{self.key_name(key)}.lock"), timeout=15 * 60)

        @contextlib.contextmanager
        def guarded() -> Iterator[None]:
            try:
                lock.acquire()
            except Timeout:
                logger.warning("lora cache: lock wait timed out; downloading anyway")
                yield
                return
            try:
                yield
            finally:
                lock.release()

        return guarded()

    def release(self, ref: WeightsRef) -> None:
        """Unpin what `fetch(ref)` pinned (accepts the ref passed to fetch or LoraFile.ref)."""
        with self._lock:
            key = self._aliases.get(ref.canonical_id, ref.canonical_id)
            if self._pins[key] > 0:
                self._pins[key] -= 1
            if self._pins[key] <= 0:
                self._pins.pop(key, None)

    @contextlib.contextmanager
    def pinning(self) -> Iterator[None]:
        """Release, when the block ends however it ends, every pin fetch() took inside it.

        A cancellation (cog.CancelationException, raised between any two bytecodes of the predicting thread) can
        land after fetch() pinned an entry but before the caller holds the returned file to release it; such a
        pin would keep the entry from eviction for the life of the process.  The block's own pins are found by
        comparing the counts, so the caller must be the cache's only user while it runs (one prediction at a
        time, as in the Predictor); pins another thread took meanwhile would be released as well.
        """
        with self._lock:
            before = Counter(self._pins)
        try:
            yield
        finally:
            with self._lock:
                for key in list(self._pins):
                    if self._pins[key] > before[key]:
                        self._pins[key] = before[key]
                    if self._pins[key] <= 0:
                        self._pins.pop(key, None)

    def discard(self, ref: WeightsRef) -> None:
        """Remove the entry of `ref` (fetched by this prediction and found unusable when loaded: a file that passed
        the key check but does not load), unless another prediction of this process also holds it."""
        with self._lock:
            key = self._aliases.get(ref.canonical_id, ref.canonical_id)
            entry = self._index.get(key)
            if entry is None or self._pins[key] > 1:
                return
            logger.info("lora cache: removing %s, which did not load", entry.meta.get("display", entry.folder.name))
            self._index.pop(key, None)
            self._remove_folder(entry.folder)

    def clear(self) -> None:
        """Remove every unpinned entry."""
        with self._lock:
            for key, entry in list(self._index.items()):
                if not self._pins[key]:
                    self._index.pop(key)
                    self._remove_folder(entry.folder)


# ------------------------------------------------------------------------------------ image and mask URLs
DEFAULT_INPUT_MAX_BYTES = 64 * MiB  # INPUT_MAX_BYTES: a 4096x4096 RGBA PNG stays well under it
DEFAULT_INPUT_DOWNLOAD_TIMEOUT = 120.0  # INPUT_DOWNLOAD_TIMEOUT: seconds for one image, headers included


@contextlib.contextmanager
def input_file(value: Any, input_name: str) -> Iterator[Path]:
    """A local file holding an `image` / `mask` input, removed when the block ends.

    The inputs are strings (not cog.Path) so that coglet does not fetch them itself, unguarded: an http(s) URL is
    downloaded here with the LoRA downloads' guard (REFUSED_NETWORKS on every hop), deadline (every byte, headers
    included, within INPUT_DOWNLOAD_TIMEOUT), size cap (INPUT_MAX_BYTES on the bytes as they arrive, encoded
    bodies refused) and scrubbing (the query and userinfo never reach errors or logs).  A data: URL (what an upload
    from `cog predict -i image=@x.png` or a client library becomes) is decoded under the same cap.  A path object
    (in-process callers) is used as it is; a plain string that is neither is refused: a caller of the server must
    not be able to read the server's own files.
    """
    if isinstance(value, os.PathLike):
        yield Path(value)
        return
    text = str(value).strip()
    cap = _env_int("INPUT_MAX_BYTES", DEFAULT_INPUT_MAX_BYTES)
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme not in ("data", "http", "https"):
        raise _err(InvalidReferenceError, input_name, "not an image URL", expected="an http(s) URL or a data: URL",
                   got=repr(_safe_text(text)[:60]))
    folder = Path(tempfile.mkdtemp(prefix=f"{input_name}-"))
    try:
        dest = folder / "input"
        if scheme == "data":
            head, _, body = text.partition(",")
            too_large = _err(TooLargeError, input_name, "the data: URL is too large",
                             expected=f"at most {cap / MiB:.0f} MiB (INPUT_MAX_BYTES)", got=f"{len(text)} characters")
            if len(body) * (3 / 4 if head.lower().endswith(";base64") else 1 / 3) > cap:  # before decoding it
                raise too_large
            try:
                payload = _decode_data_url(text)
            except InvalidReferenceError as err:
                raise _err(InvalidReferenceError, input_name, str(err), expected="data:[<type>][;base64],<payload>",
                           got="a malformed data: URL") from None
            if len(payload) > cap:
                raise too_large
            dest.write_bytes(payload)
        else:
            _fetch_input_url(text, dest, input_name, cap)
        yield dest
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fetch_input_url(url: str, dest: Path, input_name: str, cap: int) -> None:
    if len(url) > MAX_URL_CHARS:
        raise _err(InvalidReferenceError, input_name, "the URL is too long", expected=f"at most {MAX_URL_CHARS} characters",
                   got=f"{len(url)} characters starting {_safe_text(url)[:60]!r}")
    parts = urlsplit(url)
    ctx = _Context(input_name, _safe_text(url), Tokens(), cap, tuple(s for s in (parts.query, parts.password) if s),
                   kind="image")
    started = time.monotonic()
    try:
        timeout = float(os.environ.get("INPUT_DOWNLOAD_TIMEOUT", "").strip() or DEFAULT_INPUT_DOWNLOAD_TIMEOUT)
    except ValueError:
        timeout = DEFAULT_INPUT_DOWNLOAD_TIMEOUT
    try:
        with _DeadlineSession(started, started + timeout) as session, dest.open("wb") as out:
            def download() -> None:  # on the session's worker thread, so that a cancel lands at once
                resp = _open(session, url, ctx, _Auth({}, None), extra={"Accept-Encoding": "identity"},
                             not_found="Check the image link.")
                try:
                    encoding = resp.headers.get("Content-Encoding", "").strip().lower()
                    if encoding not in ("", "identity"):
                        raise _err(IncompatibleError, input_name, f"{ctx.display} sent an encoded body",
                                   expected="the image itself (we ask for Accept-Encoding: identity)",
                                   got=f"Content-Encoding: {_short(encoding, 40)}")
                    length = resp.headers.get("Content-Length", "")
                    if length.isdigit() and int(length) > cap:
                        raise _err(TooLargeError, input_name, f"{ctx.display} is too large",
                                   expected=f"at most {cap / MiB:.0f} MiB (INPUT_MAX_BYTES)", got=f"{int(length) / MiB:.0f} MiB")
                    try:
                        for block in _body_chunks(resp):
                            out.write(block)
                            if out.tell() > cap:
                                raise _err(TooLargeError, input_name, f"{ctx.display} is too large",
                                           expected=f"at most {cap / MiB:.0f} MiB (INPUT_MAX_BYTES)", got="more")
                            _check_deadline(session.deadline, started, ctx, out.tell())
                        _session_deadline(session, ctx, out.tell())  # a body ended by the deadline's shutdown
                    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                        _session_deadline(session, ctx, out.tell())
                        raise _err(NetworkError, input_name, f"the download of {ctx.display} broke off",
                                   expected="the whole image", got=f"{out.tell()} bytes") from _scrub(err, ctx.secrets)
                finally:
                    resp.close()
                if length.isdigit() and out.tell() < int(length):
                    raise _err(NetworkError, input_name, f"the download of {ctx.display} was cut short",
                               expected=f"{length} bytes", got=f"{out.tell()} bytes")

            session.call(download)
    except WeightsError as err:
        _scrub_chain(err, ctx.secrets)
        logger.warning("%s %s: failed with %s after %.2fs", input_name, ctx.display, type(err).__name__,
                       time.monotonic() - started)
        raise
    logger.info("%s %s: %d bytes in %.2fs", input_name, ctx.display, dest.stat().st_size, time.monotonic() - started)


class CheckpointCache(LoraCache):
    """The same verified, pinned, byte-capped LRU cache for full SDXL checkpoints (single .safetensors files), in
    its own folder with its own cap, and a size window: a file below `min_file_bytes` is not a checkpoint.  The
    baked models live in WEIGHTS_DIR, never here, so they never count against the cap and are never evicted."""

    kind = "checkpoint"

    def __init__(self, root: Path | str, *, max_bytes: int = 40 * GiB, min_free_bytes: int = 2 * GiB,
                 max_file_bytes: int = 16 * GiB, min_file_bytes: int = 2 * GiB):
        super().__init__(root, max_bytes=max_bytes, min_free_bytes=min_free_bytes, max_file_bytes=max_file_bytes)
        self.min_file_bytes = min_file_bytes



class EmbeddingCache(LoraCache):
    """Textual-inversion embeddings (the `embeddings` input): small files, their own folder and cap."""

    kind = "embedding"


class VaeCache(LoraCache):
    """SDXL VAEs (the `vae` input): single files or diffusers folders, their own folder and cap."""

    kind = "VAE"


class ControlNetCache(LoraCache):
    """SDXL ControlNets (the `control_model` input): single files or diffusers folders, their own folder and cap."""

    kind = "ControlNet"


CACHE_CLASSES: dict[str, type[LoraCache]] = {c.kind: c for c in (LoraCache, CheckpointCache, EmbeddingCache, VaeCache,
                                                                   ControlNetCache)}


class UpscalerCache(LoraCache):
    """Upscalers (the `upscaler_model` input): single safetensors files, their own folder and cap."""

    kind = "upscaler"


CACHE_CLASSES[UpscalerCache.kind] = UpscalerCache


def _default_kind_dir(kind: WeightsKind) -> Path:
    if kind.name in ("embedding", "VAE", "upscaler", "ControlNet"):
        # Per-request files: a folder inside the LoRA cache's (which deployments already place and size).
        return Path(os.environ.get("LORA_CACHE_DIR") or _default_cache_dir()) / kind.cache_dirs[1]
    if Path("/src/predict.py").exists():  # inside the Cog image
        return Path("/src") / kind.cache_dirs[0]
    return Path.home() / ".cache" / "sdxl-lora-cog" / kind.cache_dirs[1]


def parse_ref(text: str, kind: str, *, input_name: str) -> WeightsRef:
    """A reference to a file of `kind` (a KINDS key): the LoRA forms, less those the kind is never shipped as
    (Replicate trainer outputs and .tar files; data: URLs for multi-GB kinds)."""
    spec = KINDS[kind]
    ref = parse_lora_ref(text, input_name=input_name, kind=kind)
    refused = (not spec.accepts_tar and (ref.source == "replicate" or ref.is_tar)) or \
        (not spec.accepts_data and ref.source == "data")
    if refused:
        forms = " and ".join(([] if spec.accepts_tar else ["Replicate models, .tar files"]) +
                             ([] if spec.accepts_data else ["data: URLs"]))
        taken = "a Hugging Face file or repo, a CivitAI model or version, " + \
            ("a Replicate model, or a .safetensors or .tar URL" if spec.accepts_tar else "or a .safetensors URL") + \
            (" or data: URL" if spec.accepts_data else "")
        raise _err(InvalidReferenceError, input_name, f"{forms} are not {kind}s", expected=taken,
                   got=repr(_safe_text(ref.display)))
    return ref


def parse_checkpoint_ref(text: str) -> WeightsRef:
    """A `checkpoint` reference: the LoRA forms, less Replicate trainer outputs and data: URLs (no checkpoint is
    shipped that way, and a multi-GB data: URL is no input)."""
    return parse_ref(text, "checkpoint", input_name="checkpoint")


def fetch_lora(text: str, tokens: Tokens | None = None, *, input_name: str = "lora_weights", cache: LoraCache | None = None) -> LoraFile:
    """Convenience: parse + fetch with a cache from the environment."""
    cache = cache or LoraCache.from_env()
    return cache.fetch(parse_lora_ref(text, input_name=input_name), tokens or Tokens.from_inputs(), input_name=input_name)
