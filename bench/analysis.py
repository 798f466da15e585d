"""Numbers derived from the measured points: extrapolations, overlap, targets, gradient agreement."""
import math
from pathlib import Path

MEMORY_RATIO_TARGET = 10.0   # streaming peak at most 1/10 of conventional's
PLAN_RATIO_TARGET = 1.2      # measured streaming peak within 1.2x of plan()'s estimate
SPEED_TARGET = 1.0           # streaming step no slower than conventional's


def plan_estimate(point: dict, which: str):
    """plan()'s peak estimate for ``which`` ('streaming'/'conventional') minus the input, or None.

    plan() counts the input among the step's tensors; the measurement starts after the
    input is allocated, so the input is taken off to compare like with like.
    """
    est = (point or {}).get("plan", {}).get(f"{which}_peak_bytes")
    return None if est is None else est - point["input_bytes"]


def measured(points):
    """Only the points that were actually measured."""
    return [p for p in points if p.get("status") == "measured"]


def fit_linear(xs, ys):
    """Least-squares y = a*x + b; with one point, the proportional line through it."""
    if not xs:
        raise ValueError("fit_linear needs at least one measured point")
    if len(xs) == 1:
        return ys[0] / xs[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return a, my - a * mx


def extrapolate(points, sizes, key):
    """Estimate ``key`` (e.g. 'peak_bytes') at ``sizes`` from a linear fit in pixels over measured points.

    Uses the two largest measured sizes (the per-pixel cost dominates there, so the
    fit is not bent by fixed overheads that matter only for tiny inputs).
    """
    pts = sorted(measured(points), key=lambda p: p["size"])[-2:]
    if not pts:
        return {}
    a, b = fit_linear([p["size"] ** 2 for p in pts], [p[key] for p in pts])
    return {s: a * s * s + b for s in sizes}


def overlap_factor(plan: dict, size: int):
    """Computed input pixels over image pixels: how much work the tiles' overlap repeats.

    plan()'s ``tile_starts``/``tile_stops`` hold one list per spatial axis and the tiles
    are their product, so the covered area is the product of the per-axis sums.
    None if the plan lacks them.
    """
    starts, stops = plan.get("tile_starts"), plan.get("tile_stops")
    if not starts or not stops:
        return None
    covered = [sum(b - a for a, b in zip(s, e)) for s, e in zip(starts, stops)]
    return math.prod(covered) / size ** len(covered)


def time_breakdown(stream: dict, conventional: dict, factor):
    """Split streaming's extra time over conventional into recomputation, overlap and the rest.

    Work model: conventional = F + B (forward, backward). Streaming runs a no-grad
    forward over the tiles, then per tile recomputes the forward and backpropagates,
    all on ``factor`` times the pixels: ~ factor * (2F + B).
    """
    f, b = conventional["forward_s"], conventional["backward_s"]
    factor = factor or 1.0
    recompute = f * factor
    overlap = (f + b) * (factor - 1.0)
    model = (f + b) + recompute + overlap
    return {"recompute_s": recompute, "overlap_s": overlap, "model_s": model,
            "other_s": stream["step_s"] - model, "extra_s": stream["step_s"] - (f + b)}


def grad_errors(path, oracle_path):
    """Worst relative error ||g - g64|| / ||g64|| over the weight tensors and over the bias tensors.

    None if either gradient file is missing. Biases are reported apart: their gradient
    is a sum of millions of nearly cancelling terms, so float32 loses most there.
    """
    import torch

    if not (Path(path).exists() and Path(oracle_path).exists()):
        return None
    g, ref = torch.load(path), torch.load(oracle_path)
    err = {k: ((g[k].double() - ref[k]).norm() / ref[k].norm()).item() for k in ref}
    worst = lambda kind: max((e for k, e in err.items() if k.endswith(kind)), default=None)  # noqa: E731
    return {"weights": worst(".weight"), "biases": worst(".bias")}


def _plan_ratio(point):
    est = plan_estimate(point, "streaming")
    return point["peak_bytes"] / est if est else None


def targets(fig2_stream, fig2_conv):
    """The issue's three targets at the Fig. 2 input size, each with the numbers behind it.

    A tile as large as the image (one tile) is plain backprop in a wrapper, so only
    points with more than one tile compete for "best tile".
    """
    pts = [p for p in measured(fig2_stream) if math.prod(p["plan"].get("tiles_per_axis") or [2]) > 1]
    if not pts or fig2_conv.get("status") != "measured":
        return [{"target": "all", "met": None, "detail": "Fig. 2 points or the conventional reference were not measured"}]
    best_mem = min(pts, key=lambda p: p["peak_bytes"])
    best_time = min(pts, key=lambda p: p["step_s"])
    mem_ratio = fig2_conv["peak_bytes"] / best_mem["peak_bytes"]
    plan_ratio = _plan_ratio(best_mem)
    speed = fig2_conv["step_s"] / best_time["step_s"]
    both = [p for p in pts if fig2_conv["peak_bytes"] / p["peak_bytes"] >= MEMORY_RATIO_TARGET
            and p["step_s"] <= fig2_conv["step_s"]]
    return [
        {"target": "peak memory <= 1/10 of conventional", "tile": best_mem["tile"],
         "value": mem_ratio, "threshold": MEMORY_RATIO_TARGET, "met": mem_ratio >= MEMORY_RATIO_TARGET,
         "detail": f"conventional / streaming peak = {mem_ratio:.1f}x"},
        {"target": "peak memory within 1.2x of plan()", "tile": best_mem["tile"], "value": plan_ratio,
         "threshold": PLAN_RATIO_TARGET,
         "met": None if plan_ratio is None else (1 / PLAN_RATIO_TARGET <= plan_ratio <= PLAN_RATIO_TARGET),
         "detail": "no plan() estimate" if plan_ratio is None else f"measured / plan() = {plan_ratio:.2f}"},
        {"target": "step time no slower than conventional", "tile": best_time["tile"], "value": speed,
         "threshold": SPEED_TARGET, "met": speed >= SPEED_TARGET,
         "detail": f"conventional / streaming time = {speed:.2f}x"},
        {"target": "one tile meets both the memory and the time target", "tile": both[0]["tile"] if both else None,
         "value": None, "threshold": None, "met": bool(both),
         "detail": ", ".join(str(p["tile"]) for p in both) or "no tile does"},
    ]
