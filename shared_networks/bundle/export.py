"""Export a bundle's network with trained weights for deployment, with a numerical check against the eager model.

MONAI's ``python -m monai.bundle ckpt_export`` scripts the network with ``torch.jit.script``; networks that cannot be
scripted (attention/Mamba code with dynamic shapes, as in UNETR++) are exported here instead, either as a
``torch.export`` program (``.pt2``, the PyTorch-recommended successor of TorchScript) or as traced TorchScript
(``.ts``, loadable by MONAI Label / MONAI Deploy with ``torch.jit.load``)::

    python -m shared_networks.bundle.export --bundle_root bundles/unetr_pp_btcv_ct_segmentation \\
        --format torch_export --filepath bundles/unetr_pp_btcv_ct_segmentation/models/model.pt2

The example input has the shape of ``network_data_format.inputs.image`` in ``configs/metadata.json`` (batch 1), so
the exported program is for exactly that patch size, as a sliding-window inferer uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch

__all__ = ["FORMATS", "build_network", "example_input", "export_network"]

#: format name -> default file name under <bundle_root>/models
FORMATS = {"torch_export": "model.pt2", "torchscript_trace": "model.ts"}


def _configs(bundle_root: str, config_file: str | Sequence[str] | None) -> list[str]:
    if config_file is None:
        config_file = [os.path.join(bundle_root, "configs", "inference.json")]
    return [config_file] if isinstance(config_file, str) else list(config_file)


def build_network(
    bundle_root: str, config_file: str | Sequence[str] | None = None, net_id: str = "network_def", **override
) -> torch.nn.Module:
    """Instantiate ``net_id`` from the bundle's (inference) config, with ``bundle_root`` and ``override`` applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs(bundle_root, config_file))
    parser.read_meta(os.path.join(bundle_root, "configs", "metadata.json"))
    parser["bundle_root"] = bundle_root
    parser.update(override)
    return parser.get_parsed_content(net_id, instantiate=True)


def example_input(
    bundle_root: str, batch_size: int = 1, seed: int = 0, spatial_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """A random input with the metadata's image channels and spatial shape (or ``spatial_shape``)."""
    with open(os.path.join(bundle_root, "configs", "metadata.json")) as f:
        meta = json.load(f)
    spec = meta["network_data_format"]["inputs"]["image"]
    if spatial_shape is None:
        spatial_shape = spec["spatial_shape"]
    shape = [int(eval(str(s), {"__builtins__": {}}, {"n": 1, "p": 1, "any": 1})) if isinstance(s, str) else int(s)
             for s in spatial_shape]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, int(spec["num_channels"]), *shape, generator=g)


def export_network(
    bundle_root: str,
    fmt: str = "torch_export",
    filepath: str | None = None,
    ckpt_file: str | None = None,
    config_file: str | Sequence[str] | None = None,
    net_id: str = "network_def",
    atol: float = 1e-4,
    spatial_shape: Sequence[int] | None = None,
    **override,
) -> str:
    """Build the network, load ``ckpt_file`` (default ``<bundle_root>/models/model.pt``; ``""`` keeps random
    weights, for tests), export it in ``fmt`` (see :data:`FORMATS`) for inputs of the metadata's patch size (or
    ``spatial_shape``), reload the file and check that it reproduces the eager output within ``atol``. ``override``
    sets config ids (e.g. ``{"network_def#feature_size": 8}``). Returns the written path."""
    from .handlers import load_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}.")
    bundle_root = os.path.abspath(bundle_root)
    filepath = filepath or os.path.join(bundle_root, "models", FORMATS[fmt])
    if os.path.exists(filepath):
        raise FileExistsError(f"{filepath} already exists; remove it or choose another --filepath.")
    net = build_network(bundle_root, config_file, net_id, **override)
    if ckpt_file is None:
        ckpt_file = os.path.join(bundle_root, "models", "model.pt")
    if ckpt_file:
        load_checkpoint(ckpt_file, {"model": net}, map_location="cpu")
    net = net.cpu().eval()
    x = example_input(bundle_root, spatial_shape=spatial_shape)
    with torch.no_grad():
        ref = net(x)
    os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
    if fmt == "torch_export":
        program = torch.export.export(net, (x,))
        torch.export.save(program, filepath)
        reloaded = torch.export.load(filepath).module()
    else:
        with torch.no_grad():
            traced = torch.jit.trace(net, x, check_trace=False)
        torch.jit.save(traced, filepath)
        reloaded = torch.jit.load(filepath)
    with torch.no_grad():
        out = reloaded(x)
    err = float((out - ref).abs().max())
    if not err <= atol:
        os.remove(filepath)
        raise RuntimeError(f"exported {fmt} model differs from the eager network by {err:.3g} (> {atol}); removed.")
    return filepath


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m shared_networks.bundle.export")
    p.add_argument("--bundle_root", required=True)
    p.add_argument("--format", dest="fmt", default="torch_export", choices=sorted(FORMATS))
    p.add_argument("--filepath", default=None, help="output file (default <bundle_root>/models/model.pt2 or .ts)")
    p.add_argument("--ckpt_file", default=None, help="weights (default <bundle_root>/models/model.pt)")
    p.add_argument("--config_file", default=None, help="config with network_def (default configs/inference.json)")
    args = p.parse_args(argv)
    path = export_network(args.bundle_root, args.fmt, args.filepath, args.ckpt_file, args.config_file)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
