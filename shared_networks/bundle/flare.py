"""FLARE22 / AbdomenCT-1K abdominal organ labels and nnU-Net's CT intensity normalisation, for the LKM-UNet bundle.

FLARE22 (MICCAI 2022 Fast and Low-resource semi-supervised Abdominal oRgan sEgmentation) labels 13 organs with the
ids of :data:`FLARE_CLASSES` (the order of U-Mamba's / LKM-UNet's ``Dataset701_AbdomenCT/dataset.json``). Its 50
labelled training CTs are the MSD Pancreas scans with AbdomenCT-1K annotations extended to 13 organs.

- :data:`BTCV_TO_FLARE`, :func:`btcv_to_flare`, :class:`BTCVToFLAREd`: BTCV 13-organ label maps (e.g. the
  repository's demo CT) in FLARE ids; the portal / splenic vein has no FLARE class and becomes background, the
  duodenum has no BTCV class and stays absent.
- :func:`ct_intensity_properties`: nnU-Net's foreground intensity fingerprint of a training set (0.5 / 99.5
  percentiles, mean and standard deviation of the intensities inside the labels), which nnU-Net's CT
  normalisation uses to clip and z-score every image; :func:`intensity_overrides` turns it (or the
  ``foreground_intensity_properties_per_channel`` entry of an nnU-Net ``plans.json``) into the bundle's
  ``hu_min`` / ``hu_max`` / ``hu_mean`` / ``hu_std`` config values.

Command line::

    python -m shared_networks.bundle.flare intensity /data/flare22 --out flare22_intensity.json
    python -m shared_networks.bundle.flare intensity --plans nnUNet_results/.../plans.json --out official.json
    python -m shared_networks.bundle.flare btcv-to-flare /data/btcv/labelsTr /data/btcv_flare/labelsTr
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .data import load_datalist
from .synapse import BTCV_CLASSES
from .transforms import source_name

__all__ = [
    "FLARE_CLASSES",
    "BTCV_TO_FLARE",
    "map_labels",
    "btcv_to_flare",
    "BTCVToFLAREd",
    "ct_intensity_properties",
    "intensity_overrides",
    "plans_intensity_properties",
]

#: FLARE22 class ids: 0 background + 13 organs (U-Mamba / LKM-UNet Dataset701_AbdomenCT order).
FLARE_CLASSES = (
    "background", "liver", "right kidney", "spleen", "pancreas", "aorta", "inferior vena cava",
    "right adrenal gland", "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "left kidney",
)
#: BTCV id -> FLARE id (BTCV 10, portal and splenic vein, has no FLARE class: background).
BTCV_TO_FLARE = {1: 3, 2: 2, 3: 13, 4: 9, 5: 10, 6: 1, 7: 11, 8: 5, 9: 6, 11: 4, 12: 7, 13: 8}


def map_labels(label, mapping: Mapping[int, int], num_source: int, name: str = "label", source: str = "source"):
    """Renumber an integer label map (array, tensor or MetaTensor; same type, shape, dtype and metadata returned):
    ids in ``mapping`` get the mapped id, every other id in ``0..num_source-1`` becomes 0.

    Raises ``ValueError`` naming ``name`` for non-integer values or ids outside ``0..num_source-1``.
    """
    t = torch.as_tensor(label)
    values = torch.unique(t)
    if values.is_floating_point() and not bool(torch.all(values == torch.round(values))):
        raise ValueError(f"{name}: a label map must hold integer class ids, found non-integer values.")
    bad = [int(v) for v in values.tolist() if v < 0 or v >= num_source]
    if bad:
        raise ValueError(
            f"{name}: values {bad[:10]} are not {source} class ids (0..{num_source - 1}); is this a {source} label map?"
        )
    lut = torch.zeros(num_source, dtype=torch.long)
    for k, v in mapping.items():
        lut[int(k)] = int(v)
    mapped = lut.to(t.device)[t.long()].to(t.dtype)
    if isinstance(label, MetaTensor):
        out = label.clone()
        out.copy_(mapped)
        return out
    if isinstance(label, np.ndarray):
        return mapped.cpu().numpy().astype(label.dtype)
    return mapped


def btcv_to_flare(label, name: str = "label"):
    """BTCV 13-organ label map -> FLARE22 ids (:data:`BTCV_TO_FLARE`); see :func:`map_labels`."""
    return map_labels(label, BTCV_TO_FLARE, len(BTCV_CLASSES), name=name, source="BTCV")


class BTCVToFLAREd(MapTransform):
    """Dictionary transform: BTCV label ids -> FLARE22 ids (:data:`BTCV_TO_FLARE`), e.g. to train or evaluate the
    FLARE bundle on BTCV labels. Values outside 0..13 raise ``ValueError`` naming the label file."""

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = btcv_to_flare(d[key], name=source_name(d[key], default=str(key)))
        return d


def ct_intensity_properties(
    cases: Sequence[Mapping[str, str]], samples_per_case: int | None = None, seed: int = 1234
) -> dict[str, float]:
    """nnU-Net's foreground intensity fingerprint of ``cases`` (``[{"image": path, "label": path}, ...]``, NIfTI).

    As nnU-Net v2's ``DatasetFingerprintExtractor``: from every case, ``samples_per_case`` intensities are drawn
    with replacement from the voxels inside the label (label > 0; default ``10**7 // len(cases)``, nnU-Net draws
    ``10**8 // n``, which only refines the percentiles below 0.1 HU); the pooled samples give ``mean``, ``std``,
    ``percentile_00_5`` and ``percentile_99_5`` (plus ``median``, ``min``, ``max``), the names nnU-Net's
    ``plans.json`` uses. Raises ``ValueError`` naming a case whose image and label differ in shape or whose label
    is empty everywhere.
    """
    import nibabel as nib

    cases = list(cases)
    if not cases:
        raise ValueError("no cases to compute intensity statistics from.")
    n = int(samples_per_case or max(1, 10**7 // len(cases)))
    rng = np.random.default_rng(seed)
    pooled = []
    for case in cases:
        img = np.asanyarray(nib.load(case["image"]).dataobj)
        lbl = np.asanyarray(nib.load(case["label"]).dataobj)
        if img.shape[:3] != lbl.shape[:3]:
            raise ValueError(f"{case['label']}: shape {lbl.shape} differs from its image {case['image']} {img.shape}.")
        fg = img[lbl > 0]
        if fg.size:
            pooled.append(rng.choice(fg.astype(np.float32), n, replace=True))
    if not pooled:
        raise ValueError("every label map is empty (no voxel > 0): no foreground to compute statistics from.")
    x = np.concatenate(pooled).astype(np.float64)
    return {
        "mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std()), "min": float(x.min()),
        "max": float(x.max()), "percentile_00_5": float(np.percentile(x, 0.5)),
        "percentile_99_5": float(np.percentile(x, 99.5)),
    }


def plans_intensity_properties(plans_file: str, channel: int = 0) -> dict[str, float]:
    """``foreground_intensity_properties_per_channel[channel]`` of an nnU-Net v2 ``plans.json`` (next to the
    official checkpoint in its results folder), i.e. the values the official model was normalised with."""
    with open(plans_file) as f:
        plans = json.load(f)
    props = plans.get("foreground_intensity_properties_per_channel", {}).get(str(channel))
    if not props:
        raise ValueError(f"{plans_file} has no foreground_intensity_properties_per_channel['{channel}']; is it an "
                         "nnU-Net v2 plans.json?")
    return {k: float(v) for k, v in props.items()}


def intensity_overrides(props: Mapping[str, float]) -> dict[str, float]:
    """The bundle's intensity config values from a fingerprint: clip to ``[hu_min, hu_max]`` (0.5 / 99.5
    percentiles), then ``(x - hu_mean) / hu_std``, which is nnU-Net's ``CTNormalization``."""
    if not float(props["std"]) > 0:
        raise ValueError(f"the foreground intensity std must be positive, got {props['std']}.")
    return {
        "hu_min": round(float(props["percentile_00_5"]), 4), "hu_max": round(float(props["percentile_99_5"]), 4),
        "hu_mean": round(float(props["mean"]), 4), "hu_std": round(float(props["std"]), 4),
    }


