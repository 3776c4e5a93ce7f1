"""Scan orders: flatten a 2D/3D feature map into token sequences and restore it exactly.

Every function takes a map ``x`` of shape ``(B, C, *spatial)`` (or ``(B, *spatial, C)`` with
``channels_last=True``) and returns ``(seq, restore)``:

- ``seq``: tokens ``(B', L, C)`` (``token_layout="BLC"``, the layout of Mamba layers) or ``(B', C, L)``
  (``token_layout="BCL"``, the layout of the selective-scan kernels). ``B'`` is ``B`` times the number of
  sequences per image (windows / strided groups), so per-window scans run as one batched call.
- ``restore(seq2)``: the exact inverse (pure permutes/reshapes/flips, so ``torch.equal`` round trips). ``seq2``
  must have ``seq``'s batch and length; its channel count may differ (e.g. after a projection), and the map is
  returned in the input layout with that channel count.

Orders (``axes`` lists the spatial axes from slowest- to fastest-varying; ``(0, 1)`` in 2D is row-major,
``(1, 0)`` column-major; ``reverse=True`` flips every sequence)::

    seq, restore = raster(x)                        # (B, H*W, C), index h*W + w
    seq, restore = reversed_raster(x)               # raster, last token first
    seq, restore = transposed(x)                    # spatial axes reversed: 2D index w*H + h
    seq, restore = flatten(x, axes=(2, 0, 1))       # any permutation (3D: W slowest, then D, then H)
    seq, restore = windows(x, window=(8, 8, 8))     # contiguous windows -> (B*nW, 512, C)
    seq, restore = windows(x, num_windows=(5, 7, 6))  # window size = map size / count per axis
    seq, restore = strided(x, stride=(5, 7, 6))     # LKM-UNet PiM grouping -> (B*210, Z*H*W/210, C)
    x = restore(seq)

A map that is not divisible by the window/stride raises ``ValueError`` (the network decides whether to pad);
``on_indivisible="global"`` instead returns one raster sequence over the whole map per image, which is what the
official LKM-UNet layers silently do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["flatten", "raster", "reversed_raster", "transposed", "windows", "strided", "Restore"]

Restore = Callable[[torch.Tensor], torch.Tensor]

_LAYOUTS = ("BLC", "BCL")
_INDIVISIBLE = ("raise", "global")


def _spatial_shape(x: torch.Tensor, channels_last: bool, fn: str) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"scan_orders.{fn}: expected a torch.Tensor, got {type(x).__name__}.")
    if x.dim() < 3:
        layout = "(B, *spatial, C)" if channels_last else "(B, C, *spatial)"
        raise ValueError(f"scan_orders.{fn}: expected a map {layout} with >= 1 spatial axis, got {tuple(x.shape)}.")
    return tuple(x.shape[1:-1]) if channels_last else tuple(x.shape[2:])


def _check_axes(axes: Sequence[int] | None, n: int, fn: str) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(n))
    axes = tuple(int(a) for a in axes)
    if sorted(axes) != list(range(n)):
        raise ValueError(
            f"scan_orders.{fn}: axes={axes} must be a permutation of the {n} spatial axes {tuple(range(n))}."
        )
    return axes


def _per_axis(value: int | Sequence[int], n: int, name: str, fn: str) -> tuple[int, ...]:
    vals = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(vals) != n or any(v < 1 for v in vals):
        raise ValueError(f"scan_orders.{fn}: {name}={value!r} must be a positive int or {n} positive ints.")
    return vals


def _check_options(token_layout: str, on_indivisible: str, fn: str) -> None:
    if token_layout not in _LAYOUTS:
        raise ValueError(f"scan_orders.{fn}: token_layout={token_layout!r} must be one of {_LAYOUTS}.")
    if on_indivisible not in _INDIVISIBLE:
        raise ValueError(f"scan_orders.{fn}: on_indivisible={on_indivisible!r} must be one of {_INDIVISIBLE}.")


def _group(
    x: torch.Tensor,
    *,
    inner: tuple[int, ...],
    batch: str,
    token_axes: tuple[int, ...],
    reverse: bool,
    channels_last: bool,
    token_layout: str,
    fn: str,
) -> tuple[torch.Tensor, Restore]:
    """Split spatial axis i into (outer_i = S_i / inner_i, inner_i) and send one group to the batch axis.

    ``batch="outer"``: outer indices -> batch (row-major), inner -> tokens (ordered by ``token_axes``): windows.
    ``batch="inner"``: inner indices -> batch (row-major), outer -> tokens (ordered by ``token_axes``): strided.
    ``inner = (1, ..., 1)`` with ``batch="outer"`` degenerates to a plain flatten.
    """
    spatial = _spatial_shape(x, channels_last, fn)
    n = len(spatial)
    b = x.shape[0]
    c = x.shape[-1] if channels_last else x.shape[1]
    outer = tuple(s // p for s, p in zip(spatial, inner))
    split = [b]
    if not channels_last:
        split.append(c)
    for o, p in zip(outer, inner):
        split += [o, p]
    if channels_last:
        split.append(c)
    off = 1 if channels_last else 2  # position of the first spatial sub-axis in ``split``
    c_dim = len(split) - 1 if channels_last else 1
    outer_dims = [off + 2 * i for i in range(n)]
    inner_dims = [off + 2 * i + 1 for i in range(n)]
    batch_dims, tok_dims = (outer_dims, inner_dims) if batch == "outer" else (inner_dims, outer_dims)
    tok_dims = [tok_dims[a] for a in token_axes]
    if token_layout == "BLC":
        perm = [0, *batch_dims, *tok_dims, c_dim]
    else:
        perm = [0, *batch_dims, c_dim, *tok_dims]
    n_seq = math.prod(split[d] for d in batch_dims)
    length = math.prod(split[d] for d in tok_dims)
    tok_axis = 1 if token_layout == "BLC" else 2
    permuted = x.reshape(split).permute(perm)
    seq = permuted.reshape((b * n_seq, length, c) if token_layout == "BLC" else (b * n_seq, c, length))
    if reverse:
        seq = seq.flip(tok_axis)
    permuted_shape = list(permuted.shape)
    c_pos = perm.index(c_dim)
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    out_shape = (b, *spatial, c) if channels_last else (b, c, *spatial)
    ch_out = len(out_shape) - 1 if channels_last else 1
    ch_seq = 2 if token_layout == "BLC" else 1

    def restore(s: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(s, torch.Tensor)
            or s.dim() != 3
            or s.shape[0] != b * n_seq
            or s.shape[tok_axis] != length
        ):
            want = f"({b * n_seq}, {length}, C)" if token_layout == "BLC" else f"({b * n_seq}, C, {length})"
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"scan_orders.{fn}: restore expects tokens of shape {want}, got {got}.")
        c2 = s.shape[ch_seq]
        if reverse:
            s = s.flip(tok_axis)
        shape = list(permuted_shape)
        shape[c_pos] = c2
        full = list(out_shape)
        full[ch_out] = c2
        return s.reshape(shape).permute(inv).reshape(full)

    return seq, restore


def flatten(
    x: torch.Tensor,
    *,
    axes: Sequence[int] | None = None,
    reverse: bool = False,
    channels_last: bool = False,
    token_layout: str = "BLC",
) -> tuple[torch.Tensor, Restore]:
    """One sequence per image over all positions, spatial axes visited in the order ``axes`` (slowest first).

    Args:
        x: ``(B, C, *spatial)`` or, with ``channels_last=True``, ``(B, *spatial, C)``.
        axes: permutation of ``range(len(spatial))``; ``None`` = raster (row-major, last axis fastest).
        reverse: flip the sequence (last position first).
        channels_last: layout of ``x`` (and of what ``restore`` returns).
        token_layout: ``"BLC"`` -> ``(B, L, C)``; ``"BCL"`` -> ``(B, C, L)``.

    Returns:
        ``(seq, restore)`` with ``L = prod(spatial)``.
    """
    _check_options(token_layout, "raise", "flatten")
    n = len(_spatial_shape(x, channels_last, "flatten"))
    return _flat(x, _check_axes(axes, n, "flatten"), reverse, channels_last, token_layout)


def _flat(x, axes, reverse, channels_last, token_layout, fn="flatten"):
    # A plain flatten is the window grouping with the whole map as the only window (outer sizes all 1).
    spatial = _spatial_shape(x, channels_last, fn)
    return _group(
        x, inner=spatial, batch="outer", token_axes=axes, reverse=reverse,
        channels_last=channels_last, token_layout=token_layout, fn=fn,
    )


def raster(x: torch.Tensor, *, channels_last: bool = False, token_layout: str = "BLC") -> tuple[torch.Tensor, Restore]:
    """Row-major sequence (last spatial axis fastest): 2D index ``h*W + w``, 3D ``(z*H + h)*W + w``."""
    return flatten(x, channels_last=channels_last, token_layout=token_layout)


def reversed_raster(
    x: torch.Tensor, *, channels_last: bool = False, token_layout: str = "BLC"
) -> tuple[torch.Tensor, Restore]:
    """The raster sequence read backwards (token ``t`` is raster token ``L-1-t``)."""
    return flatten(x, reverse=True, channels_last=channels_last, token_layout=token_layout)


def transposed(
    x: torch.Tensor, *, reverse: bool = False, channels_last: bool = False, token_layout: str = "BLC"
) -> tuple[torch.Tensor, Restore]:
    """Spatial axes in reverse order (first axis fastest): 2D column-major ``w*H + h``; 3D ``(w*H + h)*D + z``."""
    n = len(_spatial_shape(x, channels_last, "transposed"))
    return flatten(
        x, axes=tuple(range(n))[::-1], reverse=reverse, channels_last=channels_last, token_layout=token_layout
    )


def _divisible(spatial, div, name, fn, on_indivisible):
    bad = [i for i, (s, p) in enumerate(zip(spatial, div)) if s % p]
    if not bad:
        return True
    if on_indivisible == "global":
        return False
    i = bad[0]
    raise ValueError(
        f"scan_orders.{fn}: spatial size {tuple(spatial)} is not divisible by {name} {tuple(div)} "
        f"(axis {i}: {spatial[i]} % {div[i]} = {spatial[i] % div[i]}). Pad the map to a multiple of the {name} "
        "(e.g. torch.nn.functional.pad or monai.transforms.DivisiblePad), change the " + name
        + ", or pass on_indivisible='global' for one sequence over the whole map."
    )


def windows(
    x: torch.Tensor,
    window: int | Sequence[int] | None = None,
    *,
    num_windows: int | Sequence[int] | None = None,
    axes: Sequence[int] | None = None,
    reverse: bool = False,
    on_indivisible: str = "raise",
    channels_last: bool = False,
    token_layout: str = "BLC",
) -> tuple[torch.Tensor, Restore]:
    """Non-overlapping contiguous windows; each window is one sequence, windows go to the batch axis.

    Give exactly one of ``window`` (window size per axis) or ``num_windows`` (windows per axis; window size =
    size / count, the "(P, H/P)" reading of LKM-UNet's PiM proposed in its issue #5).

    Args:
        x: ``(B, C, *spatial)`` or ``(B, *spatial, C)`` with ``channels_last=True``.
        window: int or per-axis sizes ``w``.
        num_windows: int or per-axis counts ``n``.
        axes: token order inside a window (slowest first); default raster. Windows are batched row-major.
        reverse: flip every window's sequence.
        on_indivisible: ``"raise"`` (default) or ``"global"`` (one raster sequence over the whole map).
        channels_last, token_layout: see :func:`flatten`.

    Returns:
        ``(seq, restore)``; ``seq`` is ``(B * nW, prod(w), C)``, batch index ``b * nW + window_index`` with the
        window index row-major over the window grid.
    """
    fn = "windows"
    _check_options(token_layout, on_indivisible, fn)
    spatial = _spatial_shape(x, channels_last, fn)
    n = len(spatial)
    axes = _check_axes(axes, n, fn)
    if (window is None) == (num_windows is None):
        raise ValueError("scan_orders.windows: give exactly one of window= or num_windows=.")
    if window is not None:
        win = _per_axis(window, n, "window", fn)
        if not _divisible(spatial, win, "window", fn, on_indivisible):
            return _flat(x, tuple(range(n)), reverse, channels_last, token_layout, fn)
    else:
        cnt = _per_axis(num_windows, n, "num_windows", fn)
        if not _divisible(spatial, cnt, "num_windows", fn, on_indivisible):
            return _flat(x, tuple(range(n)), reverse, channels_last, token_layout, fn)
        win = tuple(s // k for s, k in zip(spatial, cnt))
    return _group(
        x, inner=win, batch="outer", token_axes=axes, reverse=reverse,
        channels_last=channels_last, token_layout=token_layout, fn=fn,
    )


def strided(
    x: torch.Tensor,
    stride: int | Sequence[int],
    *,
    reverse: bool = False,
    on_indivisible: str = "raise",
    channels_last: bool = False,
    token_layout: str = "BLC",
) -> tuple[torch.Tensor, Restore]:
    """Dilated ("grid") grouping of the official LKM-UNet PiM layer: pixels spaced ``stride`` apart form a sequence.

    With stride ``P`` per axis there are ``prod(P)`` sequences per image, one per offset ``o`` in ``[0, P)^d``,
    each of length ``prod(S / P)``: sequence ``o`` holds the pixels ``o + P * j`` for the block indices ``j`` in
    row-major order (first axis slowest). Batch index = ``b * prod(P) + offset_index`` (offsets row-major). This
    is exactly ``x.reshape(B, C, S1/P1, P1, S2/P2, P2, ...)`` with the ``P`` axes moved to the batch axis.

    Args:
        x: ``(B, C, *spatial)`` or ``(B, *spatial, C)`` with ``channels_last=True``.
        stride: int or per-axis ``P`` (LKM-UNet 3D: ``(5p, 7p, 6p)``; 2D: ``5p``).
        reverse: flip every sequence.
        on_indivisible: ``"raise"`` (default) or ``"global"``: one raster sequence over the whole map, the
            official layer's silent fallback when a size is not a multiple of ``P``.
        channels_last, token_layout: see :func:`flatten`.

    Returns:
        ``(seq, restore)``; ``seq`` is ``(B * prod(P), prod(S / P), C)``.
    """
    fn = "strided"
    _check_options(token_layout, on_indivisible, fn)
    spatial = _spatial_shape(x, channels_last, fn)
    n = len(spatial)
    p = _per_axis(stride, n, "stride", fn)
    if not _divisible(spatial, p, "stride", fn, on_indivisible):
        return _flat(x, tuple(range(n)), reverse, channels_last, token_layout, fn)
    return _group(
        x, inner=p, batch="inner", token_axes=tuple(range(n)), reverse=reverse,
        channels_last=channels_last, token_layout=token_layout, fn=fn,
    )
