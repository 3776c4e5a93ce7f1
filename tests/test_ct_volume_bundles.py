"""Bad-input behaviour of every CT-volume bundle (NIfTI in, NIfTI out), written once.

Runs each bundle's ``inference.json`` + ``reduced.json`` through ``ConfigWorkflow`` with a randomly initialised
reduced network: small images are padded, nothing the user owns is overwritten, bad images and wrong checkpoints get
messages that name the problem and the file, and MONAI Label's ``image_path`` key survives the Spacingd workaround.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    BUNDLES_DIR,
    bundle_configs,
    bundle_names,
    bundle_workflow,
    exception_chain,
    read_meta,
    run_workflow,
    save_nifti,
    tree_hashes,
)

CT_BUNDLES = [
    b for b in bundle_names()
    if read_meta(b).get("data_type") == "nibabel" and (BUNDLES_DIR / b / "configs" / "reduced.json").is_file()
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=CT_BUNDLES)
def infer_setup(request, tmp_path):
    """(bundle configs folder, bundle_root with a random reduced model.pt, runner for inference.json + reduced.json)."""
    from shared_networks.bundle.export import build_network

    bundle = BUNDLES_DIR / request.param
    cfg = bundle_configs(bundle, "inference.json", "reduced.json")
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    torch.save(build_network(str(bundle), cfg).state_dict(), root / "models" / "model.pt")

    def run(dataset_dir, output_dir=None, **override):
        run_workflow(bundle_workflow(
            bundle, cfg, "infer", bundle_root=str(root), dataset_dir=str(dataset_dir),
            output_dir=str(output_dir or tmp_path / "out"), device="cpu", num_workers=0, **override,
        ))

    return bundle, root, run


def test_small_image_is_padded_and_inputs_untouched(infer_setup, tmp_path):
    _, _, run = infer_setup
    img = tmp_path / "scans" / "small.nii.gz"
    save_nifti(img, np.random.default_rng(0).normal(0, 100, (20, 17, 7)).astype(np.int16))
    before = tree_hashes(img.parent)
    run(img.parent, tmp_path / "out")
    seg = nib.load(str(tmp_path / "out" / "small_seg.nii.gz"))
    assert seg.shape == (20, 17, 7)
    assert np.allclose(seg.affine, nib.load(str(img)).affine, atol=1e-4)
    assert tree_hashes(img.parent) == before

    # a second run never overwrites the first result...
    mtime = os.path.getmtime(tmp_path / "out" / "small_seg.nii.gz")
    with pytest.raises(Exception) as e:
        run(img.parent, tmp_path / "out")
    assert "already exists" in exception_chain(e.value)
    assert os.path.getmtime(tmp_path / "out" / "small_seg.nii.gz") == mtime
    # ...unless asked to
    run(img.parent, tmp_path / "out", overwrite=True)
    # and never writes into the input folder
    with pytest.raises(Exception) as e:
        run(img.parent, img.parent)
    assert "folder of the input" in exception_chain(e.value)
    assert tree_hashes(img.parent) == before


@pytest.mark.parametrize(
    "case, expected",
    [
        ("two_channels", "expected 1 channel"),
        ("slice_2d", "expected a 3D image"),
        ("nan", "NaN"),
        ("corrupt", "could not read"),
        ("missing", "not found"),
    ],
)
def test_bad_images_get_clear_errors(infer_setup, tmp_path, case, expected):
    _, _, run = infer_setup
    scans = tmp_path / "scans"
    path = scans / "scan.nii.gz"
    if case == "two_channels":
        save_nifti(path, np.zeros((16, 16, 8, 2), np.float32))
    elif case == "slice_2d":  # a single 2D slice saved as a 2D NIfTI: the bundles take volumes
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), str(path))
    elif case == "nan":
        arr = np.zeros((16, 16, 8), np.float32)
        arr[3, 4, 5] = np.nan
        save_nifti(path, arr)
    elif case == "corrupt":
        scans.mkdir(parents=True)
        path.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    if case == "missing":
        scans.mkdir(parents=True)
        override = {"datalist": [str(scans / "gone.nii.gz")]}
    else:
        override = {}
    before = tree_hashes(scans)
    with pytest.raises(Exception) as e:
        run(scans, tmp_path / "out", **override)
    text = exception_chain(e.value)
    assert expected in text, text
    assert ("gone.nii.gz" if case == "missing" else "scan.nii.gz") in text, "the message must name the file"
    assert tree_hashes(scans) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_checkpoint_of_another_network_is_refused(infer_setup, tmp_path):
    from monai.networks.nets import UNet

    from shared_networks.bundle.export import build_network

    bundle, root, run = infer_setup
    scans = tmp_path / "scans"
    save_nifti(scans / "scan.nii.gz", np.zeros((16, 16, 8), np.int16))
    torch.save(UNet(3, 1, 14, channels=(8, 16), strides=(2,)).state_dict(), root / "models" / "model.pt")
    with pytest.raises(Exception) as e:
        run(scans)
    msg = exception_chain(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "another network" in msg
    # the full configuration's weights do not fit the reduced one: misshapen keys are named
    torch.save(build_network(str(bundle)).state_dict(), root / "models" / "model.pt")
    with pytest.raises(Exception) as e:
        run(scans)
    assert "misshapen keys" in exception_chain(e.value)


def test_monai_label_image_path_key_survives_spacing(infer_setup, tmp_path):
    """MONAI Label puts the string ``image_path`` into the data dict; monai 1.6's Spacingd then calls
    ``d["image_path"].update(...)`` (AttributeError, HTTP 500). inference.json moves the key aside before Spacingd
    and restores it after saving; this runs the bundle's pre/post-processing the way MONAI Label does."""
    from monai.bundle import ConfigParser

    bundle, root, _ = infer_setup
    configs = bundle / "configs"
    img = tmp_path / "scans" / "ct.nii.gz"
    save_nifti(img, np.random.default_rng(0).normal(0, 100, (40, 30, 12)).astype(np.int16))
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "reduced.json")])
    parser.read_meta(str(configs / "metadata.json"))
    parser.update({"bundle_root": str(root), "output_dir": str(tmp_path / "out"), "device": "cpu",
                   "dataset_dir": str(img.parent)})
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    inferer = parser.get_parsed_content("inferer")
    net = parser.get_parsed_content("network").eval()
    d = pre({"image": str(img), "image_path": str(img)})
    assert "image_path" not in d and d["orig_image_path"] == str(img)
    with torch.no_grad():
        d["pred"] = inferer(d["image"][None], net)[0]
    d = post(d)
    assert d["image_path"] == str(img), "MONAI Label's writer needs image_path back"
    assert tuple(d["pred"].shape[1:]) == (40, 30, 12)
