"""Cancellation through the real Cog server (POST /predictions/<id>/cancel) during a LoRA download, in the middle
of merging a LoRA, and during denoising: the prediction ends `canceled`, the server is READY again, no partial
file is left in the LoRA cache, and the next predictions are byte-identical to controls made before.

Each cancel is aimed at its phase by a signal, not by a sleep: the download by the loopback file host having
received the request (it drips the file a byte at a time), the merge by the cancel probe's pause point
(test_folder/cancel_probe.py), denoising by the prediction's "encoded prompts" log line (50 steps follow).

Cog raises the cancellation (cog.CancelationException) between any two bytecodes of the predicting thread, so the
in-process tests at the end land it where a cancel is hardest to clean up after: right after a LoRA was pinned in
the cache, before predict() holds the file.
"""

from __future__ import annotations

import time

import pytest
from cog import CancelationException

from conftest import predict_inputs
from fakes import make_lora
from lora_fixtures import write_kohya_lora
from weights import LoraCache, parse_lora_ref

BASE = {"prompt": "1girl, red hat", "seed": 7, "aspect_ratio": "custom", "width": 256, "height": 256,
        "num_inference_steps": 2, "output_format": "png"}


@pytest.fixture(scope="module")
def lora_url(predictor, faults_fakes, tmp_path_factory) -> str:
    """A kohya LoRA touching every attention layer and both text encoders (326 layers of the tiny model)."""
    path = tmp_path_factory.mktemp("cancel-loras") / "kohya.safetensors"
    write_kohya_lora(path, predictor.models.models["illustrious"].txt2img, seed=11)
    return faults_fakes.files.add_file("/cancel/kohya.safetensors", path.read_bytes())


@pytest.fixture(scope="module")
def controls(faults_server, lora_url) -> dict[str, list[str]]:
    """Outputs made before any cancel: the base model, and the LoRA at scale 0.8."""
    base = faults_server.predict(BASE)
    with_lora = faults_server.predict({**BASE, "lora_weights": lora_url, "lora_scale": 0.8})
    assert base["status"] == with_lora["status"] == "succeeded", (base.get("error"), with_lora.get("error"))
    assert base["output"] != with_lora["output"]
    return {"base": base["output"], "lora": with_lora["output"]}


def cancel_now(server, pending) -> dict:
    sent = time.monotonic()
    assert server.cancel(pending.id).status_code == 200
    result = pending.result(timeout=60)
    print(f"{pending.id}: canceled {pending.finished_at - sent:.3f}s after the cancel request")
    return result


def assert_clean(server, result: dict) -> None:
    """Canceled, READY again, nothing half-written in the shared LoRA cache."""
    assert result["status"] == "canceled", result
    assert server.settled_health()["status"] == "READY"
    assert list((server.lora_cache / "tmp").iterdir()) == []


def test_cancel_during_lora_download_keeps_no_partial_file_and_the_next_prediction_matches(
        faults_server, faults_fakes, controls, predictor, tmp_path):
    files = faults_fakes.files
    path = tmp_path / "dripping.safetensors"
    write_kohya_lora(path, predictor.models.models["illustrious"].txt2img, seed=12)
    url = files.add_file("/cancel/dripping.safetensors", path.read_bytes())
    files.drip("/cancel/dripping", 0.01)  # ~8 minutes for the whole file: the cancel lands mid-download

    pending = faults_server.start("cancel-download", {**BASE, "lora_weights": url})
    deadline = time.monotonic() + 60
    while files.count("/cancel/dripping", "GET") == 0:
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.01)
    result = cancel_now(faults_server, pending)

    assert_clean(faults_server, result)
    assert not any("fetched" in m for m in faults_server.log_messages(pending.id))  # it was still downloading
    entry = faults_server.lora_cache / "entries" / LoraCache.key_name(parse_lora_ref(url).canonical_id)
    assert not entry.exists()
    assert faults_server.predict(BASE)["output"] == controls["base"]


