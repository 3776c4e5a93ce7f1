"""Convert an official checkpoint file into a plain state dict for this project's network (a bundle's models/model.pt).

Usage::

    python -m shared_networks.convert ARCH OFFICIAL_FILE OUT_FILE [--layout official|monai] [--overwrite]
                                      [--key value ...]

Every ``--key value`` pair other than ``--layout``/``--overwrite`` is passed to the architecture's
``from_official`` as an official constructor argument; values are read as Python literals when they parse
(``--img_size "[64, 128, 128]"``, ``--do_ds False``, ``--out_channels 14``) and as strings otherwise
(``--variant acdc``). ``--key=value`` works too. The file is read weights-only (nnU-Net checkpoints keep the weights
under "state_dict"). An existing OUT_FILE is never replaced unless ``--overwrite`` is given. The network's constructor
arguments are printed as JSON, ready for the bundle's network definition.

Example::

    python -m shared_networks.convert unetr_pp model_final_checkpoint.model model.pt --layout monai --variant synapse
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import sys
import tempfile

import torch

from . import ARCHS, from_official
from ._common import load_checkpoint_file


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_argv(argv: list[str]) -> tuple[list[str], dict]:
    """Separate the CLI's own arguments from the ``--key value`` official constructor arguments.

    Done by hand rather than with ``parse_known_args``, which would take the value of an unknown option for a
    positional argument when options come before the file names.
    """
    own, extra, i = [], {}, 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help", "--overwrite") or tok.startswith("--layout=") or not tok.startswith("--"):
            own.append(tok)
            i += 1
        elif tok == "--layout":
            own.extend(argv[i : i + 2])
            i += 2
        else:
            key = tok[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                i += 1
            elif i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise SystemExit(f"error: --{key} needs a value (write e.g. --{key} True)")
            else:
                value = argv[i + 1]
                i += 2
            if not key:
                raise SystemExit(f"error: malformed option {tok!r}")
            extra[key.replace("-", "_")] = _literal(value)
    return own, extra


def _jsonable(v):
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def constructor_args(net: torch.nn.Module) -> dict:
    """The network's constructor arguments: ``net.constructor_args`` if it defines one, else every ``__init__``
    parameter that the network keeps as an attribute of the same name (the convention of shared_networks.nets)."""
    explicit = getattr(net, "constructor_args", None)
    if isinstance(explicit, dict):
        return dict(explicit)
    args = {}
    for name in inspect.signature(type(net).__init__).parameters:
        if name != "self" and hasattr(net, name) and not isinstance(getattr(net, name), torch.nn.Module):
            args[name] = getattr(net, name)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared_networks.convert",
        allow_abbrev=False,
        description="Convert an official checkpoint to a plain state dict for shared_networks. Extra --key value "
        "pairs are official constructor arguments (Python literals, e.g. --img_size '[64,128,128]').",
    )
    parser.add_argument("arch", choices=ARCHS, help="architecture")
    parser.add_argument("official_file", help="official checkpoint (.pth / .model / .pt)")
    parser.add_argument("out_file", help="where to write the converted state dict")
    parser.add_argument("--layout", choices=("official", "monai"), default="official",
                        help="official: same input axis order as the official code; monai: MONAI (x, y[, z]) order")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_FILE if it exists")
    own, official_kwargs = _split_argv(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(own)

    if os.path.exists(args.out_file) and not args.overwrite:
        print(f"error: {args.out_file} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    try:
        state_dict = load_checkpoint_file(args.official_file)
        net = from_official(args.arch, state_dict, layout=args.layout, **official_kwargs)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    # Write next to the target and rename, so a failed write never leaves a truncated model file behind.
    out_dir = os.path.dirname(os.path.abspath(args.out_file))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(net.state_dict(), tmp)
        if args.overwrite:
            os.replace(tmp, args.out_file)
        else:
            try:  # a hard link never replaces a file that appeared in the meantime
                os.link(tmp, args.out_file)
            except FileExistsError:
                print(f"error: {args.out_file} exists; pass --overwrite to replace it.", file=sys.stderr)
                return 2
            except OSError:  # no hard links on this file system
                os.replace(tmp, args.out_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

    cls = type(net)
    module = cls.__module__
    if module.startswith("shared_networks.nets."):  # the public path: shared_networks.nets.UNETRPP
        module = "shared_networks.nets"
    target = f"{module}.{cls.__name__}"
    n_params = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.out_file} ({len(net.state_dict())} tensors, {n_params:,} parameters, layout={args.layout})")
    print("network definition for the bundle config:")
    print(json.dumps({"_target_": target, **_jsonable(constructor_args(net))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
