"""Local fake servers (127.0.0.1 only, threads in the test process) for the Hugging Face hub, CivitAI, Replicate
and plain file hosts, plus small helpers to build LoRA files, trainer tars and a fake `pget`.

    with FakeHFHub() as hub:
        hub.add_file("owner/repo", "pytorch_lora_weights.safetensors", make_lora())
        monkeypatch.setenv("HF_ENDPOINT", hub.url)

Every server records the requests it saw (`server.requests`) and can inject faults per path
(`server.fail(...)`, `server.truncate(...)`, `server.slow(...)`, `server.drip(...)`, `server.no_length(...)`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from safetensors.numpy import save as st_save


# ------------------------------------------------------------------------------------------ file builders
def make_lora(seed: int = 0, rank: int = 4, dim: int = 32, blocks: int = 2) -> bytes:
    """A small, valid kohya-style SDXL LoRA in safetensors format (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(blocks):
        base = f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_{i}_attn1_to_q"
        tensors[f"{base}.lora_down.weight"] = rng.standard_normal((rank, dim)).astype(np.float16)
        tensors[f"{base}.lora_up.weight"] = rng.standard_normal((dim, rank)).astype(np.float16)
        tensors[f"{base}.alpha"] = np.array(float(rank), dtype=np.float16)
    return st_save(tensors, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def make_trainer_tar(lora: bytes, *, embeddings: bytes | None = None, special_params: dict | None = None,
                     lora_name: str = "lora.safetensors", extra: dict[str, bytes] | None = None) -> bytes:
    """A tar like Replicate's SDXL trainer output (lora.safetensors + embeddings.pti + special_params.json)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        files = {lora_name: lora}
        if embeddings is not None:
            files["embeddings.pti"] = embeddings
        if special_params is not None:
            files["special_params.json"] = json.dumps(special_params).encode()
        files.update(extra or {})
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_fake_pget(folder: Path) -> Path:
    """Write an executable `pget` into `folder` that fetches from loopback like the real one.

    `pget URL DEST` downloads to DEST; `pget -x URL DIR` extracts a tar into DIR.  Each call is appended to
    `folder/pget.log` (the URL's path only) so tests can check pget was used.
    """
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "pget"
    script.write_text(f"""#!{sys.executable}
import sys, tarfile, io, urllib.request, urllib.parse
args = sys.argv[1:]
extract = args[0] == "-x"
if extract:
    args = args[1:]
url, dest = args[0], args[1]
host = urllib.parse.urlsplit(url).hostname
if host not in ("127.0.0.1", "localhost"):
    sys.exit("fake pget: loopback only")
with open({str(folder / "pget.log")!r}, "a") as log:
    log.write(urllib.parse.urlsplit(url).path + "\\n")
data = urllib.request.urlopen(url, timeout=10).read()
if extract:
    tarfile.open(fileobj=io.BytesIO(data)).extractall(dest, filter="data")
else:
    open(dest, "wb").write(data)
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


# ----------------------------------------------------------------------------------------- server plumbing
@dataclass
class Request:
    method: str
    path: str  # without query
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    at: float = field(default_factory=time.monotonic)  # when it arrived (time.monotonic)

    @property
    def bearer(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    truncate_at: int | None = None  # send only this many body bytes, then drop the connection
    delay: float = 0.0  # before the first body byte
    drip: float = 0.0  # send the body one byte at a time, this many seconds apart
    no_length: bool = False  # no Content-Length: the body ends when the connection closes


@dataclass
class _Fault:
    pattern: re.Pattern
    times: int
    make: Callable[[Request], Response | None]  # None: pass through to the route


def file_response(req: Request, data: bytes, headers: dict[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> Response:
    """Serve bytes with Range support (206) and a strong ETag (the content's sha256) the way a CDN does."""
    h = {"Content-Type": content_type, "Accept-Ranges": "bytes", "ETag": f'"{sha256(data)}"', **(headers or {})}
    rng = req.headers.get("range")
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
    if m:
        start = int(m[1])
        end = int(m[2]) if m[2] else len(data) - 1
        if start >= len(data):
            return Response(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        h["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(206, data[start:end + 1], h)
    return Response(200, data, h)


class FakeServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port> serving a route table, in a daemon thread."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern, Callable[..., Response]]] = []
        self.faults: list[_Fault] = []
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                server._dispatch(self)

            do_GET = do_HEAD = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # ---- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "FakeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- routes
    def route(self, method: str, pattern: str, handler: Callable[..., Response]) -> None:
        """handler(req, **named_groups) -> Response.  Later routes win over earlier ones."""
        self.routes.insert(0, (method, re.compile(pattern), handler))

    def add_file(self, path: str, data: bytes, *, headers: dict[str, str] | None = None,
                 content_type: str = "application/octet-stream") -> str:
        self.route("GET", re.escape(path), lambda req: file_response(req, data, headers, content_type))
        return self.url + path

    def add_json(self, path: str, obj, status: int = 200) -> str:
        self.route("GET", re.escape(path), lambda req: Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json"}))
        return self.url + path

    def add_redirect(self, path: str, location: str, status: int = 302) -> str:
        self.route("GET", re.escape(path), lambda req: Response(status, b"", {"Location": location}))
        return self.url + path

    # ---- faults (consumed in order, `times` each; times=-1 forever)
    def fail(self, pattern: str, status: int, *, times: int = 1, headers: dict[str, str] | None = None,
             body: bytes = b"") -> None:
        self.faults.append(_Fault(re.compile(pattern), times, lambda req: Response(status, body, dict(headers or {}))))

    def truncate(self, pattern: str, at: int, *, times: int = 1) -> None:
        """The matching route's response is cut after `at` body bytes (Content-Length still says the full size)."""
        self.faults.append(_Fault(re.compile(pattern), times, lambda req: Response(truncate_at=at)))

    def slow(self, pattern: str, delay: float, *, times: int = -1) -> None:
        self.faults.append(_Fault(re.compile(pattern), times, lambda req: Response(delay=delay)))

    def drip(self, pattern: str, interval: float, *, times: int = -1) -> None:
        """The matching route's body trickles out one byte every `interval` seconds (a slow-drip server)."""
        self.faults.append(_Fault(re.compile(pattern), times, lambda req: Response(drip=interval)))

    def no_length(self, pattern: str, *, times: int = -1) -> None:
        """The matching route's response has no Content-Length (size unknown until the connection closes)."""
        self.faults.append(_Fault(re.compile(pattern), times, lambda req: Response(no_length=True)))

    def count(self, pattern: str, method: str | None = None) -> int:
        rx = re.compile(pattern)
        return sum(1 for r in self.requests if rx.search(r.path) and (method is None or r.method == method))

    # ---- internals
    def _fault_for(self, req: Request) -> Response | None:
        with self._lock:
            for f in self.faults:
                if f.times != 0 and f.pattern.search(req.path):
                    if f.times > 0:
                        f.times -= 1
                    return f.make(req)
        return None

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        req = Request(h.command, unquote(parts.path), parse_qs(parts.query), {k.lower(): v for k, v in h.headers.items()})
        length = int(req.headers.get("content-length") or 0)
        if length:
            h.rfile.read(length)
        with self._lock:
            self.requests.append(req)
        fault = self._fault_for(req)
        if fault is not None and (fault.status != 200 or fault.body or fault.headers):
            resp = fault
        else:
            resp = self._route(req)
            if fault is not None:
                resp.truncate_at = fault.truncate_at
                resp.delay = fault.delay
                resp.drip = fault.drip
                resp.no_length = fault.no_length
        self._send(h, req, resp)

    def _route(self, req: Request) -> Response:
        method = "GET" if req.method == "HEAD" else req.method
        for m, rx, handler in self.routes:
            if m == method:
                match = rx.fullmatch(req.path)
                if match:
                    return handler(req, **match.groupdict())
        return Response(404, b'{"error": "not found"}', {"Content-Type": "application/json"})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, req: Request, resp: Response) -> None:
        try:
            h.send_response(resp.status)
            for k, v in resp.headers.items():
                if not (resp.no_length and k.lower() == "content-length"):
                    h.send_header(k, v)
            if not resp.no_length and not any(k.lower() == "content-length" for k in resp.headers):
                h.send_header("Content-Length", str(len(resp.body)))
            if resp.truncate_at is not None or resp.no_length:
                h.send_header("Connection", "close")
            h.end_headers()
            if req.method == "HEAD":
                return
            if resp.delay:
                time.sleep(resp.delay)
            body = resp.body if resp.truncate_at is None else resp.body[:resp.truncate_at]
            if resp.drip:
                for i in range(len(body)):
                    h.wfile.write(body[i:i + 1])
                    h.wfile.flush()
                    time.sleep(resp.drip)
            else:
                h.wfile.write(body)
            h.wfile.flush()
            if resp.truncate_at is not None or resp.no_length:
                h.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass


# -------------------------------------------------------------------------------------------- fake HF hub
@dataclass
class _HFFile:
    data: bytes
    lfs: bool
    served: bytes | None = None  # what /resolve sends, when a test wants it to differ from the listing


@dataclass
class _HFRepo:
    files: dict[str, _HFFile] = field(default_factory=dict)
    branch: str = "main"
    token: str | None = None  # private: this bearer token is required
    gated_token: str | None = None  # gated: file downloads need this token (API calls work unless gated_api)
    gated_api: bool = False  # gated: the API calls (model info, tree) need the token too
    hidden: bool = False  # answers 404 RepoNotFound to everyone, as a deleted or misspelt repo
    commit: str | None = None  # the head commit to report (a real repo's pinned commit); else one from the files

    @property
    def sha(self) -> str:
        if self.commit:
            return self.commit
        h = hashlib.sha1()
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + hashlib.sha1(self.files[path].data).digest())
        return h.hexdigest()


class FakeHFHub(FakeServer):
    """Enough of the Hub for huggingface_hub 2.4: model info / revision, the tree API, and resolve (HEAD + GET).
    That is everything weights.py and script/download_weights (model_info, list_repo_tree, hf_hub_download,
    snapshot_download) ask for.

    Files ending in .safetensors/.bin/.pt/.tar (or lfs=True) are served as LFS: ETag/X-Linked-Etag is their
    sha256, X-Linked-Size their size; other files get the git blob sha1 as ETag.  Any revision given as the
    branch name, "main" or the repo's commit sha is accepted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, _HFRepo] = {}
        R = r"(?P<repo>[^/]+/[^/]+)"
        self.route("GET", rf"/api/models/{R}", lambda req, repo: self._info(req, repo, None))
        self.route("GET", rf"/api/models/{R}/revision/(?P<rev>[^/]+)", self._info)
        self.route("GET", rf"/api/models/{R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree)
        self.route("GET", rf"/{R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve)

    def add_file(self, repo: str, path: str, data: bytes, *, lfs: bool | None = None,  # type: ignore[override]
                 served: bytes | None = None) -> str:
        if lfs is None:
            lfs = path.endswith((".safetensors", ".bin", ".pt", ".ckpt", ".tar", ".pti"))
        self.repos.setdefault(repo, _HFRepo()).files[path] = _HFFile(data, lfs, served)
        return f"{self.url}/{repo}/resolve/main/{path}"

    def set_private(self, repo: str, token: str) -> None:
        self.repos.setdefault(repo, _HFRepo()).token = token

    def set_gated(self, repo: str, token: str | None, *, api: bool = False) -> None:
        """Gate the repo (token None: open it again); api=True gates model info / tree too, not only files."""
        r = self.repos.setdefault(repo, _HFRepo())
        r.gated_token, r.gated_api = token, api and token is not None

    def set_hidden(self, repo: str, hidden: bool = True) -> None:
        self.repos[repo].hidden = hidden

    def set_served(self, repo: str, path: str, served: bytes | None) -> None:
        """What /resolve sends for the file (None: its real bytes); the listing keeps the real size and hashes."""
        self.repos[repo].files[path].served = served

    def commit(self, repo: str) -> str:
        return self.repos[repo].sha

    def set_commit(self, repo: str, sha: str) -> None:
        """Serve the repo at this commit id (e.g. the real repo's pinned commit), accepted as a revision."""
        self.repos.setdefault(repo, _HFRepo()).commit = sha

    # ---- handlers
    @staticmethod
    def _error(status: int, code: str, message: str = "") -> Response:
        headers = {"Content-Type": "application/json", "X-Error-Code": code}
        if message:
            headers["X-Error-Message"] = message
        return Response(status, json.dumps({"error": message or code}).encode(), headers)

    def _repo(self, req: Request, repo: str, rev: str | None) -> tuple[_HFRepo | None, Response | None]:
        r = self.repos.get(repo)
        if r is not None and r.hidden:
            return None, self._error(404, "RepoNotFound", "Repository not found")
        if r is None:
            return None, self._error(401 if not req.bearer else 404, "RepoNotFound", "Repository not found")
        if r.token and req.bearer != r.token:
            return None, self._error(401, "RepoNotFound", "Repository not found")
        if rev is not None and unquote(rev) not in (r.branch, "main", r.sha):
            return None, self._error(404, "RevisionNotFound", "Invalid rev id")
        if r.gated_api and req.bearer != r.gated_token and req.path.startswith("/api/"):
            return None, self._error(403, "GatedRepo", "Access to this repo is restricted")
        return r, None

    def _info(self, req: Request, repo: str, rev: str | None) -> Response:
        r, err = self._repo(req, repo, rev)
        if err:
            return err
        body = {"id": repo, "modelId": repo, "sha": r.sha, "private": bool(r.token), "gated": "auto" if r.gated_token else False,
                "siblings": [{"rfilename": p} for p in sorted(r.files)], "tags": [], "downloads": 0, "likes": 0}
        return Response(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _tree(self, req: Request, repo: str, rev: str, path: str | None) -> Response:
        r, err = self._repo(req, repo, rev)
        if err:
            return err
        prefix = (path.strip("/") + "/") if path else ""
        recursive = req.query.get("recursive", ["false"])[0].lower() == "true"
        entries, dirs = [], set()
        for p in sorted(r.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
                continue
            parts = p.split("/")
            for i in range(len(prefix.split("/")) - 1 if prefix else 0, len(parts) - 1):
                if recursive:
                    dirs.add("/".join(parts[: i + 1]))
            f = r.files[p]
            entry = {"type": "file", "path": p, "size": len(f.data), "oid": git_blob_sha1(f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": sha256(f.data), "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        folders = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        return Response(200, json.dumps(folders + entries).encode(), {"Content-Type": "application/json"})

    def _resolve(self, req: Request, repo: str, rev: str, path: str) -> Response:
        r, err = self._repo(req, repo, rev)
        if err:
            return err
        if r.gated_token and req.bearer != r.gated_token:
            return self._error(403, "GatedRepo", "Access to model is restricted")
        f = r.files.get(path)
        if f is None:
            resp = self._error(404, "EntryNotFound", "Entry not found")
            resp.headers["X-Repo-Commit"] = r.sha
            return resp
        headers = {"X-Repo-Commit": r.sha}
        if f.lfs:
            digest = sha256(f.data)
            headers.update({"ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(f.data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(f.data)}"'
        return file_response(req, f.served if f.served is not None else f.data, headers)


# ------------------------------------------------------------------------------------------- fake CivitAI
class FakeCivitai(FakeServer):
    """CivitAI's models / model-versions API and /api/download/models/<v>, which 307-redirects to a separate
    storage server (another origin, like the real pre-signed storage URLs) with a signed query."""

    def __init__(self) -> None:
        super().__init__()
        self.storage = FakeServer()
        self.models: dict[int, dict] = {}
        self.versions: dict[int, dict] = {}
        self.data: dict[int, bytes] = {}
        self.required_token: dict[int, str] = {}  # version -> token the download needs
        self.route("GET", r"/api/v1/models/(?P<mid>\d+)", self._model)
        self.route("GET", r"/api/v1/model-versions/(?P<vid>\d+)", self._version)
        self.route("GET", r"/api/download/models/(?P<vid>\d+)", self._download)
        self.storage.route("GET", r"/files/(?P<vid>\d+)/(?P<name>[^/]+)", self._stored)

    def start(self) -> "FakeCivitai":
        self.storage.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.storage.stop()

    def add_version(self, model_id: int, version_id: int, data: bytes, *, base_model: str = "Illustrious",
                    trained_words: tuple[str, ...] = (), file_name: str = "my_lora.safetensors", sha: str | None = None,
                    file_format: str = "SafeTensor", model_type: str = "LORA", published_at: str = "2025-01-01T00:00:00.000Z",
                    token: str | None = None) -> None:
        """Register a version (the newest published_at becomes the model's latest)."""
        self.data[version_id] = data
        if token:
            self.required_token[version_id] = token
        file = {"id": version_id * 10, "name": file_name, "type": "Model", "sizeKB": len(data) / 1024, "primary": True,
                "metadata": {"format": file_format, "fp": "fp16", "size": "full"},
                "hashes": {"SHA256": (sha or sha256(data)).upper(), "AutoV2": (sha or sha256(data))[:10].upper()},
                "downloadUrl": f"https://civitai.com/api/download/models/{version_id}"}
        version = {"id": version_id, "modelId": model_id, "name": f"v{version_id}", "baseModel": base_model,
                   "status": "Published", "publishedAt": published_at, "trainedWords": list(trained_words),
                   "files": [file], "downloadUrl": file["downloadUrl"]}
        self.versions[version_id] = version
        model = self.models.setdefault(model_id, {"id": model_id, "name": f"model {model_id}", "type": model_type, "modelVersions": []})
        model["type"] = model_type
        model["modelVersions"] = sorted([v for v in model["modelVersions"] if v["id"] != version_id] + [version],
                                        key=lambda v: v["publishedAt"], reverse=True)

    def _json(self, obj, status: int = 200) -> Response:
        return Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _model(self, req: Request, mid: str) -> Response:
        m = self.models.get(int(mid))
        return self._json(m) if m else self._json({"error": "No model with id"}, 404)

    def _version(self, req: Request, vid: str) -> Response:
        v = self.versions.get(int(vid))
        return self._json(v) if v else self._json({"error": "Model version not found"}, 404)

    def _download(self, req: Request, vid: str) -> Response:
        v = int(vid)
        if v not in self.versions:
            return self._json({"error": "Model not found"}, 404)
        need = self.required_token.get(v)
        if need and req.bearer != need:
            return self._json({"error": "Unauthorized", "message": "The creator of this asset requires you to be logged in"}, 401)
        name = self.versions[v]["files"][0]["name"]
        sig = f"X-Amz-Signature=SIGNED{v}SIG&response-content-disposition=attachment%3B%20filename%3D%22{name}%22"
        return Response(307, b"", {"Location": f"{self.storage.url}/files/{v}/{name}?{sig}"})

    def _stored(self, req: Request, vid: str, name: str) -> Response:
        if "X-Amz-Signature" not in req.query:
            return Response(403, b"<Error>AccessDenied</Error>", {"Content-Type": "application/xml"})
        return file_response(req, self.data[int(vid)], {"Content-Disposition": f'attachment; filename="{name}"'})


# ----------------------------------------------------------------------------------------- fake Replicate
class FakeReplicate(FakeServer):
    """Replicate's API (GET /v1/models/<o>/<m>) and web `_weights` (which redirect to a delivery server)."""

    def __init__(self, token: str | None = None) -> None:
        super().__init__()
        self.delivery = FakeServer()
        self.token = token  # API calls need it when set
        self.models: dict[str, list[str]] = {}  # repo -> versions, newest last
        self.tars: dict[tuple[str, str], bytes] = {}
        self.route("GET", r"/v1/models/(?P<repo>[^/]+/[^/]+)", self._model)
        self.route("GET", r"/(?P<repo>[^/]+/[^/]+)/_weights", lambda req, repo: self._weights(req, repo, None))
        self.route("GET", r"/(?P<repo>[^/]+/[^/]+)/versions/(?P<version>[^/]+)/_weights", self._weights)

    def start(self) -> "FakeReplicate":
        self.delivery.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.delivery.stop()

    def add_version(self, repo: str, version: str, tar: bytes) -> str:
        self.models.setdefault(repo, []).append(version)
        self.tars[(repo, version)] = tar
        path = f"/pbxt/{hashlib.sha1(f'{repo}:{version}'.encode()).hexdigest()}/trained_model.tar"
        self.delivery.add_file(path, tar, content_type="application/x-tar")
        return self.delivery.url + path

    def _model(self, req: Request, repo: str) -> Response:
        if self.token and req.bearer != self.token:
            return Response(401, b'{"detail": "Unauthenticated"}', {"Content-Type": "application/json"})
        versions = self.models.get(repo)
        if not versions:
            return Response(404, b'{"detail": "Not found."}', {"Content-Type": "application/json"})
        owner, name = repo.split("/")
        body = {"owner": owner, "name": name, "latest_version": {"id": versions[-1], "created_at": "2025-01-01T00:00:00Z"}}
        return Response(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _weights(self, req: Request, repo: str, version: str | None) -> Response:
        versions = self.models.get(repo)
        if not versions or (version is not None and version not in versions):
            return Response(404, b"Not found", {"Content-Type": "text/plain"})
        v = version or versions[-1]
        path = f"/pbxt/{hashlib.sha1(f'{repo}:{v}'.encode()).hexdigest()}/trained_model.tar"
        return Response(307, b"", {"Location": f"{self.delivery.url}{path}?sig=abc"})


# ------------------------------------------------------------------------------------------------ fixtures
# Import these into a test module (`from fakes import weights_env, hf_hub`) to use them.
import pytest  # noqa: E402


@pytest.fixture
def weights_env(tmp_path, monkeypatch):
    """A clean environment for weights.py: private cache folder, no tokens or pget, tiny retry backoff, loopback
    hosts allowed (the fakes listen on 127.0.0.1; tests of the SSRF guard remove LORA_ALLOW_LOCAL_HOSTS)."""
    import weights

    for name in ("HF_TOKEN", "CIVITAI_API_TOKEN", "REPLICATE_API_TOKEN", "LORA_CACHE_MAX_BYTES", "LORA_CACHE_MIN_FREE_BYTES",
                 "LORA_MAX_BYTES", "REPLICATE_WEB_BASE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                 "LORA_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORA_ALLOW_LOCAL_HOSTS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never read a real login or cache
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no pget unless a test adds the fake one
    monkeypatch.setattr(weights, "RETRY_BACKOFF", 0.01)
    monkeypatch.setattr(weights, "READ_TIMEOUT", 3.0)
    monkeypatch.setattr(weights, "CONNECT_TIMEOUT", 3.0)
    return tmp_path


@pytest.fixture
def hf_hub(weights_env, monkeypatch):
    with FakeHFHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


@pytest.fixture
def civitai(weights_env, monkeypatch):
    with FakeCivitai() as server:
        monkeypatch.setenv("CIVITAI_API_BASE", server.url)
        yield server


@pytest.fixture
def replicate(weights_env, monkeypatch):
    with FakeReplicate(token="r8_test") as server:
        monkeypatch.setenv("REPLICATE_API_BASE", server.url)
        yield server


@pytest.fixture
def files(weights_env):
    with FakeServer() as server:
        yield server


# ----------------------------------------------------------------------------------------- hostile hosts
class RawHostileServer:
    """A loopback TCP server that answers every connection with a hostile byte stream, written by hand (no HTTP
    library would send it): `mode` "drip-headers" sends a status line and then header bytes one every `interval`
    seconds; "continue-forever" sends `HTTP/1.1 100 Continue` responses every `interval` seconds.  Either way
    it never finishes a response; it gives up after `give_up` seconds, so a client with no deadline of its own
    fails instead of hanging the test run.  `connections` counts the accepted connections."""

    def __init__(self, mode: str, *, interval: float = 0.05, give_up: float = 8.0) -> None:
        import socket

        self.mode, self.interval, self.give_up = mode, interval, give_up
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> "RawHostileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn) -> None:
        end = time.monotonic() + self.give_up
        try:
            conn.recv(65536)  # the request
            if self.mode == "drip-headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                header = b"X-Padding: " + b"a" * 100000
                for i in range(len(header)):
                    if time.monotonic() > end or self._stop.is_set():
                        break
                    conn.sendall(header[i:i + 1])
                    time.sleep(self.interval)
            else:
                while time.monotonic() < end and not self._stop.is_set():
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    time.sleep(self.interval)
        except OSError:
            pass
        finally:
            conn.close()


def make_bz2_tar_bomb(claimed: int = 5 * 1024**3) -> bytes:
    """A bzip2-compressed tar whose one member, `lora.safetensors`, is `claimed` bytes of zeros (5 GiB: ~40 KB on
    the wire).  Built from concatenated bzip2 streams of one repeated block, as bzip2 readers accept."""
    import bz2

    header = tarfile.TarInfo("lora.safetensors")
    header.size = claimed
    head = header.tobuf(format=tarfile.USTAR_FORMAT)
    chunk = 8 * 1024**2
    zeros = bz2.compress(bytes(chunk), 9)
    parts, left = [bz2.compress(head, 9)], claimed
    while left >= chunk:
        parts.append(zeros)
        left -= chunk
    parts.append(bz2.compress(bytes(left) + bytes(1024), 9))  # the rest and the end-of-archive blocks
    return b"".join(parts)


def make_many_member_tar(lora: bytes, members: int) -> bytes:
    """A plain trainer tar with `members` empty files before lora.safetensors."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(members):
            tf.addfile(tarfile.TarInfo(f"e{i}"), io.BytesIO(b""))
        info = tarfile.TarInfo("lora.safetensors")
        info.size = len(lora)
        tf.addfile(info, io.BytesIO(lora))
    return buf.getvalue()


def make_pax_sparse_tar(lora: bytes, realsize: int = 200 * 1024**2) -> bytes:
    """A 3.5 KB PAX tar (GNU sparse format 1.0) whose `lora.safetensors` is the LoRA followed by a hole: extracted,
    it is `realsize` bytes (the LoRA and then zeros), a file no loader accepts."""
    sparse_map = f"1\n0\n{len(lora)}\n".encode()
    sparse_map += bytes(-len(sparse_map) % 512)
    stored = sparse_map + lora
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "lora.safetensors",
           "GNU.sparse.realsize": str(realsize)}
    info = tarfile.TarInfo("GNUSparseFile.0/lora.safetensors")
    info.size = len(stored)
    info.pax_headers = pax
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(stored))
    return buf.getvalue()


def gzip_twice(data: bytes) -> bytes:
    """`data` gzip-compressed twice: what a `Content-Encoding: gzip, gzip` reply carries."""
    import gzip

    return gzip.compress(gzip.compress(data, 9), 9)
