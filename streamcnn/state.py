"""What the streamed forward read of the module, so the backward recomputes with exactly that.

The backward recomputes every tile, long after the forward ran. By then the
module may hold other tensors (``torch.func.functional_call`` has put its own
weights back, a hypernetwork has produced new ones), its tensors may have been
changed in place (an optimiser step before ``backward``), or its layers may have
been switched between train and eval mode or reconfigured. Conventional autograd
keeps what it saved and raises when a saved tensor was changed in place; streaming
does the same by recording, during the forward:

* which tensors the computation read (:class:`TensorUse`, a torch-function mode
  over the first tile) and every name they have in the module - parameters,
  buffers and plain tensor attributes (how ``nn.DataParallel`` replicas and
  hypernetworks hold weights), under each module that holds them (a layer used
  twice, a weight tied between two layers). The backward recomputes each tile with
  exactly those tensors (``functional_call``), returns their gradients through
  autograd, and saves them with ``save_for_backward`` so an in-place change raises
  as it would conventionally;
* a :class:`Snapshot` of what else decides the computation and is not a tensor:
  every module's class, train/eval flag, scalar attributes (``negative_slope``),
  submodules and hooks (with the scalars their closures hold), and the random
  number generators of Python, numpy and torch. It is compared after every tile
  (a layer or hook that changes state, or draws random numbers, on every call would
  do so once per tile and again per tile in the backward) and before the backward
  (a change between forward and backward would make the recomputation differ);
* every module tensor's version, compared after each tile for the same reason
  (spectral norm's power iteration in training mode).

What cannot be checked - a hook whose effect depends on state that is not a scalar
(a list it appends to), or randomness drawn from a generator the module does not
hold - is the contract's stated limit (README, "The contract").
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
try:  # torch >= 2.3; before, the engine's own entry point
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover
    from torch.autograd.variable import Variable

    def _engine_run_backward(*args, **kwargs):
        return Variable._execution_engine.run_backward(*args, **kwargs)
from torch.nn.utils import parametrize
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import rules
from .errors import StreamingError
from .trace import Pipeline, describe_layer, module_path


def module_tensors(module: nn.Module) -> dict[int, tuple[tuple[str, ...], torch.Tensor]]:
    """id -> (every dotted name, tensor) of every parameter, buffer and plain tensor
    attribute. A module reachable by several paths is named once (by its first path):
    swapping the tensor under that name swaps it for every use of the module."""
    found: dict[int, tuple[tuple[str, ...], torch.Tensor]] = {}
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        items = list(m._parameters.items()) + list(m._buffers.items()) + [
            (k, v) for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
        for name, t in items:
            if t is not None:
                names, _ = found.get(id(t), ((), t))
                found[id(t)] = (names + (prefix + name,), t)
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

    grad_names: tuple[tuple[str, ...], ...]  # every name of each module tensor that requires grad
    grad_tensors: tuple[torch.Tensor, ...]  # (the inputs of the autograd node)
    const_names: tuple[tuple[str, ...], ...]  # module tensors that do not: recomputed as saved
    const_tensors: tuple[torch.Tensor, ...]
    others: tuple[torch.Tensor, ...]  # tensors read that the module does not hold (constants)

    def substitutes(self, grad_aliases, consts) -> dict[str, torch.Tensor]:
        """``functional_call``'s name -> tensor map: each tensor under all of its names."""
        pairs = list(zip(self.grad_names, grad_aliases)) + list(zip(self.const_names, consts))
        return {name: t for names, t in pairs for name in names}


def capture(module: nn.Module, read: dict[int, torch.Tensor], ignore=frozenset()) -> Captured:
    """Split the tensors the forward read; refuse one that requires grad but has no name, and
    one made in inference mode (autograd cannot save it, conventionally either). ``ignore``:
    ids of tensors the recomputation does not use (streamed normalisations' running
    statistics, updated once per forward as conventional training updates them)."""
    named = module_tensors(module)
    grad, const, others = [], [], []
    for key, t in read.items():
        if key in ignore:
            continue
        if t.is_inference():
            where = f"the module's tensor '{named[key][0][0]}'" if key in named else "a tensor it reads"
            raise RuntimeError(
                f"{where} was created under torch.inference_mode(): inference tensors cannot be "
                f"saved for backward, so the streamed module cannot be trained (conventional "
                f"autograd refuses it too); create it outside inference mode (torch.no_grad() "
                f"keeps tensors usable by autograd), or run it under torch.no_grad()")
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


