"""Level checkpoints (``streamcnn.checkpoints``): the statistics and backward-terms passes of
whole-map steps start at stored maps instead of the image, and give the same numbers.

Oracles: conventional autograd on the whole image (float64, 1e-10 relative: the stored maps
are whole-image values read over a tile's span, where recomputation from the image has the
tile's own values; both are exact, in another summation order), and
``torch.optim.swa_utils.update_bn``. Memory and disk storage hold the same values, so they
give the same numbers bit for bit (exact by construction). Against recomputing every pass
from the image (``checkpoints=False``, itself checked against autograd here and in
test_norms) the values agree to 1e-10, not bitwise: a tile reads its neighbours' values of a
stored map where it would have computed them itself, which rounds differently.

What the checkpoints buy is counted, not timed: each layer runs in about one forward pass
and two backward passes per tile, however many levels follow it.
"""

import copy
import gc
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from streamcnn import Streaming
from streamcnn import checkpoints as ck
from streamcnn.sources import source_of
from streamcnn.testing import ENTRIES, METHODS, Path, compare, rel_err
from test_global_steps import MBConv, conv_bn_act
from test_norms import NETWORKS, affine_at_random, rand

F64 = 1e-10
STORAGE = (False, "memory", "disk")
#: random output gradients only: a summed loss through a normalisation has a zero gradient
#: in exact arithmetic, rounding noise either way (test_norms)
RANDOM = (Path("leaf", "grad"), Path("leaf-grad", "backward"), Path("non-leaf", "backward"))
ALL_RANDOM = tuple(Path(e, m) for e in ENTRIES for m in METHODS)


def blocks(k: int = 5, c: int = 3) -> nn.Sequential:
    """``k`` convolution-BatchNorm-ReLU blocks in training mode: ``k`` levels."""
    layers = [nn.Conv2d(2, c, 3, padding=1, bias=False)]
    for i in range(k):
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False)]
    return affine_at_random(nn.Sequential(*layers).double().train())


def efficientnet_like() -> nn.Sequential:
    """MBConv blocks with squeeze-and-excitation, BatchNorm in training mode: gates and
    normalisations in alternating levels. (No BatchNorm bias right before a 1x1 convolution
    and a training-mode BatchNorm: its gradient is zero in exact arithmetic, test_norms.)"""
    torch.manual_seed(0)
    net = nn.Sequential(conv_bn_act(3, 8, 3, 2), MBConv(8, 12, 4, 5, 2), MBConv(12, 12, 1, 3, 1),
                        nn.Conv2d(12, 4, 3, padding=1))
    return affine_at_random(net.double().train())


def cuts_of(net, x, tile, storage="memory"):
    return Streaming(net, tile, checkpoints=storage)._prepare(source_of(x))[2]


# ------------------------------------------------------------------ equal to autograd

@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_training_step_equals_conventional(name, storage):
    """test_norms' networks (chains, ResNet blocks, DenseNet, GroupNorm/InstanceNorm, 1D)."""
    build, shape, extra = NETWORKS[name]
    torch.manual_seed(0)
    net = affine_at_random(build().double().train())
    tile = tuple(r.min_tile_size + extra for r in streamcnn.receptive_field(net, len(shape) - 2))
    cmp = compare(net, rand(*shape), tile, checkpoints=storage, paths=RANDOM)
    assert cmp.worst <= F64, cmp


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
@pytest.mark.parametrize("storage, reuse", [("memory", True), ("disk", True), ("disk", "small")])
def test_every_entry_path_with_squeeze_and_excitation(storage, reuse):
    """Every entry path, each tile's final backward in segments between the stored maps (the
    least-memory settings too: maps on disk, ``reuse_memory="small"``)."""
    net, x = efficientnet_like(), rand(2, 3, 67, 61)
    assert cuts_of(net, x, 40, storage) is not None
    cmp = compare(net, x, 40, checkpoints=storage, reuse_memory=reuse, paths=ALL_RANDOM)
    assert cmp.worst <= F64, cmp


def test_many_levels_at_the_minimum_tile():
    net = blocks(6)
    tile = streamcnn.receptive_field(net, 2)[0].min_tile_size
    x = rand(1, 2, 3 * tile + 5, 2 * tile + 3)
    assert cuts_of(net, x, tile) is not None
    cmp = compare(net, x, tile, checkpoints="memory", paths=RANDOM)
    assert cmp.worst <= F64, cmp


