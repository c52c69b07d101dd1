#!/usr/bin/env python3
"""End-to-end speed of our predict() vs stock diffusers with unfused PEFT LoRAs, same process, same card.

    python bench/run_benchmark.py --out DIR                 # CUDA: builds full-size random SDXL weights first
    python bench/run_benchmark.py --out DIR --tiny          # CPU/offline check of the whole script (tiny model)
    python bench/run_benchmark.py --out DIR --weights W     # existing WEIGHTS_DIR

Ours: `Predictor().setup()` then `predict()` with every input given explicitly (txt2img, Illustrious preset: Euler a,
CFG 6, clip skip 2, preset negative prompt, webp q80, safety checker on, A1111 metadata on), two rank-32 kohya
LoRAs (attention q/k/v/out + feed-forward + proj_in/proj_out of every transformer block of the UNet) served from a
loopback HTTP server (LORA_ALLOW_LOCAL_HOSTS=1) through the real LoRA cache.
Stock: StableDiffusionXLPipeline (fp16) + load_lora_weights of the same two files with adapter names +
set_adapters([a, b], [0.8, 0.6]) (unfused PEFT), the same scheduler, steps and CFG, its own safety-checker call and
webp encoding (q80) of every image.

Timing: torch.cuda.synchronize() before and after each call, perf_counter, median of >= 3 timed runs after
warm-up; ours and stock alternate run by run for the headline figure. JSON is rewritten after every section so a
timeout still leaves a partial result; a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import http.server
import inspect
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test_folder"))

PROMPT = "1girl, solo, red hat, blue eyes, smile, city, night, masterpiece, best quality"
SEED = 1234
SCALES = (0.8, 0.6)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def med(xs):
    return statistics.median(xs) if xs else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.r: dict = {"schema": 1, "complete": False, "notes": []}
        self.deadline = T0 + args.budget_s

    def save(self) -> None:
        (self.out / "latest.json").write_text(json.dumps(self.r, indent=2, default=str))

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *a, **k):
    sync()
    t = time.perf_counter()
    out = fn(*a, **k)
    sync()
    return time.perf_counter() - t, out


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "tokenizers", "huggingface_hub", "peft", "safetensors",
                 "accelerate", "cog", "coglet", "pillow", "numpy"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    return v


def write_loras(weights: Path, folder: Path, rank: int, std: float) -> dict[str, Path]:
    """Four kohya (SGM-named) LoRAs a, b, c, d on every linear of the UNet's transformer blocks, random factors."""
    import torch
    from diffusers import UNet2DConditionModel

    import lora_fixtures as F

    config = UNet2DConditionModel.load_config(weights / "illustrious-xl" / "unet")
    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel.from_config(config)
    pipe = types.SimpleNamespace(unet=unet)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, name in enumerate("abcd"):
        fx = F.write_kohya_lora(folder / f"{name}.safetensors", pipe, seed=10 + i, rank=rank, alpha=rank / 2,
                                naming="sgm", te=False, std=std)
        paths[name] = fx.path
    kinds = sorted({re.sub(r"^.*?\.attentions\.\d+\.(transformer_blocks\.\d+\.)?", "", n)
                    for _, n in fx.targets.values()})
    return paths, len(fx.targets), kinds


def serve(folder: Path) -> str:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def predict_inputs(predict_mod, **overrides) -> dict:
    """Every predict() argument at its declared default (as test_folder/conftest.py does), with overrides."""
    values = {}
    for name, param in inspect.signature(predict_mod.Predictor.predict).parameters.items():
        if name != "self":
            values[name] = getattr(param.default, "default", param.default)
    values.update(overrides)
    return values


def dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU check of the script)")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=540, help="optional sections are skipped past this")
    ap.add_argument("--fix-dtype", action="store_true",
                    help="what-if: after setup, cast the predictor's modules back to the dtype it chose (diffusers "
                         "0.42.1 from_pipe() without a dtype casts the shared modules to float32)")
    args = ap.parse_args()
    if args.tiny:
        args.size = min(args.size, 256)
        args.steps = min(args.steps, 4)
        args.rank = min(args.rank, 4)
    b = Bench(args)
    try:
        run(b)
    except BaseException as exc:  # keep what was measured
        import traceback

        traceback.print_exc()
        b.r["error"] = f"{type(exc).__name__}: {exc}"
        b.save()
        print_table(b.r)
        raise
    b.r["complete"] = True
    b.r["total_wall_s"] = round(time.perf_counter() - T0, 1)
    b.save()
    (b.out / "results.md").write_text(print_table(b.r))


