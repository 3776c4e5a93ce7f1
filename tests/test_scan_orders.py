"""Scan orders: exact round trips, index semantics, LKM-UNet's strided grouping, errors."""

import itertools

import pytest
import torch

from shared_networks.blocks import scan_orders as so

SHAPES_2D = [(1, 1, 1, 1), (2, 3, 4, 6), (1, 5, 8, 8), (3, 2, 6, 10)]
SHAPES_3D = [(1, 1, 1, 1, 1), (2, 3, 4, 6, 2), (1, 4, 6, 4, 8), (2, 2, 10, 14, 12)]


def _map(shape, channels_last=False):
    x = torch.randn(shape)
    return x.movedim(1, -1).contiguous() if channels_last else x


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _orders(x, channels_last):
    """Every (name, kwargs) order applicable to x's spatial shape."""
    spatial = x.shape[1:-1] if channels_last else x.shape[2:]
    n = len(spatial)
    yield so.raster, {}
    yield so.reversed_raster, {}
    yield so.transposed, {}
    yield so.transposed, {"reverse": True}
    for axes in itertools.permutations(range(n)):
        yield so.flatten, {"axes": axes}
        yield so.flatten, {"axes": axes, "reverse": True}
    # windows / strided: the largest proper divisor, 1 and the full size per axis
    choices = [sorted({1, s, _divisors(s)[-2] if len(_divisors(s)) > 1 else 1}) for s in spatial]
    for win in itertools.islice(itertools.product(*choices), 8):
        yield so.windows, {"window": win}
        yield so.windows, {"window": win, "axes": tuple(range(n))[::-1], "reverse": True}
        yield so.windows, {"num_windows": win}
        yield so.strided, {"stride": win}
        yield so.strided, {"stride": win, "reverse": True}


@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("token_layout", ["BLC", "BCL"])
def test_round_trip_exact(shape, channels_last, token_layout):
    x = _map(shape, channels_last)
    count = 0
    for fn, kw in _orders(x, channels_last):
        seq, restore = fn(x, channels_last=channels_last, token_layout=token_layout, **kw)
        assert seq.dim() == 3
        n_tokens = seq.shape[1] if token_layout == "BLC" else seq.shape[2]
        assert seq.shape[0] * n_tokens == x.numel() // shape[1], (fn.__name__, kw)
        assert torch.equal(restore(seq), x), (fn.__name__, kw)
        count += 1
    assert count >= 7


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (2, 3, 4, 6, 2)])
def test_restore_accepts_other_channel_counts(shape):
    x = _map(shape)
    for fn, kw in [(so.raster, {}), (so.windows, {"window": 2}), (so.strided, {"stride": 2})]:
        seq, restore = fn(x, **kw)
        # a per-token map (here: sum over channels) restores into a 1-channel map of the same positions
        out = restore(seq.sum(-1, keepdim=True))
        assert torch.equal(out, x.sum(1, keepdim=True)), fn.__name__
        seq_cl, restore_cl = fn(x.movedim(1, -1), channels_last=True, **kw)
        out_cl = restore_cl(torch.cat([seq_cl, seq_cl], dim=-1))
        assert out_cl.shape == (*x.movedim(1, -1).shape[:-1], 2 * shape[1])


def test_raster_and_transposed_indices_2d():
    b, c, h, w = 2, 3, 4, 5
    x = torch.randn(b, c, h, w)
    seq, _ = so.raster(x)
    rev, _ = so.reversed_raster(x)
    tr, _ = so.transposed(x)
    for hh, ww in itertools.product(range(h), range(w)):
        assert torch.equal(seq[:, hh * w + ww], x[:, :, hh, ww])
        assert torch.equal(tr[:, ww * h + hh], x[:, :, hh, ww])
        assert torch.equal(rev[:, h * w - 1 - (hh * w + ww)], x[:, :, hh, ww])


