"""Import of official Perspective+ Unet (``PUnet``) checkpoints: key names and shapes equal the official list, every
tensor (random matrices included) lands in the right place, the MONAI layout mirrors the official one, and bad
checkpoints are refused with messages that name the offending keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from shared_networks.convert import from_official as dispatch_from_official
from shared_networks.convert.__main__ import main as cli_main
from shared_networks.convert.perspective_unet import from_official, official_state_dict_shapes
from shared_networks.nets import PerspectiveUNet

ROOT = Path(__file__).resolve().parents[1]
KEYS_JSON = next(
    (p / "official_keys" / "punet_synapse.json" for p in (ROOT / "shared" / "specs", Path("/work/shared/specs"))
     if (p / "official_keys" / "punet_synapse.json").is_file()),
    None,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def official_keys() -> dict[str, tuple[int, ...]]:
    """The official key list (specs/official_keys/punet_synapse.json), or, where the specs are not checked out, the
    converter's own expectation (then only test_expected_keys_equal_the_official_list is skipped)."""
    if KEYS_JSON is None:
        return official_state_dict_shapes(num_classes=9)
    return {k: tuple(s) for k, s, _ in json.loads(KEYS_JSON.read_text())["keys"]}


QKV_NAMES = ("conv_match1", "conv_match2", "conv_assembly")


def random_official_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A well-conditioned random state dict with the official names and shapes (weights scaled by fan-in)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            sd[k] = torch.randn(shape, generator=g) * fan_in**-0.5
        elif k.endswith("weight"):  # norm scales
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def official_sd(official_keys):
    return random_official_state_dict(official_keys)


@pytest.mark.skipif(KEYS_JSON is None, reason="specs/official_keys not available")
def test_expected_keys_equal_the_official_list(official_keys):
    assert official_state_dict_shapes(num_classes=9) == official_keys
    acdc = official_state_dict_shapes(num_classes=4)
    assert acdc["segmentation_head.0.weight"] == (4, 64, 3, 3) and len(acdc) == 435
    no_enltb = official_state_dict_shapes(use_enltb=False)
    assert set(no_enltb) == {k for k in official_keys if not k.startswith("encoder.Encoder2.")}
    no_scsi = official_state_dict_shapes(use_scale_integrator=False)
    assert set(no_scsi) == {k for k in official_keys if not k.startswith("encoder.scale_integrator.")}


