"""Perspective+ Unet Synapse bundle: a 2D network trained on slices and run over CT volumes slice by slice.

- learns: the reduced configuration (configs/reduced.json) trains from scratch on 2D slices sampled from the demo CT
  (BTCV labels mapped to the 8 Synapse organs at load time) through ConfigWorkflow until the liver Dice of the
  slice-wise validation passes 0.8, the loss falls, and the saved model segments the liver through inference.json;
- an official checkpoint converted with ``python -m shared_networks.convert`` runs in the bundle's inference;
- the native 3D option (configs/native_3d.json) trains and infers;
- bad input (wrong channel count, NaN, missing / corrupt file, BTCV labels without mapping) fails with a message
  naming the file and what was expected; a small image is padded, not refused; inputs are never modified or
  overwritten;
- shared_networks.bundle.slices.SliceWiseNetwork and shared_networks.bundle.synapse (label mapping, TransUNet split,
  TransUNet npz conversion).
"""

from __future__ import annotations

import functools
import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    BUNDLES_DIR,
    DEMO_CT,
    bundle_configs,
    bundle_workflow,
    exception_chain,
    make_synthetic_dataset,
    read_meta,
    run_workflow,
    save_nifti,
)

from shared_networks.bundle.slices import SliceWiseNetwork
from shared_networks.bundle.synapse import (
    BTCV_TO_SYNAPSE,
    SYNAPSE_CLASSES,
    TRANSUNET_TEST_CASES,
    TRANSUNET_TRAIN_CASES,
    BTCVToSynapsed,
    btcv_datalist,
    btcv_to_synapse,
    from_transunet,
)
from shared_networks.nets import PerspectiveUNet

BUNDLE = BUNDLES_DIR / "perspective_unet_synapse_ct_segmentation"
CONFIGS = BUNDLE / "configs"
LIVER = 5  # Synapse id
BTCV_LIVER = 6

# Fast overfitting on one CT (CPU): no augmentation, 8 slices of 96x96 per step, AdamW; validation every 12 steps.
FAST_TRAIN = {
    "augment": False,
    "num_samples": 8,
    "batch_size": 1,
    "iterations_per_epoch": 12,
    "num_workers": 0,
    "progress_bar": False,
    "device": "cpu",
    "map_btcv_labels": True,
    "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": 0.003},
}


# conftest helpers bound to this bundle; every test runs with one torch / numba thread (see one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
_cfg = functools.partial(bundle_configs, BUNDLE)
_workflow = functools.partial(bundle_workflow, BUNDLE)


def _dice(a, b) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _small_net(**kw) -> PerspectiveUNet:
    args = dict(img_size=(32, 32), channels=(4, 8, 8, 16, 16), enltb_depths=(1, 1, 1), scsi_hidden_size=8,
                scsi_heads=2, scsi_layers=1, scsi_mlp_dim=16)
    args.update(kw)
    return PerspectiveUNet(2, 1, 9, **args)


# ---------------------------------------------------------------------------------------------------------------
# learning on real data


def test_reduced_bundle_learns_liver_on_demo_ct_slices(demo_ct_dataset, tmp_path):
    from ignite.engine import Events

    root = tmp_path / "root"
    wf = _workflow(
        _cfg("train.json", "reduced.json"),
        bundle_root=str(root),
        dataset_dir=str(demo_ct_dataset),
        cache_rate=1.0,
        val_interval=1,
        resume=False,
        **{"train#trainer#max_epochs": 8},
        **FAST_TRAIN,
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    losses, history, shapes = [], [], set()
    start = time.time()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine):
        losses.append(float(engine.state.output[0]["loss"]))
        # the engine decollates the batch into its items: 8 slices (1, 96, 96) sampled from the volume
        shapes.add((len(engine.state.batch), *{tuple(item["image"].shape) for item in engine.state.batch}))

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _stop_when_learned(engine):
        # metric_details: (images, classes without background); liver is Synapse class 5 -> column 4
        liver = float(engine.state.metric_details["val_mean_dice"][0, LIVER - 1])
        history.append((trainer.state.iteration, round(liver, 3), round(time.time() - start)))
        if liver > 0.8:
            trainer.terminate()

    wf.run()
    wf.finalize()
    print(f"\nliver Dice by iteration (iteration, dice, seconds): {history}")
    assert shapes == {(8, (1, 96, 96))}, f"the network must be trained on batches of 2D slices, got {shapes}"
    assert history and history[-1][1] > 0.8, f"liver Dice did not pass 0.8: {history}"
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), "training loss did not fall"
    assert (root / "models" / "model.pt").is_file()

    # the saved best model segments the liver of the whole volume through inference.json (slice by slice)
    out = tmp_path / "out"
    inf = _workflow(_cfg("inference.json", "reduced.json"), "infer", bundle_root=str(root),
                    dataset_dir=str(demo_ct_dataset / "imagesTr"), output_dir=str(out), device="cpu", num_workers=0)
    run_workflow(inf)
    seg = nib.load(str(out / "ct_seg.nii.gz"))
    ref = nib.load(str(demo_ct_dataset / "labelsTr" / "ct.nii.gz"))
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine, atol=1e-4)
    dice = _dice(seg.get_fdata() == LIVER, ref.get_fdata() == BTCV_LIVER)
    print(f"liver Dice of the saved model through inference.json: {dice:.3f}")
    assert dice > 0.75, f"liver Dice of the saved model through inference.json: {dice:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# official checkpoint -> models/model.pt -> inference


