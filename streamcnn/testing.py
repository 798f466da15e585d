"""Check a streamed module against conventional backprop on your own network.

    >>> errs = streamcnn.testing.compare(features, x, tile_size=256)
    >>> errs.worst < 1e-4   # float32; ~1e-10 in float64

The oracle is torch itself: ``module(x)`` and ordinary autograd on the whole input.

A bug can live on one path only (a layer once lost its gradient when the input was a
leaf without grad, the one case a harness feeding non-leaf inputs never met), so each
comparison runs along several :class:`Path` s - how the input enters (a leaf without
grad, as in training; a leaf with grad, as for a saliency map; a non-leaf), how the
gradients are asked for (``backward()``, or ``torch.autograd.grad`` of a subset of the
input and parameters) and from which loss (a sum, or a random output gradient). A
gradient present on one side only is a failure, not a number.

A module that returns several feature maps (tuples, lists, dicts of them) is compared map by
map: the ``"sum"`` loss adds every map's sum, the ``"random"`` one gives each map its own
output gradient (``grad_out``, in the output's structure, may leave a map out with None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_leaves

from .streaming import Streaming

ENTRIES = ("leaf", "leaf-grad", "non-leaf")
METHODS = ("backward", "grad")
LOSSES = ("sum", "random")


@dataclass(frozen=True)
class Path:
    """One way through a training step: ``entry`` of the input (``"leaf"``: a leaf without
    grad, ``"leaf-grad"``: a leaf that requires grad, ``"non-leaf"``: computed from a leaf
    that requires grad), ``method`` (``"backward"`` or ``"grad"``: ``torch.autograd.grad``
    of the input, where it requires grad, and every other parameter) and ``loss``
    (``"sum"`` of the output, or a seeded ``"random"`` output gradient; of every output map)."""

    entry: str = "non-leaf"
    method: str = "backward"
    loss: str = "random"

    def __post_init__(self):
        for value, allowed in ((self.entry, ENTRIES), (self.method, METHODS), (self.loss, LOSSES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")

    def __str__(self) -> str:
        return f"{self.entry}/{self.method}/{self.loss}"


#: every combination (12 paths)
ALL_PATHS = tuple(Path(e, m, lo) for e in ENTRIES for m in METHODS for lo in LOSSES)
#: the default: each entry, each method and each loss at least once, in three runs
DEFAULT_PATHS = (Path("leaf", "grad", "random"), Path("leaf-grad", "backward", "sum"),
                 Path("non-leaf", "backward", "random"))


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
    """Relative errors of the streamed run against the conventional one: the worst over the
    paths run (``paths``: each path's own errors; ``skipped``: paths on which conventional
    autograd itself raised, e.g. an in-place first layer on a leaf, which then ran from a
    non-leaf input where conventional allows it)."""

    output: float
    input_grad: float | None
    param_grads: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @property
    def worst(self) -> float:
        errs = [self.output] + list(self.param_grads.values())
        if self.input_grad is not None:
            errs.append(self.input_grad)
        return max(errs)


def compare(module: nn.Module, x: torch.Tensor, tile_size, *, grad_out: torch.Tensor | None = None,
            input_grad: bool = True, seed: int = 0, paths=DEFAULT_PATHS,
            **streaming_kwargs) -> Comparison:
    """Run ``module`` conventionally and streamed on ``x`` along each of ``paths`` (a
    :class:`Path` or several) and compare output (the worst map of a structured output),
    input gradient and every parameter gradient. ``grad_out`` fixes the ``"random"`` output
    gradient (default: seeded random; for a structured output, the same structure, where
    None leaves that map out of the loss); ``input_grad=False`` keeps to the paths whose
    input does not require grad.
    Raises ``AssertionError`` where a gradient exists on one side only. Leaves the
    parameters' ``.grad`` as the last streamed run set them."""
    chosen = [paths] if isinstance(paths, Path) else list(paths)
    if not input_grad:
        chosen = [Path("leaf", p.method, p.loss) for p in chosen]
    results, skipped = {}, {}
    for path in dict.fromkeys(chosen):
        path, reference = _reference(module, x, path, grad_out, seed, skipped)
        if reference is None:
            continue
        streamed = _run(Streaming(module, tile_size, **streaming_kwargs), x, path, grad_out, seed)
        results[str(path)] = _errors(path, streamed, reference)
    if not results:
        raise AssertionError(f"conventional autograd raised on every path: {skipped}")
    inputs = [c.input_grad for c in results.values() if c.input_grad is not None]
    params = {n: max(c.param_grads[n] for c in results.values())
              for n in next(iter(results.values())).param_grads}
    return Comparison(output=max(c.output for c in results.values()),
                      input_grad=max(inputs) if inputs else None, param_grads=params,
                      paths=results, skipped=skipped)