def test_every_tensor_lands_in_place(official_sd):
    net = from_official(official_sd, img_size=None)
    assert not net.training and sum(p.numel() for p in net.parameters()) == 112_659_849
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    sd = net.state_dict()
    # nothing lost or duplicated: the float64 totals agree (qkv is a concatenation, everything else a rename)
    total = lambda d: sum(v.double().sum().item() for v in d.values() if v.is_floating_point())  # noqa: E731
    assert total(sd) == pytest.approx(total(official_sd), rel=1e-9)
    o = "encoder.Encoder2.stages.1.0."
    torch.testing.assert_close(
        sd["enltb.stages.1.0.attn.qkv.weight"],
        torch.cat([official_sd[f"{o}{n}.0.weight"].flatten(1) for n in QKV_NAMES]),
    )
    for s, b in ((0, 0), (1, 1), (2, 1)):  # the ENLA random matrices are copied, not redrawn
        assert torch.equal(sd[f"enltb.stages.{s}.{b}.attn.projection_matrix"],
                           official_sd[f"encoder.Encoder2.stages.{s}.{b}.attn.projection_matrix"])
    pairs = {
        "encoder.3.dilated.res.norm2.running_var": "encoder.Encoder1.layers.6.dilated_resblock.1.bn2.running_var",
        "encoder.4.fuse.weight": "encoder.Encoder1.layers.8.fusionblock.conv.weight",
        "enltb.merges.1.adn.N.running_mean": "encoder.Encoder2.downsample.1.bn.running_mean",
        "scsi.layers.5.linear2.weight": "encoder.scale_integrator.transformer.layers.5.linear2.weight",
        "scsi.layers.0.self_attn.in_proj_bias": "encoder.scale_integrator.transformer.layers.0.self_attn.in_proj_bias",
        "decoder.0.conv2.conv.weight": "decoder.first_block.conv2.conv.weight",
        "decoder.2.conv1.adn.N.weight": "decoder.blocks.1.conv1.bn.weight",
        "decoder.4.conv1.conv.weight": "decoder.last_block.conv1.conv.weight",
        "head.bias": "segmentation_head.0.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(sd[ours], official_sd[theirs]), ours
    # the converted network owns its tensors
    with torch.no_grad():
        net.head.bias.add_(1.0)
    assert not torch.equal(net.head.bias, official_sd["segmentation_head.0.bias"])


def test_monai_layout_is_the_transposed_official_network(official_sd):
    """net_monai(x^T) == net_official(x)^T, full official widths on a small non-square input."""
    net_off = from_official(official_sd, img_size=None)
    net_monai = from_official(official_sd, layout="monai", img_size=None)
    x = torch.randn(1, 1, 48, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_off = net_off(x)
        y_monai = net_monai(x.transpose(-1, -2))
        torch.testing.assert_close(y_monai, y_off.transpose(-1, -2), rtol=1e-4, atol=1e-4 * y_off.abs().max().item())
        assert (net_off(x.transpose(-1, -2)) - y_monai).abs().max() > 1e-3  # the layouts really differ
        w = "encoder.0.plain.res.conv1.weight"
        torch.testing.assert_close(net_monai.state_dict()[w], net_off.state_dict()[w].transpose(-1, -2))
        # the compatibility SCSI (official test-time function) is a different function from the paper's
        net_off.scsi_attention = "self"
        assert (net_off(x) - y_off).abs().max() > 1e-4


def test_input_channel_options(official_sd):
    ref = from_official(official_sd, img_size=32, scsi_attention="self")
    folded = from_official(official_sd, img_size=32, scsi_attention="self", gray_to_rgb=False)
    rgb = from_official(official_sd, img_size=32, scsi_attention="self", in_channels=3)
    assert sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in folded.parameters()) == 256
    assert ref.scsi_attention == "self"
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = ref(x)
        torch.testing.assert_close(folded(x), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
        torch.testing.assert_close(rgb(x.repeat(1, 3, 1, 1)), y, rtol=1e-5, atol=1e-6)


def test_refusals_name_the_problem(official_sd):
    sd = dict(official_sd)
    missing = "encoder.Encoder2.stages.2.1.attn.projection_matrix"
    del sd[missing]
    with pytest.raises(ValueError, match=r"missing keys: \['" + re.escape(missing) + r"'\]"):
        from_official(sd)
    with pytest.raises(ValueError, match=r"unexpected keys: \['extra\.weight'\]"):
        from_official({**official_sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"misshapen keys: segmentation_head\.0\.weight: expected \(4, 64, 3, 3\), "
                                         r"got \(9, 64, 3, 3\)"):
        from_official(official_sd, num_classes=4)
    with pytest.raises(ValueError, match="unexpected keys: .*encoder.Encoder2"):
        from_official(official_sd, use_enltb=False)
    with pytest.raises(ValueError, match="layout must be"):
        from_official(official_sd, layout="xy")
    with pytest.raises(ValueError, match="in_channels=2"):
        from_official(official_sd, in_channels=2)
    with pytest.raises(ValueError, match="scsi_attention"):
        from_official(official_sd, scsi_attention="batch")
    with pytest.raises(TypeError, match="mapping"):
        from_official([1, 2, 3])
    with pytest.raises(FileNotFoundError):
        from_official("/nonexistent/punet.pth")


def test_checkpoint_file_registry_and_command_line(tmp_path, official_sd, capsys):
    """An ACDC-sized (4 classes), DataParallel-style file (``module.`` prefix, weights under ``state_dict``) loads
    through the architecture registry and through ``python -m shared_networks.convert``."""
    g = torch.Generator().manual_seed(3)
    sd = dict(official_sd)
    sd["segmentation_head.0.weight"] = torch.randn(4, 64, 3, 3, generator=g)
    sd["segmentation_head.0.bias"] = torch.zeros(4)
    src, dst = tmp_path / "best_model.pth", tmp_path / "model.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 999}, src)

    net = dispatch_from_official("perspective_unet", str(src), num_classes=4)
    assert net.out_channels == 4 and sum(p.numel() for p in net.parameters()) == 112_656_964
    assert torch.equal(net.head.weight, sd["segmentation_head.0.weight"])
    del net

    argv = ["perspective_unet", str(src), str(dst), "--layout", "monai", "--num_classes", "4",
            "--scsi_attention", "self"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    args = json.loads(out[out.index("{"):])
    assert args.pop("_target_") == "shared_networks.nets.PerspectiveUNet"
    assert args["scsi_attention"] == "self" and args["out_channels"] == 4 and args["img_size"] == 224
    with torch.device("meta"):
        net = PerspectiveUNet(**args)
    net.load_state_dict(torch.load(dst, weights_only=True), assign=True)  # strict: same keys and shapes
    assert torch.equal(net.enltb.stages[0][0].attn.projection_matrix,
                       official_sd["encoder.Encoder2.stages.0.0.attn.projection_matrix"])
    assert torch.equal(net.head.weight, sd["segmentation_head.0.weight"].transpose(-1, -2))
    assert cli_main(argv) == 2  # never overwrites without --overwrite
