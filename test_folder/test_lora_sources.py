"""CivitAI, Replicate, plain URL and data: references; HTTP behaviour (retries, resume, redirects, caps); pget;
and the no-secrets-anywhere guarantee."""

from __future__ import annotations

import base64
import logging
import os
import socket
import time

import pytest
import urllib3

import weights
from fakes import (Response, civitai, files, hf_hub, make_lora, make_trainer_tar, replicate, sha256,  # noqa: F401
                   weights_env, write_fake_pget)
from weights import (AuthRequiredError, BlockedHostError, ChecksumError, IncompatibleError, InvalidReferenceError,
                     LoraCache, NetworkError, NotFoundError, Tokens, TooLargeError, WeightsError, parse_lora_ref)

LORA = make_lora(1)


@pytest.fixture(autouse=True)
def _loopback_allowed(monkeypatch):
    """The fakes listen on 127.0.0.1, which weights.py refuses unless LORA_ALLOW_LOCAL_HOSTS=1 (SSRF tests unset it)."""
    monkeypatch.setenv("LORA_ALLOW_LOCAL_HOSTS", "1")


def fetch(text: str, tokens: Tokens | None = None, cache: LoraCache | None = None, input_name: str = "lora_weights"):
    cache = cache or LoraCache.from_env()
    return cache.fetch(parse_lora_ref(text, input_name=input_name), tokens or Tokens(), input_name=input_name)


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, source, cid", [
    ("civitai.com/models/123", "civitai", "civitai-model:123"),
    ("https://civitai.com/models/123/some-slug", "civitai", "civitai-model:123"),
    ("https://civitai.com/models/123/some-slug?modelVersionId=456", "civitai", "civitai:456"),
    ("https://civitai.red/models/123?modelVersionId=456", "civitai", "civitai:456"),
    ("civitai.com/models/123?modelversionid=456", "civitai", "civitai:456"),  # any case of the parameter name
    ("https://CivitAI.com/models/123/slug?MODELVERSIONID=456&x=1", "civitai", "civitai:456"),
    ("https://civitai.com/api/download/models/456?type=Model&format=SafeTensor", "civitai", "civitai:456"),
    ("urn:air:sdxl:lora:civitai:123@456", "civitai", "civitai:456"),
    ("air:illustrious:lora:civitai:123@456", "civitai", "civitai:456"),
    ("sdxl:lora:civitai:123", "civitai", "civitai-model:123"),
    ("owner/model", "replicate", "replicate:owner/model"),
    ("owner/model:5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa", "replicate",
     "replicate:owner/model:5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"),
    ("owner/model/versions/abc123", "replicate", "replicate:owner/model:abc123"),
    ("https://replicate.com/owner/model", "replicate", "replicate:owner/model"),
    ("https://replicate.com/owner/model/versions/abc123", "replicate", "replicate:owner/model:abc123"),
])
def test_parse_forms(text, source, cid):
    ref = parse_lora_ref(text)
    assert (ref.source, ref.canonical_id) == (source, cid)


def test_parse_delivery_tar():
    ref = parse_lora_ref("https://replicate.delivery/pbxt/abc/trained_model.tar")
    assert ref.source == "replicate" and ref.is_tar and ref.canonical_id.startswith("replicate-delivery:")


def test_parse_url_drops_signed_query_from_key_and_display():
    a = parse_lora_ref("https://cdn.example.com/x/lora.safetensors?X-Amz-Signature=AAA&X-Amz-Credential=k")
    b = parse_lora_ref("https://user:pw@CDN.example.com/x/lora.safetensors?X-Amz-Signature=BBB")
    assert a.source == "url" and a.canonical_id == b.canonical_id and a.canonical_id.startswith("url:")
    assert "Signature" not in a.display and "AAA" not in repr(a) and "pw" not in b.display


