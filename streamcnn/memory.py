"""Peak-memory estimates for one training step, conventional and streamed.

The model counts the bytes of the tensors that autograd keeps alive; it ignores
allocator caching, library workspaces (cuDNN, oneDNN) and the Python runtime.

What each layer keeps for backward is not guessed: ``probe`` runs the layer's
``forward`` once on a tiny input under ``torch.autograd.graph.saved_tensors_hooks``
and records whether it saved its input, its output (and whether it worked in
place), and how many other bytes per output element (e.g. max-pool indices).
Parameters and buffers that a layer saves are already counted as parameters.

``chain_peak`` then replays one training step on a chain of activations:

* forward with grad: each layer allocates its output (not when in place) and
  its extra saved bytes; an activation is freed once no layer saved it and
  the next layer has consumed it; the chain's output stays alive.
* backward: the output gradient is allocated; each layer allocates its input
  gradient (the first layer only when the input needs one), after which its
  output gradient and the tensors only it saved are freed.

The peak of the running sum is the step's peak.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .layers import Layer


@dataclass(frozen=True)
class SavedByLayer:
    """What one layer keeps alive for its backward."""

    saves_input: bool
    saves_output: bool
    in_place: bool
    extra_bytes_per_output: float


def probe(layer: Layer, in_channels: int, device, dtype) -> tuple[SavedByLayer, int]:
    """Probe one layer on a tiny input; returns what it saves and its output channels."""
    size = [2 * (n.span if hasattr(n, "span") else 1) + 2 * n.stride + 4 for n in layer.nodes]
    base = torch.randn(2, in_channels, *size, device=device, dtype=dtype, requires_grad=True)
    x = base * 1.0  # a non-leaf, so in-place layers may write into it
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer.module.forward(x)
    ptr = _storage_ptr
    own = {ptr(t) for t in list(layer.module.parameters()) + list(layer.module.buffers())}
    seen, extra, saves_in, saves_out = set(), 0, False, False
    for t in saved:
        p = ptr(t)
        if p in seen or p in own:
            continue
        seen.add(p)
        if p == ptr(y):
            saves_out = True
        elif p == ptr(x):
            saves_in = True
        else:
            extra += t.numel() * t.element_size()
    result = SavedByLayer(saves_in, saves_out, ptr(y) == ptr(x), extra / max(y.numel(), 1))
    return result, y.shape[1]


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def chain_peak(act_bytes: list[int], out_elems: list[int], saved: list[SavedByLayer],
               input_grad: bool) -> tuple[int, int]:
    """(forward, backward) peak bytes of one training step through a chain.

    ``act_bytes[i]``/``out_elems[i]``: bytes/elements of activation ``i`` (0 is the
    input, which the caller holds and counts). Includes the output, its
    gradient and the input gradient when ``input_grad``.
    """
    n = len(saved)
    sid = list(range(n + 1))  # storage of each activation (in-place layers share it)
    for i in range(1, n + 1):
        if saved[i - 1].in_place:
            sid[i] = sid[i - 1]
    refs: Counter = Counter()
    saves_of: list[list[int]] = [[] for _ in range(n + 1)]
    live: dict = {}
    peak = 0

    def note():
        nonlocal peak
        peak = max(peak, sum(live.values()))

    for i in range(1, n + 1):
        s = saved[i - 1]
        if not s.in_place:
            live[("act", sid[i])] = act_bytes[i]
        live[("extra", i)] = s.extra_bytes_per_output * out_elems[i]
        note()
        if s.saves_input:
            saves_of[i].append(sid[i - 1])
        if s.saves_output:
            saves_of[i].append(sid[i])
        refs.update(saves_of[i])
        prev = sid[i - 1]
        if prev not in (0, sid[i]) and refs[prev] == 0:
            del live[("act", prev)]
    forward = peak
    live[("grad", n)] = act_bytes[n]
    for i in range(n, 0, -1):
        if i > 1 or input_grad:
            live[("grad", i - 1)] = act_bytes[i - 1]
        note()
        del live[("grad", i)]
        del live[("extra", i)]
        for s in saves_of[i]:
            refs[s] -= 1
            if refs[s] == 0 and s not in (0, sid[n]):
                live.pop(("act", s), None)
    return int(forward), int(peak)


def no_grad_peak(act_bytes: list[int], saved: list[SavedByLayer]) -> int:
    """Peak bytes of a forward without grad: one layer's input and output at a time
    (the input, activation 0, is the caller's)."""
    peak = 0
    for i in range(1, len(act_bytes)):
        if not saved[i - 1].in_place:
            peak = max(peak, (act_bytes[i - 1] if i > 1 else 0) + act_bytes[i])
    return peak
