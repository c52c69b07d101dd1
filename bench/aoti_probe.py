#!/usr/bin/env python3
"""Probe (issue 18): an AOTInductor-compiled SDXL UNet shipped as a package, bound to live weights (GPU only).

The question the compiled exact path depends on: can a static-shape compiled UNet be built ahead (before
`cog push`), loaded in a fresh process in seconds, run on the predictor's own weight tensors (so that LoRA merges,
which write the weights in place, reach it with no recompile), and replay under our CUDA graphs?

    python3 bench/aoti_probe.py build --out $OUT      # export + compile one shape (1024², batch 2), package it
    python3 bench/aoti_probe.py load --out $OUT       # fresh process: load, bind, compare, time, edit a weight

Full-size random bf16 UNet (bench/full_size_weights.py's config, the same seed in both stages: same weights).
Results are written to $OUT/aoti_probe.json after every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compile_probe import timed  # noqa: E402
from full_size_weights import SDXL_UNET_CONFIG  # noqa: E402

T0 = time.perf_counter()
PACKAGE = Path("/tmp/aoti-probe/unet_1024_b2.pt2")  # not under $OUT: the device would send it back
DEVICE = "cuda"
CONFIG = dict(SDXL_UNET_CONFIG)
SIZE = 1024


def use_tiny() -> None:
    """CPU check of the probe itself: a tiny UNet of the same layout at 256²."""
    global DEVICE, CONFIG, SIZE
    DEVICE, SIZE = "cpu", 256
    CONFIG.update(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
                  cross_attention_dim=2048, norm_num_groups=8)


class FlatUNet(torch.nn.Module):
    """The UNet call on flat tensors (what graphs.graph_inputs hands a graph)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]


def build_unet() -> FlatUNet:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(DEVICE):
        unet = UNet2DConditionModel(**CONFIG)
    return FlatUNet(unet.to(torch.bfloat16).eval())


def inputs(seed: int, batch: int = 2, size: int | None = None) -> tuple:
    size = size or SIZE
    g = torch.Generator(DEVICE).manual_seed(seed)
    d = dict(device=DEVICE, dtype=torch.bfloat16, generator=g)
    return (torch.randn(batch, 4, size // 8, size // 8, **d), torch.tensor(500.0 + seed, device=DEVICE),
            torch.randn(batch, 77, 2048, **d), torch.randn(batch, 1280, **d),
            torch.tensor([[size, size, 0, 0, size, size]] * batch, device=DEVICE, dtype=torch.bfloat16))


def med_ms(fn, reps: int = 10) -> float:
    """Median CUDA-event milliseconds of `reps` calls after a warm-up (compile_probe's timing)."""
    return round(timed(fn, reps), 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Results:
    def __init__(self, out: Path, stage: str) -> None:
        self.path = out / "aoti_probe.json"
        self.r = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.stage = self.r.setdefault(stage, {})

    def note(self, key: str, value) -> None:
        self.stage[key] = value
        self.stage["elapsed_s"] = round(time.perf_counter() - T0, 1)
        self.path.write_text(json.dumps(self.r, indent=2, default=str))
        print(f"[{time.perf_counter() - T0:7.1f}s] {key}: {value}", flush=True)


def build(out: Path) -> None:
    res = Results(out, "build")
    res.note("torch", torch.__version__)
    res.note("card", torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    model = build_unet()
    example = inputs(1)
    with torch.no_grad():
        t = time.perf_counter()
        program = torch.export.export(model, example, strict=False)
        res.note("export_s", round(time.perf_counter() - t, 1))
        t = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(PACKAGE),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
        res.note("compile_s", round(time.perf_counter() - t, 1))
    res.note("package_mib", round(Path(path).stat().st_size / 2**20, 1))


def load(out: Path) -> None:
    res = Results(out, "load")
    from sdxl.graphs import capture_cuda_graph, cuda_graph_pool

    t = time.perf_counter()
    runner = torch._inductor.aoti_load_package(str(PACKAGE))
    res.note("load_package_s", round(time.perf_counter() - t, 2))
    model = build_unet()
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    fqns = runner.get_constant_fqns()
    res.note("constants", len(fqns))
    missing = [k for k in fqns if k not in weights]
    res.note("constants_missing", missing[:5])
    t = time.perf_counter()
    runner.load_constants({k: weights[k] for k in fqns}, check_full_update=True, user_managed=True)
    res.note("bind_weights_s", round(time.perf_counter() - t, 3))
    x = inputs(2)
    with torch.no_grad():
        t = time.perf_counter()
        got = runner(*x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        res.note("first_call_s", round(time.perf_counter() - t, 2))
        want = model(*x)
        res.note("rel_err_vs_eager", rel(got, want))
        if DEVICE != "cuda":
            return
        res.note("eager_ms", med_ms(lambda: model(*x)))
        res.note("aoti_ms", med_ms(lambda: runner(*x)))
        static = {f"x{i}": v.clone() for i, v in enumerate(x)}
        for name, fn in (("eager", lambda s: (model(*s.values()),)), ("aoti", lambda s: (runner(*s.values()),))):
            replay, outputs = capture_cuda_graph(fn, static, cuda_graph_pool())
            res.note(f"{name}_graphed_ms", med_ms(replay))
            if name == "aoti":
                replay()
                res.note("aoti_graphed_rel_err_vs_eager", rel(outputs[0], want))
                aoti_replay, aoti_out = replay, outputs
        # A LoRA merge writes weights in place: the bound package and its graph must see it, with no reload.
        weight = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_q.weight
        kept = weight.detach().clone()
        weight.data.add_(torch.randn_like(weight) * 0.05)
        want_edited = model(*x)
        aoti_replay()
        res.note("edit_changes_eager", rel(want_edited, want))
        res.note("graphed_aoti_after_edit_rel_err", rel(aoti_out[0], want_edited))
        weight.data.copy_(kept)
        aoti_replay()
        res.note("graphed_aoti_after_restore_rel_err", rel(aoti_out[0], want))
        # Another shape: a package is one static shape; the predictor must fall back to its eager graphs.
        try:
            runner(*inputs(3, size=832))
            res.note("other_shape", "ran")
        except Exception as exc:  # noqa: BLE001 - the probe records what happens
            res.note("other_shape", f"{type(exc).__name__}: {str(exc)[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("build", "load"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU check of the probe on a tiny UNet")
    args = ap.parse_args()
    if args.tiny:
        use_tiny()
    PACKAGE.parent.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    {"build": build, "load": load}[args.stage](args.out)


if __name__ == "__main__":
    main()
