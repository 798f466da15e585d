"""Streaming real CNN graphs: residual adds, concatenations, depthwise convolutions, ConvNeXt.

The networks are faithful copies of torchvision's blocks (``bench/models.py`` for ResNet,
``verify/models.py`` for the rest; same attribute names and forward code), and, where
torchvision imports, torchvision's own models. All in float64 and eval mode, with random
weights and BatchNorm running statistics that are not the identity.

Oracle: conventional torch autograd on the whole input (``streamcnn.testing.compare``).
Output, input gradient and every parameter gradient must agree within 1e-10 relative to
the largest magnitude: streaming computes the same sums in another order (per-tile
partial sums of the weight gradients, kernels chosen per tile shape), ~1e-16 per
operation in float64, grown by the length of the sums.

Each network runs at odd image sizes, batch 2, with several tile sizes from the minimum
(``streamcnn.receptive_field(net, ndim)[axis].min_tile_size``, per axis) upwards, on
images that need several tiles; the receptive field itself is checked against values
derived by hand (in the comments) and confirmed by measuring which input pixels an output
depends on.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

import models
import streamcnn
from bench.models import BasicBlock, Bottleneck, conv1x1, resnet_front
from streamcnn.testing import compare

F64 = 1e-10
TILE_EXTRAS = ((0, 0), (9, 3))  # tile = minimum + extra pixels, per axis


@dataclass(frozen=True)
class Case:
    """A network (in training mode, as built), its input shape and its expected
    receptive field ``(size, stride, offset)`` on every spatial axis."""

    build: Callable[[], nn.Module]
    shape: tuple
    rf: tuple
    extras: tuple = TILE_EXTRAS


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# Receptive fields compose layer by layer: a window of span k and padding p at total
# stride S adds (k - 1) * S to the size and p * S to the offset; a block takes the hull
# of its branches (all these shortcuts lie inside their residual branch's field).
CASES = {
    # conv3x3/2 (3, 2, 1) then conv3x3 at stride 2: (7, 2, 3); 1x1/2 shortcut
    "basic_block_stride2_downsample": Case(
        lambda: BasicBlock(4, 6, 2, _downsample(4, 6, 2)), (2, 4, 25, 21), (7, 2, 3)),
    "basic_block_identity": Case(lambda: BasicBlock(5, 5), (2, 5, 19, 17), (5, 1, 2)),
    # 1x1, 3x3/2, 1x1: (3, 2, 1)
    "bottleneck_stride2_downsample": Case(
        lambda: Bottleneck(8, 3, 2, _downsample(8, 12, 2)), (2, 8, 21, 17), (3, 2, 1)),
    "bottleneck_identity": Case(lambda: Bottleneck(12, 3), (2, 12, 15, 13), (3, 1, 1)),
    # stem (7, 2, 3) + max-pool (11, 4, 5); layer1 6 convs at stride 4 (59, 4, 29);
    # layer2 8 convs at stride 8, the first strided (179, 8, 89); layer3 12 at 16
    # (547, 16, 273): minimum tile 547 - 273 + 16 * 18 = 562. The image is narrower than a
    # tile (float64 CPU convolutions cost ~0.3 s per 562-pixel tile): it streams along its
    # height only, in 3 minimum tiles or 2 larger ones
    "resnet34_front_through_layer3": Case(
        lambda: resnet_front((3, 4, 6), width=2), (2, 3, 587, 229), (547, 16, 273),
        ((0, 0), (16, 0))),
    # one 3x3 per Bottleneck: layer1 (35, 4, 17), layer2 (91, 8, 45), layer3 (267, 16, 133)
    "resnet50_front_through_layer3": Case(
        lambda: resnet_front((3, 4, 6), width=2, block=Bottleneck), (2, 3, 307, 283),
        (267, 16, 133), ((0, 0), (16, 1000))),
    # stem (11, 4, 5); block 1, 3 chained 3x3 at stride 4 (35, 4, 17); transition avg-pool
    # (39, 8, 17); block 2, 2 layers at stride 8 (71, 8, 33)
    "densenet_blocks_and_transition": Case(models.densenet_front, (2, 3, 101, 93), (71, 8, 33)),
    # stem (3, 2, 1); one depthwise 3x3 per block: (7, 2, 3), /2 (11, 4, 5), (19, 4, 9),
    # /2 (27, 8, 13), (43, 8, 21), (59, 8, 29)
    "mobilenet_v2_inverted_residuals": Case(models.mobilenet_v2_front, (2, 3, 85, 79),
                                            (59, 8, 29)),
    # (3, 1, 1) +pool (4, 2, 1) +conv (8, 2, 3) +pool (10, 4, 3) +2 convs (26, 4, 11)
    # +pool (30, 8, 11) +2 convs (62, 8, 27) +pool (70, 16, 27)
    "vgg_stack": Case(models.vgg_front, (2, 3, 107, 99), (70, 16, 27)),
    # stem (4, 4, 0); two 7x7 depthwise at stride 4 (52, 4, 24); 2x2/2 (56, 8, 24); one
    # 7x7 at stride 8 (104, 8, 48)
    "convnext_stages": Case(models.convnext_front, (2, 3, 131, 117), (104, 8, 48)),
    # stem (7, 2, 3), pool (11, 4, 5); blocks: 2 k5 at 4 (43, 4, 21); k5/2, k5 at 8
    # (91, 8, 45); 2 k3 dilation 3 at 8 (187, 8, 93); k3/2, k3 at 16 (235, 16, 117)
    "resnet1d_stack": Case(models.resnet1d_stack, (3, 2, 301), (235, 16, 117),
                           ((0,), (9,), (37,))),
}


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def frozen(case: Case) -> nn.Module:
    """The case's network in float64 eval mode, BatchNorm statistics from a small batch."""
    sample = rand(4, case.shape[1], *[min(s, 64) for s in case.shape[2:]], seed=99)
    return models.frozen(case.build(), sample)


