"""Import of official checkpoints.

``from_official(arch, state_dict, layout="official", **official_kwargs)`` returns this project's network with the
official weights loaded. ``arch`` names a module ``shared_networks.convert.<arch>`` that defines
``from_official(state_dict, layout, **official_kwargs)``; ``official_kwargs`` are the official constructor's
arguments. ``layout="official"`` keeps the official axis order of inputs; ``layout="monai"`` reorders the weights
for MONAI's (x, y[, z]) order where the two differ.

The command line does the same for files: ``python -m shared_networks.convert ARCH official.pth model.pt [--k v]``.
"""

from __future__ import annotations

import importlib

from ._common import check_state_dict, load_checkpoint_file, strip_prefix

ARCHS = ("unetr_pp", "perspective_unet", "lkm_unet", "vim_unet")

__all__ = ["from_official", "load_checkpoint_file", "check_state_dict", "strip_prefix", "ARCHS"]


def from_official(arch: str, state_dict, layout: str = "official", **official_kwargs):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; official checkpoints can be imported for {ARCHS}.")
    if layout not in ("official", "monai"):
        raise ValueError(f"layout must be 'official' or 'monai', got {layout!r}.")
    mod = importlib.import_module(f"{__name__}.{arch}")
    return mod.from_official(state_dict, layout=layout, **official_kwargs)