def _random_official_state_dict(num_classes: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    from shared_networks.convert.perspective_unet import official_state_dict_shapes

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_state_dict_shapes(num_classes=num_classes).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(3)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            sd[k] = torch.randn(shape, generator=g) * int(np.prod(shape[1:])) ** -0.5
        elif k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


def test_official_checkpoint_import_then_bundle_inference(tmp_path, capsys):
    from shared_networks.convert.__main__ import main as convert_cli

    official = tmp_path / "official" / "epoch_599.pth"
    official.parent.mkdir()
    sd = _random_official_state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, official)  # DataParallel-trained files carry "module."
    root = tmp_path / "root"
    model_pt = root / "models" / "model.pt"
    assert convert_cli(["perspective_unet", str(official), str(model_pt), "--layout", "monai",
                        "--num_classes", "9"]) == 0
    assert "PerspectiveUNet" in capsys.readouterr().out
    # the CLI never replaces an existing file
    assert convert_cli(["perspective_unet", str(official), str(model_pt), "--num_classes", "9"]) == 2

    # the full-size bundle network takes the converted file as it is (strict key / shape check on load), and runs
    # on a 2-slice CT; slices resized to 224 x 224 (the official protocol) so that each is a single window
    scans = tmp_path / "scans"
    rng = np.random.default_rng(0)
    save_nifti(scans / "ct.nii.gz", rng.normal(0, 200, (60, 50, 2)).astype(np.int16), spacing=(0.8, 0.8, 5.0))
    out = tmp_path / "out"
    wf = _workflow(_cfg("inference.json"), "infer", bundle_root=str(root), dataset_dir=str(scans),
                   output_dir=str(out), device="cpu", num_workers=0, resize_slices=True,
                   **{"network_def#network#scsi_attention": "self"})
    wf.initialize()
    network = wf.parser.get_parsed_content("network")
    saved = torch.load(model_pt, weights_only=True)
    assert network.state_dict().keys() == saved.keys()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in saved.items()), "weights not loaded as converted"
    # the official head (segmentation_head.0) is this bundle's head, kernels transposed for MONAI's (x, y) order
    assert torch.equal(saved["head.weight"], sd["segmentation_head.0.weight"].transpose(-1, -2))
    wf.run()
    wf.finalize()
    seg = nib.load(str(out / "ct_seg.nii.gz"))
    assert seg.shape == (60, 50, 2)
    assert set(np.unique(seg.get_fdata()).astype(int)) <= set(range(9))


# ---------------------------------------------------------------------------------------------------------------
# native 3D variant


