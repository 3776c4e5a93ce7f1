"""The six polyp-segmentation metrics of the PraNet evaluation protocol (mDice, mIoU, weighted F-measure, S-measure,
E-measure, MAE), as functions, a MONAI metric and an ignite metric handler for bundle configs, plus the protocol's
reading of ground-truth masks.

Polyp papers since PraNet (Fan et al., MICCAI 2020; Polyp-Mamba among them) report these numbers from the PraNet
MATLAB toolbox (``eval/main.m``). Per image, with ``P`` the predicted foreground map in [0, 1] (the toolbox first
stretches every map to [0, 1] with ``mapminmax``, see :func:`normalize_map`) and ``G`` the binary ground truth:

* **Dice / IoU** at threshold ``t``: foreground ``P >= t``; ``2 TP / (|P_t| + |G|)`` and ``TP / (TP + FP + FN)``,
  **0 when TP = 0** (toolbox convention, also for an empty prediction on an empty mask). The toolbox's **mDice** /
  **mIoU** average these over its 256 thresholds ``1, 254/255, ..., 0`` (:data:`TOOLBOX_THRESHOLDS`), then over the
  images (:func:`dice_curve`); :func:`dice` / :func:`iou` give the value at one threshold (0.5: the binary mask the
  bundles save).
* **Weighted F-measure** ``F_beta^w`` (Margolin, Zelnik-Manor & Tal, CVPR 2014), :func:`weighted_f_measure`: the
  absolute error ``E = |P - G|`` is made pixel-dependent (inside the object each error is replaced by the smaller of
  itself and its 7x7 Gaussian (sigma 5) blur, the blur seeing background pixels through the error of their nearest
  object pixel) and importance-weighted (a background error at distance ``d`` from the object counts
  ``2 - 0.5 ** (d / 5)``); then ``R^w = 1 - mean(E^w over G)``, ``P^w = TP^w / (TP^w + FP^w)`` with
  ``TP^w = |G| - sum(E^w over G)``, ``FP^w = sum(E^w outside G)``, and ``F = (1 + b^2) R P / (b^2 P + R)`` with
  beta = 1 (the toolbox's ``original_WFb``).
* **S-measure** ``S_alpha`` (Fan, Cheng, Liu, Li & Borji, ICCV 2017), :func:`s_measure`:
  ``alpha * S_object + (1 - alpha) * S_region``, alpha = 0.5. ``S_object = mu O_FG + (1 - mu) O_BG`` with
  ``mu = mean(G)``, ``O(x) = 2 mean(x) / (mean(x)^2 + 1 + std(x))`` over P inside G (O_FG) and 1 - P outside G (O_BG);
  ``S_region`` splits both maps into four blocks at the ground truth's centroid and sums the blocks' SSIM-like
  ``4 m_x m_y s_xy / ((m_x^2 + m_y^2)(s_x^2 + s_y^2))``, weighted by block area. Empty G: ``1 - mean(P)``; full G:
  ``mean(P)``.
* **E-measure** ``E_phi`` (Fan, Gong, Cao, Ren, Cheng & Borji, IJCAI 2018), :func:`e_measure`: for a binary map F,
  with bias matrices ``a_F = F - mean(F)``, ``a_G = G - mean(G)``, the alignment ``xi = 2 a_F a_G / (a_F^2 + a_G^2)``
  and the enhanced alignment ``phi = (1 + xi)^2 / 4``, averaged over the image. Empty G: ``phi = 1 - F``; full G:
  ``phi = F``. The toolbox binarises P at each of its 256 thresholds (foreground ``P > t``), averages the curve over
  the images, and reports its maximum (**max E-measure**, the polyp papers' ``E_phi^max``) and its mean
  (:func:`e_measure_curve`).
* **MAE**: ``mean(|P - G|)``.

Details that follow the published MATLAB code rather than the papers' formulas (so the numbers are comparable):
the E-measure divides by ``H*W - 1`` (so a perfect map scores ``N / (N - 1)``, slightly above 1); S-measure
centroids are rounded half away from zero on 1-based pixel indices; ``std`` and the SSIM variances use ``N - 1``;
``eps`` is MATLAB's (2.2e-16). Where the MATLAB code returns NaN these functions return a defined value: an empty
S-measure block (centroid on the last row or column) has area weight 0 and contributes 0, and the weighted
F-measure of an empty ground truth is 0.

Pieces for bundle configs: :class:`PolypMetric` (a MONAI ``CumulativeIterationMetric``), :class:`PolypMetricHandler`
(its ignite handler, for ``key_val_metric`` / ``additional_metrics``) and :class:`BinaryMaskd` (ground-truth masks
read as the toolbox does: grey value, foreground above half of the range).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.transforms import MapTransform

from .transforms import source_name

__all__ = [
    "TOOLBOX_THRESHOLDS",
    "METRICS",
    "binarize_mask",
    "normalize_map",
    "dice",
    "iou",
    "dice_curve",
    "iou_curve",
    "mae",
    "s_measure",
    "e_measure",
    "e_measure_curve",
    "weighted_f_measure",
    "polyp_metrics",
    "PolypMetric",
    "PolypMetricHandler",
    "BinaryMaskd",
]

#: The PraNet toolbox's thresholds ``1:-1/255:0`` (256 values, high to low).
TOOLBOX_THRESHOLDS = np.linspace(1.0, 0.0, 256)
_EPS = float(np.finfo(np.float64).eps)  # MATLAB's eps


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = x.numpy()
    return np.asarray(x)


def binarize_mask(mask) -> np.ndarray:
    """A ground-truth mask as a boolean foreground map, read as the PraNet toolbox reads its mask files.

    ``mask``: ``(H, W)`` or channel-last ``(H, W, C)`` with C in {3, 4} (RGB / RGBA files: the grey value is the mean
    of the colour channels). Values in [0, 1] are foreground above 0.5; larger ranges (8-bit 0/255 files, JPEG
    masks with compression noise such as Kvasir-SEG's) above 128, the toolbox's ``gt > 128``.
    """
    m = _array(mask).astype(np.float64)
    if m.ndim == 3 and m.shape[-1] in (3, 4):
        m = m[..., :3].mean(-1)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2D (H, W) or (H, W, 3|4), got shape {m.shape}.")
    if not np.isfinite(m).all():
        raise ValueError("the mask contains NaN or Inf values.")
    return m > (0.5 if m.size == 0 or m.max() <= 1.0 else 128.0)


def normalize_map(pred) -> np.ndarray:
    """Min-max stretch to [0, 1] (MATLAB ``mapminmax(x, 0, 1)``, as the toolbox applies to every map; PraNet's test
    script does the same before saving). A constant map becomes all zeros."""
    p = _array(pred).astype(np.float64)
    lo, hi = (float(p.min()), float(p.max())) if p.size else (0.0, 0.0)
    return (p - lo) / (hi - lo) if hi > lo else np.zeros_like(p)


def _prepare(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """(float64 map in [0, 1], boolean mask) of the same 2D shape, or a ValueError saying what is wrong."""
    p = _array(pred)
    g = _array(gt)
    p = p.reshape(p.shape[-2:]) if p.ndim > 2 and all(s == 1 for s in p.shape[:-2]) else p
    g = g.reshape(g.shape[-2:]) if g.ndim > 2 and all(s == 1 for s in g.shape[:-2]) else g
    if p.ndim != 2:
        raise ValueError(f"the prediction must be one 2D map (H, W), got shape {p.shape}.")
    if g.dtype != np.bool_:
        g = binarize_mask(g)
    if g.shape != p.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in size; resize the prediction back.")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("the prediction contains NaN or Inf values.")
    if p.size and (p.min() < -1e-6 or p.max() > 1 + 1e-6):
        raise ValueError(
            f"the prediction must be a foreground map in [0, 1] (probabilities or a binary mask), got values in "
            f"[{p.min():.3g}, {p.max():.3g}]; apply a sigmoid to logits first."
        )
    return np.clip(p, 0.0, 1.0), g


# ---------------------------------------------------------------------------------------------------------------------
# thresholded maps: Dice, IoU, E-measure


def _counts(p: np.ndarray, g: np.ndarray, thresholds, strict: bool) -> tuple[np.ndarray, ...]:
    """TP, FP, FN, TN (float64 arrays over ``thresholds``) of the binary maps ``p >= t`` (``p > t`` if strict)."""
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    fg, bg = np.sort(p[g]), np.sort(p[~g])
    side = "right" if strict else "left"
    tp = fg.size - np.searchsorted(fg, t, side=side)
    fp = bg.size - np.searchsorted(bg, t, side=side)
    tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    return tp, fp, fg.size - tp, bg.size - fp


def _dice_iou(tp, fp, fn):
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        j = np.where(tp > 0, tp / (tp + fp + fn), 0.0)
    return d, j


def dice_curve(pred, gt, thresholds=TOOLBOX_THRESHOLDS) -> np.ndarray:
    """Dice of ``pred >= t`` for every threshold (0 where TP = 0). Its mean over :data:`TOOLBOX_THRESHOLDS` is the
    toolbox's per-image mean Dice."""
    p, g = _prepare(pred, gt)
    tp, fp, fn, _ = _counts(p, g, thresholds, strict=False)
    return _dice_iou(tp, fp, fn)[0]


def iou_curve(pred, gt, thresholds=TOOLBOX_THRESHOLDS) -> np.ndarray:
    """IoU of ``pred >= t`` for every threshold (0 where TP = 0); see :func:`dice_curve`."""
    p, g = _prepare(pred, gt)
    tp, fp, fn, _ = _counts(p, g, thresholds, strict=False)
    return _dice_iou(tp, fp, fn)[1]


def dice(pred, gt, threshold: float = 0.5) -> float:
    """Dice of the binary map ``pred >= threshold`` (0 when no foreground pixel is found)."""
    return float(dice_curve(pred, gt, [threshold])[0])


def iou(pred, gt, threshold: float = 0.5) -> float:
    """IoU (Jaccard) of the binary map ``pred >= threshold`` (0 when no foreground pixel is found)."""
    return float(iou_curve(pred, gt, [threshold])[0])


def _e_from_counts(tp, fp, fn, tn) -> np.ndarray:
    """E-measure of binary maps given their confusion counts: ``phi`` takes one value per (F, G) pixel pair, so the
    image sum is the count-weighted sum of four terms."""
    n = tp + fp + fn + tn
    mu_f, mu_g = (tp + fp) / n, (tp + fn) / n

    def phi(f: float, gv: float) -> np.ndarray:
        a_f, a_g = f - mu_f, gv - mu_g
        xi = 2 * a_f * a_g / (a_f * a_f + a_g * a_g + _EPS)
        return (xi + 1) ** 2 / 4

    total = tp * phi(1, 1) + fp * phi(1, 0) + fn * phi(0, 1) + tn * phi(0, 0)
    total = np.where(tp + fn == 0, fn + tn, total)  # empty ground truth: sum(1 - F)
    total = np.where(fp + tn == 0, tp + fp, total)  # full ground truth: sum(F)
    return total / (n - 1 + _EPS)


def e_measure_curve(pred, gt, thresholds=TOOLBOX_THRESHOLDS) -> np.ndarray:
    """E-measure of ``pred > t`` for every threshold (strict, as the toolbox binarises for it). The toolbox averages
    these curves over a dataset's images and reports their max (``E_phi^max``) and mean."""
    p, g = _prepare(pred, gt)
    return _e_from_counts(*_counts(p, g, thresholds, strict=True))


def e_measure(pred, gt, threshold: float | None = None) -> float:
    """Enhanced-alignment measure of a binary foreground map (``pred`` is binarised as ``pred > threshold``; the
    default ``None`` takes ``pred > 0.5``, i.e. an already binary map as it is)."""
    t = 0.5 if threshold is None else float(threshold)
    return float(e_measure_curve(pred, gt, [t])[0])


def mae(pred, gt) -> float:
    """Mean absolute error between the map and the binary ground truth."""
    p, g = _prepare(pred, gt)
    return float(np.abs(p - g).mean()) if p.size else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# S-measure


def _object_score(x: np.ndarray) -> float:
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0  # MATLAB std of one value is 0
    return 2.0 * mean / (mean * mean + 1.0 + std + _EPS)


def _ssim(p: np.ndarray, g: np.ndarray) -> float:
    n = p.size
    x, y = float(p.mean()), float(g.mean())
    sx2 = float(((p - x) ** 2).sum()) / (n - 1 + _EPS)
    sy2 = float(((g - y) ** 2).sum()) / (n - 1 + _EPS)
    sxy = float(((p - x) * (g - y)).sum()) / (n - 1 + _EPS)
    alpha = 4 * x * y * sxy
    beta = (x * x + y * y) * (sx2 + sy2)
    if alpha != 0:
        return alpha / (beta + _EPS)
    return 1.0 if beta == 0 else 0.0


def _round_half_up(v: float) -> int:
    return int(np.floor(v + 0.5))  # MATLAB round (v > 0 here)


def s_measure(pred, gt, alpha: float = 0.5) -> float:
    """Structure measure (object- and region-aware similarity) of a foreground map against a binary mask."""
    p, g = _prepare(pred, gt)
    mu = float(g.mean())
    if mu == 0.0:
        return 1.0 - float(p.mean())
    if mu == 1.0:
        return float(p.mean())
    s_object = mu * _object_score(p[g]) + (1 - mu) * _object_score(1.0 - p[~g])

    h, w = g.shape
    rows, cols = np.nonzero(g)
    cx = _round_half_up(cols.mean() + 1)  # 1-based, as the MATLAB code
    cy = _round_half_up(rows.mean() + 1)
    gd = g.astype(np.float64)
    s_region = 0.0
    for rs, cs in ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
                   (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w))):
        block = p[rs, cs]
        if block.size:  # an empty block has area weight 0
            s_region += block.size / (h * w) * _ssim(block, gd[rs, cs])
    return max(0.0, alpha * s_object + (1 - alpha) * s_region)