def _remap_folder(src: str, dst: str) -> int:
    import nibabel as nib

    files = sorted(f for f in os.listdir(src) if f.endswith((".nii", ".nii.gz")))
    if not files:
        raise FileNotFoundError(f"no .nii / .nii.gz label files in {src}.")
    existing = [f for f in files if os.path.exists(os.path.join(dst, f))]
    if existing:
        raise FileExistsError(f"{len(existing)} file(s) already exist in {dst}, e.g. {existing[0]}; nothing written.")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError("the output folder must differ from the input folder.")
    os.makedirs(dst, exist_ok=True)
    for f in files:
        img = nib.load(os.path.join(src, f))
        data = np.asanyarray(img.dataobj)
        out = btcv_to_flare(data.astype(np.int16), name=os.path.join(src, f)).astype(np.uint8)
        nib.save(nib.Nifti1Image(out, img.affine, img.header), os.path.join(dst, f))
    return len(files)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared_networks.bundle.flare", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("intensity", help="nnU-Net CT normalisation values (hu_min/hu_max/hu_mean/hu_std) as JSON")
    s.add_argument("dataset_dir", nargs="?", help="training data (imagesTr/ + labelsTr/ or dataset.json)")
    s.add_argument("--plans", default=None, help="read them from an nnU-Net v2 plans.json instead")
    s.add_argument("--out", default=None, help="write the JSON here (for --args_file); default: print it")
    s.add_argument("--datalist_file", default="dataset.json", help="data list inside dataset_dir ('' = scan)")
    t = sub.add_parser("btcv-to-flare", help="rewrite BTCV label maps with FLARE22 ids into another folder")
    t.add_argument("src", help="folder of BTCV label files")
    t.add_argument("dst", help="output folder (must not contain files of the same names)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "intensity":
            if (args.plans is None) == (args.dataset_dir is None):
                raise ValueError("give either a dataset_dir or --plans plans.json.")
            if args.out and os.path.exists(args.out):
                raise FileExistsError(f"{args.out} exists; choose another --out.")
            if args.plans:
                props = plans_intensity_properties(args.plans)
            else:
                cases = load_datalist(args.dataset_dir, "all", datalist_file=args.datalist_file)
                props = ct_intensity_properties(cases)
            text = json.dumps(intensity_overrides(props), indent=4)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
                print(f"wrote {args.out}: {text}")
            else:
                print(text)
        else:
            n = _remap_folder(args.src, args.dst)
            print(f"wrote {n} label map(s) with FLARE22 ids to {args.dst}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
