"""Operations that are not local are refused before any tile runs, with a message that
names the operation, its module path and what to do - never a silent wrong result.

Each case builds a small graph with the operation in a nested block and checks the
``StreamingError`` text; where conventional torch runs the graph, it is run too, so
that the refusal is streaming's, not a broken test network.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from streamcnn import Streaming, StreamingError

MOVE = "move it after the Streaming module"


class SqueezeExcitation(nn.Module):
    """torchvision's SE block: global average pooling scales the channels."""

    def __init__(self, c):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 2, 1)
        self.fc2 = nn.Conv2d(2, c, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(self.avgpool(x)))))
        return scale * x


class Block(nn.Module):
    """A residual block whose branch is ``body`` (so refusals sit at depth)."""

    def __init__(self, body):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), body)

    def forward(self, x):
        return x + self.block(x)


class Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def unused_embedding(x):
    _ = x + torch.ones(1, 4, 20, 20, dtype=x.dtype)  # unused; fits the whole map, no tile
    return x * 2


def written_in_place(fill):
    """A clone that ``fill(g, x)`` writes into in place, read by its old name."""
    def forward(x):
        g = x.clone()
        fill(g, x)
        return g
    return forward


def stem_then(block):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(block))


CASES = {
    "adaptive pooling to a size other than 1": (
        Block(Functional(lambda x: x * F.adaptive_avg_pool2d(x, (1, 2)).mean(3, keepdim=True))),
        r"operation 'adaptive_avg_pool2d' in '1\.0\.block\.2' \(Functional\) cannot be streamed: "
        r"it pools over the whole feature map .* to a size other than 1"),
    "per-row mean": (Block(Functional(lambda x: x - x.mean(3, keepdim=True))),
                     r"operation 'mean' in '1\.0\.block\.2' \(Functional\) cannot be streamed: it reduces "
                     r"over spatial positions, but over some spatial axes only"),
    "layer norm over space": (Block(Functional(lambda x: F.layer_norm(x, x.shape[1:]))),
                              r"operation .* in '1\.0\.block\.2' \(Functional\) cannot be streamed: it "
                              r"reads the feature map's spatial size"),
    "layer norm module over space": (Block(nn.LayerNorm([4, 20, 20])),
                                     r"layer '1\.0\.block\.2' \(LayerNorm\) cannot be streamed: it normalises "
                                     r"with statistics computed over the feature map's spatial positions"),
    "flatten": (Block(Functional(lambda x: torch.flatten(x, 1).view_as(x))),
                r"operation 'flatten' in '1\.0\.block\.2' \(Functional\) cannot be streamed: it reshapes"),
    "view": (Block(Functional(lambda x: x.view(x.shape[0], 4, -1).view_as(x))),
             r"in '1\.0\.block\.2' \(Functional\) cannot be streamed"),
    "interpolate": (Block(Functional(lambda x: F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0,
                                                              mode="bilinear", align_corners=True))),
                    r"operation 'interpolate' in '1\.0\.block\.2' \(Functional\) cannot be streamed: it "
                    r"has align_corners=True"),
    "upsample module": (Block(nn.Sequential(nn.MaxPool2d(2), nn.UpsamplingBilinear2d(scale_factor=2))),
                        r"layer '1\.0\.block\.2\.1' \(UpsamplingBilinear2d\) cannot be streamed: it has "
                        r"align_corners=True"),
    "fixed size": (Block(Functional(lambda x: F.interpolate(F.avg_pool2d(x, 2), size=(20, 20)))),
                   r"operation 'interpolate' in '1\.0\.block\.2' \(Functional\) cannot be streamed: it "
                   r"resamples to size=\(20, 20\)"),
    "attention": (Block(Functional(lambda x: F.scaled_dot_product_attention(x, x, x))),
                  r"operation 'scaled_dot_product_attention' in '1\.0\.block\.2' \(Functional\) cannot be "
                  r"streamed: attention connects every position"),
    "spatial indexing": (Block(Functional(lambda x: x * x[:, :, :1, :1])),
                         r"operation 'getitem' in '1\.0\.block\.2' \(Functional\) cannot be streamed: it "
                         r"indexes spatial positions"),
    "spatial size": (Block(Functional(lambda x: x / x.shape[-1])),
                     r"in '1\.0\.block\.2' \(Functional\) cannot be streamed: it reads the feature map's "
                     r"spatial size"),
    "random noise": (Block(Functional(lambda x: x + torch.randn_like(x))),
                     r"operation 'randn_like' in '1\.0\.block\.2' \(Functional\) cannot be streamed: it "
                     r"draws random numbers"),
    "fixed-size positional embedding": (Block(Functional(lambda x: x + torch.ones(1, 4, 20, 20,
                                                                                   dtype=x.dtype))),
                                        r"operation 'add' in '1\.0\.block\.2' \(Functional\) cannot be "
                                        r"streamed: it combines the feature map with a tensor of shape "
                                        r"\(1, 4, 20, 20\) that varies over the spatial positions"),
    "linear over space": (Block(nn.Linear(20, 20)), r"layer '1\.0\.block\.2' \(Linear\) cannot be streamed: "
                                                    r"it connects every position"),
    # reductions whose arguments were once misread: each reduces over space as torch binds it
    "mean over dim=()": (Block(Functional(lambda x: x - x.mean(dim=(), keepdim=True))),
                         r"operation 'mean' .* it reduces over spatial positions"),
    "norm with p positional": (Block(Functional(lambda x: x / x.norm(1, keepdim=True))),
                               r"operation 'norm' .* it reduces over spatial positions"),
    "norm inf": (Block(Functional(lambda x: x / x.norm(float("inf"), keepdim=True))),
                 r"operation 'norm' .* it reduces over spatial positions"),
    "std(unbiased)": (Block(Functional(lambda x: x / x.std(True))),
                      r"operation 'std' .* it reduces over spatial positions"),
    "mean over H after a batch sum": (Block(Functional(lambda x: x * x.sum(0).mean(1, keepdim=True))),
                                      r"operation 'mean' .* it reduces over spatial positions"),
    "clamp to a fixed-size bound": (Block(Functional(lambda x: torch.clamp(
        x, min=torch.zeros(1, 1, 20, 20, dtype=x.dtype)))),
        r"operation 'clamp' .* a tensor of shape \(1, 1, 20, 20\) that varies over the spatial"),
    "local response norm channels last": (Block(Functional(lambda x: F.local_response_norm(
        x.permute(0, 2, 3, 1), 3).permute(0, 3, 1, 2))),
        r"operation 'local_response_norm' .* in layout \(N, H, W, C\) dimension 1 is not the channels"),
    "max pool with indices": (Block(Functional(lambda x: F.max_pool2d(x, 3, 1, 1, return_indices=True)[0])),
                              r"operation 'max_pool2d_with_indices' .* it has return_indices=True"),
    "adaptive max pool with indices": (Block(Functional(lambda x: x * F.adaptive_max_pool2d(
        x, 1, return_indices=True)[0])), r"operation 'adaptive_max_pool2d_with_indices' .* it pools over the "
                                         r"whole feature map"),
    "unused value that fails on a tile": (Block(Functional(unused_embedding)),
                                          r"a tile of shape .* failed: .* operation 'add' in '1\.0\.block\.2' "
                                          r"\(Functional\) cannot be streamed: it combines the feature map "
                                          r"with a tensor of shape \(1, 4, 20, 20\)"),
    "unused window that does not fit a tile": (Block(Functional(lambda x: (F.max_pool2d(x, 15), x)[1])),
                                               r"a tile of shape .* failed: .* operation 'max_pool2d' in "
                                               r"'1\.0\.block\.2' \(Functional\) is a window on a map the "
                                               r"output does not use"),
    "split of the batch into sections": (Block(Functional(lambda x: x * torch.split(x, [1], dim=0)[0])),
                                         r"operation 'split' .* it applies a split over a dimension that "
                                         r"is not the channels"),
    "refused operand added in place": (Block(Functional(written_in_place(lambda g, x: g.add_(F.softmin(x, 3))))),
                                       r"operation 'softmin' .* over a dimension that is not the channels"),
    "unknown in-place method": (Block(Functional(written_in_place(
        lambda g, x: g.masked_fill_(F.max_pool2d(x, 5, 1, 2) > 0.5, 0.0)))),
        r"operation 'masked_fill_' .* not an operation streamcnn knows"),
    "feature map as a convolution weight": (Block(Functional(lambda x: x * F.conv2d(
        x, x.sum(0, keepdim=True)))), r"operation 'conv2d' .* it takes a feature map as its 'weight' "
                                      r"argument, which streamcnn streams only as 'input'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refusal_names_the_operation_and_its_path(name):
    block, message = CASES[name]
    net = stem_then(block).double()
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    net(x)  # conventional torch runs it
    with pytest.raises(StreamingError, match=message) as err:
        Streaming(net, 12)(x)
    assert MOVE in str(err.value) or "use " in str(err.value)


def test_unused_value_that_fails_on_a_tile_with_a_value_error_is_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)

        def forward(self, x):
            h = self.conv(x)
            _ = F.instance_norm(h)  # unused; it needs two positions, and a 1-px tile has one
            return h * 2

    with pytest.raises(StreamingError, match=r"a tile of shape \(1, 3, 1\) failed: Expected more than 1 "
                                             r"spatial element .* operation 'instance_norm'"):
        Streaming(Unused(), 1)(torch.randn(1, 3, 20))