def test_pixel_loss():
    net, x = blocks(4), rand(2, 2, 45, 39)
    target = torch.randint(0, 3, (2, 45, 39), generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(net)
    loss = Streaming(net, 24, checkpoints="memory").pixel_loss(
        x, target, lambda y, t: F.cross_entropy(y, t, reduction="none"))
    loss.backward()
    loss0 = F.cross_entropy(ref(x), target)
    loss0.backward()
    assert rel_err(loss.detach(), loss0.detach()) <= F64
    for p, p0 in zip(net.parameters(), ref.parameters()):
        assert rel_err(p.grad, p0.grad) <= F64


def test_float32_channels_last():
    """float32 on the CPU (tiles in channels-last, whose layout the stored maps keep): as
    accurate as recomputing from the image, against float64 autograd."""
    net = blocks(4, 8).float()
    x = rand(2, 2, 70, 66).float()
    want = compare(net.double(), x.double(), 30, checkpoints=False, paths=RANDOM[:1])
    assert want.worst <= F64
    got = {s: compare(net.float(), x, 30, checkpoints=s, paths=RANDOM[:1])
           for s in (False, "memory")}
    assert got["memory"].worst <= 1e-4, got["memory"]
    assert got["memory"].worst <= 10 * got[False].worst + 1e-6


def test_uint8_array_with_a_transform():
    net = efficientnet_like().float()
    image = torch.randint(0, 256, (1, 3, 70, 64), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1)).numpy()
    to_float = lambda t: t.float() / 255  # noqa: E731
    ref = copy.deepcopy(net)
    y = Streaming(net, 40, transform=to_float, checkpoints="memory")(image)
    y.square().sum().backward()
    y0 = ref(to_float(torch.from_numpy(image)))
    y0.square().sum().backward()
    assert rel_err(y.detach(), y0.detach()) <= 1e-4
    for p, p0 in zip(net.parameters(), ref.parameters()):
        assert rel_err(p.grad, p0.grad) <= 1e-3  # (float32 gradients through five levels of (N1))


# ------------------------------------------------------------------ storage

def _step(net, x, tile, storage, seed=5):
    model = Streaming(net, tile, checkpoints=storage)
    net.zero_grad()
    y = model(x)
    (y * rand(*y.shape, seed=seed)).sum().backward()
    return y.detach(), [p.grad.clone() for p in net.parameters()]


def test_memory_and_disk_are_bit_identical_and_close_to_recomputing(tmp_path):
    net, x = efficientnet_like(), rand(2, 3, 67, 61)
    state = copy.deepcopy(net.state_dict())
    found = {}
    for storage in (False, "memory", "disk", str(tmp_path)):
        net.load_state_dict(state)
        found[storage] = _step(net, x, 40, storage)
    for storage in ("disk", str(tmp_path)):
        assert torch.equal(found[storage][0], found["memory"][0])
        assert all(torch.equal(a, b) for a, b in zip(found[storage][1], found["memory"][1]))
    y, grads = found["memory"]
    y0, grads0 = found[False]
    assert rel_err(y, y0) <= F64
    scale = max(g.abs().max() for g in grads0)  # (conv biases before BatchNorm: zero exactly)
    assert max((g - g0).abs().max() / scale for g, g0 in zip(grads, grads0)) <= F64


def _mapped(folder) -> int:
    """How many mappings of this process are of files under ``folder``."""
    with open("/proc/self/maps") as f:
        return sum(str(folder) in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_disk_maps_no_file_between_accesses(tmp_path):
    """A stored file is mapped only for the length of one access (a read of a span, a write
    or an add of a part), so no page of it stays in the process's resident set between
    accesses: checked at every convolution of every tile of every pass, and after the step.
    The numbers are memory storage's, bit for bit."""
    net, x = efficientnet_like(), rand(2, 3, 67, 61)
    state = copy.deepcopy(net.state_dict())
    seen = []  # (files stored, files mapped) at each convolution call

    def check(module, args):
        seen.append((sum(len(files) for _, _, files in os.walk(tmp_path)), _mapped(tmp_path)))

    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_pre_hook(check)  # (a leaf's hook: the passes still start at cuts)
    found = {}
    for storage in ("memory", str(tmp_path)):
        net.load_state_dict(state)
        seen.clear()
        found[storage] = _step(net, x, 40, storage)
    assert max(stored for stored, _ in seen) > 0, "test bug: nothing was stored on disk"
    assert [mapped for _, mapped in seen] == [0] * len(seen)
    assert _mapped(tmp_path) == 0
    (y, grads), (y0, grads0) = found[str(tmp_path)], found["memory"]
    assert torch.equal(y, y0)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads0))


