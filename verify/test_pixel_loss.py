"""``Streaming.pixel_loss`` (a per-pixel loss, each tile run and backpropagated once) and
``Streaming(...)(x, out=array)`` (inference into an array) against conventional torch: the
oracle is ``loss_fn(module(x), target).mean()`` (or ``.sum()``) and ordinary autograd.

Tolerance: float64, 1e-10 relative (``F64``). The loss is the same per-pixel terms summed in
another order (per tile, then over tiles, in float64), and every gradient the same per-tile
contributions (Eqs. 5-7) summed in another order, so the two differ by float64 rounding
only, ~1e-16 times the number of terms; 1e-10 leaves room for that and for the
cancellations of the normalisations' whole-map terms (as verify/test_norms.py), while any
missing or double-counted tile, border or scale would show as an error of order 1. The
inference outputs are the same tile outputs copied into the array, equal to conventional
up to the convolutions' summation order within a tile (``F64`` too).
"""

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_entry_paths import MODELS as ENTRY_MODELS

import streamcnn
from streamcnn import Streaming, StreamingError
from streamcnn.testing import rel_err

F64 = 1e-10
CLASSES = 5
IGNORE = 255


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def seeded(net: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net.double()


# (network, input shape, tile size): each cut into several tiles per axis (checked below)
NETS = {
    "2d": (lambda: seeded(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(4, CLASSES, 3, padding=1))), (2, 3, 20, 22), 10),
    "2d-stride2": (lambda: seeded(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                                                nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(),
                                                nn.Conv2d(6, CLASSES, 1))), (1, 3, 26, 30), 12),
    "1d": (lambda: seeded(nn.Sequential(nn.Conv1d(3, 4, 5, padding=2), nn.Tanh(),
                                        nn.Conv1d(4, CLASSES, 3, padding=1))), (2, 3, 41), 14),
}

