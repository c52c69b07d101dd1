"""Writers of synthetic LoRA files in every format sdxl/lora.py accepts (and some it must refuse), for a given pipeline.

Every writer derives its target layers from the live modules of `pipe` (the tiny SDXL pipeline in tests, but any
SDXL-shaped pipeline works), draws random factors from a fixed seed with magnitudes large enough to change the
image, writes a .safetensors file with safetensors only, and returns a `LoraFixture`: the path plus a manifest
`targets` mapping each layer prefix *as written in the file* to the (component, module name) it must modify.
Tests compute the expected merged weights from the file's own tensors and that manifest, independently of sdxl/lora.py.

The kohya SGM names are written from an explicit table (the SDXL layout, layers_per_block 2), not from sdxl/lora.py's
mapping, so the two check each other.

    from lora_fixtures import write_kohya_lora, write_diffusers_lora, write_replicate_tar, ...
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ldm_checkpoint import _UNET_RESNET as UNET_RESNET_NAMES

COMPONENT_ATTR = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class LoraFixture:
    """A written LoRA: `targets` maps each layer prefix in the file to (component, module name)."""

    path: Path
    kind: str
    targets: dict[str, tuple[str, str]] = field(default_factory=dict)
    embeddings_path: Path | None = None
    token_map: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- target layers


def _linear_and_conv(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }


def unet_targets(pipe: Any, conv: bool = False, every: int = 1) -> list[str]:
    """UNet module names: every linear of the attentions (and, with conv=True, the resnet/sampler convs)."""
    names = []
    for n, w in _linear_and_conv(pipe.unet).items():
        if ".attentions." in n and w.dim() == 2 or conv and w.dim() == 4 and (".resnets." in n or "samplers" in n or n in ("conv_in", "conv_out")):
            names.append(n)
    return names[::every]


def te_targets(pipe: Any, component: str) -> list[str]:
    """Text-encoder module names (as in the live model) of the self-attention and MLP linears of every layer."""
    te = getattr(pipe, COMPONENT_ATTR[component])
    return [n for n, w in _linear_and_conv(te).items() if ".layers." in n and w.dim() == 2]


def te_canonical(name: str) -> str:
    """Text-encoder name as LoRA files write it: always with the `text_model.` wrapper."""
    return name if name.startswith("text_model.") else "text_model." + name


# Explicit SDXL SGM layout (layers_per_block 2), from the original model's block list.
_SGM_DOWN = {
    (0, "resnets", 0): "input_blocks.1.0",
    (0, "resnets", 1): "input_blocks.2.0",
    (0, "downsamplers", 0): "input_blocks.3.0",
    (1, "resnets", 0): "input_blocks.4.0",
    (1, "attentions", 0): "input_blocks.4.1",
    (1, "resnets", 1): "input_blocks.5.0",
    (1, "attentions", 1): "input_blocks.5.1",
    (1, "downsamplers", 0): "input_blocks.6.0",
    (2, "resnets", 0): "input_blocks.7.0",
    (2, "attentions", 0): "input_blocks.7.1",
    (2, "resnets", 1): "input_blocks.8.0",
    (2, "attentions", 1): "input_blocks.8.1",
}
_SGM_UP = {
    (0, "upsamplers", 0): "output_blocks.2.2",
    (1, "upsamplers", 0): "output_blocks.5.2",
    **{(b, "resnets", j): f"output_blocks.{3 * b + j}.0" for b in range(3) for j in range(3)},
    **{(b, "attentions", j): f"output_blocks.{3 * b + j}.1" for b in range(2) for j in range(3)},
}
_SGM_MID = {("resnets", 0): "middle_block.0", ("attentions", 0): "middle_block.1", ("resnets", 1): "middle_block.2"}
_SGM_RESNET = UNET_RESNET_NAMES  # the test-side table shared with ldm_checkpoint.py (not sdxl/lora.py's)
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sgm_name(name: str) -> str:
    """diffusers SDXL UNet module name -> original SGM name (dotted)."""
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    p = name.split(".")
    if p[0] == "mid_block":
        block, rest = _SGM_MID[(p[1], int(p[2]))], p[3:]
        kind = p[1]
    else:
        table = _SGM_DOWN if p[0] == "down_blocks" else _SGM_UP
        block, rest, kind = table[(int(p[1]), p[2], int(p[3]))], p[4:], p[2]
    if kind == "resnets":
        return f"{block}.{_SGM_RESNET['.'.join(rest)]}"
    if kind == "downsamplers":
        return f"{block}.op"
    return f"{block}.{'.'.join(rest)}"  # attentions keep their inner names; upsamplers keep .conv


def kohya_prefix(component: str, name: str, naming: str = "sgm") -> str:
    """kohya layer prefix: lora_unet_<SGM or diffusers name flattened>, lora_te{1,2}_<text_model.* flattened>."""
    if component == "unet":
        return "lora_unet_" + (sgm_name(name) if naming == "sgm" else name).replace(".", "_")
    return f"lora_{component}_" + te_canonical(name).replace(".", "_")


def diffusers_prefix(component: str, name: str) -> str:
    """diffusers/PEFT layer prefix: unet.<name>, text_encoder.text_model.<...>, text_encoder_2.text_model.<...>."""
    if component == "unet":
        return "unet." + name
    return COMPONENT_ATTR[component] + "." + te_canonical(name)


def _weight(pipe: Any, component: str, name: str) -> torch.Tensor:
    return getattr(pipe, COMPONENT_ATTR[component]).get_submodule(name).weight


def _all_targets(pipe: Any, conv: bool, te: bool, every: int = 1) -> list[tuple[str, str]]:
    out = [("unet", n) for n in unet_targets(pipe, conv=conv, every=every)]
    if te:
        out += [("te1", n) for n in te_targets(pipe, "te1")]
        out += [("te2", n) for n in te_targets(pipe, "te2")]
    return out


def _lora_factors(gen: torch.Generator, weight: torch.Tensor, rank: int, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a linear or conv weight; conv down carries the kernel, up is 1x1 (kohya LoCon / PEFT)."""
    out_dim, in_dim = weight.shape[:2]
    if weight.dim() == 4:
        kh, kw = weight.shape[2:]
        down = torch.randn(rank, in_dim, kh, kw, generator=gen) * std
        up = torch.randn(out_dim, rank, 1, 1, generator=gen) * std
    else:
        down = torch.randn(rank, in_dim, generator=gen) * std
        up = torch.randn(out_dim, rank, generator=gen) * std
    return down, up


