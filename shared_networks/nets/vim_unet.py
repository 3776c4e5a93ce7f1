"""ViM-UNet (Archit & Pape, "ViM-UNet: Vision Mamba for Biomedical Segmentation", MIDL 2024, arXiv 2404.07705).

A Vision Mamba (Vim) encoder on 16x16 patches followed by torch-em's UNETR-style convolutional decoder (no skip
connections from the encoder: every decoder input is derived from the last token map). Data flow for the paper's
configuration (2D, 1024x1024 canvas, Tiny d=192 / Small d=384, widths c = (512, 256, 128, 64))::

    x (B, 1, H, W) -> broadcast to 3 channels -> zero-pad bottom/right (to 1024^2 with paper_time_quirks, else to a
      multiple of 16) -> patch embedding conv k=s=16 -> tokens (B, 64*64, d) -> [cls] + tokens (B, 4097, d)
      + absolute position embedding -> 24 Vim blocks (2-D rotary embedding before each, bidirectional Mamba "v2"
      mixer) -> add + RMSNorm -> drop cls -> z12 (B, d, 64, 64)
    side chain (transposed conv k=s=2 -> conv3x3 -> BN -> ReLU): z9 = S1(z12) c0@128, z6 = S2(z9) c1@256,
      z3 = S3(z6) c2@512, z0 = S4(z3) c3@1024
    base = ConvBlock(d -> c0)(z12) @64
    3 levels: up (c_i -> c_{i+1}) -> concat [up, centre channels of z9 / z6 / z3] -> ConvBlock(2 c_{i+1} -> c_{i+1})
    final_up (c3 -> c3) @1024 -> concat z0 -> ConvBlock(2 c3 -> c3) -> 1x1 conv (c3 -> out_channels)
      -> final activation -> crop to (H, W)

ConvBlock = InstanceNorm -> conv3x3 -> ReLU -> InstanceNorm -> conv3x3 -> ReLU (pre-norm, no affine params), as
torch-em. The concatenated skips are centre-cropped *in the channel axis* to the upsampled tensor's width (torch-em's
``Decoder._concat`` crops every axis): of z9's 512 channels only 128..383 enter the concatenation. This is part of
the published network (its weights were trained with it) and is kept.

Two families of settings:

* ``paper_time_quirks=True`` reproduces the configuration behind the paper's results (torch-em ``33239758`` + Vim
  fork ``6143d07``): every input is zero-padded to the fixed ``img_size`` canvas (so the position embedding never
  changes size and the cost does not shrink for small inputs), and the unused 1000-class ImageNet head of
  ``VisionMamba`` is built, so the parameter counts equal the official ones (Tiny 18,499,690 / Small 39,175,018 with
  2 outputs).
* The default keeps the same architecture and weights (RoPE, front class token, no /2 in the bimamba output,
  transposed-conv decoder) but pads only to a multiple of the patch size and resamples the position embedding to the
  input's token grid (bicubic/trilinear), and does not build the unused head (Tiny 18,306,690 / Small 38,790,018).
  Official weights load into both (the head, when present, is simply dropped by the default network's converter).

The options that differ in torch-em's current code (``cls_token="middle"``, ``divide_out=True``, ``rope=False``,
``upsample="bilinear"`` and the ``drop_index0_quirk`` token bug) are available for importing such checkpoints.

3D (``spatial_dims=3``, named as future work in the paper): cubic 16^3 patches (by default), a 3-D position
embedding and 3-axis rotary embedding (the channel dimension split into three rotary blocks instead of two), Vim
blocks over the raster token sequence (first axis slowest) and the same decoder with 3-D transposed convs,
InstanceNorm3d/BatchNorm3d. The defaults for 3D are ``img_size=128`` (8^3 = 512 tokens) and a lean patch
embedding (``in_channels`` input channels instead of the 2D model's RGB embedding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, DropPath, Norm
from torch import nn

from ..blocks.scan_orders import flatten as flatten_tokens
from ..utils import check_input

__all__ = ["ViMUNet", "ViMEncoder", "VimBlock", "ENCODERS", "rope_tables"]

#: Vim sizes (all: depth 24, d_state 16, d_conv 4, expand 2, dt_rank ceil(d/16)).
ENCODERS: dict[str, dict] = {
    "vim_t": dict(embed_dim=192, depth=24),
    "vim_s": dict(embed_dim=384, depth=24),
}

_PAD_MODES = ("canvas", "divisible", "none")
_CLS_POSITIONS = ("front", "middle", None)
_UPSAMPLE = ("deconv", "bilinear")


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    t = (int(v),) * n if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != n or any(x < 1 for x in t):
        raise ValueError(f"ViMUNet: {name}={v!r} must be a positive int or {n} positive ints.")
    return t


# --------------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------------


def rope_tables(
    grid: Sequence[int], dim: int, pt_seq_len: int = 14, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables (prod(grid), dim) of Vim's EVA-02 style N-D rotary embedding for tokens in raster order.

    Each of the ``n = len(grid)`` axes owns a block of ``P = 2 * floor(dim / n / 2)`` channels (axis 0 first; 2D:
    channels [0, d/2) encode the row, [d/2, d) the column); channel pair (2j, 2j+1) of a block rotates by angle
    ``pos * f_j``, ``f_j = theta^(-2j/P)``, with ``pos = index * pt_seq_len / grid[axis]`` (Vim: the 14x14 ImageNet
    grid stretched over the fine-tuning grid). Channels left over when ``dim`` is not divisible stay unrotated.
    For the official 64x64 grid, d=192 this reproduces ``VisionRotaryEmbeddingFast(96, 14, 64)`` bit for bit.
    """
    n = len(grid)
    per = (dim // n) // 2 * 2
    if per == 0:
        raise ValueError(f"rotary embedding: dim={dim} is too small for {n} axes.")
    freqs = 1.0 / (theta ** (torch.arange(0, per, 2, device=device)[: per // 2].float() / per))
    angles = []
    for a, g in enumerate(grid):
        t = torch.arange(g, device=device) / g * pt_seq_len
        ang = (t[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # (g, per), pairs share a frequency
        shape = [1] * n + [per]
        shape[a] = g
        angles.append(ang.reshape(shape).expand(*grid, per))
    ang = torch.cat(angles, dim=-1).reshape(-1, n * per)
    rest = dim - n * per
    cos, sin = ang.cos(), ang.sin()
    if rest:
        cos = torch.cat([cos, cos.new_ones(cos.shape[0], rest)], dim=-1)
        sin = torch.cat([sin, sin.new_zeros(sin.shape[0], rest)], dim=-1)
    return cos, sin


def _rotate_pairs(t: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    t2 = t.unflatten(-1, (-1, 2))
    return torch.stack((-t2[..., 1], t2[..., 0]), dim=-1).flatten(-2)


def _lecun_normal_(w: torch.Tensor) -> None:
    # timm's lecun_normal_: truncated normal (+-2 std) with variance 1/fan_in, corrected for the truncation.
    fan_in = w.shape[1] * math.prod(w.shape[2:])
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class VimBlock(nn.Module):
    """Vim's residual block: ``residual = residual + DropPath(hidden)``; ``hidden = Mixer(RMSNorm(residual))``.

    The first block receives ``residual=None`` and starts the residual stream with its input. The residual stream
    is kept in float32 (Vim's ``residual_in_fp32``). Tokens are (B, L, d) channels-last.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.mixer = mixer
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class _PatchEmbed(nn.Module):
    def __init__(self, spatial_dims, in_channels, embed_dim, patch_size):
        super().__init__()
        self.proj = Conv[Conv.CONV, spatial_dims](in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


class ViMEncoder(nn.Module):
    """Vision Mamba encoder returning the token map (B, d, *grid) (class token removed).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the patch-embedding conv.
        img_size: size the position embedding is built for (per axis, network axis order).
        patch_size: patch size = stride (per axis).
        embed_dim, depth: Vim width and number of blocks.
        cls_token: "front" (Vim/torch-em at paper time), "middle" (torch-em HEAD) or None.
        rope: apply the rotary embedding to hidden and residual stream before every block (paper time).
        divide_out: halve the bimamba output ((fwd + bwd) / 2, torch-em HEAD); paper time: False.
        drop_path_rate: stochastic depth; block i uses ([0] + linspace(0, rate, depth))[i], plus DropPath(rate)
            on the last block's output before the final norm (as Vim).
        classifier_head: build Vim's (unused) ``Linear(d, 1000)`` head, only so parameter counts match.
        flatten_axes: spatial axes from slowest to fastest in the token sequence (default raster). Position and
            rotary embeddings are laid out in sequence order, so ``(1, 0)`` makes a network fed (x, y) arrays
            compute what the (y, x) network computes on the transposed image.
        interpolate_pos_embed: resample the position embedding when the token grid differs from the built one;
            False raises instead.
        drop_index0_quirk: torch-em HEAD drops token 0 whatever the class-token position (with a middle class token
            this discards the first patch token and keeps the class token in the map).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        img_size: Sequence[int] | int = 1024,
        patch_size: Sequence[int] | int = 16,
        embed_dim: int = 192,
        depth: int = 24,
        cls_token: str | None = "front",
        rope: bool = True,
        divide_out: bool = False,
        drop_path_rate: float = 0.1,
        classifier_head: bool = False,
        num_classes: int = 1000,
        flatten_axes: Sequence[int] | None = None,
        interpolate_pos_embed: bool = True,
        drop_index0_quirk: bool = False,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        rope_pt_seq_len: int = 14,
    ):
        super().__init__()
        from ..blocks.mamba import BiMambaV2  # imported here: the block module is heavier than this file

        if cls_token not in _CLS_POSITIONS:
            raise ValueError(f"ViMEncoder: cls_token={cls_token!r} must be one of {_CLS_POSITIONS}.")
        if drop_index0_quirk and cls_token is None:
            raise ValueError("ViMEncoder: drop_index0_quirk needs a class token.")
        self.spatial_dims = spatial_dims
        self.img_size = _tuple(img_size, spatial_dims, "img_size")
        self.patch_size = _tuple(patch_size, spatial_dims, "patch_size")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(
                f"ViMEncoder: img_size {self.img_size} must be a multiple of patch_size {self.patch_size}."
            )
        self.flatten_axes = tuple(range(spatial_dims)) if flatten_axes is None else tuple(int(a) for a in flatten_axes)
        if sorted(self.flatten_axes) != list(range(spatial_dims)):
            raise ValueError(
                f"ViMEncoder: flatten_axes={flatten_axes!r} must be a permutation of range({spatial_dims})."
            )
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.embed_dim, self.depth = embed_dim, depth
        self.cls_position = cls_token
        self.use_rope, self.rope_pt_seq_len = rope, rope_pt_seq_len
        self.interpolate_pos_embed = interpolate_pos_embed
        self.drop_index0_quirk = drop_index0_quirk

        self.patch_embed = _PatchEmbed(spatial_dims, in_channels, embed_dim, self.patch_size)
        n_cls = 0 if cls_token is None else 1
        if n_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid) + n_cls, embed_dim))
        self.head = nn.Linear(embed_dim, num_classes) if classifier_head else None

        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            VimBlock(
                embed_dim,
                BiMambaV2(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, if_divide_out=divide_out),
                drop_path=dpr[i],
            )
            for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = nn.RMSNorm(embed_dim, eps=1e-5)
        self._rope_cache: dict = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Vim's initialisation (the mixers' own init first, then the model-level re-init)."""
        _lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_position is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            # Mamba-LM ``_init_weights``: every Linear bias not flagged ``_no_reinit`` is zeroed (so the backward
            # branch's dt bias becomes 0 -> softplus = 0.693), out_proj re-drawn and scaled by 1/sqrt(depth).
            for m in layer.mixer.modules():
                if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                    nn.init.zeros_(m.bias)
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            w /= math.sqrt(self.depth)

    # --- token bookkeeping ---------------------------------------------------------------------------------------

    def _seq_grid(self, grid: Sequence[int]) -> tuple[int, ...]:
        return tuple(grid[a] for a in self.flatten_axes)

    def _cls_index(self, n_patches: int) -> int | None:
        if self.cls_position is None:
            return None
        return 0 if self.cls_position == "front" else n_patches // 2

    def _pos_embed_for(self, seq_grid: tuple[int, ...]) -> torch.Tensor:
        pos = self.pos_embed
        built = self._seq_grid(self.grid)
        if seq_grid == built:
            return pos
        if not self.interpolate_pos_embed:
            raise ValueError(
                f"ViMUNet: the position embedding is built for a {built} token grid (img_size {self.img_size}) and "
                f"interpolation is off, but the input gives {seq_grid}; pad the input to img_size."
            )
        n = math.prod(built)
        ci = self._cls_index(n)
        if ci is None:
            patch, cls = pos, None
        else:
            patch, cls = torch.cat([pos[:, :ci], pos[:, ci + 1:]], dim=1), pos[:, ci: ci + 1]
        patch = patch.reshape(1, *built, -1).movedim(-1, 1).float()
        mode = "bicubic" if len(built) == 2 else "trilinear"
        patch = F.interpolate(patch, size=seq_grid, mode=mode, align_corners=False).to(pos.dtype)
        patch = patch.movedim(1, -1).reshape(1, math.prod(seq_grid), -1)
        if cls is None:
            return patch
        ci = self._cls_index(math.prod(seq_grid))
        return torch.cat([patch[:, :ci], cls, patch[:, ci:]], dim=1)

    def _rope(self, seq_grid: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_tables(seq_grid, self.embed_dim, self.rope_pt_seq_len, device=device)}
        return self._rope_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) with S a multiple of the patch size -> token map (B, d, *S / patch)."""
        t = self.patch_embed(x)
        grid = tuple(t.shape[2:])
        seq, restore = flatten_tokens(t, axes=self.flatten_axes)  # (B, L, d)
        seq_grid = self._seq_grid(grid)
        n = seq.shape[1]
        ci = self._cls_index(n)
        if ci is not None:
            seq = torch.cat([seq[:, :ci], self.cls_token.expand(seq.shape[0], -1, -1).to(seq.dtype), seq[:, ci:]], 1)
        seq = seq + self._pos_embed_for(seq_grid)

        if self.use_rope:
            cos, sin = self._rope(seq_grid, seq.device)

            def rope(h):
                if ci is None:
                    return h * cos + _rotate_pairs(h) * sin
                sp = torch.cat([h[:, :ci], h[:, ci + 1:]], dim=1)  # the class token is not rotated
                sp = sp * cos + _rotate_pairs(sp) * sin
                return torch.cat([sp[:, :ci], h[:, ci: ci + 1], sp[:, ci:]], dim=1)

        hidden, residual = seq, None
        for layer in self.layers:
            if self.use_rope:
                hidden = rope(hidden)
                residual = None if residual is None else rope(residual)
            hidden, residual = layer(hidden, residual)
        residual = residual + self.drop_path(hidden)
        out = self.norm_f(residual.to(self.norm_f.weight.dtype))

        if ci is not None:
            drop = 0 if self.drop_index0_quirk else ci
            out = torch.cat([out[:, :drop], out[:, drop + 1:]], dim=1)
        return restore(out)


# --------------------------------------------------------------------------------------------------------------------
# Decoder (torch-em UNETR without encoder skips)
# --------------------------------------------------------------------------------------------------------------------


class _Up(nn.Module):
    """x2 upsampling: transposed conv k=s=2 ("deconv", paper time) or interpolation + 1x1 conv ("bilinear")."""

    def __init__(self, spatial_dims, cin, cout, mode):
        super().__init__()
        self.mode = mode
        if mode == "deconv":
            self.conv = Conv[Conv.CONVTRANS, spatial_dims](cin, cout, kernel_size=2, stride=2)
        else:
            self.conv = Conv[Conv.CONV, spatial_dims](cin, cout, kernel_size=1)

    def forward(self, x):
        if self.mode == "deconv":
            return self.conv(x)
        interp = "bilinear" if x.ndim == 4 else "trilinear"
        return self.conv(F.interpolate(x, scale_factor=2, mode=interp, align_corners=False))


class _SideBlock(nn.Module):
    """torch-em ``Deconv2DBlock``: up x2 -> conv3x3 -> BatchNorm -> ReLU."""

    def __init__(self, spatial_dims, cin, cout, mode):
        super().__init__()
        self.up = _Up(spatial_dims, cin, cout, mode)
        self.conv = Conv[Conv.CONV, spatial_dims](cout, cout, kernel_size=3, padding=1)
        self.norm = Norm[Norm.BATCH, spatial_dims](cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(self.up(x))))


class _ConvBlock(nn.Module):
    """torch-em ``ConvBlock``: InstanceNorm -> conv3x3 -> ReLU -> InstanceNorm -> conv3x3 -> ReLU (no affine)."""

    def __init__(self, spatial_dims, cin, cout):
        super().__init__()
        self.norm1 = Norm[Norm.INSTANCE, spatial_dims](cin)
        self.conv1 = Conv[Conv.CONV, spatial_dims](cin, cout, kernel_size=3, padding=1)
        self.norm2 = Norm[Norm.INSTANCE, spatial_dims](cout)
        self.conv2 = Conv[Conv.CONV, spatial_dims](cout, cout, kernel_size=3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.conv1(self.norm1(x)))
        return self.act(self.conv2(self.norm2(x)))


def _activation(a) -> nn.Module | None:
    if a is None or isinstance(a, nn.Module):
        return a
    if isinstance(a, str):
        name = a.lower()
        if name == "sigmoid":
            return nn.Sigmoid()
        if name == "softmax":
            return nn.Softmax(dim=1)
    raise ValueError(f"ViMUNet: final_activation={a!r} must be None, 'sigmoid', 'softmax' or an nn.Module.")


# --------------------------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------------------------


class ViMUNet(nn.Module):
    """ViM-UNet: Vision Mamba encoder + torch-em UNETR decoder (see the module docstring for the data flow).

    Args:
        spatial_dims: 2 (the paper) or 3 (3-D patches and decoder; not in the paper).
        in_channels: input channels. In 2D the patch embedding has torch-em's 3 (RGB) input channels and a
            1-channel image is broadcast to them, unless ``embed_in_channels`` says otherwise.
        out_channels: output channels (paper: 2 = foreground + boundaries, or 3 with distance targets).
        img_size: canvas / position-embedding size per axis (paper: 1024; 3D default 128).
        encoder: "vim_t" (d=192) or "vim_s" (d=384), depth 24.
        patch_size: patch size = stride; must be 16 (the decoder upsamples the token grid x16).
        embed_dim, depth: override the encoder size (small test/demo configurations).
        decoder_channels: widths (c0, c1, c2, c3) of the decoder (paper: 512, 256, 128, 64); non-increasing.
        final_activation: None (logits), "sigmoid" (torch-em's choice), "softmax" or a module.
        paper_time_quirks: defaults of ``pad_mode`` / ``classifier_head`` as at paper time (see module docstring).
        pad_mode: "canvas" = zero-pad bottom/right to ``img_size`` (input must not exceed it; position embedding
            used as built); "divisible" = zero-pad bottom/right to a multiple of the patch size and resample the
            position embedding to the token grid; "none" = the input must be divisible by the patch size.
            Default: "canvas" with ``paper_time_quirks`` else "divisible". The output is cropped to the input size.
        classifier_head: build Vim's unused 1000-class head (parameter-count fidelity only). Default:
            ``paper_time_quirks``.
        rope, cls_token, divide_out, drop_index0_quirk, flatten_axes: see :class:`ViMEncoder` (defaults = paper).
        upsample: "deconv" (transposed convs, paper time) or "bilinear" (interpolation + 1x1 conv, torch-em HEAD).
        drop_path_rate: stochastic depth of the encoder (Vim default 0.1).
        embed_in_channels: input channels of the patch-embedding conv (default: 3 in 2D when ``in_channels`` is 1
            or 3, as torch-em; otherwise ``in_channels``).
        pixel_mean, pixel_std: per-embedding-channel normalisation inside the model (torch-em ``use_sam_stats``);
            default none (inputs are standardised outside the model).

    Shapes: (B, in_channels, *S) -> (B, out_channels, *S).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        img_size: Sequence[int] | int | None = None,
        encoder: str = "vim_t",
        patch_size: Sequence[int] | int = 16,
        embed_dim: int | None = None,
        depth: int | None = None,
        decoder_channels: Sequence[int] = (512, 256, 128, 64),
        final_activation: str | nn.Module | None = None,
        paper_time_quirks: bool = False,
        pad_mode: str | None = None,
        classifier_head: bool | None = None,
        rope: bool = True,
        cls_token: str | None = "front",
        divide_out: bool = False,
        upsample: str = "deconv",
        drop_path_rate: float = 0.1,
        embed_in_channels: int | None = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        flatten_axes: Sequence[int] | None = None,
        drop_index0_quirk: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ViMUNet: spatial_dims must be 2 or 3, got {spatial_dims}.")
        if encoder not in ENCODERS:
            raise ValueError(f"ViMUNet: encoder={encoder!r} must be one of {sorted(ENCODERS)}.")
        if upsample not in _UPSAMPLE:
            raise ValueError(f"ViMUNet: upsample={upsample!r} must be one of {_UPSAMPLE}.")
        pad_mode = ("canvas" if paper_time_quirks else "divisible") if pad_mode is None else pad_mode
        if pad_mode not in _PAD_MODES:
            raise ValueError(f"ViMUNet: pad_mode={pad_mode!r} must be one of {_PAD_MODES}.")
        classifier_head = paper_time_quirks if classifier_head is None else bool(classifier_head)
        if img_size is None:
            img_size = 1024 if spatial_dims == 2 else 128
        if embed_in_channels is None:
            embed_in_channels = 3 if (spatial_dims == 2 and in_channels in (1, 3)) else in_channels
        if in_channels not in (1, embed_in_channels):
            raise ValueError(
                f"ViMUNet: in_channels={in_channels} cannot feed a {embed_in_channels}-channel patch embedding "
                "(only a 1-channel input is broadcast)."
            )
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != 4 or any(a < b for a, b in zip(decoder_channels, decoder_channels[1:])):
            raise ValueError(f"ViMUNet: decoder_channels={decoder_channels} must be 4 non-increasing widths.")
        for name, v in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            if v is not None and len(v) != embed_in_channels:
                raise ValueError(f"ViMUNet: {name} needs {embed_in_channels} values, got {len(v)}.")

        if any(int(p) != 16 for p in _tuple(patch_size, spatial_dims, "patch_size")):
            # the torch-em decoder upsamples the token grid by exactly 16 (four x2 stages)
            raise ValueError(f"ViMUNet: patch_size must be 16 per axis (the decoder upsamples x16), got {patch_size}.")
        size = dict(ENCODERS[encoder])
        size.update({k: v for k, v in (("embed_dim", embed_dim), ("depth", depth)) if v is not None})
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.embed_in_channels, self.pad_mode = embed_in_channels, pad_mode
        self.constructor_args = dict(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            img_size=list(_tuple(img_size, spatial_dims, "img_size")), encoder=encoder,
            patch_size=list(_tuple(patch_size, spatial_dims, "patch_size")), embed_dim=embed_dim, depth=depth,
            decoder_channels=list(decoder_channels),
            final_activation=repr(final_activation) if isinstance(final_activation, nn.Module) else final_activation,
            paper_time_quirks=paper_time_quirks, pad_mode=pad_mode, classifier_head=classifier_head, rope=rope,
            cls_token=cls_token, divide_out=divide_out, upsample=upsample, drop_path_rate=drop_path_rate,
            embed_in_channels=embed_in_channels, pixel_mean=None if pixel_mean is None else list(pixel_mean),
            pixel_std=None if pixel_std is None else list(pixel_std),
            flatten_axes=None if flatten_axes is None else list(flatten_axes), drop_index0_quirk=drop_index0_quirk,
        )
        if pixel_mean is not None or pixel_std is not None:
            shape = (1, embed_in_channels) + (1,) * spatial_dims
            mean = torch.tensor(pixel_mean if pixel_mean is not None else [0.0] * embed_in_channels).view(shape)
            std = torch.tensor(pixel_std if pixel_std is not None else [1.0] * embed_in_channels).view(shape)
            self.register_buffer("pixel_mean", mean, persistent=False)
            self.register_buffer("pixel_std", std, persistent=False)
        else:
            self.pixel_mean = self.pixel_std = None

        self.encoder = ViMEncoder(
            spatial_dims=spatial_dims, in_channels=embed_in_channels, img_size=img_size, patch_size=patch_size,
            embed_dim=size["embed_dim"], depth=size["depth"], cls_token=cls_token, rope=rope, divide_out=divide_out,
            drop_path_rate=drop_path_rate, classifier_head=classifier_head, flatten_axes=flatten_axes,
            interpolate_pos_embed=pad_mode != "canvas", drop_index0_quirk=drop_index0_quirk,
        )
        d, c = size["embed_dim"], decoder_channels
        self.side = nn.ModuleList(
            _SideBlock(spatial_dims, cin, cout, upsample) for cin, cout in zip((d,) + c[:3], c)
        )
        self.base = _ConvBlock(spatial_dims, d, c[0])
        self.up = nn.ModuleList(_Up(spatial_dims, c[i], c[i + 1], upsample) for i in range(3))
        self.up_blocks = nn.ModuleList(_ConvBlock(spatial_dims, 2 * c[i + 1], c[i + 1]) for i in range(3))
        self.final_up = _Up(spatial_dims, c[3], c[3], upsample)
        self.head_block = _ConvBlock(spatial_dims, 2 * c[3], c[3])
        self.out_conv = Conv[Conv.CONV, spatial_dims](c[3], out_channels, kernel_size=1)
        self.final_activation = _activation(final_activation)

    @property
    def img_size(self) -> tuple[int, ...]:
        return self.encoder.img_size

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.encoder.patch_size

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        if self.pad_mode == "canvas":
            if any(s > c for s, c in zip(size, self.img_size)):
                raise ValueError(
                    f"ViMUNet: input spatial size {tuple(size)} exceeds the canvas img_size {self.img_size} "
                    "(pad_mode='canvas' zero-pads every input to it); use a sliding-window inferer with roi_size "
                    "<= img_size."
                )
            target = self.img_size
        elif self.pad_mode == "divisible":
            target = tuple(-(-s // p) * p for s, p in zip(size, self.patch_size))
        else:
            return x
        pad = []
        for s, t in zip(reversed(size), reversed(target)):
            pad += [0, t - s]
        return F.pad(x, pad) if any(pad) else x

    @staticmethod
    def _centre_channels(skip: torch.Tensor, width: int) -> torch.Tensor:
        # torch-em Decoder._concat crops the skip to the upsampled tensor's shape in every axis, channels included
        start = (skip.shape[1] - width) // 2
        return skip[:, start: start + width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) -> (B, out_channels, *S)."""
        check_input(
            x, name="ViMUNet", in_channels=self.in_channels, spatial_dims=self.spatial_dims,
            divisible_by=self.patch_size if self.pad_mode == "none" else None,
        )
        size = x.shape[2:]
        if self.in_channels != self.embed_in_channels:
            x = x.expand(-1, self.embed_in_channels, *size)
        if self.pixel_mean is not None:
            x = (x - self.pixel_mean) / self.pixel_std
        x = self._pad(x)

        z12 = self.encoder(x)
        z9 = self.side[0](z12)
        z6 = self.side[1](z9)
        z3 = self.side[2](z6)
        z0 = self.side[3](z3)
        h = self.base(z12)
        for up, block, skip in zip(self.up, self.up_blocks, (z9, z6, z3)):
            h = up(h)
            h = block(torch.cat([h, self._centre_channels(skip, h.shape[1])], dim=1))
        h = self.head_block(torch.cat([self.final_up(h), z0], dim=1))
        h = self.out_conv(h)
        if self.final_activation is not None:
            h = self.final_activation(h)
        return h[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]