WEIGHTS = torch.rand(CLASSES, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
LOSSES = {  # name -> per-pixel loss, as a user would write it
    "ce": functools.partial(F.cross_entropy, reduction="none", weight=WEIGHTS, ignore_index=IGNORE),
    "bce": functools.partial(F.binary_cross_entropy_with_logits, reduction="none"),
    "mse": functools.partial(F.mse_loss, reduction="none"),
    "huber": functools.partial(F.huber_loss, reduction="none", delta=0.5),
}


def target_for(loss: str, out_shape: tuple, seed: int = 1) -> torch.Tensor:
    """Class indices (N, *spatial) with some ignored pixels for cross-entropy; else values of
    the output's shape (probabilities for BCE, values on both sides of Huber's delta)."""
    gen = torch.Generator().manual_seed(seed)
    if loss == "ce":
        labels = torch.randint(0, CLASSES, out_shape[:1] + out_shape[2:], generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = IGNORE
        return labels
    if loss == "bce":
        return torch.rand(out_shape, generator=gen, dtype=torch.float64)
    return 2 * torch.randn(out_shape, generator=gen, dtype=torch.float64)


def case(name: str, loss: str):
    """A network of ``NETS``, its input, a target for ``loss`` and the network's tile size."""
    make, shape, tile = NETS[name]
    net, x = make(), rand(*shape)
    return net, x, target_for(loss, out_shape(net, x)), tile


def out_shape(net, x):
    with torch.no_grad():
        return tuple(net(x).shape)


def conventional(net, x, target, loss_fn, reduction="mean", x_grad=True):
    """(loss, {parameter name: gradient}, input gradient or None) of ordinary autograd."""
    xi = x.clone().requires_grad_(x_grad)
    loss = getattr(loss_fn(net(xi), target), reduction)()
    params = list(net.named_parameters())
    grads = torch.autograd.grad(loss, ([xi] if x_grad else []) + [p for _, p in params])
    gx, grads = (grads[0], grads[1:]) if x_grad else (None, grads)
    return loss.detach(), dict(zip([n for n, _ in params], grads)), gx


def streamed(net, x, target, loss_fn, tile, reduction="mean", x_grad=True, **kwargs):
    """The same step through ``pixel_loss`` and ``loss.backward()``; and the Streaming module."""
    for p in net.parameters():
        p.grad = None
    xi = x.clone().requires_grad_(x_grad) if isinstance(x, torch.Tensor) else x
    model = Streaming(net, tile, **kwargs)
    loss = model.pixel_loss(xi, target, loss_fn, reduction)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return loss.detach(), grads, getattr(xi, "grad", None), model


def assert_close(got, want):
    (loss, grads, gx), (loss_ref, grads_ref, gx_ref) = got, want
    assert rel_err(loss, loss_ref) < F64
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_same(grads[name], grads_ref[name], name)
    assert_same(gx, gx_ref, "the input")


def assert_same(got, want, what):
    """Both None (no gradient), or equal to ``F64``."""
    assert (got is None) == (want is None), f"gradient of {what}: {got is not None} vs {want is not None}"
    if want is not None:
        assert rel_err(got, want) < F64, what


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", list(NETS))
def test_equals_conventional(name, loss, reduction):
    net, x, target, tile = case(name, loss)
    loss_value, grads, gx, model = streamed(net, x, target, LOSSES[loss], tile, reduction)
    assert min(model.plan(x.shape).tiles_per_axis) >= 2
    assert_close((loss_value, grads, gx), conventional(net, x, target, LOSSES[loss], reduction))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
@pytest.mark.parametrize("name", sorted(ENTRY_MODELS))
def test_entry_path_networks(name):
    """verify/test_entry_paths's networks: a layer used twice, tied weights, a residual block,
    frozen BatchNorm, an in-place first layer, a parametrised weight, a frozen weight, a
    reentrant checkpoint, a 1D chain; from a non-leaf input (the in-place layer's need)."""
    build, shape, tile = ENTRY_MODELS[name]
    net, x = seeded(build()), rand(*shape)
    target = rand(*out_shape(net, x), seed=2)
    got = []
    for step in (lambda xi: Streaming(net, tile).pixel_loss(xi * 1, target, LOSSES["mse"]),
                 lambda xi: LOSSES["mse"](net(xi * 1), target).mean()):
        net.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        loss = step(xi)
        loss.backward()
        got.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}, xi.grad))
    assert_close(*got)


def test_autograd_grad_leaves_grad_alone():
    """``torch.autograd.grad`` of the loss: the gradients asked for, no ``.grad`` written."""
    net, x, target, tile = case("2d", "ce")
    params = list(net.parameters())
    loss = Streaming(net, tile).pixel_loss(x, target, LOSSES["ce"])
    got = torch.autograd.grad(loss, params[::2])
    _, want, _ = conventional(net, x, target, LOSSES["ce"], x_grad=False)
    for g, (n, _) in zip(got, list(net.named_parameters())[::2]):
        assert rel_err(g, want[n]) < F64
    assert all(p.grad is None for p in params)


def test_input_leaf_without_grad_and_non_leaf():
    """A leaf without grad gets none; a non-leaf input passes its gradient on to its leaf."""
    net, x, target, tile = case("2d-stride2", "mse")
    got = streamed(net, x, target, LOSSES["mse"], tile, x_grad=False)
    assert got[2] is None
    assert_close(got[:3], conventional(net, x, target, LOSSES["mse"], x_grad=False))
    leaf = x.clone().requires_grad_()
    Streaming(net, tile).pixel_loss(leaf * 2, target, LOSSES["mse"]).backward()
    reference = x.clone().requires_grad_()
    LOSSES["mse"](net(reference * 2), target).mean().backward()
    assert rel_err(leaf.grad, reference.grad) < F64


def test_frozen_parameters():
    """Only the input requires grad (a saliency map): its gradient, and none for the module."""
    net, x, target, tile = case("1d", "bce")
    net.requires_grad_(False)
    xi = x.clone().requires_grad_()
    Streaming(net, tile).pixel_loss(xi, target, LOSSES["bce"]).backward()
    reference = x.clone().requires_grad_()
    LOSSES["bce"](net(reference), target).mean().backward()
    assert rel_err(xi.grad, reference.grad) < F64
    assert all(p.grad is None for p in net.parameters())


