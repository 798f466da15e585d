"""The autograd contract: wherever conventional autograd gives a gradient or an error,
``Streaming`` gives the same gradient or an error - never a different number.

One test per way of using a module that torch allows (the audit's items 1-10). Each
runs the scenario conventionally and streamed, and asserts that streaming gives
conventional backprop's gradients (float64, 1e-10 relative: the same sums in another
order) or raises where conventional autograd raises, or with a clear error naming
the module where streaming cannot recompute exactly.
"""

import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from streamcnn import Streaming, StreamingError
from streamcnn.testing import rel_err

F64 = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated")


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def front(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1)).double()


def model(front_module):
    return nn.Sequential(front_module, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).double()


def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_same(got, ref):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert (g is None) == (r is None), f"gradient {i}: streamed {g is not None}, conventional {r is not None}"
        if r is not None:
            assert rel_err(g, r) <= F64, f"gradient {i}"


# ------------------------------------------------------------- 1. weights that are not parameters

def _cpu_replicate(network, n):
    """torch.nn.parallel.replicate with its CUDA-only broadcast replaced by differentiable
    copies on the CPU: the replicas hold their weights as plain attributes, as nn.DataParallel's."""
    rep = sys.modules["torch.nn.parallel.replicate"]
    original = rep._broadcast_coalesced_reshape
    rep._broadcast_coalesced_reshape = lambda tensors, devices, detach=False: [
        [t.detach() if detach else t * 1 for t in tensors] for _ in devices]
    try:
        return rep.replicate(network, list(range(n)))
    finally:
        rep._broadcast_coalesced_reshape = original


@pytest.mark.parametrize("streamed", [False, True])
def test_data_parallel_replicas_train_the_streamed_layers(streamed):
    """DataParallel's forward: replicate, run each replica on its share, gather. The
    replicas' streamed layers hold weights as plain attributes (``parameters()`` is
    empty); their gradients must still reach the original parameters."""
    def run(stream):
        net = model(Streaming(front(), 12) if stream else front())
        replicas = _cpu_replicate(net, 2)
        assert list(replicas[0].parameters()) == []
        out = torch.cat([r(x) for r, x in zip(replicas, rand(4, 3, 30, 26).chunk(2))])
        out.pow(2).sum().backward()
        return grads(net.parameters())

    ref = run(False)
    assert all(g is not None for g in ref)
    assert_same(run(streamed), ref)


def test_weight_computed_by_another_network():
    """A hypernetwork: the conv's weight is ``2 * z``, a plain tensor attribute."""
    def run(stream):
        net = front()
        z = (net[0].weight.detach() / 2).requires_grad_()
        del net[0].weight
        net[0].weight = 2 * z
        (Streaming(net, 12) if stream else net)(rand(2, 3, 30, 26)).sum().backward()
        return [z.grad] + grads(p for p in net.parameters())

    assert_same(run(True), run(False))


def test_functional_call_then_autograd_grad():
    """torch.func.functional_call swaps the module's weights for the call only; the
    backward runs after the module holds its own weights again."""
    def run(stream):
        net = front()
        wrapped = Streaming(net, 12) if stream else net
        prefix = "module." if stream else ""
        params = {prefix + "0.weight": (net[0].weight.detach() * 1.5).requires_grad_(),
                  prefix + "3.bias": (net[3].bias.detach() + 1).requires_grad_()}
        out = torch.func.functional_call(wrapped, params, (rand(1, 3, 30, 26),))
        return list(torch.autograd.grad(out.pow(2).sum(), list(params.values())))

    assert_same(run(True), run(False))


def test_tensor_that_requires_grad_outside_the_module_is_refused():
    """A closure over a tensor that requires grad cannot be recomputed with: an error,
    not a missing gradient."""
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    class Scaled(nn.Module):
        def forward(self, x):
            return x * scale.expand(1)

    net = nn.Sequential(front(), Scaled())
    with pytest.raises(StreamingError, match=r"reads a tensor of shape \(\) that requires grad but "
                                             r"is not a parameter, buffer or attribute"):
        Streaming(net, 12)(rand(1, 3, 30, 26))


# ------------------------------------------------------------- 2. in-place changes before backward

