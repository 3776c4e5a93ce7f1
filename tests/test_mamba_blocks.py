"""Mamba layers: parameter counts/keys/init as the official modules, forwards against independent references."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared_networks.blocks.mamba as mb
from shared_networks.blocks import BiMambaPair, BiMambaV2, Mamba, SS2D, VSSBlock
from shared_networks.ops import selective_scan_ref

N = 16


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def rank(d):
    return math.ceil(d / 16)


def shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def mamba_keys(d, n=N, k=4, prefix="", out_proj=True):
    di, r = 2 * d, rank(d)
    keys = {
        "A_log": (di, n), "D": (di,), "in_proj.weight": (2 * di, d), "conv1d.weight": (di, 1, k),
        "conv1d.bias": (di,), "x_proj.weight": (r + 2 * n, di), "dt_proj.weight": (di, r), "dt_proj.bias": (di,),
    }
    if out_proj:
        keys["out_proj.weight"] = (d, di)
    return {prefix + key: v for key, v in keys.items()}


# ------------------------------------------------------------------------------------------------ references
def ref_inner(xz, conv_w, conv_b, x_proj_w, dt_w, dt_b, a_log, d_vec):
    """Official slow path: nn.Conv1d with symmetric padding K-1 truncated to L, then selective_scan_ref."""
    length, di = xz.shape[-1], xz.shape[1] // 2
    x, z = xz[:, :di], xz[:, di:]
    x = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=di)[..., :length])
    x_dbl = torch.einsum("bdl,cd->bcl", x, x_proj_w)
    r, n = dt_w.shape[1], a_log.shape[1]
    dt = torch.einsum("dr,brl->bdl", dt_w, x_dbl[:, :r])
    return selective_scan_ref(
        x, dt, -torch.exp(a_log), x_dbl[:, r:r + n], x_dbl[:, r + n:], d_vec, z=z, delta_bias=dt_b,
        delta_softplus=True,
    )


def ref_mamba_inner(m, xz):
    return ref_inner(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.dt_proj.bias,
                     m.A_log, m.D)


def ref_mamba(m, u):
    xz = torch.einsum("ed,bld->bel", m.in_proj.weight, u)
    return torch.einsum("de,bel->bld", m.out_proj.weight, ref_mamba_inner(m, xz))


def ref_bimamba_v2(m, u):
    xz = torch.einsum("ed,bld->bel", m.in_proj.weight, u)
    y_f = ref_mamba_inner(m, xz)
    y_b = ref_inner(xz.flip(-1), m.conv1d_b.weight, m.conv1d_b.bias, m.x_proj_b.weight, m.dt_proj_b.weight,
                    m.dt_proj_b.bias, m.A_b_log, m.D_b)
    y = y_f + y_b.flip(-1)
    if m.if_divide_out:
        y = y / 2
    return torch.einsum("de,bel->bld", m.out_proj.weight, y)


def ref_pair(m, s):
    n = F.layer_norm(s, (s.shape[-1],), m.norm.weight, m.norm.bias, 1e-5)
    xz_f = torch.einsum("ed,bld->bel", m.mamba_forw.in_proj.weight, n)
    xz_b = torch.einsum("ed,bld->bel", m.mamba_backw.in_proj.weight, n.flip(1))
    y = ref_mamba_inner(m.mamba_forw, xz_f) + ref_mamba_inner(m.mamba_backw, xz_b).flip(-1)
    return torch.einsum("de,bel->bld", m.out_proj.weight, y)


def ref_ss2d(m, u):
    """Each direction scanned on its own with selective_scan_ref; orders built with plain transposes/permutes."""
    b, di, n, r = u.shape[0], m.d_inner, m.d_state, m.dt_rank
    xz = u @ m.in_proj.weight.t()
    x, z = xz[..., :di], xz[..., di:]
    spatial_dims = u.dim() - 2
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    cw = m.conv2d if spatial_dims == 2 else m.conv3d
    x = F.silu(conv(x.movedim(-1, 1), cw.weight, cw.bias, padding=1, groups=di))  # (B, di, *S)
    perms = [(2, 3), (3, 2)] if spatial_dims == 2 else [(2, 3, 4), (3, 4, 2), (4, 2, 3)]
    half = len(perms)
    seqs, shapes_ = [], []
    for p in perms:
        t = x.permute(0, 1, *p)
        shapes_.append(t.shape)
        seqs.append(t.reshape(b, di, -1))
    seqs = seqs + [s.flip(-1) for s in seqs]
    total = 0
    for k, s in enumerate(seqs):
        x_dbl = torch.einsum("bdl,cd->bcl", s, m.x_proj_weight[k])
        dt = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], x_dbl[:, :r])
        y = selective_scan_ref(
            s, dt, -torch.exp(m.A_logs[k * di:(k + 1) * di]), x_dbl[:, r:r + n], x_dbl[:, r + n:],
            m.Ds[k * di:(k + 1) * di], delta_bias=m.dt_projs_bias[k], delta_softplus=True,
        )
        j = k % half
        if k >= half:
            y = y.flip(-1)
        p = perms[j]
        inv = [0, 1] + [2 + list(p).index(a) for a in range(2, 2 + spatial_dims)]
        total = total + y.reshape(shapes_[j]).permute(*inv)
    y = F.layer_norm(total.movedim(1, -1), (di,), m.out_norm.weight, m.out_norm.bias, 1e-5) * F.silu(z)
    return y @ m.out_proj.weight.t()


def close(a, b, atol=2e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ counts / keys
@pytest.mark.parametrize("d", [16, 32, 48, 96, 192])
def test_mamba_param_count(d):
    assert n_params(Mamba(d)) == 6 * d * d + 4 * d * rank(d) + 110 * d
    if d == 32:
        assert n_params(Mamba(d)) == 9920


@pytest.mark.parametrize("d,expected", [(192, 282_048), (384, 1_043_328)])
def test_vim_block_param_count(d, expected):
    mixer = BiMambaV2(d)
    assert n_params(mixer) + n_params(nn.RMSNorm(d, eps=1e-5)) == expected == 6 * d * d + 8 * d * rank(d) + 221 * d
    assert n_params(mixer) == expected - d


@pytest.mark.parametrize(
    "d,expected",
    [(32, 17_856), (64, 57_216), (128, 200_448), (256, 744_960), (320, 1_146_240), (512, 2_866_176)],
)
def test_bimamba_pair_param_count(d, expected):
    assert n_params(BiMambaPair(d)) == expected == 10 * d * d + 8 * d * rank(d) + 222 * d


@pytest.mark.parametrize(
    "d,expected", [(96, 105_408), (192, 339_840), (384, 1_195_776), (768, 4_455_936), (1440, 15_128_640)]
)
def test_vss_block_param_count(d, expected):
    assert n_params(VSSBlock(d)) == expected == 6 * d * d + 16 * d * rank(d) + 426 * d


@pytest.mark.parametrize("d", [16, 48, 96])
def test_vss_block_3d_param_count(d):
    blk = VSSBlock(d, spatial_dims=3)
    assert n_params(blk) == 6 * d * d + 24 * d * rank(d) + 662 * d
    s = shapes(blk.self_attention)
    di, r = 2 * d, rank(d)
    assert s["x_proj_weight"] == (6, r + 2 * N, di) and s["dt_projs_weight"] == (6, di, r)
    assert s["A_logs"] == (6 * di, N) and s["Ds"] == (6 * di,) and s["conv3d.weight"] == (di, 1, 3, 3, 3)


def test_mamba_keys():
    assert shapes(Mamba(32)) == mamba_keys(32)
    assert list(Mamba(32).state_dict()) == list(mamba_keys(32))  # same order as the official module


def test_bimamba_v2_keys():
    d, di, r = 192, 384, 12
    expected = mamba_keys(d)
    expected.update({
        "A_b_log": (di, N), "conv1d_b.weight": (di, 1, 4), "conv1d_b.bias": (di,), "x_proj_b.weight": (r + 32, di),
        "dt_proj_b.weight": (di, r), "dt_proj_b.bias": (di,), "D_b": (di,),
    })
    assert shapes(BiMambaV2(d)) == expected


def test_bimamba_pair_keys():
    d = 64
    expected = {"norm.weight": (d,), "norm.bias": (d,)}
    expected.update(mamba_keys(d, prefix="mamba_forw.", out_proj=False))
    expected["out_proj.weight"] = (d, 2 * d)
    expected.update(mamba_keys(d, prefix="mamba_backw.", out_proj=False))
    m = BiMambaPair(d)
    assert shapes(m) == expected
    assert list(m.state_dict()) == list(expected)  # official registration order: norm, forw, out_proj, backw
    assert m.out_proj.bias is None and m.norm.eps == 1e-5
    assert isinstance(m.mamba_forw.out_proj, nn.Identity) and isinstance(m.mamba_backw.out_proj, nn.Identity)


def test_vss_block_keys():
    d, di, r = 96, 192, 6
    expected = {
        "ln_1.weight": (d,), "ln_1.bias": (d,),
        "self_attention.x_proj_weight": (4, r + 2 * N, di), "self_attention.dt_projs_weight": (4, di, r),
        "self_attention.dt_projs_bias": (4, di), "self_attention.A_logs": (4 * di, N), "self_attention.Ds": (4 * di,),
        "self_attention.in_proj.weight": (2 * di, d), "self_attention.conv2d.weight": (di, 1, 3, 3),
        "self_attention.conv2d.bias": (di,), "self_attention.out_norm.weight": (di,),
        "self_attention.out_norm.bias": (di,), "self_attention.out_proj.weight": (d, di),
    }
    blk = VSSBlock(d)
    assert shapes(blk) == expected and blk.ln_1.eps == 1e-5


def test_official_state_dict_round_trip():
    """A state dict with the official keys loads strictly and reproduces the outputs."""
    torch.manual_seed(0)
    for make, x in [
        (lambda: BiMambaPair(16), torch.randn(2, 5, 16)),
        (lambda: BiMambaV2(16), torch.randn(2, 5, 16)),
        (lambda: VSSBlock(16), torch.randn(1, 3, 2, 16)),
    ]:
        a, b = make(), make()
        b.load_state_dict(a.state_dict(), strict=True)
        assert torch.equal(a(x), b(x))


# ------------------------------------------------------------------------------------------------ init
def _check_dt(weight, bias, r):
    dt = F.softplus(bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert dt.max() > 0.02 and dt.min() < 0.005  # spread log-uniformly, not constant
    assert weight.abs().max() <= r**-0.5 + 1e-7


def test_mamba_init():
    d = 48
    m = Mamba(d)
    di, r = 2 * d, rank(d)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(di, 1))
    assert m.A_log.dtype == torch.float32 and torch.equal(m.D, torch.ones(di))
    _check_dt(m.dt_proj.weight, m.dt_proj.bias, r)
    assert m.dt_proj.bias._no_reinit is True
    assert m.A_log._no_weight_decay is True and m.D._no_weight_decay is True
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None
    c = Mamba(d, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(c.dt_proj.weight, torch.full((di, r), 2.0 * r**-0.5))


def test_bimamba_v2_backward_dt_init():
    d, r = 32, 2
    m = BiMambaV2(d)
    _check_dt(m.dt_proj.weight, m.dt_proj.bias, r)
    assert torch.equal(m.dt_proj_b.bias, torch.zeros(2 * d))  # Vim's global init zeroes it
    assert not getattr(m.dt_proj_b.bias, "_no_reinit", False)
    assert m.dt_proj_b.weight.abs().max() <= r**-0.5 and m.dt_proj_b.weight.std() > 0
    assert torch.equal(m.A_b_log, m.A_log) and torch.equal(m.D_b, torch.ones(2 * d))
    assert m.A_b_log._no_weight_decay and m.D_b._no_weight_decay
    mm = BiMambaV2(d, backward_dt_init="mamba")
    _check_dt(mm.dt_proj_b.weight, mm.dt_proj_b.bias, r)
    dd = BiMambaV2(d, backward_dt_init="default")
    assert dd.dt_proj_b.bias.abs().max() <= r**-0.5 and dd.dt_proj_b.bias.abs().min() > 0
    with pytest.raises(ValueError, match="backward_dt_init"):
        BiMambaV2(d, backward_dt_init="zero")


def test_ss2d_init():
    d = 32
    m = SS2D(d)
    di, r = 2 * d, rank(d)
    assert torch.equal(m.A_logs, torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(4 * di, 1))
    assert torch.equal(m.Ds, torch.ones(4 * di))
    for k in range(4):
        _check_dt(m.dt_projs_weight[k], m.dt_projs_bias[k], r)
    assert m.x_proj_weight.abs().max() <= di**-0.5
    assert not torch.equal(m.x_proj_weight[0], m.x_proj_weight[1])  # independent draws per direction
    assert not torch.equal(m.dt_projs_bias[0], m.dt_projs_bias[1])


def test_same_seed_same_draws_as_official_order():
    """Parameters are created in the official order: a seed gives Mamba's values to the pair's forward Mamba,
    and the pair's shared out_proj is a copy of that Mamba's original out_proj."""
    d = 32
    torch.manual_seed(123)
    ref = Mamba(d)
    torch.manual_seed(123)
    pair = BiMambaPair(d)
    for name in ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                 "dt_proj.bias"]:
        assert torch.equal(pair.mamba_forw.state_dict()[name], ref.state_dict()[name]), name
    assert torch.equal(pair.out_proj.weight, ref.out_proj.weight)
    assert not torch.equal(pair.mamba_backw.in_proj.weight, ref.in_proj.weight)
    torch.manual_seed(123)
    v2 = BiMambaV2(d)
    for name in ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"]:
        assert torch.equal(v2.state_dict()[name], ref.state_dict()[name]), name


# ------------------------------------------------------------------------------------------------ forwards
def test_causal_conv_matches_official_slow_path():
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 9)
    out = mb.causal_depthwise_conv1d_silu(x, conv.weight, conv.bias)
    assert torch.allclose(out, F.silu(conv(x)[..., :9]), atol=1e-6)
    # explicit: y_t = sum_j w_j x_{t-K+1+j}
    xp = F.pad(x, (3, 0))
    manual = sum(conv.weight[:, 0, j, None] * xp[..., j:j + 9] for j in range(4)) + conv.bias[:, None]
    assert torch.allclose(out, F.silu(manual), atol=1e-6)


@pytest.mark.parametrize("length", [1, 3, 12])
def test_mamba_forward_matches_reference(length):
    torch.manual_seed(1)
    m = Mamba(16)
    u = torch.randn(2, length, 16)
    out = m(u)
    assert out.shape == u.shape
    assert close(out, ref_mamba(m, u))
    assert close(m(u.transpose(0, 1).contiguous().transpose(0, 1)), out)  # non-contiguous input


@pytest.mark.parametrize("divide", [False, True])
def test_bimamba_v2_forward_matches_reference(divide):
    torch.manual_seed(2)
    m = BiMambaV2(16, if_divide_out=divide, backward_dt_init="default")
    u = torch.randn(2, 10, 16)
    assert close(m(u), ref_bimamba_v2(m, u))


@pytest.mark.parametrize("length", [1, 4, 11])
def test_bimamba_pair_forward_matches_reference(length):
    torch.manual_seed(3)
    m = BiMambaPair(16)
    with torch.no_grad():  # make the LayerNorm non-trivial
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.2, 0.2)
    s = torch.randn(3, length, 16)
    out = m(s)
    assert out.shape == s.shape
    assert close(out, ref_pair(m, s))
    # = the official composition with the member Mambas called as modules (out_proj = Identity)
    n = m.norm(s)
    assert close(out, m.out_proj(m.mamba_forw(n) + m.mamba_backw(n.flip(1)).flip(1)))


@pytest.mark.parametrize("hw", [(3, 5), (4, 4), (1, 6)])
def test_ss2d_matches_four_separate_scans(hw):
    torch.manual_seed(4)
    m = SS2D(16)
    with torch.no_grad():
        m.out_norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(2, *hw, 16)
    out = m(u)
    assert out.shape == u.shape
    assert close(out, ref_ss2d(m, u))


def test_ss2d_3d_matches_six_separate_scans():
    torch.manual_seed(5)
    m = SS2D(8, spatial_dims=3)
    u = torch.randn(1, 2, 3, 4, 8)
    out = m(u)
    assert out.shape == u.shape
    assert close(out, ref_ss2d(m, u))


def test_vss_block_residual():
    torch.manual_seed(6)
    blk = VSSBlock(16, drop_path=0.3).eval()
    x = torch.randn(2, 3, 4, 16)
    ln = F.layer_norm(x, (16,), blk.ln_1.weight, blk.ln_1.bias, 1e-5)
    assert close(blk(x), x + ref_ss2d(blk.self_attention, ln))
    blk3 = VSSBlock(8, spatial_dims=3).eval()
    x3 = torch.randn(1, 2, 2, 3, 8)
    assert close(blk3(x3), x3 + blk3.self_attention(blk3.ln_1(x3)))


def test_each_layer_uses_one_grouped_scan(monkeypatch):
    calls = []

    def spy(u, delta, A, B, C, *args, **kwargs):
        calls.append((tuple(u.shape), tuple(B.shape)))
        return selective_scan_ref(u, delta, A, B, C, *args, **kwargs)

    monkeypatch.setattr(mb, "selective_scan_fn", spy)
    Mamba(16)(torch.randn(2, 5, 16))
    BiMambaV2(16)(torch.randn(2, 5, 16))
    BiMambaPair(16)(torch.randn(2, 5, 16))
    SS2D(16)(torch.randn(2, 3, 4, 16))
    SS2D(8, spatial_dims=3)(torch.randn(1, 2, 2, 3, 8))
    assert calls == [
        ((2, 32, 5), (2, N, 5)),
        ((2, 64, 5), (2, 2, N, 5)),
        ((2, 64, 5), (2, 2, N, 5)),
        ((2, 4 * 32, 12), (2, 4, N, 12)),
        ((1, 6 * 16, 12), (1, 6, N, 12)),
    ]


# ------------------------------------------------------------------------------------------------ properties
def test_mamba_is_causal():
    torch.manual_seed(7)
    m = Mamba(16)
    u = torch.randn(1, 12, 16)
    v = u.clone()
    v[:, 6:] = torch.randn(1, 6, 16)
    a, b = m(u), m(v)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_bidirectional_layers_see_the_future():
    torch.manual_seed(8)
    for m in (BiMambaV2(16), BiMambaPair(16)):
        u = torch.randn(1, 5, 16)
        v = u.clone()
        v[:, -1] = torch.randn(16)  # (not a constant shift: BiMambaPair's LayerNorm would remove it)
        assert not torch.allclose(m(u)[:, 0], m(v)[:, 0], atol=1e-6)


_SWAP = {"conv1d": "conv1d_b", "x_proj": "x_proj_b", "dt_proj": "dt_proj_b", "A_log": "A_b_log", "D": "D_b"}
_SWAP.update({v: k for k, v in _SWAP.items()})


@pytest.mark.parametrize("divide", [False, True])
def test_bimamba_v2_flip_equivariance(divide):
    """Reversing the sequence and swapping the forward/backward parameters reverses the output."""
    torch.manual_seed(9)
    m = BiMambaV2(16, if_divide_out=divide, backward_dt_init="mamba")
    swapped = BiMambaV2(16, if_divide_out=divide)
    sd = {}
    for k, v in m.state_dict().items():
        head, _, tail = k.partition(".")
        sd[(_SWAP.get(head, head) + ("." + tail if tail else ""))] = v
    swapped.load_state_dict(sd)
    u = torch.randn(2, 9, 16)
    assert close(swapped(u.flip(1)), m(u).flip(1))
    assert not close(m(u.flip(1)), m(u).flip(1))  # and the branches really differ


def test_bimamba_pair_flip_equivariance():
    torch.manual_seed(10)
    m = BiMambaPair(16)
    swapped = BiMambaPair(16)
    sd = {k.replace("mamba_forw", "TMP").replace("mamba_backw", "mamba_forw").replace("TMP", "mamba_backw"): v
          for k, v in m.state_dict().items()}
    swapped.load_state_dict(sd)
    s = torch.randn(2, 7, 16)
    assert close(swapped(s.flip(1)), m(s).flip(1))


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: Mamba(16), (2, 6, 16)),
        (lambda: BiMambaV2(16), (2, 6, 16)),
        (lambda: BiMambaPair(16), (2, 6, 16)),
        (lambda: VSSBlock(16), (2, 3, 2, 16)),
        (lambda: VSSBlock(8, spatial_dims=3), (1, 2, 2, 2, 8)),
    ],
)
def test_gradients_reach_every_parameter(make, shape):
    torch.manual_seed(11)
    m = make()
    x = torch.randn(shape, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bimamba_pair_runs_fp32_under_autocast():
    torch.manual_seed(12)
    m = BiMambaPair(16)
    s = torch.randn(2, 5, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(s)
    assert out.dtype == torch.float32
    assert close(out, m(s.float()), atol=1e-6)
    m.disable_autocast = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(s.float()).dtype == torch.bfloat16


def test_input_errors():
    with pytest.raises(ValueError, match="d_model=16"):
        Mamba(16)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\(batch, length, d_model"):
        BiMambaPair(16)(torch.randn(2, 16, 5, 5))
    with pytest.raises(ValueError, match="channels-last"):
        SS2D(16)(torch.randn(2, 16, 4, 4))  # channels-first by mistake
    with pytest.raises(ValueError, match="channels-last"):
        VSSBlock(16, spatial_dims=3)(torch.randn(2, 4, 4, 16))
    with pytest.raises(ValueError, match="spatial_dims"):
        SS2D(16, spatial_dims=1)
    with pytest.raises(ValueError, match="odd"):
        SS2D(16, d_conv=4)
    with pytest.raises(ValueError, match="dt_rank"):
        Mamba(16, dt_rank=0)
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(16, dt_min=0.2, dt_max=0.1)
