"""Import official Perspective+ Unet checkpoints (tljxyys/Perspective-Unet ``PUnet``) into :class:`PerspectiveUNet`.

The official state dict (435 keys for 9 classes, listed in ``specs/official_keys/punet_synapse.json``) is checked
key by key and shape by shape, then mapped onto this project's module names:

- ``conv_match1/conv_match2/conv_assembly`` (three 1x1 convs: theta, phi, g) become one fused ``attn.qkv`` Linear;
- the ENLA random matrices ``attn.projection_matrix`` are copied as they are (they are part of the function: a model
  with other random matrices computes something else);
- every other tensor is renamed only (BatchNorm statistics included).

``layout="official"`` keeps the official input axis order (rows y, columns x, as the official data loaders produce).
``layout="monai"`` transposes every spatial conv kernel so that the network takes MONAI's (x, y) order and gives
``net_monai(x.transpose(-1, -2)) == net_official(x).transpose(-1, -2)``; the rest of the network (ENLA, SCSI, pooling,
align-corners upsampling) treats both axes alike and needs no change.

SCSI: by default the converted model runs the paper's SCSI (attention over each image's 4116 tokens). The official
code attends across the images of a batch instead (issue #8), so at its test time (one slice per forward) each token
only attended to itself. Pass ``scsi_attention="self"`` to get exactly that function, e.g. to reproduce the published
test results with the published weights (see :class:`~shared_networks.nets.perspective_unet.PerspectiveUNet`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ..nets.perspective_unet import PerspectiveUNet
from ._common import check_state_dict, load_checkpoint_file, strip_prefix

__all__ = ["from_official", "official_state_dict_shapes"]

_PATH = {"plain": "resblock", "dilated": "dilated_resblock"}
_RES = {"conv1": "conv1", "conv2": "conv2", "norm1": "bn1", "norm2": "bn2"}
_QKV = ("conv_match1", "conv_match2", "conv_assembly")


def _decoder_name(i: int) -> str:
    return "first_block" if i == 0 else ("last_block" if i == 4 else f"blocks.{i - 1}")


# (pattern on this project's key, function of the match -> official key)
_RULES = [
    (r"encoder\.(\d)\.(plain|dilated)\.proj\.(.+)",
     lambda m: f"encoder.Encoder1.layers.{2 * int(m[1])}.{_PATH[m[2]]}.0.{m[3]}"),
    (r"encoder\.(\d)\.(plain|dilated)\.res\.(conv1|conv2|norm1|norm2)\.(.+)",
     lambda m: f"encoder.Encoder1.layers.{2 * int(m[1])}.{_PATH[m[2]]}.1.{_RES[m[3]]}.{m[4]}"),
    (r"encoder\.(\d)\.fuse\.(.+)", lambda m: f"encoder.Encoder1.layers.{2 * int(m[1])}.fusionblock.conv.{m[2]}"),
    (r"encoder\.(\d)\.fuse_norm\.(.+)", lambda m: f"encoder.Encoder1.layers.{2 * int(m[1])}.fusionblock.bn.{m[2]}"),
    (r"enltb\.stages\.(\d)\.(\d)\.(norm1|norm2|attn\.projection_matrix)(.*)",
     lambda m: f"encoder.Encoder2.stages.{m[1]}.{m[2]}.{m[3]}{m[4]}"),
    (r"enltb\.stages\.(\d)\.(\d)\.mlp\.linear([12])\.(.+)",
     lambda m: f"encoder.Encoder2.stages.{m[1]}.{m[2]}.mlp.fc{m[3]}.{m[4]}"),
    (r"enltb\.merges\.(\d)\.conv\.(.+)", lambda m: f"encoder.Encoder2.downsample.{m[1]}.conv.{m[2]}"),
    (r"enltb\.merges\.(\d)\.adn\.N\.(.+)", lambda m: f"encoder.Encoder2.downsample.{m[1]}.bn.{m[2]}"),
    (r"enltb\.adjusters\.(\d)\.(.+)", lambda m: f"encoder.Encoder2.channel_adjuster.{m[1]}.{m[2]}"),
    (r"scsi\.proj\.(\d)\.(.+)", lambda m: f"encoder.scale_integrator.proj_layers.{m[1]}.{m[2]}"),
    (r"scsi\.layers\.(\d)\.(.+)", lambda m: f"encoder.scale_integrator.transformer.layers.{m[1]}.{m[2]}"),
    (r"scsi\.norm\.(.+)", lambda m: f"encoder.scale_integrator.transformer.norm.{m[1]}"),
    (r"scsi\.reproj\.(\d)\.(.+)", lambda m: f"encoder.scale_integrator.reproj_layers.{m[1]}.{m[2]}"),
    (r"fuser\.(\d)\.(.+)", lambda m: f"encoder.fuser.{m[1]}.{m[2]}"),
    (r"decoder\.(\d)\.(conv[12])\.conv\.(.+)", lambda m: f"decoder.{_decoder_name(int(m[1]))}.{m[2]}.conv.{m[3]}"),
    (r"decoder\.(\d)\.(conv[12])\.adn\.N\.(.+)", lambda m: f"decoder.{_decoder_name(int(m[1]))}.{m[2]}.bn.{m[3]}"),
    (r"head\.(.+)", lambda m: f"segmentation_head.0.{m[1]}"),
]
_QKV_RULE = re.compile(r"enltb\.stages\.(\d)\.(\d)\.attn\.qkv\.(weight|bias)")
_FIRST_LAYER = re.compile(r"encoder\.0\.(plain|dilated)\.proj\.weight")


def _official_entries(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Official (key, shape) pairs that make up this project's tensor ``key`` of ``shape`` (official 2D model)."""
    m = _QKV_RULE.fullmatch(key)
    if m:  # fused (3C, C) Linear <- three (C, C, 1, 1) convs
        c = shape[0] // 3
        official_shape = (c, c, 1, 1) if m[3] == "weight" else (c,)
        return [(f"encoder.Encoder2.stages.{m[1]}.{m[2]}.{name}.0.{m[3]}", official_shape) for name in _QKV]
    if _FIRST_LAYER.fullmatch(key):  # the official first layer always sees 3 channels
        shape = (shape[0], 3, *shape[2:])
    for pattern, fn in _RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return [(fn(m), tuple(shape))]
    raise KeyError(f"no official counterpart for {key}")  # only reachable if the network changes


