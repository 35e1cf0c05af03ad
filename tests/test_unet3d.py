"""The diffusion denoiser: shapes with anisotropic strides, feature taps, attention maths, conditioning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffprobe.models import (
    Attention3d,
    Conv3d,
    DiffusionUNet,
    LinearAttention3d,
    SoftmaxAttention3d,
    count_parameters,
    forward_flops,
    scale_channels,
)
from diffprobe.planning.planner import plan

# z is halved only from level 2 on: the anisotropic CT case (thick slices).
TINY_LEVELS = [
    {"stride_from_previous": [1, 1, 1], "channels": 8, "attention": "linear"},
    {"stride_from_previous": [1, 2, 2], "channels": 16, "attention": "linear"},
    {"stride_from_previous": [2, 2, 2], "channels": 16, "attention": "softmax"},
]
SHAPE = (2, 1, 8, 16, 16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to OpenMP oversubscription on busy hosts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fingerprint() -> dict:
    return {"spacings": [[3.0, 0.8, 0.8]] * 4, "shapes_after_crop": [[35, 90, 120]] * 4,
            "channel_names": {"0": "CT"}, "labels": {"background": 0}, "dataset": "X",
            "median_spacing": [3, 0.8, 0.8], "num_cases": 4, "num_labelled": 0}


def tiny(attention: str = "planned", guidance_channels: int = 3, seed: int = 0) -> DiffusionUNet:
    torch.manual_seed(seed)
    return DiffusionUNet(1, guidance_channels, TINY_LEVELS, blocks_per_level=1, attention=attention)


def perturb_zero_init(model: nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised convs random weights so every path affects the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv3d) and not m.weight.any():
                m.weight.normal_(0, std)
                m.bias.normal_(0, std)


def inputs(seed: int = 1, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    guidance = torch.randn((shape[0], 3, *shape[2:]), generator=g)
    t = torch.tensor([10, 600])[: shape[0]]
    return x, t, guidance


def test_forward_shapes_and_feature_taps():
    net = tiny()
    perturb_zero_init(net)
    x, t, g = inputs()
    with torch.no_grad():
        eps, feats = net(x, t, g, return_features=True)
        assert net(x, t, g).shape == x.shape
    assert eps.shape == x.shape
    assert net.total_stride == (2, 4, 4)
    assert net.feature_channels == {"dec0": 8, "dec1": 16, "dec2": 16}
    assert net.feature_strides == {"dec0": (1, 1, 1), "dec1": (1, 2, 2), "dec2": (2, 4, 4)}
    expected = {"dec0": (2, 8, 8, 16, 16), "dec1": (2, 16, 8, 8, 8), "dec2": (2, 16, 4, 4, 4)}
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected

    with torch.no_grad():
        none_eps, partial = net(x, t, g, return_features=True, max_level=1)
    assert none_eps is None
    assert set(partial) == {"dec1", "dec2"}
    for name, feat in partial.items():
        torch.testing.assert_close(feat, feats[name])


def test_max_level_skips_finest_decoder_work():
    net = tiny()
    x, t, g = inputs()
    calls = []
    net.decoder[0].register_forward_hook(lambda *_: calls.append("dec0"))
    net.out_conv.register_forward_hook(lambda *_: calls.append("out"))
    with torch.no_grad():
        net(x, t, g, return_features=True, max_level=1)
    assert calls == []
    with pytest.raises(ValueError, match="max_level"):
        net(x, t, g, return_features=True, max_level=3)
    with pytest.raises(ValueError, match="return_features"):
        net(x, t, g, max_level=1)


def test_bad_spatial_shape_and_scalar_timestep():
    net = tiny()
    x, _, g = inputs()
    with pytest.raises(ValueError, match="divisible"):
        net(x[:, :, :7], torch.tensor([1, 2]), g[:, :, :7])
    assert net(x, torch.tensor(5), g).shape == x.shape


def heads(z: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """(B, C, N) -> per head (B, N, d)."""
    return [c.transpose(1, 2) for c in z.chunk(n_heads, dim=1)]


def reference_attention(module: Attention3d, x: torch.Tensor) -> torch.Tensor:
    """The materialised formulas, head by head, from the module's own norm and projections."""
    b, c = x.shape[:2]
    qkv = module.qkv(module.norm(x)).reshape(b, 3 * c, -1)
    q_all, k_all, v_all = qkv.chunk(3, dim=1)
    outs = []
    for q, k, v in zip(heads(q_all, module.heads), heads(k_all, module.heads), heads(v_all, module.heads)):
        if isinstance(module, LinearAttention3d):
            q = torch.softmax(q, dim=-1)  # over the head's channels
            k = torch.softmax(k, dim=1)  # over the tokens
            out = q @ (k.transpose(1, 2) @ v)  # (B, N, d) @ (B, d, d)
        else:
            scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, N, N)
            out = torch.softmax(scores, dim=-1) @ v
        outs.append(out.transpose(1, 2))
    attended = torch.cat(outs, dim=1).reshape(x.shape)
    return x + module.proj(attended)


