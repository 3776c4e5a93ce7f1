"""The MONAI Model Zoo's checks, written once and run for every bundle folder in bundles/.

What a bundle needs for these tests (all derived from its files, nothing bundle-specific here):

- ``LICENSE``, ``configs/{metadata.json, train.json, evaluate.json, inference.json, logging.conf}``,
  ``docs/README.md``;
- ``metadata.json`` on the 20240725 schema; ``network_data_format`` input ``image`` / output ``pred``;
  ``data_type`` ("nibabel", "png", "jpg", "tiff") picks the synthetic files' format; ``export_formats`` lists what
  the network exports to ("torchscript" = ``torch.jit.script`` via MONAI's ``ckpt_export``, "torchscript_trace",
  "torch_export"); without "torchscript" the README must say the network "cannot be scripted";
- train / inference configs with the zoo's ids and the project's shared ids (``dataset_dir``, ``output_dir``,
  ``device``, ``roi_size``; optional ``num_workers``, ``cache_rate``, ``progress_bar``, ``val_interval``,
  ``batch_size``, ``num_samples``), and the project's dataset layout (``shared_networks.bundle.data``);
- optionally ``configs/reduced.json``: an overlay with a smaller network / ROI used for the one-iteration runs and
  exports (the full configuration is still checked for properties and input/output shapes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    BUNDLES_DIR,
    bundle_configs,
    bundle_names,
    bundle_workflow,
    make_synthetic_dataset,
    read_meta,
    run_workflow,
    tree_hashes,
)

import shared_networks
from shared_networks.bundle import META_SCHEMA, META_SCHEMA_URL

BUNDLES = bundle_names()
pytestmark = pytest.mark.skipif(not BUNDLES, reason="no bundles under bundles/")

META_SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
EXPORT_FORMATS = {"torchscript", "torchscript_trace", "torch_export", "onnx"}


def _has_reduced(bundle: str) -> bool:
    return (BUNDLES_DIR / bundle / "configs" / "reduced.json").is_file()


def _train_overrides(bundle: str, configs: list[str], root: Path, dataset: Path) -> dict:
    """Overrides for a tiny CPU run; optional ids only where the bundle defines them."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs)
    ov = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset),
        "output_dir": str(root / "eval"),
        "device": "cpu",
        "train#trainer#max_epochs": 1,
    }
    optional = {"num_workers": 0, "cache_rate": 0.0, "progress_bar": False, "val_interval": 1, "batch_size": 1,
                "num_samples": 1, "sw_batch_size": 1}
    ov.update({k: v for k, v in optional.items() if k in parser})
    return ov


