"""Eqs. 1, 5 and 7 of the paper: a "valid" convolution, its kernel gradient and its input gradient.

Shapes follow the deep-learning convention: ``x`` is (N, C_in, *spatial) with one
or two spatial axes, ``w`` is (C_out, C_in, *kernel). "Convolution" means
cross-correlation, as in the paper's footnote 1. Stride ``s`` and dilation ``d``
are an int or one int per spatial axis. On one axis, with kernel length ``n``,
output position ``k`` reads the inputs ``k*s + j*d`` for the taps ``j = 0..n-1``,
and an input of length ``N`` gives ``(N - d*(n-1) - 1)//s + 1`` outputs.

Each function loops over the kernel taps ``j`` (that is the sum over ``i`` in
Eq. 1, the paper's index for the kernel) and is vectorised over positions and
samples. Eq. 1 (and Eq. 7, which is Eq. 1 again) also loops over the input
channels, one elementwise multiply-add each, so every output is summed in the same
order - taps, then channels - whatever the array sizes: a tile's output is then
*bitwise* the slice of the full output, on every CPU and on CuPy (a BLAS
``tensordot`` would pick its kernel, and with it the summation order, by CPU and
size). Eq. 5 sums over positions, a different set for a tile than for the whole
image, so it contracts with ``tensordot``. Everything runs on NumPy or CuPy arrays
(see ``reference._xp``).
"""

from __future__ import annotations

import itertools

from reference._args import per_axis, spatial_rank
from reference._xp import array_module


def output_size(n_in: int, n_kernel: int, stride: int = 1, dilation: int = 1) -> int:
    """Length of a valid convolution's output on one axis: ``(N - d(n-1) - 1)//s + 1``."""
    return (n_in - dilation * (n_kernel - 1) - 1) // stride + 1


def _taps(kernel_shape):
    """All kernel tap indices, row-major (the order Eq. 1 sums them in)."""
    return itertools.product(*(range(n) for n in kernel_shape))


def _tap_slice(tap, out_shape, stride, dilation):
    """Spatial slices selecting ``x[k*s + j*d]`` for every output position ``k`` of one tap ``j``."""
    return tuple(
        slice(j * d, j * d + (n_out - 1) * s + 1, s)
        for j, n_out, s, d in zip(tap, out_shape, stride, dilation)
    )


def _geometry(x_shape, w_shape, stride, dilation):
    """Check shapes of x and w for Eq. 1 and return (stride, dilation, spatial output shape)."""
    ndim = spatial_rank(x_shape, "x")
    if len(w_shape) != len(x_shape):
        raise ValueError(
            f"w must have rank {len(x_shape)} (C_out, C_in, *kernel) to match x of rank {len(x_shape)}, "
            f"got w.shape={tuple(w_shape)}"
        )
    if x_shape[1] != w_shape[1]:
        raise ValueError(
            f"channel mismatch: x has C_in={x_shape[1]} channels (x.shape[1]) but w expects "
            f"C_in={w_shape[1]} (w.shape[1])"
        )
    stride = per_axis(stride, ndim, "stride")
    dilation = per_axis(dilation, ndim, "dilation")
    if any(n < 1 for n in w_shape[2:]):
        raise ValueError(f"kernel size must be positive on every axis, got w.shape={tuple(w_shape)}")
    out = []
    for axis, (n_in, n_k, s, d) in enumerate(zip(x_shape[2:], w_shape[2:], stride, dilation)):
        extent = d * (n_k - 1) + 1
        if extent > n_in:
            raise ValueError(
                f"kernel larger than the input on spatial axis {axis}: kernel extent {extent} "
                f"(kernel {n_k}, dilation {d}) > input size {n_in}; use an input of at least {extent} "
                f"or a smaller kernel"
            )
        out.append(output_size(n_in, n_k, s, d))
    return stride, dilation, tuple(out)


def forward(x, w, stride=1, dilation=1):
    """Eq. 1, the "valid" convolution: ``(x * w)_k = sum_i w_i x_{k+i}``.

    Generalised to channels, stride ``s`` and dilation ``d``:
    ``y[b, o, k] = sum_{c, j} w[o, c, j] * x[b, c, k*s + j*d]``.
    Returns (N, C_out, *out) in the array type of ``x``.
    """
    xp = array_module(x, w)
    stride, dilation, out_shape = _geometry(x.shape, w.shape, stride, dilation)
    y = xp.zeros((x.shape[0], w.shape[0]) + out_shape, dtype=xp.result_type(x, w))
    spread = (1,) * len(out_shape)  # w[o, c, j] broadcast over positions
    for tap in _taps(w.shape[2:]):
        x_tap = x[(Ellipsis,) + _tap_slice(tap, out_shape, stride, dilation)]  # (N, C_in, *out)
        for c in range(x.shape[1]):  # fixed order: no BLAS reduction (see the module docstring)
            y += w[(slice(None), c) + tap].reshape((1, -1) + spread) * x_tap[:, c:c + 1]
    return y


