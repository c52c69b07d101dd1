#!/usr/bin/env python3
"""Probe (issue 18): which way of packaging and loading an AOTInductor UNet loads on this GPU's torch.

Session 6's `aoti_probe.py load` segfaulted on an H200 (torch 2.11.0+cu130) inside `aoti_load_package` of a
package built with `package_constants_in_so=False`; the same code works on the CPU with torch 2.13. This runs each
variant on a tiny UNet of SDXL's layout (compiles in seconds), build and load each in its own process under
faulthandler, so one crash does not hide the others, and records exit codes, the crash's stack and the figures.

    python3 bench/aoti_variants.py --out $OUT            # every variant
    python3 bench/aoti_variants.py --out $OUT --full so_true   # one variant on the full-size UNet (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path("/tmp/aoti-variants")

# name: (inductor configs at build, how the load stage binds the weights)
VARIANTS = {
    "so_false": ({"aot_inductor.package_constants_in_so": False}, "bind"),
    "so_true": ({}, "packaged_then_bind"),
    "so_false_single": ({"aot_inductor.package_constants_in_so": False}, "bind_single_threaded"),
}


def child(stage: str, variant: str, full: bool, out: Path) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import aoti_probe as probe

    probe.DEVICE = "cuda"
    if not full:
        probe.use_tiny()
        probe.DEVICE = "cuda"
    package = WORK / f"{variant}{'-full' if full else ''}.pt2"
    record: dict = {"torch": torch.__version__}
    result_path = out / f"{variant}{'-full' if full else ''}-{stage}.json"

    def note(key, value):
        record[key] = value
        result_path.write_text(json.dumps(record, indent=2, default=str))
        print(f"{stage} {variant}: {key} = {value}", flush=True)

    configs, bind = VARIANTS[variant]
    model = probe.build_unet()
    if stage == "build":
        note("aot_inductor_constant_options", sorted(
            k for k in dir(torch._inductor.config.aot_inductor) if "const" in k or "disk" in k or "package" in k))
        example = probe.inputs(1)
        with torch.no_grad():
            t = time.perf_counter()
            program = torch.export.export(model, example, strict=False)
            note("export_s", round(time.perf_counter() - t, 1))
            t = time.perf_counter()
            torch._inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs=configs)
            note("compile_s", round(time.perf_counter() - t, 1))
        note("package_mib", round(package.stat().st_size / 2**20, 2))
        return

    from sdxl.graphs import capture_cuda_graph, cuda_graph_pool

    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    t = time.perf_counter()
    kwargs = {"run_single_threaded": True} if bind == "bind_single_threaded" else {}
    note("loading", str(kwargs))
    runner = torch._inductor.aoti_load_package(str(package), **kwargs)
    note("load_package_s", round(time.perf_counter() - t, 3))
    x = probe.inputs(2)
    with torch.no_grad():
        want = model(*x)
        if bind == "packaged_then_bind":
            got = runner(*x)
            torch.cuda.synchronize()
            note("packaged_rel_err", probe.rel(got, want))
        fqns = runner.get_constant_fqns()
        note("constants", len(fqns))
        note("constants_missing", [k for k in fqns if k not in weights][:5])
        t = time.perf_counter()
        runner.load_constants({k: weights[k] for k in fqns}, check_full_update=True, user_managed=True)
        note("bind_s", round(time.perf_counter() - t, 4))
        got = runner(*x)
        torch.cuda.synchronize()
        note("bound_rel_err", probe.rel(got, want))
        static = {f"x{i}": v.clone() for i, v in enumerate(x)}
        replay, outputs = capture_cuda_graph(lambda s: (runner(*s.values()),), static, cuda_graph_pool())
        replay()
        torch.cuda.synchronize()
        note("graphed_rel_err", probe.rel(outputs[0], want))
        weight = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_q.weight
        kept = weight.detach().clone()
        weight.data.add_(torch.randn_like(weight) * 0.05)
        edited = model(*x)
        replay()
        torch.cuda.synchronize()
        note("edit_changes_eager", probe.rel(edited, want))
        note("graphed_after_edit_rel_err", probe.rel(outputs[0], edited))
        weight.data.copy_(kept)
        if full:
            note("eager_ms", probe.med_ms(lambda: model(*x)))
            eager_replay, _ = capture_cuda_graph(lambda s: (model(*s.values()),), static, cuda_graph_pool())
            note("eager_graphed_ms", probe.med_ms(eager_replay))
            note("aoti_graphed_ms", probe.med_ms(replay))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--full", metavar="VARIANT", help="build and load this variant on the full-size UNet")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--then-full", action="store_true", help="after the tiny variants, the first that worked, full size")
    ap.add_argument("--full-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(*args.child, full=args.full_child, out=args.out)
        return
    summary: dict = {}
    deadline = time.perf_counter() + 575
    ok = run_variants([args.full] if args.full else list(VARIANTS), bool(args.full), args.out, summary, deadline)
    if args.then_full and ok:
        run_variants([ok[0]], True, args.out, summary, deadline)
    (args.out / "aoti_variants.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def run_variants(variants: list[str], full: bool, out: Path, summary: dict, deadline: float) -> list[str]:
    """Build and load each variant in child processes; the names of those that loaded and ran."""
    worked = []
    for variant in variants:
        for stage in ("build", "load"):
            cmd = [sys.executable, "-X", "faulthandler", __file__, "--out", str(out), "--child", stage, variant]
            if full:
                cmd.append("--full-child")
            t = time.perf_counter()
            name = f"{variant}{'-full' if full else ''}/{stage}"
            log = out / (name.replace("/", "-") + ".log")
            with open(log, "w") as fh:
                try:
                    rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                        timeout=max(1.0, deadline - time.perf_counter()),
                                        env={**os.environ, "PYTHONFAULTHANDLER": "1"}).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            summary[name] = {"rc": rc, "s": round(time.perf_counter() - t, 1)}
            print(f"== {name}: rc {rc} in {summary[name]['s']} s", flush=True)
            if rc != 0:
                print(log.read_text()[-2500:], flush=True)
                break
        else:
            worked.append(variant)
    return worked


if __name__ == "__main__":
    main()
