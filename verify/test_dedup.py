"""Identical tiles computed once (``streamcnn.dedup``): a tile whose pixels and geometry equal
an earlier tile's is not run again in the forward, and its group is recomputed once in the
backward.

Oracles: conventional autograd (``streamcnn.testing.compare``, every entry path) and the same
streamed step without sharing. Outputs are copies of the representative's owned output, so
they equal unshared streaming's; gradients agree to 1e-10 relative in float64: a group's
parameter gradient is one backward of the *sum* of its output gradients, and input
gradients are added into the overlaps in another order - the same products, summed in
another order (~1e-16 here). Images: constant ones (every tile but the border ones
identical), a constant background with an island of noise, random ones (nothing shared),
a uint8 array, and a tissue-masked slide read through OpenSlide and TiffSlide.

Each test that shares also checks that tiles *were* shared, and the key is shown to matter:
without the owned crop (or with the tile shape alone) the same checks fail.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import streamcnn
import streamcnn.function
from streamcnn import ImageArray, Streaming, StreamingError, dedup
from streamcnn.sources import source_of
from streamcnn.testing import ALL_PATHS, compare, rel_err
from streamcnn.tiling import iter_tiles
from streamcnn.trace import analyse
from verify.test_entry_paths import MODELS
from verify.test_inputs import front, normalise

F64 = 1e-10
TILE = 23


def blank(shape=(2, 3, 75, 61), value=0.3):
    return torch.full(shape, value, dtype=torch.float64)


def island(shape, seed=0):
    """A constant image with a block of noise in its first quarter: tiles on it differ, the
    others repeat."""
    x = blank(shape)
    g = torch.Generator().manual_seed(seed)
    box = tuple(slice(s // 8, max(s // 8 + 1, s // 3)) for s in shape[2:])
    x[(slice(None), slice(None)) + box] = torch.rand(x[(...,) + box].shape, generator=g,
                                                     dtype=torch.float64)
    return x


def step(net, x, tile=TILE, input_grad=False, **kwargs):
    """Output, parameter gradients, input gradient (or None) and the Streaming module of one
    step with a fixed random output gradient."""
    net.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_(input_grad) if isinstance(x, torch.Tensor) else x
    streaming = Streaming(net, tile, **kwargs)
    y = streaming(leaf)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype))
    gx = leaf.grad if input_grad else None
    return y.detach(), [p.grad.clone() for p in net.parameters()], gx, streaming


def assert_close(a, b, tol=F64):
    (y, grads, gx, _), (y_ref, grads_ref, gx_ref, _) = a, b
    assert rel_err(y, y_ref) <= tol
    assert all(rel_err(g, r) <= tol for g, r in zip(grads, grads_ref))
    assert (gx is None) == (gx_ref is None)
    assert gx is None or rel_err(gx, gx_ref) <= tol


def assert_identical(a, b):
    (y, grads, gx, _), (y_ref, grads_ref, gx_ref, _) = a, b
    assert torch.equal(y, y_ref) and all(torch.equal(g, r) for g, r in zip(grads, grads_ref))
    assert (gx is None and gx_ref is None) or torch.equal(gx, gx_ref)


def geometry_classes(net, x, tile=TILE) -> int:
    """How many distinct (tile shape, owned crop, border sides) the tiling of ``x`` has: the
    number of tiles a constant image computes."""
    _, tilings = Streaming(net, tile).prepare(source_of(x))
    keys = {(tuple(s.stop - s.start for s in t.inp[2:]), tuple((c.start, c.stop) for c in t.crop[2:]),
             tuple((s.start == 0, s.stop == a.length) for s, a in zip(t.inp[2:], tilings)))
            for t in iter_tiles(tilings)}
    return len(keys)


@pytest.fixture
def made(monkeypatch):
    """Every ``Duplicates`` the tile loop makes, to see which tiles were grouped."""
    found = []

    class Recorded(dedup.Duplicates):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            found.append(self)

    monkeypatch.setattr(streamcnn.function, "Duplicates", Recorded)
    return found


# ------------------------------------------------------------------ constant and random images

@pytest.mark.parametrize("input_grad", [False, True])
def test_a_constant_image_computes_one_tile_per_geometry(input_grad, made):
    net, x = front(), blank()
    got = step(net, x, input_grad=input_grad)
    ref = step(net, x, input_grad=input_grad, dedup=False)
    assert_close(got, ref)
    stats = got[3].last_stats
    classes = geometry_classes(net, x)
    assert stats.forward.computed == stats.backward.computed == classes
    assert stats.forward.tiles == stats.backward.tiles == ref[3].last_stats.forward.computed > 3 * classes
    for group in made[0].groups.values():  # border tiles never join interior ones
        assert len({tuple((s.start == 0, s.stop == L) for s, L in zip(t.inp[2:], (75, 61)))
                    for t in group}) == 1
        assert len({tuple((c.start, c.stop) for c in t.crop) for t in group}) == 1


def test_a_constant_image_against_conventional_on_every_path():
    cmp = compare(front(), blank((1, 3, 70, 66)), TILE, paths=ALL_PATHS)
    assert cmp.worst <= F64, cmp


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_tiles_on_every_entry_path(name):
    """verify/test_entry_paths's networks (shared and tied layers, residual, frozen BN,
    parametrised, frozen, reentrant checkpoint, 1D) on an island in a constant background."""
    build, shape, tile = MODELS[name]
    torch.manual_seed(0)
    net = build().double()
    x = island(shape[:2] + tuple(2 * s for s in shape[2:]))  # enough tiles to repeat
    with torch.no_grad():
        streaming = Streaming(net, tile)
        streaming(x)
    assert streaming.last_stats.forward.computed < streaming.last_stats.forward.tiles
    cmp = compare(net, x, tile, paths=ALL_PATHS)
    assert cmp.worst <= F64, cmp


def test_a_random_image_shares_nothing_and_is_bit_identical():
    net = front()
    x = torch.rand(2, 3, 75, 61, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, ref = step(net, x, input_grad=True), step(net, x, input_grad=True, dedup=False)
    assert_identical(got, ref)
    stats = got[3].last_stats
    assert stats.dedup and stats.forward.computed == stats.forward.tiles == stats.backward.computed


def test_dedup_can_be_turned_off():
    s = step(front(), blank(), dedup=False)[3]
    assert not s.last_stats.dedup and s.last_stats.forward.computed == s.last_stats.forward.tiles


# ------------------------------------------------------------------ what is never shared

def overlap_pixel(net, x, tile=TILE):
    """A pixel that two neighbouring tiles read (one's right overlap, the other's left)."""
    _, tilings = Streaming(net, tile).prepare(source_of(x))
    rows, cols = tilings
    return rows.starts[2], (cols.starts[2] + cols.stops[1]) // 2


@pytest.mark.parametrize("delta", [1e-300, -0.0])
def test_a_tile_next_to_a_varying_tile_is_not_shared(delta, made):
    """One pixel in the overlap of two tiles changed (by the smallest amount, or from 0.0 to
    -0.0: bits, not values, decide): every tile that reads it is computed, none is shared."""
    net = front()
    x = blank(value=0.0)
    h, w = overlap_pixel(net, x)
    x[0, 1, h, w] = delta if delta else -0.0
    got, ref = step(net, x, input_grad=True), step(net, x, input_grad=True, dedup=False)
    assert_close(got, ref)
    dups = made[0]
    reading = [t for t in iter_tiles(dups.tilings)
               if t.inp[2].start <= h < t.inp[2].stop and t.inp[3].start <= w < t.inp[3].stop]
    assert len(reading) >= 2
    for t in reading:
        assert dups.group(dups.representative[t.index]) == [t], f"tile {t.index} was shared"
    assert got[3].last_stats.forward.computed < got[3].last_stats.forward.tiles


def test_equality_is_decided_on_the_pixels_not_the_hash(monkeypatch):
    """Every tile's fingerprint made equal: candidates everywhere, yet only the identical
    tiles are shared (the exact comparison decides), for tensors and for arrays."""
    net = front()
    x = island((2, 3, 75, 61))
    honest = step(net, x, input_grad=True)
    monkeypatch.setattr(streamcnn.function, "fingerprint", lambda raw: b"")
    colliding = step(net, x, input_grad=True)
    assert_identical(colliding, honest)
    assert colliding[3].last_stats.forward.computed == honest[3].last_stats.forward.computed
    monkeypatch.setattr(streamcnn.function, "digest", lambda raw: b"")  # an array's read hash
    pixels = (x.numpy() * 255).round().astype(np.uint8)
    array = step(net, pixels, transform=normalise)
    unshared = step(net, pixels, transform=normalise, dedup=False)
    assert_close(array, unshared)
    assert array[3].last_stats.forward.computed == honest[3].last_stats.forward.computed


def test_bits_decide_equality():
    zero, nan = torch.zeros(3, dtype=torch.float64), torch.full((3,), float("nan"))
    assert not dedup.same_pixels(zero, -zero) and dedup.same_pixels(nan, nan.clone())
    assert not dedup.same_pixels(zero, zero.float()) and not dedup.same_pixels(zero, zero[:2])
    b = torch.ones(4, dtype=torch.bfloat16)
    assert dedup.same_pixels(b, b.clone()) and dedup.fingerprint(b) == dedup.fingerprint(b.clone())
    assert dedup.fingerprint(zero) != dedup.fingerprint(-zero)


# ------------------------------------------------------------------ the key must hold the crop

def without_crop(tile, tilings, raw):
    shape, dtype, crop, borders, phase = KEY(tile, tilings, raw)
    return shape, dtype, borders, phase


def shape_only(tile, tilings, raw):
    return tuple(raw.shape)


KEY = dedup.geometry_key


@pytest.mark.parametrize("key", [KEY, without_crop, shape_only], ids=["key", "no-crop", "shape-only"])
def test_the_geometry_key_must_hold_the_owned_crop(key, monkeypatch):
    """45 rows in tiles of 20: the last tile (rows 24-44) ends one row short of the image (row
    44 changes no output), so it is no border tile, yet it owns one output row more than the
    tiles before it, of the same shape. With the full key a constant image streams exactly;
    without the crop (or with the shape alone) that tile takes another tile's owned output,
    and the step fails or differs."""
    monkeypatch.setattr(dedup, "geometry_key", key)
    net, x = front(), blank((1, 3, 45, 45))
    _, (rows, _) = Streaming(net, 20).prepare(source_of(x))
    assert rows.stops[-1] == 44 and rows.stops[-1] - rows.starts[-1] == rows.stops[1] - rows.starts[1]
    try:
        cmp = compare(net, x, 20)
        ok = cmp.worst <= F64
    except RuntimeError:  # an owned output of another shape
        ok = False
    assert ok is (key is KEY)


# ------------------------------------------------------------------ hooks, switches, graphs

def test_forward_hooks_fire_once_per_computed_tile():
    net, x = front(), blank()
    calls = []
    handle = net[0].register_forward_hook(lambda m, a, out: calls.append(out.shape))
    try:
        s = step(net, x)[3]
    finally:
        handle.remove()
    assert len(calls) == s.last_stats.forward.computed + s.last_stats.backward.computed
    assert len(calls) < 2 * s.last_stats.forward.tiles


@pytest.mark.parametrize("input_grad", [False, True])
def test_backward_hooks_see_a_group_once_or_each_duplicate(input_grad):
    """A full backward hook fires once per backward call: once per group with its summed
    gradient, or once per duplicate when the input gradient is wanted; it may read but not
    replace gradients, as without sharing."""
    net, x = front(), blank()
    seen = []
    handle = net[3].register_full_backward_hook(lambda m, gi, go: seen.append(go[0].sum().item()))
    try:
        got = step(net, x, input_grad=input_grad)
    finally:
        handle.remove()
    stats = got[3].last_stats
    assert len(seen) == (stats.backward.tiles if input_grad else stats.backward.computed)
    handle = net[3].register_full_backward_hook(lambda m, gi, go: (go[0] * 2,) if gi[0] is not None
                                                else None)
    try:
        with pytest.raises(StreamingError, match="returned a new gradient"):
            step(net, x, input_grad=True)
    finally:
        handle.remove()


def test_sharing_where_statistics_span_the_image():
    """A graph with training-mode BatchNorm traced as a norm step (statistics over the whole
    map) is allowed too: its passes share exactly (verify/test_dedup_global.py). A module
    returning several maps is not."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double()
    shape = dict(ndim=2, channels=3, batch=1, dtype=torch.float64, device=torch.device("cpu"))
    assert dedup.allowed(analyse(net.train(), spatial_norms=True, **shape))
    assert dedup.allowed(analyse(net.eval(), **shape))

    class Two(nn.Module):
        def forward(self, x):
            return {"a": x, "b": x * 2}

    assert not dedup.allowed(analyse(Two(), **shape))


