"""go_fast: step caching for the SDXL UNet (the DeepCache idea: deep features change slowly between steps).

On a full step the whole UNet runs and the input of its last up block (the deep features, at full latent
resolution) is kept. On the steps in between only the shallow path runs: time embedding, conv_in, the first down
block's ResNets (the skip connections the last up block needs), the last up block fed with the kept features, and
the output convolution. That path is a few percent of the UNet's arithmetic, so with a full step every
`interval` steps the denoising loop does roughly 1/interval of the work. It changes the image (lossy); the exact
mode never goes through here.

go_fast also stops classifier-free guidance for the second half of the schedule (timesteps below
GUIDANCE_CUTOFF_TIMESTEP), as diffusers' SDXL CFG-cutoff callback and A1111's NGMS do: guidance shapes the
composition early, while late steps refine detail. There the guided batch [unconditional, conditional] runs as its
conditional half only, and that prediction is handed back for both halves, so the pipeline's own guidance formula
(uncond + g * (cond - uncond)) gives the conditional prediction exactly; the pipeline is not touched, so every mode
and sampler works unchanged, and the deep features kept for the step cache are cut to the same half.

`StepCachedUNet` stands in for the UNet inside a pipeline built with `from_pipe(..., unet=...)`; it shares the
real UNet (and so its merged LoRA weights) and answers the few attributes the SDXL pipelines read from a UNet.
"""

from __future__ import annotations

from typing import Any

import torch

from sdxl.graphs import GraphRunner, UNetStandIn, graph_inputs, unet_call, unet_output

DEFAULT_INTERVAL = 3  # one full UNet evaluation every 3 steps
# Timesteps (of the 1000 every SDXL scheduler here counts in) below which go_fast runs without guidance: the second
# half of a txt2img schedule, whatever the sampler.
GUIDANCE_CUTOFF_TIMESTEP = 500


def first_timestep(timestep) -> float:
    """The loop's timestep as a number (a 0-d or per-image tensor, or a Python number)."""
    return float(torch.as_tensor(timestep).reshape(-1)[0])


def conditional_half(value, images: int):
    """`value` with only its conditional rows (the last `images` of a guided batch of 2 x images): tensors of that
    batch are cut, lists and dicts element by element, anything else (a 0-d timestep, a scale) is kept."""
    if isinstance(value, torch.Tensor):
        return value[images:] if value.dim() > 0 and value.shape[0] == 2 * images else value
    if isinstance(value, (list, tuple)):
        return type(value)(conditional_half(v, images) for v in value)
    if isinstance(value, dict):
        return {k: conditional_half(v, images) for k, v in value.items()}
    return value


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
        self.unguided_calls = 0
        self._deep: torch.Tensor | None = None
        # Images per half of the loop's guided batch, when its guidance stops at GUIDANCE_CUTOFF_TIMESTEP.
        self.guided_images: int | None = None

    def reset(self) -> None:
        """Start a new denoising loop: the next call is a full step."""
        self.calls = 0
        self.full_calls = 0
        self.unguided_calls = 0
        self._deep = None

    def begin(self, guided_images: int | None = None) -> None:
        """Before a loop. guided_images: the loop runs classifier-free guidance over a batch of 2 x guided_images
        (unconditional first), which stops below GUIDANCE_CUTOFF_TIMESTEP; None keeps guidance to the end."""
        if guided_images is not None and guided_images < 1:
            raise ValueError(f"guided_images: expected >= 1 or None, got {guided_images}")
        self.reset()
        self.guided_images = guided_images
        if self.runner is not None:
            self.runner.begin(self.unet)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs: Any):
        n = self.guided_images
        # A host read of the timestep each step: it waits for the GPU (the measured go_fast figure includes that
        # stall; reading the loop's schedule once would avoid it, bench/NOTES.md session 7).
        unguided = (n is not None and sample.shape[0] == 2 * n
                    and first_timestep(timestep) < GUIDANCE_CUTOFF_TIMESTEP)
        if unguided:
            self.unguided_calls += 1
            sample, encoder_hidden_states = sample[n:], conditional_half(encoder_hidden_states, n)
            kwargs = conditional_half(kwargs, n)
            if self._deep is not None and self._deep.shape[0] == 2 * n:
                self._deep = self._deep[n:]  # rows are independent: the conditional half's deep features
        out = self._step(sample, timestep, encoder_hidden_states, **kwargs)
        if unguided:
            out = torch.cat([out, out])  # uncond == cond: the pipeline's guidance formula returns cond exactly
        return unet_output(out, return_dict)

    def _step(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One step of the step cache: the whole UNet, or the shallow path on the kept deep features."""
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
        return out

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