@contextlib.contextmanager
def uncached_parametrizations():
    """Evaluate parametrizations on every access while tiles run, even inside
    ``parametrize.cached()``: a value cached by the no-grad forward would reach the
    backward without a graph (no gradient for the parametrised weight), and one cached
    before the forward would not be the module's to recompute."""
    saved = parametrize._cache_enabled
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = saved


@contextlib.contextmanager
def tile_scope(module: nn.Module):
    """What holds wherever a tile's module code runs (its forward, and recomputations in its
    backward): parametrizations evaluated anew, forward hooks that may only observe."""
    with uncached_parametrizations(), observing_forward_hooks(module):
        yield


def substituted(module: nn.Module, tensors: dict):
    """``module`` holding ``tensors`` (dotted name -> tensor) in place of its own, as
    ``torch.func.functional_call`` holds them for one call, but for as long as the context
    lasts: through a tile's backward, where a reentrant ``torch.utils.checkpoint`` runs
    parts of the module again and must find the same tensors (else their gradients would
    go to the module's own tensors)."""
    return _reparametrize_module(module, tensors, tie_weights=False, strict=False)


def backward_here(y, grad, retain_graph: bool = False, inputs=()) -> None:
    """``torch.autograd.backward(y, grad)`` (one tensor and its gradient, or sequences of
    them) with the torch-function modes active here still active inside the backward, where
    a ``torch.utils.checkpoint`` in the module runs parts of it again. (``Tensor.backward``
    is itself a torch function: a mode that sees the call is popped while it runs, so the
    recomputation would escape it; the engine is called directly.) ``inputs``: as
    ``torch.autograd.backward``'s, the only leaves to accumulate into (none: every leaf)."""
    ys = (y,) if isinstance(y, torch.Tensor) else tuple(y)
    grads = (grad,) if isinstance(grad, torch.Tensor) else tuple(grad)
    _engine_run_backward(ys, grads, retain_graph, False, tuple(inputs), allow_unreachable=True,
                         accumulate_grad=True)


# ------------------------------------------------------------------ what is not a tensor

#: layer types that compute differently in train and eval mode (named first in errors)
_MODE_DEPENDENT = {t.__name__ for t in rules.BATCHNORM_MODULES + rules.DROPOUT_MODULES + (nn.RReLU,)}
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GENERATORS = (np.random.Generator, np.random.RandomState, random.Random)


def _scalar(value, lists: bool = True):
    """``value`` if it is a scalar or a tuple (or, with ``lists``, a list) of scalars, else None.
    A hook's closure keeps its lists out: a hook appending to a list is a log, not state."""
    if isinstance(value, _SCALARS):
        return value
    kinds = (tuple, list) if lists else tuple
    if isinstance(value, kinds) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(value)
    return None


def _rng_state(rng) -> str:
    state = rng.getstate() if isinstance(rng, random.Random) else (
        rng.bit_generator.state if isinstance(rng, np.random.Generator) else rng.get_state())
    return repr(state)


def _scalars_of(obj) -> dict:
    """The scalar attributes of an object, and the states of the generators it holds."""
    out = {}
    for k, v in getattr(obj, "__dict__", {}).items():
        if isinstance(v, _GENERATORS):
            out[k] = ("random generator", _rng_state(v))
        elif _scalar(v) is not None:
            out[k] = _scalar(v)
    return out


