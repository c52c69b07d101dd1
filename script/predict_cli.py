#!/usr/bin/env python3
"""`cog predict` without Docker: schema, real Cog server, one prediction, outputs written, server stopped.

    script/predict -i prompt="1girl, red hat" [-i image=@photo.png] [-i num_outputs=2] [-o DIR]

`-i name=value` values are converted to the input's type from the schema; `@path` sends a local file (as a
data: URI, the way the Cog server accepts files). Outputs are written to DIR (default: the current folder).
Exit status 1 with the server's error message when the prediction fails.
Weights: WEIGHTS_DIR if set, else ./weights beside predict.py, else the tiny random test model (built once).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT = float(os.environ.get("PREDICT_SERVER_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights_dir() -> Path:
    if os.environ.get("WEIGHTS_DIR"):
        return Path(os.environ["WEIGHTS_DIR"])
    if (REPO / "weights").exists():
        return REPO / "weights"
    sys.path.insert(0, str(REPO / "test_folder"))
    from conftest import _tiny_weights_dir  # the same cached build the tests use

    path = _tiny_weights_dir()
    print(f"no real weights found: using the tiny random test model in {path}", file=sys.stderr)
    return path


def coerce(name: str, raw: str, props: dict) -> object:
    if name not in props:
        raise SystemExit(f"unknown input {name!r}; inputs are: {', '.join(props)}")
    if raw.startswith("@"):
        path = Path(raw[1:])
        if not path.is_file():
            raise SystemExit(f"{name}: file not found: {path}")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
    kind = props[name].get("type")
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
        if kind == "boolean":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
    except ValueError:
        raise SystemExit(f"{name}: expected {kind}, got {raw!r}") from None
    return raw


def request(url: str, body: dict | None = None, timeout: float = 3600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return {"status": "failed", "error": f"HTTP {err.code}: {err.read().decode(errors='replace')}"}


def wait_ready(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the Cog server exited during start-up")
        try:
            health = request(base + "/health-check", timeout=5)
        except OSError:
            time.sleep(0.3)
            continue
        if health.get("status") == "READY":
            return
        if health.get("status") in ("SETUP_FAILED", "DEFUNCT"):
            raise SystemExit("setup failed:\n" + str(health.get("setup", {}).get("logs", "")))
        time.sleep(0.3)
    raise SystemExit(f"the Cog server was not ready after {SERVER_START_TIMEOUT:.0f}s")


def save_outputs(outputs: list | str, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, item in enumerate(outputs if isinstance(outputs, list) else [outputs]):
        header, _, payload = item.partition(",")
        ext = mimetypes.guess_extension(header[5:].split(";")[0]) or ".bin"
        ext = {".jpeg": ".jpg"}.get(ext, ext)
        path = out_dir / f"out-{i}{ext}"
        path.write_bytes(base64.b64decode(payload))
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("-o", "--output", type=Path, default=Path.cwd(), metavar="DIR")
    args = parser.parse_args()

    subprocess.run([sys.executable, str(REPO / "script" / "schema")], check=True, stdout=subprocess.DEVNULL)
    props = json.loads((REPO / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]["Input"]
    inputs = {}
    for item in args.input:
        name, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"-i expects NAME=VALUE, got {item!r}")
        inputs[name] = coerce(name, raw, props["properties"])

    port = free_port()
    env = dict(os.environ, WEIGHTS_DIR=str(weights_dir()), PORT=str(port), COG_PREDICT_TYPE_STUB="predict.py:Predictor")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    server = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)
        result = request(base + "/predictions", {"input": inputs})
    finally:
        try:
            request(base + "/shutdown", {}, timeout=5)
            server.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
    if result.get("logs"):
        sys.stderr.write(result["logs"])
    if result.get("status") != "succeeded":
        error = str(result.get("error") or result)
        print(error if error.startswith("Prediction failed") else f"Prediction failed: {error}", file=sys.stderr)
        return 1
    for path in save_outputs(result["output"], args.output):
        print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
