"""The op fuzzer's catalog: a generator of random calls for every entry of streamcnn's
op registry (``rules.FUNCTIONS``, ``rules.METHODS``, ``rules.MODULES`` and the refused
``rules.NON_LOCAL_MODULES``), and the strategy that strings them into programs.

A generator ``gen(s, key, valid)`` draws one call of its registry entry ``key`` on the
feature maps made so far (``s``: a :class:`Scope`) as users write it: positional or
keyword arguments, tensor arguments that are other feature maps, per-channel or scalar
constants (held by the program as buffers or parameters), spatially varying constants,
maps in the wrong layout, in-place calls on clones. It returns an :class:`Out`: the
expression, the layout (``dims``, as in ``streamcnn.rules``) and grid of its result
where it is a feature map, and ``must_stream``: whether the call is one that is local
and valid, so that streamcnn must stream it exactly (a refusal is a bug). ``valid=True``
asks for such a call (only the generators of :data:`CURATED` entries honour it).

The grid of a map is, per spatial axis, ``(R, S, offset)``: an input of length ``n``
gives ``ceil((n - R) / S)`` positions, position ``j`` at input pixel ``j * S - offset``
(test_graph_properties.py derives it); two maps with equal grids agree for every input
length, so a merge of them must stream. ``None``: not tracked (ceil_mode pooling,
calls that are refused anyway).

Programs are executed on their sample input while they are drawn, so the generator
knows every value's shape and dtype; a draw conventional torch rejects is drawn again
or, now and then, kept as a "conventional raises" case (streaming must raise too).
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

from fuzz_program import Attr, Call, Get, Item, Program, Ref, calls, evaluate, refs
from streamcnn import rules

OMIT = object()  # an argument left to its default
BOOLS = st.booleans()
F64 = torch.float64


@lru_cache(maxsize=None, typed=True)
def ints(lo: int, hi: int):
    return st.integers(lo, hi)


@lru_cache(maxsize=None, typed=True)  # typed: pick(0, 1) is not pick(0.0, 1.0)
def pick(*values):
    return st.sampled_from(values)


# --------------------------------------------------------------------------- values


@dataclass
class Value:
    """A value of the program on its sample input; ``dims``: the role of each dimension
    of a feature map (None: not a feature map), ``grid``: see the module docstring."""

    sample: object
    dims: tuple | None = None
    grid: tuple | None = None

    @property
    def is_map(self) -> bool:
        return self.dims is not None and isinstance(self.sample, torch.Tensor) and \
            self.sample.dim() == len(self.dims)

    @property
    def channels(self) -> int:
        return self.sample.shape[self.dims.index("C")]

    @property
    def floating(self) -> bool:
        return self.sample.is_floating_point()

    def size(self, role) -> int:
        return self.sample.shape[self.dims.index(role)]


@dataclass
class Out:
    """A generator's call: its expression and, where its value is a feature map, layout
    and grid (``dims=None``: not a map; the program adds it to the last full map,
    ``m + value`` or ``m + value.sum()``, so that the output depends on it)."""

    expr: object
    dims: tuple | None = None
    grid: tuple | None = None
    must_stream: bool = False


standard = rules.standard_dims  # ("N", "C", 0, ..., ndim - 1)


def is_full(v: Value, ndim: int) -> bool:
    """A map with a batch, channels and every spatial axis (any order): the head can take it."""
    return v.is_map and sorted(map(str, v.dims)) == sorted(map(str, standard(ndim)))


def aligned(a: Value, b: Value) -> bool:
    """Layouts that broadcast role by role (the shorter one a suffix of the longer one)."""
    short, long = sorted((a.dims, b.dims), key=len)
    return long[len(long) - len(short):] == short


def broadcasts(a, b) -> bool:
    try:
        torch.broadcast_shapes(tuple(a.shape), tuple(b.shape))
        return True
    except RuntimeError:
        return False


def compatible(a: Value, b: Value) -> bool:
    """Maps that a merge must stream: the same known grid, aligned layouts, shapes that
    broadcast."""
    if a is b:
        return a.is_map
    return (a.is_map and b.is_map and a.grid is not None and a.grid == b.grid and aligned(a, b)
            and broadcasts(a.sample, b.sample))


def windowed(grid, windows):
    """The grid after a window per axis, ``(span, stride, pad_left, pad_right)``."""
    if grid is None:
        return None
    out = []
    for (r, s, off), (span, stride, left, right) in zip(grid, windows):
        out.append((r + (span - 1 - left - right) * s, s * stride, off + left * s))
    return tuple(out)


def within_reach(span: int, stride: int, left: int, right: int) -> bool:
    """Padding a window must stream: at most half its reach per side (beyond it, tiles may
    not end on the stride grid; test_streaming_errors covers that)."""
    return max(left, right) <= (span - 1) // 2 or (stride == 1 and max(left, right) <= span - 1)


def longest(values) -> Value:
    maps = [v for v in values if v.is_map]
    return max(maps, key=lambda v: len(v.dims))


# --------------------------------------------------------------------------- the scope


class Scope:
    """What a generator sees while it draws one call: the values so far, the program (to
    hold constants and layers) and ``draw``."""

    def __init__(self, draw, program: Program, values: list, ndim: int):
        self.draw, self.program, self.values, self.ndim = draw, program, values, ndim
        self.added: list = []  # names registered by the call being drawn
        self.counter = 0
        self.recent = False  # pick the most recent map (a chain: no step left unused)

    # ---- picking inputs

    def pick(self, ok=None) -> int:
        """A feature map (floating point unless ``ok`` says otherwise), mostly a recent one."""
        ok = ok or (lambda v: v.floating)
        found = [k for k, v in enumerate(self.values) if v.is_map and "C" in v.dims and ok(v)]
        if not found:
            found = [0]
        return found[-1] if self.recent else found[::-1][self.draw(ints(0, len(found) - 1))]

    def partner(self, i: int, valid: bool) -> tuple[int, bool]:
        """Another map to combine with map ``i`` (itself if nothing else fits) and whether
        the two must stream together; ``valid``: only such a one."""
        v = self.values[i]
        if valid or self.draw(ints(0, 3)):
            j = self.pick(lambda w: w.floating and compatible(v, w))
        else:
            j = self.pick(lambda w: True)
        return j, compatible(v, self.values[j])

    def standard_map(self, ok=None) -> int:
        """A floating map in the channels-first layout (the stem's output if no other)."""
        std = standard(self.ndim)
        return self.pick(lambda v: v.floating and v.dims == std and (ok is None or ok(v)))

    def channels_last(self, i: int):
        """(expression, dims) of map ``i`` with its channels last (permuted if needed)."""
        v = self.values[i]
        if v.dims[-1] == "C":
            return Ref(i), v.dims
        c = v.dims.index("C")
        order = [k for k in range(len(v.dims)) if k != c] + [c]
        form = self.draw(ints(0, 2))
        expr = (Call("method", "permute", (Ref(i), *order)) if form == 0 else
                Call("function", torch.movedim, (Ref(i), c, -1)) if form == 1 else
                Call("method", "permute", (Ref(i), tuple(order))))
        return expr, tuple(v.dims[k] for k in order)

    def within(self, j: int, i: int) -> bool:
        """Whether map ``j`` is map ``i`` or one it is computed from. A map read for its dtype
        only (``m.to(other)``) is no input of the step: the geometry leaves out the windows
        that compute it, so a tile may be too small for them unless ``i`` needs them too
        (streamcnn then names them: an accepted refusal)."""
        todo, seen = [i], set()
        while todo:
            k = todo.pop()
            if k == j:
                return True
            if k > 0 and k not in seen:
                seen.add(k)
                todo.extend(refs(self.program.steps[k - 1]))
        return False

    def dim_of(self, v: Value, role) -> int:
        """The index of ``role`` in ``v``, positive or negative."""
        k = v.dims.index(role)
        return k - len(v.dims) if self.draw(BOOLS) else k

    def other_dim(self, v: Value, avoid="C") -> int:
        """A dimension that is not ``avoid`` (a spatial one, or the batch)."""
        choices = [k for k, r in enumerate(v.dims) if r != avoid] or [0]
        return self.draw(pick(*choices))

    # ---- constants and layers

    def _name(self, prefix: str) -> str:
        self.counter += 1
        name = f"{prefix}{len(self.values)}_{self.counter}"
        self.added.append(name)
        return name

    def constant(self, tensor: torch.Tensor, parameter=None) -> Attr:
        """``tensor`` as the program's buffer or (floating, drawn) parameter."""
        if parameter is None:
            parameter = tensor.is_floating_point() and self.draw(BOOLS)
        name = self._name("w" if parameter else "c")
        if parameter:
            self.program.register_parameter(name, nn.Parameter(tensor))
        else:
            self.program.register_buffer(name, tensor)
        return Attr(name)

    def random(self, *shape, positive=False) -> torch.Tensor:
        t = torch.randn(shape, dtype=F64)
        return t.abs() + 0.5 if positive else t

    def layer(self, module: nn.Module) -> str:
        name = self._name("l")
        self.program.add_module(name, module)
        return name

    def per_channel(self, v: Value) -> tuple:
        """A shape constant over space and batch that broadcasts against ``v``'s channels."""
        c = v.dims.index("C")
        start = self.draw(ints(0, c))
        return tuple(v.channels if r == "C" else 1 for r in v.dims[start:])

    def spatial(self, v: Value) -> tuple:
        """A shape that varies over ``v``'s spatial positions (a fixed-size positional
        embedding): refused by streaming, run by torch."""
        return tuple(v.sample.shape[k] if isinstance(r, int) else 1 for k, r in enumerate(v.dims))

    def operand(self, i: int, valid: bool, numbers=True, positive=False) -> tuple:
        """Another operand of an elementwise op on map ``i``: (expression, must stream).
        A number, another map (on the same grid if ``valid``), a per-channel or scalar
        constant, or (not ``valid``) a spatially varying constant, a map in any layout or a
        map computed by a call that is not local (a softmax over space)."""
        v = self.values[i]
        kinds = ["map", "map", "channel", "scalar"] + (["number"] if numbers else [])
        kinds += [] if valid else ["spatial", "any map", "wrong channels", "non-local"]
        kind = self.draw(pick(*kinds))
        if kind == "non-local":
            space = self.draw(pick(*[k for k, r in enumerate(v.dims) if isinstance(r, int)]))
            softmax = Call("function", F.softmax, (Ref(i),), {"dim": space})
            return (positive_of(softmax) if positive else softmax), False
        if kind == "number":
            return self.draw(pick(0.5, 2, -1.5, 3.0) if not positive else pick(0.5, 2, 3.0)), True
        if kind in ("map", "any map"):
            j, ok = self.partner(i, valid) if kind == "map" else (self.pick(lambda w: True), False)
            return (positive_of(Ref(j)) if positive else Ref(j)), ok
        shape = {"channel": lambda: self.per_channel(v), "scalar": lambda: self.draw(pick((), (1,))),
                 "spatial": lambda: self.spatial(v),
                 "wrong channels": lambda: tuple(v.channels + 1 if r == "C" else 1 for r in v.dims)}
        return self.constant(self.random(*shape[kind](), positive=positive)), \
            kind in ("channel", "scalar")

    # ---- arguments

    def given(self, spec) -> list:
        """Arguments ``[(name, value or OMIT)]`` for ``spec = [(name, strategy, required)]``
        (in torch's order): each optional one given or left to its default."""
        out = []
        for name, strategy, *required in spec:
            give = bool(required and required[0]) or self.draw(BOOLS)
            out.append((name, self.draw(strategy) if give else OMIT))
        return out

    def call(self, key, first, params=(), keywords=None, returns_first=False,
             first_name="input") -> Call:
        """A call of registry entry ``key`` (a function or a method) on ``first``:
        ``params`` ``[(name, value or OMIT)]`` in torch's order, a drawn prefix of those
        given positionally and the rest by keyword; ``keywords``: keyword-only ones.
        A function's first argument is now and then passed by name too."""
        form, target = key
        run = next((k for k, (_, v) in enumerate(params) if v is OMIT), len(params))
        k = self.draw(ints(0, run))
        kwargs = {n: v for n, v in params[k:] if v is not OMIT}
        kwargs.update(keywords or {})
        args = (first,) + tuple(v for _, v in params[:k])
        if form == "function" and k == 0 and first_name and not returns_first and \
                self.draw(ints(0, 4)) == 0:
            args, kwargs = (), {first_name: first, **kwargs}
        return Call("method" if form == "method" else "function", target, args, kwargs,
                    returns_first)

    def clone(self, expr):
        return (Call("method", "clone", (expr,)) if self.draw(BOOLS) else
                Call("function", torch.clone, (expr,)))


def positive_of(expr):
    """``expr.abs() + 0.5``: an operand kept away from zero (log, sqrt, division)."""
    return Call("function", operator.add, (Call("method", "abs", (expr,)), 0.5))


def name_of_key(key) -> str:
    form, target = key
    return target if isinstance(target, str) else target.__name__


def in_place(key) -> bool:
    return name_of_key(key).endswith("_") and not name_of_key(key).startswith("_")


# --------------------------------------------------------------------------- pointwise

FLOATS = pick(0.5, 1.0, 2.0)
INPLACE = ("inplace", BOOLS)

UNARY = {  # function -> its parameters after the input, in torch's order
    F.relu: [INPLACE], torch.relu: [], torch.relu_: [], F.relu6: [INPLACE],
    F.elu: [("alpha", FLOATS), INPLACE], F.elu_: [("alpha", FLOATS)], F.selu: [INPLACE],
    F.celu: [("alpha", FLOATS), INPLACE], F.leaky_relu: [("negative_slope", pick(0.01, 0.2, -0.5)),
                                                         INPLACE],
    F.leaky_relu_: [("negative_slope", pick(0.01, 0.2))], F.gelu: [("approximate", pick("none", "tanh"))],
    F.silu: [INPLACE], F.mish: [INPLACE], F.hardswish: [INPLACE], F.hardsigmoid: [INPLACE],
    F.hardtanh: [("min_val", pick(-1.0, -0.5)), ("max_val", pick(0.5, 1.0)), INPLACE],
    F.hardtanh_: [("min_val", pick(-1.0, -0.5)), ("max_val", pick(0.5, 1.0))],
    F.sigmoid: [], F.tanh: [], F.softplus: [("beta", FLOATS), ("threshold", pick(20.0, 1.0))],
    F.softsign: [], F.tanhshrink: [], F.softshrink: [("lambd", pick(0.5, 0.1))],
    F.hardshrink: [("lambd", pick(0.5, 0.1))], F.logsigmoid: [],
    F.threshold: [("threshold", pick(0.1, -0.2), True), ("value", pick(0.0, 2.0), True), INPLACE],
    F.threshold_: [("threshold", pick(0.1, -0.2), True), ("value", pick(0.0, 2.0), True)],
    **{f: [] for f in (torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.square,
                       torch.erf, torch.sin, torch.cos, operator.neg, operator.pos, torch.clone,
                       torch.detach, torch.logical_not, torch.log, torch.sqrt, torch.rsqrt)},
}
UNARY_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log",
                 "abs", "abs_", "neg", "neg_", "sqrt", "rsqrt", "square", "contiguous", "clone",
                 "detach", "erf", "sin", "cos")
