#!/usr/bin/env python
"""Time and memory of every bundle's inference and training step, next to MONAI's SwinUNETR and SegResNet.

For each folder in ``bundles/`` the script parses the bundle's own ``configs/inference.json`` (``network_def`` and
``inferer``, so ROI, overlap, sliding-window batch and blending are what the bundle really runs) and
``configs/train.json`` (network, ``loss``, ``optimizer``, ROI), and measures, each phase in a fresh subprocess so
that peak memories do not mix:

* inference: one call of the bundle's inferer on a synthetic image of realistic size (512x512x150 for bundles that
  take CT volumes, including 2-D networks applied slice by slice with ``SliceInferer``; 1024x1024 for 2-D bundles),
  with the bundle's number of input channels, batch 1, eval mode, no grad. A forward of one ROI window first
  (``warm-up s``) absorbs one-off costs such as numba compilation;
* training: one iteration (forward, the bundle's loss, backward, the bundle's optimizer step) on a batch of 1 at
  the training ROI; the first iteration is the warm-up, the second one is timed;
* parameters (sum of ``numel``) and FLOPs of one forward of one ROI window, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; convolutions, linears, matmuls only).
  FlopCounterMode does not see the Mamba selective scan, so its cost is added analytically as
  9*B*D*L*N (+ B*D*L each for the D skip and the z gate) per scan, the estimate VMamba's FLOP counter uses.

The same run benchmarks MONAI's SwinUNETR and SegResNet (3-D and/or 2-D forms) on the same input, writes a Markdown
table (``--out``) and a bar chart (``--png``), and records the machine (CPU, threads, load average, versions,
selective-scan backend).

Examples::

    python scripts/benchmark.py                                   # all bundles + comparators, CPU
    python scripts/benchmark.py --bundles unetr_pp_btcv_ct_segmentation --comparators segresnet_3d --quick
    python scripts/benchmark.py --device cuda --timeout 300       # GPU (mamba-ssm kernels when installed)

A phase that runs longer than ``--timeout`` seconds is killed and reported as ``timeout`` in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO / "bundles"

#: realistic inputs (spatial sizes), and the small ones of ``--quick``
SIZES = {False: {3: (512, 512, 150), 2: (1024, 1024)}, True: {3: (64, 64, 32), 2: (128, 128)}}

#: MONAI reference networks. 3-D settings are the Model Zoo's (swin_unetr_btcv_segmentation: feature_size 48, ROI
#: 96^3, sw_batch_size 4, overlap 0.5; wholeBody_ct_segmentation: SegResNet init_filters 32, blocks 1-2-2-4, ROI 96^3);
#: the 2-D forms use spatial_dims=2 at a 512^2 ROI. ``quick_roi`` keeps ``--quick`` runs small.
COMPARATORS = {
    "swinunetr_3d": dict(
        label="MONAI SwinUNETR 3D", spatial_dims=3, roi=(96, 96, 96), quick_roi=(32, 32, 32), in_channels=1,
        out_channels=14, sw_batch_size=4, overlap=0.5,
    ),
    "segresnet_3d": dict(
        label="MONAI SegResNet 3D", spatial_dims=3, roi=(96, 96, 96), quick_roi=(32, 32, 32), in_channels=1,
        out_channels=14, sw_batch_size=4, overlap=0.5,
    ),
    "swinunetr_2d": dict(
        label="MONAI SwinUNETR 2D", spatial_dims=2, roi=(512, 512), quick_roi=(64, 64), in_channels=3,
        out_channels=2, sw_batch_size=4, overlap=0.5,
    ),
    "segresnet_2d": dict(
        label="MONAI SegResNet 2D", spatial_dims=2, roi=(512, 512), quick_roi=(64, 64), in_channels=3,
        out_channels=2, sw_batch_size=4, overlap=0.5,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the parent and the workers
# ----------------------------------------------------------------------------------------------------------------


def list_bundles() -> list[str]:
    """Bundle folder names (those with a configs/inference.json), sorted."""
    if not BUNDLES_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "inference.json").is_file())


def bundle_input_dims(bundle_dir: Path) -> int:
    """Spatial dims of the images the bundle takes: 3 for volumes (also 2-D nets run slice by slice), else 2."""
    cfg = json.loads((bundle_dir / "configs" / "inference.json").read_text())
    inferer = cfg.get("inferer", {})
    if isinstance(inferer, dict) and "SliceInferer" in str(inferer.get("_target_", "")):
        return 3
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    shape = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    return 3 if len(shape) == 3 else 2


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


# ----------------------------------------------------------------------------------------------------------------
# worker (runs in its own subprocess, one phase of one model)
# ----------------------------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20  # Linux reports KiB, macOS bytes


@contextlib.contextmanager
def count_scans():
    """Replace the selective scan by an analytic FLOP counter that returns zeros (for FLOP counting only).

    Yields a one-element list holding the running FLOP count. Every loaded module that imported
    ``shared_networks.ops.selective_scan_fn`` by name is patched, and restored afterwards.
    """
    import torch

    total = [0]
    try:
        from shared_networks.ops import selective_scan as ss_mod
    except ImportError:
        yield total
        return
    orig = ss_mod.selective_scan_fn

    def counting_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
        b, d, length = u.shape
        n = A.shape[1]
        total[0] += 9 * b * d * length * n + (b * d * length if D is not None else 0)
        total[0] += b * d * length if z is not None else 0
        y = torch.zeros_like(u)
        return (y, u.new_zeros(b, d, n)) if return_last_state else y

    patched = [m for m in list(sys.modules.values()) if getattr(m, "selective_scan_fn", None) is orig]
    for m in patched:
        m.selective_scan_fn = counting_scan
    try:
        yield total
    finally:
        for m in patched:
            m.selective_scan_fn = orig


def count_flops(net, x) -> tuple[int, int]:
    """(FlopCounterMode FLOPs, analytic selective-scan FLOPs) of one forward ``net(x)``.

    FlopCounterMode has no formula for the fused kernels PyTorch picks at inference (the CPU flash
    ``scaled_dot_product_attention``, ``nn.MultiheadAttention``'s fast path), so attention would count as zero: the
    forward runs with the math SDPA backend and the MHA fast path off, which compute the same products as matmuls.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), count_scans() as scan:
            with FlopCounterMode(display=False) as fcm:
                net(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(fcm.get_total_flops()), int(scan[0])


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scan_backend(device) -> str:
    try:
        import torch
        from shared_networks.ops import available_backends, get_backend

        return f"{get_backend(torch.empty(1, device=device))} (available: {', '.join(available_backends())})"
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({type(e).__name__})"


def _parser(bundle_dir: Path, config: str, device: str, overrides: dict | None = None):
    """The bundle's config with bundle_root, device and the ``--override`` values that exist in it."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(bundle_dir / "configs" / config))
    p.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    p["bundle_root"] = str(bundle_dir)
    p["device"] = f"$torch.device({device!r})"
    for key, value in (overrides or {}).items():
        if key in p:
            p[key] = value
    return p


def _int_list(v):
    if isinstance(v, (list, tuple)) and v and all(isinstance(s, int) and s > 0 for s in v):
        return [int(s) for s in v]
    return None


def _build_comparator(name: str):
    from monai.networks.nets import SegResNet, SwinUNETR

    c = COMPARATORS[name]
    if name.startswith("swinunetr"):
        return SwinUNETR(c["in_channels"], c["out_channels"], feature_size=48, spatial_dims=c["spatial_dims"])
    return SegResNet(
        spatial_dims=c["spatial_dims"], init_filters=32, in_channels=c["in_channels"], out_channels=c["out_channels"],
        blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
    )


class _Counter:
    """Callable wrapper that counts the windows (batch items) the inferer sends through the network."""

    def __init__(self, net, progress=None):
        self.net, self.windows, self.progress = net, 0, progress

    def __call__(self, x, *args, **kwargs):
        out = self.net(x, *args, **kwargs)
        self.windows += int(x.shape[0])
        if self.progress is not None:
            self.progress(self.windows)
        return out


def expected_windows(inferer, size) -> int | None:
    """Number of ROI windows ``inferer`` will evaluate on an image of spatial ``size`` (None if unknown)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers import SlidingWindowInferer, SliceInferer
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import ensure_tuple_rep, fall_back_tuple

    if not isinstance(inferer, SlidingWindowInferer):
        return 1
    try:
        size, slices = tuple(size), 1
        if isinstance(inferer, SliceInferer):
            slices = size[inferer.spatial_dim]
            size = tuple(s for i, s in enumerate(size) if i != inferer.spatial_dim)
        roi_size = inferer.orig_roi_size if isinstance(inferer, SliceInferer) else inferer.roi_size  # __call__ edits
        roi = fall_back_tuple(roi_size, size)
        padded = tuple(max(s, r) for s, r in zip(size, roi))  # sliding_window_inference pads up to the ROI
        interval = _get_scan_interval(padded, roi, len(padded), ensure_tuple_rep(inferer.overlap, len(padded)))
        return slices * len(dense_patch_slices(padded, roi, interval))
    except Exception:  # noqa: BLE001 - private MONAI helpers may change; the count is informational
        return None


def _describe_inferer(inferer) -> str:
    from monai.inferers import SlidingWindowInferer

    name = type(inferer).__name__
    if isinstance(inferer, SlidingWindowInferer):
        extra = f", spatial_dim {inferer.spatial_dim}" if hasattr(inferer, "spatial_dim") else ""
        return (f"{name}(roi {_fmt_shape(inferer.roi_size)}, sw_batch_size {inferer.sw_batch_size}, "
                f"overlap {inferer.overlap}, mode {getattr(inferer.mode, 'value', inferer.mode)}{extra})")
    return name


def _setup_infer(spec, device):
    """-> network (eval), inferer, in_channels, ROI (spatial), input spatial shape."""
    from monai.inferers import SlidingWindowInferer, SliceInferer
    from monai.utils import fall_back_tuple

    quick = spec["quick"]
    if spec["kind"] == "comparator":
        c = COMPARATORS[spec["name"]]
        roi = tuple(c["quick_roi"] if quick else c["roi"])
        inferer = SlidingWindowInferer(roi, sw_batch_size=c["sw_batch_size"], overlap=c["overlap"], mode="gaussian")
        size = tuple(spec["sizes"][str(c["spatial_dims"])])
        return _build_comparator(spec["name"]), inferer, c["in_channels"], roi, size
    bundle_dir = Path(spec["bundle_dir"])
    p = _parser(bundle_dir, "inference.json", spec["device"], spec.get("overrides"))
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    in_ch = int(meta["network_data_format"]["inputs"]["image"]["num_channels"])
    net = p.get_parsed_content("network_def")
    inferer = p.get_parsed_content("inferer")
    dims = 3 if isinstance(inferer, SliceInferer) else bundle_input_dims(bundle_dir)
    size = tuple(spec["sizes"][str(dims)])
    if isinstance(inferer, SlidingWindowInferer):
        roi_size = inferer.roi_size
        if isinstance(inferer, SliceInferer):  # 2-D windows over the slices of a volume
            roi_size = inferer.orig_roi_size
            size2d = tuple(s for i, s in enumerate(size) if i != inferer.spatial_dim)
            roi = tuple(fall_back_tuple(roi_size, size2d))
        else:
            roi = tuple(fall_back_tuple(roi_size, size))  # images smaller than the ROI are padded up to it
    else:  # SimpleInferer and friends: the whole image is one window
        roi = size
    return net, inferer, in_ch, roi, size


def _worker_infer(spec, result, save):
    import torch

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    result["baseline_rss_mb"] = _rss_mb()
    net, inferer, in_ch, roi, size = _setup_infer(spec, device)
    net = net.to(device).eval()
    result.update(
        params=int(sum(p.numel() for p in net.parameters())), roi=list(roi), input=[in_ch, *size],
        inferer=_describe_inferer(inferer), scan_backend=_scan_backend(device),
    )
    save()
    window = torch.rand(1, in_ch, *roi, device=device)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        net(window)
        _sync(device)
        result["warmup_s"] = time.perf_counter() - t0
        save()
        result["flops"], result["scan_flops"] = count_flops(net, window)
        save()
        del window
        image = torch.rand(1, in_ch, *size, device=device)
        result["windows_expected"] = expected_windows(inferer, size)
        t0 = 0.0

        def progress(done):  # lets the parent extrapolate a run it had to kill at the timeout
            result["windows_done"], result["infer_elapsed_s"] = done, time.perf_counter() - t0
            if device.type == "cpu":
                result["infer_peak_mb_partial"] = _peak_rss_mb()
            save()

        counter = _Counter(net, progress)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        out = inferer(image, counter)
        _sync(device)
        result["infer_s"] = time.perf_counter() - t0
    first = out[0] if isinstance(out, (list, tuple)) else out
    result["output"] = list(first.shape[1:])
    result["windows"] = counter.windows
    result["infer_peak_mb"] = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    )


