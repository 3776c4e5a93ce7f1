"""Non-local attention with a positive random-feature softmax kernel (FAVOR+), linear in the number of tokens.

The non-local operation (Wang et al., CVPR 2018) with the embedded-Gaussian pairwise function is softmax attention,

    y_i = sum_j exp(q_i . k_j) v_j / sum_j exp(q_i . k_j),

which costs O(N^2 C) for N tokens. Performer's FAVOR+ (Choromanski et al., ICLR 2021) replaces the exponential kernel
by an unbiased estimate built from m positive random features,

    psi(x) = m^-1/2 [exp(w_k . x - |x|^2 / 2) + eps]_{k=1..m},   E[psi(q) . psi(k)] = exp(q . k)  (up to eps),

so that  Y = D^-1 psi(Q) (psi(K)^T V)  with  D = diag(psi(Q) psi(K)^T 1_N)  costs O(N m C) time and O(N m + m C)
memory. The rows w_k are orthogonal within blocks of C and rescaled to Gaussian norms (orthogonal random features).

This is the ENLA operator of Perspective+ Unet (adapted from ENLCA, Xia et al., AAAI 2022). Its defaults reproduce
the official model: one head, m = head width random features, queries and keys L2-normalised per token (so
q . k lies in [-1, 1]), no extra scale, eps = 1e-4, no output projection, and the random matrix drawn once at
construction and never redrawn.

The random projection matrix is a **persistent buffer**: it is saved in and restored from the state dict, so a loaded
model computes exactly the function that was saved, whatever the RNG state at construction. It is not a parameter
(never trained, not counted in ``parameters()``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RandomFeatureAttention",
    "gaussian_orthogonal_random_matrix",
    "positive_random_features",
    "linear_attention",
]


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_columns: int,
    scaling: int = 0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random (nb_rows, nb_columns) matrix whose rows are orthogonal within each block of ``nb_columns`` rows.

    Each block is the transposed Q factor of the QR decomposition of a Gaussian square matrix; a trailing partial
    block keeps its first rows. ``scaling=0`` rescales every row by the norm of an independent ``nb_columns``-dim
    Gaussian vector, so rows are marginally N(0, I) (the ORF estimator of FAVOR+); ``scaling=1`` gives every row the
    norm sqrt(nb_columns).
    """
    if nb_rows < 1 or nb_columns < 1:
        raise ValueError(f"nb_rows and nb_columns must be positive, got {nb_rows} and {nb_columns}.")
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 (Gaussian row norms) or 1 (norm sqrt(d)), got {scaling!r}.")
    device = torch.device(device) if device is not None else torch.empty(0).device
    # QR runs on the CPU in float64 (deterministic for a given generator, independent of the target device).
    work = "meta" if device.type == "meta" else "cpu"
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        g = torch.randn(nb_columns, nb_columns, generator=generator, device=work, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)
        blocks.append(q.T[: min(nb_columns, nb_rows - start)])
    mat = torch.cat(blocks)
    if scaling == 0:
        mult = torch.randn(nb_rows, nb_columns, generator=generator, device=work, dtype=torch.float64).norm(dim=1)
    else:
        mult = torch.full((nb_rows,), math.sqrt(nb_columns), device=work, dtype=torch.float64)
    return (mult[:, None] * mat).to(device=device, dtype=dtype)


def positive_random_features(
    x: torch.Tensor, projection: torch.Tensor, eps: float = 1e-4, stabilizer: str | None = None
) -> torch.Tensor:
    """FAVOR+ positive features psi(x) = m^-1/2 (exp(W x - |x|^2/2) + eps), shape (..., N, d) -> (..., N, m).

    ``stabilizer`` subtracts a maximum inside the exponential before adding ``eps``: ``"query"`` the per-token maximum,
    ``"key"`` the maximum over all tokens and features. Both cancel in the attention normalisation (apart from the
    relative weight of ``eps``), and keep ``exp`` finite for unnormalised inputs. ``None`` (the default) is the
    official Perspective+ Unet computation, safe there because queries and keys have unit norm.
    """
    m = projection.shape[0]
    dash = torch.matmul(x, projection.T.to(x.dtype))
    diag = x.pow(2).sum(dim=-1, keepdim=True) / 2.0
    arg = dash - diag
    if stabilizer == "query":
        arg = arg - arg.amax(dim=-1, keepdim=True).detach()
    elif stabilizer == "key":
        arg = arg - arg.amax(dim=(-2, -1), keepdim=True).detach()
    elif stabilizer is not None:
        raise ValueError(f"stabilizer must be None, 'query' or 'key', got {stabilizer!r}.")
    return (torch.exp(arg) + eps) * (m**-0.5)


