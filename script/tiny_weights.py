#!/usr/bin/env python3
"""Write a tiny SDXL-architecture model in exactly the layout of the real weights.

    python script/tiny_weights.py DIR

Everything is random from fixed seeds, built in code, with no network: a three-block SDXL UNet (same block
types, layers per block and text-time conditioning as SDXL, far fewer channels), a tiny 8x VAE, two CLIP text
encoders with a tokenizer built from a small generated vocabulary, and a tiny safety checker that flags nothing.
Tests and offline demos run the predictor on it; the arithmetic is real, only the sizes are small.

Layout (the same as script/download_weights writes for the real weights):

    DIR/illustrious-xl/      diffusers SDXL pipeline folder without vae/ (unet, text encoders, tokenizers, scheduler)
    DIR/sdxl-base/           the same for standard SDXL base 1.0
    DIR/sdxl-vae-fp16-fix/   AutoencoderKL shared by both models
    DIR/safety-checker/      StableDiffusionSafetyChecker with its preprocessor_config.json
    DIR/controlnet-union-promax/  ControlNetUnionModel with the union promax model's 8 control types
    DIR/depth-anything-v2-small/  DepthAnythingForDepthEstimation (DINOv2 backbone) and its DPT image processor
    DIR/rtdetr-r50vd-coco-o365/  RTDetrForObjectDetection (ResNet backbone) and its image processor: the pose detector
    DIR/vitpose-base-simple/  VitPoseForPoseEstimation (simple decoder, COCO-17) and its image processor
    DIR/ip-adapter/          h94's layout: sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors (original key names)
                             and models/image_encoder/ (CLIPVisionModelWithProjection)
    DIR/softedge-hed/, DIR/lineart-informative-drawings/, DIR/lineart-anime2sketch/
                             model.safetensors of the line preprocessors (sdxl/lines.py), as script/download_weights
                             converts lllyasviel/Annotators' pickles: the same key names, dtypes and layer counts,
                             few channels
    DIR/upscalers/           RealESRGAN_x4plus_anime_6B.safetensors: a tiny RRDBNet 4x in Real-ESRGAN's key names
    DIR/anime-face-detector/face_detect_v1.4_s.onnx, DIR/anime-hand-detector/hand_detect_v1.0_s.onnx
                             ONNX stand-ins with the YOLOv8 detectors' signature that "detect" fixed boxes

Tests also call the ControlNet writers here for the control_model input (build_plain_controlnet,
write_foreign_controlnet); what they write is served by the test fakes, never part of DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import MODEL_DIRS, SAFETY_DIR, VAE_DIR  # noqa: E402  (the layout is defined once, in utils.py)
from sdxl.control import CONTROLNET_DIR  # noqa: E402
from sdxl.preprocess import DEPTH_DIR  # noqa: E402
from sdxl.pose import DETECTOR_DIR, POSE_DIR  # noqa: E402
from sdxl.reference import ADAPTER_FILE, ADAPTER_SUBFOLDER, ENCODER_FOLDER, REFERENCE_DIR  # noqa: E402
from sdxl import lines  # noqa: E402
from sdxl.upscale import ESRGAN_FILE, UPSCALER_DIR  # noqa: E402
from sdxl.detailer import DETECTOR_FILES  # noqa: E402

# A small word list so that typical test prompts tokenise into whole words; anything else falls back to
# single characters, exactly as CLIP's byte-level BPE does with an unknown word.
WORDS = (
    "a an the of and with in on at by cat dog girl boy 1girl 1boy solo hat red blue green white black "
    "hair eyes smile masterpiece best quality amazing very aesthetic absurdres highres lowres worst bad "
    "anatomy hands text watermark photo portrait landscape sky night day city forest anime style tok"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (a public, well-known mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tokenizer(folder: Path, pad_token: str) -> int:
    """A CLIP BPE tokenizer with every byte, every byte at a word end, and merges for WORDS. Returns vocab size."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def _with_text_model_prefix(model_file: Path) -> None:
    """Real SDXL text-encoder files name their tensors `text_model.*`; newer transformers saves them without it."""
    tensors = load_file(str(model_file))
    renamed = {}
    for key, value in tensors.items():
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = "text_model." + key
        renamed[key] = value
    save_file(renamed, str(model_file), metadata={"format": "pt"})


