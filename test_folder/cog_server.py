"""Start the real Cog HTTP server (coglet) on loopback for interface tests, the way script/serve does."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    """script/serve (the real coglet server and its worker); `predict()` posts a prediction and returns the body."""

    def __init__(self, weights_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, WEIGHTS_DIR=str(weights_dir), PORT=str(self.port), **(extra_env or {}))
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [str(REPO / "script" / "serve")], cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited:\n{self.log_path.read_text()}"
            try:
                health = requests.get(self.base + "/health-check", timeout=5).json()
            except requests.ConnectionError:
                time.sleep(0.2)
                continue
            if health["status"] not in ("STARTING",):
                return health
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_path.read_text()}")

    def post(self, inputs: dict, timeout: float = 300) -> requests.Response:
        # coglet can answer 409 for a moment after a sync prediction returns, while its one slot is released.
        deadline = time.monotonic() + 10
        while True:
            response = requests.post(self.base + "/predictions", json={"input": inputs}, timeout=timeout)
            if response.status_code != 409 or time.monotonic() > deadline:
                return response
            time.sleep(0.05)

    def predict(self, inputs: dict, timeout: float = 300) -> dict:
        response = self.post(inputs, timeout=timeout)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        try:
            requests.post(self.base + "/shutdown", timeout=5)
            self.process.wait(timeout=15)
        except (requests.RequestException, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self._log.close()


def decode_output(item: str) -> tuple[str, bytes]:
    """A data: URI from the server -> (mime type, bytes)."""
    header, _, payload = item.partition(",")
    return header[len("data:"):].split(";")[0], base64.b64decode(payload)


def output_images(result: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(decode_output(item)[1])) for item in result["output"]]


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()
