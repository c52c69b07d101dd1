"""groupnorm.ParallelGroupNorm: the same function as nn.GroupNorm (up to float rounding), swapped into the VAE on
CUDA only. Its speed is measured on the GPU (bench/run_benchmark.py: diag_ours_vae_decode_ms against
diag_ours_vae_decode_native_norm_ms)."""

from __future__ import annotations

import copy

import pytest
import torch

from sdxl import groupnorm
import utils


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("shape", [(2, 64, 24, 40), (1, 64, 300), (3, 64, 8, 8, 4)])
def test_it_computes_group_norm_with_no_more_error_than_pytorchs_own(shape):
    g = torch.Generator().manual_seed(sum(shape))
    norm = torch.nn.GroupNorm(16, 64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    x = torch.randn(shape, generator=g) * 3 + 7  # a mean far from 0 is where a careless variance goes wrong
    parallel = groupnorm.ParallelGroupNorm(norm)
    with torch.no_grad():
        for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            norm.to(dtype)
            xd = x.to(dtype)
            ref = torch.nn.functional.group_norm(x.double(), 16, norm.weight.double(), norm.bias.double(), norm.eps)
            ours, native = parallel(xd), norm(xd)
            assert ours.dtype == dtype and ours.shape == x.shape
            assert relative_error(ours, ref) <= 1.5 * relative_error(native, ref)  # rounding, not a new error
            assert relative_error(ours, ref) < tolerance


def test_with_gradients_or_odd_layouts_it_is_pytorchs_own():
    norm = torch.nn.GroupNorm(8, 32)
    parallel = groupnorm.ParallelGroupNorm(norm)
    x = torch.randn(2, 32, 10, 12)
    assert torch.equal(parallel(x), norm(x))  # grad enabled
    with torch.no_grad():
        strided = x.transpose(2, 3)
        assert torch.equal(parallel(strided), norm(strided))


def test_the_vae_gets_it_on_cuda_only_and_keeps_its_weights_and_output(predictor):
    vae = predictor.models.models["illustrious"].txt2img.vae
    natives = sum(type(m) is torch.nn.GroupNorm for m in vae.modules())
    assert natives > 0
    assert utils.fast_vae(vae, torch.device("cpu")) is vae and sum(
        type(m) is torch.nn.GroupNorm for m in vae.modules()) == natives  # CPU: untouched

    swapped = copy.deepcopy(vae)
    params = dict(swapped.named_parameters())
    assert groupnorm.parallelize(swapped) == natives
    assert not any(type(m) is torch.nn.GroupNorm for m in swapped.modules())
    assert sum(isinstance(m, groupnorm.ParallelGroupNorm) for m in swapped.modules()) == natives
    assert {n: id(p) for n, p in swapped.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert groupnorm.parallelize(swapped) == 0  # idempotent
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(latents).sample.double()
        assert relative_error(swapped.decode(latents).sample, ref) < 1e-5


def test_a_bfloat16_vae_decodes_as_close_to_float32_with_it_as_with_pytorchs_norm(predictor):
    vae32 = copy.deepcopy(predictor.models.models["illustrious"].txt2img.vae).float()
    native = copy.deepcopy(vae32).to(torch.bfloat16)
    ours = copy.deepcopy(native)
    groupnorm.parallelize(ours)
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = vae32.decode(latents).sample.double()
        native_error = relative_error(native.decode(latents.bfloat16()).sample, ref)
        our_error = relative_error(ours.decode(latents.bfloat16()).sample, ref)
    assert 0 < our_error <= 1.5 * native_error  # bf16 rounding, as with PyTorch's own group norm