def test_scaled_loss_and_accumulation():
    """``(loss * 7).backward()`` as a GradScaler does, twice (two images) into the same
    ``.grad``: the gradients are linear in the loss's gradient, and accumulate."""
    make, shape, tile = NETS["2d"]
    net = make()
    xs = [rand(*shape, seed=s) for s in (3, 4)]
    targets = [target_for("huber", out_shape(net, x), seed=s) for s, x in zip((5, 6), xs)]
    model = Streaming(net, tile)
    leaves = [x.clone().requires_grad_() for x in xs]
    for x, t in zip(leaves, targets):
        (model.pixel_loss(x, t, LOSSES["huber"]) * 7).backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    references = [x.clone().requires_grad_() for x in xs]
    for x, t in zip(references, targets):
        (LOSSES["huber"](net(x), t).mean() * 7).backward()
    for n, p in net.named_parameters():
        assert rel_err(got[n], p.grad) < F64, n
    for a, b in zip(leaves, references):
        assert rel_err(a.grad, b.grad) < F64


def test_one_forward_per_tile():
    """Each tile runs through the module once (counted by a forward hook on the first layer
    and by ``last_stats``), and ``loss.backward()`` runs no tile again."""
    net, x, target, tile = case("2d", "ce")
    calls = []
    net[0].register_forward_hook(lambda *args: calls.append(1))
    model = Streaming(net, tile)
    loss = model.pixel_loss(x, target, LOSSES["ce"])
    tiles = model.plan(x.shape).num_tiles
    assert tiles > 4 and len(calls) == tiles
    assert model.last_stats.forward.tiles == model.last_stats.forward.computed == tiles
    loss.backward()
    assert len(calls) == tiles


def test_batchnorm_and_groupnorm_in_training_mode():
    """Normalisations over the image in training mode: statistics and whole-map backward terms
    first (their backward passes take each tile's output gradient from its own loss), then
    the loss pass; loss, gradients and running statistics as conventional training's."""
    net = seeded(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                               nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4), nn.ReLU(),
                               nn.Conv2d(4, CLASSES, 3, padding=1)))
    for m in (net[1], net[4]):  # affine parameters away from torch's 1 and 0
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(net)
    x = rand(2, 3, 20, 22)
    target = target_for("ce", out_shape(net.eval(), x))
    net.train()
    reference.train()
    got = streamed(net, x, target, LOSSES["ce"], 10)
    assert_close(got[:3], conventional(reference, x, target, LOSSES["ce"]))
    for (n, a), b in zip(net.named_buffers(), reference.buffers()):
        assert rel_err(a.double(), b.double()) < F64, n


@pytest.mark.parametrize("kind", ["numpy", "memmap", "zarr"])
def test_array_targets(kind, tmp_path):
    """Targets read tile by tile from an array: uint8 class labels arrive as int64, float32
    values in the output's dtype (float64 here); or as ``target_transform`` makes them."""
    make, shape, tile = NETS["2d"]
    net, x = make(), rand(*shape)
    labels = target_for("ce", out_shape(net, x)).numpy().astype(np.uint8)
    values = target_for("mse", out_shape(net, x)).numpy().astype(np.float32)
    for name, array, to_torch in (("labels", labels, lambda a: torch.from_numpy(a).long()),
                                  ("values", values, lambda a: torch.from_numpy(a).double())):
        stored = stored_as(kind, array, tmp_path / name)
        fn = LOSSES["ce" if name == "labels" else "mse"]
        assert_close(streamed(net, x, stored, fn, tile)[:3],
                     conventional(net, x, to_torch(array), fn))
    # labels stored 1..CLASSES with 0 for "unlabelled": shifted to 0..CLASSES-1 and -1
    shifted = stored_as(kind, np.where(labels == IGNORE, 0, labels + 1).astype(np.uint8),
                        tmp_path / "shifted")
    fn = functools.partial(F.cross_entropy, reduction="none", ignore_index=-1)
    for p in net.parameters():
        p.grad = None
    loss = Streaming(net, tile).pixel_loss(x, shifted, fn, target_transform=lambda t: t.long() - 1)
    loss.backward()
    reference = conventional(net, x, torch.from_numpy(labels).long().masked_fill(
        torch.from_numpy(labels == IGNORE), -1), fn, x_grad=False)
    assert_close((loss.detach(), {n: p.grad for n, p in net.named_parameters()}, None), reference)


