"""GroupNorm that uses the whole GPU on large images.

PyTorch's CUDA group_norm computes each (image, group) statistic in one thread block: the SDXL VAE decoder at 1024²
has 32 groups per image, so 32 blocks on a 132-SM H100 walk 4-8 M elements each, and its group norms take 44 of the
decoder's 85 ms (bench/results/probe_kernels_h200.json). Here the statistics come from a float32 var_mean, a
reduction PyTorch spreads over the whole GPU, and the normalisation is one fused multiply-add per element in float32,
rounded once to the input's dtype: the same function as nn.GroupNorm up to float rounding.

`parallelize(module)` swaps every nn.GroupNorm inside `module` for a ParallelGroupNorm holding the same Parameters;
the predictor does this on CUDA only (utils.load_models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ParallelGroupNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight  # the same Parameters: weight edits (LoRA merges) apply to both
        self.bias = norm.bias
        self.native = False  # True: plain F.group_norm (for comparisons)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native or x.dim() < 3 or not x.is_contiguous() or torch.is_grad_enabled():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c = x.shape[:2]
        var, mean = torch.var_mean(x.reshape(n, self.num_groups, -1).float(), dim=-1, correction=0)
        per_group = c // self.num_groups
        scale = torch.rsqrt(var + self.eps).repeat_interleave(per_group, dim=1)  # (n, c)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean.repeat_interleave(per_group, dim=1) * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        view = (n, c) + (1,) * (x.dim() - 2)
        out = torch.empty_like(x)
        return torch.addcmul(shift.view(view), x, scale.view(view), out=out)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


def parallelize(module: torch.nn.Module) -> int:
    """Replace every nn.GroupNorm under `module` in place; returns how many were replaced."""
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.GroupNorm]
    for parent, name, child in swaps:
        setattr(parent, name, ParallelGroupNorm(child))
    return len(swaps)
