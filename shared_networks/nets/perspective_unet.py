"""Perspective+ Unet (Hu, Chen, Pan, Zeng, Yang, MICCAI 2024, arXiv 2406.14052), 2D and 3D.

Official code: github.com/tljxyys/Perspective-Unet (``networks/perspective_unet.py``, ``PUnet``), a 2D slice network
trained on 224x224 slices. With the defaults, :class:`PerspectiveUNet` has exactly the official parameters
(112,659,849 for 9 classes) and can load official checkpoints through
``shared_networks.convert.from_official("perspective_unet", ...)``.

Data flow (2D defaults, input (B, 1, 224, 224), K classes)::

    x -> repeated to 3 channels (gray_to_rgb)
    f0..f4 = 5 BPRBs, MaxPool 2 between them         (64@224, 128@112, 256@56, 512@28, 1024@14)
    t2 = 2 x ENLTB(f2)
    t3 = 2 x ENLTB(conv1x1([f3, PM(t2)]))            PM = 2x2 stride-2 conv -> BN -> ReLU
    t4 = 2 x ENLTB(conv1x1([f4, PM(t3)]))
    s2, s3, s4 = SCSI(t2, t3, t4)                      one transformer over all 56^2+28^2+14^2 = 4116 tokens
    g_i = conv1x1([s_i, f_i])                          i = 2, 3, 4
    decoder: 2 x ConvBNReLU at 14^2, then bilinear x2 (align_corners) + skip (g3, g2, f1, none) + 2 x ConvBNReLU
    head: 3x3 conv 64 -> K                              (B, K, 224, 224)

Two deliberate differences from the official code (see ``perspective_plus_unet.md`` §2.5, §3):

- SCSI attends over the tokens of each image, as the paper describes. The official ``nn.MultiheadAttention`` is fed
  batch-first tensors without ``batch_first=True``, so it attends across the images of a batch at each token
  position (issue #8) and a prediction depends on the other images in the batch. That is not reproduced.
  ``scsi_attention="self"`` gives what the official model computes for one image per forward (each token attends
  only to itself), for parity with the official checkpoints' published test results; it never mixes images either.
- Stage resolutions and SCSI split sizes come from the input, so the network runs at any size divisible by 16.
  ``img_size`` (224 by default, as trained officially) is checked exactly unless set to ``None``.

3D (``spatial_dims=3``) is the natural extension (3x3x3 convs, 2x2x2 merges and pools, trilinear upsampling,
voxels as tokens); the official model is 2D only, so there are no reference numbers for it. With the official widths
it has about 2x the 2D parameters; ``channels`` / ``scsi_*`` make it smaller (see the class docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from monai.utils import ensure_tuple_rep
from torch import nn

from ..blocks.perspective import BiPathResBlock, CrossScaleIntegrator, ENLTransformerBlock
from ..utils import check_input

__all__ = ["PerspectiveUNet"]


def _conv_bn_relu(spatial_dims: int, cin: int, cout: int, kernel_size: int = 3, stride: int = 1) -> Convolution:
    return Convolution(
        spatial_dims, cin, cout, strides=stride, kernel_size=kernel_size, act="RELU", norm="BATCH", bias=False,
        padding=(kernel_size - 1) // 2 if stride == 1 else 0,
    )


class _DecoderBlock(nn.Module):
    def __init__(self, spatial_dims: int, cin: int, cout: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.conv1 = _conv_bn_relu(spatial_dims, cin, cout)
        self.conv2 = _conv_bn_relu(spatial_dims, cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=True)
        if skip is not None:
            x = torch.cat((x, skip), dim=1)
        return self.conv2(self.conv1(x))


class _ENLTStages(nn.Module):
    """The three ENLTB stages on levels 2-4, each fed by [CNN feature, patch-merged previous stage output]."""

    def __init__(self, spatial_dims: int, channels: Sequence[int], depths: Sequence[int], **block_kwargs) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(*(ENLTransformerBlock(c, **block_kwargs) for _ in range(d))) for c, d in zip(channels, depths)
        )
        self.merges = nn.ModuleList(
            _conv_bn_relu(spatial_dims, channels[i], channels[i + 1], kernel_size=2, stride=2)
            for i in range(len(channels) - 1)
        )
        conv = Conv[Conv.CONV, spatial_dims]
        self.adjusters = nn.ModuleList(conv(2 * c, c, 1) for c in channels[1:])

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [self.stages[0](feats[0])]
        for i in range(1, len(self.stages)):
            x = self.adjusters[i - 1](torch.cat((feats[i], self.merges[i - 1](out[-1])), dim=1))
            out.append(self.stages[i](x))
        return out


class PerspectiveUNet(nn.Module):
    """Perspective+ Unet: BPRB encoder, ENLTB stages and SCSI on the three deepest levels, U-Net decoder.

    Args:
        spatial_dims: 2 (official) or 3.
        in_channels: input channels. With 1 channel and ``gray_to_rgb`` the input is repeated to 3 channels like the
            official model, which keeps the official parameter count and checkpoint layout.
        out_channels: classes K (logits, no activation). Synapse 9, ACDC 4.
        img_size: expected spatial size (int or per axis); inputs of another size are refused with a clear error.
            ``None`` accepts any size divisible by 16 (no weight depends on the size; SCSI cost grows with the
            square of the token count).
        channels: widths of the five encoder levels (official 64, 128, 256, 512, 1024).
        dilation: dilation of the BPRB's second path.
        enltb_depths: ENLTB blocks on levels 2, 3, 4.
        enltb_heads, enltb_nb_features, qk_scale, redraw_interval: ENLA settings (official: 1 head, m = C, no
            scale, never redrawn); see :class:`~shared_networks.blocks.RandomFeatureAttention`.
        mlp_ratio: ENLTB MLP ratio.
        scsi_hidden_size, scsi_heads, scsi_layers, scsi_mlp_dim: SCSI transformer (official 256, 8, 6, 2048).
        scsi_attention: ``"tokens"`` (paper, default) or ``"self"`` (official-checkpoint parity), see the module
            docstring.
        dropout: dropout in ENLTB MLPs and in SCSI. attn_dropout: ENLA output dropout. drop_path: ENLTB stochastic
            depth. (official 0.1 each)
        use_enltb, use_scsi, use_dilated_path: the paper's ablation switches (``use_enltb=False`` feeds the CNN
            features straight to SCSI; ``use_scsi=False`` skips it; ``use_dilated_path=False`` fuses the plain path
            with itself).
        gray_to_rgb: repeat a 1-channel input to 3 channels before the first block. ``None`` = True for 2D with one
            input channel (official layout), False otherwise.
        use_checkpoint: recompute the SCSI layers in the backward pass instead of storing them. Their token attention
            (4116 tokens per 224x224 slice, with dropout) runs on PyTorch's math kernel on CPU, which keeps the
            8 x 4116^2 attention weights of every layer for the backward pass: about 11 GB per slice without this.

    Shapes: (B, in_channels, *img_size) -> (B, out_channels, *img_size).

    Parameters: 112,659,849 (2D, defaults, K=9) / 112,656,964 (K=4), plus 2,779,557 buffer elements (the ENLA random
    matrices 2,752,512, the rest BatchNorm statistics). Compute per 224x224 slice (FlopCounterMode, 2 per MAC):
    317.4 GFLOPs with the paper's SCSI (104 G of it token attention), 206.8 G with ``scsi_attention="self"``. For 3D
    volumes run the 2D network slice by slice (e.g. ``monai.inferers.SliceInferer`` with ``roi_size=(224, 224)``). A lighter 3D configuration, e.g.
    ``PerspectiveUNet(3, 1, 14, img_size=(96, 96, 96), channels=(32, 64, 128, 256, 512), scsi_hidden_size=128,
    scsi_mlp_dim=512)`` has 58,721,134 parameters; its SCSI runs over 24^3 + 12^3 + 6^3 = 15,768 tokens.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 9,
        img_size: int | Sequence[int] | None = 224,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        dilation: int = 2,
        enltb_depths: Sequence[int] = (2, 2, 2),
        enltb_heads: int = 1,
        enltb_nb_features: int | None = None,
        mlp_ratio: float = 4.0,
        qk_scale: float | None = None,
        redraw_interval: int | None = None,
        scsi_hidden_size: int = 256,
        scsi_heads: int = 8,
        scsi_layers: int = 6,
        scsi_mlp_dim: int = 2048,
        scsi_attention: str = "tokens",
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        drop_path: float = 0.1,
        use_enltb: bool = True,
        use_scsi: bool = True,
        use_dilated_path: bool = True,
        gray_to_rgb: bool | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(channels) != 5:
            raise ValueError(f"channels must list the widths of the 5 encoder levels, got {tuple(channels)}.")
        if len(enltb_depths) != 3:
            raise ValueError(f"enltb_depths must give the ENLTB depth of levels 2, 3 and 4, got {tuple(enltb_depths)}.")
        if scsi_attention not in ("tokens", "self"):
            raise ValueError(
                f"scsi_attention must be 'tokens' (the paper's SCSI) or 'self' (official-checkpoint parity), "
                f"got {scsi_attention!r}."
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = None if img_size is None else tuple(int(s) for s in ensure_tuple_rep(img_size, spatial_dims))
        if self.img_size is not None and any(s % 16 for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be divisible by 16 per axis (four 2x poolings).")
        self.gray_to_rgb = (spatial_dims == 2 and in_channels == 1) if gray_to_rgb is None else bool(gray_to_rgb)
        if self.gray_to_rgb and in_channels != 1:
            raise ValueError(f"gray_to_rgb repeats a 1-channel input; in_channels is {in_channels}.")
        ch = tuple(int(c) for c in channels)
        self.channels = ch

        # CNN encoder (levels 0..4)
        cin = 3 if self.gray_to_rgb else in_channels
        self.encoder = nn.ModuleList(
            BiPathResBlock(spatial_dims, c_prev, c, dilation=dilation, use_dilated_path=use_dilated_path)
            for c_prev, c in zip((cin,) + ch[:-1], ch)
        )
        self.pool = Pool[Pool.MAX, spatial_dims](2)

        # ENLTB stages, SCSI and fusers on levels 2..4
        deep = ch[2:]
        self.enltb = (
            _ENLTStages(
                spatial_dims, deep, enltb_depths, num_heads=enltb_heads, mlp_ratio=mlp_ratio, qk_scale=qk_scale,
                nb_features=enltb_nb_features, drop=dropout, attn_drop=attn_dropout, drop_path=drop_path,
                redraw_interval=redraw_interval,
            )
            if use_enltb
            else None
        )
        self.scsi = (
            CrossScaleIntegrator(
                spatial_dims, deep, hidden_size=scsi_hidden_size, num_heads=scsi_heads, num_layers=scsi_layers,
                mlp_dim=scsi_mlp_dim, dropout=dropout, attention=scsi_attention,
            )
            if use_scsi
            else None
        )
        if self.scsi is not None:
            self.scsi.use_checkpoint = bool(use_checkpoint)
        conv = Conv[Conv.CONV, spatial_dims]
        self.fuser = nn.ModuleList(conv(2 * c, c, 1) for c in deep)

        # decoder: widths c3, c2, c1, c0, c0; skips g3, g2, f1, none
        self.decoder = nn.ModuleList(
            [
                _DecoderBlock(spatial_dims, ch[4], ch[3], upsample=False),
                _DecoderBlock(spatial_dims, 2 * ch[3], ch[2], upsample=True),
                _DecoderBlock(spatial_dims, 2 * ch[2], ch[1], upsample=True),
                _DecoderBlock(spatial_dims, 2 * ch[1], ch[0], upsample=True),
                _DecoderBlock(spatial_dims, ch[0], ch[0], upsample=True),
            ]
        )
        self.head = conv(ch[0], out_channels, 3, padding=1)

    @property
    def constructor_args(self) -> dict:
        """Arguments that rebuild this network (e.g. for a bundle's network definition)."""
        args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self._args.items()}
        return {**args, "scsi_attention": self.scsi_attention}

    @property
    def scsi_attention(self) -> str:
        return self.scsi.attention if self.scsi is not None else "tokens"

    @scsi_attention.setter
    def scsi_attention(self, mode: str) -> None:
        if self.scsi is not None:
            self.scsi.attention = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, *img_size) -> logits (B, out_channels, *img_size)."""
        check_input(
            x, name="PerspectiveUNet", in_channels=self.in_channels, spatial_dims=self.spatial_dims,
            divisible_by=16, exact_size=self.img_size, check_finite=not x.is_meta,
        )
        if self.gray_to_rgb:
            x = x.expand(-1, 3, *x.shape[2:])
        feats = []
        for i, block in enumerate(self.encoder):
            x = block(self.pool(x) if i else x)
            feats.append(x)
        deep = feats[2:]
        t = self.enltb(deep) if self.enltb is not None else deep
        if self.scsi is not None:
            t = self.scsi(t)
        g = [f(torch.cat((s, c), dim=1)) for f, s, c in zip(self.fuser, t, deep)]

        y = self.decoder[0](g[2])
        for block, skip in zip(self.decoder[1:], (g[1], g[0], feats[1], None)):
            y = block(y, skip)
        return self.head(y)
