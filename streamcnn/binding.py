"""Bind an operation's arguments as torch binds them, once, before any rule reads them.

fx records each call as it was written, so ``x.norm(1, keepdim=True)``, ``torch.max(a, b)``
and ``torch.max(a, 1)`` arrive as positional lists whose meaning depends on the overload.
:func:`bind` turns a call into keyword arguments under torch's own parameter names, with
the defaults filled in, so every handler in ``streamcnn.rules`` reads ``dim``, ``p``,
``other`` or ``keepdim`` by name and never guesses from positions:

* functions with TorchScript schemas (``torch.max``, ``torch.sum``, ``torch.clamp``...)
  are matched against their overloads by ``torch.fx.operator_schemas.normalize_function``,
  with feature maps typed as tensors (which tells ``max(input, other)`` from
  ``max(input, dim, keepdim)``);
* Python functions (``torch.nn.functional``, ``torch.norm``, ``torch.split``) bind with
  ``inspect.signature``;
* a Tensor method binds as the torch function of the same name with the tensor as its
  first argument (``x.clamp_(min=a)`` as ``torch.clamp(x, min=a)``), else with the
  method's own Python signature (``Tensor.split``);
* modules bind to their ``forward``'s signature (``conv(input=x)``).

The first parameter is always called ``input`` (torch names it ``self``, ``tensor`` or
``input``). Calls that none of these bind - ``operator`` arithmetic, positional-only
builtins, C methods without a torch function (``x.view``, ``x.to``) - are returned as
written, and their handlers bind them with Python's own rules.
"""

from __future__ import annotations

import functools
import inspect
import typing
import warnings

import torch
from torch.fx.operator_schemas import normalize_function

#: torch's names for a call's first tensor, and a method's own name for a function's
_ALIASES = {"self": "input", "tensor": "input", "split_size": "split_size_or_sections"}
#: numpy's names, which torch's argument parser accepts for its own (``x.sum(axis=1)``)
_NUMPY = {"axis": "dim", "keepdims": "keepdim"}


def bind_call(target, args: tuple, kwargs: dict, is_map) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a function call, by name where torch's signature allows.

    ``is_map(value)`` says which values are feature maps (typed as tensors for
    overload resolution)."""
    bound = _normalized(target, args, kwargs, is_map)
    if bound is None:
        bound = _inspected(target, args, kwargs)
    return ((), _renamed(bound)) if bound is not None else (tuple(args), dict(kwargs))


def bind_method(name: str, args: tuple, kwargs: dict, is_map) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``args[0].name(*args[1:], **kwargs)``, by name where possible."""
    function = getattr(torch, name.rstrip("_"), None) if not name.startswith("_") else None
    bound = None
    if callable(function):
        bound = _normalized(function, args, kwargs, is_map) or _inspected(function, args, kwargs)
    if bound is None:
        method = getattr(torch.Tensor, name, None)
        bound = _inspected(method, args, kwargs) if method is not None else None
    return ((), _renamed(bound)) if bound is not None else (tuple(args), dict(kwargs))


def bind_module(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """The arguments ``module(*args, **kwargs)`` passes, by its forward's parameter names
    (defaults not filled in: what was passed), or None when they do not bind."""
    sig = _python_signature(type(module).forward)
    if sig is None:
        return None
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError:
        return None
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(sig.parameters)))  # self
    return _renamed(arguments)


def _renamed(bound: dict | None) -> dict | None:
    if bound is None:
        return None
    return {_ALIASES.get(k, k): v for k, v in bound.items()}


def _normalized(target, args, kwargs, is_map) -> dict | None:
    """Keyword arguments by torch's schema (overloads told apart by argument types) or,
    for Python functions, their signature (``boolean_dispatch`` pairs included). numpy's
    names (``axis``, ``keepdims``) bind as torch's own where they are not the schema's."""
    tries = [kwargs]
    if set(kwargs) & set(_NUMPY):
        tries.append({_NUMPY.get(k, k): v for k, v in kwargs.items()})
    for named in tries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pair = normalize_function(
                    target, tuple(args), dict(named),
                    arg_types=tuple(_type_of(a, is_map) for a in args),
                    kwarg_types={k: _type_of(v, is_map) for k, v in named.items()},
                    normalize_to_only_use_kwargs=True)
        except (RuntimeError, TypeError, ValueError):
            continue
        if pair is not None:
            return dict(pair.kwargs)
    return None


def _inspected(target, args, kwargs) -> dict | None:
    """Keyword arguments by a Python signature, or None where it has positional-only or
    variadic parameters (those calls are passed on as written)."""
    sig = _python_signature(target)
    if sig is None:
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


@functools.lru_cache(maxsize=None)
def _python_signature(target):
    try:
        sig = inspect.signature(inspect.unwrap(target))
    except (TypeError, ValueError):  # builtins without a Python signature
        return None
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind not in plain for p in sig.parameters.values()):
        return None
    return sig


def _type_of(value, is_map):
    """The type ``normalize_function`` matches an argument by (a feature map is a tensor)."""
    if is_map(value):
        return torch.Tensor
    if isinstance(value, (tuple, list)):
        inner = tuple(_type_of(v, is_map) for v in value)
        if isinstance(value, list):
            return typing.List[inner[0]] if inner and len(set(inner)) == 1 else list
        return typing.Tuple[inner] if inner else typing.Tuple[()]
    return type(value)