def test_parameter_changed_in_place_before_backward_raises_as_conventional():
    """An optimiser step between forward and backward (as in GAN training)."""
    for stream in (False, True):
        net = front()
        y = (Streaming(net, 12) if stream else net)(rand(1, 3, 30, 26))
        with torch.no_grad():
            net[3].weight.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_buffer_changed_in_place_before_backward_raises_as_conventional():
    for stream in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double().eval()
        y = (Streaming(net, 12) if stream else net)(rand(1, 3, 30, 26))
        net[1].running_var.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


# ------------------------------------------------------------- 3. modes switched before backward

def test_train_eval_switch_between_forward_and_backward_is_refused():
    """The backward would recompute BatchNorm in training mode: refuse, naming it, and
    leave the running statistics untouched."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double().eval()
    y = Streaming(net, 12)(rand(1, 3, 30, 26))
    stats = net[1].running_mean.clone()
    net.train()
    with pytest.raises(StreamingError, match=r"layer '1' \(BatchNorm2d\) was switched to train mode "
                                             r"between the streamed forward and its backward"):
        y.sum().backward()
    assert torch.equal(net[1].running_mean, stats)


# ------------------------------------------------------------- 4. state changed by every call

def test_stateful_hook_spectral_norm_in_training_is_refused():
    """nn.utils.spectral_norm in training mode updates its power-iteration vector on every
    call (once per tile here, and again per tile in the backward): refused by name."""
    net = front()
    nn.utils.spectral_norm(net[3])
    with pytest.raises(StreamingError, match=r"layer '3' \(Conv2d\) changed its tensor 'weight_u' "
                                             r"in place while a tile ran"):
        Streaming(net, 12)(rand(1, 3, 30, 26))


def test_parametrized_spectral_norm_in_training_is_refused():
    net = front()
    nn.utils.parametrizations.spectral_norm(net[3])
    with pytest.raises(StreamingError, match=r"changed its tensor '_u' in place while a tile ran"):
        Streaming(net, 12)(rand(1, 3, 30, 26))


@pytest.mark.parametrize("kind", ["hook", "parametrization"])
def test_spectral_norm_in_eval_streams(kind):
    net = front()
    (nn.utils.spectral_norm if kind == "hook" else nn.utils.parametrizations.spectral_norm)(net[3])
    net.eval()
    assert streamcnn.testing.compare(net, rand(2, 3, 30, 26), 12).worst <= F64


# ------------------------------------------------------------- 5. one module used twice

def test_shared_conv_applied_twice_has_the_receptive_field_of_two():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.Tanh(), conv).double()
    rf = streamcnn.receptive_field(net, 2)[0]
    assert (rf.size, rf.offset) == (5, 2)
    assert streamcnn.testing.compare(net, rand(2, 3, 33, 29), rf.min_tile_size).worst <= F64


def test_reused_max_pool():
    torch.manual_seed(0)
    pool = nn.MaxPool2d(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), pool, nn.Conv2d(4, 4, 3, padding=1), pool).double()
    rf = streamcnn.receptive_field(net, 2)[0]
    assert (rf.size, rf.stride) == (10, 4)
    assert streamcnn.testing.compare(net, rand(1, 3, 45, 38), 20).worst <= F64


# ------------------------------------------------------------- 6-7. gradients asked for at backward time

def test_parameter_frozen_after_forward():
    def run(stream):
        net = front()
        y = (Streaming(net, 12) if stream else net)(rand(1, 3, 30, 26))
        net[0].weight.requires_grad_(False)
        y.pow(2).sum().backward()
        return grads(net.parameters())

    ref = run(False)
    assert ref[0] is None and ref[1] is not None
    assert_same(run(True), ref)


def test_autograd_grad_of_one_parameter_computes_only_that(monkeypatch):
    """With x.requires_grad, autograd.grad(loss, [w]) must not build the image-sized input
    gradient nor the other parameters' gradients."""
    asked = []
    real = streamcnn.function.TileRunner.backward

    def spy(self, x, grad_out, need_x, tensors, wrt, **kwargs):
        asked.append((need_x, len(wrt)))
        return real(self, x, grad_out, need_x, tensors, wrt, **kwargs)

    monkeypatch.setattr(streamcnn.function.TileRunner, "backward", spy)
    net = front()
    x = rand(1, 3, 30, 26).requires_grad_()
    ref = torch.autograd.grad(net(x).pow(2).sum(), [net[3].weight])
    got = torch.autograd.grad(Streaming(net, 12)(x).pow(2).sum(), [net[3].weight])
    assert asked == [(False, 1)]
    assert_same(got, ref)
    asked.clear()
    got = torch.autograd.grad(Streaming(net, 12)(x).pow(2).sum(), [x])
    assert asked == [(True, 0)]
    assert_same(got, torch.autograd.grad(net(x).pow(2).sum(), [x]))