def _dora_magnitude(gen: torch.Generator, weight: torch.Tensor, per_output: bool) -> torch.Tensor:
    """A DoRA magnitude near the base norm (so the result is sensible), shaped as LyCORIS stores it."""
    w = weight.detach().float()
    if per_output:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *([1] * (w.dim() - 1)))
    else:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *([1] * (w.dim() - 2)))
    return norm * (1.0 + 0.5 * torch.rand(norm.shape, generator=gen))


# ----------------------------------------------------------------------------------------------- writers


def write_kohya_lora(
    path: Path,
    pipe: Any,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float | None = 2.0,
    naming: str = "sgm",
    te: bool = True,
    conv: bool = False,
    dora: bool = False,
    dtype: torch.dtype = torch.float16,
    std: float = 0.4,
) -> LoraFixture:
    """kohya / A1111 LoRA: lora_unet_* (SGM names, or diffusers names with naming="diffusers"), lora_te1_*,
    lora_te2_*, with .alpha (alpha=None writes none: alpha = rank). conv=True adds LoCon conv layers.
    dora=True adds .dora_scale, alternating per-output (out, 1) and per-input (1, in) magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    fx = LoraFixture(Path(path), kind="kohya-dora" if dora else ("locon" if conv else "kohya"))
    for i, (component, name) in enumerate(_all_targets(pipe, conv=conv, te=te)):
        weight = _weight(pipe, component, name)
        prefix = kohya_prefix(component, name, naming)
        down, up = _lora_factors(gen, weight, rank, std)
        tensors[f"{prefix}.lora_down.weight"] = down.to(dtype)
        tensors[f"{prefix}.lora_up.weight"] = up.to(dtype)
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        if dora:
            tensors[f"{prefix}.dora_scale"] = _dora_magnitude(gen, weight, per_output=i % 2 == 0).to(dtype)
        fx.targets[prefix] = (component, name)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return fx


def write_locon_lora(path: Path, pipe: Any, *, seed: int = 1, **kwargs: Any) -> LoraFixture:
    """kohya LoCon: the attention linears plus every resnet / sampler / conv_in / conv_out convolution."""
    return write_kohya_lora(path, pipe, seed=seed, conv=True, **kwargs)


def write_locon_tucker_lora(path: Path, pipe: Any, *, seed: int = 8, rank: int = 4, alpha: float = 2.0, std: float = 0.5) -> LoraFixture:
    """kohya LoCon with a Tucker core on 3x3 convs (lora_down (r, in, 1, 1), lora_mid (r, r, kh, kw), lora_up
    (out, r, 1, 1)); plain LoRA factors on linears and 1x1 convs."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    fx = LoraFixture(Path(path), kind="locon-tucker")
    for component, name in _all_targets(pipe, conv=True, te=False, every=3):
        weight = _weight(pipe, component, name)
        prefix = kohya_prefix(component, name)
        if weight.dim() == 4 and weight.shape[2] > 1:
            out_dim, in_dim, kh, kw = weight.shape
            tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_dim, 1, 1, generator=gen) * std
            tensors[f"{prefix}.lora_mid.weight"] = torch.randn(rank, rank, kh, kw, generator=gen) * std
            tensors[f"{prefix}.lora_up.weight"] = torch.randn(out_dim, rank, 1, 1, generator=gen) * std
        else:
            down, up = _lora_factors(gen, weight, rank, std)
            tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"] = down, up
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        fx.targets[prefix] = (component, name)
    save_file(tensors, str(path))
    return fx


