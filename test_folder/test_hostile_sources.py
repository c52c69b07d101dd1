"""Hostile LoRA and image sources, end to end through predict(): one table, served from loopback.

Every row is a source that misbehaves (HTTP errors, login pages, truncated or forged bodies, pickles, foreign or
oversize files, redirect tricks, link-local targets, slow drips, a full disk, bad or huge images; and from issue 14:
tar bombs, sparse and many-member tars, dripped headers and endless `100 Continue`, encoded bodies, metadata
addresses, `?token=` cache identity, malformed safetensors headers, NaN / Inf / absurd weights) given to
`lora_weights`, `extra_lora`, `image` or `mask` through a direct URL, the fake Hugging Face Hub, CivitAI,
Replicate or a data: URL. For each row the test checks what a user would notice:

  (a) the prediction fails with an error that names the input, says what was expected and what came
      (rows whose source recovers - 500 then 200, 429 with Retry-After, a hostile Content-Disposition - succeed
      instead, with the LoRA applied);
  (b) the LoRA cache holds no partial or bad file afterwards: no temp leftovers, no entry for the bad source,
      every entry intact (sha256 and safetensors structure as its index entry says), the index matching the disk;
  (c) the next normal prediction is byte-identical to a control made before the hostile one.

Every error must also be short (under 1 000 characters) and may not contain the row's `hides` texts (secrets).

The in-process predictor (shared with the other modules) runs the rows, with its LoRA cache swapped for one of
this module's, configured through the cache's own settings (per-file cap, free-disk floor). Some image URL
rows go through the real Cog server as well; the full disk is a fetch in a child process whose file
size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the download's writes fail part way, as a full disk does.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import io
import json
import tarfile
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save as st_save

import utils
import weights
from cog_server import REPO
from conftest import predict_inputs
from fakes import (FakeCivitai, FakeHFHub, FakeReplicate, FakeServer, RawHostileServer, Response, gzip_twice,
                   make_bz2_tar_bomb, make_many_member_tar, make_pax_sparse_tar, make_trainer_tar, sha256)
from lora_fixtures import write_foreign_lora, write_kohya_lora
from weights import (AuthRequiredError, BlockedHostError, ChecksumError, IncompatibleError, InvalidReferenceError,
                     LoraCache, NetworkError, NotFoundError, TooLargeError, parse_lora_ref)

SMALL = dict(prompt="1girl, red hat", seed=7, aspect_ratio="custom", width=256, height=256, num_inference_steps=1,
             output_format="png")
LORA_CAP = 1024 * 1024  # the module cache's LORA_MAX_BYTES: the test LoRAs are ~60 KB, the oversize file 1.5 MiB
RETRY_AFTER = 1  # seconds a 429 asks for; the retry backoff is 0.01 s, so only honouring the header waits this long


# ------------------------------------------------------------------------------------------------ the world
@dataclass
class World:
    """The fakes, the payloads and the predictor under test (one per module)."""

    predictor: object
    cache: LoraCache
    files: FakeServer
    hub: FakeHFHub
    civitai: FakeCivitai
    replicate: FakeReplicate
    lora: bytes  # a LoRA for the tiny model: changes the image
    other_lora: bytes  # another valid one (a forged body with the wrong sha256)
    foreign: dict[str, bytes]  # sd15, flux, sd3, checkpoint
    images: Path  # folder of hostile image files
    image_host: FakeServer  # serves them for coglet
    control: bytes  # the normal prediction's PNG, made before any hostile row
    drip_headers: RawHostileServer  # drips its response headers a byte at a time, for 8 s
    continue_forever: RawHostileServer  # sends `100 Continue` over and over, for 8 s
    next_id: list[int] = field(default_factory=lambda: [9000])

    @property
    def image_data(self) -> str:
        """The good input image as a data: URL (what an upload becomes)."""
        return "data:image/png;base64," + base64.b64encode((self.images / "ok.png").read_bytes()).decode()

    def version(self) -> int:
        self.next_id[0] += 1
        return self.next_id[0]

    # ---- direct URLs
    def serve(self, tag: str, body: bytes, *, name: str = "lora.safetensors", headers: dict | None = None,
              content_type: str = "application/octet-stream") -> str:
        return self.files.add_file(f"/{tag}/{name}", body, headers=headers, content_type=content_type)

    def faulty(self, tag: str, fault: str, *args, body: bytes | None = None, **kwargs) -> str:
        """The good LoRA (or `body`) at a URL whose requests get `fault` (a FakeServer fault method)."""
        url = self.serve(tag, self.lora if body is None else body)
        getattr(self.files, fault)(f"^/{tag}/", *args, **kwargs)
        return url

    def redirect(self, tag: str, location: str) -> str:
        return self.files.add_redirect(f"/{tag}/lora.safetensors", location)

    # ---- Hugging Face
    def hf(self, tag: str, body: bytes | None = None, *, served: bytes | None = None, private: bool = False,
           gated: bool = False) -> str:
        """A repo holding `body` (default: the good LoRA) as pytorch_lora_weights.safetensors; `served` is what its
        download sends instead (the listing keeps the real size and sha256)."""
        repo = f"hostile/{tag}"
        self.hub.add_file(repo, "pytorch_lora_weights.safetensors", self.lora if body is None else body, served=served)
        if private:
            self.hub.set_private(repo, "hf_owner_token")
        if gated:
            self.hub.set_gated(repo, "hf_owner_token")
        return f"https://huggingface.co/{repo}"

    # ---- CivitAI
    def civ(self, body: bytes | None = None, *, served: bytes | None = None, api_fault: int | None = None,
            **kwargs) -> str:
        """A model version listing `body` (default: the good LoRA, its size and sha256); its storage sends
        `served` instead when given; `api_fault`: the version API answers that status once."""
        v = self.version()
        self.civitai.add_version(v, v, self.lora if body is None else body, **kwargs)
        if served is not None:
            self.civitai.data[v] = served
        if api_fault:
            self.civitai.fail(rf"^/api/v1/model-versions/{v}$", api_fault)
        return f"https://civitai.com/models/{v}?modelVersionId={v}"

    def civ_download(self, location: str) -> str:
        """A CivitAI version whose download endpoint redirects to `location` instead of its storage."""
        url = self.civ()
        v = url.rsplit("=", 1)[1]
        self.civitai.route("GET", rf"/api/download/models/{v}", lambda req: Response(307, b"", {"Location": location}))
        return url

    # ---- Replicate
    def rep(self, tag: str, tar: bytes | None = None, *, delivery_fault: int | None = None) -> str:
        """owner/model whose latest training is `tar` (default: a trainer tar of the good LoRA)."""
        repo = f"hostile/{tag}"
        delivery = self.replicate.add_version(repo, uuid.uuid4().hex, make_trainer_tar(self.lora) if tar is None else tar)
        if delivery_fault:
            self.replicate.delivery.fail("^" + re.escape(urlsplit(delivery).path), delivery_fault)
        return repo


def data_url(body: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(body).decode()


def pickle_file() -> bytes:
    """A Python pickle (what .ckpt/.pt/.bin files are), renamed .safetensors: unpickling it would run code."""
    return pickle.dumps({"state_dict": {"lora_unet_x.lora_down.weight": [0.0] * 64}}, protocol=4)


def huge_header_claim() -> bytes:
    """A safetensors file whose 8-byte header length claims 1 TiB (reading it would exhaust memory)."""
    return struct.pack("<Q", 1 << 40) + b'{"__metadata__": {}}' + b"\0" * 64


def huge_header(lora: bytes, header_bytes: int) -> bytes:
    """A real, consistent safetensors file with `header_bytes` of metadata in its JSON header."""
    n = struct.unpack("<Q", lora[:8])[0]
    header = json.loads(lora[8:8 + n])
    header.setdefault("__metadata__", {})["padding"] = "x" * header_bytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + lora[8 + n:]


def oversize_checkpoint() -> bytes:
    """A full-checkpoint-shaped safetensors file of 1.5 MiB, over the module's 1 MiB LoRA cap."""
    import torch

    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(768 * 1024, dtype=torch.float16)}
    return st_save(tensors)


