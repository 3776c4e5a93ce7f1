"""Selective scan: every backend against a float64 step-by-step reference (outputs, last state, all gradients),
backend selection (auto / env var / context manager / numba fallback) and input validation.

The numba kernels compile on first use (~5 s of CPU) and are cached on disk afterwards (numba's cache=True).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared_networks.ops import available_backends, get_backend, selective_scan_fn, selective_scan_ref, use_backend
from shared_networks.ops import selective_scan as ss

ENV = "SHARED_NETWORKS_SCAN_BACKEND"
BACKENDS = [b for b in ("cpu", "torch", "ref")]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make(b, d, n, L, groups=None, seed=0, dtype=torch.float64, delta_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    bc = (b, groups, n, L) if groups else (b, n, L)
    return dict(
        u=torch.randn(b, d, L, generator=g, dtype=dtype),
        delta=torch.randn(b, d, L, generator=g, dtype=dtype) * delta_scale,
        A=-torch.exp(torch.randn(d, n, generator=g, dtype=dtype) * 0.5),
        B=torch.randn(*bc, generator=g, dtype=dtype),
        C=torch.randn(*bc, generator=g, dtype=dtype),
        D=torch.randn(d, generator=g, dtype=dtype),
        z=torch.randn(b, d, L, generator=g, dtype=dtype),
        delta_bias=torch.randn(d, generator=g, dtype=dtype) * 0.3,
    )


def run(fn, inp, opts, dtype, grad_names=NAMES, seed=1):
    """y, last state and the gradients (float64) of a random linear loss of both."""
    kw = {k: v for k, v in inp.items() if opts.get(k, True)}
    args = {k: v.detach().to(dtype).requires_grad_(k in grad_names) for k, v in kw.items()}
    y, last = fn(**args, delta_softplus=opts.get("softplus", True), return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * gy).sum() + (last.double() * gl).sum()
    if any(a.requires_grad for a in args.values()):
        loss.backward()
    grads = {k: (None if a.grad is None else a.grad.double()) for k, a in args.items()}
    return y.detach().double(), last.detach().double(), grads


def assert_close(x, ref, rtol, what):
    """max |x - ref| <= rtol * max |ref| (relative to the tensor's scale, elementwise-relative is meaningless at 0)."""
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = (x - ref).abs().max().item() if x.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * scale + 1e-30, f"{what}: max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def scan_with(backend):
    def fn(**kw):
        with use_backend(backend):
            return selective_scan_fn(**kw)

    return fn


def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """Direct scalar transcription of the recurrence (float64 numpy), checks the ground truth itself."""
    u, delta, A, B, C = (t.double().numpy() for t in (u, delta, A, B, C))
    b, d, L = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, None], C[:, None]
    per = d // B.shape[1]
    y = np.zeros((b, d, L))
    last = np.zeros((b, d, n))
    for bi in range(b):
        for di in range(d):
            h = np.zeros(n)
            for t in range(L):
                dt = delta[bi, di, t] + (delta_bias[di].item() if delta_bias is not None else 0.0)
                if softplus:
                    dt = dt if dt > 20 else math.log1p(math.exp(dt))
                for k in range(n):
                    h[k] = math.exp(dt * A[di, k]) * h[k] + dt * B[bi, di // per, k, t] * u[bi, di, t]
                yt = float(np.dot(h, C[bi, di // per, :, t]))
                if D is not None:
                    yt += D[di].item() * u[bi, di, t]
                if z is not None:
                    zt = z[bi, di, t].item()
                    yt *= zt / (1 + math.exp(-zt))
                y[bi, di, t] = yt
            last[bi, di] = h
    return torch.from_numpy(y), torch.from_numpy(last)


# ------------------------------------------------------------------------------------ ground truth
@pytest.mark.parametrize("groups", [None, 2])
def test_reference_matches_direct_transcription(groups):
    inp = make(2, 4, 3, 6, groups=groups)
    inp["delta"][0, 0, 0] = 25.0  # softplus threshold branch
    y, last = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True)
    yn, ln = naive_scan(**inp, softplus=True)
    assert_close(y, yn, 1e-13, "y")
    assert_close(last, ln, 1e-13, "last")


# ------------------------------------------------------------------------------ backends vs float64
CASES = {
    # name: (b, d, N, L, groups, options)
    "all_options_L37": (2, 8, 4, 37, None, {}),
    "L1": (1, 6, 3, 1, None, {}),
    "grouped2": (2, 8, 4, 37, 2, {}),
    # 20 channels per group (< one 32-lane block), 77 steps (3 tiles, last one partial)
    "grouped2_partial_blocks": (2, 40, 5, 77, 2, {}),
    # 70 channels = 32 + 32 + 6 lanes
    "channel_tail": (1, 70, 4, 45, None, {}),
    "no_D": (2, 8, 4, 37, None, {"D": False}),
    "no_z": (2, 8, 4, 37, 2, {"z": False}),
    "no_bias": (2, 8, 4, 37, None, {"delta_bias": False}),
    "no_softplus": (2, 8, 4, 37, None, {"softplus": False, "delta_bias": False}),
    "bare": (1, 5, 2, 33, None, {"D": False, "z": False, "delta_bias": False, "softplus": False}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_float64_reference(backend, case):
    b, d, n, L, groups, opts = CASES[case]
    inp = make(b, d, n, L, groups=groups)
    if not opts.get("softplus", True):
        inp["delta"] = inp["delta"].abs()  # raw delta must be a step size without softplus
    y64, l64, g64 = run(selective_scan_ref, inp, opts, torch.float64)
    y, last, g = run(scan_with(backend), inp, opts, torch.float32)
    assert_close(y, y64, 1e-5, f"{backend}/{case} y")
    assert_close(last, l64, 1e-5, f"{backend}/{case} last state")
    for k in g64:
        assert g[k] is not None, f"{backend}/{case}: no gradient for {k}"
        assert_close(g[k], g64[k], 1e-5, f"{backend}/{case} grad {k}")


def test_torch_backend_float64_exact_and_chunk_independent():
    inp = make(2, 6, 3, 50, groups=2)
    y64, l64, g64 = run(selective_scan_ref, inp, {}, torch.float64)
    for chunk in (None, 1, 7, 50):
        fn = lambda **kw: ss.selective_scan_torch(**kw, chunk=chunk)  # noqa: E731
        y, last, g = run(fn, inp, {}, torch.float64)
        assert_close(y, y64, 1e-12, f"chunk {chunk} y")
        assert_close(last, l64, 1e-12, f"chunk {chunk} last")
        for k in g64:
            assert_close(g[k], g64[k], 1e-12, f"chunk {chunk} grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_underflowing_decays_stay_finite_and_correct(backend):
    # delta * A down to ~ -300: exp underflows (to 0 in float32); nothing may divide by a decay product
    inp = make(1, 6, 4, 40, delta_scale=1.0)
    inp["delta"] = inp["delta"].abs() * 40
    inp["A"] = inp["A"] * 4
    y64, l64, g64 = run(selective_scan_ref, inp, {"softplus": False}, torch.float64)
    y, last, g = run(scan_with(backend), inp, {"softplus": False}, torch.float32)
    assert_close(y, y64, 1e-5, "y")
    assert_close(last, l64, 1e-5, "last")
    for k in g64:
        assert_close(g[k], g64[k], 1e-5, f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("subset", [(), ("B",), ("A", "z"), ("delta_bias",), ("u", "C", "D")])
def test_requires_grad_on_any_subset(backend, subset):
    inp = make(2, 6, 3, 37, groups=2)
    _, _, g64 = run(selective_scan_ref, inp, {}, torch.float64, grad_names=subset)
    _, _, g = run(scan_with(backend), inp, {}, torch.float32, grad_names=subset)
    for k in NAMES:
        assert (g[k] is None) == (k not in subset), k
        if k in subset:
            assert_close(g[k], g64[k], 1e-5, f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_last_state_only(backend):
    inp = {k: v.float().requires_grad_() for k, v in make(1, 5, 3, 20).items()}
    with use_backend(backend):
        _, last = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True)
    last.square().sum().backward()
    ref = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    _, l64 = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True)
    l64.square().sum().backward()
    assert {k for k in ref if ref[k].grad is None} == {"C", "D", "z"}  # they act on y only
    for k in inp:
        if ref[k].grad is None:  # None, or zeros from the fused backward
            assert inp[k].grad is None or not inp[k].grad.any(), k
        else:
            assert_close(inp[k].grad.double(), ref[k].grad, 1e-5, f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    inp = make(2, 6, 3, 21, groups=3, dtype=torch.float32)
    def strided(x):  # same values, every other element of a twice-as-large buffer
        return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]

    nc = {
        "u": inp["u"].transpose(1, 2).contiguous().transpose(1, 2),
        "delta": strided(inp["delta"]),
        "A": inp["A"].t().contiguous().t(),
        "B": inp["B"].transpose(2, 3).contiguous().transpose(2, 3),
        "C": strided(inp["C"]),
        "D": strided(inp["D"]),
        "z": inp["z"].transpose(0, 2).contiguous().transpose(0, 2),
        "delta_bias": inp["delta_bias"].expand(3, -1)[1],
    }
    assert not any(nc[k].is_contiguous() for k in ("u", "delta", "A", "B", "C", "D", "z"))
    with use_backend(backend):
        y1, l1 = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True)
        y2, l2 = selective_scan_fn(**nc, delta_softplus=True, return_last_state=True)
    assert torch.equal(y1, y2) and torch.equal(l1, l2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_upcast(dtype):
    inp = make(1, 8, 4, 30, dtype=torch.float32)
    half = {k: v.to(dtype) for k, v in inp.items()}
    assert get_backend(half["u"]) == "cpu"
    y, last = selective_scan_fn(**half, delta_softplus=True, return_last_state=True)
    assert y.dtype == dtype and last.dtype == torch.float32
    y64, l64 = selective_scan_ref(**{k: v.double() for k, v in half.items()}, delta_softplus=True,
                                  return_last_state=True)
    assert_close(y.double(), y64, 1e-2, "y")  # only the final rounding to the half type
    assert_close(last.double(), l64, 1e-5, "last")


def test_cpu_backend_deterministic_across_thread_counts():
    inp = {k: v.float().requires_grad_() for k, v in make(2, 70, 4, 40, groups=2).items()}
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            for v in inp.values():
                v.grad = None
            with use_backend("cpu"):
                y = selective_scan_fn(**inp, delta_softplus=True)
            y.sin().sum().backward()
            outs.append([y.detach()] + [v.grad.clone() for v in inp.values()])
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


_FORK_INPUT = make(1, 64, 4, 30, dtype=torch.float32)


def _scan_in_child(queue):
    # only the scan runs in the child: PyTorch's own OpenMP ops can hang after a fork (GNU OpenMP), which is not
    # what this test is about (DataLoader workers run with 1 thread anyway)
    torch.set_num_threads(2)
    with use_backend("cpu"):
        y = selective_scan_fn(**_FORK_INPUT, delta_softplus=True)
    queue.put(float(y.double().sum()))


def test_cpu_backend_after_fork_and_from_threads():
    """The kernel thread pool must work in a forked child (its threads do not survive the fork) and with
    concurrent callers."""
    import multiprocessing
    import threading

    inp = _FORK_INPUT
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with use_backend("cpu"):
            expected = selective_scan_fn(**inp, delta_softplus=True)  # starts the pool in this process
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_scan_in_child, args=(queue,), daemon=True)
        proc.start()
        proc.join(60)
        if proc.exitcode is None:
            proc.kill()
        assert proc.exitcode == 0, "scan in a forked child failed or hung"
        assert queue.get(timeout=5) == pytest.approx(float(expected.double().sum()), rel=1e-12)
        results = [None] * 4

        def worker(i):
            with use_backend("cpu"):
                results[i] = selective_scan_fn(**inp, delta_softplus=True)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(r, expected) for r in results)
    finally:
        torch.set_num_threads(old)


def test_zero_length_and_inference_mode():
    inp = make(1, 4, 2, 0, dtype=torch.float32)
    for backend in BACKENDS:
        with use_backend(backend):
            y, last = selective_scan_fn(**inp, return_last_state=True)
        assert y.shape == (1, 4, 0) and torch.equal(last, torch.zeros(1, 4, 2))
    inp = make(1, 4, 2, 9, dtype=torch.float32)
    with torch.inference_mode(), use_backend("cpu"):
        y = selective_scan_fn(**inp)
    assert_close(y.double(), selective_scan_ref(**{k: v.double() for k, v in inp.items()}), 1e-5, "y")


def test_exp_polynomial_accuracy():
    from shared_networks.ops import _numba_scan

    x = np.concatenate([np.linspace(-700, 700, 200001), np.linspace(-1e-3, 1e-3, 1001), [0.0]])
    got = _numba_scan.exp_vec(x)
    assert np.max(np.abs(got / np.exp(x) - 1)) < 2e-10
    small = x[(np.abs(x) < 1e-3) & (x != 0)]  # 1 - exp(x) must keep its relative accuracy for tiny steps
    assert np.max(np.abs((_numba_scan.exp_vec(small) - 1) / np.expm1(small) - 1)) < 5e-10
    special = _numba_scan.exp_vec(np.array([np.nan, -np.inf, -1e4, np.inf]))
    assert np.isnan(special[0]) and 0 <= special[1] < 1e-300 and 0 <= special[2] < 1e-300 and special[3] > 1e300


def test_fused_softplus_matches_torch():
    from shared_networks.ops import _numba_scan

    x = torch.cat([torch.linspace(-700, 800, 100001, dtype=torch.float64), torch.linspace(-3, 3, 10001,
                   dtype=torch.float64), torch.tensor([19.999, 20.0, 20.001, 0.0], dtype=torch.float64)])
    x.requires_grad_()
    sp = F.softplus(x)  # threshold 20: x itself (and gradient 1) above it
    (grad,) = torch.autograd.grad(sp.sum(), x)
    sp = sp.detach().numpy()
    got, got_grad = _numba_scan.softplus_vec(x.detach().numpy())
    assert np.max(np.abs(got - sp) / sp) < 5e-10
    assert np.max(np.abs(got_grad - grad.numpy()) / grad.numpy()) < 5e-10
    assert np.all(np.asarray(_numba_scan.softplus_vec(np.array([-1e4]))) < 1e-300)  # exp clamped at -708


# ---------------------------------------------------------------------------------- backend choice
def test_auto_backend_choice(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert "cpu" in available_backends() and "torch" in available_backends() and "ref" in available_backends()
    assert get_backend(torch.zeros(1, 1, 1)) == "cpu"
    assert get_backend(torch.zeros(1, 1, 1, dtype=torch.bfloat16)) == "cpu"
    assert get_backend(torch.zeros(1, 1, 1, dtype=torch.float64)) == "torch"
    assert get_backend(torch.zeros(1, 1, 1, device="meta")) == "torch"
    if ss._mamba_scan_fn is None:
        assert "cuda" not in available_backends()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_auto_uses_torch_backend_while_tracing(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    inp = make(1, 4, 2, 6, dtype=torch.float32)
    seen = []

    def f(u):
        seen.append(get_backend(u))
        return selective_scan_fn(u, **{k: v for k, v in inp.items() if k != "u"}, delta_softplus=True)

    traced = torch.jit.trace(f, (inp["u"],), check_trace=False)
    assert seen == ["torch"]
    u2 = torch.randn_like(inp["u"])
    assert_close(traced(u2).double(), f(u2).double(), 1e-5, "traced scan")
    assert seen[-1] == "cpu"


def test_numba_missing_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(ss, "_numba_mod", False)
    assert "cpu" not in available_backends()
    assert get_backend(torch.zeros(1, 1, 1)) == "torch"
    with pytest.raises(RuntimeError, match="needs numba"), use_backend("cpu"):
        get_backend(torch.zeros(1, 1, 1))


def _spy(monkeypatch):
    calls = []
    for name, fn in list(ss._ALL_BACKENDS.items()):
        def wrapped(*a, _fn=fn, _name=name):
            calls.append(_name)
            return _fn(*a)

        monkeypatch.setitem(ss._ALL_BACKENDS, name, wrapped)
    return calls


def test_env_var_and_context_manager(monkeypatch):
    calls = _spy(monkeypatch)
    inp = make(1, 4, 2, 5, dtype=torch.float32)
    monkeypatch.setenv(ENV, "ref")
    assert get_backend(inp["u"]) == "ref"
    selective_scan_fn(**inp)
    monkeypatch.setenv(ENV, " Torch ")
    selective_scan_fn(**inp)
    with use_backend("cpu"):  # the context manager wins over the variable
        assert get_backend(inp["u"]) == "cpu"
        selective_scan_fn(**inp)
        with use_backend("ref"):
            selective_scan_fn(**inp)
        selective_scan_fn(**inp)
        with use_backend("auto"):
            assert get_backend(inp["u"]) == "cpu"
            assert get_backend(inp["u"].double()) == "torch"
    selective_scan_fn(**inp)
    assert calls == ["ref", "torch", "cpu", "ref", "cpu", "torch"]
    monkeypatch.setenv(ENV, "auto")
    assert get_backend(inp["u"]) == "cpu"
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match="SHARED_NETWORKS_SCAN_BACKEND='fast'"):
        selective_scan_fn(**inp)
    with pytest.raises(ValueError, match="unknown selective-scan backend 'fast'"), use_backend("fast"):
        pass


def test_forced_backend_that_cannot_run(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    if ss._mamba_scan_fn is None:
        with pytest.raises(RuntimeError, match="mamba-ssm"), use_backend("cuda"):
            selective_scan_fn(**make(1, 4, 2, 5, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="CPU"), use_backend("cpu"):
        get_backend(torch.zeros(1, 1, 1, device="meta"))


# ------------------------------------------------------------------------------------ validation
def _bad(**over):
    inp = make(2, 4, 3, 5, dtype=torch.float32)
    inp.update(over)
    return inp


@pytest.mark.parametrize(
    "inp, exc, msg",
    [
        (_bad(u=torch.zeros(4, 5)), ValueError, r"u must be \(batch, dim, L\)"),
        (_bad(delta=torch.zeros(2, 4, 6)), ValueError, "delta .* must match u"),
        (_bad(z=torch.zeros(2, 4, 6)), ValueError, "z .* must match u"),
        (_bad(A=torch.zeros(3, 3)), ValueError, r"A must be \(dim=4, N\)"),
        (_bad(B=torch.zeros(2, 2, 5)), ValueError, r"B must be \(batch=2, N=3, L=5\)"),
        (_bad(C=torch.zeros(2, 3, 3, 5)), ValueError, "C has 3 groups, which does not divide dim=4"),
        (_bad(B=torch.zeros(1, 3, 5)), ValueError, "B must be"),
        (_bad(D=torch.zeros(5)), ValueError, r"D must be \(dim=4,\)"),
        (_bad(delta_bias=torch.zeros(4, 1)), ValueError, r"delta_bias must be \(dim=4,\)"),
        (_bad(A=torch.zeros(4, 3, dtype=torch.complex64)), TypeError, "A must be a real floating-point"),
        (_bad(u=torch.zeros(2, 4, 5, dtype=torch.int64)), TypeError, "u must be a real floating-point"),
        (_bad(B=np.zeros((2, 3, 5))), TypeError, "B must be a torch.Tensor"),
        (_bad(D=torch.zeros(4, device="meta")), ValueError, "D is on meta but u is on cpu"),
    ],
)
def test_clear_errors_for_bad_inputs(inp, exc, msg):
    with pytest.raises(exc, match=msg):
        selective_scan_fn(**inp)