def _build(num_classes, use_enltb, use_scale_integrator, use_dilate_conv, in_channels, img_size, scsi_attention,
           gray_to_rgb, device="meta") -> PerspectiveUNet:
    if in_channels not in (1, 3):
        raise ValueError(
            f"official checkpoints take 1 (repeated to 3) or 3 input channels, got in_channels={in_channels}."
        )
    with torch.device(device):
        return PerspectiveUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=num_classes, img_size=img_size,
            use_enltb=use_enltb, use_scsi=use_scale_integrator, use_dilated_path=use_dilate_conv,
            scsi_attention=scsi_attention, gray_to_rgb=gray_to_rgb if in_channels == 1 else False,
        )


def official_state_dict_shapes(
    num_classes: int = 9, use_enltb: bool = True, use_scale_integrator: bool = True, use_dilate_conv: bool = True
) -> dict[str, tuple[int, ...]]:
    """The official ``PUnet(num_classes, use_enltb, use_scale_integrator, use_dilate_conv)`` state-dict shapes."""
    net = _build(num_classes, use_enltb, use_scale_integrator, use_dilate_conv, 1, 224, "tokens", True)
    out = {}
    for k, v in net.state_dict().items():
        out.update(_official_entries(k, tuple(v.shape)))
    return out


def from_official(
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    layout: str = "official",
    num_classes: int = 9,
    use_enltb: bool = True,
    use_scale_integrator: bool = True,
    use_dilate_conv: bool = True,
    *,
    in_channels: int = 1,
    img_size: int | tuple[int, int] | None = 224,
    scsi_attention: str = "tokens",
    gray_to_rgb: bool = True,
) -> PerspectiveUNet:
    """Build :class:`PerspectiveUNet` with the weights and random matrices of an official checkpoint.

    Args:
        state_dict: the official ``PUnet`` state dict (a ``module.`` prefix is stripped), or a checkpoint file path.
        layout: ``"official"`` (input axes as the official code: y, x) or ``"monai"`` (x, y; kernels transposed).
        num_classes, use_enltb, use_scale_integrator, use_dilate_conv: the official constructor's arguments.
        in_channels: 1 (grayscale, the official use; repeated to 3 channels inside) or 3.
        img_size: input size the returned network accepts (``None``: any multiple of 16).
        scsi_attention: ``"tokens"`` (the paper's SCSI, default) or ``"self"`` (the official test-time function).
        gray_to_rgb: with ``in_channels=1``, keep the official 3-channel first layer and repeat the input (default),
            or fold the first-layer weights over the 3 channels (same outputs, 256 fewer parameters).

    Returns:
        the network in eval mode, on the CPU, float32.

    Raises:
        ValueError: naming every missing, unexpected or misshapen key, or for a bad ``layout``/``in_channels``.
    """
    if layout not in ("official", "monai"):
        raise ValueError(f"layout must be 'official' (y, x input) or 'monai' (x, y input), got {layout!r}.")
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_checkpoint_file(state_dict)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors or a file path, got {type(state_dict).__name__}.")
    given = strip_prefix(state_dict, "module.")
    net = _build(num_classes, use_enltb, use_scale_integrator, use_dilate_conv, in_channels, img_size,
                 scsi_attention, gray_to_rgb)
    ours = net.state_dict()
    plan = {k: _official_entries(k, tuple(v.shape)) for k, v in ours.items()}
    expected = {ok: torch.empty(shape, device="meta") for entries in plan.values() for ok, shape in entries}
    check_state_dict(expected, given, what=f"official Perspective+ Unet checkpoint (num_classes={num_classes})")

    converted = {}
    for k, entries in plan.items():
        parts = [given[ok].detach().to("cpu") for ok, _ in entries]
        t = torch.cat([p.reshape(p.shape[0], -1) if p.ndim > 1 else p for p in parts]) if len(parts) > 1 else parts[0]
        if _FIRST_LAYER.fullmatch(k) and ours[k].shape[1] == 1:
            t = t.sum(dim=1, keepdim=True)  # conv(repeat(x, 3)) == conv_with_summed_weights(x)
        if layout == "monai" and t.ndim == 4:
            t = t.transpose(-1, -2)  # (out, in, ky, kx) -> (out, in, kx, ky)
        converted[k] = t.to(dtype=ours[k].dtype).contiguous().clone()
    net.load_state_dict(converted, strict=True, assign=True)
    return net.eval()
