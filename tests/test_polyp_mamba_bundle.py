"""Polyp-Mamba polyp bundle (bundles/polyp_mamba_kvasir_polyp_segmentation) and shared_networks.bundle.polyp_metrics.

- metrics on hand-made examples worked out from the published definitions (S-measure, Fan et al. ICCV 2017;
  E-measure, Fan et al. IJCAI 2018; weighted F-measure, Margolin et al. CVPR 2014; Dice / IoU / MAE and the PraNet
  toolbox's threshold sweep), an independent per-pixel restatement of the E-measure curve, mask reading, the
  MONAI / ignite metric (dataset-level max E-measure = maximum of the mean curve);
- no polyp data exist here, so the code path runs on the demo nuclei image made RGB (nuclei = "polyp"): the reduced
  configuration trains through ConfigWorkflow on the left half and must raise the held-out Dice clearly (sliding
  window over the right half, a frame larger than the window); evaluate.json writes all the paper's metrics;
  inference writes 0/255 PNG masks of the input's size and leaves the input untouched; the default resize mode
  restores odd frame sizes;
- bad input (grey / RGBA image for the RGB network, NaN, missing / corrupt file, bad masks) fails with a message
  naming the file; the pretrained-encoder option and the PraNet split script.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, REPO, bundle_configs, bundle_workflow, exception_chain, run_workflow, tree_hashes
from PIL import Image

from shared_networks.bundle import polyp_metrics as PM

BUNDLE = BUNDLES_DIR / "polyp_mamba_kvasir_polyp_segmentation"
CONFIGS = BUNDLE / "configs"
NUCLEI = REPO / "data" / "demo" / "nuclei"
EPS = float(np.finfo(np.float64).eps)


# conftest helpers bound to this bundle; every test runs with one torch / numba thread (see one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
_cfg = functools.partial(bundle_configs, BUNDLE)
_workflow = functools.partial(bundle_workflow, BUNDLE)


# ---------------------------------------------------------------------------------------------------------------------
# metrics on hand-made examples


def test_s_measure_by_hand():
    # 4x4, object = top-left 2x2 block, prediction misses its top-left pixel
    g = np.zeros((4, 4), bool)
    g[:2, :2] = True
    p = g.astype(float)
    p[0, 0] = 0.0
    # S_object: mu = 1/4; O_FG over [0, 1, 1, 1]: mean 3/4, std (N-1) 1/2 -> 2(3/4) / (9/16 + 1 + 1/2) = 8/11;
    # O_BG over 1 - P outside G = all ones -> 2 / (1 + 1 + 0) = 1.  S_o = 1/4 * 8/11 + 3/4 = 2/11 + 3/4.
    # S_region: centroid (1.5, 1.5) 1-based -> X = Y = round(1.5) = 2: the 2x2 object block (P varies, G constant:
    # alpha = 0, beta > 0 -> 0) and three all-zero blocks (alpha = beta = 0 -> 1), each weight 1/4 -> 3/4.
    assert PM.s_measure(p, g) == pytest.approx(0.5 * (2 / 11 + 3 / 4) + 0.5 * 3 / 4, abs=1e-12)

    # constant 0.5 on the left half: O_FG = O_BG = 1 / (1/4 + 1) = 0.8; every block has constant P and G -> 1
    g = np.zeros((4, 4), bool)
    g[:, :2] = True
    assert PM.s_measure(np.full((4, 4), 0.5), g) == pytest.approx(0.5 * 0.8 + 0.5 * 1.0, abs=1e-12)
    assert PM.s_measure(g.astype(float), g) == pytest.approx(1.0)

    # centroid rounding is MATLAB's (half away from zero): the object fills columns 2-3 and rows 1-4 (1-based mean
    # 2.5 both ways -> X = Y = 3; Python's round would give 2). P = G except pixel (1, 3) (1-based) missed. Blocks:
    # rows 1-3 x cols 1-3 (weight 9/16, G varies: the SSIM-like term), rows 1-3 x col 4 (3/16, P = G = 0 -> 1),
    # row 4 x cols 1-3 (3/16, P = G -> SSIM term), row 4 x col 4 (1/16, -> 1)
    g = np.zeros((4, 4), bool)
    g[:, 1:3] = True
    p = g.astype(float)
    p[0, 2] = 0.0

    def ssim(a, b):  # 4 m_x m_y s_xy / ((m_x^2 + m_y^2)(s_x^2 + s_y^2)), variances over N - 1
        c = np.cov(a.ravel(), b.ravel().astype(float))
        return 4 * a.mean() * b.mean() * c[0, 1] / ((a.mean() ** 2 + b.mean() ** 2) * (c[0, 0] + c[1, 1]))

    s_region = 9 / 16 * ssim(p[:3, :3], g[:3, :3]) + 3 / 16 + 3 / 16 * ssim(p[3:, :3], g[3:, :3]) + 1 / 16
    fg = np.array([1, 0, 1, 1, 1, 1, 1, 1.0])  # P inside G, row by row: one miss
    s_object = 0.5 * 2 * fg.mean() / (fg.mean() ** 2 + 1 + fg.std(ddof=1)) + 0.5 * 1.0  # background all correct
    assert PM.s_measure(p, g) == pytest.approx(0.5 * s_object + 0.5 * s_region, abs=1e-12)

    # special cases: empty ground truth -> 1 - mean(P); full -> mean(P)
    p = np.full((3, 5), 0.2)
    assert PM.s_measure(p, np.zeros((3, 5), bool)) == pytest.approx(0.8)
    assert PM.s_measure(p, np.ones((3, 5), bool)) == pytest.approx(0.2)


def test_e_measure_by_hand_and_against_a_per_pixel_restatement():
    g = np.array([[1, 0], [0, 0]], bool)
    f = np.array([[1, 1], [0, 0]], float)
    # mu_G = 1/4, mu_F = 1/2. Pixel (F, G) = (1, 1): a_F = 1/2, a_G = 3/4 -> xi = 12/13 -> phi = (25/13)^2 / 4;
    # (1, 0): xi = -4/5 -> phi = 1/100; twice (0, 0): xi = 4/5 -> phi = 81/100. Sum over N - 1 = 3 (the MATLAB code).
    assert PM.e_measure(f, g) == pytest.approx((625 / 676 + 1 / 100 + 162 / 100) / 3, abs=1e-12)
    assert PM.e_measure(g.astype(float), g) == pytest.approx(4 / 3, abs=1e-12), "perfect map: N / (N - 1)"
    assert PM.e_measure(f, np.zeros((2, 2), bool)) == pytest.approx(2 / 3), "empty GT: sum(1 - F) / (N - 1)"
    assert PM.e_measure(f, np.ones((2, 2), bool)) == pytest.approx(2 / 3), "full GT: sum(F) / (N - 1)"

    def e_direct(fm, gt):  # the definition pixel by pixel
        fm, gd = fm.astype(float), gt.astype(float)
        if gd.sum() == 0:
            phi = 1 - fm
        elif gd.sum() == gd.size:
            phi = fm
        else:
            a, b = fm - fm.mean(), gd - gd.mean()
            phi = ((2 * a * b / (a * a + b * b + EPS)) + 1) ** 2 / 4
        return phi.sum() / (fm.size - 1 + EPS)

    rng = np.random.default_rng(0)
    for _ in range(4):
        p = rng.random((17, 23)) ** 2
        gt = rng.random((17, 23)) > 0.7
        curve = PM.e_measure_curve(p, gt)
        ref = np.array([e_direct(p > t, gt) for t in PM.TOOLBOX_THRESHOLDS])  # strict '>' as the toolbox
        assert np.allclose(curve, ref, atol=1e-12)
    # at t = 1 nothing is foreground (strict), at t = 0 every non-zero pixel is
    assert PM.e_measure_curve(f, g, [1.0])[0] == pytest.approx(e_direct(np.zeros((2, 2)), g))


def test_weighted_f_measure_by_hand():
    g = np.zeros((9, 9), bool)
    g[3:6, 3:6] = True  # 3x3 object, its 7x7 neighbourhoods stay inside the image
    fg = np.argwhere(g)
    # importance of a background pixel at Euclidean distance d from the object: 2 - 0.5 ** (d / 5)
    b_sum = sum(2 - 0.5 ** (np.sqrt(((fg - q) ** 2).sum(1)).min() / 5) for q in np.argwhere(~g))
    # constant map c: every error seen by the blur is 1 - c, so E^w = 1 - c inside, c * B outside:
    # R = c, P = 9c / (9c + c * sum B) = 9 / (9 + sum B)
    c = 0.3
    r, p = c, 9 / (9 + b_sum)
    assert PM.weighted_f_measure(np.full((9, 9), c), g) == pytest.approx(2 * r * p / (r + p), abs=1e-12)
    # one missed pixel inside the object: its error 1 is replaced by the blur of the error map, i.e. only the
    # Gaussian's centre weight K0 (every neighbour, and every background pixel's nearest object pixel, has error 0)
    big = np.zeros((15, 15), bool)
    big[3:12, 3:12] = True
    pred = big.astype(float)
    pred[7, 7] = 0.0
    k = np.exp(-np.add.outer(np.arange(-3, 4) ** 2, np.arange(-3, 4) ** 2) / 50.0)
    k0 = 1.0 / k.sum()
    r = 1 - k0 / 81
    assert PM.weighted_f_measure(pred, big) == pytest.approx(2 * r / (r + 1), abs=1e-12)
    assert PM.weighted_f_measure(g.astype(float), g) == pytest.approx(1.0)
    assert PM.weighted_f_measure(np.zeros((9, 9)), g) == pytest.approx(0.0, abs=1e-12)
    assert PM.weighted_f_measure(np.full((9, 9), 0.5), np.zeros((9, 9), bool)) == 0.0


def test_dice_iou_mae_and_the_toolbox_sweep():
    g = np.zeros((4, 5), bool)
    g[1:3, 1:4] = True  # 6 pixels
    p = np.zeros((4, 5))
    p[1:3, 2:5] = 0.8  # 6 predicted, 4 overlap
    assert PM.dice(p, g) == pytest.approx(2 * 4 / 12) and PM.iou(p, g) == pytest.approx(4 / 8)
    assert PM.dice(p, g, threshold=0.9) == 0.0, "no foreground found -> 0 (toolbox)"
    assert PM.dice(np.zeros((3, 3)), np.zeros((3, 3), bool)) == 0.0, "TP = 0 -> 0, also for empty/empty (toolbox)"
    assert PM.mae(p, g) == pytest.approx((4 * 0.2 + 2 * 0.8 + 2 * 1.0) / 20)
    # 0/0.8 map over the toolbox's thresholds 1, 254/255, ..., 0 ('>='): thresholds <= 0.8 keep the 6 pixels
    # (205 of them: k/255 <= 0.8 for k = 0..204), except t = 0 where all 20 pixels count: Dice 2*6/26
    curve = PM.dice_curve(p, g)
    n_le = int(np.sum(PM.TOOLBOX_THRESHOLDS <= 0.8))
    assert n_le == 205
    assert curve.mean() == pytest.approx(((n_le - 1) * 8 / 12 + 2 * 6 / 26) / 256)
    assert PM.iou_curve(p, g)[-1] == pytest.approx(6 / 20)
    with pytest.raises(ValueError, match="sigmoid"):
        PM.dice(p * 3 - 1, g)
    with pytest.raises(ValueError, match="differ in size"):
        PM.s_measure(p[:3], g)
    m = PM.polyp_metrics(p, g)
    assert set(m) == set(PM.METRICS)
    # min-max normalisation (toolbox) stretches 0/0.8 to 0/1: MAE changes, Dice at 0.5 does not
    assert m["mae"] == pytest.approx((4 * 0.0 + 2 * 1.0 + 2 * 1.0) / 20)
    assert m["dice"] == pytest.approx(8 / 12)


def test_masks_are_read_like_the_toolbox():
    from monai.data import MetaTensor

    assert PM.binarize_mask(np.array([[0, 255], [128, 129]], np.uint8)).tolist() == [[False, True], [False, True]]
    assert PM.binarize_mask(np.array([[0, 1], [0.4, 0.6]])).tolist() == [[False, True], [False, True]]
    jpeg_like = np.stack([np.array([[3, 250], [127, 200]])] * 3, -1)  # RGB mask with compression noise
    assert PM.binarize_mask(jpeg_like).tolist() == [[False, True], [False, True]]
    assert PM.normalize_map(np.full((2, 2), 0.3)).tolist() == [[0, 0], [0, 0]]

    img = MetaTensor(torch.zeros(3, 6, 5), meta={"filename_or_obj": "frame.png"})
    lbl = MetaTensor(torch.zeros(3, 6, 5), meta={"filename_or_obj": "frame_mask.png"})
    lbl[:, 2:4, 1:3] = 255
    out = PM.BinaryMaskd("label")({"image": img, "label": lbl})["label"]
    assert out.shape == (1, 6, 5) and out.dtype == torch.float32 and out.sum() == 4
    assert out.meta["filename_or_obj"] == "frame_mask.png"
    with pytest.raises(ValueError, match="frame_mask.png.*differs from its image"):
        PM.BinaryMaskd("label")({"image": img[:, :4], "label": lbl})
    with pytest.raises(ValueError, match="frame_mask.png.*channels"):
        PM.BinaryMaskd("label")({"image": img, "label": lbl[:2]})
    bad = lbl.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="frame_mask.png.*NaN"):
        PM.BinaryMaskd("label")({"image": img, "label": bad})


def test_metric_class_and_ignite_handler():
    from ignite.engine import Engine

    g1 = np.zeros((6, 6), bool)
    g1[1:4, 1:4] = True
    g2 = np.zeros((8, 5), bool)  # another size: the evaluation batches are lists
    g2[4:8, 0:3] = True
    # maps whose best E-measure thresholds differ: object 0.8 / distractors 0.6 vs object 0.4 / distractors 0.2
    # (one background pixel at 1 in each, so the min-max stretch leaves them unchanged)
    p1 = np.where(g1, 0.81, 0.0)  # values off the k/255 grid: float32 rounding cannot cross a threshold
    p1[5, :3], p1[0, 5] = 0.61, 1.0
    p2 = np.where(g2, 0.41, 0.0)
    p2[0, :3], p2[0, 4] = 0.21, 1.0
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[None]  # noqa: E731
    preds, gts = [t(p1), t(p2)], [t(g1), t(g2)]

    for name in PM.METRICS:
        metric = PM.PolypMetric(name)
        metric(preds, gts)
        per_image = [PM.polyp_metrics(p, g)[name] for p, g in ((p1, g1), (p2, g2))]
        if name == "max_e_measure":  # the dataset value is the max of the image-averaged curve ...
            curve = (PM.e_measure_curve(PM.normalize_map(p1), g1) + PM.e_measure_curve(PM.normalize_map(p2), g2)) / 2
            assert float(metric.aggregate()) == pytest.approx(curve.max(), abs=1e-12)
            assert curve.max() < np.mean(per_image) - 1e-3, "... not the mean of per-image maxima"
        else:
            assert float(metric.aggregate()) == pytest.approx(np.mean(per_image), abs=1e-6), name
    # batch-first tensors work as well; dice / iou score the map as given, the toolbox metrics the stretched map
    m = PM.PolypMetric("dice")
    m(torch.stack([t(p1)]), torch.stack([t(g1)]))
    assert float(m.aggregate()) == pytest.approx(PM.dice(p1, g1))
    assert PM.PolypMetric("dice").normalize is False and PM.PolypMetric("s_measure").normalize is True
    with pytest.raises(ValueError, match="sigmoid"):
        PM.PolypMetric("mae")([t(p1) * 4 - 2], [t(g1)])
    with pytest.raises(ValueError, match="Invertd"):
        PM.PolypMetric("mae")([t(p1)], [t(g2)])
    with pytest.raises(ValueError, match="one of"):
        PM.PolypMetric("f1")

    engine = Engine(lambda e, b: ([t(b[0])], [t(b[1])]))
    PM.PolypMetricHandler("s_measure").attach(engine, "sm")
    PM.PolypMetricHandler("max_e_measure").attach(engine, "em")
    state = engine.run([(p1, g1), (p2, g2)])
    assert state.metrics["sm"] == pytest.approx(np.mean([PM.polyp_metrics(p, g)["s_measure"]
                                                         for p, g in ((p1, g1), (p2, g2))]), abs=1e-6)
    assert state.metric_details["sm"].shape == (2, 1) and "em" not in state.metric_details


# ---------------------------------------------------------------------------------------------------------------------
# the bundle


def test_metadata_configs_and_full_network():
    from shared_networks.bundle.export import build_network

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [352, 352], "2D: MONAI Label reads the dimension from this"
    assert fmt["inputs"]["image"]["num_channels"] == 3
    pred = fmt["outputs"]["pred"]
    assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": "background", "1": "polyp"}
    # MONAI Label's label map: channel_def names without background, ids from the keys -> {"polyp": 1}, the value
    # the thresholded mask holds
    labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v != "background"}
    assert labels == {"polyp": 1}
    net = build_network(str(BUNDLE))
    assert sum(p.numel() for p in net.parameters()) == 32_270_761  # spec variant B (the default)
    assert (net.in_channels, net.out_channels, net.spatial_dims) == (3, 1, 2)
    reduced = build_network(str(BUNDLE), _cfg("inference.json", "reduced.json"))
    assert sum(p.numel() for p in reduced.parameters()) == 566_909
    for name in ("train.json", "inference.json"):
        cfg = json.loads((CONFIGS / name).read_text())
        assert cfg["pretrained_encoder"] is None and cfg["network_def"]["pretrained_encoder"] == "@pretrained_encoder"


def test_pretrained_encoder_option(tmp_path):
    """--pretrained_encoder loads a local VMamba / VM-UNet checkpoint when network_def is built."""
    from shared_networks.bundle.export import build_network

    torch.manual_seed(1)
    donor = build_network(str(BUNDLE), _cfg("inference.json", "reduced.json"))
    enc = {k: v for k, v in donor.state_dict().items() if k.startswith(("patch_embed.", "layers."))}
    torch.save({"model": enc}, tmp_path / "vmamba.pth")
    torch.manual_seed(2)
    cfg = _cfg("inference.json", "reduced.json")
    net = build_network(str(BUNDLE), cfg, pretrained_encoder=str(tmp_path / "vmamba.pth"))
    for k, v in enc.items():
        assert torch.equal(net.state_dict()[k], v), k
    with pytest.raises(Exception) as e:
        build_network(str(BUNDLE), _cfg("inference.json", "reduced.json"), pretrained_encoder=str(tmp_path / "x.pth"))
    assert "x.pth" in exception_chain(e.value) and "not found" in exception_chain(e.value)


def _rgb(gray: np.ndarray) -> np.ndarray:
    """uint16 fluorescence -> 8-bit RGB frame with a colour tint (every channel carries the structure)."""
    lo, hi = np.percentile(gray, [1, 99.8])
    v = np.clip((gray.astype(np.float64) - lo) / (hi - lo), 0, 1)
    return (np.stack([v, 0.7 * v + 0.1, 0.35 + 0.4 * v], -1) * 255).round().astype(np.uint8)


def _nuclei_dataset(root: Path, repeats: int = 8) -> tuple[Path, np.ndarray]:
    """Left half of the nuclei image made RGB for training, the right half (512 x 256, larger than the 128^2 window)
    held out for validation, evaluation and inference; masks 0/255 PNG (mask.tif > 0)."""
    import tifffile

    img = _rgb(tifffile.imread(NUCLEI / "image.tif"))
    msk = ((tifffile.imread(NUCLEI / "mask.tif") > 0) * 255).astype(np.uint8)
    ds = root / "nuclei_rgb"
    for sub in ("imagesTr", "labelsTr", "imagesVal", "labelsVal"):
        (ds / sub).mkdir(parents=True)
    Image.fromarray(img[:, :256]).save(ds / "imagesTr" / "left.png")
    Image.fromarray(msk[:, :256]).save(ds / "labelsTr" / "left.png")
    Image.fromarray(img[:, 256:]).save(ds / "imagesVal" / "right.png")
    Image.fromarray(msk[:, 256:]).save(ds / "labelsVal" / "right.png")
    (ds / "dataset.json").write_text(json.dumps({
        "training": [{"image": "imagesTr/left.png", "label": "labelsTr/left.png"}] * repeats,
        "validation": [{"image": "imagesVal/right.png", "label": "labelsVal/right.png"}],
        "test": ["imagesVal/right.png"],
    }))
    return ds, msk[:, 256:] > 0


# native-resolution mode: frames are not resized, training on random 128^2 crops, sliding window at inference
NATIVE = {"frame_size": [-1, -1], "num_workers": 0, "progress_bar": False, "device": "cpu", "batch_size": 4,
          "cache_rate": 1.0}


def test_reduced_bundle_learns_on_the_rgb_nuclei_image(tmp_path):
    from ignite.engine import Events

    ds, held_out = _nuclei_dataset(tmp_path)
    before = tree_hashes(ds)
    root = tmp_path / "root"
    epochs = 30  # 30 epochs x 2 steps x 4 random crops of 128^2 (reduced.json: AdamW, lr 3e-3, cosine decay)
    start = time.time()
    wf = _workflow(_cfg("train.json", "reduced.json"), bundle_root=str(root), dataset_dir=str(ds), val_interval=6,
                   **{"train#trainer#max_epochs": epochs, "train#handlers#0#exec_at_start": True}, **NATIVE)
    wf.initialize()
    assert wf.check_properties() == []
    dice_history, losses = [], []
    wf.parser.get_parsed_content("validate#evaluator").add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: dice_history.append(e.state.metrics["val_dice"]))
    wf.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    wf.run()
    wf.finalize()
    t_train = time.time() - start
    assert len(losses) == epochs * 2 and len(dice_history) == 1 + epochs // 6
    assert (root / "models" / "model.pt").is_file()

    # evaluate.json on the held-out half: every metric of the paper, finite and in range
    t0 = time.time()
    run_workflow(_workflow(_cfg("train.json", "evaluate.json", "reduced.json"), bundle_root=str(root),
                           dataset_dir=str(ds), **NATIVE))
    t_eval = time.time() - t0
    report = json.loads((root / "eval" / "metrics.json").read_text())
    metrics = report["metrics"]
    names = {"val_dice", "val_iou", "val_mean_dice", "val_mean_iou", "val_weighted_f", "val_s_measure",
             "val_max_e_measure", "val_mean_e_measure", "val_mae"}
    assert set(metrics) == names and all(v is not None for v in metrics.values()), metrics
    assert all(0 <= metrics[k] <= 1 for k in names - {"val_max_e_measure", "val_mean_e_measure"})
    assert 0 < metrics["val_mean_e_measure"] <= metrics["val_max_e_measure"] < 1.001
    assert set(report["per_class"]["val_dice"]) == {"polyp", "mean"}

    # inference.json: sliding window (128^2) over the 512 x 256 held-out frame, 0/255 PNG of the frame's size
    t0 = time.time()
    out = tmp_path / "out"
    run_workflow(_workflow(_cfg("inference.json", "reduced.json"), "infer", bundle_root=str(root), dataset_dir=str(ds),
                           output_dir=str(out), frame_size=[-1, -1], device="cpu", num_workers=0))
    t_infer = time.time() - t0
    mask = np.array(Image.open(out / "right_mask.png"))
    assert mask.shape == held_out.shape == (512, 256) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    dice = PM.dice(mask / 255.0, held_out)
    print(f"\nPolyp-Mamba reduced on the RGB nuclei image: train {t_train:.0f} s ({epochs * 2} steps), evaluate "
          f"{t_eval:.0f} s, infer {t_infer:.0f} s; held-out Dice during training {np.round(dice_history, 3).tolist()}, "
          f"loss {np.mean(losses[:4]):.3f} -> {np.mean(losses[-4:]):.3f}; evaluate.json {metrics}")
    assert metrics["val_dice"] == pytest.approx(dice, abs=1e-6), "evaluate.json and the saved mask agree"
    # measured (seed 0): held-out Dice 0.29 -> 0.36, 0.43, 0.82, 0.84, 0.86 (every 6 epochs), loss 1.50 -> 0.91;
    # the bars leave room for platform differences
    assert dice_history[-1] > dice_history[0] + 0.4 and dice_history[-1] > 0.75, dice_history
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
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

    def run(dataset_dir, output_dir=None, **override):
        return run_workflow(_workflow(_cfg("inference.json", "reduced.json"), "infer", bundle_root=str(root),
                                      dataset_dir=str(dataset_dir), output_dir=str(output_dir or tmp_path / "out"),
                                      device="cpu", num_workers=0, **override))

    return root, run


def test_resize_mode_restores_frame_sizes_and_never_overwrites(infer_setup, tmp_path):
    _, run = infer_setup
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (217, 301, 3), np.uint8)).save(frames / "odd.png")
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), np.uint8)).save(frames / "small.jpg")
    before = tree_hashes(frames)
    out = tmp_path / "out"
    run(frames, out)  # default: each frame resized to the network's size (reduced: 128^2) and the mask back
    for name, shape in (("odd", (217, 301)), ("small", (60, 90))):
        mask = np.array(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert tree_hashes(frames) == before
    with pytest.raises(Exception) as e:
        run(frames, out)
    assert "already exists" in exception_chain(e.value)
    run(frames, out, overwrite=True)
    with pytest.raises(Exception) as e:
        run(frames, frames)
    assert "folder of the input" in exception_chain(e.value)
    assert tree_hashes(frames) == before


@pytest.mark.parametrize("case, expected", [
    ("grey", "expected 3 channel(s), got 1"),
    ("rgba", "expected 3 channel(s), got 4"),
    ("corrupt", "could not read"),
    ("missing", "not found"),
])
def test_bad_frames_get_clear_errors(infer_setup, tmp_path, case, expected):
    _, run = infer_setup
    frames = tmp_path / "frames"
    frames.mkdir()
    path = frames / "frame.png"
    override = {}
    if case == "grey":
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(path)
    elif case == "rgba":
        Image.fromarray(np.zeros((40, 48, 4), np.uint8)).save(path)
    elif case == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")  # a PNG signature, then nothing valid
    else:
        override = {"datalist": [str(frames / "gone.png")]}
        path = frames / "gone.png"
    before = tree_hashes(frames)
    with pytest.raises(Exception) as e:
        run(frames, tmp_path / "out", **override)
    text = exception_chain(e.value)
    assert expected in text and path.name in text, text
    assert tree_hashes(frames) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nan_frames_are_refused():
    """8-bit files cannot hold NaN; frames handed over as arrays (e.g. by an application that loads them itself) can:
    the preprocessing after the loader (ValidateImaged) and the network's own input check both refuse them."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(_cfg("inference.json", "reduced.json"))
    frame = torch.zeros(40, 48, 3)
    frame[3, 4, 1] = float("nan")
    frame = MetaTensor(frame, meta={"filename_or_obj": "frame_in_memory", "original_channel_dim": -1})
    with pytest.raises(Exception) as e:  # Compose wraps the ValueError in a RuntimeError naming the transform
        Compose(parser.get_parsed_content("preprocessing").transforms[1:])({"image": frame})
    assert "frame_in_memory: the image contains 1 NaN" in exception_chain(e.value)
    net = parser.get_parsed_content("network_def").eval()
    with pytest.raises(ValueError, match="NaN"):
        net(torch.full((1, 3, 128, 128), float("nan")))