def write_scheduler_and_index(folder: Path) -> None:
    """SDXL base's scheduler config and a model_index.json (the same for every SDXL size)."""
    from diffusers import EulerDiscreteScheduler

    EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    ).save_pretrained(folder / "scheduler")

    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))


def build_pipeline_folder(folder: Path, seed: int) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab_size = write_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer(folder / "tokenizer_2", pad_token="!")
    bos, eos = vocab_size - 2, vocab_size - 1

    # Different widths and depths for the two encoders, as in SDXL (768/12 layers and 1280/32 layers): a LoRA or
    # checkpoint key sent to the wrong encoder then fails on shape instead of passing unnoticed, and text_encoder_2
    # has the `resblocks.9` that single-file loaders look for to recognise SDXL.
    common = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(
        CLIPTextConfig(hidden_act="quick_gelu", hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                       num_attention_heads=4, projection_dim=32, **common)
    )
    te1.save_pretrained(folder / "text_encoder")
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_act="gelu", hidden_size=64, intermediate_size=72, num_hidden_layers=10,
                       num_attention_heads=4, projection_dim=64, **common)
    )
    te2.save_pretrained(folder / "text_encoder_2")
    for sub in ("text_encoder", "text_encoder_2"):
        _with_text_model_prefix(folder / sub / "model.safetensors")

    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=96,  # text_encoder hidden 32 + text_encoder_2 hidden 64, as 768 + 1280 in SDXL
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 64,  # six time ids + the pooled text embedding
    )
    # Random init leaves some output projections at zero; small noise everywhere makes every layer matter,
    # so that a LoRA on any layer visibly changes the image.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    unet.save_pretrained(folder / "unet")

    write_scheduler_and_index(folder)


def build_vae(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=False,  # as the fp16-fix VAE's own config says
    )
    vae.save_pretrained(folder)


def build_safety_checker(folder: Path, seed: int) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        # A cosine similarity never exceeds 1, so thresholds of 1 flag nothing; tests lower them to flag all.
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def build_controlnet(folder: Path, unet_folder: Path, seed: int) -> None:
    """A union ControlNet for the tiny UNet, built directly (from_unet would give 6 control types, promax has 8)."""
    from diffusers import ControlNetUnionModel

    unet = json.loads((unet_folder / "config.json").read_text())
    copied = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
              "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
              "norm_num_groups", "upcast_attention")
    width = unet["block_out_channels"][0]
    torch.manual_seed(seed)
    controlnet = ControlNetUnionModel(
        **{name: unet[name] for name in copied},
        conditioning_embedding_out_channels=(4, 8, 8, 16),  # three stride-2 convs: the map is 8x the latent
        num_control_type=8,
        num_trans_channel=width,  # the forward adds both to the conditioning features (block_out_channels[0])
        num_proj_channel=width,
        num_trans_head=2,
        num_trans_layer=1,
    )
    # The zero convolutions start at zero (no control at all): small noise makes the control change the image.
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    controlnet.save_pretrained(folder)


# --- ControlNets by reference (the control_model input). Not part of WEIGHTS_DIR: tests write them where they serve
# them from, in the layouts users link to.
CONTROLNET_UNET_FIELDS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "norm_num_groups", "upcast_attention")