def test_cancel_lands_at_once_while_the_source_sends_nothing(faults_server, faults_fakes, controls, predictor,
                                                             tmp_path):
    """A host that stops sending blocks the socket read; the download runs on a worker thread, so the cancel is not
    held until the next byte (20 s here) or the read timeout (60 s): it lands within the 8 s this test waits."""
    files = faults_fakes.files
    path = tmp_path / "stalled.safetensors"
    write_kohya_lora(path, predictor.models.models["illustrious"].txt2img, seed=13)
    url = files.add_file("/cancel/stalled.safetensors", path.read_bytes())
    files.drip("/cancel/stalled", 20.0)

    pending = faults_server.start("cancel-stalled", {**BASE, "lora_weights": url})
    deadline = time.monotonic() + 60
    while files.count("/cancel/stalled", "GET") == 0:
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.01)
    time.sleep(0.3)  # past the first byte: the read is now blocked for 20 s
    sent = time.monotonic()
    assert faults_server.cancel(pending.id).status_code == 200
    result = pending.result(timeout=8)
    print(f"{pending.id}: canceled {pending.finished_at - sent:.3f}s after the cancel request")

    assert_clean(faults_server, result)
    entry = faults_server.lora_cache / "entries" / LoraCache.key_name(parse_lora_ref(url).canonical_id)
    assert not entry.exists()
    assert faults_server.predict(BASE)["output"] == controls["base"]


def test_cancel_in_the_middle_of_merging_a_lora_restores_the_weights_for_the_next_prediction(
        faults_server, lora_url, controls):
    # The LoRA at 0.8 is in the weights; the canceled request rewrites at least 100 of its 276 layers at 0.3, then stops.
    assert faults_server.predict({**BASE, "lora_weights": lora_url, "lora_scale": 0.8})["output"] == controls["lora"]
    (faults_server.probe_dir / "pause-merge").write_text("100")
    pending = faults_server.start("cancel-merge", {**BASE, "lora_weights": lora_url, "lora_scale": 0.3})
    paused = faults_server.wait_log(pending.id, "cancel probe: paused mid-merge after ")
    assert 100 <= int(paused.split("after ")[1].split()[0]) < 276  # mid-merge: some layers written, not all
    result = cancel_now(faults_server, pending)

    assert_clean(faults_server, result)
    assert not any("applied" in m for m in faults_server.log_messages(pending.id))
    assert faults_server.predict({**BASE, "lora_weights": lora_url, "lora_scale": 0.8})["output"] == controls["lora"]
    assert faults_server.predict(BASE)["output"] == controls["base"]


def test_cancel_during_denoising_with_a_lora_leaves_the_base_model_for_the_next_prediction(
        faults_server, lora_url, controls):
    pending = faults_server.start("cancel-denoise",
                                  {**BASE, "num_inference_steps": 50, "lora_weights": lora_url, "lora_scale": 0.8})
    faults_server.wait_log(pending.id, "encoded prompts")
    result = cancel_now(faults_server, pending)

    assert_clean(faults_server, result)
    assert not any("generated" in m for m in faults_server.log_messages(pending.id))  # stopped mid-denoising
    assert faults_server.predict(BASE)["output"] == controls["base"]
    assert faults_server.predict({**BASE, "lora_weights": lora_url, "lora_scale": 0.8})["output"] == controls["lora"]
    # It really stopped, rather than finishing unseen beside the predictions that followed.
    assert faults_server.log_messages(pending.id)[-1] == "Prediction cancelled"


def cancel(*args, **kwargs):
    raise CancelationException()


@pytest.mark.parametrize("cached", [False, True], ids=["download", "cache-hit"])
@pytest.mark.parametrize("where", ["inside-fetch-after-the-pin", "after-fetch-returned"])
def test_a_cancel_right_after_a_lora_is_pinned_leaves_no_pin(predictor, faults_fakes, tmp_path, monkeypatch,
                                                             where, cached):
    cache = LoraCache(tmp_path / "cache")
    monkeypatch.setattr(predictor, "lora_cache", cache)
    url = faults_fakes.files.add_file(f"/pinned/{where}-{cached}.safetensors", make_lora(7))
    if cached:
        cache.release(cache.fetch(parse_lora_ref(url)).ref)
    if where == "inside-fetch-after-the-pin":
        monkeypatch.setattr(cache, "_touch", cancel)  # the step after pinning, on a hit and after a download
    else:
        fetch = cache.fetch
        monkeypatch.setattr(cache, "fetch", lambda *args, **kwargs: cancel(fetch(*args, **kwargs)))

    with pytest.raises(CancelationException):
        predictor.predict(**predict_inputs(**{**BASE, "lora_weights": url}))
    monkeypatch.undo()
    cache.clear()  # removes every unpinned entry: a leaked pin would keep this one for the life of the process
    assert list((tmp_path / "cache" / "entries").iterdir()) == []
