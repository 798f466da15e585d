"""Check a streamed module against conventional backprop on your own network.

    >>> errs = streamcnn.testing.compare(features, x, tile_size=256)
    >>> errs.worst < 1e-4   # float32; ~1e-10 in float64

The oracle is torch itself: ``module(x)`` and ordinary autograd on the whole input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .streaming import Streaming


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| over finite entries (0 when both are zero): a relative
    error robust to entries near zero, whose size is set by the summation order
    of float math. Non-finite entries (max-pool windows entirely in padding give
    -inf) must be identical in ``a`` and ``b``, else the error is infinite."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite], b[~finite]):
        return float("inf")
    a, b = a[finite], b[finite]
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


@dataclass
class Comparison:
    """Relative errors of the streamed run against the conventional one."""

    output: float
    input_grad: float | None
    param_grads: dict = field(default_factory=dict)

    @property
    def worst(self) -> float:
        errs = [self.output] + list(self.param_grads.values())
        if self.input_grad is not None:
            errs.append(self.input_grad)
        return max(errs)


def compare(module: nn.Module, x: torch.Tensor, tile_size, *, grad_out: torch.Tensor | None = None,
            input_grad: bool = True, seed: int = 0, **streaming_kwargs) -> Comparison:
    """Run ``module`` conventionally and streamed on ``x``; backpropagate the same
    output gradient (seeded random unless given) and compare output, input
    gradient and every parameter gradient. Leaves the parameters' ``.grad`` as
    the streamed run set them."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def run(model):
        for _, p in named:
            p.grad = None
        xi = x.detach().clone().requires_grad_(input_grad)
        y = model(xi.clone())  # a non-leaf copy, so in-place first layers work in both runs
        nonlocal grad_out
        if grad_out is None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            grad_out = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
        y.backward(grad_out)
        grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in named}
        return y.detach(), (xi.grad if input_grad else None), grads

    y_ref, gx_ref, g_ref = run(module)
    y, gx, g = run(Streaming(module, tile_size, **streaming_kwargs))
    param_errs = {}
    for n in g_ref:
        if (g[n] is None) != (g_ref[n] is None):
            raise AssertionError(f"gradient of {n}: streamed {g[n] is not None}, "
                                 f"conventional {g_ref[n] is not None}")
        param_errs[n] = 0.0 if g_ref[n] is None else rel_err(g[n], g_ref[n])
    return Comparison(output=rel_err(y, y_ref),
                      input_grad=rel_err(gx, gx_ref) if input_grad else None,
                      param_grads=param_errs)
