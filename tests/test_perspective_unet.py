"""Perspective+ Unet and its random-feature non-local attention: exact parameter counts, shapes and FLOPs of the
official 2D configuration (built on the meta device), the 3D extension (by formula and a small forward), the FAVOR+
maths, persistence of the random matrices, batch independence of SCSI, input checks and a short training run on the
demo nuclei image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from shared_networks.blocks.nonlocal_attention import (
    RandomFeatureAttention,
    gaussian_orthogonal_random_matrix,
    positive_random_features,
)
from shared_networks.blocks.perspective import (
    BiPathResBlock,
    CrossScaleIntegrator,
    ENLTransformerBlock,
    PostNormEncoderLayer,
)
from shared_networks.nets import PerspectiveUNet

# reference_numbers.md §2 (official PUnet, measured)
PARAMS = {9: 112_659_849, 4: 112_656_964}
BUFFERS = 2_779_557
RANDOM_MATRICES = 2_752_512
ABLATIONS = {  # §2.5, K = 9
    (False, True, True): 77_091_721,
    (True, False, True): 103_848_841,
    (False, False, True): 68_280_713,
    (True, True, False): 112_659_849,
}
SMALL = dict(channels=(8, 16, 32, 64, 128), scsi_hidden_size=32, scsi_heads=4, scsi_layers=2, scsi_mlp_dim=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test box is shared; one intra-op thread avoids oversubscription stalls on small tensors
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def meta(**kw) -> PerspectiveUNet:
    with torch.device("meta"):
        return PerspectiveUNet(**kw)


# ----------------------------------------------------------------------------------------------- counts and shapes
@pytest.mark.parametrize("k", [9, 4])
def test_param_and_buffer_counts_exact(k):
    net = meta(out_channels=k)
    assert n_params(net) == PARAMS[k]
    assert sum(b.numel() for b in net.buffers()) == BUFFERS
    mats = [b for n, b in net.named_buffers() if n.endswith("projection_matrix")]
    assert len(mats) == 6 and sum(b.numel() for b in mats) == RANDOM_MATRICES
    assert all(n in net.state_dict() for n, _ in net.named_buffers())  # every buffer is persistent


def test_module_breakdown_matches_reference():
    net = meta()
    assert [n_params(b) for b in net.encoder] == [156_864, 640_640, 2_559_232, 10_230_272, 40_907_776]
    assert n_params(net.encoder) == 54_494_784
    assert n_params(net.enltb) == 35_568_128
    assert [n_params(s) for s in net.enltb.stages] == [1_447_936, 5_779_456, 23_093_248]
    assert n_params(net.enltb.merges) == 2_624_512 and n_params(net.enltb.adjusters) == 2_622_976
    for stage, c in zip(net.enltb.stages, (256, 512, 1024)):
        assert all(n_params(b) == 11 * c * c + 12 * c for b in stage)
    assert n_params(net.scsi) == 8_811_008 and n_params(net.scsi.layers) + n_params(net.scsi.norm) == 7_890_944
    assert n_params(net.fuser) == 2_754_304
    assert n_params(net.decoder) == 11_026_432
    assert n_params(net.head) == 5_193


@pytest.mark.parametrize("flags", list(ABLATIONS))
def test_ablation_counts(flags):
    use_enltb, use_scsi, use_dilated = flags
    net = meta(use_enltb=use_enltb, use_scsi=use_scsi, use_dilated_path=use_dilated)
    assert n_params(net) == ABLATIONS[flags]


def formula_params(d: int, cin: int, k: int, ch, depths=(2, 2, 2), sd=256, sl=6, sf=2048, mlp=4) -> int:
    """Parameter count from the block formulas, for 2D (d=2) or 3D (d=3) 3-wide kernels."""
    kv = 3**d
    bprb = lambda i, c: 2 * (i * c + c) + 2 * (2 * kv * c * c + 4 * c) + 2 * c * c + c + 2 * c  # noqa: E731
    total = sum(bprb(i, c) for i, c in zip((cin,) + tuple(ch[:-1]), ch))
    deep = ch[2:]
    total += sum(dp * (2 * mlp + 3) * c * c + dp * (8 + mlp) * c for dp, c in zip(depths, deep))  # 11C^2+12C
    total += sum(2**d * a * b + 2 * b for a, b in zip(deep[:-1], deep[1:]))  # patch merging conv + BN
    total += sum(2 * c * c + c for c in deep[1:])  # 1x1 adjusters
    total += sum(c * sd + sd + sd * c + c for c in deep)  # SCSI in/out projections
    total += sl * (4 * sd * sd + 4 * sd + 2 * sd * sf + sf + sd + 4 * sd) + 2 * sd  # encoder layers + final LN
    total += sum(2 * c * c + c for c in deep)  # fusers
    dec = [(ch[4], ch[3]), (2 * ch[3], ch[2]), (2 * ch[2], ch[1]), (2 * ch[1], ch[0]), (ch[0], ch[0])]
    total += sum(kv * a * b + kv * b * b + 4 * b for a, b in dec)
    return total + kv * ch[0] * k + k


def test_parameter_formula_2d_and_3d():
    full = (64, 128, 256, 512, 1024)
    assert formula_params(2, 3, 9, full) == PARAMS[9] == n_params(meta())
    assert formula_params(3, 1, 9, full) == n_params(meta(spatial_dims=3)) == 237_901_065
    light = dict(channels=(32, 64, 128, 256, 512), scsi_hidden_size=128, scsi_mlp_dim=512)
    net3 = meta(spatial_dims=3, out_channels=14, img_size=(96, 96, 96), **light)
    assert n_params(net3) == formula_params(3, 1, 14, light["channels"], sd=128, sf=512) == 58_721_134
    assert not net3.gray_to_rgb and net3.encoder[0].plain.proj.weight.shape[1] == 1
    assert net3.encoder[0].plain.res.conv1.weight.shape[2:] == (3, 3, 3)


def test_full_size_shapes_and_flops_on_meta():
    """§2.2 shapes; §2.3 FLOPs: token-axis SCSI 170.266 G, whole model 317.37 G (FlopCounterMode, B=1)."""
    net = meta().eval()
    seen = {}
    for i, b in enumerate(net.encoder):
        b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"f{i}", tuple(o.shape)))
    net.scsi.layers[0].register_forward_hook(lambda m, a, o: seen.__setitem__("seq", tuple(a[0].shape)))
    net.scsi.register_forward_hook(lambda m, a, o: seen.__setitem__("scsi", [tuple(t.shape) for t in o]))
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        y = net(torch.empty(1, 1, 224, 224))
    assert tuple(y.shape) == (1, 9, 224, 224)
    assert [seen[f"f{i}"] for i in range(5)] == [
        (1, 64, 224, 224), (1, 128, 112, 112), (1, 256, 56, 56), (1, 512, 28, 28), (1, 1024, 14, 14)]
    assert seen["seq"] == (1, 4116, 256)
    assert seen["scsi"] == [(1, 256, 56, 56), (1, 512, 28, 28), (1, 1024, 14, 14)]
    counts = fc.get_flop_counts()
    assert sum(counts["PerspectiveUNet.scsi"].values()) == pytest.approx(170.266e9, rel=1e-3)
    assert sum(counts["PerspectiveUNet.enltb"].values()) == pytest.approx(40.288e9, rel=1e-3)
    assert fc.get_total_flops() == pytest.approx(317.37e9, rel=1e-3)

    # official-parity SCSI: the official 213.304 G minus the q/k projections it computes and never uses
    # (2*4116*256*512 per layer) and its length-1 attention products
    net.scsi_attention = "self"
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        net(torch.empty(1, 1, 224, 224))
    assert fc.get_total_flops() == pytest.approx(213.304e9 - 6 * 2 * 4116 * 256 * 512 - 6 * 4116 * 8 * 32 * 4, rel=1e-4)


def test_3d_shapes_on_meta():
    net = meta(spatial_dims=3, out_channels=14, img_size=(96, 96, 96), channels=(32, 64, 128, 256, 512),
               scsi_hidden_size=128, scsi_mlp_dim=512).eval()
    with torch.device("meta"):
        assert tuple(net(torch.empty(2, 1, 96, 96, 96)).shape) == (2, 14, 96, 96, 96)


def test_small_3d_forward_backward():
    torch.manual_seed(0)
    net = PerspectiveUNet(3, 2, 3, img_size=(32, 16, 32), **SMALL)
    x = torch.randn(2, 2, 32, 16, 32)
    y = net(x)
    assert y.shape == (2, 3, 32, 16, 32)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x[:1])
    torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-5)


def test_use_checkpoint_gives_the_same_gradients():
    """Recomputing the SCSI layers in the backward pass (the bundle's training default) changes memory, not maths:
    the recomputation replays the same dropout masks."""
    torch.manual_seed(0)
    plain = PerspectiveUNet(img_size=32, **SMALL).train()
    ckpt = PerspectiveUNet(img_size=32, use_checkpoint=True, **SMALL).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.scsi.use_checkpoint and ckpt.constructor_args["use_checkpoint"] is True
    x = torch.randn(2, 1, 32, 32)
    grads = []
    for net in (plain, ckpt):
        torch.manual_seed(1)  # same dropout / drop-path draws in both forwards
        net(x).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("scsi.layers" in n for n in grads[1])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n


def test_gray_to_rgb_and_channels():
    net = PerspectiveUNet(img_size=32, **SMALL).eval()
    assert net.gray_to_rgb and net.encoder[0].plain.proj.weight.shape[1] == 3
    x = torch.randn(1, 1, 32, 32)
    folded = PerspectiveUNet(img_size=32, gray_to_rgb=False, **SMALL).eval()
    assert n_params(net) - n_params(folded) == 2 * 2 * 8
    sd = net.state_dict()
    for p in ("plain", "dilated"):
        sd[f"encoder.0.{p}.proj.weight"] = sd[f"encoder.0.{p}.proj.weight"].sum(1, keepdim=True)
    folded.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-6)
    rgb = PerspectiveUNet(in_channels=3, img_size=32, **SMALL)
    assert not rgb.gray_to_rgb and rgb.encoder[0].plain.proj.weight.shape[1] == 3


def test_input_and_constructor_errors():
    net = PerspectiveUNet(img_size=32, **SMALL)
    with pytest.raises(ValueError, match="1 input channel"):
        net(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"built for spatial size \(32, 32\)"):
        net(torch.randn(1, 1, 48, 48))
    with pytest.raises(ValueError, match="4-D input"):
        net(torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        net(torch.full((1, 1, 32, 32), float("nan")))
    free = PerspectiveUNet(img_size=None, **SMALL)
    with pytest.raises(ValueError, match="divisible by"):
        free(torch.randn(1, 1, 40, 36))
    with pytest.raises(ValueError, match="spatial_dims"):
        PerspectiveUNet(spatial_dims=1)
    with pytest.raises(ValueError, match="5 encoder levels"):
        PerspectiveUNet(channels=(8, 16, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        PerspectiveUNet(img_size=100)
    with pytest.raises(ValueError, match="scsi_attention"):
        PerspectiveUNet(scsi_attention="batch")
    with pytest.raises(ValueError, match="gray_to_rgb"):
        PerspectiveUNet(in_channels=3, gray_to_rgb=True)


# --------------------------------------------------------------------------------------------------------- SCSI
def test_scsi_prediction_does_not_depend_on_the_batch():
    """Issue #8: the official SCSI attends across the images of a batch. Ours must not (both modes)."""
    torch.manual_seed(0)
    net = PerspectiveUNet(img_size=None, **SMALL).eval()
    seen = {}
    net.scsi.register_forward_hook(lambda m, a, o: seen.__setitem__("scsi", [t[0].clone() for t in o]))
    a, b = torch.randn(2, 1, 1, 48, 32)
    c = 5 * b.flip(-1) + 2

    def sample0(batch):
        y = net(batch)[0]
        return y, seen["scsi"]

    with torch.no_grad():
        for mode in ("tokens", "self"):
            net.scsi_attention = mode
            (y_ab, s_ab), (y_ac, s_ac) = sample0(torch.cat([a, b])), sample0(torch.cat([a, c]))
            torch.testing.assert_close(y_ab, y_ac, rtol=1e-5, atol=1e-7)
            for u, v in zip(s_ab, s_ac):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(net(a)[0], y_ab, rtol=1e-4, atol=1e-6)
        # control: the official defect (attention over the batch axis) is caught by the same comparison
        net.scsi_attention = "tokens"
        for layer in net.scsi.layers:
            layer.self_attn.batch_first = False
        (y_ab, s_ab), (y_ac, s_ac) = sample0(torch.cat([a, b])), sample0(torch.cat([a, c]))
        assert max((u - v).abs().max().item() for u, v in zip(s_ab, s_ac)) > 1e-2
        assert (y_ab - y_ac).abs().max() > 1e-6


def test_scsi_mixes_tokens_across_scales():
    torch.manual_seed(0)
    scsi = CrossScaleIntegrator(2, (8, 16, 32), hidden_size=16, num_heads=2, num_layers=1, mlp_dim=32).eval()
    feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 32, 2, 2)]
    moved = [f.clone() for f in feats]
    moved[2][..., 1, 1] += 3.0  # one coarse token
    with torch.no_grad():
        out, out2 = scsi(feats), scsi(moved)
        assert [o.shape for o in out] == [f.shape for f in feats]
        assert (out[0] - out2[0]).abs().max() > 1e-3  # fine-scale tokens see the coarse token
        scsi.attention = "self"
        out, out2 = scsi(feats), scsi(moved)
        torch.testing.assert_close(out[0], out2[0])  # no token mixing at all
        assert (out[2][..., 1, 1] - out2[2][..., 1, 1]).abs().max() > 1e-3


