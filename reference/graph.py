"""Blocks with two paths, so that the reference covers real network graphs: a residual sum and a concatenation.

A block holds two branches, each a chain of ``reference.layers`` (Conv, ReLU,
MaxPool) or of nested blocks; an empty branch is the identity. A block is itself
a layer: it has the interface of ``reference.layers`` (``forward``, ``backward``,
``input_grad``, ``param_grads``, ``has_params``, ``window``), so a chain may hold
blocks and ``reference.streaming.conventional`` and Algorithm 2
(``reference.overlap``) run on it.

Inside a branch every Conv is Eq. 1 forward and Eqs. 5 and 7 backward, as in a
chain. What a block adds is the fork and the merge:

* forward, the input goes into both branches and their outputs are merged
  (summed by :class:`Residual`, concatenated along channels by :class:`Concat`);
* backward, each branch receives its part of the output gradient (all of it for a
  sum, its channels for a concatenation), and the input gradient is the sum of the
  two branches' input gradients: the chain rule at a fork, where two paths read
  the same input.

Both branches must land on one grid: the same total stride on every axis (checked
when the block is made) and, for the input at hand, the same output length (checked
when it runs); a residual sum also needs the same number of channels. On one axis
a block is a ``tiling.Paths``, whose receptive field is the hull of the two
branches' (see ``tiling.Paths.field``).

Blocks run on whole images only (``pad`` must be None, the layers' own padding):
Algorithm 1 in ``reference.streaming`` lays out tiles for chains of Conv, ReLU and
MaxPool.
"""

from __future__ import annotations

from reference._xp import array_module
from reference.streaming import backward_chain, forward_chain
from reference.tiling import Paths


def _whole_image(block, pad):
    if pad is not None:
        raise ValueError(f"{type(block).__name__} runs on whole images only (pad=None), got pad={pad}; "
                         f"reference.streaming.streamed streams chains of Conv, ReLU and MaxPool")


def _common_ndim(branches):
    dims = {layer.ndim for branch in branches for layer in branch if getattr(layer, "ndim", None) is not None}
    if len(dims) > 1:
        raise ValueError(f"the layers of a block disagree on the number of spatial axes: {sorted(dims)}")
    return dims.pop() if dims else None


class _Block:
    """Two branches from one input, merged by ``_merge``; the gradient is split back by ``_split``."""

    def __init__(self, branch_a, branch_b):
        self.branches = (list(branch_a), list(branch_b))
        self.ndim = _common_ndim(self.branches)
        self.window(self.ndim or 1)  # refuse different strides now (a MaxPool without ndim is alike on every axis)

    def __repr__(self):
        return f"{type(self).__name__}(a={self.branches[0]!r}, b={self.branches[1]!r})"

    @property
    def has_params(self):
        return any(layer.has_params for branch in self.branches for layer in branch)

    def window(self, ndim):
        """Per axis, a ``tiling.Paths`` of the two branches' windows (ValueError if their strides differ)."""
        if self.ndim is not None and ndim != self.ndim:
            raise ValueError(f"{type(self).__name__} has {self.ndim}D layers but the input has {ndim} spatial axes")
        windows = [[layer.window(ndim) for layer in branch] for branch in self.branches]
        paths = tuple(Paths(tuple(tuple(w[axis] for w in branch) for branch in windows)) for axis in range(ndim))
        for axis, p in enumerate(paths):
            try:
                p.field()
            except ValueError as err:
                raise ValueError(f"{type(self).__name__} on spatial axis {axis}: {err}") from None
        return paths

    def _activations(self, x):
        return [forward_chain(branch, x, where=f"branch {name}, layer")
                for name, branch in zip("ab", self.branches)]

    def _outputs(self, activations):
        """The two branch outputs, after checking that they land on one grid."""
        a, b = (levels[-1] for levels in activations)
        if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:] or not self._channels_fit(a, b):
            raise ValueError(f"{type(self).__name__}: branch a gives shape {tuple(a.shape)} and branch b "
                             f"{tuple(b.shape)} for an input of shape {tuple(activations[0][0].shape)}; both must "
                             f"land on one grid (same total stride and output length){self._channel_rule}")
        return a, b

    def forward(self, x, pad=None):
        _whole_image(self, pad)
        return self._merge(*self._outputs(self._activations(x)))

    def backward(self, x, grad_out, pad=None):
        """``(grad_x, grads)``: grad_x sums the branches' input gradients; grads are named ``"a.<i>.<name>"``."""
        _whole_image(self, pad)
        activations = self._activations(x)
        a, b = self._outputs(activations)
        expected = tuple(self._merge(a, b).shape)
        if tuple(grad_out.shape) != expected:
            raise ValueError(f"{type(self).__name__} grad_out has shape {tuple(grad_out.shape)}, expected the "
                             f"output's shape {expected}")
        grad_x, grads = None, {}
        for name, branch, levels, g in zip("ab", self.branches, activations, self._split(grad_out, a, b)):
            weight_grads, g_x = backward_chain(branch, levels, g, where=f"branch {name}, layer")
            grad_x = g_x if grad_x is None else grad_x + g_x  # two paths read x: their gradients add
            grads.update({f"{name}.{i}.{key}": value for i, layer_grads in enumerate(weight_grads)
                          for key, value in layer_grads.items()})
        return grad_x, grads

    def input_grad(self, x, grad_out, pad=None):
        return self.backward(x, grad_out, pad)[0]

    def param_grads(self, x, grad_out, pad=None):
        return self.backward(x, grad_out, pad)[1]


class Residual(_Block):
    """``y = a(x) + b(x)``: a residual block (an empty branch is the identity, the skip connection).

    Backward: both branches receive the whole output gradient, and
    ``grad_x = grad_x(a) + grad_x(b)``. Parameter gradients are named
    ``"a.<layer index>.<w or b>"`` and ``"b.<layer index>.<w or b>"``.
    """

    _channel_rule = ", and the same number of channels for a sum"

    @staticmethod
    def _channels_fit(a, b):
        return a.shape[1] == b.shape[1]

    @staticmethod
    def _merge(a, b):
        return a + b

    @staticmethod
    def _split(grad_out, a, b):
        return grad_out, grad_out


class Concat(_Block):
    """``y = [a(x), b(x)]`` along channels (torch.cat(..., dim=1)).

    Backward: branch a receives the output gradient of its channels (the first
    ``C_a``), branch b the rest, and ``grad_x = grad_x(a) + grad_x(b)``. Parameter
    gradients are named as for :class:`Residual`.
    """

    _channel_rule = ""

    @staticmethod
    def _channels_fit(a, b):
        return True

    @staticmethod
    def _merge(a, b):
        return array_module(a, b).concatenate([a, b], axis=1)

    @staticmethod
    def _split(grad_out, a, b):
        return grad_out[:, : a.shape[1]], grad_out[:, a.shape[1]:]
