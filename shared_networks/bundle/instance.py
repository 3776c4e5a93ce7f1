"""Instance segmentation from semantic network outputs: training targets from instance masks, seeded-watershed
post-processing, and the mean segmentation accuracy (mSA) metric.

This is the recipe of torch-em / ViM-UNet (Archit & Pape, MIDL 2024) for cells and nuclei, written for MONAI bundles:

* **Targets** (computed from an instance label map, 0 = background, every other id one object):

  - ``"boundaries"``: 2 channels, ``[foreground, boundaries]`` with ``boundaries =
    skimage.segmentation.find_boundaries(labels, mode="thick")`` (torch-em ``BoundaryTransform(add_binary_target=
    True)``).
  - ``"distances"``: 3 channels, ``[foreground, centre distance, boundary distance]`` (torch-em
    ``PerObjectDistanceTransform(distances=True, boundary_distances=True, foreground=True, min_size=25)``): per
    object, the Euclidean distance to its centre (rounded centroid, or the point farthest from the boundary when
    the centroid lies outside the object) and the inverted distance to its inner boundary, each divided by its
    maximum over the object, so both are 0 at the centre and 1 at the far edge; background is 1.

* **Post-processing** to instances (torch-em ``watershed_from_components`` /
  ``watershed_from_center_and_boundary_distances`` with the ViM-UNet LIVECell settings): seeds are the connected
  components of ``foreground - boundaries > 0.5`` (resp. of ``centre < 0.5 & boundary < 0.6`` inside the foreground,
  after Gaussian smoothing with sigma 1), grown by ``skimage.segmentation.watershed`` over the boundary map inside
  ``foreground > 0.5``; objects under ``min_size`` (50) pixels are removed and ids made consecutive.

* **Metric**: mean segmentation accuracy (``elf.evaluation.mean_segmentation_accuracy``, the 2018 Data Science Bowl
  metric the paper reports): for each IoU threshold t in 0.50, 0.55, ..., 0.95 objects are matched one-to-one
  (maximum number of pairs with IoU >= t), ``SA(t) = TP / (TP + FP + FN)`` (0 when TP = 0), and mSA is the mean over
  the thresholds. A dataset's value is the mean over its images.

MONAI pieces for bundle configs: :class:`InstanceTargetsd`, :class:`ValidateInstancesd`, :class:`SeededWatershedd`,
:class:`ChannelDiceLoss`, :class:`SegmentationAccuracyMetric` and its ignite handler
:class:`MeanSegmentationAccuracy`; plus :func:`coco_instance_masks` to turn COCO polygon annotations (LIVECell) into
instance masks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.transforms import MapTransform
from monai.utils import MetricReduction
from torch.nn.modules.loss import _Loss

from .transforms import source_name

__all__ = [
    "TARGETS",
    "DEFAULT_THRESHOLDS",
    "boundary_targets",
    "distance_targets",
    "instance_targets",
    "size_filter",
    "watershed_from_boundaries",
    "watershed_from_distances",
    "instances_from_prediction",
    "matching_scores",
    "segmentation_accuracy",
    "mean_segmentation_accuracy",
    "coco_instance_masks",
    "InstanceTargetsd",
    "ValidateInstancesd",
    "SeededWatershedd",
    "ChannelDiceLoss",
    "SegmentationAccuracyMetric",
    "MeanSegmentationAccuracy",
]

#: target name -> names of the network output channels it trains
TARGETS: dict[str, tuple[str, ...]] = {
    "boundaries": ("foreground", "boundaries"),
    "distances": ("foreground", "centre distance", "boundary distance"),
}

#: IoU thresholds of the mSA (elf / torch-em: ``np.arange(0.5, 1.0, 0.05)``, the same floating-point values).
DEFAULT_THRESHOLDS = tuple(float(t) for t in np.arange(0.5, 1.0, 0.05))


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}.")
    return target


def _as_instances(labels, what: str = "instance labels") -> np.ndarray:
    arr = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must hold integer object ids, found non-integer or non-finite values.")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{what} must be an integer label image, got dtype {arr.dtype}.")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} must be >= 0 (0 = background), found {arr.min()}.")
    return arr.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------------------------------


def boundary_targets(labels, mode: str = "thick", foreground: bool = True) -> np.ndarray:
    """``(2, *S)`` float32 ``[foreground, boundaries]`` (or ``(1, *S)`` boundaries only) from an instance map ``S``.

    ``boundaries`` marks every pixel whose neighbourhood holds another id (background included), as
    ``skimage.segmentation.find_boundaries(labels, mode)``; torch-em trains with ``mode="thick"``.
    """
    from skimage.segmentation import find_boundaries

    lab = _as_instances(labels)
    bd = find_boundaries(lab, mode=mode).astype(np.float32)[None]
    if not foreground:
        return bd
    return np.concatenate([(lab > 0).astype(np.float32)[None], bd], axis=0)


def distance_targets(
    labels, min_size: int = 25, connected_components: bool = True, fill_value: float = 1.0, foreground: bool = True
) -> np.ndarray:
    """``(3, *S)`` float32 ``[foreground, centre distance, boundary distance]`` from an instance map (see the module
    docstring; torch-em ``PerObjectDistanceTransform`` with the ViM-UNet LIVECell settings).

    Args:
        labels: instance map (spatial axes only).
        min_size: objects with fewer pixels become background (torch-em experiments: 25).
        connected_components: split every id into its connected components first (torch-em ``apply_label``).
        fill_value: distance value of background pixels.
        foreground: prepend the foreground channel (computed after the size filter, as torch-em).
    """
    from scipy import ndimage
    from skimage.measure import label as cc_label
    from skimage.measure import regionprops
    from skimage.segmentation import find_boundaries

    lab = _as_instances(labels)
    if connected_components:
        lab = cc_label(lab)
    if min_size > 0:
        ids, sizes = np.unique(lab, return_counts=True)
        small = ids[(sizes < min_size) & (ids != 0)]
        if small.size:
            lab = np.where(np.isin(lab, small), 0, lab)
    inner = find_boundaries(lab, mode="inner")
    out = np.full((2,) + lab.shape, fill_value, dtype=np.float32)
    eps = 1e-7
    for prop in regionprops(lab):
        bb = prop.slice
        mask = lab[bb] == prop.label
        # distance of every pixel of the bounding box to the nearest inner-boundary pixel (of any object in the box)
        ring = inner[bb]
        if ring.any():
            bdist = ndimage.distance_transform_edt(~ring).astype(np.float32)
        else:
            bdist = np.zeros(mask.shape, np.float32)
        bdist[~mask] = 0
        far = np.unravel_index(np.argmax(bdist), bdist.shape)
        centre = tuple(int(c) - s.start for c, s in zip(np.round(prop.centroid), bb))
        if not mask[centre]:  # centroid outside the (non-convex) object: use the most interior point
            centre = far
        grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in mask.shape], indexing="ij")
        cdist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre))).astype(np.float32)
        binv = bdist[far] - bdist
        for ch, d in enumerate((cdist, binv)):
            d = np.where(mask, d, 0)
            d = d / (np.abs(d).max() + eps)
            out[ch][bb][mask] = d[mask]
    if foreground:
        out = np.concatenate([(lab > 0).astype(np.float32)[None], out], axis=0)
    return out


def instance_targets(labels, target: str = "boundaries", **kwargs) -> np.ndarray:
    """:func:`boundary_targets` or :func:`distance_targets` by name (``target`` in :data:`TARGETS`)."""
    _check_target(target)
    return boundary_targets(labels, **kwargs) if target == "boundaries" else distance_targets(labels, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# post-processing
# ---------------------------------------------------------------------------------------------------------------------


def size_filter(seg: np.ndarray, min_size: int) -> np.ndarray:
    """Objects with fewer than ``min_size`` pixels become background; ids are made consecutive (1..N)."""
    from skimage.segmentation import relabel_sequential

    seg = np.asarray(seg)
    if min_size > 0:
        ids, sizes = np.unique(seg, return_counts=True)
        small = ids[(sizes < min_size) & (ids != 0)]
        if small.size:
            seg = np.where(np.isin(seg, small), 0, seg)
    return relabel_sequential(seg.astype(np.int64, copy=False))[0]


def watershed_from_boundaries(
    foreground: np.ndarray,
    boundaries: np.ndarray,
    seed_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_size: int = 50,
) -> np.ndarray:
    """Instances from foreground / boundary probabilities (torch-em ``watershed_from_components``): seeds =
    connected components of ``foreground - boundaries > seed_threshold``, grown over ``boundaries`` inside
    ``foreground > foreground_threshold``; then :func:`size_filter`."""
    from skimage.measure import label as cc_label
    from skimage.segmentation import watershed

    fg, bd = np.asarray(foreground, np.float32), np.asarray(boundaries, np.float32)
    seeds = cc_label((fg - bd) > seed_threshold)
    seg = watershed(bd, markers=seeds, mask=fg > foreground_threshold)
    return size_filter(seg, min_size)


def watershed_from_distances(
    foreground: np.ndarray,
    centre_distances: np.ndarray,
    boundary_distances: np.ndarray,
    centre_threshold: float = 0.5,
    boundary_threshold: float = 0.6,
    foreground_threshold: float = 0.5,
    smoothing: float = 1.0,
    min_size: int = 50,
) -> np.ndarray:
    """Instances from foreground / centre-distance / boundary-distance predictions (torch-em
    ``watershed_from_center_and_boundary_distances``; defaults = the ViM-UNet LIVECell evaluation): both distance maps
    are Gaussian-smoothed (``smoothing`` = sigma; 3-sigma kernel, mirrored borders), seeds are connected components
    of ``centre < centre_threshold & boundary < boundary_threshold`` inside ``foreground > foreground_threshold``,
    grown over the boundary distances inside that mask; then :func:`size_filter`."""
    from scipy import ndimage
    from skimage.measure import label as cc_label
    from skimage.segmentation import watershed

    fg = np.asarray(foreground, np.float32)
    cd, bd = np.asarray(centre_distances, np.float32), np.asarray(boundary_distances, np.float32)
    if smoothing and smoothing > 0:
        cd = ndimage.gaussian_filter(cd, smoothing, mode="mirror", truncate=3.0)
        bd = ndimage.gaussian_filter(bd, smoothing, mode="mirror", truncate=3.0)
    mask = fg > foreground_threshold
    seeds = cc_label((cd < centre_threshold) & (bd < boundary_threshold) & mask)
    seg = watershed(bd, markers=seeds, mask=mask)
    return size_filter(seg, min_size)


def instances_from_prediction(prediction, target: str = "boundaries", **kwargs) -> np.ndarray:
    """Instance map ``S`` from a channel-first prediction ``(C, *S)`` (probabilities, channels as :data:`TARGETS`)."""
    _check_target(target)
    pred = prediction.detach().float().cpu().numpy() if torch.is_tensor(prediction) else np.asarray(prediction)
    n = len(TARGETS[target])
    if pred.ndim < 2 or pred.shape[0] != n:
        raise ValueError(
            f"a '{target}' prediction needs {n} channels {TARGETS[target]} first, got shape {tuple(pred.shape)}."
        )
    if target == "boundaries":
        return watershed_from_boundaries(pred[0], pred[1], **kwargs)
    return watershed_from_distances(pred[0], pred[1], pred[2], **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# metric
# ---------------------------------------------------------------------------------------------------------------------


def _pair_ious(segmentation, groundtruth, ignore_label: int | None = 0):
    """Sparse IoUs: ``(pred index, true index, IoU)`` of every overlapping object pair, and the object counts."""
    seg, gt = _as_instances(segmentation, "segmentation"), _as_instances(groundtruth, "ground truth")
    if seg.shape != gt.shape:
        raise ValueError(f"segmentation shape {seg.shape} differs from the ground truth's {gt.shape}.")
    seg_ids, seg_inv, seg_size = np.unique(seg.ravel(), return_inverse=True, return_counts=True)
    gt_ids, gt_inv, gt_size = np.unique(gt.ravel(), return_inverse=True, return_counts=True)
    pairs, inter = np.unique(seg_inv.astype(np.int64) * len(gt_ids) + gt_inv, return_counts=True)
    pi, gi = pairs // len(gt_ids), pairs % len(gt_ids)
    iou = inter / (seg_size[pi] + gt_size[gi] - inter)
    keep_seg = np.ones(len(seg_ids), bool) if ignore_label is None else seg_ids != ignore_label
    keep_gt = np.ones(len(gt_ids), bool) if ignore_label is None else gt_ids != ignore_label
    ok = keep_seg[pi] & keep_gt[gi]
    # re-index the kept objects 0..n-1
    seg_new = np.cumsum(keep_seg) - 1
    gt_new = np.cumsum(keep_gt) - 1
    return seg_new[pi[ok]], gt_new[gi[ok]], iou[ok], int(keep_seg.sum()), int(keep_gt.sum())


def matching_scores(segmentation, groundtruth, ignore_label: int | None = 0) -> np.ndarray:
    """Dense IoU matrix ``(n_pred, n_true)`` between the objects of two label maps of the same shape (objects = ids
    present, ``ignore_label`` excluded from both; its pixels still count in the object sizes)."""
    pi, gi, iou, n_pred, n_true = _pair_ious(segmentation, groundtruth, ignore_label)
    out = np.zeros((n_pred, n_true))
    out[pi, gi] = iou
    return out


def _true_positives(pi: np.ndarray, gi: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Largest number of one-to-one pairs with IoU >= threshold (elf's optimal matching; for thresholds > 0.5 every
    object has at most one partner, so the pairs are simply counted)."""
    sel = iou >= threshold
    if not sel.any():
        return 0
    p, g = pi[sel], gi[sel]
    _, pc = np.unique(p, return_counts=True)
    _, gc = np.unique(g, return_counts=True)
    if pc.max() == 1 and gc.max() == 1:
        return int(sel.sum())
    from scipy.optimize import linear_sum_assignment

    rows, r_inv = np.unique(p, return_inverse=True)
    cols, c_inv = np.unique(g, return_inverse=True)
    sub = np.zeros((len(rows), len(cols)), bool)
    sub[r_inv, c_inv] = True
    r, c = linear_sum_assignment(sub, maximize=True)
    return int(sub[r, c].sum())


