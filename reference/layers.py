"""Layers for streaming a small network in pure arrays: Conv, ReLU and MaxPool.

Every layer has the same three methods, so a chain is just a list of layers:

* ``forward(x, pad=None)`` -> output;
* ``backward(x, grad_out, pad=None)`` -> ``(grad_x, grads)``, where ``x`` is the
  layer's input (recomputed, never stored by the layer) and ``grads`` is a dict of
  parameter gradients: ``{"w": ...}`` (plus ``"b"`` with a bias) for Conv, ``{}``
  otherwise;
* ``input_grad(x, grad_out, pad=None)`` and ``param_grads(x, grad_out, pad=None)``:
  the two halves of ``backward`` (Algorithm 1 takes the kernel gradient from the
  unique part of a tile only, line 20); ``has_params`` says whether the second
  can be non-empty.

Padding happens at true image borders only. A layer's own ``padding`` is what it
applies to a whole image. When the layer runs on a tile, the caller passes
``pad``: one ``(before, after)`` pair of widths per spatial axis, saying how far
the tile reaches past the image border on each side. It is zero on sides that lie
inside the image (the neighbouring pixels are real data there, carried in the
tile's overlap) and at most the layer's own padding on sides at the border.
``reference.tiling`` computes these widths. Conv pads with zeros, MaxPool with
-inf (a padded position never wins the max), as torch does.

``window(ndim)`` gives the layer's geometry per axis as ``tiling.Window`` (extent,
stride, padding), which is all the tiling and overlap code needs to know.
"""

from __future__ import annotations

import itertools
import numbers

from reference import conv
from reference._args import per_axis, spatial_rank
from reference._xp import array_module
from reference.tiling import Window


def _pad_widths(pad, padding, ndim):
    """Resolve ``pad`` (None = the layer's own padding on every side) to ((lo, hi), ...) per axis."""
    if pad is None:
        return tuple((p, p) for p in padding)
    pad = tuple(tuple(int(v) for v in side) for side in pad)
    if len(pad) != ndim or any(len(side) != 2 or min(side) < 0 for side in pad):
        raise ValueError(f"pad must be one (before, after) pair of non-negative ints per spatial axis ({ndim}), got {pad}")
    return pad


def _check_rank(x, ndim, layer):
    if x.ndim != ndim + 2:
        raise ValueError(f"{layer} expects input of rank {ndim + 2} (N, C, {ndim} spatial axes), got shape {tuple(x.shape)}")


def _crop(a, pads):
    """Remove (lo, hi) padding from the spatial axes of ``a``."""
    return a[(slice(None), slice(None)) + tuple(slice(lo, a.shape[2 + i] - hi) for i, (lo, hi) in enumerate(pads))]


class Conv:
    """Convolution layer: zero padding (at image borders) then Eq. 1, plus an optional bias."""

    has_params = True

    def __init__(self, w, stride=1, dilation=1, padding=0, bias=None):
        self.ndim = spatial_rank(w.shape, "w")
        if any(n < 1 for n in w.shape):
            raise ValueError(f"w must have a positive size on every axis, got w.shape={tuple(w.shape)}")
        self.w = w
        self.b = bias
        self.stride = per_axis(stride, self.ndim, "stride")
        self.dilation = per_axis(dilation, self.ndim, "dilation")
        self.padding = per_axis(padding, self.ndim, "padding", minimum=0)
        if bias is not None and tuple(bias.shape) != (w.shape[0],):
            raise ValueError(f"bias must have shape (C_out,) = ({w.shape[0]},), got {tuple(bias.shape)}")

    def __repr__(self):
        return (f"Conv(w={tuple(self.w.shape)}, stride={self.stride}, dilation={self.dilation}, "
                f"padding={self.padding}, bias={self.b is not None})")

    def window(self, ndim=None):
        if ndim is not None and ndim != self.ndim:
            raise ValueError(f"Conv has a {self.ndim}D kernel but the input has {ndim} spatial axes")
        return tuple(Window(d * (k - 1) + 1, s, p)
                     for k, s, d, p in zip(self.w.shape[2:], self.stride, self.dilation, self.padding))

    def _padded(self, x, pad):
        _check_rank(x, self.ndim, "Conv")
        pads = _pad_widths(pad, self.padding, self.ndim)
        return array_module(x).pad(x, ((0, 0), (0, 0)) + pads), pads

    def forward(self, x, pad=None):
        xp = array_module(x, self.w)
        y = conv.forward(self._padded(x, pad)[0], self.w, self.stride, self.dilation)
        if self.b is not None:
            y = y + xp.reshape(self.b, (1, -1) + (1,) * self.ndim)
        return y

    def param_grads(self, x, grad_out, pad=None):
        grads = {"w": conv.weight_grad(self._padded(x, pad)[0], grad_out, self.w.shape, self.stride, self.dilation)}
        if self.b is not None:
            grads["b"] = grad_out.sum(axis=(0,) + tuple(range(2, grad_out.ndim)))
        return grads

    def input_grad(self, x, grad_out, pad=None):
        x_padded, pads = self._padded(x, pad)
        return _crop(conv.input_grad(grad_out, self.w, x_padded.shape, self.stride, self.dilation), pads)

    def backward(self, x, grad_out, pad=None):
        return self.input_grad(x, grad_out, pad), self.param_grads(x, grad_out, pad)


