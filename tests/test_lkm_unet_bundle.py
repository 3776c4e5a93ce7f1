"""LKM-UNet FLARE22 bundle on real data and on bad input.

- the full configuration is the official 3D abdomen CT plan in MONAI's axis order (by construction: parameter count,
  arguments, windows dividing every stage at the ROI); FLARE label ids and nnU-Net's CT normalisation;
- learns: the reduced configuration (configs/reduced.json) trains from scratch through ConfigWorkflow on the demo CT
  (BTCV labels mapped to FLARE ids) and its liver Dice rises, also through inference.json;
- an official (nnU-Net layout) checkpoint converted by ``python -m shared_networks.convert ... --layout monai`` into
  models/model.pt runs in inference.json (window_grouping official) and reproduces the official-layout network;
- bad input (wrong channel count, NaN, missing / corrupt file, another network's checkpoint) fails with a message
  naming the file and what was expected; a small image is padded, not refused; inputs are never modified and
  outputs never overwritten; MONAI Label's ``image_path`` key survives Spacingd.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, REPO, bundle_configs, bundle_workflow, run_workflow, save_nifti

from shared_networks.bundle.flare import BTCV_TO_FLARE, FLARE_CLASSES, btcv_to_flare
from shared_networks.bundle.synapse import BTCV_CLASSES

BUNDLE = BUNDLES_DIR / "lkm_unet_flare_ct_segmentation"
CONFIGS = BUNDLE / "configs"
LIVER = 1  # FLARE id

# On top of configs/reduced.json (ROI 48x40x12 at 8 mm: one patch holds the whole demo CT; AdamW 0.01):
# no augmentation and one patch per step, for fast fitting of one CT on CPU.
FAST_TRAIN = {
    "augment": False,
    "num_samples": 1,
    "batch_size": 1,
    "num_workers": 0,
    "progress_bar": False,
    "device": "cpu",
}


# conftest helpers bound to this bundle; every test runs with one torch / numba thread (see one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
_cfg = functools.partial(bundle_configs, BUNDLE)
_workflow = functools.partial(bundle_workflow, BUNDLE)


@pytest.fixture
def flare_demo_dataset(demo_ct_dataset) -> Path:
    """The demo CT dataset with its BTCV labels renumbered to FLARE ids."""
    path = demo_ct_dataset / "labelsTr" / "ct.nii.gz"
    img = nib.load(str(path))
    flare = btcv_to_flare(np.asanyarray(img.dataobj), name=str(path))
    nib.save(nib.Nifti1Image(flare, img.affine, img.header), str(path))
    return demo_ct_dataset


# ---------------------------------------------------------------------------------------------------------------
# the full configuration, labels and intensities


def test_full_configuration_is_the_official_plan():
    from shared_networks.bundle.export import build_network
    from shared_networks.nets import LKMUNet
    from shared_networks.nets.lkm_unet import plan_kwargs

    net = build_network(str(BUNDLE))
    assert sum(p.numel() for p in net.parameters()) == 63_782_246  # official count, 3D plan with a [1,3,3] stem
    plan = LKMUNet.from_plan("abdomen_ct_3d", layout="monai", deep_supervision=True)
    assert net.constructor_args == plan.constructor_args
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    roi = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert tuple(roi) == plan_kwargs("abdomen_ct_3d", "monai")["roi_size"] == (192, 224, 40)
    assert tuple(roi[::-1]) == (40, 224, 192), "the official nnU-Net patch in (z, y, x)"
    # every stage's map is a whole number of PiM windows and PaM pools at the ROI (no clipped border windows)
    size = list(roi)
    for stride, window, pool in zip(net.strides, net.window_sizes, net.pool_sizes):
        size = [s // st for s, st in zip(size, stride)]
        assert all(s % w == 0 for s, w in zip(size, window)), (size, window)
        assert all(s % p == 0 for s, p in zip(size, pool)), (size, pool)
    assert size == [6, 7, 5]
    names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [names[str(i)] for i in range(14)] == list(FLARE_CLASSES)

    # nnU-Net's deep supervision: one weight per decoder output, 1/2^i normalised, lowest resolution 0
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_cfg("train.json"))
    weights = parser.get_parsed_content("loss").weights
    assert len(weights) == len(net.decoder.seg_layers) == 5
    np.testing.assert_allclose(weights, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0], atol=1e-6)
    assert parser.get_parsed_content("iterations_per_epoch") == 250  # nnU-Net's epoch


def test_btcv_to_flare_mapping_and_intensity_statistics(tmp_path):
    from shared_networks.bundle.flare import ct_intensity_properties, intensity_overrides
    from shared_networks.bundle.flare import main as flare_main

    # every mapped BTCV organ keeps its name; the portal / splenic vein (BTCV 10) becomes background
    for btcv, flare in BTCV_TO_FLARE.items():
        assert BTCV_CLASSES[btcv] == FLARE_CLASSES[flare]
    assert 10 not in BTCV_TO_FLARE and "duodenum" not in BTCV_CLASSES
    src = REPO / "data" / "demo" / "ct" / "label_btcv.nii.gz"
    btcv = np.asanyarray(nib.load(str(src)).dataobj)
    flare = btcv_to_flare(btcv)
    assert flare.dtype == btcv.dtype and flare.shape == btcv.shape
    for b, f in BTCV_TO_FLARE.items():
        assert np.array_equal(btcv == b, flare == f), BTCV_CLASSES[b]
    assert not np.any(flare[btcv == 10])
    with pytest.raises(ValueError, match="weird.nii.gz"):
        btcv_to_flare(np.full((2, 2, 2), 20, np.uint8), name="weird.nii.gz")

    # nnU-Net's foreground fingerprint of the demo CT (values inside the labels), as bundle overrides
    case = {"image": str(REPO / "data/demo/ct/image.nii.gz"), "label": str(src)}
    props = ct_intensity_properties([case], samples_per_case=200_000)
    hu = np.asanyarray(nib.load(case["image"]).dataobj).astype(np.float64)[btcv > 0]
    assert abs(props["mean"] - hu.mean()) < 1.0 and abs(props["std"] - hu.std()) < 1.0
    assert abs(props["percentile_99_5"] - np.percentile(hu, 99.5)) < 5.0
    ov = intensity_overrides(props)
    assert ov["hu_min"] < ov["hu_mean"] < ov["hu_max"] and ov["hu_std"] > 0

    # CLI: the values of an nnU-Net plans.json, written for --args_file
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"foreground_intensity_properties_per_channel": {
        "0": {"max": 3000.0, "mean": 90.5, "median": 98.0, "min": -1000.0, "percentile_00_5": -60.0,
              "percentile_99_5": 280.0, "std": 70.25}}}))
    out = tmp_path / "official_intensity.json"
    assert flare_main(["intensity", "--plans", str(plans), "--out", str(out)]) == 0
    assert flare_main(["intensity", "--plans", str(plans), "--out", str(out)]) == 1, "an existing file is kept"
    assert json.loads(out.read_text()) == {"hu_min": -60.0, "hu_max": 280.0, "hu_mean": 90.5, "hu_std": 70.25}


def test_intensity_is_nnunet_ct_normalisation(tmp_path):
    """clip to [hu_min, hu_max], then (x - hu_mean) / hu_std, in inference and training preprocessing alike."""
    from monai.bundle import ConfigParser

    values = np.array([-1000.0, -100.0, 40.0, 100.0, 250.0, 300.0, 2000.0], np.float32)
    image = np.repeat(values, 4)[:, None, None] * np.ones((1, 8, 4), np.float32)  # 28 x 8 x 4 voxels at 8 mm
    img = tmp_path / "scans" / "ct.nii.gz"
    save_nifti(img, image.astype(np.int16), spacing=(8.0, 8.0, 8.0))
    lbl = tmp_path / "labels" / "ct.nii.gz"
    save_nifti(lbl, np.zeros(image.shape, np.uint8), spacing=(8.0, 8.0, 8.0))
    override = {"hu_min": -60, "hu_max": 280, "hu_mean": 90.5, "hu_std": 70.25}
    expected = (np.clip(values, -60, 280) - 90.5) / 70.25
    for configs, key in ((_cfg("inference.json", "reduced.json"), "preprocessing"),
                         (_cfg("train.json", "reduced.json"), "validate#preprocessing")):
        parser = ConfigParser()
        parser.read_config(configs)
        parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(img.parent), **override})
        out = parser.get_parsed_content(key)({"image": str(img), "label": str(lbl)})["image"]
        got = np.asarray(out)[0, ::4, 0, 0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# learning on real data


def test_reduced_lkm_unet_learns_liver_on_demo_ct(flare_demo_dataset, tmp_path):
    from ignite.engine import Events

    ds = flare_demo_dataset
    root = tmp_path / "root"
    wf = _workflow(
        _cfg("train.json", "reduced.json"),
        bundle_root=str(root),
        dataset_dir=str(ds),
        cache_rate=1.0,
        val_interval=5,
        resume=False,
        **{"train#trainer#max_epochs": 20},
        **FAST_TRAIN,
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    losses, history = [], []
    start = time.time()

    @trainer.on(Events.STARTED)
    def _before_training(engine):
        evaluator.run()  # the untrained network's Dice

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine):
        losses.append(float(engine.state.output[0]["loss"]))

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _stop_when_learned(engine):
        # metric_details: (images, classes without background); liver is class 1 -> column 0
        liver = float(engine.state.metric_details["val_mean_dice"][0, LIVER - 1])
        history.append((trainer.state.iteration, round(liver, 3), round(time.time() - start)))
        if liver > 0.75:
            trainer.terminate()

    wf.run()
    wf.finalize()
    print(f"\nliver Dice by iteration (iteration, dice, seconds): {history}")
    # measured: liver Dice 0.26 before training, 0.60 / 0.68 / 0.75 / 0.79 after 5 / 10 / 15 / 20 iterations
    # (other seeds: 0.69-0.84 after 20); loss 4.27 -> 1.97
    assert history[0][0] == 0 and history[0][1] < 0.35, history
    assert history[-1][1] > 0.7 and history[-1][1] > history[0][1] + 0.4, f"liver Dice did not rise: {history}"
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), f"training loss did not fall: {losses}"
    assert (root / "models" / "model.pt").is_file()

    # the saved best model segments the liver through inference.json as well, in the input's space
    out = tmp_path / "out"
    inf = _workflow(_cfg("inference.json", "reduced.json"), "infer", bundle_root=str(root),
                    dataset_dir=str(ds / "imagesTr"), output_dir=str(out), device="cpu", num_workers=0)
    run_workflow(inf)
    seg_img = nib.load(str(out / "ct_seg.nii.gz"))
    ref_img = nib.load(str(ds / "labelsTr" / "ct.nii.gz"))
    seg, ref = seg_img.get_fdata(), ref_img.get_fdata()
    assert seg.shape == ref.shape and np.allclose(seg_img.affine, ref_img.affine, atol=1e-4)
    a, b = seg == LIVER, ref == LIVER
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    print(f"liver Dice of the saved model through inference.json (original 3 mm grid): {dice:.3f}")
    assert dice > 0.65, f"liver Dice of the saved model through inference.json: {dice:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# official checkpoint import


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_official_checkpoint_cli_into_bundle_inference(flare_demo_dataset, tmp_path):
    """An official-layout (nnU-Net z, y, x) LKM-UNet with the reduced plan, saved as nnU-Net does, goes through the
    converter CLI into models/model.pt; inference.json runs it with window_grouping official, and the bundle's
    network computes the official network's function on the transposed volume."""
    from monai.bundle import ConfigParser

    from shared_networks.convert.lkm_unet import to_official
    from shared_networks.nets import LKMUNet

    reduced = json.loads((CONFIGS / "reduced.json").read_text())
    zyx = {k: [list(v)[::-1] for v in reduced[f"network_def#{k}"]] for k in ("kernel_sizes", "strides",
                                                                            "window_sizes")}
    torch.manual_seed(0)
    official = LKMUNet(spatial_dims=3, in_channels=1, out_channels=14,
                       features_per_stage=reduced["network_def#features_per_stage"], n_blocks_per_stage=1,
                       n_conv_per_stage_decoder=1, pool_sizes=reduced["network_def#pool_sizes"],
                       window_grouping="official", **zyx).eval()
    with torch.no_grad():  # trained-looking weights: non-trivial norms so every layer contributes
        for name, p in official.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": to_official(official), "current_epoch": 1000}, ckpt)

    root = tmp_path / "root"
    model = root / "models" / "model.pt"
    cmd = [sys.executable, "-m", "shared_networks.convert", "lkm_unet", str(ckpt), str(model), "--layout", "monai",
           "--window_sizes", json.dumps(zyx["window_sizes"]),
           "--pool_sizes", json.dumps(reduced["network_def#pool_sizes"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model.is_file() and "layout=monai" in proc.stdout
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])  # the network definition the CLI prints
    for key in ("kernel_sizes", "strides", "window_sizes", "pool_sizes"):
        assert printed[key] == [v if isinstance(v, list) else [v] * 3 for v in reduced[f"network_def#{key}"]], key
    assert printed["scan_axes"] == [2, 1, 0] and printed["window_grouping"] == "official"

    # the bundle's network (reduced.json + official grouping) with the converted weights = the official network
    parser = ConfigParser()
    parser.read_config(_cfg("inference.json", "reduced.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"bundle_root": str(root), "device": "cpu", "dataset_dir": str(tmp_path),
                   "network_def#window_grouping": "official"})
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(model, weights_only=True))
    x = torch.randn(1, 1, 48, 40, 12)
    with torch.no_grad():
        ref = official(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        got = net(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())
    # the same weights with the default (paper, contiguous) grouping compute another function
    from shared_networks.bundle.export import build_network

    contiguous = build_network(str(BUNDLE), _cfg("inference.json", "reduced.json")).eval()
    contiguous.load_state_dict(torch.load(model, weights_only=True))
    with torch.no_grad():
        assert (contiguous(x) - ref).abs().max() > 1e-2

    # and the bundle's inference runs with it on the demo CT
    out = tmp_path / "out"
    inf = _workflow(_cfg("inference.json", "reduced.json"), "infer", bundle_root=str(root),
                    dataset_dir=str(flare_demo_dataset / "imagesTr"), output_dir=str(out), device="cpu",
                    num_workers=0, **{"network_def#window_grouping": "official"})
    run_workflow(inf)
    seg = nib.load(str(out / "ct_seg.nii.gz"))
    assert seg.shape == (122, 101, 30)
    assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= set(range(14))


# Bad-input behaviour (small images, bad files, wrong checkpoints, MONAI Label keys): tests/test_ct_volume_bundles.py
