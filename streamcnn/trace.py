"""Trace the streamed module with torch.fx and derive its geometry graph.

Analysis by tracing, execution by the user's module: ``analyse`` traces the module
into a graph of operations (torch.nn layers stay single nodes, everything else is
traced through), then walks that graph once with symbolic values instead of
tensors - :class:`rules.FMap` for feature maps, real tensors for constants such as
parameters - asking ``streamcnn.rules`` what each operation does to a tile. The
result is a :class:`TracedGraph` of steps whose per-axis rules ``streamcnn.geometry``
tiles. No feature map is computed, and the tiles later run through the user's own
module, never through this graph.

A value the output does not depend on is never checked, so dead code (a debug
``print(x.shape)``) does not stop streaming; a refused operation the output does
depend on raises ``StreamingError`` naming the operation, its module path and the
user's source line.

The output may be one feature map or any nesting of tuples (named ones too), lists and
dicts of them (a feature pyramid, deep supervision): its leaves, in ``torch.utils._pytree``
order, are the graph's output steps (``TracedGraph.outputs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from fractions import Fraction
import inspect
import math
import operator
import os
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import TreeSpec, keystr, tree_flatten_with_path

from . import binding, geometry, rules
from .errors import StreamingError
from .geometry import Field, GridMismatch, Merge, Step, Transposed, Upsample, Window, fields
from .rules import FMap, Refused, Shape

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


@dataclass(frozen=True)
class GraphStep:
    """One step of the traced graph: an operation on feature maps."""

    name: str  # e.g. "layer '4.0.conv1' (Conv2d)" or "operation 'add' in '4.0' (BasicBlock)"
    inputs: tuple[int, ...]
    rules: tuple  # one geometry rule per spatial axis (() for the input)
    channels: int | None
    node: str | None  # name of the fx node that computed it
    dims: tuple = ()  # role of each dimension of its value ("N", "C", spatial axes)
    norm: rules.Norm | None = None  # a normalisation over space (statistics of its input)
    channels_last_unsafe: bool = False  # a functional convolution hit by oneDNN#6035 (channels_last.py)

    @property
    def kind(self) -> str:
        """"input", "window", "pointwise", "merge", "upsample", "norm" or "global"."""
        if not self.rules:
            return "input"
        if self.norm is not None:
            return "global" if isinstance(self.norm, rules.Global) else "norm"
        return ("merge" if any(isinstance(r, Merge) for r in self.rules) else
                "upsample" if any(isinstance(r, (Upsample, Transposed)) for r in self.rules) else
                "window" if any(isinstance(r, Window) for r in self.rules) else "pointwise")


@dataclass(frozen=True)
class TracedGraph:
    """The streamed module's operations on feature maps, in execution order.

    ``outputs``: the step of each leaf of the module's output (one map, or a structure of
    maps), in ``torch.utils._pytree`` order; ``output_paths`` where each leaf is in the
    structure (``keystr``: ``"['layer2']"``, ``"[0]"``; ``""`` for a bare map); ``spec`` the
    structure as traced, with plain dicts and lists (fx traces an ``OrderedDict`` as a
    ``dict``: the tile loop returns the structure the module's tiles return, after checking
    that their leaves lie at ``output_paths``)."""

    ndim: int
    steps: tuple[GraphStep, ...]
    graph: fx.Graph = field(repr=False)
    root: nn.Module = field(repr=False)  # the traced Pipeline (the user's module and transform)
    calls: tuple = ()  # (module path, fx node of its output) of every module call, in order
    #: what runs on every tile for no output: refusals, windows (which may not fit a tile)
    unused: tuple[str, ...] = ()
    outputs: tuple[int, ...] = ()
    output_paths: tuple[str, ...] = ()
    spec: TreeSpec | None = field(default=None, repr=False)
    #: fx nodes whose value is a structure of maps (split, chunk), not one map
    structures: frozenset = frozenset()
    #: whether the module calls a reentrant ``torch.utils.checkpoint`` (traced through)
    reentrant: bool = False
    #: whether it calls ``torch.utils.checkpoint`` at all (whose backward recomputes)
    checkpointed: bool = False

    @property
    def maps(self) -> tuple[int, ...]:
        """The output steps, each once (a map returned twice is one map), in leaf order."""
        return tuple(dict.fromkeys(self.outputs)) or (len(self.steps) - 1,)

    def axis(self, a: int) -> tuple[Step, ...]:
        """The graph on spatial axis ``a``, for ``streamcnn.geometry``, whose last step is the
        output. With several output maps, that is a step of no layer after them: see
        :func:`common_grid`."""
        steps = (Step(None),) + tuple(Step(s.rules[a], s.inputs, s.name) for s in self.steps[1:])
        return steps + (common_grid(steps, self.maps),) if len(self.maps) > 1 else steps

    def node_steps(self) -> dict:
        """fx node name -> the step it computed."""
        return {s.node: i for i, s in enumerate(self.steps) if s.node is not None}

    def module_steps(self, path: str) -> list:
        """The step of each call of the module at ``path`` (a path as in ``named_modules()``),
        in call order; None for a call the output does not depend on."""
        steps = self.node_steps()
        first = next(n.name for n in self.graph.nodes if n.op == "placeholder")
        steps[first] = 0  # a module that returns its input (an empty Sequential)
        return [steps.get(node) for p, node in self.calls if p == path]

    @property
    def has_globals(self) -> bool:
        return any(isinstance(s.norm, rules.Global) for s in self.steps)

    def norm_nodes(self) -> list:
        """The fx nodes a tile's whole-map steps are found among, in the order a tile runs
        them, each with its step (a ``norm`` or ``global`` step, or None: frozen statistics,
        or a call that needs none) and the function a tile calls (:func:`runtime_function`):
        every normalisation (BatchNorm, GroupNorm, InstanceNorm modules,
        ``F.batch_norm``/``group_norm``/``instance_norm``) and, in a graph with global steps,
        every call that may reduce over space (``rules.GLOBAL_CALLS``)."""
        steps = self.node_steps()
        found = []
        for node in self.graph.nodes:
            func = runtime_function(node, self.root, self.has_globals)
            if func is not None:
                step = steps.get(node.name)
                found.append((node, step if step is not None and self.steps[step].norm else None,
                              func))
        return found


def common_grid(axis: tuple[Step, ...], maps: tuple[int, ...]) -> Step:
    """The last step of an axis graph with several output maps, so that ``geometry`` (whose
    output is the last step) tiles for all of them.

    A tile must start on the grid of every map it computes: at a multiple of each one's
    total stride (each window's input starts on its stride grid), so at a multiple of their
    least common multiple ``L``. One map's stride need not be ``L`` (strides 2 and 3), and the
    coarsest map need not come last (deep supervision computes it first). So the step added
    is a 1-wide window of stride ``L / s`` on the map of stride ``s`` that needs the longest
    tile for a valid output on that grid: its total stride is ``L``, so tiles start on the
    common grid, and it reads one position of a map, so the tiles give it valid values
    where they give that map's. Every output map is among the tiling's ``targets``
    (``tiling.tile_image``), so the tiles cover each, and each is partitioned among them by
    ``geometry.ownership``; the added step's own map is never computed."""
    found = fields(axis)
    lcm = math.lcm(*(Fraction(found[i].stride).numerator for i in maps))  # (fine maps: 1/2)

    def need(i: int) -> int:  # geometry.min_tile_size's bound, on the common grid
        f = found[i]
        return f.size - f.offset + lcm * -(-f.offset // lcm)

    widest = max(maps, key=lambda i: (need(i), i))
    return Step(Window(1, int(lcm / Fraction(found[widest].stride))), (widest,),
                f"the output maps' common grid (stride {lcm})")


def runtime_function(node: fx.Node, root: nn.Module, globals_too: bool):
    """The function a tile calls for ``node`` where it is a normalisation or (``globals_too``)
    a reduction that may span the map, as a torch-function mode sees it (a layer's forward
    calls its functional form; a method is ``torch.Tensor``'s); None for other nodes."""
    if node.op == "call_module":
        kind = type(root.get_submodule(node.target))
        found = rules.NORM_LAYER_FUNCTIONS.get(kind)
        return found if found is not None or not globals_too else rules.GLOBAL_LAYER_FUNCTIONS.get(kind)
    if node.op == "call_function":
        if globals_too and node.target is operator.matmul:  # (x @ w calls Tensor.matmul)
            return torch.Tensor.matmul
        return node.target if node.target in rules.NORM_FUNCTIONS or (
            globals_too and node.target in rules.GLOBAL_FUNCTIONS) else None
    if node.op == "call_method" and globals_too and node.target in rules.GLOBAL_METHODS:
        return getattr(torch.Tensor, node.target)
    return None


class Pipeline(nn.Module):
    """What runs on one tile: ``module(transform(tile))``.

    Tracing and the tile loop both run this, so the transform is analysed and
    recomputed like the module. It is made anew for every call and never registered
    anywhere, so fx's traced constants land here and the user's module is untouched.
    """

    def __init__(self, module: nn.Module, transform=None):
        super().__init__()
        self.module = module
        self.transform = transform
        self.layer_dtypes = [(n, t.dtype) for n, t in layer_tensors(module) if t.is_floating_point()]

    def forward(self, x):
        if self.transform is None:
            return self.module(x)
        y = self.transform(x)
        if isinstance(y, fx.Proxy):  # tracing: mark the transformed tile for plan's probe
            y.node.meta["streamcnn_transformed"] = True
        elif isinstance(y, torch.Tensor):
            self.check_transformed(x, y)
        return self.module(y)

    def check_transformed(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A transformed tile the module can take: floating point, the tile's spatial shape,
        and the dtype of the module's torch layers when they share one (they would fail on
        another, as the input's dtype is checked without a transform) unless autocast casts
        it. Layers of several dtypes (a module that casts inside) are left to torch."""
        if not y.is_floating_point() or y.shape[2:] != x.shape[2:] or y.dim() != x.dim():
            raise StreamingError(
                f"the transform turned a tile of shape {tuple(x.shape)} ({x.dtype}) into one of "
                f"shape {tuple(y.shape)} ({y.dtype}); it must return a floating-point tile of the "
                f"same spatial shape (it is applied to every tile, e.g. convert and normalise)")
        if autocasting(y.device.type):
            return
        if len({d for _, d in self.layer_dtypes}) == 1 and self.layer_dtypes[0][1] != y.dtype:
            name, dtype = self.layer_dtypes[0]
            raise StreamingError(
                f"the transform {describe_transform(self.transform)} returned a {y.dtype} tile "
                f"but {tensor_owner(self.module, name)} has {name.rpartition('.')[2]} of dtype "
                f"{dtype}: make the transform return {dtype}, e.g. end it with "
                f"{cast(dtype)} (or convert the module with .to({y.dtype}))")


def layer_tensors(module: nn.Module):
    """(name, tensor) of the parameters and buffers of torch layers that compute in their
    input's dtype (convolutions, norms, Linear): a mismatch there fails in torch too. Other
    tensors (a float32 buffer of a custom layer in a float64 model) may be promoted or
    unused, so they are left to torch."""
    for path, m in module.named_modules():
        if type(m) in rules.MODULES:
            prefix = f"{path}." if path else ""
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                yield prefix + name, t


def tensor_owner(module: nn.Module, name: str) -> str:
    """The layer that holds the parameter or buffer ``name`` of ``module``, described."""
    path = name.rpartition(".")[0]
    return describe_layer(path, type(module.get_submodule(path)).__name__)


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for this device type (then layers cast their inputs)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, AttributeError):  # a device type without autocast
        return False


def describe_transform(transform) -> str:
    """A transform as a message names it: its function's name, its module type, or a lambda."""
    if isinstance(transform, nn.Module):
        return f"({type(transform).__name__})"
    name = getattr(transform, "__qualname__", None) or type(transform).__name__
    return "(a lambda)" if name.endswith("<lambda>") else f"'{name}'"


def cast(dtype: torch.dtype) -> str:
    """The Tensor method that converts to ``dtype``, as a user writes it."""
    short = {torch.float32: ".float()", torch.float64: ".double()", torch.float16: ".half()",
             torch.bfloat16: ".bfloat16()"}
    return short.get(dtype, f".to({dtype})")


def module_path(path: str) -> str:
    """A path under the pipeline as the user sees it (relative to their module)."""
    return "" if path == "module" else path[7:] if path.startswith("module.") else path


def describe_layer(path: str, kind: str) -> str:
    where = f"'{path}'" if path else "(the module itself)"
    return f"layer {where} ({kind})"


class _Tracer(fx.Tracer):
    """fx's tracer (torch.nn layers stay leaves) that remembers where tracing failed.

    Modules are traced through their ``forward`` without their hooks: hooks run for
    real on every tile, and tracing them would call user code with symbolic values
    (a hook that stores or converts its output would break or keep a proxy).
    """

    def __init__(self, stack_traces: bool):
        super().__init__()
        self.record_stack_traces = stack_traces  # ~3x slower: only to explain a refusal
        self.module_stack_paths: list = []
        self.failed_in = None
        self.calls: list = []  # (module path, output node) of every module call

    def call_module(self, m, forward, args, kwargs):
        self.module_stack_paths.append((module_path(self.path_of_module(m)), type(m).__name__))
        try:
            out = super().call_module(m, m.forward, args, kwargs)
            if isinstance(out, fx.Proxy):
                self.calls.append((self.module_stack_paths[-1][0], out.node.name))
            return out
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.module_stack_paths[-1]
            raise
        finally:
            self.module_stack_paths.pop()


@contextlib.contextmanager
def _noting_reentrant_checkpoints():
    """Yields a list that gets an entry for each reentrant ``torch.utils.checkpoint`` call
    traced: fx traces through it, so the graph alone runs as if it were not there (where no
    input requires grad, a reentrant checkpoint leaves its layers without gradients)."""
    from torch.utils.checkpoint import CheckpointFunction

    seen: list = []
    apply = CheckpointFunction.apply

    def noted(cls, *args, **kwargs):
        seen.append(True)
        return apply(*args, **kwargs)

    CheckpointFunction.apply = classmethod(noted)
    try:
        yield seen
    finally:
        del CheckpointFunction.apply  # (Function's own classmethod again)


@contextlib.contextmanager
def _noting_checkpoints():
    """Yields a list that gets an entry for each ``torch.utils.checkpoint`` call traced,
    reentrant or not: fx traces through both, so the graph alone never recomputes their
    layers in the backward as the module does (a normalisation's running statistics are
    updated again there)."""
    import torch.utils.checkpoint as ck

    seen: list = []
    generator = ck._checkpoint_without_reentrant_generator

    def noted(*args, **kwargs):
        seen.append(True)
        return generator(*args, **kwargs)

    ck._checkpoint_without_reentrant_generator = noted
    try:
        with _noting_reentrant_checkpoints() as reentrant:
            yield seen, reentrant
    finally:
        ck._checkpoint_without_reentrant_generator = generator


def trace(module: nn.Module, stack_traces: bool = False, transform=None) -> tuple[Pipeline, fx.Graph]:
    """The fx graph of ``transform`` then ``module``, under a :class:`Pipeline` root (its
    ``calls`` attribute lists every module call: path and output node)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"Streaming needs an nn.Module, got {type(module).__name__}")
    root, tracer = Pipeline(module, transform), _Tracer(stack_traces)
    try:
        with _noting_checkpoints() as (other, reentrant):
            graph = tracer.trace(root)
        graph.streamcnn_calls = tuple(tracer.calls)
        graph.streamcnn_reentrant = bool(reentrant)
        graph.streamcnn_checkpointed = bool(reentrant or other)
        return root, graph
    except StreamingError:
        raise
    except Exception as err:
        path, kind = tracer.failed_in or ("", type(module).__name__)
        raise StreamingError(
            f"{describe_layer(path, kind)} could not be traced, so streamcnn cannot derive its "
            f"tile geometry: {type(err).__name__}: {err}. streamcnn traces the streamed module "
            f"with torch.fx; a forward that branches on tensor values, reads their data, or "
            f"calls non-torch code on them cannot be traced. Make that forward traceable, or "
            f"move the module after the Streaming module") from err


def analyse(module: nn.Module, ndim: int, channels: int | None = None, *, batch: int | None = None,
            dtype: torch.dtype | None = None, device=None, transform=None,
            spatial_norms: bool = True) -> TracedGraph:
    """Trace ``module`` (after ``transform``, if given) and derive the geometry of an
    (N, C, *spatial) input with ``ndim`` spatial axes and ``channels`` channels (None:
    unknown, checks skipped).

    Raises ``StreamingError`` for operations that cannot be streamed (in the modules'
    current train/eval modes) and ``ValueError`` for channel counts that do not fit.
    ``spatial_norms``: record normalisations whose statistics span the feature map
    (BatchNorm in training mode, GroupNorm, InstanceNorm) as ``norm`` steps for the caller
    to stream (``streamcnn.norms``); False refuses them.
    """
    def run(stack_traces):
        root, graph = trace(module, stack_traces=stack_traces, transform=transform)
        return _Analysis(root, graph, ndim, channels, batch, dtype, device, spatial_norms).run()

    try:
        return run(False)
    except StreamingError:  # again with the source lines, for the message
        return run(True)


class _Context:
    """What a ``rules`` handler sees of the analysis while it handles one node."""

    def __init__(self, analysis: "_Analysis", node: fx.Node):
        self.analysis, self.node = analysis, node
        self.ndim, self.batch = analysis.ndim, analysis.batch
        self.dtype, self.device = analysis.dtype, analysis.device
        self.spatial_norms = analysis.spatial_norms
        self.name = analysis.describe(node)

    @property
    def map_dtype(self) -> torch.dtype:
        """The dtype feature maps compute in: the input's where it is floating point, else
        (a uint8 image with a transform) the one dtype of the module's layers, or torch's
        default."""
        if self.dtype is not None and self.dtype.is_floating_point:
            return self.dtype
        dtypes = {d for _, d in self.analysis.root.layer_dtypes}
        return dtypes.pop() if len(dtypes) == 1 else torch.get_default_dtype()

    def step(self, rule, inputs, dims, channels, source="the input has", norm=None,
             channels_last_unsafe=False) -> FMap:
        return self.analysis.add_step(self, rule, inputs, dims, channels, source, norm,
                                      channels_last_unsafe)

    def stride(self, x: FMap, axis: int):
        """The total stride of ``x`` 's grid along spatial axis ``axis`` (input pixels per
        position; a Fraction after upsampling)."""
        return self.analysis.fields[x.index][axis].stride

    def constant_size(self, expr, inputs: list, axis: int, first: bool = False):
        """The value of a size expression over the lengths of ``inputs`` along ``axis``
        (``geometry.evaluate``) where it is the same for every input length on the graph's
        grid (multiples of ``geometry.grid``, where every map's positions align as a tile's
        do: the first few the graph so far accepts, up to 4096 pixels); None where it
        differs. ``first``: its value for the first such length (None if none is). Lengths
        off the grid may give other values (a pooling of an odd length): they do not fit
        (``geometry.SizedWindow``)."""
        graph = (Step(None),) + tuple(Step(s.rules[axis], s.inputs, s.name)
                                      for s in self.analysis.steps[1:])
        align = geometry.grid(graph)
        seen, found = set(), 0
        for n in range(align, 4097, align):
            every = geometry.lengths(graph, n)
            ns = tuple(every[x.index] for x in inputs)
            if min(ns) <= 0 or not geometry.fits(graph, n):
                continue
            seen.add(geometry.evaluate(expr, ns))
            found += 1
            if first or found == 8 or len(seen) > 1:
                break
        return next(iter(seen)) if len(seen) == 1 else None

    def refuse(self, why: str, fix: str = rules.MOVE) -> Refused:
        return Refused(StreamingError(f"{self.name} cannot be streamed: {why}; {fix}"
                                      f"{_source_line(self.node)}"))


class _Analysis:
    """One walk over the fx graph with symbolic feature maps (see module docstring)."""

    def __init__(self, root, graph, ndim, channels, batch, dtype, device, spatial_norms=True):
        self.root, self.graph, self.ndim = root, graph, ndim
        self.batch, self.dtype, self.device = batch, dtype, device
        self.spatial_norms = spatial_norms
        self.steps = [GraphStep("the input", (), (), channels, None, rules.standard_dims(ndim))]
        self.fields = [(Field(),) * ndim]
        self.channels = channels
        self.structures: set = set()

    def run(self) -> TracedGraph:
        env: dict = {}
        placeholders = 0
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = self._placeholder(node, placeholders)
                placeholders += 1
            elif node.op == "get_attr":
                env[node] = _fetch(self.root, node.target)
            elif node.op == "output":
                return self._finish(fx.node.map_arg(node.args[0], env.__getitem__), env)
            else:
                env[node] = self._call(node, env)
                if not isinstance(env[node], FMap) and rules.contains(env[node], FMap):
                    self.structures.add(node.name)
        raise StreamingError("the streamed module's graph has no output")

    def _placeholder(self, node, k: int):
        if k == 0:
            return FMap(0, rules.standard_dims(self.ndim), self.channels)
        if node.args:  # a parameter with a default value
            return node.args[0]
        raise StreamingError(f"the streamed module's forward takes more than one input "
                             f"('{node.target}'); Streaming passes it the image only")

    def _call(self, node: fx.Node, env: dict):
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_function":
            expr = rules.size_arithmetic(node.target, args, kwargs)
            if expr is not None:  # (a number only where it crops or pads: rules.SizeExpr)
                return expr
            if _is_namedtuple(node.target):
                return node.target(*args, **kwargs)  # a structure of values (an output's)
            if node.target in (getattr, operator.getitem) and args and isinstance(args[0], tuple) \
                    and hasattr(type(args[0]), "n_fields") and isinstance(args[1], (str, int)):
                return node.target(*args)  # torch.max(x, dim).values: one field only
        refused = rules.first_refused((args, kwargs))
        ctx = _Context(self, node)
        if refused is None and rules.contains((args, kwargs), rules.Pooled) and not \
                rules.contains((args, kwargs), (FMap, Shape)):
            value = self._on_pooled(ctx, node, args, kwargs)
            if rules.is_in_place(node.op, node.target, node.kwargs) and args and \
                    isinstance(node.args[0], fx.Node) and isinstance(args[0], rules.Pooled):
                env[node.args[0]] = value
            return value
        sizes = (rules.SpatialSize, rules.SizeExpr)
        if isinstance(refused, sizes) and getattr(self._handler(node), "takes_sizes", False):
            refused = rules.first_refused((args, kwargs), skip=sizes)
        if refused is not None:
            value = refused
        elif rules.is_random_call(node.op, node.target):
            value = rules.draws_random(ctx)
        elif not rules.is_dynamic((args, kwargs)):
            return self._evaluate(node, args, kwargs)
        elif not rules.contains((args, kwargs), (FMap, Shape)):  # only unknowns: wait for the input
            return rules.unknown(node.op, node.target, args, kwargs)
        else:
            value = self._handle(ctx, node, args, kwargs)
        # the tensor it was called on now holds the result, refused ones included: the
        # user's code reads it by its old name afterwards
        if rules.is_in_place(node.op, node.target, node.kwargs) and args and \
                isinstance(node.args[0], fx.Node) and isinstance(args[0], FMap):
            env[node.args[0]] = value
        return value

    def _on_pooled(self, ctx, node, args, kwargs):
        """A call on values reduced over the whole map (and constants): it computes the same
        on every tile, so it streams, unless it draws random numbers or updates running
        statistics (once per tile instead of once). Its value: the call run on the values'
        stand-ins (zeros of their shapes), which gives its shape, or refuses it."""
        if rules.is_random_call(node.op, node.target):
            return rules.draws_random(ctx)
        steps = tuple({g.index: g for p in _pooled_in((args, kwargs)) for g in p.steps}.values())
        module = self.root.get_submodule(node.target) if node.op == "call_module" else None
        if (module is not None and isinstance(module, rules.NORM_MODULES) and module.training
                and getattr(module, "running_mean", None) is not None) or (
                node.target is torch.nn.functional.batch_norm and len(args) > 1 and args[1] is not None
                and (kwargs.get("training") or (len(args) > 5 and args[5]))):
            return ctx.refuse("it normalises a value pooled over the whole map in training mode, "
                              "updating its running statistics on every tile",
                              fix=f"call .eval() on it, or {rules.MOVE}")
        if any(p.value is None for p in _pooled_in((args, kwargs))) or rules.contains(
                (args, kwargs), rules.Unknown):
            return rules.Pooled(None, steps)
        real = lambda v: v.value if isinstance(v, rules.Pooled) else v  # noqa: E731
        args, kwargs = _map_values((args, kwargs), real)
        rng = torch.random.get_rng_state()
        try:
            out = self._evaluate(node, args, kwargs)
        except Exception as err:  # noqa: BLE001 (torch's own error, reported as a refusal)
            return ctx.refuse(f"computing it on a value pooled over the whole map failed: "
                              f"{type(err).__name__}: {err}")
        if not torch.equal(rng, torch.random.get_rng_state()):
            torch.random.set_rng_state(rng)
            return rules.draws_random(ctx)
        return _map_values(out, lambda v: rules.Pooled(v, steps) if isinstance(v, torch.Tensor) else v)

    def _handler(self, node):
        """The ``rules`` handler of a function or method call (None: none)."""
        if node.op not in ("call_method", "call_function"):
            return None
        table = rules.METHODS if node.op == "call_method" else rules.FUNCTIONS
        return table.get(node.target) or _special(node.target)

    def _handle(self, ctx, node, args, kwargs):
        if node.op == "call_module":
            return self._module(ctx, self.root.get_submodule(node.target), args, kwargs)
        handler = self._handler(node)
        if handler is None:
            return ctx.refuse(f"it is not an operation streamcnn knows how to stream "
                              f"({rules.supported_summary()})")
        is_map = lambda v: isinstance(v, FMap)  # noqa: E731
        bind = binding.bind_method if node.op == "call_method" else binding.bind_call
        args, kwargs = bind(node.target, args, kwargs, is_map)
        problem = _misplaced_map(ctx, handler, args, kwargs)
        if problem is not None:
            return problem
        try:
            inspect.signature(handler).bind(ctx, *args, **kwargs)
        except TypeError as err:
            return ctx.refuse(f"streamcnn cannot read its arguments as torch does ({err})")
        return handler(ctx, *args, **kwargs)

    def _module(self, ctx, m: nn.Module, args, kwargs):
        handler = rules.module_handler(m)
        if isinstance(handler, str):
            return ctx.refuse(handler)
        if handler is None:
            return ctx.refuse(f"it is not a layer streamcnn knows how to stream "
                              f"({rules.supported_summary()})")
        bound = binding.bind_module(m, args, kwargs)
        if bound is None or len(bound) != 1 or not isinstance(next(iter(bound.values())), FMap):
            return ctx.refuse("it is called with arguments other than one feature map")
        return handler(ctx, m, next(iter(bound.values())))

    def _evaluate(self, node, args, kwargs):
        """Run a node whose arguments are all constants (parameter views, scalars)."""
        with torch.no_grad():
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return describe_layer(module_path(node.target),
                                  type(self.root.get_submodule(node.target)).__name__)
        name = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return f"operation '{name}' in the transform"
        path, kind = _scope(stack)
        return f"operation '{name}'" + (f" in '{path}' ({kind})" if path else "")

    def add_step(self, ctx, rule, inputs, dims, channels, source, norm=None,
                 channels_last_unsafe=False) -> FMap:
        per_axis = rule if isinstance(rule, tuple) else (rule,) * self.ndim
        idx = tuple(x.index for x in inputs)
        try:
            fields = tuple(r.field(*(self.fields[i][a] for i in idx)) for a, r in enumerate(per_axis))
        except GridMismatch as err:
            raise StreamingError(
                f"{ctx.name} combines feature maps on different grids: {err}; every branch "
                f"that reaches a merge must downsample alike (e.g. a strided shortcut as in "
                f"ResNet){_source_line(ctx.node)}") from None
        self.steps.append(GraphStep(ctx.name, idx, per_axis, channels, ctx.node.name, tuple(dims),
                                    norm, channels_last_unsafe))
        self.fields.append(fields)
        return FMap(len(self.steps) - 1, tuple(dims), channels, source)

    def _finish(self, out, env: dict) -> TracedGraph:
        """The graph for the module's output: one feature map or a structure of them."""
        out = _plain(out)
        refused = rules.first_refused(out)
        if refused is not None:
            raise refused.error
        if rules.contains(out, rules.Pooled):
            raise StreamingError(
                "the streamed module returns a value pooled over the whole feature map (global "
                "pooling); Streaming returns feature maps: stream the part before the pooling "
                "and pool its output (or keep the pooled value inside, as a gate)")
        found, spec = tree_flatten_with_path(out)
        paths = tuple(keystr(p) for p, _ in found)
        if not found:
            raise StreamingError(
                f"the streamed module returns {type(out).__name__} without a feature map; it must "
                f"return a feature map (N, C, *spatial), or tuples, lists and dicts of them")
        for path, (_, leaf) in zip(paths, found):
            where = f" as {path}" if path else ""
            if not isinstance(leaf, FMap):
                raise StreamingError(
                    f"the streamed module returns {type(leaf).__name__}{where}; it must return a "
                    f"feature map (N, C, *spatial), or tuples, lists and dicts of them (several "
                    f"outputs): stream the part that computes feature maps, and compute the "
                    f"rest from them after the Streaming module")
            if leaf.dims != rules.standard_dims(self.ndim):
                raise StreamingError(
                    f"the streamed module returns a feature map{where} in layout "
                    f"{rules.layout(leaf)}; return it channels-first (N, C, *spatial), e.g. "
                    f"permute back as ConvNeXt blocks do")
        return self._pruned(tuple(leaf.index for _, leaf in found), paths, spec, env)

    def _refuse_unused_update(self, step: GraphStep) -> None:
        """A training-mode normalisation whose output is unused still updates its running
        statistics conventionally, once per forward; streaming computes whole-image
        statistics only for what the output depends on, and would run it once per tile."""
        if step.norm is None or not step.norm.training:  # (training: updates running statistics)
            return
        node = next(n for n in self.graph.nodes if n.name == step.node)
        raise StreamingError(
            f"{step.name} is in training mode but the output does not use what it computes: "
            f"conventionally it still updates its running statistics once per forward, "
            f"but streaming finds whole-image statistics only for normalisations the output "
            f"depends on, and would update them once per tile; remove the call, use its "
            f"output, or put the layer in eval mode (.eval()) if its statistics should stay "
            f"as they are{_source_line(node)}")

    def _pruned(self, outputs: tuple, paths: tuple, spec, env: dict) -> TracedGraph:
        """The steps an output depends on, renumbered in order; what the others compute
        that a tile may not run (refused values, windows) in ``unused``."""
        keep, todo = set(), list(outputs)
        while todo:
            i = todo.pop()
            if i not in keep:
                keep.add(i)
                todo.extend(self.steps[i].inputs)
        new = {old: k for k, old in enumerate(sorted(keep | {0}))}
        steps = tuple(dataclasses.replace(s, inputs=tuple(new[i] for i in s.inputs))
                      for old, s in enumerate(self.steps) if old in new)
        for old, s in enumerate(self.steps):
            if old not in new:
                self._refuse_unused_update(s)
        refused = {id(v.error): f"{v.error}." for v in env.values() if isinstance(v, Refused)}
        windows = tuple(f"{s.name} is a {'window' if s.kind == 'window' else 'normalisation'} on a "
                        f"map the output does not use, which a tile may be too small for."
                        for old, s in enumerate(self.steps)
                        if old not in new and s.kind in ("window", "norm"))
        return TracedGraph(self.ndim, steps, self.graph, self.root,
                           getattr(self.graph, "streamcnn_calls", ()), tuple(refused.values()) + windows,
                           tuple(new[i] for i in outputs), paths, spec, frozenset(self.structures),
                           getattr(self.graph, "streamcnn_reentrant", False),
                           getattr(self.graph, "streamcnn_checkpointed", False))


def _is_namedtuple(target) -> bool:
    return isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields")


def _plain(value):
    """A traced output with fx's immutable containers (``immutable_dict``, ``immutable_list``)
    as plain dicts and lists, nested: ``torch.utils._pytree`` tells those apart."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        items = [_plain(v) for v in value]
        return type(value)(*items) if _is_namedtuple(type(value)) else tuple(items)
    return value


def _pooled_in(value) -> list:
    """Every :class:`rules.Pooled` in ``value`` (tuples, lists, dicts)."""
    if isinstance(value, rules.Pooled):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [p for v in items for p in _pooled_in(v)]


def _map_values(value, f):
    """``value`` with ``f`` applied to every leaf (in tuples, lists, dicts; torch.Size and
    torch.return_types kept as they are)."""
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, tuple) and hasattr(type(value), "n_fields"):
        return type(value)(tuple(_map_values(v, f) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_values(v, f) for v in value)
    if isinstance(value, dict):
        return {k: _map_values(v, f) for k, v in value.items()}
    return f(value)


def _misplaced_map(ctx, handler, args, kwargs):
    """Refusal of a feature map in an argument the handler does not stream (a convolution
    weight computed from the image, say): no feature map is left out of a step."""
    allowed = rules.map_params(handler)
    if rules.ANY in allowed:
        return None
    named = list(kwargs.items()) + [(_positional_name(handler, k), a) for k, a in enumerate(args)]
    for name, value in named:
        if name not in allowed and rules.contains(value, (FMap, rules.Pooled)):
            what = f"its '{name}' argument" if isinstance(name, str) else f"argument {name + 1}"
            return ctx.refuse(f"it takes a feature map as {what}, which streamcnn streams only "
                              f"as {' or '.join(repr(a) for a in allowed)}")
    return None


def _positional_name(handler, k: int):
    """The name of a handler's ``k``-th argument after ``ctx`` (``k`` itself if unnamed)."""
    params = [p for p in inspect.signature(handler).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    return params[k].name if k < len(params) else k


def _special(target):
    """Handlers for functions of other libraries that fx keeps as single calls
    (``torch.fx.wrap``): torchvision's stochastic depth (and copies of it), which is
    the identity in eval mode and draws a random mask per sample in training."""
    if getattr(target, "__name__", "") == "stochastic_depth":
        def stochastic_depth(ctx, input, p, mode, training=True):
            return rules.dropout(ctx, input, p, training)
        return stochastic_depth
    return None


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _scope(stack: dict) -> tuple[str, str]:
    """(module path, class name) of the innermost module whose forward ran a node."""
    path, kind = list(stack.values())[-1]
    path = module_path(path)
    return path, kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def _source_line(node: fx.Node) -> str:
    """`` (at file.py:12: `code`)`` for the user's line that created ``node``, if known."""
    trace = node.stack_trace or ""
    lines = trace.strip().splitlines()
    for k in range(len(lines) - 2, -1, -1):
        line = lines[k].strip()
        if line.startswith('File "'):
            file = line.split('"')[1]
            if file.startswith(_TORCH_DIR) or file.startswith(_OWN_DIR):
                continue
            number = line.split("line ")[1].split(",")[0]
            code = lines[k + 1].strip() if k + 1 < len(lines) else ""
            return f" (at {os.path.basename(file)}:{number}: `{code}`)"
    return ""


def analyse_structure(module: nn.Module, ndim: int, channels: int | None = None,
                      transform=None) -> TracedGraph:
    """``analyse`` with every layer in eval mode: the geometry, whatever modes the user
    sets later (modes are checked again at every call). The modes are restored."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False  # set the flag only: a user's train() override may do more
        return analyse(module, ndim, channels, transform=transform)
    finally:
        for m, training in flags:
            m.training = training