def test_parse_url_query_that_names_the_file_is_part_of_the_key():
    one = parse_lora_ref("https://files.example.com/download?id=1")
    two = parse_lora_ref("https://files.example.com/download?id=2")
    assert one.canonical_id != two.canonical_id
    assert one.display == two.display == "https://files.example.com/download"  # the display stays query-free
    # Signing / auth / expiry parameters (any case) are not part of the key; the others are, in any order.
    # Signing / expiry parameters (any case) are not part of the key, but mark the URL as signed (resolved against
    # the host's ETag); auth parameters are (hashed); the others are, in any order.
    signed = ("https://files.example.com/download?sig=S&id=1&se=2030-01-01&X-Goog-Signature=G&Expires=9"
              "&x-ms-version=1&Policy=P&Key-Pair-Id=K&response-content-disposition=a&download=true")
    assert parse_lora_ref(signed).canonical_id == one.canonical_id and parse_lora_ref(signed).signed
    assert not parse_lora_ref(signed).resolved and one.resolved
    token_a = parse_lora_ref("https://files.example.com/download?id=1&token=tok_secret_a")
    token_b = parse_lora_ref("https://files.example.com/download?id=1&token=tok_secret_b")
    assert token_a.canonical_id not in (one.canonical_id, token_b.canonical_id)
    assert "tok_secret" not in token_a.canonical_id + repr(token_a) + token_a.display
    assert parse_lora_ref("https://files.example.com/download?b=2&a=1").canonical_id == \
        parse_lora_ref("https://files.example.com/download?a=1&b=2").canonical_id
    assert parse_lora_ref("https://files.example.com/download").canonical_id not in (one.canonical_id, two.canonical_id)


def test_urls_differing_only_in_query_are_different_loras(files):
    loras = {"1": LORA, "2": make_lora(2)}
    files.route("GET", r"/download", lambda req: weights_file(req, loras[req.query["id"][0]]))
    cache = LoraCache.from_env()
    first = fetch(files.url + "/download?id=1&sig=A", cache=cache)
    second = fetch(files.url + "/download?id=2&sig=A", cache=cache)
    again = fetch(files.url + "/download?sig=B&id=1", cache=cache)  # re-signed: the same file (same ETag)
    assert first.path.read_bytes() == LORA and second.path.read_bytes() == make_lora(2)
    assert again.path == first.path and cache.stats["entries"] == 2 and cache.stats["hits"] == 1
    assert files.count("/download") == 5  # two downloads, each after its ETag look-up, and the re-signed look-up


def weights_file(req, data: bytes):
    from fakes import file_response

    return file_response(req, data)


def test_parse_data_url():
    text = "data:application/octet-stream;base64," + base64.b64encode(LORA).decode()
    ref = parse_lora_ref(text)
    assert ref.source == "data" and ref.canonical_id == f"data:{sha256(LORA)}" and len(ref.display) < 80


@pytest.mark.parametrize("text", ["", "   ", "ftp://x/y.safetensors", "just-a-word", "owner/repo/file.safetensors",
                                  "urn:air:sd1:lora:civitai:1@2", "urn:air:sdxl:checkpoint:civitai:1@2",
                                  "https://civitai.com/models/1?modelVersionId=abc"])
def test_parse_rejects(text):
    with pytest.raises(InvalidReferenceError) as e:
        parse_lora_ref(text, input_name="extra_lora")
    assert "extra_lora" in str(e.value) and "expected" in str(e.value)


# ------------------------------------------------------------------------------------------------ CivitAI
def test_civitai_version_with_trigger_words(civitai):
    civitai.add_version(10, 100, LORA, base_model="Illustrious", trained_words=("tok style", " "))
    lf = fetch("https://civitai.com/models/10?modelVersionId=100")
    assert lf.path.read_bytes() == LORA and lf.base_model == "Illustrious" and lf.trigger_words == ("tok style",)
    assert lf.ref.canonical_id == "civitai:100"


def test_civitai_model_id_resolves_to_latest_version(civitai):
    civitai.add_version(10, 100, make_lora(2), published_at="2024-01-01T00:00:00Z")
    civitai.add_version(10, 105, LORA, published_at="2025-06-01T00:00:00Z", base_model="Pony")
    lf = fetch("civitai.com/models/10/name")
    assert lf.ref.canonical_id == "civitai:105" and lf.path.read_bytes() == LORA
    assert civitai.count(r"/api/v1/model-versions/10$") == 0  # the model id is never used as a version id