POSITIVE = {torch.log, torch.sqrt, torch.rsqrt, "log", "sqrt", "rsqrt"}  # take positive inputs
ANY_DTYPE = {torch.logical_not, torch.clone, torch.detach, torch.abs, torch.neg, operator.neg,
             operator.pos, "clone", "detach", "contiguous", "abs", "neg"}
NO_KEYWORDS = {operator.neg, operator.pos}


def unary(s: Scope, key, valid: bool) -> Out:
    """An elementwise function of one map (activations, exp, clone...), in place on a clone
    where it is (``relu_``, ``inplace=True``), its old name read now and then."""
    form, target = key
    i = s.pick(None if target not in ANY_DTYPE or valid else (lambda v: True))
    v = s.values[i]
    params = s.given(UNARY.get(target, []))
    keywords = {}
    if target == "contiguous" and s.draw(BOOLS):
        keywords["memory_format"] = s.draw(pick(torch.contiguous_format, torch.channels_last))
    first = positive_of(Ref(i)) if target in POSITIVE else Ref(i)
    writes = in_place(key) or any(n == "inplace" and val is True for n, val in params)
    if writes:
        first = s.clone(first)
    expr = s.call(key, first, params, keywords, returns_first=writes and s.draw(BOOLS),
                  first_name=None if target in NO_KEYWORDS else "input")
    return Out(expr, v.dims, v.grid, must_stream=True)


CLAMPS = (torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_",
          "clamp_max", "clamp_max_")


def clamp(s: Scope, key, valid: bool) -> Out:
    """``clamp``/``clip`` with bounds that are numbers, feature maps, constants or None."""
    name = name_of_key(key)
    i = s.pick()
    v = s.values[i]
    tensors = s.draw(BOOLS)  # torch takes two numbers or two tensors (or None)

    def bound():
        if tensors:
            return s.operand(i, valid, numbers=False)
        return s.draw(pick(-0.5, 0.0, 1.0)), True

    if name.startswith("clamp_m"):
        expr_bound, ok = bound()
        params, oks = [("min" if "min" in name else "max", expr_bound)], [ok]
    else:
        lo, ok_lo = bound()
        hi, ok_hi = bound() if s.draw(BOOLS) or not valid else (OMIT, True)
        lo = lo if hi is OMIT or s.draw(ints(0, 3)) else OMIT
        params, oks = [("min", lo), ("max", hi)], [ok_lo, ok_hi]
        if lo is OMIT and hi is OMIT:
            params = [("min", lo), ("max", None if not valid else 0.0)]
    first = s.clone(Ref(i)) if in_place(key) else Ref(i)
    expr = s.call(key, first, params, returns_first=in_place(key) and s.draw(BOOLS))
    maps = [v] + [s.values[r] for r in refs(expr) if r != i]
    return Out(expr, longest(maps).dims, v.grid if all(oks) else None, must_stream=all(oks))


ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
              torch.mul, torch.div, torch.maximum, torch.minimum, operator.iadd, operator.isub,
              operator.imul, operator.itruediv)
COMPARISONS = (operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne,
               torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne, torch.logical_and,
               torch.logical_or)
ARITHMETIC_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum",
                      "minimum", "gt", "ge", "lt", "le", "eq", "ne")
DIVISIONS = {operator.truediv, torch.div, operator.itruediv, "div", "div_"}
OPERATORS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.gt, operator.ge,
             operator.lt, operator.le, operator.eq, operator.ne}
IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def arithmetic(s: Scope, key, valid: bool) -> Out:
    """Binary arithmetic and comparisons: a merge with another map, or a map with a number
    or constant (``2 - m`` as well); ``alpha``/``rounding_mode`` where torch has them."""
    form, target = key
    name = name_of_key(key)
    logical = target in (torch.logical_and, torch.logical_or)
    i = s.pick(None if not logical else (lambda v: True))
    v = s.values[i]
    division = target in DIVISIONS
    elementwise = target in (torch.maximum, torch.minimum, "maximum", "minimum")
    other, ok = s.operand(i, valid, numbers=not elementwise, positive=division)
    writes = in_place(key) or target in IN_PLACE_OPERATORS
    first = s.clone(Ref(i)) if writes else Ref(i)
    params = []
    if name in ("add", "sub", "add_", "sub_") and s.draw(BOOLS):
        params.append(("alpha", s.draw(pick(2, 0.5))))
    if name in ("div", "div_") and not valid and s.draw(ints(0, 2)) == 0:
        params.append(("rounding_mode", s.draw(pick(None, "trunc", "floor"))))
        ok = ok and params[-1][1] is None  # rounding: a step function, exact only off the steps
    if target in OPERATORS or target in IN_PLACE_OPERATORS:
        # ``2 - m`` (fx records operator.sub(2, m)); not comparisons: ``0.5 > m`` is m < 0.5
        swap = not writes and target not in COMPARISONS and not isinstance(other, Attr)
        args = (other, first) if swap and s.draw(ints(0, 3)) == 0 else (first, other)
        expr = Call("function", target, args, returns_first=writes and s.draw(BOOLS))
    else:
        expr = s.call(key, first, [("other", other)] + [(n, val) for n, val in params],
                      returns_first=writes and s.draw(BOOLS))
    maps = [v] + [s.values[r] for r in refs(expr) if r != i]
    return Out(expr, longest(maps).dims, v.grid if ok else None, must_stream=ok)


def power(s: Scope, key, valid: bool) -> Out:
    """``m ** 2``, ``positive ** 0.5``, ``2 ** m``, ``positive ** map`` (a merge)."""
    form, target = key
    i = s.pick()
    v = s.values[i]
    kind = s.draw(pick("integer", "fraction", "base", "map"))
    base, ok = Ref(i), True
    if kind == "integer":
        exponent = s.draw(pick(2, 3))
    elif kind == "fraction":
        base, exponent = positive_of(Ref(i)), s.draw(pick(0.5, 1.5, -1.0))
    elif kind == "map":
        j, ok = s.partner(i, valid)
        base, exponent = positive_of(Ref(i)), Call("function", torch.tanh, (Ref(j),))
    else:
        base, exponent = s.draw(pick(2, 0.5)), Call("function", torch.tanh, (Ref(i),))
    writes = in_place(key)
    if writes and not isinstance(base, (int, float)):
        base = s.clone(base)
    elif writes:
        base, exponent = s.clone(positive_of(Ref(i))), 2
    if form == "function" and target is operator.pow:
        expr = Call("function", operator.pow, (base, exponent))
    else:
        expr = s.call(key, base, [("exponent", exponent)], returns_first=writes and s.draw(BOOLS))
    maps = [v] + [s.values[r] for r in refs(expr) if r != i]
    return Out(expr, longest(maps).dims, v.grid if ok else None, must_stream=ok)


# --------------------------------------------------------------------------- reductions

REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp")


def reduce_dims(s: Scope, v: Value, valid: bool):
    """``dim`` of a reduction and the dimensions it reduces: over the channels and/or the
    batch when ``valid``, else also (), None, spatial axes, negative indices."""
    rank = len(v.dims)
    local = [k for k, r in enumerate(v.dims) if r in ("N", "C")]
    kind = s.draw(pick("local", "local", "one", "tuple", "all", "empty") if not valid else
                  pick("local", "pair"))
    if kind in ("local", "one"):
        k = s.draw(pick(*local)) if kind == "local" else s.draw(ints(0, rank - 1))
        dim, reduced = (k - rank if s.draw(BOOLS) else k), [k]
    elif kind == "pair" and len(local) > 1 or kind == "tuple":
        ks = local if kind == "pair" else sorted(set(s.draw(st.lists(ints(0, rank - 1), min_size=1,
                                                                        max_size=2))))
        dim, reduced = tuple(ks), ks
    elif kind == "pair":
        dim, reduced = local[0], local[:1]
    elif kind == "empty":
        dim, reduced = (), list(range(rank))
    else:
        dim, reduced = None, list(range(rank))
    return dim, reduced