def write_full_diff_lora(path: Path, pipe: Any, *, seed: int = 9, std: float = 0.05) -> LoraFixture:
    """LyCORIS "full" / kohya diff: a whole weight difference per layer (<prefix>.diff), UNet and text encoders."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    fx = LoraFixture(Path(path), kind="full-diff")
    for component, name in _all_targets(pipe, conv=True, te=True, every=4):
        weight = _weight(pipe, component, name)
        prefix = kohya_prefix(component, name)
        tensors[f"{prefix}.diff"] = torch.randn(weight.shape, generator=gen) * std
        fx.targets[prefix] = (component, name)
    save_file(tensors, str(path))
    return fx


def write_diffusers_lora(
    path: Path,
    pipe: Any,
    *,
    seed: int = 2,
    rank: int = 4,
    lora_alpha: float | None = 8.0,
    style: str = "peft",
    te: bool = True,
    dora: bool = False,
    std: float = 0.4,
) -> LoraFixture:
    """diffusers / PEFT LoRA: unet.<module>.lora_A.weight / lora_B.weight (style="peft") or .lora.down.weight /
    .lora.up.weight (style="lora_dot"); text encoders under text_encoder.text_model.* / text_encoder_2.text_model.*.
    lora_alpha goes to the metadata as diffusers writes it (lora_adapter_metadata); None writes no alpha.
    dora=True adds PEFT's lora_magnitude_vector (one entry per output)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = ("lora_A.weight", "lora_B.weight") if style == "peft" else ("lora.down.weight", "lora.up.weight")
    tensors: dict[str, torch.Tensor] = {}
    fx = LoraFixture(Path(path), kind=f"diffusers-{style}" + ("-dora" if dora else ""))
    for component, name in _all_targets(pipe, conv=False, te=te):
        weight = _weight(pipe, component, name)
        prefix = diffusers_prefix(component, name)
        down, up = _lora_factors(gen, weight, rank, std)
        tensors[f"{prefix}.{a}"] = down
        tensors[f"{prefix}.{b}"] = up
        if dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = _dora_magnitude(gen, weight, per_output=True).flatten()
        fx.targets[prefix] = (component, name)
    metadata = {"format": "pt"}
    if lora_alpha is not None:
        # As diffusers' save_lora_weights writes it: each component's LoraConfig, keys prefixed by the component.
        packed: dict[str, Any] = {}
        for component, name in fx.targets.values():
            prefix = "unet" if component == "unet" else COMPONENT_ATTR[component]
            packed.setdefault(f"{prefix}.target_modules", []).append(name)
            packed[f"{prefix}.r"], packed[f"{prefix}.lora_alpha"] = rank, lora_alpha
            packed[f"{prefix}.use_dora"] = dora
        metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    save_file(tensors, str(path), metadata=metadata)
    return fx


