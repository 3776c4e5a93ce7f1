"""Dataset layout shared by every bundle, and the functions that turn a dataset folder into MONAI data lists.

Layout (nnU-Net / Medical Segmentation Decathlon style)::

    dataset_dir/
        imagesTr/<case>.nii.gz     training images (nnU-Net's "<case>_0000.nii.gz" is accepted too)
        labelsTr/<case>.nii.gz     one label map per training image, same case name
        imagesTs/<case>.nii.gz     optional: images to segment (inference)
        dataset.json               optional: explicit lists (replaces the folder scan, see below); an nnU-Net v2
                                   dataset.json (channel_names, labels, file_ending; no case list) is recognised
                                   and the folders are scanned

``dataset.json`` follows the MSD / MONAI ``dataset_0.json`` convention; paths are relative to ``dataset_dir`` (or
absolute)::

    {"training": [{"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}, ...],
     "validation": [...],            # optional; without it a fixed share of "training" is held out
     "test": ["imagesTs/img0061.nii.gz", ...]}

2D bundles use the same layout with ``.png`` / ``.tif`` files. Every function raises a ``ValueError`` or
``FileNotFoundError`` that names the folder or file and says what was expected, instead of letting an empty list
reach a ``DataLoader``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

__all__ = ["IMAGE_EXTENSIONS", "load_datalist", "list_images", "split_cases"]

logger = logging.getLogger(__name__)

#: File endings recognised as images (longest first so ".nii.gz" wins over ".gz").
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

_LAYOUT_HELP = (
    "Expected layout: <dataset_dir>/imagesTr/<case>.nii.gz with a label of the same name in "
    "<dataset_dir>/labelsTr/, or a <dataset_dir>/dataset.json with a 'training' list of "
    "{'image': ..., 'label': ...} entries (see the bundle's docs/README.md)."
)


def _ext(name: str) -> str | None:
    low = name.lower()
    for e in IMAGE_EXTENSIONS:
        if low.endswith(e):
            return e
    return None


def _case_name(filename: str) -> str:
    """File name without extension and without nnU-Net's single-channel suffix ``_0000``."""
    stem = filename[: -len(_ext(filename) or "")] if _ext(filename) else filename
    return stem[:-5] if stem.endswith("_0000") else stem


def _image_files(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if not f.startswith(".") and _ext(f) and os.path.isfile(os.path.join(folder, f))
    )


def _check_dataset_dir(dataset_dir: str) -> str:
    if dataset_dir is None or str(dataset_dir).strip() == "":
        raise ValueError("dataset_dir is not set; pass --dataset_dir /path/to/dataset. " + _LAYOUT_HELP)
    dataset_dir = os.path.abspath(os.path.expanduser(str(dataset_dir)))
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset_dir {dataset_dir} does not exist or is not a folder. " + _LAYOUT_HELP)
    return dataset_dir


def _resolve(dataset_dir: str, path: str, what: str, source: str) -> str:
    full = path if os.path.isabs(path) else os.path.join(dataset_dir, path)
    full = os.path.normpath(full)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{what} listed in {source} not found: {full}")
    return full


#: keys of nnU-Net v2's dataset.json, which describes the folder instead of listing the cases
_NNUNET_V2_KEYS = ("channel_names", "file_ending", "numTraining")


def _from_json(dataset_dir: str, json_path: str) -> dict[str, list] | None:
    """The lists of an MSD-style data list, or ``None`` for an nnU-Net v2 ``dataset.json`` (no case list: the
    folders are scanned)."""
    try:
        with open(json_path) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read the data list {json_path}: {e}") from e
    if isinstance(content, dict) and "training" not in content and any(k in content for k in _NNUNET_V2_KEYS):
        return None
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        raise ValueError(f"{json_path} must be a JSON object with a 'training' list. " + _LAYOUT_HELP)
    out: dict[str, list] = {}
    for split in ("training", "validation"):
        items = []
        for i, item in enumerate(content.get(split) or []):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise ValueError(f"{json_path}: entry {i} of '{split}' must have 'image' and 'label', got {item!r}.")
            items.append(
                {
                    "image": _resolve(dataset_dir, item["image"], f"image of '{split}' entry {i}", json_path),
                    "label": _resolve(dataset_dir, item["label"], f"label of '{split}' entry {i}", json_path),
                }
            )
        out[split] = items
    test = []
    for i, item in enumerate(content.get("test") or []):
        path = item.get("image") if isinstance(item, dict) else item
        test.append(_resolve(dataset_dir, path, f"image of 'test' entry {i}", json_path))
    out["test"] = test
    return out


