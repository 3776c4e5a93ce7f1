"""The networks. Classes are imported lazily so that importing one network never pulls in the others."""

import importlib

_LAZY = {
    "UNETRPP": "unetr_pp",
    "PerspectiveUNet": "perspective_unet",
    "LKMUNet": "lkm_unet",
    "ViMUNet": "vim_unet",
    "PolypMamba": "polyp_mamba",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
