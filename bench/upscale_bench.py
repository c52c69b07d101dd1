#!/usr/bin/env python3
"""Issue 17 measurements: the ESRGAN upscale time at 1024² -> 2048², and the peak GPU memory of a 2x hires fix of a
1024² image with the tiled VAE (and of the VAE alone, tiled against untiled).

    python bench/upscale_bench.py --tiny --out /tmp/up.json                       # CPU smoke run, tiny model
    python bench/full_size_weights.py /tmp/full --device cuda                       # on the GPU machine
    python bench/upscale_bench.py --weights /tmp/full --out bench/results/upscale_h200.json

Full size (no --tiny): RealESRGAN_x4plus_anime_6B's architecture (RRDBNet, 64 features, 6 blocks, random weights
in the real key layout, fp16) upscales a 1024² image to 4096² in 512 px tiles, then Lanczos to 2048²; the SDXL VAE
(random weights of the real shapes, from --weights' sdxl-vae-fp16-fix) decodes and encodes 2048² untiled and
tiled; with --weights, a whole prediction (1024², 2x hires, esrgan) runs through predict() and reports its peak.
--tiny runs the same steps on the tiny weights at 256² -> 512² (tiling forced), to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "script"))
sys.path.insert(0, str(REPO / "test_folder"))

import tiny_weights as T  # noqa: E402
import utils  # noqa: E402
from sdxl import tiled_vae, upscale  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds of `repeats` runs after one warm-up, peak GiB of the last run)."""
    fn()
    times = []
    for _ in range(repeats):
        peak_reset(device)
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), peak_gib(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny weights and sizes (a CPU check of the script)")
    parser.add_argument("--weights", type=Path, help="WEIGHTS_DIR (full size: bench/full_size_weights.py)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    work = Path(tempfile.mkdtemp(prefix="upscale-bench-"))
    weights_dir = args.weights
    if args.tiny and weights_dir is None:
        weights_dir = T.write_tiny_weights(work / "tiny")
    base = 256 if args.tiny else 1024
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "tiny": args.tiny, "base": base, "hires": 2 * base}

    # --- ESRGAN: base² -> 4x in tiles -> Lanczos to 2x
    if args.tiny:
        path = weights_dir / upscale.UPSCALER_DIR / upscale.ESRGAN_FILE
    else:
        from safetensors.torch import save_file

        path = work / upscale.ESRGAN_FILE
        save_file(T.esrgan_state(seed=1, num_feat=64, num_block=6), str(path))  # the anime 6B's shapes
    model = upscale.load_upscaler(path, device, title=upscale.ESRGAN_TITLE, key="bench")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (base, base, 3), np.uint8))
    seconds, peak = timed(lambda: upscale.upscale_to(model, [image], (2 * base, 2 * base)), device, args.repeats)
    results["esrgan_upscale"] = {"seconds": seconds, "peak_gib": peak, "tiles": upscale.count_tiles(model, (base, base)),
                                 "dtype": str(next(model.model.model.parameters()).dtype)}
    print(f"ESRGAN {base}² -> {2 * base}²: {seconds:.3f}s (peak {peak} GiB)", flush=True)
    del model

    # --- the VAE at the hires size: untiled and tiled decode / encode
    if weights_dir is not None:
        from diffusers import AutoencoderKL

        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        vae = utils.fast_vae(AutoencoderKL.from_pretrained(weights_dir / utils.VAE_DIR, torch_dtype=dtype)
                             .to(device).eval(), device)
        side = 2 * base
        tile = tiled_vae.TILE if not args.tiny else 16
        z = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype)
        x = torch.rand(1, 3, side, side, device=device, dtype=dtype) * 2 - 1
        with torch.inference_mode():
            for name, fn in (
                ("decode_untiled", lambda: vae.decode(z).sample),
                ("decode_tiled", lambda: tiled_vae.tiled_decode(vae, z, tile=tile)),
                ("encode_untiled", lambda: vae.encode(x).latent_dist.mean),
                ("encode_tiled", lambda: tiled_vae.tiled_encode_moments(vae, x, tile=tile)),
            ):
                try:
                    seconds, peak = timed(fn, device, args.repeats)
                    results[f"vae_{name}"] = {"seconds": seconds, "peak_gib": peak}
                except torch.cuda.OutOfMemoryError as err:
                    results[f"vae_{name}"] = {"error": f"out of memory: {str(err)[:200]}"}
                print(f"VAE {name} {side}²: {results[f'vae_{name}']}", flush=True)
        del vae

    # --- a whole prediction: base² txt2img, hires 2x with esrgan (tiled VAE above TILE_ABOVE_PIXELS)
    if weights_dir is not None:
        from conftest import make_predictor, predict_inputs

        if args.tiny:
            tiled_vae.TILE_ABOVE_PIXELS, tiled_vae.TILE = base * base, 16
        if not (weights_dir / upscale.UPSCALER_DIR / upscale.ESRGAN_FILE).exists():
            (weights_dir / upscale.UPSCALER_DIR).mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save_file

            save_file(T.esrgan_state(seed=1, num_feat=64, num_block=6),
                      str(weights_dir / upscale.UPSCALER_DIR / upscale.ESRGAN_FILE))
        predictor = make_predictor(weights_dir, work / "lora-cache")
        inputs = predict_inputs(prompt="1girl, red hat", seed=1, aspect_ratio="custom", width=base, height=base,
                                num_inference_steps=4 if args.tiny else 20, hires_scale=2.0, hires_upscaler="esrgan",
                                hires_strength=0.5, output_format="png", disable_safety_checker=True)
        seconds, peak = timed(lambda: predictor.predict(**inputs), device, 1 if args.tiny else args.repeats)
        results["hires_2x_prediction"] = {"seconds": seconds, "peak_gib": peak,
                                          "tiled_vae": tiled_vae.should_tile(
                                              predictor.models.models["illustrious"].txt2img.vae,
                                              (2 * base, 2 * base), device)}
        print(f"prediction {base}² + hires 2x esrgan: {results['hires_2x_prediction']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
