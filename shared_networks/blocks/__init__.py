"""Reusable layers. Names are resolved lazily from their modules:

- ``mamba``: ``Mamba`` (state-spaces Mamba-1 block), ``BiMambaV2`` (Vim bidirectional "v2" mixer),
  ``BiMambaPair`` (LKM-UNet bidirectional layer), ``SS2D`` / ``VSSBlock`` (VMamba four-direction scan).
- ``scan_orders``: flatten feature maps to token sequences and back (raster, reversed, transposed, windows).
- ``epa``: ``EPA`` (efficient paired attention) and ``EPABlock`` (UNETR++ transformer block).
- ``nonlocal_attention``: ``RandomFeatureAttention`` (FAVOR+ positive random features, linear in tokens).
- ``perspective``: ``BiPathResBlock`` (BPRB), ``ENLTransformerBlock`` (ENLTB), ``CrossScaleIntegrator`` (SCSI).
"""

import importlib

_LAZY = {
    "Mamba": "mamba",
    "BiMambaV2": "mamba",
    "BiMambaPair": "mamba",
    "SS2D": "mamba",
    "VSSBlock": "mamba",
    "EPA": "epa",
    "EPABlock": "epa",
    "RandomFeatureAttention": "nonlocal_attention",
    "BiPathResBlock": "perspective",
    "ENLTransformerBlock": "perspective",
    "CrossScaleIntegrator": "perspective",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