def test_files_are_removed_after_a_step(tmp_path):
    net, x = blocks(4), rand(1, 2, 60, 52)
    model = Streaming(net, 24, checkpoints=str(tmp_path))
    y = model(x)
    assert os.listdir(tmp_path), "test bug: nothing was stored on disk"
    y.square().sum().backward()
    del y
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_files_are_removed_at_once_when_a_pass_fails(tmp_path):
    net, x = blocks(4), rand(1, 2, 60, 52)
    calls = []

    def fail_late(module, args):
        calls.append(1)
        if len(calls) == 3:  # (in the third pass, after two stored their maps)
            assert os.listdir(tmp_path), "test bug: nothing was stored on disk"
            raise RuntimeError("disk full")

    net[6].register_forward_pre_hook(fail_late)
    with pytest.raises(RuntimeError, match="disk full"):
        Streaming(net, 24, checkpoints=str(tmp_path))(x)
    assert len(calls) == 3
    assert os.listdir(tmp_path) == []


def test_no_grad_forward_keeps_nothing(tmp_path):
    net, x = blocks(4), rand(1, 2, 60, 52)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        y = Streaming(net, 24, checkpoints=str(tmp_path))(x)
        assert os.listdir(tmp_path) == []
        assert rel_err(y, ref(x)) <= F64


def test_bad_storage_is_refused():
    with pytest.raises(ValueError, match="checkpoints must be one of"):
        Streaming(blocks(2), 24, checkpoints="ram")
    with pytest.raises(ValueError, match="no such folder"):
        Streaming(blocks(2), 24, checkpoints="/nonexistent/folder")


# ------------------------------------------------------------------ where passes start

def _conv_calls(net, run) -> list[int]:
    """How often each convolution of ``net`` ran during ``run()``: ``F.conv2d`` counted by
    its weight's memory (a hook's counter would change the module, which streaming refuses
    between a forward and its backward)."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    which = {c.weight.data_ptr(): i for i, c in enumerate(convs)}
    counts = [0] * len(convs)
    conv2d = F.conv2d

    def counted(input, weight, *args, **kwargs):
        counts[which[weight.data_ptr()]] += 1
        return conv2d(input, weight, *args, **kwargs)

    F.conv2d = counted
    try:
        run()
    finally:
        F.conv2d = conv2d
    return counts


@pytest.mark.parametrize("storage", [False, "memory"])
def test_each_layer_runs_in_one_forward_pass_not_one_per_level(storage):
    """k levels in a chain: from the image, the statistics pass of level j recomputes every
    convolution before it, so convolution i runs in k - i passes and the forward, and each
    backward-terms pass runs all of them; from checkpoints, each runs in one statistics pass,
    and the forward's tiles but the first start after the last level (the last convolution,
    after every BatchNorm, runs in the forward only); in the backward, in one backward-terms
    pass each, which is also its final backward (``function.Fused``: above the gradient cut
    a pass starts from, every term is known), but for the layers below the lowest such cut:
    the first convolution runs in the final backward only, the second there and in the
    lowest level's terms pass."""
    k = 6
    net, x = blocks(k), rand(1, 2, 64, 56)
    tiles = streamcnn.plan(net, x.shape, 24).num_tiles
    model = Streaming(net, 24, checkpoints=storage)
    found = {}
    forward = _conv_calls(net, lambda: found.setdefault("y", model(x)))
    backward = _conv_calls(net, lambda: found["y"].sum().backward())
    if storage is False:
        assert forward == [(k - i + 1) * tiles for i in range(k + 1)]
        assert backward == [(k + 1) * tiles] * (k + 1)
    else:
        assert forward == [tiles + 1] * k + [tiles]
        assert backward == [tiles, 2 * tiles] + [tiles] * (k - 1)


