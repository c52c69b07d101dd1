"""Tiled VAE decode and encode for large hires outputs, without seams.

At 2048² the SDXL VAE's full-resolution layers hold several 256- and 128-channel tensors of 2048² at once; a GPU
with less free memory than that fails the whole prediction after all the denoising is done. Here the layers at
high resolution run in tiles, with three things done so that the tiles do not show:

  * Only the high-resolution part is tiled. The decoder's conv_in and mid block (its self-attention included) and
    the encoder's mid block and output convs run at latent resolution (1/64 of the pixels) on the whole image,
    exactly as untiled.
  * Each tile is computed with a margin (HALO latent pixels, 128 image pixels) of real neighbouring content, wider
    than the receptive field of the tiled layers (about 2.5 latent pixels: only the last two up blocks and the
    first two down blocks run in tiles, the others run on the whole image), and tiles overlap and are blended with
    linear ramps over the overlap.
  * GroupNorm statistics are the whole image's, not the tile's. A GroupNorm normalises with the mean and variance
    of its input over the whole image; a tile's own statistics differ from tile to tile, and that is what makes
    the tone steps at tile borders of per-tile tiling (diffusers' `enable_tiling`: on the tiny test VAE, in 8-latent
    tiles, its decode is off the untiled one by a mean of 0.25 and up to 3.7 in the [-1, 1] range; this module's by
    0.017 and 0.30). A first pass over the tiles records every GroupNorm's sums over each tile's own core (each
    pixel counted once); the second pass normalises every tile with those global statistics. The first pass
    normalises with per-tile statistics, so the recorded statistics of all but the first tiled GroupNorm are
    estimates (more recording passes do not converge faster than one layer per pass): tiled and untiled agree
    closely, not bit for bit. With exact statistics the tiles reproduce the untiled decode to 1e-4
    (test_folder/test_upscale.py states the tolerances).

When to tile (`should_tile`): on CUDA when an estimate of the untiled pass's memory exceeds what is free (so a
card with room, an H200 at 2048², gets the exact untiled decode), and on every device above VAE_TILE_ABOVE_PIXELS
when an owner sets it (off by default; tests set it to run the tiles on the CPU). Run inside torch.inference_mode (the pipelines' own decode runs under no_grad too).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TILE = 96  # latent pixels of a tile's core (768 image pixels)
# Latent pixels of context around each core: far wider than the receptive field of the tiled layers (about 2.5
# latent pixels), because the first pass normalises each tile with its own statistics, and the more of the
# image a tile sees the closer they are to the whole image's (on the tiny VAE in 8-pixel tiles: a mean error of
# 0.017 with 8 pixels of halo, 0.088 with 4). Costs (96 + 2 * 18)² / 96² = 1.9x the tiled layers' work a pass.
HALO = 16
PASSES = 1  # statistics-recording passes before the pass that makes the output (see the module docstring)
# The blocks at 1/8 and 1/4 of the image's resolution run untiled (1 GB at 2048² for SDXL's widest): fewer
# GroupNorms are left whose statistics must be estimated.
GLOBAL_BLOCKS = 2
TILE_ABOVE_PIXELS = int(float(os.environ.get("VAE_TILE_ABOVE_PIXELS", 0)))  # 0: only when memory is short
# Peak memory of an untiled decode, per output pixel and per channel of the widest full-resolution block: the
# decoder's last up block reads a 256-channel tensor at full size (SDXL: block_out_channels (128, 256, 512, 512))
# while its input, output and the residual are alive; counted generously (x6) so that "fits" means it does.
DECODE_BYTES_FACTOR = 6


def should_tile(vae, size: tuple[int, int], device: torch.device, encode: bool = False, batch: int = 1) -> bool:
    """Whether `size` (width, height) is decoded (or encoded) in tiles: on CUDA when the estimate of one pass over
    `batch` images (the pipeline decodes a request's images at once) does not fit in free memory; anywhere above
    TILE_ABOVE_PIXELS when that is set."""
    width, height = size
    if TILE_ABOVE_PIXELS and width * height > TILE_ABOVE_PIXELS:
        return True
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the caching allocator's own
    return estimate_bytes(vae, size) * batch > free


def estimate_bytes(vae, size: tuple[int, int]) -> int:
    """A generous estimate of an untiled decode's (or encode's, which is smaller) peak activation memory."""
    width, height = size
    channels = sorted(vae.config.block_out_channels)
    widest_full_res = max(channels[:2])  # the two highest-resolution levels run at 1x and 2x... the 2x one upsampled
    itemsize = 4 if getattr(vae.config, "force_upcast", False) else torch.finfo(vae.dtype).bits // 8
    return DECODE_BYTES_FACTOR * widest_full_res * width * height * itemsize


# --- GroupNorm with whole-image statistics ---------------------------------------------------------------------
@dataclass
class _Tile:
    """The tile being run: its input size and core box (rows, columns) in the input's pixels."""

    in_size: tuple[int, int] = (1, 1)
    core: tuple[int, int, int, int] = (0, 1, 0, 1)