def write_dora_lora(path: Path, pipe: Any, *, seed: int = 3, style: str = "kohya") -> LoraFixture:
    """DoRA: kohya/LyCORIS style (.dora_scale) or PEFT style (lora_magnitude_vector)."""
    if style == "kohya":
        return write_kohya_lora(path, pipe, seed=seed, dora=True, conv=True)
    return write_diffusers_lora(path, pipe, seed=seed, dora=True)


def write_loha_lora(
    path: Path, pipe: Any, *, seed: int = 4, rank: int = 4, alpha: float = 2.0, tucker: bool = False, std: float = 0.5
) -> LoraFixture:
    """LyCORIS LoHa (kohya names): hada_w1_a/b, hada_w2_a/b (+ hada_t1/t2 Tucker cores on 3x3 convs with
    tucker=True), .alpha; covers linears, convs and both text encoders."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    fx = LoraFixture(Path(path), kind="loha-tucker" if tucker else "loha")
    for component, name in _all_targets(pipe, conv=True, te=True, every=2):
        weight = _weight(pipe, component, name)
        prefix = kohya_prefix(component, name)
        out_dim, in_dim = weight.shape[:2]
        r = lambda *s: torch.randn(*s, generator=gen) * std
        if tucker and weight.dim() == 4 and weight.shape[2] > 1:
            kh, kw = weight.shape[2:]
            for side in ("1", "2"):
                tensors[f"{prefix}.hada_w{side}_a"] = r(rank, out_dim)
                tensors[f"{prefix}.hada_w{side}_b"] = r(rank, in_dim)
                tensors[f"{prefix}.hada_t{side}"] = r(rank, rank, kh, kw)
        else:
            flat_in = weight[0].numel()
            for side in ("1", "2"):
                tensors[f"{prefix}.hada_w{side}_a"] = r(out_dim, rank)
                tensors[f"{prefix}.hada_w{side}_b"] = r(rank, flat_in)
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        fx.targets[prefix] = (component, name)
    save_file(tensors, str(path))
    return fx


def _small_factor(n: int, at_most: int = 4) -> int:
    return max(f for f in range(1, at_most + 1) if n % f == 0)


def write_lokr_lora(path: Path, pipe: Any, *, seed: int = 5, rank: int = 2, alpha: float = 1.0, std: float = 0.5) -> LoraFixture:
    """LyCORIS LoKr (kohya names): W1 (lokr_w1, or lokr_w1_a @ lokr_w1_b) kron W2 (lokr_w2, or lokr_w2_a @
    lokr_w2_b), cycling through the variants layer by layer (full/full has no alpha scaling); convs too."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    fx = LoraFixture(Path(path), kind="lokr")
    r = lambda *s: torch.randn(*s, generator=gen) * std
    for i, (component, name) in enumerate(_all_targets(pipe, conv=True, te=True, every=2)):
        weight = _weight(pipe, component, name)
        prefix = kohya_prefix(component, name)
        out_dim, in_dim = weight.shape[:2]
        o1, i1 = _small_factor(out_dim), _small_factor(in_dim)
        o2, i2 = out_dim // o1, in_dim // i1
        k = weight.shape[2:] if weight.dim() == 4 else ()
        variant = i % 3
        if variant == 2:  # w1 factorised, w2 full
            tensors[f"{prefix}.lokr_w1_a"] = r(o1, rank)
            tensors[f"{prefix}.lokr_w1_b"] = r(rank, i1)
        else:
            tensors[f"{prefix}.lokr_w1"] = r(o1, i1)
        if variant == 1:  # w2 factorised (the usual LyCORIS layout)
            tensors[f"{prefix}.lokr_w2_a"] = r(o2, rank)
            tensors[f"{prefix}.lokr_w2_b"] = r(rank, i2 * (k[0] * k[1] if k else 1))
        else:
            tensors[f"{prefix}.lokr_w2"] = r(o2, i2, *k)
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        fx.targets[prefix] = (component, name)
    save_file(tensors, str(path))
    return fx