def test_a_forward_hook_sees_every_tile_of_the_forward():
    """The forward's tiles start at the checkpoint after the last level only where no module
    has a forward hook: with one, it sees every tile from the image, as without checkpoints."""
    net, x = blocks(4), rand(1, 2, 60, 52)
    tiles = streamcnn.plan(net, x.shape, 24).num_tiles
    model = Streaming(net, 24, checkpoints="memory")
    seen = []
    handle = net[0].register_forward_hook(lambda m, a, o: seen.append(1))
    y = model(x)
    handle.remove()
    assert len(seen) == 2 * tiles  # the first level's statistics pass, and the forward
    assert rel_err(y.detach(), copy.deepcopy(net)(x).detach()) <= F64


def test_backward_hooks_above_the_last_gradient_cut():
    """The terms passes do the final backward above their gradient cuts (``function.Fused``),
    so a backward hook on a layer there runs in them: one that reads gradients keeps working
    (the step equals conventional autograd's), one that returns a new gradient is refused
    there, naming its layer, as the final backward refuses it."""
    from streamcnn.errors import StreamingError

    net, x = blocks(4), rand(1, 2, 60, 52)
    ref = copy.deepcopy(net)
    seen = []
    handle = net[-2].register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    y = Streaming(net, 24, checkpoints="memory")(x)
    y.backward(rand(*y.shape, seed=4))
    handle.remove()
    y0 = ref(x)
    y0.backward(rand(*y0.shape, seed=4))
    assert seen
    for p, p0 in zip(net.parameters(), ref.parameters()):
        assert rel_err(p.grad, p0.grad) <= F64
    net[-2].register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(min=0),))
    y = Streaming(net, 24, checkpoints="memory")(x)
    with pytest.raises(StreamingError, match=r"a backward hook on layer '\d+' \(ReLU\) returned "
                                             r"a new gradient"):
        y.sum().backward()


def test_update_bn_equals_torch(tmp_path):
    from torch.optim.swa_utils import update_bn

    net = efficientnet_like()
    ref = copy.deepcopy(net)
    images = [rand(2, 3, 67, 61, seed=s) for s in range(2)]
    update_bn(images, ref)
    for storage in ("memory", str(tmp_path)):
        streamcnn.update_bn(images, net, 40, checkpoints=storage)
        for b, b0 in zip(net.buffers(), ref.buffers()):
            assert rel_err(b.double(), b0.double()) <= F64
        assert os.listdir(tmp_path) == []


def test_update_bn_runs_each_layer_once_per_image():
    k = 6
    net = blocks(k)
    x = rand(1, 2, 64, 56)
    tiles = streamcnn.plan(net, x.shape, 24).num_tiles
    calls = _conv_calls(net, lambda: streamcnn.update_bn([x], net, 24, checkpoints="memory"))
    assert calls[:k] == [tiles] * k  # (the last convolution feeds no BatchNorm: never run)


def test_channel_stats_agree_with_recomputing():
    net = efficientnet_like()
    x = rand(2, 3, 67, 61)
    found = [streamcnn.channel_stats(net, x, 40, ["2", "3"], checkpoints=s) for s in (False, "memory")]
    for name in ("2", "3"):
        assert rel_err(found[1][name].mean, found[0][name].mean) <= F64
        assert rel_err(found[1][name].var, found[0][name].var) <= F64


# ------------------------------------------------------------------ when passes start at the image

class _Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = blocks(3)

    def forward(self, x):
        return self.body(x)


def test_a_hook_on_a_traced_through_module_keeps_passes_at_the_image():
    """The program runs leaf modules (and their hooks), not those of modules fx traced
    through: such a hook must see every pass as before, so no checkpoints then."""
    net = _Hooked()
    seen = []
    net.body.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    x = rand(1, 2, 60, 52)
    assert cuts_of(net, x, 24) is None
    tiles = streamcnn.plan(net, x.shape, 24).num_tiles
    with torch.no_grad():
        Streaming(net, 24)(x)
    assert len(seen) == 4 * tiles  # three statistics passes and the forward