def traversal_tar(lora: bytes) -> bytes:
    """A trainer tar whose only LoRA is named `../../lora.safetensors`: never read, let alone written there."""
    return make_trainer_tar(lora, lora_name="../../lora.safetensors")


def rewrite_header(lora: bytes, change: Callable[[dict], None], *, data: bytes | None = None,
                   raw: Callable[[str], str] | None = None) -> bytes:
    """`lora` with its safetensors header changed by `change` (and its JSON text by `raw`), data kept or replaced."""
    n = struct.unpack("<Q", lora[:8])[0]
    header = json.loads(lora[8:8 + n])
    change(header)
    text = json.dumps(header)
    text = raw(text) if raw else text
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + (lora[8 + n:] if data is None else data)


def _tensors(header: dict) -> list[str]:
    """Tensor names in file order (by begin offset)."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _shift(header: dict, by: int) -> None:
    """The last tensor's bytes moved by `by`: an overlap (by < 0) or a gap (by > 0) before it."""
    last = header[_tensors(header)[-1]]
    last["data_offsets"] = [o + by for o in last["data_offsets"]]


def overlapping(lora: bytes) -> bytes:
    return rewrite_header(lora, lambda h: _shift(h, -2))


def gapped(lora: bytes) -> bytes:
    n = struct.unpack("<Q", lora[:8])[0]
    return rewrite_header(lora, lambda h: _shift(h, 2), data=lora[8 + n:] + b"\0\0")


def null_offset(lora: bytes) -> bytes:
    return rewrite_header(lora, lambda h: h[_tensors(h)[0]].update(data_offsets=[None, 512]))


def shape_1e400(lora: bytes) -> bytes:
    def change(h: dict) -> None:
        h[_tensors(h)[0]]["shape"] = ["SHAPE"]
    return rewrite_header(lora, change, raw=lambda text: text.replace('["SHAPE"]', "[1e400]"))


def nested_metadata(lora: bytes, depth: int = 100_000) -> bytes:
    """`__metadata__` holding a list nested `depth` deep (json.loads recurses once per level)."""
    def change(h: dict) -> None:
        h["__metadata__"] = {"deep": "NEST"}
    return rewrite_header(lora, change, raw=lambda text: text.replace('"NEST"', "[" * depth + "]" * depth))


def non_string_metadata(lora: bytes) -> bytes:
    return rewrite_header(lora, lambda h: h.setdefault("__metadata__", {}).update(ss_network_dim=16))


