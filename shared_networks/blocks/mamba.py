"""Mamba (selective state-space, "S6") layers shared by LKM-UNet, ViM-UNet and Polyp-Mamba.

- :class:`Mamba`: the Mamba-1 block of ``state-spaces/mamba`` (``mamba_simple.Mamba``), tokens ``(B, L, d)``.
- :class:`BiMambaV2`: Vision Mamba's bidirectional "v2" mixer (shared in/out projections, separate backward
  conv1d / x_proj / dt_proj / A / D), tokens ``(B, L, d)``.
- :class:`BiMambaPair`: LKM-UNet's bidirectional layer (LayerNorm + two Mambas without out_proj + one shared
  out_proj), tokens ``(B, L, d)``, no residual inside.
- :class:`SS2D` / :class:`VSSBlock`: VMamba v0 cross-scan (as packaged in VM-UNet), channels-last maps
  ``(B, H, W, d)``; ``spatial_dims=3`` gives a 3-D extension on ``(B, D, H, W, d)``.

Parameter names, shapes and initial distributions equal the official modules', so official state dicts load
unchanged; parameters are created in the official order, so a fixed seed draws the same initial values. Every
scan goes through :func:`shared_networks.ops.selective_scan_fn` (mamba-ssm's kernel on CUDA when installed, a
pure-PyTorch/CPU path otherwise); the causal depthwise conv uses ``causal_conv1d`` on CUDA when it imports.

Notation: ``d`` = d_model, ``di = expand * d``, ``N`` = d_state, ``R`` = dt_rank (``ceil(d / 16)`` for "auto"),
``K`` = d_conv. Bidirectional layers run both directions as ONE scan call (channels concatenated, B/C grouped
per direction), which is mathematically identical to two calls.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath

from shared_networks.ops import selective_scan_fn

from . import scan_orders

try:  # CUDA-only kernel; optional
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _causal_conv1d_fn = None

__all__ = [
    "Mamba",
    "BiMambaV2",
    "BiMambaPair",
    "SS2D",
    "VSSBlock",
    "mamba_inner",
    "causal_depthwise_conv1d_silu",
]


# ----------------------------------------------------------------------------------------------------------------
# functional pieces
# ----------------------------------------------------------------------------------------------------------------
def causal_depthwise_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``SiLU(depthwise causal conv)`` along the last axis: output ``t`` sees inputs ``t-K+1 .. t`` (zeros before 0).

    Args:
        x: ``(B, C, L)``.
        weight: ``(C, 1, K)`` (``nn.Conv1d`` layout) or ``(C, K)``.
        bias: ``(C,)`` or ``None``.

    Uses ``causal_conv1d_fn`` for CUDA tensors when the package imports (and ``2 <= K <= 4``, its supported
    widths), else ``F.conv1d`` on the input left-padded by ``K-1`` (same maths as the official slow path's
    symmetric padding followed by truncation to ``L``).
    """
    w = weight.reshape(weight.shape[0], -1)
    k = w.shape[1]
    if _causal_conv1d_fn is not None and x.is_cuda and 2 <= k <= 4:
        # contiguous (B, C, L): the kernel's channel-last path has extra divisibility constraints
        return _causal_conv1d_fn(x.contiguous(), w, bias, activation="silu")
    return F.silu(F.conv1d(F.pad(x, (k - 1, 0)), w.unsqueeze(1), bias, groups=w.shape[0]))


def _ssm_inputs(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, d_state):
    """Steps 2-4 of the Mamba block on ``xz (B, 2*di, L)`` -> ``u, delta (B, di, L), B, C (B, N, L), z``."""
    x, z = xz.chunk(2, dim=1)
    x = causal_depthwise_conv1d_silu(x, conv_weight, conv_bias)
    rank = dt_proj_weight.shape[1]
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (B, L, R + 2N)
    dt, b_mat, c_mat = torch.split(x_dbl, [rank, d_state, d_state], dim=-1)
    delta = torch.matmul(dt_proj_weight, dt.transpose(1, 2))  # (B, di, L); dt bias is added inside the scan
    return x, delta, b_mat.transpose(1, 2).contiguous(), c_mat.transpose(1, 2).contiguous(), z