def test_an_array_input(tmp_path):
    """The image a memmap too (read tile by tile, ahead on a thread): the module's gradients."""
    net, x, target, tile = case("2d-stride2", "bce")
    image = stored_as("memmap", x.numpy(), tmp_path / "image")
    got = streamed(net, image, stored_as("zarr", target.numpy(), tmp_path / "target"),
                   LOSSES["bce"], tile, x_grad=False)
    assert got[3].last_stats.prefetch
    assert_close(got[:3], conventional(net, x, target, LOSSES["bce"], x_grad=False))


def stored_as(kind: str, array: np.ndarray, path):
    if kind == "numpy":
        return array
    if kind == "memmap":
        stored = np.memmap(path.with_suffix(".raw"), array.dtype, mode="w+", shape=array.shape)
        stored[:] = array
        stored.flush()
        return np.memmap(path.with_suffix(".raw"), array.dtype, mode="r", shape=array.shape)
    zarr = pytest.importorskip("zarr")
    stored = zarr.create_array(path.with_suffix(".zarr"), shape=array.shape, dtype=array.dtype,
                               chunks=(1,) + array.shape[1:-1] + (7,))
    stored[:] = array
    return zarr.open_array(path.with_suffix(".zarr"), mode="r")


def test_no_grad_gives_the_value():
    net, x, target, tile = case("1d", "ce")
    with torch.no_grad():
        loss = Streaming(net, tile).pixel_loss(x, target, LOSSES["ce"], "sum")
        want = LOSSES["ce"](net(x), target).sum()
    assert loss.grad_fn is None and loss.dim() == 0
    assert rel_err(loss, want) < F64


# ------------------------------------------------------------------ errors

def small():
    net, x, target, tile = case("2d", "ce")
    return Streaming(net, tile), x, target


def test_a_target_of_another_shape_is_refused():
    model, x, target = small()
    with pytest.raises(ValueError, match=r"the target has shape \(2, 19, 22\).*\(2, 5, 20, 22\)"):
        model.pixel_loss(x, target[:, :19], LOSSES["ce"])
    with pytest.raises(ValueError, match=r"the target has shape \(2, 4, 20, 22\)"):
        model.pixel_loss(x, rand(2, 4, 20, 22), LOSSES["mse"])


def test_a_reduction_other_than_mean_or_sum_is_refused():
    model, x, target = small()
    with pytest.raises(ValueError, match="'mean' or 'sum', got reduction='none'"):
        model.pixel_loss(x, target, LOSSES["ce"], reduction="none")


def test_a_reduced_loss_fn_is_refused():
    model, x, target = small()
    with pytest.raises(ValueError, match=r"loss_fn returned a single number.*reduction='none'"):
        model.pixel_loss(x, target, functools.partial(F.cross_entropy, ignore_index=IGNORE))


def test_other_bad_arguments():
    model, x, target = small()
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        model.pixel_loss(x, target, "cross_entropy")
    with pytest.raises(TypeError, match="the target must be a tensor or an array"):
        model.pixel_loss(x, target.tolist(), LOSSES["ce"])
    with pytest.raises(StreamingError, match="the target requires grad"):
        model.pixel_loss(x, rand(2, 5, 20, 22).requires_grad_(), LOSSES["mse"])