def _scan_pairs(dataset_dir: str, images_dir: str, labels_dir: str) -> list[dict]:
    img_dir = os.path.join(dataset_dir, images_dir)
    lbl_dir = os.path.join(dataset_dir, labels_dir)
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"no training images: {img_dir} does not exist. " + _LAYOUT_HELP)
    images = _image_files(img_dir)
    if not images:
        raise ValueError(f"no image files in {img_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}). " + _LAYOUT_HELP)
    if not os.path.isdir(lbl_dir):
        raise FileNotFoundError(f"no labels: {lbl_dir} does not exist. " + _LAYOUT_HELP)
    labels = {_case_name(os.path.basename(p)): p for p in _image_files(lbl_dir)}
    pairs, missing = [], []
    for img in images:
        case = _case_name(os.path.basename(img))
        if case in labels:
            pairs.append({"image": img, "label": labels[case]})
        else:
            missing.append(os.path.basename(img))
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) in {img_dir} have no label of the same name in {lbl_dir}: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Add the labels, move those images out, or list "
            "the pairs in dataset.json."
        )
    return pairs


def split_cases(cases: Sequence, val_fraction: float = 0.2) -> tuple[list, list]:
    """Deterministic train/validation split: ``round(val_fraction * n)`` cases (at least one), evenly spread over
    the sorted list, go to validation. With a single case it is used for both (and a warning is logged)."""
    cases = list(cases)
    n = len(cases)
    if n == 0:
        return [], []
    if n == 1:
        logger.warning(
            "only one labelled case: it is used for training AND validation, so the validation Dice measures the "
            "fit to that case, not generalisation."
        )
        return cases, cases
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val_idx = {int((i + 0.5) * n / n_val) for i in range(n_val)}
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val


def load_datalist(
    dataset_dir: str,
    split: str = "training",
    val_fraction: float = 0.2,
    datalist_file: str = "dataset.json",
    images_dir: str = "imagesTr",
    labels_dir: str = "labelsTr",
) -> list[dict]:
    """The ``[{"image": path, "label": path}, ...]`` list of one split of a dataset folder.

    Args:
        dataset_dir: the dataset folder (layout in this module's docstring).
        split: "training", "validation" or "all" (training + validation).
        val_fraction: share of cases held out for validation when the data list does not define "validation".
        datalist_file: JSON data list inside ``dataset_dir`` (or an absolute path) used when it exists (an nnU-Net v2
            ``dataset.json``, which lists no cases, falls back to the folder scan).
        images_dir / labels_dir: sub-folders scanned when there is no data list.

    Raises:
        FileNotFoundError: missing folder or listed file. ValueError: empty folder, image without label, bad JSON.
    """
    if split not in ("training", "validation", "all"):
        raise ValueError(f"split must be 'training', 'validation' or 'all', got {split!r}.")
    dataset_dir = _check_dataset_dir(dataset_dir)
    json_path = datalist_file if os.path.isabs(datalist_file) else os.path.join(dataset_dir, datalist_file)
    lists = _from_json(dataset_dir, json_path) if datalist_file and os.path.isfile(json_path) else None
    if lists is not None:
        if not lists["training"]:
            raise ValueError(f"{json_path} has an empty 'training' list. " + _LAYOUT_HELP)
        if lists["validation"]:
            train, val = lists["training"], lists["validation"]
        else:
            train, val = split_cases(lists["training"], val_fraction)
    else:
        train, val = split_cases(_scan_pairs(dataset_dir, images_dir, labels_dir), val_fraction)
    if split == "training":
        return train
    if split == "validation":
        return val
    return train + [v for v in val if v not in train]


def list_images(
    dataset_dir: str, images_dir: str = "imagesTs", datalist_file: str = "dataset.json"
) -> list[str]:
    """Images to segment: the data list's "test" entries if it has any, else ``dataset_dir/imagesTs/*``, else the
    image files directly inside ``dataset_dir`` (so ``--dataset_dir`` can point at any folder of scans).
    ``dataset_dir`` may also be a single image file."""
    if dataset_dir is not None and os.path.isfile(str(dataset_dir)):
        if not _ext(str(dataset_dir)):
            raise ValueError(f"{dataset_dir} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}).")
        return [os.path.abspath(str(dataset_dir))]
    dataset_dir = _check_dataset_dir(dataset_dir)
    json_path = datalist_file if os.path.isabs(datalist_file) else os.path.join(dataset_dir, datalist_file)
    if datalist_file and os.path.isfile(json_path):
        lists = _from_json(dataset_dir, json_path)
        if lists is not None and lists["test"]:
            return lists["test"]
    sub = os.path.join(dataset_dir, images_dir)
    folder = sub if os.path.isdir(sub) else dataset_dir
    images = _image_files(folder)
    if not images:
        raise ValueError(
            f"no images to segment in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}). Point --dataset_dir at a "
            f"folder of scans, a dataset with {images_dir}/, or a single image file."
        )
    return images
