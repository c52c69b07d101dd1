"""Write a diffusers SDXL pipeline folder (+ VAE folder) as ONE single-file checkpoint in the A1111/SGM layout.

Used by tests only: it produces the kind of file that Civitai / the Illustrious XL repo ship, so that the
single-file code paths (script/download_weights, custom checkpoints) can be exercised on tiny weights.

    python test_folder/ldm_checkpoint.py PIPELINE_DIR VAE_DIR OUT.safetensors [--dtype fp16]

The key layout is the inverse of diffusers' own single-file loader (diffusers/loaders/single_file_utils.py:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint), so that `from_single_file(out, config=<diffusers folder>)` gives back the
original tensors bit for bit:

    model.diffusion_model.*                          UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                              VAE (encoder.down.N.block.M, decoder.up.N..., 1x1-conv attention)
    conditioner.embedders.0.transformer.text_model.* CLIP ViT-L text encoder (HF naming)
    conditioner.embedders.1.model.*                  OpenCLIP ViT-bigG text encoder (in_proj q/k/v concatenated)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _resnet_tail(rest: str) -> str:
    module, param = _split_param(rest)
    return f"{_UNET_RESNET.get(module, module)}.{param}"


def convert_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM keys (without the model.diffusion_model. prefix)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("only an integer layers_per_block is supported")
    # Which up blocks have attentions decides where their upsampler sits (.2 after an attention, else .1).
    up_has_attn = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, param = _split_param(key)
        if module in _UNET_FIXED:
            new = f"{_UNET_FIXED[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * (per_block + 1) + j}.0.{_resnet_tail(rest)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * (per_block + 1) + j}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            b = int(m[1])
            new = f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet_tail(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * (per_block + 1) + j}.0.{_resnet_tail(rest)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{b * (per_block + 1) + j}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            b = int(m[1])
            slot = 2 if b in up_has_attn else 1
            new = f"output_blocks.{b * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name known for UNet key {key!r}")
        out[new] = value
    return out


def _vae_resnet_tail(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def convert_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM keys (without the first_stage_model. prefix)."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, param = _split_param(key)
        if module in _VAE_FIXED:
            new = f"{_VAE_FIXED[module]}.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet_tail(m[3])}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet_tail(m[3])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet_tail(m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
            if m[2] not in _VAE_ATTENTION:
                raise KeyError(f"no LDM name known for VAE key {key!r}")
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        else:
            raise KeyError(f"no LDM name known for VAE key {key!r}")
        out[new] = value
    return out


def _with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files saved by transformers >= 5 may lack the `text_model.` prefix that the original files carry."""
    out = {}
    for key, value in state.items():
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = "text_model." + key
        out[key] = value
    return out


def convert_clip_l(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel state dict -> keys under conditioner.embedders.0.transformer. (HF naming kept)."""
    state = _with_text_model_prefix(state)
    return {k: v for k, v in state.items() if k.startswith("text_model.") and not k.endswith("position_ids")}


def convert_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection state dict -> OpenCLIP keys (under conditioner.embedders.1.model.)."""
    state = _with_text_model_prefix(state)
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer_names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ proj; HF uses Linear
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, module, param = int(m[1]), m[2], m[3]
            if q := re.fullmatch(r"self_attn\.([qkv])_proj", module):
                qkv.setdefault((layer, param), {})[q[1]] = value
            elif module in layer_names:
                out[f"transformer.resblocks.{layer}.{layer_names[module]}.{param}"] = value
            else:
                raise KeyError(f"no OpenCLIP name known for text encoder key {key!r}")
        else:
            raise KeyError(f"no OpenCLIP name known for text encoder key {key!r}")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {layer} lacks one of q/k/v {param}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _weights_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {stem}.safetensors in {folder}")


def build_ldm_state_dict(pipeline_dir: Path, vae_dir: Path) -> dict[str, torch.Tensor]:
    pipeline_dir, vae_dir = Path(pipeline_dir), Path(vae_dir)
    unet_config = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((vae_dir / "config.json").read_text())
    unet = load_file(str(_weights_file(pipeline_dir / "unet", "diffusion_pytorch_model")))
    vae = load_file(str(_weights_file(vae_dir, "diffusion_pytorch_model")))
    te1 = load_file(str(_weights_file(pipeline_dir / "text_encoder", "model")))
    te2 = load_file(str(_weights_file(pipeline_dir / "text_encoder_2", "model")))

    result: dict[str, torch.Tensor] = {}
    for prefix, part in (
        (UNET_PREFIX, convert_unet(unet, unet_config)),
        (VAE_PREFIX, convert_vae(vae, vae_config)),
        (CLIP_L_PREFIX, convert_clip_l(te1)),
        (CLIP_G_PREFIX, convert_open_clip(te2)),
    ):
        for key, value in part.items():
            result[prefix + key] = value
    return result


def write_ldm_checkpoint(
    pipeline_dir: Path, vae_dir: Path, out_file: Path, dtype: torch.dtype | None = None
) -> Path:
    """Write pipeline_dir (unet, text_encoder, text_encoder_2) + vae_dir as one A1111-layout .safetensors."""
    state = build_ldm_state_dict(pipeline_dir, vae_dir)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_file), metadata={"format": "pt"})
    return out_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline_dir", type=Path)
    parser.add_argument("vae_dir", type=Path)
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default=None)
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    write_ldm_checkpoint(args.pipeline_dir, args.vae_dir, args.out_file, dtype)
    print(f"wrote {args.out_file}")


if __name__ == "__main__":
    main()