def test_self_mode_equals_official_batch_axis_attention_for_one_image():
    """For one image the official layer (MHA fed (B, N, d) with batch_first=False) reduces to 'self'."""
    torch.manual_seed(0)
    layer = PostNormEncoderLayer(32, 4, 64, 0.1, attention="self").eval()
    x = torch.randn(1, 50, 32)
    with torch.no_grad():
        ours = layer(x)
        layer.attention, layer.self_attn.batch_first = "tokens", False  # the official (defective) configuration
        official = layer(x)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- random-feature attention
def test_orthogonal_random_matrix():
    g = torch.Generator().manual_seed(0)
    w = gaussian_orthogonal_random_matrix(40, 16, generator=g)
    assert w.shape == (40, 16) and w.dtype == torch.float32
    u = w / w.norm(dim=1, keepdim=True)
    for blk in (u[:16], u[16:32], u[32:]):
        torch.testing.assert_close(blk @ blk.T, torch.eye(len(blk)), atol=1e-5, rtol=0)
    assert w.norm(dim=1).std() > 0.1  # Gaussian row norms (scaling 0)
    w1 = gaussian_orthogonal_random_matrix(16, 16, scaling=1)
    torch.testing.assert_close(w1.norm(dim=1), torch.full((16,), 4.0))
    same = gaussian_orthogonal_random_matrix(40, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, same)


