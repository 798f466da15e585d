"""The forward's last tiles keep their graphs within a budget; the backward uses them
without recomputing (streamcnn.keeping).

Oracles: conventional autograd on the whole image (``testing.compare``, every entry path)
and the same step without kept graphs. Float64, 1e-10 relative: a kept tile's gradient is
the recomputed tile's, added in another order.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_entry_paths import Checkpointed, Residual

from streamcnn import ImageArray, Streaming
from streamcnn.testing import ALL_PATHS, compare, rel_err

F64 = 1e-10
ALL = 10**12  # a budget every tile but the first fits in


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def chain():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.GELU())


NETWORKS = {"chain": chain, "residual": Residual, "checkpoints": Checkpointed}


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
@pytest.mark.parametrize("budget", [None, ALL])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_kept_graphs_give_conventional_gradients_on_every_entry_path(name, budget):
    torch.manual_seed(0)
    net = NETWORKS[name]().double()
    cmp = compare(net, rand(2, 3, 45, 38), 20, paths=ALL_PATHS, keep_graphs=budget)
    assert cmp.worst <= F64, cmp
    assert len(cmp.skipped) == (4 if name == "checkpoints" else 0)


def test_the_budget_sets_how_many_tiles_keep_their_graph():
    torch.manual_seed(0)
    net, x = chain().double(), rand(1, 3, 64, 64)
    tiles = Streaming(net, 20).plan(x.shape).num_tiles
    per_tile = Streaming(net, 20).plan(x.shape).tile_working_bytes
    for budget, kept in [(0, 0), (None, 1), (3 * per_tile + 5, 3), (ALL, tiles - 1)]:
        streamed = Streaming(net, 20, keep_graphs=budget)
        streamed(x).pow(2).sum().backward()
        stats = streamed.last_stats.backward
        assert (stats.reused, stats.computed) == (kept, tiles - kept), budget
    with pytest.raises(ValueError, match="keep_graphs must be None .* or a budget in bytes"):
        Streaming(net, 20, keep_graphs=-1)


def test_a_second_backward_recomputes_the_kept_tiles():
    """``retain_graph=True``: the kept graphs are spent by the first backward."""
    torch.manual_seed(0)
    net, x = chain().double(), rand(1, 3, 64, 64)
    y = Streaming(net, 20, keep_graphs=ALL)(x)
    loss = y.pow(2).sum()
    first = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(net.parameters()))
    want = torch.autograd.grad(net(x).pow(2).sum(), list(net.parameters()))
    for a, b, c in zip(first, second, want):
        assert rel_err(a, c) <= F64 and rel_err(b, c) <= F64


def test_an_in_place_change_before_backward_still_raises():
    torch.manual_seed(0)
    net, x = chain().double(), rand(1, 3, 64, 64)
    y = Streaming(net, 20, keep_graphs=ALL)(x)
    with torch.no_grad():
        net[0].weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_an_array_input_with_dedup_and_a_max_head():
    """uint8 read tile by tile, a transform, identical background tiles, skipped tiles."""
    torch.manual_seed(0)
    net = chain().double()
    image = np.zeros((96, 96, 3), np.uint8)
    image[40:50, 40:50] = np.random.default_rng(0).integers(0, 255, (10, 10, 3))
    normalise = lambda t: t.double() / 255  # noqa: E731
    grads = []
    for budget in (0, ALL):
        net.zero_grad()
        streamed = Streaming(net, 20, transform=normalise, keep_graphs=budget)
        streamed(ImageArray(image, "HWC")).amax((2, 3)).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert streamed.last_stats.backward.reused > 0
    for a, b in zip(*grads):
        assert rel_err(a, b) <= F64


def test_training_mode_normalisation_keeps_nothing():
    """Its tiles' backward needs whole-map terms known only in the backward."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                        nn.Conv2d(4, 2, 3, padding=1)).double().train()
    streamed = Streaming(net, 20, keep_graphs=ALL)
    streamed(rand(2, 3, 64, 64)).sum().backward()
    assert streamed.last_stats.backward.reused == 0


def test_plan_says_how_many_tiles_keep_their_graph_and_counts_their_memory():
    torch.manual_seed(0)
    net, shape = chain().double(), (1, 3, 64, 64)
    none, some = Streaming(net, 20).plan(shape), Streaming(net, 20, keep_graphs=10**12).plan(shape)
    assert (none.kept_tiles, some.kept_tiles) == (0, none.num_tiles - 1)
    assert some.device_peak_bytes == none.device_peak_bytes + some.kept_tiles * some.tile_working_bytes
    assert "keep_graphs" not in str(none)
    assert f"the last {some.kept_tiles} of {some.num_tiles} tiles keep their graphs" in str(some)