@pytest.mark.parametrize("cls", [LinearAttention3d, SoftmaxAttention3d])
def test_attention_matches_explicit_formula_and_has_gradients(cls):
    torch.manual_seed(0)
    module = cls(16, num_heads=4, groups=8)
    assert module.heads == 4 and module.head_dim == 4
    x = torch.randn(2, 16, 3, 4, 5, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference_attention(module, x), rtol=1e-4, atol=1e-5)

    (out * torch.randn_like(out)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_guidance_is_required_and_used():
    net = tiny()
    x, t, g = inputs()
    with pytest.raises(ValueError, match="guidance"):
        net(x, t)
    with pytest.raises(ValueError, match="guidance"):
        net(x, t, g[:, :2])
    with pytest.raises(ValueError, match="guidance"):
        tiny(guidance_channels=0)(x, t, g)
    perturb_zero_init(net)
    with torch.no_grad():
        a, b = net(x, t, g), net(x, t, g + 1.0)
    assert not torch.allclose(a, b)


def test_timestep_changes_output():
    net = tiny()
    perturb_zero_init(net)
    x, _, g = inputs()
    with torch.no_grad():
        a = net(x, torch.tensor([10, 10]), g)
        b = net(x, torch.tensor([500, 500]), g)
    assert (a - b).abs().max() > 1e-4


def test_attention_none_is_pure_conv_of_comparable_size():
    conv_net, planned = tiny("none"), tiny()
    assert conv_net.attention_modules() == []
    assert not any(isinstance(m, Attention3d) for m in conv_net.modules())
    assert len(planned.attention_modules()) == 2 * len(TINY_LEVELS)
    assert 0.75 <= count_parameters(conv_net) / count_parameters(planned) <= 1.25
    x, t, g = inputs()
    assert conv_net(x, t, g).shape == x.shape

    plans = plan(fingerprint())
    full = count_parameters(DiffusionUNet.from_plans(plans, channel_scale=0.25))
    conv = count_parameters(DiffusionUNet.from_plans(plans, attention="none", channel_scale=0.25))
    assert 0.75 <= conv / full <= 1.25


def test_forced_attention_kinds():
    kinds = {type(m) for m in tiny("softmax").attention_modules()}
    assert kinds == {SoftmaxAttention3d}
    with pytest.raises(ValueError, match="attention"):
        tiny("bogus")


def test_few_adam_steps_reduce_eps_loss():
    net = tiny()
    x0, _, g = inputs()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([100, 400])
    x_noisy = 0.9 * x0 + math.sqrt(1 - 0.81) * noise
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = nn.functional.mse_loss(net(x_noisy, t, g), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_channels_last_and_bf16_autocast():
    net = tiny()
    perturb_zero_init(net)
    x, t, g = inputs()
    with torch.no_grad():
        ref = net(x, t, g)
        cl = net(x.to(memory_format=torch.channels_last_3d), t, g.to(memory_format=torch.channels_last_3d))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, g)
    assert low.shape == x.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_from_plans_and_channel_scale():
    plans = plan(fingerprint(), patch_size=[8, 32, 32])
    levels = plans["network"]["levels"]
    net = DiffusionUNet.from_plans(plans, channel_scale=0.25)
    assert net.in_channels == plans["network"]["input_channels"]
    assert net.guidance_channels == plans["network"]["guidance_channels"]
    assert net.total_stride == tuple(plans["network"]["total_stride"])
    assert list(net.feature_channels.values()) == [scale_channels(lv["channels"], 0.25) for lv in levels]
    assert net.level_attention == [lv["attention"] for lv in levels]
    assert all(c % 8 == 0 and c >= 8 for c in net.feature_channels.values())
    x, t, g = inputs(shape=(1, 1, *plans["patch_size"]))
    with torch.no_grad():
        eps, feats = net(x, t, g, return_features=True)
    assert eps.shape == x.shape
    for lv in levels:
        assert tuple(feats[f"dec{lv['level']}"].shape[2:]) == tuple(lv["feature_shape"])
    assert scale_channels(32, 0.1) == 8 and scale_channels(256, 0.25) == 64 and scale_channels(40, 1.0) == 40


def test_count_parameters_and_flops():
    conv = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ConvTranspose3d(4, 2, (1, 2, 2), stride=(1, 2, 2)))
    assert count_parameters(conv) == (27 * 4 + 4) + (4 * 2 * 4 + 2)
    # conv: 64 outputs x 4 ch x 27 MACs; transposed: 64 inputs x 4 ch x 2 out x 4 kernel MACs
    assert forward_flops(conv, (1, 1, 4, 4, 4)) == 2 * (64 * 4 * 27 + 64 * 4 * 2 * 4)

    net = tiny()
    one = forward_flops(net, (1, *SHAPE[1:]))
    assert one > 0 and forward_flops(net, SHAPE) == 2 * one
    assert next(net.parameters()).device.type == "cpu"  # the model itself is untouched

    # attention: qkv + proj 1x1x1 convs plus the head matmuls (2 of B*h*N*d*d, resp. B*h*N*N*d)
    n, c, h, d = 2 * 4 * 4, 16, 4, 4
    projections = 2 * (n * c * 3 * c + n * c * c)
    assert forward_flops(LinearAttention3d(c), (1, c, 2, 4, 4)) == projections + 2 * 2 * h * n * d * d
    assert forward_flops(SoftmaxAttention3d(c), (1, c, 2, 4, 4)) == projections + 2 * 2 * h * n * n * d


