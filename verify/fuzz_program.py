"""Programs of torch calls on feature maps, as the op fuzzer (test_op_fuzzer.py) draws them.

A :class:`Program` is a stem convolution, a list of steps and a head. Each step is an
expression over the values computed so far, written as a user's forward writes it, so
that torch.fx records the same nodes a real network gives:
``Call("method", "norm", (Ref(1), 2, 1), {"keepdim": True})`` runs ``m1.norm(2, 1,
keepdim=True)``; ``Get(Call("function", torch.max, (Ref(0),), {"dim": 1}), "values")``
runs ``torch.max(m0, dim=1).values``. Constants and weights are the program's own
buffers, parameters and layers (:class:`Attr`, ``Call("module", name, ...)``), as real
networks hold them. ``Program.source()`` prints the forward as Python.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Ref:
    """The value of step ``index`` (0: the stem's output)."""

    index: int


@dataclass(frozen=True)
class Attr:
    """``self.<name>``: a buffer or parameter of the program (an fx ``get_attr`` node)."""

    name: str


@dataclass
class Call:
    """A call: ``form`` is "function" (``target(*args)``), "method" (``args[0].target(*rest)``)
    or "module" (``self.<target>(*args)``). ``returns_first``: the value is the first
    argument, read by its old name after an in-place call (``h = m.clone(); h.add_(a)``)."""

    form: str
    target: object
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    returns_first: bool = False


@dataclass
class Item:
    """``value[index]``."""

    value: object
    index: object


@dataclass
class Get:
    """``getattr(value, name)`` (``.values``, ``.shape``, ``.dtype``)."""

    value: object
    name: str


# Functions torch.fx records only through torch.fx.wrap: operators a Proxy has no in-place
# form of (``h += a`` on a Proxy records operator.add), deprecated wrappers that call
# another torch function (F.tanh calls Tensor.tanh, F.upsample calls F.interpolate), and
# factories whose sizes are Proxies (torch.rand). fx then records the function itself,
# as other tracers (and torch.fx.wrap in user code) do.
WRAPPED = {operator.iadd: "_iadd", operator.isub: "_isub", operator.imul: "_imul",
           operator.itruediv: "_itruediv", F.tanh: "_F_tanh", F.sigmoid: "_F_sigmoid",
           F.upsample: "_F_upsample", F.upsample_nearest: "_F_upsample_nearest",
           F.upsample_bilinear: "_F_upsample_bilinear", torch.rand: "_rand",
           torch.randn: "_randn"}
for _target, _alias in WRAPPED.items():
    globals()[_alias] = _target
    torch.fx.wrap(_alias)


def _call_function(target, args, kwargs):
    alias = WRAPPED.get(target)
    return (globals()[alias] if alias else target)(*args, **kwargs)


def evaluate(expr, program: nn.Module, values: list):
    """The value of ``expr`` (literals, tuples, lists and slices of expressions included)."""
    def ev(e):
        return evaluate(e, program, values)

    if isinstance(expr, Ref):
        return values[expr.index]
    if isinstance(expr, Attr):
        return getattr(program, expr.name)
    if isinstance(expr, (tuple, list)):
        return type(expr)(ev(e) for e in expr)
    if isinstance(expr, slice):
        return slice(ev(expr.start), ev(expr.stop), ev(expr.step))
    if isinstance(expr, Item):
        return ev(expr.value)[ev(expr.index)]
    if isinstance(expr, Get):
        return getattr(ev(expr.value), expr.name)
    if not isinstance(expr, Call):
        return expr
    args = [ev(a) for a in expr.args]
    kwargs = {k: ev(v) for k, v in expr.kwargs.items()}
    if expr.form == "function":
        out = _call_function(expr.target, args, kwargs)
    elif expr.form == "method":
        out = getattr(args[0], expr.target)(*args[1:], **kwargs)
    else:
        out = getattr(program, expr.target)(*args, **kwargs)
    return args[0] if expr.returns_first else out


class Program(nn.Module):
    """``head(step_k(...step_1(stem(x))))``: each step an expression over earlier values."""

    def __init__(self, stem: nn.Module):
        super().__init__()
        self.stem = stem
        self.steps: list = []
        self.head_expr = None

    def forward(self, x):
        values = [self.stem(x)]
        for expr in self.steps:
            values.append(evaluate(expr, self, values))
        return evaluate(self.head_expr, self, values)

    def source(self) -> str:
        """The forward as Python, one line per step."""
        lines = ["m0 = self.stem(x)"]
        lines += [f"m{k + 1} = {render(e)}" for k, e in enumerate(self.steps)]
        return "\n".join(lines + [f"return {render(self.head_expr)}"])


def _names() -> dict:
    """Printable names of the functions programs call (F., torch., operator.)."""
    names = {}
    for prefix, space in (("F.", F), ("torch.", torch), ("operator.", operator)):
        for name in dir(space):
            obj = getattr(space, name, None)
            if callable(obj) and not isinstance(obj, type):
                try:
                    names.setdefault(obj, prefix + name)
                except TypeError:  # unhashable
                    pass
    names[getattr] = "getattr"
    return names


_NAMES: dict = {}


def name_of(target) -> str:
    if not _NAMES:
        _NAMES.update(_names())
    return _NAMES.get(target, getattr(target, "__name__", repr(target)))


def render(expr) -> str:
    """``expr`` as the Python a user would write."""
    if isinstance(expr, Ref):
        return f"m{expr.index}"
    if isinstance(expr, Attr):
        return f"self.{expr.name}"
    if isinstance(expr, list):
        return "[" + ", ".join(map(render, expr)) + "]"
    if isinstance(expr, tuple):
        return "(" + ", ".join(map(render, expr)) + ("," if len(expr) == 1 else "") + ")"
    if isinstance(expr, slice):
        parts = [("" if p is None else render(p)) for p in (expr.start, expr.stop, expr.step)]
        return ":".join(parts[:2] if expr.step is None else parts)
    if expr is Ellipsis:
        return "..."
    if isinstance(expr, Item):
        index = expr.index if isinstance(expr.index, tuple) else (expr.index,)
        return f"{render(expr.value)}[{', '.join(map(render, index))}]"
    if isinstance(expr, Get):
        return f"{render(expr.value)}.{expr.name}"
    if isinstance(expr, Call):
        args = [render(a) for a in expr.args] + [f"{k}={render(v)}" for k, v in expr.kwargs.items()]
        if expr.form == "method":
            text = f"{args[0]}.{expr.target}({', '.join(args[1:])})"
        elif expr.form == "module":
            text = f"self.{expr.target}({', '.join(args)})"
        else:
            text = f"{name_of(expr.target)}({', '.join(args)})"
        return f"keep_first({text})" if expr.returns_first else text
    if callable(expr) and not isinstance(expr, torch.dtype):
        return getattr(expr, "__name__", repr(expr))
    return repr(expr)


def calls(expr):
    """Every Call, Item and Get inside ``expr``, outermost first."""
    if isinstance(expr, (Call, Item, Get)):
        yield expr
    children = (expr.args + tuple(expr.kwargs.values()) if isinstance(expr, Call) else
                (expr.value, expr.index) if isinstance(expr, Item) else
                (expr.value,) if isinstance(expr, Get) else
                expr if isinstance(expr, (tuple, list)) else
                (expr.start, expr.stop, expr.step) if isinstance(expr, slice) else ())
    for child in children:
        yield from calls(child)


def refs(expr) -> set:
    """The step indices ``expr`` reads."""
    if isinstance(expr, Ref):
        return {expr.index}
    found = set()
    for c in calls(expr):
        parts = (c.args + tuple(c.kwargs.values()) if isinstance(c, Call) else
                 (c.value, c.index) if isinstance(c, Item) else (c.value,))
        for p in _flat(parts):
            if isinstance(p, Ref):
                found.add(p.index)
    return found


def _flat(values):
    for v in values:
        if isinstance(v, (tuple, list)):
            yield from _flat(v)
        elif isinstance(v, slice):
            yield from _flat((v.start, v.stop, v.step))
        else:
            yield v