# ---------------------------------------------------------------------------------------------------------------------
# weighted F-measure


def _gaussian_kernel(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)``."""
    r = (size - 1) / 2.0
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    k = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    k[k < _EPS * k.max()] = 0
    return k / k.sum()


def weighted_f_measure(pred, gt, beta: float = 1.0) -> float:
    """Weighted F-beta measure (Margolin et al. 2014) of a foreground map; 0 for an empty ground truth."""
    from scipy import ndimage

    p, g = _prepare(pred, gt)
    if not g.any():
        return 0.0
    err = np.abs(p - g)
    # distance of every pixel to the nearest object pixel, and that pixel's index (MATLAB bwdist)
    dist, (iy, ix) = ndimage.distance_transform_edt(~g, return_indices=True)
    err_t = err[iy, ix]  # background pixels see the error of their nearest object pixel (inside G: themselves)
    blurred = ndimage.correlate(err_t, _gaussian_kernel(), mode="constant", cval=0.0)  # imfilter: zero padding
    err_min = np.where(g & (blurred < err), blurred, err)
    importance = np.where(g, 1.0, 2.0 - np.exp(np.log(0.5) / 5.0 * dist))
    err_w = err_min * importance
    tp_w = g.sum() - err_w[g].sum()
    fp_w = err_w[~g].sum()
    recall = 1.0 - err_w[g].mean()
    precision = tp_w / (_EPS + tp_w + fp_w)
    b2 = beta * beta
    return float((1 + b2) * recall * precision / (_EPS + recall + b2 * precision))


# ---------------------------------------------------------------------------------------------------------------------
# all at once, and the MONAI / ignite metric

#: Metric names accepted by :class:`PolypMetric` (paper column in brackets):
#: "dice" / "iou" (at ``threshold``), "mean_dice" [mDice] / "mean_iou" [mIoU] (mean over the toolbox thresholds),
#: "weighted_f" [F_beta^w], "s_measure" [S_alpha], "max_e_measure" [E_phi^max], "mean_e_measure" [mean E_phi], "mae".
METRICS = ("dice", "iou", "mean_dice", "mean_iou", "weighted_f", "s_measure", "max_e_measure", "mean_e_measure", "mae")


def polyp_metrics(pred, gt, normalize: bool = True, threshold: float = 0.5) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one image (``normalize``: min-max stretch the map first, as the toolbox;
    "dice" / "iou" at ``threshold`` are computed on the map as given). "max_e_measure" of a single image is the
    maximum of its own curve; over a dataset use :class:`PolypMetric`, which takes the maximum of the mean curve."""
    p, g = _prepare(pred, gt)
    q = normalize_map(p) if normalize else p
    curve_e = e_measure_curve(q, g)
    return {
        "dice": dice(p, g, threshold),
        "iou": iou(p, g, threshold),
        "mean_dice": float(dice_curve(q, g).mean()),
        "mean_iou": float(iou_curve(q, g).mean()),
        "weighted_f": weighted_f_measure(q, g),
        "s_measure": s_measure(q, g),
        "max_e_measure": float(curve_e.max()),
        "mean_e_measure": float(curve_e.mean()),
        "mae": mae(q, g),
    }