def reduction(s: Scope, key, valid: bool) -> Out:
    """mean/sum/amax/.../norm over dims drawn as users write them (``x.norm(2, 1,
    keepdim=True)``, ``x.std(True)``, ``x.sum(())``, ``torch.max(a, dim=1).values``,
    ``torch.max(a, b)``); local when over channels/batch only and the channels stay."""
    name = name_of_key(key)
    i = s.pick()
    v = s.values[i]
    if name in ("max", "min") and s.draw(ints(0, 3)) == 0:  # elementwise max of two maps
        other, ok = s.operand(i, valid, numbers=False)
        expr = s.call(key, Ref(i), [("other", other)])
        maps = [v] + [s.values[r] for r in refs(expr) if r != i]
        return Out(expr, longest(maps).dims, v.grid if ok else None, must_stream=ok)
    dim, reduced = reduce_dims(s, v, valid)
    keepdim = True if valid and v.dims.index("C") in reduced else s.draw(BOOLS)
    if name in ("max", "min", "logsumexp") and (dim is None or dim == ()):
        dim, reduced = (None, list(range(len(v.dims)))) if name != "logsumexp" else \
            (v.dims.index("C"), [v.dims.index("C")])
        keepdim = True
    if name in ("max", "min") and isinstance(dim, tuple):
        dim, reduced = dim[0], dim[:1]
    params, keywords = [], {}
    if name == "norm":
        params.append(("p", s.draw(pick(2, 1, "fro", math.inf, 3.0)) if s.draw(BOOLS) else OMIT))
    count = math.prod(v.sample.shape[k] for k in reduced)
    if name in ("max", "min") and dim is None:
        expr = s.call(key, Ref(i), [])
    elif name in ("std", "var") and dim is None and count > 1 and s.draw(BOOLS):
        expr = Call("method" if key[0] == "method" else "function", key[1], (Ref(i), s.draw(BOOLS)))
    else:
        give_dim = dim is not None or name == "logsumexp" or s.draw(BOOLS)
        params.append(("dim", dim if give_dim else OMIT))
        if name in ("std", "var"):
            if count == 1 or s.draw(BOOLS):  # correction 1 of a single value: NaN
                keywords["correction"] = 0 if count == 1 else s.draw(pick(0, 1))
            else:
                params.append(("unbiased", s.draw(BOOLS) if s.draw(BOOLS) else OMIT))
        params.append(("keepdim", keepdim if keepdim or s.draw(BOOLS) else OMIT))
        if name in ("mean", "sum") and s.draw(ints(0, 3)) == 0:
            keywords["dtype"] = F64
        expr = s.call(key, Ref(i), params, keywords)
        if name != "norm" and s.draw(ints(0, 4)) == 0:  # numpy's names, which torch accepts
            aliases = {"dim": "axis", "keepdim": "keepdims"}
            expr.kwargs = {aliases.get(k, k): val for k, val in expr.kwargs.items()}
    kept = tuple(r for k, r in enumerate(v.dims) if keepdim or k not in reduced)
    is_local = all(v.dims[k] in ("N", "C") for k in reduced) and "C" in kept and (
        dim is not None and dim != ())
    if name in ("max", "min") and dim is not None:
        selected = s.draw(pick("values", "indices", 0, 1))
        expr = Get(expr, selected) if isinstance(selected, str) else Item(expr, selected)
    return Out(expr, kept, v.grid if is_local else None, must_stream=is_local)


# --------------------------------------------------------------------------- channel ops


def SEVERAL(v: Value) -> bool:  # noqa: N802 - a predicate used like a constant
    """Maps with several channels: a normalisation over one value is ill-conditioned (its
    exact gradient is zero, computed as rounding noise that differs per tile)."""
    return v.floating and v.channels > 1


def channel_dim_call(s: Scope, key, valid: bool, params_after_dim=(), extra=None, ok=None) -> tuple:
    """(map index, local?, call) of a function of the channels at ``dim`` (softmax,
    normalize...) on a map ``ok`` accepts: ``dim`` the channels when ``valid``, else now and
    then another dim or omitted."""
    i = s.pick(ok)
    v = s.values[i]
    choice = "C" if valid else s.draw(pick("C", "C", "other", "omit"))
    dim = s.dim_of(v, "C") if choice == "C" else s.other_dim(v) if choice == "other" else OMIT
    params = list(extra or []) + [("dim", dim)] + list(params_after_dim)
    return i, choice == "C", s.call(key, Ref(i), params)


def softmax(s: Scope, key, valid: bool) -> Out:
    i, ok, expr = channel_dim_call(s, key, valid)
    if s.draw(ints(0, 3)) == 0:
        expr.kwargs["dtype"] = F64
    v = s.values[i]
    return Out(expr, v.dims, v.grid, must_stream=ok)


def normalize(s: Scope, key, valid: bool) -> Out:
    i, ok, expr = channel_dim_call(s, key, valid, extra=[("p", s.draw(pick(2.0, 1.0, 3)))],
                                   params_after_dim=[("eps", s.draw(pick(1e-12, 0.1)))], ok=SEVERAL)
    v = s.values[i]
    ok = ok or ("dim" not in expr.kwargs and len(expr.args) < 3 and v.dims[1] == "C")
    return Out(expr, v.dims, v.grid, must_stream=ok)


def glu(s: Scope, key, valid: bool) -> Out:
    """GLU over the channels (an even count: a map concatenated to itself when ``valid``
    finds none) or another dim."""
    i = s.pick(lambda v: v.floating and v.channels % 2 == 0) if valid else s.pick()
    v = s.values[i]
    first, even = Ref(i), v.channels % 2 == 0
    if valid and not even:
        first, even = Call("function", torch.cat, ([Ref(i), Ref(i)],), {"dim": v.dims.index("C")}), True
    dim = s.dim_of(v, "C") if valid or s.draw(BOOLS) else s.other_dim(v)
    if key[0] == "module":
        expr = Call("module", s.layer(nn.GLU(dim)), (first,))
    else:
        expr = s.call(key, first, [("dim", dim)])
    ok = v.dims[dim] == "C" and even
    return Out(expr, v.dims, v.grid, must_stream=ok)


def channels_first_op(s: Scope, valid: bool) -> int:
    """A map for an op that acts on dimension 1 as the channels: channels-first when
    ``valid``, else any layout."""
    return s.standard_map() if valid or s.draw(BOOLS) else s.pick()


def local_response_norm(s: Scope, key, valid: bool) -> Out:
    i = channels_first_op(s, valid)
    v = s.values[i]
    params = [("size", s.draw(pick(1, 2, 3)))] + s.given(
        [("alpha", pick(1e-4, 0.1)), ("beta", pick(0.75, 0.5)), ("k", pick(1.0, 2.0))])
    if key[0] == "module":
        kwargs = {n: val for n, val in params if val is not OMIT}
        expr = Call("module", s.layer(nn.LocalResponseNorm(**kwargs)), (Ref(i),))
    else:
        expr = s.call(key, Ref(i), params)
    return Out(expr, v.dims, v.grid, must_stream=v.dims[1] == "C")


def prelu(s: Scope, key, valid: bool) -> Out:
    i = channels_first_op(s, valid)
    v = s.values[i]
    n = s.draw(pick(1, v.channels))
    if key[0] == "module":
        expr = Call("module", s.layer(nn.PReLU(n, init=s.draw(pick(0.25, -0.5))).double()), (Ref(i),))
    elif not valid and s.draw(ints(0, 5)) == 0:  # a feature map as the slopes
        expr = s.call(key, Ref(i), [("weight", Call("method", "mean", (Ref(i), (0,) +
                                                                        tuple(range(2, len(v.dims))))))])
        return Out(expr, v.dims)
    else:
        expr = s.call(key, Ref(i), [("weight", s.constant(s.random(n)))])
    return Out(expr, v.dims, v.grid, must_stream=n == 1 or v.dims[1] == "C")


def rrelu(s: Scope, key, valid: bool) -> Out:
    i = s.pick()
    v = s.values[i]
    training = False if valid else s.draw(BOOLS)
    if key[0] == "module":
        m = nn.RReLU(s.draw(pick(0.1, 0.125)), s.draw(pick(0.3, 1 / 3)))
        expr = Call("module", s.layer(m.train(training)), (Ref(i),))
    else:
        params = s.given([("lower", pick(0.1, 0.125)), ("upper", pick(0.3, 1 / 3))])
        params.append(("training", training if training or s.draw(BOOLS) else OMIT))
        expr = s.call(key, Ref(i), params)
    return Out(expr, v.dims, v.grid, must_stream=not training)


DROPOUTS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.alpha_dropout: False,
            F.feature_alpha_dropout: False}  # -> default of ``training``


def dropout(s: Scope, key, valid: bool) -> Out:
    """Dropout, local in eval mode (or with p=0): functions with ``training``, layers with
    their mode."""
    i = s.pick()
    v = s.values[i]
    p = s.draw(pick(0.3, 0.0, 0.5))
    training = False if valid else s.draw(BOOLS)
    writes = s.draw(ints(0, 3)) == 0
    first = s.clone(Ref(i)) if writes else Ref(i)
    if key[0] == "module":
        m = key[1](p, inplace=writes)
        expr = Call("module", s.layer(m.train(training)), (first,))
    else:
        default = DROPOUTS[key[1]]
        params = [("p", p), ("training", OMIT if training == default and s.draw(BOOLS) else training),
                  ("inplace", True if writes else OMIT)]
        expr = s.call(key, first, params)
    return Out(expr, v.dims, v.grid, must_stream=not training or p == 0)


def batch_norm(s: Scope, key, valid: bool) -> Out:
    """BatchNorm with frozen statistics (eval), in training mode, or without running stats.
    Streamed exactly in every mode on a channels-first map, except ``F.batch_norm`` in
    training mode with running statistics (refused: only layers' statistics are updated)."""
    i = channels_first_op(s, valid)
    v = s.values[i]
    c = v.size("C") if v.dims[1] == "C" else v.sample.shape[1]
    training = s.draw(ints(0, 3)) == 0
    if valid and (key[0] != "module" or key[1] is nn.SyncBatchNorm):
        training = False  # (the refused cases below need training mode)
    if key[0] == "module":
        m = key[1](c, affine=s.draw(BOOLS), track_running_stats=valid or bool(s.draw(ints(0, 5))))
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        expr = Call("module", s.layer(m.double().train(training)), (Ref(i),))
        refused = training and key[1] is nn.SyncBatchNorm  # (its statistics span processes)
    else:
        stats = valid or bool(s.draw(ints(0, 5)))
        mean = s.constant(s.random(c), parameter=False) if stats else None
        var = s.constant(s.random(c, positive=True), parameter=False) if stats else None
        params = [("running_mean", mean), ("running_var", var)] + [
            (n, s.constant(s.random(c)) if s.draw(BOOLS) else OMIT) for n in ("weight", "bias")]
        params += [("training", training if training or s.draw(BOOLS) else OMIT)]
        params += s.given([("momentum", pick(0.1)), ("eps", pick(1e-5, 0.1))])
        expr = s.call(key, Ref(i), params)
        refused = training and stats
    return Out(expr, v.dims, v.grid, must_stream=v.dims[1] == "C" and not refused)


def spatial_norm(s: Scope, key, valid: bool) -> Out:
    """GroupNorm and InstanceNorm (layers and functions, affine or not, InstanceNorm with or
    without running statistics, in training or eval mode): streamed exactly on a
    channels-first map, except ``F.instance_norm`` with running statistics and its input's
    statistics (refused, as ``F.batch_norm``)."""
    i = channels_first_op(s, valid)
    v = s.values[i]
    c = v.size("C") if v.dims[1] == "C" else v.sample.shape[1]
    affine = s.draw(BOOLS)
    refused = False
    if key == _module(nn.GroupNorm):
        expr = Call("module", s.layer(nn.GroupNorm(s.draw(_groups(c)), c, affine=affine).double()), (Ref(i),))
    elif key[0] == "module":
        m = key[1](c, affine=affine, track_running_stats=s.draw(BOOLS))
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        expr = Call("module", s.layer(m.double().train(s.draw(BOOLS))), (Ref(i),))
    elif key[1] is F.group_norm:
        params = [(n, s.constant(s.random(c)) if affine else OMIT) for n in ("weight", "bias")]
        expr = s.call(key, Ref(i), [("num_groups", s.draw(_groups(c)))] + params
                      + s.given([("eps", pick(1e-5, 0.1))]))
    else:
        stats = s.draw(BOOLS)
        use_input = not stats or (not valid and s.draw(BOOLS))
        params = ([("running_mean", s.constant(s.random(c), parameter=False)),
                   ("running_var", s.constant(s.random(c, positive=True), parameter=False))]
                  if stats else [])
        params += [(n, s.constant(s.random(c)) if affine else OMIT) for n in ("weight", "bias")]
        params += [("use_input_stats", use_input)]
        expr = s.call(key, Ref(i), params)
        refused = stats and use_input
    return Out(expr, v.dims, v.grid, must_stream=v.dims[1] == "C" and not refused)