def _accuracies(ious, thresholds: Sequence[float]) -> list[float]:
    pi, gi, iou, n_pred, n_true = ious
    out = []
    for t in thresholds:
        tp = _true_positives(pi, gi, iou, float(t))
        out.append(tp / (n_pred + n_true - tp) if tp > 0 else 0.0)
    return out


def segmentation_accuracy(segmentation, groundtruth, threshold: float = 0.5, ignore_label: int | None = 0) -> float:
    """``TP / (TP + FP + FN)`` at one IoU threshold (0 when there is no true positive, as elf)."""
    return _accuracies(_pair_ious(segmentation, groundtruth, ignore_label), [threshold])[0]


def mean_segmentation_accuracy(
    segmentation,
    groundtruth,
    thresholds: Sequence[float] | None = None,
    return_accuracies: bool = False,
    ignore_label: int | None = 0,
):
    """Mean segmentation accuracy of an instance segmentation (elf / torch-em / ViM-UNet paper definition).

    Args:
        segmentation, groundtruth: label maps of the same shape (numpy or torch; 0 = background).
        thresholds: IoU thresholds (default :data:`DEFAULT_THRESHOLDS`, 0.50..0.95 step 0.05).
        return_accuracies: also return the per-threshold accuracies (index 0: SA50, index 5: SA75).
        ignore_label: id that is not an object (background).

    Returns:
        the mSA (float), or ``(mSA, [SA(t) for t in thresholds])``.
    """
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else tuple(float(t) for t in thresholds)
    accs = _accuracies(_pair_ious(segmentation, groundtruth, ignore_label), thresholds)
    msa = float(np.mean(accs))
    return (msa, accs) if return_accuracies else msa