def _hook_state(hook) -> tuple:
    """A hook's identity and the scalars it holds (closure cells, a callable object's or a
    bound method's attributes), so that a changed hook or hook state is seen."""
    fn = getattr(hook, "__func__", hook)
    cells = tuple(_scalar(c.cell_contents, lists=False)
                  for c in (getattr(fn, "__closure__", None) or ()) if _has_contents(c))
    owner = getattr(hook, "__self__", hook if not callable(getattr(hook, "__code__", None)) else None)
    attributes = () if isinstance(owner, nn.Module) or owner is None else tuple(
        sorted(_scalars_of(owner).items()))
    return id(fn), cells, attributes


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def configuration(module: nn.Module) -> dict[str, dict]:
    """path -> what decides each module's computation besides its tensors."""
    config = {}
    for path, m in module.named_modules():
        entry = {"class": type(m).__name__, **_scalars_of(m)}
        entry["submodules"] = tuple((k, id(v)) for k, v in m._modules.items())
        for hooks in _HOOKS:
            entry[hooks] = tuple(_hook_state(h) for h in getattr(m, hooks).values())
        if isinstance(m, Pipeline) and m.transform is not None and not isinstance(
                m.transform, nn.Module):  # a transform that is a module is a submodule
            entry["transform"] = _hook_state(m.transform)
        config[path] = entry
    return config


