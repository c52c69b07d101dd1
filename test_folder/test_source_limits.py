"""Limits on what a source can make us do (issue 14, classes 3, 5, 6, 7, and 4 at download): checked against
independent references, and the worst cases through the real Cog server.

  * `check_safetensors` refuses exactly what the safetensors loader refuses (a file that passes it loads), on
    hand-made malformed headers;
  * `check_tensor_values` agrees with PyTorch's own isfinite / abs().max() on every float dtype;
  * the refused-address table: each row refused (the `always` rows also with LORA_ALLOW_LOCAL_HOSTS=1), with IPv4
    addresses reached through IPv6 (mapped, NAT64, 6to4) refused like the address itself;
  * through the real server, with short deadlines: a 5 GiB bzip2 tar bomb, a host dripping its headers and one
    sending `100 Continue` forever each fail with an error naming the input, within a bound the client enforces,
    while /health-check keeps answering; the next prediction is byte-identical and the cache holds only files
    that load.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

import weights
from conftest import _ready
from fakes import FakeServer, RawHostileServer, make_bz2_tar_bomb, make_lora
from test_hostile_sources import (SMALL, _tensors, gapped, nested_metadata, non_string_metadata, null_offset,
                                  overlapping, rewrite_header, shape_1e400)

LORA = make_lora()


# ------------------------------------------------------------------------------ as strict as the loader
def _loads(path: Path) -> bool:
    """The safetensors library's verdict: can every tensor be read?"""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
        return True
    except Exception:  # the library raises its own error types (SafetensorError, ...) for a bad file
        return False


