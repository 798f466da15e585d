"""Peak-memory estimates for one training step, conventional and streamed.

The model counts the bytes of the tensors autograd keeps alive; it ignores
allocator caching, library workspaces (cuDNN, oneDNN) and the Python runtime.

What each operation keeps for backward is not guessed: :func:`probe` runs the
traced graph once on a small input under ``torch.autograd.graph.saved_tensors_hooks``
and records, per step, how many elements its output has per input position, whether
it allocates new storage or works in place / returns a view, which activations it
saves (its input, its output, or others, by storage), and how many other bytes per
output element it saves (max-pool indices, normalisation statistics). Parameters and
buffers it saves are counted as parameters.

:func:`graph_peak` then replays one training step over the graph:

* forward with grad: each step allocates its output (unless in place or a view)
  and its extra saved bytes; a storage is freed once every step that reads it has
  run and no step saved it; the output (every output map) stays alive;
* backward: the output gradient (of every output map) is allocated; each step allocates a gradient for
  each of its inputs that has none yet (the input's only when the input needs one),
  then frees its own output gradient and what only it saved.

The peak of the running sum is the step's peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .geometry import fits, lengths
from .rules import NORM_MODULES
from .trace import TracedGraph


@dataclass(frozen=True)
class StepMemory:
    """What one step allocates and keeps alive for its backward (per unit of its output)."""

    elements_per_position: float  # output elements per spatial position, per sample
    owner: int  # the step whose storage its output lives in (itself unless in place or a view)
    saves: tuple[int, ...]  # storage owners of the activations it saves
    extra_ratio: float  # other saved bytes per byte of its output


def probe_size(graph: TracedGraph, spatial) -> list[int]:
    """A small per-axis input length the graph accepts (at most the image's)."""
    sizes = []
    for a, length in enumerate(spatial):
        axis = graph.axis(a)
        start = min(length, 16)
        sizes.append(next((n for n in range(start, length + 1) if fits(axis, n)), length))
    return sizes


class _Probe(fx.Interpreter):
    """Runs the traced graph, recording each node's output and what it saves."""

    def __init__(self, graph: TracedGraph):
        super().__init__(fx.GraphModule(graph.root, graph.graph))
        self.extra_traceback = False  # raise as the tile loop would (no fx node notes)
        self.pipeline = graph.root
        self.tile = None  # the input
        self.current = None
        self.outputs: dict = {}
        self.saved: list = []

    def call_module(self, target, args, kwargs):
        return self.fetch_attr(target).forward(*args, **kwargs)  # no user hooks

    def run_node(self, n):
        self.current = n.name
        out = super().run_node(n)
        self.outputs[n.name] = out
        if n.op == "placeholder":
            self.tile = out
        if n.meta.get("streamcnn_transformed"):  # checked as Streaming checks every tile
            self.pipeline.check_transformed(self.tile, out)
        return out

    def pack(self, t):
        self.saved.append((self.current, t))
        return t


def probe(graph: TracedGraph, channels: int, device, dtype, spatial,
          input_dtype=None) -> list[StepMemory]:
    """Run the graph once on a small input and describe each step's memory."""
    sizes = probe_size(graph, spatial)
    runner = _Probe(graph)
    input_dtype = input_dtype or dtype
    if input_dtype.is_floating_point:
        base = torch.randn(1, channels, *sizes, device=device, dtype=input_dtype, requires_grad=True)
        x = base * 1.0  # a non-leaf, so in-place layers may write into it
    else:
        x = torch.randint(0, 100, (1, channels, *sizes), device=device, dtype=input_dtype)
    buffers = [(b, b.clone()) for b in graph.root.buffers()]
    norms = [(m, m.training) for m in graph.root.modules() if isinstance(m, NORM_MODULES)]
    try:  # normalisations as streaming runs them in a tile (eval), their buffers untouched
        for m, _ in norms:
            m.training = False
        with torch.autograd.graph.saved_tensors_hooks(runner.pack, lambda t: t):
            runner.run(x)
    finally:
        for m, training in norms:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    params = {_ptr(t) for t in list(graph.root.parameters()) + list(graph.root.buffers())}
    tensors = [x] + _step_tensors(graph, runner.outputs)[1:]
    owner_of: dict = {}
    result = []
    step_lengths = [lengths(graph.axis(a), n) for a, n in enumerate(sizes)]
    for i, t in enumerate(tensors):
        owner = owner_of.setdefault(_ptr(t), i) if t is not None and t.numel() else i
        positions = math.prod(ls[i] for ls in step_lengths)
        node = graph.steps[i].node
        saves, extra = set(), 0
        for who, s in runner.saved:
            p = _ptr(s)
            if who != node or p in params:
                continue
            if p in owner_of:
                saves.add(owner_of[p])
            else:
                extra += s.numel() * s.element_size()
        numel = t.numel() if t is not None else positions * (graph.steps[i].channels or 1)
        nbytes = numel * (t.element_size() if t is not None else x.element_size())
        result.append(StepMemory(numel / positions, owner, tuple(sorted(saves)),
                                 extra / max(nbytes, 1)))
    return result


def _step_tensors(graph: TracedGraph, outputs: dict) -> list:
    """The probe's tensor for every step (a node that made several steps gave a tuple)."""
    seen: dict = {}
    tensors = []
    for i, step in enumerate(graph.steps):
        if i == 0:
            tensors.append(None)
            continue
        value = outputs.get(step.node)
        if isinstance(value, (tuple, list)):
            k = seen.get(step.node, 0)
            seen[step.node] = k + 1
            value = value[k]
        tensors.append(value if isinstance(value, torch.Tensor) else None)
    return tensors


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def graph_peak(graph: TracedGraph, memory: list[StepMemory], act_bytes: list[int],
               input_grad: bool) -> tuple[int, int]:
    """(forward, backward) peak bytes of one training step through the graph.

    ``act_bytes[i]``: bytes of step ``i``'s output (0 is the input, which the
    caller holds and counts). Includes the output (every output map), its gradient
    and the input gradient when ``input_grad``.
    """
    steps = graph.steps
    n = len(steps) - 1
    out_owners = {memory[i].owner for i in graph.maps}
    last_read = {}  # storage owner -> last step that reads it
    for i, step in enumerate(steps):
        for j in step.inputs:
            last_read[memory[j].owner] = i
    refs: dict = {}
    live: dict = {}
    peak = 0

    def note():
        nonlocal peak
        peak = max(peak, sum(live.values()))

    def free_storages(now: int):
        for o in [k for k in live if k[0] == "act"]:
            owner = o[1]
            if owner == 0 or owner in out_owners or refs.get(owner, 0) or last_read.get(owner, -1) > now:
                continue
            del live[o]

    for i in range(1, n + 1):
        m = memory[i]
        if m.owner == i:
            live[("act", i)] = act_bytes[i]
        live[("extra", i)] = m.extra_ratio * act_bytes[i]
        note()
        for o in m.saves:
            refs[o] = refs.get(o, 0) + 1
        free_storages(i)
    forward = peak
    for i in graph.maps:
        live[("grad", i)] = act_bytes[i]
    for i in range(n, 0, -1):
        for j in set(steps[i].inputs):
            if (j > 0 or input_grad) and ("grad", j) not in live:
                live[("grad", j)] = act_bytes[j]
        note()
        live.pop(("grad", i), None)
        live.pop(("extra", i), None)
        for o in memory[i].saves:
            refs[o] -= 1
        free_storages(n + 1)
    return int(forward), int(peak)


def no_grad_peak(graph: TracedGraph, memory: list[StepMemory], act_bytes: list[int]) -> int:
    """Peak bytes of a forward without grad: each activation lives until its last reader
    has run (the input, step 0, is the caller's; output maps live on)."""
    steps = graph.steps
    out_owners = {memory[i].owner for i in graph.maps}
    last_read = {}
    for i, step in enumerate(steps):
        for j in step.inputs:
            last_read[memory[j].owner] = i
    live, peak = {}, 0
    for i in range(1, len(steps)):
        if memory[i].owner == i:
            live[i] = act_bytes[i]
        peak = max(peak, sum(live.values()))
        for o in [o for o in live if last_read.get(o, -1) <= i and o not in out_owners]:
            del live[o]
    return peak
