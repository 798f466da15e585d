"""streamcnn.Streaming against conventional torch autograd (the oracle).

Tolerances: float64 1e-10 and float32 1e-4, relative to the largest magnitude
(``streamcnn.testing.rel_err``). Streaming computes the same sums in another
order (per-tile partial sums of the weight gradients, oneDNN kernels chosen per
tile shape), so results agree to rounding: ~1e-16 per operation in float64,
~1e-7 in float32, grown by the length of the sums (up to ~1e5 terms here).
"""

import copy

import pytest
import torch
import torch.nn as nn

import streamcnn
from streamcnn.testing import Path, compare, rel_err

F64, F32 = 1e-10, 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")



def fig2_net(dtype=torch.float64, seed=0):
    """The paper's Fig. 2/3 network: 3x3 convolutions with 3, 64 and 3 outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 64, 3, padding=1),
                         nn.Conv2d(64, 3, 3, padding=1)).to(dtype)


def table1_front(blocks=4, dtype=torch.float64, seed=0):
    """Table 1 (Imagenette): blocks of conv3x3 (16, 32, 64, 128 channels, padding 1),
    ReLU and 2x2 max-pool."""
    torch.manual_seed(seed)
    layers, c = [], 3
    for out in (16, 32, 64, 128)[:blocks]:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = out
    return nn.Sequential(*layers).to(dtype)


def rand(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_close(cmp, tol):
    assert cmp.worst <= tol, cmp


# ---------------------------------------------------------------- the paper's networks

def test_fig2_network_float64():
    assert_close(compare(fig2_net(), rand(2, 3, 100, 77), 32), F64)


def test_fig2_network_float32_channels_last_default():
    """float32 on CPU runs tiles in channels-last layout (oneDNN); values agree to rounding.
    Random output gradients only: from a sum loss each bias gradient sums 20480 terms of one
    sign, and conventional float32's own error then exceeds 1e-4 (test_graph_float32 judges
    float32 against float64 instead)."""
    paths = [Path(entry, method, "random") for entry, method in
             (("leaf", "grad"), ("leaf-grad", "backward"), ("non-leaf", "backward"))]
    assert_close(compare(fig2_net(torch.float32), rand(1, 3, 160, 128, dtype=torch.float32), 48,
                         paths=paths), F32)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fig2_network_float64_both_layouts(channels_last):
    assert_close(compare(fig2_net(), rand(1, 3, 70, 90), 30, channels_last=channels_last), F64)


def test_table1_first_four_layers_32px_tiles():
    """The paper streamed Table 1's first four layers (conv 16, pool, conv 32, pool)
    with 32x32 tiles; here with ReLU after each convolution, on a 160x160 image."""
    net = table1_front(blocks=2)
    assert_close(compare(net, rand(2, 3, 160, 160), 32), F64)
    # receptive field 10, stride 4: an interior tile owns 6 outputs, a step of 24 px
    plan = streamcnn.plan(net, (2, 3, 160, 160), 32)
    assert plan.tile_starts == ([0, 24, 48, 72, 96, 120, 144],) * 2
    assert plan.tile_stops == ([32, 56, 80, 104, 128, 152, 160],) * 2


def test_table1_eight_layers_need_47px_tiles():
    """All four conv/pool blocks: receptive field 46 at stride 16, so 32x32 tiles are
    too small (clear error) and 47 is the minimum, which streams exactly."""
    net = table1_front(blocks=4)
    with pytest.raises(streamcnn.TileTooSmallError, match=r"at least 47 pixels"):
        streamcnn.Streaming(net, 32)(rand(1, 3, 160, 160))
    assert_close(compare(net, rand(1, 3, 160, 160), 47), F64)
    assert_close(compare(net, rand(1, 3, 150, 131, seed=3), 64), F64)


# ---------------------------------------------------------------- geometry corner cases

LAYER_ZOO = {
    "strided_dilated_grouped": lambda: nn.Sequential(
        nn.Conv2d(4, 6, (5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2), groups=2),
        nn.GELU(), nn.Conv2d(6, 3, 3, stride=2, padding=3, bias=False)),
    "pools_with_padding": lambda: nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(3, 2, padding=1, dilation=2),
        nn.AvgPool2d(3, 2, padding=1, count_include_pad=True), nn.LeakyReLU(0.1, inplace=True),
        nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), nn.Conv2d(4, 2, 1)),
    "ceil_mode": lambda: nn.Sequential(
        nn.Conv2d(4, 3, 3), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
        nn.AvgPool2d(2, 3, padding=1, ceil_mode=True, count_include_pad=True),
        nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False)),
    "same_padding_even_kernel": lambda: nn.Sequential(
        nn.Conv2d(4, 3, 4, padding="same"), nn.Tanh(), nn.Conv2d(3, 3, (2, 5), padding="same",
                                                                 dilation=(3, 1))),
    "batchnorm_eval_nested": lambda: nn.Sequential(
        nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)),
        nn.Sequential(nn.Identity(), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(5, 2, 3, stride=2))),
    "inplace_first_layer": lambda: nn.Sequential(
        nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(4, 2, 3, padding=1), nn.SiLU(inplace=True)),
}


def _eval_with_stats(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return net.eval()


@pytest.mark.parametrize("name", sorted(LAYER_ZOO))
@pytest.mark.parametrize("shape,extra", [((2, 4, 29, 23), (0, 0)), ((1, 4, 73, 80), (5, 11)),
                                          ((1, 4, 19, 13), (100, 100))])
def test_layer_zoo_float64(name, shape, extra):
    """Tiles of the minimum size plus ``extra`` pixels (100: one tile, the whole image)."""
    torch.manual_seed(0)
    net = _eval_with_stats(LAYER_ZOO[name]().double())
    tile = tuple(rf.min_tile_size + e for rf, e in zip(streamcnn.receptive_field(net, 2), extra))
    assert_close(compare(net, rand(*shape), tile), F64)


def test_inplace_first_layer_leaves_input_untouched():
    net = LAYER_ZOO["inplace_first_layer"]().double()
    x = rand(1, 4, 40, 40)
    before = x.clone()
    streamcnn.Streaming(net, 16)(x).sum().backward()
    assert torch.equal(x, before)


def test_1d_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.MaxPool1d(3, 2, padding=1),
                        nn.Conv1d(4, 3, 3, stride=2, dilation=2), nn.AvgPool1d(2, ceil_mode=True),
                        nn.BatchNorm1d(3).eval()).double()
    for length, tile in ((301, 40), (97, 37), (30, 300)):
        assert_close(compare(net, rand(3, 2, length), tile), F64)


def test_batch_sizes():
    for n in (1, 3):
        assert_close(compare(fig2_net(), rand(n, 3, 45, 45), 20), F64)


# ---------------------------------------------------------------- one tile at a time

def test_forward_saves_nothing_but_the_input():
    """saved_tensors_hooks: the streamed forward packs only ``x`` and the module's own
    parameters (no new bytes); the conventional forward (control) packs activations."""
    net = fig2_net()
    x = rand(1, 3, 64, 64).requires_grad_()

    def packed_storages(model):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            model(x)
        return packed

    streamed = packed_storages(streamcnn.Streaming(net, 16))
    assert streamed, "the streamed forward should save its input"
    own = {t.untyped_storage().data_ptr() for t in [x, *net.parameters()]}
    assert all(t.untyped_storage().data_ptr() in own for t in streamed)
    conventional = packed_storages(net)
    xptr = x.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() != xptr for t in conventional)


def test_layers_see_at_most_one_tile():
    net = table1_front(blocks=2)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2:]))
             for m in net]
    streamcnn.Streaming(net, 32)(rand(1, 3, 150, 140).requires_grad_()).sum().backward()
    for h in hooks:
        h.remove()
    assert seen and max(max(s) for s in seen) <= 32


def test_backward_holds_one_tile_graph_at_a_time():
    """Track saved-for-backward bytes alive during the backward (freed when autograd
    drops them): at most one tile's worth, far below the whole image's."""
    net = fig2_net()
    x = rand(1, 3, 96, 96)
    live = {"now": 0, "max": 0}

    class Held:
        """What autograd keeps for a saved tensor; counted while it is alive."""

        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            live["now"] += self.n
            live["max"] = max(live["max"], live["now"])

        def __del__(self):
            live["now"] -= self.n

    def saved_bytes_max(model, inp, count_forward=True):
        live.update(now=0, max=0)
        y = None if count_forward else model(inp)  # the streamed forward saves only x
        with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
            (model(inp) if y is None else y).sum().backward()
        return live["max"]

    one_tile = saved_bytes_max(net, x[..., :24, :24].clone())
    streamed = saved_bytes_max(streamcnn.Streaming(net, 24), x, count_forward=False)
    whole = saved_bytes_max(net, x)
    assert 0 < streamed <= one_tile < whole / 10


# ---------------------------------------------------------------- training-loop behaviour

def test_short_training_run_float64():
    """Same initialisation, five SGD steps with momentum: identical losses and weights."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3))
    base = nn.Sequential(table1_front(blocks=2), head).double()
    streamed = copy.deepcopy(base)
    streamed[0] = streamcnn.Streaming(streamed[0], 32)
    xs = [rand(2, 3, 96, 80, seed=s) for s in range(5)]
    ys = [torch.tensor([0, 2]), torch.tensor([1, 1]), torch.tensor([2, 0]), torch.tensor([0, 1]),
          torch.tensor([2, 2])]
    losses = {}
    for name, model in (("conventional", base), ("streaming", streamed)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for x, y in zip(xs, ys):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert rel_err(torch.tensor(losses["streaming"]), torch.tensor(losses["conventional"])) <= F64
    assert losses["conventional"][0] != losses["conventional"][-1]  # it did train
    for p, q in zip(streamed.parameters(), base.parameters()):
        assert rel_err(p.detach(), q.detach()) <= F64


def test_gradient_accumulation():
    net = fig2_net()
    streamed = streamcnn.Streaming(net, 20)
    xs = [rand(1, 3, 50, 41, seed=s) for s in range(3)]
    net.zero_grad()
    for x in xs:
        net(x).square().mean().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for x in xs:
        streamed(x).square().mean().backward()
    for p, r in zip(net.parameters(), ref):
        assert rel_err(p.grad, r) <= F64


def test_no_grad_inference_builds_no_graph():
    net = fig2_net()
    x = rand(1, 3, 50, 50).requires_grad_()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = streamcnn.Streaming(net, 16)(x)
            ref = net(x)
        assert y.grad_fn is None and not y.requires_grad
        assert rel_err(y, ref) <= F64


def test_input_without_grad_and_frozen_params_give_plain_tensor():
    net = fig2_net().requires_grad_(False)
    y = streamcnn.Streaming(net, 16)(rand(1, 3, 40, 40))
    assert y.grad_fn is None


def test_frozen_layers():
    net = fig2_net()
    net[0].requires_grad_(False)
    net[2].bias.requires_grad_(False)
    x = rand(1, 3, 60, 50)
    g = rand(1, 3, 60, 50, seed=7)
    net(x).backward(g)
    ref = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad(set_to_none=True)
    streamcnn.Streaming(net, 21)(x).backward(g)
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, ref[n]) <= F64
        else:
            assert p.grad is None, n