class SegmentationAccuracyMetric(CumulativeIterationMetric):
    """MONAI metric: per-image mean segmentation accuracy of instance maps.

    Call with batch-first ``(B, 1, *S)`` tensors or lists of channel-first ``(1, *S)`` tensors (``y_pred`` the
    predicted instance map, ``y`` the ground-truth one); ``aggregate()`` returns the mean over all images so far
    (the paper's dataset-level mSA). ``thresholds=[0.5]`` gives SA50 (accuracy at IoU 0.5), ``[0.75]`` SA75.
    """

    def __init__(self, thresholds: Sequence[float] | None = None, reduction: MetricReduction | str = "mean") -> None:
        super().__init__()
        self.thresholds = DEFAULT_THRESHOLDS if thresholds is None else tuple(float(t) for t in thresholds)
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape:
            raise ValueError(f"predicted instances {tuple(y_pred.shape)} and ground truth {tuple(y.shape)} differ.")
        if y_pred.ndim < 3 or y_pred.shape[1] != 1:
            raise ValueError(
                f"instance maps must be (B, 1, *spatial) with one channel of object ids, got {tuple(y_pred.shape)}."
            )
        vals = [mean_segmentation_accuracy(p[0], g[0], self.thresholds) for p, g in zip(y_pred, y)]
        # on the prediction's device: the buffers are all-gathered across ranks (NCCL needs CUDA tensors)
        return torch.tensor(vals, dtype=torch.float32, device=y_pred.device).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the buffer is empty: call the metric on at least one image first.")
        red = self.reduction if reduction is None else reduction
        if str(getattr(red, "value", red)) == "none":
            return data
        return data.mean()


