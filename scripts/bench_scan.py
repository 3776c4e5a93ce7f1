#!/usr/bin/env python
"""Benchmark the selective-scan backends against the plain step loop ("ref").

For each shape (batch, dim, N, L) it times every available backend, forward and forward+backward, with warm-up
and the median of ``--repeats`` runs, and prints a Markdown table of milliseconds, speed-ups vs the step loop and
the error vs a float64 reference. Inputs look like a Mamba layer's: delta_softplus with the dt-init bias, S4D-real
A = -[1..N], D = 1, z gating.

Error columns: ``max|x - x64| / max|x64|`` for y ("fwd err") and the worst of the gradients of u, delta, A, B, C, D,
z and delta_bias ("grad err"). The float64 reference is the step loop run in float64 for y; for the gradients it is
the float64 torch backend (which the tests hold to the float64 step loop within 1e-12), because the float64 step
loop's backward takes minutes at these lengths.

Example::

    python scripts/bench_scan.py --threads 2 --repeats 5
    python scripts/bench_scan.py --shapes 1,192,16,4096 --backends cpu,torch
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from shared_networks.ops import selective_scan as ss


def make_inputs(b, d, n, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        u=torch.randn(b, d, L, generator=g),
        delta=torch.randn(b, d, L, generator=g) * 0.5,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        B=torch.randn(b, n, L, generator=g),
        C=torch.randn(b, n, L, generator=g),
        D=torch.ones(d),
        z=torch.randn(b, d, L, generator=g),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    )


def leaves(inp, backward, dtype=torch.float32):
    return {k: v.detach().to(dtype, copy=True).requires_grad_(backward) for k, v in inp.items()}


def run(backend, args, backward):
    """One scan (and its backward with a fixed output gradient) on prepared leaves; this is what is timed."""
    for v in args.values():
        v.grad = None
    with ss.use_backend(backend):
        y = ss.selective_scan_fn(**args, delta_softplus=True)
    if not backward:
        return y.detach(), None
    y.backward(torch.full_like(y, 1 / math.sqrt(y.numel())))
    return y.detach(), {k: v.grad for k, v in args.items()}


def timeit(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def rel(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch (and numba) threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (compiles numba on 1st)")
    p.add_argument("--shapes", default="1,192,16,4096;1,96,16,16384", help="'b,d,N,L;...'")
    p.add_argument("--backends", default=None, help="comma list; default: all available (ref always included)")
    p.add_argument("--ref-repeats", type=int, default=None, help="repeats for the slow step loop (default --repeats)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    backends = a.backends.split(",") if a.backends else [x for x in ss.available_backends() if x != "cuda"]
    if "ref" not in backends:
        backends.append("ref")
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, backends {backends}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n"
    )
    print("| shape (b, d, N, L) | backend | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up | fwd err "
          "| grad err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        inp = make_inputs(*shape)
        y64, _ = run("ref", leaves(inp, False, torch.float64), False)
        _, g64 = run("torch", leaves(inp, True, torch.float64), True)
        fwd_args, bwd_args = leaves(inp, False), leaves(inp, True)
        rows, base = [], {}
        for be in ["ref"] + [x for x in backends if x != "ref"]:
            reps = (a.ref_repeats or a.repeats) if be == "ref" else a.repeats
            tf = timeit(lambda: run(be, fwd_args, False), reps, a.warmup)
            tb = timeit(lambda: run(be, bwd_args, True), reps, a.warmup)
            y, _ = run(be, fwd_args, False)
            _, gr = run(be, bwd_args, True)
            err_f = rel(y, y64)
            err_g = max(rel(gr[k], g64[k]) for k in g64)
            base.setdefault("f", tf)
            base.setdefault("b", tb)
            rows.append((be, tf, base["f"] / tf, tb, base["b"] / tb, err_f, err_g))
        for be, tf, sf, tb, sb, ef, eg in rows:
            print(f"| {shape} | {be} | {tf:.1f} | {sf:.1f}x | {tb:.1f} | {sb:.1f}x | {ef:.1e} | {eg:.1e} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
