"""Bad input to the reference raises ValueError naming the quantity (issue 2's list, and a few more)."""

import numpy as np
import pytest

from reference import conv, overlap, tiling
from reference.graph import Concat, Residual
from reference.layers import Conv, MaxPool, ReLU
from reference.streaming import conventional, streamed

rng = np.random.default_rng(0)
X1, W1 = rng.standard_normal((1, 2, 10)), rng.standard_normal((3, 2, 3))
X2, W2 = rng.standard_normal((1, 2, 8, 9)), rng.standard_normal((3, 2, 3, 3))


@pytest.mark.parametrize("call, message", [
    # channel mismatch
    (lambda: conv.forward(X1, rng.standard_normal((3, 4, 3))), r"channel mismatch: x has C_in=2 .* w expects C_in=4"),
    (lambda: conv.weight_grad(X2, np.ones((1, 3, 6, 7)), (3, 5, 3, 3)), r"channel mismatch"),
    (lambda: conv.input_grad(np.ones((1, 3, 8)), W1, (1, 5, 10)), r"channel mismatch"),
    # kernel larger than the input
    (lambda: conv.forward(X1, rng.standard_normal((3, 2, 11))), r"kernel larger than the input on spatial axis 0"),
    (lambda: conv.forward(X2, W2, dilation=(1, 5)), r"kernel larger than the input on spatial axis 1: kernel extent 11"),
    # non-positive stride or dilation
    (lambda: conv.forward(X1, W1, stride=0), r"stride must be positive"),
    (lambda: conv.forward(X2, W2, stride=(1, -2)), r"stride must be positive"),
    (lambda: conv.forward(X1, W1, dilation=0), r"dilation must be positive"),
    (lambda: conv.weight_grad(X1, np.ones((1, 3, 8)), W1.shape, dilation=-1), r"dilation must be positive"),
    (lambda: conv.forward(X2, W2, stride=(1, 2, 3)), r"stride must be an int or a tuple of 2 ints"),
    # wrong rank
    (lambda: conv.forward(X1[0], W1), r"x must have rank 3 \(N, C, L\) or 4 \(N, C, H, W\), got rank 2"),
    (lambda: conv.forward(np.ones((1, 1, 4, 4, 4)), np.ones((1, 1, 2, 2, 2))), r"x must have rank 3 .* got rank 5"),
    (lambda: conv.forward(X2, W1), r"w must have rank 4"),
    (lambda: conv.input_grad(np.ones((3, 8)), W1, X1.shape), r"grad_out must have rank 3"),
    (lambda: Conv(np.ones((3, 3))), r"w must have rank 3"),
    (lambda: Conv(W1).forward(X2), r"Conv expects input of rank 3"),
    # gradient of the wrong shape
    (lambda: conv.weight_grad(X1, np.ones((1, 3, 7)), W1.shape), r"grad_out has shape \(1, 3, 7\) but Eq. 1 gives outputs of shape \(1, 3, 8\)"),
    (lambda: conventional([Conv(W1)], X1, lambda out: np.ones(3)), r"grad_fn must return dLoss/dOutput with the output's shape"),
    # layer parameters
    (lambda: Conv(W1, padding=-1), r"padding must be >= 0"),
    (lambda: Conv(W1, bias=np.ones(2)), r"bias must have shape \(C_out,\) = \(3,\)"),
    (lambda: MaxPool(2, padding=2), r"MaxPool padding 2 is more than half the kernel 2; use padding <= 1"),
    (lambda: MaxPool(0), r"MaxPool kernel must be positive"),
    (lambda: MaxPool((2, 2), stride=(1, 1, 1)), r"MaxPool kernel, stride and padding tuples must have one length"),
    # chains name the failing layer
    (lambda: conventional([Conv(W1), ReLU(), Conv(W1)], X1, lambda out: out), r"layer 2 \(Conv.*channel mismatch"),
    (lambda: streamed([Conv(W1), ReLU(), Conv(W1)], X1, 10, lambda out: out), r"layer 2 \(Conv.*channel mismatch"),
    (lambda: conventional([], X1, lambda out: out), r"layers must hold at least one layer"),
    # tiles too small for the overlap
    (lambda: streamed([Conv(W1), Conv(rng.standard_normal((2, 3, 3)))], np.ones((1, 2, 30)), 6, lambda out: out),
     r"tile_size 6 on axis 0 is too small for the overlap .* use tile_size >= 9"),
    (lambda: streamed([Conv(W2)], X2, (8, 0), lambda out: out), r"tile_size must be positive"),
    (lambda: overlap.algorithm2([Conv(W1), Conv(rng.standard_normal((2, 3, 3)))], 8), r"tile too small for the overlap"),
    (lambda: overlap.analytic_invalid([Conv(W1), Conv(rng.standard_normal((2, 3, 3)))], 8), r"tile too small for the overlap"),
    (lambda: overlap.algorithm2([Conv(W1)], 2), r"tile_shape \(2,\) cannot be probed .*too small.*kernel larger than the input"),
    # tiling arguments
    (lambda: tiling.output_split(5, 6), r"n_tiles must be between 1 and the number of outputs 5"),
    (lambda: tiling.chain_ranges([tiling.Window(3, 1, 0)], (4, 9), 10), r"out_range must be a non-empty range inside \[0, 8\)"),
    (lambda: overlap.receptive_field([ReLU()]), r"cannot tell the number of spatial axes"),
    # graph blocks: both branches on one grid
    (lambda: Residual([Conv(W1, stride=2)], []), r"Residual on spatial axis 0: the paths of a block must have one "
                                                 r"total stride .* got strides \[2, 1\]"),
    (lambda: Concat([MaxPool(2)], [Conv(W2, stride=(2, 1), padding=1)]), r"Concat on spatial axis 1: .*one total stride"),
    (lambda: Residual([Conv(rng.standard_normal((2, 2, 3)))], []).forward(X1),
     r"Residual: branch a gives shape \(1, 2, 8\) and branch b \(1, 2, 10\) .* land on one grid"),
    (lambda: Concat([MaxPool(2)], [Conv(W1, stride=2)]).forward(X1), r"Concat: branch a gives shape \(1, 2, 5\) and branch b "
                                                                     r"\(1, 3, 4\)"),
    (lambda: Residual([Conv(W1, padding=1)], []).forward(X1), r"same number of channels for a sum"),
    (lambda: Residual([Conv(W1)], [Conv(W2)]), r"disagree on the number of spatial axes: \[1, 2\]"),
    (lambda: Residual([], []).forward(X1, pad=((0, 0),)), r"Residual runs on whole images only"),
    (lambda: Residual([], []).backward(X1, np.ones((1, 2, 9))), r"grad_out has shape \(1, 2, 9\), expected .* \(1, 2, 10\)"),
    (lambda: conventional([Residual([Conv(W1, padding=1), ReLU(), Conv(W1)], [])], X1, lambda out: out),
     r"layer 0 \(Residual.*branch a, layer 2 \(Conv.*channel mismatch"),
    (lambda: streamed([Conv(W1), Residual([], [])], X1, 6, lambda out: out),
     r"layer 1 \(Residual.*streamed\(\) runs chains of Conv, ReLU and MaxPool only"),
    (lambda: overlap.analytic_invalid([Residual([Conv(W1, stride=2, padding=1)], [MaxPool(2)])], 9), r"give 5 and 4 outputs"),
])
def test_bad_input_raises_a_value_error_naming_the_quantity(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_integer_stride_is_a_type_error():
    with pytest.raises(TypeError, match="stride must be an int or a tuple"):
        conv.forward(X1, W1, stride=1.5)
