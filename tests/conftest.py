"""Shared test helpers: the list of bundles, synthetic datasets in the bundles' shared layout (derived from a bundle's
metadata.json, so 2D/3D, channel count, class count and file format follow the bundle), the demo CT dataset, and
what the bundle tests share: config paths, ConfigWorkflow construction and runs, exception chains, NIfTI writing and
the ``one_thread`` fixture."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO / "bundles"
DEMO_CT = REPO / "data" / "demo" / "ct"

#: metadata ``data_type`` -> (image extension, label extension)
FILE_FORMATS = {
    "nibabel": (".nii.gz", ".nii.gz"),
    "nifti": (".nii.gz", ".nii.gz"),
    "itk": (".nii.gz", ".nii.gz"),
    "png": (".png", ".png"),
    "jpg": (".jpg", ".png"),
    "jpeg": (".jpg", ".png"),
    "tiff": (".tif", ".tif"),
    "tif": (".tif", ".tif"),
}


def bundle_names() -> list[str]:
    """Every bundle folder (one with configs/metadata.json) under bundles/."""
    if not BUNDLES_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())


def bundle_path(bundle: str | Path) -> Path:
    """A bundle folder: an absolute path as given, anything else relative to bundles/."""
    path = Path(bundle)
    return path if path.is_absolute() else BUNDLES_DIR / path


def read_meta(bundle: str | Path) -> dict:
    with open(bundle_path(bundle) / "configs" / "metadata.json") as f:
        return json.load(f)


def bundle_configs(bundle: str | Path, *names: str) -> list[str]:
    """Paths (as strings, for ConfigWorkflow) of the named files in a bundle's configs/ folder, in the given order."""
    configs = bundle_path(bundle) / "configs"
    return [str(configs / n) for n in names]


def bundle_workflow(bundle: str | Path, configs: list[str], workflow_type: str = "train", **override):
    """A ``monai.bundle.ConfigWorkflow`` over ``configs`` with the bundle's metadata.json and logging.conf;
    ``override`` sets config ids (``bundle_root``, ``dataset_dir``, ...). Not initialised."""
    from monai.bundle import ConfigWorkflow

    configs_dir = bundle_path(bundle) / "configs"
    return ConfigWorkflow(
        config_file=configs,
        meta_file=str(configs_dir / "metadata.json"),
        logging_file=str(configs_dir / "logging.conf"),
        workflow_type=workflow_type,
        **override,
    )


def run_workflow(wf):
    """Initialise, run and finalise a workflow; returns it (its parser holds the trained engines)."""
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def exception_chain(exc: BaseException | None) -> str:
    """Messages of an exception and its causes, one per line: MONAI wraps transform errors in RuntimeError, so the
    message a test looks for may sit in a cause."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def save_nifti(path: str | Path, array, spacing=(3.0, 3.0, 3.0)) -> None:
    """Write ``array`` as NIfTI with a diagonal affine of ``spacing`` (mm), creating the parent folder."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(root: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (to prove inputs are untouched)."""
    root = Path(root)
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def write_image(path: Path, array: np.ndarray, spacing=None) -> None:
    """Write a channel-last array (spatial..., [C]) in the format given by the file ending."""
    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        affine = np.diag([*(spacing or [1.0] * 3), 1.0])
        nib.save(nib.Nifti1Image(array, affine), str(path))
    elif name.endswith((".tif", ".tiff")):
        import tifffile

        tifffile.imwrite(str(path), array)
    else:
        from PIL import Image

        Image.fromarray(array).save(str(path))


def synthetic_case(spatial_shape, num_channels: int, num_classes: int, fmt: str, seed: int):
    """An image / label pair with a few class blobs the image encodes as brighter regions."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in spatial_shape)
    label = np.zeros(shape, np.uint8)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for c in range(1, num_classes):
        centre = [rng.uniform(0.25, 0.75) * s for s in shape]
        radius = max(2.0, 0.12 * min(shape))
        dist = sum(((g - m) / radius) ** 2 for g, m in zip(grids, centre))
        label[dist <= 1.0] = c
    if fmt == "hounsfield":
        base = rng.normal(-100.0, 30.0, shape) + label.astype(np.float32) * 15.0
        image = base.astype(np.int16)
    else:
        base = rng.uniform(0, 80, shape) + label.astype(np.float32) * (150.0 / max(1, num_classes - 1))
        image = np.clip(base, 0, 255).astype(np.uint8)
    if num_channels > 1:
        image = np.stack([image] * num_channels, axis=-1)
    return image, label


def make_synthetic_dataset(root: str | Path, meta: dict, spatial_shape=None, n_train: int = 2, n_test: int = 1,
                           seed: int = 0) -> Path:
    """A dataset in the shared layout (imagesTr/, labelsTr/, imagesTs/) for the bundle described by ``meta``."""
    root = Path(root)
    spec = meta["network_data_format"]["inputs"]["image"]
    out = meta["network_data_format"]["outputs"]["pred"]
    num_classes = max(2, len(out.get("channel_def", {})) or int(out["num_channels"]))
    shape = spatial_shape or [int(s) if not isinstance(s, str) else 32 for s in spec["spatial_shape"]]
    img_ext, lbl_ext = FILE_FORMATS.get(str(meta.get("data_type", "nibabel")).lower(), (".nii.gz", ".nii.gz"))
    spacing = [1.5] * len(shape) if len(shape) == 3 else None
    for i in range(n_train + n_test):
        image, label = synthetic_case(shape, int(spec["num_channels"]), num_classes, spec.get("format"), seed + i)
        if i < n_train:
            write_image(root / "imagesTr" / f"case{i:03d}{img_ext}", image, spacing)
            write_image(root / "labelsTr" / f"case{i:03d}{lbl_ext}", label, spacing)
        else:
            write_image(root / "imagesTs" / f"case{i:03d}{img_ext}", image, spacing)
    return root


@pytest.fixture
def one_thread():
    """One torch and one numba thread for the test, both restored afterwards: on a shared 2-core box, parallel
    selective-scan regions that wait for a second thread cost 10-20x in wall time (and small CPU workloads gain
    little from a second thread). Opt in per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import numba
    import torch

    prev = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(prev[0])
    numba.set_num_threads(prev[1])


@pytest.fixture
def demo_ct_dataset(tmp_path) -> Path:
    """The demo CT as a one-case dataset in the shared layout (a copy: data/demo is never written)."""
    ds = tmp_path / "ct_dataset"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    shutil.copyfile(DEMO_CT / "image.nii.gz", ds / "imagesTr" / "ct.nii.gz")
    shutil.copyfile(DEMO_CT / "label_btcv.nii.gz", ds / "labelsTr" / "ct.nii.gz")
    return ds

