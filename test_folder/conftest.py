"""Shared fixtures: the tiny SDXL weights, built once per checkout of script/tiny_weights.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The LoRA downloader refuses loopback and private addresses unless told otherwise; every fake server in these
# tests listens on 127.0.0.1. Set before any server process starts, so the Cog servers inherit it.
os.environ["LORA_ALLOW_LOCAL_HOSTS"] = "1"
# Under pytest-xdist (script/test runs two workers on CI's two cores), one thread per process: two workers with two
# torch threads each, plus their Cog servers, would contend for the cores. Set before torch is imported, so the
# servers these tests start inherit it too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _tiny_weights_dir() -> Path:
    """Build (or reuse) the tiny weights; keyed by the generator's source so a change rebuilds them."""
    script = REPO / "script" / "tiny_weights.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    target = REPO / ".cache" / f"tiny-weights-{digest}"
    if (target / "TINY").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        subprocess.run([sys.executable, str(script), str(staging)], check=True, capture_output=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_weights() -> Path:
    """WEIGHTS_DIR with tiny random SDXL-architecture models in the real layout (read-only for tests)."""
    return _tiny_weights_dir()


@pytest.fixture(scope="session")
def flag_all_weights(tiny_weights: Path, tmp_path_factory) -> Path:
    """The tiny weights with a safety checker whose thresholds flag every image."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("flag-all-weights")
    for entry in tiny_weights.iterdir():
        (root / entry.name).symlink_to(entry)
    checker_dir = root / "safety-checker"
    checker_dir.unlink()
    shutil.copytree(tiny_weights / "safety-checker", checker_dir)
    weights_file = checker_dir / "model.safetensors"
    tensors = load_file(str(weights_file))
    tensors["concept_embeds_weights"] = tensors["concept_embeds_weights"] * 0 - 2.0  # cosine > -2 always
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    return root


def _server(weights_dir: Path, tmp_path_factory, name: str):
    from cog_server import CogServer

    folder = tmp_path_factory.mktemp(name)
    server = CogServer(weights_dir, folder / "server.log", {"LORA_CACHE_DIR": str(folder / "lora-cache")})
    server.lora_cache = folder / "lora-cache"
    yield from _ready(server)


def _ready(server):
    """Yield the server once it reports READY; stop it when the fixture ends."""
    try:
        health = server.wait_ready()
        assert health["status"] == "READY", health
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cog_server(tiny_weights: Path, tmp_path_factory):
    """The real Cog server with the tiny model, shared by the interface tests."""
    yield from _server(tiny_weights, tmp_path_factory, "cog-server")


# API tokens the faults server has in its environment; test_secrets.py checks that none of them shows anywhere.
ENV_TOKENS = {
    "HF_TOKEN": "hf_envQz7Kp2WxHfTok",
    "CIVITAI_API_TOKEN": "civ_envJ4nV8rTqCivTok",
    "REPLICATE_API_TOKEN": "r8_envM3sD9yLbR8Tok",
}


@pytest.fixture(scope="session")
def faults_fakes():
    """Loopback fakes of the Hugging Face Hub, CivitAI, Replicate and a plain file host, running for the session
    (the faults server is pointed at them when it starts); tests add their files to them."""
    from types import SimpleNamespace

    from fakes import FakeCivitai, FakeHFHub, FakeReplicate, FakeServer

    servers = [FakeHFHub(), FakeCivitai(), FakeReplicate(token=ENV_TOKENS["REPLICATE_API_TOKEN"]), FakeServer()]
    for server in servers:
        server.start()
    try:
        yield SimpleNamespace(hf=servers[0], civitai=servers[1], replicate=servers[2], files=servers[3])
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def faults_server(tiny_weights: Path, cog_server, faults_fakes, tmp_path_factory):
    """A second real Cog server for the fault tests: it shares cog_server's LoRA cache folder (two processes, one
    cache), has API tokens in its environment, uses the fakes as Hugging Face / CivitAI / Replicate, and serves
    test_folder/cancel_probe.py (the real Predictor plus a pause point in LoRA merging, inert unless armed)."""
    from cog_server import CogServer

    folder = tmp_path_factory.mktemp("faults-server")
    (folder / "probe").mkdir()
    env = {
        "LORA_CACHE_DIR": str(cog_server.lora_cache),
        "HF_ENDPOINT": faults_fakes.hf.url,
        "CIVITAI_API_BASE": faults_fakes.civitai.url,
        "REPLICATE_API_BASE": faults_fakes.replicate.url,
        "HF_HOME": str(folder / "hf-home"),  # never a real login
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "LORA_RETRY_BACKOFF": "0.01",
        "NO_PROXY": "127.0.0.1,localhost",
        "COG_PREDICT_TYPE_STUB": "test_folder/cancel_probe.py:Predictor",
        "CANCEL_PROBE_DIR": str(folder / "probe"),
        **ENV_TOKENS,
    }
    server = CogServer(tiny_weights, folder / "server.log", env)
    server.lora_cache = cog_server.lora_cache
    server.probe_dir = folder / "probe"
    yield from _ready(server)


@pytest.fixture(scope="session")
def flag_all_server(flag_all_weights: Path, tmp_path_factory):
    yield from _server(flag_all_weights, tmp_path_factory, "flag-all-server")


def make_predictor(weights_dir: Path, lora_cache_dir: Path):
    """A Predictor set up in-process on `weights_dir`, with its own LoRA cache folder."""
    import predict

    saved = {name: os.environ.get(name) for name in ("WEIGHTS_DIR", "LORA_CACHE_DIR")}
    os.environ.update(WEIGHTS_DIR=str(weights_dir), LORA_CACHE_DIR=str(lora_cache_dir))
    try:
        instance = predict.Predictor()
        instance.setup()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return instance


@pytest.fixture(scope="session")
def predictor(tiny_weights: Path, tmp_path_factory):
    """An in-process Predictor on the tiny model (setup() run once)."""
    return make_predictor(tiny_weights, tmp_path_factory.mktemp("lora-cache"))


@pytest.fixture(scope="session")
def file_host(tmp_path_factory):
    """A loopback HTTP server for files that tests drop into `file_host.folder`."""
    import http.server
    import threading
    from functools import partial
    from types import SimpleNamespace

    folder = tmp_path_factory.mktemp("served")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(folder=folder, url=f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()


def predict_inputs(**overrides) -> dict:
    """Every predict() argument at its declared default, with overrides: calling predict() in-process without
    Cog would otherwise pass Input(...) FieldInfo objects for omitted arguments."""
    import inspect

    import predict

    values = {}
    for name, param in inspect.signature(predict.Predictor.predict).parameters.items():
        if name == "self":
            continue
        values[name] = getattr(param.default, "default", param.default)
    values.update(overrides)
    return values
