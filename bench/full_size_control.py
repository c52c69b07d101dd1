#!/usr/bin/env python3
"""Add FULL-SIZE random control components to a WEIGHTS_DIR written by bench/full_size_weights.py (no download).

    python bench/full_size_control.py DIR [--device cuda]

Same shapes as the baked models, random values from fixed seeds, in the layout script/download_weights writes:

    DIR/controlnet-union-promax/  xinsir's union promax: the SDXL UNet's encoder half (320/640/1280, transformer
                                  layers 1/2/10, cross-attn 2048, text-time 256/2816), conditioning encoder
                                  16/32/96/256 (xinsir's config_promax.json), 8 control types, one transformer layer
                                  of 320 channels over the task features
    DIR/ip-adapter/               h94's ip-adapter-plus_sdxl_vit-h: a Plus resampler (1280 -> 2048, 16 queries, 4
                                  layers, 20 heads of 64) with to_k_ip / to_v_ip for each of the 70 cross-attention
                                  processors, and the OpenCLIP ViT-H/14 vision encoder (1280 wide, 32 layers, 16 heads,
                                  224 px, projection 1024: h94's models/image_encoder/config.json, docs/components.md)

The depth model is not written: benchmarks pass maps that need no model (canny) or control_preprocess=false.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "script"))

from sdxl.control import CONTROLNET_DIR  # noqa: E402
from sdxl.reference import ADAPTER_FILE, ADAPTER_SUBFOLDER, ENCODER_FOLDER, REFERENCE_DIR  # noqa: E402
from utils import MODEL_DIRS  # noqa: E402

VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, patch_size=14,
             image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-05)


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    # Zero convolutions start at zero; random values everywhere keep every matmul's cost and make the control act.
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * std)


def build_controlnet(folder: Path, unet_config: dict, device: str, seed: int = 13) -> None:
    from diffusers import ControlNetUnionModel

    copied = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
              "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
              "norm_num_groups", "upcast_attention")
    with torch.device(device):
        model = ControlNetUnionModel(**{k: unet_config[k] for k in copied if k in unet_config},
                                     conditioning_embedding_out_channels=(16, 32, 96, 256), num_control_type=8)
    _randomise(model, seed)
    model.to(torch.float16).save_pretrained(folder)


def build_ip_adapter(root: Path, unet_folder: Path, device: str, seed: int = 19) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    import tiny_weights as T

    with torch.device(device):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
    _randomise(encoder, seed)
    encoder.to(torch.float16).save_pretrained(root / ENCODER_FOLDER)
    config = json.loads((unet_folder / "config.json").read_text())
    cross = config["cross_attention_dim"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    with torch.device(device):
        resampler = IPAdapterPlusImageProjection(embed_dims=VIT_H["hidden_size"], output_dims=cross, hidden_dims=1280,
                                                 depth=4, dim_head=64, heads=20, num_queries=16, ffn_ratio=4)
    _randomise(resampler, seed + 1)
    tensors = {f"image_proj.{k}": v for k, v in T._original_resampler_keys(resampler.state_dict()).items()}
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for j, name in enumerate(names):
        hidden = unet.get_submodule(name.rsplit(".processor", 1)[0]).to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{1 + 2 * j}.{kind}.weight"] = torch.randn(hidden, cross, generator=gen,
                                                                            device=device) * 0.02
    (root / ADAPTER_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous().cpu() for k, v in tensors.items()},
              str(root / ADAPTER_SUBFOLDER / ADAPTER_FILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="a WEIGHTS_DIR written by bench/full_size_weights.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    unet_folder = args.dir / MODEL_DIRS["illustrious"] / "unet"
    t = time.perf_counter()
    build_controlnet(args.dir / CONTROLNET_DIR, json.loads((unet_folder / "config.json").read_text()), args.device)
    build_ip_adapter(args.dir / REFERENCE_DIR, unet_folder, args.device)
    print(f"full-size control components written to {args.dir} in {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