def test_native_3d_option_trains_and_infers(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", read_meta(BUNDLE), [40, 36, 20], n_train=1, n_test=1)
    tiny = {
        "roi_size": [32, 32, 16],
        "network_def#network#channels": [4, 8, 8, 16, 16],
        "network_def#network#enltb_depths": [1, 1, 1],
        "network_def#network#scsi_hidden_size": 8,
        "network_def#network#scsi_layers": 1,
        "network_def#network#scsi_mlp_dim": 16,
        "num_workers": 0,
        "device": "cpu",
    }
    root = tmp_path / "root"
    wf = _workflow(_cfg("train.json", "native_3d.json"), bundle_root=str(root), dataset_dir=str(ds),
                   cache_rate=0.0, progress_bar=False, batch_size=1, num_samples=1, iterations_per_epoch=1,
                   val_interval=1, **{"train#trainer#max_epochs": 1}, **tiny)
    wf.initialize()
    net = wf.parser.get_parsed_content("network_def")
    assert net.network.spatial_dims == 3 and net.spatial_dims == 3
    wf.run()
    wf.finalize()
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 1
    assert (root / "models" / "model.pt").is_file()

    out = tmp_path / "out"
    inf = _workflow(_cfg("inference.json", "native_3d.json"), "infer", bundle_root=str(root),
                    dataset_dir=str(ds / "imagesTs"), output_dir=str(out), **tiny)
    run_workflow(inf)
    (seg,) = list(out.iterdir())
    assert nib.load(str(seg)).shape == (40, 36, 20)


# ---------------------------------------------------------------------------------------------------------------
# bad input (the image-level checks shared by every CT bundle are in tests/test_ct_volume_bundles.py)


def test_btcv_labels_without_mapping_are_refused(tmp_path):
    """13-organ BTCV labels given to the 9-class bundle stop the run, naming the file and the remedy."""
    ds = tmp_path / "ds"
    save_nifti(ds / "imagesTr" / "ct.nii.gz", np.asanyarray(nib.load(str(DEMO_CT / "image.nii.gz")).dataobj))
    save_nifti(ds / "labelsTr" / "ct.nii.gz", np.asanyarray(nib.load(str(DEMO_CT / "label_btcv.nii.gz")).dataobj))
    wf = _workflow(_cfg("train.json", "reduced.json"), bundle_root=str(tmp_path / "root"), dataset_dir=str(ds),
                   num_workers=0, cache_rate=0.0, progress_bar=False, device="cpu", **{"train#trainer#max_epochs": 1})
    wf.initialize()
    with pytest.raises(Exception) as e:
        wf.run()
    text = exception_chain(e.value)
    assert "outside 0..8" in text and "ct.nii.gz" in text and "remap" in text, text


# ---------------------------------------------------------------------------------------------------------------
# shared_networks.bundle.slices


def test_slice_wise_network_volume_equals_slices_and_keeps_plain_keys():
    torch.manual_seed(0)
    net = _small_net().eval()
    wrapped = SliceWiseNetwork(net, spatial_dim=2).eval()
    x = torch.randn(2, 1, 32, 32, 5)
    with torch.no_grad():
        ref = torch.stack([net(x[..., i]) for i in range(5)], dim=-1)
        assert torch.allclose(wrapped(x), ref, atol=1e-5)
        chunked = SliceWiseNetwork(net, spatial_dim=2, slice_batch_size=3).eval()
        assert torch.allclose(chunked(x), ref, atol=1e-5)
        # another axis: (B, C, 32, S, 32) sliced along axis 1
        y = x.permute(0, 1, 2, 4, 3)
        assert torch.allclose(SliceWiseNetwork(net, spatial_dim=1)(y), ref.permute(0, 1, 2, 4, 3), atol=1e-5)
        # 2D input passes through
        assert torch.equal(wrapped(x[..., 0]), net(x[..., 0]))
    # the checkpoint has the bare network's key names, and loads both ways
    assert wrapped.state_dict().keys() == net.state_dict().keys()
    other = SliceWiseNetwork(_small_net())
    other.load_state_dict(net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.network.state_dict().values(), net.state_dict().values()))
    bare = _small_net()
    bare.load_state_dict(wrapped.state_dict())
    # a prefixed checkpoint ("network." keys, e.g. saved from named_parameters) is accepted as well
    other.load_state_dict({"network." + k: v for k, v in net.state_dict().items()})
    # DDP-style nesting: the prefix of the wrapper itself is kept
    holder = torch.nn.Module()
    holder.module = SliceWiseNetwork(_small_net())
    assert all(k.startswith("module.") and not k.startswith("module.network.") for k in holder.state_dict())
    holder.load_state_dict({"module." + k: v for k, v in net.state_dict().items()})
    # a checkpoint of another network is still refused
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({"head.weight": torch.zeros(1)})