def test_civitai_air_and_download_url(civitai):
    civitai.add_version(10, 100, LORA, base_model="NoobAI")
    cache = LoraCache.from_env()
    assert fetch("urn:air:sdxl:lora:civitai:10@100", cache=cache).size == len(LORA)
    assert fetch("https://civitai.com/api/download/models/100", cache=cache).size == len(LORA)
    assert cache.stats == {"hits": 1, "misses": 1, "bytes": cache.stats["bytes"], "entries": 1}


def test_civitai_token_needed(civitai):
    civitai.add_version(10, 100, LORA, token="civ_TOKEN")
    with pytest.raises(AuthRequiredError, match="civitai_api_token"):
        fetch("urn:air:sdxl:lora:civitai:10@100")
    lf = fetch("urn:air:sdxl:lora:civitai:10@100", Tokens(civitai="civ_TOKEN"))
    assert lf.path.read_bytes() == LORA
    api = [r for r in civitai.requests if r.path.startswith("/api/download")]
    assert api[-1].headers["authorization"] == "Bearer civ_TOKEN"
    # The pre-signed storage host (another origin) never sees the token.
    assert civitai.storage.requests and all("authorization" not in r.headers for r in civitai.storage.requests)


def test_civitai_html_page_instead_of_file(civitai):
    civitai.add_version(10, 100, LORA)
    civitai.route("GET", r"/api/download/models/100", lambda req: Response(200, b"<html>log in</html>", {"Content-Type": "text/html"}))
    with pytest.raises(AuthRequiredError, match="civitai_api_token"):
        fetch("urn:air:sdxl:lora:civitai:10@100")


def test_civitai_json_200_instead_of_file(civitai):
    civitai.add_version(10, 100, LORA)
    civitai.route("GET", r"/api/download/models/100", lambda req: Response(200, b'{"error":"login"}', {"Content-Type": "application/octet-stream"}))
    with pytest.raises(AuthRequiredError):
        fetch("urn:air:sdxl:lora:civitai:10@100")


def test_civitai_login_redirect(civitai):
    civitai.add_version(10, 100, LORA)
    civitai.route("GET", r"/api/download/models/100", lambda req: Response(302, b"", {"Location": "/login?returnUrl=/x"}))
    with pytest.raises(AuthRequiredError, match="login"):
        fetch("urn:air:sdxl:lora:civitai:10@100")


@pytest.mark.parametrize("base", ["SD 1.5", "Flux.1 D", "SD 3", "Pony V7", "SDXL Lightning Plus", "Illustrious 2 Flux",
                                  "", "Other"])
def test_civitai_rejects_other_base_models(civitai, base):
    civitai.add_version(10, 100, LORA, base_model=base)
    with pytest.raises(IncompatibleError, match="SDXL") as e:
        fetch("urn:air:sdxl:lora:civitai:10@100")
    assert repr(base) in str(e.value)  # the base is named


@pytest.mark.parametrize("base", ["Pony", "SDXL 1.0", "SDXL 0.9", "SDXL 1.0 LCM", "SDXL Distilled", "SDXL Turbo",
                                  "SDXL Lightning", "SDXL Hyper", "Illustrious", "NoobAI", " sdxl  1.0 ", "PONY"])
def test_civitai_accepts_sdxl_family(civitai, base):
    civitai.add_version(10, 100, LORA, base_model=base)
    assert fetch("urn:air:sdxl:lora:civitai:10@100").base_model == base


def test_sdxl_family_is_an_exact_table():
    assert weights._is_sdxl_family("Pony") and not weights._is_sdxl_family("Pony V7")
    assert not weights._is_sdxl_family("SDXL-ish") and not weights._is_sdxl_family(None)


def test_civitai_refuses_pickle_and_checkpoints(civitai):
    civitai.add_version(10, 100, LORA, file_format="PickleTensor")
    with pytest.raises(IncompatibleError, match="safetensors"):
        fetch("urn:air:sdxl:lora:civitai:10@100")
    civitai.add_version(20, 200, LORA, model_type="Checkpoint")
    with pytest.raises(IncompatibleError, match="Checkpoint"):
        fetch("civitai.com/models/20")