@dataclass
class _Stats:
    sums: dict = field(default_factory=dict)  # norm index -> (sum per group, sum of squares per group, count)
    recording: bool = True
    using: Optional[dict] = None  # the statistics to normalise with (the last pass's); None: the tile's own
    tile: _Tile = field(default_factory=_Tile)


class _WholeImageGroupNorm(torch.nn.Module):
    """Stands in for one GroupNorm during a tiled call: records the sums over the tile's core (pass 1, normalising
    like the GroupNorm itself), or normalises with the whole image's statistics (pass 2)."""

    def __init__(self, norm: torch.nn.Module, index: int, stats: _Stats) -> None:
        super().__init__()
        self.norm, self.index, self.stats = norm, index, stats
        self.groups = norm.num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.stats
        if stats.recording:
            in_h, in_w = stats.tile.in_size
            fy, fx = x.shape[-2] / in_h, x.shape[-1] / in_w
            r0, r1, c0, c1 = stats.tile.core
            core = x[..., round(r0 * fy):round(r1 * fy), round(c0 * fx):round(c1 * fx)]
            values = core.reshape(self.groups, -1).to(torch.float32 if x.device.type == "mps" else torch.float64)
            total, squares, count = stats.sums.get(self.index, (0.0, 0.0, 0))
            stats.sums[self.index] = (total + values.sum(-1), squares + (values * values).sum(-1),
                                      count + values.shape[-1])
            if stats.using is None:
                return self.norm(x)
        total, squares, count = (stats.using if stats.recording else stats.sums)[self.index]
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        per_group = x.shape[1] // self.groups
        scale = torch.rsqrt(var + self.norm.eps).float().repeat_interleave(per_group)
        shift = (-mean.float()).repeat_interleave(per_group) * scale
        if self.norm.weight is not None:
            scale = scale * self.norm.weight.float()
            shift = shift * self.norm.weight.float() + self.norm.bias.float()
        view = (1, -1, 1, 1)
        return (x.float() * scale.view(view) + shift.view(view)).to(x.dtype)


def _is_group_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.GroupNorm) or type(module).__name__ == "ParallelGroupNorm"


@contextlib.contextmanager
def _whole_image_norms(modules: list[torch.nn.Module], stats: _Stats) -> Iterator[None]:
    """Every GroupNorm under `modules` replaced by a _WholeImageGroupNorm for the block; put back however it ends."""
    swaps = [(parent, name, child) for module in modules for parent in module.modules()
             for name, child in parent.named_children() if _is_group_norm(child)]
    try:
        for index, (parent, name, child) in enumerate(swaps):
            setattr(parent, name, _WholeImageGroupNorm(child, index, stats))
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


# --- tiles -----------------------------------------------------------------------------------------------------
def _starts(length: int, tile: int) -> list[int]:
    """Core starts covering `length` in tiles of at most `tile`, equal in size."""
    count = max(1, math.ceil(length / tile))
    return [round(i * length / count) for i in range(count)] + [length]


def ramp(length: int, before: int, after: int, device) -> torch.Tensor:
    """Blend weights of a tile along one axis: 1 inside, rising linearly over `before` pixels at the start and
    falling over `after` at the end; the caller divides by the summed weights. Also sdxl/upscale.py's tiles."""
    weight = torch.ones(length, device=device)
    if before:
        weight[:before] = (torch.arange(before, device=device) + 0.5) / before
    if after:
        weight[length - after:] = torch.minimum(weight[length - after:],
                                                (torch.arange(after, 0, -1, device=device) - 0.5) / after)
    return weight