def test_favor_equals_explicit_kernel_attention():
    """Y = D^-1 psi(Q) (psi(K)^T V) equals the quadratic form with the explicit kernel matrix psi(Q) psi(K)^T."""
    torch.manual_seed(0)
    attn = RandomFeatureAttention(16, num_heads=2, nb_features=24, qk_scale=1.5).eval()
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv(x).view(2, 30, 3, 2, 8).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1, eps=5e-5) * 1.5, F.normalize(k, dim=-1, eps=5e-5) * 1.5
        w = attn.projection_matrix
        psi = lambda t: 24**-0.5 * (torch.exp(t @ w.T - t.square().sum(-1, keepdim=True) / 2) + 1e-4)  # noqa: E731
        a = psi(q) @ psi(k).transpose(-1, -2)  # (B, h, N, N)
        ref = ((a / a.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(2, 30, 16)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_favor_estimates_softmax_attention():
    """With many features the random-feature kernel converges to exact softmax attention exp(s^2 q.k)."""
    torch.manual_seed(0)
    n, d, s = 64, 16, 1.5
    q, k = F.normalize(torch.randn(1, 1, n, d), dim=-1) * s, F.normalize(torch.randn(1, 1, n, d), dim=-1) * s
    exact = torch.softmax(q @ k.transpose(-1, -2), dim=-1)

    def err(m):  # relative error of the estimated attention matrix
        w = gaussian_orthogonal_random_matrix(m, d, generator=torch.Generator().manual_seed(1))
        qp, kp = positive_random_features(q, w), positive_random_features(k, w)
        approx = qp @ kp.transpose(-1, -2)
        approx = approx / approx.sum(-1, keepdim=True)
        return ((approx - exact).norm() / exact.norm()).item()

    e_1k, e_16k = err(1024), err(16384)
    assert e_16k < 0.15 and e_16k < 0.4 * e_1k  # Monte-Carlo rate: ~1/sqrt(m)


def test_random_matrix_is_a_persistent_buffer():
    torch.manual_seed(0)
    a = RandomFeatureAttention(32, num_heads=2).eval()
    assert "projection_matrix" in a.state_dict() and "projection_matrix" not in dict(a.named_parameters())
    assert a.projection_matrix.shape == (16, 16)
    torch.manual_seed(123)
    b = RandomFeatureAttention(32, num_heads=2).eval()
    x = torch.randn(2, 20, 32)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "projection_matrix"}, strict=False)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() > 1e-4  # same weights, other random matrix: another function
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_network_state_dict_restores_the_same_function(tmp_path):
    torch.manual_seed(0)
    net = PerspectiveUNet(img_size=32, **SMALL).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(99)
    fresh = PerspectiveUNet(img_size=32, **SMALL).eval()
    x = torch.randn(1, 1, 32, 32)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_redraw_interval():
    torch.manual_seed(0)
    a = RandomFeatureAttention(16, redraw_interval=2)
    x = torch.randn(1, 10, 16)
    w0 = a.projection_matrix.clone()
    a(x), a(x)
    assert torch.equal(a.projection_matrix, w0)
    a(x)  # third call in training: redrawn
    assert not torch.equal(a.projection_matrix, w0)
    a.eval()
    w1 = a.projection_matrix.clone()
    for _ in range(5):
        a(x)
    assert torch.equal(a.projection_matrix, w1)  # never in eval
    fixed = RandomFeatureAttention(16)  # official: never redrawn
    w2 = fixed.projection_matrix.clone()
    for _ in range(5):
        fixed(x)
    assert torch.equal(fixed.projection_matrix, w2)


