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

from sdxl.graphs import GraphRunner, UNetStandIn, graph_inputs, unet_call, unet_output

DEFAULT_INTERVAL = 3  # one full UNet evaluation every 3 steps


class StepCachedUNet(UNetStandIn):
    """With a GraphRunner, the full and the shallow steps each replay a CUDA graph (graphs.py)."""

    def __init__(self, unet: torch.nn.Module, interval: int = DEFAULT_INTERVAL, runner: GraphRunner | None = None):
        super().__init__(unet)
        if interval < 1:
            raise ValueError(f"interval: expected >= 1, got {interval}")
        self.interval = interval
        self.runner = runner
        self.calls = 0
        self.full_calls = 0
        self._deep: torch.Tensor | None = None

    def reset(self) -> None:
        """Start a new denoising loop: the next call is a full step."""
        self.calls = 0
        self.full_calls = 0
        self._deep = None

    def begin(self) -> None:
        self.reset()
        if self.runner is not None:
            self.runner.begin(self.unet)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs: Any):
        full = self._deep is None or self._deep.shape[0] != sample.shape[0] or self.calls % self.interval == 0
        self.calls += 1
        inputs = graph_inputs(sample, timestep, encoder_hidden_states, **kwargs) if self.runner else None
        if full:
            self.full_calls += 1
            if inputs is None:
                out, self._deep = self._full(lambda: self.unet(sample, timestep, encoder_hidden_states, **kwargs))
            else:
                out, self._deep = self.runner.run("full", lambda s: self._full(lambda: unet_call(self.unet, s)),
                                                  inputs)
        elif inputs is None:
            out = self._shallow(sample, timestep, encoder_hidden_states, self._deep, **kwargs)
        else:
            (out,) = self.runner.run("shallow", lambda s: (self._shallow(
                s["sample"], s["timestep"], s["encoder_hidden_states"], s["deep"],
                added_cond_kwargs=dict(text_embeds=s["text_embeds"], time_ids=s["time_ids"])),),
                {**inputs, "deep": self._deep})
        return unet_output(out, return_dict)

    def _full(self, call) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole UNet (call()), and the input of its last up block: the deep features the shallow steps reuse."""
        kept: list[torch.Tensor] = []

        def keep(_module, args, block_kwargs):
            kept.append(block_kwargs["hidden_states"] if "hidden_states" in block_kwargs else args[0])

        handle = self.unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = call().sample
        finally:
            handle.remove()
        return out, kept[0]

    def _shallow(self, sample, timestep, encoder_hidden_states, deep, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, **_ignored) -> torch.Tensor:
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
        block_kwargs = dict(hidden_states=deep, temb=emb, res_hidden_states_tuple=tuple(skips[-len(last.resnets):]))
        if getattr(last, "has_cross_attention", False):
            block_kwargs.update(encoder_hidden_states=encoder_hidden_states,
                                cross_attention_kwargs=cross_attention_kwargs)
        out = last(**block_kwargs)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)


def supports_step_cache(unet: torch.nn.Module) -> bool:
    """The shallow path needs the SDXL layout: no attention and no extra inputs at the outermost level."""
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    return (not getattr(first, "has_cross_attention", False) and not getattr(last, "has_cross_attention", False)
            and getattr(unet, "class_embedding", None) is None and len(first.resnets) + 1 == len(last.resnets))