def _train_setup(spec, device):
    """-> network (train mode), loss or None, loss name, optimizer or None, in_channels, out_channels, ROI."""
    import torch

    if spec["kind"] == "comparator":
        from monai.losses import DiceCELoss

        c = COMPARATORS[spec["name"]]
        net = _build_comparator(spec["name"]).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
        roi = c["quick_roi"] if spec["quick"] else c["roi"]
        loss = DiceCELoss(to_onehot_y=True, softmax=True)
        return net, loss, "DiceCELoss", opt, "AdamW", c["in_channels"], c["out_channels"], list(roi)
    bundle_dir = Path(spec["bundle_dir"])
    cfg_name = "train.json" if (bundle_dir / "configs" / "train.json").is_file() else "inference.json"
    p = _parser(bundle_dir, cfg_name, spec["device"], spec.get("overrides"))
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    in_ch = int(fmt["inputs"]["image"]["num_channels"])
    out_ch = int(fmt["outputs"]["pred"]["num_channels"])
    net = p.get_parsed_content("network" if "network" in p else "network_def").to(device)
    roi = None
    for key in ("roi_size", "patch_size", "train#roi_size", "train#patch_size"):
        if key in p:
            roi = _int_list(p.get_parsed_content(key))
            if roi:
                break
    if roi is None:
        roi = _int_list(fmt["inputs"]["image"]["spatial_shape"])
    if roi is None:
        raise ValueError(f"{bundle_dir.name}: no training ROI found (roi_size / patch_size / metadata spatial_shape)")
    loss, loss_name = None, None
    if "loss" in p:
        try:
            loss = p.get_parsed_content("loss")
            loss_name = type(loss).__name__
            inner = getattr(loss, "loss", None)
            if inner is not None and not isinstance(inner, str):
                loss_name += f"({type(inner).__name__})"
        except Exception as e:  # noqa: BLE001 - fall back to DiceCE, reported in the table notes
            loss_name = f"unparsable loss ({type(e).__name__})"
    opt, opt_name = None, None
    if "optimizer" in p:
        try:
            opt = p.get_parsed_content("optimizer")
            ids = {id(q) for g in opt.param_groups for q in g["params"]}
            if ids != {id(q) for q in net.parameters()}:
                opt = None  # the optimizer would not update this network
            else:
                opt_name = type(opt).__name__
        except Exception:  # noqa: BLE001 - fall back to AdamW, reported
            opt = None
    if opt is None:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        opt_name = "AdamW (fallback)"
    return net, loss, loss_name, opt, opt_name, in_ch, out_ch, roi