class PolypMetric(CumulativeIterationMetric):
    """MONAI metric: one of :data:`METRICS` per image, aggregated over everything seen since ``reset()``.

    Call with batch-first ``(B, 1, H, W)`` tensors or lists of channel-first ``(1, H, W)`` tensors (images may differ
    in size): ``y_pred`` a foreground map in [0, 1] (sigmoid probabilities, resized back to the mask's size),
    ``y`` the ground-truth mask (binarised with :func:`binarize_mask`). ``aggregate()`` returns the mean over the
    images, except "max_e_measure": the maximum over thresholds of the image-averaged E-measure curve.

    Args:
        metric: a name from :data:`METRICS`.
        threshold: binarisation threshold of "dice" / "iou" (``pred >= threshold``).
        normalize: min-max stretch each map first (toolbox). Default ``None``: on for the toolbox metrics, off for
            "dice" / "iou" (which then score exactly the mask ``pred >= threshold`` that inference saves).
        thresholds: the threshold grid of the curve metrics (default the toolbox's 256).
    """

    def __init__(
        self,
        metric: str = "mean_dice",
        threshold: float = 0.5,
        normalize: bool | None = None,
        thresholds: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"PolypMetric: metric must be one of {METRICS}, got {metric!r}.")
        self.metric = metric
        self.threshold = float(threshold)
        self.normalize = (metric not in ("dice", "iou")) if normalize is None else bool(normalize)
        self.thresholds = TOOLBOX_THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)

    def image_value(self, pred, gt) -> np.ndarray:
        """The per-image entry of the buffer: a scalar, or for "max_e_measure" the E-measure curve."""
        p, g = _prepare(pred, gt)
        if self.normalize:
            p = normalize_map(p)
        m = self.metric
        if m in ("dice", "iou"):
            return np.array([(dice if m == "dice" else iou)(p, g, self.threshold)])
        if m in ("mean_dice", "mean_iou"):
            return np.array([(dice_curve if m == "mean_dice" else iou_curve)(p, g, self.thresholds).mean()])
        if m == "max_e_measure":
            return e_measure_curve(p, g, self.thresholds)
        if m == "mean_e_measure":
            return np.array([e_measure_curve(p, g, self.thresholds).mean()])
        fn = {"weighted_f": weighted_f_measure, "s_measure": s_measure, "mae": mae}[m]
        return np.array([fn(p, g)])

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.ndim != 4 or y_pred.shape[1] != 1:
            raise ValueError(
                f"PolypMetric: expected 2D foreground maps of shape (B, 1, H, W), got {tuple(y_pred.shape)}."
            )
        if y is None or y.shape[0] != y_pred.shape[0] or y.shape[2:] != y_pred.shape[2:]:
            shape = None if y is None else tuple(y.shape)
            raise ValueError(
                f"PolypMetric: ground truth {shape} does not match the prediction {tuple(y_pred.shape)}; invert the "
                "preprocessing resize (Invertd) so the prediction has the mask's size."
            )
        vals = [self.image_value(p[0], g[0] if g.shape[0] == 1 else g.movedim(0, -1)) for p, g in zip(y_pred, y)]
        return torch.as_tensor(np.stack(vals), dtype=torch.float64)

    def aggregate(self, reduction=None) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("PolypMetric: the buffer is empty; call the metric on at least one image first.")
        if str(getattr(reduction, "value", reduction)) == "none":
            return data
        mean = data.mean(0)
        return mean.max() if self.metric == "max_e_measure" else mean[0]


