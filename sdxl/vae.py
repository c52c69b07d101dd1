"""A user's SDXL VAE (the `vae` input): loading a fetched file or diffusers folder, the fp16 decode decision, and
using it for one prediction in place of the model's own.

    user_vae = load_vae(file, weights_dir, device, dtype, baked_vae)   # once per file; the Predictor keeps one
    with swapped(model, user_vae):                                       # every pipeline of `model` decodes with it
        images = pipe(...).images
    # here each pipeline's .vae is the very object it was before
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

import utils
import weights

logger = logging.getLogger(__name__)
INPUT = "vae"


def user_vae_needs_upcast(dtype: torch.dtype, config_force_upcast: bool, single_file: bool,
                          same_as_fp16_fix: bool) -> bool:
    """Whether diffusers must decode this VAE in float32 (its `force_upcast`). Only the fp16-fix VAE decodes safely
    in float16 (the original SDXL VAE overflows to NaN, a black image): a single file gets the fp16-fix VAE's
    config, so it is upcast unless its weights are the fp16-fix VAE's; a diffusers folder says so in its own
    config (stabilityai/sdxl-vae: true, madebyollin/sdxl-vae-fp16-fix: false). No effect outside float16."""
    if dtype != torch.float16:
        return False
    if single_file:
        return not same_as_fp16_fix
    return bool(config_force_upcast)


def load_vae(file: weights.LoraFile, weights_dir: Path, device: torch.device, dtype: torch.dtype,
             baked_vae: Any) -> Any:
    """The AutoencoderKL of a fetched `vae` (single A1111/SGM file converted with the fp16-fix VAE's config, or a
    diffusers folder), on `device` in `dtype`, with force_upcast decided by user_vae_needs_upcast."""
    from diffusers import AutoencoderKL

    single = not file.path.is_dir()
    try:
        if single:
            model = AutoencoderKL.from_single_file(str(file.path), config=str(weights_dir / utils.VAE_DIR),
                                                   local_files_only=True, torch_dtype=dtype)
        else:
            model = AutoencoderKL.from_pretrained(str(file.path), torch_dtype=dtype)
    except Exception as err:  # a file whose keys passed the check but whose shapes do not fit an SDXL VAE
        raise utils.InputError(f"{INPUT}: {file.ref.display} does not load as an SDXL VAE: "
                               f"{type(err).__name__}: {str(err)[:200]}") from err
    if tuple(model.config.block_out_channels) != tuple(baked_vae.config.block_out_channels) or \
            model.config.latent_channels != baked_vae.config.latent_channels:
        raise utils.InputError(f"{INPUT}: {file.ref.display} is not an SDXL VAE for this model: expected "
                               f"block_out_channels {list(baked_vae.config.block_out_channels)} and "
                               f"{baked_vae.config.latent_channels} latent channels, got "
                               f"{list(model.config.block_out_channels)} and {model.config.latent_channels}")
    model = model.to(device).eval()
    upcast = user_vae_needs_upcast(dtype, bool(model.config.get("force_upcast", True)), single,
                                   single and not utils.vae_needs_upcast(model, baked_vae))
    model.register_to_config(force_upcast=upcast)
    return utils.fast_vae(model, device)


def _pipelines(model: utils.LoadedModel) -> list:
    pipes = [model.txt2img, model.img2img, model.inpaint, *model.runs.values()]
    return list({id(p): p for p in pipes}.values())


@contextlib.contextmanager
def swapped(model: utils.LoadedModel, user_vae: Any | None) -> Iterator[None]:
    """Every pipeline of `model` decodes (and encodes img2img inputs) with `user_vae` inside the block; the model's
    own VAE is back afterwards, however the block ends. None: nothing changes."""
    if user_vae is None:
        yield
        return
    pipes = _pipelines(model)
    saved = [(pipe, pipe.vae) for pipe in pipes]
    try:
        for pipe in pipes:
            pipe.vae = user_vae
        yield
    finally:
        for pipe, own in saved:
            pipe.vae = own
        # A pipeline made inside the block (a step-cached or graphed twin, built from_pipe on first use) copied
        # the user VAE: give it the model's own, which every pipeline of a model shares.
        for pipe in _pipelines(model):
            if pipe.vae is user_vae:
                pipe.vae = model.txt2img.vae
