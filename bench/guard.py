"""plan() for a benchmark point, and the memory guard that skips points which would not fit."""
import dataclasses

from bench.config import Config
from bench.memory import mem_available_bytes

GIB = 2**30
LIBRARY_OVERHEAD_BYTES = GIB // 2  # torch + numpy loaded in the worker
PLAN_SAFETY_FACTOR = 2.0  # plan() counts tensors only; CPU conv workspaces add up to ~1.7x (measured)


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def plan_point(net, size: int, tile: int, seed: int) -> dict:
    """streamcnn.plan() for network ``net`` (a bench.networks.Network) as a JSON-able dict (with 'text')."""
    from streamcnn import plan

    try:
        p = plan(net.build(seed), net.input_shape(size), tile)
    except (ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    fields = {f.name: _jsonable(getattr(p, f.name)) for f in dataclasses.fields(p)}
    return {**fields, "text": str(p)}


def available_bytes(device: str) -> int:
    """Memory a new point may use now: free GPU memory, or the OS's MemAvailable."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    return mem_available_bytes()


def needed_bytes(mode: str, size: int, device: str, plan: dict, input_bytes: int) -> int:
    """Bytes a point is expected to need: input + plan()'s step estimate (with margin) + libraries."""
    which = "streaming" if mode == "streaming" else "conventional"
    key = f"{which}_peak_bytes"
    if plan.get(key) is None:
        raise ValueError(f"plan() gave no {key} for size {size}: {plan.get('error', 'missing field')}")
    step = plan[key] - input_bytes  # plan() counts the input too
    libraries = 0 if device.startswith("cuda") else LIBRARY_OVERHEAD_BYTES
    return int(input_bytes + PLAN_SAFETY_FACTOR * step + libraries)


def fit_reason(mode: str, size: int, device: str, plan: dict, cfg: Config, input_bytes: int):
    """None if the point should fit in memory now, else a sentence saying why it is skipped."""
    try:
        need = needed_bytes(mode, size, device, plan, input_bytes)
    except ValueError as err:
        return str(err)
    have = available_bytes(device) - cfg.memory_margin_bytes
    if need > have:
        return (f"needs ~{need / GIB:.1f} GiB (input + {PLAN_SAFETY_FACTOR:g}× plan() estimate"
                f" + libraries) but only {max(have, 0) / GIB:.1f} GiB are available")
    return None