def test_flatten_axes_indices_3d():
    x = torch.randn(1, 2, 3, 4, 5)
    d, h, w = x.shape[2:]
    seq, _ = so.raster(x)
    tr, _ = so.transposed(x)
    p, _ = so.flatten(x, axes=(2, 0, 1))  # W slowest, then D, then H fastest
    for z, hh, ww in itertools.product(range(d), range(h), range(w)):
        v = x[:, :, z, hh, ww]
        assert torch.equal(seq[:, (z * h + hh) * w + ww], v)
        assert torch.equal(tr[:, (ww * h + hh) * d + z], v)
        assert torch.equal(p[:, (ww * d + z) * h + hh], v)


def test_channels_last_and_token_layout_agree():
    x = torch.randn(2, 3, 4, 6, 2)
    xl = x.movedim(1, -1)
    orders = [(so.raster, {}), (so.transposed, {}), (so.windows, {"window": (2, 3, 1)}), (so.strided, {"stride": 2})]
    for fn, kw in orders:
        a, _ = fn(x, **kw)
        b, _ = fn(xl, channels_last=True, **kw)
        c, _ = fn(x, token_layout="BCL", **kw)
        assert torch.equal(a, b) and torch.equal(a, c.transpose(1, 2)), fn.__name__


def test_windows_contents_and_batch_order():
    b, c, h, w = 2, 3, 6, 8
    wh, ww = 3, 4
    x = torch.randn(b, c, h, w)
    seq, _ = so.windows(x, window=(wh, ww))
    nh, nw = h // wh, w // ww
    assert seq.shape == (b * nh * nw, wh * ww, c)
    for bi, i, j in itertools.product(range(b), range(nh), range(nw)):
        block = x[bi, :, i * wh:(i + 1) * wh, j * ww:(j + 1) * ww].reshape(c, -1).t()
        assert torch.equal(seq[bi * nh * nw + i * nw + j], block)
    # num_windows = counts per axis
    seq2, _ = so.windows(x, num_windows=(nh, nw))
    assert torch.equal(seq, seq2)
    # in-window column-major order
    seq_t, _ = so.windows(x, window=(wh, ww), axes=(1, 0))
    assert torch.equal(seq_t[1], x[0, :, 0:wh, ww:2 * ww].transpose(1, 2).reshape(c, -1).t())


def test_windows_3d_contents():
    x = torch.randn(1, 2, 4, 6, 4)
    seq, _ = so.windows(x, window=(2, 3, 2))
    assert seq.shape == (2 * 2 * 2, 12, 2)
    # window (1, 1, 0) -> index (1*2 + 1)*2 + 0 = 6
    assert torch.equal(seq[6], x[0, :, 2:4, 3:6, 0:2].reshape(2, -1).t())


