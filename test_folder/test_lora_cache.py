"""LoraCache: keys, hits/misses, LRU eviction with pins, byte cap and disk floor, restart, cancellation, locking."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

import weights
from fakes import files, make_lora, weights_env  # noqa: F401  (fixtures)
from weights import LoraCache, Tokens, TooLargeError, parse_lora_ref

LORAS = [make_lora(i) for i in range(4)]


@pytest.fixture(autouse=True)
def _loopback_allowed(monkeypatch):
    """The fakes listen on 127.0.0.1, which weights.py refuses unless LORA_ALLOW_LOCAL_HOSTS=1."""
    monkeypatch.setenv("LORA_ALLOW_LOCAL_HOSTS", "1")


def serve(files, n: int = 4) -> list:
    return [parse_lora_ref(files.add_file(f"/l{i}.safetensors", LORAS[i])) for i in range(n)]


def entry_dirs(root: Path) -> list[Path]:
    return sorted((root / "cache" / "entries").iterdir())


def test_hits_misses_and_log_line(files, caplog):
    caplog.set_level(logging.INFO, logger="weights")
    (a, *_) = serve(files, 1)
    cache = LoraCache.from_env()
    first = cache.fetch(a, Tokens())
    second = cache.fetch(a, Tokens())
    assert first.path == second.path and first.sha256 == second.sha256
    assert cache.stats == {"hits": 1, "misses": 1, "bytes": cache.stats["bytes"], "entries": 1}
    assert cache.stats["bytes"] >= len(LORAS[0])
    lines = [r.getMessage() for r in caplog.records if r.name == "weights"]
    assert any("miss" in m and str(len(LORAS[0])) in m for m in lines)
    assert any(": hit" in m for m in lines)
    assert files.count(r"/l0", "GET") == 1


def test_entry_names_are_hashes(files, weights_env):
    (a, *_) = serve(files, 1)
    lf = LoraCache.from_env().fetch(a)
    (entry,) = entry_dirs(weights_env)
    assert entry.name == LoraCache.key_name(a.canonical_id) and len(entry.name) == 32
    assert lf.path == entry / "lora.safetensors"
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["canonical_id"] == a.canonical_id and meta["sha256"] == lf.sha256


def test_index_survives_restart_without_network(files):
    (a, *_) = serve(files, 1)
    LoraCache.from_env().fetch(a)
    files.stop()  # nothing can be downloaded any more
    again = LoraCache.from_env()
    assert again.stats["entries"] == 1
    assert again.fetch(a).path.read_bytes() == LORAS[0] and again.stats["hits"] == 1


def test_broken_entries_and_stale_temp_files_are_cleaned(files, weights_env):
    a, b = serve(files, 2)
    cache = LoraCache.from_env()
    cache.fetch(a), cache.fetch(b)
    broken = weights_env / "cache" / "entries" / LoraCache.key_name(a.canonical_id)
    (broken / "meta.json").unlink()  # a lost sidecar
    stale = weights_env / "cache" / "tmp" / "dl-old"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = LoraCache.from_env()
    assert fresh.stats["entries"] == 1 and not broken.exists() and not stale.exists()
    assert fresh.fetch(a).path.read_bytes() == LORAS[0] and fresh.stats["misses"] == 1


def test_entry_removed_by_another_process_is_refetched(files):
    (a, *_) = serve(files, 1)
    cache = LoraCache.from_env()
    lf = cache.fetch(a)
    cache.release(a)
    other = LoraCache.from_env()
    other.clear()
    assert not lf.path.exists()
    assert cache.fetch(a).path.read_bytes() == LORAS[0]
    assert files.count(r"/l0", "GET") == 2


def test_lru_eviction_respects_byte_cap(files, weights_env, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_MAX_BYTES", str(2 * len(LORAS[0]) + 2000))  # room for two entries
    a, b, c, _ = serve(files)
    cache = LoraCache.from_env()
    for ref in (a, b):
        cache.fetch(ref), cache.release(ref)
        time.sleep(0.01)
    cache.fetch(a), cache.release(a)  # a is now the most recently used
    cache.fetch(c), cache.release(c)
    names = {p.name for p in entry_dirs(weights_env)}
    assert names == {LoraCache.key_name(a.canonical_id), LoraCache.key_name(c.canonical_id)}
    assert cache.stats["entries"] == 2


def test_pinned_entry_is_never_evicted(files, weights_env, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_MAX_BYTES", str(len(LORAS[0]) + 1000))  # room for one entry
    a, b, c, _ = serve(files)
    cache = LoraCache.from_env()
    in_use = cache.fetch(a)  # not released: a prediction is using it
    cache.fetch(b)
    assert in_use.path.exists()
    cache.release(a)
    cache.release(b)
    cache.fetch(c)
    assert not in_use.path.exists() and cache.stats["entries"] == 1


def test_release_accepts_unresolved_ref(files, weights_env, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_MAX_BYTES", "1")
    a, b, *_ = serve(files)
    cache = LoraCache.from_env()
    lf = cache.fetch(a)
    cache.release(lf.ref)
    cache.fetch(b)
    assert not lf.path.exists()


def test_free_disk_floor(files, weights_env, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_MIN_FREE_BYTES", str(1 << 60))
    (a, *_) = serve(files, 1)
    with pytest.raises(TooLargeError, match="disk space") as e:
        LoraCache.from_env().fetch(a)
    assert "lora_weights" in str(e.value)
    assert not list((weights_env / "cache" / "tmp").iterdir())


def test_cancellation_leaves_no_partial_file(files, weights_env, monkeypatch):
    from cog import CancelationException

    (a, *_) = serve(files, 1)

    def cancel(path):
        assert path.exists()  # the partial file is there at this point
        raise CancelationException()

    monkeypatch.setattr(weights, "check_safetensors", cancel)
    cache = LoraCache.from_env()
    with pytest.raises(CancelationException):
        cache.fetch(a)
    assert not list((weights_env / "cache" / "tmp").iterdir())
    assert not list((weights_env / "cache" / "entries").iterdir())
    monkeypatch.undo()
    assert cache.stats["entries"] == 0


def test_concurrent_fetches_download_once(files):
    (a, *_) = serve(files, 1)
    files.slow(r"/l0", 0.3)
    caches = [LoraCache.from_env() for _ in range(3)]  # like separate processes: separate indexes, one folder
    results, errors = [], []

    def worker(cache):
        try:
            results.append(cache.fetch(a))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and len(results) == 3
    assert len({r.path for r in results}) == 1 and results[0].path.read_bytes() == LORAS[0]
    assert files.count(r"/l0", "GET") == 1


def test_cache_dir_defaults(weights_env, monkeypatch):
    monkeypatch.delenv("LORA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(weights_env / "home"))
    monkeypatch.setattr(weights, "_default_cache_dir", weights._default_cache_dir)
    expected = Path("/src/lora-cache") if Path("/src/predict.py").exists() else weights_env / "home/.cache/sdxl-lora-cog/loras"
    assert weights._default_cache_dir() == expected
    monkeypatch.setenv("LORA_CACHE_MAX_BYTES", "12345")
    monkeypatch.setenv("LORA_CACHE_MIN_FREE_BYTES", "6789")
    monkeypatch.setenv("LORA_MAX_BYTES", "1e6")
    monkeypatch.setenv("LORA_CACHE_DIR", str(weights_env / "elsewhere"))
    cache = LoraCache.from_env()
    assert (cache.root, cache.max_bytes, cache.min_free_bytes, cache.max_file_bytes) == (weights_env / "elsewhere", 12345, 6789, 1000000)
    assert (weights_env / "elsewhere" / "entries").is_dir()


def test_tokens_from_inputs(monkeypatch):
    class Secret:
        def __init__(self, v):
            self.v = v

        def get_secret_value(self):
            return self.v

    monkeypatch.setenv("HF_TOKEN", "hf_env")
    monkeypatch.setenv("CIVITAI_API_TOKEN", "civ_env")
    t = Tokens.from_inputs(Secret("hf_in"), None)
    assert (t.hf, t.civitai) == ("hf_in", "civ_env")
    assert Tokens.from_inputs(Secret(""), "  civ ").hf == "hf_env"
    assert "hf_in" not in repr(t) and "civ_env" not in repr(t) and "set" in repr(t)