def check_streaming(net: nn.Module, shape: tuple, extra: tuple):
    """Stream ``net`` on a seeded ``shape`` input with tiles of the minimum + ``extra`` and
    compare with conventional autograd; the image must need several tiles."""
    ndim = len(shape) - 2
    tile = tuple(rf.min_tile_size + e for rf, e in zip(streamcnn.receptive_field(net, ndim), extra))
    tile = tile[0] if ndim == 1 else tile
    assert streamcnn.plan(net, shape, tile).num_tiles > 1, "test bug: a single tile"
    cmp = compare(net, rand(*shape), tile)
    assert cmp.worst <= F64, cmp


@pytest.mark.parametrize("name", sorted(CASES))
def test_receptive_field(name):
    case = CASES[name]
    net = frozen(case)
    for a, rf in enumerate(streamcnn.receptive_field(net, len(case.shape) - 2)):
        assert (rf.size, rf.stride, rf.offset) == case.rf, f"axis {a}"


def _tile_params(cases, extras_of):
    return [pytest.param(n, e, id=f"{n}-min+{'x'.join(map(str, e))}")
            for n in sorted(cases) for e in extras_of(n)]


@pytest.mark.parametrize("name,extra", _tile_params(CASES, lambda n: CASES[n].extras))
def test_streamed_matches_conventional(name, extra):
    case = CASES[name]
    check_streaming(frozen(case), case.shape, extra)


def test_models_have_the_features_under_test():
    """Guards the cases above against becoming trivial (conventional only)."""
    mb = models.mobilenet_v2_front()
    blocks = [m for m in mb.modules() if isinstance(m, models.InvertedResidual)]
    assert {b.use_res_connect for b in blocks} == {True, False}
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mb.modules())
    assert any(isinstance(m, nn.ReLU6) for m in mb.modules())
    dense = models.densenet_front()
    assert sum(isinstance(m, models._DenseBlock) for m in dense.modules()) == 2
    assert all(m.drop_rate > 0 for m in dense.modules() if isinstance(m, models._DenseLayer))
    cn = models.convnext_front()
    cn_blocks = [m for m in cn.modules() if isinstance(m, models.CNBlock)]
    assert max(b.stochastic_depth.p for b in cn_blocks) > 0 and not cn.training
    assert all(b.layer_scale.shape == (b.block[0].in_channels, 1, 1) for b in cn_blocks)
    r1d = models.resnet1d_stack()
    shortcuts = [m.downsample for m in r1d.modules() if isinstance(m, models.BasicBlock1d)]
    assert None in shortcuts and any(s is not None for s in shortcuts)
    r34 = resnet_front()
    assert [len(r34[i]) for i in (4, 5, 6)] == [3, 4, 6]
    assert r34.layer2[0].downsample[0].stride == (2, 2)


def test_models_run_forward_and_backward_at_the_test_sizes():
    """Every case runs conventionally and gives every parameter a gradient."""
    for name, case in CASES.items():
        net = frozen(case)
        x = rand(*case.shape).requires_grad_()
        net(x.clone()).square().mean().backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert not missing and x.grad is not None, (name, missing)


# ---------------------------------------------------------------- torchvision's own models


