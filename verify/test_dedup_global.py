"""Identical tiles computed once in graphs with whole-map steps (``streamcnn.dedup`` with
``streamcnn.passes``): training-mode BatchNorm and squeeze-and-excitation, whose statistics
and gates come from streamed passes per level, with level checkpoints and without.

Every pass shares: a duplicate's statistics-pass contribution is its representative's summary
added again (under its own index, so a max's first extreme is placed by the tile) and its
owned part of a stored cut is copied; a backward-terms pass and the final backward run one
recomputation per group with the summed output (or injected) gradient, adding every member's
whole-map correction; where each member's gradient has a place of its own (the input
gradient, a gradient stored at a cut) it is backpropagated apart through the kept graph.

Oracles: conventional autograd in float64 (``streamcnn.testing.compare``, every entry path
and both methods, random output gradients: a summed loss leaves the bias before a
training-mode BatchNorm a zero gradient, rounding noise either way, see
verify/test_global_steps.py), on a constant image with an island of noise, on a constant
background whose channel maxima tie over many tiles, and on a tissue-masked slide read through
OpenSlide and TiffSlide. Each checks that tiles *were* shared in every pass.
"""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn.checkpoints
from bench.models import MBConv, conv_bn_act  # torchvision's
from streamcnn import ImageArray, Streaming
from streamcnn.sources import source_of
from streamcnn.testing import ENTRIES, METHODS, Path, compare
from verify.test_dedup import assert_close, blank, island, step
from verify.test_inputs import normalise

F64 = 1e-10
RANDOM = [Path(e, m, "random") for e in ENTRIES for m in METHODS]


def se_net(width=8):
    """A stem, an MBConv block (expansion, depthwise, squeeze-and-excitation, projection, each
    convolution with a training-mode BatchNorm: five levels), and a head convolution."""
    torch.manual_seed(0)
    return nn.Sequential(conv_bn_act(3, width, 3, 2), MBConv(width, width, 2, 3, 1),
                         nn.Conv2d(width, 4, 3, padding=1)).double().train()


class MaxGate(nn.Module):
    """A gate from the channel maxima: adaptive max pooling (torch's first extreme gets the
    gradient) and ``amax`` (shared among ties)."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        pooled = F.adaptive_max_pool2d(x, 1) + x.amax((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc(pooled))


@pytest.fixture
def stored(monkeypatch):
    """Counts of what the checkpoints did for duplicates: parts copied (forward passes) and
    gradients stored at a cut (backward-terms passes), against the tiles that stored them."""
    counts = {"copied": 0, "gradients": 0}

    def counting(name, method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return wrapper

    cls = streamcnn.checkpoints.Checkpoints
    monkeypatch.setattr(cls, "copy", counting("copied", cls.copy))
    monkeypatch.setattr(cls, "add_gradient", counting("gradients", cls.add_gradient))
    return counts


def assert_shared(stats):
    """Fewer tiles computed than covered in every pass (statistics, forward, backward terms,
    backward), and the same groups in each."""
    for p in (stats.statistics, stats.forward, stats.terms, stats.backward):
        assert 0 < p.computed < p.tiles
    per_pass = stats.forward.tiles
    assert stats.statistics.tiles % per_pass == 0 and stats.terms.tiles % per_pass == 0
    assert stats.statistics.computed * per_pass == stats.forward.computed * stats.statistics.tiles
    assert stats.terms.computed * per_pass == stats.backward.computed * stats.terms.tiles


@pytest.mark.parametrize("checkpoints", ["memory", "disk", False])
def test_se_and_training_batchnorm_on_an_island(checkpoints, stored):
    net, x = se_net(), island((1, 3, 160, 160))
    got = step(net, x, 40, checkpoints=checkpoints)
    assert_shared(got[3].last_stats)
    if checkpoints:  # (duplicates' parts of stored maps copied; every tile's cut gradient
        # stored at its own place, though only representatives were recomputed)
        tiles = got[3].last_stats.forward.tiles
        assert stored["copied"] > 0 and stored["gradients"] > 0 and stored["gradients"] % tiles == 0
    cmp = compare(net, x, 40, checkpoints=checkpoints, paths=RANDOM)
    assert cmp.worst <= F64, cmp


def bumps(net, shape, tile):
    """A constant image with the same patch of noise at the same place in every interior
    tile (and in no other tile's input): the interior tiles are identical, and each channel's
    maximum ties over them, with the first one in the first interior tile."""
    x = blank(shape, value=0.0)
    patch = 5 * torch.randn(shape[:2] + (2, 2), generator=torch.Generator().manual_seed(2),
                            dtype=torch.float64)
    _, (rows, cols) = Streaming(net, tile).prepare(source_of(x))
    for i in range(1, len(rows.starts) - 1):
        for j in range(1, len(cols.starts) - 1):
            r, c = rows.starts[i] + tile // 2, cols.starts[j] + tile // 2
            x[:, :, r:r + 2, c:c + 2] = patch
    return x


@pytest.mark.parametrize("checkpoints", ["memory", False])
def test_max_gates_with_ties_across_shared_tiles(checkpoints):
    """Each channel's extreme ties over the shared interior tiles: adaptive max pooling's first
    extreme is the representative's, its duplicates own none (their backward adds nothing
    there, and the statistics pass places their ties after it); ``amax`` shares the
    gradient among every tie, the duplicates' too."""
    torch.manual_seed(1)
    net = nn.Sequential(conv_bn_act(3, 4, 3, 1), MaxGate(4), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                        nn.BatchNorm2d(4), MaxGate(4), nn.Conv2d(4, 2, 3, padding=1)).double().train()
    x = bumps(net, (1, 3, 96, 96), 24)
    got = step(net, x, 24, checkpoints=checkpoints)
    assert_shared(got[3].last_stats)
    cmp = compare(net, x, 24, checkpoints=checkpoints, paths=RANDOM)
    assert cmp.worst <= F64, cmp


