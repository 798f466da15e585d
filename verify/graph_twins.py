"""Twin graphs for the graph tests: the same network as ``reference.graph`` blocks and as a torch module.

A network is drawn as a *spec*, a list of units (conv, max-pool, residual block,
concatenation block), and built twice from one seeded weight stream: as a chain
of ``reference.layers`` / ``reference.graph`` objects, and as a torch
``nn.Module`` whose blocks compute ``a(x) + b(x)`` or ``torch.cat([a(x), b(x)], 1)``
over ``nn.Sequential`` branches of ``nn.Conv``, ``nn.ReLU`` and ``nn.MaxPool``.

Blocks are drawn so that both branches land on one grid for every input length:
branch b is the identity or one convolution whose stride and ``2*padding - extent``
equal branch a's total stride and ``2*offset - size`` (the output length of a
chain is ``(n + 2*offset - size) // stride + 1``, so equal strides and equal
``2*offset - size`` give equal lengths), with its own padding, so the two paths
have different receptive fields and offsets.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

from reference import graph, layers as ref_layers
from reference.tiling import chain_field


class TorchResidual(nn.Module):
    def __init__(self, a: list[nn.Module], b: list[nn.Module]):
        super().__init__()
        self.a, self.b = nn.Sequential(*a), nn.Sequential(*b)

    def forward(self, x):
        return self.a(x) + self.b(x)


class TorchConcat(TorchResidual):
    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


# ---------------------------------------------------------------- specs
# ("conv", c_out, kernel, stride, dilation, padding, relu) | ("pool", kernel, stride, padding)
# | ("residual" or "concat", spec_a, spec_b)

def reads_densely(kernel, stride, dilation):
    """Whether the windows of a layer, one per stride, together read every input position.

    Where they do not (a 1x1 convolution with stride 2), some positions of the
    layer's input never receive a gradient, even in the full image.
    """
    return {j * dilation % stride for j in range(kernel)} == set(range(stride))


def _conv_unit(draw, c_out, dense):
    k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    if dense and not reads_densely(k, s, d):
        k, d = max(k, 2), 1
    return ("conv", c_out, k, s, d, draw(st.integers(0, (d * (k - 1) + 1) // 2)), draw(st.booleans()))


def _pool_unit(draw):
    k = draw(st.integers(2, 3))
    return ("pool", k, draw(st.integers(1, k)), draw(st.integers(0, k // 2)))


def _windows(spec):
    """The spec's chain on one axis, as reference windows (for the branch-b rule)."""
    return [layer.window(1)[0] for layer in build(spec, 1, 1, np.random.default_rng(0))[1]]


