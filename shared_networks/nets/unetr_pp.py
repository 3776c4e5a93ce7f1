"""UNETR++ (Shaker et al., IEEE TMI 2024, arXiv 2212.04497): a 3D U-shaped network whose encoder and decoder stages
are efficient-paired-attention (EPA) blocks.

Data flow (Synapse variant, official (z, y, x) ROI 64 x 128 x 128, K classes)::

    x (B, 1, 64, 128, 128) --encoder1 (ResBlock 1->16, full res)--------------------------------------+ add
      stem conv k=s=(2,4,4) + GN -> (B, 32, 32^3) -> 3 EPA blocks = e1 ---------------------+ add      |
      conv k=s=2 + GN           -> (B, 64, 16^3) -> 3 EPA blocks = e2 ----------+ add       |          |
      conv k=s=2 + GN           -> (B,128, 8^3)  -> 3 EPA blocks = e3 -+ add     |           |          |
      conv k=s=2 + GN           -> (B,256, 4^3)  -> 3 EPA blocks = e4  |         |           |          |
    decoder5: up 256->128 (8^3)  + e3 -> 3 EPA blocks = d3 ------------+         |           |          |
    decoder4: up 128->64  (16^3) + e2 -> 3 EPA blocks = d2 ----------------------+           |          |
    decoder3: up 64->32   (32^3) + e1 -> 3 EPA blocks = d1 ----------------------------------+          |
    decoder2: up 32->16 k=s=(2,4,4) (64x128x128) + encoder1 -> ResBlock -> out1 (1x1x1 conv 16->K) -----+
    deep supervision heads: out2 on d1 (32->K), out3 on d2 (64->K)

Every EPA block owns a positional embedding (1, N, C) and token projections N -> p, so the network is tied to the
ROI it is built for (``img_size``); run it with a sliding-window inferer whose roi_size equals ``img_size``.

Module and parameter names mirror the official code (Amshaker/unetr_plus_plus @ dcba1c6), so
``UNETRPP(..., axis_order="zyx")`` loads official state dicts with a plain ``load_state_dict`` (see
:mod:`shared_networks.convert.unetr_pp`, which also builds the MONAI (x, y, z) layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, get_conv_layer
from torch import nn

from ..blocks.epa import EPABlock
from ..utils import check_input

__all__ = ["UNETRPP", "VARIANTS"]

#: Official per-dataset variants. Kernels and ROIs are in the official nnU-Net (z, y, x) order.
VARIANTS: dict[str, dict] = {
    "synapse": dict(
        stem=(2, 4, 4), img_size=(64, 128, 128), ef_mode="shared", fusion="concat", num_conv_blocks=1, attn_drop=0.15
    ),
    "acdc": dict(
        stem=(1, 4, 4), img_size=(16, 160, 160), ef_mode="separate", fusion="concat", num_conv_blocks=2, attn_drop=0.1
    ),
    "tumor": dict(
        stem=(4, 4, 4), img_size=(128, 128, 128), ef_mode="shared_matrix", fusion="sum", num_conv_blocks=1,
        attn_drop=0.1,
    ),
    "lung": dict(
        stem=(1, 4, 4), img_size=(32, 192, 192), ef_mode="separate", fusion="concat", num_conv_blocks=2, attn_drop=0.1
    ),
}
_DEFAULT_PROJ = (64, 64, 64, 32)  # per stage; the decoder stages reuse the value of the stage they work at


def _init_encoder(m: nn.Module) -> None:
    # Official: only the encoder applies this hook (decoder layers and all convs keep PyTorch defaults).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class _Encoder(nn.Module):
    """Stem + 3 downsamplers (conv k=s, GroupNorm, no activation) and 4 stages of EPA blocks."""

    def __init__(self, in_channels, dims, depths, stem, token_counts, proj_size, attn_drop, block_kwargs):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        # Official stem GroupNorm has num_groups = in_channels (1 -> one group over C x D x H x W); gcd keeps that
        # for every official config and still builds for channel counts that do not divide dims[0].
        self.downsample_layers.append(
            nn.Sequential(
                get_conv_layer(3, in_channels, dims[0], kernel_size=stem, stride=stem, conv_only=True),
                nn.GroupNorm(math.gcd(in_channels, dims[0]), dims[0]),
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    get_conv_layer(3, dims[i], dims[i + 1], kernel_size=2, stride=2, conv_only=True),
                    nn.GroupNorm(dims[i], dims[i + 1]),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    EPABlock(token_counts[i], dims[i], proj_size[i], dropout_rate=attn_drop, **block_kwargs)
                    for _ in range(depths[i])
                )
            )
            for i in range(4)
        )
        self.apply(_init_encoder)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            hidden.append(x)
        return hidden


class _UpBlock(nn.Module):
    """Transposed conv (k = s), add the skip, then EPA blocks or (last stage) one residual conv block."""

    def __init__(self, in_channels, out_channels, up_kernel, *, out_size=0, proj_size=64, depth=3, attn_drop=0.0,
                 conv_decoder=False, block_kwargs=None):
        super().__init__()
        self.transp_conv = get_conv_layer(
            3, in_channels, out_channels, kernel_size=up_kernel, stride=up_kernel, conv_only=True, is_transposed=True
        )
        self.decoder_block = nn.ModuleList()
        if conv_decoder:  # the full-resolution stage is convolutional (paper supplement)
            self.decoder_block.append(UnetResBlock(3, out_channels, out_channels, 3, 1, norm_name="instance"))
        else:
            self.decoder_block.append(
                nn.Sequential(
                    *(
                        EPABlock(out_size, out_channels, proj_size, dropout_rate=attn_drop, **block_kwargs)
                        for _ in range(depth)
                    )
                )
            )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.decoder_block[0](self.transp_conv(x) + skip)


class UNETRPP(nn.Module):
    """UNETR++ for 3D segmentation, tied to one ROI size.

    Args:
        in_channels: input channels.
        out_channels: classes K (incl. background).
        img_size: the ROI the network is built for, in ``axis_order``. Default: the variant's official ROI
            (Synapse (128, 128, 64) in x, y, z). Must be divisible per axis by stem stride x 8.
        variant: "synapse", "acdc", "tumor" or "lung" — the official per-dataset differences: stem kernel
            (2,4,4) / (1,4,4) / (4,4,4) / (1,4,4) in (z, y, x); E/F token projections shared Linear / separate /
            shared bias-free matrix / separate; branch fusion concat / concat / sum / concat; one or two residual
            conv blocks per EPA block (two for acdc and lung); attention dropout 0.15 / 0.1 / 0.1 / 0.1.
        feature_size: channels of the full-resolution stages; the stages have feature_size x (2, 4, 8, 16).
        hidden_size: channels of the deepest stage; must equal dims[3] (kept for the official signature).
        num_heads: EPA heads.
        depths: EPA blocks per encoder stage (the decoder stages have 3 each, as in the official code).
        dims: channels per stage; must be feature_size x (2, 4, 8, 16) because skips are added. Default derived.
        proj_size: EPA projection size p per stage (int or 4 values); default (64, 64, 64, 32). Decoder stages use
            the value of the stage whose resolution they work at (official: 64, 64, 64).
        attn_drop: EPA attention dropout; default the variant's.
        deep_supervision: also build the heads out2 (on the decoder3 output, stage-1 grid) and out3 (on the
            decoder4 output, stage-2 grid). In training mode forward then returns [out1, out2, out3]; in eval mode
            it always returns out1 alone, so MONAI inferers get a tensor.
        axis_order: "xyz" (MONAI LoadImage order; anisotropic kernels are mirrored, e.g. stem (4, 4, 2)) or "zyx"
            (the official nnU-Net layout, exactly the official module). Tokens are enumerated in (z, y, x)-raster
            order in both cases, so state dicts differ between the two only by the conv-kernel axis order.
        official_xsa_layout: reproduce the official spatial-branch layout quirk (repo issue #62); needed for
            official weights. See :class:`~shared_networks.blocks.epa.EPA`.

    Shapes (Synapse, xyz, img_size (128, 128, 64), stem (4, 4, 2)): input (B, in_channels, 128, 128, 64) ->
    out1 (B, K, 128, 128, 64); deep supervision out2 (B, K, 32, 32, 32) (stage-1 grid), out3 (B, K, 16, 16, 16)
    (stage-2 grid). Stage grids are img_size / (stem * 2^(s-1)).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        img_size: Sequence[int] | None = None,
        variant: str = "synapse",
        feature_size: int = 16,
        hidden_size: int | None = None,
        num_heads: int = 4,
        depths: Sequence[int] = (3, 3, 3, 3),
        dims: Sequence[int] | None = None,
        proj_size: int | Sequence[int] | None = None,
        attn_drop: float | None = None,
        deep_supervision: bool = False,
        axis_order: str = "xyz",
        official_xsa_layout: bool = True,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"UNETRPP: variant must be one of {tuple(VARIANTS)}, got {variant!r}.")
        if axis_order not in ("xyz", "zyx"):
            raise ValueError(f"UNETRPP: axis_order must be 'xyz' (MONAI) or 'zyx' (official), got {axis_order!r}.")
        cfg = VARIANTS[variant]
        mirror = (lambda s: tuple(s)[::-1]) if axis_order == "xyz" else tuple
        stem = mirror(cfg["stem"])
        img_size = mirror(cfg["img_size"]) if img_size is None else tuple(int(s) for s in img_size)
        if len(img_size) != 3:
            raise ValueError(f"UNETRPP: img_size must have 3 values, got {img_size}.")
        need = tuple(s * 8 for s in stem)
        if any(s <= 0 or s % n for s, n in zip(img_size, need)):
            raise ValueError(
                f"UNETRPP ({variant}, axis_order={axis_order!r}): img_size {img_size} must be divisible by {need} "
                f"per axis (stem stride {stem} x 8 for the three downsamplings)."
            )
        expect_dims = tuple(feature_size * m for m in (2, 4, 8, 16))
        dims = expect_dims if dims is None else tuple(int(d) for d in dims)
        if dims != expect_dims:
            raise ValueError(
                f"UNETRPP: dims {dims} must be feature_size x (2, 4, 8, 16) = {expect_dims}, because decoder outputs "
                "are added to the encoder skips of the same width."
            )
        hidden_size = dims[3] if hidden_size is None else int(hidden_size)
        if hidden_size != dims[3]:
            raise ValueError(f"UNETRPP: hidden_size ({hidden_size}) must equal dims[3] ({dims[3]}).")
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"UNETRPP: depths must be 4 positive integers, got {depths}.")
        if proj_size is None:
            proj_size = _DEFAULT_PROJ
        proj_size = (int(proj_size),) * 4 if isinstance(proj_size, int) else tuple(int(p) for p in proj_size)
        if len(proj_size) != 4:
            raise ValueError(f"UNETRPP: proj_size must be an int or 4 values, got {proj_size}.")
        attn_drop = cfg["attn_drop"] if attn_drop is None else float(attn_drop)

        # Constructor arguments, resolved (read back by the conversion CLI / bundle configs).
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.img_size = img_size
        self.variant = variant
        self.feature_size = int(feature_size)
        self.hidden_size = hidden_size
        self.num_heads = int(num_heads)
        self.depths = depths
        self.dims = dims
        self.proj_size = proj_size
        self.attn_drop = attn_drop
        self.deep_supervision = bool(deep_supervision)
        self.axis_order = axis_order
        self.official_xsa_layout = bool(official_xsa_layout)

        self.stem_kernel = stem
        self.stage_grids = tuple(tuple(s // (k * 2**i) for s, k in zip(img_size, stem)) for i in range(4))
        tokens = tuple(math.prod(g) for g in self.stage_grids)
        block_kwargs = dict(
            num_heads=num_heads,
            spatial_dims=3,
            num_conv_blocks=cfg["num_conv_blocks"],
            ef_mode=cfg["ef_mode"],
            fusion=cfg["fusion"],
            official_xsa_layout=official_xsa_layout,
            # (x, y, z) arrays: enumerate tokens z-slowest like the official (z, y, x) model (see EPABlock).
            reverse_token_order=axis_order == "xyz",
        )

        # Names below are the official ones (state-dict compatibility).
        self.unetr_pp_encoder = _Encoder(in_channels, dims, depths, stem, tokens, proj_size, attn_drop, block_kwargs)
        self.encoder1 = UnetResBlock(3, in_channels, feature_size, kernel_size=3, stride=1, norm_name="instance")
        up = dict(attn_drop=attn_drop, block_kwargs=block_kwargs)
        self.decoder5 = _UpBlock(dims[3], dims[2], 2, out_size=tokens[2], proj_size=proj_size[2], **up)
        self.decoder4 = _UpBlock(dims[2], dims[1], 2, out_size=tokens[1], proj_size=proj_size[1], **up)
        self.decoder3 = _UpBlock(dims[1], dims[0], 2, out_size=tokens[0], proj_size=proj_size[0], **up)
        self.decoder2 = _UpBlock(dims[0], feature_size, stem, conv_decoder=True)
        self.out1 = UnetOutBlock(3, feature_size, out_channels)
        if self.deep_supervision:
            self.out2 = UnetOutBlock(3, dims[0], out_channels)
            self.out3 = UnetOutBlock(3, dims[1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, in_channels, *img_size) -> logits (B, out_channels, *img_size); with deep supervision in training
        mode a list [full resolution, stage-1 grid, stage-2 grid]."""
        check_input(x, name="UNETRPP", in_channels=self.in_channels, spatial_dims=3, exact_size=self.img_size)
        e1, e2, e3, e4 = self.unetr_pp_encoder(x)
        conv_skip = self.encoder1(x)
        d3 = self.decoder5(e4, e3)
        d2 = self.decoder4(d3, e2)
        d1 = self.decoder3(d2, e1)
        logits = self.out1(self.decoder2(d1, conv_skip))
        if self.deep_supervision and self.training:
            return [logits, self.out2(d1), self.out3(d2)]
        return logits