def weight_grad(x, grad_out, w_shape, stride=1, dilation=1):
    """Eq. 5, the kernel gradient: ``dw_j = sum_i dp_i x_{i+j}``.

    ``grad_out`` is dLoss/dp for the output p of ``forward(x, w, stride, dilation)``.
    With channels, stride and dilation:
    ``dw[o, c, j] = sum_{b, k} grad_out[b, o, k] * x[b, c, k*s + j*d]``.
    """
    xp = array_module(x, grad_out)
    w_shape = tuple(w_shape)
    stride, dilation, out_shape = _geometry(x.shape, w_shape, stride, dilation)
    expected = (x.shape[0], w_shape[0]) + out_shape
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"grad_out has shape {tuple(grad_out.shape)} but Eq. 1 gives outputs of shape {expected} "
            f"for x.shape={tuple(x.shape)}, w_shape={w_shape}"
        )
    dw = xp.zeros(w_shape, dtype=xp.result_type(x, grad_out))
    summed_axes = [0] + list(range(2, grad_out.ndim))  # samples and output positions
    for tap in _taps(w_shape[2:]):
        x_tap = x[(Ellipsis,) + _tap_slice(tap, out_shape, stride, dilation)]
        dw[(slice(None), slice(None)) + tap] = xp.tensordot(grad_out, x_tap, axes=(summed_axes, summed_axes))
    return dw


def input_grad(grad_out, w, x_shape, stride=1, dilation=1):
    """Eq. 7, the input gradient: ``dx_i = sum_j w_j dp_{i-j}``, computed as the paper says.

    "A convolution with a flipped kernel w on dp padded with n-1 zeros", a "full"
    convolution. For stride s > 1 the output gradient is first zero-interleaved
    (s-1 zeros between entries, placing dp_k at position k*s); with dilation d the
    padding is d*(n-1) and the flipped kernel keeps dilation d. Kernel channels are
    transposed (C_out <-> C_in) because the gradient flows from outputs to inputs.
    Input positions no output reads (the stride remainder at the end) get zero.
    """
    xp = array_module(grad_out, w)
    x_shape = tuple(x_shape)
    spatial_rank(grad_out.shape, "grad_out")
    stride, dilation, out_shape = _geometry(x_shape, w.shape, stride, dilation)
    expected = (x_shape[0], w.shape[0]) + out_shape
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"grad_out has shape {tuple(grad_out.shape)} but Eq. 1 gives outputs of shape {expected} "
            f"for x_shape={x_shape}, w.shape={tuple(w.shape)}"
        )
    kernel = w.shape[2:]
    # zero-interleave: dp_k goes to position k*s
    spread_shape = tuple((n - 1) * s + 1 for n, s in zip(out_shape, stride))
    spread = xp.zeros(grad_out.shape[:2] + spread_shape, dtype=grad_out.dtype)
    spread[(Ellipsis,) + tuple(slice(None, None, s) for s in stride)] = grad_out
    # pad with d*(n-1) zeros on both sides: the "full" convolution
    pads = [(0, 0), (0, 0)] + [(d * (n - 1),) * 2 for n, d in zip(kernel, dilation)]
    padded = xp.pad(spread, pads)
    flipped = xp.flip(w, axis=tuple(range(2, w.ndim))).swapaxes(0, 1)  # (C_in, C_out, *kernel)
    dx_used = forward(padded, flipped, stride=1, dilation=dilation)  # Eq. 1 again
    # the conv read only the first (out-1)*s + d*(n-1) + 1 inputs; the rest get zero gradient
    tail = [(0, 0), (0, 0)] + [(0, n_x - n_used) for n_x, n_used in zip(x_shape[2:], dx_used.shape[2:])]
    return xp.pad(dx_used, tail)


def transposed(x, w, stride=1, padding=0, output_padding=0, dilation=1):
    """A transposed convolution, the adjoint of Eq. 1: Eq. 7 with ``x`` as the output
    gradient, which spreads input ``i`` into outputs ``i*s + j*d`` for each tap ``j``.

    ``w`` is laid out as torch's ``ConvTranspose`` weight, (C_in, C_out, *kernel): as the
    kernel of the convolution it is the adjoint of, (C_out of that convolution, C_in, ...).
    The full result, ``(n - 1)*s + d*(k - 1) + 1 + output_padding`` long (the extra
    positions get no input), loses ``padding`` positions at each side:
    ``y[b, o, m] = sum_{c, i, j: i*s + j*d - p = m} w[c, o, j] * x[b, c, i]``.
    """
    ndim = x.ndim - 2
    stride, dilation = per_axis(stride, ndim, "stride"), per_axis(dilation, ndim, "dilation")
    padding = per_axis(padding, ndim, "padding", minimum=0)
    output_padding = per_axis(output_padding, ndim, "output_padding", minimum=0)
    reached = tuple((n - 1) * s + d * (k - 1) + 1 for n, k, s, d in
                    zip(x.shape[2:], w.shape[2:], stride, dilation))
    y = input_grad(x, w, (x.shape[0], w.shape[1]) + reached, stride, dilation)
    y = array_module(y).pad(y, [(0, 0), (0, 0)] + [(0, op) for op in output_padding])
    return y[(Ellipsis,) + tuple(slice(p, n + op - p) for p, n, op in
                                 zip(padding, reached, output_padding))]
