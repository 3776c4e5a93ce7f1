"""Selective scan (Mamba S6 recurrence) with interchangeable backends.

Recurrence, per batch b, channel d, state n (h_0 = 0)::

    delta = softplus(delta + delta_bias)            (each optional)
    h_t   = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t   = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t   = y_t * silu(z_t)                          (optional)

Shapes: u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L) with dim % G == 0
(channel d uses group d // (dim // G)); D, delta_bias: (dim,). Returns y (batch, dim, L) in u's dtype, and the last
state (batch, dim, N) with ``return_last_state=True``.

Backends:
    ``"cuda"``  mamba-ssm's kernel (only when mamba_ssm imports and the tensors are on CUDA),
    ``"ref"``   the plain step loop below (ground truth for tests; slow).
The backend is chosen per call: ``auto`` takes cuda for CUDA tensors when available, otherwise the fastest
pure-PyTorch/CPU path. Force one with the environment variable ``SHARED_NETWORKS_SCAN_BACKEND`` or the
``use_backend(name)`` context manager; ``get_backend(u)`` tells which one a call with ``u`` would use.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F

_ENV = "SHARED_NETWORKS_SCAN_BACKEND"
_state = threading.local()

try:  # the CUDA kernels: mamba_ssm cannot even be imported without them
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _mamba_scan_fn = None


def available_backends() -> list[str]:
    names = ["ref"]
    if _mamba_scan_fn is not None:
        names.insert(0, "cuda")
    return names


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a ``with`` block (``None`` or ``"auto"`` restores automatic choice)."""
    if name not in (None, "auto") and name not in _ALL_BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; choose from {sorted(_ALL_BACKENDS)} or 'auto'.")
    old = getattr(_state, "forced", None)
    _state.forced = None if name == "auto" else name
    try:
        yield
    finally:
        _state.forced = old


def get_backend(u: torch.Tensor) -> str:
    """The backend a call with input ``u`` uses under the current settings."""
    forced = getattr(_state, "forced", None) or os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in _ALL_BACKENDS:
            raise ValueError(f"{_ENV}={forced!r} is not a selective-scan backend; choose from {sorted(_ALL_BACKENDS)}.")
        if forced == "cuda" and (_mamba_scan_fn is None or not u.is_cuda):
            raise RuntimeError("selective-scan backend 'cuda' needs mamba-ssm installed and CUDA tensors.")
        return forced
    if u.is_cuda and _mamba_scan_fn is not None:
        return "cuda"
    return "ref"


def _expand_bc(X: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L) view."""
    if X.dim() == 3:
        return X.unsqueeze(1).expand(X.shape[0], dim, X.shape[1], X.shape[2])
    if X.dim() == 4:
        g = X.shape[1]
        if dim % g:
            raise ValueError(f"selective_scan: {name} has {g} groups, which does not divide dim={dim}.")
        return X.repeat_interleave(dim // g, dim=1)
    raise ValueError(f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L), got {tuple(X.shape)}.")


def _check(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got {tuple(u.shape)}.")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} must match u {tuple(u.shape)}.")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z {tuple(z.shape)} must match u {tuple(u.shape)}.")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (dim={d}, N), got {tuple(A.shape)}.")
    n = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.dim() not in (3, 4) or X.shape[0] != b or X.shape[-2] != n or X.shape[-1] != L:
            raise ValueError(
                f"selective_scan: {name} must be (batch={b}, N={n}, L={L}) or (batch, G, N, L), got {tuple(X.shape)}."
            )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (d,):
            raise ValueError(f"selective_scan: {name} must be (dim={d},), got {tuple(v.shape)}.")


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Plain step loop over L (differentiable through autograd). Computes in float32, or float64 if u is float64."""
    dtype_in = u.dtype
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    Bx = _expand_bc(B.to(ct), d, "B")
    Cx = _expand_bc(C.to(ct), d, "C")
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * Bx[..., t] * u[:, :, t, None]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if L else u.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(ct)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def _cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    # mamba-ssm wants contiguous inputs and fp32 A/D/delta_bias
    def c(t):
        return None if t is None else t.contiguous()

    return _mamba_scan_fn(
        c(u), c(delta), c(A.float()), c(B), c(C),
        None if D is None else c(D.float()), c(z),
        None if delta_bias is None else c(delta_bias.float()),
        delta_softplus, return_last_state,
    )


_ALL_BACKENDS = {"cuda": _cuda, "ref": selective_scan_ref}


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Selective scan with mamba-ssm's signature; see the module docstring for shapes and backends."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    fn = _ALL_BACKENDS[get_backend(u)]
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