def test_batch1_cpu_conv_matches_reference_with_gradients():
    torch.manual_seed(0)
    conv = Conv3d(3, 5, 3, padding=1)
    x = torch.randn(1, 3, 4, 6, 5, requires_grad=True)
    out = conv(x)
    ref = nn.functional.conv3d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (x, conv.weight, conv.bias))
    ref_grads = torch.autograd.grad(ref.sum(), (x, conv.weight, conv.bias))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_return_output_false_skips_only_the_output_head():
    """Feature readers skip epsilon's full-resolution norm + conv; the features are unchanged."""
    net = tiny()
    perturb_zero_init(net)
    x, t, g = inputs()
    calls = []
    net.out_conv.register_forward_hook(lambda *_: calls.append("out"))
    with torch.no_grad():
        _, feats = net(x, t, g, return_features=True)
        assert calls == ["out"]
        eps, same = net(x, t, g, return_features=True, return_output=False)
    assert eps is None and calls == ["out"]
    for name, feat in feats.items():
        assert torch.equal(same[name], feat)
    with pytest.raises(ValueError, match="return_features"):
        net(x, t, g, return_output=False)


def test_inference_path_computes_what_the_training_path_computes():
    """Without autograd the blocks run SiLU in place, FiLM as addcmul and in-place residuals: the same
    maths (to float rounding) as the ops autograd records, and the input is left untouched."""
    from diffprobe.models import DiffusionUNet

    torch.manual_seed(0)
    levels = [{"stride_from_previous": [1, 1, 1], "channels": 8, "attention": "linear"},
              {"stride_from_previous": [2, 2, 2], "channels": 16, "attention": "softmax"}]
    net = DiffusionUNet(1, 3, levels, blocks_per_level=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)  # the residual branches start at zero: make every op count
    x, g, t = torch.randn(2, 1, 8, 16, 16), torch.randn(2, 3, 8, 16, 16), torch.tensor([10, 60])
    x_before = x.clone()
    with torch.enable_grad():
        ref = net(x, t, g, return_features=True)
    with torch.inference_mode():
        got = net(x, t, g, return_features=True)
    assert torch.equal(x, x_before)
    assert torch.allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)
    for k in ref[1]:
        assert torch.allclose(got[1][k], ref[1][k], rtol=1e-4, atol=1e-5), k


def test_in_place_residual_never_lowers_the_residual_streams_precision():
    from diffprobe.models.unet3d import add_residual

    h = torch.randn(2, 4, 3, 3, 3).bfloat16()
    r = torch.randn(2, 4, 3, 3, 3)
    out = add_residual(h.clone(), r)
    assert out.dtype == torch.float32 and torch.equal(out, r + h)
    same = torch.randn(2, 4, 3, 3, 3)
    buf = same.clone()
    assert add_residual(buf, r) is buf and torch.equal(buf, r + same)


@pytest.mark.parametrize("kind", ["linear", "softmax"])
def test_channels_last_attention_runs_token_major_with_the_same_maths(kind):
    """On a channels_last_3d map attention and 1x1x1 skips run as matrix products on the token view
    (no layout round trips); values, gradients and the output's layout match the channels-first path."""
    from diffprobe.models.attention import is_channels_last, make_attention
    from diffprobe.models.unet3d import ResBlock3d

    torch.manual_seed(0)
    attention = make_attention(kind, 16, 4, 8)
    block = ResBlock3d(8, 16, 12)
    for p in [*attention.parameters(), *block.parameters()]:
        torch.nn.init.normal_(p, 0, 0.1)
    x, emb = torch.randn(2, 16, 3, 5, 4), torch.randn(2, 12)
    for module, args in ((attention, (x,)), (block, (x[:, :8], emb))):
        first = args[0].clone().requires_grad_()
        last = args[0].contiguous(memory_format=torch.channels_last_3d).detach().requires_grad_()
        assert is_channels_last(last) and not is_channels_last(first)
        a, b = module(first, *args[1:]), module(last, *args[1:])
        assert is_channels_last(b)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(last.grad, first.grad, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the in-place inference path
            torch.testing.assert_close(module(last.detach().clone(), *args[1:]), a.detach(), rtol=1e-5, atol=1e-6)
