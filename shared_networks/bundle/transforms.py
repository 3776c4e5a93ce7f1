"""Transforms the bundles' configs share: loading and checks that fail with the file's name and what was expected,
and a writer that never overwrites or writes beside the user's input.

All are dictionary transforms usable in MONAI bundle configs, e.g.
``{"_target_": "shared_networks.bundle.ValidateImaged", "keys": "image", "num_channels": 1, "spatial_dims": 3}``.
``SafeLoadImaged`` and ``SafeSaveImaged`` subclass MONAI's ``LoadImaged`` / ``SaveImaged``, so MONAI Label (which
swaps loaders and removes writers by type) treats them like the originals.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, SaveImaged

from .utils import as_bool

__all__ = ["SafeLoadImaged", "ValidateImaged", "ValidateLabeld", "SafeSaveImaged", "check_output_dir", "source_name"]


def source_name(img, default: str = "<in-memory image>") -> str:
    """The file an image was loaded from (MetaTensor meta ``filename_or_obj``), for error messages."""
    meta = img.meta if isinstance(img, MetaTensor) else {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return str(name) if name else default


class SafeLoadImaged(LoadImaged):
    """``LoadImaged`` whose failures name the file and the cause.

    A missing path raises ``FileNotFoundError`` and an unreadable / corrupt file raises ``ValueError``, both with the
    offending key and path, instead of a reader stack trace. Arguments are those of ``monai.transforms.LoadImaged``.
    """

    def __call__(self, data, reader=None):
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):
                continue  # already an array (e.g. MONAI Label passes tensors): nothing to load
            if not os.path.exists(path):
                raise FileNotFoundError(f"{key} file not found: {path}")
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                raise ValueError(f"{key} file is empty: {path}")
        try:
            return super().__call__(d, reader)
        except Exception as e:  # noqa: BLE001 - reader errors come in many types; report them uniformly
            paths = [str(d[k]) for k in self.key_iterator(d) if isinstance(d[k], (str, os.PathLike))]
            raise ValueError(
                f"could not read {' / '.join(paths)} as an image ({type(e).__name__}: {e}). Is the file complete and "
                "in a format the bundle reads (NIfTI, NRRD or MHA volumes; PNG, TIFF or JPEG images; see its README)?"
            ) from e


class ValidateImaged(MapTransform):
    """Check a channel-first image before it reaches the network: channel count, number of spatial axes, finite
    values. Raises ``ValueError`` naming the source file. Place it right after ``EnsureChannelFirstd``.

    Args:
        keys: image keys.
        num_channels: required channel count (e.g. 1 for CT).
        spatial_dims: required number of spatial axes (2 or 3).
        check_finite: refuse NaN / Inf voxels.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int,
        spatial_dims: int,
        check_finite: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = int(num_channels)
        self.spatial_dims = int(spatial_dims)
        self.check_finite = check_finite

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = source_name(img)
            shape = tuple(img.shape)
            if len(shape) != self.spatial_dims + 1:
                raise ValueError(
                    f"{name}: expected a {self.spatial_dims}D image with {self.num_channels} channel(s), i.e. "
                    f"{self.spatial_dims + 1} axes after EnsureChannelFirstd, got shape {shape}."
                )
            if shape[0] != self.num_channels:
                raise ValueError(
                    f"{name}: expected {self.num_channels} channel(s), got {shape[0]} (channel-first shape {shape}). "
                    "Give one file per image with the channels this bundle was built for."
                )
            if self.check_finite:
                t = torch.as_tensor(img)
                if t.is_floating_point():
                    bad = int((~torch.isfinite(t)).sum())
                    if bad:
                        raise ValueError(
                            f"{name}: the image contains {bad} NaN/Inf voxel(s) out of {t.numel()}; replace them "
                            "(e.g. with the minimum intensity) before running the bundle."
                        )
        return d


