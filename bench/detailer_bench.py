#!/usr/bin/env python3
"""Time of the face/hand detailer (sdxl/detailer.py) per detected face at 1024², with the boxes injected.

    python bench/detailer_bench.py --tiny [--out DIR]                  # CPU check on the tiny model (256², 4 steps)
    python bench/full_size_weights.py /tmp/fw --device cuda
    python bench/detailer_bench.py --weights /tmp/fw --out $OUT         # the figure: 1024², the preset's 28 steps

Each case is a whole predict() (Illustrious preset: Euler a, 28 steps, CFG 6; the detailer at its default strength
0.4, so 11 denoising steps per face), first once to warm up, then `--repeats` times; the median is reported. The
time per face is (median with n faces - median without the detailer) / n, for n = 1 and 3 boxes of a full-body
shot's face size (about 120 px). Detection is not in it (the boxes are injected; the ONNX detectors run on the CPU,
tens of milliseconds at 640²). Also reported: CUDA graph captures during the timed detailer runs (0 expected: the
crops are repainted at the 1 MP training sizes, each captured once, in the warm-up), peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test_folder"))

# Faces of a full-body 1024² shot (about 120 px each), as fractions of the image side.
FACES = [(0.29, 0.15, 0.41, 0.27), (0.59, 0.2, 0.69, 0.3), (0.44, 0.59, 0.53, 0.68)]


class FixedBoxes:
    def __init__(self, boxes):
        self.boxes = boxes

    def detect(self, image):
        return list(self.boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="WEIGHTS_DIR (e.g. bench/full_size_weights.py's output)")
    parser.add_argument("--tiny", action="store_true", help="build and use the tiny model (CPU check)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from conftest import make_predictor, predict_inputs
    from sdxl import detailer

    work = Path(tempfile.mkdtemp(prefix="detailer-bench-"))
    weights = args.weights
    if args.tiny:
        weights = work / "tiny"
        subprocess.run([sys.executable, str(REPO / "script" / "tiny_weights.py"), str(weights)], check=True,
                       capture_output=True)
    if weights is None:
        parser.error("give --weights DIR or --tiny")
    side, steps = (256, 4) if args.tiny else (1024, None)
    predictor = make_predictor(weights, work / "lora-cache")
    model = predictor.models.models["illustrious"]
    cuda = predictor.models.device.type == "cuda"
    base = dict(aspect_ratio="custom", width=side, height=side, num_inference_steps=steps, output_format="png",
                prompt="1girl, full body, standing, city street", seed=7, disable_safety_checker=True)

    def timed(faces: int) -> float:
        request = dict(base)
        if faces:
            boxes = [detailer.Box(x1 * side, y1 * side, x2 * side, y2 * side, 0.9 - 0.1 * i)
                     for i, (x1, y1, x2, y2) in enumerate(FACES[:faces])]
            predictor.detectors.loaded["face"] = FixedBoxes(boxes)
            request["detailer"] = "face"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        predictor.predict(**predict_inputs(**request))
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                                  "dtype": str(predictor.models.dtype), "size": side,
                                  "steps": steps or model.spec.steps, "detailer_strength": detailer.DEFAULT_STRENGTH}
    medians = {}
    for faces in (0, 1, 3):
        timed(faces)  # warm-up (first-use captures, allocator)
        captures = model.runner.stats["captures"] if model.runner else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = [timed(faces) for _ in range(args.repeats)]
        medians[faces] = statistics.median(runs)
        results[f"{faces}_faces"] = {
            "median_s": round(medians[faces], 4), "runs_s": [round(r, 4) for r in runs],
            "graph_captures_while_timed": (model.runner.stats["captures"] if model.runner else 0) - captures,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
    results["seconds_per_face"] = {n: round((medians[n] - medians[0]) / n, 4) for n in (1, 3)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "detailer_bench.json").write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("LORA_ALLOW_LOCAL_HOSTS", "1")
    main()