def write_replicate_lora(path: Path, pipe: Any, *, seed: int = 6, rank: int = 4, std: float = 0.4) -> LoraFixture:
    """Replicate SDXL trainer LoRA in the old attention-processor style (UNet only, no prefix):
    <block>.attn1.processor.to_q_lora.down.weight / .up.weight, to_out_lora -> to_out.0."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    fx = LoraFixture(Path(path), kind="replicate-attn-procs")
    for name in unet_targets(pipe):
        parts = name.split(".")
        if parts[-1] in ("to_q", "to_k", "to_v"):
            block, proj = ".".join(parts[:-1]), parts[-1]
        elif parts[-2:] == ["to_out", "0"]:
            block, proj = ".".join(parts[:-2]), "to_out"
        else:
            continue
        weight = _weight(pipe, "unet", name)
        down, up = _lora_factors(gen, weight, rank, std)
        prefix = f"{block}.processor.{proj}_lora"
        tensors[f"{prefix}.down.weight"] = down
        tensors[f"{prefix}.up.weight"] = up
        fx.targets[prefix] = ("unet", name)
    save_file(tensors, str(path))
    return fx


def write_pti_embeddings(path: Path, pipe: Any, *, n_tokens: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    """embeddings.pti: text_encoders_0 (n, CLIP-L width) and text_encoders_1 (n, CLIP-G width) rows."""
    gen = torch.Generator().manual_seed(seed)
    d1 = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    d2 = pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    rows = {
        "text_encoders_0": torch.randn(n_tokens, d1, generator=gen),
        "text_encoders_1": torch.randn(n_tokens, d2, generator=gen),
    }
    save_file(rows, str(path))
    return rows


def write_replicate_dir(folder: Path, pipe: Any, *, seed: int = 6, n_tokens: int = 2, trigger: str = "TOK") -> LoraFixture:
    """The three files of a Replicate trainer output: lora.safetensors, embeddings.pti, special_params.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fx = write_replicate_lora(folder / "lora.safetensors", pipe, seed=seed)
    write_pti_embeddings(folder / "embeddings.pti", pipe, n_tokens=n_tokens, seed=seed + 100)
    token_map = {trigger: "".join(f"<s{i}>" for i in range(n_tokens))}
    (folder / "special_params.json").write_text(json.dumps(token_map))
    fx.embeddings_path, fx.token_map, fx.kind = folder / "embeddings.pti", token_map, "replicate-tar"
    return fx


def write_replicate_tar(path: Path, pipe: Any, *, seed: int = 6, n_tokens: int = 2, trigger: str = "TOK") -> LoraFixture:
    """A Replicate SDXL trainer tar (lora.safetensors + embeddings.pti + special_params.json at its root).
    The returned fixture points at the files in a sibling folder `<path>.d/` (what weights.py would extract)."""
    folder = Path(str(path) + ".d")
    fx = write_replicate_dir(folder, pipe, seed=seed, n_tokens=n_tokens, trigger=trigger)
    with tarfile.open(path, "w") as tar:
        for member in ("lora.safetensors", "embeddings.pti", "special_params.json"):
            tar.add(folder / member, arcname=member)
    return fx


