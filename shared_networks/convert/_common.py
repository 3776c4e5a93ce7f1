"""Helpers shared by every architecture's converter: safe file loading and strict state-dict checks."""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping

import numpy as np
import torch


def _numpy_scalar_globals() -> list:
    """What unpickling NumPy scalars needs (nnU-Net v2 stores e.g. ``_best_ema`` as ``np.float64``): the scalar
    constructor and the dtypes. Arrays stay refused (object arrays can carry arbitrary pickles)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    names = [core.multiarray.scalar, np.dtype]
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_):
        names.append(type(np.dtype(t)))
    return names


def load_checkpoint_file(path: str | os.PathLike, key_candidates=("state_dict", "model", "model_state", "network_weights", "net")):
    """Read a checkpoint without executing pickled code and return its state dict.

    Official files are often nnU-Net/Lightning checkpoints: dicts holding the weights under ``state_dict`` (nnU-Net),
    ``model`` or ``network_weights``, next to optimiser state and plain Python values. ``weights_only=True`` refuses
    arbitrary classes; the few harmless containers and NumPy scalars such files use are allow-listed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    safe = [collections.OrderedDict, collections.defaultdict, dict, list, tuple, set, *_numpy_scalar_globals()]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"could not read {path} as a weights-only PyTorch checkpoint ({type(e).__name__}: {e}). "
            "Files that need arbitrary pickled classes are refused on purpose."
        ) from e
    if isinstance(obj, Mapping):
        for k in key_candidates:
            if k in obj and isinstance(obj[k], Mapping):
                return dict(obj[k])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(f"{path} holds no state dict (looked for a tensor mapping or keys {key_candidates}).")


def strip_prefix(state_dict: Mapping, prefix: str = "module.") -> dict:
    """Drop a DataParallel/DDP prefix when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def check_state_dict(expected: Mapping, given: Mapping, what: str = "official checkpoint") -> None:
    """Refuse a state dict whose keys or shapes differ from ``expected``, naming the offending keys."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    bad = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
        for k in expected
        if k in given and tuple(expected[k].shape) != tuple(given[k].shape)
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
        if bad:
            parts.append("misshapen keys: " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
        raise ValueError(f"the {what} does not match the requested configuration: " + " | ".join(parts))
