"""Shared building blocks and networks for the project's MONAI bundles.

Layout (timm-style split of layers from models):

- :mod:`shared_networks.ops`: the selective scan (``selective_scan_fn``) with CUDA / fast-CPU / PyTorch backends.
- :mod:`shared_networks.blocks`: reusable layers (Mamba mixers, scan orders, attention blocks).
- :mod:`shared_networks.nets`: the five networks.
- :mod:`shared_networks.convert`: import of official checkpoints (``from_official``).
- :mod:`shared_networks.bundle`: transforms and helpers shared by the bundles' configs.
"""

__version__ = "0.1.0"
