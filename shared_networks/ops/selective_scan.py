"""Selective scan (Mamba S6 recurrence) with interchangeable backends.

Recurrence, per batch b, channel d, state n (h_0 = 0)::

    delta = softplus(delta + delta_bias)            (each optional)
    h_t   = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t   = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t   = y_t * silu(z_t)                          (optional)

Shapes: u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, G, N, L) with dim % G == 0
(channel d uses group d // (dim // G)); D, delta_bias: (dim,). Returns y (batch, dim, L) in u's dtype, and the last
state (batch, dim, N) with ``return_last_state=True`` (float32, or float64 for float64 input on the torch/ref
backends). This is ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``'s contract (the simplified
``delta * B`` discretisation of B, as in the CUDA kernel). Every backend is differentiable with respect to all
tensor inputs; the cpu/torch/ref backends also propagate a gradient that reaches the returned last state
(mamba-ssm's CUDA backward ignores it).

Backends:
    ``"cuda"``   mamba-ssm's kernel (only when mamba_ssm imports and the tensors are on CUDA; not float64).
    ``"cpu"``    fused numba kernels for the forward and the backward pass (:mod:`._numba_scan`): float32 in and
                 out (float16/bfloat16 are upcast, float64 is rounded to float32), float64 inside. Needs numba.
    ``"torch"``  pure PyTorch, any device and dtype, autograd: a two-level scan over chunks of ~sqrt(L/2) steps
                 (a step loop inside the chunks, all chunks at once, then a loop over the chunk boundaries), so
                 ~3*sqrt(L/2) Python iterations instead of L. Only products of decays are formed (never a division
                 by a cumulative product), so it is as stable as the step loop.
    ``"ref"``    the plain step loop below (ground truth for tests; slow).

``auto`` (the default) picks, per call: ``cuda`` for CUDA float32/16/bf16 tensors when mamba-ssm is installed;
``cpu`` for CPU float32/16/bf16 tensors when numba imports; ``torch`` otherwise (float64, other devices, no
numba) and while ``torch.jit.trace`` records (custom autograd Functions cannot be traced). Force one with the
environment variable ``SHARED_NETWORKS_SCAN_BACKEND`` (read at every call) or the ``use_backend(name)`` context
manager (which wins over the variable); ``get_backend(u)`` tells which one a call with ``u`` would use and
``available_backends()`` lists the ones usable in this process.

Speed (scripts/bench_scan.py, batch 1, dim 192, N 16, L 4096, 2 threads, 2-core AMD EPYC): forward 3.7 ms for
"cpu" vs 120 ms for the step loop; forward+backward ~25-50 ms vs ~480 ms.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ..utils import is_capturing

_ENV = "SHARED_NETWORKS_SCAN_BACKEND"
_NAMES = ("cuda", "cpu", "torch", "ref")
_state = threading.local()
_log = logging.getLogger(__name__)

try:  # the CUDA kernels: mamba_ssm cannot even be imported without them
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _mamba_scan_fn = None

_numba_mod = None  # the kernel module once imported; False if numba is unusable here


def _numba():
    """Import the numba kernels lazily (numba's import costs ~0.5 s); ``None`` if numba is unusable."""
    global _numba_mod
    if _numba_mod is None:
        try:
            from . import _numba_scan

            _numba_mod = _numba_scan
        except Exception as err:  # noqa: BLE001 - missing or broken numba: fall back to the torch backend
            _log.debug("selective_scan: numba backend unavailable (%s); using the torch backend on CPU.", err)
            _numba_mod = False
    return _numba_mod or None


def available_backends() -> list[str]:
    """Backends usable in this process (for some inputs), fastest first."""
    names = []
    if _mamba_scan_fn is not None:
        names.append("cuda")
    if _numba() is not None:
        names.append("cpu")
    return names + ["torch", "ref"]


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a ``with`` block (``None`` or ``"auto"`` restores automatic choice).

    The setting is per thread and overrides ``SHARED_NETWORKS_SCAN_BACKEND``.
    """
    if name not in (None, "auto") and name not in _NAMES:
        raise ValueError(f"unknown selective-scan backend {name!r}; choose from {list(_NAMES)} or 'auto'.")
    old = getattr(_state, "forced", None)
    _state.forced = "auto" if name is None else name
    try:
        yield
    finally:
        _state.forced = old


_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def get_backend(u: torch.Tensor) -> str:
    """The backend a call with input ``u`` uses under the current settings (raises if a forced one cannot run)."""
    forced = getattr(_state, "forced", None)
    if forced is None:
        forced = os.environ.get(_ENV, "auto").strip().lower() or "auto"
        if forced != "auto" and forced not in _NAMES:
            raise ValueError(
                f"{_ENV}={forced!r} is not a selective-scan backend; choose from {list(_NAMES)} or 'auto'."
            )
    if forced == "cuda":
        if _mamba_scan_fn is None or not u.is_cuda or u.dtype == torch.float64:
            raise RuntimeError(
                "selective-scan backend 'cuda' needs mamba-ssm installed and CUDA float32/float16/bfloat16 tensors "
                f"(got {u.dtype} on {u.device}, mamba-ssm {'importable' if _mamba_scan_fn else 'not importable'})."
            )
        return forced
    if forced == "cpu":
        if u.device.type != "cpu" or not (u.dtype in _LOW_PRECISION or u.dtype == torch.float64):
            raise RuntimeError(
                f"selective-scan backend 'cpu' needs CPU floating-point tensors (got {u.dtype} on {u.device})."
            )
        if _numba() is None:
            raise RuntimeError("selective-scan backend 'cpu' needs numba (pip install numba); use 'torch' instead.")
        return forced
    if forced != "auto":
        return forced
    if is_capturing():
        # numba kernels and mamba-ssm's autograd Functions cannot be recorded into a TorchScript trace, an exported
        # program or a compiled graph; plain PyTorch ops can
        return "torch"
    if u.is_cuda and _mamba_scan_fn is not None and u.dtype in _LOW_PRECISION:
        return "cuda"
    if u.device.type == "cpu" and u.dtype in _LOW_PRECISION and _numba() is not None:
        return "cpu"
    return "torch"


def _check(u, delta, A, B, C, D, z, delta_bias):
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t is not None and (t.is_complex() or not t.is_floating_point()):
            raise TypeError(f"selective_scan: {name} must be a real floating-point tensor, got {t.dtype}.")
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}.")
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
                f"selective_scan: {name} must be (batch={b}, N={n}, L={L}) or (batch={b}, G, N={n}, L={L}), "
                f"got {tuple(X.shape)}."
            )
        if X.dim() == 4 and (X.shape[1] == 0 or d % X.shape[1]):
            raise ValueError(f"selective_scan: {name} has {X.shape[1]} groups, which does not divide dim={d}.")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (d,):
            raise ValueError(f"selective_scan: {name} must be (dim={d},), got {tuple(v.shape)}.")


def _prepare_delta(delta, delta_bias, delta_softplus, ct):
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20 like mamba-ssm's kernel
    return delta


def _finish(y, u, D, z, ct):
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y


# --------------------------------------------------------------------------------------------------- ref
def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Plain step loop over L (differentiable through autograd). Computes in float32, or float64 if u is float64."""
    dtype_in = u.dtype
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, A = u.to(ct), A.to(ct)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, ct)
    b, d, L = u.shape
    g = 1 if B.dim() == 3 else B.shape[1]
    Bx = B.to(ct).reshape(b, g, 1, *B.shape[-2:])  # channel d uses group d // (dim // g)
    Cx = C.to(ct).reshape(b, g, 1, *C.shape[-2:])
    h = u.new_zeros(b, g, d // g, A.shape[1])
    Ag = A.reshape(g, d // g, -1)
    # unbind once: indexing step t inside the loop would make autograd allocate a full-size gradient per step
    dts = delta.reshape(b, g, d // g, L, 1).unbind(3)
    us = u.reshape(b, g, d // g, L, 1).unbind(3)
    Bs, Cs = Bx.unbind(-1), Cx.unbind(-1)
    ys = []
    for t in range(L):
        dt = dts[t]
        h = torch.exp(dt * Ag) * h + dt * Bs[t] * us[t]
        ys.append((h * Cs[t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(b, d, L) if L else u.new_zeros(b, d, 0)
    y = _finish(y, u, D, z, ct).to(dtype_in)
    return (y, h.reshape(b, d, -1)) if return_last_state else y


# ------------------------------------------------------------------------------------------------- torch
def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    chunk: int | None = None,
):
    """Pure-PyTorch two-level scan (any device/dtype; autograd). Computes in float32, or float64 for float64 u.

    Time is cut into ``nc`` chunks of ``T`` steps (``T = ceil(sqrt(L / 2))`` unless ``chunk`` is given):
    (1) a step loop over the T positions runs all chunks at once from a zero state and gives each chunk's local
    end state; (2) a loop over the chunks carries the true state across chunk boundaries using each chunk's total
    decay (a product of decays, which may underflow to 0 harmlessly); (3) the step loop runs again from the true
    chunk-start states and emits y. About 2T + nc Python iterations instead of L.
    """
    dtype_in = u.dtype
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, A = u.to(ct), A.to(ct)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, ct)
    b, d, L = u.shape
    n = A.shape[1]
    B = B.to(ct) if B.dim() == 4 else B.to(ct).unsqueeze(1)
    C = C.to(ct) if C.dim() == 4 else C.to(ct).unsqueeze(1)
    g = B.shape[1]
    if L == 0:
        y = _finish(u.new_zeros(b, d, 0), u, D, z, ct).to(dtype_in)
        return (y, u.new_zeros(b, d, n)) if return_last_state else y
    T = max(1, min(L, chunk or math.ceil(math.sqrt(L / 2))))
    nc = -(-L // T)
    pad = nc * T - L
    dl, uu = delta, u
    if pad:  # zero steps: decay exp(0) = 1 and no input, so the state passes through unchanged
        dl, uu = F.pad(dl, (0, pad)), F.pad(uu, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    # time-major layouts so the per-step slices are contiguous (elementwise ops keep the strides of permuted
    # inputs, hence the explicit .contiguous()); the (.., nc, n) decays and inputs of a step are formed inside
    # the loops: materialising them for all L steps costs more (memory traffic, page faults) than the 2nd exp
    dl_t = dl.reshape(b, g, d // g, nc, T).permute(4, 0, 1, 2, 3).contiguous().unsqueeze(-1)  # (T, b, g, p, nc, 1)
    du_t = (dl * uu).reshape(b, g, d // g, nc, T).permute(4, 0, 1, 2, 3).contiguous().unsqueeze(-1)
    B_t = B.reshape(b, g, n, nc, T).permute(4, 0, 1, 3, 2).unsqueeze(3).contiguous()  # (T, b, g, 1, nc, n)
    C_t = C.reshape(b, g, n, nc, T).permute(4, 0, 1, 3, 2).unsqueeze(3).contiguous()
    A_ = A.reshape(g, d // g, 1, n)
    # unbind instead of indexing in the loops: the backward of x[t] would allocate a full-size zero tensor per step
    dls, dus, bs, cs = dl_t.unbind(0), du_t.unbind(0), B_t.unbind(0), C_t.unbind(0)
    # (1) local end state and total decay of every chunk
    h = chunk_decay = None
    for t in range(T):
        decay = torch.exp(dls[t] * A_)
        x = dus[t] * bs[t]
        h = x if h is None else torch.addcmul(x, decay, h)
        chunk_decay = decay if chunk_decay is None else chunk_decay * decay
    # (2) true state entering every chunk
    H = h.new_zeros(b, g, d // g, n)
    starts = []
    for h_c, p_c in zip(h.unbind(-2), chunk_decay.unbind(-2)):
        starts.append(H)
        H = torch.addcmul(h_c, p_c, H)
    h = torch.stack(starts, dim=-2)
    # (3) states and outputs
    ys = []
    for t in range(T):
        h = torch.addcmul(dus[t] * bs[t], torch.exp(dls[t] * A_), h)
        ys.append((h * cs[t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(b, d, nc * T)[..., :L]
    y = _finish(y, u, D, z, ct).to(dtype_in)
    return (y, H.reshape(b, d, n)) if return_last_state else y


# --------------------------------------------------------------------------------------------------- cpu
_pool = None  # (executor, pid that made it, its number of workers)
_pool_lock = threading.Lock()


def _parallel(fn, n_items, *args):
    """Run ``fn(i0, i1, *args)`` over ``range(n_items)`` split into ``torch.get_num_threads()`` contiguous parts.

    The numba kernels release the GIL, so a plain thread pool runs them in parallel; the calling thread takes the
    first part. The pool is re-created after a fork (worker threads do not survive it).
    """
    global _pool
    nt = max(1, min(torch.get_num_threads(), n_items))
    if nt == 1:
        fn(0, n_items, *args)
        return
    with _pool_lock:
        if _pool is None or _pool[1] != os.getpid() or _pool[2] < nt - 1:
            size = max(nt - 1, os.cpu_count() or 1)
            _pool = (ThreadPoolExecutor(max_workers=size, thread_name_prefix="selective_scan"), os.getpid(), size)
        pool = _pool[0]
    bounds = [n_items * i // nt for i in range(nt + 1)]
    futures = [pool.submit(fn, bounds[i], bounds[i + 1], *args) for i in range(1, nt)]
    try:
        fn(bounds[0], bounds[1], *args)
    finally:
        for f in futures:
            f.result()


def _np(*ts):
    """numpy views of contiguous CPU tensors (no copies) for the kernels."""
    return [t.detach().numpy() for t in ts]


class _CpuScanFn(torch.autograd.Function):
    """float32 CPU tensors u, delta, A, B (b, G, N, L), C, D|None, z|None, delta_bias|None  ->  y, last_state.

    The step ``softplus(delta + delta_bias)`` is formed inside the kernels (forward and backward).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        nm = _numba()
        b, d, L = u.shape
        n = A.shape[1]
        need_grad = any(ctx.needs_input_grad)
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        Dv = D.contiguous() if D is not None else u.new_zeros(d)
        bias = delta_bias.contiguous() if delta_bias is not None else u.new_zeros(d)
        zz = z.contiguous() if z is not None else u
        y = u.new_empty(b, d, L)
        last = u.new_empty(b, d, n)
        ckpt = torch.empty((b, -(-L // nm.T), n, d) if need_grad else (0, 0, 0, 0), dtype=torch.float64)
        _parallel(nm.scan_fwd, nm.n_blocks(b, d, B.shape[1]), *_np(u, delta, A, B, C, Dv, bias, zz), z is not None,
                  softplus, need_grad, *_np(y, last, ckpt))
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, Dv, bias, zz, ckpt)
            ctx.flags = (D is not None, z is not None, delta_bias is not None, softplus)
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, delta, A, B, C, Dv, bias, zz, ckpt = ctx.saved_tensors
        has_D, has_z, has_bias, softplus = ctx.flags
        nm = _numba()
        b, d, L = u.shape
        n, g = A.shape[1], B.shape[1]
        nblk = nm.n_blocks(b, d, g)
        gy = gy.float().contiguous() if gy is not None else u.new_zeros(b, d, L)
        gl = glast.float().contiguous() if glast is not None else u.new_zeros(1, 1, 1)
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gz = torch.empty_like(u) if has_z else u.new_empty(0, 0, 0)
        gA = torch.empty(b, d, n, dtype=torch.float64)
        gD = torch.empty(b, d, dtype=torch.float64)
        gbias = torch.empty(b, d, dtype=torch.float64)
        gBp = u.new_empty(2, b, nblk // b if b else 0, n, L)  # per-block partial sums of the B and C gradients
        gBC = u.new_empty(2, b, g, n, L)
        _parallel(nm.scan_bwd, nblk, *_np(u, delta, A, B, C, Dv, bias, zz), has_z, softplus, ckpt.numpy(),
                  *_np(gy, gl), glast is not None, *_np(gu, gdelta, gz, gA, gD, gbias, gBp))
        _parallel(nm.reduce_bc, 2 * b * g * n, *_np(gBp, gBC))
        gB, gC = gBC.unbind(0)
        need = ctx.needs_input_grad
        return (
            gu if need[0] else None,
            gdelta if need[1] else None,
            gA.sum(0).float() if need[2] else None,
            gB if need[3] else None,
            gC if need[4] else None,
            gD.sum(0).float() if (has_D and need[5]) else None,
            gz if (has_z and need[6]) else None,
            gbias.sum(0).float() if (has_bias and need[7]) else None,
            None,
        )


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Fused numba CPU scan: float32 in and out (other float types are converted), float64 inside."""
    if u.device.type != "cpu":
        raise RuntimeError(f"selective-scan backend 'cpu' needs CPU tensors, got {u.device}.")
    dtype_in = u.dtype

    def f32(t):
        return None if t is None else t.to(torch.float32)

    B4 = f32(B) if B.dim() == 4 else f32(B).unsqueeze(1)
    C4 = f32(C) if C.dim() == 4 else f32(C).unsqueeze(1)
    try:
        y, last = _CpuScanFn.apply(
            f32(u), f32(delta), f32(A), B4, C4, f32(D), f32(z), f32(delta_bias), bool(delta_softplus)
        )
    except Exception as err:
        from numba.core.errors import NumbaError

        if not isinstance(err, NumbaError):
            raise
        # the kernels could not be compiled on this platform: use the torch backend from now on
        global _numba_mod
        _numba_mod = False
        warnings.warn(f"selective_scan: numba kernels unusable ({err!r}); falling back to the torch backend.")
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


# -------------------------------------------------------------------------------------------------- cuda
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


def _wrap(fn):
    def call(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    return call


_ALL_BACKENDS = {
    "cuda": _cuda,
    "cpu": _wrap(selective_scan_cpu),
    "torch": _wrap(selective_scan_torch),
    "ref": _wrap(selective_scan_ref),
}


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Selective scan with mamba-ssm's signature; see the module docstring for shapes and backends."""
    # MONAI MetaTensors (what SimpleInferer passes) break the kernels' new_empty(*size) calls: use plain tensors.
    # Not while a graph is captured: torch.export / compile run on their own tensor subclasses (fake tensors).
    if not is_capturing():
        u, delta, A, B, C, D, z, delta_bias = (
            t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor else t
            for t in (u, delta, A, B, C, D, z, delta_bias)
        )
    _check(u, delta, A, B, C, D, z, delta_bias)
    fn = _ALL_BACKENDS[get_backend(u)]
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