class MeanSegmentationAccuracy(IgniteMetricHandler):
    """Ignite metric (for ``key_val_metric`` / ``additional_metrics`` in bundle configs) computing the mean
    segmentation accuracy over an evaluation, e.g.::

        "val_msa": {"_target_": "shared_networks.bundle.instance.MeanSegmentationAccuracy",
                    "output_transform": "$monai.handlers.from_engine(['pred_instances', 'instances'])"}

    Args:
        thresholds: IoU thresholds (default 0.50..0.95; ``[0.5]`` for SA50).
        output_transform: maps the engine output to ``(y_pred, y)`` instance maps.
        save_details: keep the per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        thresholds: Sequence[float] | None = None,
        output_transform=lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=SegmentationAccuracyMetric(thresholds), output_transform=output_transform,
            save_details=save_details,
        )


# ---------------------------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------------------------


class ChannelDiceLoss(_Loss):
    """``sum_c (1 - Dice_c)`` over output channels with the squared denominator of torch-em's ``DiceLoss``:
    ``Dice_c = 2 sum(p t) / max(sum(p^2) + sum(t^2), eps)``, sums over the batch and all pixels.

    With ``mask_distances_in_bg`` the channels after the first are multiplied by the target's foreground (channel 0)
    before their Dice, which is torch-em's ``DiceBasedDistanceLoss(mask_distances_in_bg=True)`` for the
    ``"distances"`` targets (the distance channels are not trained in the background).

    Args:
        mask_distances_in_bg: mask channels 1.. by the target foreground.
        sigmoid: apply a sigmoid to the input first. Leave False when the network already ends in a sigmoid
            (the ViM-UNet bundles do), so it is not applied twice.
        eps: lower bound of the denominator.
    """

    def __init__(self, mask_distances_in_bg: bool = False, sigmoid: bool = False, eps: float = 1e-7) -> None:
        super().__init__()
        self.mask_distances_in_bg = bool(mask_distances_in_bg)
        self.sigmoid = bool(sigmoid)
        self.eps = float(eps)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if input.shape != target.shape:
            hint = (
                "the network's out_channels must equal the target's channels (boundaries: 2, distances: 3)"
                if input.shape[1:2] != target.shape[1:2] else "prediction and target must have the same size"
            )
            raise ValueError(
                f"ChannelDiceLoss: prediction {tuple(input.shape)} and target {tuple(target.shape)} differ; {hint}."
            )
        p = torch.sigmoid(input) if self.sigmoid else input
        t = target.to(p.dtype)
        if self.mask_distances_in_bg and p.shape[1] > 1:
            fg = t[:, :1]
            p = torch.cat([p[:, :1], p[:, 1:] * fg], dim=1)
            t = torch.cat([t[:, :1], t[:, 1:] * fg], dim=1)
        dims = [0] + list(range(2, p.ndim))
        num = (p * t).sum(dims)
        den = (p * p).sum(dims) + (t * t).sum(dims)
        return (1.0 - 2.0 * num / den.clamp(min=self.eps)).sum()


# ---------------------------------------------------------------------------------------------------------------------
# dictionary transforms
# ---------------------------------------------------------------------------------------------------------------------


def _like(ref, array: np.ndarray, dtype=None) -> torch.Tensor:
    """``array`` as a tensor on ``ref``'s device, with ``ref``'s metadata when it is a MetaTensor."""
    device = ref.device if torch.is_tensor(ref) else None
    t = torch.as_tensor(array if dtype is None else array.astype(dtype), device=device)
    if isinstance(ref, MetaTensor):
        return MetaTensor(t, meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return t


class ValidateInstancesd(MapTransform):
    """Check channel-first instance label maps: one channel, integer ids >= 0 (0 = background), and (with
    ``image_key``) the image's spatial shape. Raises ``ValueError`` naming the file.

    Args:
        keys: label keys.
        image_key: image whose spatial shape the labels must match (``None`` to skip).
        max_id: largest id accepted (default 2**31 - 1).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self, keys: KeysCollection, image_key: str | None = "image", max_id: int = 2**31 - 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.max_id = int(max_id)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lbl = d[key]
            name = source_name(lbl)
            shape = tuple(lbl.shape)
            if len(shape) < 2 or shape[0] != 1:
                raise ValueError(
                    f"{name}: an instance mask must have one channel of object ids (0 = background), got shape "
                    f"{shape}; an RGB or multi-page file is not an instance mask."
                )
            if self.image_key is not None and self.image_key in d:
                img_shape = tuple(d[self.image_key].shape[1:])
                if img_shape != shape[1:]:
                    raise ValueError(
                        f"{name}: mask spatial shape {shape[1:]} differs from its image "
                        f"{source_name(d[self.image_key])} {img_shape}; the two must be pixel-aligned."
                    )
            t = torch.as_tensor(lbl)
            if t.is_floating_point():
                if not bool(torch.isfinite(t).all()) or not bool((t == torch.round(t)).all()):
                    raise ValueError(f"{name}: an instance mask must hold integer object ids, found other values.")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.max_id):
                raise ValueError(
                    f"{name}: object ids must be in 0..{self.max_id}, found {int(t.min())}..{int(t.max())}."
                )
        return d


