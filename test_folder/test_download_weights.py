"""script/download_weights against a loopback fake Hugging Face Hub serving the tiny weights.

The script runs as a subprocess, as a model owner runs it, with HF_ENDPOINT pointing at the fake hub; the
Illustrious repo holds a single-file A1111 checkpoint written by test_folder/ldm_checkpoint.py.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_checkpoint import write_ldm_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "script" / "download_weights"
sys.path.insert(0, str(REPO))
from utils import MODEL_DIRS, SAFETY_DIR, VAE_DIR  # noqa: E402

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
SAFETY_REPO = "CompVis/stable-diffusion-safety-checker"
ILLUSTRIOUS_REPO = "OnomaAIResearch/Illustrious-xl-early-release-v0"
ILLUSTRIOUS_FILE = "Illustrious-XL-v0.1.safetensors"
TOKEN = "hf_fake_token_for_tests_0123456789"
LFS_SUFFIXES = (".safetensors", ".bin")


# ------------------------------------------------------------------------------------------------ the fake hub
class FakeHub:
    """Serves model repos the way huggingface_hub 2.x talks to the Hub: model info, tree, resolve (HEAD/GET)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.hidden: set[str] = set()
        self.gated: set[str] = set()
        self.corrupted: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub.handle(self, head=False)

            def do_HEAD(self):
                hub.handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    @staticmethod
    def blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def entry(self, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": self.blob_id(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    # --------------------------------------------------------------------------------------------- dispatch
    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(req.path)
        path = unquote(url.path)
        with self.lock:
            self.requests.append((req.command, path, req.headers.get("authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            rest = parts[4:]
            if not self.check_repo(req, repo, head):
                return
            if rest[:1] == ["tree"] and len(rest) >= 2:
                prefix = "/".join(rest[2:])
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                return self.send_json(req, self.tree(repo, prefix, recursive), head)
            if not rest or rest[0] == "revision":
                files = self.repos[repo]
                info = {
                    "id": repo,
                    "modelId": repo,
                    "sha": self.commit(repo),
                    "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                }
                return self.send_json(req, info, head)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = "/".join(parts[:2])
            if not self.check_repo(req, repo, head):
                return
            filename = "/".join(parts[4:])
            return self.send_file(req, repo, filename, head)
        self.send_error_code(req, 404, "NotFound", head)

    def check_repo(self, req, repo: str, head: bool) -> bool:
        if repo not in self.repos or repo in self.hidden:
            self.send_error_code(req, 404, "RepoNotFound", head, "Repository not found")
            return False
        if repo in self.gated and req.headers.get("authorization") != "Bearer hf_has_access":
            self.send_error_code(req, 403, "GatedRepo", head, "Access to this repo is restricted")
            return False
        return True

    def tree(self, repo: str, prefix: str, recursive: bool) -> list[dict]:
        files = self.repos[repo]
        out, folders = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1 :] if prefix else path
            if "/" in rel and not recursive:
                folders.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                continue
            folder = path.rpartition("/")[0]
            while folder and folder != prefix:
                folders.add(folder)
                folder = folder.rpartition("/")[0]
            out.append(self.entry(path, files[path]))
        out += [{"type": "directory", "path": f, "oid": self.blob_id(f.encode())} for f in sorted(folders)]
        return out

    # ------------------------------------------------------------------------------------------ responses
    def send_json(self, req, payload, head: bool) -> None:
        body = json.dumps(payload).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def send_error_code(self, req, status: int, code: str, head: bool, message: str = "not found") -> None:
        body = json.dumps({"error": message}).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def send_file(self, req, repo: str, filename: str, head: bool) -> None:
        files = self.repos[repo]
        if filename not in files:
            return self.send_error_code(req, 404, "EntryNotFound", head, "Entry not found")
        data = files[filename]
        entry = self.entry(filename, data)
        if (repo, filename) in self.corrupted:  # same size, different bytes, same advertised sha256
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        req.send_response(200)
        req.send_header("Content-Length", str(len(data)))
        req.send_header("X-Repo-Commit", self.commit(repo))
        req.send_header("Accept-Ranges", "bytes")
        if "lfs" in entry:
            req.send_header("ETag", f'"{entry["lfs"]["oid"]}"')
            req.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
            req.send_header("X-Linked-Size", str(entry["lfs"]["size"]))
        else:
            req.send_header("ETag", f'"{entry["oid"]}"')
        req.end_headers()
        if not head:
            req.wfile.write(data)


# ------------------------------------------------------------------------------------------------- fixtures
def _folder_files(folder: Path, rename=lambda rel: rel) -> dict[str, bytes]:
    return {rename(p.relative_to(folder).as_posix()): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fp16_name(rel: str) -> str:
    for stem in ("unet/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        if rel == f"{stem}.safetensors":
            return f"{stem}.fp16.safetensors"
    return rel


DECOYS = {  # files the real repos also hold and that must never be fetched
    SDXL_REPO: ["unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "sd_xl_base_1.0.safetensors", "README.md"],
    VAE_REPO: ["sdxl_vae.safetensors", "diffusion_pytorch_model.bin", "README.md"],
    SAFETY_REPO: ["pytorch_model.bin", "README.md"],
    ILLUSTRIOUS_REPO: ["README.md", "samples/preview.png"],
}


@pytest.fixture(scope="module")
def hub_repos(tiny_weights: Path, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    work = tmp_path_factory.mktemp("hub-src")
    checkpoint = write_ldm_checkpoint(
        tiny_weights / MODEL_DIRS["illustrious"], tiny_weights / VAE_DIR, work / ILLUSTRIOUS_FILE, torch.float16
    )
    repos = {
        SDXL_REPO: _folder_files(tiny_weights / MODEL_DIRS["sdxl"], _fp16_name),
        VAE_REPO: _folder_files(tiny_weights / VAE_DIR),
        SAFETY_REPO: _folder_files(tiny_weights / SAFETY_DIR),
        ILLUSTRIOUS_REPO: {ILLUSTRIOUS_FILE: checkpoint.read_bytes()},
    }
    for repo, names in DECOYS.items():
        for name in names:
            repos[repo][name] = b"decoy " + name.encode() + b" " * 64
    return repos


@pytest.fixture(scope="module")
def hub(hub_repos):
    with FakeHub(hub_repos) as server:
        yield server


def run_script(hub: FakeHub, dest: Path, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess:
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
        [sys.executable, str(SCRIPT), "--dest", str(dest), *args],
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


def repo_requests(hub: FakeHub, start: int) -> list[tuple[str, str, str | None]]:
    """Requests about repos (huggingface_hub may also fetch its own /api/agent-harnesses registry)."""
    return [r for r in hub.requests[start:] if r[1] != "/api/agent-harnesses"]


def assert_no_leftovers(dest: Path) -> None:
    if dest.exists():
        assert not [p.name for p in dest.iterdir() if p.name.startswith(".")], list(dest.iterdir())


# ---------------------------------------------------------------------------------------------------- tests
def test_downloads_layout_verifies_and_is_idempotent(hub: FakeHub, tiny_weights: Path, tmp_path: Path):
    dest = tmp_path / "weights"
    before = len(hub.requests)
    result = run_script(hub, dest)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert TOKEN not in output
    first_requests = repo_requests(hub, before)
    assert first_requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in first_requests)
    fetched = {path for method, path, _ in first_requests if method == "GET" and "/resolve/" in path}
    for repo, names in DECOYS.items():
        for name in names:
            assert not any(p.startswith(f"/{repo}/resolve/") and p.endswith("/" + name) for p in fetched), name

    # layout
    assert sorted(p.name for p in dest.iterdir()) == sorted([*MODEL_DIRS.values(), VAE_DIR, SAFETY_DIR])
    for name in MODEL_DIRS.values():
        folder = dest / name
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
            "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet"]
        assert (folder / "model_index.json").is_file() and (folder / "MANIFEST.json").is_file()
        assert not [p for p in folder.rglob("*") if ".fp16." in p.name or p.name.startswith(".")]
    for folder in (dest / VAE_DIR, dest / SAFETY_DIR):
        assert (folder / "MANIFEST.json").is_file()

    # sdxl-base, vae, safety: byte for byte the originals (variant suffix dropped)
    for name in (MODEL_DIRS["sdxl"], VAE_DIR, SAFETY_DIR):
        expected = _folder_files(tiny_weights / name)
        got = {k: v for k, v in _folder_files(dest / name).items() if k != "MANIFEST.json"}
        assert got.keys() == expected.keys(), name
        assert all(got[k] == expected[k] for k in expected), name

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
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["repo"] == ILLUSTRIOUS_REPO and manifest["commit"] == FakeHub.commit(ILLUSTRIOUS_REPO)
    assert ILLUSTRIOUS_FILE in manifest["origin"]
    assert manifest["files"]["unet/diffusion_pytorch_model.safetensors"]["sha256"] == hashlib.sha256(
        (out / "unet/diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    # one log line per component, with size and time
    lines = [line for line in result.stdout.splitlines() if line.startswith("[") and " in " in line]
    assert len(lines) == 4 and all("B in " in line and line.rstrip().endswith(line.split("-> ")[-1]) for line in lines)

    # second run: nothing requested from the hub, nothing changed
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    count = len(hub.requests)
    again = run_script(hub, dest)
    assert again.returncode == 0, again.stdout + again.stderr
    assert repo_requests(hub, count) == []
    assert again.stdout.count("already complete") == 4
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == mtimes

    # a damaged component is no longer "complete" (checked in-process: no subprocess, no network)
    script = _load_script()
    assert all(script.is_complete(name, dest / script.SOURCES[name]["folder"]) for name in script.ORDER)
    vae_file = dest / VAE_DIR / "diffusion_pytorch_model.safetensors"
    vae_file.write_bytes(vae_file.read_bytes()[:100])
    assert not script.is_complete("vae", dest / VAE_DIR)
    assert_no_leftovers(dest)


def test_checksum_mismatch_fails_and_keeps_nothing(hub: FakeHub, tmp_path: Path):
    dest = tmp_path / "weights"
    key = (SAFETY_REPO, "model.safetensors")
    hub.corrupted.add(key)
    try:
        result = run_script(hub, dest, "--only", "safety")
    finally:
        hub.corrupted.discard(key)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "checksum mismatch" in result.stderr
    assert f"{SAFETY_REPO}/model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (dest / SAFETY_DIR).exists()
    assert_no_leftovers(dest)


def test_missing_repo_gives_clear_error(hub: FakeHub, tmp_path: Path):
    dest = tmp_path / "weights"
    hub.hidden.add(SAFETY_REPO)
    try:
        result = run_script(hub, dest, "--only", "safety")
    finally:
        hub.hidden.discard(SAFETY_REPO)
    assert result.returncode == 1
    assert "repository not found" in result.stderr and SAFETY_REPO in result.stderr
    assert "SOURCES" in result.stderr and "HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_leftovers(dest)
    assert not (dest / SAFETY_DIR).exists()


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


def test_gated_repo_says_to_accept_and_set_token(script, hub: FakeHub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at call time, as in the script
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    hub.gated.add(ILLUSTRIOUS_REPO)
    count = len(hub.requests)
    try:
        with pytest.raises(script.DownloadError) as raised:
            script.Hub().resolve(ILLUSTRIOUS_REPO, "main")
    finally:
        hub.gated.discard(ILLUSTRIOUS_REPO)
    message = str(raised.value)
    assert "gated" in message and "HF_TOKEN" in message and ILLUSTRIOUS_REPO in message and TOKEN not in message
    calls = [r for r in hub.requests[count:] if r[1].startswith(f"/api/models/{ILLUSTRIOUS_REPO}")]
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
