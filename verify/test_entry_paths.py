"""Every scenario through every entry path: the input a leaf without grad (training), a leaf
with grad (a saliency map) or a non-leaf; gradients by ``backward()`` or by
``torch.autograd.grad`` of a subset; a sum loss or a random output gradient
(``streamcnn.testing.ALL_PATHS``, 12 paths). A gradient on one side only fails.

A bug can live on one path only: a layer used twice once lost its gradient when the
input was a leaf without grad, while the harness fed only non-leaf inputs. Float64,
1e-10 relative: the same sums in another order.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch.nn.utils import parametrizations

from streamcnn import Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, compare

F64 = 1e-10


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.down = nn.Conv2d(3, 4, 1, stride=2)

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.down(x))


class Checkpointed(nn.Module):
    """A reentrant checkpoint inside the streamed module (it refuses ``autograd.grad``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        h = checkpoint.checkpoint(self.a, x, use_reentrant=True)
        return self.b(checkpoint.checkpoint(torch.tanh, h, use_reentrant=False))


def shared_conv():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    return nn.Sequential(conv, nn.Tanh(), conv)


def tied_weights():
    a, b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    b.weight = a.weight  # two layers, one Parameter
    return nn.Sequential(a, nn.ReLU(), b)


def frozen_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 2, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def half_frozen():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    net[0].weight.requires_grad_(False)
    return net


MODELS = {
    "shared conv used twice": (shared_conv, (2, 3, 61, 67), 24),
    "tied weights": (tied_weights, (2, 3, 41, 37), 16),
    "residual with strided shortcut": (Residual, (2, 3, 45, 38), 20),
    "frozen batchnorm and pools": (frozen_batchnorm, (2, 3, 44, 39), 20),
    "in-place first layer": (lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 2, 3)),
                             (1, 3, 40, 33), 12),
    "weight norm parametrization": (
        lambda: nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1)),
                              nn.GELU(), nn.Conv2d(4, 2, 3, padding=1)), (1, 3, 40, 33), 12),
    "a frozen weight": (half_frozen, (2, 3, 40, 33), 12),
    "reentrant checkpoint": (Checkpointed, (1, 3, 40, 33), 12),
    "1d chain": (lambda: nn.Sequential(nn.Conv1d(3, 4, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                                       nn.Conv1d(4, 2, 3)), (2, 3, 101), 30),
}


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
@pytest.mark.parametrize("overlap", ["recompute", "reuse"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_path_gives_conventional_gradients(name, overlap):
    build, shape, tile = MODELS[name]
    torch.manual_seed(0)
    net = build().double()
    if overlap == "reuse" and name == "reentrant checkpoint":  # (the traced program runs
        with pytest.raises(StreamingError, match="use_reentrant=True"):  # through it)
            compare(net, rand(*shape), tile, paths=ALL_PATHS, overlap=overlap)
        return
    cmp = compare(net, rand(*shape), tile, paths=ALL_PATHS, overlap=overlap)
    assert cmp.worst <= F64, cmp
    refused = 4 if name in ("reentrant checkpoint", "in-place first layer") else 0
    assert len(cmp.skipped) == refused, cmp.skipped  # conventional autograd's own refusals


def test_the_shared_layer_of_the_issue_trains():
    """The reported case, as a user writes it: a leaf input without grad, ``backward()``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1).double()
    net = nn.Sequential(conv, nn.Tanh(), conv)
    x = rand(2, 3, 61, 67)
    net(x).pow(2).sum().backward()
    expected, conv.weight.grad = conv.weight.grad, None
    weight = conv.weight
    Streaming(net, 24)(x).pow(2).sum().backward()
    assert conv.weight is weight, "the module's Parameter was replaced"
    assert conv.weight.grad is not None
    assert (conv.weight.grad - expected).abs().max() <= F64 * expected.abs().max()


def test_a_path_conventional_refuses_runs_from_a_non_leaf():
    """An in-place first layer on a leaf that requires grad: conventional autograd raises, so
    compare runs that path from a non-leaf and says so."""
    net = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 2, 3)).double()
    cmp = compare(net, rand(1, 3, 30, 30), 12, paths=ALL_PATHS)
    assert set(cmp.skipped) == {"leaf-grad/backward/sum", "leaf-grad/backward/random",
                                "leaf-grad/grad/sum", "leaf-grad/grad/random"}