def _run_tiles(run, source: torch.Tensor, grid: tuple[int, int], factor: float, stats: _Stats, *, tile: int,
               halo: int, blend: int, passes: int, label: str) -> torch.Tensor:
    """`run` (the tiled layers) over `source` in tiles: pass 1 records the GroupNorm statistics, pass 2 makes the
    output. `grid` is the latent size; `source` is at `in_per_latent` x that size; the output at `factor` x the
    latent size. Cores are blended over `blend` latent pixels on each side into their neighbours."""
    from sdxl.progress import Progress

    lat_h, lat_w = grid
    in_per_latent = source.shape[-1] // lat_w
    rows, cols = _starts(lat_h, tile), _starts(lat_w, tile)
    boxes = [(rows[i], rows[i + 1], cols[j], cols[j + 1]) for i in range(len(rows) - 1) for j in range(len(cols) - 1)]
    progress = Progress(label, (passes + 1) * len(boxes))
    out = weight = None
    for recording in [True] * passes + [False]:
        if recording and stats.sums:  # a later recording pass normalises with the previous pass's statistics
            stats.using, stats.sums = stats.sums, {}
        stats.recording = recording
        for r0, r1, c0, c1 in boxes:
            # the core grown by the blend band (blended with the neighbour's), then by the halo (context only)
            b0, b1 = max(0, r0 - blend), min(lat_h, r1 + blend)
            d0, d1 = max(0, c0 - blend), min(lat_w, c1 + blend)
            h0, h1 = max(0, b0 - halo), min(lat_h, b1 + halo)
            w0, w1 = max(0, d0 - halo), min(lat_w, d1 + halo)
            piece = source[..., h0 * in_per_latent:h1 * in_per_latent, w0 * in_per_latent:w1 * in_per_latent]
            stats.tile = _Tile(in_size=(h1 - h0, w1 - w0), core=(r0 - h0, r1 - h0, c0 - w0, c1 - w0))
            result = run(piece)
            progress.update()
            if recording:
                continue
            f = factor
            crop = result[..., round((b0 - h0) * f):round((b1 - h0) * f), round((d0 - w0) * f):round((d1 - w0) * f)]
            if out is None:
                out = torch.zeros(result.shape[0], result.shape[1], round(lat_h * f), round(lat_w * f),
                                  device=result.device, dtype=torch.float32)
                weight = torch.zeros(1, 1, out.shape[-2], out.shape[-1], device=result.device, dtype=torch.float32)
            mask = (ramp(crop.shape[-2], round((r0 - b0) * 2 * f), round((b1 - r1) * 2 * f), crop.device)[:, None] *
                    ramp(crop.shape[-1], round((c0 - d0) * 2 * f), round((d1 - c1) * 2 * f), crop.device)[None, :])
            out[..., round(b0 * f):round(b1 * f), round(d0 * f):round(d1 * f)] += crop.float() * mask
            weight[..., round(b0 * f):round(b1 * f), round(d0 * f):round(d1 * f)] += mask
    return out / weight


def tiled_decode(vae, z: torch.Tensor, *, tile: int = TILE, halo: int = HALO, blend: int = 2,
                 passes: int = PASSES) -> torch.Tensor:
    """`vae.decode(z).sample` computed in tiles (see the module docstring); z: (n, 4, h, w), unscaled latents."""
    started = time.perf_counter()
    decoder = vae.decoder
    images = []
    for one in z.split(1):
        if vae.post_quant_conv is not None:
            one = vae.post_quant_conv(one)
        features = decoder.mid_block(decoder.conv_in(one), None)  # latent resolution: the whole image at once
        grid = tuple(features.shape[-2:])
        for up_block in decoder.up_blocks[:GLOBAL_BLOCKS]:  # 1/8 and 1/4 resolution: the whole image too
            features = up_block(features, None)

        def tail(piece: torch.Tensor) -> torch.Tensor:
            for up_block in decoder.up_blocks[GLOBAL_BLOCKS:]:
                piece = up_block(piece, None)
            return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(piece)))

        stats = _Stats()
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        with _whole_image_norms([decoder], stats):  # those run in tiles: the last up blocks', conv_norm_out
            image = _run_tiles(tail, features, grid, factor, stats, tile=tile, halo=halo, blend=blend,
                               passes=passes, label="vae decode tiles")
        images.append(image.to(z.dtype))
    logger.info("tiled VAE decode of %d latents %s in %.2fs", z.shape[0], tuple(z.shape[-2:]),
                time.perf_counter() - started)
    return torch.cat(images)


