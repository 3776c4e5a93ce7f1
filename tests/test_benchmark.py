"""scripts/benchmark.py: an end-to-end quick run (one bundle + one MONAI comparator), the FLOP/window accounting,
timeouts, re-rendering and argument errors. No timing assertions: speed is what the script reports, not a test."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "unetr_pp_btcv_ct_segmentation"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bm = _load_script()
needs_bundle = pytest.mark.skipif(not (REPO / "bundles" / BUNDLE / "configs" / "train.json").is_file(),
                                  reason=f"bundles/{BUNDLE} is not in this checkout")


def _table(md: str) -> dict[str, list[str]]:
    """Rows of the results table keyed by the network column."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| network |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(header), ln
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?", text) is not None


@needs_bundle
def test_quick_run_one_bundle_and_one_comparator(tmp_path):
    from monai.bundle import ConfigParser
    from monai.networks.nets import SegResNet
    from PIL import Image

    out, png, raw = tmp_path / "bench.md", tmp_path / "bench.png", tmp_path / "bench.json"
    rc = bm.main([
        "--bundles", BUNDLE, "--comparators", "segresnet_2d", "--quick", "--threads", "1", "--timeout", "300",
        "--override", "roi_size=[64,64,32]", "--size2d", "64x64",
        "--out", str(out), "--png", str(png), "--json", str(raw),
    ])
    assert rc == 0
    md = out.read_text()
    rows = _table(md)
    assert set(rows) == {BUNDLE, "MONAI SegResNet 2D"}

    # parameter counts: the networks as the bundle config (with the override) and the comparator build them
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    parser["roi_size"] = [64, 64, 32]
    net = parser.get_parsed_content("network_def")
    assert rows[BUNDLE]["params"] == f"{sum(p.numel() for p in net.parameters()):,}"
    seg = SegResNet(spatial_dims=2, init_filters=32, in_channels=3, out_channels=2, blocks_down=(1, 2, 2, 4),
                    blocks_up=(1, 1, 1))
    assert rows["MONAI SegResNet 2D"]["params"] == f"{sum(p.numel() for p in seg.parameters()):,}"

    for name, roi, image in ((BUNDLE, "64x64x32", "1x64x64x32"), ("MONAI SegResNet 2D", "64x64", "3x64x64")):
        row = rows[name]
        assert row["input"] == image, row
        assert row["ROI"] == roi and row["train ROI"] == roi, row
        assert row["windows"] == "1", row  # the quick input is no larger than the ROI: one padded window
        for col in ("GFLOPs / window", "warm-up s", "inference s", "peak RSS MB", "train iter s",
                    "train peak RSS MB"):
            assert _is_number(row[col]), (name, col, row[col])
        assert float(row["GFLOPs / window"]) > 0
        assert float(row["peak RSS MB"]) > 100  # the interpreter and torch alone are more than that
    assert "scan" not in rows[BUNDLE]["GFLOPs / window"]  # UNETR++ has no selective scan
    assert "DeepSupervisionLoss(DiceCELoss)" in md and "optimizer SGD" in md  # the bundle's own loss/optimizer
    assert "quick mode" in md and "load average" in md and "selective-scan backend" in md
    assert "![inference and training times](bench.png)" in md

    report = json.loads(raw.read_text())
    assert [r["infer"]["status"] for r in report["rows"]] == ["ok", "ok"]
    assert [r["train"]["status"] for r in report["rows"]] == ["ok", "ok"]
    assert report["rows"][0]["infer"]["output"] == [14, 64, 64, 32]
    assert all(torch.isfinite(torch.tensor(r["train"]["loss_value"])) for r in report["rows"])

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 100


def test_scan_flops_are_counted_analytically():
    from torch.utils.flop_counter import FlopCounterMode

    from shared_networks.blocks import Mamba

    block = Mamba(d_model=16).eval()  # d_inner 32, d_state 16
    x = torch.rand(2, 10, 16)
    with torch.no_grad():
        ref = block(x)
        with bm.count_scans() as scan, FlopCounterMode(display=False) as fcm:
            block(x)
        again = block(x)
    b, d, length, n = 2, 32, 10, 16
    assert scan[0] == 9 * b * d * length * n + 2 * b * d * length  # + D skip + z gate
    assert fcm.get_total_flops() > 0  # the projections are still counted by FlopCounterMode
    torch.testing.assert_close(again, ref)  # the real scan is restored afterwards


