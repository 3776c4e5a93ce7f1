"""Run a 2D network on 3D volumes: the network definition of slice-wise bundles.

A 2D segmentation network (e.g. Perspective+ Unet, trained on 224x224 axial slices) used on CT/MR volumes needs two
things from a bundle: an inferer that feeds it slices (``monai.inferers.SliceInferer``), and a network definition
that also accepts the volume-shaped inputs the MONAI tooling builds from ``network_data_format`` (a 3-element
``spatial_shape`` such as ``[224, 224, 1]``, which tells MONAI Label the model works on 3D images):
``verify_net_in_out`` and exports call the network on a ``(1, C, 224, 224, 1)`` tensor. :class:`SliceWiseNetwork`
gives that: 2D inputs pass through unchanged, 3D inputs are cut into slices along one axis.

Its state dict is the wrapped network's (no ``network.`` prefix), so the same ``models/model.pt`` loads into the bare
network and into the wrapper: weights converted with ``python -m shared_networks.convert``, MONAI Label's
``load_state_dict`` and the bundle's own checkpoints all use the plain key names.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SliceWiseNetwork"]

_PREFIX = "network."


class SliceWiseNetwork(nn.Module):
    """A 2D network that also takes 3D volumes, slice by slice.

    Args:
        network: the network; its ``spatial_dims`` attribute (or ``network_dims``) says whether it is 2D or 3D.
        spatial_dim: volume axis the slices are taken along, counted over the spatial axes (0, 1, 2), as in
            ``monai.inferers.SliceInferer``. 2 = axial slices of a RAS-oriented (x, y, z) CT volume.
        slice_batch_size: slices per forward when a volume is given (``None``: all at once).
        network_dims: spatial dimensions of ``network`` when it has no ``spatial_dims`` attribute.

    Shapes (2D network):
        (B, C, H, W) -> network output, unchanged;
        (B, C, X, Y, Z) -> (B, K, X, Y, Z), each slice along ``spatial_dim`` segmented on its own.
    A 3D network (``spatial_dims=3``) is called as it is, so a bundle can switch to the native 3D variant without
    changing its network definition.
    """

    def __init__(
        self, network: nn.Module, spatial_dim: int = 2, slice_batch_size: int | None = None,
        network_dims: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_dim not in (0, 1, 2):
            raise ValueError(f"spatial_dim must be 0, 1 or 2 (an axis of a 3D volume), got {spatial_dim}.")
        if slice_batch_size is not None and int(slice_batch_size) < 1:
            raise ValueError(f"slice_batch_size must be positive or None, got {slice_batch_size}.")
        dims = network_dims if network_dims is not None else getattr(network, "spatial_dims", None)
        if dims not in (2, 3):
            raise ValueError(
                f"cannot tell whether {type(network).__name__} is 2D or 3D; pass network_dims=2 or 3 (got {dims})."
            )
        self.network = network
        self.spatial_dim = int(spatial_dim)
        self.slice_batch_size = None if slice_batch_size is None else int(slice_batch_size)
        self.network_dims = int(dims)
        # keep the wrapped network's key names in checkpoints (see the module docstring)
        self.register_state_dict_post_hook(_drop_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    @property
    def spatial_dims(self) -> int:
        return self.network_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.network_dims == 3 or x.ndim != 5:
            return self.network(x)  # a 2D slice batch (or wrong input: the network's own check explains it)
        axis = self.spatial_dim + 2
        b, c = x.shape[:2]
        # (B, C, X, Y, Z) -> (B * S, C, in-plane...) with S slices along `axis`
        moved = x.movedim(axis, 1)
        n_slices = moved.shape[1]
        slices = moved.reshape(b * n_slices, c, *moved.shape[3:])
        step = self.slice_batch_size or slices.shape[0]
        out = torch.cat([self.network(slices[i : i + step]) for i in range(0, slices.shape[0], step)])
        out = out.reshape(b, n_slices, *out.shape[1:])  # (B, S, K, in-plane...)
        return out.movedim(1, axis)


def _drop_prefix(module, state_dict, prefix, local_metadata) -> None:
    head = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(head)]:
        state_dict[prefix + key[len(head):]] = state_dict.pop(key)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    head = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(head)]:
        state_dict[head + key[len(prefix):]] = state_dict.pop(key)
