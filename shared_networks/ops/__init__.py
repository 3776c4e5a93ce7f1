"""Low-level operators.

``selective_scan_fn`` has the signature, shapes and semantics of ``mamba_ssm.ops.selective_scan_interface.
selective_scan_fn`` and picks a backend per call (see :mod:`shared_networks.ops.selective_scan`).
"""

from .selective_scan import available_backends, get_backend, selective_scan_fn, selective_scan_ref, use_backend

__all__ = ["selective_scan_fn", "selective_scan_ref", "get_backend", "use_backend", "available_backends"]
