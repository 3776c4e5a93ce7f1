"""Polyp-Mamba: parameter counts, layout, SAS/GSI maths, StructureLoss, pretrained loading, a short learning check."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared_networks.blocks.mamba import VSSBlock
from shared_networks.losses import StructureLoss, boundary_weight_map
from shared_networks.nets import PolypMamba
from shared_networks.nets.polyp_mamba import GlobalSemanticsInjection, PatchExpand, PatchMerging, ScaleAwareSemantics

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), sas_channels=16, sas_depth=1,
            d_state=4, drop_path_rate=0.0)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------------
# parameter counts (full configurations built on the meta device: no memory, no init cost)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 32_270_761),  # recommended: variant B (conv+BN 1440->384, 2 VSS @384, 4 GSI)
        ({"semantic_injection": False}, 27_427_561),  # VM-UNet VSSM, enc [2,2,2,2] dec [2,2,2,1]
        ({"semantic_injection": False, "depths": (2, 2, 9, 2), "depths_decoder": (2, 9, 2, 2)}, 44_273_833),
        ({"sas_channels": None, "sas_depth": 1}, 44_914_921),  # variant A1
        ({"sas_channels": None, "sas_depth": 2}, 60_043_561),  # variant A2
    ],
)
def test_param_counts(kwargs, expected):
    with torch.device("meta"):
        net = PolypMamba(spatial_dims=2, in_channels=3, out_channels=1, **kwargs)
    assert n_params(net) == expected


def test_param_breakdown():
    with torch.device("meta"):
        net = PolypMamba()
        blocks = [VSSBlock(d) for d in (96, 192, 384, 768)]
        gsi = GlobalSemanticsInjection(2, 96, 384)
    assert n_params(net.patch_embed) + n_params(net.layers) == 13_752_480
    assert n_params(net.layers_up) + n_params(net.final_up) + n_params(net.final_conv) == 13_675_081
    assert n_params(net.sas) == 553_728 + 2_391_552
    assert n_params(net.gsi) == 1_897_920
    assert [n_params(b) for b in blocks] == [105_408, 339_840, 1_195_776, 4_455_936]
    assert n_params(gsi) == 96**2 + 2 * 384 * 96 + 6 * 96


# ----------------------------------------------------------------------------------------------------------------
# layout pieces
# ----------------------------------------------------------------------------------------------------------------
def test_patch_merging_matches_vmamba_order():
    torch.manual_seed(0)
    m = PatchMerging(3, spatial_dims=2)
    x = torch.randn(2, 6, 4, 3)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(m(x), m.reduction(m.norm(cat)))
    m3 = PatchMerging(2, spatial_dims=3)
    x3 = torch.randn(1, 4, 2, 6, 2)
    parts = [x3[:, d::2, h::2, w::2] for w in (0, 1) for h in (0, 1) for d in (0, 1)]  # first axis fastest
    torch.testing.assert_close(m3(x3), m3.reduction(m3.norm(torch.cat(parts, -1))))


def test_patch_expand_layout():
    torch.manual_seed(0)
    e = PatchExpand(8, 4, scale=2, spatial_dims=2)
    x = torch.randn(1, 3, 5, 8)
    y = e(x)
    assert y.shape == (1, 6, 10, 4)
    t = e.expand(x)  # (1, 3, 5, 16): channels read as (p1, p2, c)
    ref = torch.empty(1, 6, 10, 4)
    for p1 in range(2):
        for p2 in range(2):
            ref[:, p1::2, p2::2] = t[..., (p1 * 2 + p2) * 4 : (p1 * 2 + p2 + 1) * 4]
    torch.testing.assert_close(y, e.norm(ref))
    e3 = PatchExpand(4, 2, scale=2, spatial_dims=3)
    x3 = torch.randn(1, 2, 3, 2, 4)
    t3 = e3.expand(x3)
    ref3 = torch.empty(1, 4, 6, 4, 2)
    for i in range(8):
        p0, p1, p2 = i // 4, (i // 2) % 2, i % 2
        ref3[:, p0::2, p1::2, p2::2] = t3[..., i * 2 : (i + 1) * 2]
    torch.testing.assert_close(e3(x3), e3.norm(ref3))


def test_gsi_formula_and_gates():
    torch.manual_seed(0)
    for gate, act in (("sigmoid", torch.sigmoid), ("hsigmoid", lambda v: F.relu6(v + 3) / 6)):
        gsi = GlobalSemanticsInjection(2, 6, 10, gate=gate).eval()
        local, glob = torch.randn(2, 6, 8, 8), torch.randn(2, 10, 2, 2)

        def conv_bn(block, v):
            conv, bn = block.conv, block.adn.N
            v = F.conv2d(v, conv.weight)
            return (v - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var + bn.eps)[
                None, :, None, None
            ] * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]

        up = lambda v: F.interpolate(v, size=(8, 8), mode="bilinear", align_corners=False)  # noqa: E731
        ref = conv_bn(gsi.local_embedding, local) * up(act(conv_bn(gsi.global_act, glob))) + up(
            conv_bn(gsi.global_embedding, glob)
        )
        torch.testing.assert_close(gsi(local, glob), ref)
    with pytest.raises(ValueError, match="gate"):
        GlobalSemanticsInjection(2, 4, 4, gate="relu")


def test_sas_pools_concats_and_splits():
    torch.manual_seed(0)
    feats = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate((4, 8, 16, 32))]
    sas_a = ScaleAwareSemantics(2, (4, 8, 16, 32), channels=None, depth=0).eval()  # no blocks: pure pooling
    out = sas_a(feats)
    assert [tuple(o.shape) for o in out] == [(1, c, 2, 2) for c in (4, 8, 16, 32)]
    for f, o in zip(feats, out):
        k = f.shape[-1] // 2
        torch.testing.assert_close(o, F.avg_pool2d(f, k))
    sas_b = ScaleAwareSemantics(2, (4, 8, 16, 32), channels=12, depth=1, d_state=4).eval()
    out_b = sas_b(feats)
    assert len(out_b) == 4 and all(o.shape == (1, 12, 2, 2) for o in out_b)


def _stage_shapes(net, x):
    shapes = {}
    hooks = [net.patch_embed.register_forward_hook(lambda m, i, o: shapes.__setitem__("embed", tuple(o.shape)))]
    for i, layer in enumerate(net.layers):
        hooks.append(
            layer.register_forward_hook(lambda m, i_, o, i=i: shapes.__setitem__(f"enc{i}", tuple(o[0].shape)))
        )
    for j, g in enumerate(net.gsi):
        hooks.append(g.register_forward_hook(lambda m, i_, o, j=j: shapes.__setitem__(f"gsi{j}", tuple(o.shape))))
    with torch.no_grad():
        y = net(x)
    for h in hooks:
        h.remove()
    return y, shapes


def test_forward_2d_shapes():
    torch.manual_seed(0)
    net = PolypMamba(dims=(16, 32, 64, 128), d_state=4, sas_channels=32).eval()  # default depths, narrow widths
    y, s = _stage_shapes(net, torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1, 64, 64) and torch.isfinite(y).all()
    assert s["embed"] == (2, 16, 16, 16)
    assert [s[f"enc{i}"] for i in range(4)] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128)]
    assert [s[f"gsi{j}"] for j in range(4)] == [(2, 128, 2, 2), (2, 64, 4, 4), (2, 32, 8, 8), (2, 16, 16, 16)]
    # non-square input and multi-class output
    net2 = PolypMamba(out_channels=3, skip_fusion="concat", gsi_gate="hsigmoid", **TINY).eval()
    with torch.no_grad():
        assert net2(torch.randn(1, 3, 32, 64)).shape == (1, 3, 32, 64)


def test_forward_3d_shapes():
    torch.manual_seed(0)
    net = PolypMamba(spatial_dims=3, in_channels=1, out_channels=2, **TINY).eval()
    y, s = _stage_shapes(net, torch.randn(1, 1, 32, 32, 64))
    assert y.shape == (1, 2, 32, 32, 64) and torch.isfinite(y).all()
    assert [s[f"enc{i}"] for i in range(4)] == [(1, 8, 8, 16, 8), (1, 4, 4, 8, 16), (1, 2, 2, 4, 32), (1, 1, 1, 2, 64)]
    assert s["gsi3"] == (1, 8, 8, 8, 16)  # channels-first


def test_input_validation():
    net = PolypMamba(**TINY)
    with pytest.raises(ValueError, match="channel"):
        net(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 3, 48, 64))
    bad = torch.randn(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net(bad)
    with pytest.raises(ValueError, match="spatial_dims"):
        PolypMamba(spatial_dims=1)
    with pytest.raises(ValueError, match="skip_fusion"):
        PolypMamba(skip_fusion="mul", **TINY)


# ----------------------------------------------------------------------------------------------------------------
# StructureLoss
# ----------------------------------------------------------------------------------------------------------------
def test_structure_loss_hand_computation():
    # 2x2 image, 3x3 box: every window covers the whole image plus zero padding -> box mean = 1/9 everywhere
    logits = [[2.0, -1.0], [0.0, 1.0]]
    target = [[1.0, 0.0], [0.0, 0.0]]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = lambda x, g: math.log1p(math.exp(x)) - g * x  # noqa: E731
    w = [[1 + 5 * abs(1 / 9 - g) for g in row] for row in target]  # 49/9 on the object, 14/9 elsewhere
    cells = [(logits[i][j], target[i][j], w[i][j]) for i in range(2) for j in range(2)]
    inter = sum(wi * sig(x) * g for x, g, wi in cells)
    union = sum(wi * (sig(x) + g) for x, g, wi in cells)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    plain_bce = sum(bce(x, g) for x, g, _ in cells) / 4
    weighted_bce = sum(wi * bce(x, g) for x, g, wi in cells) / sum(wi for _, _, wi in cells)

    p, g = torch.tensor(logits)[None, None], torch.tensor(target)[None, None]
    torch.testing.assert_close(boundary_weight_map(g, 3), torch.tensor(w)[None, None])
    assert StructureLoss(kernel_size=3)(p, g).item() == pytest.approx(plain_bce + wiou, rel=1e-6)
    assert StructureLoss(kernel_size=3, weighted_bce=True)(p, g).item() == pytest.approx(weighted_bce + wiou, rel=1e-6)
    assert StructureLoss(kernel_size=3, bce_weight=0.5, iou_weight=2)(p, g).item() == pytest.approx(
        0.5 * plain_bce + 2 * wiou, rel=1e-6
    )


def test_structure_loss_equals_pranet_code_and_reductions():
    torch.manual_seed(0)
    pred = torch.randn(3, 1, 48, 40) * 3
    mask = (torch.rand(3, 1, 48, 40) > 0.6).float()
    # PraNet MyTrain.py structure_loss, including its legacy `reduce='none'` argument (truthy -> plain mean BCE)
    weit = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wbce = F.binary_cross_entropy_with_logits(pred, mask, reduce="none")
    assert wbce.ndim == 0  # the quirk: a scalar, so the weighting below cancels
    wbce = (weit * wbce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    s = torch.sigmoid(pred)
    inter = ((s * mask) * weit).sum(dim=(2, 3))
    union = ((s + mask) * weit).sum(dim=(2, 3))
    pranet = (wbce + 1 - (inter + 1) / (union - inter + 1)).mean()
    torch.testing.assert_close(StructureLoss()(pred, mask), pranet)

    per_image = StructureLoss(reduction="none")(pred, mask)
    assert per_image.shape == (3, 1)
    torch.testing.assert_close(StructureLoss(reduction="sum")(pred, mask), per_image.sum())
    torch.testing.assert_close(per_image.mean(), pranet)
    # a perfect, confident prediction has (almost) zero loss
    assert StructureLoss()(mask * 40 - 20, mask).item() < 1e-6
    with pytest.raises(ValueError, match="shape"):
        StructureLoss()(pred, mask[:, :, :10])
    with pytest.raises(ValueError, match="odd"):
        StructureLoss(kernel_size=4)


def test_structure_loss_3d():
    torch.manual_seed(0)
    g = (torch.rand(1, 1, 34, 36, 40) > 0.5).float()
    # separable 3D box mean equals the direct 31^3 average pool (zero padding counted)
    torch.testing.assert_close(boundary_weight_map(g), 1 + 5 * (F.avg_pool3d(g, 31, 1, 15) - g).abs())
    small = (torch.rand(2, 1, 8, 12, 10) > 0.5).float()  # smaller than the kernel: still works
    loss = StructureLoss()(torch.randn(2, 1, 8, 12, 10, requires_grad=True), small)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------------
# pretrained encoder loading (checkpoints written by the test)
# ----------------------------------------------------------------------------------------------------------------
SMALL = dict(dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), depths_decoder=(2, 2, 2, 1), sas_channels=16, d_state=4)


def _fake_vmamba_checkpoint(path: Path) -> dict:
    """A VMamba v0 classification-style file: deeper stage 2, final norm and head, under 'model'."""
    torch.manual_seed(1)
    src = PolypMamba(semantic_injection=False, dims=(8, 16, 32, 64), depths=(2, 2, 4, 2), d_state=4)
    sd = {k: v for k, v in src.state_dict().items() if k.startswith(("patch_embed.", "layers."))}
    sd["norm.weight"], sd["norm.bias"] = torch.ones(64), torch.zeros(64)
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 64), torch.zeros(1000)
    torch.save({"model": sd, "epoch": 238}, path)
    return sd


def test_load_vmamba_classification_checkpoint(tmp_path):
    sd = _fake_vmamba_checkpoint(tmp_path / "vmamba.pth")
    net = PolypMamba(**SMALL)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = net.load_pretrained_encoder(tmp_path / "vmamba.pth")
    own = net.state_dict()
    # encoder: every tensor of the 4 stages (blocks 0-1) and the patch embedding
    enc = [k for k in own if k.startswith(("patch_embed.", "layers."))]
    assert set(enc) <= set(report["loaded"])
    for k in enc:
        torch.testing.assert_close(own[k], sd[k])
    # decoder mirrored as VM-UNet does: encoder stage i -> decoder stage 3 - i (blocks only)
    torch.testing.assert_close(
        own["layers_up.0.blocks.1.self_attention.A_logs"], sd["layers.3.blocks.1.self_attention.A_logs"]
    )
    torch.testing.assert_close(
        own["layers_up.3.blocks.0.self_attention.in_proj.weight"], sd["layers.0.blocks.0.self_attention.in_proj.weight"]
    )
    assert "layers_up.3.blocks.1.ln_1.weight" not in own  # decoder stage 3 has one block
    # skipped: the extra stage-2 blocks, the classifier; untouched: SAS / GSI / PatchExpand / head
    assert "head.weight" in report["unused"] and "layers.2.blocks.3.ln_1.weight" in report["unused"]
    for k in ("sas.proj.conv.weight", "gsi.0.global_act.conv.weight", "layers_up.1.upsample.expand.weight",
              "final_conv.weight"):
        assert k in report["not_loaded"]
        torch.testing.assert_close(own[k], before[k])
    # an RGB checkpoint into a 1-channel network: the stem is reported and skipped, the rest loads
    mono = PolypMamba(in_channels=1, **SMALL)
    rep = mono.load_pretrained_encoder(tmp_path / "vmamba.pth", mirror_decoder=False)
    assert any(m.startswith("patch_embed.proj.weight") for m in rep["shape_mismatch"])
    assert not any(k.startswith("layers_up.") for k in rep["loaded"])
    # the constructor argument does the same
    net2 = PolypMamba(pretrained_encoder=tmp_path / "vmamba.pth", **SMALL)
    torch.testing.assert_close(net2.state_dict()["layers.1.downsample.reduction.weight"],
                               sd["layers.1.downsample.reduction.weight"])


def test_load_vmunet_checkpoint_restores_model(tmp_path):
    # VM-UNet's training script saves {"model_state_dict": VMUNet.state_dict(), ...}: keys prefixed "vmunet."
    torch.manual_seed(2)
    cfg = {k: v for k, v in TINY.items() if not k.startswith("sas")}
    src = PolypMamba(semantic_injection=False, **cfg).eval()
    sd = {"vmunet." + k: v for k, v in src.state_dict().items()}
    torch.save({"model_state_dict": sd, "epoch": 300, "min_loss": 0.1}, tmp_path / "vmunet.pth")
    dst = PolypMamba(semantic_injection=False, **cfg).eval()
    report = dst.load_pretrained_encoder(tmp_path / "vmunet.pth")
    assert not report["not_loaded"] and not report["unused"] and not report["shape_mismatch"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


class _Config:  # stands for the yacs config objects training checkpoints pickle
    pass


def test_load_refuses_unusable_files(tmp_path):
    net = PolypMamba(**SMALL)
    torch.save({"model": {"backbone.stem.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor .* fits this network"):
        net.load_pretrained_encoder(tmp_path / "other.pth")
    # right names, wrong widths (e.g. VMamba-S dims 96.. into a narrow network): nothing fits -> refused
    _fake_vmamba_checkpoint(tmp_path / "vmamba.pth")
    with pytest.raises(ValueError, match="other shapes"):
        PolypMamba(**{**SMALL, "dims": (16, 32, 64, 128)}).load_pretrained_encoder(tmp_path / "vmamba.pth")
    torch.save({"model": {"x": torch.zeros(1)}, "config": _Config()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights-only"):
        net.load_pretrained_encoder(tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError):
        net.load_pretrained_encoder(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="2D"):
        PolypMamba(spatial_dims=3, **TINY).load_pretrained_encoder(tmp_path / "vmamba.pth")


# ----------------------------------------------------------------------------------------------------------------
# learning check on real microscopy (nuclei demo image made RGB)
# ----------------------------------------------------------------------------------------------------------------
def _nuclei_crops(size: int = 64, n: int = 8):
    from skimage import io, transform

    img = io.imread(ROOT / "data/demo/nuclei/image.tif").astype(np.float32)
    fg = (io.imread(ROOT / "data/demo/nuclei/mask.tif") > 0).astype(np.float32)
    img = transform.resize(img, (256, 256), order=1, anti_aliasing=True)
    fg = transform.resize(fg, (256, 256), order=0, anti_aliasing=False)
    img = (img - img.mean()) / img.std()
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 256 - size, n), rng.integers(0, 256 - size, n)
    x = np.stack([img[y : y + size, c : c + size] for y, c in zip(ys, xs)])
    g = np.stack([fg[y : y + size, c : c + size] for y, c in zip(ys, xs)])
    x = torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1)  # grey -> RGB
    return x, torch.from_numpy(g)[:, None]


def _dice(logits, g):
    p = (logits > 0).float()
    return float(2 * (p * g).sum() / (p.sum() + g.sum() + 1e-6))


def test_learns_nuclei_foreground():
    # tiny configuration, 4 crops of 64x64 (nuclei image at half resolution, grey repeated to RGB), 16 Adam steps
    x, g = _nuclei_crops(64, 4)
    torch.manual_seed(0)
    net = PolypMamba(**TINY)
    loss_fn = StructureLoss(kernel_size=15)  # box width scaled to the small crops (31 at 352x352)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net.eval()
    with torch.no_grad():
        out = net(x)
    dice0, loss0 = _dice(out, g), loss_fn(out, g).item()
    net.train()
    for step in range(16):
        loss = loss_fn(net(x), g)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter (SAS and GSI included) takes part
            missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        opt.step()
    net.eval()
    with torch.no_grad():
        out = net(x)
    dice1, loss1 = _dice(out, g), loss_fn(out, g).item()
    assert loss1 < 0.85 * loss0, (loss0, loss1)
    assert dice1 > max(dice0 + 0.2, 0.6), (dice0, dice1)