def test_slice_wise_network_arguments_and_3d_passthrough():
    net3d = PerspectiveUNet(3, 1, 9, img_size=(16, 16, 16), channels=(2, 4, 4, 8, 8), enltb_depths=(1, 1, 1),
                            scsi_hidden_size=8, scsi_heads=2, scsi_layers=1, scsi_mlp_dim=8).eval()
    wrapped = SliceWiseNetwork(net3d)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(wrapped(x), net3d(x))
    with pytest.raises(ValueError, match="spatial_dim"):
        SliceWiseNetwork(net3d, spatial_dim=3)
    with pytest.raises(ValueError, match="network_dims"):
        SliceWiseNetwork(torch.nn.Conv2d(1, 1, 1))
    conv = SliceWiseNetwork(torch.nn.Conv2d(1, 2, 1), network_dims=2)
    assert conv(torch.randn(1, 1, 4, 4, 3)).shape == (1, 2, 4, 4, 3)
    # a wrong channel count reaches the network's own check
    with pytest.raises(ValueError, match="input channel"):
        SliceWiseNetwork(_small_net())(torch.randn(1, 2, 32, 32, 2))


# ---------------------------------------------------------------------------------------------------------------
# shared_networks.bundle.synapse


def test_btcv_to_synapse_mapping():
    btcv = torch.arange(14)
    syn = btcv_to_synapse(btcv)
    # every kept organ gets its Synapse id, by name
    from shared_networks.bundle.synapse import BTCV_CLASSES

    for b, s in BTCV_TO_SYNAPSE.items():
        assert BTCV_CLASSES[b] == SYNAPSE_CLASSES[s] and int(syn[b]) == s
    assert [int(v) for v in syn] == [0, 7, 4, 3, 2, 0, 5, 8, 1, 0, 0, 6, 0, 0]
    meta = read_meta(BUNDLE)["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [meta[str(i)] for i in range(9)] == list(SYNAPSE_CLASSES)
    # arrays keep type and dtype; MetaTensors keep their metadata
    arr = np.array([[[6, 11], [13, 0]]], np.uint8)
    out = btcv_to_synapse(arr)
    assert out.dtype == np.uint8 and out.tolist() == [[[5, 6], [0, 0]]]
    from monai.data import MetaTensor

    mt = MetaTensor(torch.tensor([[8.0, 1.0]]), meta={"filename_or_obj": "label0001.nii.gz"})
    d = BTCVToSynapsed(keys="label")({"label": mt})
    assert d["label"].tolist() == [[1.0, 7.0]] and d["label"].meta["filename_or_obj"] == "label0001.nii.gz"
    with pytest.raises(ValueError, match=r"label0001.nii.gz.*\[14\]"):
        BTCVToSynapsed(keys="label")({"label": MetaTensor(torch.tensor([[14.0]]),
                                                         meta={"filename_or_obj": "label0001.nii.gz"})})


def test_transunet_split_lists(tmp_path):
    assert len(TRANSUNET_TRAIN_CASES) == 18 and len(TRANSUNET_TEST_CASES) == 12
    assert not set(TRANSUNET_TRAIN_CASES) & set(TRANSUNET_TEST_CASES)
    raw = tmp_path / "Training"
    for c in (*TRANSUNET_TRAIN_CASES, *TRANSUNET_TEST_CASES):
        for kind in ("img", "label"):
            (raw / kind).mkdir(parents=True, exist_ok=True)
            (raw / kind / f"{kind}{c:04d}.nii.gz").write_bytes(b"x")
    lists = btcv_datalist(str(raw), relative_to=str(raw))
    assert lists["validation"][0] == {"image": "img/img0001.nii.gz", "label": "label/label0001.nii.gz"}
    assert len(lists["training"]) == 18 and len(lists["validation"]) == 12

    from shared_networks.bundle.synapse import main

    assert main(["btcv-split", str(raw)]) == 0
    written = json.loads((raw / "dataset.json").read_text())
    assert written == lists
    assert main(["btcv-split", str(raw)]) == 1  # never replaces the file
    os.remove(raw / "img" / "img0036.nii.gz")
    with pytest.raises(FileNotFoundError, match="img0036"):
        btcv_datalist(str(raw))


def test_from_transunet_npz_slices_become_volumes(tmp_path):
    src = tmp_path / "Synapse"
    (src / "train_npz").mkdir(parents=True)
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 1, (3, 8, 6)).astype(np.float32)  # (slices, rows, columns), TransUNet's [0, 1] scaling
    lbl = rng.integers(0, 9, (3, 8, 6)).astype(np.float32)
    for i in range(3):
        np.savez(src / "train_npz" / f"case0005_slice{i:03d}.npz", image=vol[i], label=lbl[i])
    dst = tmp_path / "nifti"
    lists = from_transunet(str(src), str(dst))
    assert lists == {"training": [{"image": "imagesTr/case0005.nii.gz", "label": "labelsTr/case0005.nii.gz"}],
                     "validation": []}
    img = nib.load(str(dst / "imagesTr" / "case0005.nii.gz"))
    assert img.shape == (8, 6, 3)  # rows, columns, slices: the slices the official model saw, unchanged
    assert np.allclose(img.get_fdata()[..., 1], vol[1] * 400 - 125, atol=1e-3)  # back to HU
    assert np.array_equal(nib.load(str(dst / "labelsTr" / "case0005.nii.gz")).get_fdata()[..., 2], lbl[2])
    from shared_networks.bundle import load_datalist

    assert load_datalist(str(dst), "training")[0]["image"].endswith("case0005.nii.gz")
    with pytest.raises(FileExistsError):
        from_transunet(str(src), str(dst))
    with pytest.raises(FileNotFoundError, match="train_npz"):
        from_transunet(str(tmp_path / "nothing"), str(tmp_path / "x"))


