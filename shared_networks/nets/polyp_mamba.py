"""Polyp-Mamba (Xu et al., "Polyp-Mamba: Polyp Segmentation with Visual Mamba", MICCAI 2024).

Reconstructed: no official code exists (the MICCAI page lists none). The network is a VM-UNet-shaped VSS
encoder/decoder (VMamba v0 blocks) plus the two modules the paper adds:

- SAS (scale-aware semantics): the four encoder stage outputs are average-pooled to one grid, concatenated and run
  through stacked VSS blocks, giving global semantics that mix information within and across scales (TopFormer's
  ``PyramidPoolAgg`` + global blocks, with VSS blocks in place of attention).
- GSI (global semantics injection), one per decoder scale: ``BN(conv1x1(local)) * sigmoid(BN(conv1x1(global))) +
  BN(conv1x1(global))`` with the global terms upsampled to the local grid (TopFormer's ``InjectionMultiSum``).

Layout (2D, default configuration, input (B, 3, H, W) with H, W multiples of 32)::

    patch_embed  Conv(3->96, k4 s4) + LN             -> (B, H/4, W/4, 96) channels-last
    layers[i]    VSS x depths[i], then PatchMerging  F_i = stage output before merging:
                                                        96@H/4, 192@H/8, 384@H/16, 768@H/32
    sas          pool F_1..F_4 to H/32, concat (1440) -> conv1x1+BN (1440->384) -> VSS x2 at 384 -> S
    layers_up[j] j=0: VSS x2 (768);  j>0: PatchExpand(D_{j-1} + skip_j) -> VSS x depths_decoder[j]
                 D_j = gsi[j](local=VSS output, global=S)          (768@H/32, 384@H/16, 192@H/8, 96@H/4)
    final_up     Linear(96->384) + 4x4 pixel shuffle + LN(24)       -> (B, H, W, 24)
    final_conv   Conv1x1(24 -> out_channels)                        -> logits (B, out_channels, H, W)

Decisions (the spec's [DECIDE] points; the paper PDF was not available, so each is a reconstruction):

1. Base layout and depths: VM-UNet's (encoder depths (2, 2, 2, 2), decoder (2, 2, 2, 1), dims 96..768, d_state 16,
   drop_path_rate 0.2 with VM-UNet's linear rule: encoder ``linspace(0, .2, 8)``, decoder the reversed
   ``linspace(0, .2, 7)``). The paper describes "two consecutive VSS blocks" per stage, which matches.
2. Skip fusion: VM-UNet's addition (``skip_fusion="add"``): before decoder stage j > 0 the *input* of encoder stage
   4 - j is added (768@H/32, 384@H/16, 192@H/8); the 96@H/4 patch-embedding feature is not used (VM-UNet quirk,
   kept for faithfulness and for checkpoint compatibility). ``skip_fusion="concat"`` gives the Swin-UNet
   alternative: after each PatchExpand, concatenate the input of the encoder stage at that scale (384@H/16,
   192@H/8, then the 96@H/4 patch embedding) and reduce with Linear(2C -> C).
3. SAS inputs: the encoder stage *outputs* (after their VSS blocks, before PatchMerging), so the last stage's
   processing is included.
4. SAS pooling grid: the coarsest encoder grid H/32 (11x11 at 352x352; TopFormer would pool one level lower).
5. SAS width: variant B of the spec (``sas_channels=384``): conv1x1(1440 -> 384, no bias) + BatchNorm, no
   activation, then the VSS stack at 384 channels; every GSI receives all 384 channels and projects them to its
   own width. ``sas_channels=None`` gives variant A (VSS blocks at the full 1440 channels, output split back into
   per-scale chunks of 96/192/384/768 channels, chunk i feeding the GSI of scale i) — faithful to TopFormer but
   15.1 M parameters per block.
6. SAS depth: 2 VSS blocks (``sas_depth=2``); their drop-path rates follow TopFormer's ``linspace(0, rate, depth)``
   with ``drop_path_rate``.
7. GSI gate: plain sigmoid as the paper describes (``gsi_gate="sigmoid"``); ``"hsigmoid"`` gives TopFormer's
   ReLU6(x + 3) / 6. No activation after the injection; BatchNorm eps 1e-5, momentum 0.1; the gate and the global
   features are resized with bilinear (trilinear) interpolation, align_corners=False, the gate after its sigmoid.
8. GSI placement: on the output of decoder stage j (after its VSS blocks, before the next PatchExpand), at the
   four decoder scales H/32, H/16, H/8, H/4; with variant A stage j takes the chunk of the matching encoder scale.
   The local path is the decoder feature (the abstract: "inject scale-aware semantics into the corresponding
   decoder features").
9. Initialisation: VM-UNet's (every Linear trunc_normal(std .02) with zero bias, LayerNorm 1/0, convolutions at
   the PyTorch default; the SS2D dt/A/D/x_proj parameters keep their SS2D init); SAS/GSI convolutions TopFormer's
   normal(0, sqrt(2 / (k^d * out))) with BatchNorm 1/0.
10. Output: logits (no sigmoid; VM-UNet's wrapper applies one for one class — put it in post-processing).
    ``in_channels`` is a constructor argument (VM-UNet's wrapper instead repeats a grey input to 3 channels).
    One output, no deep supervision. Loss: :class:`shared_networks.losses.StructureLoss` (BCE + weighted IoU,
    PraNet's effective behaviour); single-scale training and inference at 352x352 with bilinear resizing, predictions
    resized back to the mask size (PraNet protocol; its {0.75, 1, 1.25} multi-scale schedule is a data-pipeline
    option).
11. ImageNet pre-training: the paper most likely started from ImageNet VMamba weights (as VM-UNet does); they
    cannot be downloaded here, so the default is from scratch and a local checkpoint can be given (below).
12. 3D (``spatial_dims=3``, an extension beyond the paper): the same layout with SS2D's six-direction 3D scan,
    cubic patches (4^3), 2x2x2 merging/expanding (8C -> 2C and 2C -> 8 x C), a 4x4x4 final expansion to dims[0]//4
    channels, BatchNorm3d and trilinear resizing in SAS/GSI. Each axis must be a multiple of 32.

Parameter counts (2D, 3 -> 1 channel): the VM-UNet base (``semantic_injection=False``) 27,427,561 (equals the
official VM-UNet ``VSSM``); the default configuration (variant B) 32,270,761; variant A with one / two VSS blocks
44,914,921 / 60,043,561. 3D with the same widths (3 -> 1 channel): 38,724,649.

ImageNet initialisation: VMamba v0 classification weights (e.g. ``vmamba_small_e238_ema.pth``, as used by VM-UNet)
or a VM-UNet checkpoint can be loaded from a local file with :meth:`PolypMamba.load_pretrained_encoder` or the
``pretrained_encoder=`` argument; nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from shared_networks.blocks.mamba import VSSBlock
from shared_networks.utils import check_input, maybe_checkpoint

__all__ = [
    "PolypMamba",
    "PatchEmbed",
    "PatchMerging",
    "PatchExpand",
    "ScaleAwareSemantics",
    "GlobalSemanticsInjection",
]

logger = logging.getLogger(__name__)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1)


def _to_channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-1, 1)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv(k = s = patch_size) then LayerNorm, channels-last output.

    (B, C_in, *S) -> (B, *S/patch_size, dim). Parameter names (``proj``, ``norm``) follow VMamba's ``PatchEmbed2D``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, dim: int, patch_size: int = 4, eps: float = 1e-5):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_to_channels_last(self.proj(x)))


class PatchMerging(nn.Module):
    """Halve every spatial axis, concatenating each 2^d neighbourhood, then LayerNorm(2^d C) and Linear(-> 2C).

    Channels-last (B, *S, C) -> (B, *S/2, 2C). The neighbours are concatenated with the *first* spatial axis
    varying fastest — in 2D (even-row/even-col, odd-row/even-col, even-row/odd-col, odd-row/odd-col) — which is
    VMamba's order, so ImageNet ``downsample.reduction`` weights apply unchanged.
    """

    def __init__(self, dim: int, spatial_dims: int = 2, eps: float = 1e-5):
        super().__init__()
        self.spatial_dims = spatial_dims
        n = 2**spatial_dims
        self.norm = nn.LayerNorm(n * dim, eps=eps)
        self.reduction = nn.Linear(n * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *size, c = x.shape
        nd = self.spatial_dims
        split = [b]
        for s in size:
            split += [s // 2, 2]
        x = x.reshape(*split, c)
        # (B, s0/2, 2, s1/2, 2, ..., C) -> (B, s0/2, s1/2, ..., offset_{d-1}, ..., offset_0, C): offset_0 fastest
        coarse = [1 + 2 * i for i in range(nd)]
        offsets = [2 + 2 * i for i in reversed(range(nd))]
        x = x.permute(0, *coarse, *offsets, 2 * nd + 1).reshape(b, *(s // 2 for s in size), (2**nd) * c)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear(in_dim -> scale^d * out_dim, no bias), scatter each token into a scale^d block, LayerNorm(out_dim).

    Channels-last (B, *S, in_dim) -> (B, *S*scale, out_dim). A token's channels are read as (p_0, p_1, ..., c) with
    the first spatial offset slowest — VM-UNet's ``rearrange('b h w (p1 p2 c) -> b (h p1) (w p2) c')``. With
    ``in_dim = 2 out_dim, scale = 2`` this is VM-UNet's ``PatchExpand2D``; with ``in_dim = 4 out_dim, scale = 4`` its
    ``Final_PatchExpand2D``.
    """

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2, spatial_dims: int = 2, eps: float = 1e-5):
        super().__init__()
        self.spatial_dims, self.scale, self.out_dim = spatial_dims, scale, out_dim
        self.expand = nn.Linear(in_dim, (scale**spatial_dims) * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *size, _ = x.shape
        nd, s = self.spatial_dims, self.scale
        x = self.expand(x).reshape(b, *size, *([s] * nd), self.out_dim)
        # (B, S0, S1, .., p0, p1, .., C) -> (B, S0, p0, S1, p1, .., C)
        order = [0]
        for i in range(nd):
            order += [1 + i, 1 + nd + i]
        x = x.permute(*order, 2 * nd + 1).reshape(b, *(n * s for n in size), self.out_dim)
        return self.norm(x)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for blk in blocks:
        x = maybe_checkpoint(blk, x, use_checkpoint)
    return x


class _EncoderStage(nn.Module):
    """VSS blocks then (optionally) PatchMerging; returns the pre-merge output and the merged map."""

    def __init__(self, dim, depth, drop_paths, d_state, spatial_dims, downsample: bool, eps):
        super().__init__()
        self.blocks = nn.ModuleList(
            [_vss(dim, drop_paths[i], d_state, spatial_dims, eps) for i in range(depth)]
        )
        self.downsample = PatchMerging(dim, spatial_dims, eps) if downsample else None
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = _run_blocks(self.blocks, x, self.use_checkpoint)
        return out, (self.downsample(out) if self.downsample is not None else out)


class _DecoderStage(nn.Module):
    """(optionally) PatchExpand then VSS blocks, as VM-UNet's ``VSSLayer_up``."""

    def __init__(self, dim, depth, drop_paths, d_state, spatial_dims, upsample: bool, eps):
        super().__init__()
        self.upsample = PatchExpand(2 * dim, dim, 2, spatial_dims, eps) if upsample else None
        self.blocks = nn.ModuleList(
            [_vss(dim, drop_paths[i], d_state, spatial_dims, eps) for i in range(depth)]
        )
        self.use_checkpoint = False

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x) if self.upsample is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_blocks(self.blocks, x, self.use_checkpoint)