def last_dim_op(s: Scope, valid: bool, ok=None):
    """(input expression, its dims, its Value, channels-last?) for LayerNorm/Linear: a map
    (that ``ok`` accepts) with its channels last when ``valid``, else now and then a
    channels-first one."""
    i = s.pick(ok)
    v = s.values[i]
    if valid or s.draw(ints(0, 2)):
        expr, dims = s.channels_last(i)
        return expr, dims, v, True
    return Ref(i), v.dims, v, v.dims[-1] == "C"


def layer_norm(s: Scope, key, valid: bool) -> Out:
    """LayerNorm/RMSNorm over the channels (ConvNeXt, channels last), or over the last one
    or two dims of a map as it is (over space unless its channels are last and alone)."""
    over_space = not valid and s.draw(ints(0, 3)) == 0
    if over_space:
        i = s.pick()
        v = s.values[i]
        expr_in, dims = Ref(i), v.dims
        shape = tuple(v.sample.shape[-s.draw(ints(1, 2)):])
    else:
        expr_in, dims, v, _ = last_dim_op(s, valid, SEVERAL)
        c = v.sample.shape[v.dims.index(dims[-1])]
        shape = s.draw(st.sampled_from([(c,), [c], c]))
    sizes = [shape] if isinstance(shape, int) else list(shape)
    rms = key[1] in (F.rms_norm, nn.RMSNorm)
    if key[0] == "module":
        kwargs = {"elementwise_affine": s.draw(BOOLS)}
        if not rms and s.draw(BOOLS):
            kwargs["bias"] = s.draw(BOOLS)
        if rms and s.draw(BOOLS):
            kwargs["eps"] = 1e-3
        expr = Call("module", s.layer(key[1](shape, **kwargs).double()), (expr_in,))
    else:
        weight = s.constant(s.random(*sizes)) if s.draw(BOOLS) else OMIT
        params = [("normalized_shape", shape), ("weight", weight)]
        if not rms:
            params.append(("bias", s.constant(s.random(*sizes)) if s.draw(BOOLS) else OMIT))
        params += s.given([("eps", pick(1e-5, 1e-3))])
        expr = s.call(key, expr_in, params)
    ok = dims[-1] == "C" and len(sizes) == 1
    return Out(expr, dims, v.grid if ok else None, must_stream=ok)


def linear(s: Scope, key, valid: bool) -> Out:
    """Linear over the channels (channels last), a vector weight, or over the last axis."""
    expr_in, dims, v, last = last_dim_op(s, valid)
    n_in = v.sample.shape[v.dims.index(dims[-1])] if not last else v.channels
    out = s.draw(ints(1, 6))
    if key[0] == "module":
        expr = Call("module", s.layer(nn.Linear(n_in, out, bias=s.draw(BOOLS)).double()), (expr_in,))
        vector = False
    else:
        vector = not valid and s.draw(ints(0, 5)) == 0
        weight = s.constant(s.random(n_in) if vector else s.random(out, n_in))
        bias = s.constant(s.random(out)) if s.draw(BOOLS) and not vector else OMIT
        expr = s.call(key, expr_in, [("weight", weight), ("bias", bias)])
    if vector:
        return Out(expr, dims[:-1])
    return Out(expr, dims, v.grid, must_stream=last)


def channel_shuffle(s: Scope, key, valid: bool) -> Out:
    i = channels_first_op(s, valid)
    v = s.values[i]
    c = v.sample.shape[1]
    groups = s.draw(pick(*[g for g in range(1, c + 1) if c % g == 0]))
    if key[0] == "module":
        expr = Call("module", s.layer(nn.ChannelShuffle(groups)), (Ref(i),))
    else:
        expr = s.call(key, Ref(i), [("groups", groups)])
    return Out(expr, v.dims, v.grid, must_stream=v.dims[1] == "C")


# --------------------------------------------------------------------------- windows