def test_half_precision_gradients_are_not_summed_before_the_backward():
    tiles = [t for t in iter_tiles(Streaming(front(), TILE).prepare(source_of(blank()))[1])
             if t.index[0] == 1 and 1 <= t.index[1] <= 3]  # interior tiles: one owned shape
    g = torch.rand(front()(blank()).shape, dtype=torch.float64)

    def parts(grad, separate):
        return dedup.gradient_parts(tiles, lambda t: [grad[t.out]], separate=separate)

    assert [members for members, _ in parts(g, False)] == [tiles]  # (stands for all three)
    assert [members for members, _ in parts(g, True)] == [[t] for t in tiles]
    assert len(parts(g.half(), False)) == 3
    (total,) = parts(g, False)[0][1]
    assert torch.equal(total, g[tiles[0].out] + g[tiles[1].out] + g[tiles[2].out])


# ------------------------------------------------------------------ arrays and slides

class Counting:
    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, 0

    def __getitem__(self, index):
        self.reads += 1
        return self.data[index]


@pytest.mark.parametrize("keep", [4, 0])
def test_a_uint8_array_with_a_uniform_background(keep, monkeypatch):
    """The forward reads every tile once, plus a re-read of a representative whose pixels
    were not held for the comparison (``keep``: how many are held); the backward reads only
    the tiles it computes."""
    class Keeping(dedup.Duplicates):
        def __init__(self, tilings, reread, **kwargs):
            super().__init__(tilings, reread, **{**kwargs, "keep": keep})

    monkeypatch.setattr(streamcnn.function, "Duplicates", Keeping)
    net = front()
    pixels = (island((1, 3, 90, 80)).numpy() * 255).round().astype(np.uint8)
    array = Counting(pixels)
    got = step(net, array, transform=normalise)
    ref = step(net, torch.from_numpy(pixels), transform=normalise, dedup=False)
    assert_close(got, ref)
    stats = got[3].last_stats
    assert stats.forward.computed < stats.forward.tiles
    rereads = stats.forward.reads - stats.forward.tiles
    assert 0 < rereads if keep == 0 else rereads <= geometry_classes(net, torch.from_numpy(pixels).double())
    assert stats.backward.reads == stats.backward.computed == stats.forward.computed
    assert array.reads == stats.forward.reads + stats.backward.reads


