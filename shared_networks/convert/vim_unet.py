"""Import torch-em ViM-UNet checkpoints (``get_vimunet_model`` -> torch-em ``UNETR`` with a Vim encoder) into
:class:`~shared_networks.nets.ViMUNet`, and export back.

Official key layout (prefix of the UNETR model's state dict; torch-em trainer checkpoints keep it under
``"model_state"``)::

    encoder.patch_embed.proj.{weight (d,3,16,16), bias}   encoder.cls_token (1,1,d)   encoder.pos_embed (1,4097,d)
    encoder.rope.freqs_{cos,sin} (4096,d)  [paper time only; persistent buffers]
    encoder.head.{weight (1000,d), bias}   encoder.norm_f.weight
    encoder.layers.{i}.norm.weight   encoder.layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj,
                                                              conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b}
    deconv{1..4}.block.0.{block|conv}.*  (transposed conv | 1x1 conv after interpolation)
    deconv{1..4}.block.1.block.*  (3x3 conv)     deconv{1..4}.block.2.*  (BatchNorm)
    base.block.{1,4}.*   decoder.samplers.{0..2}.{block|conv}.*   decoder.blocks.{0..2}.block.{1,4}.*
    deconv_out.{block|conv}.*   decoder_head.block.{1,4}.*   out_conv.*

Two code states exist (spec vim_unet.md §6). ``code_state="paper"`` (torch-em 33239758, the paper's results):
RoPE on, class token in front, bimamba output summed, transposed-conv upsampling. ``code_state="head"`` (torch-em
since 2024-11): RoPE off, class token in the middle with the official ``x[:, 1:]`` token drop (which discards the
first patch token and keeps the class token), output averaged; upsampling by interpolation + 1x1 conv since 2025-06
(transposed convs before). The code state is read from the checkpoint when not given (RoPE buffers <=> paper time)
and the upsampler from the decoder keys.

Layouts. ``"official"``: the network takes (y, x) arrays like torch-em. ``"monai"``: it takes MONAI (x, y) arrays and
computes the official function of the transposed image, ``net_monai(x.transpose(-1, -2)) ==
net_official(x).transpose(-1, -2)``: every 2-D kernel has its two spatial axes swapped, and the encoder flattens the
(x, y) token grid with y slowest (``flatten_axes=(1, 0)``) so that the token sequence, and with it the Mamba scans
(which are not transpose-invariant), the position embedding and the rotary embedding, stay exactly the official
ones. Token-indexed tensors are therefore copied unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from ..nets.vim_unet import ENCODERS, ViMUNet, rope_tables
from ._common import check_state_dict, strip_prefix

__all__ = ["from_official", "to_official", "official_key_map"]

_SAM_STATS = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def official_key_map(net: ViMUNet) -> dict[str, str]:
    """``{this network's state-dict key: official key}`` for a 2-D :class:`ViMUNet`."""
    if net.spatial_dims != 2:
        raise ValueError("ViM-UNet: official torch-em checkpoints exist only for the 2-D network.")
    up = "block" if net.final_up.mode == "deconv" else "conv"
    rules = [
        (r"side\.(\d)\.up\.conv\.", lambda m: f"deconv{int(m[1]) + 1}.block.0.{up}."),
        (r"side\.(\d)\.conv\.", lambda m: f"deconv{int(m[1]) + 1}.block.1.block."),
        (r"side\.(\d)\.norm\.", lambda m: f"deconv{int(m[1]) + 1}.block.2."),
        (r"base\.conv([12])\.", lambda m: f"base.block.{1 if m[1] == '1' else 4}."),
        (r"up\.(\d)\.conv\.", lambda m: f"decoder.samplers.{m[1]}.{up}."),
        (r"up_blocks\.(\d)\.conv([12])\.", lambda m: f"decoder.blocks.{m[1]}.block.{1 if m[2] == '1' else 4}."),
        (r"final_up\.conv\.", lambda m: f"deconv_out.{up}."),
        (r"head_block\.conv([12])\.", lambda m: f"decoder_head.block.{1 if m[1] == '1' else 4}."),
        (r"(encoder\.|out_conv\.)", lambda m: m[1]),
    ]
    out = {}
    for k in net.state_dict():
        for pat, repl in rules:
            m = re.match(pat, k)
            if m:
                out[k] = repl(m) + k[m.end():]
                break
        else:  # pragma: no cover - guards against a new module without a mapping rule
            raise KeyError(f"ViM-UNet: no official name for {k!r}")
    return out


def _transpose_2d_kernels(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # every 4-D tensor is a 2-D (transposed) conv kernel (out, in, kh, kw) / (in, out, kh, kw)
    return {k: (v.transpose(-1, -2).contiguous() if v.ndim == 4 else v) for k, v in sd.items()}


def _rope_buffers(net: ViMUNet) -> dict[str, torch.Tensor]:
    enc = net.encoder
    if not enc.use_rope:
        return {}
    cos, sin = rope_tables(enc._seq_grid(enc.grid), enc.embed_dim, enc.rope_pt_seq_len)
    return {"encoder.rope.freqs_cos": cos, "encoder.rope.freqs_sin": sin}


def to_official(net: ViMUNet) -> dict[str, torch.Tensor]:
    """The torch-em state dict of a 2-D :class:`ViMUNet` (RoPE buffers included when RoPE is on); a ``monai``-layout
    network's kernels are transposed back."""
    kmap = official_key_map(net)
    sd = {kmap[k]: v.detach().clone() for k, v in net.state_dict().items()}
    if net.encoder.flatten_axes == (1, 0):
        sd = _transpose_2d_kernels(sd)
    sd.update(_rope_buffers(net))
    return sd


def from_official(
    state_dict: Mapping[str, torch.Tensor],
    layout: str = "official",
    out_channels: int | None = None,
    model_type: str | None = None,
    with_cls_token: bool = True,
    img_size: int = 1024,
    encoder: str | None = None,
    backbone: str | None = None,
    use_sam_stats: bool = False,
    use_mae_stats: bool = False,
    resize_input: bool = False,
    final_activation: str | None = "Sigmoid",
    use_skip_connection: bool = False,
    use_conv_transpose: bool | None = None,
    embed_dim: int | None = None,
    decoder=None,
    encoder_checkpoint=None,
    device=None,
    checkpoint=None,
    code_state: str | None = None,
    in_channels: int = 1,
) -> ViMUNet:
    """Build :class:`ViMUNet` with torch-em ViM-UNet weights; it computes the official model's function.

    Args:
        state_dict: the torch-em model state dict, or a torch-em checkpoint dict holding it under "model_state"
            (a "module." prefix is stripped).
        layout: "official" (input (B, C, y, x) as torch-em) or "monai" (input (B, C, x, y); see module docstring).
        out_channels, model_type ("vim_t" | "vim_s"), with_cls_token: ``get_vimunet_model``'s arguments.
            ``out_channels`` is read from the checkpoint when not given, ``model_type`` from the embedding width.
        img_size: the encoder canvas (torch-em: 1024); inputs are zero-padded to it.
        encoder: torch-em UNETR's name for the encoder; accepted as an alias of ``model_type``.
        use_sam_stats, final_activation ("Sigmoid" in get_vimunet_model, or None), use_conv_transpose (read from
            the checkpoint when None): torch-em UNETR arguments. ``backbone``, ``device``, ``checkpoint``,
            ``encoder_checkpoint`` are accepted and have no effect here (the weights come from ``state_dict``).
        resize_input, use_skip_connection, use_mae_stats, embed_dim, decoder: only the values get_vimunet_model uses
            (False / False / False / None / None) are supported.
        code_state: "paper" or "head" (see module docstring); default: "paper" iff the checkpoint has RoPE buffers.
        in_channels: 1 (grayscale, broadcast to the 3-channel patch embedding as torch-em does) or 3.

    Returns:
        the network in eval mode, ``pad_mode="canvas"`` (every input zero-padded to img_size, as torch-em), with the
        unused classifier head loaded.

    Raises:
        ValueError: unsupported arguments, or missing / unexpected / misshapen keys (named), or RoPE tables that
            differ from Vim's.
    """
    if layout not in ("official", "monai"):
        raise ValueError(f"ViM-UNet: layout must be 'official' or 'monai', got {layout!r}.")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"ViM-UNet: state_dict must be a mapping, got {type(state_dict).__name__}.")
    if "model_state" in state_dict and isinstance(state_dict["model_state"], Mapping):
        state_dict = state_dict["model_state"]  # torch-em trainer checkpoint
    sd = strip_prefix(state_dict, "module.")
    for name, value, ok in (
        ("resize_input", resize_input, False),
        ("use_skip_connection", use_skip_connection, False),
        ("use_mae_stats", use_mae_stats, False),
    ):
        if bool(value) != ok:
            raise ValueError(f"ViM-UNet: {name}={value!r} is not supported (get_vimunet_model uses {ok}).")
    if embed_dim is not None or decoder is not None:
        raise ValueError("ViM-UNet: custom embed_dim / decoder modules are not part of get_vimunet_model.")
    if encoder is not None and not isinstance(encoder, str):
        raise ValueError("ViM-UNet: pass the encoder by name ('vim_t' or 'vim_s').")
    if model_type is not None and encoder is not None and model_type != encoder:
        raise ValueError(f"ViM-UNet: model_type={model_type!r} and encoder={encoder!r} disagree.")
    model_type = model_type or encoder
    if model_type is None:
        w = sd.get("encoder.patch_embed.proj.weight")
        widths = {v["embed_dim"]: k for k, v in ENCODERS.items()}
        if w is None or w.shape[0] not in widths:
            raise ValueError(
                "ViM-UNet: cannot infer model_type from the checkpoint (encoder.patch_embed.proj.weight missing or of "
                f"unknown width); pass model_type='vim_t' or 'vim_s'. Known widths: {widths}."
            )
        model_type = widths[w.shape[0]]
    if model_type not in ENCODERS:
        raise ValueError(f"ViM-UNet: model_type={model_type!r} must be one of {sorted(ENCODERS)} (vim_b is not built).")
    if out_channels is None:
        if "out_conv.weight" not in sd:
            raise ValueError("ViM-UNet: the state dict has no out_conv.weight; pass out_channels explicitly.")
        out_channels = int(sd["out_conv.weight"].shape[0])
    has_rope = "encoder.rope.freqs_cos" in sd
    if code_state is None:
        code_state = "paper" if has_rope else "head"
    if code_state not in ("paper", "head"):
        raise ValueError(f"ViM-UNet: code_state must be 'paper' or 'head', got {code_state!r}.")
    if use_conv_transpose is None:
        use_conv_transpose = "deconv_out.conv.weight" not in sd
    if final_activation is not None and str(final_activation).lower() != "sigmoid":
        raise ValueError(f"ViM-UNet: final_activation={final_activation!r}; only 'Sigmoid' (torch-em) or None.")
    if in_channels not in (1, 3):
        raise ValueError(
            f"ViM-UNet: in_channels must be 1 or 3 for the official RGB patch embedding, got {in_channels}."
        )
    paper = code_state == "paper"
    cls = None if not with_cls_token else ("front" if paper else "middle")
    mean, std = _SAM_STATS if use_sam_stats else (None, None)

    net = ViMUNet(
        spatial_dims=2, in_channels=in_channels, out_channels=out_channels, img_size=img_size, encoder=model_type,
        final_activation="sigmoid" if final_activation is not None else None, paper_time_quirks=True,
        pad_mode="canvas", classifier_head=True, rope=paper, cls_token=cls, divide_out=not paper,
        upsample="deconv" if use_conv_transpose else "bilinear", embed_in_channels=3, pixel_mean=mean,
        pixel_std=std, flatten_axes=(1, 0) if layout == "monai" else None,
        drop_index0_quirk=cls == "middle",
    )
    kmap = official_key_map(net)
    mine = net.state_dict()
    expected = {kmap[k]: v for k, v in mine.items()}
    rope = _rope_buffers(net)
    expected.update(rope)
    check_state_dict(expected, sd, what=f"torch-em ViM-UNet checkpoint ({model_type}, code_state={code_state!r})")
    for k, v in rope.items():
        if not torch.allclose(sd[k].float(), v, atol=1e-4):
            raise ValueError(
                f"ViM-UNet: {k} differs from Vim's rotary table for a {net.encoder.grid} grid (pt_seq_len 14); "
                "the checkpoint was built with another RoPE configuration."
            )
    official = {k: sd[k] for k in expected if k not in rope}
    if layout == "monai":
        official = _transpose_2d_kernels(official)
    inv = {v: k for k, v in kmap.items()}
    net.load_state_dict({inv[k]: v for k, v in official.items()}, strict=True)
    return net.eval()