class InstanceTargetsd(MapTransform):
    """Replace channel-first instance maps ``(1, *S)`` by the float32 training targets of ``target`` (see
    :data:`TARGETS`): ``(2, *S)`` for "boundaries", ``(3, *S)`` for "distances". Apply it after random crops, as
    torch-em computes targets per patch (per-object distance normalisation depends on the crop).

    Args:
        keys: instance-map keys (usually "label").
        target: "boundaries" or "distances".
        instance_key: also keep the original instance map under this key (for the mSA metric), or ``None``.
        boundary_mode: ``find_boundaries`` mode for "boundaries" (torch-em: "thick").
        min_size: size filter of "distances" (torch-em: 25).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        target: str = "boundaries",
        instance_key: str | None = None,
        boundary_mode: str = "thick",
        min_size: int = 25,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target = _check_target(target)
        self.instance_key = instance_key
        self.boundary_mode = boundary_mode
        self.min_size = int(min_size)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lbl = d[key]
            if lbl.shape[0] != 1:
                raise ValueError(
                    f"{source_name(lbl)}: expected a (1, *spatial) instance map under {key!r}, got "
                    f"{tuple(lbl.shape)}; InstanceTargetsd must run once, on the instance mask."
                )
            arr = _as_instances(lbl, f"{source_name(lbl)} ({key})")[0]
            if self.target == "boundaries":
                tgt = boundary_targets(arr, mode=self.boundary_mode)
            else:
                tgt = distance_targets(arr, min_size=self.min_size)
            if self.instance_key is not None:
                d[self.instance_key] = lbl
            d[key] = _like(lbl, tgt)
        return d


class SeededWatershedd(MapTransform):
    """Turn channel-first probability maps ``(C, *S)`` into an instance map ``(1, *S)`` (int32 ids 1..N, 0 =
    background) by seeded watershed (:func:`watershed_from_boundaries` / :func:`watershed_from_distances`).

    Args:
        keys: prediction keys (e.g. "pred").
        target: "boundaries" (channels foreground, boundaries) or "distances" (foreground, centre, boundary
            distance).
        output_key: write the instances here and keep the probabilities under ``keys`` (default: replace them).
        min_size: smallest object kept, in pixels (torch-em: 50).
        foreground_threshold: foreground mask threshold (0.5).
        seed_threshold: "boundaries": seeds where ``foreground - boundaries`` exceeds it (0.5).
        centre_threshold, boundary_threshold, smoothing: "distances" seeds (0.5, 0.6, sigma 1.0).
        max_instances: raise if more objects are found (default 65535, the largest id a uint16 file holds).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        target: str = "boundaries",
        output_key: str | None = None,
        min_size: int = 50,
        foreground_threshold: float = 0.5,
        seed_threshold: float = 0.5,
        centre_threshold: float = 0.5,
        boundary_threshold: float = 0.6,
        smoothing: float = 1.0,
        max_instances: int | None = 65535,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target = _check_target(target)
        self.output_key = output_key
        if self.target == "boundaries":
            self.kwargs = dict(
                seed_threshold=seed_threshold, foreground_threshold=foreground_threshold, min_size=min_size
            )
        else:
            self.kwargs = dict(
                centre_threshold=centre_threshold, boundary_threshold=boundary_threshold,
                foreground_threshold=foreground_threshold, smoothing=smoothing, min_size=min_size,
            )
        self.max_instances = max_instances

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.output_key is not None and len(self.keys) != 1:
            raise ValueError("SeededWatershedd: output_key needs exactly one key.")
        for key in self.key_iterator(d):
            pred = d[key]
            seg = instances_from_prediction(pred, self.target, **self.kwargs)
            n = int(seg.max()) if seg.size else 0
            if self.max_instances is not None and n > self.max_instances:
                raise ValueError(
                    f"{n} objects found in {source_name(pred)}, more than max_instances={self.max_instances} (the "
                    "output file's integer type); save with a wider type (output_dtype uint32) and raise "
                    "max_instances."
                )
            d[self.output_key or key] = _like(pred, seg[None], np.int32)
        return d


