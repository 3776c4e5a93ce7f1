"""Building blocks of Perspective+ Unet (Hu et al., MICCAI 2024), for 2D or 3D feature maps.

- :class:`BiPathResBlock` (BPRB): a plain and a dilated residual path, fused by a 1x1 conv.
- :class:`ENLTransformerBlock` (ENLTB): pre-norm transformer block whose token mixer is the random-feature
  non-local attention :class:`~shared_networks.blocks.nonlocal_attention.RandomFeatureAttention` (ENLA).
- :class:`CrossScaleIntegrator` (SCSI): a transformer over the tokens of several scales at once.

All take and return (B, C, *spatial) maps; ``spatial_dims`` picks 2D or 3D layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from .nonlocal_attention import RandomFeatureAttention
from ..utils import maybe_checkpoint

__all__ = [
    "ResidualUnit",
    "BiPathResBlock",
    "ENLTransformerBlock",
    "CrossScaleIntegrator",
    "PostNormEncoderLayer",
    "BPRB",
    "ENLTB",
    "SCSI",
]


class ResidualUnit(nn.Module):
    """conv3 -> BN -> ReLU -> conv3 -> BN, plus identity, then ReLU; ``dilation`` in both convs (padding keeps size)."""

    def __init__(self, spatial_dims: int, channels: int, dilation: int = 1) -> None:
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        self.conv1 = conv(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm1 = norm(channels)
        self.conv2 = conv(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm2 = norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + x)


class _Path(nn.Module):
    # 1x1 projection (with bias) to the block width, then a residual unit.
    def __init__(self, spatial_dims: int, in_channels: int, channels: int, dilation: int) -> None:
        super().__init__()
        self.proj = Conv[Conv.CONV, spatial_dims](in_channels, channels, 1)
        self.res = ResidualUnit(spatial_dims, channels, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.proj(x))


class BiPathResBlock(nn.Module):
    """Bi-Path Residual Block: (B, in, *S) -> (B, out, *S), no stride.

    Path A: 1x1 conv -> residual unit (3x3 convs). Path B: 1x1 conv -> residual unit with dilated 3x3 convs
    (``dilation``). Fusion: concat [A, B] -> 1x1 conv -> BN -> ReLU. Params (2D, in -> C):
    2(in C + C) + 2(18 C^2 + 4 C) + 2 C^2 + C + 2 C.

    ``use_dilated_path=False`` is the paper's ablation: the dilated path keeps its weights but path A is fused with
    itself.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, dilation: int = 2, use_dilated_path: bool = True
    ) -> None:
        super().__init__()
        self.use_dilated_path = use_dilated_path
        self.plain = _Path(spatial_dims, in_channels, out_channels, 1)
        self.dilated = _Path(spatial_dims, in_channels, out_channels, dilation)
        self.fuse = Conv[Conv.CONV, spatial_dims](2 * out_channels, out_channels, 1)
        self.fuse_norm = Norm[Norm.BATCH, spatial_dims](out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.plain(x)
        b = self.dilated(x) if self.use_dilated_path else a
        return F.relu(self.fuse_norm(self.fuse(torch.cat((a, b), dim=1))))


class ENLTransformerBlock(nn.Module):
    """Efficient Non-Local Transformer Block: (B, C, *S) -> (B, C, *S), any spatial size and dimension.

    On the N = prod(S) tokens: t = t + DropPath(ENLA(LN(t))); t = t + DropPath(MLP(LN(t))), with ENLA the
    :class:`RandomFeatureAttention` (no output projection by default, as in the official model) and MLP
    Linear(C, r C) -> GELU -> Dropout -> Linear(r C, C) -> Dropout. Params 11 C^2 + 12 C for r = 4.

    Args:
        dim: channels C.
        num_heads, nb_features, qk_scale, redraw_interval: passed to :class:`RandomFeatureAttention` (defaults =
            official ENLA: one head, m = C, unit-norm q/k, never redrawn).
        mlp_ratio: MLP hidden width / C.
        drop: dropout in the MLP. attn_drop: dropout on the attention output. drop_path: stochastic depth.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        nb_features: int | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        redraw_interval: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RandomFeatureAttention(
            dim, num_heads=num_heads, nb_features=nb_features, qkv_bias=qkv_bias, qk_scale=qk_scale,
            attn_drop=attn_drop, redraw_interval=redraw_interval,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=drop, act="GELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C), row-major token order
        t = t + self.drop_path(self.attn(self.norm1(t)))
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(shape)


class PostNormEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer on (B, N, d) tokens (the SCSI layer).

    x = LN(x + Drop(MHA(x))); x = LN(x + Drop(W2 Drop(ReLU(W1 x)))). Parameter names follow
    ``torch.nn.TransformerEncoderLayer``.

    ``attention="tokens"``: every token attends to all N tokens of its own image (the paper's SCSI).
    ``attention="self"``: every token attends only to itself, i.e. MHA(x) = out_proj(v_proj(x)) (with the attention
    dropout acting per token and head). This is what the official PUnet computes for a single image per forward,
    because its ``nn.MultiheadAttention`` treats the batch axis as the sequence (official issue #8); use it only to
    reproduce the official checkpoints' test-time outputs. Neither mode ever mixes different images of a batch.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, attention: str = "tokens"):
        super().__init__()
        if attention not in ("tokens", "self"):
            raise ValueError(f"attention must be 'tokens' (the paper's SCSI) or 'self' (official parity), "
                             f"got {attention!r}.")
        self.attention = attention
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _self_only(self, x: torch.Tensor) -> torch.Tensor:
        mha = self.self_attn
        e = mha.embed_dim
        bias = mha.in_proj_bias[2 * e:] if mha.in_proj_bias is not None else None
        v = F.linear(x, mha.in_proj_weight[2 * e:], bias)
        if self.training and mha.dropout > 0:
            # the single attention weight (=1) of each token and head is dropped out
            b, n, _ = x.shape
            keep = F.dropout(x.new_ones(b, n, mha.num_heads, 1), mha.dropout, training=True)
            v = (v.view(b, n, mha.num_heads, e // mha.num_heads) * keep).view(b, n, e)
        return mha.out_proj(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention == "tokens":
            a = self.self_attn(x, x, x, need_weights=False)[0]
        else:
            a = self._self_only(x)
        x = self.norm1(x + self.dropout1(a))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x


class CrossScaleIntegrator(nn.Module):
    """Spatial Cross-Scale Integrator: one transformer over the tokens of several feature maps of one image.

    Each input (B, C_i, *S_i) is projected by a 1x1 conv to ``hidden_size`` and flattened row-major; the token sets
    are concatenated (sum_i prod(S_i) tokens, no positional encoding, as in the official model), passed through
    ``num_layers`` post-norm encoder layers and a final LayerNorm, split back and re-projected by 1x1 convs to C_i.
    Outputs have the input shapes. Sizes are taken from the inputs, so any spatial sizes work.

    Args:
        spatial_dims: 2 or 3.
        in_channels: C_i of the inputs, in the order they are passed.
        hidden_size, num_heads, num_layers, mlp_dim, dropout: transformer settings (official 256, 8, 6, 2048, 0.1).
        attention: ``"tokens"`` (default, the paper) or ``"self"`` (official-checkpoint parity), see
            :class:`PostNormEncoderLayer`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        hidden_size: int = 256,
        num_heads: int = 8,
        num_layers: int = 6,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
        attention: str = "tokens",
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.in_channels = tuple(in_channels)
        self.proj = nn.ModuleList(conv(c, hidden_size, 1) for c in self.in_channels)
        self.layers = nn.ModuleList(
            PostNormEncoderLayer(hidden_size, num_heads, mlp_dim, dropout, attention) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.reproj = nn.ModuleList(conv(hidden_size, c, 1) for c in self.in_channels)
        self.use_checkpoint = False  # recompute each layer in the backward pass (saves the N x N attention)

    @property
    def attention(self) -> str:
        return self.layers[0].attention if len(self.layers) else "tokens"

    @attention.setter
    def attention(self, mode: str) -> None:
        if mode not in ("tokens", "self"):
            raise ValueError(f"attention must be 'tokens' or 'self', got {mode!r}.")
        for layer in self.layers:
            layer.attention = mode

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.proj):
            raise ValueError(f"CrossScaleIntegrator expects {len(self.proj)} feature maps, got {len(feats)}.")
        shapes = [f.shape[2:] for f in feats]
        tokens = torch.cat([p(f).flatten(2).transpose(1, 2) for p, f in zip(self.proj, feats)], dim=1)
        for layer in self.layers:
            tokens = maybe_checkpoint(layer, tokens, self.use_checkpoint)
        tokens = self.norm(tokens)
        parts = torch.split(tokens, [s.numel() for s in shapes], dim=1)
        return [
            r(t.transpose(1, 2).reshape(t.shape[0], -1, *s)) for r, t, s in zip(self.reproj, parts, shapes)
        ]


BPRB = BiPathResBlock
ENLTB = ENLTransformerBlock
SCSI = CrossScaleIntegrator
