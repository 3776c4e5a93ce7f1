"""Time one LKM-UNet forward pass of a full reference plan on this machine's CPU (a benchmark, not a test).

Defaults: the 3D abdomen CT plan (FLARE / AbdomenCT, 63.8 M parameters) in MONAI's (x, y, z) layout with its
ROI 192x224x40 (= the official nnU-Net patch 40x224x192 in z, y, x), batch 1, eval mode, no grad, 2 torch threads,
the selective-scan backend that ``auto`` picks (or ``--backend``).

    python scripts/time_lkm_forward.py                      # 3D CT plan, contiguous windows
    python scripts/time_lkm_forward.py --grouping official  # the official strided grouping
    python scripts/time_lkm_forward.py --plan abdomen_mr_2d --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from shared_networks.nets.lkm_unet import LKMUNet, plan_kwargs
from shared_networks.ops import available_backends, get_backend, use_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="abdomen_ct_3d", help="abdomen_ct_3d | abdomen_ct_3d_k333 | abdomen_mr_2d")
    ap.add_argument("--layout", default="monai", choices=("monai", "official"))
    ap.add_argument("--grouping", default="contiguous", choices=("contiguous", "official"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto", help=f"selective-scan backend: auto or one of {available_backends()}")
    ap.add_argument("--repeats", type=int, default=1, help="timed forwards (after one untimed warm-up if > 1)")
    ap.add_argument("--roi", type=int, nargs="+", default=None, help="override the plan's ROI (spatial sizes)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    roi = tuple(args.roi) if args.roi else plan_kwargs(args.plan, args.layout)["roi_size"]
    net = LKMUNet.from_plan(args.plan, layout=args.layout, window_grouping=args.grouping).eval()
    x = torch.randn(1, net.in_channels, *roi)
    backend = args.backend if args.backend != "auto" else get_backend(x)
    times = []
    with torch.inference_mode(), use_backend(None if args.backend == "auto" else args.backend):
        runs = args.repeats + (1 if args.repeats > 1 else 0)
        for i in range(runs):
            t0 = time.perf_counter()
            y = net(x)
            dt = time.perf_counter() - t0
            if args.repeats == 1 or i > 0:
                times.append(dt)
            print(f"forward {i}: {dt:.2f} s", flush=True)
    print(json.dumps({
        "plan": args.plan, "layout": args.layout, "window_grouping": args.grouping, "roi": list(roi),
        "params": sum(p.numel() for p in net.parameters()), "output": list(y.shape), "scan_backend": backend,
        "threads": args.threads, "seconds": [round(t, 2) for t in times], "best_s": round(min(times), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }, indent=1))


if __name__ == "__main__":
    main()
