"""The CUDA GroupNorm path (models.group_norm), checked on the CPU where the function runs the same ops:
it equals F.group_norm in both memory layouts, forward and backward, keeps the layout and dtype, and
the module is plain nn.GroupNorm on the CPU (bit for bit: CPU results do not move)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffprobe.models.group_norm import GroupNorm, group_norm


def _map(shape=(2, 16, 5, 12, 10), seed=0, channels_last=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.7 + 0.6
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_equals_native_group_norm_forward_and_backward(channels_last, groups):
    x = _map(channels_last=channels_last).requires_grad_(True)
    weight = torch.linspace(0.5, 1.5, 16).requires_grad_(True)
    bias = torch.linspace(-0.3, 0.2, 16).requires_grad_(True)
    ours = group_norm(x, groups, weight, bias, 1e-5)
    ref = F.group_norm(x, groups, weight, bias, 1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(ours, (x, weight, bias), grad)
    want = torch.autograd.grad(ref, (x, weight, bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_pass_writes_the_input_dtype_and_layout(channels_last):
    x = _map(channels_last=channels_last, dtype=torch.bfloat16)
    weight, bias = torch.rand(16) + 0.5, torch.rand(16) - 0.5
    with torch.no_grad():
        out = group_norm(x, 8, weight, bias, 1e-5)
        no_affine = group_norm(x, 8, None, None, 1e-5)
    assert out.dtype == torch.bfloat16
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    ref = F.group_norm(x.float(), 8, weight, bias, 1e-5)
    assert (out.float() - ref).abs().max().item() < 0.05  # bf16 output rounding of values up to ~4
    torch.testing.assert_close(no_affine.float(), F.group_norm(x.float(), 8, eps=1e-5), rtol=0.02, atol=0.03)


def test_module_is_native_on_the_cpu_and_keeps_the_state_dict():
    native = torch.nn.GroupNorm(4, 16)
    ours = GroupNorm(4, 16)
    ours.load_state_dict(native.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias"}
    x = _map(channels_last=True)
    assert torch.equal(ours(x), native(x))
