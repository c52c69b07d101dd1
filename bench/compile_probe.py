"""Probe torch.compile on a full-size SDXL UNet and VAE decoder (random weights, GPU only).

Answers, in one process per stage, the questions the predictor's compile design depends on:
  cold   eager vs compiled step time, compile time, recompiles over every aspect-ratio preset x batch, in-place
         weight edits (LoRA merges) seen by the compiled graph without a recompile, VAE decode eager vs compiled;
         saves torch.compiler's cache artifacts.
  warm   a fresh process with an empty inductor cache dir: load the artifacts, compile, time to first output.

    python3 bench/compile_probe.py cold --out $OUT && python3 bench/compile_probe.py warm --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from full_size_weights import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG  # noqa: E402

SIZES = [(1024, 1024), (1344, 768), (1536, 640), (1216, 832), (832, 1216), (896, 1088), (1088, 896), (896, 1152),
         (1152, 896), (768, 1344), (640, 1536), (512, 512), (672, 384)]


def unet_inputs(batch: int, width: int, height: int, tokens: int = 77):
    g = torch.Generator("cuda").manual_seed(batch * 7 + width + height)
    d = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(
        sample=torch.randn(batch, 4, height // 8, width // 8, **d),
        timestep=torch.tensor(500.0, device="cuda"),
        encoder_hidden_states=torch.randn(batch, tokens, 2048, **d),
        added_cond_kwargs=dict(text_embeds=torch.randn(batch, 1280, **d),
                               time_ids=torch.tensor([[height, width, 0, 0, height, width]] * batch,
                                                     device="cuda", dtype=torch.bfloat16)),
    )


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.bfloat16).eval()
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).to(torch.bfloat16).eval()
    for p in list(unet.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)
    return unet, vae


def graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_modules(unet, vae, mode: str | None):
    """Regional compilation: each repeated block class compiles once (per parameter shape), not the whole UNet."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.recompile_limit = 64  # one graph per block parameter shape
    torch._dynamo.config.accumulated_recompile_limit = 4096
    fx_config.use_duck_shape = False  # 1024x1024 must not make height == width a guard
    for model in (unet, vae.decoder):
        for module in model.modules():
            if type(module).__name__ in BLOCKS:
                module.compile(dynamic=True, fullgraph=True, mode=mode)


RESULTS: dict = {}
OUT: Path | None = None


def note(key: str, value) -> None:
    """Record and print at once, so a run cut short still tells how far it got."""
    RESULTS[key] = value
    print(f"{time.strftime('%H:%M:%S')} {key} = {value}", flush=True)
    if OUT is not None:
        (OUT / f"probe_{RESULTS.get('stage', 'x')}.json").write_text(json.dumps(RESULTS, indent=1))


