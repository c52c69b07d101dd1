#!/usr/bin/env python3
"""Write a FULL-SIZE SDXL-architecture model with random fp16 weights in the WEIGHTS_DIR layout (no download).

    python bench/full_size_weights.py DIR [--device cuda]

Same arithmetic as the real weights (same shapes, dtype and layer count), random values from fixed seeds:

    DIR/illustrious-xl/      SDXL UNet (320/640/1280, transformer layers 1/2/10, heads 5/10/20 dims, cross-attn 2048,
                             text-time conditioning 256/2816, linear projections), CLIP-L (768, 12 layers), CLIP-G
                             (1280, 32 layers, projection 1280), vocab 49408, a small generated BPE tokenizer (token
                             ids only index the embeddings), Euler scheduler config as SDXL's
    DIR/sdxl-base/           a symbolic link to illustrious-xl (the predictor loads both; same architecture)
    DIR/sdxl-vae-fp16-fix/   SDXL VAE (128/256/512/512, force_upcast False)
    DIR/safety-checker/      the tiny safety checker of script/tiny_weights.py (the real one is a CLIP ViT-L/14)

The tokenizers, scheduler, model_index.json and safety checker come from script/tiny_weights.py, so the layout is
exactly the one the tests use; only the sizes differ. Modules are initialised on `--device` (CUDA: seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "script"))

import tiny_weights as T  # noqa: E402
from utils import MODEL_DIRS, SAFETY_DIR, VAE_DIR  # noqa: E402

SDXL_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (architecture fields)
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

SDXL_VAE_CONFIG = dict(  # madebyollin/sdxl-vae-fp16-fix config.json
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=False,
)


def build_pipeline_folder(folder: Path, device: str, seed: int = 100) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab_size = T.write_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    T.write_tokenizer(folder / "tokenizer_2", pad_token="!")
    bos, eos = vocab_size - 2, vocab_size - 1
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    with torch.device(device):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, projection_dim=768, **common))
        te1.half().save_pretrained(folder / "text_encoder")
        del te1
        torch.manual_seed(seed + 1)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         projection_dim=1280, **common))
        te2.half().save_pretrained(folder / "text_encoder_2")
        del te2
        for sub in ("text_encoder", "text_encoder_2"):
            T._with_text_model_prefix(folder / sub / "model.safetensors")
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        unet.half().save_pretrained(folder / "unet")
        del unet
    T.write_scheduler_and_index(folder)


def build_vae(folder: Path, device: str, seed: int = 7) -> None:
    from diffusers import AutoencoderKL

    with torch.device(device):
        torch.manual_seed(seed)
        AutoencoderKL(**SDXL_VAE_CONFIG).half().save_pretrained(folder)


def write_full_size_weights(root: Path, device: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    first = root / MODEL_DIRS["illustrious"]
    build_pipeline_folder(first, device)
    second = root / MODEL_DIRS["sdxl"]
    if not second.exists():
        second.symlink_to(first.name)
    build_vae(root / VAE_DIR, device)
    T.build_safety_checker(root / SAFETY_DIR, seed=11)
    (root / "FULL_SIZE").write_text("random full-size SDXL-architecture weights written by bench/full_size_weights.py\n")
    if device == "cuda":
        torch.cuda.empty_cache()
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    t = time.perf_counter()
    write_full_size_weights(args.dir, args.device)
    print(f"full-size SDXL weights written to {args.dir} in {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