def _tiny_shape(meta: dict) -> list[int]:
    shape = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    return [max(16, int(s) // 4) if not isinstance(s, str) else 32 for s in shape]


@pytest.fixture(params=BUNDLES)
def bundle(request) -> str:
    return request.param


def test_required_files(bundle):
    root = BUNDLES_DIR / bundle
    for rel in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                "configs/evaluate.json", "configs/logging.conf", "docs/README.md"):
        assert (root / rel).is_file(), f"{bundle}: missing {rel}"
    assert "Apache License" in (root / "LICENSE").read_text() or len((root / "LICENSE").read_text()) > 200
    # zoo rule: no personal paths, configs parse as JSON
    for cfg in (root / "configs").glob("*.json"):
        text = cfg.read_text()
        json.loads(text)
        assert not re.search(r"/home/|/Users/|/work/", text), f"{cfg}: personal/absolute path"
    assert not (root / "models" / "model.pt").is_file() or os.path.getsize(root / "models" / "model.pt") < 25e6


def test_metadata(bundle, tmp_path):
    from monai.bundle import verify_metadata

    meta = read_meta(bundle)
    # offline: the schema copy is placed where the zoo's CI puts the downloaded one
    schema = tmp_path / "eval" / "schema.json"
    schema.parent.mkdir()
    shutil.copyfile(META_SCHEMA, schema)
    verify_metadata(
        meta_file=str(BUNDLES_DIR / bundle / "configs" / "metadata.json"), filepath=str(schema),
        hash_val=META_SCHEMA_MD5,
    )
    assert meta["schema"] == META_SCHEMA_URL
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert meta["version"] in meta["changelog"], "the changelog must have an entry for the current version"
    assert list(meta["changelog"])[0] == meta["version"], "newest changelog entry first"
    assert meta["required_packages_version"]["shared-networks"] == shared_networks.__version__
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"])[0] == "image" and list(fmt["outputs"])[0] == "pred"  # MONAI Label / verify_net_in_out
    pred = fmt["outputs"]["pred"]
    ids = sorted(int(k) for k in pred["channel_def"])  # MONAI Label takes the class names from channel_def
    if pred["num_channels"] > 1:  # one entry per channel (softmax or multi-label sigmoid)
        assert ids == list(range(pred["num_channels"]))
    else:  # one sigmoid channel: ids of the saved mask (0 and/or 1)
        assert ids and set(ids) <= {0, 1}
    names = [pred["channel_def"][k] for k in sorted(pred["channel_def"], key=int)]
    assert "background" not in names[1:], "background, when named, is class 0"
    assert fmt["inputs"]["image"]["is_patch_data"] is True
    assert set(meta.get("export_formats", [])) <= EXPORT_FORMATS and meta.get("export_formats")
    assert "#" not in meta.get("data_source", ""), "'#' in strings is rewritten by the config parser"


def test_config_properties(bundle, tmp_path):
    """ConfigWorkflow.check_properties() is empty for train, train+evaluate (checked as train, as the zoo does) and
    infer, on the full configuration."""
    meta = read_meta(bundle)
    ds = make_synthetic_dataset(tmp_path / "ds", meta, _tiny_shape(meta), n_train=2, n_test=1)
    for configs, wtype in (
        (bundle_configs(bundle, "train.json"), "train"),
        (bundle_configs(bundle, "train.json", "evaluate.json"), "train"),
        (bundle_configs(bundle, "inference.json"), "infer"),
    ):
        if wtype == "train":
            ov = _train_overrides(bundle, configs, tmp_path / "root", ds)
        else:  # no trained weights exist: skip the initialize list (it loads models/model.pt)
            ov = {"bundle_root": str(tmp_path / "root"), "dataset_dir": str(ds), "output_dir": str(tmp_path / "out"),
                  "device": "cpu", "initialize": []}
        wf = bundle_workflow(bundle, configs, wtype, **ov)
        wf.initialize()
        assert wf.check_properties() == [], f"{bundle} {[Path(c).name for c in configs]}"
        # MONAI Label needs these ids as well
        if wtype == "train":
            for key in ("network", "train#handlers", "validate#dataset", "run"):
                assert key in wf.parser, f"{bundle}: train config lacks {key!r} (MONAI Label)"
        else:
            for key in ("preprocessing", "postprocessing", "inferer", "network_def", "output_dir"):
                assert key in wf.parser, f"{bundle}: inference config lacks {key!r}"


@pytest.mark.parametrize("max_epochs", [1, 3])
def test_monailabel_training_request_contract(bundle, max_epochs):
    """A MONAI Label training request overrides only ``train#trainer#max_epochs`` and starts from models/model.pt:
    validation (which saves model.pt) must run within those epochs, and the run must not resume an older one."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, "train.json"))
    parser["train#trainer#max_epochs"] = max_epochs
    if "val_interval" in parser:
        val_interval = parser.get_parsed_content("val_interval")
        assert 1 <= val_interval <= max_epochs, f"{bundle}: val_interval {val_interval} with max_epochs {max_epochs}"
    if "resume" in parser:
        assert parser.get_parsed_content("resume") is False, f"{bundle}: resume must default to false"


def test_net_in_out(bundle):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(BUNDLES_DIR / bundle / "configs" / "metadata.json"),
        config_file=str(BUNDLES_DIR / bundle / "configs" / "inference.json"),
        bundle_root=str(BUNDLES_DIR / bundle),
        device="cpu",
    )


def test_train_evaluate_infer_export(bundle, tmp_path):
    """One training iteration, evaluation of the saved model, inference on an unseen image (inputs untouched, output
    has the input's size), and export in every format the metadata declares."""
    import nibabel as nib
    from monai.data import MetaTensor  # noqa: F401  (import check: MONAI data stack available)

    meta = read_meta(bundle)
    extra = ["reduced.json"] if _has_reduced(bundle) else []
    ds = make_synthetic_dataset(tmp_path / "ds", meta, _tiny_shape(meta), n_train=2, n_test=1)
    before = tree_hashes(ds)
    root = tmp_path / "root"

    cfgs = bundle_configs(bundle, "train.json", *extra)
    wf = bundle_workflow(bundle, cfgs, "train", **_train_overrides(bundle, cfgs, root, ds))
    run_workflow(wf)
    assert wf.parser.get_parsed_content("train#trainer").state.iteration >= 1
    assert (root / "models" / "model.pt").is_file(), "train.json must save models/model.pt"

    cfgs = bundle_configs(bundle, "train.json", "evaluate.json", *extra)
    wf = bundle_workflow(bundle, cfgs, "train", **_train_overrides(bundle, cfgs, root, ds))
    run_workflow(wf)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    names = set(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) - {"background"}
    per_class = next(iter(metrics["per_class"].values()))
    assert names <= set(per_class), "evaluate.json must report every class by name"

    cfgs = bundle_configs(bundle, "inference.json", *extra)
    out = tmp_path / "out"
    wf = bundle_workflow(bundle, cfgs, "infer", bundle_root=str(root), dataset_dir=str(ds), output_dir=str(out),
                         device="cpu", **({"num_workers": 0} if "num_workers" in json.load(open(cfgs[0])) else {}))
    run_workflow(wf)
    outputs = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(outputs) == 1, outputs
    assert tree_hashes(ds) == before, "inference modified the dataset"
    src = next((ds / "imagesTs").iterdir())
    if src.name.endswith((".nii", ".nii.gz")):
        assert nib.load(str(outputs[0])).shape[:3] == nib.load(str(src)).shape[:3]

    formats = meta["export_formats"]
    if "torchscript" not in formats:
        readme = (BUNDLES_DIR / bundle / "docs" / "README.md").read_text()
        assert "cannot be scripted" in readme, "say in docs/README.md that the network cannot be scripted"
    override_cfgs = bundle_configs(bundle, "inference.json", *extra)
    roi = None
    if extra:
        roi = json.loads((BUNDLES_DIR / bundle / "configs" / "reduced.json").read_text()).get("roi_size")
    for fmt in formats:
        if fmt == "torchscript":
            from monai.bundle import ckpt_export

            ts = tmp_path / "model.ts"
            ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(root / "models" / "model.pt"),
                        meta_file=str(BUNDLES_DIR / bundle / "configs" / "metadata.json"),
                        config_file=override_cfgs, bundle_root=str(root))
            assert torch.jit.load(str(ts)) is not None
        elif fmt in ("torchscript_trace", "torch_export"):
            from shared_networks.bundle.export import export_network

            path = export_network(str(BUNDLES_DIR / bundle), fmt, filepath=str(tmp_path / f"model_{fmt}"),
                                  ckpt_file=str(root / "models" / "model.pt"), config_file=override_cfgs,
                                  spatial_shape=roi)
            assert os.path.isfile(path)


def test_inference_preprocessing_matches_training(bundle, tmp_path):
    """MONAI configs cannot share a transform list across files, so train.json and inference.json each carry one:
    the network definition must be identical, and the image the network sees at inference must be exactly the
    image validation sees during training (same loading, orientation, spacing, intensity scaling)."""
    from monai.bundle import ConfigParser

    meta = read_meta(bundle)
    train, infer = ConfigParser(), ConfigParser()
    train.read_config(bundle_configs(bundle, "train.json"))
    infer.read_config(bundle_configs(bundle, "inference.json"))
    assert train.get("network_def") == infer.get("network_def")
    for key in ("roi_size", "num_classes", "pixdim", "hu_min", "hu_max", "scaled_min", "scaled_max"):
        if key in train or key in infer:
            assert train.get(key) == infer.get(key), f"{key} differs between train.json and inference.json"
    roi = train.get("roi_size")
    if roi is not None:  # the metadata's patch is the ROI (a slice-wise 2D bundle may append a singleton axis)
        shape = list(meta["network_data_format"]["inputs"]["image"]["spatial_shape"])
        assert shape[: len(roi)] == list(roi) and all(s == 1 for s in shape[len(roi):]), (roi, shape)
    assert train.get("num_classes", meta["network_data_format"]["outputs"]["pred"]["num_channels"]) == \
        meta["network_data_format"]["outputs"]["pred"]["num_channels"]

    ds = make_synthetic_dataset(tmp_path / "ds", meta, _tiny_shape(meta), n_train=1, n_test=0)
    image = str(next((ds / "imagesTr").iterdir()))
    label = str(next((ds / "labelsTr").iterdir()))
    for parser in (train, infer):
        parser["bundle_root"] = str(tmp_path)
        parser["dataset_dir"] = str(ds)
    a = train.get_parsed_content("validate#preprocessing")({"image": image, "label": label})["image"]
    b = infer.get_parsed_content("preprocessing")({"image": image})["image"]
    assert a.shape == b.shape
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), "inference preprocessing differs from training"
    assert torch.allclose(a.affine, b.affine)