def _torchvision_models():
    """torchvision.models, or skip: torchvision is missing, or its wheel was built for
    another torch (the PyPI wheel needs the CUDA torch; with the CPU one its import
    fails with ``operator torchvision::nms does not exist``)."""
    try:
        import torchvision.models
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"torchvision does not import here: {err}")
    return torchvision.models


def _front(model: nn.Module, through: str) -> nn.Sequential:
    """A ResNet's children up to ``through``, names kept."""
    children = list(model.named_children())
    names = [n for n, _ in children]
    return nn.Sequential(OrderedDict(children[:names.index(through) + 1]))


# Real widths, so layer2 is as deep as the time allows: ResNet-18 (99, 8, 49), ResNet-34
# (179, 8, 89), ResNet-50 (91, 8, 45); DenseNet-121 block 1 + transition (63, 8, 29);
# MobileNetV2 features[:7] (59, 8, 29); ConvNeXt-Tiny stem + stage 1, three 7x7 at stride
# 4 (76, 4, 36). Derivations as for CASES.
TORCHVISION = {
    "resnet18_through_layer2": (lambda tv: _front(tv.resnet18(), "layer2"), (2, 3, 117, 111),
                                (99, 8, 49)),
    "resnet34_through_layer2": (lambda tv: _front(tv.resnet34(), "layer2"), (2, 3, 203, 197),
                                (179, 8, 89)),
    "resnet50_through_layer2": (lambda tv: _front(tv.resnet50(), "layer2"), (2, 3, 107, 101),
                                (91, 8, 45)),
    "densenet121_block1_transition1": (lambda tv: tv.densenet121().features[:6],
                                       (2, 3, 83, 79), (63, 8, 29)),
    "mobilenet_v2_features_to_7": (lambda tv: tv.mobilenet_v2().features[:7], (2, 3, 75, 69),
                                   (59, 8, 29)),
    "convnext_tiny_stem_stage1": (lambda tv: tv.convnext_tiny().features[:2], (2, 3, 91, 85),
                                  (76, 4, 36)),
}


@pytest.mark.parametrize("name,extra", _tile_params(TORCHVISION, lambda n: TILE_EXTRAS))
def test_torchvision_models(name, extra):
    """torchvision's models, random weights (nothing downloaded), frozen BatchNorm,
    random layer scales; geometry as derived, streaming as conventional."""
    tv = _torchvision_models()
    build, shape, rf = TORCHVISION[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = models.frozen(build(tv), rand(2, 3, 64, 64, seed=99))
    assert all((r.size, r.stride, r.offset) == rf for r in streamcnn.receptive_field(net, 2))
    check_streaming(net, shape, extra)


def _same_computation(ours: nn.Module, theirs: nn.Module, shape=(2, 3, 45, 39)):
    """Same state_dict keys and shapes; with our weights loaded, the same output."""
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    ours = models.frozen(ours, rand(*shape, seed=99))
    theirs = theirs.double().eval()
    theirs.load_state_dict(ours.state_dict())
    x = rand(*shape)
    assert torch.equal(ours(x.clone()), theirs(x.clone()))


def test_resnet_copies_are_torchvision_s():
    tv = _torchvision_models()
    for arch, block, layers in (("resnet18", BasicBlock, (2, 2, 2, 2)),
                                ("resnet34", BasicBlock, (3, 4, 6, 3)),
                                ("resnet50", Bottleneck, (3, 4, 6, 3))):
        theirs = _front(getattr(tv, arch)(), "layer4")
        _same_computation(resnet_front(layers, 64, block, "layer4"), theirs, (1, 3, 67, 61))


def test_block_copies_are_torchvision_s():
    tv = _torchvision_models()
    from torchvision.models import convnext, densenet
    dense = densenet.DenseNet(growth_rate=3, block_config=(3, 2), num_init_features=4,
                              bn_size=2, drop_rate=0.2)
    _same_computation(models.densenet_front(),
                      nn.Sequential(OrderedDict(list(dense.features.named_children())[:-1])))
    setting = [list(row) for row in models.MOBILENET_SETTING]
    mb = tv.MobileNetV2(inverted_residual_setting=setting, round_nearest=1)
    _same_computation(models.mobilenet_v2_front(input_channel=32), mb.features[:-1])
    _same_computation(models.vgg_front(), tv.vgg.make_layers(list(models.VGG_CFG), True))
    cn = convnext.ConvNeXt([convnext.CNBlockConfig(4, 8, 2), convnext.CNBlockConfig(8, None, 1)],
                           stochastic_depth_prob=0.1)
    _same_computation(models.convnext_front(), cn.features)
    assert repr(models.convnext_front()) == repr(cn.features)