def _loss_and_target(out, loss, out_ch, roi, device):
    """Pick a target the bundle's loss accepts (class indices, else a binary map shaped like the output)."""
    import torch
    from monai.losses import DiceCELoss

    first = out[0] if isinstance(out, (list, tuple)) else out
    k = max(out_ch, 2)
    candidates = [
        torch.randint(0, k, (1, 1, *roi), device=device).float(),
        (torch.rand(first.shape, device=device) > 0.5).float(),
    ]
    if loss is not None:
        for target in candidates:
            try:
                value = loss(out, target)
            except Exception:  # noqa: BLE001 - try the next target layout
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1 and bool(torch.isfinite(value)):
                return loss, target, None
    fallback = DiceCELoss(to_onehot_y=out_ch > 1, softmax=out_ch > 1, sigmoid=out_ch == 1)

    def fb(o, t):
        return fallback(o[0] if isinstance(o, (list, tuple)) else o, t)

    return fb, candidates[0], "DiceCELoss (fallback)"


def _worker_train(spec, result, save):
    import torch

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    result["baseline_rss_mb"] = _rss_mb()
    net, loss, loss_name, opt, opt_name, in_ch, out_ch, roi = _train_setup(spec, device)
    net.train()
    result.update(train_roi=list(roi), loss=loss_name, optimizer=opt_name)
    save()
    x = torch.rand(1, in_ch, *roi, device=device)
    target = loss_fn = None
    for it in range(2):  # iteration 0 = warm-up (compilation, optimizer state), iteration 1 = timed
        if it == 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = net(x)
        if loss_fn is None:
            loss_fn, target, fallback_name = _loss_and_target(out, loss, out_ch, roi, device)
            if fallback_name:
                result["loss"] = fallback_name if loss_name is None else f"{fallback_name}; bundle: {loss_name}"
        value = loss_fn(out, target)
        value.backward()
        opt.step()
        _sync(device)
        dt = time.perf_counter() - t0
        result["train_warmup_s" if it == 0 else "train_s"] = dt
        result["loss_value"] = float(value.detach())
        del out, value
        save()
    result["train_peak_mb"] = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    )