def tiled_encode_moments(vae, x: torch.Tensor, *, tile: int = TILE, halo: int = HALO, blend: int = 2,
                         passes: int = PASSES) -> torch.Tensor:
    """The moments `vae.encode(x)` computes (mean and log-variance, before DiagonalGaussianDistribution), in tiles;
    x: (n, 3, H, W) in [-1, 1], H and W multiples of the VAE's scale factor."""
    started = time.perf_counter()
    encoder = vae.encoder
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    moments = []
    for one in x.split(1):
        grid = (one.shape[-2] // factor, one.shape[-1] // factor)

        tiled = len(encoder.down_blocks) - GLOBAL_BLOCKS

        def head(piece: torch.Tensor) -> torch.Tensor:
            piece = encoder.conv_in(piece)
            for down_block in encoder.down_blocks[:tiled]:
                piece = down_block(piece)
            return piece

        stats = _Stats()
        with _whole_image_norms([encoder.down_blocks[:tiled]], stats):
            features = _run_tiles(head, one, grid, factor / 2 ** tiled, stats, tile=tile, halo=halo, blend=blend,
                                  passes=passes, label="vae encode tiles").to(one.dtype)
        for down_block in encoder.down_blocks[tiled:]:  # 1/4 and 1/8 resolution: the whole image at once
            features = down_block(features)
        h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(features))))
        if vae.quant_conv is not None:
            h = vae.quant_conv(h)
        moments.append(h)
    logger.info("tiled VAE encode of %d images %s in %.2fs", x.shape[0], tuple(x.shape[-2:]),
                time.perf_counter() - started)
    return torch.cat(moments)


# --- the hires pass's encode and decode, as the diffusers SDXL pipelines do them -----------------------------------
@contextlib.contextmanager
def _upcast(vae, upcast: bool) -> Iterator[torch.dtype]:
    """The VAE in float32 for the block when `upcast`, as the pipelines do it; yields the dtype it runs in."""
    dtype = vae.dtype
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            vae.to(dtype=dtype)


def _latents_stats(vae, device, dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return (torch.tensor(mean).view(1, -1, 1, 1).to(device, dtype), torch.tensor(std).view(1, -1, 1, 1).to(device, dtype))


def encode_images(pipe, images: list, generators: list, *, tile: int = TILE, halo: int = HALO) -> torch.Tensor:
    """The img2img pipeline's initial latents for `images` (PIL), encoded in tiles: the same preprocessing, the same
    draw from each image's own generator (latent_dist.sample), the same scaling, so that passing them as `image`
    (4 channels: used as they are) continues exactly as the pipeline's own encode would."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    vae = pipe.vae
    device = pipe._execution_device
    dtype = vae.dtype  # the model's (prompt embeddings') dtype, which the pipeline casts its latents to
    pixels = pipe.image_processor.preprocess(images)
    with torch.inference_mode(), _upcast(vae, bool(vae.config.force_upcast)) as run_dtype:
        pixels = pixels.to(device=device, dtype=run_dtype)
        latents = []
        for i in range(pixels.shape[0]):
            moments = tiled_encode_moments(vae, pixels[i:i + 1], tile=tile, halo=halo)
            latents.append(DiagonalGaussianDistribution(moments).sample(generators[i]))
    latents = torch.cat(latents).to(dtype)
    stats = _latents_stats(vae, device, dtype)
    if stats is not None:
        return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
    return vae.config.scaling_factor * latents


def decode_latents(pipe, latents: torch.Tensor, *, tile: int = TILE, halo: int = HALO) -> list:
    """What the pipeline's own decode makes of its final latents (output_type="latent"), decoded in tiles: PIL
    images."""
    vae = pipe.vae
    with torch.inference_mode(), _upcast(vae, vae.dtype == torch.float16 and bool(vae.config.force_upcast)) as dtype:
        latents = latents.to(dtype)
        stats = _latents_stats(vae, latents.device, latents.dtype)
        if stats is not None:
            latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
        else:
            latents = latents / vae.config.scaling_factor
        image = tiled_decode(vae, latents, tile=tile, halo=halo)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")
