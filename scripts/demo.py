"""The project's main job, end to end on the embedded demo CT (``make demo``).

1. copies ``data/demo/ct`` into a one-case dataset under ``demo_output/`` (``data/demo`` is only read);
2. trains the UNETR++ BTCV bundle from scratch in its reduced configuration (``configs/reduced.json``) with
   ``python -m monai.bundle run`` and command-line overrides, a few minutes on 2 CPU cores;
3. segments the CT with ``python -m monai.bundle run --config_file .../inference.json`` (sliding window);
4. writes ``demo_output/unetr_pp_btcv_ct_segmentation/overlay.png`` (CT slices, reference and prediction) and
   prints the Dice per organ.

The run trains on the very CT it segments: it shows that the pipeline learns, not how well UNETR++ segments
unseen scans. Usage: ``python scripts/demo.py [--iterations 100] [--out demo_output]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "unetr_pp_btcv_ct_segmentation"
DEMO_CT = REPO / "data" / "demo" / "ct"
ORGANS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
          7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal/splenic vein", 11: "pancreas",
          12: "right adrenal gland", 13: "left adrenal gland"}


def _run(cmd: list[str], log_path: Path) -> None:
    """Run a bundle command, echo it, keep its log; stop with the log's tail if it fails."""
    shown = " ".join(f'"{c}"' if any(ch in c for ch in " [{'") else c for c in cmd[1:])
    print(f"$ python {shown}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=BUNDLE)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        sys.exit("command failed (log: {}):\n{}".format(log_path, "\n".join(tail)))


def _configs(*names: str) -> str:
    return str([f"configs/{n}" for n in names])


def dice_per_organ(pred: np.ndarray, ref: np.ndarray) -> dict[int, float | None]:
    out = {}
    for c in ORGANS:
        a, b = pred == c, ref == c
        denom = a.sum() + b.sum()
        out[c] = None if b.sum() == 0 else float(2 * (a & b).sum() / denom)
    return out


def save_overlay(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 14))
    colours[0, 3] = 0.0  # background transparent
    cmap = ListedColormap(colours)
    zs = np.nonzero(ref.reshape(-1, ref.shape[2]).any(0))[0]
    slices = np.linspace(zs.min(), zs.max(), 4).round().astype(int)[1:3] if zs.size else [ref.shape[2] // 2]
    slices = sorted({*slices, int(np.argmax((ref == 6).sum((0, 1))))})  # include the slice with most liver
    fig, axes = plt.subplots(2, len(slices), figsize=(4 * len(slices), 8), squeeze=False)
    window = np.clip((image + 175) / 425, 0, 1)

    def radiological(a):  # RAS array slice -> anterior up, patient's right on the viewer's left
        return np.rot90(a)[:, ::-1]

    for j, z in enumerate(slices):
        for i, (lbl, title) in enumerate(((ref, "reference"), (pred, "UNETR++ (demo)"))):
            ax = axes[i, j]
            ax.imshow(radiological(window[:, :, z]), cmap="gray")
            ax.imshow(radiological(np.ma.masked_equal(lbl[:, :, z], 0)), cmap=cmap, vmin=0, vmax=13, alpha=0.5,
                      interpolation="nearest")
            ax.set_title(f"{title}, slice {z}")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=200, help="training iterations (one 3D patch each)")
    p.add_argument("--out", default=str(REPO / "demo_output"), help="output folder (git-ignored)")
    args = p.parse_args(argv)
    import nibabel as nib

    start = time.time()
    out = Path(args.out).resolve() / BUNDLE.name
    if out.exists():
        shutil.rmtree(out)  # the demo's own previous results
    dataset, run_root, seg_dir = out / "dataset", out / "bundle_run", out / "segmentation"
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True)
    shutil.copyfile(DEMO_CT / "image.nii.gz", dataset / "imagesTr" / "ct.nii.gz")
    shutil.copyfile(DEMO_CT / "label_btcv.nii.gz", dataset / "labelsTr" / "ct.nii.gz")

    common = ["--bundle_root", str(run_root), "--num_workers", "0", "--progress_bar", "False"]
    print(f"1/3 training the reduced UNETR++ from scratch for {args.iterations} iterations on the demo CT ...")
    _run([sys.executable, "-m", "monai.bundle", "run",
          "--config_file", _configs("train.json", "reduced.json"),
          "--dataset_dir", str(dataset), *common,
          "--train#trainer#max_epochs", str(args.iterations), "--val_interval", str(max(1, args.iterations // 4)),
          "--augment", "False", "--num_samples", "1", "--resume", "False"], out / "train.log")
    print(f"    done in {time.time() - start:.0f} s; weights: {run_root / 'models' / 'model.pt'}")

    print("2/3 sliding-window inference with inference.json ...")
    _run([sys.executable, "-m", "monai.bundle", "run",
          "--config_file", _configs("inference.json", "reduced.json"),
          "--dataset_dir", str(dataset / "imagesTr"), "--output_dir", str(seg_dir), *common], out / "inference.log")
    seg_path = seg_dir / "ct_seg.nii.gz"

    print("3/3 Dice per organ and overlay ...")
    canonical = lambda p: nib.as_closest_canonical(nib.load(str(p))).get_fdata()  # noqa: E731  (RAS axes)
    image = canonical(DEMO_CT / "image.nii.gz")
    ref = canonical(DEMO_CT / "label_btcv.nii.gz").round().astype(np.int16)
    pred = canonical(seg_path).round().astype(np.int16)
    dice = dice_per_organ(pred, ref)
    print(f"\n{'organ':<22} Dice")
    for c, name in ORGANS.items():
        print(f"{name:<22} {'absent from this CT' if dice[c] is None else f'{dice[c]:.3f}'}")
    present = [d for d in dice.values() if d is not None]
    print(f"{'mean (present organs)':<22} {np.mean(present):.3f}")
    overlay = out / "overlay.png"
    save_overlay(image, ref, pred, overlay)
    with open(out / "dice.json", "w") as f:
        json.dump({ORGANS[c]: d for c, d in dice.items()}, f, indent=2)
    print(f"\nsegmentation: {seg_path}\noverlay:      {overlay}\nlogs:         {out}/*.log")
    print(f"total {time.time() - start:.0f} s. Trained and evaluated on the same CT: a pipeline check, not an "
          "accuracy result.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