def _error_text(e: BaseException) -> str:
    """One line: the root cause (MONAI's config errors wrap it) and, if different, the outer error."""

    def line(x):
        text = str(x).strip().splitlines()
        return f"{type(x).__name__}: {text[0] if text else ''}".strip()

    root, seen = e, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    text = line(root) if root is e else f"{line(root)} (in {line(e)})"
    return text[:300]


def worker_main(spec: dict) -> int:
    """Run one phase of one model; write the (partial, then final) result JSON to spec['out']."""
    import torch

    out = Path(spec["out"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "bundle":
        sys.path.insert(0, spec["bundle_dir"])  # bundles' own scripts/ packages, as ConfigWorkflow does
    result = {"status": "running", "torch_threads": torch.get_num_threads()}

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(out)

    try:
        (_worker_infer if spec["phase"] == "infer" else _worker_train)(spec, result, save)
        result["status"] = "ok"
        save()
        return 0
    except Exception as e:  # noqa: BLE001 - reported in the table, details on stderr
        traceback.print_exc()
        result["status"] = "failed"
        result["error"] = _error_text(e)
        save()
        return 1


# ----------------------------------------------------------------------------------------------------------------
# parent: run the workers, write the table and the chart
# ----------------------------------------------------------------------------------------------------------------


def run_phase(spec: dict, timeout: float, threads: int | None, log) -> dict:
    """Run one worker subprocess; returns its result dict (status ok / failed / timeout)."""
    with tempfile.TemporaryDirectory(prefix="benchmark_") as td:
        spec = dict(spec, out=str(Path(td) / "result.json"))
        env = os.environ.copy()
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
                env[var] = str(threads)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO),
            start_new_session=True,
        )
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        wall = time.perf_counter() - t0
        path = Path(spec["out"])
        result = json.loads(path.read_text()) if path.is_file() else {}
    result["wall_s"] = wall
    if timed_out:
        result["status"] = "timeout"
        result["error"] = f"timeout after {timeout:.0f} s"
    elif result.get("status") != "ok":
        result["status"] = "failed"
        if "error" not in result:
            tail = [ln for ln in (output or "").strip().splitlines() if ln.strip()]
            if proc.returncode == -signal.SIGKILL:  # not our timeout: the kernel's OOM killer, as a rule
                result["error"] = "killed by SIGKILL (out of memory, most likely)"
            else:
                result["error"] = (tail[-1] if tail else f"worker exited with code {proc.returncode}")[:300]
    if result["status"] != "ok" and output:
        log(f"    worker output (last lines):\n      " + "\n      ".join(output.strip().splitlines()[-8:]))
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: str, threads: int | None) -> dict:
    import monai
    import torch

    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": device,
        "git": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "scan_backend": _scan_backend(torch.device(device)),
    }
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = "not installed"
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _num(v, fmt="{:.1f}"):
    return fmt.format(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


def _cell(res: dict, key: str, fmt="{:.1f}") -> str:
    v = _num(res.get(key), fmt)
    if v is not None:
        return v
    status = res.get("status")
    return {"timeout": "timeout", "failed": "failed", "skipped": "—"}.get(status, "—")


def _infer_cell(res: dict) -> str:
    """Inference time; for a run killed at the timeout, the extrapolation from the windows it finished."""
    text = _cell(res, "infer_s")
    done, total, elapsed = res.get("windows_done"), res.get("windows_expected"), res.get("infer_elapsed_s")
    if res.get("status") == "timeout" and done and total and elapsed:
        text += f" (≈{elapsed / done * total:.0f} est.: {done}/{total} windows in {elapsed:.0f} s)"
    return text


def _peak_cell(res: dict) -> str:
    """Inference peak memory; for a run killed at the timeout, the peak it had reached (a lower bound)."""
    if res.get("status") == "timeout" and isinstance(res.get("infer_peak_mb_partial"), (int, float)):
        return f"≥{res['infer_peak_mb_partial']:.0f} (at timeout)"
    return _cell(res, "infer_peak_mb", "{:.0f}")


def _gflops_cell(res: dict) -> str:
    if not isinstance(res.get("flops"), int):
        return _cell(res, "flops")
    text = f"{res['flops'] / 1e9:.1f}"
    if res.get("scan_flops"):
        text += f" + {res['scan_flops'] / 1e9:.2f} scan"
    return text


def render_markdown(report: dict, png_rel: str | None) -> str:
    """The Markdown page for a report (see :func:`main` for its keys)."""
    report = merge_reports([report])
    rows, info, overrides, runs = report["rows"], report["machine"], report["overrides"], report["runs"]
    sizes = {int(k): v for k, v in report["sizes"].items()}
    peak_kind = "GPU peak MB (max_memory_allocated)" if info["device"].startswith("cuda") else "peak RSS MB"

    def load_text(run):
        busy = max(run["load_start"][0], run["load_end"][0]) > info["usable_cpus"]
        return (f"load average (1/5/15 min) {' / '.join(f'{v:.2f}' for v in run['load_start'])} at start, "
                f"{' / '.join(f'{v:.2f}' for v in run['load_end'])} at the end"
                + (" — other processes shared the CPU, so times are upper bounds" if busy else ""))

    lines = ["# Benchmark: bundles vs MONAI SwinUNETR and SegResNet", ""]
    if len(runs) == 1:
        run = runs[0]
        lines += [f"Generated by `{run['command']}` on {run['date']} (git {run['git']}).", ""]
    else:
        lines += [f"Generated in {len(runs)} runs of the script (same machine and settings), merged with "
                  "`--from-json`:", ""]
        lines += [f"- run {i}: `{run['command']}` on {run['date']} (git {run['git']}); selective-scan backend "
                  f"{run['scan_backend']}; {load_text(run)}" for i, run in enumerate(runs, 1)]
        lines.append("")
    lines += [
        "## Machine",
        "",
        f"- CPU: {info['cpu']}; {info['logical_cpus']} logical CPUs, {info['usable_cpus']} usable; "
        f"torch threads {info['threads']}" + (f"; RAM {info['ram_gb']:.1f} GiB" if info.get("ram_gb") else ""),
        f"- device: `{info['device']}`" + (f" ({info['gpu']})" if info.get("gpu") else ""),
        f"- Python {info['python']}, torch {info['torch']}, MONAI {info['monai']}, numba {info['numba']}",
    ]
    if len(runs) == 1:
        lines += [f"- selective-scan backend: {runs[0]['scan_backend']}", f"- {load_text(runs[0])}"]
    lines += [
        f"- timeout per phase: {report['timeout']:.0f} s"
        + ("; **quick mode** (small inputs, not representative)" if report["quick"] else ""),
        "",
        "## Results",
        "",
        f"Input: synthetic image of {_fmt_shape(sizes[3])} voxels for bundles that take volumes (also 2-D networks "
        f"applied slice by slice), {_fmt_shape(sizes[2])} pixels for 2-D bundles; batch 1, float32."
        + (f" Bundle config overrides: {', '.join(f'`{k}={json.dumps(v)}`' for k, v in overrides.items())}."
           if overrides else ""),
        "",
        f"| network | input | params | ROI | GFLOPs / window | windows | warm-up s | inference s | {peak_kind} "
        f"| train ROI | train iter s | train {peak_kind} |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        inf, tr = r["infer"], r["train"]
        params = f"{inf['params']:,}" if isinstance(inf.get("params"), int) else _cell(inf, "params")
        lines.append(
            "| " + " | ".join([
                r["label"],
                f"{inf['input'][0]}x{_fmt_shape(inf['input'][1:])}" if inf.get("input") else
                _fmt_shape(sizes[_row_dims(r)]),
                params, _fmt_shape(inf["roi"]) if inf.get("roi") else "—", _gflops_cell(inf),
                _cell(inf, "windows", "{:d}") if "windows" in inf else _cell(inf, "windows_expected", "{:d}"),
                _cell(inf, "warmup_s", "{:.2f}"), _infer_cell(inf),
                _peak_cell(inf), _fmt_shape(tr["train_roi"]) if tr.get("train_roi") else "—",
                _cell(tr, "train_s", "{:.2f}"), _cell(tr, "train_peak_mb", "{:.0f}"),
            ]) + " |"
        )
    if png_rel:
        lines += ["", f"![inference and training times]({png_rel})"]
    lines += ["", "## Details per row", ""]
    for r in rows:
        inf, tr = r["infer"], r["train"]
        parts = [f"**{r['label']}** ({r['source']}" + (f", run {r['run']})" if len(runs) > 1 else ")")]
        if inf.get("input"):
            parts.append(f"input {inf['input'][0]} ch x {_fmt_shape(inf['input'][1:])}")
        if inf.get("inferer"):
            parts.append(f"inferer {inf['inferer']}")
        if tr.get("loss") or tr.get("optimizer"):
            parts.append(f"training: loss {tr.get('loss') or '—'}, optimizer {tr.get('optimizer') or '—'}")
        if isinstance(tr.get("train_warmup_s"), float):
            parts.append(f"first training iteration (warm-up) {tr['train_warmup_s']:.2f} s")
        for phase, res in (("inference", inf), ("training", tr)):
            if res.get("status") in ("failed", "timeout"):
                parts.append(f"{phase} {res['status']}: {res.get('error', '')}")
        lines.append("- " + "; ".join(parts))
    baseline = [r[p].get("baseline_rss_mb") for r in rows for p in ("infer", "train")]
    baseline = [b for b in baseline if isinstance(b, (int, float)) and b > 0]
    lines += [
        "",
        "## How the numbers are measured",
        "",
        "- **inference s**: one call of the bundle's own `inferer` (from `configs/inference.json`; ROI, overlap, "
        "`sw_batch_size` and blending as the bundle ships them) on a random image, eval mode, `torch.no_grad()`. "
        "**windows** = ROI windows the inferer passed through the network. **warm-up s** = a forward of one ROI "
        "window run before, in the same process: it absorbs one-off costs (numba compilation of the CPU selective "
        "scan, allocator warm-up) and is not included in the inference time. Preprocessing and postprocessing "
        "(resampling, Invertd, saving) are not timed: the input goes to the inferer as is.",
        "- **train iter s**: the second of two training iterations (zero_grad, forward, loss, backward, optimizer "
        "step) on one random patch at the training ROI (`roi_size` of `configs/train.json`), batch 1, with the "
        "bundle's `loss` and `optimizer` (a fallback is named in the details when they could not be used); the "
        "first iteration is the warm-up. Comparators: DiceCELoss + AdamW.",
        "- **peak MB**: "
        + ("`torch.cuda.max_memory_allocated` during the timed part."
           if info["device"].startswith("cuda") else
           "peak resident set size (`ru_maxrss`) of a fresh subprocess that ran only this phase of this model, "
           "so it includes the interpreter, torch and MONAI"
           + (f" (about {min(baseline):.0f}–{max(baseline):.0f} MB before the model was built)" if baseline else "")
           + ", the input image and the full-size output (`out_channels` x image size, float32)."),
        "- **GFLOPs / window**: `torch.utils.flop_counter.FlopCounterMode` over one forward of one ROI window, "
        "batch 1: 2 FLOPs per multiply-add, convolutions, linears and matmuls only (the convention of "
        "reference_numbers.md; fvcore/'MACs' figures are half). Attention is counted through its math form "
        "(SDPA math backend, MultiheadAttention fast path off): FlopCounterMode has no formula for the fused CPU "
        "kernels and would count them as zero. The Mamba selective scan is invisible to it; "
        "\"+ x scan\" adds 9·B·D·L·N (+ B·D·L each for the D skip and the z gate) per scan call, the analytic "
        "estimate VMamba's FLOP counter uses (counted by intercepting `selective_scan_fn`).",
        "- **params**: Σ `numel` over `parameters()` of the network as the bundle builds it (buffers excluded; "
        "deep-supervision heads included when the bundle builds them).",
        "- Comparators (same input" + (", same run" if len(runs) == 1 else "") + "): MONAI SwinUNETR (feature_size "
        "48) and SegResNet (init_filters 32, blocks 1-2-2-4) with the Model Zoo's 3-D settings (ROI 96³, "
        "sw_batch_size 4, overlap 0.5, gaussian), 14 output channels; 2-D forms (`spatial_dims=2`, ROI 512², "
        "3 input / 2 output channels).",
        "- Each phase runs in its own subprocess; a phase that runs longer than the timeout is killed and shown as "
        "`timeout`.",
        "",
    ]
    return "\n".join(lines)


def render_png(rows: list[dict], path: Path, title: str, timeout: float) -> None:
    """Horizontal bars: inference time and training-iteration time per network (log axis for wide ranges).

    Runs killed at the timeout are drawn hatched at the timeout (or at the extrapolated time when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    colors = ["#1f77b4" if r["kind"] == "bundle" else "#9e9e9e" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(rows) + 1.8), squeeze=False)
    for col, (ax, (phase, key, name)) in enumerate(zip(
        axes[0], (("infer", "infer_s", "inference (s)"), ("train", "train_s", "one training iteration (s)"))
    )):
        values, texts, hatches = [], [], []
        for r in rows:
            res = r[phase]
            v = res.get(key)
            if res.get("status") == "ok" and isinstance(v, (int, float)):
                values.append(float(v))
                texts.append(f"{v:.1f} s" if v >= 1 else f"{v:.2f} s")
                hatches.append("")
            elif res.get("status") == "timeout":
                done, total, el = res.get("windows_done"), res.get("windows_expected"), res.get("infer_elapsed_s")
                est = el / done * total if phase == "infer" and done and total and el else None
                values.append(est or timeout)
                texts.append(f"timeout (≈{est:.0f} s est.)" if est else f"timeout (>{timeout:.0f} s)")
                hatches.append("//")
            else:
                values.append(0.0)
                texts.append(res.get("status") or "—")
                hatches.append("")
        ypos = list(range(len(rows)))
        bars = ax.barh(ypos, values, color=colors)
        for bar, hatch in zip(bars, hatches):
            if hatch:
                bar.set_hatch(hatch)
                bar.set_alpha(0.5)
        positive = [v for v in values if v > 0]
        log_axis = bool(positive) and max(positive) / min(positive) > 50
        if log_axis:
            ax.set_xscale("log")
            ax.set_xlim(min(positive) / 2, max(positive) * 8)
        else:
            ax.set_xlim(0, (max(positive) if positive else 1.0) * 1.35)
        for y, v, t in zip(ypos, values, texts):
            x = v * 1.08 if log_axis else v + (ax.get_xlim()[1] * 0.01)
            ax.text(max(x, ax.get_xlim()[0]), y, t, va="center", fontsize=8)
        ax.set_yticks(ypos)
        ax.set_yticklabels(labels if col == 0 else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(name + (" — log scale" if log_axis else ""))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_size(text: str, dims: int) -> tuple[int, ...]:
    try:
        size = tuple(int(s) for s in text.lower().replace(",", "x").split("x"))
    except ValueError:
        size = ()
    if len(size) != dims or any(s <= 0 for s in size):
        raise argparse.ArgumentTypeError(f"expected {dims} positive integers like "
                                         f"{'512x512x150' if dims == 3 else '1024x1024'}, got {text!r}")
    return size


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", metavar="NAME",
                    help="bundle folder names under bundles/ (default: all); 'none' for comparators only")
    ap.add_argument("--comparators", nargs="+", metavar="NAME", default=["auto"],
                    help=f"MONAI reference networks: {', '.join(COMPARATORS)}; 'auto' (default) = SwinUNETR and "
                         "SegResNet in the dimensionalities the selected bundles take; 'none'")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--quick", action="store_true",
                    help="small inputs (128x128x32 / 256x256) and comparator ROIs, for tests; not representative")
    ap.add_argument("--size3d", type=lambda s: _parse_size(s, 3), help="3-D input size (default 512x512x150)")
    ap.add_argument("--size2d", type=lambda s: _parse_size(s, 2), help="2-D input size (default 1024x1024)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmark.md", help="Markdown output")
    ap.add_argument("--png", type=lambda s: None if s.lower() == "none" else Path(s),
                    default=REPO / "docs" / "benchmark.png", help="bar chart output ('none': no chart)")
    ap.add_argument("--json", type=Path, help="also write the raw results as JSON")
    ap.add_argument("--threads", type=int, help="CPU threads per worker (torch, OpenMP, numba); default torch's")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per phase and model (default 900)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="set a config id in the bundles' inference/train configs, e.g. roi_size=[64,64,32] "
                         "(VALUE is JSON, else a string); repeatable")
    ap.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                    help="do not measure: write --out/--png from reports saved earlier with --json (several "
                         "reports of the same machine and settings are merged into one table)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_arg_parser()
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.from_json:
        reports = []
        for path in args.from_json:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                ap.error(f"--from-json {path}: cannot read a report ({e})")
        try:
            report = merge_reports(reports)
        except (ValueError, KeyError) as e:
            ap.error(f"--from-json: {e}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
        write_outputs(report, args.out, args.png)
        print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""), file=sys.stderr)
        return 0

    import torch

    available = list_bundles()
    if args.bundles is None:
        bundles = available
    elif [b.lower() for b in args.bundles] == ["none"]:
        bundles = []
    else:
        bundles = [b.rstrip("/").split("/")[-1] for b in args.bundles]
        unknown = [b for b in bundles if b not in available]
        if unknown:
            ap.error(f"unknown bundle(s) {unknown}; bundles/ has {available or 'none'}")
    comps = [c.lower() for c in args.comparators]
    if comps == ["none"]:
        comps = []
    elif comps == ["auto"]:
        dims = {bundle_input_dims(BUNDLES_DIR / b) for b in bundles} or {3}
        comps = [f"{n}_{d}d" for d in sorted(dims, reverse=True) for n in ("swinunetr", "segresnet")]
    else:
        unknown = [c for c in comps if c not in COMPARATORS]
        if unknown:
            ap.error(f"unknown comparator(s) {unknown}; choose from {list(COMPARATORS)}, 'auto' or 'none'")
    if not bundles and not comps:
        ap.error("nothing to benchmark: no bundles and no comparators selected")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {device}: CUDA is not available in this torch build / machine")
    if not (device == "cpu" or device.startswith("cuda")):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.timeout <= 0:
        ap.error("--timeout must be > 0")
    overrides = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            ap.error(f"--override expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    if overrides:
        from monai.bundle import ConfigParser

        for b in bundles:
            for key in overrides:
                found = False
                for cfg in ("inference.json", "train.json"):
                    path = BUNDLES_DIR / b / "configs" / cfg
                    if path.is_file():
                        cp = ConfigParser()
                        cp.read_config(str(path))
                        found = found or key in cp
                if not found:
                    ap.error(f"--override {key}: bundle {b} has no config id {key!r} in inference.json/train.json")
    sizes = dict(SIZES[args.quick])
    if args.size3d:
        sizes[3] = args.size3d
    if args.size2d:
        sizes[2] = args.size2d

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = shlex.join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    load_start = os.getloadavg()
    info = machine_info(device, args.threads)
    log(f"benchmark on {device}: {info['cpu']}, {info['usable_cpus']} usable CPUs, load {load_start[0]:.2f}")
    jobs = [dict(kind="bundle", name=b, label=b, source=f"bundles/{b}", dims=bundle_input_dims(BUNDLES_DIR / b))
            for b in bundles]
    jobs += [dict(kind="comparator", name=c, label=COMPARATORS[c]["label"], source="monai.networks.nets",
                  dims=COMPARATORS[c]["spatial_dims"]) for c in comps]
    rows = []
    for job in jobs:
        row = dict(job)
        for phase in ("infer", "train"):
            spec = dict(kind=job["kind"], name=job["name"], phase=phase, device=device, quick=args.quick,
                        threads=args.threads, sizes={str(k): list(v) for k, v in sizes.items()},
                        overrides=overrides)
            if job["kind"] == "bundle":
                spec["bundle_dir"] = str(BUNDLES_DIR / job["name"])
            log(f"  {job['label']}: {phase} ...")
            res = run_phase(spec, args.timeout, args.threads, log)
            summary = res.get("infer_s") if phase == "infer" else res.get("train_s")
            log(f"  {job['label']}: {phase} {res['status']}"
                + (f" {summary:.2f} s" if isinstance(summary, float) else f" ({res.get('error', '')})")
                + f" [wall {res['wall_s']:.1f} s]")
            row[phase] = res
        rows.append(row)
    load_end = os.getloadavg()

    report = dict(
        command=command, machine=info, load_start=list(load_start), load_end=list(load_end), quick=args.quick,
        timeout=args.timeout, sizes={str(k): list(v) for k, v in sizes.items()}, overrides=overrides, rows=rows,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    write_outputs(report, args.out, args.png)
    log(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


def _row_dims(row: dict) -> int:
    """Spatial dims of a row's input (reports written before rows carried ``dims`` are handled too)."""
    if row.get("dims"):
        return int(row["dims"])
    if row["infer"].get("input"):
        return len(row["infer"]["input"]) - 1
    if row["kind"] == "comparator":
        return 2 if row["label"].endswith("2D") else 3
    bundle = BUNDLES_DIR / row["label"]
    return bundle_input_dims(bundle) if (bundle / "configs" / "inference.json").is_file() else 3


def merge_reports(reports: list[dict]) -> dict:
    """One report from the reports of several runs (``--json``) on the same machine with the same settings.

    Each run keeps its command, date, commit, selective-scan backend and load averages under ``runs``; rows are
    concatenated (bundles first) and tagged with their run number; a network that appears in several runs keeps
    the row of the last one. Raises ValueError for incompatible reports.
    """
    runs, rows = [], []
    first = reports[0]
    for i, rep in enumerate(reports, 1):
        for key in ("quick", "sizes", "overrides"):
            if rep[key] != first[key]:
                raise ValueError(f"cannot merge reports with different {key}: {first[key]!r} vs {rep[key]!r}")
        for key in ("cpu", "device", "threads", "torch", "monai"):
            if rep["machine"].get(key) != first["machine"].get(key):
                raise ValueError(f"cannot merge reports from different machines/settings ({key}: "
                                 f"{first['machine'].get(key)!r} vs {rep['machine'].get(key)!r})")
        for run in rep.get("runs") or [dict(
            command=rep["command"], date=rep["machine"]["date"], git=rep["machine"]["git"],
            scan_backend=rep["machine"]["scan_backend"], load_start=rep["load_start"], load_end=rep["load_end"],
            timeout=rep["timeout"],
        )]:
            runs.append(run)
        offset = len(runs) - len(rep.get("runs") or [None])
        rows += [dict(row, run=row.get("run", 1) + offset) for row in rep["rows"]]
    latest = {r["label"]: r for r in rows}  # a network measured again in a later run: the later row counts
    rows = [r for r in rows if latest[r["label"]] is r]
    # stable sort: 3-D inputs first, then 2-D; bundles before comparators; otherwise in run order
    rows.sort(key=lambda r: (-_row_dims(r), r["kind"] != "bundle"))
    return dict(machine=first["machine"], runs=runs, quick=first["quick"], sizes=first["sizes"],
                overrides=first["overrides"], timeout=max(r["timeout"] for r in runs), rows=rows)


def write_outputs(report: dict, out: Path, png: Path | None) -> None:
    """Write the Markdown page (and the chart) of a report."""
    report = merge_reports([report])
    png_rel = None
    if png:
        sizes = report["sizes"]
        loads = "/".join(f"{run['load_start'][0]:.1f}" for run in report["runs"])
        title = (f"{'quick mode, ' if report['quick'] else ''}input {_fmt_shape(sizes['3'])} (3-D) / "
                 f"{_fmt_shape(sizes['2'])} (2-D), {report['machine']['device']}, {report['machine']['threads']} "
                 f"threads, load avg {loads}")
        render_png(report["rows"], png, title, report["timeout"])
        png_rel = os.path.relpath(png.resolve(), out.resolve().parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(report, png_rel))


if __name__ == "__main__":
    sys.exit(main())
