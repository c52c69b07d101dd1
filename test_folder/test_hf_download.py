"""Hugging Face references: every accepted form, file selection, auth and verification, against FakeHFHub."""

from __future__ import annotations

import pytest

import weights
from fakes import hf_hub, make_lora, sha256, weights_env  # noqa: F401  (fixtures)
from weights import (AuthRequiredError, ChecksumError, InvalidReferenceError, LoraCache, NotFoundError, Tokens,
                     parse_lora_ref)

LORA = make_lora(1)


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
