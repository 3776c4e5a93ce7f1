"""Efficient paired attention (EPA) and the UNETR++ transformer block.

Shaker et al., "UNETR++: Delving into Efficient and Accurate 3D Medical Image Segmentation", IEEE TMI 2024
(arXiv 2212.04497). Written from the paper and the spec of the official code (Amshaker/unetr_plus_plus @ dcba1c6);
parameter names mirror the official ones so that official checkpoints load by name.

``EPA`` maps tokens (B, N, C) -> (B, N, C) with two branches that share query and key:

- spatial branch: keys and spatial values are projected along the *token* axis N -> p (matrices E and F), so the
  attention is (N x p) instead of (N x N): linear in N, but E and F hold N * p weights each, which ties the layer to
  one token count N;
- channel branch: cross-covariance attention (XCiT) between the d = C / heads channels of each head.

``EPABlock`` wraps EPA like the official ``TransformerBlock``: a learned positional embedding (1, N, C), pre-norm
EPA with a layer-scale ``gamma`` (init 1e-6), then one or two residual conv blocks and a Dropout + 1x1 conv, with
an outer residual. It works on 2D or 3D feature maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import nn

__all__ = ["EPA", "EPABlock", "EF_MODES", "FUSIONS"]

#: How E and F (the token-axis projections of the spatial branch) are parameterised, per official variant.
EF_MODES = (
    "shared",  # one nn.Linear(N, p) with bias used as both E and F (Synapse); state dict lists E.* and F.*
    "separate",  # two nn.Linear(N, p) (ACDC, Lung)
    "shared_matrix",  # one N x p matrix "EF" without bias, uniform(+-1/sqrt(p)) init (BraTS "tumor")
)
#: How the two branch outputs are fused.
FUSIONS = (
    "concat",  # [Linear(C, C/2)(spatial), Linear(C, C/2)(channel)] (Synapse, ACDC, Lung)
    "sum",  # spatial + channel, no output linears (tumor)
)


class EPA(nn.Module):
    """Efficient paired attention.

    Args:
        input_size: number of tokens N the layer is built for (E and F are N -> p maps).
        hidden_size: channels C; must be divisible by ``num_heads``.
        proj_size: p, the width the N tokens are compressed to in the spatial branch.
        num_heads: attention heads h (d = C / h channels per head).
        qkv_bias: bias of the shared C -> 4C query/key/value/value projection (official: False).
        channel_attn_drop: dropout on the (d x d) channel attention.
        spatial_attn_drop: dropout on the (N x p) spatial attention.
        ef_mode: one of :data:`EF_MODES`.
        fusion: one of :data:`FUSIONS`.
        official_xsa_layout: reproduce the official code's way of turning the spatial-branch output (B, h, N, d) into
            (B, N, C): it permutes to (B, d, h, N) and reshapes, which mixes token and channel indices (repo issue
            #62; the author reports 87.1 vs 87.2 Synapse DSC with the natural layout). Default True because the
            official checkpoints were trained with it. False uses the natural (B, N, h * d) layout; weights trained
            one way are not valid the other way.

    Shapes: input (B, N, C) -> output (B, N, C).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        proj_size: int,
        num_heads: int = 4,
        qkv_bias: bool = False,
        channel_attn_drop: float = 0.1,
        spatial_attn_drop: float = 0.1,
        ef_mode: str = "shared",
        fusion: str = "concat",
        official_xsa_layout: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"EPA: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        if ef_mode not in EF_MODES:
            raise ValueError(f"EPA: ef_mode must be one of {EF_MODES}, got {ef_mode!r}.")
        if fusion not in FUSIONS:
            raise ValueError(f"EPA: fusion must be one of {FUSIONS}, got {fusion!r}.")
        if fusion == "concat" and hidden_size % 2:
            raise ValueError(f"EPA: concat fusion needs an even hidden_size, got {hidden_size}.")
        for name, p in (("channel_attn_drop", channel_attn_drop), ("spatial_attn_drop", spatial_attn_drop)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"EPA: {name} must be in [0, 1], got {p}.")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.proj_size = int(proj_size)
        self.num_heads = int(num_heads)
        self.ef_mode = ef_mode
        self.fusion = fusion
        self.official_xsa_layout = bool(official_xsa_layout)
        self.spatial_attn_drop = float(spatial_attn_drop)

        # Learnable per-head temperatures: channel branch (temperature) and spatial branch (temperature2).
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(num_heads, 1, 1))
        if ef_mode == "shared_matrix":
            bound = 1.0 / math.sqrt(proj_size)
            self.EF = nn.Parameter(torch.empty(input_size, proj_size).uniform_(-bound, bound))
        # query (shared), key (shared), value of the channel branch, value of the spatial branch
        self.qkvv = nn.Linear(hidden_size, 4 * hidden_size, bias=qkv_bias)
        if ef_mode == "shared":
            # The same module under two names: one set of parameters, but both E.* and F.* in the state dict,
            # exactly like the official checkpoints.
            self.E = self.F = nn.Linear(input_size, proj_size)
        elif ef_mode == "separate":
            self.E = nn.Linear(input_size, proj_size)
            self.F = nn.Linear(input_size, proj_size)
        self.attn_drop = nn.Dropout(channel_attn_drop)
        if fusion == "concat":
            self.out_proj = nn.Linear(hidden_size, hidden_size // 2)  # spatial branch
            self.out_proj2 = nn.Linear(hidden_size, hidden_size // 2)  # channel branch

    def _project_tokens(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """(B, h, d, N) -> (B, h, d, p) along the token axis."""
        if self.ef_mode == "shared_matrix":
            return t @ self.EF
        return (self.E if which == "E" else self.F)(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if n != self.input_size:
            raise ValueError(f"EPA: built for {self.input_size} tokens, got {n} (input shape {tuple(x.shape)}).")
        h = self.num_heads
        # (B, N, 4, h, d) -> 4 x (B, h, d, N): channels-by-tokens, as the paper writes the attention.
        q, k, v_ca, v_sa = self.qkvv(x).reshape(b, n, 4, h, c // h).permute(2, 0, 3, 4, 1).unbind(0)

        # The spatial branch projects the raw key; only then are query and key L2-normalised along the tokens.
        k_proj = self._project_tokens(k, "E")  # (B, h, d, p)
        v_proj = self._project_tokens(v_sa, "F")  # (B, h, d, p)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)

        # Channel branch: (d x d) cross-covariance attention per head.
        attn_ca = (q @ k.transpose(-2, -1)) * self.temperature
        attn_ca = self.attn_drop(attn_ca.softmax(dim=-1))
        x_ca = (attn_ca @ v_ca).permute(0, 3, 1, 2).reshape(b, n, c)  # (B, h, d, N) -> (B, N, h*d)

        # Spatial branch: softmax over the p projected tokens. Folding the per-head temperature into the query lets
        # the fused attention kernel do softmax(Q K^T) V without materialising the (N x p) matrix.
        x_sa = F.scaled_dot_product_attention(
            (q * self.temperature2).transpose(-2, -1),  # (B, h, N, d)
            k_proj.transpose(-2, -1),  # (B, h, p, d)
            v_proj.transpose(-2, -1),  # (B, h, p, d)
            dropout_p=self.spatial_attn_drop if self.training else 0.0,
            scale=1.0,
        )  # (B, h, N, d)
        if self.official_xsa_layout:
            x_sa = x_sa.permute(0, 3, 1, 2).reshape(b, n, c)  # official: (B, d, h, N) memory read as (B, N, C)
        else:
            x_sa = x_sa.transpose(1, 2).reshape(b, n, c)

        if self.fusion == "sum":
            return x_sa + x_ca
        return torch.cat((self.out_proj(x_sa), self.out_proj2(x_ca)), dim=-1)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Temperatures are usually excluded from weight decay (the official nnU-Net SGD trainer does not)."""
        return {"temperature", "temperature2"}


class EPABlock(nn.Module):
    """UNETR++ transformer block (the official ``TransformerBlock``) on a 2D or 3D feature map.

    ``t = tokens(x) + pos_embed``; ``a = t + gamma * EPA(LayerNorm(t))``; ``s = map(a)``;
    ``out = s + Conv1x1(Dropout(ResBlock(s)))`` (two ResBlocks in the ACDC/Lung variants).

    Args:
        input_size: number of tokens N = prod(spatial size) the block is built for.
        hidden_size: channels C.
        proj_size: EPA projection size p.
        num_heads: EPA heads.
        dropout_rate: EPA attention dropout (both branches).
        pos_embed: learn a positional embedding (1, N, C), initialised to zeros (official: True).
        spatial_dims: 2 or 3.
        num_conv_blocks: residual conv blocks after EPA: 1 (``conv51``) or 2 (``conv51``, ``conv52``).
        ef_mode, fusion, official_xsa_layout, qkv_bias: passed to :class:`EPA`.
        reverse_token_order: enumerate tokens with the *last* spatial axis slowest (raster over the reversed axes).
            A network fed MONAI (x, y, z) arrays sets this so that its tokens come in the (z, y, x)-raster order of
            the official nnU-Net-layout model; positional embeddings, E/F and the x_SA layout quirk then see the
            same token order in both layouts, and official weights need no token permutation.
        norm_name: norm of the residual conv blocks (official: batch).

    Shapes: input (B, C, *spatial) with prod(spatial) == input_size -> output of the same shape.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        proj_size: int,
        num_heads: int = 4,
        dropout_rate: float = 0.0,
        pos_embed: bool = True,
        spatial_dims: int = 3,
        num_conv_blocks: int = 1,
        ef_mode: str = "shared",
        fusion: str = "concat",
        official_xsa_layout: bool = True,
        reverse_token_order: bool = False,
        qkv_bias: bool = False,
        norm_name: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"EPABlock: spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_conv_blocks not in (1, 2):
            raise ValueError(f"EPABlock: num_conv_blocks must be 1 or 2, got {num_conv_blocks}.")
        self.input_size = int(input_size)
        self.spatial_dims = spatial_dims
        self.reverse_token_order = bool(reverse_token_order)

        # Registration order mirrors the official module so that state-dict key order matches too.
        self.norm = nn.LayerNorm(hidden_size)
        self.gamma = nn.Parameter(torch.full((hidden_size,), 1e-6))  # layer scale: start close to the identity
        self.epa_block = EPA(
            input_size=input_size,
            hidden_size=hidden_size,
            proj_size=proj_size,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            channel_attn_drop=dropout_rate,
            spatial_attn_drop=dropout_rate,
            ef_mode=ef_mode,
            fusion=fusion,
            official_xsa_layout=official_xsa_layout,
        )
        self.conv51 = UnetResBlock(spatial_dims, hidden_size, hidden_size, kernel_size=3, stride=1, norm_name=norm_name)
        if num_conv_blocks == 2:
            self.conv52 = UnetResBlock(
                spatial_dims, hidden_size, hidden_size, kernel_size=3, stride=1, norm_name=norm_name
            )
        drop = nn.Dropout3d if spatial_dims == 3 else nn.Dropout2d
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv8 = nn.Sequential(drop(0.1), conv(hidden_size, hidden_size, kernel_size=1))
        self.pos_embed = nn.Parameter(torch.zeros(1, input_size, hidden_size)) if pos_embed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"EPABlock: expected a {self.spatial_dims + 2}-D input (B, C, spatial...), got shape {tuple(x.shape)}."
            )
        b, c, *spatial = x.shape
        if math.prod(spatial) != self.input_size:
            raise ValueError(
                f"EPABlock: built for {self.input_size} tokens, got spatial size {tuple(spatial)} "
                f"= {math.prod(spatial)} tokens."
            )
        if self.reverse_token_order:
            # (B, C, s0, ..., sk) <-> (B, sk, ..., s0, C); the permutation is its own inverse.
            perm = (0, x.ndim - 1, *range(x.ndim - 2, 0, -1))
            tokens = x.permute(0, *range(x.ndim - 1, 1, -1), 1).reshape(b, self.input_size, c)
        else:
            tokens = x.flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        tokens = tokens + self.gamma * self.epa_block(self.norm(tokens))

        if self.reverse_token_order:
            skip = tokens.reshape(b, *spatial[::-1], c).permute(perm)
        else:
            skip = tokens.transpose(1, 2).reshape(b, c, *spatial)
        out = self.conv51(skip)
        if hasattr(self, "conv52"):
            out = self.conv52(out)
        return skip + self.conv8(out)
