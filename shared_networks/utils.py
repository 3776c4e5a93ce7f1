"""Input validation shared by every network: clear errors instead of stack traces from deep inside a layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint


def is_capturing() -> bool:
    """True while TorchScript, ``torch.export`` or ``torch.compile`` records the forward pass."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (compiler.is_compiling() or getattr(compiler, "is_exporting", bool)()))


def check_input(
    x: torch.Tensor,
    *,
    name: str,
    in_channels: int,
    spatial_dims: int,
    divisible_by: Sequence[int] | int | None = None,
    exact_size: Sequence[int] | None = None,
    check_finite: bool = True,
) -> None:
    """Raise ``ValueError`` with an actionable message if ``x`` cannot be fed to network ``name``.

    Args:
        x: input of shape (B, C, *spatial).
        name: network name used in the message.
        in_channels: expected C.
        spatial_dims: expected number of spatial axes.
        divisible_by: each spatial size must be a multiple of this (int or per axis).
        exact_size: the spatial size must equal this (networks tied to one ROI).
        check_finite: refuse NaN/Inf (skipped while a graph is captured: tracing, scripting, ``torch.export``,
            ``torch.compile``, where a data-dependent check cannot be recorded).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name}: expected a {spatial_dims + 2}-D input (batch, channels, {spatial_dims} spatial axes), "
            f"got shape {tuple(x.shape)}."
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{name}: expected {in_channels} input channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})."
        )
    size = tuple(int(s) for s in x.shape[2:])
    if exact_size is not None and size != tuple(int(s) for s in exact_size):
        raise ValueError(
            f"{name}: this network is built for spatial size {tuple(exact_size)} and cannot take {size}; "
            "use a sliding-window inferer with roi_size equal to the built size (pad smaller images)."
        )
    if divisible_by is not None:
        div = (divisible_by,) * spatial_dims if isinstance(divisible_by, int) else tuple(divisible_by)
        if any(s % d for s, d in zip(size, div)):
            raise ValueError(
                f"{name}: spatial size {size} must be divisible by {div} per axis; pad the input "
                "(e.g. monai.transforms.DivisiblePad) or pick another ROI."
            )
    if check_finite and not is_capturing():
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: the input contains NaN or Inf values; clean the image before inference.")


def maybe_checkpoint(module: torch.nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``module(x)``, recomputed in the backward pass instead of storing its activations when ``enabled`` and
    gradients are on (``torch.utils.checkpoint``, non-reentrant): trades about one extra forward for memory."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    return module(x)