def test_refusal_comes_before_any_tile_runs():
    calls = []
    net = stem_then(Block(nn.LayerNorm([4, 40, 40])))
    net[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(StreamingError):
        Streaming(net, 12)(torch.randn(1, 3, 40, 40))
    assert calls == []


def test_refused_at_construction_when_known_then():
    with pytest.raises(StreamingError, match=r"layer '1\.0\.block\.2' \(AdaptiveAvgPool2d\)"):
        Streaming(stem_then(Block(nn.AdaptiveAvgPool2d(2))), 12)


def test_modes_are_checked_at_every_call_not_at_construction():
    """Users wrap first and call .eval() on the random layers later."""
    net = stem_then(Block(nn.Dropout(0.5)))
    model = Streaming(net, 12)
    with pytest.raises(StreamingError, match="in training mode"):
        model(torch.randn(1, 3, 30, 30))
    net.eval()
    model(torch.randn(1, 3, 30, 30))


class ValueBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on tensor values: fx cannot trace it
            return x
        return -x


def test_untraceable_module_is_named():
    net = stem_then(Block(ValueBranch()))
    with pytest.raises(StreamingError, match=r"layer '1\.0\.block\.2' \(ValueBranch\) could not be traced.*"
                                             r"branches on tensor values"):
        Streaming(net, 12)


class TwoGrids(nn.Module):
    """A stride-2 path padded so that, at 30 px, it has as many outputs as the identity:
    torch adds them, but output j of one path sits at pixel 2j - 15, of the other at j."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 4, 2, stride=2, padding=15)

    def forward(self, x):
        return x + self.down(x)


def test_merge_of_different_grids_is_refused():
    net = stem_then(TwoGrids())
    x = torch.randn(1, 3, 30, 30)
    net(x)  # conventional torch adds them
    with pytest.raises(StreamingError, match=r"operation 'add' in '1\.0' \(TwoGrids\) combines feature "
                                             r"maps on different grids: its inputs have total strides "
                                             r"\[1, 2\]"):
        Streaming(net, 12)(x)


class SameGridTwoWays(nn.Module):
    """Two paths that downsample alike by different means, concatenated and added."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.b = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1) + F.avg_pool2d(torch.cat([x, x], 1), 2,
                                                                   ceil_mode=True)