# ------------------------------------------------------------- 8. checkpoints

def test_state_dict_keys_are_the_unwrapped_modules():
    """A checkpoint of the bare network loads into the wrapped one and back."""
    bare = model(front(0))
    wrapped = model(Streaming(front(1), 12))
    assert list(wrapped.state_dict()) == list(bare.state_dict())
    wrapped.load_state_dict(bare.state_dict())
    for p, q in zip(wrapped.parameters(), bare.parameters()):
        assert torch.equal(p, q)
    other = model(front(2))
    other.load_state_dict(wrapped.state_dict())
    for p, q in zip(other.parameters(), bare.parameters()):
        assert torch.equal(p, q)
    # the wrapped keys, as saved by older versions, load too
    old = {k.replace("0.", "0.module.", 1) if k.startswith("0.") else k: v
           for k, v in bare.state_dict().items()}
    model(Streaming(front(3), 12)).load_state_dict(old)
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapped.load_state_dict({})


def test_functional_call_with_the_state_dict_of_a_model_holding_streaming():
    """``torch.func.functional_call(model, model.state_dict(), ...)``: the state dict's keys
    are the unwrapped ones; Streaming resolves them (an AttributeError 'Streaming has no
    attribute 0' before). Outputs and the gradients of the passed tensors equal the bare
    model's, on ``autograd.grad``; the model's own parameters stay untouched."""
    bare, wrapped = model(front(0)), model(Streaming(front(0), 12))
    x = rand(1, 3, 30, 26)
    runs = []
    for net in (bare, wrapped):
        tensors = {k: v.detach().clone().requires_grad_() for k, v in net.state_dict().items()
                   if v.is_floating_point()}
        y = torch.func.functional_call(net, tensors, (x,))
        runs.append((y, torch.autograd.grad(y.pow(2).sum(), list(tensors.values())), list(tensors)))
    (y0, g0, k0), (y1, g1, k1) = runs
    assert k0 == k1
    assert rel_err(y1, y0) <= F64
    assert_same(list(g1), list(g0))
    assert all(p.grad is None for p in wrapped.parameters())
    assert getattr(wrapped[0], "0") is wrapped[0].module[0]
    with pytest.raises(AttributeError):  # (no layer of that name: a plain miss)
        wrapped[0].no_such_layer
    with pytest.raises(AttributeError):  # (not a RecursionError on an object not yet set up)
        Streaming.__new__(Streaming).no_such_layer
    import copy
    import pickle
    for twin in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert rel_err(twin(x), wrapped(x)) <= F64


# ------------------------------------------------------------- 9. reparametrised and special layers

@pytest.mark.parametrize("make", [
    lambda c: nn.utils.parametrizations.weight_norm(c),
    lambda c: nn.utils.weight_norm(c),
], ids=["weight_norm parametrization", "weight_norm hook"])
def test_reparametrised_conv_streams(make):
    net = front()
    net[0] = make(net[0])
    assert streamcnn.testing.compare(net, rand(2, 3, 30, 26), 12).worst <= F64


def test_lazy_conv_after_initialisation_streams_and_before_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU()).double()
    with pytest.raises(StreamingError, match=r"layer '0' \(LazyConv2d\) cannot be streamed: it is a "
                                             r"lazy module.*call the module once"):
        Streaming(net, 12)(rand(1, 3, 30, 26))
    net(rand(1, 3, 8, 8))
    assert streamcnn.testing.compare(net, rand(2, 3, 30, 26), 12).worst <= F64


def test_sync_batchnorm_in_eval_streams():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4)).double().eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    assert streamcnn.testing.compare(net, rand(2, 3, 30, 26), 12).worst <= F64


def test_grad_cam_hook_is_refused_with_a_clear_error():
    """A forward hook that calls output.register_hook (Grad-CAM) on a layer inside the
    streamed module: there is no whole-image activation to hook."""
    net = front()
    net[3].register_forward_hook(lambda m, i, o: o.register_hook(lambda g: None))
    net(rand(1, 3, 30, 26).requires_grad_())  # conventionally fine
    with pytest.raises(StreamingError, match="calls Tensor.register_hook on an activation.*register "
                                             "the hook on the Streaming module's output"):
        Streaming(net, 12)(rand(1, 3, 30, 26).requires_grad_())


