"""ViM-UNet LIVECell bundle (bundles/vim_unet_livecell_cell_segmentation) and shared_networks.bundle.instance.

- instance tools on hand-made examples: boundary / distance targets (values worked out by hand or by an independent
  restatement), the mean segmentation accuracy (perfect -> 1, one merged pair -> 7/24 exactly, agreement with a
  brute-force matching), the Dice loss, watershed post-processing recovering the nuclei mask from ideal targets;
- learns: the reduced configuration trains through ConfigWorkflow on random crops of the left three quarters of the
  stardist nuclei image; validation / evaluation / inference on the held-out right quarter (sliding window over an
  image larger than the window) must reach a measured foreground Dice and mSA; outputs are uint16 instance TIFFs
  aligned with the input;
- the distance-target variant and the probability maps run end to end; the paper-time overlay takes a converted
  torch-em checkpoint (the documented import command);
- bad input (RGB image, NaN, corrupt / missing file, bad instance masks) fails with a message naming the file;
  inputs are never modified or overwritten.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import BUNDLES_DIR, REPO, bundle_configs, bundle_workflow, exception_chain, run_workflow, tree_hashes

from shared_networks.bundle import instance as I

BUNDLE = BUNDLES_DIR / "vim_unet_livecell_cell_segmentation"
CONFIGS = BUNDLE / "configs"
NUCLEI = REPO / "data" / "demo" / "nuclei"
SPLIT = 384  # image columns [0, 384) train, [384, 512) held out


# conftest helpers bound to this bundle; every test runs with one torch / numba thread (see one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
_cfg = functools.partial(bundle_configs, BUNDLE)
_workflow = functools.partial(bundle_workflow, BUNDLE)


# ---------------------------------------------------------------------------------------------------------------------
# targets


def test_boundary_targets_mark_every_pixel_with_a_different_4_neighbour():
    lab = np.zeros((6, 9), np.int64)
    lab[1:5, 1:4] = 3
    lab[1:5, 4:8] = 7  # touches object 3
    fg, bd = I.boundary_targets(lab)
    assert np.array_equal(fg, (lab > 0).astype(np.float32))
    # independent restatement of skimage's "thick" boundaries: a pixel differs from one of its 4 neighbours
    pad = np.pad(lab, 1, mode="edge")
    ref = np.zeros_like(lab, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        ref |= pad[dy:dy + lab.shape[0], dx:dx + lab.shape[1]] != lab
    assert np.array_equal(bd.astype(bool), ref)
    # by hand: both sides of the touching line are boundary, the object cores are not
    assert bd[2, 3] == 1 and bd[2, 4] == 1 and bd[2, 2] == 0 and bd[2, 5] == 0 and bd[2, 6] == 0


def test_distance_targets_by_hand():
    lab = np.zeros((9, 11), np.int64)
    lab[2:7, 3:8] = 5  # 5x5 square, centre (4, 5)
    fg, cd, bd = I.distance_targets(lab, min_size=25)
    assert np.array_equal(fg, (lab > 0).astype(np.float32))
    assert np.all(cd[lab == 0] == 1) and np.all(bd[lab == 0] == 1), "background distance is 1"
    yy, xx = np.mgrid[2:7, 3:8]
    expect_cd = np.sqrt((yy - 4.0) ** 2 + (xx - 5.0) ** 2) / np.sqrt(8.0)
    assert np.allclose(cd[2:7, 3:8], expect_cd, atol=1e-6)
    # rings of the square: distance to its outer ring 2, 1, 0 -> inverted and normalised 0, 0.5, 1
    ring = np.minimum(np.minimum(yy - 2, 6 - yy), np.minimum(xx - 3, 7 - xx))
    assert np.allclose(bd[2:7, 3:8], (2 - ring) / 2.0, atol=1e-6)

    # a U shape: the centroid lies in the gap, so the centre moves to the point farthest from the boundary
    u = np.zeros((12, 12), np.int64)
    u[1:11, 1:4] = 1
    u[1:11, 8:11] = 1
    u[8:11, 1:11] = 1
    _, cd, bd = I.distance_targets(u, min_size=0)
    centre = np.unravel_index(np.argmin(np.where(u > 0, cd, 9)), u.shape)
    assert u[centre] == 1 and cd[centre] == 0 and bd[centre] == 0

    # connected components are split, objects below min_size vanish
    two = np.zeros((10, 20), np.int64)
    two[1:6, 1:6] = 1
    two[1:6, 10:16] = 1  # same id, second component
    two[8:10, 18:20] = 2  # 4 pixels
    fg, cd, _ = I.distance_targets(two, min_size=25)
    assert fg[8:10, 18:20].sum() == 0 and cd[3, 3] == 0 and cd[3, 12] <= 0.36, "each component has its own centre"
    with pytest.raises(ValueError, match="target must be one of"):
        I.instance_targets(two, "affinities")


def test_instance_targetsd_keeps_meta_and_instances():
    from monai.data import MetaTensor

    lab = MetaTensor(torch.zeros(1, 16, 16), meta={"filename_or_obj": "cells.tif"})
    lab[0, 2:8, 2:8] = 4
    d = I.InstanceTargetsd("label", "boundaries", instance_key="instances")({"label": lab})
    assert d["label"].shape == (2, 16, 16) and d["label"].meta["filename_or_obj"] == "cells.tif"
    assert torch.equal(d["instances"], lab)
    d = I.InstanceTargetsd("label", "distances")({"label": lab})
    assert d["label"].shape == (3, 16, 16) and d["label"].dtype == torch.float32
    with pytest.raises(ValueError, match="cells.tif"):
        I.InstanceTargetsd("label")({"label": MetaTensor(torch.zeros(2, 8, 8), meta={"filename_or_obj": "cells.tif"})})


# ---------------------------------------------------------------------------------------------------------------------
# metric


def _merged_pair():
    gt = np.zeros((10, 20), np.int64)
    gt[1:3, 1:6] = 1  # A, 10 px
    gt[3:5, 1:6] = 2  # B, 10 px, touching A
    gt[6:10, 10:15] = 3  # C, 20 px
    seg = gt.copy()
    seg[seg == 2] = 1  # A and B merged
    seg[seg == 3] = 9  # C found (another id)
    return seg, gt


def test_msa_hand_made_values():
    seg, gt = _merged_pair()
    assert I.mean_segmentation_accuracy(gt, gt) == 1.0
    # merged blob: IoU 0.5 with A and with B. At t = 0.5 it matches one of them (TP 2: C + A|B, FP 0, FN 1) -> 2/3;
    # above 0.5 only C (TP 1, FP 1, FN 2) -> 1/4. mSA = (2/3 + 9 * 1/4) / 10 = 7/24.
    msa, accs = I.mean_segmentation_accuracy(seg, gt, return_accuracies=True)
    assert msa == pytest.approx(7 / 24, abs=1e-12)
    assert accs[0] == pytest.approx(2 / 3) and all(a == pytest.approx(0.25) for a in accs[1:])
    assert I.segmentation_accuracy(seg, gt, 0.5) == pytest.approx(2 / 3)
    assert I.mean_segmentation_accuracy(np.zeros_like(gt), gt) == 0.0  # nothing found
    assert I.matching_scores(seg, gt).shape == (2, 3)
    with pytest.raises(ValueError, match="differs"):
        I.mean_segmentation_accuracy(seg[:5], gt)
    with pytest.raises(ValueError, match="integer"):
        I.mean_segmentation_accuracy(seg + 0.5, gt)


def _brute_force_msa(seg, gt):
    """Independent restatement: IoUs from masks, best one-to-one matching by enumerating every assignment."""
    p_ids, g_ids = [i for i in np.unique(seg) if i], [i for i in np.unique(gt) if i]
    iou = np.array([[((seg == p) & (gt == g)).sum() / ((seg == p) | (gt == g)).sum() for g in g_ids] for p in p_ids])
    accs = []
    for t in np.arange(0.5, 1.0, 0.05):
        best = 0
        small, large = (p_ids, g_ids) if len(p_ids) <= len(g_ids) else (g_ids, p_ids)
        for perm in itertools.permutations(range(len(large)), len(small)):
            pairs = [(i, j) if small is p_ids else (j, i) for i, j in enumerate(perm)]
            best = max(best, sum(iou[a, b] >= t for a, b in pairs))
        accs.append(best / (len(p_ids) + len(g_ids) - best) if best else 0.0)
    return float(np.mean(accs))


def _random_boxes(rng, shape, n, first_id=1):
    lab = np.zeros(shape, np.int64)
    for i in range(n):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        lab[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = first_id + i
    return lab


def test_msa_matches_brute_force_on_random_label_maps():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(40):
        gt = _random_boxes(rng, (12, 14), rng.integers(1, 6))
        seg = gt.copy()
        seg[rng.random(gt.shape) < 0.1] = 0  # holes
        shift = np.roll(gt, rng.integers(-1, 2), axis=int(rng.integers(0, 2)))
        seg = np.where(rng.random(gt.shape) < 0.3, shift, seg)  # shifted borders
        extra = _random_boxes(rng, gt.shape, rng.integers(0, 3), first_id=20)
        seg = np.where(extra > 0, extra, seg)  # false positives / splits
        if len(np.unique(seg)) > 7 or len(np.unique(gt)) > 7:
            continue
        compared += 1
        assert I.mean_segmentation_accuracy(seg, gt) == pytest.approx(_brute_force_msa(seg, gt), abs=1e-12)
    assert compared >= 25
    # ties at IoU exactly 0.5 need the matching (one GT object, two halves predicted)
    gt = np.zeros((2, 4), np.int64)
    gt[0, :2] = 1
    seg = np.zeros_like(gt)
    seg[0, 0], seg[0, 1] = 1, 2
    assert I.mean_segmentation_accuracy(seg, gt) == pytest.approx(_brute_force_msa(seg, gt)) == pytest.approx(0.05)


def test_msa_metric_and_handler():
    from ignite.engine import Engine

    seg, gt = _merged_pair()
    metric = I.SegmentationAccuracyMetric()
    batch_p = torch.from_numpy(np.stack([seg, gt]))[:, None]
    batch_g = torch.from_numpy(np.stack([gt, gt]))[:, None]
    per_image = metric(batch_p, batch_g)
    assert per_image.shape == (2, 1) and per_image[0, 0] == pytest.approx(7 / 24) and per_image[1, 0] == 1
    metric([torch.from_numpy(gt)[None]], [torch.from_numpy(gt)[None]])  # list of channel-first maps
    assert float(metric.aggregate()) == pytest.approx((7 / 24 + 2) / 3)
    with pytest.raises(ValueError, match="one channel"):
        I.SegmentationAccuracyMetric()(batch_p.repeat(1, 2, 1, 1), batch_g.repeat(1, 2, 1, 1))

    # as an ignite metric: mean over all images of the evaluation, SA50 via thresholds
    outputs = [(seg, gt), (gt, gt)]
    engine = Engine(lambda e, b: ([torch.from_numpy(b[0])[None]], [torch.from_numpy(b[1])[None]]))
    I.MeanSegmentationAccuracy().attach(engine, "msa")
    I.MeanSegmentationAccuracy(thresholds=[0.5]).attach(engine, "sa50")
    state = engine.run(outputs)
    assert state.metrics["msa"] == pytest.approx((7 / 24 + 1) / 2)
    assert state.metrics["sa50"] == pytest.approx((2 / 3 + 1) / 2)
    assert state.metric_details["msa"].shape == (2, 1)


def test_channel_dice_loss():
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 8, 8, generator=g)
    t = (torch.rand(2, 3, 8, 8, generator=g) > 0.5).float()
    ours = I.ChannelDiceLoss()(p, t)
    ref = DiceLoss(squared_pred=True, batch=True, smooth_nr=0.0, smooth_dr=1e-7, reduction="sum")(p, t)
    assert ours == pytest.approx(float(ref), rel=1e-5)
    assert float(I.ChannelDiceLoss()(t, t)) == pytest.approx(0.0, abs=1e-6)
    # masked distances (torch-em DiceBasedDistanceLoss): distance channels only count inside the target foreground
    masked = I.ChannelDiceLoss(mask_distances_in_bg=True)(p, t)
    m = t[:, :1]
    manual = sum(
        1 - 2 * (a * b).sum() / ((a * a).sum() + (b * b).sum())
        for a, b in ((p[:, :1], t[:, :1]), (p[:, 1:2] * m, t[:, 1:2] * m), (p[:, 2:3] * m, t[:, 2:3] * m))
    )
    assert masked == pytest.approx(float(manual), rel=1e-5)
    logits = torch.randn(1, 2, 8, 8)
    assert I.ChannelDiceLoss(sigmoid=True)(logits, t[:1, :2]) == pytest.approx(
        float(I.ChannelDiceLoss()(logits.sigmoid(), t[:1, :2])))
    with pytest.raises(ValueError, match="out_channels"):
        I.ChannelDiceLoss()(p[:, :2], t)


@pytest.mark.parametrize("target, bar", [("boundaries", 0.95), ("distances", 0.97)])
def test_watershed_recovers_nuclei_from_ideal_targets(target, bar):
    """Ideal network output (the targets themselves) -> SeededWatershedd -> the nuclei mask, up to the objects under
    the 50-pixel size filter (3 of 125)."""
    from monai.data import MetaTensor

    mask = tifffile.imread(NUCLEI / "mask.tif")
    pred = MetaTensor(torch.from_numpy(I.instance_targets(mask, target)), meta={"filename_or_obj": "n.tif"})
    out = I.SeededWatershedd("pred", target, output_key="inst")({"pred": pred})
    inst = out["inst"]
    assert inst.shape == (1, 512, 512) and inst.dtype == torch.int32 and inst.meta["filename_or_obj"] == "n.tif"
    assert torch.equal(out["pred"], pred), "output_key keeps the probabilities"
    ids = np.unique(inst.numpy())
    assert np.array_equal(ids, np.arange(len(ids))), "consecutive ids"
    msa, accs = I.mean_segmentation_accuracy(inst[0].numpy(), mask, return_accuracies=True)
    assert msa > bar and accs[0] >= 122 / 125, (msa, accs)
    with pytest.raises(ValueError, match="max_instances"):
        I.SeededWatershedd("pred", target, max_instances=10)({"pred": pred})
    with pytest.raises(ValueError, match="channels"):
        I.SeededWatershedd("pred", target)({"pred": pred[:1]})


def test_coco_masks_and_livecell_preparation(tmp_path):
    lc = tmp_path / "LIVECell_dataset_2021"
    ann_dir = lc / "annotations" / "LIVECell"
    ann_dir.mkdir(parents=True)
    for split, folder in (("train", "livecell_train_val_images"), ("val", "livecell_train_val_images"),
                          ("test", "livecell_test_images")):
        (lc / "images" / folder / "A172").mkdir(parents=True, exist_ok=True)  # one sub-folder per cell line
        name = f"A172_{split}_img.tif"
        tifffile.imwrite(lc / "images" / folder / "A172" / name, np.full((40, 48), 7, np.uint8))
        coco = {
            "images": [{"id": 1, "file_name": name, "width": 48, "height": 40}],
            # LIVECell stores annotations as a dict keyed by id; polygons are x, y pairs
            "annotations": {
                "5": {"id": 5, "image_id": 1, "area": 144, "segmentation": [[10, 8, 22, 8, 22, 20, 10, 20]]},
                "6": {"id": 6, "image_id": 1, "area": 120, "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]]},
                "7": {"id": 7, "image_id": 1, "area": 20, "segmentation": [[30, 30, 35, 30, 35, 34, 30, 34]]},
            },
        }
        (ann_dir / f"livecell_coco_{split}.json").write_text(json.dumps(coco))
    masks = dict(I.coco_instance_masks(str(ann_dir / "livecell_coco_train.json"), use_pycocotools=False))
    m = masks["A172_train_img.tif"]
    assert m.dtype == np.uint16 and m.shape == (40, 48)
    # pixel centres inside the outlines; painted small to large (the larger object wins the overlap); the 20-pixel
    # object falls under the 50-pixel fragment filter; ids consecutive
    expect = np.zeros((40, 48), np.uint16)
    expect[2:12, 2:14] = 1
    expect[8:20, 10:22] = 2
    assert np.array_equal(m, expect)
    assert (dict(I.coco_instance_masks(str(ann_dir / "livecell_coco_train.json"), min_size=0,
                                       use_pycocotools=False))["A172_train_img.tif"] == 1).sum() == 20

    spec = importlib.util.spec_from_file_location("prepare_livecell", BUNDLE / "scripts" / "prepare_livecell.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = tree_hashes(lc)
    out = tmp_path / "livecell"
    assert mod.main(["--livecell_dir", str(lc), "--out", str(out)]) == 0
    ds = json.loads((out / "dataset.json").read_text())
    assert len(ds["training"]) == len(ds["validation"]) == len(ds["test"]) == 1
    assert np.array_equal(tifffile.imread(out / ds["training"][0]["label"]), expect)
    assert json.loads((out / "dataset_test.json").read_text())["training"][0]["label"] == "labelsTs/A172_test_img.tif"
    from shared_networks.bundle import load_datalist

    assert len(load_datalist(str(out), "all")) == 2
    assert tree_hashes(lc) == before
    with pytest.raises(FileExistsError, match="overwrite"):
        mod.main(["--livecell_dir", str(lc), "--out", str(out)])


# ---------------------------------------------------------------------------------------------------------------------
# the bundle


def test_metadata_is_2d_and_names_the_output_channels():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert len(fmt["inputs"]["image"]["spatial_shape"]) == 2, "MONAI Label takes the dimension from this length"
    pred = fmt["outputs"]["pred"]
    assert tuple(pred["channel_def"][str(i)] for i in range(pred["num_channels"])) == I.TARGETS["boundaries"]
    assert meta["required_packages_version"]["scikit-image"]
    from shared_networks.bundle.export import build_network

    net = build_network(str(BUNDLE))
    assert net.out_channels == pred["num_channels"] and isinstance(net.final_activation, torch.nn.Sigmoid)
    assert net.encoder.flatten_axes == (1, 0) and net.pad_mode == "divisible"
    assert sum(p.numel() for p in net.parameters()) == 17_716_866  # paper Tiny without head, 32x32 position grid
    paper = build_network(str(BUNDLE), _cfg("inference.json", "paper_time.json"))
    assert sum(p.numel() for p in paper.parameters()) == 18_499_690  # the official count (spec table)
    assert paper.pad_mode == "canvas"
    dist = build_network(str(BUNDLE), target="distances")
    assert dist.out_channels == 3


def _nuclei_dataset(root: Path, repeats: int = 8) -> tuple[Path, Path]:
    """Left three quarters of the nuclei image for training, the right quarter held out (validation + inference)."""
    img, msk = tifffile.imread(NUCLEI / "image.tif"), tifffile.imread(NUCLEI / "mask.tif")
    ds = root / "nuclei_ds"
    for sub in ("imagesTr", "labelsTr", "imagesVal", "labelsVal"):
        (ds / sub).mkdir(parents=True)
    tifffile.imwrite(ds / "imagesTr" / "left.tif", img[:, :SPLIT])
    tifffile.imwrite(ds / "labelsTr" / "left.tif", msk[:, :SPLIT])
    tifffile.imwrite(ds / "imagesVal" / "right.tif", img[:, SPLIT:])
    tifffile.imwrite(ds / "labelsVal" / "right.tif", msk[:, SPLIT:])
    pair = {"image": "imagesTr/left.tif", "label": "labelsTr/left.tif"}
    (ds / "dataset.json").write_text(json.dumps({
        "training": [pair] * repeats,  # one epoch = `repeats` steps of num_samples random crops
        "validation": [{"image": "imagesVal/right.tif", "label": "labelsVal/right.tif"}],
        "test": ["imagesVal/right.tif"],
    }))
    return ds, ds / "labelsVal" / "right.tif"


FAST = {"num_workers": 0, "progress_bar": False, "device": "cpu", "batch_size": 1, "num_samples": 4,
        "learning_rate": 0.002, "cache_rate": 1.0}


def test_reduced_bundle_learns_nuclei_instances(tmp_path):
    from ignite.engine import Events

    ds, held_out_mask = _nuclei_dataset(tmp_path)
    before = tree_hashes(ds)
    root = tmp_path / "root"
    epochs = 15  # 15 epochs x 8 steps x 4 crops of 128^2
    start = time.time()
    wf = _workflow(_cfg("train.json", "reduced.json"), bundle_root=str(root), dataset_dir=str(ds),
                   val_interval=epochs, **{"train#trainer#max_epochs": epochs}, **FAST)
    wf.initialize()
    assert wf.check_properties() == []
    losses = []
    wf.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    wf.run()
    wf.finalize()
    t_train = time.time() - start
    assert len(losses) == epochs * 8
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.25, "training loss did not fall"
    assert (root / "models" / "model.pt").is_file()

    # evaluate.json on the held-out quarter: mSA, SA50/75, per-channel Dice with the channel names
    run_workflow(_workflow(_cfg("train.json", "evaluate.json", "reduced.json"), bundle_root=str(root),
                           dataset_dir=str(ds), **FAST))
    report = json.loads((root / "eval" / "metrics.json").read_text())
    metrics, dice = report["metrics"], report["per_class"]["val_dice"]
    assert set(dice) >= {"foreground", "boundaries"}

    # inference.json: sliding window (128^2 windows) over the 128 x 512 held-out image, watershed, uint16 TIFF
    out = tmp_path / "out"
    run_workflow(_workflow(_cfg("inference.json", "reduced.json"), "infer", bundle_root=str(root), dataset_dir=str(ds),
                           output_dir=str(out), device="cpu", num_workers=0))
    inst = tifffile.imread(out / "right_instances.tif")
    ref = tifffile.imread(held_out_mask)
    assert inst.dtype == np.uint16 and inst.shape == ref.shape == (512, 512 - SPLIT)
    fg_dice = 2 * ((inst > 0) & (ref > 0)).sum() / ((inst > 0).sum() + (ref > 0).sum())
    msa, accs = I.mean_segmentation_accuracy(inst, ref, return_accuracies=True)
    t_all = time.time() - start
    print(f"\nViM-UNet reduced on nuclei: train {t_train:.0f} s, total {t_all:.0f} s; held-out foreground Dice "
          f"{fg_dice:.3f}, mSA {msa:.3f}, SA50 {accs[0]:.3f}, SA75 {accs[5]:.3f}, {inst.max()} objects "
          f"(reference {len(np.unique(ref)) - 1}); evaluate.json: {metrics}, Dice per channel {dice}")
    # measured (seed 0): Dice ~0.90, mSA ~0.45, SA50 ~0.75; bars leave room for platform differences
    assert fg_dice > 0.85 and dice["foreground"] > 0.85
    assert msa > 0.3 and accs[0] > 0.55
    assert metrics["val_msa"] == pytest.approx(msa, abs=1e-6), "evaluate.json and inference.json agree"
    assert tree_hashes(ds) == before, "the dataset was modified"


@pytest.fixture
def infer_setup(tmp_path):
    """A bundle_root holding a random reduced model.pt, and a runner for inference.json + reduced.json."""
    from shared_networks.bundle.export import build_network

    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    torch.manual_seed(0)
    net = build_network(str(BUNDLE), _cfg("inference.json", "reduced.json"))
    torch.save(net.state_dict(), root / "models" / "model.pt")

    def run(dataset_dir, output_dir=None, extra=(), **override):
        return run_workflow(_workflow(_cfg("inference.json", "reduced.json", *extra), "infer", bundle_root=str(root),
                                      dataset_dir=str(dataset_dir), output_dir=str(output_dir or tmp_path / "out"),
                                      device="cpu", num_workers=0, **override))

    return root, run


def test_inference_sizes_outputs_and_no_overwrite(infer_setup, tmp_path):
    _, run = infer_setup
    img = tifffile.imread(NUCLEI / "image.tif")
    scans = tmp_path / "scans"
    scans.mkdir()
    tifffile.imwrite(scans / "wide.tif", img[:200, :300])  # larger than the 128^2 window, not a multiple of it
    tifffile.imwrite(scans / "small.tif", img[:90, :70])  # smaller than the window: padded
    from PIL import Image

    Image.fromarray((img[:64, :80] // 2).astype(np.uint8)).save(scans / "png.png")
    before = tree_hashes(scans)
    out = tmp_path / "out"
    run(scans, out, save_probabilities=True)
    for name, shape in (("wide", (200, 300)), ("small", (90, 70)), ("png", (64, 80))):
        inst = tifffile.imread(out / f"{name}_instances.tif")
        prob = tifffile.imread(out / f"{name}_probabilities.tif")
        assert inst.shape == shape and inst.dtype == np.uint16
        assert prob.shape == (*shape, 2) and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    assert tree_hashes(scans) == before

    # never overwrites a result, never writes into the input folder
    with pytest.raises(Exception) as e:
        run(scans, out)
    assert "already exists" in exception_chain(e.value)
    with pytest.raises(Exception) as e:
        run(scans, scans)
    assert "folder of the input" in exception_chain(e.value)
    assert tree_hashes(scans) == before


def test_distance_variant_and_paper_time_import(tmp_path):
    """--target distances: 3 output channels, masked Dice loss, distance watershed; and the documented torch-em
    import (convert CLI, --layout monai) loads strictly into the paper-time configuration."""
    from shared_networks.bundle.export import build_network
    from shared_networks.bundle.handlers import load_checkpoint
    from shared_networks.convert.__main__ import main as convert_main
    from shared_networks.convert.vim_unet import to_official

    ds, _ = _nuclei_dataset(tmp_path, repeats=1)
    root = tmp_path / "root"
    ov = {**FAST, "num_samples": 2, "target": "distances"}
    run_workflow(_workflow(_cfg("train.json", "reduced.json"), bundle_root=str(root), dataset_dir=str(ds),
                           val_interval=1, **{"train#trainer#max_epochs": 1}, **ov))
    out = tmp_path / "out"
    run_workflow(_workflow(_cfg("inference.json", "reduced.json"), "infer", bundle_root=str(root), dataset_dir=str(ds),
                           output_dir=str(out), device="cpu", num_workers=0, target="distances",
                           save_probabilities=True))
    assert tifffile.imread(out / "right_probabilities.tif").shape == (512, 512 - SPLIT, 3)
    assert tifffile.imread(out / "right_instances.tif").shape == (512, 512 - SPLIT)

    # a torch-em checkpoint ("model_state" of the paper-time model), converted as docs/README.md says
    torch.manual_seed(0)
    official_net = build_network(str(BUNDLE), _cfg("inference.json", "paper_time.json"))
    (tmp_path / "tem").mkdir()
    torch.save({"model_state": to_official(official_net), "iteration": 100}, tmp_path / "tem" / "best.pt")
    model = tmp_path / "import" / "models" / "model.pt"
    assert convert_main(["vim_unet", str(tmp_path / "tem" / "best.pt"), str(model), "--layout", "monai"]) == 0
    net = build_network(str(BUNDLE), _cfg("inference.json", "paper_time.json"))
    load_checkpoint(str(model), {"model": net})  # strict: every key and shape matches
    for k, v in official_net.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    with pytest.raises(ValueError, match="another network"):
        load_checkpoint(str(model), {"model": build_network(str(BUNDLE))})  # default config: 32x32 position grid


def test_traced_export_with_the_torch_scan(tmp_path, monkeypatch):
    """The numba / CUDA scans are custom autograd functions that TorchScript cannot save; with the pure-PyTorch scan
    (SHARED_NETWORKS_SCAN_BACKEND=torch, as docs/README.md says) the traced model saves, reloads and reproduces the
    eager network."""
    from shared_networks.bundle.export import build_network, export_network

    cfg = _cfg("inference.json", "reduced.json")
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(build_network(str(BUNDLE), cfg).state_dict(), tmp_path / "models" / "model.pt")
    monkeypatch.setenv("SHARED_NETWORKS_SCAN_BACKEND", "torch")
    path = export_network(str(BUNDLE), "torchscript_trace", filepath=str(tmp_path / "model.ts"),
                          ckpt_file=str(tmp_path / "models" / "model.pt"), config_file=cfg, spatial_shape=[128, 128])
    monkeypatch.delenv("SHARED_NETWORKS_SCAN_BACKEND")
    ts = torch.jit.load(path)
    net = build_network(str(BUNDLE), cfg)
    net.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(ts(x), net.eval()(x), atol=1e-4)


@pytest.mark.parametrize("case, expected", [
    ("rgb", "expected 1 channel"),
    ("nan", "NaN"),
    ("corrupt", "could not read"),
    ("missing", "not found"),
])
def test_bad_images_get_clear_errors(infer_setup, tmp_path, case, expected):
    _, run = infer_setup
    scans = tmp_path / "scans"
    scans.mkdir()
    path = scans / "cells.tif"
    override = {}
    if case == "rgb":
        from PIL import Image

        path = scans / "cells.png"
        Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(path)
    elif case == "nan":
        arr = np.zeros((32, 40), np.float32)
        arr[3, 4] = np.nan
        tifffile.imwrite(path, arr)
    elif case == "corrupt":
        path.write_bytes(b"II*\x00 this is not a TIFF file")
    else:
        override = {"datalist": [str(scans / "gone.tif")]}
        path = scans / "gone.tif"
    before = tree_hashes(scans)
    with pytest.raises(Exception) as e:
        run(scans, tmp_path / "out", **override)
    text = exception_chain(e.value)
    assert expected in text and path.name in text, text
    assert tree_hashes(scans) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case, expected", [
    ("float_ids", "integer object ids"),
    ("negative", "object ids must be in 0.."),
    ("shape", "differs from its image"),
    ("rgb", "one channel of object ids"),
])
def test_bad_instance_masks_get_clear_errors(tmp_path, case, expected):
    img = np.random.default_rng(0).integers(0, 255, (40, 48)).astype(np.uint8)
    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    tifffile.imwrite(ds / "imagesTr" / "a.tif", img)
    lbl = ds / "labelsTr" / "a.tif"
    if case == "float_ids":
        tifffile.imwrite(lbl, np.full((40, 48), 1.5, np.float32))
    elif case == "negative":
        tifffile.imwrite(lbl, np.full((40, 48), -3, np.int16))
    elif case == "shape":
        tifffile.imwrite(lbl, np.zeros((40, 40), np.uint16))
    else:
        from PIL import Image

        lbl = ds / "labelsTr" / "a.png"
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(lbl)
    wf = _workflow(_cfg("train.json", "reduced.json"), bundle_root=str(tmp_path / "root"), dataset_dir=str(ds),
                   **{**FAST, "cache_rate": 0.0, "train#trainer#max_epochs": 1})
    wf.initialize()
    with pytest.raises(Exception) as e:
        wf.run()
    text = exception_chain(e.value)
    assert expected in text and lbl.name in text, text


def test_monai_label_style_pre_and_post_processing(infer_setup, tmp_path):
    """MONAI Label runs `preprocessing`, the inferer and `postprocessing` (without writers) on a dict that also
    holds `image_path`; the result under `pred` must be one channel of instance ids at the input's size."""
    from monai.bundle import ConfigParser

    root, _ = infer_setup
    img = tmp_path / "scans" / "cells.tif"
    img.parent.mkdir()
    tifffile.imwrite(img, tifffile.imread(NUCLEI / "image.tif")[:150, :170])
    parser = ConfigParser()
    parser.read_config(_cfg("inference.json", "reduced.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"bundle_root": str(root), "output_dir": str(tmp_path / "out"), "device": "cpu",
                   "dataset_dir": str(img.parent)})
    pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    net = parser.get_parsed_content("network").eval()
    d = pre({"image": str(img), "image_path": str(img)})
    with torch.no_grad():
        d["pred"] = parser.get_parsed_content("inferer")(d["image"][None], net)[0]
    d = post(d)
    assert tuple(d["pred"].shape) == (1, 170, 150)  # MONAI (x, y) order, as the loaded image
    assert d["image_path"] == str(img)