def test_autograd_grad_returns_grads_without_touching_dot_grad():
    net = fig2_net()
    x = rand(1, 3, 40, 52).requires_grad_()
    w = net[1].weight
    ref = torch.autograd.grad(net(x).pow(2).sum(), [x, w])
    got = torch.autograd.grad(streamcnn.Streaming(net, 18)(x).pow(2).sum(), [x, w])
    assert rel_err(got[0], ref[0]) <= F64 and rel_err(got[1], ref[1]) <= F64
    assert all(p.grad is None for p in net.parameters()) and x.grad is None


def test_hooks_and_parameters_are_the_users():
    net = fig2_net()
    calls = []
    net[1].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = rand(1, 3, 40, 40)
    y = streamcnn.Streaming(net, 24)(x)
    n_forward = len(calls)
    y.sum().backward()
    plan = streamcnn.plan(net, x.shape, 24)
    assert n_forward == plan.num_tiles  # the forward runs each tile once
    assert len(calls) == 2 * plan.num_tiles  # and the backward recomputes each tile
    assert net[1].weight.grad is not None


def test_input_modified_after_forward_is_detected():
    """The input is saved with autograd's version check, like any saved tensor."""
    net = fig2_net()
    x = rand(1, 3, 30, 30).requires_grad_()
    h = x * 1
    y = streamcnn.Streaming(net, 16)(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_autocast_is_replayed_in_the_backward_recomputation():
    """Under CPU autocast (bfloat16) the backward recomputes tiles in bfloat16 too,
    as the forward did (seen by a hook); gradients agree with conventional autograd
    to bfloat16 precision (8-bit mantissa: 2^-8 = 4e-3 per rounding, a few roundings)."""
    net = fig2_net(torch.float32)
    dtypes = []
    net[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = rand(1, 3, 64, 64, dtype=torch.float32)
    g = rand(1, 3, 64, 64, dtype=torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).backward(g.bfloat16())
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = streamcnn.Streaming(net, 24)(x)
        y.backward(g.bfloat16())
    assert y.dtype == torch.bfloat16
    tiles = streamcnn.plan(net, x.shape, 24).num_tiles
    assert len(dtypes) == 2 * tiles and set(dtypes) == {torch.bfloat16}
    for p, r in zip(net.parameters(), ref):
        assert rel_err(p.grad, r) <= 3e-2