class ReLU:
    """Pointwise max(x, 0); its gradient passes where x > 0 (as torch's)."""

    ndim = None
    has_params = False

    def __repr__(self):
        return "ReLU()"

    def window(self, ndim):
        return (Window(1, 1, 0),) * ndim

    def forward(self, x, pad=None):
        return array_module(x).maximum(x, 0)

    def param_grads(self, x, grad_out, pad=None):
        return {}

    def input_grad(self, x, grad_out, pad=None):
        return grad_out * (x > 0)

    def backward(self, x, grad_out, pad=None):
        return self.input_grad(x, grad_out, pad), {}


class MaxPool:
    """Max pooling with -inf padding; ties go to the first tap in row-major order (as torch's CPU kernel).

    ``kernel``, ``stride`` (default: ``kernel``) and ``padding`` are an int or one
    int per axis; as in torch, padding may be at most half the kernel, so that
    every window holds at least one real value.
    """

    has_params = False

    def __init__(self, kernel, stride=None, padding=0):
        stride = kernel if stride is None else stride
        lengths = {len(v) for v in (kernel, stride, padding) if not isinstance(v, numbers.Integral)}
        if len(lengths) > 1:
            raise ValueError(f"MaxPool kernel, stride and padding tuples must have one length, got "
                             f"kernel={kernel!r}, stride={stride!r}, padding={padding!r}")
        self.ndim = lengths.pop() if lengths else None  # None: the same on every axis of any input
        self._kernel, self._stride, self._padding = kernel, stride, padding
        self._resolve(self.ndim or 1)  # validate the values now, not at the first forward

    def __repr__(self):
        return f"MaxPool(kernel={self._kernel}, stride={self._stride}, padding={self._padding})"

    def _resolve(self, ndim):
        if self.ndim is not None and ndim != self.ndim:
            raise ValueError(f"MaxPool was given {self.ndim}-axis parameters but the input has {ndim} spatial axes")
        kernel = per_axis(self._kernel, ndim, "MaxPool kernel")
        stride = per_axis(self._stride, ndim, "MaxPool stride")
        padding = per_axis(self._padding, ndim, "MaxPool padding", minimum=0)
        for k, p in zip(kernel, padding):
            if p > k // 2:
                raise ValueError(f"MaxPool padding {p} is more than half the kernel {k}; use padding <= {k // 2}")
        return kernel, stride, padding

    def window(self, ndim):
        return tuple(Window(k, s, p) for k, s, p in zip(*self._resolve(ndim)))

    def _padded(self, x, pad):
        ndim = x.ndim - 2
        if ndim not in (1, 2):
            raise ValueError(f"MaxPool expects input of rank 3 or 4 (N, C, *spatial), got shape {tuple(x.shape)}")
        kernel, stride, padding = self._resolve(ndim)
        pads = _pad_widths(pad, padding, ndim)
        xp = array_module(x)
        x_padded = xp.pad(x, ((0, 0), (0, 0)) + pads, constant_values=-xp.inf)
        for axis, (n, k) in enumerate(zip(x_padded.shape[2:], kernel)):
            if k > n:
                raise ValueError(f"MaxPool kernel larger than the input on spatial axis {axis}: kernel {k} > "
                                 f"padded input size {n}")
        out = tuple(conv.output_size(n, k, s) for n, k, s in zip(x_padded.shape[2:], kernel, stride))
        return x_padded, pads, kernel, stride, out

    def _argmax(self, x, pad):
        """Per output position: the max and the index of the first tap attaining it."""
        xp = array_module(x)
        x_padded, pads, kernel, stride, out = self._padded(x, pad)
        best, arg = None, None
        for t, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
            v = x_padded[(Ellipsis,) + conv._tap_slice(tap, out, stride, (1,) * len(kernel))]
            if best is None:
                best, arg = v.copy(), xp.zeros(v.shape, dtype=xp.int64)
            else:
                better = v > best  # strict: the first maximal tap keeps the gradient
                best = xp.where(better, v, best)
                arg = xp.where(better, t, arg)
        return best, arg, x_padded.shape, pads, kernel, stride, out

    def forward(self, x, pad=None):
        return self._argmax(x, pad)[0]

    def param_grads(self, x, grad_out, pad=None):
        return {}

    def backward(self, x, grad_out, pad=None):
        return self.input_grad(x, grad_out, pad), {}

    def input_grad(self, x, grad_out, pad=None):
        xp = array_module(x, grad_out)
        _, arg, padded_shape, pads, kernel, stride, out = self._argmax(x, pad)
        if tuple(grad_out.shape) != tuple(arg.shape):
            raise ValueError(f"MaxPool grad_out has shape {tuple(grad_out.shape)}, expected {tuple(arg.shape)}")
        grad_padded = xp.zeros(padded_shape, dtype=grad_out.dtype)
        for t, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
            # one tap's positions k*s + j are distinct, so += never collides within a tap
            grad_padded[(Ellipsis,) + conv._tap_slice(tap, out, stride, (1,) * len(kernel))] += grad_out * (arg == t)
        return _crop(grad_padded, pads)
