"""Start the real Cog HTTP server (coglet) on loopback for interface tests, the way script/serve does."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
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

    def health(self) -> dict:
        return requests.get(self.base + "/health-check", timeout=5).json()

    def settled_health(self, timeout: float = 10) -> dict:
        """Health once the one prediction slot is released: coglet reports BUSY for a moment after a prediction
        ends (it answers the prediction first, then frees the slot), so BUSY is only a failure if it lasts."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["status"] != "BUSY" or time.monotonic() > deadline:
                return health
            time.sleep(0.05)

    def start(self, prediction_id: str, inputs: dict, timeout: float = 300) -> "Pending":
        """Start a prediction without waiting for it (an idempotent PUT /predictions/<id>, run in a thread)."""
        return Pending(self, prediction_id, inputs, timeout)

    def cancel(self, prediction_id: str) -> requests.Response:
        return requests.post(f"{self.base}/predictions/{prediction_id}/cancel", timeout=10)

    def log_messages(self, prediction_id: str | None = None) -> list[str]:
        """The messages the server logged so far (its JSON lines), only those of one prediction if given; the
        prediction's own stdout/stderr lines are among them as they are printed."""
        messages = []
        for line in self.log_path.read_text("utf-8", errors="replace").splitlines():
            try:
                fields = json.loads(line)["fields"]
            except (ValueError, KeyError, TypeError):
                continue
            if prediction_id is None or fields.get("prediction_id") == prediction_id:
                messages.append(str(fields.get("message", "")))
        return messages

    def wait_log(self, prediction_id: str, text: str, timeout: float = 60) -> str:
        """Block until the prediction has logged a line containing `text` (the server writes them as they come)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.log_messages(prediction_id):
                if text in message:
                    return message
            time.sleep(0.01)
        raise TimeoutError(f"{prediction_id} logged no {text!r} within {timeout}s: {self.log_messages(prediction_id)}")

    def stop(self) -> None:
        try:
            requests.post(self.base + "/shutdown", timeout=5)
            self.process.wait(timeout=15)
        except (requests.RequestException, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self._log.close()


class Pending:
    """A prediction running in the server; `result()` waits for its final JSON (succeeded, failed or canceled)."""

    def __init__(self, server: CogServer, prediction_id: str, inputs: dict, timeout: float):
        self.id = prediction_id
        self._response: requests.Response | None = None
        self._error: BaseException | None = None
        self.finished_at = 0.0

        def run() -> None:
            try:
                deadline = time.monotonic() + 10
                while True:  # 409 for a moment after the previous prediction, as in CogServer.post
                    self._response = requests.put(f"{server.base}/predictions/{prediction_id}",
                                                  json={"input": inputs}, timeout=timeout)
                    if self._response.status_code != 409 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            except BaseException as err:  # handed to the caller of result()
                self._error = err
            self.finished_at = time.monotonic()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 300) -> dict:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.id} still running after {timeout}s"
        if self._error is not None:
            raise self._error
        assert self._response.status_code == 200, self._response.text
        return self._response.json()


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