@pytest.mark.parametrize("size", [30, 31])
def test_paths_that_downsample_alike_merge(size):
    net = stem_then(SameGridTwoWays()).double()
    x = torch.randn(2, 3, size, size + 4, dtype=torch.float64)
    assert streamcnn.testing.compare(net, x, 14).worst <= 1e-10


def test_module_returning_a_number_beside_a_map_is_refused():
    class WithCount(nn.Module):
        def forward(self, x):
            return x, 3

    with pytest.raises(StreamingError, match=r"returns int as \[1\]; it must return a feature map"):
        Streaming(stem_then(WithCount()), 12)(torch.randn(1, 3, 30, 30))


def test_module_returning_channels_last_is_refused():
    class Last(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    with pytest.raises(StreamingError, match=r"returns a feature map in layout \(N, H, W, C\)"):
        Streaming(stem_then(Last()), 12)(torch.randn(1, 3, 30, 30))


def test_dead_code_does_not_stop_streaming():
    class Debug(nn.Module):
        def forward(self, x):
            _ = x.shape[-1] * 2  # reads the spatial size, but the output does not depend on it
            _ = x.mean()
            return x * 2

    net = stem_then(Debug()).double()
    assert streamcnn.testing.compare(net, torch.randn(1, 3, 30, 30, dtype=torch.float64), 12).worst <= 1e-10