# ---------------------------------------------------------------------------------------------------------------------
# COCO polygons -> instance masks (LIVECell)
# ---------------------------------------------------------------------------------------------------------------------


def _polygon_mask(segmentation, height: int, width: int) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros((height, width), bool)
    if isinstance(segmentation, dict):
        raise ValueError("RLE-encoded COCO segmentations need pycocotools (pip install pycocotools).")
    for poly in segmentation:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        if len(xy) < 3:
            continue
        # COCO coordinates are continuous, pixel (r, c) covers [r, r+1) x [c, c+1): test pixel centres
        rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(height, width))
        mask[rr, cc] = True
    return mask


def coco_instance_masks(
    annotation_file: str, min_size: int = 50, use_pycocotools: bool | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(file_name, instance_mask)`` for every image of a COCO instance-segmentation file (e.g. LIVECell's
    ``livecell_coco_train.json``), as torch-em prepares LIVECell: objects are painted from the smallest to the largest
    ``area`` (crowd annotations first), so a larger object wins where two overlap; fragments under ``min_size``
    pixels left by such overlaps are removed and ids made consecutive (1..N). Masks are uint16.

    Polygons are rasterised with pycocotools when it is installed (``use_pycocotools=None``), else by pixel centres
    with scikit-image (differs from pycocotools only in pixels the outline cuts). LIVECell's files store
    ``annotations`` as a dict keyed by id; lists are accepted too.
    """
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    with open(annotation_file) as f:
        coco = json.load(f)
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{annotation_file} is not a COCO instance file (needs 'images' and 'annotations').")
    mask_utils = None
    if use_pycocotools or use_pycocotools is None:
        try:
            from pycocotools import mask as mask_utils  # type: ignore[no-redef]
        except ImportError:
            if use_pycocotools:
                raise
    images = coco["images"].values() if isinstance(coco["images"], dict) else coco["images"]
    anns = coco["annotations"].values() if isinstance(coco["annotations"], dict) else coco["annotations"]
    by_image: dict = {}
    for ann in anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for img in images:
        h, w = int(img["height"]), int(img["width"])
        masks = []
        for ann in by_image.get(img["id"], []):
            if mask_utils is not None:
                s = ann["segmentation"]
                rles = mask_utils.frPyObjects(s, h, w) if isinstance(s, list) else s
                m = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles).astype(bool)
            else:
                m = _polygon_mask(ann["segmentation"], h, w)
            area = 1 if ann.get("iscrowd", 0) else ann.get("area", int(m.sum()))
            masks.append((area, m))
        if len(masks) > 65535:
            raise ValueError(f"{img['file_name']}: {len(masks)} objects do not fit a uint16 mask.")
        order = np.argsort([a for a, _ in masks], kind="stable")
        seg = np.zeros((h, w), np.int64)
        for i, k in enumerate(order, 1):
            seg[masks[k][1]] = i
        yield img["file_name"], size_filter(seg, min_size).astype(np.uint16)
