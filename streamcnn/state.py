"""What the streamed forward read of the module, so the backward recomputes with exactly that.

The backward recomputes every tile, long after the forward ran. By then the
module may hold other tensors (``torch.func.functional_call`` has put its own
weights back, a hypernetwork has produced new ones), its tensors may have been
changed in place (an optimiser step before ``backward``), or its layers may have
been switched between train and eval mode. Conventional autograd keeps what it
saved and raises when a saved tensor was changed in place; streaming does the same
by recording, during the forward:

* which tensors the computation read (:class:`TensorUse`, a torch-function mode
  over the first tile) and their names in the module - parameters, buffers and
  plain tensor attributes (how ``nn.DataParallel`` replicas and hypernetworks hold
  weights). The backward recomputes each tile with exactly those tensors
  (``functional_call``), returns their gradients through autograd, and saves them
  with ``save_for_backward`` so an in-place change raises as it would conventionally;
* every module's train/eval flag, compared again in the backward;
* every module tensor's version, compared after each tile, because a layer or hook
  that changes module state on every call (spectral norm's power iteration in
  training mode) would change it once per tile and again per tile in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import rules
from .errors import StreamingError
from .trace import describe_layer, module_path


def module_tensors(module: nn.Module) -> dict[int, tuple[str, torch.Tensor]]:
    """id -> (dotted name, tensor) of every parameter, buffer and plain tensor attribute."""
    found: dict[int, tuple[str, torch.Tensor]] = {}
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        items = list(m._parameters.items()) + list(m._buffers.items()) + [
            (k, v) for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
        for name, t in items:
            if t is not None and id(t) not in found:
                found[id(t)] = (prefix + name, t)
    return found


class TensorUse(TorchFunctionMode):
    """Records the tensors torch operations read that no operation in the mode made."""

    def __init__(self, tile: torch.Tensor):
        super().__init__()
        self.made = {id(tile)}
        self.read: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self.made:
                self.read[id(t)] = t
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.made.add(id(t))
        return out


@dataclass(frozen=True)
class Captured:
    """The tensors a streamed forward read, split by what the backward does with them."""

    grad_names: tuple[str, ...]  # module tensors that require grad: inputs of the autograd node
    grad_tensors: tuple[torch.Tensor, ...]
    const_names: tuple[str, ...]  # module tensors that do not: recomputed with as saved
    const_tensors: tuple[torch.Tensor, ...]
    others: tuple[torch.Tensor, ...]  # tensors read that the module does not hold (constants)


def capture(module: nn.Module, read: dict[int, torch.Tensor]) -> Captured:
    """Split the tensors the forward read; refuse one that requires grad but has no name."""
    named = module_tensors(module)
    grad, const, others = [], [], []
    for key, t in read.items():
        if key in named:
            (grad if t.requires_grad else const).append(named[key])
        elif t.requires_grad:
            raise StreamingError(
                f"the streamed module reads a tensor of shape {tuple(t.shape)} that requires "
                f"grad but is not a parameter, buffer or attribute of the module (a global or a "
                f"closure?): streaming recomputes every tile in the backward and could not give "
                f"it a gradient; register it on the module (as a parameter or an attribute) or "
                f"move its use after the Streaming module")
        else:
            others.append(t)
    return Captured(tuple(n for n, _ in grad), tuple(t for _, t in grad),
                    tuple(n for n, _ in const), tuple(t for _, t in const), tuple(others))


#: layer types that compute differently in train and eval mode (named first in errors)
_MODE_DEPENDENT = {t.__name__ for t in rules.BATCHNORM_MODULES + rules.DROPOUT_MODULES + (nn.RReLU,)}


def modes(module: nn.Module) -> tuple[tuple[str, str, bool], ...]:
    """(path, class name, training) of the module and every submodule."""
    return tuple((path, type(m).__name__, m.training) for path, m in module.named_modules())


def check_modes(module: nn.Module, recorded) -> None:
    """Refuse a backward after a train/eval switch since the forward (naming the layers
    whose mode changed, innermost first)."""
    now = modes(module)
    if len(now) != len(recorded):
        raise StreamingError("the streamed module gained or lost layers between the forward and "
                             "its backward; change the module only after backward")
    changed = [(path, kind, is_) for (path, kind, was), (_, _, is_) in zip(recorded, now) if was != is_]
    if not changed:
        return
    path, kind, is_ = min(changed, key=lambda c: (c[1] not in _MODE_DEPENDENT, -c[0].count(".")))
    raise StreamingError(
        f"{describe_layer(module_path(path), kind)} was switched to {'train' if is_ else 'eval'} mode "
        f"between the streamed forward and its backward: the backward recomputes every "
        f"tile and would run it differently from the forward (conventional autograd reuses "
        f"what the forward saved instead); switch modes only after backward")


def versions(module: nn.Module) -> dict[int, tuple[str, torch.Tensor, int]]:
    """id -> (name, tensor, version counter) of every module tensor."""
    return {key: (name, t, t._version) for key, (name, t) in module_tensors(module).items()}


def check_unchanged(module: nn.Module, before: dict) -> None:
    """Refuse a streamed forward that changed module state (once per tile)."""
    for name, t, version in before.values():
        if t._version != version:
            path, _, attr = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            raise StreamingError(
                f"{describe_layer(module_path(path), type(owner).__name__)} changed its tensor "
                f"'{attr}' in "
                f"place while a tile ran (a layer or hook that updates state on every call, such "
                f"as spectral norm's power iteration in training mode): streaming calls the "
                f"module once per tile and again per tile in the backward, so that state would "
                f"be updated many times; call .eval() on it, or move it after the Streaming module")