def test_a_tensor_outside_the_module_that_requires_grad_is_refused_untouched():
    """As Streaming's forward refuses it, before any backward could give it a ``.grad``."""
    scale = torch.ones(1, dtype=torch.float64, requires_grad=True)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, CLASSES, 3, padding=1)

        def forward(self, x):
            return self.conv(x) * scale

    net, x = Scaled().double(), rand(2, 3, 20, 22)
    with pytest.raises(StreamingError, match="not a parameter, buffer or attribute"):
        Streaming(net, 10).pixel_loss(x, target_for("ce", (2, CLASSES, 20, 22)), LOSSES["ce"])
    assert scale.grad is None and net.conv.weight.grad is None


def test_in_place_change_before_backward_and_higher_order_are_refused():
    """As conventionally: a parameter changed in place after the loss was computed, and
    create_graph=True (the gradients were computed without a graph)."""
    model, x, target = small()
    loss = model.pixel_loss(x, target, LOSSES["ce"])
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    loss = model.pixel_loss(x, target, LOSSES["ce"])
    with torch.no_grad():
        model.module[0].weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------ inference into an array

@pytest.mark.parametrize("kind", ["memmap", "zarr"])
def test_inference_into_an_array(kind, tmp_path):
    make, shape, tile = NETS["2d-stride2"]
    net, x = make(), rand(*shape)
    want = net(x).detach().numpy()
    if kind == "memmap":
        out = np.memmap(tmp_path / "out.raw", np.float64, mode="w+", shape=want.shape)
    else:
        out = pytest.importorskip("zarr").create_array(tmp_path / "out.zarr", shape=want.shape,
                                                       dtype=np.float64, chunks=(1, 2, 4, 8))
    with torch.no_grad():
        assert Streaming(net, tile)(x, out=out) is out
    assert rel_err(torch.from_numpy(np.asarray(out[:])), torch.from_numpy(want)) < F64


def test_identical_tiles_are_copied_within_the_array():
    """A constant image: identical tiles are computed once (dedup) and copied in the array."""
    make, _, tile = NETS["2d"]
    net, x = make(), torch.zeros(1, 3, 50, 44, dtype=torch.float64)
    out = np.full((1, CLASSES, 50, 44), np.nan)
    model = Streaming(net, tile)
    with torch.no_grad():
        model(x, out=out)
    assert model.last_stats.forward.computed < model.last_stats.forward.tiles
    assert rel_err(torch.from_numpy(out), net(x).detach()) < F64


def test_out_errors():
    model, x, _ = small()
    with pytest.raises(StreamingError, match=r"out= writes outputs without a graph: wrap the call "
                                             r"in torch.no_grad\(\)"):
        model(x, out=np.zeros((2, CLASSES, 20, 22)))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"out has shape \(2, 4, 20, 22\), the streamed output "
                                             r"\(2, 5, 20, 22\)"):
            model(x, out=np.zeros((2, 4, 20, 22)))
        with pytest.raises(TypeError, match="out must be an array"):
            model(x, out=0.0)
        with pytest.raises(ValueError, match=r"out is structured as .*list.*, the streamed output "
                                             r"as \*: pass one array per output map"):
            model(x, out=[np.zeros((2, CLASSES, 20, 22))])


def test_a_backward_hook_that_reads_gradients():
    """A full backward hook (reading, not replacing) fires per tile; the gradients stay
    conventional's (it used to be refused as a hook changed while a tile ran)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1)).double()
    seen = []
    net[0].register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(grad_out[0].shape))
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    loss_fn = functools.partial(F.mse_loss, reduction="none")
    expected = torch.autograd.grad(loss_fn(net(x), target).mean(), [x, *net.parameters()])
    seen.clear()
    got = torch.autograd.grad(Streaming(net, 32).pixel_loss(x, target, loss_fn), [x, *net.parameters()])
    assert len(seen) == streamcnn.plan(net, x.shape, 32).num_tiles
    assert max(rel_err(g, e) for g, e in zip(got, expected)) <= F64