MALFORMED = {
    "overlapping offsets": overlapping(LORA),
    "a gap between tensors": gapped(LORA),
    "trailing bytes": LORA + bytes(8),
    "non-string metadata": non_string_metadata(LORA),
    "data_offsets [null, 512]": null_offset(LORA),
    "shape [1e400]": shape_1e400(LORA),
    "metadata nested 100 000 deep": nested_metadata(LORA),
    "header not starting with {": struct.pack("<Q", 10) + b' {"a": 1} ' + bytes(8),
    "float offsets": rewrite_header(LORA, lambda h: h[_tensors(h)[0]].update(
        data_offsets=[float(o) for o in h[_tensors(h)[0]]["data_offsets"]])),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_check_safetensors_refuses_what_the_loader_refuses(name, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(MALFORMED[name])
    try:
        weights.check_safetensors(path)
        ours = True
    except ValueError:
        ours = False
    assert ours == _loads(path), f"{name}: check_safetensors says {ours}, the loader says {not ours}"
    assert not ours


def test_check_safetensors_accepts_what_the_loader_loads(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(LORA)
    assert _loads(path) and weights.check_safetensors(path)


# ----------------------------------------------------------------------------------- finite and bounded
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_value_check_agrees_with_torch(dtype, tmp_path):
    bound = weights.VALUE_BOUNDS["LoRA"]
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "v.safetensors"
    for case, value in enumerate([None, float("nan"), float("inf"), -float("inf"), 2 * bound, -2 * bound,
                                  bound / 2, 0.5 * bound - 1]):
        t = torch.randn(64, 33, generator=gen).to(dtype)
        if value is not None:
            t[case % 64, case % 33] = value
        path.write_bytes(st_save({"a": t, "ints": torch.arange(10)}))
        wide = t.double()
        expected_ok = bool(torch.isfinite(wide).all()) and float(wide.abs().max()) <= bound
        try:
            weights.check_tensor_values(path, weights.check_safetensors(path), bound)
            ok = True
        except ValueError as err:
            ok = False
            assert "'a'" in str(err)
        assert ok == expected_ok, (dtype, value)


# --------------------------------------------------------------------------------------- address table
def _refused(address: str) -> str | None:
    return weights._blocked_reason(ipaddress.ip_address(address))


@pytest.mark.parametrize("network,why,always", weights.REFUSED_NETWORKS)
def test_every_row_of_the_address_table_is_refused(network, why, always, monkeypatch):
    net = ipaddress.ip_network(network)
    probes = {net.network_address, net.broadcast_address, net.network_address + net.num_addresses // 2}
    monkeypatch.delenv("LORA_ALLOW_LOCAL_HOSTS", raising=False)
    for ip in probes:
        assert _refused(str(ip)) == why, ip
        if ip.version == 4:  # the same IPv4 address reached through IPv6
            for wrapped in (f"::ffff:{ip}", f"64:ff9b::{ip}", str(ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80)))):
                assert _refused(wrapped) == why, wrapped
    monkeypatch.setenv("LORA_ALLOW_LOCAL_HOSTS", "1")
    for ip in probes:
        assert _refused(str(ip)) == (why if always else None), ip


def test_public_addresses_pass(monkeypatch):
    monkeypatch.delenv("LORA_ALLOW_LOCAL_HOSTS", raising=False)
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert _refused(address) is None, address


# --------------------------------------------------------------------------- worst cases, real server
BOUND = 60  # seconds the client waits for any of these answers (measured: 1-3 s each; RELIABILITY.md)


@pytest.fixture(scope="module")
def limits_server(tiny_weights, tmp_path_factory):
    """The real Cog server with 2 s download deadlines, and its own LoRA cache."""
    from cog_server import CogServer

    folder = tmp_path_factory.mktemp("limits-server")
    env = {"LORA_CACHE_DIR": str(folder / "lora-cache"), "LORA_DOWNLOAD_TIMEOUT": "2", "INPUT_DOWNLOAD_TIMEOUT": "2",
           "LORA_RETRY_BACKOFF": "0.01", "NO_PROXY": "127.0.0.1,localhost"}
    server = CogServer(tiny_weights, folder / "server.log", env)
    server.lora_cache = folder / "lora-cache"
    yield from _ready(server)


class HealthWatch:
    """Polls /health-check every 0.2 s in a thread while a prediction runs; records each answer (or failure)."""

    def __init__(self, server):
        self.server, self.answers, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(requests.get(self.server.base + "/health-check", timeout=5).json()["status"])
            except requests.RequestException as err:
                self.answers.append(f"no answer: {type(err).__name__}")
            time.sleep(0.2)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _cache_loads(folder: Path) -> list[str]:
    """The names of the server's cache entries, after checking that each file loads and holds sane values."""
    names = []
    for entry in (folder / "entries").iterdir():
        path = entry / weights.LORA_FILE_NAME
        header = weights.check_safetensors(path)
        weights.check_tensor_values(path, header, weights.VALUE_BOUNDS["LoRA"])
        assert _loads(path)
        names.append(entry.name)
    return names


@pytest.fixture(scope="module")
def hostile_hosts():
    with FakeServer() as files, RawHostileServer("drip-headers", interval=0.2, give_up=30) as drip, \
            RawHostileServer("continue-forever", interval=0.05, give_up=30) as endless:
        files.add_file("/bomb/trained_model.tar", make_bz2_tar_bomb(), content_type="application/x-tar")
        yield {"files": files, "drip": drip, "endless": endless}


WORST = {
    "bz2 tar bomb (5 GiB)": (lambda h: {"lora_weights": h["files"].url + "/bomb/trained_model.tar"},
                             "lora_weights", "bzip2-compressed archive"),
    "headers dripped 1 byte / 0.2 s": (lambda h: {"lora_weights": h["drip"].url + "/x.safetensors"},
                                       "lora_weights", "took too long"),
    "100 Continue forever": (lambda h: {"extra_lora": h["endless"].url + "/x.safetensors"}, "extra_lora",
                             "took too long"),
}


@pytest.fixture(scope="module")
def limits_control(limits_server) -> list:
    """The server's output for the control inputs, made before any hostile request."""
    return limits_server.predict(SMALL)["output"]


@pytest.mark.parametrize("name", list(WORST))
def test_worst_case_sources_through_the_server(name, limits_server, limits_control, hostile_hosts):
    build, input_name, says = WORST[name]
    before = _cache_loads(limits_server.lora_cache)
    started = time.monotonic()
    with HealthWatch(limits_server) as health:
        result = limits_server.predict({**SMALL, **build(hostile_hosts)}, timeout=BOUND)
    took = time.monotonic() - started
    assert result["status"] == "failed", result
    assert f"{input_name}: " in result["error"] and says in result["error"], result["error"]
    assert len(result["error"]) < 1000
    assert health.answers and all(a in ("READY", "BUSY") for a in health.answers), health.answers
    print(f"{name}: failed after {took:.2f}s; /health-check answered {len(health.answers)} times")
    assert limits_server.predict(SMALL)["output"] == limits_control
    assert _cache_loads(limits_server.lora_cache) == before


def test_image_url_query_never_shows_through_the_server(limits_server, tmp_path):
    """`image` URLs are fetched by us, not coglet: a signed query shows in no error, log line or response, on
    success and on failure (coglet used to quote the whole URL)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 200)).save(buf, format="PNG")
    secrets = ("tok_QUERYsecret1", "sigQUERYsecret2")
    with FakeServer() as host:
        host.add_file("/in.png", buf.getvalue(), content_type="image/png")
        query = f"?token={secrets[0]}&X-Amz-Signature={secrets[1]}"
        ok = limits_server.predict({**SMALL, "image": f"{host.url}/in.png{query}", "prompt_strength": 1.0})
        gone = limits_server.predict({**SMALL, "image": f"{host.url}/gone.png{query}"})
    assert ok["status"] == "succeeded", ok.get("error")
    assert gone["status"] == "failed" and "image: " in gone["error"] and "HTTP 404" in gone["error"]
    seen = json.dumps([ok, gone]) + limits_server.log_path.read_text("utf-8", errors="replace")
    assert not [s for s in secrets if s in seen]