@pytest.mark.parametrize("library", ["openslide", "tiffslide"])
def test_a_tissue_masked_slide_with_se_and_training_batchnorm(library, tmp_path):
    """``from_slide(..., tissue=mask)``: the glass outside the tissue is one colour, so its
    tiles repeat in every pass; checkpoints in memory and none give the conventional step on
    the masked image."""
    module = pytest.importorskip(library)
    from verify.test_slides import conventional, pyramid, tissue_slide, write_tiff
    image, _ = tissue_slide()
    path = write_tiff(tmp_path / "tissue.tif", pyramid(image))
    reader = module.OpenSlide(path) if library == "openslide" else module.TiffSlide(path)
    net = se_net()
    with reader:
        x = ImageArray.from_slide(reader, 0, tissue=streamcnn.slides.tissue_mask(reader))
        expected = x.array[:, :]
        runs = {ck: step(net, x, 96, transform=normalise, checkpoints=ck)
                for ck in ("memory", False)}
    y_ref, grads_ref = conventional(net, expected)
    for run in runs.values():
        assert_close(run, (y_ref, grads_ref, None, None))
        assert_shared(run[3].last_stats)


@pytest.mark.parametrize("checkpoints", ["memory", False])
def test_global_context_pooling_on_an_island(checkpoints):
    """Global-context attention pooling (a softmax over the positions, a product summed over
    them) between training-mode BatchNorms: a tile's owned positions of a sequence are
    indices, part of the key as any owned crop (the logits' bias, which a softmax ignores, is
    left out: its gradient is zero in exact arithmetic, see verify/test_positions.py)."""
    from verify.test_positions import GlobalContext
    torch.manual_seed(2)
    gc = GlobalContext(8, rd_ratio=1 / 2)
    gc.conv_attn.bias = None
    net = nn.Sequential(conv_bn_act(3, 8, 3, 2), gc, nn.Conv2d(8, 4, 3, padding=1, bias=False),
                        nn.BatchNorm2d(4)).double().train()
    x = island((1, 3, 160, 160))
    got = step(net, x, 40, checkpoints=checkpoints)
    assert_shared(got[3].last_stats)
    cmp = compare(net, x, 40, checkpoints=checkpoints, paths=RANDOM)
    assert cmp.worst <= F64, cmp
