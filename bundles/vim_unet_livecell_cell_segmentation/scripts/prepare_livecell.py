"""Turn the LIVECell download (images + COCO annotation files) into the bundle's dataset layout.

Usage (from the bundle folder)::

    python scripts/prepare_livecell.py --livecell_dir /data/LIVECell_dataset_2021 --out /data/livecell

Expects ``<livecell_dir>/images/livecell_train_val_images/*.tif``, ``<livecell_dir>/images/livecell_test_images/*.tif``
and the annotation files ``livecell_coco_{train,val,test}.json`` in ``<livecell_dir>/annotations/LIVECell/`` (or
``--annotations_dir``). Writes::

    <out>/imagesTr/<name>.tif   <out>/labelsTr/<name>.tif   train + val images and their instance masks (uint16)
    <out>/imagesTs/<name>.tif   <out>/labelsTs/<name>.tif   test images and masks
    <out>/dataset.json          {"training": train, "validation": val, "test": test images}
    <out>/dataset_test.json     {"training": test pairs}  (evaluate.json with --eval_split all)

Images are hard-linked when possible (copied otherwise); nothing is ever written into ``livecell_dir``, and existing
files in ``out`` are not replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

SPLITS = (("train", "Tr", "livecell_train_val_images"), ("val", "Tr", "livecell_train_val_images"),
          ("test", "Ts", "livecell_test_images"))


def _place(src: str, dst: str, overwrite: bool) -> None:
    if os.path.exists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass --overwrite to replace it.")
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _find(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    for root, _dirs, files in os.walk(folder):  # some copies keep one sub-folder per cell line
        if name in files:
            return os.path.join(root, name)
    raise FileNotFoundError(f"image {name} (listed in the annotations) not found under {folder}")


def convert_split(annotation_file: str, image_dir: str, out_dir: str, suffix: str, overwrite: bool = False) -> list:
    """Write the images and instance masks of one COCO file; returns ``[{"image", "label"}, ...]`` (relative paths)."""
    import tifffile

    from shared_networks.bundle.instance import coco_instance_masks

    images_out, labels_out = os.path.join(out_dir, f"images{suffix}"), os.path.join(out_dir, f"labels{suffix}")
    os.makedirs(images_out, exist_ok=True)
    os.makedirs(labels_out, exist_ok=True)
    pairs = []
    for file_name, mask in coco_instance_masks(annotation_file):
        name = os.path.basename(file_name)
        stem = os.path.splitext(name)[0]
        _place(_find(image_dir, name), os.path.join(images_out, stem + ".tif"), overwrite)
        label_path = os.path.join(labels_out, stem + ".tif")
        if os.path.exists(label_path) and not overwrite:
            raise FileExistsError(f"{label_path} exists; pass --overwrite to replace it.")
        tifffile.imwrite(label_path, mask, compression="zlib")
        pairs.append({"image": f"images{suffix}/{stem}.tif", "label": f"labels{suffix}/{stem}.tif"})
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--livecell_dir", required=True, help="the LIVECell download (holds images/ and annotations/)")
    p.add_argument("--out", required=True, help="dataset folder to create (the bundle's --dataset_dir)")
    p.add_argument("--annotations_dir", default=None,
                   help="folder of livecell_coco_{train,val,test}.json (default <livecell_dir>/annotations/LIVECell)")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    args = p.parse_args(argv)

    ann_dir = args.annotations_dir or os.path.join(args.livecell_dir, "annotations", "LIVECell")
    out = os.path.abspath(args.out)
    if os.path.realpath(out).startswith(os.path.realpath(args.livecell_dir) + os.sep):
        print("error: --out must not be inside --livecell_dir (the download is never written to).", file=sys.stderr)
        return 2
    lists = {}
    for split, suffix, folder in SPLITS:
        ann = os.path.join(ann_dir, f"livecell_coco_{split}.json")
        if not os.path.isfile(ann):
            print(f"error: {ann} not found (pass --annotations_dir).", file=sys.stderr)
            return 1
        lists[split] = convert_split(ann, os.path.join(args.livecell_dir, "images", folder), out, suffix,
                                     args.overwrite)
        print(f"{split}: {len(lists[split])} images")
    for name, content in (
        ("dataset.json", {"training": lists["train"], "validation": lists["val"],
                          "test": [x["image"] for x in lists["test"]]}),
        ("dataset_test.json", {"training": lists["test"]}),
    ):
        path = os.path.join(out, name)
        if os.path.exists(path) and not args.overwrite:
            print(f"error: {path} exists; pass --overwrite to replace it.", file=sys.stderr)
            return 2
        with open(path, "w") as f:
            json.dump(content, f, indent=1)
    print(f"dataset written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