def test_attention_options_and_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 40, 32)
    a = RandomFeatureAttention(32, num_heads=4, nb_features=48, out_proj=True, normalize_qk=False, stabilize=True)
    assert a.projection_matrix.shape == (48, 8) and n_params(a) == 3 * 32 * 33 + 32 * 33
    y = a(x * 30)  # unnormalised large inputs stay finite thanks to the stabiliser
    assert y.shape == x.shape and torch.isfinite(y).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = RandomFeatureAttention(32)(x)
    assert z.dtype == torch.bfloat16 and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="divisible"):
        RandomFeatureAttention(30, num_heads=4)
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        RandomFeatureAttention(32)(torch.randn(2, 32, 4, 4))


# ------------------------------------------------------------------------------------------------------- blocks
def test_bprb_and_enltb_blocks():
    torch.manual_seed(0)
    b = BiPathResBlock(2, 5, 12)
    c = 12
    assert n_params(b) == 2 * (5 * c + c) + 2 * (18 * c * c + 4 * c) + 2 * c * c + c + 2 * c
    assert b(torch.randn(2, 5, 9, 7)).shape == (2, 12, 9, 7)
    abl = BiPathResBlock(2, 5, 12, use_dilated_path=False).eval()
    x = torch.randn(1, 5, 8, 8)
    with torch.no_grad():
        y = abl(x)
        abl.dilated.proj.weight.normal_()
        torch.testing.assert_close(abl(x), y)  # the dilated path is unused in the ablation
    blk = ENLTransformerBlock(16, drop=0.1, attn_drop=0.1, drop_path=0.1)
    assert n_params(blk) == 11 * 16 * 16 + 12 * 16
    x3 = torch.randn(2, 16, 3, 5, 4)
    assert blk(x3).shape == x3.shape  # 3D tokens
    blk.eval()
    with torch.no_grad():  # tokens are a set: permuting voxels permutes the output (no positional information)
        perm = torch.randperm(60)
        t = x3.flatten(2)
        torch.testing.assert_close(blk(t[..., perm].view_as(x3)).flatten(2), blk(x3).flatten(2)[..., perm],
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- training
def test_trains_on_demo_nuclei():
    """A reduced Perspective+ Unet learns binary nuclei foreground on the demo image (96x96): loss falls, Dice rises."""
    from PIL import Image
    from monai.losses import DiceCELoss

    demo = Path(__file__).resolve().parents[1] / "data" / "demo" / "nuclei"
    im = np.asarray(Image.open(demo / "image.tif"), dtype=np.float32)
    fg = (np.asarray(Image.open(demo / "mask.tif")) > 0).astype(np.float32)
    x = F.interpolate(torch.from_numpy((im - im.mean()) / im.std())[None, None], size=(96, 96), mode="area")
    y = (F.interpolate(torch.from_numpy(fg)[None, None], size=(96, 96), mode="area") > 0.5).float()
    xb, yb = torch.cat([x, x.flip(-1)]), torch.cat([y, y.flip(-1)])

    torch.manual_seed(0)
    net = PerspectiveUNet(2, 1, 2, img_size=96, channels=(8, 16, 32, 64, 128), enltb_depths=(1, 1, 1),
                          scsi_hidden_size=32, scsi_heads=4, scsi_layers=1, scsi_mlp_dim=64)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def dice() -> float:
        net.eval()
        with torch.no_grad():
            p = net(x).argmax(1, keepdim=True).float()
        net.train()
        return (2 * (p * y).sum() / (p.sum() + y.sum()).clamp_min(1)).item()

    d0, losses = dice(), []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    d1 = dice()
    assert np.mean(losses[-3:]) < 0.4 * np.mean(losses[:3])
    assert d1 > 0.75 and d1 > d0 + 0.5