def build_plain_controlnet(folder: Path, unet_folder: Path, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """A plain (one control type) ControlNetModel for the tiny UNet, as a diffusers folder (config.json +
    diffusion_pytorch_model.safetensors): what diffusers/controlnet-canny-sdxl-1.0 and xinsir's single-type
    repos hold. Its diffusion_pytorch_model.safetensors alone is the single file in diffusers names."""
    from diffusers import ControlNetModel

    unet = json.loads((unet_folder / "config.json").read_text())
    torch.manual_seed(seed)
    controlnet = ControlNetModel(**{name: unet[name] for name in CONTROLNET_UNET_FIELDS},
                                 conditioning_embedding_out_channels=(4, 8, 8, 16))
    with torch.no_grad():  # the zero convolutions start at zero: small noise makes the control change the image
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    controlnet.save_pretrained(folder)
    if dtype != torch.float32:  # cast in the file: diffusers warns about casting a model with .to()
        path = folder / "diffusion_pytorch_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})


def write_foreign_controlnet(path: Path, kind: str, seed: int = 23) -> None:
    """A tiny ControlNet for another base model as one .safetensors file in diffusers names, for refusal tests:
    kind "sd15" (768-wide cross-attention and no text-time embedding, as lllyasviel's SD1.5 ControlNets) or "flux"
    (a FluxControlNetModel: a transformer)."""
    from diffusers import ControlNetModel, FluxControlNetModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    if kind == "sd15":
        model = ControlNetModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), block_out_channels=(16, 32),
                                layers_per_block=1, cross_attention_dim=768, attention_head_dim=2, norm_num_groups=8,
                                conditioning_embedding_out_channels=(4, 8))
    elif kind == "flux":
        model = FluxControlNetModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                    axes_dims_rope=[2, 2, 4])
    else:
        raise ValueError(kind)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def build_depth(folder: Path, seed: int) -> None:
    """Depth Anything V2 in the real folder layout: a two-layer DINOv2 backbone, two neck stages, and the real
    processor settings except its size (56 instead of 518 px, still a multiple of the 14-px patch)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2"], out_indices=[1, 2],
                            reshape_hidden_states=False, apply_layernorm=True)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 16],
                                 reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=4, head_in_index=-1,
                                 patch_size=14, use_pretrained_backbone=False)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(do_resize=True, size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=3, do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_pad=False).save_pretrained(folder)


COCO_KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                       "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                       "right_knee", "left_ankle", "right_ankle")


def build_pose_detector(folder: Path, seed: int) -> None:
    """RT-DETR in the real layout: a four-stage ResNet (one basic block each), a one-layer hybrid encoder, a one-layer
    decoder with 4 queries, and the real processor settings except its size (64 instead of 640 px). The class
    biases favour "person" (class 0, as in COCO), so the random detector reports people and every openpose path
    draws something."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig

    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                  layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = RTDetrConfig(backbone_config=backbone, encoder_hidden_dim=16, encoder_in_channels=[16, 16, 16],
                          encoder_ffn_dim=16, encoder_attention_heads=2, d_model=16, decoder_in_channels=[16, 16, 16],
                          decoder_ffn_dim=16, decoder_attention_heads=2, decoder_layers=1, num_queries=4,
                          num_denoising=0, id2label={0: "person", 1: "bicycle"}, label2id={"person": 0, "bicycle": 1})
    detector = RTDetrForObjectDetection(config)
    with torch.no_grad():
        heads = [detector.model.enc_score_head, *detector.model.decoder.class_embed]
        for head in heads:
            head.bias.copy_(torch.tensor([4.0, -4.0]))
    detector.save_pretrained(folder)
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


def build_pose_estimator(folder: Path, seed: int) -> None:
    """ViTPose "simple" in the real layout: a one-layer ViT backbone on 64x48 crops (the real one: 12 layers,
    256x192), the simple decoder's 17 COCO heatmaps, and the real processor settings except its size. The heatmap
    bias lifts every keypoint's confidence above the drawing threshold, so the random estimator's points are drawn."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, mlp_ratio=2, out_indices=[1])
    config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, scale_factor=4,
                           id2label=dict(enumerate(COCO_KEYPOINT_NAMES)),
                           label2id={name: i for i, name in enumerate(COCO_KEYPOINT_NAMES)})
    estimator = VitPoseForPoseEstimation(config)
    with torch.no_grad():
        estimator.head.conv.bias.add_(1.0)
    estimator.save_pretrained(folder)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(folder)


def _original_resampler_keys(state: dict) -> dict:
    """diffusers' IPAdapterPlusImageProjection names -> the names of h94's files (what diffusers converts from)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        renamed = {"ln0.weight": "0.norm1.weight", "ln0.bias": "0.norm1.bias", "ln1.weight": "0.norm2.weight",
                   "ln1.bias": "0.norm2.bias", "attn.to_q.weight": "0.to_q.weight",
                   "attn.to_out.0.weight": "0.to_out.weight", "ff.0.weight": "1.0.weight", "ff.0.bias": "1.0.bias",
                   "ff.1.net.0.proj.weight": "1.1.weight", "ff.1.net.2.weight": "1.3.weight"}
        if rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{i}.attn.to_v.weight"]])
        elif rest != "attn.to_v.weight":
            out[f"layers.{i}.{renamed[rest]}"] = value
    return out


