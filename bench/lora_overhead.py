"""Per-denoising-step cost of two LoRAs: merged by lora.LoraMerger vs none (and vs PEFT unfused adapters).

    .venv/bin/python bench/lora_overhead.py [--weights DIR] [--size 512] [--rounds 15] [--iters 3] [--threads 1]
    python bench/lora_overhead.py --full-size-gpu [--rank 32] [--rounds 20] [--iters 5]   # on a CUDA machine

Times one UNet forward (one denoising step, batch 2 as with classifier-free guidance) on the tiny SDXL model,
interleaving the configurations round by round so that machine noise hits all of them alike, and reports
medians and ratios. Merged LoRAs must cost the same as none (ratio ~1.00): the merge changes weight values only.
For comparison it also loads the same two LoRAs as unfused PEFT adapters through diffusers (the slow path this
module avoids). It also times apply (cold parse, cached swap, scale change) and restore.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "test_folder"))

import lora_fixtures as F

from sdxl import lora
def tiny_weights(explicit: Path | None) -> Path:
    """--weights, else a tiny-weights build in .cache (as the tests make), else build one in a temp dir."""
    if explicit:
        return explicit
    built = sorted((REPO / ".cache").glob("tiny-weights-*/TINY"), key=lambda p: p.stat().st_mtime)
    if built:
        return built[-1].parent
    target = Path(tempfile.mkdtemp(prefix="tiny-weights-"))
    subprocess.run([sys.executable, str(REPO / "script" / "tiny_weights.py"), str(target)], check=True)
    return target


def unet_inputs(pipe, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    latent = size // 8
    text_dim = unet.config.cross_attention_dim
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    return dict(
        sample=torch.randn(2, 4, latent, latent, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, text_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, pooled_dim, generator=g), "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)},
    )


@torch.inference_mode()
def step_ms(unet, inputs: dict, iters: int) -> float:
    unet(**inputs)  # warm
    t = time.perf_counter()
    for _ in range(iters):
        unet(**inputs)
    return (time.perf_counter() - t) / iters * 1000




def full_size_gpu(args: argparse.Namespace) -> None:
    """Real-size SDXL UNet (random fp16 weights) on the GPU: per-step cost and the cost of apply/swap/rescale."""
    import full_size_weights

    import types

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**full_size_weights.SDXL_UNET_CONFIG).to("cuda", torch.float16).eval()
    pipe = types.SimpleNamespace(unet=unet)  # the merger only needs the components it touches
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    fx_a = F.write_diffusers_lora(work / "a.safetensors", pipe, seed=1, rank=args.rank, te=False, lora_alpha=None, std=0.01)
    fx_b = F.write_diffusers_lora(work / "b.safetensors", pipe, seed=2, rank=args.rank, te=False, lora_alpha=None, std=0.01)
    req = lambda fx, s, n: lora.LoraRequest(f"bench:{fx.path.name}", fx.path, s, n)
    two = [req(fx_a, 0.8, "lora_weights (a)"), req(fx_b, 0.6, "extra_lora (b)")]
    merger = lora.LoraMerger(pipe)

    def timed(loras) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        merger.apply(loras)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1000

    cold = timed(two)
    ops: dict[str, list[float]] = {}
    for i in range(5):  # medians of 5: the first calls also warm cuBLAS for each shape
        ops.setdefault("swap 2->1", []).append(timed([two[0]]))
        ops.setdefault("swap 1->2", []).append(timed(two))
        ops.setdefault("scale change", []).append(timed([two[0], req(fx_b, 0.3 + 0.1 * i, "extra_lora (b)")]))
        ops.setdefault("restore to base", []).append(timed([]))
        ops.setdefault("unchanged request", []).append(timed([]))
        ops.setdefault("base -> 2 (cached)", []).append(timed(two))

    g = torch.Generator("cuda").manual_seed(0)
    side = args.size // 8
    inputs = dict(
        sample=torch.randn(2, 4, side, side, generator=g, device="cuda", dtype=torch.float16),
        timestep=torch.tensor(500, device="cuda"),
        encoder_hidden_states=torch.randn(2, 77, 2048, generator=g, device="cuda", dtype=torch.float16),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 1280, generator=g, device="cuda", dtype=torch.float16),
            "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * 2, device="cuda", dtype=torch.float16),
        },
    )

    @torch.inference_mode()
    def gpu_step_ms() -> float:
        unet(**inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            unet(**inputs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters

    base_t, merged_t, ratios = [], [], []
    for _ in range(args.rounds):
        merger.apply([])
        b1 = gpu_step_ms()
        merger.apply(two)
        m1, m2 = gpu_step_ms(), gpu_step_ms()
        merger.apply([])
        b2 = gpu_step_ms()
        base_t += [b1, b2]
        merged_t += [m1, m2]
        ratios.append((m1 + m2) / (b1 + b2))
    med = statistics.median
    layers = len(fx_a.targets)
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} full-size SDXL UNet fp16, {args.size}px batch 2")
    print(f"two rank-{args.rank} LoRAs on all {layers} attention linears each")
    print(f"UNet step, no LoRA:        {med(base_t):8.2f} ms")
    print(f"UNet step, 2 LoRAs merged: {med(merged_t):8.2f} ms")
    q = statistics.quantiles(ratios, n=4)
    print(f"ratio merged / none, median of {len(ratios)} ABBA rounds: {med(ratios):.4f} (IQR {q[0]:.4f}-{q[2]:.4f})")
    print(f"apply cold (read+parse+upload+merge) {cold:.1f} ms; medians of 5: " + "; ".join(
        f"{k} {statistics.median(v):.2f} ms" for k, v in ops.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=3, help="UNet forwards per timing")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: least noise on a shared machine)")
    parser.add_argument("--no-peft", action="store_true", help="skip the unfused PEFT comparison")
    parser.add_argument("--full-size-gpu", action="store_true", help="real-size SDXL UNet with random weights on CUDA")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank for --full-size-gpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.full_size_gpu:
        if args.size == 512:
            args.size = 1024
        full_size_gpu(args)
        return

    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    weights = tiny_weights(args.weights)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        weights / "illustrious-xl", vae=AutoencoderKL.from_pretrained(weights / "sdxl-vae-fp16-fix")
    )
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    # Two UNet LoRAs in diffusers format (PEFT can load them too), rank 16, on every attention linear.
    fx_a = F.write_diffusers_lora(work / "a.safetensors", pipe, seed=1, rank=16, te=False, lora_alpha=None)
    fx_b = F.write_diffusers_lora(work / "b.safetensors", pipe, seed=2, rank=16, te=False, lora_alpha=None)
    req = lambda fx, s, n: lora.LoraRequest(f"bench:{fx.path.name}", fx.path, s, n)
    two = [req(fx_a, 0.8, "lora_weights (a)"), req(fx_b, 0.6, "extra_lora (b)")]
    merger = lora.LoraMerger(pipe)

    t = time.perf_counter(); merger.apply(two); cold = time.perf_counter() - t
    t = time.perf_counter(); merger.apply([two[0]]); swap = time.perf_counter() - t
    t = time.perf_counter(); merger.apply([two[0], lora.LoraRequest(two[1].key, fx_b.path, 0.3, "extra_lora (b)")]); rescale = time.perf_counter() - t
    t = time.perf_counter(); merger.apply([]); restore = time.perf_counter() - t
    t = time.perf_counter(); merger.apply(two); merger.apply([]); warm_cycle = time.perf_counter() - t

    inputs = unet_inputs(pipe, args.size)
    # ABBA rounds (none, merged, merged, none): a drift in machine load cancels within each round, and the
    # per-round ratio pairs measurements taken seconds apart.
    base_t, merged_t, ratios = [], [], []
    for _ in range(args.rounds):
        merger.apply([])
        b1 = step_ms(pipe.unet, inputs, args.iters)
        merger.apply(two)
        m1 = step_ms(pipe.unet, inputs, args.iters)
        m2 = step_ms(pipe.unet, inputs, args.iters)
        merger.apply([])
        b2 = step_ms(pipe.unet, inputs, args.iters)
        base_t += [b1, b2]
        merged_t += [m1, m2]
        ratios.append((m1 + m2) / (b1 + b2))
    merger.apply([])

    peft_t: list[float] = []
    peft_note = ""
    if not args.no_peft:
        try:
            pipe.load_lora_weights(str(fx_a.path), adapter_name="a")
            pipe.load_lora_weights(str(fx_b.path), adapter_name="b")
            pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.6])
            for _ in range(args.rounds):
                peft_t.append(step_ms(pipe.unet, inputs, args.iters))
            pipe.unload_lora_weights()
        except Exception as exc:  # PEFT is only a comparison; the merged figure stands without it
            peft_note = f"PEFT comparison skipped: {type(exc).__name__}: {exc}"

    med = statistics.median
    print(f"device=cpu threads={args.threads} torch={torch.__version__} size={args.size}px batch=2 rounds={args.rounds}x{args.iters}")
    print(f"UNet step, no LoRA:            {med(base_t):8.2f} ms (min {min(base_t):.2f})")
    print(f"UNet step, 2 LoRAs merged:     {med(merged_t):8.2f} ms (min {min(merged_t):.2f})")
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"ratio merged / none, median of {len(ratios)} ABBA rounds: {med(ratios):.3f} (IQR {q[0]:.3f}-{q[2]:.3f}); min/min {min(merged_t) / min(base_t):.3f}")
    if peft_t:
        print(f"UNet step, 2 PEFT unfused:     {med(peft_t):8.2f} ms  ratio {med(peft_t) / med(base_t):.3f}")
    if peft_note:
        print(peft_note)
    print(
        f"apply 2 LoRAs cold (parse+merge) {cold * 1000:.1f} ms; swap to 1 (cached) {swap * 1000:.1f} ms; "
        f"scale change {rescale * 1000:.1f} ms; restore {restore * 1000:.1f} ms; warm apply+restore {warm_cycle * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