@pytest.mark.parametrize("kind", ["forward hook", "forward pre-hook", "forward hook with kwargs"])
def test_forward_hooks_that_return_a_new_value_are_refused(kind):
    """A forward hook that returns a new output runs on each tile: ``o.flip(-1)`` flips each
    tile, not the map (110 % off, silently, before). Refused, naming the layer; a hook that
    returns None or the output it was given still runs."""
    net, x = front(), rand(1, 3, 30, 26)
    if kind == "forward hook":
        handle = net[3].register_forward_hook(lambda m, i, o: o.flip(-1))
    elif kind == "forward pre-hook":
        handle = net[3].register_forward_pre_hook(lambda m, args: (args[0].flip(-1),))
    else:
        handle = net[3].register_forward_hook(lambda m, a, kw, o: o * 2, with_kwargs=True)
    net(x)  # conventionally fine
    what = "input" if "pre" in kind else "output"
    with pytest.raises(StreamingError, match=rf"a {kind.replace(' with kwargs', '')} on layer '3' "
                                             rf"\(Conv2d\) returned a new {what}"):
        Streaming(net, 12)(x)
    handle.remove()
    seen = []
    net[3].register_forward_hook(lambda m, i, o: seen.append(o.shape) or o)  # returns o itself
    net[3].register_forward_pre_hook(lambda m, args: None)
    assert rel_err(Streaming(net, 12)(x), net(x)) <= F64
    assert len(seen) > 2


def test_hook_on_the_streamed_output_sees_the_whole_gradient():
    net = front()
    y = Streaming(net, 12)(rand(1, 3, 30, 26))
    seen = []
    y.register_hook(lambda g: seen.append(g.shape))
    y.sum().backward()
    assert seen == [y.shape]


@pytest.mark.parametrize("keep_graphs, kept", [(0, 0), (None, 1), (10**12, "all but the first")])
def test_hooks_fire_per_tile_with_tile_shapes(keep_graphs, kept):
    """Documented behaviour: forward hooks once per tile in the forward and again in the
    backward recomputation (not for the tiles whose graphs the forward kept, when asked);
    full backward hooks once per tile, with tile-sized gradients."""
    net = front()
    fwd, bwd = [], []
    net[3].register_forward_hook(lambda m, i, o: fwd.append(tuple(o.shape[2:])))
    net[3].register_full_backward_hook(lambda m, gi, go: bwd.append(tuple(go[0].shape[2:])))
    x = rand(1, 3, 30, 26)
    tiles = streamcnn.plan(net, x.shape, 12).num_tiles
    streamed = Streaming(net, 12, keep_graphs=keep_graphs)
    streamed(x).sum().backward()
    kept = tiles - 1 if kept == "all but the first" else kept
    assert streamed.last_stats.backward.reused == kept
    assert len(fwd) == 2 * tiles - kept and len(bwd) == tiles
    assert max(max(s) for s in fwd + bwd) < 15  # tile-sized, not (15, 13)


# ------------------------------------------------------------- 10. torch.compile

class _Model(nn.Module):
    def __init__(self, front_module):
        super().__init__()
        self.front = front_module
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).double()

    def forward(self, x):
        return self.head(self.front(x) * 2)


def test_torch_compile_breaks_the_graph_once_around_the_tile_loop():
    """One clean graph break: the head is compiled, the tile loop runs eagerly (no
    convolution of the front end in any compiled graph), and new image shapes
    recompile only what torch itself recompiles."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    net = front()
    eager = _Model(Streaming(net, 12))
    compiled = torch.compile(eager, backend=backend)
    for shape in ((1, 3, 30, 26), (1, 3, 34, 40), (1, 3, 50, 44)):
        x = rand(*shape)
        assert rel_err(compiled(x), eager(x)) <= F64
    targets = [n.target for g in graphs for n in g.graph.nodes]
    assert len(graphs) <= 2, "recompiled for every image shape"
    assert F.adaptive_avg_pool2d in targets and torch.conv2d not in targets
    with pytest.raises(Exception, match="torch.compile compiles the model around the Streaming module"):
        torch._dynamo.reset()
        torch.compile(_Model(Streaming(front(), 12)), backend=backend, fullgraph=True)(rand(1, 3, 30, 26))
    torch._dynamo.reset()


def test_deepcopy_of_a_streamed_model_trains_alike():
    base = model(Streaming(front(), 12))
    clone = copy.deepcopy(base)
    x = rand(2, 3, 30, 26)
    base(x).sum().backward()
    clone(x).sum().backward()
    assert_same(grads(clone.parameters()), grads(base.parameters()))


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU for nn.DataParallel")
def test_real_data_parallel_on_gpus():
    """The same as the CPU replica test above, with torch's own nn.DataParallel."""
    def run(stream):
        net = model(Streaming(front(), 12) if stream else front()).cuda()
        dp = nn.DataParallel(net)
        dp(rand(4, 3, 30, 26).cuda()).pow(2).sum().backward()
        return grads(net.parameters())

    assert_same(run(True), run(False))