def build_ip_adapter(root: Path, unet_folder: Path, seed: int) -> None:
    """IP-Adapter Plus in h94's layout for the tiny UNet: a tiny CLIP vision encoder, a Plus resampler (4 layers,
    as the real one) and to_k_ip/to_v_ip for each cross-attention processor (keys 1, 3, 5, ... in UNet order)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=16))
    encoder.save_pretrained(root / ENCODER_FOLDER)
    unet_config = json.loads((unet_folder / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(unet_config)
    cross = unet_config["cross_attention_dim"]
    resampler = IPAdapterPlusImageProjection(embed_dims=16, output_dims=cross, hidden_dims=32, depth=4, dim_head=64,
                                             heads=1, num_queries=4, ffn_ratio=4)
    tensors = {f"image_proj.{k}": v for k, v in _original_resampler_keys(resampler.state_dict()).items()}
    channels = unet_config["block_out_channels"]
    names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for j, name in enumerate(names):
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        hidden = (channels[-1] if block is None else
                  list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block])
        for kind in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{1 + 2 * j}.{kind}.weight"] = torch.randn(hidden, cross) * 0.2
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("image_proj."):
                tensors[key] = value + torch.randn_like(value) * 0.02
    (root / ADAPTER_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / ADAPTER_SUBFOLDER / ADAPTER_FILE))


def tiny_line_state(control_type: str, seed: int) -> dict[str, torch.Tensor]:
    """A line preprocessor's state dict with the key names and layer counts of its Annotators file (HED's five
    blocks of 2, 2, 3, 3, 3 convolutions; Informative Drawings' 3 residual blocks; Anime2Sketch's 8 U-Net levels, under
    the DataParallel `module.` prefix its original loader strips), few channels, random weights. HED is stored in
    float16 as the real file (29.4 MB is 14.7 M parameters at two bytes), the others in float32."""
    torch.manual_seed(seed)
    if control_type == "softedge":
        net, dtype, prefix = lines.SoftEdgeHED(widths=(4, 8, 8, 16, 16)), torch.float16, ""
        with torch.no_grad():
            net.norm.copy_(torch.tensor([120.0, 115.0, 105.0]).reshape(1, 3, 1, 1))  # mean-ish RGB, as trained
    elif control_type == "lineart":
        net, dtype, prefix = lines.InformativeDrawings(width=4, residual=3), torch.float32, ""
    else:
        net, dtype, prefix = lines.Anime2Sketch(width=2, levels=8), torch.float32, "module."
    return {prefix + key: value.to(dtype).contiguous() for key, value in net.state_dict().items()}


def build_line_models(root: Path, seed: int) -> None:
    for offset, (control_type, model) in enumerate(lines.LINE_MODELS.items()):
        folder = root / model.source["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tiny_line_state(control_type, seed + offset), str(folder / lines.WEIGHTS_FILE),
                  metadata={"format": "pt"})
def esrgan_state(seed: int, num_feat: int = 4, num_block: int = 1, grow: int = 32) -> dict[str, torch.Tensor]:
    """An RRDBNet 4x state dict in the real file's layout: Real-ESRGAN's `params_ema` key names (conv_first,
    body.<i>.rdb<1-3>.conv<1-5>, conv_body, conv_up1/2, conv_hr, conv_last) as RealESRGAN_x4plus_anime_6B.pth holds
    them (64 features, 6 blocks, 32 grow channels there). spandrel reads the feature and block counts from the
    shapes and keys; it builds every RRDBNet with 32 grow channels, so that stays. Weights as Real-ESRGAN
    initialises them (Kaiming normal, RDB convs scaled by 0.1), float16 as the converted file is float32: spandrel
    casts either."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def conv(name: str, out_ch: int, in_ch: int, scale: float = 1.0) -> None:
        tensors[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * (2 / (in_ch * 9)) ** 0.5 * scale
        tensors[f"{name}.bias"] = torch.zeros(out_ch)

    conv("conv_first", num_feat, 3)
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for i in range(1, 6):
                conv(f"body.{block}.rdb{rdb}.conv{i}", num_feat if i == 5 else grow, num_feat + (i - 1) * grow, 0.1)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, num_feat, num_feat)
    conv("conv_last", 3, num_feat)
    return {k: v.to(torch.float16).contiguous() for k, v in tensors.items()}