@pytest.mark.parametrize("library", ["openslide", "tiffslide"])
def test_a_tissue_masked_slide_with_and_without_prefetch(library, tmp_path):
    """``from_slide(..., tissue=mask)``: the background outside the tissue is one colour, so
    its tiles repeat. Every combination of prefetch and dedup gives the conventional step on
    the masked image; prefetching changes nothing, bit for bit; sharing computes fewer tiles."""
    module = pytest.importorskip(library)
    from verify.test_slides import conventional, pyramid, tissue_slide, write_tiff
    image, _ = tissue_slide()
    path = write_tiff(tmp_path / "tissue.tif", pyramid(image))
    reader = module.OpenSlide(path) if library == "openslide" else module.TiffSlide(path)
    with reader:
        mask = streamcnn.slides.tissue_mask(reader)
        x = ImageArray.from_slide(reader, 0, tissue=mask)
        expected = x.array[:, :]
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(4, 4, 3, padding=1)).double()
        runs = {(p, d): step(net, x, 96, transform=normalise, prefetch=p, dedup=d)
                for p in (True, False) for d in (True, False)}
    y_ref, grads_ref = conventional(net, expected)
    for run in runs.values():
        assert_close(run, (y_ref, grads_ref, None, None))
    assert_identical(runs[True, True], runs[False, True])
    assert_identical(runs[True, False], runs[False, False])
    shared = runs[True, True][3].last_stats
    assert shared.prefetch and shared.forward.computed < shared.forward.tiles
    assert runs[True, False][3].last_stats.forward.computed == shared.forward.tiles