def test_civitai_wrong_sha256(civitai, weights_env):
    civitai.add_version(10, 100, LORA, sha="ab" * 32)
    with pytest.raises(ChecksumError, match="sha256"):
        fetch("urn:air:sdxl:lora:civitai:10@100")
    assert not list((weights_env / "cache" / "entries").iterdir())


def test_civitai_not_found(civitai):
    with pytest.raises(NotFoundError, match="lora_weights"):
        fetch("civitai.com/models/999")


# ---------------------------------------------------------------------------------------------- Replicate
def test_replicate_latest_with_token_and_sidecars(replicate):
    emb = make_lora(5)  # any valid safetensors file stands for the token rows here
    tar = make_trainer_tar(LORA, embeddings=emb, special_params={"TOK": "<s0><s1>"})
    replicate.add_version("me/style", "v1", make_trainer_tar(make_lora(2)))
    replicate.add_version("me/style", "v2", tar)
    lf = fetch("me/style", Tokens(replicate="r8_test"))
    assert lf.ref.canonical_id == "replicate:me/style:v2" and lf.path.read_bytes() == LORA
    assert lf.embeddings_path and lf.embeddings_path.read_bytes() == emb
    assert lf.special_params == {"TOK": "<s0><s1>"}


def test_replicate_version_forms(replicate):
    replicate.add_version("me/style", "v1", make_trainer_tar(LORA))
    replicate.add_version("me/style", "v2", make_trainer_tar(make_lora(2)))
    cache = LoraCache.from_env()
    assert fetch("me/style:v1", cache=cache).path.read_bytes() == LORA
    assert fetch("me/style/versions/v1", cache=cache).ref.canonical_id == "replicate:me/style:v1"
    assert cache.stats["hits"] == 1


def test_replicate_without_token_keys_by_delivery_location(replicate):
    replicate.add_version("me/style", "v1", make_trainer_tar(LORA))
    cache = LoraCache.from_env()
    a = fetch("me/style", cache=cache)
    assert a.ref.canonical_id.startswith("replicate:me/style@") and a.path.read_bytes() == LORA
    replicate.add_version("me/style", "v2", make_trainer_tar(make_lora(2)))  # a new training is picked up
    b = fetch("me/style", cache=cache)
    assert b.ref.canonical_id != a.ref.canonical_id and b.path.read_bytes() == make_lora(2)


def test_delivery_tar_url_flux_style(files):
    url = files.add_file("/pbxt/x/trained_model.tar", make_trainer_tar(LORA, lora_name="output/flux_lora.safetensors"))
    assert fetch(url).path.read_bytes() == LORA


def test_tar_unsafe_members_are_ignored(files):
    tar = make_trainer_tar(LORA, extra={"../evil.safetensors": b"x", "/abs.json": b"{}"})
    lf = fetch(files.add_file("/t.tar", tar))
    assert lf.path.read_bytes() == LORA
    assert not (lf.path.parent.parent / "evil.safetensors").exists()


def test_tar_with_ambiguous_weights(files):
    tar = make_trainer_tar(LORA, lora_name="a.safetensors", extra={"b.safetensors": LORA})
    with pytest.raises(IncompatibleError, match="a.safetensors"):
        fetch(files.add_file("/t.tar", tar))


def test_replicate_model_missing(replicate):
    with pytest.raises(NotFoundError):
        fetch("me/nothing", Tokens(replicate="r8_test"))


# --------------------------------------------------------------------------------------- plain URLs / HTTP
def test_url_with_redirects(files):
    files.add_file("/real/lora.safetensors", LORA)
    files.add_redirect("/a", "/b")
    files.add_redirect("/b", "/real/lora.safetensors")
    assert fetch(files.url + "/a").path.read_bytes() == LORA


def test_url_redirect_loop_is_bounded(files):
    files.add_redirect("/loop", "/loop")
    with pytest.raises(NetworkError, match="redirect"):
        fetch(files.url + "/loop")


def test_url_redirect_to_non_http(files):
    files.add_redirect("/x", "file:///etc/passwd")
    with pytest.raises(InvalidReferenceError, match="http"):
        fetch(files.url + "/x")


@pytest.mark.parametrize("status, error", [(401, AuthRequiredError), (403, AuthRequiredError), (404, NotFoundError)])
def test_url_http_errors(files, status, error):
    files.fail(r"/f", status, times=-1)
    with pytest.raises(error, match="lora_weights"):
        fetch(files.url + "/f.safetensors")


