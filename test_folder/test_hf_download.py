"""Hugging Face, against loopback fakes (fakes.FakeHFHub via HF_ENDPOINT):

* weights.py: every accepted reference form, file selection, auth, retries and verification;
* script/download_weights, run as a subprocess the way a model owner runs it, filling a weights folder from a
  fake hub that serves the tiny weights (the Illustrious repo holds a single-file A1111 checkpoint written by
  test_folder/ldm_checkpoint.py), plus the round trip of that checkpoint through diffusers.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weights
from fakes import FakeHFHub, hf_hub, make_lora, sha256, weights_env  # noqa: F401  (fixtures)
from hub_listings import HUB_LISTINGS, placeholder
from weights import (AuthRequiredError, BlockedHostError, ChecksumError, InvalidReferenceError, LoraCache, NotFoundError,
                     Tokens, parse_lora_ref)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_checkpoint import write_ldm_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "script" / "download_weights"
sys.path.insert(0, str(REPO))
from utils import MODEL_DIRS, SAFETY_DIR, VAE_DIR  # noqa: E402

LORA = make_lora(1)


@pytest.fixture(autouse=True)
def _loopback_allowed(monkeypatch):
    """The fakes listen on 127.0.0.1, which weights.py refuses unless LORA_ALLOW_LOCAL_HOSTS=1."""
    monkeypatch.setenv("LORA_ALLOW_LOCAL_HOSTS", "1")


def fetch(text: str, tokens: Tokens | None = None, cache: LoraCache | None = None):
    cache = cache or LoraCache.from_env()
    return cache.fetch(parse_lora_ref(text), tokens or Tokens())


# ---- parsing: one test per form
@pytest.mark.parametrize("text, cid", [
    ("huggingface.co/owner/repo", "hf:owner/repo@main:"),
    ("https://huggingface.co/owner/repo", "hf:owner/repo@main:"),
    ("https://huggingface.co/owner/repo/blob/main/sub/x.safetensors", "hf:owner/repo@main:sub/x.safetensors"),
    ("https://huggingface.co/owner/repo/resolve/v2/x.safetensors?download=true", "hf:owner/repo@v2:x.safetensors"),
    ("https://huggingface.co/owner/repo/tree/main/sub", "hf:owner/repo@main:sub/"),
    ("hf://owner/repo", "hf:owner/repo@main:"),
    ("hf://owner/repo@dev", "hf:owner/repo@dev:"),
    ("hf://owner/repo@dev/a/b.safetensors", "hf:owner/repo@dev:a/b.safetensors"),
    ("hf://owner/repo/sub", "hf:owner/repo@main:sub/"),
    ("https://HUGGINGFACE.co/owner/repo", "hf:owner/repo@main:"),  # hosts are case-insensitive
    ("HTTPS://HuggingFace.CO/owner/repo/blob/main/x.safetensors", "hf:owner/repo@main:x.safetensors"),
    ("HUGGINGFACE.co/owner/repo", "hf:owner/repo@main:"),
    ("https://HF.co/owner/repo", "hf:owner/repo@main:"),
])
def test_parse_hf_forms(text, cid):
    ref = parse_lora_ref(text)
    assert ref.source == "huggingface" and ref.canonical_id == cid and ref.repo == "owner/repo"


def test_hf_endpoint_url_is_hf(hf_hub):
    ref = parse_lora_ref(f"{hf_hub.url}/owner/repo/resolve/main/x.safetensors")
    assert ref.source == "huggingface" and ref.path == "x.safetensors"


def test_hf_path_must_be_safetensors():
    with pytest.raises(InvalidReferenceError, match="lora_weights"):
        parse_lora_ref("hf://owner/repo/model.ckpt")


# ---- downloads
def test_repo_prefers_pytorch_lora_weights(hf_hub):
    hf_hub.add_file("o/r", "pytorch_lora_weights.safetensors", LORA)
    hf_hub.add_file("o/r", "other.safetensors", make_lora(2))
    hf_hub.add_file("o/r", "README.md", b"# hi")
    lf = fetch("huggingface.co/o/r")
    assert lf.path.read_bytes() == LORA and lf.sha256 == sha256(LORA) and lf.size == len(LORA)
    assert lf.ref.canonical_id == f"hf:o/r@{hf_hub.commit('o/r')}:pytorch_lora_weights.safetensors"


def test_repo_single_candidate_skips_checkpoints(hf_hub):
    hf_hub.add_file("o/r", "checkpoint-500/model.safetensors", make_lora(3))
    hf_hub.add_file("o/r", "loras/style.safetensors", LORA)
    assert fetch("hf://o/r").path.read_bytes() == LORA


def test_file_named_checkpoint_is_a_candidate(hf_hub):
    # Only checkpoint *folders* and optimizer/scheduler state are training leftovers; this name is a LoRA.
    hf_hub.add_file("o/r", "my_checkpoint_style.safetensors", LORA)
    hf_hub.add_file("o/r", "checkpoints/epoch1.safetensors", make_lora(2))
    hf_hub.add_file("o/r", "checkpoint-500/optimizer.safetensors", make_lora(3))
    hf_hub.add_file("o/r", "optimizer.safetensors", make_lora(4))
    hf_hub.add_file("o/r", "scheduler.safetensors", make_lora(5))
    lf = fetch("hf://o/r")
    assert lf.path.read_bytes() == LORA and lf.ref.path == "my_checkpoint_style.safetensors"


def test_training_state_filter():
    skip = weights._hf_training_state
    assert skip("checkpoint-500/model.safetensors") and skip("Checkpoints/a.safetensors") and skip("a/checkpoint/x.safetensors")
    assert skip("optimizer.safetensors") and skip("sub/scheduler_0.safetensors")
    assert not skip("my_checkpoint_style.safetensors") and not skip("checkpoint-style.safetensors")
    assert not skip("loras/checkpoint_merge_lora.safetensors") and not skip("pytorch_lora_weights.safetensors")


def test_repo_several_candidates_lists_them(hf_hub):
    hf_hub.add_file("o/r", "a.safetensors", LORA)
    hf_hub.add_file("o/r", "b.safetensors", make_lora(2))
    with pytest.raises(InvalidReferenceError) as e:
        fetch("hf://o/r")
    assert "a.safetensors" in str(e.value) and "b.safetensors" in str(e.value) and "lora_weights" in str(e.value)


def test_repo_without_safetensors(hf_hub):
    hf_hub.add_file("o/r", "model.bin", b"\x80\x04junk")
    with pytest.raises(NotFoundError, match="no .safetensors"):
        fetch("hf://o/r")


def test_blob_url_in_subfolder(hf_hub):
    hf_hub.add_file("o/r", "sub/dir/x.safetensors", LORA)
    assert fetch("https://huggingface.co/o/r/blob/main/sub/dir/x.safetensors").path.read_bytes() == LORA


def test_resolve_url_at_commit(hf_hub):
    hf_hub.add_file("o/r", "x.safetensors", LORA)
    sha = hf_hub.commit("o/r")
    lf = fetch(f"https://huggingface.co/o/r/resolve/{sha}/x.safetensors")
    assert lf.path.read_bytes() == LORA
    # A commit + path is immutable: the repeat is served without any request to the hub.
    before = len(hf_hub.requests)
    fetch(f"hf://o/r@{sha}/x.safetensors")
    assert len(hf_hub.requests) == before


def test_subfolder_search_and_revision(hf_hub):
    hf_hub.add_file("o/r", "sdxl/pytorch_lora_weights.safetensors", LORA)
    hf_hub.add_file("o/r", "flux/pytorch_lora_weights.safetensors", make_lora(2))
    assert fetch("https://huggingface.co/o/r/tree/main/sdxl").path.read_bytes() == LORA
    assert fetch("hf://o/r@main/sdxl").path.read_bytes() == LORA


def test_small_non_lfs_file_checked_by_git_sha(hf_hub):
    hf_hub.add_file("o/r", "tiny.safetensors", LORA, lfs=False)
    assert fetch("hf://o/r/tiny.safetensors").sha256 == sha256(LORA)


def test_repeat_is_a_cache_hit_without_download(hf_hub):
    hf_hub.add_file("o/r", "pytorch_lora_weights.safetensors", LORA)
    cache = LoraCache.from_env()
    first = fetch("hf://o/r", cache=cache)
    second = fetch("hf://o/r", cache=cache)
    assert first.path == second.path
    assert hf_hub.count(r"/resolve/", "GET") == 1
    assert cache.stats["hits"] == 1 and cache.stats["misses"] == 1


@pytest.mark.parametrize("api", ["revision", "tree"])
def test_metadata_calls_are_retried(hf_hub, monkeypatch, api):
    sleeps = []
    monkeypatch.setattr(weights.time, "sleep", sleeps.append)  # the time module: huggingface_hub's sleeps too
    hf_hub.add_file("o/r", "pytorch_lora_weights.safetensors", LORA)
    hf_hub.fail(rf"^/api/models/o/r/{api}/", 503, times=1, headers={"Retry-After": "0.5"})
    assert fetch("hf://o/r").path.read_bytes() == LORA
    assert hf_hub.count(rf"^/api/models/o/r/{api}/") == 2 and len(sleeps) == 1
    if api == "revision":  # ours (model_info has no retry of its own): Retry-After honoured
        assert sleeps == [0.5]


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_model_info_retry_is_bounded(hf_hub, monkeypatch, status):
    monkeypatch.setattr(weights, "MAX_RETRIES", 2)
    hf_hub.add_file("o/r", "pytorch_lora_weights.safetensors", LORA)
    hf_hub.fail(r"^/api/models/o/r/revision/", status, times=-1)
    with pytest.raises(weights.NetworkError, match="lora_weights"):
        fetch("hf://o/r")
    assert hf_hub.count(r"^/api/models/o/r/revision/") == 3


def test_model_info_404_is_not_retried(hf_hub):
    with pytest.raises((NotFoundError, AuthRequiredError)):
        fetch("hf://o/missing", Tokens(hf="hf_x"))
    assert hf_hub.count(r"^/api/models/o/missing") == 1


def test_hf_endpoint_is_checked_by_the_ssrf_guard(weights_env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://169.254.169.254")
    with pytest.raises(BlockedHostError, match="HF_ENDPOINT http://169.254.169.254 points to a link-local"):
        fetch("hf://o/r")


def test_private_repo_needs_token(hf_hub):
    hf_hub.add_file("o/private", "x.safetensors", LORA)
    hf_hub.set_private("o/private", "hf_SECRET")
    with pytest.raises(AuthRequiredError, match="hf_api_token"):
        fetch("hf://o/private/x.safetensors")
    assert fetch("hf://o/private/x.safetensors", Tokens(hf="hf_SECRET")).path.read_bytes() == LORA


def test_gated_repo(hf_hub):
    hf_hub.add_file("o/gated", "x.safetensors", LORA)
    hf_hub.set_gated("o/gated", "hf_OK")
    with pytest.raises(AuthRequiredError, match="terms"):
        fetch("hf://o/gated/x.safetensors")
    assert fetch("hf://o/gated/x.safetensors", Tokens(hf="hf_OK")).size == len(LORA)


def test_missing_repo_file_and_revision(hf_hub):
    hf_hub.add_file("o/r", "x.safetensors", LORA)
    with pytest.raises(NotFoundError, match="nope.safetensors"):
        fetch("hf://o/r/nope.safetensors")
    with pytest.raises(NotFoundError, match="revision"):
        fetch("hf://o/r@v9/x.safetensors")
    with pytest.raises((NotFoundError, AuthRequiredError)):
        fetch("hf://o/missing/x.safetensors")


def test_checksum_mismatch_is_not_cached(hf_hub, weights_env):
    other = make_lora(9)
    hf_hub.add_file("o/r", "x.safetensors", LORA, served=other)
    cache = LoraCache.from_env()
    with pytest.raises(ChecksumError, match="checksum"):
        fetch("hf://o/r/x.safetensors", cache=cache)
    assert cache.stats["entries"] == 0
    assert not any((weights_env / "cache" / "tmp").iterdir())


def test_snapshot_download_against_fake_hub(hf_hub, tmp_path):
    """The lead's script/download_weights uses snapshot_download: the fake hub must serve it."""
    from huggingface_hub import snapshot_download

    hf_hub.add_file("o/model", "model_index.json", b'{"a": 1}')
    hf_hub.add_file("o/model", "unet/diffusion_pytorch_model.safetensors", LORA)
    out = snapshot_download("o/model", local_dir=tmp_path / "snap", endpoint=hf_hub.url, token=False)
    assert (tmp_path / "snap" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == LORA
    assert (tmp_path / "snap" / "model_index.json").read_bytes() == b'{"a": 1}'
    assert out


def test_global_login_is_never_used(hf_hub, weights_env):
    (weights_env / "hf-home").mkdir(exist_ok=True)
    (weights_env / "hf-home" / "token").write_text("hf_GLOBAL_LOGIN")
    hf_hub.add_file("o/r", "x.safetensors", LORA)
    fetch("hf://o/r/x.safetensors")
    assert hf_hub.requests and all("authorization" not in r.headers for r in hf_hub.requests)


def test_token_is_sent_per_request(hf_hub):
    hf_hub.add_file("o/r", "x.safetensors", LORA)
    fetch("hf://o/r/x.safetensors", Tokens(hf="hf_PER_REQUEST"))
    assert all(r.headers.get("authorization") == "Bearer hf_PER_REQUEST" for r in hf_hub.requests if "/o/r" in r.path)


def test_pget_for_public_hf_file(hf_hub, weights_env, monkeypatch):
    import os

    from fakes import write_fake_pget

    bindir = weights_env / "bin"
    write_fake_pget(bindir)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(weights, "PGET_MIN_BYTES", 0)
    hf_hub.add_file("o/r", "x.safetensors", LORA)
    assert fetch("hf://o/r/x.safetensors").path.read_bytes() == LORA
    assert "/o/r/resolve/" in (bindir / "pget.log").read_text()


# ============================================================================ script/download_weights (subprocess)
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
SAFETY_REPO = "CompVis/stable-diffusion-safety-checker"
ILLUSTRIOUS_REPO = "OnomaAIResearch/Illustrious-xl-early-release-v0"
ILLUSTRIOUS_FILE = "Illustrious-XL-v0.1.safetensors"
TOKEN = "hf_fake_token_for_tests_0123456789"
# The ControlNet's source is pinned to the real file's sha256, which no fake file can have: test_control.py covers
# that component (its pin refusing another file, and its renamed layout with the pin set to the tiny file's).
BASE = ["vae", "safety", "sdxl", "illustrious"]
BASE_ONLY = [arg for name in BASE for arg in ("--only", name)]


# ------------------------------------------------------------------------------------------------- fixtures
def _folder_files(folder: Path, rename=lambda rel: rel) -> dict[str, bytes]:
    return {rename(p.relative_to(folder).as_posix()): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fp16_name(rel: str) -> str:
    for stem in ("unet/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        if rel == f"{stem}.safetensors":
            return f"{stem}.fp16.safetensors"
    return rel


def legacy_checker_bin(checker_dir: Path, out_file: Path) -> Path:
    """The tiny safety checker as the real repo ships it: a pickle (torch.save) in the transformers 4.x layout,
    `vision_model.vision_model.*` keys plus the persisted `position_ids` buffer."""
    tensors = {}
    for key, value in load_file(str(checker_dir / "model.safetensors")).items():
        tensors[("vision_model." + key) if key.startswith("vision_model.") else key] = value
    positions = tensors["vision_model.vision_model.embeddings.position_embedding.weight"].shape[0]
    tensors["vision_model.vision_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    torch.save(tensors, out_file)
    return out_file


@pytest.fixture(scope="module")
def hub_repos(tiny_weights: Path, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Every repo of hub_listings.HUB_LISTINGS, file for file: the tiny weights where the script fetches, a
    placeholder elsewhere. A tiny file whose name the real repo does not have is a fixture error."""
    work = tmp_path_factory.mktemp("hub-src")
    checkpoint = write_ldm_checkpoint(
        tiny_weights / MODEL_DIRS["illustrious"], tiny_weights / VAE_DIR, work / ILLUSTRIOUS_FILE, torch.float16
    )
    safety = {k: v for k, v in _folder_files(tiny_weights / SAFETY_DIR).items() if k != "model.safetensors"}
    safety["pytorch_model.bin"] = legacy_checker_bin(tiny_weights / SAFETY_DIR, work / "pytorch_model.bin").read_bytes()
    tiny = {
        SDXL_REPO: _folder_files(tiny_weights / MODEL_DIRS["sdxl"], _fp16_name),
        VAE_REPO: _folder_files(tiny_weights / VAE_DIR),
        SAFETY_REPO: safety,
        ILLUSTRIOUS_REPO: {ILLUSTRIOUS_FILE: checkpoint.read_bytes()},
    }
    repos = {}
    for repo, listing in HUB_LISTINGS.items():
        mine = tiny.get(repo, {})  # the control components' tiny files are served by their own test
        assert set(mine) <= set(listing["files"]), set(mine) - set(listing["files"])
        repos[repo] = {path: mine.get(path) or placeholder(path, size) for path, size in listing["files"].items()}
    return repos


@pytest.fixture(scope="module")
def hub(hub_repos):
    with FakeHFHub() as server:
        for repo, files in hub_repos.items():
            for path, data in files.items():
                server.add_file(repo, path, data)
            server.set_commit(repo, HUB_LISTINGS[repo]["commit"])
        yield server


@pytest.fixture(scope="module")
def pins_file(hub_repos, tmp_path_factory) -> Path:
    """The script's pins with the sha256 and size of the tiny files (commits unchanged: the real ones)."""
    script = _load_script()
    pins = {}
    for name, pin in script.PINS.items():
        if name not in BASE:  # the control components are served by their own tests' fake repos
            continue
        files = hub_repos[script.SOURCES[name]["repo"]]
        pins[name] = {"commit": pin["commit"],
                      "files": {rel: [len(files[rel]), sha256(files[rel])] for rel in pin["files"]}}
    path = tmp_path_factory.mktemp("pins") / "pins.json"
    path.write_text(json.dumps(pins))
    return path


def run_script(hub: FakeHFHub, dest: Path, *args: str, token: str = TOKEN,
               pins: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "WEIGHTS_DIR"}
    home = dest.parent / f".hf-home-{dest.name}"
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=token,
        HF_HOME=str(home),  # no shared cache, no stored token
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dest", str(dest), *(["--pins", str(pins)] if pins else []), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(REPO),
    )


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        ("text_model." + k if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k): v
        for k, v in state.items()
    }


def repo_requests(hub: FakeHFHub, start: int) -> list[tuple[str, str, str | None]]:
    """(method, path, authorization) of the requests about repos (huggingface_hub may also fetch its own
    /api/agent-harnesses registry)."""
    return [(r.method, r.path, r.headers.get("authorization")) for r in hub.requests[start:]
            if r.path != "/api/agent-harnesses"]


def assert_no_leftovers(dest: Path) -> None:
    if dest.exists():
        assert not [p.name for p in dest.iterdir() if p.name.startswith(".")], list(dest.iterdir())


@pytest.fixture(scope="module")
def downloaded(hub: FakeHFHub, pins_file: Path, tmp_path_factory):
    """One full `script/download_weights` run against the real listings: (dest, result, repo requests)."""
    dest = tmp_path_factory.mktemp("downloaded") / "weights"
    before = len(hub.requests)
    result = run_script(hub, dest, *BASE_ONLY, pins=pins_file)
    return dest, result, repo_requests(hub, before)


# ---------------------------------------------------------------------------------------------------- tests
def test_pins_and_sources_match_the_real_listings(script):
    """Every file the script asks for exists in the real repo at the pinned commit, with the pinned size."""
    for name, source in script.SOURCES.items():
        listing = HUB_LISTINGS[source["repo"]]
        assert script.PINS[name]["commit"] == listing["commit"], name
        tree = {path: _Entry(path) for path in listing["files"]}
        assert script.select_files(name, tree), name  # raises DownloadError naming a missing file
        for rel, (size, digest) in script.PINS[name]["files"].items():
            assert rel in listing["files"], f"{name}: {rel} is pinned but not in {source['repo']}"
            assert listing["files"][rel] in (None, size), f"{name}: {rel}"
            assert re.fullmatch(r"[0-9a-f]{64}", digest), f"{name}: {rel}"
        weights = [p for p in script.select_files(name, tree) if p.endswith(script.WEIGHT_SUFFIXES)]
        assert weights and all(w in script.PINS[name]["files"] for w in weights), f"{name}: unpinned weights"


def test_downloads_layout_verifies_and_is_idempotent(downloaded, hub: FakeHFHub, tiny_weights: Path, pins_file: Path):
    dest, result, first_requests = downloaded
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert TOKEN not in output
    assert first_requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in first_requests)
    # Only the files of SOURCES are fetched, each at its pinned commit (never `main`).
    fetched = {path for method, path, _ in first_requests if method == "GET" and "/resolve/" in path}
    script = _load_script()
    for name in BASE:
        source = script.SOURCES[name]
        mine = {p for p in fetched if p.startswith(f"/{source['repo']}/resolve/")}
        assert mine and all(p.startswith(f"/{source['repo']}/resolve/{script.PINS[name]['commit']}/") for p in mine)
    wanted = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "text_encoder/config.json",
              "text_encoder_2/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
              "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors"}
    never = [p for p in HUB_LISTINGS[SDXL_REPO]["files"] if p not in wanted and not p.startswith("tokenizer")]
    assert not [p for p in never if any(f.endswith("/" + p) and f.startswith(f"/{SDXL_REPO}/") for f in fetched)]

    # layout
    assert sorted(p.name for p in dest.iterdir()) == sorted([*MODEL_DIRS.values(), VAE_DIR, SAFETY_DIR])
    for name in MODEL_DIRS.values():
        folder = dest / name
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
            "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet"]
        assert (folder / "model_index.json").is_file() and (folder / "MANIFEST.json").is_file()
        assert not [p for p in folder.rglob("*") if ".fp16." in p.name or p.name.startswith(".")]

    # sdxl-base and vae: byte for byte the originals (variant suffix dropped)
    for name in (MODEL_DIRS["sdxl"], VAE_DIR):
        expected = _folder_files(tiny_weights / name)
        got = {k: v for k, v in _folder_files(dest / name).items() if k != "MANIFEST.json"}
        assert got.keys() == expected.keys(), name
        assert all(got[k] == expected[k] for k in expected), name

    # safety checker: no pickle on disk; its safetensors loads to exactly the tiny checker's tensors
    checker_files = sorted(p.name for p in (dest / SAFETY_DIR).iterdir())
    assert checker_files == ["MANIFEST.json", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert_checker_equals_tiny(dest / SAFETY_DIR, tiny_weights / SAFETY_DIR)

    # illustrious-xl: converted from the single file; tensors equal the tiny originals (fp16, as converted)
    src, out = tiny_weights / MODEL_DIRS["illustrious"], dest / MODEL_DIRS["illustrious"]
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors"):
        want = _text_model_keys(load_file(str(src / rel)))
        got = _text_model_keys(load_file(str(out / rel)))
        assert got.keys() == want.keys(), rel
        for key, value in want.items():
            assert got[key].dtype == torch.float16, key
            assert torch.equal(got[key], value.to(torch.float16)), f"{rel}: {key}"
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer_2/merges.txt"):
        assert (out / rel).read_bytes() == (dest / MODEL_DIRS["sdxl"] / rel).read_bytes(), rel
    # MANIFEST.json: the pinned commit, and for every fetched file its size, sha256 and the check it passed
    pins = json.loads(pins_file.read_text())
    for name in BASE:
        manifest = json.loads((dest / script.SOURCES[name]["folder"] / "MANIFEST.json").read_text())
        assert manifest["commit"] == HUB_LISTINGS[script.SOURCES[name]["repo"]]["commit"], name
        for rel, (size, digest) in pins[name]["files"].items():
            assert manifest["origin"][rel] | {"written_as": None} == {
                "size": size, "sha256": digest, "checked": "pinned-sha256", "written_as": None}, (name, rel)
    safety = json.loads((dest / SAFETY_DIR / "MANIFEST.json").read_text())
    assert safety["origin"]["pytorch_model.bin"]["written_as"] == "model.safetensors"
    assert safety["origin"]["config.json"]["checked"] == "hub-git-blob-id"  # no public sha256: the Hub's record
    out_manifest = json.loads((out / "MANIFEST.json").read_text())
    assert out_manifest["files"]["unet/diffusion_pytorch_model.safetensors"]["sha256"] == hashlib.sha256(
        (out / "unet/diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    # one log line per component, with size and time
    lines = [line for line in result.stdout.splitlines() if line.startswith("[") and " in " in line and "-> " in line]
    assert len(lines) == 4 and all("B in " in line and line.rstrip().endswith(line.split("-> ")[-1]) for line in lines)

    # second run: nothing requested from the hub, nothing changed
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    count = len(hub.requests)
    again = run_script(hub, dest, *BASE_ONLY, pins=pins_file)
    assert again.returncode == 0, again.stdout + again.stderr
    assert repo_requests(hub, count) == []
    assert again.stdout.count("already complete") == 4
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == mtimes

    assert_no_leftovers(dest)


def assert_checker_equals_tiny(folder: Path, tiny_checker: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    converted, info = StableDiffusionSafetyChecker.from_pretrained(folder, use_safetensors=True,
                                                                  output_loading_info=True)
    original = StableDiffusionSafetyChecker.from_pretrained(tiny_checker, use_safetensors=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    want = original.state_dict()
    got = converted.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hub_checksum_mismatch_fails_and_keeps_nothing(hub: FakeHFHub, pins_file: Path, tmp_path: Path):
    dest = tmp_path / "weights"
    data = hub.repos[SAFETY_REPO].files["pytorch_model.bin"].data
    hub.set_served(SAFETY_REPO, "pytorch_model.bin", bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other bytes
    try:
        result = run_script(hub, dest, "--only", "safety", pins=pins_file)
    finally:
        hub.set_served(SAFETY_REPO, "pytorch_model.bin", None)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "checksum mismatch" in result.stderr
    assert f"{SAFETY_REPO}/pytorch_model.bin" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (dest / SAFETY_DIR).exists()
    assert_no_leftovers(dest)


def test_missing_repo_gives_clear_error(hub: FakeHFHub, pins_file: Path, tmp_path: Path):
    dest = tmp_path / "weights"
    hub.set_hidden(SAFETY_REPO)
    try:
        result = run_script(hub, dest, "--only", "safety", pins=pins_file)
    finally:
        hub.set_hidden(SAFETY_REPO, False)
    assert result.returncode == 1
    assert "repository not found" in result.stderr and SAFETY_REPO in result.stderr
    assert "SOURCES" in result.stderr and "HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_leftovers(dest)
    assert not (dest / SAFETY_DIR).exists()


def test_pinned_sha256_mismatch_names_file_both_hashes_and_the_fix(script, tmp_path: Path, monkeypatch):
    """A file that passed the Hub's own check but is not the pinned one (a moved branch, a mirror serving
    other bytes) stops the run."""
    served = tmp_path / "diffusion_pytorch_model.safetensors"
    served.write_bytes(b"other weights")
    monkeypatch.setitem(script.PINS, "vae", {"commit": "1" * 40, "files": {
        "diffusion_pytorch_model.safetensors": (13, "a" * 64)}})
    with pytest.raises(script.DownloadError) as raised:
        script.verify_pin("vae", "diffusion_pytorch_model.safetensors", served, "1" * 40, None)
    message = str(raised.value)
    assert f"{VAE_REPO}/diffusion_pytorch_model.safetensors" in message
    assert sha256(b"other weights") in message and "a" * 64 in message
    assert "update PINS" in message and "HF_ENDPOINT" in message
    monkeypatch.setitem(script.PINS["vae"]["files"], "diffusion_pytorch_model.safetensors",
                        (13, sha256(b"other weights")))
    assert script.verify_pin("vae", "diffusion_pytorch_model.safetensors", served, "1" * 40, None)["checked"] == (
        "pinned-sha256")


def test_pickle_conversion_loads_tensors_only(script, tiny_weights: Path, tmp_path: Path):
    """The legacy-layout .bin becomes a safetensors checker with identical tensors; a pickle that holds anything
    but tensors is refused without running it."""
    folder = tmp_path / "checker"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_weights / SAFETY_DIR / name, folder / name)
    source = legacy_checker_bin(tiny_weights / SAFETY_DIR, tmp_path / "pytorch_model.bin")
    assert script.pickle_to_safetensors(source, folder / "model.safetensors") > 10
    assert_checker_equals_tiny(folder, tiny_weights / SAFETY_DIR)

    evil = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(2), "payload": _Entry("x")}, evil)
    with pytest.raises(script.DownloadError, match="weights_only=True"):
        script.pickle_to_safetensors(evil, tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()


def test_check_passes_a_good_folder_and_lists_what_is_wrong(script, downloaded, pins_file, tmp_path: Path, capsys,
                                                           monkeypatch):
    monkeypatch.setattr(script, "PINS", copy.deepcopy(script.PINS))  # --pins replaces them for this test only
    dest = tmp_path / "weights"
    shutil.copytree(downloaded[0], dest)
    assert script.main(["--dest", str(dest), "--check", "--pins", str(pins_file), *BASE_ONLY]) == 0
    assert capsys.readouterr().out.count("sha256 verified") == 4

    vae_file = dest / VAE_DIR / "diffusion_pytorch_model.safetensors"
    vae_file.write_bytes(vae_file.read_bytes()[:100])  # truncated
    unet = dest / MODEL_DIRS["sdxl"] / "unet/diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size
    unet.write_bytes(bytes(data))
    (dest / MODEL_DIRS["illustrious"] / "tokenizer_2/vocab.json").unlink()
    (dest / SAFETY_DIR / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert script.main(["--dest", str(dest), "--check", "--pins", str(pins_file), *BASE_ONLY]) == 1
    out = capsys.readouterr().out
    assert f"{vae_file}: 100 bytes, MANIFEST.json records" in out
    assert f"{unet}: sha256 " in out
    assert f"{dest / MODEL_DIRS['illustrious'] / 'tokenizer_2/vocab.json'}: missing" in out
    assert "pytorch_model.bin: not written by script/download_weights (a pickle must never be baked" in out
    assert "4 of 4 components need attention" in out and "--only vae --force" in out

    shutil.rmtree(dest / VAE_DIR)
    assert script.main(["--dest", str(dest), "--check", "--only", "vae", "--pins", str(pins_file)]) == 1
    assert f"{dest / VAE_DIR}: missing" in capsys.readouterr().out


def test_old_layout_folder_is_outdated(script, downloaded, pins_file, tmp_path: Path, monkeypatch):
    """A folder written before the pins (revision `main`, no pins in its manifest) is fetched again."""
    monkeypatch.setattr(script, "PINS", copy.deepcopy(script.PINS))
    script.load_pins(pins_file)
    folder = tmp_path / VAE_DIR
    shutil.copytree(downloaded[0] / VAE_DIR, folder)
    assert script.is_complete("vae", folder) and script.check_component("vae", tmp_path) == []
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["source"] = {k: v for k, v in manifest["source"].items() if k not in ("commit", "pins")} | {
        "revision": "main"}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    assert not script.is_complete("vae", folder)
    assert any("another source table" in p for p in script.check_component("vae", tmp_path))


# ------------------------------------------------------------------------------ script internals, in-process
def _load_script():
    """script/download_weights as a module (it has no .py suffix)."""
    if "download_weights_script" not in sys.modules:
        loader = importlib.machinery.SourceFileLoader("download_weights_script", str(SCRIPT))
        spec = importlib.util.spec_from_loader(loader.name, loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        sys.modules[loader.name] = module
    return sys.modules["download_weights_script"]


@pytest.fixture(scope="module")
def script():
    return _load_script()


def test_gated_repo_says_to_accept_and_set_token(script, hub: FakeHFHub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at call time, as in the script
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    hub.set_gated(ILLUSTRIOUS_REPO, "hf_has_access", api=True)
    count = len(hub.requests)
    try:
        with pytest.raises(script.DownloadError) as raised:
            script.Hub().resolve(ILLUSTRIOUS_REPO, "main")
    finally:
        hub.set_gated(ILLUSTRIOUS_REPO, None)
    message = str(raised.value)
    assert "gated" in message and "HF_TOKEN" in message and ILLUSTRIOUS_REPO in message and TOKEN not in message
    calls = [r for r in repo_requests(hub, count) if r[1].startswith(f"/api/models/{ILLUSTRIOUS_REPO}")]
    assert calls and all(auth == f"Bearer {TOKEN}" for _, _, auth in calls)  # sent per request


class _Entry:
    def __init__(self, path):
        self.path, self.blob_id, self.lfs, self.size = path, "0" * 40, None, 1


def test_single_file_selection(script):
    tree = {p: _Entry(p) for p in ("README.md", "other-name.safetensors", "sub/x.safetensors")}
    assert script.select_files("illustrious", tree) == ["other-name.safetensors"]
    tree["second.safetensors"] = _Entry("second.safetensors")
    with pytest.raises(script.DownloadError, match="other-name.safetensors, second.safetensors"):
        script.select_files("illustrious", tree)
    tree[ILLUSTRIOUS_FILE] = _Entry(ILLUSTRIOUS_FILE)
    assert script.select_files("illustrious", tree) == [ILLUSTRIOUS_FILE]
    with pytest.raises(script.DownloadError, match="no root-level"):
        script.select_files("illustrious", {"README.md": _Entry("README.md")})


def test_variant_names_and_sources(script):
    assert script.strip_variant("unet/diffusion_pytorch_model.fp16.safetensors", "fp16") == (
        "unet/diffusion_pytorch_model.safetensors")
    assert script.strip_variant("text_encoder/model.fp16.safetensors", "fp16") == "text_encoder/model.safetensors"
    assert script.strip_variant("unet/config.json", "fp16") == "unet/config.json"
    sdxl = script.SOURCES["sdxl"]["files"]
    assert not [f for f in sdxl if f.startswith("vae")]
    assert all(".fp16." in f for f in sdxl if f.endswith(".safetensors"))


def test_ldm_checkpoint_round_trip(tiny_weights: Path, tmp_path: Path):
    """from_single_file(config=<tiny folder>) gives back exactly the tensors ldm_checkpoint.py wrote."""
    from diffusers import StableDiffusionXLPipeline

    src = tiny_weights / MODEL_DIRS["illustrious"]
    checkpoint = write_ldm_checkpoint(src, tiny_weights / VAE_DIR, tmp_path / "model.safetensors")
    # Config only (no weights), from the *other* tiny model: every tensor must come from the checkpoint.
    config = tmp_path / "config"
    shutil.copytree(tiny_weights / MODEL_DIRS["sdxl"], config, ignore=shutil.ignore_patterns("*.safetensors"))
    (config / "vae").mkdir()
    shutil.copy(tiny_weights / VAE_DIR / "config.json", config / "vae" / "config.json")

    script_module = _load_script()
    # diffusers tells CLIP-L from CLIP-G by width only; the tiny encoders share one, so CLIP-G is passed in,
    # converted by diffusers' own OpenCLIP converter (as script/download_weights does).
    te2 = script_module.load_open_clip_g(checkpoint, config, torch.float32)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(config), local_files_only=True, text_encoder_2=te2
    )
    originals = {
        "unet": (pipe.unet, src / "unet/diffusion_pytorch_model.safetensors"),
        "vae": (pipe.vae, tiny_weights / VAE_DIR / "diffusion_pytorch_model.safetensors"),
        "text_encoder": (pipe.text_encoder, src / "text_encoder/model.safetensors"),
        "text_encoder_2": (pipe.text_encoder_2, src / "text_encoder_2/model.safetensors"),
    }
    for name, (model, file) in originals.items():
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        want = load_file(str(file))
        if not hasattr(model, "text_model"):
            want = {k.removeprefix("text_model."): v for k, v in want.items()}
        assert state.keys() == want.keys(), name
        for key, value in want.items():
            assert torch.equal(state[key], value), f"{name}: {key}"