def _mamba_inner_multi(xzs, params):
    """Run several Mamba inner branches (same batch and length) through ONE grouped selective scan.

    ``xzs``: list of ``(B, 2*di, L)``; ``params``: list of ``(conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b,
    A_log, D)`` per branch. Returns the list of gated outputs ``(B, di, L)``.
    """
    d_state = params[0][5].shape[1]
    parts = [_ssm_inputs(xz, p[0], p[1], p[2], p[3], d_state) for xz, p in zip(xzs, params)]
    if len(parts) == 1:
        u, delta, b_mat, c_mat, z = parts[0]
        a_mat = -torch.exp(params[0][5].float())
        d_vec, bias = params[0][6].float(), params[0][4].float()
    else:  # channels of branch g form group g of B/C
        u, delta, z = (torch.cat([pt[i] for pt in parts], dim=1) for i in (0, 1, 4))
        b_mat = torch.stack([pt[2] for pt in parts], dim=1)
        c_mat = torch.stack([pt[3] for pt in parts], dim=1)
        a_mat = -torch.exp(torch.cat([p[5] for p in params], dim=0).float())
        d_vec = torch.cat([p[6] for p in params], dim=0).float()
        bias = torch.cat([p[4] for p in params], dim=0).float()
    y = selective_scan_fn(u, delta, a_mat, b_mat, c_mat, d_vec, z=z, delta_bias=bias, delta_softplus=True)
    return list(y.chunk(len(parts), dim=1)) if len(parts) > 1 else [y]


def mamba_inner(
    xz: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """The Mamba block between in_proj and out_proj (mamba-ssm's ``mamba_inner_fn_no_out_proj``).

    ``x, z = split(xz)``; ``x = SiLU(causal_dwconv(x))``; ``dt, B, C = split(x_proj(x))``;
    ``delta = softplus(dt_proj_weight @ dt + dt_proj_bias)``; ``y = scan(x, delta, -exp(A_log), B, C, D)``;
    returns ``y * SiLU(z)``.

    Args:
        xz: ``(B, 2*di, L)`` (in_proj output, channels first).
        conv_weight / conv_bias: ``(di, 1, K)`` / ``(di,)``.
        x_proj_weight: ``(R + 2N, di)``.
        dt_proj_weight / dt_proj_bias: ``(di, R)`` / ``(di,)``.
        A_log: ``(di, N)``. D: ``(di,)``.

    Returns:
        ``(B, di, L)``.
    """
    if xz.dim() != 3 or xz.shape[1] != 2 * A_log.shape[0]:
        raise ValueError(f"mamba_inner: xz must be (B, 2*d_inner={2 * A_log.shape[0]}, L), got {tuple(xz.shape)}.")
    params = (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    return _mamba_inner_multi([xz], [params])[0]


# ----------------------------------------------------------------------------------------------------------------
# initialisation helpers (state-spaces conventions)
# ----------------------------------------------------------------------------------------------------------------
def _resolve_rank(d_model, dt_rank):
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, int) and dt_rank > 0:
        return dt_rank
    raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}.")


def _check_common(name, d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init):
    if not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"{name}: d_model must be a positive int, got {d_model!r}.")
    if not isinstance(d_state, int) or d_state < 1:
        raise ValueError(f"{name}: d_state must be a positive int, got {d_state!r}.")
    if not isinstance(d_conv, int) or d_conv < 1:
        raise ValueError(f"{name}: d_conv must be a positive int, got {d_conv!r}.")
    if int(expand * d_model) < 1:
        raise ValueError(f"{name}: expand * d_model must be >= 1, got expand={expand!r}.")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"{name}: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}.")
    if dt_init not in ("random", "constant"):
        raise ValueError(f"{name}: dt_init must be 'random' or 'constant', got {dt_init!r}.")


