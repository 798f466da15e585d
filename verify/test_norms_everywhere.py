"""Training-mode normalisation wherever its layer runs during a step, and its edge cases.

A normalisation streamed with whole-image statistics must normalise by them wherever the
module's code runs: in a tile's forward, and in its backward, where a
``torch.utils.checkpoint`` inside the module runs parts of it again (reentrant: inside the
checkpoint's backward; non-reentrant and ``checkpoint_sequential``: when the saved tensors
are unpacked). Before, the recomputation escaped the statistics (a torch-function mode is
not active inside autograd's backward when ``Tensor.backward`` is called through it), ran
the layer in training mode on the tile's own statistics and updated its running statistics
once per tile: gradients 0.1-3 off, ``num_batches_tracked`` 10 where conventional says 2.

The oracle is conventional training of the same module (``test_norms.assert_trains_alike``:
output, input gradient, every parameter gradient and every buffer after each of three
optimiser steps; float64, 1e-10 relative, the same sums in another order). Conventionally a
checkpoint's recomputation runs BatchNorm in training mode again and updates its running
statistics a second time; streaming does the same, once per recomputation, not per tile.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_norms import F64, affine_at_random, assert_trains_alike, rand
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from streamcnn import Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, compare, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")

NORMS = {
    "BatchNorm": lambda c: nn.BatchNorm2d(c),
    "BatchNorm, cumulative average": lambda c: nn.BatchNorm2d(c, momentum=None),
    "GroupNorm": lambda c: nn.GroupNorm(2, c),
    "InstanceNorm with running statistics": lambda c: nn.InstanceNorm2d(
        c, affine=True, track_running_stats=True),
}


class Checkpointed(nn.Module):
    """conv - norm - ReLU - conv - BatchNorm - ReLU inside a checkpoint, then a convolution:
    two levels of statistics, a convolution between them whose gradient the recomputation
    computes, and a layer after the checkpoint."""

    def __init__(self, how: str, norm: str):
        super().__init__()
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, bias=False)  # noqa: E731
        self.block = nn.Sequential(conv(3, 4), NORMS[norm](4), nn.ReLU(), conv(4, 4),
                                   nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 3, 3, padding=1)
        self.how = how

    def forward(self, x):
        if self.how == "checkpoint_sequential":
            h = checkpoint_sequential(self.block, 2, x, use_reentrant=False)
        else:
            h = checkpoint(self.block, x, use_reentrant=self.how == "reentrant")
        return self.head(h)


HOWS = ("reentrant", "non-reentrant", "checkpoint_sequential")


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("how", HOWS)
def test_normalisation_inside_a_checkpoint_trains_as_conventionally(how, norm):
    assert_trains_alike(lambda: Checkpointed(how, norm), (2, 3, 30, 28), 4)


@pytest.mark.parametrize("how", HOWS)
def test_normalisation_inside_a_checkpoint_on_every_entry_path(how):
    """Conventional autograd refuses ``autograd.grad`` through a reentrant checkpoint: those
    paths are skipped (``compare`` says which), the others must agree."""
    torch.manual_seed(0)
    net = affine_at_random(Checkpointed(how, "BatchNorm").double().train())
    cmp = compare(net, rand(2, 3, 30, 28), 14, paths=ALL_PATHS)
    assert cmp.worst <= F64, cmp
    assert len(cmp.skipped) == (4 if how == "reentrant" else 0), cmp.skipped


def test_running_statistics_are_updated_once_per_run_of_the_layer_not_per_tile():
    """The reported case: ``num_batches_tracked`` after one step, conventionally 2 (the
    forward and the reentrant checkpoint's recomputation)."""
    torch.manual_seed(0)
    net = Checkpointed("reentrant", "BatchNorm").double().train()
    ref = copy.deepcopy(net)
    x = rand(1, 3, 40, 40).requires_grad_()
    ref(x).sum().backward()
    streamed = Streaming(net, 16)
    assert streamed.plan((1, 3, 40, 40)).num_tiles > 4
    streamed(x.detach().requires_grad_()).sum().backward()
    assert ref.block[1].num_batches_tracked.item() == 2
    assert net.block[1].num_batches_tracked.item() == 2
    for b, b0 in zip(net.buffers(), ref.buffers()):
        assert rel_err(b.double(), b0.double()) <= F64


class _SharedInCheckpoint(nn.Module):
    """One BatchNorm layer called twice inside one checkpointed function."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def twice(self, x):
        return self.bn(self.conv(F.relu(self.bn(x))))

    def forward(self, x):
        return checkpoint(self.twice, x, use_reentrant=False)


def test_a_layer_called_twice_inside_a_checkpoint_is_refused_clearly():
    """A recomputed call says where it was made; a place that made calls with different
    statistics cannot be told apart: refused, naming the layer (never a wrong gradient)."""
    net = _SharedInCheckpoint().double().train()
    y = Streaming(net, 16)(rand(1, 3, 40, 40).requires_grad_())
    with pytest.raises(StreamingError, match=r"bn, bn_1|bn_1, bn|run again inside the backward"):
        y.sum().backward()


def test_bfloat16_autocast_on_cpu_with_training_batchnorm():
    """CPU autocast keeps BatchNorm's parameters and statistics float32 beside a bfloat16
    input (torch's mixed-dtype kernel); the tiles did the same with bfloat16 statistics and
    raised 'mixed dtype (CPU)'. Tolerance: about 10 roundings to bfloat16 (u = 2^-8) on the
    longest chain, each run within n*u of exact: 2 * 10 * u = 0.08 relative to the largest
    entry (verify/test_mixed_precision.py derives the same bound for its network)."""
    torch.manual_seed(0)
    for norm in ("BatchNorm", "GroupNorm"):
        net = affine_at_random(nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), NORMS[norm](4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1)).train())
        ref = copy.deepcopy(net)
        x = torch.randn(2, 3, 40, 40)
        runs = []
        for model in (ref, Streaming(net, 16)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
            y.float().pow(2).sum().backward()
            runs.append(y)
        assert runs[1].dtype == runs[0].dtype == torch.bfloat16
        assert rel_err(runs[1].float(), runs[0].float()) <= 0.08
        for p, p0 in zip(net.parameters(), ref.parameters()):
            assert rel_err(p.grad, p0.grad) <= 0.08
        for b, b0 in zip(net.buffers(), ref.buffers()):
            assert rel_err(b.double(), b0.double()) <= 0.08


@pytest.mark.parametrize("norm, message", [
    (lambda: nn.BatchNorm2d(4), "Expected more than 1 value per channel when training"),
    (lambda: nn.InstanceNorm2d(4), "Expected more than 1 spatial element when training")])
def test_one_value_per_statistic_raises_as_in_torch(norm, message):
    """Batch 1, a 1x1 map: torch raises ValueError; streaming raised nothing and returned a
    result (and a running variance) before."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), norm(), nn.Conv2d(4, 2, 1)).train()
    x = torch.randn(1, 3, 10, 10)
    with pytest.raises(ValueError, match=message):
        net(x)
    with pytest.raises(ValueError, match=message + r".*layer '1'"):
        Streaming(net, 10)(x)
    two = torch.randn(2, 3, 10, 10)  # BatchNorm: two values per channel are enough
    if isinstance(net[1], nn.BatchNorm2d):
        assert rel_err(Streaming(net.eval(), 10)(two), net(two)) <= 1e-5


class _UnusedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.conv(x)
        _ = self.bn(a)  # conventionally: updates bn's running statistics, used nowhere
        return self.out(a)


def test_an_unused_training_normalisation_is_refused_for_its_real_cause():
    """It was refused as 'state that changes on every call'; the cause is that its running
    statistics would be updated per tile, since whole-image statistics are found only for
    what the output uses."""
    net = _UnusedNorm().train()
    with pytest.raises(StreamingError, match=r"layer 'bn' \(BatchNorm2d\) is in training mode but "
                                             r"the output does not use what it computes.*"
                                             r"running statistics.*eval mode"):
        Streaming(net, 16)(torch.randn(1, 3, 40, 40))
    net.bn.eval()  # frozen, it changes nothing: streams
    x = torch.randn(1, 3, 40, 40)
    assert rel_err(Streaming(net, 16)(x), net(x)) <= 1e-5