# ------------------------------------------------------------- 11. what is not a tensor

def _step(net, x, stream, tile=12, **kwargs):
    """Output and parameter gradients of one step, streamed or not (fixed output gradient)."""
    net.zero_grad(set_to_none=True)
    y = (Streaming(net, tile, **kwargs) if stream else net)(x)
    y.backward(rand(*y.shape, seed=5))
    return [y.detach()] + grads(net.parameters())


def test_a_hook_that_changes_gradients_is_refused():
    """Guided backprop clamps each layer's gradient: on a tile's part of the gradient that is
    not the clamp of the whole, so a backward hook (or pre-hook) that returns a new gradient
    raises, naming its layer. Hooks that only read gradients keep working (see above)."""
    hooks = {"hook": lambda m: m.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(min=0),)),
             "pre-hook": lambda m: m.register_full_backward_pre_hook(lambda m, go: (go[0].clamp(min=0),))}
    for kind, register in hooks.items():
        net = front()
        register(net[1])
        _step(net, rand(1, 3, 30, 26), stream=False)  # conventional autograd applies it
        with pytest.raises(StreamingError, match=rf"a backward {kind} on layer '1' \(ReLU\) returned "
                                                 r"a new gradient"):
            _step(net, rand(1, 3, 30, 26), stream=True)


def test_cached_parametrizations_get_their_gradient():
    """``parametrize.cached()`` around forward and backward: the weight a no-grad forward
    cached has no graph, so tiles evaluate parametrizations afresh."""
    from torch.nn.utils import parametrize

    def run(stream):
        torch.manual_seed(0)
        net = front()
        nn.utils.parametrizations.weight_norm(net[0])
        with parametrize.cached():
            return _step(net, rand(2, 3, 30, 26), stream)

    got, ref = run(True), run(False)
    assert all(g is not None for g in ref)
    assert_same(got, ref)


def test_an_array_refilled_before_backward_is_refused():
    """A loader that reuses its buffer: the backward reads every tile again and would see the
    next image; a tensor refilled in place raises through its version counter instead."""
    import numpy as np
    buffer = np.random.default_rng(0).integers(0, 256, (1, 3, 30, 26), dtype=np.uint8)
    y = Streaming(front(), 12, transform=lambda t: t.double() / 255)(buffer)
    buffer[:] = np.random.default_rng(1).integers(0, 256, buffer.shape, dtype=np.uint8)
    with pytest.raises(StreamingError, match=r"the input array changed between the streamed forward "
                                             r"and its backward \(the tile at \(0, 0\)"):
        y.sum().backward()
    x = rand(1, 3, 30, 26)
    y = Streaming(front(), 12)(x)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


class _PythonRandom(nn.Module):
    def forward(self, x):
        import random
        return x * random.uniform(0.9, 1.1)


class _GeneratorHeld(nn.Module):
    def __init__(self):
        super().__init__()
        self.rng = __import__("numpy").random.default_rng(0)

    def forward(self, x):
        return x * float(self.rng.random())


@pytest.mark.parametrize("where", ["python random in forward", "numpy global in transform",
                                   "numpy generator held by a layer", "torch rand in a hook"])
def test_random_draws_outside_the_trace_are_refused(where):
    """A draw fx cannot see (Python's or numpy's, or torch's inside a hook) would be made anew
    per tile and again in the backward: refused after the first tile."""
    import numpy as np
    net, kwargs = front(), {}
    if where == "python random in forward":
        net = nn.Sequential(net, _PythonRandom())
    elif where == "numpy global in transform":
        kwargs["transform"] = lambda t: t * float(np.random.rand())
    elif where == "numpy generator held by a layer":
        net = nn.Sequential(net, _GeneratorHeld())
    else:
        net[1].register_forward_hook(lambda m, i, o: o.mul_(torch.rand(()).item()))  # (in place)
    message = (r"layer '1' \(_GeneratorHeld\) drew random numbers from its generator 'rng'"
               if "generator" in where else r"a tile drew random numbers")
    with pytest.raises(StreamingError, match=message):
        Streaming(net, 12, **kwargs)(rand(1, 3, 30, 26))


