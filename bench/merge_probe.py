"""Where a LoRA scale change goes on the full-size model: wall time, GPU kernel time, and the CPU ops behind them.

    python3 bench/merge_probe.py --out $OUT        (GPU; --tiny for a CPU check of the script)

Builds the benchmark's full-size random weights and four rank-32 kohya LoRAs (bench/run_benchmark.py), sets up the
predictor, applies the pair (a, b), then times scale changes of the merger alone and profiles one of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run_benchmark import PROMPT, SCALES, predict_inputs, serve, write_loras  # noqa: E402

RESULTS: dict = {}


def note(out: Path, key: str, value) -> None:
    RESULTS[key] = value
    print(f"{time.strftime('%H:%M:%S')} {key} = {value}", flush=True)
    (out / "merge_probe.json").write_text(json.dumps(RESULTS, indent=1))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="merge-probe-"))
    weights = work / "weights"
    script = "script/tiny_weights.py" if args.tiny else "bench/full_size_weights.py"
    subprocess.run([sys.executable, str(REPO / script), str(weights)], check=True)
    paths, n_layers, _ = write_loras(weights, work / "loras", 32 if not args.tiny else 4, 0.01)
    url = serve(work / "loras")
    os.environ.update(WEIGHTS_DIR=str(weights), LORA_CACHE_DIR=str(work / "cache"), LORA_ALLOW_LOCAL_HOSTS="1")
    import predict

    p = predict.Predictor()
    p.setup()
    merger = p.mergers["illustrious"]
    seen: list = []
    real_apply = merger.apply
    merger.apply = lambda loras: (seen.append(list(loras)), real_apply(loras))[1]
    p.predict(**predict_inputs(predict, prompt=PROMPT, num_inference_steps=1, lora_weights=f"{url}/a.safetensors",
                               lora_scale=SCALES[0], extra_lora=f"{url}/b.safetensors",
                               extra_lora_scale=SCALES[1], output_format="png"))
    pair = seen[-1]
    note(args.out, "layers_per_lora", n_layers)

    def scale_change(i: int) -> float:
        loras = [dataclasses.replace(pair[0], scale=SCALES[0] - 0.01 * (i % 50 + 1)), pair[1]]
        sync()
        t = time.perf_counter()
        real_apply(loras)
        sync()
        return (time.perf_counter() - t) * 1000

    for i in range(3):
        scale_change(i)
    times = [scale_change(i + 3) for i in range(7)]
    note(args.out, "scale_change_ms", [round(x, 1) for x in times])
    note(args.out, "scale_change_median_ms", round(statistics.median(times), 1))

    write_layers = merger._write_layers
    spent: list[float] = []

    last_todo: list = []

    def timed_write_layers(todo):
        sync()
        t = time.perf_counter()
        write_layers(todo)
        sync()
        spent.append((time.perf_counter() - t) * 1000)
        last_todo[:] = todo

    merger._write_layers = timed_write_layers
    scale_change(20)
    scale_change(21)
    note(args.out, "write_layers_ms", [round(x, 1) for x in spent])
    merger._write_layers = write_layers

    # The batched (TF32 where exact) result against the per-layer float32 formula, every 10th layer.
    from sdxl import lora
    torch.set_float32_matmul_precision("highest")
    differing, total, worst = 0, 0, 0.0
    with torch.no_grad():
        for layer_id, contributions in last_todo[::10]:
            weight = merger._param(layer_id)
            acc = merger._kept_base(layer_id, weight).float()
            for scale, spec in contributions:
                up, down = spec.tensors["up"].flatten(1).float(), spec.tensors["down"].flatten(1).float()
                acc.view(acc.shape[0], -1).addmm_(up, down, alpha=scale * lora._alpha_scale(spec.alpha, down.shape[0], spec.rslora))
            ref = acc.to(weight.dtype)
            differing += int((ref != weight).sum())
            total += ref.numel()
            worst = max(worst, float((ref.float() - weight.float()).abs().max()))
    note(args.out, "batched_vs_per_layer", {"layers": len(last_todo[::10]), "elements": total,
                                             "differing": differing, "max_abs": worst,
                                             "half_factors": all(s.half_factors for _, c in last_todo for _, s in c)})

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        scale_change(30)
    kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")) == "DeviceType.CUDA"]
    note(args.out, "gpu_kernels", len(kernels))
    note(args.out, "gpu_kernel_ms", round(sum(e.time_range.elapsed_us() for e in kernels) / 1000, 2))
    by_kernel: dict[str, float] = {}
    for e in kernels:
        by_kernel[e.name[:90]] = by_kernel.get(e.name[:90], 0) + e.time_range.elapsed_us() / 1000
    note(args.out, "top_kernels_ms", sorted(((k, round(v, 2)) for k, v in by_kernel.items()), key=lambda kv: -kv[1])[:8])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    print(table, flush=True)
    (args.out / "merge_probe_cpu.txt").write_text(table)


if __name__ == "__main__":
    main()