def test_cuts_store_feature_maps_only():
    """A cut that a pooled value (an SE gate's) crosses is not stored: the pass starts
    earlier."""
    net = efficientnet_like()
    x = rand(2, 3, 67, 61)
    graph, _, cuts = Streaming(net, 40)._prepare(source_of(x))
    program = ck.Program(graph)
    for cut in list(cuts.forward.values()) + [c for c in cuts.gradient.values() if c]:
        assert all(graph.steps[s].kind != "global" for s in cut.steps)
        assert set(cut.names) == set(program.crossing(cut.position)) or cut.image


class _SplitThenNormalise(nn.Module):
    """torch.split's pieces each through training-mode BatchNorm (as timm's selective kernel
    splits its input among branches): a cut between the split and its pieces is crossed by
    the split's tuple, which is not a map and must not be stored."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b = (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2))
                          for _ in range(2))
        self.last = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3))

    def forward(self, x):
        pieces = torch.split(self.conv(x), 2, 1)
        return self.last(torch.cat([self.a(pieces[0]), self.b(pieces[1])], 1))


@pytest.mark.parametrize("storage", STORAGE)
def test_a_split_tuple_is_not_stored(storage):
    net = affine_at_random(_SplitThenNormalise().double().train())
    x = rand(2, 3, 30, 28)
    graph, _, cuts = Streaming(net, 14, checkpoints="memory")._prepare(source_of(x))
    split = next(n.name for n in graph.graph.nodes if n.target is torch.split)
    assert split in graph.structures
    stored = [c for c in list(cuts.forward.values()) + list(cuts.gradient.values()) if c]
    assert stored and all(split not in c.names for c in stored)
    cmp = compare(net, x, 14, checkpoints=storage, paths=RANDOM)
    assert cmp.worst <= F64, cmp


class _InPlaceAfterCut(nn.Module):
    """A map ``s`` that crosses a stored cut and is changed in place after it, between two
    normalisations of one level: every pass that starts at that cut changes it again, so a
    pass reading a view of the store would see the change of the pass before. One channel,
    one sample, one tile across: a tile's span of the stored map is then contiguous. (No
    convolution bias before BatchNorm: its gradient is zero in exact arithmetic.)"""

    def __init__(self):
        super().__init__()
        conv = lambda bias=False: nn.Conv2d(1, 1, 3, padding=1, bias=bias)  # noqa: E731
        self.conv1, self.skip, self.conv2 = conv(), conv(), conv()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(1), nn.BatchNorm2d(1), nn.BatchNorm2d(1)

    def forward(self, x):
        a, s = self.conv1(x), self.skip(x)
        b = self.bn1(a)
        s.tanh_()
        t = self.bn2(s)
        return self.bn3(self.conv2(torch.relu(b) + torch.relu(t)))


def test_a_stored_map_changed_in_place_after_its_cut():
    net = affine_at_random(_InPlaceAfterCut().double().train())
    x = rand(1, 1, 64, 16)
    cuts = cuts_of(net, x, 20)
    assert cuts is not None and "module_skip" in cuts.forward[2].names, "test bug: s is not stored"
    cmp = compare(net, x, 20, checkpoints="memory", paths=RANDOM)
    assert cmp.worst <= F64, cmp


def test_autocast_bfloat16():
    """Under autocast (bfloat16 on the CPU: the stored maps keep the tiles' dtypes), as close
    to conventional autocast as passes from the image are: both runs round the same layers
    (test_mixed_precision derives the budget), so the gap may differ by summation order
    only; 2x the one without checkpoints, plus a unit roundoff, bounds it."""
    net = efficientnet_like().float()
    x = rand(2, 3, 67, 61).float()
    state = copy.deepcopy(net.state_dict())
    found = {}
    for storage in (None, False, "memory"):
        net.load_state_dict(state)
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x) if storage is None else Streaming(net, 40, checkpoints=storage)(x)
        (y.float() * rand(*y.shape, seed=9).float()).sum().backward()
        found[storage] = (y.detach().float(), [p.grad.clone() for p in net.parameters()])
    u = 2.0 ** -8
    for k in range(2):
        ref = found[None][k] if k == 0 else torch.cat([g.flatten() for g in found[None][1]])
        err = {s: rel_err(found[s][k] if k == 0 else torch.cat([g.flatten() for g in found[s][1]]), ref)
               for s in (False, "memory")}
        assert err["memory"] <= 2 * err[False] + u, err
