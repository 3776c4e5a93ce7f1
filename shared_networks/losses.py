"""Losses shared by the bundles.

``StructureLoss``: PraNet's "structure loss" (binary cross-entropy + boundary-weighted IoU), the training loss of
Polyp-Mamba (the paper: "binary cross-entropy loss and weighted IoU loss"), usable for 2D images and 3D volumes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import LossReduction

__all__ = ["StructureLoss", "boundary_weight_map"]


def boundary_weight_map(target: torch.Tensor, kernel_size: int = 31, weight: float = 5.0) -> torch.Tensor:
    """PraNet's pixel weights ``1 + weight * |box_mean(target) - target|`` (large near object boundaries).

    ``box_mean`` is a stride-1 average pool of odd width ``kernel_size`` with zero padding, counting the padded zeros
    (``count_include_pad=True``, the PyTorch default PraNet relies on), so pixels near the image border of a
    foreground object are weighted up as well.

    Args:
        target: (B, C, *spatial) float tensor with 2 or 3 spatial axes.
        kernel_size: odd box width (PraNet: 31 at 352x352).
        weight: boundary emphasis (PraNet: 5).
    """
    pad = kernel_size // 2
    nd = target.ndim - 2
    if nd == 2:
        mean = F.avg_pool2d(target, kernel_size, stride=1, padding=pad)  # exactly PraNet's call
    elif nd == 3:
        # a 31^3 box filter done directly is ~30k adds per voxel; with the padded zeros counted the box mean is
        # separable, so three 1-D passes give the same numbers at 3*31 adds per voxel. Padding explicitly because
        # avg_pool3d refuses volumes smaller than the kernel even when padded.
        mean = F.pad(target, (pad, pad) * 3)
        for axis in range(3):
            k = [1, 1, 1]
            k[axis] = kernel_size
            mean = F.avg_pool3d(mean, tuple(k), stride=1)
    else:
        raise ValueError(f"boundary_weight_map: expected a 2D or 3D batch (B, C, *spatial), got {tuple(target.shape)}.")
    return 1.0 + weight * (mean - target).abs()


class StructureLoss(nn.Module):
    """Binary cross-entropy + boundary-weighted IoU on logits (PraNet ``structure_loss``; Polyp-Mamba's loss).

    For logits ``p`` and a binary target ``g`` of shape (B, C, *spatial) (each channel is an independent binary
    problem), with ``w = 1 + 5 * |AvgPool_31(g) - g|`` (see :func:`boundary_weight_map`) and ``s = sigmoid(p)``::

        wIoU(b, c) = 1 - (sum w*s*g + 1) / (sum w*(s+g) - sum w*s*g + 1)        # sums over the spatial axes
        BCE(b, c)  = mean over the spatial axes of BCE_with_logits(p, g)
        loss(b, c) = BCE(b, c) + wIoU(b, c)

    What PraNet's code really computes: it intends a ``w``-weighted BCE but calls
    ``binary_cross_entropy_with_logits(..., reduce='none')``; the legacy ``reduce`` argument is truthy, so torch
    returns the plain batch-mean BCE and the weighting cancels out. The result is ``mean BCE + mean_images(wIoU)``.
    With ``reduction="mean"`` and the default ``weighted_bce=False`` this class returns exactly that number (the mean
    of per-image spatial means is the batch mean because all images in a batch share one size). ``weighted_bce=True``
    gives the weighting PraNet intended: ``BCE(b, c) = sum w*bce / sum w``.

    Args:
        kernel_size: odd width of the box filter for the boundary weights (PraNet: 31, at 352x352 inputs).
        boundary_weight: the factor 5 in ``w``.
        smooth: the +1 in the IoU numerator and denominator.
        weighted_bce: use the ``w``-weighted BCE PraNet intended instead of its effective plain mean BCE.
        bce_weight: scale of the BCE term (the paper's lambda_1; 1 in PraNet).
        iou_weight: scale of the wIoU term (the paper's lambda_2; 1 in PraNet).
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` (returns the (B, C) per-image values).

    Shapes: ``input`` logits (B, C, H, W) or (B, C, D, H, W); ``target`` the same shape with values in {0, 1}
    (soft targets in [0, 1] are accepted). Works under AMP: the computation runs in float32.

    Example::

        loss_fn = StructureLoss()
        loss = loss_fn(model(images), masks)   # masks: (B, 1, H, W) binary
    """

    def __init__(
        self,
        kernel_size: int = 31,
        boundary_weight: float = 5.0,
        smooth: float = 1.0,
        weighted_bce: bool = False,
        bce_weight: float = 1.0,
        iou_weight: float = 1.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"StructureLoss: kernel_size must be a positive odd number, got {kernel_size}.")
        self.kernel_size = int(kernel_size)
        self.boundary_weight = float(boundary_weight)
        self.smooth = float(smooth)
        self.weighted_bce = bool(weighted_bce)
        self.bce_weight = float(bce_weight)
        self.iou_weight = float(iou_weight)
        self.reduction = LossReduction(reduction).value

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args:
        input: logits (B, C, *spatial), 2 or 3 spatial axes.
        target: binary mask of the same shape.
        """
        if input.ndim not in (4, 5):
            raise ValueError(
                f"StructureLoss: expected logits of shape (B, C, H, W) or (B, C, D, H, W), got {tuple(input.shape)}."
            )
        if target.shape != input.shape:
            raise ValueError(
                f"StructureLoss: target shape {tuple(target.shape)} must equal the logits' shape {tuple(input.shape)} "
                "(one binary channel per output channel)."
            )
        logits = input.float()
        g = target.to(dtype=torch.float32)
        axes = tuple(range(2, logits.ndim))
        w = boundary_weight_map(g, self.kernel_size, self.boundary_weight)

        bce = F.binary_cross_entropy_with_logits(logits, g, reduction="none")
        if self.weighted_bce:
            bce = (w * bce).sum(axes) / w.sum(axes)
        else:
            bce = bce.mean(axes)

        s = torch.sigmoid(logits)
        inter = (w * s * g).sum(axes)
        union = (w * (s + g)).sum(axes)
        wiou = 1.0 - (inter + self.smooth) / (union - inter + self.smooth)

        loss = self.bce_weight * bce + self.iou_weight * wiou  # (B, C)
        if self.reduction == LossReduction.MEAN.value:
            return loss.mean()
        if self.reduction == LossReduction.SUM.value:
            return loss.sum()
        return loss
