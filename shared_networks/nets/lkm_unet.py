"""LKM-UNet: Large Kernel Vision Mamba UNet (Wang et al., MICCAI 2024, arXiv 2403.07332).

An nnU-Net residual-encoder U-Net whose every encoder stage is followed by an LM block: a pixel-level
bidirectional Mamba over large windows (PiM) and a patch-level bidirectional Mamba over average-pooled windows
(PaM). Module names mirror the official ``LKMUNet.py`` (``encoder.stem / stages / mamba_layers / w_mamba_layers``,
``decoder.stages / transpconvs / seg_layers``) so official weights map one-to-one (see
:mod:`shared_networks.convert.lkm_unet`).

Two PiM token groupings:

- ``"contiguous"`` (default, the paper): each window of ``window_size`` adjacent pixels is one sequence. Windows
  that do not fit at the border of a map whose size is not a multiple of the window are clipped (smaller border
  windows), so no window ever mixes in padding and nothing silently becomes one whole-map scan.
- ``"official"``: the official code's grouping, pixels spaced ``window_size`` apart form one sequence (issue #5
  of the official repository), and its fallback to one scan over the whole map (PiM) or over the un-pooled map
  (PaM) when a size is not divisible; official checkpoints then give the official outputs. The fallback warns.

Axis convention: the network is equivariant to the order of the spatial axes as long as the per-axis arguments
(kernels, strides, windows) and ``scan_axes`` follow the input. The reference plans are given in nnU-Net's axis
order (z, y, x) = ``layout="official"``; ``layout="monai"`` gives the same network for MONAI's (x, y, z) images.

Usage::

    net = LKMUNet.from_plan("abdomen_ct_3d", layout="monai")  # 63,782,246 params; ROI (192, 224, 40) in x, y, z
    net = LKMUNet.from_plan("abdomen_mr_2d", out_channels=5)  # 2D, 320x320 patches
    net = LKMUNet(spatial_dims=3, features_per_stage=(16, 32, 64), window_sizes=(8, 4, 2), pool_sizes=(4, 2, 1))

Windows are fixed sizes: with the reference plans, sliding-window inference with the training ROI keeps every
map a multiple of its window (the full 3D ROI needs about 3.6 GB of CPU memory for one forward in eval mode).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer

from ..blocks import scan_orders
from ..blocks.mamba import BiMambaPair
from ..utils import check_input, maybe_checkpoint

__all__ = [
    "plan_kwargs",
    "PiM",
    "PaM",
    "LMBlock",
    "LKMUNet",
    "PLANS",
    "official_window_sizes",
    "official_pool_sizes",
]

GROUPINGS = ("contiguous", "official")

# Reference plans in nnU-Net's (z, y, x) / (y, x) axis order; see specs lkm_unet.md §1 (inferred nnU-Net plans).
PLANS = {
    # FLARE22 subset (U-Mamba Dataset701), 3d_fullres, patch 40x224x192, 13 organs + background.
    "abdomen_ct_3d": dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=14,
        features_per_stage=(32, 64, 128, 256, 320, 320),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
        n_blocks_per_stage=2,
        n_conv_per_stage_decoder=2,
        window_sizes=((20, 28, 24), (20, 28, 24), (10, 14, 12), (10, 14, 12), (5, 7, 6), (5, 7, 6)),
        pool_sizes=(4, 4, 2, 2, 1, 1),
        roi_size=(40, 224, 192),
    ),
    # AMOS MR (U-Mamba Dataset702), 2d, patch 320x320, 13 organs + background.
    "abdomen_mr_2d": dict(
        spatial_dims=2,
        in_channels=1,
        out_channels=14,
        features_per_stage=(32, 64, 128, 256, 512, 512, 512),
        kernel_sizes=3,
        strides=(1, 2, 2, 2, 2, 2, 2),
        n_blocks_per_stage=2,
        n_conv_per_stage_decoder=2,
        window_sizes=(40, 20, 20, 10, 10, 5, 5),
        pool_sizes=(8, 4, 4, 2, 2, 1, 1),
        roi_size=(320, 320),
    ),
}
PLANS["abdomen_ct_3d_k333"] = dict(PLANS["abdomen_ct_3d"], kernel_sizes=3)  # variant with an isotropic first kernel


def official_window_sizes(n_stages: int, spatial_dims: int) -> list[tuple[int, ...]]:
    """The official PiM window per stage: ``(5, 7, 6) * p`` (3D) or ``5 * p`` (2D), ``p = 2**(ceil((n-s)/2) - 1)``.

    The 5/7/6 factors are hard-coded in the official code for its 40x224x192 and 320x320 patches.
    """
    base = (5, 7, 6) if spatial_dims == 3 else (5,) * spatial_dims
    return [tuple(b * 2 ** ((n_stages - s + 1) // 2 - 1) for b in base) for s in range(n_stages)]


def official_pool_sizes(n_stages: int, spatial_dims: int) -> list[tuple[int, ...]]:
    """The official PaM pooling factor per stage (isotropic): ``2**ceil((n-s)/2) // 2``."""
    return [(2 ** ((n_stages - s + 1) // 2) // 2,) * spatial_dims for s in range(n_stages)]


def _as_tuple(v, n: int, name: str) -> tuple[int, ...]:
    t = (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != n or any(i < 1 for i in t):
        raise ValueError(f"{name}={v!r} must be a positive int or {n} positive ints (one per spatial axis).")
    return t


def _per_stage(v, n_stages: int, n_dims: int, name: str) -> list[tuple[int, ...]]:
    """int (all stages, isotropic) or one entry per stage, each an int or ``n_dims`` ints."""
    if isinstance(v, int):
        return [_as_tuple(v, n_dims, name)] * n_stages
    v = list(v)
    if len(v) != n_stages:
        raise ValueError(f"{name} must have one entry per stage ({n_stages}), got {len(v)}: {v!r}.")
    return [_as_tuple(i, n_dims, f"{name}[{s}]") for s, i in enumerate(v)]


def _check_axes(scan_axes, n: int) -> tuple[int, ...]:
    axes = tuple(range(n)) if scan_axes is None else tuple(int(a) for a in scan_axes)
    if sorted(axes) != list(range(n)):
        raise ValueError(f"scan_axes={scan_axes!r} must be a permutation of the spatial axes {tuple(range(n))}.")
    return axes


class _SeqMambaLayer(BiMambaPair):
    """Shared part of PiM and PaM: a BiMambaPair (LayerNorm, forward + backward Mamba, shared out_proj) applied to
    token sequences cut from a feature map, residual added on the map, in fp32 with autocast disabled (as the
    official layers). The parameter names are those of the official ``Bi*MambaLayer`` modules."""

    def __init__(self, channels, window, window_grouping, scan_axes, d_state, d_conv, expand, chunk_tokens, what):
        super().__init__(channels, d_state=d_state, d_conv=d_conv, expand=expand)
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"{what}: chunk_tokens must be a positive int or None, got {chunk_tokens!r}.")
        self.chunk_tokens = chunk_tokens
        if window_grouping not in GROUPINGS:
            raise ValueError(f"window_grouping must be one of {GROUPINGS}, got {window_grouping!r}.")
        self.channels = int(channels)
        self.spatial_dims = len(window)
        self.window_grouping = window_grouping
        self.scan_axes = _check_axes(scan_axes, self.spatial_dims)
        self._what = what
        self._warned = False

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"{self._what}: expected a map (B, {self.channels}, {self.spatial_dims} spatial axes), "
                f"got {tuple(x.shape)}."
            )

    def _mix(self, seq: torch.Tensor) -> torch.Tensor:
        # The sequences are independent: run them in chunks to bound the peak memory (the 3D plan's stage-0 PiM
        # holds 1.7 M tokens per image, i.e. several GB of Mamba intermediates in one call).
        n, length = seq.shape[:2]
        per_chunk = n if self.chunk_tokens is None else max(1, self.chunk_tokens // max(length, 1))
        if per_chunk >= n:
            return BiMambaPair.forward(self, seq)
        return torch.cat([BiMambaPair.forward(self, c) for c in seq.split(per_chunk)])

    def _to_scan_order(self, x: torch.Tensor) -> torch.Tensor:
        if self.scan_axes == tuple(range(self.spatial_dims)):
            return x
        return x.permute(0, 1, *(2 + a for a in self.scan_axes))

    def _from_scan_order(self, x: torch.Tensor) -> torch.Tensor:
        if self.scan_axes == tuple(range(self.spatial_dims)):
            return x
        inv = [0] * self.spatial_dims
        for i, a in enumerate(self.scan_axes):
            inv[a] = i
        return x.permute(0, 1, *(2 + a for a in inv))

    def _warn_fallback(self, size, what_fallback: str) -> None:
        if not self._warned:
            warnings.warn(
                f"{self._what} (window_grouping='official'): map size {tuple(size)} is not divisible by "
                f"{self._describe()}; falling back to {what_fallback}, as the official code does silently. Use the "
                "training patch size (sliding-window inference) to reproduce the official behaviour.",
                stacklevel=3,
            )
            self._warned = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            y = self._from_scan_order(self._scan_windows(self._to_scan_order(x)))
            return x + y


class PiM(_SeqMambaLayer):
    """Pixel-level SSM: a bidirectional Mamba over the pixels of large windows (the official ``BiPixelMambaLayer``).

    Args:
        channels: feature channels ``C`` (Mamba ``d_model``).
        window_size: window per spatial axis (its length gives the spatial dims), e.g. ``(20, 28, 24)``.
        window_grouping: ``"contiguous"`` (paper: each window of adjacent pixels is a sequence; border windows are
            clipped when the map is not a multiple of the window) or ``"official"`` (pixels ``window_size`` apart form
            a sequence; whole-map scan when not divisible).
        scan_axes: spatial axes from slowest to fastest when flattening a window (default: row-major).
        d_state, d_conv, expand: Mamba hyper-parameters.
        chunk_tokens: run the sequences in chunks of at most this many tokens per Mamba call (bounds the peak
            memory at large maps; same result up to float rounding). ``None``: one call.

    Shapes: ``(B, C, *S) -> (B, C, *S)`` (float32: the layer runs in fp32 with autocast disabled).
    """

    def __init__(
        self,
        channels: int,
        window_size: Sequence[int],
        window_grouping: str = "contiguous",
        scan_axes: Sequence[int] | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        chunk_tokens: int | None = 2**18,
    ) -> None:
        window_size = tuple(int(w) for w in window_size)
        super().__init__(channels, window_size, window_grouping, scan_axes, d_state, d_conv, expand, chunk_tokens,
                         "PiM")
        if any(w < 1 for w in window_size):
            raise ValueError(f"PiM: window_size={window_size} must be positive.")
        self.window_size = window_size

    def _describe(self) -> str:
        return f"the window {self.window_size}"

    def _scan_windows(self, x: torch.Tensor) -> torch.Tensor:
        win = tuple(self.window_size[a] for a in self.scan_axes)
        size = x.shape[2:]
        if self.window_grouping == "official":
            if any(s % w for s, w in zip(size, win)):
                self._warn_fallback(size, "one sequence over the whole map")
            seq, restore = scan_orders.strided(x, win, on_indivisible="global")
            return restore(self._mix(seq))
        if not any(s % w for s, w in zip(size, win)):
            seq, restore = scan_orders.windows(x, win)
            return restore(self._mix(seq))
        # Clip border windows: split every axis into the part covered by whole windows and the remainder, then
        # scan each of the (at most 2**dims) regions with its own window shape.
        parts = []
        for s, w in zip(size, win):
            full = (s // w) * w
            axis_parts = [(slice(0, full), w)] if full else []
            if full < s:
                axis_parts.append((slice(full, s), s - full))
            parts.append(axis_parts)
        out = torch.empty_like(x)
        for combo in itertools.product(*parts):
            sl = (slice(None), slice(None), *(c[0] for c in combo))
            seq, restore = scan_orders.windows(x[sl], tuple(c[1] for c in combo))
            out[sl] = restore(self._mix(seq))
        return out


class PaM(_SeqMambaLayer):
    """Patch-level SSM: average-pool ``pool_size`` patches, one bidirectional Mamba over all pooled tokens of the
    image, nearest upsampling back (the official ``BiWindowMambaLayer``).

    Args:
        channels: feature channels ``C``.
        pool_size: pooling factor per spatial axis (its length gives the spatial dims); 1 = every pixel a token.
        window_grouping: ``"contiguous"``: a map that is not a multiple of the pool size is pooled with clipped border
            patches (``ceil_mode``); ``"official"``: it is not pooled at all (the official fallback).
        scan_axes, d_state, d_conv, expand, chunk_tokens: as in :class:`PiM` (a single sequence is never split).

    Shapes: ``(B, C, *S) -> (B, C, *S)`` (float32).
    """

    def __init__(
        self,
        channels: int,
        pool_size: Sequence[int],
        window_grouping: str = "contiguous",
        scan_axes: Sequence[int] | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        chunk_tokens: int | None = 2**18,
    ) -> None:
        pool_size = tuple(int(p) for p in pool_size)
        super().__init__(channels, pool_size, window_grouping, scan_axes, d_state, d_conv, expand, chunk_tokens,
                         "PaM")
        if any(p < 1 for p in pool_size):
            raise ValueError(f"PaM: pool_size={pool_size} must be positive.")
        self.pool_size = pool_size

    def _describe(self) -> str:
        return f"the pool size {self.pool_size}"

    def _scan_windows(self, x: torch.Tensor) -> torch.Tensor:
        q = tuple(self.pool_size[a] for a in self.scan_axes)
        size = tuple(x.shape[2:])
        if all(p == 1 for p in q):
            seq, restore = scan_orders.raster(x)
            return restore(self._mix(seq))
        if any(s % p for s, p in zip(size, q)):
            if self.window_grouping == "official":
                self._warn_fallback(size, "a scan over the un-pooled map")
                seq, restore = scan_orders.raster(x)
                return restore(self._mix(seq))
        pool = F.avg_pool3d if self.spatial_dims == 3 else F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool1d
        pooled = pool(x, q, q, ceil_mode=True)  # clipped border patches average their in-map pixels only
        seq, restore = scan_orders.raster(pooled)
        y = restore(self._mix(seq))
        for d, p in enumerate(q):  # nearest upsampling by an integer factor = repeat, then crop the border
            if p > 1:
                y = y.repeat_interleave(p, dim=2 + d).narrow(2 + d, 0, size[d])
        return y


class LMBlock(nn.Sequential):
    """The paper's LM block: :class:`PiM` followed by :class:`PaM` (each with its own residual).

    ``LKMUNet`` keeps the two layers in the official ``encoder.mamba_layers`` / ``encoder.w_mamba_layers`` lists so
    that official checkpoints load key for key; use this block to put an LM block into other networks.
    """

    def __init__(
        self,
        channels: int,
        window_size: Sequence[int],
        pool_size: Sequence[int],
        window_grouping: str = "contiguous",
        scan_axes: Sequence[int] | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        chunk_tokens: int | None = 2**18,
    ) -> None:
        kw = dict(window_grouping=window_grouping, scan_axes=scan_axes, d_state=d_state, d_conv=d_conv, expand=expand,
                  chunk_tokens=chunk_tokens)
        super().__init__()
        self.pim = PiM(channels, window_size, **kw)
        self.pam = PaM(channels, pool_size, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Convolutional parts: nnU-Net residual encoder/decoder blocks (dynamic_network_architectures' ConvDropoutNormReLU,
# BasicBlockD, StackedResidualBlocks). MONAI's UnetResBlock has a different skip (no ResNet-D average pooling, no
# conv bias), so the blocks are written here with the official child names.


class ConvNormAct(nn.Module):
    """conv (padding (k-1)//2) -> norm -> activation; ``act=None`` / ``norm=None`` leave that step out."""

    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size, stride, bias, norm, act) -> None:
        super().__init__()
        kernel_size = _as_tuple(kernel_size, spatial_dims, "kernel_size")
        self.conv = Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size, _as_tuple(stride, spatial_dims, "stride"),
            padding=tuple((k - 1) // 2 for k in kernel_size), bias=bias,
        )
        self.norm = get_norm_layer(norm, spatial_dims, out_channels) if norm is not None else None
        self.nonlin = get_act_layer(act) if act is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.nonlin(x) if self.nonlin is not None else x


class BasicBlockD(nn.Module):
    """ResNet-D basic block: ``act(norm(conv2(act(norm(conv1(x))))) + skip(x))``; skip = identity, or average
    pooling (when strided) followed by a 1x1 conv + norm (when the channels change)."""

    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size, stride, bias, norm, act) -> None:
        super().__init__()
        stride = _as_tuple(stride, spatial_dims, "stride")
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, stride, bias, norm, act)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size, 1, bias, norm, None)
        self.nonlin2 = get_act_layer(act) if act is not None else nn.Identity()
        ops: list[nn.Module] = []
        if any(s != 1 for s in stride):
            ops.append(Pool[Pool.AVG, spatial_dims](stride, stride))
        if in_channels != out_channels:
            ops.append(ConvNormAct(spatial_dims, in_channels, out_channels, 1, 1, False, norm, None))
        self.skip = nn.Sequential(*ops) if ops else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin2(self.conv2(self.conv1(x)) + self.skip(x))


class StackedResidualBlocks(nn.Module):
    """``n_blocks`` :class:`BasicBlockD`; only the first changes channels / strides."""

    def __init__(self, n_blocks, spatial_dims, in_channels, out_channels, kernel_size, stride, bias, norm, act):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"every stage needs at least one residual block, got {n_blocks}.")
        self.blocks = nn.Sequential(
            BasicBlockD(spatial_dims, in_channels, out_channels, kernel_size, stride, bias, norm, act),
            *[BasicBlockD(spatial_dims, out_channels, out_channels, kernel_size, 1, bias, norm, act)
              for _ in range(n_blocks - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _Stem(nn.Module):
    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size, bias, norm, act):
        super().__init__()
        conv = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, 1, bias, norm, act)
        self.convs = nn.Sequential(conv)

    def forward(self, x):
        return self.convs(x)


class _Encoder(nn.Module):
    def __init__(self, spatial_dims, in_channels, features, kernels, strides, n_blocks, bias, norm, act,
                 windows, pools, grouping, scan_axes, mamba_kw):
        super().__init__()
        self.stem = _Stem(spatial_dims, in_channels, features[0], kernels[0], bias, norm, act)
        c = features[0]
        self.stages = nn.ModuleList()
        self.mamba_layers = nn.ModuleList()  # PiM per stage
        self.w_mamba_layers = nn.ModuleList()  # PaM per stage
        for s, f in enumerate(features):
            self.stages.append(StackedResidualBlocks(n_blocks[s], spatial_dims, c, f, kernels[s], strides[s], bias,
                                                     norm, act))
            self.mamba_layers.append(PiM(f, windows[s], grouping, scan_axes, **mamba_kw))
            self.w_mamba_layers.append(PaM(f, pools[s], grouping, scan_axes, **mamba_kw))
            c = f
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        ckpt = self.use_checkpoint
        for stage, pim, pam in zip(self.stages, self.mamba_layers, self.w_mamba_layers):
            x = maybe_checkpoint(pam, maybe_checkpoint(pim, stage(x), ckpt), ckpt)
            skips.append(x)
        return skips


class _Decoder(nn.Module):
    def __init__(self, spatial_dims, out_channels, features, kernels, strides, n_blocks, bias, norm, act):
        super().__init__()
        self.stages = nn.ModuleList()
        self.transpconvs = nn.ModuleList()
        self.seg_layers = nn.ModuleList()  # one head per level (deep supervision), lowest resolution first
        for s in range(1, len(features)):
            below, skip = features[-s], features[-(s + 1)]
            self.transpconvs.append(
                Conv[Conv.CONVTRANS, spatial_dims](below, skip, strides[-s], strides[-s], bias=bias)
            )
            self.stages.append(StackedResidualBlocks(n_blocks[s - 1], spatial_dims, 2 * skip, skip,
                                                     kernels[-(s + 1)], 1, bias, norm, act))
            self.seg_layers.append(Conv[Conv.CONV, spatial_dims](skip, out_channels, 1, 1, 0, bias=True))

    def forward(self, skips: list[torch.Tensor], all_levels: bool) -> list[torch.Tensor]:
        x = skips[-1]
        outs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if all_levels or s == last:
                outs.append(self.seg_layers[s](x))
        return outs[::-1]


class LKMUNet(nn.Module):
    """LKM-UNet for 2D or 3D segmentation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: classes (including background).
        features_per_stage: channels per encoder stage (its length = number of stages). ``None``: the reference
            plan (3D: 32, 64, 128, 256, 320, 320; 2D: 32, 64, 128, 256, 512, 512, 512).
        kernel_sizes: conv kernel per stage: an int, or one int / per-axis tuple per stage. ``None``: 3.
        strides: downsampling per stage (the first is usually 1): int or per stage. ``None``: 1 then 2 per stage.
        n_blocks_per_stage: residual blocks per encoder stage (int or per stage).
        n_conv_per_stage_decoder: residual blocks per decoder stage (int or one per stage but the bottleneck).
        window_sizes: PiM window per stage (int, or per stage int / per-axis tuple). ``None``: the official values
            (3D ``(5, 7, 6) * p_s``, 2D ``5 * p_s``; tuned for the 40x224x192 / 320x320 patches).
        pool_sizes: PaM pooling per stage. ``None``: the official values (3D 4, 4, 2, 2, 1, 1).
        window_grouping: ``"contiguous"`` (paper) or ``"official"`` (the official strided grouping and fallbacks);
            see :class:`PiM`.
        scan_axes: spatial axes from slowest to fastest when maps are flattened into token sequences (default
            row-major). A network for reversed axes (MONAI x, y, z vs nnU-Net z, y, x) computes the same function
            with the per-axis arguments mirrored and ``scan_axes`` reversed.
        deep_supervision: in training mode return the outputs of all decoder levels (list, full resolution first,
            each ``(B, out_channels, *S / 2**level)``); in eval mode always one tensor.
        conv_bias: bias in the 3x3 convs and transposed convs (nnU-Net: True).
        norm_name, act_name: MONAI norm / activation specs (nnU-Net: instance norm eps 1e-5 affine, LeakyReLU 0.01).
        d_state, d_conv, expand: Mamba hyper-parameters.
        chunk_tokens: PiM/PaM run their independent sequences in chunks of at most this many tokens per Mamba call,
            which bounds the inference memory at the full ROI (``None``: one call per layer); see :class:`PiM`.
        use_checkpoint: gradient checkpointing of every PiM / PaM layer: their activations (about two thirds of the
            training memory at the full-resolution stages) are recomputed in the backward pass instead of stored.
            Training at the 3D CT ROI 192x224x40, batch 1, needs about 22 GB without it.

    Input ``(B, in_channels, *S)`` with every ``S_i`` a multiple of the product of the strides along axis ``i``;
    output ``(B, out_channels, *S)`` (float32).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 14,
        features_per_stage: Sequence[int] | None = None,
        kernel_sizes=None,
        strides=None,
        n_blocks_per_stage: int | Sequence[int] = 2,
        n_conv_per_stage_decoder: int | Sequence[int] = 2,
        window_sizes=None,
        pool_sizes=None,
        window_grouping: str = "contiguous",
        scan_axes: Sequence[int] | None = None,
        deep_supervision: bool = False,
        conv_bias: bool = True,
        norm_name: str | tuple = ("instance", {"eps": 1e-5, "affine": True}),
        act_name: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        chunk_tokens: int | None = 2**18,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"LKMUNet supports spatial_dims 2 or 3, got {spatial_dims}.")
        if window_grouping not in GROUPINGS:
            raise ValueError(f"window_grouping must be one of {GROUPINGS}, got {window_grouping!r}.")
        if features_per_stage is None:
            plan = PLANS["abdomen_ct_3d" if spatial_dims == 3 else "abdomen_mr_2d"]
            features_per_stage = plan["features_per_stage"]
            if kernel_sizes is None and strides is None:
                kernel_sizes, strides = plan["kernel_sizes"], plan["strides"]
        features = [int(f) for f in features_per_stage]
        n = len(features)
        if n < 2 or any(f < 1 for f in features):
            raise ValueError(f"features_per_stage needs >= 2 positive entries, got {features_per_stage!r}.")
        kernels = _per_stage(3 if kernel_sizes is None else kernel_sizes, n, spatial_dims, "kernel_sizes")
        strides_ = _per_stage([1] + [2] * (n - 1) if strides is None else strides, n, spatial_dims, "strides")
        if any(k % 2 == 0 for ks in kernels for k in ks):
            raise ValueError(f"kernel_sizes must be odd (same padding), got {kernel_sizes!r}.")
        n_enc = [n_blocks_per_stage] * n if isinstance(n_blocks_per_stage, int) else list(n_blocks_per_stage)
        n_dec = ([n_conv_per_stage_decoder] * (n - 1) if isinstance(n_conv_per_stage_decoder, int)
                 else list(n_conv_per_stage_decoder))
        if len(n_enc) != n:
            raise ValueError(f"n_blocks_per_stage needs {n} entries (one per stage), got {n_blocks_per_stage!r}.")
        if len(n_dec) != n - 1:
            raise ValueError(
                f"n_conv_per_stage_decoder needs {n - 1} entries (stages - 1), got {n_conv_per_stage_decoder!r}."
            )
        windows = (official_window_sizes(n, spatial_dims) if window_sizes is None
                   else _per_stage(window_sizes, n, spatial_dims, "window_sizes"))
        pools = (official_pool_sizes(n, spatial_dims) if pool_sizes is None
                 else _per_stage(pool_sizes, n, spatial_dims, "pool_sizes"))

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features_per_stage = tuple(features)
        self.kernel_sizes = tuple(kernels)
        self.strides = tuple(strides_)
        self.window_sizes = tuple(windows)
        self.pool_sizes = tuple(pools)
        self.window_grouping = window_grouping
        self.scan_axes = _check_axes(scan_axes, spatial_dims)
        self.deep_supervision = deep_supervision
        # every spatial size must survive the strided convs exactly (the decoder concatenates the skips)
        self.divisible_by = tuple(
            math.prod(s[d] for s in strides_) for d in range(spatial_dims)
        )

        # normalised arguments: ``LKMUNet(**net.constructor_args)`` rebuilds this network (bundle configs, converters)
        self.constructor_args = dict(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            features_per_stage=list(features), kernel_sizes=[list(k) for k in kernels],
            strides=[list(s) for s in strides_], n_blocks_per_stage=n_enc, n_conv_per_stage_decoder=n_dec,
            window_sizes=[list(w) for w in windows], pool_sizes=[list(p) for p in pools],
            window_grouping=window_grouping, scan_axes=list(self.scan_axes), deep_supervision=deep_supervision,
            conv_bias=conv_bias, norm_name=norm_name, act_name=act_name, d_state=d_state, d_conv=d_conv, expand=expand,
            chunk_tokens=chunk_tokens, use_checkpoint=use_checkpoint,
        )
        name = norm_name[0] if isinstance(norm_name, (tuple, list)) else norm_name
        self._instance_norm = str(name).lower().startswith("instance")
        mamba_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, chunk_tokens=chunk_tokens)
        self.encoder = _Encoder(spatial_dims, in_channels, features, kernels, strides_, n_enc, conv_bias, norm_name,
                                act_name, windows, pools, window_grouping, self.scan_axes, mamba_kw)
        self.encoder.use_checkpoint = bool(use_checkpoint)
        self.decoder = _Decoder(spatial_dims, out_channels, features, kernels, strides_, n_dec, conv_bias, norm_name,
                                act_name)
        self.reset_conv_parameters()

    @torch.no_grad()
    def reset_conv_parameters(self) -> None:
        """nnU-Net init: He normal (a=0.01) for the (transposed) convs with zero bias, then the last norm of every
        residual block zeroed so each block starts as its skip. Mamba / LayerNorm keep their own init."""
        conv_types = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        for m in self.modules():
            if isinstance(m, conv_types):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlockD) and m.conv2.norm is not None:
                for p in (getattr(m.conv2.norm, "weight", None), getattr(m.conv2.norm, "bias", None)):
                    if p is not None:
                        nn.init.zeros_(p)

    @classmethod
    def from_plan(cls, name: str, layout: str = "official", **overrides) -> LKMUNet:
        """Build a reference plan: ``"abdomen_ct_3d"`` (FLARE / AbdomenCT, patch 40x224x192 in z, y, x),
        ``"abdomen_ct_3d_k333"`` (same with an isotropic first kernel) or ``"abdomen_mr_2d"`` (patch 320x320).

        ``layout="official"`` keeps nnU-Net's axis order (z, y, x); ``layout="monai"`` mirrors kernels, strides and
        windows and reverses ``scan_axes`` for MONAI's (x, y, z) images (ROI 192x224x40). ``overrides`` replace
        constructor arguments (e.g. ``out_channels``, ``window_grouping``, ``deep_supervision``).
        """
        if name not in PLANS:
            raise ValueError(f"unknown LKM-UNet plan {name!r}; available: {sorted(PLANS)}.")
        kw = plan_kwargs(name, layout)
        kw.pop("roi_size")
        kw.update(overrides)
        return cls(**kw)

    def forward(self, x: torch.Tensor):
        check_input(x, name="LKMUNet", in_channels=self.in_channels, spatial_dims=self.spatial_dims,
                    divisible_by=self.divisible_by)
        if self._instance_norm and all(s == d for s, d in zip(x.shape[2:], self.divisible_by)):
            raise ValueError(
                f"LKMUNet: spatial size {tuple(x.shape[2:])} leaves a single voxel at the bottleneck, which instance "
                f"normalisation cannot normalise; use at least twice {self.divisible_by} along one axis."
            )
        all_levels = self.deep_supervision and self.training
        outs = self.decoder(self.encoder(x), all_levels)
        return outs if all_levels else outs[0]


def plan_kwargs(name: str, layout: str = "official") -> dict:
    """Constructor arguments (plus ``roi_size``) of a reference plan in the requested axis layout."""
    if layout not in ("official", "monai"):
        raise ValueError(f"layout must be 'official' (nnU-Net z, y, x) or 'monai' (x, y, z), got {layout!r}.")
    kw = dict(PLANS[name])
    n, d = len(kw["features_per_stage"]), kw["spatial_dims"]
    for key in ("kernel_sizes", "strides", "window_sizes", "pool_sizes"):
        kw[key] = [tuple(t) for t in _per_stage(kw[key], n, d, key)]
    if layout == "monai":
        for key in ("kernel_sizes", "strides", "window_sizes", "pool_sizes"):
            kw[key] = [t[::-1] for t in kw[key]]
        kw["roi_size"] = tuple(kw["roi_size"])[::-1]
        kw["scan_axes"] = tuple(range(d))[::-1]
    return kw