def _lkm_grid_reference(x, p):
    """The official LKM-UNet PiM partition as described in lkm_unet.md §2 (reshape / permute / view)."""
    b, c = x.shape[:2]
    if x.dim() == 5:
        z, h, w = x.shape[2:]
        p1, p2, p3 = p
        t = x.reshape(b, c, z // p1, p1, h // p2, p2, w // p3, p3).permute(0, 3, 5, 7, 1, 2, 4, 6)
        t = t.contiguous().view(b * p1 * p2 * p3, c, z // p1, h // p2, w // p3)
    else:
        h, w = x.shape[2:]
        t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4)
        t = t.contiguous().view(b * p * p, c, h // p, w // p)
    return t.reshape(t.shape[0], c, -1).transpose(-1, -2)


def _lkm_grid_unpartition(tokens, b, p, spatial):
    c = tokens.shape[-1]
    if len(spatial) == 3:
        p1, p2, p3 = p
        nz, nh, nw = (s // q for s, q in zip(spatial, p))
        return tokens.transpose(-1, -2).reshape(b, p1, p2, p3, c, nz, nh, nw).permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(
            b, c, *spatial
        )
    nh, nw = (s // p for s in spatial)
    return tokens.transpose(-1, -2).reshape(b, p, p, c, nh, nw).permute(0, 3, 4, 1, 5, 2).reshape(b, c, *spatial)


@pytest.mark.parametrize(
    "shape,p",
    [
        ((2, 3, 10, 14, 12), (5, 7, 6)),  # LKM-UNet 3D stage-3/4 pattern (P = 5p, 7p, 6p with p = 1)
        ((1, 2, 20, 28, 24), (10, 14, 12)),  # 2p; stage sizes of the 40x224x192 plan / 2
        ((1, 2, 5, 7, 6), (5, 7, 6)),  # bottleneck: sequences of length 1
        ((2, 3, 40, 40), 20),
        ((1, 2, 10, 10), 5),
    ],
)
def test_strided_matches_official_lkm_partition(shape, p):
    x = torch.randn(shape)
    seq, restore = so.strided(x, stride=p)
    ref = _lkm_grid_reference(x, p)
    assert torch.equal(seq, ref)
    back = _lkm_grid_unpartition(seq * 2, shape[0], p, shape[2:])
    assert torch.equal(restore(seq * 2), back)
    # sequence 1 (offset (0, .., 0, 1)) holds pixels spaced P apart starting at offset 1 on the last axis
    pp = (p,) * (len(shape) - 2) if isinstance(p, int) else p
    sl = (0, slice(None)) + tuple(slice(0, None, q) for q in pp[:-1]) + (slice(1, None, pp[-1]),)
    assert torch.equal(seq[1], x[sl].reshape(shape[1], -1).t())


def test_strided_2d_sequence_of_official_example():
    """lkm_unet.md: 2D stage 0 (320x320, P=40): sequence 0 = (0,0),(0,40),(0,80)...; 1600 sequences of length 64."""
    x = torch.arange(320 * 320, dtype=torch.float32).reshape(1, 1, 320, 320)
    seq, _ = so.strided(x, 40)
    assert seq.shape == (1600, 64, 1)
    assert seq[0, :3, 0].tolist() == [0.0, 40.0, 80.0]
    assert seq[0, 8, 0].item() == 40 * 320  # (40, 0) after one row of 8 blocks


def test_indivisible_raises_or_falls_back():
    x = torch.randn(2, 3, 10, 12)
    for call in (
        lambda: so.windows(x, window=4),
        lambda: so.windows(x, num_windows=4),
        lambda: so.strided(x, stride=(3, 5)),
        lambda: so.strided(torch.randn(1, 2, 40, 224, 190), stride=(20, 28, 24)),
    ):
        with pytest.raises(ValueError, match="not divisible.*[Pp]ad"):
            call()
    for fn, kw in [(so.windows, {"window": 4}), (so.strided, {"stride": (3, 5)})]:
        seq, restore = fn(x, on_indivisible="global", **kw)
        ref, _ = so.raster(x)
        assert torch.equal(seq, ref) and torch.equal(restore(seq), x)


def test_bad_arguments():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="permutation"):
        so.flatten(x, axes=(0, 0))
    with pytest.raises(ValueError, match="token_layout"):
        so.raster(x, token_layout="LBC")
    with pytest.raises(ValueError, match="exactly one"):
        so.windows(x)
    with pytest.raises(ValueError, match="exactly one"):
        so.windows(x, window=2, num_windows=2)
    with pytest.raises(ValueError, match="window"):
        so.windows(x, window=(2, 2, 2))
    with pytest.raises(ValueError, match="on_indivisible"):
        so.strided(x, 2, on_indivisible="pad")
    with pytest.raises(ValueError, match="spatial"):
        so.raster(torch.randn(3, 4))
    seq, restore = so.windows(x, window=2)
    with pytest.raises(ValueError, match="restore expects"):
        restore(seq[:1])
    with pytest.raises(ValueError, match="restore expects"):
        restore(seq.transpose(1, 2))


def test_gradients_flow_through_orders():
    x = torch.randn(1, 2, 4, 6, requires_grad=True)
    seq, restore = so.strided(x, 2, reverse=True)
    y = restore(seq * torch.arange(seq.shape[1], dtype=x.dtype)[None, :, None])
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