# --- the shared helpers every bundle's configs call (fast, not parametrised) -----------------------------------


def _touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_datalist_layouts(tmp_path):
    from shared_networks.bundle import list_images, load_datalist, split_cases

    ds = tmp_path / "ds"
    for i in range(10):  # nnU-Net names: images carry the channel suffix, labels do not
        _touch(ds / "imagesTr" / f"case{i:02d}_0000.nii.gz")
        _touch(ds / "labelsTr" / f"case{i:02d}.nii.gz")
    train, val = load_datalist(str(ds), "training"), load_datalist(str(ds), "validation")
    assert len(train) == 8 and len(val) == 2 and not {d["image"] for d in train} & {d["image"] for d in val}
    assert all(Path(d["label"]).name == Path(d["image"]).name.replace("_0000", "") for d in train + val)
    assert load_datalist(str(ds), "validation") == val, "the split must be deterministic"
    assert len(load_datalist(str(ds), "all")) == 10
    assert split_cases([1], 0.2) == ([1], [1])

    # dataset.json replaces the folder scan; paths are relative to dataset_dir
    (ds / "dataset.json").write_text(json.dumps({
        "training": [{"image": "imagesTr/case00_0000.nii.gz", "label": "labelsTr/case00.nii.gz"}],
        "validation": [{"image": "imagesTr/case01_0000.nii.gz", "label": "labelsTr/case01.nii.gz"}],
        "test": ["imagesTr/case02_0000.nii.gz"],
    }))
    assert [Path(d["image"]).name for d in load_datalist(str(ds), "validation")] == ["case01_0000.nii.gz"]
    assert [Path(p).name for p in list_images(str(ds))] == ["case02_0000.nii.gz"]
    # nnU-Net v2's dataset.json lists no cases: the folders are scanned
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                 "numTraining": 10, "file_ending": ".nii.gz"}))
    assert load_datalist(str(ds), "validation") == val and len(load_datalist(str(ds), "all")) == 10
    _touch(ds / "imagesTs" / "case99_0000.nii.gz")
    assert [Path(p).name for p in list_images(str(ds))] == ["case99_0000.nii.gz"]
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    with pytest.raises(ValueError, match="'training' list"):
        load_datalist(str(ds))
    (ds / "dataset.json").write_text(json.dumps({"training": [{"image": "imagesTr/nope.nii.gz", "label": "x"}]}))
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_datalist(str(ds))

    scans = tmp_path / "scans"
    one = _touch(scans / "a.nii.gz")
    _touch(scans / "b.nii")
    assert [Path(p).name for p in list_images(str(scans))] == ["a.nii.gz", "b.nii"]
    assert list_images(one) == [one]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(str(tmp_path / "empty"))


def test_output_guard_and_flags(tmp_path):
    from shared_networks.bundle import as_bool, check_output_dir

    img = _touch(tmp_path / "scans" / "ct.nii.gz")
    with pytest.raises(ValueError, match="folder of the input"):
        check_output_dir(str(tmp_path / "scans"), [img])
    with pytest.raises(ValueError, match="folder of the input"):
        check_output_dir(str(tmp_path / "scans" / "."), [{"image": img}])
    assert check_output_dir(str(tmp_path / "out"), [img]) == str(tmp_path / "out")
    assert as_bool("False") is False and as_bool("false") is False and as_bool("1") is True and as_bool(0) is False
    with pytest.raises(ValueError):
        as_bool("maybe")


def test_gradient_clipping():
    from types import SimpleNamespace

    from shared_networks.bundle import GradientClipping

    net = torch.nn.Linear(4, 4)
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)
    GradientClipping(12.0)(SimpleNamespace(network=net, optimizer=None, amp=False, scaler=None))
    norm = torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert abs(float(norm) - 12.0) < 1e-3
