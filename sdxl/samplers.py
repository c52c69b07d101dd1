"""Euler a without a GPU stall per step.

diffusers' ancestral Euler step draws each step's noise from the request's CPU generators (seed + i per image, so
a seed gives the same picture on any device) and moves it to the GPU with a blocking copy. A blocking copy waits
for the GPU to finish everything queued, so every step the GPU runs dry while Python prepares the next step (the
graphed UNet step itself is one launch): ~30 ms of a 30-step 1024² image on an H200 (bench/NOTES.md, session 7).

`EulerAncestral` computes the same step in the same float32 arithmetic, with the noise drawn from the same
generators in the same order, but copied from pinned memory without blocking; the picture is bit for bit diffusers'
(test_sampling.py). Anything it does not cover (no generator, a GPU generator, another prediction type) goes to
diffusers' own step.
"""

from __future__ import annotations

import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput


def cpu_noise(shape: tuple, dtype: torch.dtype, device: torch.device, generator) -> torch.Tensor:
    """Standard normal noise of `shape` drawn on the CPU from `generator` (one generator, or one per image: each
    draws its own image's slice, in order), on `device`. The copy to a GPU does not block the host."""
    generators = generator if isinstance(generator, list) else [generator]
    if len(generators) == 1:
        noise = torch.randn(shape, generator=generators[0], dtype=dtype)
    else:
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=generators[i], dtype=dtype) for i in range(shape[0])])
    if device.type != "cuda":
        return noise.to(device)
    # Pinned memory is what makes the copy asynchronous; torch's host allocator keeps the buffer until it is done.
    return noise.pin_memory().to(device, non_blocking=True)


def _cpu_generators(generator) -> bool:
    generators = generator if isinstance(generator, list) else [generator]
    return bool(generators) and all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in generators)


class EulerAncestral(EulerAncestralDiscreteScheduler):
    """A1111's "Euler a" (diffusers' EulerAncestralDiscreteScheduler) with non-blocking noise; same images."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        kind = self.config.prediction_type
        if (not _cpu_generators(generator) or kind not in ("epsilon", "v_prediction")
                or isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point())):
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x = sample.to(torch.float32)  # the step runs in float32 whatever the model's dtype
        if kind == "epsilon":
            denoised = x - sigma * model_output
        else:  # v-prediction: the model's output is scaled by c_out and the input by c_skip
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        # Split the step from sigma to sigma_next into a deterministic part down to sigma_down and fresh noise of
        # sigma_up, so that sigma_down² + sigma_up² = sigma_next².
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        slope = (x - denoised) / sigma
        x = x + slope * (sigma_down - sigma)
        noise = cpu_noise(tuple(model_output.shape), model_output.dtype, model_output.device, generator)
        x = (x + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return x, denoised
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=x, pred_original_sample=denoised)