def write_foreign_lora(path: Path, pipe: Any, kind: str) -> Path:
    """LoRAs for other bases, which sdxl/lora.py must refuse: kind in sd15 (lora_te_ prefix), sd15_dims (a kohya
    attn2.to_k LoRA with 768-wide input on an SDXL layer name), flux, flux_diffusers, sd3, checkpoint."""
    g = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=g)
    if kind == "sd15":
        tensors = {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(4, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(768, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r(320, 4),
        }
    elif kind == "sd15_dims":
        name = next(n for n in unet_targets(pipe) if n.endswith("attn2.to_k"))
        out_dim = _weight(pipe, "unet", name).shape[0]
        prefix = kohya_prefix("unet", name)
        tensors = {f"{prefix}.lora_down.weight": r(4, 768), f"{prefix}.lora_up.weight": r(out_dim, 4)}
    elif kind == "flux":
        tensors = {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": r(4, 3072),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": r(9216, 4),
        }
    elif kind == "flux_diffusers":
        tensors = {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": r(4, 64),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": r(64, 4),
        }
    elif kind == "sd3":
        tensors = {
            "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight": r(4, 64),
            "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_up.weight": r(64, 4),
        }
    elif kind == "checkpoint":
        tensors = {
            "model.diffusion_model.input_blocks.0.0.weight": r(320, 4, 3, 3),
            "first_stage_model.decoder.conv_in.weight": r(8, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": r(768),
        }
    else:
        raise ValueError(kind)
    save_file(tensors, str(path))
    return Path(path)


def write_unsupported_lora(path: Path, pipe: Any, algo: str) -> Path:
    """Files sdxl/lora.py must refuse by algorithm: algo in oft, glora, ia3, bundle_emb."""
    g = torch.Generator().manual_seed(10)
    name = unet_targets(pipe)[0]
    prefix = kohya_prefix("unet", name)
    out_dim, in_dim = _weight(pipe, "unet", name).shape
    if algo == "oft":
        tensors = {f"{prefix}.oft_blocks": torch.randn(4, out_dim // 4, out_dim // 4, generator=g), f"{prefix}.alpha": torch.tensor(1.0)}
    elif algo == "glora":
        tensors = {
            f"{prefix}.a1.weight": torch.randn(4, in_dim, generator=g),
            f"{prefix}.a2.weight": torch.randn(out_dim, 4, generator=g),
            f"{prefix}.b1.weight": torch.randn(4, in_dim, generator=g),
            f"{prefix}.b2.weight": torch.randn(out_dim, 4, generator=g),
        }
    elif algo == "ia3":
        tensors = {f"{prefix}.weight": torch.randn(out_dim, generator=g), f"{prefix}.on_input": torch.tensor(False)}
    elif algo == "bundle_emb":
        fx = write_kohya_lora(path, pipe, te=False)
        from safetensors.torch import load_file

        tensors = load_file(str(fx.path))
        tensors["bundle_emb.mychar.clip_l"] = torch.randn(2, 32, generator=g)
        tensors["bundle_emb.mychar.clip_g"] = torch.randn(2, 32, generator=g)
    else:
        raise ValueError(algo)
    save_file(tensors, str(path))
    return Path(path)


def write_lora_with_unmatched_keys(path: Path, pipe: Any) -> Path:
    """A valid kohya LoRA plus two layers that exist in no SDXL model."""
    from safetensors.torch import load_file

    fx = write_kohya_lora(path, pipe, te=False)
    tensors = load_file(str(fx.path))
    for bogus in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn9_to_q", "lora_unet_no_such_layer"):
        tensors[f"{bogus}.lora_down.weight"] = torch.ones(4, 32)
        tensors[f"{bogus}.lora_up.weight"] = torch.ones(32, 4)
    save_file(tensors, str(path))
    return Path(path)


def write_shape_mismatch_lora(path: Path, pipe: Any) -> Path:
    """A kohya LoRA whose factors are one column too wide for an existing SDXL layer."""
    name = unet_targets(pipe)[0]
    out_dim, in_dim = _weight(pipe, "unet", name).shape
    prefix = kohya_prefix("unet", name)
    save_file(
        {f"{prefix}.lora_down.weight": torch.ones(4, in_dim + 1), f"{prefix}.lora_up.weight": torch.ones(out_dim, 4)},
        str(path),
    )
    return Path(path)


# ----------------------------------------------------------------------------------------------- reference maths
# An independent statement of each format's arithmetic (float64, from the file's own tensors and the manifest),
# used by the tests to check sdxl/lora.py; it shares no code with sdxl/lora.py.


def _file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _dora(w0: torch.Tensor, dw: torch.Tensor, m: torch.Tensor, peft: bool) -> torch.Tensor:
    v = w0 + dw
    if peft or (m.shape[0] == v.shape[0] and m.numel() == v.shape[0]):
        n = torch.stack([v[o].norm() for o in range(v.shape[0])])
        return m.reshape(-1).double().reshape(-1, *([1] * (v.dim() - 1))) * v / n.reshape(-1, *([1] * (v.dim() - 1))) - w0
    n = torch.stack([v[:, i].norm() for i in range(v.shape[1])])
    shape = (1, -1) + (1,) * (v.dim() - 2)
    return m.reshape(-1).double().reshape(shape) * v / n.reshape(shape) - w0


def reference_deltas(fx: LoraFixture, base: dict[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module) -> float64 delta at strength 1 for every layer of `fx`, given the base weights."""
    tensors, meta = _file_tensors(fx.path)
    packed = json.loads(meta.get("lora_adapter_metadata", "{}"))
    out = {}
    for prefix, target in fx.targets.items():
        sub = {k[len(prefix) + 1 :]: v.double() for k, v in tensors.items() if k.startswith(prefix + ".")}
        w0 = base[target].double()
        shape = w0.shape
        if "lora_up.weight" in sub or "lora_B.weight" in sub or "lora.up.weight" in sub or "up.weight" in sub:
            up = next(sub[k] for k in ("lora_up.weight", "lora_B.weight", "lora.up.weight", "up.weight") if k in sub)
            down = next(sub[k] for k in ("lora_down.weight", "lora_A.weight", "lora.down.weight", "down.weight") if k in sub)
            rank = down.shape[0]
            if "alpha" in sub:
                alpha = float(sub["alpha"])
            else:
                component = prefix.split(".")[0]
                alpha = float(packed.get(f"{component}.lora_alpha", rank))
            if "lora_mid.weight" in sub:  # W[o, i, h, w] = sum_{a,b} up[o, a] mid[a, b, h, w] down[b, i]
                mid = sub["lora_mid.weight"]
                d = torch.tensordot(torch.tensordot(up.reshape(shape[0], -1), mid, dims=([1], [0])), down.reshape(rank, -1), dims=([1], [0]))
                d = d.permute(0, 3, 1, 2)
            else:
                d = torch.zeros(shape[0], down[0].numel(), dtype=torch.float64)
                for j in range(rank):  # sum of rank-1 outer products
                    d += torch.outer(up.reshape(shape[0], rank)[:, j], down.reshape(rank, -1)[j])
            d = d.reshape(shape) * alpha / rank
        elif "hada_w1_a" in sub:
            rank = sub["hada_w1_b"].shape[0]

            def side(i: str, sub: dict[str, torch.Tensor] = sub) -> torch.Tensor:
                a, b = sub[f"hada_w{i}_a"], sub[f"hada_w{i}_b"]
                if f"hada_t{i}" in sub:
                    t = sub[f"hada_t{i}"]
                    # W[o, c, h, w] = sum_{p,q} a[p, o] * b[q, c] * t[p, q, h, w]
                    return torch.tensordot(torch.tensordot(a.t(), t, dims=([1], [0])), b, dims=([1], [0])).permute(0, 3, 1, 2)
                return a @ b

            d = (side("1") * side("2")).reshape(shape) * float(sub["alpha"]) / rank
        elif any(k.startswith("lokr_") for k in sub):
            factorised = None
            w1 = sub.get("lokr_w1")
            if w1 is None:
                w1, factorised = sub["lokr_w1_a"] @ sub["lokr_w1_b"], sub["lokr_w1_b"].shape[0]
            w2 = sub.get("lokr_w2")
            if w2 is None:
                w2, factorised = sub["lokr_w2_a"] @ sub["lokr_w2_b"], sub["lokr_w2_b"].shape[0]
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2).reshape(shape)
            if factorised is not None:
                d = d * float(sub["alpha"]) / factorised
        elif "diff" in sub:
            d = sub["diff"].reshape(shape)
        else:
            raise ValueError(f"no reference for {prefix}: {sorted(sub)}")
        if "dora_scale" in sub:
            d = _dora(w0, d, sub["dora_scale"], peft=False)
        elif "lora_magnitude_vector" in sub:
            d = _dora(w0, d, sub["lora_magnitude_vector"], peft=True)
        out[target] = d
    return out