def linear_attention(q_prime: torch.Tensor, k_prime: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal kernelised attention D^-1 q' (k'^T v): (..., N, m), (..., N, m), (..., N, e) -> (..., N, e)."""
    k_sum = k_prime.sum(dim=-2)  # (..., m)
    denom = torch.einsum("...nm,...m->...n", q_prime, k_sum)
    context = torch.matmul(k_prime.transpose(-1, -2), v)  # (..., m, e)
    return torch.matmul(q_prime, context) / denom.unsqueeze(-1)


def _autocast_off(x: torch.Tensor):
    # exp() of the random features overflows half precision easily; the kernel is computed in float32.
    dev = x.device.type
    if dev in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(dev):
        return torch.autocast(device_type=dev, enabled=False)
    return contextlib.nullcontext()


class RandomFeatureAttention(nn.Module):
    """Non-local (softmax) attention over N tokens with a FAVOR+ random-feature kernel, linear in N.

    Works for any token set (flattened 2D or 3D feature maps, sequences): input and output are (B, N, C).

    Per head: q, k, v = linear projections of x; q and k are L2-normalised per token (``normalize_qk``) and multiplied
    by ``qk_scale``; the attention exp(q . k) / sum is estimated with ``nb_features`` positive orthogonal random
    features; dropout ``attn_drop`` is applied to the attention output, then an optional output projection.

    Args:
        dim: token width C.
        num_heads: heads (C must divide evenly). 1 = the official ENLA (one head of width C).
        nb_features: random features m per head; default the head width (the official choice m = C).
        qkv_bias: bias in the q/k/v projections.
        normalize_qk: L2-normalise q and k per token (eps 5e-5) before scaling, as ENLA does.
        qk_scale: factor applied to q and k after normalisation; the estimated kernel is exp(s^2 q.k). ``None`` =
            1 (official; a flat kernel since q.k is in [-1, 1]); ENLCA used sqrt(6).
        attn_drop: dropout on the attention output.
        out_proj: add a Linear(C, C) output projection (the non-local W_z; absent in the official model).
        proj_drop: dropout after the output projection.
        feature_eps: the eps added to every random feature.
        ortho_scaling: 0 = Gaussian row norms, 1 = rows of norm sqrt(head width); see
            :func:`gaussian_orthogonal_random_matrix`.
        redraw_interval: in training, redraw the random matrix every this many forward calls (``None`` = never,
            official). Under DistributedDataParallel keep ``broadcast_buffers=True`` so all ranks share it.
        stabilize: subtract maxima inside the exponentials (see :func:`positive_random_features`); needed when
            ``normalize_qk=False`` or a large ``qk_scale`` is used. Off in the official model.

    Buffers:
        projection_matrix: (nb_features, head width), persistent (saved with the weights).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        nb_features: int | None = None,
        qkv_bias: bool = True,
        normalize_qk: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        out_proj: bool = False,
        proj_drop: float = 0.0,
        feature_eps: float = 1e-4,
        ortho_scaling: int = 0,
        redraw_interval: int | None = None,
        stabilize: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        if redraw_interval is not None and redraw_interval < 1:
            raise ValueError(f"redraw_interval must be a positive int or None, got {redraw_interval}.")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.nb_features = nb_features if nb_features is not None else self.head_dim
        self.normalize_qk = normalize_qk
        self.qk_scale = qk_scale
        self.feature_eps = feature_eps
        self.ortho_scaling = ortho_scaling
        self.redraw_interval = redraw_interval
        self.stabilize = stabilize
        self._calls_since_redraw = 0

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.out_proj = nn.Linear(dim, dim) if out_proj else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop) if out_proj else nn.Identity()
        self.register_buffer(
            "projection_matrix",
            gaussian_orthogonal_random_matrix(self.nb_features, self.head_dim, ortho_scaling),
            persistent=True,
        )

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random matrix in place (same device/dtype). The official model never calls this."""
        new = gaussian_orthogonal_random_matrix(
            self.nb_features, self.head_dim, self.ortho_scaling, generator=generator,
            device=self.projection_matrix.device, dtype=self.projection_matrix.dtype,
        )
        self.projection_matrix.copy_(new)
        self._calls_since_redraw = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The kernel part on per-head tensors (B, h, N, d): normalise/scale q, k, then FAVOR+ attention."""
        dtype = v.dtype
        with _autocast_off(q):
            q, k, v = q.float(), k.float(), v.float()
            if self.normalize_qk:
                q = F.normalize(q, p=2.0, dim=-1, eps=5e-5)
                k = F.normalize(k, p=2.0, dim=-1, eps=5e-5)
            if self.qk_scale is not None:
                q, k = q * self.qk_scale, k * self.qk_scale
            proj = self.projection_matrix.float()
            q_prime = positive_random_features(q, proj, self.feature_eps, "query" if self.stabilize else None)
            k_prime = positive_random_features(k, proj, self.feature_eps, "key" if self.stabilize else None)
            out = linear_attention(q_prime, k_prime, v)
        return out.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"RandomFeatureAttention expects (B, N, {self.dim}) tokens, got {tuple(x.shape)}.")
        if self.training and self.redraw_interval is not None:
            if self._calls_since_redraw >= self.redraw_interval:
                self.redraw_projection_matrix()
            self._calls_since_redraw += 1
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(qkv[0], qkv[1], qkv[2])  # (B, h, N, d)
        out = self.attn_drop(out)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.out_proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, nb_features={self.nb_features}, "
            f"normalize_qk={self.normalize_qk}, qk_scale={self.qk_scale}, redraw_interval={self.redraw_interval}"
        )
