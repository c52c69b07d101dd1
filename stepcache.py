"""go_fast: step caching for the SDXL UNet (the DeepCache idea: deep features change slowly between steps).

On a full step the whole UNet runs and the input of its last up block (the deep features, at full latent
resolution) is kept. On the steps in between only the shallow path runs: time embedding, conv_in, the first down
block's ResNets (the skip connections the last up block needs), the last up block fed with the kept features, and
the output convolution. That path is a few percent of the UNet's arithmetic, so with a full step every
`interval` steps the denoising loop does roughly 1/interval of the work. It changes the image (lossy); the exact
mode never goes through here.

`StepCachedUNet` stands in for the UNet inside a pipeline built with `from_pipe(..., unet=...)`; it shares the
real UNet (and so its merged LoRA weights) and answers the few attributes the SDXL pipelines read from a UNet.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_INTERVAL = 3  # one full UNet evaluation every 3 steps


class StepCachedUNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, interval: int = DEFAULT_INTERVAL) -> None:
        super().__init__()
        if interval < 1:
            raise ValueError(f"interval: expected >= 1, got {interval}")
        self.unet = unet
        self.interval = interval
        self.calls = 0
        self.full_calls = 0
        self._deep: torch.Tensor | None = None

    # The attributes the SDXL pipelines read from their UNet.
    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def add_embedding(self):
        return self.unet.add_embedding

    @property
    def encoder_hid_proj(self):
        return self.unet.encoder_hid_proj

    def reset(self) -> None:
        """Start a new denoising loop: the next call is a full step."""
        self.calls = 0
        self.full_calls = 0
        self._deep = None

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs: Any):
        full = self._deep is None or self._deep.shape[0] != sample.shape[0] or self.calls % self.interval == 0
        self.calls += 1
        if full:
            self.full_calls += 1
            return self._full(sample, timestep, encoder_hidden_states, **kwargs)
        return self._shallow(sample, timestep, encoder_hidden_states, **kwargs)

    def _full(self, sample, timestep, encoder_hidden_states, **kwargs):
        def keep(_module, args, block_kwargs):
            self._deep = block_kwargs["hidden_states"] if "hidden_states" in block_kwargs else args[0]

        handle = self.unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            return self.unet(sample, timestep, encoder_hidden_states, **kwargs)
        finally:
            handle.remove()

    def _shallow(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict: bool = True, **_ignored):
        """UNet2DConditionModel.forward restricted to the outermost level (SDXL: no attention there)."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs or {})
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        skips = [hidden]
        for resnet in unet.down_blocks[0].resnets:
            hidden = resnet(hidden, emb)
            skips.append(hidden)
        last = unet.up_blocks[-1]
        block_kwargs = dict(hidden_states=self._deep, temb=emb, res_hidden_states_tuple=tuple(skips[-len(last.resnets):]))
        if getattr(last, "has_cross_attention", False):
            block_kwargs.update(encoder_hidden_states=encoder_hidden_states,
                                cross_attention_kwargs=cross_attention_kwargs)
        out = last(**block_kwargs)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        out = unet.conv_out(out)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def supports_step_cache(unet: torch.nn.Module) -> bool:
    """The shallow path needs the SDXL layout: no attention and no extra inputs at the outermost level."""
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    return (not getattr(first, "has_cross_attention", False) and not getattr(last, "has_cross_attention", False)
            and getattr(unet, "class_embedding", None) is None and len(first.resnets) + 1 == len(last.resnets))