def _reference(module, x, path: Path, grad_out, seed, skipped: dict):
    """The conventional run along ``path``; where conventional autograd refuses the path
    itself (an in-place first layer on a leaf that requires grad), along the same path from
    a non-leaf; (path, None) where it refuses that too (a reentrant checkpoint under
    ``autograd.grad``). Refusals are recorded in ``skipped``."""
    for candidate in dict.fromkeys((path, Path("non-leaf", path.method, path.loss))):
        try:
            return candidate, _run(module, x, candidate, grad_out, seed)
        except RuntimeError as err:
            skipped[str(candidate)] = f"{type(err).__name__}: {err}"
    return path, None


def _run(model: nn.Module, x: torch.Tensor, path: Path, grad_out, seed):
    """Output, input gradient and parameter gradients (name -> tensor or None) of one step."""
    params = [(n, p) for n, p in _parameters(model) if p.requires_grad]
    for _, p in params:
        p.grad = None
    leaf = x.detach().clone().requires_grad_(path.entry != "leaf")
    xi = leaf.clone() if path.entry == "non-leaf" else leaf
    y = model(xi)
    maps = tree_flatten(y)[0]
    if path.loss == "sum":  # the output gradient is an expanded (stride-0) tensor of ones
        out, g = [sum((t.sum() for t in maps[1:]), maps[0].sum())], None
    else:
        out, g = _output_gradients(maps, grad_out, seed)
    wanted = _wanted(params)
    if path.method == "backward":
        torch.autograd.backward(out, g)
        grads = {n: _copy(p.grad) for n, p in params}
        gx = leaf.grad if path.entry != "leaf" else None
    else:
        targets = ([leaf] if path.entry != "leaf" else []) + [p for n, p in params if n in wanted]
        found = torch.autograd.grad(out, targets, g, allow_unused=True) if targets else []
        gx = found[0] if path.entry != "leaf" else None
        found = found[1:] if path.entry != "leaf" else found
        grads = {n: None for n, _ in params}
        grads.update(zip([n for n, _ in params if n in wanted], map(_copy, found)))
        stray = [n for n, p in params if p.grad is not None]
        if stray:
            raise AssertionError(f"torch.autograd.grad accumulated into .grad of {stray}")
    return [t.detach() for t in maps], gx, grads


def _output_gradients(maps: list, grad_out, seed: int) -> tuple[list, list]:
    """The output maps a ``"random"`` loss uses and their gradients: ``grad_out``'s leaves
    (None: not used), or one seeded random gradient per map."""
    if grad_out is None:
        generator = torch.Generator().manual_seed(seed)
        return maps, [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                      for t in maps]
    given = tree_leaves(grad_out, is_leaf=lambda v: v is None or isinstance(v, torch.Tensor))
    if len(given) != len(maps):
        raise ValueError(f"grad_out has {len(given)} gradients for {len(maps)} output maps")
    used = [(t, g) for t, g in zip(maps, given) if g is not None]
    return [t for t, _ in used], [g for _, g in used]


def _parameters(model: nn.Module):
    """Named parameters of the module under its own names (a Streaming wrapper's included)."""
    inner = model.module if isinstance(model, Streaming) else model
    return list(inner.named_parameters())


def _wanted(params) -> set:
    """The parameters ``autograd.grad`` asks for: every other one (all, if only one)."""
    names = [n for n, _ in params]
    return set(names if len(names) < 2 else names[::2])


def _copy(t):
    return None if t is None else t.detach().clone()


def _errors(path: Path, streamed, reference) -> Comparison:
    (y, gx, g), (y_ref, gx_ref, g_ref) = streamed, reference
    if (gx is None) != (gx_ref is None):
        raise AssertionError(f"{path}: input gradient streamed {gx is not None}, conventional "
                             f"{gx_ref is not None}")
    errs = {}
    for n, ref in g_ref.items():
        if (g[n] is None) != (ref is None):
            raise AssertionError(f"{path}: gradient of {n}: streamed {g[n] is not None}, "
                                 f"conventional {ref is not None}")
        errs[n] = 0.0 if ref is None else rel_err(g[n], ref)
    return Comparison(output=max(map(rel_err, y, y_ref)),
                      input_grad=None if gx_ref is None else rel_err(gx, gx_ref), param_grads=errs)