def rng_states(device: torch.device) -> tuple:
    """The global random number generators' states: Python's, numpy's, torch's."""
    states = [random.getstate(), *np.random.get_state(), torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return tuple(states)


def _same_rng(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


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


def _describe_change(path: str, before: dict, after: dict | None) -> str:
    layer = describe_layer(module_path(path), before["class"])
    if after is None:
        return f"{layer} was removed from the streamed module"
    if after["class"] != before["class"]:
        return f"{layer} was replaced by a {after['class']}"
    key = next(k for k in {**before, **after} if before.get(k, "<unset>") != after.get(k, "<unset>"))
    if key == "submodules":
        return f"{layer} had a submodule added, removed or replaced"
    if key in _HOOKS or key == "transform":
        return (f"{layer} had a hook added, removed or replaced, or a hook's state (a counter in "
                f"its closure) changed ({key})" if key != "transform" else
                "the transform's state (a value in its closure or attributes) changed")
    was, now = before.get(key, "<unset>"), after.get(key, "<unset>")
    if isinstance(was, tuple) and was[:1] == ("random generator",):
        return f"{layer} drew random numbers from its generator '{key}'"
    return f"{layer} changed its attribute '{key}' from {was!r} to {now!r}"


# ------------------------------------------------------------------ the snapshot

class Snapshot:
    """What a streamed forward depends on besides its inputs' values, taken before the first
    tile: tensor versions, train/eval flags, the non-tensor configuration, RNG states.
    ``ignore``: ids of tensors the caller updates itself (a streamed BatchNorm's counter)."""

    def __init__(self, pipeline: nn.Module, device: torch.device, ignore=frozenset()):
        self.pipeline, self.device = pipeline, device
        self.versions = {k: v for k, v in versions(pipeline).items() if k not in ignore}
        self.modes = modes(pipeline)
        self.config = configuration(pipeline)
        self.rng = rng_states(device)

    def check_tile(self) -> None:
        """After a tile ran: nothing it depends on may have changed (see the module docstring)."""
        check_unchanged(self.pipeline, self.versions)
        self._check_config("while a tile ran")
        if not _same_rng(self.rng, rng_states(self.device)):
            raise StreamingError(
                "a tile drew random numbers from Python's random module, numpy's global generator or "
                "torch's generator (in the streamed module, one of its hooks or the transform): "
                "streaming runs the module once per tile and again per tile in the backward, so "
                "every tile would draw anew, not once for the whole image; draw them before the "
                "forward (e.g. augment the image first) or move that part after the Streaming module")

    def check_backward(self) -> None:
        """Before the backward: the recomputation runs the module as the forward did."""
        check_modes(self.pipeline, self.modes)
        self._check_config("between the streamed forward and its backward")

    def _check_config(self, when: str) -> None:
        now = configuration(self.pipeline)
        if now == self.config:
            return
        raise StreamingError(
            f"{_difference(self.config, now)} {when}: streaming runs the module once per tile, and "
            f"again per tile in the backward recomputation, so every run must compute alike "
            f"(conventional autograd reuses what its one forward saved instead); change the module "
            f"only after backward, and keep state that changes on every call out of the streamed "
            f"module and its hooks")


def _difference(before: dict, after: dict) -> str:
    """The first difference between two configurations, in words."""
    path = next(p for p in {**before, **after} if before.get(p) != after.get(p))
    if path not in before:
        return f"{describe_layer(module_path(path), after[path]['class'])} was added to the module"
    was, now = before[path], after.get(path)
    if now is not None and was["submodules"] != now["submodules"]:
        old, new = dict(was["submodules"]), dict(now["submodules"])
        name = next(k for k in {**old, **new} if old.get(k) != new.get(k))
        child = f"{path}.{name}" if path else name
        if child in before and child in after:
            return (f"{describe_layer(module_path(child), before[child]['class'])} was replaced by "
                    f"a {after[child]['class']}")
    return _describe_change(path, was, now)


def versions(module: nn.Module) -> dict[int, tuple[str, torch.Tensor, int]]:
    """id -> (name, tensor, version counter) of every module tensor (inference tensors, which
    have no version counter and cannot change outside inference mode, are left out)."""
    return {key: (names[0], t, t._version) for key, (names, t) in module_tensors(module).items()
            if not t.is_inference()}


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


# ------------------------------------------------------------------ gradient hooks

@contextlib.contextmanager
def observing_gradient_hooks(module: nn.Module):
    """While the backward recomputes tiles: module backward hooks may observe a tile's
    gradients but not replace them. A tile's gradient at a layer is only the part that
    flows from the outputs the tile owns, so a hook that changes it nonlinearly (guided
    backprop's ``clamp(min=0)``) would not change the sum of the parts as it changes the
    whole; a hook that returns a new gradient raises, naming its layer."""
    with _wrapped_hooks(module, ("_backward_hooks", "_backward_pre_hooks"), _observer):
        yield


def _observer(hook, path: str, m: nn.Module, hooks: str):
    kind = "backward pre-hook" if hooks == "_backward_pre_hooks" else "backward hook"

    def observe(*args):
        result = hook(*args)
        if result is not None:
            raise StreamingError(
                f"a {kind} on {describe_layer(module_path(path), type(m).__name__)} returned a new "
                f"gradient: streaming backpropagates each tile's part of the gradient separately, "
                f"so a hook that changes gradients (guided backprop's clamp) would be applied to "
                f"each part instead of the whole; register it on the Streaming module (it sees "
                f"the stitched gradient) or move that layer after the Streaming module (hooks "
                f"that only read gradients are fine)")
        return None
    return observe


@contextlib.contextmanager
def observing_forward_hooks(module: nn.Module):
    """While tiles run: module forward hooks and pre-hooks may observe, not replace. A hook
    that returns a new output (or input) runs on each tile, and nothing tells whether it
    changes the whole map as it changes each tile (``o.flip(-1)`` does not); so a hook that
    returns anything but None (or the very output it was given) raises, naming its layer."""
    with _wrapped_hooks(module, ("_forward_hooks", "_forward_pre_hooks"), _forward_observer):
        yield


@contextlib.contextmanager
def _wrapped_hooks(module: nn.Module, tables: tuple, wrap):
    """Every hook in the named hook tables of every submodule replaced by ``wrap(hook, path,
    module, table)`` while the context lasts."""
    swapped = []
    try:
        for path, m in module.named_modules():
            for hooks in tables:
                table = getattr(m, hooks)
                for key, hook in list(table.items()):
                    table[key] = wrap(hook, path, m, hooks)
                    swapped.append((table, key, hook))
        yield
    finally:
        for table, key, hook in swapped:
            table[key] = hook


def _forward_observer(hook, path: str, m: nn.Module, hooks: str):
    pre = hooks == "_forward_pre_hooks"

    def observe(*args):
        result = hook(*args)
        unchanged = args[1] if pre else args[-1]  # the input tuple / the output
        if result is not None and result is not unchanged:
            kind = "forward pre-hook" if pre else "forward hook"
            raise StreamingError(
                f"a {kind} on {describe_layer(module_path(path), type(m).__name__)} returned a "
                f"new {'input' if pre else 'output'}: streaming runs the layer on each tile, and "
                f"a hook that changes its values would change each tile, not the whole feature "
                f"map (a flip or any step between positions would give a wrong result); return "
                f"None (hooks that only read are fine), change the values in the module's own "
                f"forward, or register the hook on the Streaming module (it sees the stitched "
                f"map)")
        return result
    return observe
