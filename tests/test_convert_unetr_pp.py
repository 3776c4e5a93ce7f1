"""Official UNETR++ checkpoint import.

The official code cannot be imported here, so the test carries its own functional re-implementation of the official
forward pass, written from the spec's prose (docs: shared/specs/unetr_pp.md §1, §3), including the x_SA layout quirk
done with explicit index arithmetic. The converted network must match it on random weights, in the official (z, y, x)
layout and — on the transposed input — in the MONAI (x, y, z) layout. Key names and shapes must equal the official
state-dict key lists (official_keys/*.json) exactly.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

from shared_networks.convert import from_official as from_official_any
from shared_networks.convert.__main__ import main as cli_main
from shared_networks.convert.unetr_pp import from_official
from shared_networks.nets import UNETRPP

@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These small CPU workloads gain little from a second thread but slow down many times over when several
    processes share the cores (measured here: 61 s vs 450 s for both UNETR++ test files); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ROOT = os.path.join(os.path.dirname(__file__), "..")
SPECS = next(
    (p for p in (os.path.join(ROOT, "shared", "specs"), "/work/shared/specs") if os.path.isdir(p)), None
)
STEM = {"synapse": (2, 4, 4), "acdc": (1, 4, 4), "tumor": (4, 4, 4)}


# ------------------------------------------------------------------------------------ reference (official maths)


def ref_resblock(x, sd, pre, norm):
    def nrm(t, i):
        if norm == "instance":
            return F.instance_norm(t)
        return F.batch_norm(t, sd[f"{pre}norm{i}.running_mean"], sd[f"{pre}norm{i}.running_var"],
                            sd[f"{pre}norm{i}.weight"], sd[f"{pre}norm{i}.bias"], training=False)

    y = F.leaky_relu(nrm(F.conv3d(x, sd[pre + "conv1.conv.weight"], padding=1), 1), 0.01)
    y = nrm(F.conv3d(y, sd[pre + "conv2.conv.weight"], padding=1), 2)
    res = x
    if pre + "conv3.conv.weight" in sd:
        res = nrm(F.conv3d(x, sd[pre + "conv3.conv.weight"]), 3)
    return F.leaky_relu(y + res, 0.01)


def ref_epa(t, sd, pre, variant, heads=4):
    """EPA as described in spec §3.3 (tokens (B, N, C) -> (B, N, C))."""
    b, n, c = t.shape
    d = c // heads
    qkvv = (t @ sd[pre + "qkvv.weight"].T).reshape(b, n, 4, heads, d)
    q, k, v_ca, v_sa = (qkvv[:, :, i].permute(0, 2, 3, 1) for i in range(4))  # (B, h, d, N)
    if variant == "tumor":
        k_p, v_p = k @ sd[pre + "EF"], v_sa @ sd[pre + "EF"]
    else:
        k_p = k @ sd[pre + "E.weight"].T + sd[pre + "E.bias"]
        v_p = v_sa @ sd[pre + "F.weight"].T + sd[pre + "F.bias"]
    q_hat = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k_hat = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_c = torch.softmax(torch.einsum("bhin,bhjn->bhij", q_hat, k_hat) * sd[pre + "temperature"], dim=-1)
    x_c = torch.einsum("bhij,bhjn->bnhi", a_c, v_ca).reshape(b, n, c)
    a_s = torch.softmax(torch.einsum("bhdn,bhdp->bhnp", q_hat, k_p) * sd[pre + "temperature2"], dim=-1)
    x_s = torch.einsum("bhnp,bhdp->bhnd", a_s, v_p)
    # quirk: output element (n, c) is the flat index f = n*C + c of a (d, h, N)-ordered buffer
    f = torch.arange(n * c).reshape(n, c)
    dd, hh, nn = f // (heads * n), (f // n) % heads, f % n
    x_s = x_s[:, hh, nn, dd]
    if variant == "tumor":
        return x_s + x_c
    return torch.cat((x_s @ sd[pre + "out_proj.weight"].T + sd[pre + "out_proj.bias"],
                      x_c @ sd[pre + "out_proj2.weight"].T + sd[pre + "out_proj2.bias"]), dim=-1)


def ref_block(x, sd, pre, variant):
    b, c, *s = x.shape
    t = x.reshape(b, c, -1).transpose(1, 2) + sd[pre + "pos_embed"]
    tn = F.layer_norm(t, (c,), sd[pre + "norm.weight"], sd[pre + "norm.bias"])
    t = t + sd[pre + "gamma"] * ref_epa(tn, sd, pre + "epa_block.", variant)
    skip = t.transpose(1, 2).reshape(b, c, *s)
    y = ref_resblock(skip, sd, pre + "conv51.", "batch")
    if variant == "acdc":
        y = ref_resblock(y, sd, pre + "conv52.", "batch")
    return skip + F.conv3d(y, sd[pre + "conv8.1.weight"], sd[pre + "conv8.1.bias"])


def ref_net(x, sd, variant):
    """Official UNETR++ forward (eval mode) in the (z, y, x) layout; returns [out1, out2, out3]."""
    hidden, h = [], x
    for i in range(4):
        pre = f"unetr_pp_encoder.downsample_layers.{i}."
        w = sd[pre + "0.conv.weight"]
        h = F.conv3d(h, w, stride=w.shape[2:])
        h = F.group_norm(h, x.shape[1] if i == 0 else w.shape[1], sd[pre + "1.weight"], sd[pre + "1.bias"])
        for j in range(3):
            h = ref_block(h, sd, f"unetr_pp_encoder.stages.{i}.{j}.", variant)
        hidden.append(h)
    conv_skip = ref_resblock(x, sd, "encoder1.", "instance")
    dec = hidden[3]
    outs = {}
    for name, skip in (("decoder5", hidden[2]), ("decoder4", hidden[1]), ("decoder3", hidden[0])):
        w = sd[name + ".transp_conv.conv.weight"]
        dec = F.conv_transpose3d(dec, w, stride=w.shape[2:]) + skip
        for j in range(3):
            dec = ref_block(dec, sd, f"{name}.decoder_block.0.{j}.", variant)
        outs[name] = dec
    w = sd["decoder2.transp_conv.conv.weight"]
    y = ref_resblock(F.conv_transpose3d(dec, w, stride=w.shape[2:]) + conv_skip, sd, "decoder2.decoder_block.0.",
                     "instance")
    head = lambda t, i: F.conv3d(t, sd[f"out{i}.conv.conv.weight"], sd[f"out{i}.conv.conv.bias"])  # noqa: E731
    return [head(y, 1), head(outs["decoder3"], 2), head(outs["decoder4"], 3)]


def random_official_state_dict(variant, in_channels, out_channels, img_size, seed=0):
    """An 'official checkpoint' with every tensor randomised (so that gamma, pos-embeds, temperatures and BN
    statistics all matter), keys and shapes from the official-layout network."""
    with torch.device("meta"):
        template = UNETRPP(in_channels, out_channels, img_size=img_size, variant=variant, axis_order="zyx",
                           deep_supervision=True).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, t in template.items():
        if not t.is_floating_point():
            sd[k] = torch.zeros(t.shape, dtype=t.dtype)
            continue
        r = torch.randn(t.shape, generator=g)
        fan_in = t[0].numel() if t.ndim > 1 else 1
        if k.endswith(("gamma", "pos_embed")):
            r = 0.5 * r
        elif "temperature" in k or k.endswith("running_var"):
            r = 0.5 + r.abs()
        elif t.ndim == 1:  # biases, norm affine, running means
            r = (1.0 if "norm" in k and k.endswith("weight") else 0.0) + 0.1 * r
        elif ".transp_conv." in k or k.endswith(".EF"):  # (in, out, k...) with k = stride; EF is (N, p)
            r = r / t.shape[0] ** 0.5
        else:
            r = r / fan_in**0.5
        sd[k] = r
    if variant == "synapse":  # official E and F are one module
        for k in sd:
            if ".epa_block.F." in k:
                sd[k] = sd[k.replace(".epa_block.F.", ".epa_block.E.")]
    return sd


CASES = [  # variant, in_channels, K, reduced official (z, y, x) ROI with anisotropic stage grids
    ("synapse", 1, 3, (16, 64, 32)),
    ("acdc", 1, 3, (8, 64, 32)),
    ("tumor", 2, 3, (32, 64, 32)),
]


@pytest.mark.parametrize("variant,cin,k,roi", CASES)
def test_matches_official_maths_in_both_layouts(variant, cin, k, roi):
    sd = random_official_state_dict(variant, cin, k, roi)
    x = torch.randn(2, cin, *roi, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref_net(x, sd, variant)
        assert expected[0].std() > 0.1  # the random weights give a non-trivial function

        net = from_official(sd, layout="official", variant=variant, img_size=roi)
        assert not net.training and net.axis_order == "zyx" and net.deep_supervision
        torch.testing.assert_close(net(x), expected[0], rtol=1e-3, atol=1e-3)

        monai = from_official_any("unetr_pp", sd, layout="monai", variant=variant, img_size=list(roi))
        assert monai.axis_order == "xyz" and monai.img_size == roi[::-1]
        y = monai(x.permute(0, 1, 4, 3, 2))
        torch.testing.assert_close(y.permute(0, 1, 4, 3, 2), expected[0], rtol=1e-3, atol=1e-3)
    # the deep-supervision heads against the reference (in eval mode forward returns out1 only: call the parts)
    with torch.no_grad():
        e1, e2, e3, e4 = net.unetr_pp_encoder(x)
        d2 = net.decoder4(net.decoder5(e4, e3), e2)
        d1 = net.decoder3(d2, e1)
        torch.testing.assert_close(net.out2(d1), expected[1], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(net.out3(d2), expected[2], rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(SPECS is None, reason="shared/specs not available")
@pytest.mark.parametrize("variant", ["synapse", "acdc"])
def test_official_key_lists_load(variant):
    """A state dict made from the official key list (names, shapes, dtypes, order) loads at the official size."""
    with open(os.path.join(SPECS, "official_keys", f"unetr_pp_{variant}.json")) as f:
        spec = json.load(f)
    kwargs = spec["model"]["kwargs"]
    with torch.device("meta"):
        mine = UNETRPP(kwargs["in_channels"], kwargs["out_channels"], variant=variant, axis_order="zyx",
                       deep_supervision=kwargs["do_ds"]).state_dict()
    assert [(k, list(v.shape), str(v.dtype)) for k, v in mine.items()] == [tuple(e) for e in spec["keys"]]

    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) if t == "torch.float32" else torch.zeros(s, dtype=torch.int64))
          for k, s, t in spec["keys"]}
    for k in sd:  # Synapse's E and F are one module
        if variant == "synapse" and ".epa_block.F." in k:
            sd[k] = sd[k.replace(".epa_block.F.", ".epa_block.E.")]
    net = from_official({"module." + k: v for k, v in sd.items()}, variant=variant, **kwargs)
    got = net.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    if variant == "synapse":
        assert net.unetr_pp_encoder.stages[0][0].epa_block.E is net.unetr_pp_encoder.stages[0][0].epa_block.F
    monai = from_official(sd, layout="monai", variant=variant, **kwargs)
    k = "unetr_pp_encoder.downsample_layers.0.0.conv.weight"
    assert torch.equal(monai.state_dict()[k], sd[k].permute(0, 1, 4, 3, 2))
    assert monai.img_size == tuple(spec["input_shape"][2:])[::-1]


def test_bad_state_dicts_are_refused():
    roi = (16, 32, 32)
    sd = random_official_state_dict("synapse", 1, 3, roi)
    missing = dict(sd)
    del missing["decoder4.decoder_block.0.1.epa_block.qkvv.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*decoder4\.decoder_block\.0\.1\.epa_block\.qkvv\.weight"):
        from_official(missing, img_size=roi)
    bad = dict(sd)
    bad["unetr_pp_encoder.stages.1.2.pos_embed"] = torch.zeros(1, 99, 64)
    with pytest.raises(ValueError, match=r"misshapen keys: unetr_pp_encoder\.stages\.1\.2\.pos_embed"):
        from_official(bad, img_size=roi)
    extra = dict(sd, **{"decoder2.decoder_block.0.conv3.conv.weight": torch.zeros(16, 16, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"unexpected keys.*decoder2\.decoder_block\.0\.conv3"):
        from_official(extra, img_size=roi)
    # a checkpoint built for another ROI names the first ROI-tied tensor
    with pytest.raises(ValueError, match=r"stages\.0\.0\.pos_embed: expected \(1, 2048, 32\), got \(1, 512, 32\)"):
        from_official(sd, img_size=(32, 64, 32))
    # synapse shares E and F; a checkpoint where they differ is not a synapse checkpoint
    split = dict(sd)
    k = "unetr_pp_encoder.stages.0.0.epa_block.F.weight"
    split[k] = split[k] + 1
    with pytest.raises(ValueError, match="shares E and F"):
        from_official(split, img_size=roi)
    with pytest.raises(TypeError):
        from_official(sd, img_size=roi, img_sze=roi)
    with pytest.raises(ValueError, match="layout"):
        from_official(sd, layout="xyz", img_size=roi)


def _nnunet_checkpoint(path, sd):
    torch.save({"epoch": 3, "state_dict": sd,
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99}]},
                "plot_stuff": ([1.0, 0.5], [1.1], [0.2], [0.3]),
                "plans": {"num_classes": 2, "plans_per_stage": {0: {"patch_size": [16, 32, 32]}}}}, path)


def test_cli_end_to_end(tmp_path, capsys):
    roi = (16, 32, 32)
    sd = random_official_state_dict("synapse", 1, 3, roi)
    src, dst = tmp_path / "model_final_checkpoint.model", tmp_path / "out" / "model.pt"
    _nnunet_checkpoint(src, sd)
    # options before and after the file names; values are Python literals, strings stay strings
    rc = cli_main(["unetr_pp", "--variant", "synapse", str(src), str(dst), "--layout", "monai",
                   "--img_size", "[16, 32, 32]", "--do_ds=True"])
    assert rc == 0
    printed = capsys.readouterr().out
    cfg = json.loads(printed[printed.index("{"):])
    assert cfg["_target_"] == "shared_networks.nets.UNETRPP"
    assert cfg["img_size"] == [32, 32, 16] and cfg["axis_order"] == "xyz" and cfg["out_channels"] == 3
    # the written file is a plain state dict that the printed configuration loads strictly
    state = torch.load(dst, weights_only=True)
    net = UNETRPP(**{k: v for k, v in cfg.items() if k != "_target_"})
    net.load_state_dict(state, strict=True)
    reference = from_official(sd, layout="monai", img_size=roi)
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference(x))

    # never overwrite without --overwrite
    before = dst.read_bytes()
    assert cli_main(["unetr_pp", str(src), str(dst), "--img_size", "(16,32,32)"]) != 0
    assert "exists" in capsys.readouterr().err and dst.read_bytes() == before
    assert cli_main(["unetr_pp", str(src), str(dst), "--img_size", "(16,32,32)", "--overwrite"]) == 0
    assert torch.load(dst, weights_only=True)["unetr_pp_encoder.downsample_layers.0.0.conv.weight"].shape == (
        32, 1, 2, 4, 4)  # official layout this time
    # a bad configuration is reported, not a traceback
    assert cli_main(["unetr_pp", str(src), str(tmp_path / "x.pt"), "--img_size", "(16,64,32)"]) == 1
    assert "pos_embed" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_cli_module_entry_point(tmp_path, monkeypatch, capsys):
    """``python -m shared_networks.convert`` runs as a program (run in-process with runpy: a fresh interpreter
    would spend most of the test importing torch)."""
    sd = random_official_state_dict("tumor", 4, 2, (32, 32, 32))
    src, dst = tmp_path / "ckpt.pth", tmp_path / "model.pt"
    _nnunet_checkpoint(src, sd)
    argv = ["python -m shared_networks.convert", "unetr_pp", str(src), str(dst), "--variant", "tumor",
            "--img_size", "[32,32,32]"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "shared_networks.convert.__main__", raising=False)  # as a fresh `python -m`
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("shared_networks.convert", run_name="__main__", alter_sys=False)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert '"variant": "tumor"' in out and '"in_channels": 4' in out
    assert set(torch.load(dst, weights_only=True)) == set(sd)