class ValidateLabeld(MapTransform):
    """Check a channel-first label map: one channel, integer class ids in ``[0, num_classes)``, and (with
    ``image_key``) the same spatial shape as its image. Raises ``ValueError`` naming the label file.

    Args:
        keys: label keys.
        num_classes: number of classes including background.
        image_key: image whose spatial shape the label must match (``None`` to skip).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        image_key: str | None = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lbl = d[key]
            name = source_name(lbl)
            shape = tuple(lbl.shape)
            if shape[0] != 1:
                raise ValueError(f"{name}: a label map must have one channel of class ids, got shape {shape}.")
            if self.image_key is not None and self.image_key in d:
                img_shape = tuple(d[self.image_key].shape[1:])
                if img_shape != shape[1:]:
                    raise ValueError(
                        f"{name}: label spatial shape {shape[1:]} differs from its image "
                        f"{source_name(d[self.image_key])} {img_shape}; the two must be voxel-aligned."
                    )
            values = torch.unique(torch.as_tensor(lbl))
            if values.is_floating_point() and not bool(torch.all(values == torch.round(values))):
                raise ValueError(f"{name}: a label map must hold integer class ids, found non-integer values.")
            bad = [int(v) for v in values.tolist() if v < 0 or v >= self.num_classes]
            if bad:
                raise ValueError(
                    f"{name}: class ids {bad[:10]} are outside 0..{self.num_classes - 1} "
                    f"({self.num_classes} classes incl. background); remap the labels (see docs/README.md)."
                )
        return d


def _inputs_of(inputs) -> list[str]:
    out = []
    for item in inputs or []:
        if isinstance(item, Mapping):
            item = item.get("image")
        if isinstance(item, (str, os.PathLike)):
            out.append(os.path.realpath(os.fspath(item)))
    return out


def check_output_dir(output_dir: str, inputs: Sequence = ()) -> str:
    """Refuse an ``output_dir`` that is the folder of one of the ``inputs`` (paths or ``{"image": path}`` dicts), so
    results never land beside or over the user's scans. Returns ``output_dir`` unchanged."""
    if output_dir is None or str(output_dir).strip() == "":
        raise ValueError("output_dir is empty; pass --output_dir /path/for/results.")
    out = os.path.realpath(os.fspath(output_dir))
    for path in _inputs_of(inputs):
        if os.path.dirname(path) == out:
            raise ValueError(
                f"output_dir {output_dir} is the folder of the input {path}; results are never written beside the "
                "input scans. Choose another --output_dir (default: <bundle_root>/eval)."
            )
    return output_dir


class SafeSaveImaged(SaveImaged):
    """``SaveImaged`` that never overwrites an existing file and never writes into the folder of the image it came
    from. Arguments are those of ``monai.transforms.SaveImaged`` plus:

    Args:
        overwrite: allow replacing an existing output file (default ``False``: raise ``FileExistsError``).
    """

    def __init__(self, *args, overwrite: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overwrite = as_bool(overwrite)

    def _target(self, img, meta_data) -> str:
        saver = self.saver
        meta = img.meta if isinstance(img, MetaTensor) else meta_data
        kw = saver.fname_formatter(meta, saver)
        return os.path.realpath(saver.folder_layout.filename(**kw))

    def __call__(self, data):
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if meta_key is None and meta_key_postfix is not None:
                meta_key = f"{key}_{meta_key_postfix}"
            meta_data = d.get(meta_key) if meta_key is not None else None
            target = self._target(d[key], meta_data)
            src = source_name(d[key], default="")
            if src and os.path.exists(src):
                src_real = os.path.realpath(src)
                if target == src_real:
                    raise ValueError(f"refusing to overwrite the input image {src} with the segmentation.")
                if os.path.dirname(target) == os.path.dirname(src_real):
                    raise ValueError(
                        f"refusing to write {target} into the folder of its input {src}; choose another --output_dir."
                    )
            if os.path.exists(target) and not self.overwrite:
                raise FileExistsError(
                    f"{target} already exists; it is not overwritten. Choose another --output_dir, delete the file, "
                    "or pass --overwrite True."
                )
        return super().__call__(d)

