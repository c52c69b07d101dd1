"""The real file listings of the Hugging Face repos that script/download_weights pins, as data, in one place.

The fake hub in test_hf_download.py serves exactly these files at exactly these commits, so a test fails when the
script asks for a file the real repo does not have (as it once asked for the safety checker's model.safetensors,
which exists only on unmerged PR branches). The files the script fetches are served with the bytes of the tiny
weights; every other listed file with a placeholder whose size is the real size scaled down (SCALE).

Sizes are in bytes as the public record shows them; None where the record names the file without a size.
Each repo says where its listing comes from (public pages and code read 2026-12; nothing of them is copied here
but names and sizes).
"""

from __future__ import annotations

SCALE = 1 << 20  # a placeholder holds size // SCALE bytes (at least 64)

HUB_LISTINGS: dict[str, dict] = {
    "CompVis/stable-diffusion-safety-checker": {
        "commit": "cb41f3a270d63d454d385fc2e4f571c487c253c5",
        "source": "Hub pages of the repo: commits/main (3 commits, HEAD cb41f3a 'Model Car (#34)') and the tree at "
                  "that commit (the page of refs/pr/40, which points at it): .gitattributes, README.md, config.json "
                  "4.55 kB, preprocessor_config.json 342 B, pytorch_model.bin 1.22 GB; the exact .bin size from a "
                  "public training report that downloaded it at cb41f3a. model.safetensors is only on refs/pr/39 and "
                  "refs/pr/41 (unmerged).",
        "files": {
            ".gitattributes": None,
            "README.md": None,
            "config.json": 4550,
            "preprocessor_config.json": 342,
            "pytorch_model.bin": 1216067303,
        },
    },
    "madebyollin/sdxl-vae-fp16-fix": {
        "commit": "207b116dae70ace3637169f1ddd2434b91b3a8cd",
        "source": "public download manifests pinned to 207b116 (config.json 631 B, diffusion_pytorch_model"
                  ".safetensors 334,643,238 B, sdxl.vae.safetensors 334,641,162 B, README.md 3,143 B); "
                  "sdxl_vae.safetensors from public scripts that fetch it from main; the images/ names from the "
                  "README at blob 516c5f6. Other files may exist: none the script asks for.",
        "files": {
            ".gitattributes": None,
            "README.md": 3143,
            "config.json": 631,
            "diffusion_pytorch_model.safetensors": 334643238,
            "sdxl.vae.safetensors": 334641162,
            "sdxl_vae.safetensors": None,
            "images/activation-magnitudes.jpg": None,
            "images/fix-fp16.png": None,
            "images/fix-fp32.png": None,
            "images/orig-fp16.png": None,
            "images/orig-fp32.png": None,
        },
    },
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "commit": "462165984030d82259a11f4367a4eed129e94a7b",
        "source": "HfApi.model_info(files_metadata=True) output of the repo's main (= 462165984030, unchanged "
                  "since 2023) printed in a public script (every file over 1 MiB, with sizes), plus the configs "
                  "and tokenizer files with sizes from public pinned-file manifests of 462165984030. Small images "
                  "of the README (under 1 MiB) are not in that record and are left out.",
        "files": {
            ".gitattributes": None,
            "01.png": 4608613,
            "LICENSE.md": 14109,
            "README.md": 8668,
            "model_index.json": 609,
            "scheduler/scheduler_config.json": 479,
            "sd_xl_base_1.0.safetensors": 6938078334,
            "sd_xl_base_1.0_0.9vae.safetensors": 6938078334,
            "sd_xl_offset_example-lora_1.0.safetensors": 49553604,
            "text_encoder/config.json": 565,
            "text_encoder/flax_model.msgpack": 492248682,
            "text_encoder/model.fp16.safetensors": 246144152,
            "text_encoder/model.onnx": 492587457,
            "text_encoder/model.safetensors": 492265168,
            "text_encoder/openvino_model.bin": 492242672,
            "text_encoder/openvino_model.xml": 1057789,
            "text_encoder_2/config.json": 575,
            "text_encoder_2/flax_model.msgpack": 2778657095,
            "text_encoder_2/model.fp16.safetensors": 1389382176,
            "text_encoder_2/model.onnx_data": 2778639360,
            "text_encoder_2/model.safetensors": 2778702264,
            "text_encoder_2/openvino_model.bin": 2778640120,
            "text_encoder_2/openvino_model.xml": 2790191,
            "tokenizer/merges.txt": 524619,
            "tokenizer/special_tokens_map.json": 472,
            "tokenizer/tokenizer_config.json": 737,
            "tokenizer/vocab.json": 1059962,
            "tokenizer_2/merges.txt": 524619,
            "tokenizer_2/special_tokens_map.json": 460,
            "tokenizer_2/tokenizer_config.json": 725,
            "tokenizer_2/vocab.json": 1059962,
            "unet/config.json": 1680,
            "unet/diffusion_flax_model.msgpack": 10269915611,
            "unet/diffusion_pytorch_model.fp16.safetensors": 5135149760,
            "unet/diffusion_pytorch_model.safetensors": 10270077736,
            "unet/model.onnx": 7293842,
            "unet/model.onnx_data": 10269854720,
            "unet/openvino_model.bin": 10269856428,
            "unet/openvino_model.xml": 22577438,
            "vae/config.json": 642,
            "vae/diffusion_flax_model.msgpack": 334623853,
            "vae/diffusion_pytorch_model.fp16.safetensors": 167335342,
            "vae/diffusion_pytorch_model.safetensors": 334643268,
            "vae_1_0/diffusion_pytorch_model.fp16.safetensors": 167335342,
            "vae_1_0/diffusion_pytorch_model.safetensors": 334643268,
            "vae_decoder/model.onnx": 198093688,
            "vae_decoder/openvino_model.bin": 197961232,
            "vae_encoder/model.onnx": 136775724,
            "vae_encoder/openvino_model.bin": 136655184,
        },
    },
    "OnomaAIResearch/Illustrious-xl-early-release-v0": {
        "commit": "dca0dac303e6dc4b0c31d8001bc685b89b5d0204",
        "source": "a public model catalog that listed the repo at dca0dac (2026-09-09, gated=False, 10 files, naming "
                  "Illustrious-XL-v0.1-GUIDED.safetensors, Illustrious-XL-v0.1.safetensors, unet/diffusion_pytorch_"
                  "model.bin and unet/diffusion_pytorch_model.safetensors); the checkpoint's size from public "
                  "download manifests pinned to dca0dac. The other four files were not named there: the two below "
                  "that every Hub repo has, and two unknown, left out.",
        "files": {
            ".gitattributes": None,
            "README.md": None,
            "Illustrious-XL-v0.1.safetensors": 6938040760,
            "Illustrious-XL-v0.1-GUIDED.safetensors": None,
            "unet/diffusion_pytorch_model.bin": None,
            "unet/diffusion_pytorch_model.safetensors": None,
        },
    },
    # The control components (sdxl/control.py, sdxl/preprocess.py, sdxl/reference.py). Facts from docs/components.md, which
    # says where each came from.
    "xinsir/controlnet-union-sdxl-1.0": {
        "commit": "801a4a3fa3d4c936f4feea95b98607bc6726f80c",
        "source": "the Hub's tree page at 801a4a3 (18 commits, 'Update README.md'): config.json 1.24 kB, "
                  "config_promax.json 1.26 kB, diffusion_pytorch_model.safetensors 2,512,030,408 B, "
                  "diffusion_pytorch_model_promax.safetensors 2,513,342,408 B (mirror LFS pointers agree). Other "
                  "files (images, README) are not asked for.",
        "files": {
            ".gitattributes": None,
            "README.md": None,
            "config.json": 1240,
            "config_promax.json": 1260,
            "diffusion_pytorch_model.safetensors": 2512030408,
            "diffusion_pytorch_model_promax.safetensors": 2513342408,
        },
    },
    "depth-anything/Depth-Anything-V2-Small-hf": {
        "commit": "5426e4f0f36572d16453bbda7a8389317b1bef99",
        "source": "the Hub's blob page of model.safetensors (99,173,660 B) and the tree at 5426e4f: config.json "
                  "950 B, preprocessor_config.json 775 B.",
        "files": {
            ".gitattributes": None,
            "README.md": None,
            "config.json": 950,
            "model.safetensors": 99173660,
            "preprocessor_config.json": 775,
        },
    },
    "h94/IP-Adapter": {
        "commit": "018e402774aeeddd60609b4ecdb7e298259dc729",
        "source": "the commit as pinned in public resolve/ URLs; h94's blob page of the ViT-H adapter (847,517,512 "
                  "B) and copies of models/image_encoder (config.json 560 B, model.safetensors 2,528,373,448 B). "
                  "The repo holds many more adapters (SD 1.5, other SDXL ones): none is asked for; only these and "
                  "the ViT-bigG encoder (sdxl_models/image_encoder, which the vit-h adapters must not use) are "
                  "listed.",
        "files": {
            ".gitattributes": None,
            "README.md": None,
            "models/image_encoder/config.json": 560,
            "models/image_encoder/model.safetensors": 2528373448,
            "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors": 847517512,
            "sdxl_models/image_encoder/config.json": None,
            "sdxl_models/image_encoder/model.safetensors": None,
        },
    },
    # The openpose preprocessor's two models (sdxl/pose.py, which says where each pin comes from).
    "PekingU/rtdetr_r50vd_coco_o365": {
        "commit": "457857cec8ac28ddede40ecee9eed2beca321af8",
        "source": "the Hub's tree page at 457857c ('Update Model Card (#4)', 18 commits): .gitattributes 1.52 kB, "
                  "README.md 9.12 kB, config.json 5.11 kB, model.safetensors 172 MB (no exact byte count in any "
                  "public record), preprocessor_config.json 841 B.",
        "files": {
            ".gitattributes": 1520,
            "README.md": 9120,
            "config.json": 5110,
            "model.safetensors": None,
            "preprocessor_config.json": 841,
        },
    },
    "usyd-community/vitpose-base-simple": {
        "commit": "a93ac0c67e0b7e2c55287d21d4c460c8f3c54d45",
        "source": "the Hub's tree page of main at a93ac0c ('Upload folder using huggingface_hub', 5 commits): "
                  ".gitattributes 1.52 kB, README.md 11.4 kB, config.json 1.8 kB, model.safetensors 344 MB, "
                  "preprocessor_config.json 363 B; the weights' exact size as docs/components.md §1.4 gives it "
                  "(the same sha256 on the HF staff's pre-release copy).",
        "files": {
            ".gitattributes": 1520,
            "README.md": 11400,
            "config.json": 1800,
            "model.safetensors": 343673076,
            "preprocessor_config.json": 363,
        },
    },
    # The line preprocessors (sdxl/lines.py).
    "lllyasviel/Annotators": {
        "commit": "982e7edaec38759d914a963c48c4726685de7d96",
        "source": "the Hub's stored commits/main page (head 982e7ed 'Upload clip_g.pth', 2023-08-27; the full hash "
                  "from public Hub cache snapshot paths) and the stored pages of the upload commits, whose LFS "
                  "pointers give the sizes: 9cf9fa9 ControlNetHED.pth 29,444,406 B; ffc2f17 sk_model.pth and "
                  "sk_model2.pth 17,173,511 B each; 850be79 netG.pth 217,631,959 B; b23789d erika.pth 172,789,563 B; "
                  "9a7d842 ControlNetLama.pth 204,597,536 B; e4b5a66 lama.ckpt 410,046,389 B; a mirror's blob page "
                  "at 83cbccd: body_pose_model.pth (209,267,595 B in public manifests pinned to 982e7ed). The repo "
                  "holds many more annotators (depth, segmentation, pose, ...): none is asked for, and only these "
                  "are listed.",
        "files": {
            ".gitattributes": None,
            "README.md": None,
            "ControlNetHED.pth": 29444406,
            "sk_model.pth": 17173511,
            "sk_model2.pth": 17173511,
            "netG.pth": 217631959,
            "erika.pth": 172789563,
            "body_pose_model.pth": 209267595,
            "ControlNetLama.pth": 204597536,
            "lama.ckpt": 410046389,
        },
    },
    # The detailer's detectors (sdxl/detailer.py). Each repo holds one folder per model version with the same files;
    # only the pinned version's folder is listed in full, the others by their model.onnx.
    "deepghs/anime_face_detection": {
        "commit": "784dc4c0bb692351ddcdbe6131a050b17d3025d5",
        "source": "the Hub's tree page of main at 784dc4c ('Sync README ... 2024-09-24', 14 commits, licence mit: "
                  "folders face_detect_v0_n/_s, v1_n/_s, v1.1_n/_s, v1.2_s, v1.3_n/_s, v1.4_n/_s, .gitattributes "
                  "1.48 kB, README.md) and the tree pages of its version folders (F1/PR/P/R curves, "
                  "confusion_matrix.png, labels.json 14 B, model.onnx 44.6 MB for _s and 12.1 MB for _n, model.pt, "
                  "results.csv, results.png, threshold.json 48 B). face_detect_v1.4_s's own tree page was not among "
                  "the stored pages: its files are listed as face_detect_v1.4_n's page lists them (its PR_curve.png "
                  "blob page, 85.6 kB, was stored); its model.onnx is 44,583,229 B as public download manifests "
                  "pinned to 784dc4c record it.",
        "files": {
            ".gitattributes": 1480,
            "README.md": None,
            "face_detect_v1.4_s/F1_curve.png": None,
            "face_detect_v1.4_s/PR_curve.png": 85600,
            "face_detect_v1.4_s/P_curve.png": None,
            "face_detect_v1.4_s/R_curve.png": None,
            "face_detect_v1.4_s/confusion_matrix.png": None,
            "face_detect_v1.4_s/labels.json": 14,
            "face_detect_v1.4_s/model.onnx": 44583229,
            "face_detect_v1.4_s/model.pt": None,
            "face_detect_v1.4_s/results.csv": None,
            "face_detect_v1.4_s/results.png": None,
            "face_detect_v1.4_s/threshold.json": 48,
            "face_detect_v1.4_n/model.onnx": 12100000,
            "face_detect_v1.3_s/model.onnx": 44600000,
            "face_detect_v1.3_n/model.onnx": 12100000,
            "face_detect_v1.2_s/model.onnx": 44600000,
            "face_detect_v1.1_s/model.onnx": None,
            "face_detect_v1.1_n/model.onnx": None,
            "face_detect_v1_s/model.onnx": 44600000,
            "face_detect_v1_n/model.onnx": 12100000,
            "face_detect_v0_s/model.onnx": None,
            "face_detect_v0_n/model.onnx": 12100000,
        },
    },
    "deepghs/anime_hand_detection": {
        "commit": "dba2c5bec15fcee9ac4909b244a84e8783cf46a2",
        "source": "the Hub's tree page of main at dba2c5b ('Update README.md', 16 commits, licence openrail: folders "
                  "hand_detect_v0.1_n/_s, v0.2_s ... v0.8_s, v1.0_n/_s, .gitattributes 1.52 kB) and the tree and "
                  "blob pages of its version folders (F1/PR/P/R curves, confusion_matrix.png, labels.json 14 B, "
                  "model.onnx 44.6 MB for _s and 12.1 MB for _n, model.pt, results.csv, results.png 228 kB for "
                  "v1.0_s, threshold.json 48 B); model.onnx of hand_detect_v1.0_s: 44,583,229 B as public download "
                  "manifests pinned to dba2c5b record it.",
        "files": {
            ".gitattributes": 1520,
            "README.md": None,
            "hand_detect_v1.0_s/F1_curve.png": None,
            "hand_detect_v1.0_s/PR_curve.png": None,
            "hand_detect_v1.0_s/P_curve.png": None,
            "hand_detect_v1.0_s/R_curve.png": None,
            "hand_detect_v1.0_s/confusion_matrix.png": None,
            "hand_detect_v1.0_s/labels.json": 14,
            "hand_detect_v1.0_s/model.onnx": 44583229,
            "hand_detect_v1.0_s/model.pt": None,
            "hand_detect_v1.0_s/results.csv": None,
            "hand_detect_v1.0_s/results.png": 228000,
            "hand_detect_v1.0_s/threshold.json": 48,
            "hand_detect_v1.0_n/model.onnx": 12100000,
            "hand_detect_v0.8_s/model.onnx": None,
            "hand_detect_v0.7_s/model.onnx": None,
            "hand_detect_v0.6_s/model.onnx": 44600000,
            "hand_detect_v0.5_s/model.onnx": None,
            "hand_detect_v0.4_s/model.onnx": None,
            "hand_detect_v0.3_s/model.onnx": None,
            "hand_detect_v0.2_s/model.onnx": None,
            "hand_detect_v0.1_s/model.onnx": 44600000,
            "hand_detect_v0.1_n/model.onnx": 12100000,
        },
    },
}


def placeholder(path: str, size: int | None) -> bytes:
    """Bytes standing in for a file the script must never fetch (its size scaled down)."""
    length = max(64, (size or 0) // SCALE)
    head = f"placeholder for {path}\n".encode()
    return (head * (length // len(head) + 1))[:length]