class PolypMetricHandler(IgniteMetricHandler):
    """Ignite metric over an evaluation (for ``key_val_metric`` / ``additional_metrics``), e.g.::

        "val_sm": {"_target_": "shared_networks.bundle.polyp_metrics.PolypMetricHandler", "metric": "s_measure",
                   "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}

    Args:
        metric, threshold, normalize: see :class:`PolypMetric`.
        output_transform: maps the engine output to ``(y_pred, y)``.
        save_details: keep the per-image values in ``engine.state.metric_details`` (default: yes, except for
            "max_e_measure", whose per-image entries are 256-point curves).
    """

    def __init__(
        self,
        metric: str = "mean_dice",
        threshold: float = 0.5,
        normalize: bool | None = None,
        output_transform=lambda x: x,
        save_details: bool | None = None,
    ) -> None:
        if save_details is None:
            save_details = metric != "max_e_measure"
        super().__init__(
            metric_fn=PolypMetric(metric, threshold, normalize), output_transform=output_transform,
            save_details=save_details,
        )


# ---------------------------------------------------------------------------------------------------------------------
# ground-truth masks


class BinaryMaskd(MapTransform):
    """Replace channel-first mask images ``(C, *S)`` by float32 ``(1, *S)`` binary masks (1 = polyp), read as the
    PraNet toolbox reads its masks (:func:`binarize_mask`: grey value = mean of the colour channels for RGB/RGBA
    files; foreground above 0.5 for masks in [0, 1], above 128 for 8-bit 0/255 masks, JPEG noise included).

    Raises ``ValueError`` naming the file for a mask with another channel count, NaN values, or (with
    ``image_key``) a spatial size different from its image's. Place it after ``EnsureChannelFirstd``.
    """

    def __init__(self, keys: KeysCollection, image_key: str | None = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lbl = d[key]
            name = source_name(lbl)
            shape = tuple(lbl.shape)
            if len(shape) != 3 or shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"{name}: a polyp mask must be a 2D image with 1 (grey), 3 (RGB) or 4 (RGBA) channels, got "
                    f"channel-first shape {shape}."
                )
            if self.image_key is not None and self.image_key in d:
                img_shape = tuple(d[self.image_key].shape[1:])
                if img_shape != shape[1:]:
                    raise ValueError(
                        f"{name}: mask size {shape[1:]} differs from its image {source_name(d[self.image_key])} "
                        f"{img_shape}; the two must be pixel-aligned."
                    )
            arr = _array(lbl)
            try:
                fg = binarize_mask(arr[0] if shape[0] == 1 else np.moveaxis(arr, 0, -1))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            out = torch.from_numpy(fg[None].astype(np.float32))
            if isinstance(lbl, MetaTensor):
                out = MetaTensor(out, meta=dict(lbl.meta), applied_operations=list(lbl.applied_operations))
            d[key] = out
        return d