def test_module_state_changed_between_forward_and_backward_is_refused():
    """The recomputation would run with the new state: a slope, a swapped layer, a new hook."""
    def changes():
        yield (lambda net: setattr(net[1], "negative_slope", 0.2),
               r"layer '1' \(LeakyReLU\) changed its attribute 'negative_slope' from 0\.01 to 0\.2 "
               r"between the streamed forward and its backward")
        yield (lambda net: net.__setitem__(1, nn.Tanh()), r"layer '1' \(LeakyReLU\) was replaced by a Tanh")
        yield (lambda net: net[3].register_forward_hook(lambda m, i, o: o * 2),
               r"layer '3' \(Conv2d\) had a hook added")

    for change, message in changes():
        net = front()
        net[1] = nn.LeakyReLU()
        y = Streaming(net, 12)(rand(1, 3, 30, 26))
        change(net)
        with pytest.raises(StreamingError, match=message):
            y.sum().backward()


def test_a_hook_whose_state_changes_on_every_call_is_refused():
    """A hook that counts its calls and acts on the count would act differently per tile."""
    net = front()
    calls = 0

    def hook(module, inputs, output):
        nonlocal calls
        calls += 1
        output.mul_(1.0 if calls < 3 else 2.0)  # (returning a new output is refused outright)

    net[3].register_forward_hook(hook)
    _step(net, rand(1, 3, 30, 26), stream=False)
    with pytest.raises(StreamingError, match=r"layer '3' \(Conv2d\) had a hook .* or a hook's state "
                                             r"\(a counter in its closure\) changed .* while a tile ran"):
        _step(net, rand(1, 3, 30, 26), stream=True)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_are_refused(transform):
    streamed = Streaming(front(), 12)
    x = rand(1, 3, 30, 26)
    run = (lambda: torch.func.grad(lambda x: streamed(x).sum())(x)) if transform == "grad" else (
        lambda: torch.func.vmap(streamed)(x[None]))
    with pytest.raises(StreamingError, match=r"does not run under torch\.func transforms"):
        run()


def test_a_module_built_in_inference_mode():
    """Its tensors have no version counter: it runs under no_grad, and training raises, as
    conventional autograd does (inference tensors cannot be saved for backward)."""
    with torch.inference_mode():
        net = front()
    x = rand(1, 3, 30, 26)
    with torch.no_grad():
        assert rel_err(Streaming(net, 12)(x), net(x)) <= F64
    for model in (net, Streaming(net, 12)):
        with pytest.raises(RuntimeError, match="[Ii]nference tensors cannot be saved for backward"):
            model(x).sum().backward()
        with pytest.raises(RuntimeError, match="[Ii]nference tensors cannot be saved for backward"):
            model(x.clone().requires_grad_()).sum().backward()


def test_a_float32_buffer_in_a_float64_model():
    """A custom layer's float32 buffer, promoted by torch: not refused before the tiles run."""
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.linspace(0.5, 2, 5).view(5, 1, 1))

        def forward(self, x):
            return x * self.scale

    net = nn.Sequential(front(), Scale())
    assert net[1].scale.dtype == torch.float32
    assert streamcnn.testing.compare(net, rand(2, 3, 30, 26), 12).worst <= F64


def test_an_image_array_of_a_tensor_is_that_tensor_channels_first():
    net = front()
    x = rand(1, 30, 26, 3).requires_grad_()
    y = Streaming(net, 12)(streamcnn.ImageArray(x, "NHWC"))
    y.backward(rand(*y.shape, seed=5))
    ref_x = x.detach().clone().requires_grad_()
    ref = net(ref_x.permute(0, 3, 1, 2))
    ref.backward(rand(*ref.shape, seed=5))
    assert rel_err(y, ref) <= F64 and rel_err(x.grad, ref_x.grad) <= F64


def test_split_into_sections_at_construction():
    """``torch.split(x, [2, 1], 1)`` on the input, whose channels are unknown at construction."""
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            u, v = torch.split(x, [2, 1], 1)
            return self.a(u) * self.b(v)

    net = Split().double()
    Streaming(net, 12)
    assert streamcnn.testing.compare(net, rand(2, 3, 30, 26), 12).worst <= F64