def _matching_branch(draw, spec_a, c_out, dense):
    """Branch b: the identity, or one conv on branch a's grid (same stride and 2*offset - size)."""
    f = chain_field(_windows(spec_a))
    c = 2 * f.offset - f.size
    if f.stride == 1 and c == -1 and draw(st.booleans()):
        return []
    least = max(0, -(-((f.stride if dense else 1) + c) // 2))  # the extent 2*padding - c: >= 1, >= stride if dense
    padding = draw(st.integers(least, least + 2))
    extent = 2 * padding - c
    dilation = 2 if extent > 2 and extent % 2 == 1 and (f.stride == 1 or not dense) and draw(st.booleans()) else 1
    return [("conv", c_out, (extent - 1) // dilation + 1, f.stride, dilation, padding, draw(st.booleans()))]


def _branch_out(spec, c_in):
    return next((unit[1] for unit in reversed(spec) if unit[0] == "conv"), c_in)


@st.composite
def blocks(draw, c_in, dense, kind=None):
    """A residual or concatenation block on ``c_in`` channels: (spec, output channels)."""
    kind = kind or draw(st.sampled_from(["residual", "concat"]))
    spec_a = []
    for _ in range(draw(st.integers(0, 2))):
        spec_a.append(_conv_unit(draw, draw(st.integers(1, 3)), dense) if draw(st.booleans()) else _pool_unit(draw))
    if kind == "residual":  # a sum needs one channel count: branch a ends with c_in channels
        for i in reversed(range(len(spec_a))):
            if spec_a[i][0] == "conv":
                spec_a[i] = spec_a[i][:1] + (c_in,) + spec_a[i][2:]
                break
    c_a = _branch_out(spec_a, c_in)
    spec_b = _matching_branch(draw, spec_a, c_a if kind == "residual" else draw(st.integers(1, 3)), dense)
    c_b = _branch_out(spec_b, c_in)
    return (kind, spec_a, spec_b), (c_a if kind == "residual" else c_a + c_b)


@st.composite
def graphs(draw, max_units=3, dense=False):
    """A chain of 1..max_units units, at least one of them a block: (spec, input channels).

    ``dense``: every layer reads every position of its input (see :func:`reads_densely`).
    """
    c_in = draw(st.integers(1, 3))
    spec, channels = [], c_in
    n_units = draw(st.integers(1, max_units))
    block_at = draw(st.integers(0, n_units - 1))
    for i in range(n_units):
        choice = "block" if i == block_at else draw(st.sampled_from(["conv", "pool", "block"]))
        if choice == "block":
            unit, channels = draw(blocks(channels, dense))
        elif choice == "conv":
            unit = _conv_unit(draw, draw(st.integers(1, 3)), dense)
            channels = unit[1]
        else:
            unit = _pool_unit(draw)
        spec.append(unit)
    return spec, c_in


# ---------------------------------------------------------------- building
def build(spec, c_in, ndim, rng, positive_linear=False):
    """(torch module, reference chain, output channels) for a spec, float64, weights drawn from ``rng``.

    ``positive_linear``: torch side only, for dependence tests: weights > 0, no ReLU,
    and average pooling in place of max pooling (same windows), so that an output
    depends on exactly the inputs its windows read.
    """
    conv_cls = (nn.Conv1d, nn.Conv2d)[ndim - 1]
    pool_cls = (nn.AvgPool1d, nn.AvgPool2d)[ndim - 1] if positive_linear else (nn.MaxPool1d, nn.MaxPool2d)[ndim - 1]
    torch_layers, ref_chain, channels = [], [], c_in
    for unit in spec:
        if unit[0] == "conv":
            _, c_out, k, s, d, p, relu = unit
            w, b = rng.standard_normal((c_out, channels) + (k,) * ndim), rng.standard_normal(c_out)
            if positive_linear:
                w, b = np.abs(w) + 0.1, np.abs(b)
            conv = conv_cls(channels, c_out, k, stride=s, padding=p, dilation=d).double()
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w))
                conv.bias.copy_(torch.from_numpy(b))
            torch_layers.append(conv)
            ref_chain.append(ref_layers.Conv(w, stride=s, dilation=d, padding=p, bias=b))
            if relu:
                torch_layers += [] if positive_linear else [nn.ReLU()]
                ref_chain.append(ref_layers.ReLU())
            channels = c_out
        elif unit[0] == "pool":
            _, k, s, p = unit
            torch_layers.append(pool_cls(k, stride=s, padding=p))
            ref_chain.append(ref_layers.MaxPool(k, stride=s, padding=p))
        else:
            kind, spec_a, spec_b = unit
            t_a, r_a, c_a = build(spec_a, channels, ndim, rng, positive_linear)
            t_b, r_b, c_b = build(spec_b, channels, ndim, rng, positive_linear)
            torch_cls, ref_cls = (TorchResidual, graph.Residual) if kind == "residual" else (TorchConcat, graph.Concat)
            torch_layers.append(torch_cls(list(t_a), list(t_b)))
            ref_chain.append(ref_cls(r_a, r_b))
            channels = c_a if kind == "residual" else c_a + c_b
    return nn.Sequential(*torch_layers), ref_chain, channels


def conv_grads(chain, weight_grads):
    """The reference's (weight, bias) gradients of every Conv, in the order torch's ``module.modules()`` lists them."""
    result = []
    for layer, grads in zip(chain, weight_grads):
        if isinstance(layer, ref_layers.Conv):
            result.append((grads["w"], grads.get("b")))
        elif isinstance(layer, (graph.Residual, graph.Concat)):
            for name, branch in zip("ab", layer.branches):
                per_layer = [{key.split(".", 2)[2]: value for key, value in grads.items()
                              if key.startswith(f"{name}.{i}.")} for i in range(len(branch))]
                result += conv_grads(branch, per_layer)
    return result


def torch_convs(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