def build_upscaler(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(esrgan_state(seed), str(folder / ESRGAN_FILE))


# What the detector stand-ins find in any image: (cx, cy, w, h) as fractions of the detector's input, and a score.
# Per detector one box above ADetailer's confidence 0.3, a weaker duplicate of it that NMS removes (IoU > 0.7) and one
# box below the confidence; the face sits in the upper middle, the hand lower right.
TINY_DETECTIONS: dict[str, tuple[tuple[float, float, float, float, float], ...]] = {
    "face": ((0.5, 0.35, 0.25, 0.25, 0.9), (0.51, 0.36, 0.25, 0.25, 0.8), (0.15, 0.85, 0.1, 0.1, 0.1)),
    "hands": ((0.75, 0.75, 0.15, 0.15, 0.85), (0.76, 0.75, 0.15, 0.15, 0.6), (0.1, 0.1, 0.1, 0.1, 0.2)),
}


def build_detector(path: Path, label: str, detections) -> None:
    """An ONNX model with the signature of deepghs' YOLOv8 exports (input `images` [1, 3, H, W] with H and W
    dynamic, output `output0` [1, 4 + 1 class, anchors] in input pixels, ultralytics' `names` and `imgsz` metadata),
    written with the onnx helper API: its boxes are fractions of the input's size, so they land on the same part of
    any image."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.array(detections, dtype=np.float32).T  # [5, anchors]
    constants = {
        "fractions": table[:4],  # cx, cy, w, h
        "scores": table[4:],
        "size_index": np.array([3, 2, 3, 2], dtype=np.int64),  # W, H, W, H of the input's shape
        "axis_1": np.array([1], dtype=np.int64),
        "axis_0": np.array([0], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Gather", ["shape", "size_index"], ["sizes"], axis=0),
        helper.make_node("Cast", ["sizes"], ["sizes_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["sizes_float", "axis_1"], ["scale"]),
        helper.make_node("Mul", ["fractions", "scale"], ["boxes"]),
        helper.make_node("Concat", ["boxes", "scores"], ["rows"], axis=0),
        helper.make_node("Unsqueeze", ["rows", "axis_0"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_yolov8_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, "anchors"])],
        initializer=[numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tiny_weights.py")
    model.ir_version = 8  # what onnxruntime reads since 1.10
    helper.set_model_props(model, {"names": repr({0: label}), "imgsz": "[640, 640]", "stride": "32", "task": "detect"})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_tiny_weights(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for offset, name in enumerate(MODEL_DIRS.values()):
        build_pipeline_folder(root / name, seed=100 * (offset + 1))
    build_vae(root / VAE_DIR, seed=7)
    build_safety_checker(root / SAFETY_DIR, seed=11)
    build_controlnet(root / CONTROLNET_DIR, root / MODEL_DIRS["illustrious"] / "unet", seed=13)
    build_depth(root / DEPTH_DIR, seed=17)
    build_pose_detector(root / DETECTOR_DIR, seed=23)
    build_pose_estimator(root / POSE_DIR, seed=29)
    build_ip_adapter(root / REFERENCE_DIR, root / MODEL_DIRS["illustrious"] / "unet", seed=19)
    build_line_models(root, seed=23)
    build_upscaler(root / UPSCALER_DIR, seed=29)
    for unit, (folder, file, label) in DETECTOR_FILES.items():
        build_detector(root / folder / file, label, TINY_DETECTIONS[unit])
    (root / "TINY").write_text("random tiny SDXL-architecture weights written by script/tiny_weights.py\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="folder to write (the predictor's WEIGHTS_DIR)")
    args = parser.parse_args()
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    write_tiny_weights(args.dir)
    print(f"tiny SDXL weights written to {args.dir}")


if __name__ == "__main__":
    main()
