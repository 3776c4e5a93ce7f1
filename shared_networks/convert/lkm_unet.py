"""Import official LKM-UNet checkpoints (wjh892521292/LKM-UNet @ 6615775, ``nnUNetTrainerLKMUNet``) into
:class:`~shared_networks.nets.LKMUNet`, and export back.

The network uses the official module names, so the official keys map one to one. An official (nnU-Net) state dict
also holds two kinds of aliases of the same tensors, which are checked and dropped:

- ``<block>.all_modules.0.*`` / ``.all_modules.1.*``: dynamic_network_architectures' ``ConvDropoutNormReLU``
  registers its conv and norm a second time inside an ``nn.Sequential``;
- ``decoder.encoder.*``: the official decoder keeps a reference to the encoder.

Every official constructor argument that is not given is read from the checkpoint (stages, widths, kernels,
strides, blocks per stage, classes, input channels, conv bias); the PiM/PaM windows follow the official formula
unless ``window_sizes`` / ``pool_sizes`` are given (the official file invites editing them), and the default
``window_grouping="official"`` reproduces the official strided grouping and fallbacks, i.e. the official outputs.

``layout="monai"`` builds the network for MONAI's (x, y[, z]) arrays from a checkpoint trained on nnU-Net's
(z, y, x) arrays: kernels, strides and windows are mirrored, every conv / transposed-conv kernel has its spatial
axes reversed, and ``scan_axes`` is reversed so that token sequences are visited in the official order. Then
``net_monai(x.flip_axes) == net_official(x).flip_axes`` exactly (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ..nets.lkm_unet import LKMUNet, official_pool_sizes, official_window_sizes
from ..nets.lkm_unet import ConvNormAct as _ConvNormAct
from ._common import check_state_dict, strip_prefix

__all__ = ["from_official", "to_official", "official_aliases", "infer_official_kwargs"]

_UNSET = object()
_SPATIAL_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _name(obj) -> str:
    """Class or dotted string -> bare class name ("torch.nn.modules.conv.Conv3d" -> "Conv3d")."""
    if obj is None:
        return "None"
    if isinstance(obj, str):
        return obj.rsplit(".", 1)[-1]
    return getattr(obj, "__name__", type(obj).__name__)


def official_aliases(net: LKMUNet) -> dict[str, str]:
    """``{official alias key: primary key}`` for ``net`` (all_modules.* and decoder.encoder.* aliases)."""
    inner: dict[str, str] = {}
    for name, m in net.named_modules():
        if isinstance(m, _ConvNormAct):
            parts = [m.conv] + ([m.norm] if m.norm is not None else [])
            for i, part in enumerate(parts):
                for k in part.state_dict():
                    inner[f"{name}.all_modules.{i}.{k}"] = f"{name}.{'conv' if i == 0 else 'norm'}.{k}"
    aliases = dict(inner)
    primary = list(net.state_dict()) + list(inner)
    for k in primary:
        if k.startswith("encoder."):
            aliases["decoder." + k] = inner.get(k, k)
    return aliases


def _spatial_conv_weights(net: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, _SPATIAL_CONVS)}


def _permute_kernels(sd: Mapping[str, torch.Tensor], keys: set[str], perm: Sequence[int]) -> dict:
    """Reorder the spatial kernel axes of the conv weights in ``keys`` ((out, in, *k) -> (out, in, *k[perm]))."""
    if tuple(perm) == tuple(range(len(perm))):
        return dict(sd)
    order = (0, 1, *(2 + p for p in perm))
    return {k: (v.permute(order).contiguous() if k in keys else v) for k, v in sd.items()}


def to_official(net: LKMUNet) -> dict[str, torch.Tensor]:
    """The state dict the official ``LKMUNet`` (built with the same plan, in nnU-Net's axis order) would have,
    aliases included, so the weights can be used with the official code/nnU-Net. A network built for another axis
    order (``scan_axes`` not row-major, e.g. ``layout="monai"``) has its kernels brought back to the official order.
    The official layers use the official (strided) grouping and windows; exporting a network trained with
    ``window_grouping="contiguous"`` gives the official code different maths."""
    perm = tuple(net.scan_axes)
    sd = _permute_kernels(net.state_dict(), _spatial_conv_weights(net), perm)
    out = dict(sd)
    for alias, key in official_aliases(net).items():
        out[alias] = sd[key]
    return out


def _count(sd, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_official_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read the official constructor arguments that the weights determine (first stride assumed 1, as in every
    nnU-Net plan). Raises ``ValueError`` naming the key it needed if the dict is not an official LKM-UNet."""
    sd = strip_prefix(strip_prefix(dict(state_dict), "module."), "_orig_mod.")

    def get(key):
        if key not in sd:
            raise ValueError(
                f"this does not look like an official LKM-UNet state dict: key {key!r} is missing (pass the official "
                "constructor arguments explicitly, or check the file)."
            )
        return sd[key]

    n_stages = _count(sd, "encoder.stages.")
    if n_stages < 2:
        get("encoder.stages.1.blocks.0.conv1.conv.weight")
    stem = get("encoder.stem.convs.0.conv.weight")
    feats, kernels, blocks = [], [], []
    for s in range(n_stages):
        w = get(f"encoder.stages.{s}.blocks.0.conv1.conv.weight")
        feats.append(int(w.shape[0]))
        kernels.append([int(k) for k in w.shape[2:]])
        blocks.append(_count(sd, f"encoder.stages.{s}.blocks."))
    strides = [[1] * (stem.ndim - 2)]
    for s in range(1, n_stages):  # transpconvs[j] upsamples by the stride of encoder stage n_stages - 1 - j
        strides.append([int(k) for k in get(f"decoder.transpconvs.{n_stages - 1 - s}.weight").shape[2:]])
    dec = [_count(sd, f"decoder.stages.{j}.blocks.") for j in range(n_stages - 1)]
    return dict(
        input_channels=int(stem.shape[1]),
        n_stages=n_stages,
        features_per_stage=feats,
        conv_op=f"Conv{stem.ndim - 2}d",
        kernel_sizes=kernels,
        strides=strides,
        n_conv_per_stage=blocks,
        num_classes=int(get("decoder.seg_layers.0.weight").shape[0]),
        n_conv_per_stage_decoder=dec,
        conv_bias="encoder.stem.convs.0.conv.bias" in sd,
    )


def _norm_spec(norm_op, norm_op_kwargs, dims):
    if norm_op is _UNSET:
        norm_op = "InstanceNorm"
        norm_op_kwargs = {"eps": 1e-5, "affine": True} if norm_op_kwargs in (_UNSET, None) else norm_op_kwargs
    if norm_op is None:
        return None
    kw = {} if norm_op_kwargs in (_UNSET, None) else dict(norm_op_kwargs)
    name = _name(norm_op)
    for prefix, monai_name in (("InstanceNorm", "instance"), ("BatchNorm", "batch")):
        if name.startswith(prefix):
            if name[len(prefix):] not in ("", f"{dims}d"):
                raise ValueError(f"norm_op {name} does not match the {dims}D network.")
            return (monai_name, kw)
    raise ValueError(f"norm_op {name!r} is not supported; official LKM-UNet uses InstanceNorm (BatchNorm also works).")


def _act_spec(nonlin, nonlin_kwargs):
    if nonlin is _UNSET:
        nonlin = "LeakyReLU"
        nonlin_kwargs = {"inplace": True} if nonlin_kwargs in (_UNSET, None) else nonlin_kwargs
    if nonlin is None:
        raise ValueError("nonlin=None (no activation) is not supported; official LKM-UNet uses LeakyReLU.")
    kw = {} if nonlin_kwargs in (_UNSET, None) else dict(nonlin_kwargs)
    name = _name(nonlin)
    if name == "LeakyReLU":
        return ("leakyrelu", {"negative_slope": kw.get("negative_slope", 0.01), "inplace": kw.get("inplace", False)})
    if name == "ReLU":
        return ("relu", {"inplace": kw.get("inplace", False)})
    raise ValueError(f"nonlin {name!r} is not supported; official LKM-UNet uses LeakyReLU (ReLU also works).")


def from_official(
    state_dict: Mapping[str, torch.Tensor],
    layout: str = "official",
    *,
    input_channels: int | None = None,
    n_stages: int | None = None,
    features_per_stage=None,
    conv_op=None,
    kernel_sizes=None,
    strides=None,
    n_conv_per_stage=None,
    num_classes: int | None = None,
    n_conv_per_stage_decoder=None,
    conv_bias: bool | None = None,
    norm_op=_UNSET,
    norm_op_kwargs=_UNSET,
    dropout_op=None,
    dropout_op_kwargs=None,
    nonlin=_UNSET,
    nonlin_kwargs=_UNSET,
    deep_supervision: bool = False,
    block=None,
    bottleneck_channels=None,
    stem_channels=None,
    n_blocks_per_stage=None,
    window_grouping: str = "official",
    window_sizes=None,
    pool_sizes=None,
) -> LKMUNet:
    """Build :class:`LKMUNet` with official weights.

    Args:
        state_dict: the official network's state dict (nnU-Net ``checkpoint_final.pth["network_weights"]``; read a
            file with :func:`shared_networks.convert.load_checkpoint_file`). ``module.`` / ``_orig_mod.`` prefixes
            are stripped; the official alias keys may be present or not.
        layout: ``"official"`` (inputs in nnU-Net's (z, y, x) order, like the official model) or ``"monai"``
            (MONAI (x, y, z) inputs, same function on the transposed volume).
        input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
            num_classes, n_conv_per_stage_decoder, conv_bias: the official ``LKMUNet`` arguments, per-axis values in
            nnU-Net's order; ``conv_op`` a class or name ("Conv3d", "torch.nn.modules.conv.Conv3d"). Not given:
            read from the checkpoint (``strides[0]`` = 1). ``n_blocks_per_stage`` is accepted for
            ``n_conv_per_stage`` (the encoder's name).
        norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: default to what ``get_lkmunet_from_plans`` passes
            (InstanceNorm eps 1e-5 affine, LeakyReLU); BatchNorm / ReLU are also accepted.
        dropout_op, block, bottleneck_channels, stem_channels: only the plan values (None, BasicBlockD, None,
            None or features_per_stage[0]) exist in LKM-UNet checkpoints; others are refused.
        deep_supervision: return all decoder levels in training mode.
        window_grouping: ``"official"`` (default, official outputs) or ``"contiguous"`` (paper windows: the same
            weights then compute the paper's grouping, a different function).
        window_sizes, pool_sizes: PiM windows / PaM pools per stage in nnU-Net's order (default: official formula).

    Returns:
        the network in eval mode; ``net.constructor_args`` rebuilds it.

    Raises:
        ValueError: missing / unexpected / misshapen keys (named), aliases that differ from their tensor, or an
            unsupported argument.
    """
    if layout not in ("official", "monai"):
        raise ValueError(f"layout must be 'official' or 'monai', got {layout!r}.")
    sd = strip_prefix(strip_prefix(dict(state_dict), "module."), "_orig_mod.")
    if n_blocks_per_stage is not None:
        if n_conv_per_stage is not None and list(n_conv_per_stage) != list(n_blocks_per_stage):
            raise ValueError("give n_conv_per_stage (official name) or n_blocks_per_stage, not two different values.")
        n_conv_per_stage = n_blocks_per_stage
    given = dict(
        input_channels=input_channels, n_stages=n_stages, features_per_stage=features_per_stage, conv_op=conv_op,
        kernel_sizes=kernel_sizes, strides=strides, n_conv_per_stage=n_conv_per_stage, num_classes=num_classes,
        n_conv_per_stage_decoder=n_conv_per_stage_decoder, conv_bias=conv_bias,
    )
    if any(v is None for v in given.values()):
        inferred = infer_official_kwargs(sd)
        given = {k: (inferred[k] if v is None else v) for k, v in given.items()}
    conv_name = _name(given["conv_op"])
    if conv_name not in ("Conv2d", "Conv3d"):
        raise ValueError(f"conv_op must be Conv2d or Conv3d, got {given['conv_op']!r}.")
    dims = int(conv_name[4])
    n = int(given["n_stages"])
    feats = given["features_per_stage"]
    feats = [int(feats)] * n if isinstance(feats, int) else [int(f) for f in feats]
    if len(feats) != n:
        raise ValueError(f"features_per_stage has {len(feats)} entries but n_stages={n}.")
    if dropout_op is not None:
        raise ValueError(f"dropout_op={dropout_op!r} is not supported; LKM-UNet checkpoints are built without dropout.")
    if block is not None and _name(block) != "BasicBlockD":
        raise ValueError(f"block={_name(block)} is not supported; LKM-UNet uses BasicBlockD.")
    if bottleneck_channels is not None:
        raise ValueError("bottleneck_channels only applies to BottleneckD blocks, which LKM-UNet does not use.")
    if stem_channels is not None and int(stem_channels) != feats[0]:
        raise ValueError(f"stem_channels={stem_channels} != features_per_stage[0]={feats[0]} is not supported.")

    def per_stage(v):
        return [[int(v)] * dims] * n if isinstance(v, int) else [
            [int(i)] * dims if isinstance(i, int) else [int(j) for j in i] for i in v
        ]

    kernels, strides_ = per_stage(given["kernel_sizes"]), per_stage(given["strides"])
    windows = official_window_sizes(n, dims) if window_sizes is None else per_stage(window_sizes)
    pools = official_pool_sizes(n, dims) if pool_sizes is None else per_stage(pool_sizes)
    kw = dict(
        spatial_dims=dims,
        in_channels=int(given["input_channels"]),
        out_channels=int(given["num_classes"]),
        features_per_stage=feats,
        n_blocks_per_stage=given["n_conv_per_stage"],
        n_conv_per_stage_decoder=given["n_conv_per_stage_decoder"],
        window_grouping=window_grouping,
        deep_supervision=bool(deep_supervision),
        conv_bias=bool(given["conv_bias"]),
        norm_name=_norm_spec(norm_op, norm_op_kwargs, dims),
        act_name=_act_spec(nonlin, nonlin_kwargs),
    )
    axes = dict(kernel_sizes=kernels, strides=strides_, window_sizes=windows, pool_sizes=pools)

    with torch.device("meta"):  # cheap reference for the key check, in the official layout
        ref = LKMUNet(**kw, **axes)
    expected = ref.state_dict()
    sd = _drop_aliases(sd, official_aliases(ref))
    check_state_dict(expected, sd, what="official LKM-UNet checkpoint")

    if layout == "official":
        net = LKMUNet(**kw, **axes)
    else:
        mirrored = {k: [list(t)[::-1] for t in v] for k, v in axes.items()}
        net = LKMUNet(**kw, **mirrored, scan_axes=tuple(range(dims))[::-1])
        sd = _permute_kernels(sd, _spatial_conv_weights(net), tuple(range(dims))[::-1])
    net.load_state_dict(sd, strict=True)
    return net.eval()


def _drop_aliases(sd: dict, aliases: Mapping[str, str]) -> dict:
    """Remove alias keys after checking each equals its primary tensor (or stands in for a missing primary)."""
    out = {k: v for k, v in sd.items() if k not in aliases}
    for alias, key in aliases.items():
        if alias not in sd:
            continue
        if key not in out:
            out[key] = sd[alias]
        elif tuple(out[key].shape) != tuple(sd[alias].shape) or not torch.equal(out[key], sd[alias]):
            raise ValueError(
                f"official LKM-UNet checkpoint is inconsistent: {alias!r} should be the same tensor as {key!r} "
                "(the official model registers it twice) but the values differ."
            )
    return out
