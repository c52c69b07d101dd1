"""What a first real deploy relies on, on the tiny weights: setup() refuses a pickle-only safety checker, and a
custom checkpoint's own VAE is decoded in fp32 on fp16 GPUs unless it is exactly the fp16-fix VAE."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import utils
from ldm_checkpoint import write_ldm_checkpoint
from utils import MODEL_DIRS, SAFETY_DIR, VAE_DIR


def weights_with_pickle_checker(tiny_weights: Path, root: Path) -> Path:
    """The tiny weights, except that the safety checker is what its Hub repo holds: a .bin, no safetensors."""
    for entry in tiny_weights.iterdir():
        if entry.name != SAFETY_DIR:
            (root / entry.name).symlink_to(entry)
    checker = root / SAFETY_DIR
    checker.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_weights / SAFETY_DIR / name, checker / name)
    torch.save(load_file(str(tiny_weights / SAFETY_DIR / "model.safetensors")), checker / "pytorch_model.bin")
    return root


def test_setup_refuses_a_pickle_only_safety_checker(tiny_weights: Path, tmp_path: Path):
    root = weights_with_pickle_checker(tiny_weights, tmp_path)
    with pytest.raises(utils.WeightsMissingError) as raised:
        utils.load_models(root, torch.device("cpu"), torch.float32)
    message = str(raised.value)
    assert str(root / SAFETY_DIR) in message and "script/download_weights" in message
    assert "pytorch_model.bin" in message and "never loads" in message
    utils.check_weights_dir(tiny_weights)  # the safetensors layout passes


@pytest.fixture(scope="module")
def shared_vae(tiny_weights: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_weights / VAE_DIR, use_safetensors=True)


def custom_checkpoint(tiny_weights: Path, out: Path, vae_dir: Path):
    """load_checkpoint_model on a single file that bakes in the VAE of `vae_dir` (CPU, fp32)."""
    checkpoint = write_ldm_checkpoint(tiny_weights / MODEL_DIRS["illustrious"], vae_dir, out)
    info = utils.inspect_checkpoint(checkpoint)
    assert info.has_vae
    spec = utils.checkpoint_spec("custom", out.stem)
    from diffusers import AutoencoderKL

    shared = AutoencoderKL.from_pretrained(tiny_weights / VAE_DIR, use_safetensors=True)
    return utils.load_checkpoint_model(checkpoint, tiny_weights, torch.device("cpu"), torch.float32, shared, info, spec)


def test_checkpoint_vae_upcast_only_unless_it_is_the_fp16_fix_vae(tiny_weights: Path, shared_vae, tmp_path: Path):
    # The checkpoint bakes in the fp16-fix VAE itself: decoded as the shared VAE is (no upcast).
    same = custom_checkpoint(tiny_weights, tmp_path / "same-vae.safetensors", tiny_weights / VAE_DIR)
    assert same.txt2img.vae.config.force_upcast is False
    assert utils.vae_needs_upcast(same.txt2img.vae, shared_vae) is False

    # Another VAE (the original SDXL VAE in real checkpoints): one tensor differs -> decoded in fp32 on fp16 GPUs.
    other_dir = tmp_path / "other-vae"
    shutil.copytree(tiny_weights / VAE_DIR, other_dir)
    tensors = load_file(str(other_dir / "diffusion_pytorch_model.safetensors"))
    key = next(k for k in sorted(tensors) if k.startswith("decoder.") and k.endswith(".weight"))
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(other_dir / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    other = custom_checkpoint(tiny_weights, tmp_path / "other-vae.safetensors", other_dir)
    assert other.txt2img.vae.config.force_upcast is True
    assert utils.vae_needs_upcast(other.txt2img.vae, shared_vae) is True
    # The shared fp16-fix VAE keeps its own config: other models are not slowed down.
    assert shared_vae.config.force_upcast is False


def test_vae_needs_upcast_compares_every_tensor(shared_vae):
    import copy

    twin = copy.deepcopy(shared_vae)
    assert utils.vae_needs_upcast(twin, shared_vae) is False
    with torch.no_grad():
        next(iter(twin.parameters())).view(-1)[0] += 1e-3
    assert utils.vae_needs_upcast(twin, shared_vae) is True
    # Another dtype is not the same bytes either.
    assert utils.vae_needs_upcast(copy.deepcopy(shared_vae).half(), shared_vae) is True