def run(b: Bench) -> None:
    args, r = b.args, b.r
    import numpy as np
    import torch
    from PIL import Image

    cuda = torch.cuda.is_available()
    r["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    r["card"] = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    r["versions"] = versions()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.split()
        ok = len(head) == 40 and all(c in "0123456789abcdef" for c in head)  # the device copy has no .git
        r["repo"] = {"head": head, "modified": dirty[1::2]} if ok else None
    except Exception:
        r["repo"] = None
    r["config"] = dict(size=args.size, steps=args.steps, runs=args.runs, lora_rank=args.rank, scales=SCALES,
                       tiny=args.tiny, seed=SEED, prompt=PROMPT, scheduler="Euler a (Illustrious preset)",
                       guidance=6.0, output="webp q80, safety checker on")
    try:
        r["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                          "--format=csv,noheader"], capture_output=True, text=True,
                                         timeout=20).stdout.strip()
    except Exception:
        r["nvidia_smi"] = None
    log(f"card {r['card']}; versions {r['versions']}")
    b.save()

    # ---------------------------------------------------------------- weights and LoRA files
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    weights = args.weights
    if weights is None:
        weights = work / "weights"
        t = time.perf_counter()
        if args.tiny:
            subprocess.run([sys.executable, str(REPO / "script" / "tiny_weights.py"), str(weights)], check=True)
        else:
            subprocess.run([sys.executable, str(REPO / "bench" / "full_size_weights.py"), str(weights)], check=True)
        r["weights_build_s"] = round(time.perf_counter() - t, 1)
        log(f"weights built in {r['weights_build_s']}s")
    lora_dir = work / "loras"
    t = time.perf_counter()
    paths, n_layers, kinds = write_loras(weights, lora_dir, args.rank, 0.01 if not args.tiny else 0.1)
    r["lora_files"] = {k: {"bytes": p.stat().st_size} for k, p in paths.items()}
    r["lora_layers_per_file"] = n_layers
    r["lora_layer_kinds"] = kinds
    log(f"4 kohya LoRAs rank {args.rank} on {n_layers} UNet layers ({kinds}) written in "
        f"{time.perf_counter() - t:.1f}s, {paths['a'].stat().st_size / 2**20:.0f} MiB each")
    base_url = serve(lora_dir)
    url = {k: f"{base_url}/{k}.safetensors" for k in paths}
    os.environ.update(WEIGHTS_DIR=str(weights), LORA_CACHE_DIR=str(work / "lora-cache"), LORA_ALLOW_LOCAL_HOSTS="1",
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    b.save()

    # ---------------------------------------------------------------- ours: setup (cold)
    t = time.perf_counter()
    import predict as predict_mod

    r["ours_import_s"] = round(time.perf_counter() - t, 2)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    p = predict_mod.Predictor()
    setup_s, _ = timed(p.setup)
    r["setup_cold_s"] = round(setup_s, 2)
    r["setup_note"] = ("first Predictor().setup() in a fresh process (CUDA context, both base models to the GPU); "
                       "the weight files were just written, so they come from the OS page cache, not cold disk; "
                       f"`import predict` (torch, diffusers) took {r['ours_import_s']}s before it")
    log(f"setup cold {setup_s:.2f}s")
    def dtypes(pipe):
        return {n: sorted({str(x.dtype) for x in getattr(pipe, n).parameters()})
                for n in ("unet", "text_encoder", "text_encoder_2", "vae")}

    r["ours_requested_dtype"] = str(p.models.dtype)
    r["ours_param_dtypes_after_setup"] = dtypes(p.models.models["illustrious"].txt2img)
    log(f"ours requested {p.models.dtype}; parameters after setup {r['ours_param_dtypes_after_setup']}")
    if args.fix_dtype:
        for model in p.models.models.values():
            model.txt2img.to(dtype=p.models.dtype)  # img2img / inpaint share these modules
        if cuda:
            torch.cuda.empty_cache()
        r["what_if_dtype_fix"] = True
        r["ours_param_dtypes_after_fix"] = dtypes(p.models.models["illustrious"].txt2img)
        r["notes"].append("WHAT-IF RUN: the bench cast the predictor's pipelines back to its own dtype after setup "
                          "(the predictor as committed runs in float32, see ours_param_dtypes_after_setup)")
        log(f"what-if: cast to {p.models.dtype}: {r['ours_param_dtypes_after_fix']}")
    model_ours = p.models.models["illustrious"]
    runner = model_ours.runner
    r["graphs_captured_in_setup"] = len(runner.graphs) if runner else 0
    r["graph_capture_s_in_setup"] = round(runner.stats["capture_seconds"], 2) if runner else 0
    log(f"setup captured {r['graphs_captured_in_setup']} UNet graphs in {r['graph_capture_s_in_setup']}s")

    capture_offset = [0]  # the graphs-off comparison below starts a new runner; its re-warm is not counted

    def captures() -> int:
        return capture_offset[0] + (model_ours.runner.stats["captures"] if model_ours.runner else 0)

    resident_ours = torch.cuda.memory_allocated() if cuda else 0
    r["ours_resident_gib_after_setup"] = round(resident_ours / 2**30, 2)
    b.save()

    key = "illustrious"
    merger = p.mergers[key]
    apply_log: list[float] = []
    orig_apply = merger.apply

    def timed_apply(loras):
        dt, rep = timed(orig_apply, loras)
        apply_log.append(dt * 1000)
        return rep

    merger.apply = timed_apply
    out_dir = Path(tempfile.mkdtemp(prefix="outs-"))

    def ours(pair=("a", "b"), scales=SCALES, steps=None, width=None, height=None, n=1, go_fast=False,
             keep=None, **extra):
        kw = dict(prompt=PROMPT, seed=SEED, num_inference_steps=steps or args.steps, num_outputs=n,
                  output_format="webp", output_quality=80, disable_safety_checker=False, go_fast=go_fast)
        kw.update(extra)
        if width or args.size != 1024:
            kw.update(aspect_ratio="custom", width=width or args.size, height=height or args.size)
        if pair:
            kw.update(lora_weights=url[pair[0]], lora_scale=scales[0], extra_lora=url[pair[1]],
                      extra_lora_scale=scales[1])
        dt, files = timed(p.predict, **predict_inputs(predict_mod, **kw))
        assert len(files) == n, files
        if keep is not None:
            keep.extend(np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files)
        for f in files:
            os.unlink(f)
        return dt

    # First request with two new LoRAs: download + verify + parse + merge (cold), then warm-up.
    first_s = ours()
    r["ours_first_request_new_loras_s"] = round(first_s, 3)
    r["ours_first_apply_ms"] = round(apply_log[-1], 1)
    log(f"ours first request (download+parse+merge {apply_log[-1]:.0f} ms) {first_s:.2f}s")
    r["graph_captures_first_request"] = captures() - r["graphs_captured_in_setup"]
    ours()  # warm-up
    graphs_after_warmup = dynamo_graphs()
    captures_after_warmup = captures()

    def series(fn, label, warm=1):
        for _ in range(warm):
            fn()
        xs = [fn() for _ in range(args.runs)]
        log(f"{label}: median {med(xs):.3f}s of {['%.3f' % x for x in xs]}")
        return xs

    # ---------------------------------------------------------------- ours-only phase (its own peak memory)
    if cuda:
        r["peak_gib_setup_and_first_requests"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    phases = PhaseLog()
    with phases:
        ours()
    r["phases_one_image"] = phases.lines
    log("phases of one 1024² two-LoRA prediction: " + " | ".join(phases.lines))
    xs = series(lambda: ours(), "ours 1024 two LoRAs", warm=0)
    r["ours_two_loras_phase1_s"] = [round(x, 3) for x in xs]
    if cuda:
        r["peak_one_image_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        r["peak_gib_ours_1024_two_loras"] = r["peak_one_image_gib"]
        r["peak_one_image_note"] = ("torch.cuda.max_memory_allocated over 1024² two-LoRA predictions at num_outputs 1 "
                                    "only (peak statistics reset after setup and the first requests)")
    b.save()

    xs = series(lambda: ours(pair=None), "ours 1024 no LoRA", warm=1)
    r["ours_no_lora_s"] = round(med(xs), 3)
    r["ours_no_lora_runs"] = [round(x, 3) for x in xs]
    r["restore_to_base_ms"] = round(apply_log[-len(xs) - 1], 1)  # the warm-up run's apply (base restore)
    b.save()

    # Switch: first use of pair (c, d) is cold; then alternate (a, b) <-> (c, d), both cached. 4 steps: the apply
    # time is independent of the step count; the wrapper around merger.apply times the merge itself.
    ours(pair=("a", "b"), steps=4)
    t_cd = ours(pair=("c", "d"), steps=4)
    r["ours_new_pair_apply_ms"] = round(apply_log[-1], 1)
    r["ours_new_pair_predict_4steps_s"] = round(t_cd, 3)
    sw, sw_total = [], []
    for i in range(args.runs + 1):
        pair = ("a", "b") if i % 2 == 0 else ("c", "d")
        sw_total.append(ours(pair=pair, steps=4))
        sw.append(apply_log[-1])
    r["switch_ms"] = round(med(sw), 1)
    r["switch_ms_runs"] = [round(x, 1) for x in sw]
    r["switch_predict_4steps_s"] = round(med(sw_total), 3)
    log(f"switch (cached pair) {med(sw):.1f} ms {['%.1f' % x for x in sw]}")
    sc = []
    last = ("a", "b") if args.runs % 2 == 0 else ("c", "d")
    for i in range(args.runs):
        ours(pair=last, scales=(SCALES[0] - 0.05 * (i + 1), SCALES[1]), steps=4)
        sc.append(apply_log[-1])
    r["scale_change_ms"] = round(med(sc), 1)
    r["scale_change_ms_runs"] = [round(x, 1) for x in sc]
    log(f"scale change {med(sc):.1f} ms {['%.1f' % x for x in sc]}")
    ours()  # back to (a, b) at the standard scales
    b.save()

    try:  # new sections: a failure here must not cost the headline comparison below
        # go_fast (step caching): time, and how far its image is from the exact one (same seed, lossless PNG).
        xs = series(lambda: ours(go_fast=True), "ours go_fast 1024 two LoRAs", warm=1)
        r["ours_go_fast_s"] = round(med(xs), 3)
        r["ours_go_fast_runs"] = [round(x, 3) for x in xs]
        pair_images: list = []
        ours(keep=pair_images, output_format="png")
        ours(keep=pair_images, output_format="png", go_fast=True)
        ours(keep=pair_images, output_format="png", seed=SEED + 1)
        exact_img, fast_img, other_img = pair_images
        # What the guidance cutoff adds to step caching: go_fast with guidance to the end (session 6's go_fast).
        from sdxl import stepcache

        cutoff = stepcache.GUIDANCE_CUTOFF_TIMESTEP
        stepcache.GUIDANCE_CUTOFF_TIMESTEP = 0
        try:
            xs_nc = series(lambda: ours(go_fast=True), "ours go_fast without guidance cutoff", warm=1)
            ours(keep=pair_images, output_format="png", go_fast=True)
        finally:
            stepcache.GUIDANCE_CUTOFF_TIMESTEP = cutoff
        r["ours_go_fast_no_cutoff_s"] = round(med(xs_nc), 3)
        no_cutoff_img = pair_images[-1]
        # Euler a through diffusers' own step (its noise copied with a blocking copy each step), against ours
        # (sdxl/samplers.py): what the stall costs, and that the image is the same.
        from sdxl import samplers

        own_step = samplers.EulerAncestral.step
        samplers.EulerAncestral.step = samplers.EulerAncestralDiscreteScheduler.step
        try:
            xs_ds = series(lambda: ours(), "ours with diffusers' Euler a step", warm=1)
            ours(keep=pair_images, output_format="png")
        finally:
            samplers.EulerAncestral.step = own_step
        r["ours_diffusers_euler_step_s"] = round(med(xs_ds), 3)
        r["euler_step_same_image"] = bool(np.array_equal(pair_images[-1], exact_img))

        def psnr(a, b_):
            mse = float(((a - b_) ** 2).mean())
            return round(10 * math.log10(255.0 ** 2 / mse), 2) if mse else float("inf")

        # CUDA graphs off: the same request must give the same image, bit for bit (graphs replay eager's kernels).
        capture, before_off = model_ours.graph_capture, captures()
        model_ours.graph_capture, model_ours.runs, model_ours.runner = None, {}, None
        eager_images: list = []
        ours(keep=eager_images, output_format="png")
        r["graphs_equal_eager"] = bool(np.array_equal(eager_images[0], exact_img))
        r["graphs_vs_eager_max_abs"] = float(np.abs(eager_images[0] - exact_img).max())
        xs = series(lambda: ours(), "ours 1024 two LoRAs, CUDA graphs off", warm=0)
        r["ours_eager_s"] = round(med(xs), 3)
        model_ours.graph_capture = capture
        p.warm_graphs()
        capture_offset[0] = before_off - (model_ours.runner.stats["captures"] if model_ours.runner else 0)
        log(f"graphs == eager: {r['graphs_equal_eager']} (max abs {r['graphs_vs_eager_max_abs']}); eager {r['ours_eager_s']}s")
        r["go_fast_psnr_db"] = psnr(fast_img, exact_img)
        r["go_fast_ssim"] = ssim(fast_img, exact_img)
        r["go_fast_no_cutoff_psnr_db"] = psnr(no_cutoff_img, exact_img)
        r["go_fast_no_cutoff_ssim"] = ssim(no_cutoff_img, exact_img)
        r["other_seed_psnr_db"] = psnr(other_img, exact_img)
        r["other_seed_ssim"] = ssim(other_img, exact_img)
        r["go_fast_psnr_note"] = ("PSNR of the go_fast image against the exact-mode image (same seed, two LoRAs, PNG); "
                                  f"for scale, another seed's exact image scores {psnr(other_img, exact_img)} dB against "
                                  "it. Random weights: the pictures are noise-like, so this says little about how real "
                                  "images change")
        log(f"go_fast {med(xs):.3f}s, PSNR vs exact {r['go_fast_psnr_db']} dB ({r['go_fast_psnr_note']})")
        b.save()

        # The other base model (use_standard_sdxl): its modules move in, Illustrious' move out; then back.
        t_in = ours(use_standard_sdxl=True, steps=4)
        t_back = ours(steps=4)
        r["model_switch_predict_4steps_s"] = [round(t_in, 3), round(t_back, 3)]
        log(f"use_standard_sdxl and back (4-step predictions, moves included): {t_in:.2f}s, {t_back:.2f}s")
        b.save()
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        r["notes"].append(f"go_fast/model-switch section failed: {err!r}")
        log(f"SECTION FAILED: {err!r}")
        ours()  # back to the standard request

    if b.time_left() > 200 or args.tiny:
        xs = series(lambda: ours(n=4), "ours 1024 two LoRAs num_outputs=4", warm=1)
        r["ours_n4_s"] = round(med(xs), 3)
        r["ours_n4_runs"] = [round(x, 3) for x in xs]
    else:
        r["notes"].append("ours num_outputs=4 skipped: time budget")
    w2, h2 = (832, 1216) if not args.tiny else (256, 320)
    xs = series(lambda: ours(width=w2, height=h2), f"ours {w2}x{h2} two LoRAs", warm=1)
    r["ours_832x1216_s"] = round(med(xs), 3)
    r["ours_832x1216_runs"] = [round(x, 3) for x in xs]
    if cuda:
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        r["peak_note"] = ("torch.cuda.max_memory_allocated over setup (Illustrious resident on the GPU, SDXL base "
                          "in CPU memory) and every ours-only run above (1024x1024 and 832x1216 with two LoRAs, "
                          "go_fast, a use_standard_sdxl round trip, num_outputs=4); the stock pipeline was not "
                          "loaded yet")
    r["recompiles_after_warmup"] = dynamo_graphs() - graphs_after_warmup
    r["graph_captures_after_warmup"] = captures() - captures_after_warmup
    r["graph_captures_note"] = ("CUDA graph captures (not compilations: a capture records eager kernels, ~0.1-0.2 s) "
                                "after the warm-up, over every ours-only run above; setup captures the 11 1 MP presets "
                                "at num_outputs 1; num_outputs 4, go_fast and the graphs-off comparison capture on "
                                "first use")
    r["compile_note"] = ("no torch.compile: CUDA graphs of the eager UNet, so there is nothing to recompile (dynamo "
                         f"unique_graphs counter: {dynamo_graphs()} at the end)")
    b.save()

    # ---------------------------------------------------------------- stock diffusers
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    dev = "cuda" if cuda else "cpu"
    sdtype = torch.float16 if cuda else torch.float32
    before_stock = torch.cuda.memory_allocated() if cuda else 0

    def load_stock():
        vae = AutoencoderKL.from_pretrained(weights / "sdxl-vae-fp16-fix", torch_dtype=sdtype)
        pipe = StableDiffusionXLPipeline.from_pretrained(weights / "illustrious-xl", vae=vae, torch_dtype=sdtype,
                                                         add_watermarker=False).to(dev)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        checker = StableDiffusionSafetyChecker.from_pretrained(weights / "safety-checker", torch_dtype=sdtype).to(dev)
        fe = CLIPImageProcessor.from_pretrained(weights / "safety-checker")
        return pipe, checker, fe

    st, (pipe, checker, fe) = timed(load_stock)
    r["stock_setup_s"] = round(st, 2)
    lt, _ = timed(lambda: [pipe.load_lora_weights(str(paths[k]), adapter_name=k) for k in "ab"])
    r["stock_load_two_loras_ms"] = round(lt * 1000, 1)
    timed(lambda: [pipe.load_lora_weights(str(paths[k]), adapter_name=k) for k in "cd"])
    pipe.set_adapters(["a", "b"], adapter_weights=list(SCALES))
    peft_layers = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "a" in m.lora_A)
    r["stock_peft_lora_layers_per_adapter"] = peft_layers
    assert peft_layers == n_layers, f"stock PEFT wrapped {peft_layers} layers, the files have {n_layers}"
    log(f"stock setup {st:.2f}s; load_lora_weights a+b {lt * 1000:.0f} ms; {peft_layers} PEFT layers per adapter")
    b.save()

    def stock(n=1, width=None, height=None):
        def go():
            gen = torch.Generator(dev).manual_seed(SEED)
            images = pipe(prompt=PROMPT, negative_prompt=predict_mod.utils.MODEL_SPECS[key].negative_prompt,
                          width=width or args.size, height=height or args.size, num_inference_steps=args.steps,
                          guidance_scale=6.0, num_images_per_prompt=n, generator=gen).images
            clip_input = fe(images, return_tensors="pt").pixel_values.to(dev, sdtype)
            _, flags = checker(images=[np.asarray(im) for im in images], clip_input=clip_input)
            for i, im in enumerate(images):
                im.save(out_dir / f"stock-{i}.webp", quality=80)
            return flags

        return timed(go)[0]

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stock()  # warm-up
    if cuda:
        r["stock_peak_gib_1024_two_loras"] = round((torch.cuda.max_memory_allocated() - before_stock) / 2**30, 2)
        r["stock_peak_note"] = "max_memory_allocated during a stock run minus what ours held before stock was loaded"

    # Headline: alternate ours / stock run by run (drift hits both alike).
    ours()
    o, s = [], []
    for _ in range(args.runs):
        o.append(ours())
        s.append(stock())
    r["ours_s"] = round(med(o), 3)
    r["stock_s"] = round(med(s), 3)
    r["ours_runs"] = [round(x, 3) for x in o]
    r["stock_runs"] = [round(x, 3) for x in s]
    r["ratio_ours_over_stock"] = round(med(o) / med(s), 3)
    # Issue 18's keys (the same figures under the names it asks for, and what this run could not measure).
    r["exact_1gpu_s"] = r["ours_s"]
    r["fast_s"] = r.get("ours_go_fast_s")
    r["fast_psnr_db"] = r.get("go_fast_psnr_db")
    r["fast_ssim"] = r.get("go_fast_ssim")
    r["gpus"] = torch.cuda.device_count() if cuda else 0
    r["exact_2gpu_s"] = None
    r["num_outputs4_2gpu_s"] = None
    r["two_gpu_note"] = "not built: no two-GPU machine was lent (see bench/NOTES.md, session 7)"
    r["compiled"] = False
    r["compiled_note"] = ("eager kernels under CUDA graphs; AOTInductor packages could not be loaded on the device's "
                          "torch 2.11 (bench/NOTES.md, session 7)")
    log(f"HEADLINE 1024 two LoRAs: ours {med(o):.3f}s {o}  stock {med(s):.3f}s {s}")
    b.save()

    # Per-step diagnostics: one UNet forward (batch 2 = CFG) and one VAE decode, device events, median of 10.
    def unet_step_ms(unet, iters=10):
        dt_ = next(unet.parameters()).dtype
        d_ = next(unet.parameters()).device
        g_ = torch.Generator(d_).manual_seed(0)
        lat = args.size // 8
        ctx = unet.config.cross_attention_dim
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inp = dict(sample=torch.randn(2, 4, lat, lat, generator=g_, device=d_, dtype=dt_),
                   timestep=torch.tensor(500, device=d_),
                   encoder_hidden_states=torch.randn(2, 77, ctx, generator=g_, device=d_, dtype=dt_),
                   added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g_, device=d_, dtype=dt_),
                                      "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * 2,
                                                               device=d_, dtype=dt_)})
        xs_ = []
        with torch.inference_mode():
            unet(**inp)
            for _ in range(iters):
                xs_.append(timed(unet, **inp)[0] * 1000)
        return round(med(xs_), 2)

    def vae_decode_ms(vae, iters=5):
        dt_ = next(vae.parameters()).dtype
        d_ = next(vae.parameters()).device
        z = torch.randn(1, 4, args.size // 8, args.size // 8, device=d_, dtype=dt_)
        xs_ = []
        with torch.inference_mode():
            vae.decode(z)
            for _ in range(iters):
                xs_.append(timed(vae.decode, z)[0] * 1000)
        return round(med(xs_), 2)

    if b.time_left() > 150 or args.tiny:
        ours_pipe = p.models.models[key].txt2img
        r["diag_ours_unet_step_ms"] = unet_step_ms(ours_pipe.unet)
        graphed = model_ours.pipeline("txt2img").unet
        r["diag_ours_graphed_unet_step_ms"] = unet_step_ms(graphed)
        r["diag_ours_vae_decode_ms"] = vae_decode_ms(ours_pipe.vae)
        try:  # group norms: ours (sdxl/groupnorm.py) against PyTorch's own, on the same VAE and, as a what-if, the UNet
            from sdxl import groupnorm
            norms = [m for m in ours_pipe.vae.modules() if isinstance(m, groupnorm.ParallelGroupNorm)]
            z = torch.randn(1, 4, args.size // 8, args.size // 8, device=ours_pipe.vae.device, dtype=ours_pipe.vae.dtype)
            with torch.inference_mode():
                fast_px = ours_pipe.vae.decode(z).sample.float()
                for m in norms:
                    m.native = True
                r["diag_ours_vae_decode_native_norm_ms"] = vae_decode_ms(ours_pipe.vae)
                native_px = ours_pipe.vae.decode(z).sample.float()
                for m in norms:
                    m.native = False
            r["diag_vae_parallel_norm_rel_diff"] = float((fast_px - native_px).norm() / native_px.norm())
            # Is that difference bf16 rounding? Both against the same VAE in float32 (PyTorch's own norms).
            import copy

            vae32 = copy.deepcopy(ours_pipe.vae).float()
            for m in vae32.modules():
                if isinstance(m, groupnorm.ParallelGroupNorm):
                    m.native = True
            with torch.inference_mode():
                ref_px = vae32.decode(z.float()).sample
            del vae32
            r["diag_vae_native_bf16_vs_fp32_rel"] = float((native_px - ref_px).norm() / ref_px.norm())
            r["diag_vae_parallel_bf16_vs_fp32_rel"] = float((fast_px - ref_px).norm() / ref_px.norm())
            r["diag_vae_parallel_norm_max_abs"] = float((fast_px - native_px).abs().max())
            r["diag_vae_parallel_norms"] = len(norms)
            n_unet = groupnorm.parallelize(ours_pipe.unet)
            drop = model_ours.runner.drop if model_ours.runner else (lambda: None)
            drop()
            r["diag_ours_graphed_unet_step_parallel_norm_ms"] = unet_step_ms(model_ours.pipeline("txt2img").unet)
            for m in ours_pipe.unet.modules():
                if isinstance(m, groupnorm.ParallelGroupNorm):
                    m.native = True
            drop()
            r["diag_unet_parallel_norms"] = n_unet
        except Exception as err:  # noqa: BLE001 - a diagnostic
            r["notes"].append(f"group-norm diagnostic failed: {err!r}")
        r["diag_stock_unet_step_peft_ms"] = unet_step_ms(pipe.unet)
        pipe.disable_lora()
        r["diag_stock_unet_step_lora_disabled_ms"] = unet_step_ms(pipe.unet)
        pipe.enable_lora()
        r["diag_stock_vae_decode_ms"] = vae_decode_ms(pipe.vae)
        r["diag_note"] = (f"one UNet forward at {args.size}px batch 2 (one CFG step) and one VAE decode, "
                          "synchronised wall time, median of 10 / 5")
        log("diag " + str({k: v for k, v in r.items() if k.startswith("diag_") and k != "diag_note"}))
        b.save()

    # Stock switch and scale change: set_adapters on adapters already loaded (its cheapest path).
    ssw, ssc = [], []
    for i in range(args.runs):
        ssw.append(timed(pipe.set_adapters, ["c", "d"] if i % 2 == 0 else ["a", "b"], adapter_weights=list(SCALES))[0] * 1000)
    pipe.set_adapters(["a", "b"], adapter_weights=list(SCALES))
    for i in range(args.runs):
        ssc.append(timed(pipe.set_adapters, ["a", "b"], adapter_weights=[SCALES[0] - 0.05 * (i + 1), SCALES[1]])[0] * 1000)
    pipe.set_adapters(["a", "b"], adapter_weights=list(SCALES))
    r["stock_switch_ms"] = round(med(ssw), 2)
    r["stock_scale_change_ms"] = round(med(ssc), 2)
    r["stock_switch_note"] = "set_adapters between adapters already loaded (a fresh pair costs load_lora_weights)"
    b.save()

    if b.time_left() > 120 or args.tiny:
        pipe.disable_lora()
        xs = series(lambda: stock(), "stock 1024 no LoRA (disable_lora)", warm=1)
        r["stock_no_lora_s"] = round(med(xs), 3)
        pipe.enable_lora()
        b.save()
    else:
        r["notes"].append("stock no-LoRA skipped: time budget")
    if b.time_left() > 90 or args.tiny:
        xs = series(lambda: stock(width=w2, height=h2), f"stock {w2}x{h2} two LoRAs", warm=1)
        r["stock_832x1216_s"] = round(med(xs), 3)
        b.save()
    else:
        r["notes"].append("stock 832x1216 skipped: time budget")
    if b.time_left() > 150 or args.tiny:
        xs = series(lambda: stock(n=4), "stock 1024 two LoRAs num_outputs=4", warm=1)
        r["stock_n4_s"] = round(med(xs), 3)
        b.save()
    else:
        r["notes"].append("stock num_outputs=4 skipped: time budget")

    # ---------------------------------------------------------------- second setup in the same process
    if b.time_left() > 40 or args.tiny:
        del pipe, checker, fe
        merger.apply = orig_apply
        del p, merger, orig_apply
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        p2 = predict_mod.Predictor()
        warm_s, _ = timed(p2.setup)
        r["setup_warm_s"] = round(warm_s, 2)
        r["setup_warm_note"] = "second Predictor().setup() in the same process (imports and CUDA context warm)"
        log(f"setup warm {warm_s:.2f}s")
    else:
        r["setup_warm_s"] = None
        r["setup_warm_note"] = "skipped: time budget"
    shutil.rmtree(out_dir, ignore_errors=True)


class PhaseLog(logging.Handler):
    """The predictor's one-line-per-phase log records (with their timings) while it is entered."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self):
        self.loggers = [logging.getLogger(name) for name in ("predict", "utils", "sdxl")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self)
            lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self)
            lg.setLevel(level)


def ssim(a, b_) -> float:
    """Mean SSIM of two RGB images (0-255) on their luma, 7x7 uniform windows (Wang et al. 2004's constants): a
    structural figure beside PSNR; no learned perceptual metric runs here (its weights cannot be downloaded)."""
    import numpy as np

    luma = np.array([0.299, 0.587, 0.114])
    x, y = a @ luma, b_ @ luma
    c1, c2, k = (0.01 * 255) ** 2, (0.03 * 255) ** 2, 7

    def mean(z):
        c = np.cumsum(np.cumsum(np.pad(z, ((1, 0), (1, 0))), 0), 1)
        return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / k ** 2

    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return round(float(value.mean()), 4)


def fmt(x, unit=""):
    return "n/a" if x is None else f"{x}{unit}"


def print_table(r: dict) -> str:
    g = r.get
    ratio = g("ratio_ours_over_stock")
    rows = [
        ("1024², 30 steps, two rank-32 LoRAs (median)", fmt(g("ours_s"), " s"), fmt(g("stock_s"), " s"),
         "<= 0.30x stock; <= 0.75 s (H100)", fmt(ratio, "x")),
        ("1024², no LoRA", fmt(g("ours_no_lora_s"), " s"), fmt(g("stock_no_lora_s"), " s"), "", ""),
        ("832x1216, two LoRAs", fmt(g("ours_832x1216_s"), " s"), fmt(g("stock_832x1216_s"), " s"), "", ""),
        ("1024², num_outputs 4, two LoRAs", fmt(g("ours_n4_s"), " s"), fmt(g("stock_n4_s"), " s"), "", ""),
        ("go_fast (step caching + guidance cutoff), 1024², two LoRAs", fmt(g("ours_go_fast_s"), " s"), "",
         "<= 0.45 s", f"PSNR vs exact {fmt(g('go_fast_psnr_db'), ' dB')}, SSIM {fmt(g('go_fast_ssim'))}"),
        ("go_fast without the guidance cutoff", fmt(g("ours_go_fast_no_cutoff_s"), " s"), "", "",
         f"PSNR vs exact {fmt(g('go_fast_no_cutoff_psnr_db'), ' dB')}, SSIM {fmt(g('go_fast_no_cutoff_ssim'))}; "
         f"another seed: {fmt(g('other_seed_psnr_db'), ' dB')}, SSIM {fmt(g('other_seed_ssim'))}"),
        ("1024², two LoRAs, Euler a through diffusers' own step (blocking noise copy)",
         fmt(g("ours_diffusers_euler_step_s"), " s"), "", "", f"same image as ours: {fmt(g('euler_step_same_image'))}"),
        ("exact, two GPUs / num_outputs 4 on two GPUs", f"{fmt(g('exact_2gpu_s'), ' s')} / "
         f"{fmt(g('num_outputs4_2gpu_s'), ' s')}", "", "<= 0.75 s", fmt(g("two_gpu_note"))),
        ("LoRA switch (cached pair)", fmt(g("switch_ms"), " ms"), fmt(g("stock_switch_ms"), " ms"), "<= 100 ms", ""),
        ("scale change", fmt(g("scale_change_ms"), " ms"), fmt(g("stock_scale_change_ms"), " ms"), "<= 50 ms", ""),
        ("first request, two new LoRAs", fmt(g("ours_first_request_new_loras_s"), " s"),
         fmt(g("stock_load_two_loras_ms"), " ms (load_lora_weights only)"), "", ""),
        ("setup cold / warm", f"{fmt(g('setup_cold_s'), ' s')} / {fmt(g('setup_warm_s'), ' s')}",
         fmt(g("stock_setup_s"), " s (one model)"), "<= 20 s", ""),
        ("peak GPU memory, one 1024² image with two LoRAs", fmt(g("peak_one_image_gib"), " GiB"),
         fmt(g("stock_peak_gib_1024_two_loras"), " GiB"), "<= 16 GiB", ""),
        ("peak GPU memory over all ours-only runs (num_outputs 4 included)", fmt(g("peak_gib"), " GiB"), "", "", ""),
        ("compilations after warm-up", fmt(g("recompiles_after_warmup")), "0 (eager)", "0",
         f"compiled: {fmt(g('compiled'))}; CUDA graphs of eager kernels"),
        ("CUDA graphs: captured in setup / on first requests after it", f"{fmt(g('graphs_captured_in_setup'))} in "
         f"{fmt(g('graph_capture_s_in_setup'), ' s')} / {fmt(g('graph_captures_first_request'))}", "", "",
         f"same image as graphs off: {fmt(g('graphs_equal_eager'))}; graphs off {fmt(g('ours_eager_s'), ' s')}"),
    ]
    lines = [f"card: {g('card')}  date: {g('date')}  torch {g('versions', {}).get('torch')}  diffusers "
             f"{g('versions', {}).get('diffusers')}", "",
             "| figure | ours | stock diffusers + PEFT | target | note |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
