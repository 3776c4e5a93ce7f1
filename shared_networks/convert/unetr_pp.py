"""Import official UNETR++ checkpoints (Amshaker/unetr_plus_plus @ dcba1c6) into :class:`~shared_networks.nets.UNETRPP`.

The network uses the official module names, so the ``official`` layout is a plain strict ``load_state_dict``.

The ``monai`` layout builds the network for MONAI's (x, y, z) arrays (``axis_order="xyz"``, ROI and anisotropic
kernels mirrored). Only the convolution kernels change: every 3D (transposed) conv kernel has its three spatial
axes reversed. Token-indexed tensors (positional embeddings, E/F projections) are copied unchanged, because the
xyz network enumerates its tokens in the same (z, y, x)-raster order as the official one (``EPABlock``'s
``reverse_token_order``). That is not a shortcut: the official spatial-branch output layout (repo issue #62) reads a
(B, d, h, N) buffer as (B, N, C), mixing token and channel indices, so permuting pos-embeds and E/F to an
(x, y, z)-raster token order would *not* reproduce the official function. With the shared token order it does,
exactly: ``net_monai(x.permute(0, 1, 4, 3, 2)) == net_official(x).permute(0, 1, 4, 3, 2)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..nets.unetr_pp import VARIANTS, UNETRPP
from ._common import check_state_dict, strip_prefix

__all__ = ["from_official", "to_monai_layout", "OFFICIAL_DEFAULTS"]

#: What each official trainer builds (in_channels, out_channels; ROI in (z, y, x) is VARIANTS[v]["img_size"]).
OFFICIAL_DEFAULTS = {
    "synapse": dict(in_channels=1, out_channels=14),
    "acdc": dict(in_channels=1, out_channels=4),
    "tumor": dict(in_channels=4, out_channels=4),
    "lung": dict(in_channels=1, out_channels=2),
}


def to_monai_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reorder an official-layout (z, y, x) UNETR++ state dict for the (x, y, z) network: reverse the spatial axes
    of every 3D conv / transposed-conv kernel ((out, in, kz, ky, kx) -> (out, in, kx, ky, kz)); nothing else moves."""
    return {
        k: (v.permute(0, 1, 4, 3, 2).contiguous() if k.endswith(".weight") and v.ndim == 5 else v)
        for k, v in state_dict.items()
    }


def from_official(
    state_dict: Mapping[str, torch.Tensor],
    layout: str = "official",
    variant: str = "synapse",
    in_channels: int | None = None,
    out_channels: int | None = None,
    img_size: Sequence[int] | None = None,
    feature_size: int = 16,
    num_heads: int = 4,
    depths: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    do_ds: bool | None = None,
    hidden_size: int | None = None,
    norm_name: str | None = None,
    pos_embed: str | None = None,
    dropout_rate: float | None = None,
    conv_op=None,
) -> UNETRPP:
    """Build :class:`UNETRPP` with official weights.

    Args:
        state_dict: the official model's state dict (a "module." prefix is stripped).
        layout: "official" — the network takes (z, y, x) inputs exactly like the official model;
            "monai" — it takes MONAI (x, y, z) inputs and computes the same function on the transposed volume.
        variant: which official code variant produced the checkpoint: "synapse", "acdc", "tumor", "lung".
        in_channels, out_channels, img_size, feature_size, num_heads, depths, dims, do_ds: the official constructor's
            arguments, ``img_size`` in the official (z, y, x) order. Defaults: the official trainer's values for the
            variant; ``in_channels``/``out_channels``/``do_ds`` are read from the checkpoint when not given.
        hidden_size, pos_embed, dropout_rate, conv_op: accepted for signature compatibility; the official code does
            not use them (``hidden_size`` must equal dims[3] if given).
        norm_name: only the official default "instance" exists in released checkpoints.

    Returns:
        the network in eval mode. Its constructor arguments are its attributes of the same names.

    Raises:
        ValueError: the state dict has missing, unexpected or misshapen keys for the requested configuration (the
            message names them), or an argument is invalid.
    """
    if layout not in ("official", "monai"):
        raise ValueError(f"layout must be 'official' or 'monai', got {layout!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}.")
    if norm_name not in (None, "instance"):
        raise ValueError(f"only norm_name='instance' (the official default) is supported, got {norm_name!r}.")
    sd = strip_prefix(dict(state_dict))
    # Unspecified values: what the checkpoint says, else the official trainer's.
    if in_channels is None:
        w = sd.get("encoder1.conv1.conv.weight")
        in_channels = int(w.shape[1]) if w is not None else OFFICIAL_DEFAULTS[variant]["in_channels"]
    if out_channels is None:
        w = sd.get("out1.conv.conv.weight")
        out_channels = int(w.shape[0]) if w is not None else OFFICIAL_DEFAULTS[variant]["out_channels"]
    if do_ds is None:
        do_ds = "out2.conv.conv.weight" in sd
    img_size = tuple(VARIANTS[variant]["img_size"] if img_size is None else (int(s) for s in img_size))
    kwargs = dict(
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        variant=variant,
        feature_size=int(feature_size),
        hidden_size=hidden_size,
        num_heads=int(num_heads),
        depths=tuple(depths) if depths is not None else (3, 3, 3, 3),
        dims=None if dims is None else tuple(dims),
        deep_supervision=bool(do_ds),
    )
    # Built on the meta device: no time goes into random initialisation of weights that are replaced anyway.
    with torch.device("meta"):
        if layout == "official":
            net = UNETRPP(img_size=img_size, axis_order="zyx", **kwargs)
        else:
            net = UNETRPP(img_size=img_size[::-1], axis_order="xyz", **kwargs)
    # Validate the checkpoint against the official-layout shapes (reversing the kernel axes is its own inverse).
    reference = net.state_dict() if layout == "official" else to_monai_layout(net.state_dict())
    check_state_dict(reference, sd, what=f"official UNETR++ ({variant}) checkpoint")
    if VARIANTS[variant]["ef_mode"] == "shared":
        # One module under two names in the official model: E.* and F.* must be the same tensor.
        for k in sd:
            if ".epa_block.E." in k and not torch.equal(sd[k], sd[k.replace(".epa_block.E.", ".epa_block.F.")]):
                raise ValueError(f"{k} and its F counterpart differ, but the {variant} variant shares E and F.")
    if layout == "monai":
        sd = to_monai_layout(sd)
    # Copies in the network's dtype, so the network never aliases the caller's tensors.
    sd = {k: v.detach().to(device="cpu", dtype=reference[k].dtype, copy=True) for k, v in sd.items()}
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval()