@pytest.mark.parametrize("case, expected", [
    ("shape", "differs from its image"),
    ("channels", "1 (grey), 3 (RGB) or 4 (RGBA) channels"),
])
def test_bad_masks_get_clear_errors(tmp_path, case, expected):
    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(ds / "imagesTr" / "a.png")
    lbl = ds / "labelsTr" / "a.png"
    if case == "shape":
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(lbl)
    else:
        Image.fromarray(np.zeros((40, 48, 2), np.uint8), mode="LA").save(lbl)
    wf = _workflow(_cfg("train.json", "reduced.json"), bundle_root=str(tmp_path / "root"), dataset_dir=str(ds),
                   **{**NATIVE, "cache_rate": 0.0, "train#trainer#max_epochs": 1})
    wf.initialize()
    with pytest.raises(Exception) as e:
        wf.run()
    text = exception_chain(e.value)
    assert expected in text and lbl.name in text, text


def test_multi_gpu_config_runs_under_torchrun_on_cpu(tmp_path):
    import os
    import subprocess
    import sys

    ds, _ = _nuclei_dataset(tmp_path, repeats=4)
    lists = json.loads((ds / "dataset.json").read_text())
    lists["validation"] *= 2  # each process evaluates its own share of the validation frames
    (ds / "dataset.json").write_text(json.dumps(lists))
    root = tmp_path / "root"
    ov = {"bundle_root": str(root), "dataset_dir": str(ds), "frame_size": [-1, -1], "num_workers": 0,
          "progress_bar": False, "batch_size": 2, "train#trainer#max_epochs": 1}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--logging_file", str(CONFIGS / "logging.conf"),
           "--config_file", str(_cfg("train.json", "multi_gpu_train.json", "reduced.json"))]
    for k, v in ov.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (root / "models" / "model.pt").is_file(), log[-2000:]
    (ckpt,) = (root / "models" / "checkpoints").glob("checkpoint_*.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"] == 1, "2 x 2 frames per process"
    assert not any(k.startswith("module.") for k in state["model"]), "DDP prefix must not reach the checkpoint"
    assert "val_dice" in log


