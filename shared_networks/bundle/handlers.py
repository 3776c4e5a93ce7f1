"""Ignite handlers and helpers the bundles' train / evaluate / inference configs share.

- :func:`load_checkpoint`: weights-only loading that refuses a checkpoint made for another network, naming the
  missing / unexpected / misshapen keys, instead of a ``load_state_dict`` stack trace.
- :class:`StrictCheckpointLoader`: MONAI ``CheckpointLoader`` built on it (inference / evaluation weights).
- :func:`latest_checkpoint`, :func:`attach_resume`: periodic resumable checkpoints (network, optimiser, scheduler,
  trainer, best-model tracker) and automatic resumption from the newest one.
- :class:`BestModelSaver`: writes ``models/model.pt`` (plain state dict) whenever the key metric improves; its
  best-so-far score survives a resume.
- :class:`ClassMetricsSaver`: per-class metrics with class names, written as JSON and CSV.
- :class:`GradientClipping`: gradient-norm clipping between backward and optimiser step (nnU-Net-style trainers).
- :class:`LossProgressBar`, :func:`rank_zero_handlers`.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, ProgressBar
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import string_list_all_gather

from ..convert._common import check_state_dict, strip_prefix
from .utils import as_bool

__all__ = [
    "load_checkpoint",
    "StrictCheckpointLoader",
    "latest_checkpoint",
    "attach_resume",
    "BestModelSaver",
    "ClassMetricsSaver",
    "LossProgressBar",
    "GradientClipping",
    "rank_zero_handlers",
]

logger = logging.getLogger(__name__)

_WEIGHTS_HINT = (
    "Train the bundle first (configs/train.json writes models/model.pt), import official weights with "
    "`python -m shared_networks.convert ...` (see docs/README.md), or pass --ckpt_path /path/to/model.pt."
)


def _unwrap(obj):
    return obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj


def _read(path: str, map_location=None) -> Mapping:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}. " + _WEIGHTS_HINT)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"could not read checkpoint {path} as a weights-only PyTorch file ({type(e).__name__}: {e}). "
            "Is it complete, and a state dict rather than a pickled object?"
        ) from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict.")
    return ckpt


def load_checkpoint(path: str, objects: Mapping, map_location=None, strict: bool = True) -> Mapping:
    """Load ``path`` into ``objects`` (``{"model": net, "optimizer": opt, ...}``, anything with
    ``load_state_dict``) and return the raw checkpoint.

    The file may hold one entry per object, or (with a single object) the plain state dict; a lone ``"model"``,
    ``"network"`` or ``"state_dict"`` entry is also accepted for a single network. Before anything is loaded, every
    ``nn.Module`` is compared with its entry and a ``ValueError`` names the keys that differ, so a checkpoint of
    another network or configuration is refused with a readable message. DDP ``module.`` prefixes are stripped.
    """
    ckpt = _read(path, map_location)
    objects = dict(objects)
    if len(objects) == 1:
        (name,) = objects
        if name not in ckpt:
            for alt in ("model", "network", "state_dict"):
                if alt in ckpt and isinstance(ckpt[alt], Mapping):
                    ckpt = {name: ckpt[alt]}
                    break
            else:
                ckpt = {name: ckpt}
    missing = [k for k in objects if k not in ckpt]
    if missing:
        raise ValueError(
            f"checkpoint {path} has no entries {missing} (it holds {sorted(ckpt)[:10]}); it was not written by this "
            "bundle's training."
        )
    for name, obj in objects.items():
        obj = _unwrap(obj)
        if isinstance(obj, torch.nn.Module):
            given = strip_prefix(ckpt[name], "module.")
            if strict:
                try:
                    check_state_dict(obj.state_dict(), given, what=f"checkpoint {path}")
                except ValueError as e:
                    raise ValueError(
                        f"{e}. The checkpoint was made for another network or configuration than "
                        f"{type(obj).__name__} as configured here (network_def); use the matching bundle / "
                        "settings, or convert the weights."
                    ) from None
            obj.load_state_dict(given, strict=strict)
        else:
            obj.load_state_dict(ckpt[name])
    return ckpt


class StrictCheckpointLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` that loads through :func:`load_checkpoint` (clear errors for a missing
    file or a checkpoint of another network). Same arguments as MONAI's; ``strict_shape`` is not supported.
    """

    def __call__(self, engine: Engine) -> None:
        prior_max_epochs = engine.state.max_epochs
        load_checkpoint(self.load_path, self.load_dict, map_location=self.map_location, strict=self.strict)
        if prior_max_epochs is not None:
            engine.state.max_epochs = max(prior_max_epochs, engine.state.epoch)
        self.logger.info(f"Restored {sorted(self.load_dict)} from {self.load_path}")


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint_*.pt") -> str | None:
    """Newest (by modification time) file matching ``pattern`` in ``ckpt_dir``, or ``None``."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return None
    files = [f for f in glob.glob(os.path.join(ckpt_dir, pattern)) if os.path.isfile(f)]
    if not files:
        return None
    return max(files, key=lambda f: (os.path.getmtime(f), f))


def _archive_checkpoints(ckpt_dir: str, logger: logging.Logger, pattern: str = "checkpoint_*.pt") -> str | None:
    """Move an earlier run's resume checkpoints into ``ckpt_dir/previous_<time>/`` so that a fresh run neither
    overwrites them (same epoch numbers) nor gets mixed up with them; returns the folder, or ``None``."""
    files = sorted(glob.glob(os.path.join(ckpt_dir, pattern))) if ckpt_dir and os.path.isdir(ckpt_dir) else []
    if not files:
        return None
    dest = os.path.join(ckpt_dir, "previous_" + time.strftime("%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(dest + (f"_{n}" if n > 1 else "")):
        n += 1
    dest += f"_{n}" if n > 1 else ""
    os.makedirs(dest)
    for f in files:
        os.replace(f, os.path.join(dest, os.path.basename(f)))
    logger.info(f"resume is off: moved {len(files)} checkpoint(s) of an earlier run to {dest} (kept, not deleted).")
    return dest


def attach_resume(
    trainer: Engine,
    objects: Mapping,
    ckpt_dir: str,
    resume: bool = True,
    save_interval: int = 1,
    n_saved: int = 1,
) -> Engine:
    """Make a training resumable.

    Every ``save_interval`` epochs (and when training completes) rank 0 writes ``ckpt_dir/checkpoint_<epoch>.pt``
    holding the state of every object in ``objects`` (network, optimiser, LR scheduler, the trainer itself, a
    :class:`BestModelSaver`, ...), keeping the newest ``n_saved``. Writes are atomic, so a run killed mid-write
    leaves the previous checkpoint intact. When the trainer starts and ``resume`` is true, the newest checkpoint in
    ``ckpt_dir`` is loaded into ``objects`` on every rank, so training continues at the saved epoch / iteration;
    without one it starts from scratch. When ``resume`` is false, checkpoints of an earlier run are moved into
    ``ckpt_dir/previous_<time>/`` first, never overwritten. Returns ``trainer``.
    """
    objects = dict(objects)
    resume = as_bool(resume)
    saver = None
    if idist.get_rank() == 0:
        # include_self: the saver's own list of written files is checkpointed too, so after a resume it still
        # rotates (deletes) the files of the interrupted run.
        saver = Checkpoint(
            objects,
            DiskSaver(ckpt_dir, create_dir=True, require_empty=False),
            n_saved=n_saved,
            global_step_transform=lambda engine, _event: engine.state.epoch,
            include_self=True,
        )
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=max(1, int(save_interval))), saver)

    def _resume(engine: Engine) -> None:
        if not resume and saver is not None:
            _archive_checkpoints(ckpt_dir, engine.logger)
        path = latest_checkpoint(ckpt_dir) if resume else None
        if path is None:
            engine.logger.info(
                f"No checkpoint to resume from in {ckpt_dir}; training from scratch."
                if resume
                else "resume is off; training from scratch."
            )
            return
        net = objects.get("model")
        device = next(_unwrap(net).parameters()).device if isinstance(net, torch.nn.Module) else "cpu"
        prior_max_epochs = engine.state.max_epochs
        to_load = dict(objects)
        if saver is not None:
            to_load["checkpointer"] = saver
        try:
            load_checkpoint(path, to_load, map_location=device)
        except ValueError as e:
            raise ValueError(
                f"cannot resume from {path}: {e} Pass --resume False (or remove {ckpt_dir}) to train from scratch."
            ) from None
        if engine.state.epoch >= prior_max_epochs:
            engine.logger.warning(
                f"Checkpoint {path} is already at epoch {engine.state.epoch} >= max_epochs {prior_max_epochs}: "
                "nothing left to train. Raise train#trainer#max_epochs to continue, or pass --resume false to start "
                "over."
            )
        engine.state.max_epochs = prior_max_epochs
        engine.logger.info(
            f"Resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}."
        )

    trainer.add_event_handler(Events.STARTED, _resume)
    return trainer


class BestModelSaver(CheckpointSaver):
    """Save ``network``'s plain state dict to ``save_dir/filename`` whenever the evaluator's key metric improves.

    The file loads with ``torch.load(weights_only=True)`` into ``network_def`` (MONAI bundle and MONAI Label
    convention). ``state_dict()`` / ``load_state_dict()`` carry the best score so far, so include this object in
    :func:`attach_resume` and a resumed run only replaces ``model.pt`` with a better model.
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        filename: str = "model.pt",
        key_metric_name: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            save_dict={"model": network},
            name=name,
            save_key_metric=True,
            key_metric_name=key_metric_name,
            key_metric_n_saved=1,
            key_metric_filename=filename,
        )

    def state_dict(self) -> dict:
        return dict(self._key_metric_checkpoint.state_dict())


