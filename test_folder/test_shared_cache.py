"""Two real Cog servers (two processes) sharing one LORA_CACHE_DIR and asking for the same LoRA at the same time:
the file is downloaded once, both predictions succeed with identical images, the cached file is the source file
(sha256), and nothing is left in the cache's temp folder. When the process that is downloading is cancelled, or
killed outright, the server waiting on the same entry downloads it itself and still gets an intact file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from fakes import file_response
from lora_fixtures import write_kohya_lora
from weights import LoraCache, parse_lora_ref

BASE = {"prompt": "1girl, red hat", "seed": 9, "aspect_ratio": "custom", "width": 256, "height": 256,
        "num_inference_steps": 1, "output_format": "png"}
# Time for the second server, once its prediction has started, to reach the cache's lock on the entry. Only
# coverage depends on it: were it late, it would find the finished entry and every assertion would still hold.
REACH_LOCK = 0.5


@pytest.fixture(scope="module")
def lora_files(predictor, tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("shared-loras")
    files = []
    for seed in (31, 32, 33):
        write_kohya_lora(folder / f"{seed}.safetensors", predictor.models.models["illustrious"].txt2img, seed=seed)
        files.append((folder / f"{seed}.safetensors").read_bytes())
    return files


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def start_overlapping(cog_server, faults_server, files, path: str, inputs: dict, name: str):
    """The first server starts downloading `path`; then the second asks for the same LoRA and is given time to reach
    the cache's lock on that entry."""
    first = cog_server.start(f"{name}-a", inputs)
    wait_for(lambda: files.count(path, "GET") == 1, "the first server's download")
    second = faults_server.start(f"{name}-b", inputs)
    faults_server.wait_log(second.id, "validated inputs")
    time.sleep(REACH_LOCK)
    return first, second


def cached_entry(server, url: str):
    return server.lora_cache / "entries" / LoraCache.key_name(parse_lora_ref(url).canonical_id)


def assert_intact(server, url: str, data: bytes) -> None:
    entry = cached_entry(server, url)
    assert hashlib.sha256((entry / "lora.safetensors").read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert json.loads((entry / "meta.json").read_text())["sha256"] == hashlib.sha256(data).hexdigest()
    assert list((server.lora_cache / "tmp").iterdir()) == []


def test_two_servers_download_a_lora_once_and_make_the_same_image(cog_server, faults_server, faults_fakes,
                                                                    lora_files):
    files, data = faults_fakes.files, lora_files[0]
    release = threading.Event()  # the host holds its answer until both servers want the file
    files.route("GET", r"/shared/once\.safetensors",
                lambda req: (release.wait(60), file_response(req, data))[1])
    url = files.url + "/shared/once.safetensors"
    inputs = {**BASE, "lora_weights": url}

    first, second = start_overlapping(cog_server, faults_server, files, "/shared/once", inputs, "shared-once")
    release.set()
    a, b = first.result(), second.result()

    assert a["status"] == b["status"] == "succeeded", (a.get("error"), b.get("error"))
    assert files.count("/shared/once", "GET") == 1
    assert (a["metrics"]["lora_cache_misses"], b["metrics"]["lora_cache_hits"]) == (1, 1)
    assert a["output"] == b["output"]
    assert_intact(cog_server, url, data)


def test_a_cancelled_download_leaves_the_other_server_an_intact_file(cog_server, faults_server, faults_fakes,
                                                                    lora_files):
    files, data = faults_fakes.files, lora_files[1]
    url = files.add_file("/shared/cancelled.safetensors", data)
    files.drip("/shared/cancelled", 0.01, times=1)  # the first download trickles until it is cancelled
    inputs = {**BASE, "lora_weights": url}

    first, second = start_overlapping(cog_server, faults_server, files, "/shared/cancelled", inputs, "shared-cancel")
    assert cog_server.cancel(first.id).status_code == 200
    a, b = first.result(), second.result()

    assert a["status"] == "canceled", a
    assert b["status"] == "succeeded", b.get("error")
    assert files.count("/shared/cancelled", "GET") == 2  # the second server fetched it again, whole
    assert_intact(cog_server, url, data)
    again = cog_server.predict(inputs)  # the cancelled server now finds the other's entry
    assert again["metrics"]["lora_cache_hits"] == 1 and again["output"] == b["output"]


def test_a_process_killed_mid_download_leaves_the_other_server_an_intact_file(cog_server, faults_server,
                                                                             faults_fakes, lora_files):
    files, data = faults_fakes.files, lora_files[2]
    url = files.add_file("/shared/killed.safetensors", data)
    files.drip("/shared/killed", 0.01, times=1)
    # A third process on the same cache, downloading through weights.py, dies by SIGKILL: no cleanup code runs.
    env = dict(os.environ, LORA_CACHE_DIR=str(cog_server.lora_cache), LORA_ALLOW_LOCAL_HOSTS="1")
    doomed = subprocess.Popen([sys.executable, "-c", f"import weights; weights.fetch_lora({url!r})"], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: files.count("/shared/killed", "GET") == 1, "the doomed process's download")
        waiting = faults_server.start("shared-killed", {**BASE, "lora_weights": url})
        faults_server.wait_log(waiting.id, "validated inputs")
        time.sleep(REACH_LOCK)
    finally:
        doomed.kill()
        doomed.wait()
    result = waiting.result()

    assert result["status"] == "succeeded", result.get("error")
    assert files.count("/shared/killed", "GET") == 2
    leftovers = list((cog_server.lora_cache / "tmp").iterdir())  # the killed download's folder, swept after an hour
    assert len(leftovers) == 1 and leftovers[0].name.startswith("dl-")
    shutil.rmtree(leftovers[0])
    assert_intact(cog_server, url, data)