def _vss(dim: int, drop_path: float, d_state: int, spatial_dims: int, eps: float) -> nn.Module:
    return VSSBlock(dim, drop_path=drop_path, d_state=d_state, spatial_dims=spatial_dims, norm_eps=eps)


def _topformer_conv_init(module: nn.Module) -> None:
    """TopFormer's init for its ConvModules: conv ~ N(0, sqrt(2 / fan_out)), BatchNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fan_out = math.prod(m.kernel_size) * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn(spatial_dims: int, in_channels: int, out_channels: int) -> Convolution:
    # conv1x1 (no bias) -> BatchNorm, no activation (TopFormer's Conv2d_BN / ConvModule(act_cfg=None))
    return Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, act=None, norm="batch", bias=False)


class ScaleAwareSemantics(nn.Module):
    """SAS: pool multi-scale features to one grid, concatenate, run stacked VSS blocks (TopFormer-style).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each input scale, fine to coarse (e.g. (96, 192, 384, 768)).
        channels: width of the VSS stack. ``None``: the concatenation width (sum of ``in_channels``) and the output
            is split back into per-scale chunks; an int: a conv1x1 + BatchNorm projection to this width first and
            the same ``channels``-wide semantics are returned for every scale.
        depth: number of VSS blocks.
        drop_path: drop-path rate of the last block (linear from 0).
        d_state: SSM state size.

    Forward: a list of channels-first maps (B, C_i, *S_i); the pooling grid is the smallest map's size.
    Returns a list (one per scale) of channels-first maps (B, C_out_i, *S_min).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        channels: int | None = 384,
        depth: int = 2,
        drop_path: float = 0.0,
        d_state: int = 16,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = tuple(int(c) for c in in_channels)
        total = sum(self.in_channels)
        self.split = channels is None
        width = total if channels is None else int(channels)
        self.proj = None if channels is None else _conv_bn(spatial_dims, total, width)
        dpr = torch.linspace(0, drop_path, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.ModuleList([_vss(width, dpr[i], d_state, spatial_dims, eps) for i in range(depth)])
        self.out_channels = self.in_channels if self.split else (width,) * len(self.in_channels)
        self.use_checkpoint = False
        _topformer_conv_init(self)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        size = feats[-1].shape[2:]
        pool = F.adaptive_avg_pool2d if self.spatial_dims == 2 else F.adaptive_avg_pool3d
        x = torch.cat([pool(f, size) for f in feats], dim=1)
        if self.proj is not None:
            x = self.proj(x)
        x = _to_channels_first(_run_blocks(self.blocks, _to_channels_last(x), self.use_checkpoint))
        if self.split:
            return list(torch.split(x, self.in_channels, dim=1))
        return [x] * len(self.in_channels)


class _HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class GlobalSemanticsInjection(nn.Module):
    """GSI: inject global semantics into a local feature map (TopFormer ``InjectionMultiSum``).

    ``out = BN(conv(local)) * up(gate(BN(conv(global)))) + up(BN(conv(global)))`` — all convolutions 1x1 without
    bias, ``up`` is bilinear/trilinear resizing (align_corners=False) to the local grid, ``gate`` is sigmoid (paper)
    or TopFormer's h-sigmoid. Parameters: C^2 + 2 C_g C + 6 C.

    Args:
        spatial_dims: 2 or 3.
        local_channels: C, channels of the local feature (and of the output).
        global_channels: C_g, channels of the global semantics.
        gate: ``"sigmoid"`` or ``"hsigmoid"``.

    Forward: ``local`` (B, C, *S), ``global_`` (B, C_g, *s) -> (B, C, *S).
    """

    def __init__(self, spatial_dims: int, local_channels: int, global_channels: int, gate: str = "sigmoid"):
        super().__init__()
        if gate not in ("sigmoid", "hsigmoid"):
            raise ValueError(f"GlobalSemanticsInjection: gate must be 'sigmoid' or 'hsigmoid', got {gate!r}.")
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.local_embedding = _conv_bn(spatial_dims, local_channels, local_channels)
        self.global_act = _conv_bn(spatial_dims, global_channels, local_channels)
        self.global_embedding = _conv_bn(spatial_dims, global_channels, local_channels)
        self.act = nn.Sigmoid() if gate == "sigmoid" else _HSigmoid()
        _topformer_conv_init(self)

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        size = local.shape[2:]
        weight = F.interpolate(self.act(self.global_act(global_)), size=size, mode=self.mode, align_corners=False)
        feat = F.interpolate(self.global_embedding(global_), size=size, mode=self.mode, align_corners=False)
        return self.local_embedding(local) * weight + feat


class PolypMamba(nn.Module):
    """Polyp-Mamba: VSS (VMamba) U-Net with scale-aware semantics (SAS) and global semantics injection (GSI).

    See the module docstring for the layout and every reconstruction decision.

    Args:
        spatial_dims: 2 (the paper) or 3 (six-direction VSS scan).
        in_channels: input channels (3 for RGB endoscopy).
        out_channels: output channels; logits are returned (1 for binary polyp masks; use a sigmoid outside).
        dims: encoder widths per stage (decoder mirrors them).
        depths: VSS blocks per encoder stage.
        depths_decoder: VSS blocks per decoder stage, coarse to fine.
        patch_size: patch-embedding stride.
        d_state: SSM state size of every VSS block.
        drop_path_rate: stochastic depth (VM-UNet rule; also the last SAS block's rate).
        skip_fusion: ``"add"`` (VM-UNet) or ``"concat"`` (Swin-UNet concat + Linear(2C -> C)).
        semantic_injection: build SAS and GSI; ``False`` gives the plain VM-UNet (ablation / VM-UNet checkpoints).
        sas_channels: VSS width inside SAS (variant B, default 384) or ``None`` (variant A: full concatenation width,
            output split per scale).
        sas_depth: VSS blocks in SAS.
        gsi_gate: ``"sigmoid"`` (paper) or ``"hsigmoid"`` (TopFormer).
        norm_eps: LayerNorm epsilon (VM-UNet: 1e-5).
        use_checkpoint: gradient checkpointing of the VSS blocks (saves memory when training at 352x352).
        pretrained_encoder: optional local path of a VMamba v0 / VM-UNet checkpoint to load after construction (see
            :meth:`load_pretrained_encoder`; 2D only).

    Input (B, in_channels, *S) with each spatial size a multiple of ``patch_size * 2 ** (len(dims) - 1)`` (32);
    output logits (B, out_channels, *S). Training needs more than one value per channel at the coarsest grid for
    the SAS/GSI BatchNorm (batch size 1 at 32x32 is the only size that fails).

    Example (the paper's setting; 32,270,761 parameters)::

        net = PolypMamba(spatial_dims=2, in_channels=3, out_channels=1)
        logits = net(torch.randn(2, 3, 352, 352))   # (2, 1, 352, 352)
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 2, 2),
        depths_decoder: Sequence[int] = (2, 2, 2, 1),
        patch_size: int = 4,
        d_state: int = 16,
        drop_path_rate: float = 0.2,
        skip_fusion: str = "add",
        semantic_injection: bool = True,
        sas_channels: int | None = 384,
        sas_depth: int = 2,
        gsi_gate: str = "sigmoid",
        norm_eps: float = 1e-5,
        use_checkpoint: bool = False,
        pretrained_encoder: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"PolypMamba: spatial_dims must be 2 or 3, got {spatial_dims}.")
        dims, depths, depths_decoder = tuple(dims), tuple(depths), tuple(depths_decoder)
        n = len(dims)
        if n < 2 or len(depths) != n or len(depths_decoder) != n:
            raise ValueError(
                f"PolypMamba: dims {dims}, depths {depths} and depths_decoder {depths_decoder} must have the same "
                "length (>= 2)."
            )
        if any(dims[i + 1] != 2 * dims[i] for i in range(n - 1)):
            raise ValueError(f"PolypMamba: each stage must double the width (PatchMerging 2C), got dims {dims}.")
        if dims[0] % 4:
            raise ValueError(f"PolypMamba: dims[0] must be divisible by 4 (final 4x expansion), got {dims[0]}.")
        if skip_fusion not in ("add", "concat"):
            raise ValueError(f"PolypMamba: skip_fusion must be 'add' or 'concat', got {skip_fusion!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dims = dims
        self.skip_fusion = skip_fusion
        self.divisor = patch_size * 2 ** (n - 1)
        dims_dec = dims[::-1]

        self.patch_embed = PatchEmbed(spatial_dims, in_channels, dims[0], patch_size, norm_eps)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dpr_dec = torch.linspace(0, drop_path_rate, sum(depths_decoder), device="cpu").tolist()[::-1]
        self.layers = nn.ModuleList(
            [
                _EncoderStage(
                    dims[i], depths[i], dpr[sum(depths[:i]) : sum(depths[: i + 1])], d_state, spatial_dims,
                    i < n - 1, norm_eps,
                )
                for i in range(n)
            ]
        )
        self.layers_up = nn.ModuleList(
            [
                _DecoderStage(
                    dims_dec[j], depths_decoder[j], dpr_dec[sum(depths_decoder[:j]) : sum(depths_decoder[: j + 1])],
                    d_state, spatial_dims, j > 0, norm_eps,
                )
                for j in range(n)
            ]
        )
        # Swin-UNet's concat fusion: Linear(2C -> C) after each PatchExpand (index 0 unused, kept for aligned indices)
        self.concat_back_dim = (
            nn.ModuleList([nn.Identity()] + [nn.Linear(2 * dims_dec[j], dims_dec[j]) for j in range(1, n)])
            if skip_fusion == "concat"
            else None
        )
        if semantic_injection:
            self.sas = ScaleAwareSemantics(
                spatial_dims, dims, sas_channels, sas_depth, drop_path_rate, d_state, norm_eps
            )
            g = self.sas.out_channels[::-1]  # coarse-to-fine, aligned with the decoder stages
            self.gsi = nn.ModuleList(
                [GlobalSemanticsInjection(spatial_dims, dims_dec[j], g[j], gsi_gate) for j in range(n)]
            )
        else:
            self.sas = None
            self.gsi = None
        self.final_up = PatchExpand(dims[0], dims[0] // 4, patch_size, spatial_dims, norm_eps)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.final_conv = conv(dims[0] // 4, out_channels, kernel_size=1)

        self.apply(self._init_weights)
        self.set_grad_checkpointing(use_checkpoint)
        if pretrained_encoder is not None:
            self.load_pretrained_encoder(pretrained_encoder)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # VM-UNet's VSSM._init_weights; convolutions (patch embed, SS2D dwconv, head) keep the PyTorch default and
        # the SAS/GSI conv+BN keep the TopFormer init set in their constructors
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the VSS blocks in the backward pass instead of storing their activations."""
        for m in self.modules():
            if hasattr(m, "use_checkpoint"):
                m.use_checkpoint = bool(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(
            x, name="PolypMamba", in_channels=self.in_channels, spatial_dims=self.spatial_dims,
            divisible_by=self.divisor,
        )
        x = self.patch_embed(x)
        stage_inputs, stage_outputs = [], []
        for layer in self.layers:
            stage_inputs.append(x)
            out, x = layer(x)
            stage_outputs.append(out)

        semantics = None
        if self.sas is not None:
            semantics = self.sas([_to_channels_first(f) for f in stage_outputs])[::-1]  # coarse to fine

        n = len(self.layers_up)
        for j, layer_up in enumerate(self.layers_up):
            if j > 0:
                if self.skip_fusion == "add":
                    x = layer_up.expand(x + stage_inputs[n - j])
                else:
                    x = layer_up.expand(x)
                    x = self.concat_back_dim[j](torch.cat([x, stage_inputs[n - 1 - j]], dim=-1))
            x = layer_up(x)
            if self.gsi is not None:
                x = _to_channels_last(self.gsi[j](_to_channels_first(x), semantics[j]))

        x = self.final_up(x)
        return self.final_conv(_to_channels_first(x))

    # ------------------------------------------------------------------------------------------------------------
    # ImageNet VMamba / VM-UNet weights
    # ------------------------------------------------------------------------------------------------------------
    def load_pretrained_encoder(
        self,
        checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        mirror_decoder: bool = True,
    ) -> dict[str, list[str]]:
        """Initialise from a local VMamba v0 (ImageNet classification) or VM-UNet checkpoint; nothing is downloaded.

        Accepted files (read with ``torch.load(weights_only=True)``; the weights may sit under ``model``,
        ``model_state_dict`` (VM-UNet's training checkpoints) or ``state_dict``; ``module.`` and VM-UNet's
        ``vmunet.`` prefixes are stripped):

        - VMamba v0 classification weights (keys ``patch_embed.proj.weight``, ``layers.{i}.blocks.{j}.ln_1.weight``,
          ``layers.{i}.blocks.{j}.self_attention.{in_proj,conv2d,x_proj_weight,dt_projs_weight,dt_projs_bias,A_logs,
          Ds,out_norm,out_proj}``, ``layers.{i}.downsample.{norm,reduction}.weight``, ``norm``, ``head``), e.g.
          ``vmamba_small_e238_ema.pth`` as used by VM-UNet. They fill the encoder; with ``mirror_decoder=True`` the
          VSS blocks of encoder stage i also initialise decoder stage ``len(dims) - 1 - i`` (VM-UNet's ``load_from``).
          Extra blocks (VMamba-S has 27 in stage 3), ``norm`` and ``head`` are skipped.
        - A VM-UNet checkpoint (keys also under ``layers_up.*``, ``final_up.*``): every matching tensor is loaded.

        Tensors whose shape differs (e.g. another width, ``in_channels != 3``) are skipped and reported; SAS/GSI and
        anything not covered keep their initialisation.

        Returns:
            ``{"loaded": [...], "shape_mismatch": [...], "unused": [...], "not_loaded": [...]}`` — model keys
            loaded, checkpoint keys skipped for a shape mismatch, checkpoint keys with no counterpart, and model keys
            left at their initialisation. A summary is logged at INFO level.

        Raises:
            ValueError: the file holds no tensor that fits this network (not a VMamba v0 / VM-UNet checkpoint, or a
                different configuration), or the network is 3D (ImageNet VMamba weights are 2D).
        """
        if self.spatial_dims != 2:
            raise ValueError(
                "PolypMamba.load_pretrained_encoder: ImageNet VMamba weights are 2D; a 3D network (spatial_dims=3) "
                "cannot take them. Load a 3D PolypMamba checkpoint with load_state_dict instead."
            )
        source = "the given state dict"
        if isinstance(checkpoint, Mapping):
            given = dict(checkpoint)
        else:
            from shared_networks.convert._common import load_checkpoint_file

            source = os.fspath(checkpoint)
            try:
                given = load_checkpoint_file(
                    source, key_candidates=("model", "model_state_dict", "state_dict", "model_ema", "net")
                )
            except ValueError as e:
                raise ValueError(
                    f"{e} If this is a trusted VMamba training checkpoint holding other objects (e.g. its config), "
                    "extract the weights once with torch.save(torch.load(path, weights_only=False)['model'], "
                    "'weights.pth') and load that file."
                ) from e

        own = self.state_dict()
        renamed = self._translate_vmamba_keys(given)
        is_vmunet = any(k.startswith(("layers_up.", "final_up.")) for k in renamed)
        candidates: dict[str, tuple[str, torch.Tensor]] = {}  # model key -> (checkpoint key, tensor)
        for src_key, (key, value) in renamed.items():
            candidates.setdefault(key, (src_key, value))
        if mirror_decoder and not is_vmunet:
            n = len(self.layers)
            for src_key, (key, value) in renamed.items():
                parts = key.split(".")
                if len(parts) > 3 and parts[0] == "layers" and parts[2] == "blocks" and parts[1].isdigit():
                    mirrored = ".".join(["layers_up", str(n - 1 - int(parts[1]))] + parts[2:])
                    candidates.setdefault(mirrored, (src_key, value))

        loaded, mismatch, used = [], [], set()
        new_state = {}
        for key, (src_key, value) in candidates.items():
            if key not in own:
                continue
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[key].shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                mismatch.append(f"{src_key}: checkpoint {shape} vs model {tuple(own[key].shape)}")
                used.add(src_key)
                continue
            new_state[key] = value
            loaded.append(key)
            used.add(src_key)
        if not loaded:
            sample = list(given)[:5]
            raise ValueError(
                f"PolypMamba.load_pretrained_encoder: no tensor in {source} fits this network "
                f"({len(given)} keys, e.g. {sample}; {len(mismatch)} matching names with other shapes"
                + (f", e.g. {mismatch[:3]}" if mismatch else "")
                + "). Expected VMamba v0 / VM-UNet keys such as 'patch_embed.proj.weight' and "
                "'layers.0.blocks.0.self_attention.in_proj.weight' with widths dims="
                f"{self.dims}."
            )
        with torch.no_grad():
            for key, value in new_state.items():
                own[key].copy_(value.to(dtype=own[key].dtype))
        report = {
            "loaded": sorted(loaded),
            "shape_mismatch": mismatch,
            "unused": sorted(k for k in given if k not in used),
            "not_loaded": sorted(k for k in own if k not in new_state),
        }
        if mismatch:
            logger.warning(
                "PolypMamba: %d checkpoint tensors skipped for their shape, e.g. %s", len(mismatch), mismatch[:3]
            )
        logger.info(
            "PolypMamba: loaded %d tensors from %s (%d skipped for shape, %d unused checkpoint keys, %d model tensors "
            "left at their initialisation).",
            len(report["loaded"]), source, len(mismatch), len(report["unused"]), len(report["not_loaded"]),
        )
        return report

    @staticmethod
    def _translate_vmamba_keys(given: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
        """checkpoint key -> (model key, tensor). The module names already follow VM-UNet's ``VSSM`` (``patch_embed``,
        ``layers.{i}.blocks.{j}.{ln_1,self_attention}``, ``layers.{i}.downsample``, ``layers_up``, ``final_up``,
        ``final_conv``); only DataParallel's ``module.`` and VM-UNet's wrapper prefix ``vmunet.`` are stripped."""
        out = {}
        for key, value in given.items():
            k = key
            for prefix in ("module.", "vmunet."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
            out[key] = (k, value)
        return out