def _names_for(ncols: int, class_names) -> list[str]:
    if isinstance(class_names, Mapping):
        names = [str(class_names[k]) for k in sorted(class_names, key=lambda k: int(k))]
    else:
        names = [str(n) for n in (class_names or [])]
    if ncols == len(names):
        return names
    if ncols == len(names) - 1 and names[0].strip().lower() in ("background", "bg", "_background_"):
        return names[1:]  # metric computed without the background channel
    return [f"class{i}" for i in range(ncols)]


def _clean(v: float):
    """JSON-safe value: NaN (class absent) and Inf (e.g. HD95 with an empty prediction) become null."""
    return None if v is None or not math.isfinite(float(v)) else round(float(v), 6)


class ClassMetricsSaver:
    """Write the evaluator's metrics with class names: ``save_dir/metrics.json`` (overall values, per-class means,
    per-image values) and ``save_dir/<metric>_per_class.csv``. Classes absent from every image (NaN) are ``null``.

    Args:
        save_dir: output folder.
        class_names: ``{"0": "background", "1": "spleen", ...}`` (metadata ``channel_def``) or a list.
        metrics: metric names to write (default all).
    """

    def __init__(self, save_dir: str, class_names, metrics: Sequence[str] | None = None) -> None:
        self.save_dir = save_dir
        self.class_names = class_names
        self.metrics = None if metrics is None else list(metrics)
        self._files: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._files.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            img = item.get("image") if isinstance(item, Mapping) else None
            meta = getattr(img, "meta", {}) or {}
            names = meta.get("filename_or_obj", "")
            names = names if isinstance(names, (list, tuple)) else [names]
            self._files.extend(str(n) for n in names)

    def __call__(self, engine: Engine) -> None:
        files = string_list_all_gather(self._files) if idist.get_world_size() > 1 else list(self._files)
        if idist.get_rank() != 0:
            return
        wanted = lambda k: self.metrics is None or k in self.metrics  # noqa: E731
        report: dict = {"metrics": {}, "per_class": {}, "per_image": {}}
        for k, v in engine.state.metrics.items():
            if wanted(k) and (isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)):
                report["metrics"][k] = _clean(float(v))
        os.makedirs(self.save_dir, exist_ok=True)
        for k, v in getattr(engine.state, "metric_details", {}).items():
            if not wanted(k):
                continue
            t = torch.as_tensor(v, dtype=torch.float64).cpu().reshape(len(v), -1)
            names = _names_for(t.shape[1], self.class_names)
            finite = torch.isfinite(t)
            per_class = {n: _clean(float(t[:, i][finite[:, i]].mean())) for i, n in enumerate(names)}
            valid = [x for x in per_class.values() if x is not None]
            per_class["mean"] = _clean(sum(valid) / len(valid)) if valid else None
            report["per_class"][k] = per_class
            rows = []
            for r in range(t.shape[0]):
                row = {"image": files[r] if r < len(files) else str(r)}
                row.update({n: _clean(float(t[r, i])) for i, n in enumerate(names)})
                rows.append(row)
            report["per_image"][k] = rows
            with open(os.path.join(self.save_dir, f"{k}_per_class.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image", *names])
                for row in rows:
                    w.writerow([row["image"], *["" if row[n] is None else row[n] for n in names]])
                w.writerow(["mean", *["" if per_class[n] is None else per_class[n] for n in names]])
        with open(os.path.join(self.save_dir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        engine.logger.info(f"metrics written to {os.path.join(self.save_dir, 'metrics.json')}")


class LossProgressBar(ProgressBar):
    """ignite ``ProgressBar`` that shows the running training loss; attach it like any MONAI handler."""

    def attach(self, engine: Engine, *args, **kwargs) -> None:  # type: ignore[override]
        def _loss(output):
            out = output[0] if isinstance(output, list) and output else output
            loss = out.get("loss") if isinstance(out, Mapping) else None
            return {"loss": float(loss)} if loss is not None else {}

        kwargs.setdefault("output_transform", _loss)
        super().attach(engine, *args, **kwargs)


class GradientClipping:
    """Clip the gradient norm of a MONAI ``SupervisedTrainer``'s network after backward, before the optimiser step
    (the trainer fires ``IterationEvents.BACKWARD_COMPLETED`` in between). Under AMP the gradients are unscaled
    first, so ``max_norm`` applies to the true gradients.

    Args:
        max_norm: maximum total L2 norm (UNETR++ / nnU-Net: 12). ``None`` or ``<= 0`` disables clipping.
    """

    def __init__(self, max_norm: float | None = 12.0) -> None:
        self.max_norm = None if max_norm is None or float(max_norm) <= 0 else float(max_norm)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        if self.max_norm is not None:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


_WRITER_TYPES = ("StatsHandler", "TensorBoardStatsHandler", "TensorBoardImageHandler", "MetricsSaver",
                 "ClassMetricsSaver", "CheckpointSaver", "BestModelSaver", "ProgressBar", "LossProgressBar",
                 "MLFlowHandler", "ClearMLStatsHandler")


def rank_zero_handlers(handlers: Sequence | None) -> list | None:
    """``handlers`` on rank 0; on other ranks only those that do not log or write files (e.g. the
    ``ValidationHandler`` and checkpoint loaders, which every rank needs)."""
    if handlers is None or idist.get_rank() == 0:
        return handlers
    return [h for h in handlers if not any(t.__name__ in _WRITER_TYPES for t in type(h).__mro__)]
