"""Write the bundle's data lists for the PraNet polyp split (train on 900 Kvasir-SEG + 550 CVC-ClinicDB frames, test
on five sets), pointing at the PraNet download as it is: nothing is copied or converted.

Usage (from the bundle folder)::

    python scripts/prepare_pranet_split.py --pranet_dir /data/PraNet --out /data/polyp

``--pranet_dir`` holds the two archives of the PraNet repository unpacked side by side::

    TrainDataset/image/<name>.png, TrainDataset/mask/<name>.png                1450 frames
    TestDataset/<set>/images/<name>.png, TestDataset/<set>/masks/<name>.png    Kvasir 100, CVC-ClinicDB 62,
                                                                               CVC-ColonDB 380,
                                                                               ETIS-LaribPolypDB 196, CVC-300 60

Writes (paths relative to ``--out``, so the two folders can move together)::

    <out>/dataset.json             {"training": the 1450 pairs}; train.json holds out --val_fraction for validation
    <out>/dataset_test_<set>.json  {"training": that test set's pairs}; evaluate.json with
                                   --datalist_file dataset_test_<set>.json --eval_split all

Existing files are not replaced unless ``--overwrite`` is given; a frame without its mask stops the script with the
names of the unmatched files. Counts that differ from PraNet's are reported (a partial download is usable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TEST_SETS = {"Kvasir": 100, "CVC-ClinicDB": 62, "CVC-ColonDB": 380, "ETIS-LaribPolypDB": 196, "CVC-300": 60}
TRAIN_COUNT = 1450
EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _files(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist; expected the PraNet layout (see --help).")
    out = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in EXTENSIONS and not name.startswith("."):
            out[stem] = os.path.join(folder, name)
    if not out:
        raise ValueError(f"no image files in {folder}")
    return out


def pairs(images_dir: str, masks_dir: str, rel_to: str) -> list[dict]:
    """``[{"image", "label"}, ...]`` matched by file stem, as paths relative to ``rel_to``."""
    images, masks = _files(images_dir), _files(masks_dir)
    missing = sorted(set(images) - set(masks))
    extra = sorted(set(masks) - set(images))
    if missing or extra:
        raise ValueError(
            f"{images_dir} and {masks_dir} do not pair up: {len(missing)} frame(s) without a mask "
            f"{missing[:5]}, {len(extra)} mask(s) without a frame {extra[:5]}."
        )
    return [{"image": os.path.relpath(images[k], rel_to), "label": os.path.relpath(masks[k], rel_to)} for k in images]


def _write(path: str, content: dict, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it.")
    with open(path, "w") as f:
        json.dump(content, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pranet_dir", required=True, help="folder holding TrainDataset/ and TestDataset/")
    p.add_argument("--out", required=True, help="dataset folder to write the data lists into (--dataset_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace existing data lists")
    args = p.parse_args(argv)

    src, out = os.path.abspath(args.pranet_dir), os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    train = pairs(os.path.join(src, "TrainDataset", "image"), os.path.join(src, "TrainDataset", "mask"), out)
    tests = {}
    for name in TEST_SETS:
        folder = os.path.join(src, "TestDataset", name)
        if os.path.isdir(folder):
            tests[name] = pairs(os.path.join(folder, "images"), os.path.join(folder, "masks"), out)
    # check everything before writing anything
    targets = [os.path.join(out, "dataset.json")] + [os.path.join(out, f"dataset_test_{n}.json") for n in tests]
    if not args.overwrite:
        for t in targets:
            if os.path.exists(t):
                raise FileExistsError(f"{t} exists; pass --overwrite to replace it.")
    _write(targets[0], {"training": train}, args.overwrite)
    print(f"training: {len(train)} pairs" + ("" if len(train) == TRAIN_COUNT else f" (PraNet: {TRAIN_COUNT})"))
    for name, items in tests.items():
        _write(os.path.join(out, f"dataset_test_{name}.json"), {"training": items}, args.overwrite)
        note = "" if len(items) == TEST_SETS[name] else f" (PraNet: {TEST_SETS[name]})"
        print(f"test {name}: {len(items)} pairs{note}")
    absent = [n for n in TEST_SETS if n not in tests]
    if absent:
        print(f"test sets not found under {os.path.join(src, 'TestDataset')}: {', '.join(absent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