# ---------------------------------------------------------------------------------------------------------------
# multi-process training


def test_multi_gpu_config_runs_under_torchrun_on_cpu(tmp_path):
    """Two CPU processes (gloo): each rank draws its own slices (per-rank seed), DDP keeps the weights in sync."""
    import subprocess
    import sys

    from conftest import REPO

    ds = make_synthetic_dataset(tmp_path / "ds", read_meta(BUNDLE), [40, 36, 6], n_train=4, n_test=0)
    root = tmp_path / "root"
    ov = {"bundle_root": str(root), "dataset_dir": str(ds), "num_workers": 0, "progress_bar": False,
          "augment": False, "num_samples": 2, "cache_rate": 0.0, "val_fraction": 0.5, "val_interval": 1,
          "iterations_per_epoch": 2, "train#trainer#max_epochs": 1}
    args = [a for k, v in ov.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run",
           "--config_file", str(_cfg("train.json", "multi_gpu_train.json", "reduced.json")),
           "--logging_file", str(CONFIGS / "logging.conf"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (root / "models" / "model.pt").is_file(), log[-2000:]
    (ckpt,) = list((root / "models" / "checkpoints").glob("checkpoint_*.pt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["trainer"]["iteration"] == 2 and state["trainer"]["epoch_length"] == 2  # iterations_per_epoch
    assert not any(k.startswith(("module.", "network.")) for k in state["model"]), "plain key names expected"


@pytest.mark.parametrize("overlay, shape", [("reduced.json", (1, 96, 96)), ("native_3d.json", (1, 32, 32, 16))])
def test_every_augmentation_keeps_image_and_label_aligned(overlay, shape):
    """Each of the 2D (slice) and 3D augmentations of the SomeOf list runs on a sample of the network's input shape,
    keeps its shape, and leaves the label integer-valued (nearest interpolation)."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config(_cfg("train.json", overlay))
    if overlay == "native_3d.json":
        parser["roi_size"] = list(shape[1:])
    augs = parser.get_parsed_content("augmentations")
    assert len(augs) >= 8
    set_determinism(seed=0)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape[1:]], indexing="ij")
    image = (sum(grids) / sum(shape[1:])).unsqueeze(0) * 2 - 1
    label = (image > 0).float() * 5
    for aug in augs:
        for _ in range(3):
            out = aug({"image": image.clone(), "label": label.clone()})
            assert tuple(out["image"].shape) == shape and tuple(out["label"].shape) == shape, type(aug).__name__
            values = set(torch.unique(torch.as_tensor(out["label"])).tolist())
            assert values <= {0.0, 5.0}, f"{type(aug).__name__} made label values {values}"
            assert torch.isfinite(torch.as_tensor(out["image"])).all()
    set_determinism(seed=None)


@pytest.mark.parametrize("flag", ["true", "false", True, False])
def test_command_line_flags_switch_transforms(flag):
    """``--resize_slices false`` arrives as the string "false" from the command line; it must mean False."""
    from monai.bundle import ConfigParser

    on = flag in ("true", True)
    parser = ConfigParser()
    parser.read_config(_cfg("train.json"))
    parser.update({"resize_slices": flag, "map_btcv_labels": flag, "augment": flag})
    names = [type(t).__name__ for t in parser.get_parsed_content("validate#preprocessing").transforms]
    assert ("Resized" in names) == on and ("Spacingd" in names) == (not on), names
    assert ("BTCVToSynapsed" in names) == on, names
    random_names = [type(t).__name__ for t in parser.get_parsed_content("train#random_transforms") if t is not None]
    assert ("SomeOf" in random_names) == on, random_names