def _dt_projection(dt_rank, d_inner, dt_scale, dt_init, dt_min, dt_max, dt_init_floor, **factory):
    """``Linear(R, di)`` with Mamba's dt init: weight U(+-R^-0.5*scale) (or constant), bias = softplus^-1(dt),
    dt log-uniform in [dt_min, dt_max] clamped at dt_init_floor; the bias is flagged ``_no_reinit``."""
    proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)
    std = dt_rank**-0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(proj.weight, std)
    else:
        nn.init.uniform_(proj.weight, -std, std)
    dt = torch.exp(
        torch.rand(d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    with torch.no_grad():
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    proj.bias._no_reinit = True
    return proj


def _a_log(d_inner, d_state, copies=1, device=None):
    """S4D-real init: every row is log(1..N); fp32, flagged ``_no_weight_decay``."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(copies * d_inner, 1)
    p = nn.Parameter(torch.log(a))
    p._no_weight_decay = True
    return p


def _ones(n, device=None):
    p = nn.Parameter(torch.ones(n, device=device))  # fp32 "skip" D
    p._no_weight_decay = True
    return p


def _check_tokens(name, u, d_model):
    if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] != d_model:
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"{name}: expected tokens of shape (batch, length, d_model={d_model}), got {got}.")


# ----------------------------------------------------------------------------------------------------------------
# Mamba
# ----------------------------------------------------------------------------------------------------------------
class Mamba(nn.Module):
    """Mamba-1 block (state-spaces ``mamba_ssm.modules.mamba_simple.Mamba``), without step-wise decoding.

    ``xz = in_proj(u)``; ``y = mamba_inner(xz)`` (causal depthwise conv + SiLU, input-dependent dt/B/C,
    selective scan, ``* SiLU(z)``); ``out = out_proj(y)``.

    Parameters (names/shapes as official): ``in_proj.weight (2di, d)``, ``conv1d.weight (di, 1, K)``,
    ``conv1d.bias (di,)``, ``x_proj.weight (R+2N, di)``, ``dt_proj.weight (di, R)``, ``dt_proj.bias (di,)``,
    ``A_log (di, N)``, ``D (di,)``, ``out_proj.weight (d, di)``; ``6d^2 + 4dR + 110d`` with the defaults.
    The init is the bare module's (parents such as the Mamba LM / Vim re-initialise some of it; LKM-UNet does not).

    Args:
        d_model: token channels ``d``.
        d_state: SSM state size ``N``.
        d_conv: causal conv width ``K``.
        expand: ``di = expand * d``.
        dt_rank: rank of the dt projection, ``"auto"`` = ``ceil(d / 16)``.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: dt initialisation (see state-spaces).
        conv_bias: bias in the depthwise conv.
        bias: biases in in_proj / out_proj.
        device, dtype: factory kwargs.

    Shapes: ``(B, L, d) -> (B, L, d)``. Causal: output ``t`` depends on inputs ``<= t`` only.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_common(type(self).__name__, d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init)
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = _resolve_rank(d_model, dt_rank)
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **factory)
        # padding=K-1 mirrors the official module (conv1d(x)[..., :L] is the causal conv); forward pads itself
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = _dt_projection(self.dt_rank, di, dt_scale, dt_init, dt_min, dt_max, dt_init_floor, **factory)
        self.A_log = _a_log(di, d_state, device=device)
        self.D = _ones(di, device=device)
        self.out_proj = nn.Linear(di, d_model, bias=bias, **factory)

    def _branch_params(self):
        return (self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias,
                self.A_log, self.D)

    def inner(self, xz: torch.Tensor) -> torch.Tensor:
        """Everything between in_proj and out_proj: ``(B, 2*di, L) -> (B, di, L)`` (see :func:`mamba_inner`)."""
        return mamba_inner(xz, *self._branch_params())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``(B, L, d) -> (B, L, d)`` (``(B, L, di)`` when ``out_proj`` was replaced by ``nn.Identity``)."""
        _check_tokens(type(self).__name__, u, self.d_model)
        xz = self.in_proj(u).transpose(1, 2)
        return self.out_proj(self.inner(xz).transpose(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Vision Mamba "bimamba v2" mixer
# ----------------------------------------------------------------------------------------------------------------
class BiMambaV2(nn.Module):
    """Vision Mamba's bidirectional mixer (``Mamba(bimamba_type="v2")`` of hustvl/Vim), used by ViM-UNet.

    ``xz = in_proj(u)``; ``y_f = inner(xz; conv1d, x_proj, dt_proj, A_log, D)``;
    ``y_b = inner(flip_L(xz); conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b)`` (x and the gate z both flipped);
    ``y = y_f + flip_L(y_b)`` (``/ 2`` if ``if_divide_out``); ``out = out_proj(y)``.
    Unlike Vim's own slow path (which silently drops the backward branch), every backend computes both.

    Parameters: those of :class:`Mamba` plus ``A_b_log (di, N)``, ``conv1d_b.weight (di, 1, K)``,
    ``conv1d_b.bias (di,)``, ``x_proj_b.weight (R+2N, di)``, ``dt_proj_b.weight (di, R)``,
    ``dt_proj_b.bias (di,)``, ``D_b (di,)``: ``6d^2 + 8dR + 220d`` (a Vim block adds an RMSNorm(d), e.g.
    ``torch.nn.RMSNorm(d, eps=1e-5)``, whose key is ``weight``: ``6d^2 + 8dR + 221d``).

    Init: forward branch as :class:`Mamba`; backward conv1d_b / x_proj_b / dt_proj_b.weight keep PyTorch's
    default init (A_b_log / D_b as A_log / D). ``backward_dt_init`` chooses ``dt_proj_b.bias``:

    - ``"vim"`` (default, official): 0. Vim's model-level ``_init_weights`` zeroes every Linear bias not flagged
      ``_no_reinit`` and dt_proj_b's is not, so the backward branch starts with step softplus(0) = 0.693 while the
      forward one starts in [1e-3, 1e-1].
    - ``"default"``: PyTorch's Linear default bias U(+-1/sqrt(R)) (the bare module before Vim's init).
    - ``"mamba"``: the forward branch's dt init (weight U(+-R^-0.5), bias softplus^-1 of log-uniform dt).

    Vim's model-level init also re-draws ``out_proj.weight`` and divides it by ``sqrt(depth)``; that depends on
    the network depth and is left to the network.

    Args:
        d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, conv_bias,
            bias, device, dtype: as :class:`Mamba`.
        if_divide_out: average instead of sum the two directions (Vim fork's ``if_devide_out``; ViM-UNet
            paper-time code: False, current Vim/torch-em: True).
        backward_dt_init: ``"vim"`` | ``"default"`` | ``"mamba"`` (see above).

    Shapes: ``(B, L, d) -> (B, L, d)``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        if_divide_out: bool = False,
        backward_dt_init: str = "vim",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_common(type(self).__name__, d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init)
        if backward_dt_init not in ("vim", "default", "mamba"):
            raise ValueError(
                f"BiMambaV2: backward_dt_init must be 'vim', 'default' or 'mamba', got {backward_dt_init!r}."
            )
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = di = int(expand * d_model)
        self.dt_rank = rank = _resolve_rank(d_model, dt_rank)
        self.if_divide_out = if_divide_out
        self.backward_dt_init = backward_dt_init
        dt_args = (dt_scale, dt_init, dt_min, dt_max, dt_init_floor)
        # creation order = official order (same random draws for the same seed)
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **factory)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(di, rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = _dt_projection(rank, di, *dt_args, **factory)
        self.A_log = _a_log(di, d_state, device=device)
        self.D = _ones(di, device=device)
        self.A_b_log = _a_log(di, d_state, device=device)
        self.conv1d_b = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj_b = nn.Linear(di, rank + 2 * d_state, bias=False, **factory)
        if backward_dt_init == "mamba":
            self.dt_proj_b = _dt_projection(rank, di, *dt_args, **factory)
        else:
            self.dt_proj_b = nn.Linear(rank, di, bias=True, **factory)
            if backward_dt_init == "vim":
                nn.init.zeros_(self.dt_proj_b.bias)
        self.D_b = _ones(di, device=device)
        self.out_proj = nn.Linear(di, d_model, bias=bias, **factory)

    def _params(self, backward: bool):
        if backward:
            return (self.conv1d_b.weight, self.conv1d_b.bias, self.x_proj_b.weight, self.dt_proj_b.weight,
                    self.dt_proj_b.bias, self.A_b_log, self.D_b)
        return (self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias,
                self.A_log, self.D)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``(B, L, d) -> (B, L, d)``."""
        _check_tokens(type(self).__name__, u, self.d_model)
        xz = self.in_proj(u).transpose(1, 2)
        y_f, y_b = _mamba_inner_multi([xz, xz.flip(-1)], [self._params(False), self._params(True)])
        y = y_f + y_b.flip(-1)
        if self.if_divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# LKM-UNet bidirectional pair
# ----------------------------------------------------------------------------------------------------------------
class BiMambaPair(nn.Module):
    """LKM-UNet's bidirectional Mamba (the maths of its ``BiPixelMambaLayer`` / ``BiWindowMambaLayer``).

    ``n = norm(s)``; ``o = out_proj(mamba_forw(n) + flip_L(mamba_backw(flip_L(n))))`` where ``mamba_forw`` /
    ``mamba_backw`` are two independent :class:`Mamba` blocks whose ``out_proj`` is ``nn.Identity`` and
    ``out_proj`` is one shared ``Linear(di, d, bias=False)``, initialised as a copy of the forward Mamba's
    original out_proj. No division by 2 and **no residual** (the caller adds ``x + o`` after un-flattening).

    State-dict keys (as official): ``norm.{weight,bias}``, ``mamba_forw.{A_log, D, in_proj.weight,
    conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, dt_proj.bias}``, ``out_proj.weight``,
    ``mamba_backw.*`` (same as mamba_forw). Params ``10d^2 + 8dR + 222d``.

    Args:
        d_model: token channels ``d``.
        d_state, d_conv, expand: as :class:`Mamba` (LKM-UNet: 16, 4, 2).
        norm_eps: LayerNorm eps (1e-5).
        disable_autocast: run in the parameters' dtype (fp32) with autocast disabled, casting the input, as the
            official layers do under AMP. The output is in that dtype.
        device, dtype: factory kwargs.
        **mamba_kwargs: further :class:`Mamba` arguments (dt_rank, dt_min, ...).

    Shapes: ``(B, L, d) -> (B, L, d)``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        norm_eps: float = 1e-5,
        disable_autocast: bool = True,
        device=None,
        dtype=None,
        **mamba_kwargs,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.disable_autocast = disable_autocast
        self.norm = nn.LayerNorm(d_model, eps=norm_eps, **factory)
        mk = dict(d_state=d_state, d_conv=d_conv, expand=expand, **mamba_kwargs, **factory)
        # same construction order as the official layer: forward Mamba, copy of its out_proj, backward Mamba
        self.mamba_forw = Mamba(d_model, **mk)
        self.out_proj = copy.deepcopy(self.mamba_forw.out_proj)
        self.mamba_backw = Mamba(d_model, **mk)
        self.mamba_forw.out_proj = nn.Identity()
        self.mamba_backw.out_proj = nn.Identity()
        self.d_inner = self.mamba_forw.d_inner

    def _forward(self, s: torch.Tensor) -> torch.Tensor:
        n = self.norm(s)
        f, b = self.mamba_forw, self.mamba_backw
        xz_f = f.in_proj(n).transpose(1, 2)
        xz_b = b.in_proj(n.flip(1)).transpose(1, 2)
        y_f, y_b = _mamba_inner_multi([xz_f, xz_b], [f._branch_params(), b._branch_params()])
        return self.out_proj((y_f + y_b.flip(-1)).transpose(1, 2))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``(B, L, d) -> (B, L, d)`` (without the residual)."""
        _check_tokens(type(self).__name__, s, self.d_model)
        if not self.disable_autocast:
            return self._forward(s)
        dtype = self.norm.weight.dtype
        with torch.autocast(device_type=s.device.type, enabled=False):
            return self._forward(s.to(dtype) if s.is_floating_point() else s)


# ----------------------------------------------------------------------------------------------------------------
# VMamba SS2D / VSS block
# ----------------------------------------------------------------------------------------------------------------
# Scan axis orders (slowest -> fastest) of the forward directions; the remaining directions are their reverses.
_SS_ORDERS = {
    2: ((0, 1), (1, 0)),  # row-major, column-major (VMamba)
    3: ((0, 1, 2), (1, 2, 0), (2, 0, 1)),  # cyclic: W, D, H fastest respectively
}


class SS2D(nn.Module):
    """VMamba v0 "2-D selective scan" (``SS2D`` of VM-UNet's vmamba.py), channels-last.

    ``x, z = split(in_proj(u))``; ``x = SiLU(depthwise conv(x))``; scan ``x`` along ``2 * spatial_dims``
    directions with per-direction x_proj / dt_proj / A / D and **no gate inside the scan**; undo each order and
    sum; ``y = out_norm(y) * SiLU(z)``; ``out = dropout(out_proj(y))``. All directions run as ONE
    :func:`selective_scan_fn` call over ``K*di`` channels with B/C grouped per direction ``(batch, K, N, L)``.

    Directions (built with :mod:`scan_orders`):

    - ``spatial_dims=2`` (VMamba): 0 row-major (``h*W + w``), 1 column-major (``w*H + h``), 2 reverse of 0,
      3 reverse of 1.
    - ``spatial_dims=3`` (extension, not in VMamba) on ``(B, D, H, W, d)``: the 3 cyclic axis orders
      (D,H,W), (H,W,D), (W,D,H) (slowest -> fastest, so each axis is the fastest-varying once) followed by
      their 3 reverses; the depthwise conv is 3-D (``d_conv^3``, key ``conv3d``).

    Parameters (``K = 2 * spatial_dims``): ``in_proj.weight (2di, d)``, ``conv2d.weight (di, 1, k, k)`` /
    ``conv2d.bias (di,)`` (``conv3d.*`` with ``(di, 1, k, k, k)`` in 3-D), ``x_proj_weight (K, R+2N, di)``,
    ``dt_projs_weight (K, di, R)``, ``dt_projs_bias (K, di)``, ``A_logs (K*di, N)``, ``Ds (K*di,)``,
    ``out_norm.{weight,bias} (di,)``, ``out_proj.weight (d, di)``. Count:
    ``6d^2 + 4KdR + 2d(k^s + 1) + 6KNd + 4Kd + 4d`` (k = d_conv, s = spatial_dims) -> 2-D ``6d^2 + 16dR + 424d``,
    3-D ``6d^2 + 24dR + 660d``.

    Init: as the bare VMamba module (x_proj_weight: stacked default Linear init; dt per direction as
    :class:`Mamba`; A_logs rows log(1..N); Ds ones; conv / in_proj / out_proj PyTorch default). VM-UNet's
    model-level init then re-draws every ``nn.Linear`` (in_proj, out_proj) trunc_normal(std .02) with zero bias;
    that is left to the network.

    Args:
        d_model: channels ``d``.
        d_state: ``N``. d_conv: odd depthwise kernel size (3). expand: ``di = expand * d``.
        dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor: as :class:`Mamba`.
        dropout: dropout after out_proj.
        conv_bias, bias: biases of the depthwise conv / in_proj and out_proj.
        spatial_dims: 2 or 3.
        device, dtype: factory kwargs.

    Shapes: ``(B, H, W, d) -> (B, H, W, d)`` or ``(B, D, H, W, d) -> (B, D, H, W, d)``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        dropout: float = 0.0,
        conv_bias: bool = True,
        bias: bool = False,
        spatial_dims: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_common(type(self).__name__, d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init)
        if spatial_dims not in _SS_ORDERS:
            raise ValueError(f"SS2D: spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        if d_conv % 2 == 0:
            raise ValueError(f"SS2D: d_conv must be odd (same-size depthwise conv), got {d_conv}.")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = di = int(expand * d_model)
        self.dt_rank = rank = _resolve_rank(d_model, dt_rank)
        self.spatial_dims = spatial_dims
        self.scan_axes = _SS_ORDERS[spatial_dims]
        self.num_directions = k = 2 * len(self.scan_axes)
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **factory)
        conv_type = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self._conv_name = f"conv{spatial_dims}d"
        self.add_module(
            self._conv_name,
            conv_type(di, di, d_conv, groups=di, padding=(d_conv - 1) // 2, bias=conv_bias, **factory),
        )
        # per-direction projections are drawn as separate Linear modules (official order), then stacked
        x_projs = [nn.Linear(di, rank + 2 * d_state, bias=False, **factory) for _ in range(k)]
        self.x_proj_weight = nn.Parameter(torch.stack([p.weight.detach() for p in x_projs]))
        dt_projs = [
            _dt_projection(rank, di, dt_scale, dt_init, dt_min, dt_max, dt_init_floor, **factory) for _ in range(k)
        ]
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.detach() for p in dt_projs]))
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.detach() for p in dt_projs]))
        self.A_logs = _a_log(di, d_state, copies=k, device=device)
        self.Ds = _ones(k * di, device=device)
        self.out_norm = nn.LayerNorm(di, **factory)
        self.out_proj = nn.Linear(di, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None

    @property
    def conv(self) -> nn.Module:
        """The depthwise conv (``conv2d`` or ``conv3d``)."""
        return getattr(self, self._conv_name)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-scan of a channels-first map ``(B, di, *S)`` -> summed directions ``(B, di, *S)`` (fp32)."""
        b, k, n, rank = x.shape[0], self.num_directions, self.d_state, self.dt_rank
        seqs, restores = [], []
        for axes in self.scan_axes:
            s, r = scan_orders.flatten(x, axes=axes, token_layout="BCL")
            seqs.append(s)
            restores.append(r)
        xs = torch.stack(seqs, dim=1)  # (B, K/2, di, L)
        xs = torch.cat([xs, xs.flip(-1)], dim=1)  # (B, K, di, L)
        length = xs.shape[-1]
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, b_mat, c_mat = torch.split(x_dbl, [rank, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = selective_scan_fn(
            xs.float().reshape(b, -1, length),
            dts.float().reshape(b, -1, length),
            -torch.exp(self.A_logs.float()),
            b_mat.float().contiguous(),
            c_mat.float().contiguous(),
            self.Ds.float(),
            z=None,
            delta_bias=self.dt_projs_bias.float().reshape(-1),
            delta_softplus=True,
        ).view(b, k, -1, length)
        half = k // 2
        out = None
        for i, restore in enumerate(restores):
            yi = restore(y[:, i]) + restore(y[:, half + i].flip(-1))
            out = yi if out is None else out + yi
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *S, d) -> (B, *S, d)`` channels-last, ``len(S) == spatial_dims``."""
        if not isinstance(x, torch.Tensor) or x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            axes = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ValueError(
                f"{type(self).__name__}: expected a channels-last map (B, {axes}, d_model={self.d_model}), got {got}."
            )
        xz = self.in_proj(x)
        xc, z = xz.chunk(2, dim=-1)
        xc = F.silu(self.conv(xc.movedim(-1, 1).contiguous()))
        y = self.forward_core(xc).movedim(1, -1)  # (B, *S, di)
        y = self.out_norm(y) * F.silu(z)
        out = self.out_proj(y)
        if self.dropout is not None:
            out = self.dropout(out)
        return out


class VSSBlock(nn.Module):
    """VMamba visual state-space block (VM-UNet): ``x + DropPath(SS2D(LayerNorm(x)))``, channels-last.

    Keys: ``ln_1.{weight,bias}``, ``self_attention.*`` (:class:`SS2D`); ``drop_path`` has no parameters.
    Params (2-D defaults) ``6d^2 + 16dR + 426d``; 3-D ``6d^2 + 24dR + 662d``.

    Args:
        d_model: channels ``d`` (VMamba's ``hidden_dim``).
        drop_path: stochastic-depth probability.
        attn_drop_rate: dropout after the SS2D out_proj.
        d_state: ``N``.
        norm_eps: LayerNorm eps (VM-UNet passes ``nn.LayerNorm``: 1e-5; VMamba's own default is 1e-6).
        spatial_dims: 2 or 3.
        **ss2d_kwargs: further :class:`SS2D` arguments (d_conv, expand, dt_rank, ...).

    Shapes: ``(B, H, W, d) -> (B, H, W, d)`` (3-D: ``(B, D, H, W, d)``).
    """

    def __init__(
        self,
        d_model: int,
        drop_path: float = 0.0,
        attn_drop_rate: float = 0.0,
        d_state: int = 16,
        norm_eps: float = 1e-5,
        spatial_dims: int = 2,
        **ss2d_kwargs,
    ) -> None:
        super().__init__()
        factory = {k: ss2d_kwargs[k] for k in ("device", "dtype") if k in ss2d_kwargs}
        self.ln_1 = nn.LayerNorm(d_model, eps=norm_eps, **factory)
        self.self_attention = SS2D(
            d_model, d_state=d_state, dropout=attn_drop_rate, spatial_dims=spatial_dims, **ss2d_kwargs
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *S, d) -> (B, *S, d)``."""
        return x + self.drop_path(self.self_attention(self.ln_1(x)))