def test_prepare_pranet_split(tmp_path):
    import importlib.util

    from shared_networks.bundle import load_datalist

    src = tmp_path / "PraNet"
    rng = np.random.default_rng(0)

    def frame(path: Path, mask: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = (rng.random((20, 24)) > 0.5).astype(np.uint8) * 255 if mask else rng.integers(0, 255, (20, 24, 3),
                                                                                               np.uint8)
        Image.fromarray(arr).save(path)

    for i in range(5):
        frame(src / "TrainDataset" / "image" / f"{i}.png", False)
        frame(src / "TrainDataset" / "mask" / f"{i}.png", True)
    for name in ("Kvasir", "CVC-300"):
        for i in range(2):
            frame(src / "TestDataset" / name / "images" / f"t{i}.png", False)
            frame(src / "TestDataset" / name / "masks" / f"t{i}.png", True)
    spec = importlib.util.spec_from_file_location("prep", BUNDLE / "scripts" / "prepare_pranet_split.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = tree_hashes(src)
    out = tmp_path / "polyp"
    assert mod.main(["--pranet_dir", str(src), "--out", str(out)]) == 0
    assert len(load_datalist(str(out), "all")) == 5
    assert len(load_datalist(str(out), "training", 0.2)) == 4
    test = load_datalist(str(out), "all", datalist_file="dataset_test_Kvasir.json")
    assert [Path(p["image"]).name for p in test] == ["t0.png", "t1.png"]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "dataset_test_CVC-300.json",
                                                     "dataset_test_Kvasir.json"]
    assert tree_hashes(src) == before
    with pytest.raises(FileExistsError, match="overwrite"):
        mod.main(["--pranet_dir", str(src), "--out", str(out)])
    (src / "TrainDataset" / "mask" / "3.png").unlink()
    with pytest.raises(ValueError, match="without a mask"):
        mod.main(["--pranet_dir", str(src), "--out", str(out), "--overwrite"])


def test_traced_export(tmp_path):
    """The numba / CUDA scans are custom autograd functions that TorchScript cannot save; while tracing, the scan
    switches to its pure-PyTorch implementation, so the traced model saves, reloads and reproduces the eager network
    at the ROI size (the command of docs/README.md)."""
    from shared_networks.bundle.export import build_network, export_network

    cfg = _cfg("inference.json", "reduced.json")
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(build_network(str(BUNDLE), cfg).state_dict(), tmp_path / "models" / "model.pt")
    path = export_network(str(BUNDLE), "torchscript_trace", filepath=str(tmp_path / "model.ts"),
                          ckpt_file=str(tmp_path / "models" / "model.pt"), config_file=cfg, spatial_shape=[128, 128])
    ts = torch.jit.load(path)
    net = build_network(str(BUNDLE), cfg)
    net.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(ts(x), net.eval()(x), atol=1e-4)
