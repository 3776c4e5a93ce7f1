"""ViM-UNet: parameter counts (spec vim_unet.md / reference_numbers.md §5), official key layout, shapes (2D/3D),
position/rotary embeddings, official-checkpoint import (both layouts, both torch-em code states) checked against an
independent functional re-statement of the torch-em forward pass, refusals, and a short training run on nuclei."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared_networks.convert import from_official as registry_from_official
from shared_networks.convert.vim_unet import from_official, official_key_map, to_official
from shared_networks.nets.vim_unet import ViMUNet, rope_tables
from shared_networks.ops import selective_scan_ref


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The box is shared by several processes; intra-op threading oversubscribes it (~20x slower small ops).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def meta_net(**kw):
    with torch.device("meta"):
        return ViMUNet(**kw)


# ----------------------------------------------------------------------------------------------------------------
# parameter counts
# ----------------------------------------------------------------------------------------------------------------
def expected_count(d, depth, c=(512, 256, 128, 64), out=2, cin=3, patch_vol=256, n_tok=4096, head=True, k_up=4, k3=9):
    r = math.ceil(d / 16)
    enc = cin * patch_vol * d + d + d + (n_tok + 1) * d + depth * (6 * d * d + 8 * d * r + 221 * d) + d
    enc += (1000 * d + 1000) if head else 0
    dec = sum(ci * co * k_up + co + co * co * k3 + co + 2 * co for ci, co in zip((d,) + c[:3], c))
    dec += d * c[0] * k3 + c[0] + c[0] * c[0] * k3 + c[0]
    for i in range(3):
        co = c[i + 1]
        dec += c[i] * co * k_up + co + 2 * co * co * k3 + co + co * co * k3 + co
    dec += c[3] * c[3] * k_up + c[3] + 2 * c[3] * c[3] * k3 + c[3] + c[3] * c[3] * k3 + c[3] + c[3] * out + out
    return enc, dec


@pytest.mark.parametrize(
    "encoder, total, enc, dec, block",
    [("vim_t", 18_499_690, 7_896_808, 10_602_882, 282_048), ("vim_s", 39_175_018, 27_294_184, 11_880_834, 1_043_328)],
)
def test_paper_time_param_counts(encoder, total, enc, dec, block):
    net = meta_net(encoder=encoder, out_channels=2, paper_time_quirks=True)
    assert n_params(net) == total
    assert n_params(net.encoder) == enc
    assert n_params(net) - n_params(net.encoder) == dec
    assert n_params(net.encoder.layers[0]) == block
    d = net.encoder.embed_dim
    assert expected_count(d, 24) == (enc, dec)  # the formula used for 3D below reproduces the official split
    # without the unused ImageNet head (default network): spec 18,306,690 / 38,790,018
    assert n_params(meta_net(encoder=encoder)) == total - (1000 * d + 1000)
    # out_channels 1 / 3: -65 / +65
    assert n_params(meta_net(encoder=encoder, out_channels=3, paper_time_quirks=True)) == total + 65
    assert n_params(meta_net(encoder=encoder, out_channels=1, paper_time_quirks=True)) == total - 65
    # torch-em HEAD decoder (bilinear + 1x1 upsamplers): 17,160,298 / 37,540,714
    head = meta_net(encoder=encoder, paper_time_quirks=True, upsample="bilinear", cls_token="middle", rope=False,
                    divide_out=True)
    assert n_params(head) == {"vim_t": 17_160_298, "vim_s": 37_540_714}[encoder]


def test_decoder_part_counts_tiny():
    net = meta_net(encoder="vim_t", paper_time_quirks=True)
    parts = [n_params(m) for m in net.side] + [n_params(net.base), n_params(net.up) + n_params(net.up_blocks),
                                               n_params(net.final_up), n_params(net.head_block), n_params(net.out_conv)]
    assert parts == [2_754_560, 1_115_136, 279_040, 69_888, 3_245_056, 3_011_904, 16_448, 110_720, 130]
    assert net.encoder.pos_embed.numel() == 786_624


def test_3d_param_count_by_construction():
    net = meta_net(spatial_dims=3, in_channels=1, out_channels=3, img_size=128, encoder="vim_t")
    enc, dec = expected_count(192, 24, out=3, cin=1, patch_vol=16 ** 3, n_tok=8 ** 3, head=False, k_up=8, k3=27)
    assert n_params(net.encoder) == enc
    assert n_params(net) == enc + dec
    assert net.encoder.patch_embed.proj.weight.shape == (192, 1, 16, 16, 16)
    assert net.encoder.pos_embed.shape == (1, 513, 192)


# ----------------------------------------------------------------------------------------------------------------
# official key names / shapes
# ----------------------------------------------------------------------------------------------------------------
def test_official_key_names_and_shapes():
    net = meta_net(encoder="vim_t", paper_time_quirks=True)
    sd = to_official(net)
    expect = {
        "encoder.patch_embed.proj.weight": (192, 3, 16, 16),
        "encoder.patch_embed.proj.bias": (192,),
        "encoder.cls_token": (1, 1, 192),
        "encoder.pos_embed": (1, 4097, 192),
        "encoder.rope.freqs_cos": (4096, 192),
        "encoder.rope.freqs_sin": (4096, 192),
        "encoder.head.weight": (1000, 192),
        "encoder.norm_f.weight": (192,),
        "encoder.layers.23.norm.weight": (192,),
        "encoder.layers.0.mixer.in_proj.weight": (768, 192),
        "encoder.layers.0.mixer.conv1d.weight": (384, 1, 4),
        "encoder.layers.0.mixer.conv1d_b.bias": (384,),
        "encoder.layers.0.mixer.x_proj_b.weight": (44, 384),
        "encoder.layers.0.mixer.dt_proj_b.weight": (384, 12),
        "encoder.layers.0.mixer.A_b_log": (384, 16),
        "encoder.layers.0.mixer.D_b": (384,),
        "encoder.layers.0.mixer.out_proj.weight": (192, 384),
        "deconv1.block.0.block.weight": (192, 512, 2, 2),
        "deconv1.block.1.block.weight": (512, 512, 3, 3),
        "deconv1.block.2.running_var": (512,),
        "deconv4.block.0.block.weight": (128, 64, 2, 2),
        "base.block.1.weight": (512, 192, 3, 3),
        "base.block.4.weight": (512, 512, 3, 3),
        "decoder.samplers.0.block.weight": (512, 256, 2, 2),
        "decoder.blocks.0.block.1.weight": (256, 512, 3, 3),
        "decoder.blocks.2.block.4.bias": (64,),
        "deconv_out.block.weight": (64, 64, 2, 2),
        "decoder_head.block.1.weight": (64, 128, 3, 3),
        "out_conv.weight": (2, 64, 1, 1),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    mixer = {k.split("mixer.")[1] for k in sd if k.startswith("encoder.layers.0.mixer.")}
    assert mixer == {
        "in_proj.weight", "out_proj.weight", "A_log", "D", "A_b_log", "D_b",
        "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
        "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias",
    }
    # 24 layers x (16 mixer + 1 norm) + patch 2 + cls + pos + 2 rope + head 2 + norm_f
    n_enc = sum(k.startswith("encoder.") for k in sd)
    assert n_enc == 24 * 17 + 2 + 1 + 1 + 2 + 2 + 1
    # HEAD layout: bilinear upsamplers are named ".conv", no RoPE buffers
    head = to_official(meta_net(encoder="vim_t", upsample="bilinear", rope=False, classifier_head=True))
    assert "deconv_out.conv.weight" in head and "decoder.samplers.1.conv.weight" in head
    assert "deconv2.block.0.conv.weight" in head and "encoder.rope.freqs_cos" not in head


# ----------------------------------------------------------------------------------------------------------------
# initialisation (reference_numbers.md §3 init checks)
# ----------------------------------------------------------------------------------------------------------------
def test_vim_init():
    torch.manual_seed(0)
    enc = ViMUNet(encoder="vim_t", img_size=64).encoder
    fwd = torch.cat([F.softplus(layer.mixer.dt_proj.bias) for layer in enc.layers])
    assert 0.00099 <= fwd.min() and fwd.max() <= 0.1001
    assert all(torch.count_nonzero(layer.mixer.dt_proj_b.bias) == 0 for layer in enc.layers)
    std = torch.cat([layer.mixer.out_proj.weight.flatten() for layer in enc.layers]).std()
    assert abs(std.item() - 0.00601) < 0.0002
    assert torch.count_nonzero(enc.patch_embed.proj.bias) == 0
    assert abs(enc.pos_embed.std().item() - 0.02) < 0.002


# ----------------------------------------------------------------------------------------------------------------
# shapes and input handling
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_default():
    torch.manual_seed(0)
    return ViMUNet(encoder="vim_t").eval()


def test_shapes_2d(tiny_default):
    net = tiny_default
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 2, 64, 64)
        assert net(torch.randn(1, 1, 50, 70)).shape == (1, 2, 50, 70)  # padded to 64x80 internally, cropped back
    small = ViMUNet(in_channels=1, out_channels=3, embed_dim=32, depth=2, decoder_channels=(32, 16, 16, 8),
                    final_activation="sigmoid").eval()
    with torch.no_grad():
        y = small(torch.randn(2, 1, 64, 96))
    assert y.shape == (2, 3, 64, 96) and 0 < y.min() and y.max() < 1


def test_input_validation(tiny_default):
    with pytest.raises(ValueError, match="1 input channel"):
        tiny_default(torch.randn(1, 2, 64, 64))
    with pytest.raises(ValueError, match="4-D input"):
        tiny_default(torch.randn(1, 64, 64))
    bad = torch.randn(1, 1, 64, 64)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny_default(bad)
    strict = ViMUNet(embed_dim=32, depth=1, decoder_channels=(16, 16, 16, 16), pad_mode="none")
    with pytest.raises(ValueError, match="divisible by"):
        strict(torch.randn(1, 1, 50, 64))
    canvas = ViMUNet(embed_dim=32, depth=1, decoder_channels=(16, 16, 16, 16), img_size=64, paper_time_quirks=True)
    with pytest.raises(ValueError, match="exceeds the canvas"):
        canvas(torch.randn(1, 1, 80, 64))
    with pytest.raises(ValueError, match="encoder"):
        ViMUNet(encoder="vim_b")
    with pytest.raises(ValueError, match="pad_mode"):
        ViMUNet(pad_mode="reflect")


def test_shapes_3d():
    torch.manual_seed(0)
    net = ViMUNet(spatial_dims=3, in_channels=1, out_channels=2, img_size=64, embed_dim=48, depth=2,
                  decoder_channels=(32, 16, 16, 8)).eval()
    assert net.encoder.patch_embed.proj.weight.shape == (48, 1, 16, 16, 16)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 48, 64)).shape == (2, 2, 32, 48, 64)
        assert net(torch.randn(1, 1, 20, 30, 40)).shape == (1, 2, 20, 30, 40)
        z = net.encoder(torch.randn(1, 1, 32, 48, 64))
    assert z.shape == (1, 48, 2, 3, 4)
    cos, sin = rope_tables((2, 3, 4), 48)
    assert cos.shape == (24, 48) and torch.allclose(cos ** 2 + sin ** 2, torch.ones(24, 48))


def test_canvas_mode_equals_manual_padding():
    torch.manual_seed(1)
    net = ViMUNet(embed_dim=32, depth=2, decoder_channels=(32, 16, 16, 8), img_size=64, paper_time_quirks=True).eval()
    x = torch.randn(1, 1, 48, 32)
    with torch.no_grad():
        y = net(x)
        y_pad = net(F.pad(x, (0, 32, 0, 16)))
    assert y.shape == (1, 2, 48, 32)
    torch.testing.assert_close(y, y_pad[..., :48, :32])


# ----------------------------------------------------------------------------------------------------------------
# position and rotary embeddings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_token", ["front", "middle", None])
def test_pos_embed_interpolation(cls_token):
    torch.manual_seed(0)
    net = ViMUNet(embed_dim=32, depth=1, decoder_channels=(16, 16, 16, 16), img_size=(64, 128), cls_token=cls_token)
    enc = net.encoder
    assert enc._pos_embed_for((4, 8)) is enc.pos_embed  # built grid: the parameter itself
    pos = enc.pos_embed.detach()
    n_cls = 0 if cls_token is None else 1
    ci = {"front": 0, "middle": 16, None: None}[cls_token]
    patch = pos if ci is None else torch.cat([pos[:, :ci], pos[:, ci + 1:]], 1)
    grid = patch.reshape(1, 4, 8, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 18, 32)
    got = enc._pos_embed_for((6, 3))
    assert got.shape == (1, 18 + n_cls, 32)
    if ci is None:
        torch.testing.assert_close(got, want)
    else:
        ci2 = 0 if cls_token == "front" else 9
        torch.testing.assert_close(got[:, ci2], pos[:, ci])  # the class token's embedding is not resampled
        torch.testing.assert_close(torch.cat([got[:, :ci2], got[:, ci2 + 1:]], 1), want)
    # a constant embedding stays constant; the network runs on grids other than the built one
    with torch.no_grad():
        enc.pos_embed.fill_(0.5)
    assert torch.allclose(enc._pos_embed_for((5, 7)), torch.full((1, 35 + n_cls, 32), 0.5))
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 80, 48)).shape == (1, 2, 80, 48)


def test_rope_matches_vim_construction():
    # Vim's VisionRotaryEmbeddingFast(dim=d/2, pt_seq_len=14, ft_seq_len=64), restated
    dim, ft, pt = 96, 64, 14
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(ft) / ft * pt
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (64, 96), "(n r)" with r=2
    full = torch.cat([f[:, None, :].expand(ft, ft, dim), f[None, :, :].expand(ft, ft, dim)], dim=-1)
    cos, sin = rope_tables((64, 64), 192)
    assert torch.equal(cos, full.cos().view(-1, 2 * dim)) and torch.equal(sin, full.sin().view(-1, 2 * dim))


# ----------------------------------------------------------------------------------------------------------------
# official checkpoint import
# ----------------------------------------------------------------------------------------------------------------
def official_forward(sd, x, canvas, code_state="paper"):
    """torch-em ViM-UNet forward (UNETR.forward with the ViM encoder, eval mode), restated from the spec on the
    official state dict with plain functional ops and the reference selective scan."""
    paper = code_state == "paper"
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    x = x.expand(-1, 3, -1, -1)  # (x - mean) / std with (1, 3, 1, 1) statistics broadcasts 1 -> 3 channels
    h0, w0 = x.shape[-2:]
    x = F.pad(x, (0, canvas - w0, 0, canvas - h0))
    t = F.conv2d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    b, m, d = t.shape
    has_cls = "encoder.cls_token" in sd
    if has_cls:
        cls = sd["encoder.cls_token"].expand(b, -1, -1)
        t = torch.cat([cls, t], 1) if paper else torch.cat([t[:, : m // 2], cls, t[:, m // 2:]], 1)
    t = t + sd["encoder.pos_embed"]

    def rot(v):
        v2 = v.reshape(*v.shape[:-1], -1, 2)
        return torch.stack((-v2[..., 1], v2[..., 0]), -1).reshape(v.shape)

    def rope(h):
        cos, sin = sd["encoder.rope.freqs_cos"], sd["encoder.rope.freqs_sin"]
        if h.shape[1] % 2:
            sp = h[:, 1:]
            return torch.cat([h[:, :1], sp * cos + rot(sp) * sin], 1)
        return h * cos + rot(h) * sin

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def inner(xz, p, sfx):
        xx, z = xz.chunk(2, 1)
        length = xx.shape[-1]
        cw, cb = sd[f"{p}conv1d{sfx}.weight"], sd[f"{p}conv1d{sfx}.bias"]
        xx = F.silu(F.conv1d(xx, cw, cb, padding=cw.shape[-1] - 1, groups=cw.shape[0])[..., :length])
        dbl = F.linear(xx.transpose(1, 2), sd[f"{p}x_proj{sfx}.weight"])
        r = sd[f"{p}dt_proj{sfx}.weight"].shape[1]
        dt, bm, cm = dbl.split([r, 16, 16], -1)
        delta = sd[f"{p}dt_proj{sfx}.weight"] @ dt.transpose(1, 2)
        a = -torch.exp(sd[f"{p}A{sfx}_log"].float())
        return selective_scan_ref(xx, delta, a, bm.transpose(1, 2), cm.transpose(1, 2), sd[f"{p}D{sfx}"], z=z,
                                  delta_bias=sd[f"{p}dt_proj{sfx}.bias"], delta_softplus=True)

    hidden, residual = t, None
    for i in range(depth):
        p = f"encoder.layers.{i}.mixer."
        if paper:
            hidden = rope(hidden)
            residual = None if residual is None else rope(residual)
        residual = hidden if residual is None else residual + hidden
        xz = F.linear(rms(residual, sd[f"encoder.layers.{i}.norm.weight"]), sd[p + "in_proj.weight"]).transpose(1, 2)
        y = inner(xz, p, "") + inner(xz.flip(-1), p, "_b").flip(-1)
        if not paper:
            y = y / 2
        hidden = F.linear(y.transpose(1, 2), sd[p + "out_proj.weight"])
    out = rms(residual + hidden, sd["encoder.norm_f.weight"])
    out = out[:, 1:] if has_cls else out  # ViM.forward drops token 0 (with a middle cls: the first patch token)
    g = int(out.shape[1] ** 0.5)
    z12 = out.unflatten(1, (g, g)).permute(0, 3, 1, 2)

    conv_t = "deconv_out.block.weight" in sd

    def upsample(v, pre):
        if conv_t:
            return F.conv_transpose2d(v, sd[pre + "block.weight"], sd[pre + "block.bias"], stride=2)
        v = F.interpolate(v, scale_factor=2, mode="bilinear", align_corners=False)
        return F.conv2d(v, sd[pre + "conv.weight"], sd[pre + "conv.bias"])

    def deconv_block(v, pre):
        v = upsample(v, pre + "block.0.")
        v = F.conv2d(v, sd[pre + "block.1.block.weight"], sd[pre + "block.1.block.bias"], padding=1)
        v = F.batch_norm(v, sd[pre + "block.2.running_mean"], sd[pre + "block.2.running_var"],
                         sd[pre + "block.2.weight"], sd[pre + "block.2.bias"], training=False, eps=1e-5)
        return F.relu(v)

    def conv_block(v, pre):
        v = F.relu(F.conv2d(F.instance_norm(v), sd[pre + "block.1.weight"], sd[pre + "block.1.bias"], padding=1))
        return F.relu(F.conv2d(F.instance_norm(v), sd[pre + "block.4.weight"], sd[pre + "block.4.bias"], padding=1))

    def crop(v, shape):  # torch-em Decoder._crop: centre crop in every axis
        diff = [(a - s) // 2 for a, s in zip(v.shape, shape)]
        return v[tuple(slice(dd, a - dd) for dd, a in zip(diff, v.shape))]

    z9 = deconv_block(z12, "deconv1.")
    z6 = deconv_block(z9, "deconv2.")
    z3 = deconv_block(z6, "deconv3.")
    z0 = deconv_block(z3, "deconv4.")
    v = conv_block(z12, "base.")
    for i, skip in enumerate((z9, z6, z3)):
        v = upsample(v, f"decoder.samplers.{i}.")
        v = conv_block(torch.cat([v, crop(skip, v.shape)], 1), f"decoder.blocks.{i}.")
    v = conv_block(torch.cat([upsample(v, "deconv_out."), z0], 1), "decoder_head.")
    v = torch.sigmoid(F.conv2d(v, sd["out_conv.weight"], sd["out_conv.bias"]))
    return v[..., :h0, :w0]


def randomised_official(code_state="paper", seed=0, cls=True):
    """A torch-em-layout state dict (canvas 64, Tiny) with non-trivial values everywhere (BN statistics, the zero
    backward dt bias, ...), so that any mix-up of keys changes the output."""
    torch.manual_seed(seed)
    paper = code_state == "paper"
    net = ViMUNet(encoder="vim_t", img_size=64, paper_time_quirks=True, rope=paper,
                  cls_token=("front" if paper else "middle") if cls else None, divide_out=not paper,
                  upsample="deconv" if paper else "bilinear", drop_index0_quirk=cls and not paper)
    sd = to_official(net)
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in sd.items():
        if k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("running_mean", ".bias")) and "rope" not in k:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return sd


@pytest.mark.parametrize("code_state, cls", [("paper", True), ("head", True), ("paper", False)])
def test_from_official_matches_official_function(code_state, cls):
    sd = randomised_official(code_state, cls=cls)
    net = from_official(sd, img_size=64, with_cls_token=cls)  # code state and upsampler read from the checkpoint
    assert net.encoder.use_rope == (code_state == "paper")
    assert n_params(net) == n_params(meta_net(encoder="vim_t", img_size=64, paper_time_quirks=True,
                                              cls_token="front" if cls else None,
                                              upsample="deconv" if code_state == "paper" else "bilinear"))
    x = torch.randn(2, 1, 48, 64)
    with torch.no_grad():
        want = official_forward(sd, x, canvas=64, code_state=code_state)
        got = net(x)
    assert got.shape == (2, 2, 48, 64)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # export gives back exactly the official state dict
    back = to_official(net)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_monai_layout_is_the_transposed_official_function():
    sd = randomised_official("paper", seed=3)
    with_prefix = {"model_state": {f"module.{k}": v for k, v in sd.items()}, "optimizer_state": {}}
    net_o = registry_from_official("vim_unet", with_prefix, img_size=64, model_type="vim_t", out_channels=2)
    net_m = registry_from_official("vim_unet", sd, layout="monai", img_size=64)
    assert net_m.encoder.flatten_axes == (1, 0)
    x = torch.randn(1, 1, 48, 64)  # (y, x)
    with torch.no_grad():
        y_o = net_o(x)
        y_m = net_m(x.transpose(-1, -2).contiguous())  # MONAI (x, y) array of the same image
    torch.testing.assert_close(y_m, y_o.transpose(-1, -2), atol=2e-5, rtol=1e-4)
    # plain flattening would NOT reproduce it: the scans are not transpose-invariant
    net_m.encoder.flatten_axes = (0, 1)
    with torch.no_grad():
        assert not torch.allclose(net_m(x.transpose(-1, -2).contiguous()), y_o.transpose(-1, -2), atol=1e-3)
    net_m.encoder.flatten_axes = (1, 0)
    back = to_official(net_m)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_from_official_refusals():
    sd = randomised_official("paper", seed=5)
    bad = dict(sd)
    del bad["encoder.layers.3.mixer.D_b"]
    with pytest.raises(ValueError, match=r"missing keys: \['encoder.layers.3.mixer.D_b'\]"):
        from_official(bad, img_size=64)
    bad = dict(sd, **{"encoder.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys: .*encoder.extra"):
        from_official(bad, img_size=64)
    with pytest.raises(ValueError, match=r"misshapen keys: encoder.pos_embed: expected \(1, 4097, 192\)"):
        from_official(sd, img_size=1024)  # checkpoint built for another canvas
    with pytest.raises(ValueError, match=r"misshapen keys: .*patch_embed.proj.weight: expected \(384, 3, 16, 16\)"):
        from_official(sd, img_size=64, model_type="vim_s")
    with pytest.raises(ValueError, match="resize_input"):
        from_official(sd, img_size=64, resize_input=True)
    with pytest.raises(ValueError, match="use_skip_connection"):
        from_official(sd, img_size=64, use_skip_connection=True)
    with pytest.raises(ValueError, match="disagree"):
        from_official(sd, img_size=64, model_type="vim_t", encoder="vim_s")
    bad = dict(sd, **{"encoder.rope.freqs_cos": sd["encoder.rope.freqs_cos"] * 0.5})
    with pytest.raises(ValueError, match="rotary"):
        from_official(bad, img_size=64)
    with pytest.raises(TypeError):
        from_official(sd, img_size=64, depth=12)
    with pytest.raises(ValueError, match="only for the 2-D"):
        official_key_map(meta_net(spatial_dims=3, embed_dim=32, depth=1, img_size=32))


# ----------------------------------------------------------------------------------------------------------------
# training on real data
# ----------------------------------------------------------------------------------------------------------------
def test_training_on_nuclei_improves_dice():
    skimage_io = pytest.importorskip("skimage.io")
    root = Path(__file__).resolve().parents[1] / "data" / "demo" / "nuclei"
    img = skimage_io.imread(root / "image.tif").astype(np.float32)
    msk = (skimage_io.imread(root / "mask.tif") > 0).astype(np.float32)
    img = (img - img.mean()) / img.std()  # torch-em standardises outside the model
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    p = 96
    net = ViMUNet(in_channels=1, out_channels=1, img_size=p, embed_dim=32, depth=2, patch_size=16,
                  decoder_channels=(64, 32, 16, 16), final_activation="sigmoid", drop_path_rate=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def dice_loss(pred, tgt):
        inter = (pred * tgt).sum((1, 2, 3))
        return 1 - ((2 * inter + 1e-5) / (pred.sum((1, 2, 3)) + tgt.sum((1, 2, 3)) + 1e-5)).mean()

    # held-out crops from the right quarter of the image (training crops come from the left three quarters)
    val_x = torch.stack([torch.from_numpy(img[None, y: y + p, 400: 400 + p]) for y in (0, 128, 256, 384)])
    val_y = torch.stack([torch.from_numpy(msk[None, y: y + p, 400: 400 + p]) for y in (0, 128, 256, 384)])

    def val_dice():
        net.eval()
        with torch.no_grad():
            pred = (net(val_x) > 0.5).float()
        net.train()
        return float(2 * (pred * val_y).sum() / (pred.sum() + val_y.sum() + 1e-5))

    dice0 = val_dice()
    losses = []
    for _ in range(60):
        ys, xs = rng.integers(0, 512 - p, 4), rng.integers(0, 384 - p, 4)
        x = torch.stack([torch.from_numpy(img[None, a: a + p, b: b + p]) for a, b in zip(ys, xs)])
        y = torch.stack([torch.from_numpy(msk[None, a: a + p, b: b + p]) for a, b in zip(ys, xs)])
        loss = dice_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    dice1 = val_dice()
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.15, losses
    assert dice1 > 0.5 and dice1 > dice0 + 0.2, (dice0, dice1)


def test_patch_size_other_than_16_is_refused():
    with pytest.raises(ValueError, match="patch_size must be 16"):
        ViMUNet(in_channels=1, out_channels=1, img_size=64, embed_dim=32, depth=1, patch_size=8)
