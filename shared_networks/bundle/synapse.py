"""The Synapse multi-organ CT protocol (TransUNet's 8 organs of BTCV) for bundles that follow it.

Synapse / BTCV (https://www.synapse.org/Synapse:syn3193805) has 30 labelled abdominal CTs with 13 organ labels.
TransUNet's protocol, reused by Swin-Unet, MISSFormer, Perspective+ Unet and others, keeps 8 of them, renumbered
(:data:`SYNAPSE_CLASSES`), and splits the 30 scans into 18 for training and 12 for testing
(:data:`TRANSUNET_TRAIN_CASES`, :data:`TRANSUNET_TEST_CASES`).

- :class:`BTCVToSynapsed`: turns BTCV 13-organ label maps into the 8-organ Synapse ids (other organs -> background).
- :func:`btcv_datalist`: a ``dataset.json`` data list with TransUNet's split over the original BTCV NIfTI files
  (``RawData/Training/img/img0001.nii.gz``, ``label/label0001.nii.gz``).
- :func:`from_transunet`: converts TransUNet's preprocessed release (``train_npz/caseXXXX_sliceYYY.npz``,
  ``test_vol_h5/caseXXXX.npy.h5``) into NIfTI volumes in the bundles' dataset layout.

Command line::

    python -m shared_networks.bundle.synapse btcv-split RawData/Training --out synapse_split.json
    python -m shared_networks.bundle.synapse from-transunet data/Synapse /data/synapse_nifti
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .transforms import source_name

__all__ = [
    "SYNAPSE_CLASSES",
    "BTCV_CLASSES",
    "BTCV_TO_SYNAPSE",
    "TRANSUNET_TRAIN_CASES",
    "TRANSUNET_TEST_CASES",
    "btcv_to_synapse",
    "BTCVToSynapsed",
    "btcv_datalist",
    "from_transunet",
]

#: Synapse (TransUNet protocol) class ids: 0 background + 8 organs, in the order of the published tables.
SYNAPSE_CLASSES = (
    "background", "aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen", "stomach",
)
#: BTCV's 13 organ ids (0 background).
BTCV_CLASSES = (
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
)
#: BTCV id -> Synapse id for the 8 kept organs; the other BTCV organs become background.
BTCV_TO_SYNAPSE = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
#: TransUNet's split of the 30 labelled BTCV scans (lists/lists_Synapse of TransUNet and its successors).
TRANSUNET_TEST_CASES = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
TRANSUNET_TRAIN_CASES = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)

_LUT = torch.zeros(len(BTCV_CLASSES), dtype=torch.long)
for _btcv, _syn in BTCV_TO_SYNAPSE.items():
    _LUT[_btcv] = _syn


def btcv_to_synapse(label, name: str = "label"):
    """Map a BTCV 13-organ label array / tensor to Synapse ids (same type, shape and metadata).

    Raises ``ValueError`` for values outside 0..13 or non-integer values, naming ``name``.
    """
    t = torch.as_tensor(label)
    values = torch.unique(t)
    if values.is_floating_point() and not bool(torch.all(values == torch.round(values))):
        raise ValueError(f"{name}: a BTCV label map must hold integer class ids, found non-integer values.")
    bad = [int(v) for v in values.tolist() if v < 0 or v >= len(BTCV_CLASSES)]
    if bad:
        raise ValueError(
            f"{name}: values {bad[:10]} are not BTCV organ ids (0..{len(BTCV_CLASSES) - 1}); is this a BTCV label "
            "map? Labels that already use the 8 Synapse ids need no mapping (map_btcv_labels false)."
        )
    mapped = _LUT.to(t.device)[t.long()].to(t.dtype)
    if isinstance(label, MetaTensor):
        out = label.clone()
        out.copy_(mapped)
        return out
    if isinstance(label, np.ndarray):
        return mapped.cpu().numpy().astype(label.dtype)
    return mapped


class BTCVToSynapsed(MapTransform):
    """Dictionary transform: BTCV 13-organ label ids -> the 8 Synapse organ ids (:data:`BTCV_TO_SYNAPSE`).

    Esophagus, inferior vena cava, portal/splenic vein and the adrenal glands become background, as in TransUNet's
    protocol. Values outside 0..13 raise ``ValueError`` naming the label file.
    """

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = btcv_to_synapse(d[key], name=source_name(d[key], default=str(key)))
        return d


def _case_files(folder: str, prefix: str) -> dict[int, str]:
    out = {}
    for path in glob.glob(os.path.join(folder, f"{prefix}*.nii*")):
        m = re.fullmatch(rf"{prefix}(\d+)\.nii(\.gz)?", os.path.basename(path))
        if m:
            out[int(m[1])] = path
    return out


def btcv_datalist(raw_dir: str, relative_to: str | None = None) -> dict[str, list]:
    """TransUNet's 18/12 split of the BTCV training scans as a data list (``{"training": [...], "validation":
    [...]}``, 12 test scans as "validation"), from ``raw_dir/img/imgNNNN.nii.gz`` + ``raw_dir/label/labelNNNN.nii.gz``
    (the layout of BTCV's ``RawData.zip``, folder ``Training``). Paths are relative to ``relative_to`` if given.

    Raises ``FileNotFoundError`` naming the missing scans.
    """
    imgs = _case_files(os.path.join(raw_dir, "img"), "img")
    lbls = _case_files(os.path.join(raw_dir, "label"), "label")
    wanted = TRANSUNET_TRAIN_CASES + TRANSUNET_TEST_CASES
    missing = [f"img{c:04d}" for c in wanted if c not in imgs] + [f"label{c:04d}" for c in wanted if c not in lbls]
    if missing:
        raise FileNotFoundError(
            f"{raw_dir}: {len(missing)} of the 30 BTCV training scans/labels are missing ({missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}); expected {raw_dir}/img/img0001.nii.gz and "
            f"{raw_dir}/label/label0001.nii.gz ... (BTCV RawData.zip, folder Training)."
        )

    def rel(p):
        return os.path.relpath(p, relative_to) if relative_to else os.path.abspath(p)

    def items(cases):
        return [{"image": rel(imgs[c]), "label": rel(lbls[c])} for c in cases]

    return {"training": items(TRANSUNET_TRAIN_CASES), "validation": items(TRANSUNET_TEST_CASES)}


def _write_nifti(path: str, array: np.ndarray) -> None:
    import nibabel as nib

    # The preprocessed release keeps no spacing: unit spacing, identity orientation (array axes = rows, columns,
    # slices of the release), so a bundle sees exactly the slices the official models were trained on.
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def _hu(x: np.ndarray) -> np.ndarray:
    # TransUNet: clip to [-125, 275] HU, then scale to [0, 1]; undone so the bundles' HU windowing applies as usual
    return (np.asarray(x, np.float32) * 400.0 - 125.0).astype(np.float32)


def from_transunet(src: str, dst: str, overwrite: bool = False) -> dict[str, list]:
    """Convert TransUNet's preprocessed Synapse release into NIfTI volumes in the bundles' dataset layout.

    Reads ``src/train_npz/caseNNNN_sliceMMM.npz`` (one 512x512 slice per file; stacked back into volumes) and
    ``src/test_vol_h5/caseNNNN.npy.h5`` (whole volumes, needs ``h5py``), writes ``dst/imagesTr/caseNNNN.nii.gz``,
    ``dst/labelsTr/caseNNNN.nii.gz`` and ``dst/dataset.json`` (training cases -> "training", test cases ->
    "validation"). Intensities are turned back into HU (``400 x - 125``); labels are already Synapse ids. The
    release has no voxel spacing, so the files get 1 mm: use the bundle with ``--resize_slices true`` (each slice
    resized to the network's 224x224, the official protocol). Existing files are never replaced unless
    ``overwrite``. Returns the data list.
    """
    train_dir, test_dir = os.path.join(src, "train_npz"), os.path.join(src, "test_vol_h5")
    slices: dict[str, list[tuple[int, str]]] = {}
    for path in glob.glob(os.path.join(train_dir, "*.npz")):
        m = re.fullmatch(r"(case\d+)_slice(\d+)\.npz", os.path.basename(path))
        if m:
            slices.setdefault(m[1], []).append((int(m[2]), path))
    volumes = sorted(glob.glob(os.path.join(test_dir, "*.npy.h5")))
    if not slices and not volumes:
        raise FileNotFoundError(
            f"no TransUNet data under {src}: expected {train_dir}/caseNNNN_sliceMMM.npz and/or "
            f"{test_dir}/caseNNNN.npy.h5."
        )
    img_dir, lbl_dir = os.path.join(dst, "imagesTr"), os.path.join(dst, "labelsTr")
    json_path = os.path.join(dst, "dataset.json")
    targets = [json_path]
    targets += [os.path.join(d, f"{c}.nii.gz") for c in slices for d in (img_dir, lbl_dir)]
    targets += [os.path.join(d, os.path.basename(v)[: -len(".npy.h5")] + ".nii.gz") for v in volumes
                for d in (img_dir, lbl_dir)]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} output file(s) exist, e.g. {existing[0]}; pass overwrite=True.")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(lbl_dir, exist_ok=True)

    datalist: dict[str, list] = {"training": [], "validation": []}
    for case, items in sorted(slices.items()):
        items.sort()
        idx = [i for i, _ in items]
        if idx != list(range(len(idx))):
            raise ValueError(f"{train_dir}: the slices of {case} are not numbered 0..{len(idx) - 1} without gaps.")
        imgs, lbls = [], []
        for _, path in items:
            with np.load(path) as z:
                imgs.append(z["image"])
                lbls.append(z["label"])
        _write_nifti(os.path.join(img_dir, f"{case}.nii.gz"), _hu(np.stack(imgs, axis=-1)))
        _write_nifti(os.path.join(lbl_dir, f"{case}.nii.gz"), np.stack(lbls, axis=-1).astype(np.uint8))
        datalist["training"].append({"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz"})
    if volumes:
        try:
            import h5py
        except ImportError as e:
            raise ImportError("reading TransUNet's test_vol_h5 files needs h5py: pip install h5py") from e
        for path in volumes:
            case = os.path.basename(path)[: -len(".npy.h5")]
            with h5py.File(path, "r") as f:
                image, label = f["image"][:], f["label"][:]  # (slices, rows, columns)
            _write_nifti(os.path.join(img_dir, f"{case}.nii.gz"), _hu(np.moveaxis(image, 0, -1)))
            _write_nifti(os.path.join(lbl_dir, f"{case}.nii.gz"), np.moveaxis(label, 0, -1).astype(np.uint8))
            datalist["validation"].append({"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz"})
    with open(json_path, "w") as f:
        json.dump(datalist, f, indent=2)
    return datalist


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared_networks.bundle.synapse", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("btcv-split", help="dataset.json with TransUNet's 18/12 split over the BTCV NIfTI files")
    s.add_argument("raw_dir", help="BTCV RawData/Training (with img/ and label/)")
    s.add_argument("--out", default=None, help="data list to write (default <raw_dir>/dataset.json)")
    t = sub.add_parser("from-transunet", help="TransUNet's npz/h5 release -> NIfTI volumes + dataset.json")
    t.add_argument("src", help="folder with train_npz/ and test_vol_h5/")
    t.add_argument("dst", help="output dataset folder (imagesTr/, labelsTr/, dataset.json)")
    t.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "btcv-split":
            out = args.out or os.path.join(args.raw_dir, "dataset.json")
            if os.path.exists(out):
                raise FileExistsError(f"{out} exists; choose another --out.")
            # paths relative to raw_dir when the list lives there (then --dataset_dir raw_dir), else absolute
            inside = os.path.dirname(os.path.abspath(out)) == os.path.abspath(args.raw_dir)
            lists = btcv_datalist(args.raw_dir, relative_to=args.raw_dir if inside else None)
            with open(out, "w") as f:
                json.dump(lists, f, indent=2)
            print(f"wrote {out}: {len(lists['training'])} training, {len(lists['validation'])} validation scans")
        else:
            lists = from_transunet(args.src, args.dst, overwrite=args.overwrite)
            print(f"wrote {args.dst}: {len(lists['training'])} training, {len(lists['validation'])} validation "
                  "volumes (spacing unknown: run the bundle with --resize_slices true)")
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