def test_attention_flops_are_counted_through_fused_kernels():
    """FlopCounterMode alone sees 0 FLOPs in CPU flash SDPA and misses the MHA fast path; count_flops does not."""
    b, n, e, heads = 1, 50, 32, 4
    mha = torch.nn.MultiheadAttention(e, heads, batch_first=True).eval()

    class Net(torch.nn.Module):
        def forward(self, x):
            q = x.view(b, n, heads, e // heads).transpose(1, 2)
            y = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # 2 matmuls of n x n x e
            return mha(x, x, x, need_weights=False)[0] + y.transpose(1, 2).reshape(b, n, e)

    flops, scan = bm.count_flops(Net(), torch.rand(b, n, e))
    sdpa = 2 * (2 * b * n * n * e)
    mha_flops = 2 * b * n * e * 3 * e + sdpa + 2 * b * n * e * e  # in_proj, attention, out_proj
    assert (flops, scan) == (sdpa + mha_flops, 0)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


@pytest.mark.parametrize(
    "make, size",
    [
        (lambda: __import__("monai.inferers", fromlist=["x"]).SlidingWindowInferer((8, 8, 4), 3, 0.5), (20, 17, 9)),
        (lambda: __import__("monai.inferers", fromlist=["x"]).SlidingWindowInferer((8, 8), 2, 0.25), (5, 30)),
        (lambda: __import__("monai.inferers", fromlist=["x"]).SliceInferer(
            spatial_dim=2, roi_size=(8, 8), sw_batch_size=4, overlap=0.5),
         (20, 12, 5)),
    ],
)
def test_window_count_matches_what_the_inferer_runs(make, size):
    inferer = make()
    counter = bm._Counter(lambda x: x[:, :1] * 2)
    with torch.no_grad():
        inferer(torch.rand(1, 1, *size), counter)
    assert counter.windows == bm.expected_windows(inferer, size) > 1


def test_timeout_is_reported_not_waited_for():
    spec = dict(kind="comparator", name="segresnet_2d", phase="infer", device="cpu", quick=True, threads=1,
                sizes={"3": [32, 32, 32], "2": [64, 64]}, overrides={})
    res = bm.run_phase(spec, timeout=0.5, threads=1, log=lambda msg: None)
    assert res["status"] == "timeout" and "timeout after" in res["error"]
    assert res["wall_s"] < 30


def test_render_from_json_with_timeouts_and_failures(tmp_path):
    ok = dict(status="ok", params=1234567, roi=[96, 96, 96], input=[1, 512, 512, 150], flops=int(3.3e11),
              scan_flops=int(2.5e9), windows=300, warmup_s=1.5, infer_s=100.0, infer_peak_mb=2048.0,
              inferer="SlidingWindowInferer(...)")
    timeout = dict(status="timeout", error="timeout after 600 s", params=42, roi=[128, 128, 64], flops=int(9.5e10),
                   warmup_s=3.0, windows_expected=196, windows_done=40, infer_elapsed_s=590.0,
                   infer_peak_mb_partial=2500.0)
    train_ok = dict(status="ok", train_roi=[96, 96, 96], train_s=12.5, train_peak_mb=3000.0, loss="DiceCELoss",
                    optimizer="AdamW", train_warmup_s=20.0)
    failed = dict(status="failed", error="ValueError: bad ROI")
    report = dict(
        command="python scripts/benchmark.py", quick=False, timeout=600.0, overrides={},
        machine=dict(cpu="test CPU", logical_cpus=2, usable_cpus=2, threads=2, ram_gb=8.0, python="3", torch="t",
                     monai="m", numba="n", device="cpu", git="abc", date="today", scan_backend="ref"),
        load_start=[5.0, 4.0, 3.0], load_end=[1.0, 1.0, 1.0], sizes={"3": [512, 512, 150], "2": [1024, 1024]},
        rows=[dict(kind="bundle", label="fast_bundle", source="bundles/x", infer=ok, train=train_ok),
              dict(kind="bundle", label="slow_bundle", source="bundles/y", infer=timeout, train=failed)],
    )
    raw, out, png = tmp_path / "r.json", tmp_path / "docs" / "b.md", tmp_path / "docs" / "b.png"
    raw.write_text(json.dumps(report))
    assert bm.main(["--from-json", str(raw), "--out", str(out), "--png", str(png)]) == 0
    md = out.read_text()
    rows = _table(md)
    assert rows["fast_bundle"]["GFLOPs / window"] == "330.0 + 2.50 scan"
    assert rows["fast_bundle"]["input"] == "1x512x512x150" and rows["slow_bundle"]["input"] == "512x512x150"
    assert rows["fast_bundle"]["params"] == "1,234,567" and rows["fast_bundle"]["windows"] == "300"
    assert rows["slow_bundle"]["peak RSS MB"] == "≥2500 (at timeout)"
    slow = rows["slow_bundle"]
    assert slow["inference s"].startswith("timeout (≈2891 est.: 40/196 windows")
    assert slow["windows"] == "196" and slow["train iter s"] == "failed"
    assert "training failed: ValueError: bad ROI" in md
    assert "other processes shared the CPU" in md  # load 5 on 2 CPUs is flagged
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_report(label, kind, sizes=None, load=1.0):
    res = dict(status="ok", params=10, roi=[8, 8], flops=10**9, windows=4, warmup_s=0.1, infer_s=1.0,
               infer_peak_mb=500.0)
    train = dict(status="ok", train_roi=[8, 8], train_s=0.5, train_peak_mb=600.0)
    return dict(
        command=f"python scripts/benchmark.py --bundles {label}", quick=False, timeout=600.0, overrides={},
        machine=dict(cpu="test CPU", logical_cpus=2, usable_cpus=2, threads=1, ram_gb=8.0, python="3", torch="t",
                     monai="m", numba="n", device="cpu", git="abc", date="today", scan_backend=f"scan-{label}"),
        load_start=[load] * 3, load_end=[load] * 3, sizes=sizes or {"3": [512, 512, 150], "2": [1024, 1024]},
        rows=[dict(kind=kind, label=label, source="x", dims=2, infer=res, train=train)],
    )


def test_reports_of_several_runs_merge_into_one_table(tmp_path):
    paths = []
    for i, (label, kind) in enumerate((("MONAI SegResNet 2D", "comparator"), ("bundle_a", "bundle"))):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(_tiny_report(label, kind, load=5.0 if i else 1.0)))
    out, merged = tmp_path / "m.md", tmp_path / "m.json"
    assert bm.main(["--from-json", *map(str, paths), "--out", str(out), "--png", "none", "--json", str(merged)]) == 0
    md = out.read_text()
    assert list(_table(md)) == ["bundle_a", "MONAI SegResNet 2D"]  # bundles first
    assert _table(md)["bundle_a"]["input"] == "1024x1024"  # no input recorded: the report's size for its dims
    assert "Generated in 2 runs" in md and "scan-bundle_a" in md and "scan-MONAI SegResNet 2D" in md
    assert "**bundle_a** (x, run 2)" in md and "**MONAI SegResNet 2D** (x, run 1)" in md
    again = tmp_path / "again.md"  # a merged report can itself be re-rendered / merged again
    assert bm.main(["--from-json", str(merged), "--out", str(again), "--png", "none"]) == 0
    assert again.read_text().split("## Machine")[1] == md.split("## Machine")[1]
    paths.append(tmp_path / "r2.json")  # bundle_a measured again: the later row replaces the earlier one
    paths[-1].write_text(json.dumps(dict(_tiny_report("bundle_a", "bundle"), command="rerun")))
    assert bm.main(["--from-json", *map(str, paths), "--out", str(out), "--png", "none"]) == 0
    md = out.read_text()
    assert list(_table(md)) == ["bundle_a", "MONAI SegResNet 2D"] and "**bundle_a** (x, run 3)" in md
    paths[1].write_text(json.dumps(_tiny_report("bundle_b", "bundle", sizes={"3": [64, 64, 32], "2": [128, 128]})))
    with pytest.raises(SystemExit):
        bm.main(["--from-json", *map(str, paths), "--out", str(out), "--png", "none"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bundles", "no_such_bundle"], "unknown bundle"),
        (["--comparators", "unet"], "unknown comparator"),
        (["--bundles", "none", "--comparators", "none"], "nothing to benchmark"),
        (["--device", "tpu", "--bundles", "none"], "--device must be"),
        (["--size3d", "64x64"], "expected 3 positive integers"),
        (["--override", "roi_size"], "KEY=VALUE"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit):
        bm.main(args)
    assert message in capsys.readouterr().err


def test_worker_errors_name_the_root_cause():
    try:
        try:
            raise AttributeError("'function' object has no attribute 'shape'")
        except AttributeError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: \n\"$@network_def.to(@device)\"") from inner
    except RuntimeError as outer:
        text = bm._error_text(outer)
    assert text == ("AttributeError: 'function' object has no attribute 'shape' "
                    "(in RuntimeError: Failed to evaluate ConfigExpression:)")
