#!/usr/bin/env python3
"""ControlNet and IP-Adapter speed: our predict() against stock diffusers' ControlNet union pipeline, same process.

    python bench/control_bench.py --out DIR            # CUDA: full-size random SDXL + union promax + IP-Adapter Plus
    python bench/control_bench.py --out DIR --tiny     # CPU/offline check of the whole script (tiny model)

Issue 16's figure: 1024², 30 steps, two rank-32 kohya LoRAs (bench/run_benchmark.py's files, served over loopback
through the real LoRA cache), Illustrious preset (Euler a, CFG 6), webp q80, safety checker on.

Ours, each a median of --runs after a warm-up: no control; a canny map given as the map (control_preprocess=false,
strength 1, the whole window); the same photo preprocessed by our canny; an IP-Adapter reference (full, 0.6);
control and reference together.
Stock: StableDiffusionXLControlNetUnionPipeline (fp16) on the same weights and ControlNet, the two LoRAs unfused
(load_lora_weights + set_adapters), control_mode 3 (canny), the same map, scheduler, steps and CFG; then with
load_ip_adapter of the same adapter at scale 0.6. Ours and stock alternate run by run. CUDA graph captures are
counted across the timed runs (0 new captures: every controlled step replayed a graph).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import run_benchmark as RB  # noqa: E402  (sys.path: the repo and test_folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--weights", type=Path, default=None,
                    help="an existing WEIGHTS_DIR with the control components (full_size_weights + full_size_control)")
    args = ap.parse_args()
    if args.tiny:
        args.size, args.steps, args.rank = 256, 4, 4
    args.out.mkdir(parents=True, exist_ok=True)
    r: dict = {"config": dict(size=args.size, steps=args.steps, runs=args.runs, lora_rank=args.rank,
                              scales=RB.SCALES, tiny=args.tiny, guidance=6.0, output="webp q80, safety checker on")}

    def save():
        (args.out / "control_bench.json").write_text(json.dumps(r, indent=2, default=str))

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    cuda = torch.cuda.is_available()
    r["card"] = torch.cuda.get_device_name() if cuda else "cpu"
    r["versions"] = RB.versions()
    work = Path(tempfile.mkdtemp(prefix="control-bench-"))
    weights = args.weights or work / "weights"
    t = time.perf_counter()
    if args.weights:
        pass
    elif args.tiny:
        subprocess.run([sys.executable, str(REPO / "script" / "tiny_weights.py"), str(weights)], check=True)
    else:
        subprocess.run([sys.executable, str(REPO / "bench" / "full_size_weights.py"), str(weights)], check=True)
        subprocess.run([sys.executable, str(REPO / "bench" / "full_size_control.py"), str(weights)], check=True)
    r["weights_build_s"] = round(time.perf_counter() - t, 1)
    paths, _, _ = RB.write_loras(weights, work / "loras", args.rank, 0.1 if args.tiny else 0.01)
    served = RB.serve(work / "loras")  # the LoRAs and the images (image inputs are URLs)
    url = {k: f"{served}/{k}.safetensors" for k in paths}
    os.environ.update(WEIGHTS_DIR=str(weights), LORA_CACHE_DIR=str(work / "lora-cache"), LORA_ALLOW_LOCAL_HOSTS="1",
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    # A photo-like control source (shapes on a gradient), its canny map, and a reference image.
    size = args.size
    rng = np.random.default_rng(0)
    photo = Image.fromarray((np.linspace(40, 220, size)[None, :, None] * np.ones((size, 1, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(photo)
    for _ in range(12):
        x, y = rng.integers(0, size - size // 4, 2)
        draw.ellipse((int(x), int(y), int(x) + size // 5, int(y) + size // 4), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    photo.save(work / "loras" / "photo.png")
    from sdxl import preprocess

    canny = preprocess.canny(photo)
    canny.save(work / "loras" / "canny.png")
    Image.fromarray(rng.integers(0, 255, (512, 512, 3), np.uint8)).save(work / "loras" / "reference.png")

    import predict as predict_mod

    p = predict_mod.Predictor()
    setup_s, _ = RB.timed(p.setup)
    r["setup_s"] = round(setup_s, 2)
    model = p.models.models["illustrious"]

    def captures() -> int:
        return model.runner.stats["captures"] if model.runner else 0

    def peak_reset():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    def ours(**extra) -> float:
        kw = dict(prompt=RB.PROMPT, seed=RB.SEED, num_inference_steps=args.steps, output_format="webp",
                  output_quality=80, disable_safety_checker=False, lora_weights=url["a"], lora_scale=RB.SCALES[0],
                  extra_lora=url["b"], extra_lora_scale=RB.SCALES[1])
        if size != 1024:
            kw.update(aspect_ratio="custom", width=size, height=size)
        kw.update(extra)
        dt, files = RB.timed(p.predict, **RB.predict_inputs(predict_mod, **kw))
        for f in files:
            os.unlink(f)
        return dt

    cases = {
        "plain": {},
        "control": dict(control_image=f"{served}/canny.png", control_type="canny", control_preprocess=False),
        "control_preprocessed": dict(control_image=f"{served}/photo.png", control_type="canny"),
        "reference": dict(reference_image=f"{served}/reference.png", reference_strength=0.6),
        "control_reference": dict(control_image=f"{served}/canny.png", control_type="canny",
                                  control_preprocess=False, reference_image=f"{served}/reference.png",
                                  reference_strength=0.6),
    }
    first: dict = {}
    for name, extra in cases.items():  # first use loads the ControlNet / adapter: timed apart
        first[name] = round(ours(**extra), 3)
        ours(**extra)
    r["ours_first_use_s"] = first
    save()
    before = captures()
    r["ours_s"], r["ours_runs"], r["ours_peak_gib"] = {}, {}, {}
    for name, extra in cases.items():
        peak_reset()
        xs = [ours(**extra) for _ in range(args.runs)]
        r["ours_s"][name], r["ours_runs"][name], r["ours_peak_gib"][name] = round(RB.med(xs), 3), [round(x, 3) for x in xs], peak()
        RB.log(f"ours {name}: {RB.med(xs):.3f}s {xs}")
        save()
    r["graph_captures_during_timed_runs"] = captures() - before
    r["runner_stats"] = dict(model.runner.stats) if model.runner else None

    # Stock diffusers: the ControlNet union pipeline with unfused PEFT LoRAs.
    from diffusers import (AutoencoderKL, ControlNetUnionModel, EulerAncestralDiscreteScheduler,
                           StableDiffusionXLControlNetUnionPipeline)
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from sdxl.control import CONTROLNET_DIR
    from sdxl.reference import ADAPTER_FILE, ADAPTER_SUBFOLDER, ENCODER_FOLDER, REFERENCE_DIR

    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    t = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(weights / "sdxl-vae-fp16-fix", torch_dtype=dtype)
    controlnet = ControlNetUnionModel.from_pretrained(weights / CONTROLNET_DIR, torch_dtype=dtype)
    pipe = StableDiffusionXLControlNetUnionPipeline.from_pretrained(
        weights / "illustrious-xl", vae=vae, controlnet=controlnet, torch_dtype=dtype, add_watermarker=False).to(dev)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for k in "ab":
        pipe.load_lora_weights(str(paths[k]), adapter_name=k)
    pipe.set_adapters(["a", "b"], adapter_weights=list(RB.SCALES))
    checker = StableDiffusionSafetyChecker.from_pretrained(weights / "safety-checker", torch_dtype=dtype).to(dev)
    fe = CLIPImageProcessor.from_pretrained(weights / "safety-checker")
    r["stock_setup_s"] = round(time.perf_counter() - t, 2)
    negative = predict_mod.utils.MODEL_SPECS["illustrious"].negative_prompt
    reference = Image.open(work / "loras" / "reference.png")

    def stock(with_reference: bool) -> float:
        def go():
            gen = torch.Generator(dev).manual_seed(RB.SEED)
            extra = dict(ip_adapter_image=reference) if with_reference else {}
            images = pipe(prompt=RB.PROMPT, negative_prompt=negative, control_image=[canny], control_mode=[3],
                          controlnet_conditioning_scale=1.0, width=size, height=size,
                          num_inference_steps=args.steps, guidance_scale=6.0, generator=gen, **extra).images
            clip_input = fe(images, return_tensors="pt").pixel_values.to(dev, dtype)
            checker(images=[np.asarray(im) for im in images], clip_input=clip_input)
            for i, im in enumerate(images):
                im.save(work / f"stock-{i}.webp", quality=80)

        return RB.timed(go)[0]

    r["stock_s"], r["stock_runs"], r["alternated_ours_runs"] = {}, {}, {}
    for name, with_reference in (("control", False), ("control_reference", True)):
        if with_reference:
            pipe.load_ip_adapter(str(weights / REFERENCE_DIR), subfolder=ADAPTER_SUBFOLDER, weight_name=ADAPTER_FILE,
                                 image_encoder_folder=ENCODER_FOLDER)
            pipe.set_ip_adapter_scale(0.6)
        stock(with_reference)  # warm-up
        o, s = [], []
        for _ in range(args.runs):
            o.append(ours(**cases[name]))
            peak_reset()
            s.append(stock(with_reference))
        r["stock_s"][name], r["stock_runs"][name] = round(RB.med(s), 3), [round(x, 3) for x in s]
        r["alternated_ours_runs"][name] = [round(x, 3) for x in o]
        r.setdefault("stock_peak_gib", {})[name] = peak()
        r.setdefault("ratio_ours_over_stock", {})[name] = round(RB.med(o) / RB.med(s), 3)
        RB.log(f"{name}: ours {RB.med(o):.3f}s {o}  stock {RB.med(s):.3f}s {s}")
        save()
    r["complete"] = True
    save()
    print(json.dumps(r, indent=2, default=str))


if __name__ == "__main__":
    main()