def test_url_retries_429_with_retry_after_then_succeeds(files, monkeypatch):
    sleeps = []
    monkeypatch.setattr(weights.time, "sleep", lambda s: sleeps.append(s))
    files.add_file("/f.safetensors", LORA)
    files.fail(r"/f", 429, times=1, headers={"Retry-After": "2"})
    files.fail(r"/f", 503, times=1)
    assert fetch(files.url + "/f.safetensors").size == len(LORA)
    assert sleeps[0] == 2.0 and len(sleeps) == 2


def test_url_500_exhausts_retries(files):
    files.fail(r"/f", 500, times=-1)
    with pytest.raises(NetworkError, match="500"):
        fetch(files.url + "/f.safetensors")
    assert files.count(r"/f") == weights.MAX_RETRIES + 1


def test_url_truncated_download_resumes_with_range(files, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 256)  # bytes before the cut reach the disk, as with a large file
    files.add_file("/f.safetensors", LORA)
    files.truncate(r"/f", at=len(LORA) // 2)
    assert fetch(files.url + "/f.safetensors").path.read_bytes() == LORA
    ranges = [r.headers.get("range") for r in files.requests]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and 0 < int(ranges[1][6:-1]) <= len(LORA) // 2


def test_url_truncated_every_time(files):
    files.add_file("/f.safetensors", LORA)
    files.truncate(r"/f", at=10, times=-1)
    with pytest.raises(NetworkError, match="cut short|breaking off"):
        fetch(files.url + "/f.safetensors")


def test_url_slow_response_times_out(files, monkeypatch):
    monkeypatch.setattr(weights, "READ_TIMEOUT", 0.2)
    monkeypatch.setattr(weights, "MAX_RETRIES", 1)
    files.add_file("/f.safetensors", LORA)
    files.slow(r"/f", 1.0)
    with pytest.raises(NetworkError):
        fetch(files.url + "/f.safetensors")


@pytest.mark.parametrize("body, ctype, what", [
    (b"<!DOCTYPE html><html>hi</html>", "text/html", "HTML"),
    (b"<html>sneaky</html>", "application/octet-stream", "HTML"),
    (b"\x80\x04\x95pickle", "application/octet-stream", "pickle"),
    (b"PK\x03\x04zip", "application/octet-stream", "zip"),
    (b"", "application/octet-stream", "empty"),
    (b'{"error": "x"}', "application/json", "JSON"),
])
def test_url_not_safetensors(files, body, ctype, what):
    files.add_file("/f.safetensors", body, content_type=ctype)
    with pytest.raises(IncompatibleError, match=what):
        fetch(files.url + "/f.safetensors")


def test_url_truncated_safetensors_is_corrupt(files):
    files.add_file("/f.safetensors", LORA[:-40])
    with pytest.raises(ChecksumError, match="truncated"):
        fetch(files.url + "/f.safetensors")


def test_url_too_large(files, monkeypatch):
    monkeypatch.setenv("LORA_MAX_BYTES", "1000")
    files.add_file("/f.safetensors", LORA)
    with pytest.raises(TooLargeError, match="checkpoint"):
        fetch(files.url + "/f.safetensors")


def test_content_disposition_never_becomes_a_path(files, weights_env):
    files.add_file("/f.safetensors", LORA, headers={"Content-Disposition": 'attachment; filename="../../evil.safetensors"'})
    lf = fetch(files.url + "/f.safetensors")
    assert lf.path.name == "lora.safetensors" and not list(weights_env.rglob("evil*"))


def test_data_url():
    lf = fetch("data:application/octet-stream;base64," + base64.b64encode(LORA).decode())
    assert lf.path.read_bytes() == LORA
    with pytest.raises(IncompatibleError):
        fetch("data:,hello")


# -------------------------------------------------------------------------------------------------- pget
def fake_pget(weights_env, monkeypatch):
    bindir = weights_env / "bin"
    write_fake_pget(bindir)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(weights, "PGET_MIN_BYTES", 0)
    return bindir / "pget.log"


def test_pget_used_when_on_path(files, weights_env, monkeypatch):
    log = fake_pget(weights_env, monkeypatch)
    files.add_file("/real/f.safetensors", LORA)
    files.add_redirect("/f.safetensors", "/real/f.safetensors")
    assert fetch(files.url + "/f.safetensors").path.read_bytes() == LORA
    # Our client followed (and checked) the redirect and read the size; pget got the final URL and the body.
    assert log.read_text().split() == ["/real/f.safetensors"]
    assert files.count(r"^/f", "GET") == 1 and files.count(r"^/real/f", "GET") == 2


def test_pget_not_used_for_oversize_content_length(files, weights_env, monkeypatch):
    log = fake_pget(weights_env, monkeypatch)
    monkeypatch.setenv("LORA_MAX_BYTES", "1000")
    files.add_file("/f.safetensors", LORA)
    with pytest.raises(TooLargeError, match="LORA_MAX_BYTES"):
        fetch(files.url + "/f.safetensors")
    assert not log.exists()  # refused before pget ran


def test_pget_not_used_for_unknown_size(files, weights_env, monkeypatch):
    log = fake_pget(weights_env, monkeypatch)
    files.add_file("/f.safetensors", LORA)
    files.no_length(r"/f")
    assert fetch(files.url + "/f.safetensors").path.read_bytes() == LORA
    assert not log.exists()  # streamed in Python, with the cap enforced as it arrived
    monkeypatch.setenv("LORA_MAX_BYTES", "1000")
    files.add_file("/g.safetensors", make_lora(2))
    files.no_length(r"/g")
    with pytest.raises(TooLargeError):
        fetch(files.url + "/g.safetensors")
    assert not log.exists()


def test_pget_never_gets_a_redirect_to_a_blocked_host(files, weights_env, monkeypatch):
    log = fake_pget(weights_env, monkeypatch)
    files.add_redirect("/f.safetensors", "http://169.254.169.254/latest/meta-data/x.safetensors")
    with pytest.raises(BlockedHostError, match="link-local"):
        fetch(files.url + "/f.safetensors")
    assert not log.exists()


def test_pget_for_civitai_gets_presigned_url_without_token(civitai, weights_env, monkeypatch):
    bindir = weights_env / "bin"
    write_fake_pget(bindir)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(weights, "PGET_MIN_BYTES", 0)
    civitai.add_version(10, 100, LORA, token="civ_T")
    assert fetch("urn:air:sdxl:lora:civitai:10@100", Tokens(civitai="civ_T")).path.read_bytes() == LORA
    assert (bindir / "pget.log").read_text().startswith("/files/100/")


def test_pget_failure_falls_back_to_python(files, weights_env, monkeypatch):
    bindir = weights_env / "bin"
    bindir.mkdir()
    (bindir / "pget").write_text("#!/bin/sh\nexit 3\n")
    (bindir / "pget").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(weights, "PGET_MIN_BYTES", 0)
    files.add_file("/f.safetensors", LORA)
    assert fetch(files.url + "/f.safetensors").path.read_bytes() == LORA


# ----------------------------------------------------------------------------------------------- secrets
def test_secrets_never_leak(civitai, files, hf_hub, weights_env, caplog):
    caplog.set_level(logging.DEBUG, logger="weights")
    token, sig = "civ_SUPERSECRET_123", "SIGSECRET987"
    hf_hub.add_file("o/private", "x.safetensors", LORA)
    hf_hub.set_private("o/private", "hf_SECRETHF")
    civitai.add_version(10, 100, LORA, token=token)
    civitai.add_version(11, 110, LORA, token=token, sha="cd" * 32)
    files.add_file("/ok.safetensors", make_lora(3))
    files.fail(r"/bad", 500, times=-1)
    files.add_redirect("/presign", f"http://127.0.0.1:1/x.safetensors?X-Amz-Signature={sig}")  # signed hop fails
    tokens = Tokens(civitai=token, hf="hf_SECRETHF", replicate="r8_SECRETR8")
    assert token not in repr(tokens) and "SECRETHF" not in repr(tokens)
    cache = LoraCache.from_env()
    texts = []
    for text in ("urn:air:sdxl:lora:civitai:10@100", f"{files.url}/ok.safetensors?X-Amz-Signature={sig}",
                 "urn:air:sdxl:lora:civitai:11@110", f"{files.url}/bad.safetensors?X-Amz-Signature={sig}",
                 f"http://127.0.0.1:1/unreachable.safetensors?token={sig}", "hf://o/private/x.safetensors",
                 "hf://o/private/missing.safetensors", f"{files.url}/presign"):
        try:
            lf = fetch(text, tokens, cache=cache)
            texts.append(repr(lf))
        except WeightsError as err:
            # Walk both chains: `raise X from Y` also keeps the exception being handled in X.__context__.
            todo, seen = [err], set()
            while todo:
                node = todo.pop()
                if node is None or id(node) in seen:
                    continue
                seen.add(id(node))
                texts.append(f"{type(node).__name__}: {node} {node.args!r}")
                todo += [node.__cause__, node.__context__]
        texts.append(repr(parse_lora_ref(text)))
    texts.append(caplog.text)
    for path in weights_env.joinpath("cache").rglob("*"):
        texts.append(str(path))
        if path.is_file() and path.suffix == ".json":
            texts.append(path.read_text())
    blob = "\n".join(texts)
    assert "miss" in caplog.text
    for secret in (token, sig, "SECRETHF", "SECRETR8"):
        assert secret not in blob


@pytest.mark.parametrize("low_byte", [0x3C, 0x5B, 0x7B, 0x80])
def test_valid_safetensors_whose_header_length_starts_like_html_json_or_pickle(tmp_path, low_byte):
    # The header length is little-endian: its first byte can be "<", "[", "{" or 0x80 in a perfectly valid file.
    import json as _json
    import struct as _struct

    from weights import check_safetensors

    entry = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = _json.dumps(entry).encode()
    pad = (low_byte - len(raw)) % 256
    raw += b" " * pad
    path = tmp_path / "x.safetensors"
    path.write_bytes(_struct.pack("<Q", len(raw)) + raw + b"\0\0\0\0")
    assert path.read_bytes()[0] == low_byte
    assert "w" in check_safetensors(path)


# ------------------------------------------------------------------------------------------- SSRF guard
@pytest.fixture
def no_connect_to(monkeypatch):
    """Fail the test if anything opens a connection to one of the returned set's hosts (filled by the test)."""
    forbidden: set[str] = set()
    attempts: list[str] = []

    def guard(real):
        def create_connection(address, *args, **kwargs):
            attempts.append(address[0])
            if address[0] in forbidden:
                pytest.fail(f"a connection to {address[0]} was attempted")
            return real(address, *args, **kwargs)
        return create_connection

    monkeypatch.setattr(socket, "create_connection", guard(socket.create_connection))
    monkeypatch.setattr(urllib3.util.connection, "create_connection", guard(urllib3.util.connection.create_connection))
    forbidden.update({"169.254.169.254", "metadata.google.internal", "10.0.0.5", "[fe80::1]", "fe80::1"})
    return attempts


def test_link_local_url_is_refused(weights_env, no_connect_to):
    with pytest.raises(BlockedHostError) as e:
        fetch("http://169.254.169.254/latest/meta-data/x.safetensors?token=T")
    assert str(e.value).startswith("lora_weights: http://169.254.169.254/latest/meta-data/x.safetensors points to a "
                                   "link-local / cloud metadata address (expected a public http(s) URL")
    assert "token" not in str(e.value) and not no_connect_to


def test_loopback_redirect_to_metadata_is_refused_before_connecting(files, no_connect_to):
    files.add_redirect("/f.safetensors", "http://169.254.169.254/latest/meta-data/iam/x.safetensors")
    with pytest.raises(BlockedHostError) as e:
        fetch(files.url + "/f.safetensors")
    msg = str(e.value)
    assert "redirected to http://169.254.169.254/latest/meta-data/iam/x.safetensors" in msg and "link-local" in msg
    assert "169.254.169.254" not in no_connect_to and files.count(r"/f") == 1


def test_redirect_to_a_name_resolving_to_link_local_is_refused(files, no_connect_to, monkeypatch):
    """Every resolved address counts: one public and one metadata address is refused."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "sneaky.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    files.add_redirect("/f.safetensors", "http://sneaky.example/x.safetensors")
    with pytest.raises(BlockedHostError, match="sneaky.example/x.safetensors, which points to a link-local"):
        fetch(files.url + "/f.safetensors")
    assert "sneaky.example" not in no_connect_to


@pytest.mark.parametrize("url, reason", [
    ("http://metadata.google.internal/computeMetadata/v1/x.safetensors", "metadata"),
    ("http://metadata/x.safetensors", "metadata"),
    ("http://instance-data/latest/x.safetensors", "metadata"),
    ("http://METADATA.google.internal./x.safetensors", "metadata"),
    ("http://[fe80::1]/x.safetensors", "link-local"),
    ("http://[::ffff:169.254.169.254]/x.safetensors", "link-local"),
    ("http://0.0.0.0:8080/x.safetensors", "unspecified"),
    ("http://[::]/x.safetensors", "unspecified"),
    ("http://224.0.0.1/x.safetensors", "multicast"),
    ("http://240.0.0.1/x.safetensors", "reserved"),
])
def test_always_refused_hosts(weights_env, no_connect_to, monkeypatch, url, reason):
    def no_dns(*args, **kwargs):
        pytest.fail("metadata names and IP literals are refused without a DNS look-up")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(BlockedHostError, match=reason):  # even with LORA_ALLOW_LOCAL_HOSTS=1
        fetch(url)
    assert not no_connect_to


def test_loopback_and_private_refused_unless_allowed(files, no_connect_to, monkeypatch):
    files.add_file("/f.safetensors", LORA)
    monkeypatch.delenv("LORA_ALLOW_LOCAL_HOSTS")
    with pytest.raises(BlockedHostError, match="loopback address.*LORA_ALLOW_LOCAL_HOSTS=1"):
        fetch(files.url + "/f.safetensors")
    with pytest.raises(BlockedHostError, match="loopback"):
        fetch(files.url.replace("127.0.0.1", "localhost") + "/f.safetensors")
    for host in ("10.0.0.5", "172.16.1.1", "192.168.1.1", "100.64.0.1", "[fc00::1]"):
        with pytest.raises(BlockedHostError, match="private-network"):
            fetch(f"http://{host}/f.safetensors")
    assert not files.requests and not no_connect_to
    monkeypatch.setenv("LORA_ALLOW_LOCAL_HOSTS", "1")
    assert fetch(files.url + "/f.safetensors").path.read_bytes() == LORA


def test_api_bases_are_checked(weights_env, monkeypatch, no_connect_to):
    monkeypatch.setenv("CIVITAI_API_BASE", "http://169.254.169.254")
    with pytest.raises(BlockedHostError, match="link-local"):
        fetch("urn:air:sdxl:lora:civitai:1@2")
    monkeypatch.setenv("REPLICATE_API_BASE", "http://169.254.169.254")
    with pytest.raises(BlockedHostError, match="link-local"):
        fetch("me/model", Tokens(replicate="r8_x"))
    assert not no_connect_to


def test_unresolvable_name_is_a_network_error(weights_env, monkeypatch):
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(NetworkError, match="could not reach"):
        fetch("http://no-such-host.invalid/x.safetensors")


# -------------------------------------------------------------------------------------- overall deadline
def test_slow_drip_download_hits_the_deadline(files, monkeypatch):
    monkeypatch.setenv("LORA_DOWNLOAD_TIMEOUT", "0.5")
    files.add_file("/f.safetensors", LORA)
    files.drip(r"/f", 0.05)  # a byte every 50 ms: each read is quick, the whole would take minutes
    started = time.monotonic()
    with pytest.raises(NetworkError, match="took too long.*LORA_DOWNLOAD_TIMEOUT"):
        fetch(files.url + "/f.safetensors")
    assert time.monotonic() - started < 3


def test_deadline_default_and_env(monkeypatch):
    monkeypatch.delenv("LORA_DOWNLOAD_TIMEOUT", raising=False)
    assert weights._download_timeout() == weights.DEFAULT_DOWNLOAD_TIMEOUT == 1800
    monkeypatch.setenv("LORA_DOWNLOAD_TIMEOUT", "12.5")
    assert weights._download_timeout() == 12.5