def window_args(s: Scope, rank: int, dilate=True, max_pad=None):
    """Per-axis kernel, stride, dilation and symmetric padding of a window (padding within
    torch's limit of half the kernel, and now and then to its reach)."""
    kernel = tuple(s.draw(ints(1, 3)) for _ in range(rank))
    stride = tuple(s.draw(pick(1, 1, 2, 3)) for _ in range(rank))
    dilation = tuple(s.draw(ints(1, 2)) if dilate else 1 for _ in range(rank))
    pad = tuple(s.draw(ints(0, k // 2 if max_pad is None else max_pad(k, d)))
                for k, d in zip(kernel, dilation))
    return kernel, stride, dilation, pad


def one(values: tuple, s: Scope):
    """A per-axis tuple as users write it: an int where all axes agree (now and then)."""
    return values[0] if len(set(values)) == 1 and s.draw(BOOLS) else values


def window_out(s: Scope, v: Value, kernel, stride, dilation, pads, rank, ok=True) -> Out:
    """The map after a window (pads: per-axis (left, right)) on a channels-first map."""
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    reach = all(within_reach(sp, st_, l, r) for sp, st_, (l, r) in zip(spans, stride, pads))
    ok = ok and reach and v.dims == standard(s.ndim) and rank == s.ndim
    grid = windowed(v.grid, list(zip(spans, stride, *zip(*pads)))) if ok else None
    return grid, ok


@dataclass
class ConvArgs:
    """A convolution's input map and arguments as drawn."""

    i: int
    cin: int
    cout: int
    groups: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    padding: object  # as passed: an int, a tuple, "same" or "valid"


def conv_args(s: Scope, key, valid: bool, wrong_channels: bool = False) -> ConvArgs:
    """A convolution of rank 1 or 2 (from its name) on a channels-first map when ``valid``
    (now and then another), with padding within the window's reach when ``valid`` (else
    up to its span), ints or 'same'/'valid'; ``wrong_channels``: in_channels + 1."""
    rank = 1 if "1d" in name_of_key(key) else 2
    i = s.standard_map() if valid or s.draw(ints(0, 5)) else s.pick()
    cin = s.values[i].sample.shape[1] + (1 if wrong_channels else 0)
    cout = s.draw(ints(1, 6))
    groups = s.draw(pick(*[g for g in (1, 2, 3) if cin % g == 0 and cout % g == 0]))
    reach = (lambda k, d: d * (k - 1) // 2) if valid else (lambda k, d: d * (k - 1))
    kernel, stride, dilation, pad = window_args(s, rank, max_pad=reach)
    padding = one(pad, s)
    if s.draw(ints(0, 4)) == 0:
        padding = s.draw(pick("same", "valid"))
        stride = (1,) * rank if padding == "same" else stride
    return ConvArgs(i, cin, cout, groups, kernel, stride, dilation, padding)


def conv(s: Scope, key, valid: bool) -> Out:
    """F.conv1d/2d with a registered weight: stride, padding (ints, 'same', 'valid'),
    dilation, groups, bias; a feature map as the weight now and then."""
    a = conv_args(s, key, valid)
    i, v, rank = a.i, s.values[a.i], len(a.kernel)
    cin, cout, groups, kernel, stride, dilation, padding = (a.cin, a.cout, a.groups, a.kernel,
                                                            a.stride, a.dilation, a.padding)
    if not valid and s.draw(ints(0, 7)) == 0:  # a feature map as the weight
        weight = Call("method", "sum", (Ref(i), 0), {"keepdim": True})
        expr = s.call(key, Ref(i), [("weight", weight)])
        return Out(expr)
    weight = s.constant(s.random(cout, cin // groups, *kernel) / 3)
    params = [("weight", weight), ("bias", s.constant(s.random(cout)) if s.draw(BOOLS) else OMIT),
              ("stride", one(stride, s)), ("padding", padding), ("dilation", one(dilation, s)),
              ("groups", groups if groups > 1 or s.draw(BOOLS) else OMIT)]
    if params[2][1] == 1 and s.draw(BOOLS):
        params[2] = ("stride", OMIT)
    expr = s.call(key, Ref(i), params)
    pads = conv_pads(padding, kernel, dilation, rank)
    grid, ok = window_out(s, v, kernel, stride, dilation, pads, rank)
    return Out(expr, standard(s.ndim) if ok else v.dims, grid, must_stream=ok)


def conv_pads(padding, kernel, dilation, rank):
    """Per-axis (left, right) padding as torch applies it."""
    if padding == "valid":
        return ((0, 0),) * rank
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)
    p = padding if isinstance(padding, tuple) else (padding,) * rank
    return tuple((q, q) for q in p)


#: the max pools fx records for F.max_pool1d/2d(return_indices=True), and those
WITH_INDICES = {F.max_pool1d_with_indices: F.max_pool1d, F.max_pool2d_with_indices: F.max_pool2d}


def pool(s: Scope, key, valid: bool) -> Out:
    """Max and average pooling, functional or layers: kernel, stride (None, an int, a
    tuple), padding, dilation (max), ceil_mode, count_include_pad, divisor_override and
    return_indices (refused: its indices)."""
    form, target = key
    kind = "max" if "max" in name_of_key(key).lower() else "avg"
    rank = 1 if "1d" in name_of_key(key) else 2
    written = WITH_INDICES.get(target)  # F.max_pool2d for F.max_pool2d_with_indices
    i = s.standard_map() if valid or s.draw(ints(0, 5)) else s.pick()
    v = s.values[i]
    reach = (lambda k, d: min(k // 2, d * (k - 1) // 2)) if valid else None  # torch: k // 2
    kernel, stride, dilation, pad = window_args(s, rank, dilate=kind == "max", max_pad=reach)
    stride_arg = one(stride, s) if kernel != stride or s.draw(BOOLS) else s.draw(pick(None, OMIT))
    ceil_mode = s.draw(ints(0, 3)) == 0
    # fx records F.max_pool2d(return_indices=True) as F.max_pool2d_with_indices
    indices = bool(written) or (form == "module" and kind == "max" and not valid and
                                s.draw(ints(0, 4)) == 0)
    params = [("kernel_size", one(kernel, s)), ("stride", stride_arg), ("padding", one(pad, s) if
                                                                        any(pad) or s.draw(BOOLS) else OMIT)]
    if kind == "max":
        params += [("dilation", one(dilation, s) if any(d > 1 for d in dilation) else OMIT),
                   ("ceil_mode", ceil_mode if ceil_mode else OMIT),
                   ("return_indices", True if indices else OMIT)]
    else:
        params += [("ceil_mode", ceil_mode if ceil_mode else OMIT),
                   ("count_include_pad", s.draw(BOOLS) if s.draw(BOOLS) else OMIT)]
        if rank == 2 and s.draw(ints(0, 3)) == 0:
            params.append(("divisor_override", s.draw(pick(2, 5))))
    if form == "module":
        kwargs = {n: val for n, val in params if val is not OMIT}
        expr = Call("module", s.layer(target(**kwargs)), (Ref(i),))
    elif written and s.draw(BOOLS):
        expr = s.call(("function", written), Ref(i), params)
    else:
        expr = s.call(key, Ref(i), params)
    if indices:
        return Out(Item(expr, s.draw(pick(0, 1))))
    grid, ok = window_out(s, v, kernel, stride, dilation, [(p, p) for p in pad], rank)
    return Out(expr, v.dims, None if ceil_mode else grid, must_stream=ok)


def trailing_space(v: Value) -> int:
    """How many of ``v``'s last dimensions are spatial (what padding pads)."""
    n = 0
    while n < len(v.dims) and isinstance(v.dims[-1 - n], int):
        n += 1
    return n


def pad(s: Scope, key, valid: bool) -> Out:
    """F.pad and the padding layers: constant padding of some trailing dims (local), or
    negative (cropping), of the channels, in another mode."""
    form, target = key
    fixed = (1 if target in (nn.ZeroPad1d, nn.ConstantPad1d) else 2) if form == "module" else 1
    i = s.pick(lambda v: v.floating and trailing_space(v) >= fixed) if valid else s.pick()
    v = s.values[i]
    rank = len(v.dims)
    if form == "module":
        dims = fixed
    else:
        dims = s.draw(ints(1, max(1, trailing_space(v)) if valid else rank))
    amounts = tuple(s.draw(ints(0, 2) if valid or s.draw(ints(0, 4)) else ints(-1, 2))
                    for _ in range(2 * dims))
    mode = "constant" if valid or form == "module" or s.draw(ints(0, 4)) else \
        s.draw(pick("reflect", "replicate", "circular"))
    value = s.draw(pick(0.0, 1.5))
    if form == "module":
        padding = amounts[0] if len(set(amounts)) == 1 and s.draw(BOOLS) else amounts
        m = target(padding) if target in (nn.ZeroPad1d, nn.ZeroPad2d) else target(padding, value)
        expr = Call("module", s.layer(m), (Ref(i),))
    else:
        params = [("pad", amounts), ("mode", mode if mode != "constant" or s.draw(BOOLS) else OMIT),
                  ("value", value if mode == "constant" and s.draw(BOOLS) else OMIT)]
        expr = s.call(key, Ref(i), params)
    pairs = [(amounts[2 * k], amounts[2 * k + 1]) for k in range(dims)]  # last dimension first
    windows = [(1, 1, 0, 0)] * s.ndim
    ok = mode == "constant" and min(amounts) >= 0 and v.grid is not None
    for k, pair in enumerate(pairs):
        role = v.dims[rank - 1 - k] if k < rank else None
        if pair == (0, 0):
            continue
        if not isinstance(role, int):
            ok = False
            continue
        windows[role] = (1, 1) + pair
    return Out(expr, v.dims, windowed(v.grid, windows) if ok else None, must_stream=ok)


# --------------------------------------------------------------------------- merges and pieces


def cat(s: Scope, key, valid: bool) -> Out:
    """torch.cat/concat/concatenate of maps along the channels (local when they share a
    grid and a layout); a constant among them, or another dim, now and then."""
    i = s.pick()
    v = s.values[i]
    tensors, ok = [Ref(i)], True
    for _ in range(s.draw(ints(0, 2))):
        j = s.pick(lambda w: w.floating and compatible(v, w) and w.dims == v.dims) \
            if valid or s.draw(ints(0, 3)) else s.pick(lambda w: True)
        ok = ok and compatible(v, s.values[j]) and s.values[j].dims == v.dims
        tensors.append(Ref(j))
    if not valid and s.draw(ints(0, 5)) == 0:
        tensors.insert(s.draw(ints(0, len(tensors))), s.constant(s.random(*v.sample.shape)))
        ok = False
    along = s.dim_of(v, "C") if valid or s.draw(BOOLS) else s.other_dim(v)
    ok = ok and v.dims[along] == "C"
    container = tuple(tensors) if s.draw(BOOLS) else tensors
    name = "axis" if key[1] in (torch.concatenate, torch.concat) and s.draw(BOOLS) else "dim"
    expr = s.call(key, container, [(name, along)], first_name="tensors")
    return Out(expr, v.dims, v.grid if ok else None, must_stream=ok)


def new_dim(s: Scope, v: Value, valid: bool) -> tuple[int, bool]:
    """(a position for a new dimension of map ``v``, whether it is local: after the batch and
    not between two spatial axes); only local ones when ``valid``."""
    between = lambda p: 0 < p < len(v.dims) and isinstance(v.dims[p - 1], int) and \
        isinstance(v.dims[p], int)  # noqa: E731
    allowed = [p for p in range(1, len(v.dims) + 1) if not between(p)]
    at = s.draw(st.sampled_from(allowed)) if valid or s.draw(BOOLS) else s.draw(ints(0, len(v.dims)))
    return at, at in allowed


def stack(s: Scope, key, valid: bool) -> Out:
    """torch.stack of maps of one shape along a new dimension of groups (local where it goes
    after the batch and not between spatial axes), then summed over it, as a selective
    kernel does; a map of another shape, or another position, now and then."""
    i = s.pick()
    v = s.values[i]
    tensors, ok = [Ref(i)], True
    for _ in range(s.draw(ints(1, 2))):
        same = lambda w: w.floating and compatible(v, w) and w.sample.shape == v.sample.shape  # noqa: E731
        j = s.pick(same) if valid or s.draw(ints(0, 3)) else s.pick(lambda w: True)
        ok = ok and same(s.values[j]) and s.values[j].dims == v.dims
        tensors.append(Ref(j))
    at, local = new_dim(s, v, valid)
    ok = ok and local
    container = tuple(tensors) if s.draw(BOOLS) else tensors
    stacked = s.call(key, container, [("dim", at)], first_name="tensors")
    return Out(Call("method", "sum", (stacked,), {"dim": at}), v.dims, v.grid if ok else None,
               must_stream=ok)


def unsqueeze(s: Scope, key, valid: bool) -> Out:
    """``x.unsqueeze(d)``: a new dimension of one (local after the batch and not between
    spatial axes), then summed away."""
    i = s.pick()
    v = s.values[i]
    at, ok = new_dim(s, v, valid)
    inner = s.call(key, Ref(i), [("dim", at - len(v.dims) - 1 if s.draw(BOOLS) else at)])
    return Out(Call("method", "sum", (inner,), {"dim": at}), v.dims, v.grid if ok else None,
               must_stream=ok)


def matmul(s: Scope, key, valid: bool) -> Out:
    """``x @ w`` summing over every position of channels-first maps on one grid, as
    global-context pooling does (``x.flatten(2) @ softmax(a.flatten(2)[:, :1], -1).mT``);
    not ``valid``: a product over the channels (attention between positions, refused)."""
    i = s.standard_map()
    j, ok = s.partner(i, valid)
    ok = ok and s.values[j].dims == s.values[i].dims
    flat = lambda k: Call("method", "flatten", (Ref(k), 2))  # noqa: E731
    if valid or s.draw(BOOLS):
        logits = Call("function", operator.getitem, (flat(j), (slice(None), slice(0, 1))))
        weights = Call("function", F.softmax, (logits,), {"dim": -1})
        left, right = flat(i), Call("method", "transpose", (weights, 1, 2))
    else:
        left, right, ok = Call("method", "transpose", (flat(i), 1, 2)), flat(j), False
    if key[1] is operator.matmul:
        return Out(Call("function", operator.matmul, (left, right)), must_stream=ok)
    return Out(s.call(key, left, [("other", right)]), must_stream=ok)


def pieces(s: Scope, key, valid: bool) -> Out:
    """chunk/split (functions and methods) of a map, then one piece, or two pieces
    concatenated back in another order."""
    name = name_of_key(key)
    i = s.pick()
    v = s.values[i]
    along = s.dim_of(v, "C") if valid or s.draw(BOOLS) else s.other_dim(v)
    size = v.sample.shape[along]
    if name == "chunk":
        n = s.draw(ints(1, 4))
        each = -(-size // n)
        sizes = [min(each, size - k) for k in range(0, size, each)]
        params = [("chunks", n), ("dim", along)]
    elif s.draw(BOOLS):
        each = s.draw(ints(1, max(1, size)))
        sizes = [min(each, size - k) for k in range(0, size, each)]
        label = "split_size" if key[0] == "method" else "split_size_or_sections"
        params = [(label, each), ("dim", along)]
    else:
        cuts = sorted(set(s.draw(st.lists(ints(1, max(1, size - 1)), max_size=2)))) if size > 1 else []
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [size])]
        if not valid and s.draw(ints(0, 5)) == 0:
            sizes[-1] += 1  # sections that do not add up: torch raises
        params = [("split_size" if key[0] == "method" else "split_size_or_sections", sizes),
                  ("dim", along)]
    call = s.call(key, Ref(i), params, first_name="input" if name == "chunk" else "tensor")
    ok = v.dims[along] == "C"
    k = s.draw(ints(0, len(sizes) - 1))
    if len(sizes) > 1 and ok and s.draw(BOOLS):
        j = (k + 1) % len(sizes)
        expr = Call("function", torch.cat, ([Item(call, j), Item(call, k)],), {"dim": along})
    else:
        expr = Item(call, k)
    return Out(expr, v.dims, v.grid if ok else None, must_stream=ok)


def where(s: Scope, key, valid: bool) -> Out:
    """torch.where(condition, input, other): conditions from comparisons of maps or bool
    constants, branches maps, numbers or constants; torch.where(condition) refused."""
    i = s.pick()
    v = s.values[i]
    kind = s.draw(pick("compare", "compare", "constant") if valid else
                  pick("compare", "constant", "spatial", "one argument"))
    if kind in ("compare", "one argument"):
        j, ok = s.partner(i, valid)
        condition = Call("function", operator.gt, (Ref(j), s.draw(pick(0.0, 0.5))))
    else:
        shape = s.spatial(v) if kind == "spatial" else s.per_channel(v)
        condition, ok = s.constant(torch.rand(shape) > 0.5), kind == "constant"
    if kind == "one argument":
        return Out(Item(s.call(key, condition, [], first_name="condition"), 0))
    other, ok_other = s.operand(i, valid)
    args = [Ref(i), other] if s.draw(BOOLS) else [other, Ref(i)]
    expr = s.call(key, condition, [("input", args[0]), ("other", args[1])], first_name="condition")
    ok = ok and ok_other
    maps = [v] + [s.values[r] for r in refs(expr) if r != i]
    return Out(expr, longest(maps).dims, v.grid if ok else None, must_stream=ok)


# --------------------------------------------------------------------------- layouts and shapes


@lru_cache(maxsize=None)
def permutations(rank: int):
    return st.permutations(list(range(rank)))


def permute(s: Scope, key, valid: bool) -> Out:
    """permute/transpose/movedim (functions and methods), negative dims now and then."""
    name = name_of_key(key)
    i = s.pick(lambda v: True)
    v = s.values[i]
    rank = len(v.dims)
    neg = (lambda d: d - rank if s.draw(ints(0, 3)) == 0 else d)
    if name == "permute":
        order = s.draw(permutations(rank))
        given = [neg(d) for d in order]
        if key[0] == "method" and s.draw(BOOLS):
            expr = Call("method", "permute", (Ref(i), *given))
        else:
            expr = s.call(key, Ref(i), [("dims", tuple(given) if s.draw(BOOLS) else given)])
    elif name == "transpose":
        a, b = s.draw(ints(0, rank - 1)), s.draw(ints(0, rank - 1))
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        expr = s.call(key, Ref(i), [("dim0", neg(a)), ("dim1", neg(b))])
    else:
        src = s.draw(ints(0, rank - 1))
        dst = s.draw(ints(0, rank - 1))
        rest = [d for d in range(rank) if d != src]
        order = rest[:dst] + [src] + rest[dst:]
        tuples = s.draw(BOOLS)
        expr = s.call(key, Ref(i), [("source", (neg(src),) if tuples else neg(src)),
                                    ("destination", (neg(dst),) if tuples else neg(dst))])
    return Out(expr, tuple(v.dims[k] for k in order), v.grid, must_stream=True)


def flatten(s: Scope, key, valid: bool) -> Out:
    """flatten of one dimension (a no-op, local) or of several (refused)."""
    i = s.pick(lambda v: True)
    v = s.values[i]
    rank = len(v.dims)
    start = s.draw(ints(0, rank - 1))
    end = start if valid or s.draw(BOOLS) else s.draw(ints(start, rank - 1))
    if key[0] == "module":
        expr = Call("module", s.layer(nn.Flatten(start, end)), (Ref(i),))
    else:
        expr = s.call(key, Ref(i), [("start_dim", start), ("end_dim", end - rank if s.draw(BOOLS) else end)])
    if start == end:
        return Out(expr, v.dims, v.grid, must_stream=True)
    return Out(expr)


def reshape(s: Scope, key, valid: bool) -> Out:
    """view/reshape and friends: refused even where the shape stays (a tile's differs)."""
    name = name_of_key(key)
    i = s.pick(lambda v: True)
    v = s.values[i]
    shape = tuple(v.sample.shape)
    if name in ("view_as", "reshape_as"):
        return Out(Call("method", name, (Ref(i), Ref(i))), v.dims)
    if name == "unflatten":
        c = v.dims.index("C")
        return Out(Call("method", "unflatten", (Ref(i), c, (v.channels, 1))))
    target = shape if s.draw(BOOLS) else shape[:1] + (-1,)
    if key[0] == "method" and s.draw(BOOLS):
        expr = Call("method", name, (Ref(i), *target))
    else:
        expr = s.call(key, Ref(i), [("shape", target)])
    return Out(expr, v.dims if target == shape else None)


def getitem(s: Scope, key, valid: bool) -> Out:
    """Indexing: channel slices (local), spatial or batch positions, None, masks, a piece
    of chunk's tuple, an entry of ``x.shape``."""
    i = s.pick(lambda v: True)
    v = s.values[i]
    c = v.dims.index("C")
    kind = "channels" if valid else s.draw(pick("channels", "channels", "ellipsis", "position",
                                                "integer", "none", "mask", "tuple", "shape"))
    n = v.channels
    if kind in ("channels", "ellipsis"):
        a = s.draw(ints(0, n - 1))
        index_c = s.draw(st.sampled_from([slice(a, None), slice(None, a + 1), slice(None, None, 2),
                                          slice(a, a + 1)]))
        if kind == "ellipsis":
            index = (Ellipsis, index_c) + (slice(None),) * (len(v.dims) - c - 1) \
                if s.draw(BOOLS) else (slice(None),) * c + (index_c, Ellipsis)
        else:
            index = (slice(None),) * c + (index_c,)
        return Out(Item(Ref(i), index), v.dims, v.grid, must_stream=True)
    if kind == "position":
        k = s.other_dim(v)
        return Out(Item(Ref(i), (slice(None),) * k + (slice(1, None),)))
    if kind == "integer":
        return Out(Item(Ref(i), (slice(None),) * c + (0,)))
    if kind == "none":
        return Out(Item(Ref(i), (slice(None), None)))
    if kind == "mask":
        return Out(Item(Ref(i), Call("function", operator.gt, (Ref(i), 0.0))))
    if kind == "tuple":
        call = Call("function", torch.chunk, (Ref(i), 2, c))
        return Out(Item(call, 0), v.dims)
    k = s.draw(ints(-len(v.dims), len(v.dims) - 1))
    size = Item(Get(Ref(i), "shape"), k)
    role = v.dims[k]
    return Out(Call("function", operator.mul, (Ref(i), size)), v.dims, v.grid,
               must_stream=role in ("N", "C"))


def attribute(s: Scope, key, valid: bool) -> Out:
    """getattr: ``.values``/``.indices`` of a channel max, ``.shape``, ``.dtype``,
    ``.ndim``, ``.device``, ``.data`` (refused)."""
    i = s.pick()
    v = s.values[i]
    kind = s.draw(pick("values", "shape", "dtype", "ndim", "device") if valid else
                  pick("values", "shape", "dtype", "ndim", "device", "data"))
    c = s.dim_of(v, "C")
    if kind == "values":
        expr = Get(Call("function", torch.max, (Ref(i), c), {"keepdim": True}),
                   s.draw(pick("values", "indices")))
        return Out(expr, v.dims, v.grid, must_stream=True)
    if kind == "shape":
        k = s.draw(pick(*local_dims(v)) if valid else ints(-len(v.dims), len(v.dims) - 1))
        size = Item(Get(Ref(i), "shape"), k)
        return Out(Call("function", operator.truediv, (Ref(i), size)), v.dims, v.grid,
                   must_stream=v.dims[k] in ("N", "C"))
    if kind in ("dtype", "device"):
        j = s.pick(lambda w: True)
        return Out(Call("method", "to", (Ref(j), Get(Ref(i), kind))), s.values[j].dims,
                   s.values[j].grid, must_stream=s.within(i, j))
    if kind == "ndim":
        return Out(Call("function", operator.mul, (Ref(i), Get(Ref(i), "ndim"))), v.dims, v.grid,
                   must_stream=True)
    return Out(Call("function", operator.add, (Ref(i), Get(Ref(i), "data"))), v.dims)


def local_dims(v: Value) -> list:
    """The dimensions of ``v`` whose size is the same on every tile (channels, batch)."""
    return [k for k, r in enumerate(v.dims) if r in ("N", "C")]


def size(s: Scope, key, valid: bool) -> Out:
    """``m * m.size(d)``, ``m.size()[d]``; ``m * m.dim()``."""
    i = s.pick()
    v = s.values[i]
    if key[1] == "dim":
        return Out(Call("function", operator.mul, (Ref(i), Call("method", "dim", (Ref(i),)))),
                   v.dims, v.grid, must_stream=True)
    k = s.draw(pick(*local_dims(v)) if valid else ints(-len(v.dims), len(v.dims) - 1))
    form = s.draw(ints(0, 2))
    n = (Call("method", "size", (Ref(i), k)) if form == 0 else
         Call("method", "size", (Ref(i),), {"dim": k}) if form == 1 else
         Item(Call("method", "size", (Ref(i),)), k))
    return Out(Call("function", operator.mul, (Ref(i), n)), v.dims, v.grid,
               must_stream=v.dims[k] in ("N", "C"))


def convert(s: Scope, key, valid: bool) -> Out:
    """dtype conversions, cast back to float64 at once (computing in float32 would round
    differently per tile size); ``to(other)``, ``type_as(other)``, ``to("cpu")``."""
    name = key[1]
    i = s.pick(lambda v: True)
    v = s.values[i]
    j = s.pick()
    ok = s.within(j, i)
    if name == "type_as":
        expr = Call("method", "type_as", (Ref(i), Ref(j)))
    elif name == "to":
        form = s.draw(ints(0, 4))
        ok = ok or form != 2
        expr = (Call("method", "to", (Ref(i), F64)) if form == 0 else
                Call("method", "to", (Ref(i),), {"dtype": F64}) if form == 1 else
                Call("method", "to", (Ref(i), Ref(j))) if form == 2 else
                Call("method", "double", (Call("method", "to", (Ref(i), "cpu")),)) if form == 3 else
                Call("method", "to", (Call("method", "to", (Ref(i), torch.float32)), F64)))
    else:
        expr = Call("method", name, (Ref(i),))
        if name != "double":
            expr = Call("method", "double", (expr,))
    return Out(expr, v.dims, v.grid, must_stream=ok)


def register_hook(s: Scope, key, valid: bool) -> Out:
    """``m.register_hook(hook)``: refused (tiles have no whole-image activation). The hooks
    are aten operators, the one kind of callable torch.fx records as an argument (a Python
    function cannot be traced at all): one keeps the gradient, one negates it."""
    i = s.pick()
    hook = s.draw(pick(torch.ops.aten.clone.default, torch.ops.aten.neg.default))
    return Out(Call("method", "register_hook", (Ref(i), hook)))


# --------------------------------------------------------------------------- refused


def random_call(s: Scope, key, valid: bool) -> Out:
    """Functions and methods that draw random numbers (refused even on constants)."""
    form, target = key
    i = s.pick()
    v = s.values[i]
    ndim = s.ndim
    batch = Call("method", "size", (Ref(i), 0))
    if form == "method":
        args = {"bernoulli_": (0.5,), "random_": (0, 3), "uniform_": (-1.0, 1.0),
                "geometric_": (0.5,)}.get(target, ())
        if target == "bernoulli":
            return Out(Call("method", "bernoulli", (Call("function", torch.sigmoid, (Ref(i),)),)), v.dims)
        return Out(Call("method", target, (s.clone(Ref(i)), *args), returns_first=s.draw(BOOLS)),
                   v.dims)
    exprs = {
        torch.bernoulli: lambda: Call("function", torch.bernoulli, (Call("function", torch.sigmoid,
                                                                         (Ref(i),)),)),
        torch.rand: lambda: Call("function", torch.rand, (batch, 1, *(1,) * ndim), {"dtype": F64}),
        torch.randn: lambda: Call("function", torch.randn, (batch, 1, *(1,) * ndim), {"dtype": F64}),
        torch.randint: lambda: Call("function", torch.randint, (3, (batch, 1, *(1,) * ndim))),
        torch.rand_like: lambda: Call("function", torch.rand_like, (Ref(i),)),
        torch.randn_like: lambda: Call("function", torch.randn_like, (Ref(i),)),
        torch.randint_like: lambda: Call("function", torch.randint_like, (Ref(i), 3)),
        torch.randperm: lambda: Call("function", torch.randperm, (Call("method", "size", (Ref(i), 1)),)),
        torch.normal: lambda: Call("function", torch.normal, (Ref(i), 1.0)),
        torch.multinomial: lambda: Call("function", torch.multinomial, (
            s.constant(torch.ones(3, dtype=F64), parameter=False), Call("method", "size", (Ref(i), 1))),
            {"replacement": True}),
        torch.poisson: lambda: Call("function", torch.poisson, (positive_of(Ref(i)),)),
    }
    expr = exprs[target]()
    return Out(expr, v.dims if target in (torch.bernoulli, torch.rand_like, torch.randn_like,
                                          torch.randint_like, torch.normal, torch.poisson) else None)


def _groups(c: int):
    return pick(*[g for g in range(1, c + 1) if c % g == 0])


#: the non-local functions, and the arguments after the map that torch runs them with
REFUSED = {
    F.adaptive_avg_pool1d: lambda s, i, v: (s.draw(pick(1, 2)),),
    F.adaptive_avg_pool2d: lambda s, i, v: (s.draw(pick(1, (2, 1))),),
    **{f: lambda s, i, v: (1,) for f in (F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                                      F.adaptive_max_pool1d_with_indices,
                                      F.adaptive_max_pool2d_with_indices, F.pixel_shuffle,
                                      F.pixel_unshuffle)},
    **{f: lambda s, i, v: () for f in (F.interpolate, F.upsample, F.upsample_nearest,
                                    F.upsample_bilinear)},
    F.grid_sample: lambda s, i, v: (s.constant(torch.rand(v.sample.shape[0], 3, 3, 2, dtype=F64) * 2 - 1),),
    F.conv_transpose1d: lambda s, i, v: (s.constant(s.random(v.channels, 2, 2)),),
    F.conv_transpose2d: lambda s, i, v: (s.constant(s.random(v.channels, 2, 2, 2)),),
    F.unfold: lambda s, i, v: (2,),
    F.fold: lambda s, i, v: ((1, v.sample.shape[-1]), 1),
    F.scaled_dot_product_attention: lambda s, i, v: (Ref(i), Ref(i)),
}


def refused_function(s: Scope, key, valid: bool) -> Out:
    """Functions that are not local (global pooling, normalisation over space, attention) or
    resample (drawn as these are: see RESAMPLING_LAYERS), called validly for torch; their
    result merged into the input."""
    target = key[1]
    i = s.pick()
    kwargs = {}
    if target in (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear):
        kwargs["scale_factor"] = 2.0
        if target is F.interpolate and s.draw(BOOLS):
            kwargs["mode"] = "linear" if s.ndim == 1 else "bilinear"
    if target in (F.conv_transpose1d, F.conv_transpose2d):
        kwargs["stride"] = 2
    return Out(Call("function", target, (Ref(i), *REFUSED[target](s, i, s.values[i])), kwargs))


# --------------------------------------------------------------------------- layers

ACTIVATION_LAYERS = {  # constructor parameters of the pointwise layers
    nn.ReLU: [INPLACE], nn.ReLU6: [INPLACE], nn.LeakyReLU: [("negative_slope", pick(0.01, 0.2)), INPLACE],
    nn.ELU: [("alpha", FLOATS), INPLACE], nn.SELU: [INPLACE], nn.CELU: [("alpha", FLOATS), INPLACE],
    nn.GELU: [("approximate", pick("none", "tanh"))], nn.SiLU: [INPLACE], nn.Mish: [INPLACE],
    nn.Sigmoid: [], nn.Tanh: [], nn.Hardtanh: [("min_val", pick(-1.0, -0.5)),
                                               ("max_val", pick(0.5, 1.0)), INPLACE],
    nn.Hardswish: [INPLACE], nn.Hardsigmoid: [INPLACE], nn.Softplus: [("beta", FLOATS),
                                                                      ("threshold", pick(20.0, 1.0))],
    nn.Softsign: [], nn.Tanhshrink: [], nn.Softshrink: [("lambd", pick(0.5, 0.1))],
    nn.Hardshrink: [("lambd", pick(0.5, 0.1))], nn.LogSigmoid: [],
    nn.Threshold: [("threshold", pick(0.1, -0.2), True), ("value", pick(0.0, 2.0), True), INPLACE],
    nn.Identity: [],
}


def call_layer(s: Scope, m: nn.Module, *inputs) -> Call:
    """``self.<layer>(inputs)``, the first input by its forward's name now and then."""
    name = s.layer(m)
    if len(inputs) == 1 and s.draw(ints(0, 5)) == 0:
        import inspect
        first = list(inspect.signature(type(m).forward).parameters)[1]
        return Call("module", name, (), {first: inputs[0]})
    return Call("module", name, inputs)


def activation_layer(s: Scope, key, valid: bool) -> Out:
    i = s.pick()
    v = s.values[i]
    kwargs = {n: val for n, val in s.given(ACTIVATION_LAYERS[key[1]]) if val is not OMIT}
    first = s.clone(Ref(i)) if kwargs.get("inplace") else Ref(i)
    return Out(call_layer(s, key[1](**kwargs), first), v.dims, v.grid, must_stream=True)


def conv_layer(s: Scope, key, valid: bool) -> Out:
    """Conv1d/2d layers: padding ints, 'same', 'valid', padding modes (only 'zeros' local)."""
    a = conv_args(s, key, valid, wrong_channels=not valid and s.draw(ints(0, 7)) == 0)
    i, v, rank = a.i, s.values[a.i], len(a.kernel)
    cin, cout, groups, kernel, stride, dilation, padding = (a.cin, a.cout, a.groups, a.kernel,
                                                            a.stride, a.dilation, a.padding)
    mode = "zeros" if valid or s.draw(ints(0, 4)) else s.draw(pick("reflect", "replicate", "circular"))
    m = key[1](cin, cout, one(kernel, s), one(stride, s), padding, one(dilation, s), groups,
               bias=s.draw(BOOLS), padding_mode=mode)
    expr = call_layer(s, m.double(), Ref(i))
    grid, ok = window_out(s, v, kernel, stride, dilation, conv_pads(padding, kernel, dilation, rank),
                          rank, ok=mode == "zeros" and cin == v.sample.shape[1])
    return Out(expr, standard(s.ndim) if ok else v.dims, grid, must_stream=ok)


def softmax_layer(s: Scope, key, valid: bool) -> Out:
    i = s.pick()
    v = s.values[i]
    if key[1] is nn.Softmax2d:
        i = s.standard_map() if valid else i
        v = s.values[i]
        return Out(call_layer(s, nn.Softmax2d(), Ref(i)), v.dims, v.grid,
                   must_stream=len(v.dims) >= 3 and v.dims[-3] == "C")
    choice = "C" if valid else s.draw(pick("C", "C", "other", "none"))
    dim = s.dim_of(v, "C") if choice == "C" else s.other_dim(v) if choice == "other" else None
    return Out(call_layer(s, key[1](dim), Ref(i)), v.dims, v.grid, must_stream=choice == "C")


def layer_kind(s: Scope, key, valid: bool) -> Out:
    """Layers whose functional form has a generator: the same generator, as a layer."""
    return LAYER_AS_FUNCTION[key[1]](s, key, valid)


def non_local_layer(s: Scope, key, valid: bool) -> Out:
    """The refused layers (NON_LOCAL_MODULES) and the resampling ones, built and called as
    torch accepts them."""
    kind = key[1]
    i = s.pick()
    v = s.values[i]
    c = v.channels
    last, _ = s.channels_last(i)
    one_d = "linear" if s.ndim == 1 else "bilinear"
    builds = {
        nn.Bilinear: lambda: (nn.Bilinear(c, c, 3), last, last),
        nn.LazyLinear: lambda: (nn.LazyLinear(3, dtype=F64), last),
        nn.Unflatten: lambda: (nn.Unflatten(1, (c, 1)), Ref(i)),
        nn.AdaptiveAvgPool1d: lambda: (nn.AdaptiveAvgPool1d(1), Ref(i)),
        nn.AdaptiveAvgPool2d: lambda: (nn.AdaptiveAvgPool2d(1), Ref(i)),
        nn.AdaptiveMaxPool1d: lambda: (nn.AdaptiveMaxPool1d(1), Ref(i)),
        nn.AdaptiveMaxPool2d: lambda: (nn.AdaptiveMaxPool2d(1), Ref(i)),
        nn.Upsample: lambda: (nn.Upsample(scale_factor=2, mode=s.draw(pick("nearest", one_d))), Ref(i)),
        nn.UpsamplingNearest2d: lambda: (nn.UpsamplingNearest2d(scale_factor=2), Ref(i)),
        nn.UpsamplingBilinear2d: lambda: (nn.UpsamplingBilinear2d(scale_factor=2), Ref(i)),
        nn.ConvTranspose1d: lambda: (nn.ConvTranspose1d(c, 2, 2, 2), Ref(i)),
        nn.ConvTranspose2d: lambda: (nn.ConvTranspose2d(c, 2, 2, 2), Ref(i)),
        nn.PixelShuffle: lambda: (nn.PixelShuffle(1), Ref(i)),
        nn.PixelUnshuffle: lambda: (nn.PixelUnshuffle(1), Ref(i)),
        nn.Fold: lambda: (nn.Fold((1, v.sample.shape[-1]), 1), Ref(i)),
        nn.Unfold: lambda: (nn.Unfold(2), Ref(i)),
        nn.FractionalMaxPool2d: lambda: (nn.FractionalMaxPool2d(2, output_ratio=0.5), Ref(i)),
        nn.MultiheadAttention: lambda: (nn.MultiheadAttention(c, 1, batch_first=True), last, last, last),
        nn.TransformerEncoderLayer: lambda: (nn.TransformerEncoderLayer(c, 1, 8, 0.0, batch_first=True),
                                             last),
        nn.TransformerDecoderLayer: lambda: (nn.TransformerDecoderLayer(c, 1, 8, 0.0, batch_first=True),
                                             last, last),
        nn.Transformer: lambda: (nn.Transformer(c, 1, 1, 1, 8, 0.0, batch_first=True), last, last),
    }
    m, *inputs = builds[kind]()
    expr = call_layer(s, m.double() if kind is not nn.LazyLinear else m, *inputs)
    if kind is nn.MultiheadAttention:
        expr = Item(expr, 0)
    return Out(expr)


# --------------------------------------------------------------------------- the catalog


def _method(name):
    return ("method", name)


def _function(f):
    return ("function", f)


def _module(t):
    return ("module", t)


LAYER_AS_FUNCTION = {
    **{t: pool for t in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)},
    **{t: pad for t in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)},
    nn.PReLU: prelu, nn.RReLU: rrelu, nn.GLU: glu, nn.ChannelShuffle: channel_shuffle,
    nn.LocalResponseNorm: local_response_norm, nn.LayerNorm: layer_norm, nn.RMSNorm: layer_norm,
    nn.Linear: linear, nn.Flatten: flatten,
    **{t: dropout for t in rules.DROPOUT_MODULES},
    **{t: batch_norm for t in rules.BATCHNORM_MODULES},
}

#: layers that change the grid (upsampling): the grids here are integer strides, so their calls
#: are drawn as the refused layers' are - streamed exactly or refused clearly, either passes;
#: verify/test_upsampling.py draws encoder-decoders that must stream
RESAMPLING_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Upsample, nn.UpsamplingNearest2d,
                     nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle)

CATALOG = {
    **{_function(f): unary for f in UNARY},
    **{_method(m): unary for m in UNARY_METHODS},
    **{(_function(k) if not isinstance(k, str) else _method(k)): clamp for k in CLAMPS},
    **{_function(f): arithmetic for f in ARITHMETIC + COMPARISONS},
    **{_method(m): arithmetic for m in ARITHMETIC_METHODS},
    _function(operator.pow): power, _function(torch.pow): power, _method("pow"): power,
    _method("pow_"): power,
    **{_function(f): reduction for f in (torch.mean, torch.sum, torch.amax, torch.amin, torch.max,
                                          torch.min, torch.std, torch.var, torch.norm, torch.logsumexp)},
    **{_method(m): reduction for m in REDUCTIONS},
    **{_function(f): softmax for f in (F.softmax, F.log_softmax, F.softmin)},
    _method("softmax"): softmax, _method("log_softmax"): softmax,
    _function(F.normalize): normalize, _function(F.glu): glu,
    _function(F.local_response_norm): local_response_norm, _function(F.prelu): prelu,
    _function(F.rrelu): rrelu, **{_function(f): dropout for f in DROPOUTS},
    _function(F.batch_norm): batch_norm, _function(F.layer_norm): layer_norm,
    _function(F.rms_norm): layer_norm, _function(F.linear): linear,
    _function(F.channel_shuffle): channel_shuffle,
    _function(F.conv1d): conv, _function(F.conv2d): conv,
    **{_function(f): pool for f in (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                                    *WITH_INDICES)},
    _function(F.pad): pad,
    **{_function(f): cat for f in (torch.cat, torch.concat, torch.concatenate)},
    _function(torch.stack): stack,
    _function(torch.softmax): softmax, _function(torch.log_softmax): softmax,
    **{_function(f): matmul for f in (operator.matmul, torch.matmul)}, _method("matmul"): matmul,
    _method("unsqueeze"): unsqueeze,
    **{_function(f): pieces for f in (torch.chunk, torch.split)},
    _method("chunk"): pieces, _method("split"): pieces,
    _function(torch.where): where,
    **{_function(f): permute for f in (torch.permute, torch.transpose, torch.movedim)},
    **{_method(m): permute for m in ("permute", "transpose", "movedim")},
    _function(torch.flatten): flatten, _method("flatten"): flatten,
    _function(torch.reshape): reshape,
    **{_method(m): reshape for m in ("view", "reshape", "view_as", "reshape_as", "unflatten")},
    _function(operator.getitem): getitem, _function(getattr): attribute,
    _method("size"): size, _method("dim"): size,
    **{_method(m): convert for m in ("to", "type_as", "float", "double", "half", "bfloat16")},
    _method("register_hook"): register_hook,
    **{_function(f): random_call for f in rules.RANDOM_FUNCTIONS},
    **{_method(m): random_call for m in rules.RANDOM_METHODS},
    **{_function(f): refused_function for f in REFUSED},
    _module(nn.Conv1d): conv_layer, _module(nn.Conv2d): conv_layer,
    **{_module(t): activation_layer for t in ACTIVATION_LAYERS},
    **{_module(t): softmax_layer for t in (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)},
    **{_module(t): layer_kind for t in LAYER_AS_FUNCTION},
    **{_module(t): non_local_layer for kinds, _ in rules.NON_LOCAL_MODULES for t in kinds},
    **{_module(t): non_local_layer for t in RESAMPLING_LAYERS},
    # global pooling (output size 1) streams as a global step: built as before, merged into the map
    **{_module(t): non_local_layer for t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)},
    _method("expand_as"): lambda s, key, valid: Out(Call("method", "expand_as", (Ref(s.pick()),
                                                                                  Ref(s.pick())))),
    **{k: spatial_norm for k in (_module(nn.GroupNorm), _module(nn.InstanceNorm1d),
                                 _module(nn.InstanceNorm2d), _function(F.group_norm),
                                 _function(F.instance_norm))},
}

#: entries that are local: called validly (``valid=True``), streamcnn must stream them
CURATED = [key for key in CATALOG if key[1] not in (
    *rules.RANDOM_FUNCTIONS, *rules.RANDOM_METHODS, "register_hook", torch.reshape, "view",
    "reshape", "view_as", "reshape_as", "unflatten", "expand_as", torch.where, *WITH_INDICES) and CATALOG[key] not in (
    refused_function, non_local_layer)]


def registry_entries() -> list:
    """Every entry of streamcnn's op registry, as catalog keys."""
    return ([_function(f) for f in rules.FUNCTIONS] + [_method(m) for m in rules.METHODS]
            + [_module(t) for t in rules.MODULES]
            + [_module(t) for kinds, _ in rules.NON_LOCAL_MODULES for t in kinds])


# --------------------------------------------------------------------------- programs

#: spatial rank an entry's torch call needs, where its name does not end in 1d/2d
RANK = {F.upsample_bilinear: 2, F.unfold: 2, nn.Unfold: 2, F.fold: 1, nn.Fold: 1, F.grid_sample: 2,
        nn.MultiheadAttention: 1, nn.TransformerEncoderLayer: 1, nn.TransformerDecoderLayer: 1,
        nn.Transformer: 1}


def needed_rank(key) -> int | None:
    target = key[1]
    if target in RANK:
        return RANK[target]
    name = name_of_key(key)
    return 1 if name.endswith("1d") else 2 if name.endswith("2d") else None


class Case:
    """A drawn program, its input and what conventional torch does with it: ``raises``
    (its error, or None), ``must_stream`` (every step is local and valid: a refusal is a
    bug), ``leaf_only`` (the input gradient is rounding noise: compared without it). Not a
    dataclass, so that hypothesis prints it as :meth:`__repr__` does: as Python."""

    def __init__(self, program: Program, x: torch.Tensor, ndim: int, raises: str | None,
                 must_stream: bool, leaf_only: bool = False):
        self.program, self.x, self.ndim = program, x, ndim
        self.raises, self.must_stream, self.leaf_only = raises, must_stream, leaf_only

    def __repr__(self) -> str:
        flags = f"raises {self.raises!r}" if self.raises else \
            "must stream" if self.must_stream else "may be refused"
        frozen = [n for n, p in self.program.named_parameters() if not p.requires_grad]
        flags += f", frozen {frozen}" if frozen else ""
        flags += ", no input gradient" if self.leaf_only else ""
        return (f"Case(x: {tuple(self.x.shape)}, {flags})\n" + self.program.source()).replace(
            "\n", "\n    ")


def _uninitialized(program: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
               for m in program.modules())


class Builder:
    """Draws a program step by step, running each step on the sample input."""

    def __init__(self, draw, ndim: int, seed: int, recent: bool = False):
        self.draw, self.ndim = draw, ndim
        batch, cin = draw(ints(1, 2)), draw(ints(1, 3))
        sizes = [draw(ints(13, 40 if ndim == 2 else 64)) for _ in range(ndim)]
        self.x = torch.randn(batch, cin, *sizes, dtype=F64,
                             generator=torch.Generator().manual_seed(seed))
        kernel = draw(ints(1, 3))
        stride = 2 if draw(ints(0, 5)) == 0 else 1
        padding = draw(ints(0, (kernel - 1) // 2))
        conv = (nn.Conv1d, nn.Conv2d)[ndim - 1]
        stem = conv(cin, draw(pick(2, 4, 3, 6)), kernel, stride, padding).double()
        self.program = Program(stem)
        grid = ((kernel - 1 - 2 * padding, stride, padding),) * ndim
        with torch.enable_grad():
            self.values = [Value(stem(self.x), standard(ndim), grid)]
        self.scope = Scope(draw, self.program, self.values, ndim)
        self.scope.recent = recent
        self.must: list = []  # per step: it is local and valid
        self.raises = None
        self.leaf_only = False

    def add(self, key, valid: bool, keep: bool = False, may_raise: bool = True) -> bool:
        """Draw a step of ``key`` that torch runs (a few tries); now and then (if
        ``may_raise``; always for ``keep``, when every try failed) keep one torch rejects:
        the program ends there. False when it ended."""
        tries = 8 if keep else 3
        for attempt in range(tries):
            self.scope.added = []
            out = CATALOG[key](self.scope, key, valid)
            try:
                runner = copy.deepcopy(self.program) if _uninitialized(self.program) else self.program
                samples = [v.sample for v in self.values]
                with torch.enable_grad():
                    value = evaluate(out.expr, runner, samples)
                    merged = self._merged(out, value)
                    if merged is not out:
                        out, value = merged, evaluate(merged.expr, runner, samples)
            except Exception as err:  # noqa: BLE001 - torch's own rejection, kept or drawn again
                if (keep and attempt == tries - 1) or (may_raise and not keep and
                                                        self.draw(ints(0, 7)) == 0):
                    self.program.steps.append(out.expr)
                    self.raises = f"{type(err).__name__}: {err}"[:300]
                    return False
                self._discard()
                continue
            if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                    not torch.isfinite(value).all():
                self._discard()
                continue
            self.program.steps.append(out.expr)
            self.values.append(Value(value, out.dims, out.grid))
            self.must.append(out.must_stream)
            return True
        return True

    def _merged(self, out: Out, value) -> Out:
        """A non-map tensor result merged into the last full map (``m + value``, or
        ``m + value.sum()`` where it does not broadcast), so that the output depends on it."""
        if out.dims is not None or not isinstance(value, torch.Tensor):
            return out
        j = max(k for k, v in enumerate(self.values) if is_full(v, self.ndim))
        base = self.values[j].sample
        fits = broadcasts(value, base) and torch.broadcast_shapes(value.shape, base.shape) == base.shape
        other = out.expr if fits else Call("method", "sum", (out.expr,))
        return Out(Call("function", operator.add, (Ref(j), other)), self.values[j].dims,
                   self.values[j].grid if out.must_stream else None, out.must_stream)

    def _discard(self) -> None:
        for name in self.scope.added:
            delattr(self.program, name)
        self.scope.added = []

    def finish(self) -> Case:
        """The head (a 1x1 convolution of the last full map, channels first, as float64,
        merged with the last value if that is a map too), and conventional's verdict."""
        values, std = self.values, standard(self.ndim)
        j = max(k for k, v in enumerate(values) if is_full(v, self.ndim))
        last = len(values) - 1
        expr, ok, sample = Ref(j), True, values[j].sample
        if j != last and values[last].is_map and broadcasts(values[last].sample, sample) and \
                torch.broadcast_shapes(values[last].sample.shape, sample.shape) == sample.shape:
            expr = Call("function", operator.add, (Ref(j), Ref(last)))
            ok = compatible(values[j], values[last])
            sample = sample + values[last].sample
        dims = values[j].dims
        if self.raises:  # the output depends on the step torch rejects (the head never runs)
            expr = Call("function", operator.add, (expr, Ref(len(values))))
        if dims != std:
            expr = Call("method", "permute", (expr, *[dims.index(r) for r in std]))
        if not sample.is_floating_point():
            expr = Call("method", "double", (expr,))
        channels = sample.shape[dims.index("C")]
        self.program.head = (nn.Conv1d, nn.Conv2d)[self.ndim - 1](channels, 2, 1).double()
        self.program.head_expr = Call("module", "head", (expr,))
        # dead steps too (a tile runs them), and no dead window: the geometry leaves them
        # out, so a tile may be too small for them (streamcnn names them then)
        live = self._live()
        dead_windows = any(self._window(e) for k, e in enumerate(self.program.steps, 1)
                           if k not in live)
        must = ok and all(self.must) and not dead_windows
        if self.raises is None:
            self.raises = self._conventional()
        return Case(self.program, self.x, self.ndim, self.raises, must and self.raises is None,
                    self.leaf_only)

    def _live(self) -> set:
        """The steps the output depends on."""
        live, todo = set(), list(refs(self.program.head_expr))
        while todo:
            k = todo.pop()
            if k not in live:
                live.add(k)
                if k > 0:
                    todo.extend(refs(self.program.steps[k - 1]))
        return live

    def _window(self, expr) -> bool:
        """Whether ``expr`` applies a window (convolution, pooling, padding)."""
        for c in calls(expr):
            if isinstance(c, Call) and c.form == "module":
                target = type(getattr(self.program, c.target))
            else:
                target = getattr(c, "target", None)
            if target in WINDOWS:
                return True
        return False

    def _conventional(self) -> str | None:
        """Conventional forward and backward on the sample: torch's error, if any; draws
        whose gradients are not finite are discarded."""
        runner = copy.deepcopy(self.program) if _uninitialized(self.program) else self.program
        x = self.x.clone().requires_grad_()
        try:
            y = runner(x)
            (y * torch.randn_like(y)).sum().backward()
        except Exception as err:  # noqa: BLE001 - torch's own rejection
            return f"{type(err).__name__}: {err}"[:300]
        grads = [x.grad] + [p.grad for p in runner.parameters()]
        assume(torch.isfinite(y).all() and all(g is None or torch.isfinite(g).all() for g in grads))
        self._freeze_degenerate(x.grad, dict(runner.named_parameters()))
        return None

    def _freeze_degenerate(self, x_grad, params: dict) -> None:
        """Gradients whose exact value is zero but that come out as rounding noise (a scalar
        added before a softmax over channels, a bias before a std over them: directions the
        output is invariant to) differ between any two summation orders; relative errors
        of noise say nothing. Those parameters stop requiring grad; such an input gradient
        is left out of the comparison (``Case.leaf_only``)."""
        scale = max([g.abs().max().item() for g in [x_grad] + [p.grad for p in params.values()]
                     if g is not None and g.numel()] or [0.0])
        noise = lambda g: g is not None and g.abs().max().item() <= 1e-10 * scale  # noqa: E731
        lazy = _uninitialized(self.program)  # refused before any gradient: nothing to freeze
        for name, p in params.items():
            if noise(p.grad) and not lazy:
                self.program.get_parameter(name).requires_grad_(False)
            p.grad = None
        self.leaf_only = noise(x_grad)


WINDOWS = {F.conv1d, F.conv2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.pad,
           *WITH_INDICES, nn.Conv1d, nn.Conv2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
           nn.AvgPool2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d}
KEYS = sorted(CATALOG, key=lambda k: (k[0], name_of_key(k), str(k[1])))


@st.composite
def programs(draw, focus=None, valid=False, steps=(1, 5)):
    """A :class:`Case`: a stem, ``steps`` random steps from the whole catalog, the head.
    With ``focus``: up to two local steps, then one of ``focus`` (``valid``: a local,
    valid call of it), which the output depends on."""
    seed = draw(ints(0, 2**16))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ndim = (needed_rank(focus) if focus else None) or draw(pick(1, 2))
        builder = Builder(draw, ndim, seed, recent=valid)
        if focus is None:
            for _ in range(draw(ints(*steps))):
                if not builder.add(draw(st.sampled_from(KEYS)), valid=False):
                    break
        else:
            prefix = [k for k in PREFIX if needed_rank(k) in (None, ndim)]
            for _ in range(draw(ints(0, 2))):
                builder.add(draw(st.sampled_from(prefix)), valid=True, may_raise=False)
            builder.add(focus, valid, keep=True)
        return builder.finish()


#: local steps a focused program starts with
PREFIX = [_function(F.conv2d), _function(F.conv1d), _function(F.relu), _function(operator.add),
          _function(F.max_pool1d), _function(F.max_pool2d), _method("permute"), _function(torch.cat),
          _method("sum"), _function(operator.mul)]
