"""1 000 LoRA swaps and scale changes on the tiny model: the base weights come back bit for bit every time, a
LoRA state reached again is bitwise the same as the first time, and memory stays flat (no tensor kept per swap).

The swaps go through the predictor's own LoraMerger (the object predict() merges with), over four LoRAs in four
formats (kohya, diffusers/PEFT, LyCORIS LoKr, Replicate trainer output with PTI tokens), one or two at a time, in
pairs that share layers, at scales across the whole input range.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdxl import lora
from conftest import predict_inputs
from lora_fixtures import (LoraFixture, write_diffusers_lora, write_kohya_lora, write_lokr_lora,
                           write_replicate_dir)

SWAPS = 1000
CHECK_BASE_EVERY = 100
CHECK_REVISIT_EVERY = 16  # the schedule repeats every 32 swaps: each checked state is met again
WARM_UP = 100  # swaps before the memory baseline: every pair has been merged and every cache is full
SCALES = (0.8, -1.0, 0.35, 3.0, 1.0, -0.4, 1.7)
BASE_OUTPUT = dict(prompt="1girl, red hat", seed=5, aspect_ratio="custom", width=256, height=256,
                   num_inference_steps=1, output_format="png")


def keep_layers(fx: LoraFixture, modules: set[tuple[str, str]]) -> None:
    """Rewrite the fixture's file with only the layers that modify `modules` (its manifest says which is which)."""
    with safe_open(str(fx.path), "pt") as handle:
        metadata = handle.metadata()
    prefixes = tuple(f"{prefix}." for prefix, target in fx.targets.items() if target in modules)
    tensors = {k: v for k, v in load_file(str(fx.path)).items() if k.startswith(prefixes)}
    assert tensors, f"{fx.kind}: no layer kept"
    save_file(tensors, str(fx.path), metadata=metadata)


@pytest.fixture(scope="module")
def soak_loras(predictor, tmp_path_factory) -> tuple[list[lora.LoraRequest], list[tuple[str, str]]]:
    """Four LoRAs over a pool of 12 layers (UNet attention, both text encoders), each on its own half of the
    pool: few layers keep 1 000 swaps fast, and every pair shares some layers (sums of two deltas). Four, as the
    merger keeps four resolved LoRAs: a fifth would make most swaps re-read a file, which is not what is tested."""
    pipe = predictor.models.models["illustrious"].txt2img
    folder = tmp_path_factory.mktemp("soak")
    fixtures = [write_kohya_lora(folder / "kohya.safetensors", pipe),
                write_diffusers_lora(folder / "peft.safetensors", pipe),
                write_lokr_lora(folder / "lokr.safetensors", pipe),
                write_replicate_dir(folder / "trainer", pipe)]
    common = set.intersection(*(set(fx.targets.values()) for fx in fixtures[:3]))
    unet = sorted(t for t in common & set(fixtures[3].targets.values()))
    text = sorted(t for t in common if t[0] != "unet")
    pool = unet[::max(1, len(unet) // 6)][:6] + text[::max(1, len(text) // 6)][:6]
    requests = []
    for i, fx in enumerate(fixtures):
        keep = {layer for j, layer in enumerate(pool) if (j + i) % 2 == 0 or j % 4 == i}
        keep_layers(fx, keep if fx.kind != "replicate-tar" else {t for t in keep if t[0] == "unet"})
        requests.append(lora.LoraRequest(key=f"soak:{fx.kind}", path=fx.path, scale=1.0, name=f"soak {fx.kind}",
                                         embeddings_path=fx.embeddings_path, token_map=fx.token_map))
    return requests, pool


def schedule(loras: list[lora.LoraRequest]) -> list[tuple[lora.LoraRequest, ...]]:
    """SWAPS requests, each different from the one before: pairs, single LoRAs and scale-only changes."""
    combos = [(a, b) for a, b in itertools.permutations(range(len(loras)), 2)] + [(a,) for a in range(len(loras))]
    scales = itertools.cycle(SCALES)
    plan, previous = [], None
    for i in range(SWAPS):
        combo = combos[(i // 2) % len(combos)]  # each combo twice in a row: the second time only the scales move
        request = tuple(lora.LoraRequest(loras[j].key, loras[j].path, next(scales), loras[j].name,
                                         loras[j].embeddings_path, loras[j].token_map) for j in combo)
        assert request != previous
        plan.append(request)
        previous = request
    return plan


COMPONENT_ATTR = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def fingerprint(pipe, layers: list[tuple[str, str]] | None = None) -> str:
    """sha256 of the bits of every UNet / text-encoder tensor (or of the given layers' weights only)."""
    if layers is None:
        tensors = [t for attr in COMPONENT_ATTR.values() for t in getattr(pipe, attr).state_dict().values()]
    else:
        tensors = [getattr(pipe, COMPONENT_ATTR[c]).get_submodule(name).weight for c, name in layers]
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def live_tensors() -> tuple[int, int]:
    """(count, bytes) of every tensor and parameter in the process, storages counted once."""
    gc.collect()
    kinds = (torch.Tensor, torch.nn.Parameter)  # exact types: isinstance() on torch's metaclass is slow
    tensors = [obj for obj in gc.get_objects() if type(obj) in kinds]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return len(tensors), sum(storages.values())


def rss() -> int:
    """Resident set size of this process (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_thousand_swaps_restore_the_base_bitwise_and_keep_memory_flat(predictor, soak_loras, caplog):
    caplog.set_level(logging.WARNING, logger="sdxl.lora")  # two INFO lines per swap would only fill the capture
    loras, pool = soak_loras
    merger = predictor.mergers["illustrious"]
    pipe = predictor.models.models["illustrious"].txt2img
    merger.apply([])
    base_print = fingerprint(pipe)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    base_image = Path(predictor.predict(**predict_inputs(**BASE_OUTPUT))[0]).read_bytes()
    seen: dict[tuple, str] = {}
    revisits = 0

    try:
        for i, request in enumerate(schedule(loras), start=1):
            report = merger.apply(list(request))
            assert report.changed
            if i % CHECK_REVISIT_EVERY == 0:  # the same LoRAs at the same scales: the same bits, however reached
                signature, now = tuple((r.key, r.scale) for r in request), fingerprint(pipe, pool)
                revisits += signature in seen
                assert seen.setdefault(signature, now) == now, f"swap {i}: {signature} differs from last time"
            if i % CHECK_BASE_EVERY == 0:
                merger.apply([])
                assert fingerprint(pipe) == base_print, f"base weights differ after {i} swaps"
                assert pipe.tokenizer is tokenizers[0] and pipe.tokenizer_2 is tokenizers[1]
            if i == WARM_UP:
                tensors_before, rss_before = live_tensors(), rss()
        merger.apply([])
        tensors_after, rss_after = live_tensors(), rss()
    finally:
        merger.reset()

    assert fingerprint(pipe) == base_print
    assert Path(predictor.predict(**predict_inputs(**BASE_OUTPUT))[0]).read_bytes() == base_image
    assert revisits >= 10
    print(f"{SWAPS} swaps, {revisits} states met again bitwise equal; after {WARM_UP} swaps -> end: "
          f"tensors {tensors_before[0]} -> {tensors_after[0]}, tensor bytes {tensors_before[1]} -> "
          f"{tensors_after[1]}, RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
    # A tensor kept per swap would add 900 tensors; a kept copy of the smallest layer weight (4 KiB), 3.5 MiB.
    assert tensors_after[0] - tensors_before[0] < 50
    assert tensors_after[1] - tensors_before[1] < 64 * 1024
    assert rss_after - rss_before < 64 * 2**20