def with_values(lora: bytes, value: float, *, dtype=None, name_part: str = "lora_up") -> bytes:
    """`lora` with one factor tensor (the first whose name has `name_part`) filled with `value`."""
    import torch
    from safetensors.torch import load

    tensors = load(lora)
    # an embedding or VAE file (the rows run over those inputs too) has no factor: its first tensor then
    name = next((k for k in sorted(tensors) if name_part in k), sorted(tensors)[0])
    tensors[name] = torch.full_like(tensors[name], value, dtype=dtype or tensors[name].dtype)
    return st_save(tensors, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def zeros_like_lora(lora: bytes, dim: int = 240_000) -> bytes:
    """A valid SDXL LoRA (the good one's names) padded with a large all-zero tensor of its own."""
    import torch
    from safetensors.torch import load

    tensors = load(lora)
    tensors["lora_unet_pad.alpha"] = torch.zeros(dim)  # 960 KB of zeros: a few hundred bytes gzipped twice
    return st_save(tensors)


def nan_embeddings() -> bytes:
    """A trainer embeddings.pti (one row per text encoder) whose rows are NaN."""
    import torch

    return st_save({"text_encoders_0": torch.full((2, 768), float("nan")),
                    "text_encoders_1": torch.full((2, 1280), float("nan"))})


def symlink_tar(lora: bytes) -> bytes:
    """A trainer tar with the LoRA and a symlink to /etc/passwd."""
    buf = io.BytesIO(make_trainer_tar(lora))
    out = io.BytesIO()
    with tarfile.open(fileobj=buf) as src, tarfile.open(fileobj=out, mode="w") as tf:
        for m in src.getmembers():
            tf.addfile(m, src.extractfile(m))
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return out.getvalue()


def token_pair(w: World, tag: str) -> dict:
    """A host that gives the LoRA to ?token=A and refuses any other token; the file is fetched (and cached) with A
    first, then the prediction asks with B: B's host must be asked, and say no."""
    def answer(req):
        from fakes import file_response

        if req.query.get("token") == ["tok_A_secret"]:
            return file_response(req, w.lora)
        return Response(401, b"bad token", {"Content-Type": "text/plain"})
    w.files.route("GET", rf"/{tag}/lora\.safetensors", answer)
    url = f"{w.files.url}/{tag}/lora.safetensors?token="
    ref = parse_lora_ref(url + "tok_A_secret")
    w.cache.fetch(ref)
    w.cache.release(ref)
    return {"lora_weights": url + "tok_B_secret"}


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    """One hostile source. `build(world, tag)` returns the predict() inputs (or a callable for a row that runs
    elsewhere); `error` None means the source recovers and the prediction must succeed with the LoRA applied."""

    build: Callable[[World, str], dict | Callable[[], None]]
    error: type[Exception] | None
    input: str = "lora_weights"
    says: tuple[str, ...] = ()  # regexes the message must contain, besides "<input>: ... expected ... got ..."
    via: str = "predictor"  # or "server": the real Cog server (image URLs as a caller of the server sends them)
    env: dict = field(default_factory=dict)  # env vars, weights constants (upper case) or cache settings for the row
    check: Callable[[World, str], None] | None = None  # more to check afterwards
    hides: tuple[str, ...] = ()  # texts (secrets) the message must not contain


def row(id: str, *args, **kwargs):
    return pytest.param(Case(*args, **kwargs), id=id)


LINK_LOCAL = r"link-local / cloud metadata"
HUGE = (r"expected at most 16777216 pixels \(4096x4096\)", r"got a larger image \(Image size \(400000000 pixels\)")

CASES = [
    # --- HTTP status codes, on every source
    row("url-404", lambda w, t: {"lora_weights": w.faulty(t, "fail", 404)}, NotFoundError,
        says=(r"was not found", r"got HTTP 404")),
    row("hf-404-missing-file", lambda w, t: {"extra_lora": w.hf(t) + "/blob/main/missing.safetensors"}, NotFoundError,
        "extra_lora", (r"missing.safetensors is not in Hugging Face repo", r"got no such path")),
    row("civitai-404-version", lambda w, t: {"lora_weights": "https://civitai.com/models/1?modelVersionId=404404"},
        NotFoundError, says=(r"not found", r"got HTTP 404")),
    row("replicate-404-model", lambda w, t: {"lora_weights": f"hostile/{t}"}, NotFoundError,
        says=(r"was not found", r"got HTTP 404")),
    row("url-401", lambda w, t: {"lora_weights": w.faulty(t, "fail", 401, times=-1)}, AuthRequiredError,
        says=(r"refused access", r"got HTTP 401")),
    row("hf-401-private-repo", lambda w, t: {"lora_weights": w.hf(t, private=True)},
        AuthRequiredError, says=(r"needs a Hugging Face token", r"got HTTP 401")),
    row("civitai-401-needs-token", lambda w, t: {"extra_lora": w.civ(token="civ_x")}, AuthRequiredError, "extra_lora",
        (r"refused access", r"got HTTP 401", r"civitai_api_token")),
    row("url-403", lambda w, t: {"lora_weights": w.faulty(t, "fail", 403, times=-1)}, AuthRequiredError,
        says=(r"refused access", r"got HTTP 403")),
    row("hf-403-gated", lambda w, t: {"lora_weights": w.hf(t, gated=True)},
        AuthRequiredError, says=(r"gated", r"got HTTP 403")),
    row("url-500-forever", lambda w, t: {"lora_weights": w.faulty(t, "fail", 500, times=-1)}, NetworkError,
        says=(r"kept failing", r"got HTTP 500 after 5 attempts")),
    # --- transient failures that recover: the prediction succeeds with the LoRA
    row("url-429-retry-after-then-ok", lambda w, t: {"lora_weights": w.faulty(
        t, "fail", 429, headers={"Retry-After": str(RETRY_AFTER)})}, None, check=lambda w, t: _waited(w, t, RETRY_AFTER)),
    row("url-500-then-ok", lambda w, t: {"lora_weights": w.faulty(t, "fail", 500, times=2)}, None,
        check=lambda w, t: _asked(w, t, 3)),
    row("civitai-503-api-then-ok", lambda w, t: {"extra_lora": w.civ(api_fault=503)}, None),
    row("replicate-502-delivery-then-ok", lambda w, t: {"lora_weights": w.rep(t, delivery_fault=502)}, None),
    # --- pages instead of files
    row("url-html-login-page", lambda w, t: {"lora_weights": w.serve(
        t, b"<!doctype html><html><body><form>Sign in</form></body></html>", content_type="text/html")},
        IncompatibleError, says=(r"expected a \.safetensors LoRA", r"got an HTML/XML page")),
    row("url-html-as-octet-stream", lambda w, t: {"extra_lora": w.serve(t, b"<html><body>Log in</body></html>")},
        IncompatibleError, "extra_lora", (r"got an HTML/XML page",)),
    row("url-redirect-to-login", lambda w, t: {"lora_weights": w.redirect(t, "/accounts/login?next=/x")},
        AuthRequiredError, says=(r"redirected to a login page", r"got a login redirect")),
    row("civitai-html-instead-of-file", lambda w, t: {"lora_weights": w.civ(served=b"<html>Please log in</html>")},
        AuthRequiredError, says=(r"answered with a page instead of the file", r"got an HTML/XML page")),
    row("hf-html-instead-of-file", lambda w, t: {"lora_weights": w.hf(t, served=b"<html>login</html>")},
        ChecksumError, says=(r"does not match the Hub's listing", r"got 18 bytes", r"login or error page")),
    row("replicate-html-instead-of-tar", lambda w, t: {"lora_weights": w.rep(t, b"<html>Sign in</html>")},
        IncompatibleError, says=(r"got not a tar archive \(an HTML/XML page",)),
    row("url-json-error-200", lambda w, t: {"lora_weights": w.serve(t, b'{"error": "quota exceeded"}')},
        IncompatibleError, says=(r"got a JSON document",)),
    # --- truncated or forged bodies
    row("url-truncated-every-time", lambda w, t: {"lora_weights": w.faulty(t, "truncate", 1000, times=-1)},
        NetworkError, says=(r"expected \d+ bytes; got \d+ bytes",)),
    row("url-truncated-no-length", lambda w, t: {"lora_weights": w.serve(t, w.lora[: len(w.lora) // 2])},
        ChecksumError, says=(r"got a truncated safetensors file",)),
    row("civitai-truncated", lambda w, t: {"lora_weights": w.civ(served=w.lora[: len(w.lora) // 2])}, ChecksumError,
        says=(r"truncated",)),
    row("civitai-wrong-sha256", lambda w, t: {"lora_weights": w.civ(served=w.other_lora)}, ChecksumError,
        says=(r"failed its checksum", r"expected sha256 [0-9a-f]{16}\.\.\.; got sha256 [0-9a-f]{16}")),
    row("hf-wrong-sha256", lambda w, t: {"extra_lora": w.hf(t, served=w.other_lora)}, ChecksumError,
        "extra_lora", (r"checksum",)),
    row("replicate-tar-path-traversal", lambda w, t: {"lora_weights": w.rep(t, traversal_tar(w.lora))},
        IncompatibleError, says=(r"can't tell which file in the tar is the LoRA", r"got \.\./\.\./lora\.safetensors")),
    row("replicate-truncated-tar", lambda w, t: {"lora_weights": w.rep(t, make_trainer_tar(w.lora)[:3000])},
        ChecksumError, says=(r"truncated",)),
    # --- not safetensors
    row("url-pickle-renamed", lambda w, t: {"lora_weights": w.serve(t, pickle_file())}, IncompatibleError,
        says=(r"got a Python pickle",)),
    row("hf-pickle-renamed", lambda w, t: {"extra_lora": w.hf(t, pickle_file())}, IncompatibleError, "extra_lora",
        (r"got a Python pickle",)),
    row("data-pickle", lambda w, t: {"lora_weights": data_url(pickle_file())}, IncompatibleError,
        says=(r"got a Python pickle",)),
    row("url-huge-header-claim", lambda w, t: {"lora_weights": w.serve(t, huge_header_claim())}, IncompatibleError,
        says=(r"got a safetensors header of 1099511627776 bytes", r"at most 104857600")),
    row("civitai-huge-header", lambda w, t: {"lora_weights": w.civ(huge_header(w.lora, 80_000))}, IncompatibleError,
        says=(r"got a safetensors header of \d+ bytes", r"at most 131072"),
        env={"MAX_SAFETENSORS_HEADER": 131072}),
    row("url-zero-bytes", lambda w, t: {"lora_weights": w.serve(t, b"")}, IncompatibleError,
        says=(r"got an empty file",)),
    row("civitai-zero-bytes", lambda w, t: {"lora_weights": w.civ(served=b"")}, AuthRequiredError,
        says=(r"got an empty file",)),
    row("data-zero-bytes", lambda w, t: {"extra_lora": "data:application/octet-stream;base64,"}, IncompatibleError,
        "extra_lora", (r"got an empty file",)),
    # --- LoRAs for other base models, and checkpoints given as a LoRA
    row("url-sd15-lora", lambda w, t: {"lora_weights": w.serve(t, w.foreign["sd15"])}, IncompatibleError,
        says=(r"expected an SDXL-family LoRA", r"got an SD1\.x/SD2\.x LoRA")),
    row("hf-flux-lora", lambda w, t: {"extra_lora": w.hf(t, w.foreign["flux"])}, IncompatibleError, "extra_lora",
        (r"got a Flux LoRA",)),
    row("civitai-sd3-lora-labelled-sdxl", lambda w, t: {"lora_weights": w.civ(w.foreign["sd3"])}, IncompatibleError,
        says=(r"got an SD3 LoRA",)),
    row("civitai-flux-base-model", lambda w, t: {"lora_weights": w.civ(base_model="Flux.1 D")}, IncompatibleError,
        says=(r"trained for another base model", r"got baseModel 'Flux\.1 D'")),
    row("replicate-sd15-in-tar", lambda w, t: {"lora_weights": w.rep(t, make_trainer_tar(w.foreign["sd15"]))},
        IncompatibleError, says=(r"got an SD1\.x/SD2\.x LoRA",)),
    row("data-checkpoint-as-lora", lambda w, t: {"lora_weights": data_url(w.foreign["checkpoint"])},
        IncompatibleError, says=(r"got a full (SDXL|model) checkpoint", r"goes in the checkpoint input")),
    row("civitai-checkpoint-model", lambda w, t: {"lora_weights": w.civ(model_type="Checkpoint").split("?")[0]},
        IncompatibleError, says=(r"is not a LoRA", r"got a Checkpoint model")),
    row("url-oversize-checkpoint", lambda w, t: {"lora_weights": w.serve(t, w.foreign["oversize"])}, TooLargeError,
        says=(r"too large for a LoRA", r"expected at most 1 MiB \(LORA_MAX_BYTES\)", r"full checkpoint")),
    row("url-oversize-no-length", lambda w, t: {"extra_lora": w.faulty(t, "no_length", body=w.foreign["oversize"])},
        TooLargeError, "extra_lora", (r"LORA_MAX_BYTES",)),
    row("hf-oversize", lambda w, t: {"lora_weights": w.hf(t, w.foreign["oversize"])}, TooLargeError,
        says=(r"LORA_MAX_BYTES", r"got 2 MiB")),
    # --- redirects
    row("url-redirect-loop", lambda w, t: {"lora_weights": w.redirect(t, f"/{t}/lora.safetensors")}, NetworkError,
        says=(r"redirected too often", r"expected at most 10 redirects")),
    row("url-redirect-to-file-scheme", lambda w, t: {"lora_weights": w.redirect(t, "file:///etc/passwd")},
        InvalidReferenceError, says=(r"redirected to a non-http URL", r"got file:")),
    row("civitai-redirect-to-ftp", lambda w, t: {"extra_lora": w.civ_download("ftp://127.0.0.1/x.safetensors")},
        InvalidReferenceError, "extra_lora", (r"non-http", r"got ftp:")),
    # --- slow drip, Content-Disposition
    row("url-slow-drip", lambda w, t: {"lora_weights": w.faulty(t, "drip", 0.01)}, NetworkError,
        says=(r"took too long", r"LORA_DOWNLOAD_TIMEOUT"), env={"LORA_DOWNLOAD_TIMEOUT": "0.4"}),
    row("url-content-disposition-traversal", lambda w, t: {"lora_weights": w.serve(t, w.lora, headers={
        "Content-Disposition": f'attachment; filename="../../../../../../tmp/{t}.safetensors"'})}, None,
        check=lambda w, t: _nothing_named(w, t)),
    # --- link-local and metadata targets (nothing is ever connected to)
    row("url-metadata-ip", lambda w, t: {"lora_weights": "http://169.254.169.254/latest/meta-data/x.safetensors"},
        BlockedHostError, says=(LINK_LOCAL, r"got 169\.254\.169\.254")),
    row("url-metadata-decimal-ip", lambda w, t: {"extra_lora": "http://2852039166/x.safetensors"}, BlockedHostError,
        "extra_lora", (LINK_LOCAL, r"got 169\.254\.169\.254")),
    row("url-ipv6-link-local", lambda w, t: {"lora_weights": "http://[fe80::1]/x.safetensors"}, BlockedHostError,
        says=(LINK_LOCAL, r"got fe80::1")),
    row("url-ipv4-mapped-metadata", lambda w, t: {"lora_weights": "http://[::ffff:169.254.169.254]/x.safetensors"},
        BlockedHostError, says=(LINK_LOCAL,)),
    row("url-metadata-hostname", lambda w, t: {"lora_weights": "http://metadata.google.internal/x.safetensors"},
        BlockedHostError, says=(LINK_LOCAL, r"metadata host name")),
    row("url-redirect-to-metadata", lambda w, t: {"lora_weights": w.redirect(t, "http://169.254.169.254/latest/")},
        BlockedHostError, says=(r"redirected to http://169\.254\.169\.254/latest/", LINK_LOCAL)),
    row("civitai-redirect-to-ecs-metadata",
        lambda w, t: {"lora_weights": w.civ_download("http://169.254.170.2/v2/creds")}, BlockedHostError,
        says=(LINK_LOCAL, r"got 169\.254\.170\.2")),
    # --- the disk
    row("url-disk-fills-mid-download", lambda w, t: _fetch_with_file_size_limit(w, w.serve(t, w.lora)), TooLargeError,
        says=(r"the disk filled up", r"File too large")),
    row("url-below-free-disk-floor", lambda w, t: {"lora_weights": w.serve(t, w.lora)}, TooLargeError,
        says=(r"not enough disk space", r"LORA_CACHE_MIN_FREE_BYTES"), env={"min_free_bytes": 1 << 60}),
    # --- image inputs
    row("image-not-an-image", lambda w, t: {"image": w.images / "notes.png"}, utils.InputError, "image",
        (r"expected a PNG, JPEG or WebP image",)),
    row("image-20000x20000", lambda w, t: {"image": w.images / "huge.png"}, utils.InputError, "image",
        HUGE),
    row("image-truncated-png", lambda w, t: {"image": w.images / "truncated.png"}, utils.InputError, "image",
        (r"expected a complete PNG, JPEG or WebP image, got one that could not be decoded",)),
    row("mask-20000x20000", lambda w, t: {"image": w.images / "ok.png", "mask": w.images / "huge.png"},
        utils.InputError, "mask", HUGE),
    row("mask-html-page", lambda w, t: {"image": w.images / "ok.png", "mask": w.images / "login.png"},
        utils.InputError, "mask", (r"expected a PNG, JPEG or WebP image",)),
    row("server-image-url-html-page", lambda w, t: {"image": w.image_host.url + "/login.png"}, utils.InputError,
        "image", (r"expected a PNG, JPEG or WebP image",), via="server"),
    row("server-image-url-20000x20000", lambda w, t: {"image": w.image_host.url + "/huge.png"}, utils.InputError,
        "image", HUGE, via="server"),
    # --- archives hold only what a trainer tar holds: uncompressed, few members, plain files (issue 14, class 3)
    row("replicate-bz2-bomb-5gib", lambda w, t: {"lora_weights": w.rep(t, make_bz2_tar_bomb())}, IncompatibleError,
        says=(r"got a bzip2-compressed archive", r"expected an uncompressed \.tar")),
    row("url-gzip-tar", lambda w, t: {"lora_weights": w.serve(t, gzip.compress(make_trainer_tar(w.lora)),
                                                              name="trained_model.tar")},
        IncompatibleError, says=(r"got a gzip-compressed archive",)),
    row("replicate-tar-300-members", lambda w, t: {"lora_weights": w.rep(t, make_many_member_tar(w.lora, 300))},
        IncompatibleError, says=(r"got more than 256 members",)),
    row("replicate-pax-sparse-200mib", lambda w, t: {"lora_weights": w.rep(t, make_pax_sparse_tar(w.lora))},
        IncompatibleError, says=(r"got a sparse file 'lora\.safetensors'",)),
    row("replicate-tar-with-symlink", lambda w, t: {"lora_weights": w.rep(t, symlink_tar(w.lora))},
        IncompatibleError, says=(r"got a link 'passwd'",)),
    row("data-url-trainer-tar", lambda w, t: {"lora_weights": data_url(make_trainer_tar(w.lora))}, None),
    # --- every byte of a response, headers included, under the deadline; no decoding (class 5)
    row("url-headers-drip", lambda w, t: {"lora_weights": f"{w.drip_headers.url}/{t}/lora.safetensors"}, NetworkError,
        says=(r"took too long", r"expected at most 1s \(LORA_DOWNLOAD_TIMEOUT\)"), env={"LORA_DOWNLOAD_TIMEOUT": "1"}),
    row("url-100-continue-forever", lambda w, t: {"extra_lora": f"{w.continue_forever.url}/{t}/lora.safetensors"},
        NetworkError, "extra_lora", (r"took too long",), env={"LORA_DOWNLOAD_TIMEOUT": "1"}),
    row("image-url-headers-drip", lambda w, t: {"image": f"{w.drip_headers.url}/{t}/x.png"}, NetworkError, "image",
        (r"took too long",), env={"INPUT_DOWNLOAD_TIMEOUT": "1"}),
    row("url-gzip-gzip-encoding", lambda w, t: {"lora_weights": w.serve(t, gzip_twice(zeros_like_lora(w.lora)),
                                                                        headers={"Content-Encoding": "gzip, gzip"})},
        IncompatibleError, says=(r"sent an encoded body", r"got Content-Encoding: gzip, gzip")),
    # --- one table of refused addresses, also with LORA_ALLOW_LOCAL_HOSTS=1 (set for this module); image URLs (class 6)
    row("url-oracle-metadata", lambda w, t: {"lora_weights": "http://192.0.0.192/opc/x.safetensors"},
        BlockedHostError, says=(LINK_LOCAL, r"got 192\.0\.0\.192")),
    row("url-aws-ipv6-metadata", lambda w, t: {"lora_weights": "http://[fd00:ec2::254]/x.safetensors"},
        BlockedHostError, says=(LINK_LOCAL, r"got fd00:ec2::254")),
    row("url-alibaba-metadata", lambda w, t: {"lora_weights": "http://100.100.100.200/latest/x.safetensors"},
        BlockedHostError, says=(LINK_LOCAL, r"got 100\.100\.100\.200")),
    row("url-nat64-metadata", lambda w, t: {"lora_weights": "http://[64:ff9b::a9fe:a9fe]/x.safetensors"},
        BlockedHostError, says=(LINK_LOCAL,)),
    row("image-url-metadata", lambda w, t: {"image": "http://169.254.169.254/latest/meta-data/x.png"},
        BlockedHostError, "image", (LINK_LOCAL, r"got 169\.254\.169\.254")),
    row("mask-url-redirect-to-metadata", lambda w, t: {"image": w.image_data, "mask": w.redirect(
        t, "http://[fd00:ec2::254]/latest/")}, BlockedHostError, "mask", (r"redirected to", LINK_LOCAL)),
    row("image-url-signed-404", lambda w, t: {"image": f"{w.files.url}/{t}/gone.png?token=tok_IMG_secret"
                                                        "&X-Amz-Signature=sig_IMG_secret"},
        NotFoundError, "image", (r"was not found", r"got HTTP 404"), hides=("tok_IMG", "sig_IMG")),
    row("image-url-oversize", lambda w, t: {"image": w.serve(t, bytes(2 << 20), name="big.png")}, TooLargeError,
        "image", (r"expected at most 1 MiB \(INPUT_MAX_BYTES\)",), env={"INPUT_MAX_BYTES": str(1 << 20)}),
    row("image-local-path", lambda w, t: {"image": "/etc/passwd"}, InvalidReferenceError, "image",
        (r"expected an http\(s\) URL or a data: URL",)),
    # --- cache identity; files refused at download unless they load (class 7)
    row("url-token-b-after-token-a", token_pair, AuthRequiredError, says=(r"refused access", r"got HTTP 401"),
        hides=("tok_A", "tok_B")),
    row("url-overlapping-offsets", lambda w, t: {"lora_weights": w.serve(t, overlapping(w.lora))}, ChecksumError,
        says=(r"tensor data overlaps",)),
    row("url-gap-between-tensors", lambda w, t: {"lora_weights": w.serve(t, gapped(w.lora))}, ChecksumError,
        says=(r"tensor data leaves a gap",)),
    row("civitai-trailing-bytes", lambda w, t: {"lora_weights": w.civ(w.lora + bytes(64))}, ChecksumError,
        says=(r"64 bytes after the last tensor",)),
    row("hf-non-string-metadata", lambda w, t: {"lora_weights": w.hf(t, non_string_metadata(w.lora))},
        ChecksumError, says=(r"__metadata__ must map strings to strings",)),
    # --- values: NaN, Inf or absurd weights are refused at download, naming the input (class 4, download side)
    row("url-nan-lora", lambda w, t: {"lora_weights": w.serve(t, with_values(w.lora, float("nan")))},
        IncompatibleError, says=(r"holds unusable weights", r"expected finite values within \+-10000",
                                 r"got NaN or Inf values in tensor 'lora_unet_")),
    row("civitai-1e30-lora", lambda w, t: {"extra_lora": w.civ(with_values(w.lora, 1e30, dtype=_f32()))},
        IncompatibleError, "extra_lora", (r"got values beyond \+-10000 in tensor",)),
    row("data-inf-alpha", lambda w, t: {"lora_weights": data_url(with_values(w.lora, float("inf"), name_part="alpha"))},
        IncompatibleError, says=(r"NaN or Inf values in tensor '.*\.alpha'",)),
    row("replicate-nan-embeddings", lambda w, t: {"lora_weights": w.rep(t, make_trainer_tar(
        w.lora, embeddings=nan_embeddings(), special_params={"TOK": "<s0><s1>"}))},
        IncompatibleError, says=(r"\(embeddings\.pti\) holds unusable weights", r"text_encoders_0")),
    # --- raw exceptions and 60 KB errors (class 9)
    row("url-null-data-offset", lambda w, t: {"lora_weights": w.serve(t, null_offset(w.lora))}, ChecksumError,
        says=(r"bad entry",)),
    row("url-shape-1e400", lambda w, t: {"lora_weights": w.serve(t, shape_1e400(w.lora))}, ChecksumError,
        says=(r"bad entry",)),
    row("url-nested-metadata", lambda w, t: {"lora_weights": w.serve(t, nested_metadata(w.lora))}, ChecksumError,
        says=(r"header is not JSON",)),
    row("url-60kb", lambda w, t: {"lora_weights": f"{w.files.url}/{'a' * 60_000}.safetensors"},
        InvalidReferenceError, says=(r"too long", r"at most 8192 characters")),
    row("url-7kb-path-404", lambda w, t: {"lora_weights": f"{w.files.url}/{'b' * 7_000}.safetensors"},
        NotFoundError, says=(r"got HTTP 404",)),
]


def _f32():
    import torch

    return torch.float32


def _waited(w: World, tag: str, seconds: float) -> None:
    """The retry came no sooner than the 429's Retry-After asked (the backoff alone would be 0.01 s)."""
    first, second = [r.at for r in w.files.requests if r.path.startswith(f"/{tag}/")]
    assert second - first >= seconds


def _asked(w: World, tag: str, times: int) -> None:
    assert w.files.count(f"^/{tag}/", "GET") == times


def _nothing_named(w: World, tag: str) -> None:
    """The Content-Disposition file name was not used: no file of that name anywhere it could have pointed."""
    assert not Path(f"/tmp/{tag}.safetensors").exists()
    assert not list(w.cache.root.parent.rglob(f"{tag}*"))


# ---------------------------------------------------------------------------------------- rows run elsewhere
FSIZE_CHILD = r"""
import json, resource, signal, sys
import weights
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), hard))
cache = weights.LoraCache(sys.argv[1])
try:
    cache.fetch(weights.parse_lora_ref(sys.argv[2]), input_name="lora_weights")
    print(json.dumps({"ok": True}))
except weights.WeightsError as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err), "input": err.input_name}))
"""


def _fetch_with_file_size_limit(w: World, url: str) -> Callable[[], None]:
    """The fetch, into this module's cache folder, by a process that may write at most half the LoRA to any file:
    the download fails part way exactly as on a full disk (an OSError from write()). Raises what the child got."""

    def attempt() -> None:
        proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(w.cache.root), url, str(len(w.lora) // 2)],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert "error" in result, "the fetch succeeded despite the file size limit"
        raise getattr(weights, result["error"])(result["message"], input_name=result["input"])

    return attempt


# ------------------------------------------------------------------------------------------------ fixtures
def _png(predictor, **inputs) -> bytes:
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, **inputs}))
    return Path(path).read_bytes()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def world(predictor, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    mp = pytest.MonkeyPatch()
    cache = LoraCache(root / "lora-cache", max_file_bytes=LORA_CAP)
    mp.setattr(predictor, "lora_cache", cache)
    mp.setattr(weights, "RETRY_BACKOFF", 0.01)
    mp.setattr(weights, "READ_TIMEOUT", 3.0)
    mp.setattr(weights, "CONNECT_TIMEOUT", 3.0)
    for name in ("HF_TOKEN", "CIVITAI_API_TOKEN", "REPLICATE_API_TOKEN", "REPLICATE_WEB_BASE", "LORA_DOWNLOAD_TIMEOUT",
                 "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        mp.delenv(name, raising=False)
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.setenv("HF_HOME", str(root / "hf-home"))
    mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    pipe = predictor.models.models["illustrious"].txt2img
    made = root / "made"
    made.mkdir()
    write_kohya_lora(made / "good.safetensors", pipe, te=False)
    write_kohya_lora(made / "other.safetensors", pipe, te=False, seed=1)
    foreign = {}
    for kind in ("sd15", "flux", "sd3", "checkpoint"):
        foreign[kind] = write_foreign_lora(made / f"{kind}.safetensors", pipe, kind).read_bytes()
    foreign["oversize"] = oversize_checkpoint()

    images = root / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(images / "ok.png")
    (images / "notes.png").write_text("shopping list: eggs, milk\n")
    (images / "login.png").write_text("<!doctype html><html><body>Sign in</body></html>")
    Image.new("1", (20000, 20000)).save(images / "huge.png", compress_level=1)  # 400 Mpx, ~60 KB on disk
    ok = (images / "ok.png").read_bytes()
    (images / "truncated.png").write_bytes(ok[: len(ok) // 2])

    servers = [FakeServer(), FakeHFHub(), FakeCivitai(), FakeReplicate(), FakeServer()]
    for server in servers:
        server.start()
    raw = [RawHostileServer("drip-headers"), RawHostileServer("continue-forever")]
    for server in raw:
        server.__enter__()
    files, hub, civitai, replicate, image_host = servers
    for name in ("login.png", "huge.png"):
        image_host.add_file(f"/{name}", (images / name).read_bytes(), content_type="image/png")
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("CIVITAI_API_BASE", civitai.url)
    mp.setenv("REPLICATE_API_BASE", replicate.url)
    try:
        yield World(predictor=predictor, cache=cache, files=files, hub=hub, civitai=civitai, replicate=replicate,
                    lora=(made / "good.safetensors").read_bytes(), other_lora=(made / "other.safetensors").read_bytes(),
                    foreign=foreign, images=images, image_host=image_host, control=_png(predictor),
                    drip_headers=raw[0], continue_forever=raw[1])
    finally:
        for server in servers:
            server.stop()
        for server in raw:
            server.__exit__()
        mp.undo()


@pytest.fixture(scope="module")
def with_lora(world) -> np.ndarray:
    """What the good LoRA makes of the control prompt, fetched from a well-behaved URL."""
    pixels = _pixels(_png(world.predictor, lora_weights=world.serve("well-behaved", world.lora)))
    assert not np.array_equal(pixels, _pixels(world.control))
    return pixels


@pytest.fixture(scope="module")
def server_control(cog_server) -> tuple:
    """(the real Cog server, its output for the control inputs made before any hostile row)."""
    result = cog_server.predict(SMALL)
    assert result["status"] == "succeeded", result
    return cog_server, result["output"]


# ------------------------------------------------------------------------------------------------ checks
def cache_state(cache: LoraCache) -> dict[str, str]:
    """{entry folder: sha256} after checking that the cache holds nothing partial or bad: no temp leftovers,
    every entry complete and intact (its file's sha256 and size are its index entry's, its structure is valid
    safetensors, its folder is its key's hash) and the in-memory index agreeing with the disk."""
    leftovers = sorted(p.name for p in (cache.root / "tmp").iterdir())
    assert leftovers == [], f"temp files left in the cache: {leftovers}"
    entries, total = {}, 0
    for folder in (cache.root / "entries").iterdir():
        meta = json.loads((folder / "meta.json").read_text("utf-8"))
        assert LoraCache.key_name(meta["canonical_id"]) == folder.name
        data = (folder / weights.LORA_FILE_NAME).read_bytes()
        assert (sha256(data), len(data)) == (meta["sha256"], meta["size"]), f"entry {folder.name} is not what it says"
        header = weights.check_safetensors(folder / weights.LORA_FILE_NAME)  # as strict as the loader
        weights.check_tensor_values(folder / weights.LORA_FILE_NAME, header, weights.VALUE_BOUNDS["LoRA"])
        entries[folder.name] = meta["sha256"]
        total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert {k: v for k, v in cache.stats.items() if k in ("entries", "bytes")} == {"entries": len(entries), "bytes": total}
    return entries


def check_message(message: str, case: Case, err: BaseException | None = None) -> None:
    assert message.startswith(f"{case.input}:"), f"the error does not name {case.input}: {message[:300]}"
    assert len(message) < 1000, f"the error is {len(message)} characters long"
    for secret in case.hides:
        assert secret not in message, f"{secret!r} leaked into the error"
    assert re.search(r"expected .+got ", message), f"the error does not say what was expected and what came: {message}"
    for pattern in case.says:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    if isinstance(err, weights.WeightsError):
        assert err.input_name == case.input


# ------------------------------------------------------------------------------------------------- the test
def apply_env(env: dict, cache, monkeypatch) -> None:
    """A row's settings: the cache's free-disk floor, a weights.py constant, or an environment variable."""
    for name, value in env.items():
        if name == "min_free_bytes":
            monkeypatch.setattr(cache, name, value)
        elif name.isupper() and hasattr(weights, name):
            monkeypatch.setattr(weights, name, value)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("case", CASES)
def test_hostile_source_fails_clearly_leaves_no_bad_file_and_the_next_prediction_is_unchanged(
        case: Case, world: World, request, monkeypatch):
    tag = request.node.callspec.id
    apply_env(case.env, world.cache, monkeypatch)
    built = case.build(world, tag)
    if case.via == "server":
        _server_row(case, built, world, request.getfixturevalue("server_control"))
        return
    with_lora = request.getfixturevalue("with_lora") if case.error is None else None
    before = cache_state(world.cache)
    attempt = built if callable(built) else (lambda: _png(world.predictor, **built))

    if case.error is None:
        got = _pixels(_png(world.predictor, **built))
        assert np.array_equal(got, with_lora), "the recovered download did not give the LoRA's image"
        added = {k: v for k, v in cache_state(world.cache).items() if k not in before}
        assert list(added.values()) == [sha256(world.lora)]
        if case.check:
            case.check(world, tag)
    else:
        with pytest.raises(case.error) as caught:
            attempt()
        check_message(str(caught.value), case, caught.value)
        assert cache_state(world.cache) == before
    monkeypatch.undo()
    assert _png(world.predictor) == world.control


def _server_row(case: Case, inputs: dict, world: World, server_control: list) -> None:
    """An image URL sent to the real server: the failure comes back as the prediction's error."""
    server, control = server_control
    result = server.predict({**SMALL, **inputs})
    assert result["status"] == "failed", result
    _, _, message = result["error"].partition(f"{case.error.__name__}: ")  # coglet prefixes the exception's name
    assert message, result["error"]
    check_message(message, case)
    assert server.predict(SMALL)["output"] == control


# ------------------------------------------------------------------------------- the same table, new inputs
# Every row whose source is a LoRA reference runs again for `more_loras`, `embeddings`, `vae` and `control_model`:
# the download path is one for every kind of file (weights.KINDS), so each kind must meet each hostile source the
# same way. The good file of the row is the kind's own (an embedding, a VAE, a ControlNet); a failing row fails at
# the fetch, before any GPU work,
# and a recovering row is fetched without generating, so no row makes an image (the model state is checked by
# identity instead: no LoRA merged, the tokenizers and the VAE the model's own).
KIND_INPUTS = {
    # input: (weights.KINDS key, how a reference is written in the input, the name errors must start with)
    "more_loras": ("LoRA", lambda ref: f"# from a hostile source\n{ref} 0.5", "more_loras line 2"),
    "embeddings": ("embedding", lambda ref: f"\nhostile={ref}", "embeddings line 2"),
    "vae": ("VAE", lambda ref: ref, "vae"),
    "upscaler_model": ("upscaler", lambda ref: ref, "upscaler_model"),
    "control_model": ("ControlNet", lambda ref: ref, "control_model"),
}
# What else an input needs to be fetched at all (upscaler_model is used by the hires fix's esrgan step only; a
# ControlNet only acts with a control image).
KIND_NEEDS = {
    "upscaler_model": lambda w: {"hires_scale": 1.25, "hires_upscaler": "esrgan", "hires_strength": 1.0},
    "control_model": lambda w: {"control_image": w.image_data, "control_preprocess": False},
}
# Rows about what a LoRA file holds: another kind says instead that the file is not one of its kind.
_VALUE_ROWS = ("url-nan-lora", "civitai-1e30-lora", "data-inf-alpha")
_CONTENT_ROWS = ("url-sd15-lora", "hf-flux-lora", "civitai-sd3-lora-labelled-sdxl", "replicate-sd15-in-tar",
                 "data-checkpoint-as-lora")
LORA_ROWS = [p for p in CASES if p.values[0].input in ("lora_weights", "extra_lora") and p.values[0].via == "predictor"
             and p.id != "url-disk-fills-mid-download"]  # that one runs a LoraCache in a child process


def _kind_bodies(pipe, weights_dir: Path, folder: Path) -> dict[str, tuple[bytes, bytes]]:
    """(good, other good) bodies per kind: embeddings of the tiny encoders' widths, the tiny VAE in A1111 layout, a
    tiny plain ControlNet in fp16 (under the module's 1 MiB cap) with two seeds."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO / "script"))
    import tiny_weights

    from ldm_checkpoint import convert_vae

    gen = torch.Generator().manual_seed(3)
    # 24 vectors (9 KB): larger than what five resumed attempts of the truncating row bring (5 x 1000 bytes)
    embedding = [st_save({"clip_l": torch.randn(24, 32, generator=gen), "clip_g": torch.randn(24, 64, generator=gen)})
                 for _ in range(2)]
    vae_dir = weights_dir / utils.VAE_DIR
    state = convert_vae(load_file(str(vae_dir / "diffusion_pytorch_model.safetensors")),
                        json.loads((vae_dir / "config.json").read_text()))
    other = {**state, "decoder.conv_out.bias": state["decoder.conv_out.bias"] + 0.1}
    from test_upscale import compact_upscaler  # a tiny Compact 4x upscaler, which spandrel detects

    upscalers = (st_save(compact_upscaler(seed=8, features=16)), st_save(compact_upscaler(seed=9, features=16)))
    controlnets = []
    for seed in (41, 43):
        tiny_weights.build_plain_controlnet(folder / f"controlnet-{seed}", weights_dir / utils.MODEL_DIRS["illustrious"]
                                            / "unet", seed=seed, dtype=torch.float16)
        controlnets.append((folder / f"controlnet-{seed}" / "diffusion_pytorch_model.safetensors").read_bytes())
    return {"embedding": (embedding[0], embedding[1]), "VAE": (st_save(state), st_save(other)),
            "upscaler": upscalers, "ControlNet": (controlnets[0], controlnets[1])}


@pytest.fixture(scope="module")
def kind_worlds(world, tmp_path_factory):
    """The world with each kind's cache (the LoRA cap as its per-file cap) and good files."""
    import dataclasses

    root = tmp_path_factory.mktemp("hostile-kinds")
    pipe = world.predictor.models.models["illustrious"].txt2img
    bodies = _kind_bodies(pipe, world.predictor.weights_dir, root)
    mp = pytest.MonkeyPatch()
    worlds = {"LoRA": world}
    for kind, (good, other) in bodies.items():
        cache = weights.CACHE_CLASSES[kind](root / kind, max_file_bytes=LORA_CAP)
        mp.setitem(world.predictor.caches, kind, cache)
        worlds[kind] = dataclasses.replace(world, cache=cache, lora=good, other_lora=other)
    try:
        yield worlds
    finally:
        mp.undo()


def _kind_case(case: Case, row_id: str, kind: str, input_name: str, built: dict) -> Case:
    """The row's expectations for `kind`: the same error class and messages, with the kind's words."""
    ref = next(iter(built.values()))
    spec = weights.KINDS[kind]
    refused = (not spec.accepts_tar and (ref.startswith("hostile/") or ref.endswith(".tar"))) or \
        (not spec.accepts_data and ref.startswith("data:"))
    if refused:  # a source this kind is never shipped as: refused when parsed
        return dataclasses.replace(case, error=InvalidReferenceError, input=input_name, says=(r"are not",))
    if not spec.accepts_tar and row_id == "data-url-trainer-tar":  # not unpacked: a tar is no file of this kind
        return dataclasses.replace(case, error=IncompatibleError, input=input_name,
                                   says=(rf"is not a usable {kind} file",))
    says = tuple(s.replace("a LoRA", f"an? (SDXL )?{kind}").replace("LoRA", kind).replace("LORA_MAX_BYTES", spec.max_env)
                 for s in case.says)
    env = case.env
    if kind != "LoRA" and row_id == "civitai-huge-header":  # an embedding's / VAE's own header is small
        env, says = {"MAX_SAFETENSORS_HEADER": 65536}, (r"got a safetensors header of \d+ bytes", r"at most 65536")
    if kind != "LoRA" and row_id in _CONTENT_ROWS:
        says = (rf"is not an SDXL {kind}",) if kind != "upscaler" else (r"is not an upscaler spandrel can load",)
    if spec.any_base_model and row_id == "civitai-flux-base-model":  # an upscaler has no base model: it is used
        return dataclasses.replace(case, error=None, input=input_name, says=())
    if kind != "LoRA" and row_id in _VALUE_ROWS:  # the kind's own bound and tensor names
        says = (r"holds unusable weights", r"(NaN or Inf values|values beyond \+-[\d.e+]+) in tensor")
    if kind != "LoRA":
        says = tuple(s for s in says if s not in (r"full checkpoint",))
    return dataclasses.replace(case, input=input_name, says=says, env=env)



@pytest.mark.parametrize("kind_input", list(KIND_INPUTS))
@pytest.mark.parametrize("case", LORA_ROWS)
def test_hostile_source_through_the_new_inputs(case: Case, kind_input: str, kind_worlds, request, monkeypatch):
    from sdxl import embeddings
    import predict

    kind, write, input_name = KIND_INPUTS[kind_input]
    w = kind_worlds[kind]
    row_id = next(p.id for p in LORA_ROWS if p.values[0] is case)
    tag = f"{kind_input}-{row_id}"
    built = case.build(w, tag)
    expected = _kind_case(case, row_id, kind, input_name, built)
    apply_env(expected.env, w.cache, monkeypatch)
    inputs = {kind_input: write(next(iter(built.values()))), **KIND_NEEDS.get(kind_input, lambda w: {})(w)}
    before = cache_state(w.cache)
    if expected.error is None:
        if kind_input == "more_loras":
            refs = [x.ref for x in predict.parse_more_loras(inputs[kind_input])]
        elif kind_input == "embeddings":
            refs = [x.ref for x in embeddings.parse_embeddings(inputs[kind_input])]
        else:
            refs = [weights.parse_ref(inputs[kind_input], kind, input_name=input_name)]
        file = w.cache.fetch(refs[0], weights.Tokens(), input_name=input_name)
        w.cache.release(refs[0])
        assert file.sha256 == sha256(w.lora)
        added = {k: v for k, v in cache_state(w.cache).items() if k not in before}
        assert list(added.values()) in ([sha256(w.lora)], [])  # [] when an earlier kind row cached the same file
        if case.check:
            case.check(w, tag)
    else:
        with pytest.raises(expected.error) as caught:
            w.predictor.predict(**predict_inputs(**{**SMALL, **inputs}))
        check_message(str(caught.value), expected, caught.value)
        assert cache_state(w.cache) == before
    model = w.predictor.models.models["illustrious"]
    merger = w.predictor.mergers["illustrious"]
    assert merger.active == () or case.error is None
    assert model.txt2img.tokenizer is merger._orig_tokenizers[0]
    assert all(p.vae is model.txt2img.vae for p in (model.img2img, model.inpaint))
    assert kind != "upscaler" or w.predictor.upscalers._user is None  # a refused upscaler is never loaded