def first_call(fn) -> float:
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def cold(mode: str | None, sweep_budget_s: float) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    note("torch", torch.__version__)
    note("card", torch.cuda.get_device_name())
    t = time.perf_counter()
    unet, vae = build()
    note("build_s", time.perf_counter() - t)
    x = unet_inputs(2, 1024, 1024)
    lat = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        note("eager_step_ms", timed(lambda: unet(**x)))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            note("eager_step_ms_cudnn_attention", timed(lambda: unet(**x)))
        note("eager_vae_ms", timed(lambda: vae.decode(lat), reps=5))
        ref = unet(**x).sample.float()

        compile_modules(unet, vae, mode)
        note("compile_unet_first_call_s", first_call(lambda: unet(**x)))
        note("compile_unet_b1_first_call_s", first_call(lambda: unet(**unet_inputs(1, 1024, 1024))))
        y = unet(**x).sample.float()
        note("compiled_vs_eager_rel", float((y - ref).norm() / ref.norm()))
        note("compile_vae_first_call_s", first_call(lambda: vae.decode(lat)))
        note("compiled_step_ms", timed(lambda: unet(**x)))
        note("compiled_vae_ms", timed(lambda: vae.decode(lat), reps=5))
        note("compile_vae_b4_first_call_s", first_call(lambda: vae.decode(torch.randn(4, 4, 152, 104, device="cuda", dtype=torch.bfloat16))))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            note("compiled_step_ms_cudnn_attention", timed(lambda: unet(**x)))
        g0 = graphs()
        note("graphs_after_warmup", g0)

        # In-place weight edit, as a LoRA merge does: the compiled graph must see it, without recompiling.
        w = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
        keep = w.clone()
        w.add_(torch.randn_like(w) * 0.05)
        y2 = unet(**x).sample.float()
        note("inplace_edit_changes_output", bool((y2 - y).abs().max() > 0))
        w.copy_(keep)
        note("inplace_restore_rel", float((unet(**x).sample.float() - y).norm() / y.norm()))

        # Preset sizes x batch (CFG: 2 x num_outputs; 1 without CFG), then a 2-chunk prompt.
        shapes = []
        t = time.perf_counter()
        for batch in (2, 8, 4, 6, 1):
            for w_, h_ in SIZES:
                if time.perf_counter() - t > sweep_budget_s:
                    break
                before = graphs()
                s0 = time.perf_counter()
                unet(**unet_inputs(batch, w_, h_))
                vae.decode(torch.randn(max(1, batch // 2), 4, h_ // 8, w_ // 8, device="cuda", dtype=torch.bfloat16))
                torch.cuda.synchronize()
                shapes.append((batch, w_, h_, graphs() - before, round(time.perf_counter() - s0, 2)))
        note("shapes", shapes)
        before = graphs()
        unet(**unet_inputs(2, 1024, 1024, tokens=154))
        note("graphs_two_chunk_prompt", graphs() - before)
        note("recompiles_in_sweep", graphs() - g0)
        note("sweep_s", time.perf_counter() - t)
        note("step_ms_832x1216", timed(lambda: unet(**unet_inputs(2, 832, 1216))))
        note("step_ms_b8", timed(lambda: unet(**unet_inputs(8, 1024, 1024)), reps=3))
    note("peak_gib", torch.cuda.max_memory_allocated() / 2**30)
    t = time.perf_counter()
    blob, _info = torch.compiler.save_cache_artifacts()
    (OUT / "artifacts.bin").write_bytes(blob)
    note("artifacts_save_s", time.perf_counter() - t)
    note("artifacts_mib", len(blob) / 2**20)


def warm(mode: str | None, sweep_budget_s: float) -> None:
    t = time.perf_counter()
    torch.compiler.load_cache_artifacts((OUT / "artifacts.bin").read_bytes())
    note("artifacts_load_s", time.perf_counter() - t)
    unet, vae = build()
    compile_modules(unet, vae, mode)
    x = unet_inputs(2, 1024, 1024)
    lat = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        note("warm_unet_first_call_s", first_call(lambda: unet(**x)))
        note("warm_vae_first_call_s", first_call(lambda: vae.decode(lat)))
        note("warm_b1_first_call_s", first_call(lambda: unet(**unet_inputs(1, 1024, 1024))))
        note("warm_step_ms", timed(lambda: unet(**x)))
        before = graphs()
        unet(**unet_inputs(6, 832, 1216))
        note("warm_new_shape_graphs", graphs() - before)


def static(mode: str | None, sweep_budget_s: float) -> None:
    """What dynamic shapes cost: regional compile with static shapes, then the whole UNet static, at 1024² batch 2."""
    unet, vae = build()
    x = unet_inputs(2, 1024, 1024)
    with torch.inference_mode():
        note("eager_step_ms", timed(lambda: unet(**x)))
        for module in unet.modules():
            if type(module).__name__ in BLOCKS:
                module.compile(dynamic=False, fullgraph=True, mode=mode)
        from torch._dynamo import config as dynamo_config

        dynamo_config.recompile_limit = 64
        note("regional_static_first_call_s", first_call(lambda: unet(**x)))
        note("regional_static_step_ms", timed(lambda: unet(**x)))
    unet, vae = build()  # fresh modules: no regional compile inside
    with torch.inference_mode():
        unet.compile(fullgraph=True, mode=mode)
        note("whole_static_first_call_s", first_call(lambda: unet(**x)))
        note("whole_static_step_ms", timed(lambda: unet(**x)))
        note("whole_static_new_shape_graphs_832x1216", (lambda g: (unet(**unet_inputs(2, 832, 1216)), graphs() - g)[1])(graphs()))


KERNEL_GROUPS = (  # (group, name fragments), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("layout copy", ("nchwtonhwc", "nhwctonchw", "transpose", "permute")),
    ("conv", ("conv", "implicit_gemm", "fprop", "dgrad", "xmma_fprop")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
    ("group norm", ("group_norm", "groupnorm", "rowwisemoments", "computefusedparams")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("triton (fused)", ("triton",)),
    ("pointwise / copy", ("elementwise", "vectorized", "copy", "unrolled", "cat", "upsample", "reduce")),
)


def kernel_table(fn, reps: int = 3) -> dict:
    """CUDA time per kernel group and the top kernels, over `reps` calls (ms per call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for e in prof.events():
        if str(getattr(e, "device_type", "")) != "DeviceType.CUDA":
            continue
        dt = e.time_range.elapsed_us()
        name = e.name
        low = name.lower()
        group = next((g for g, frags in KERNEL_GROUPS if any(f in low for f in frags)), "other")
        groups[group] = groups.get(group, 0.0) + dt / 1000 / reps
        kernels[name[:100]] = kernels.get(name[:100], 0.0) + dt / 1000 / reps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"total_ms": round(sum(groups.values()), 2),
            "groups_ms": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_ms": [[k, round(v, 2)] for k, v in top]}


def to_channels_last(inputs: dict) -> dict:
    return {**inputs, "sample": inputs["sample"].contiguous(memory_format=torch.channels_last)}


def kernels(mode: str | None, sweep_budget_s: float) -> None:
    """Where eager time goes, and what costs no compile: channels_last, cuDNN autotuning, SDPA backends, CUDA graphs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    note("torch", torch.__version__)
    note("card", torch.cuda.get_device_name())
    unet, vae = build()
    x = unet_inputs(2, 1024, 1024)
    lat = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = unet(**x).sample.float()
        note("eager_step_ms", timed(lambda: unet(**x)))
        note("eager_step_ms_again", timed(lambda: unet(**x)))
        note("eager_profile", kernel_table(lambda: unet(**x)))
        note("eager_vae_ms", timed(lambda: vae.decode(lat), reps=5))
        note("eager_vae_profile", kernel_table(lambda: vae.decode(lat), reps=2))
        torch.backends.cudnn.benchmark = True
        note("eager_step_ms_cudnn_benchmark", timed(lambda: unet(**x)))
        torch.backends.cudnn.benchmark = False

        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        xc = to_channels_last(x)
        latc = lat.contiguous(memory_format=torch.channels_last)
        y = unet(**xc).sample.float()
        note("cl_vs_nchw_rel", float((y - ref).norm() / ref.norm()))
        note("cl_step_ms", timed(lambda: unet(**xc)))
        note("cl_profile", kernel_table(lambda: unet(**xc)))
        note("cl_vae_ms", timed(lambda: vae.decode(latc), reps=5))
        note("cl_vae_profile", kernel_table(lambda: vae.decode(latc), reps=2))
        torch.backends.cudnn.benchmark = True
        note("cl_step_ms_cudnn_benchmark", timed(lambda: unet(**xc)))
        note("cl_vae_ms_cudnn_benchmark", timed(lambda: vae.decode(latc), reps=5))
        for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    note(f"cl_step_ms_{backend.lower()}", timed(lambda: unet(**xc)))
            except Exception as err:  # noqa: BLE001 - a backend may refuse these shapes
                note(f"cl_step_ms_{backend.lower()}", repr(err)[:200])

        # CUDA graph of the eager forward: what launch overhead costs.
        static_in = {k: v for k, v in xc.items()}
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                unet(**static_in)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        t = time.perf_counter()
        with torch.cuda.graph(graph):
            static_out = unet(**static_in).sample
        torch.cuda.synchronize()
        note("cudagraph_capture_s", time.perf_counter() - t)
        note("cudagraph_replay_ms", timed(graph.replay))
        note("cudagraph_vs_eager_rel", float((static_out.float() - y).norm() / y.norm()))
        del graph, static_out
        torch.cuda.empty_cache()

        # Regional dynamic compile on channels_last modules (the earlier regional probe was NCHW).
        compile_modules(unet, vae, mode)
        note("cl_regional_first_call_s", first_call(lambda: unet(**xc)))
        note("cl_regional_step_ms", timed(lambda: unet(**xc)))
        note("cl_regional_profile", kernel_table(lambda: unet(**xc)))
        note("cl_regional_vae_first_call_s", first_call(lambda: vae.decode(latc)))
        note("cl_regional_vae_ms", timed(lambda: vae.decode(latc), reps=5))
        g0 = graphs()
        unet(**to_channels_last(unet_inputs(2, 832, 1216)))
        unet(**to_channels_last(unet_inputs(8, 1216, 832)))
        note("cl_regional_new_shape_graphs", graphs() - g0)
    note("peak_gib", torch.cuda.max_memory_allocated() / 2**30)


def whole_dynamic(mode: str | None, sweep_budget_s: float) -> None:
    """The whole UNet as one dynamic graph (channels_last): compile time, step time, new shapes."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = 16
    unet, vae = build()
    unet.to(memory_format=torch.channels_last)
    x = to_channels_last(unet_inputs(2, 1024, 1024))
    with torch.inference_mode():
        note("cl_step_ms", timed(lambda: unet(**x)))
        compiled = torch.compile(unet, dynamic=True, fullgraph=True, mode=mode)
        note("whole_dynamic_first_call_s", first_call(lambda: compiled(**x)))
        note("whole_dynamic_step_ms", timed(lambda: compiled(**x)))
        note("whole_dynamic_profile", kernel_table(lambda: compiled(**x)))
        for batch, w_, h_ in ((2, 832, 1216), (8, 1216, 832), (1, 1024, 1024), (4, 1344, 768)):
            g = graphs()
            note(f"whole_dynamic_b{batch}_{w_}x{h_}_first_s",
                 first_call(lambda: compiled(**to_channels_last(unet_inputs(batch, w_, h_)))))
            note(f"whole_dynamic_b{batch}_{w_}x{h_}_graphs", graphs() - g)


def graphed_regional(mode: str | None, sweep_budget_s: float) -> None:
    """Regional dynamic compile (NCHW, as the predictor keeps it) under a CUDA graph: the step a compiled predictor
    would get, against the eager graph the predictor ships (sdxl/graphs.py)."""
    from sdxl import graphs
    from sdxl import groupnorm
    unet, vae = build()
    x = unet_inputs(2, 1024, 1024)
    flat = graphs.graph_inputs(**x)
    with torch.inference_mode():
        ref = unet(**x).sample.float()
        runner = graphs.GraphRunner(graphs.capture_cuda_graph, graphs.cuda_graph_pool)
        step = lambda: runner.run("unet", lambda s: (graphs.unet_call(unet, s).sample,), flat)  # noqa: E731
        note("eager_graph_capture_s", first_call(step))
        note("eager_graph_step_ms", timed(step))
        groupnorm.parallelize(unet)
        runner.drop()
        note("eager_graph_parallel_norm_step_ms", timed(step))
        note("parallel_norm_rel", float((step()[0].float() - ref).norm() / ref.norm()))
        for m in unet.modules():
            if isinstance(m, groupnorm.ParallelGroupNorm):
                m.native = True
        runner.drop()
        compile_modules(unet, vae, mode)
        note("regional_first_call_s", first_call(lambda: unet(**x)))
        runner.drop()
        note("regional_graph_capture_s", first_call(step))
        note("regional_graph_step_ms", timed(step))
        note("regional_graph_rel", float((step()[0].float() - ref).norm() / ref.norm()))
        note("regional_graph_profile", kernel_table(step))
    blob, _info = torch.compiler.save_cache_artifacts()
    note("artifacts_mib", len(blob) / 2**20)


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["cold", "warm", "static", "kernels", "whole_dynamic", "graphed_regional"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default=None)
    parser.add_argument("--sweep-budget", type=float, default=90.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    OUT = args.out
    RESULTS["stage"] = args.stage
    note("inductor_cache_dir", os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    {"cold": cold, "warm": warm, "static": static, "kernels": kernels,
     "whole_dynamic": whole_dynamic, "graphed_regional": graphed_regional}[args.stage](args.mode, args.sweep_budget)


if __name__ == "__main__":
    main()
