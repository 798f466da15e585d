"""Numbers derived from one network's measured points: fits, overlap, time breakdown, targets, gradients;
and :func:`rederive`, which recomputes all of them, the run's quiet summary and a second run's
comparison in a results dict.

Everything here is a pure function of the point records (bench.json keeps them), so
``python -m bench --render-only`` can rebuild every derived number from the stored points.
"Conventional" always means conventional backprop in the layout Streaming gives its tiles
(like for like); the default-layout run is the separate mode ``conventional_default``.
"""
import math
from pathlib import Path

from bench import compare, fit
from bench.fmt import point_label

MEMORY_RATIO_TARGET = 10.0   # streaming peak at most 1/10 of conventional's
PLAN_RATIO_TARGET = 1.2      # measured streaming peak within 1.2x of plan()'s estimate
SPEED_TARGET = 1.0           # streaming step no slower than conventional's
PROBES = ("default", "heap_malloc", "omp_passive", "one_thread")  # run variants of the overhead section


def plan_estimate(point: dict, which: str):
    """plan()'s peak estimate for ``which`` ('streaming'/'conventional') minus the input, or None.

    plan() counts the input among the step's tensors; the measurement starts after the
    input is allocated, so the input is taken off to compare like with like.
    """
    est = (point or {}).get("plan", {}).get(f"{which}_peak_bytes")
    return None if est is None else est - point["input_bytes"]


def ok(point) -> bool:
    return bool(point) and point.get("status") == "measured"


def measured(points):
    """Only the points that were actually measured."""
    return [p for p in points if ok(p)]


class Points:
    """Lookup of one network's point records by (mode, size, tile, variant)."""

    def __init__(self, records: list):
        self.records = records
        self._by = {(p["mode"], p["size"], p["tile"], p.get("variant", "default")): p for p in records}

    def get(self, mode, size, tile=None, variant="default"):
        return self._by.get((mode, size, tile, variant))


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


def _xy(points, key, use=lambda p: True):
    """Records for fit.linear_fit: x = pixels, y = ``key``, ``use`` deciding which are fitted."""
    return [{"size": p["size"], "x": p["size"] ** 2, "y": p[key], "use": use(p)} for p in points]


def _computed_xy(points, key, use=lambda p: True):
    """As _xy, with x = the input pixels the tiles compute (overlap_factor × pixels): overlap repeats work."""
    rows = [{**r, "x": r["x"] * f, "factor": f}
            for r, p in zip(_xy(points, key, use), points) if (f := overlap_factor(p.get("plan") or {}, p["size"]))]
    return rows if len(rows) == len(points) else []


def _fit(rows, unit: str):
    """fit.linear_fit over _xy records; ``unit`` names y's unit (x is pixels), and b is also given per µs/byte."""
    res = fit.linear_fit(rows, "x", "y", use=lambda r: r["use"])
    if res:
        res["units"] = {"x": "pixels", "y": unit, "a": unit, "b": f"{unit} per pixel"}
        if unit == "s":
            res["b_us_per_pixel"] = res["b"] * 1e6
    return res


def several_tiles(point) -> bool:
    """True when more than one tile covers the input (a plan without a tile grid counts as tiled).

    With one tile the step is plain backprop of the whole image in a wrapper, so its memory
    is set by the image, not by the tile.
    """
    return math.prod(point["plan"].get("tiles_per_axis") or [2]) > 1


def fig3_fits(stream: list, min_side: int) -> dict:
    """Streamed time and peak memory against pixels (inputs from ``min_side`` up), and plan()'s memory line.

    Time is fitted over undisturbed points only (a disturbed point still gets its deviation).
    Memory does not depend on competing programs, but its model a + b·pixels (a: the tile's
    working set, b: the buffers as large as the image) holds only where several tiles cover the
    input, so the memory lines use those inputs alone; ``single_tile`` lists the others.
    """
    pts = [p for p in measured(stream) if p["size"] >= min_side]
    tiled = [p for p in pts if several_tiles(p)]
    planned = [{**p, "plan_bytes": plan_estimate(p, "streaming")} for p in pts if plan_estimate(p, "streaming")]
    return {"min_side": min_side,
            "time": _fit(_xy(pts, "step_s", use=lambda p: p.get("clean", True)), "s"),
            "time_computed": _fit(_computed_xy(pts, "step_s", use=lambda p: p.get("clean", True)), "s"),
            "overlap_factors": {p["size"]: overlap_factor(p.get("plan") or {}, p["size"]) for p in pts},
            "single_tile": [p["size"] for p in pts if not several_tiles(p)],
            "memory": _fit(_xy(tiled, "peak_bytes"), "bytes"),
            "plan_memory": _fit(_xy([p for p in planned if several_tiles(p)], "plan_bytes"), "bytes"),
            "plan_ratio": [{"size": p["size"], "ratio": p["peak_bytes"] / p["plan_bytes"],
                            "fixed_ratio": _plan_ratio(p, "fixed_mmap_peak_bytes"),
                            "flagged": abs(p["peak_bytes"] / p["plan_bytes"] - 1) > fit.FLAG_REL} for p in planned]}


def conventional_fits(conv: list, min_side: int) -> dict:
    """Conventional time and memory against pixels, over undisturbed measured points from ``min_side`` up.

    These lines are the only source of conventional numbers where it was not measured; with
    fewer than fit.MIN_POINTS such points there is no extrapolation at all.
    """
    pts = [p for p in measured(conv) if p["size"] >= min_side and p.get("clean", True)]
    return {"time": _fit(_xy(pts, "step_s"), "s"), "memory": _fit(_xy(pts, "peak_bytes"), "bytes"),
            "sizes": [p["size"] for p in pts]}


def extrapolate(fits: dict, size: int) -> dict:
    """Conventional time and memory at ``size`` from the fits, each None where there is no fit."""
    return {k: (fit.predict(fits[k], size * size) if fits.get(k) else None) for k in ("time", "memory")}


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


def _plan_ratio(point, measure: str = "peak_bytes"):
    """A streamed point's measured peak (``measure``: the timed steps', or the memory probe's
    ``fixed_mmap_peak_bytes``) over plan()'s estimate; None where either is missing."""
    est = plan_estimate(point, "streaming")
    return point[measure] / est if est and point.get(measure) is not None else None


def _plan_detail(point, ratio) -> str:
    """The plan() target's measurement, with the memory probe's ratio where the point has one: with
    glibc's mmap threshold fixed, freed buffers leave the heap at once, so what remains is what plan()
    models (tensors); the difference is the heap's fragmentation, which plan() does not count."""
    if ratio is None:
        return "no plan() estimate"
    fixed = _plan_ratio(point, "fixed_mmap_peak_bytes")
    return f"measured / plan() = {ratio:.2f}" + (
        "" if fixed is None else f" ({fixed:.2f} with glibc's mmap threshold fixed, the heap's fragmentation left out)")


def targets(fig2_stream, fig2_conv):
    """The issue's targets at the Fig. 2 input size against like-for-like conventional backprop.

    A tile as large as the image (one tile) is plain backprop in a wrapper, so only
    points with more than one tile compete for "best tile".
    """
    pts = [p for p in measured(fig2_stream) if several_tiles(p)]
    if not pts or not ok(fig2_conv):
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
         "detail": _plan_detail(best_mem, plan_ratio)},
        {"target": "step time no slower than conventional", "tile": best_time["tile"], "value": speed,
         "threshold": SPEED_TARGET, "met": speed >= SPEED_TARGET,
         "detail": f"conventional / streaming time = {speed:.2f}x"},
        {"target": "one tile meets both the memory and the time target", "tile": both[0]["tile"] if both else None,
         "value": None, "threshold": None, "met": bool(both),
         "detail": ", ".join(str(p["tile"]) for p in both) or "no tile does"},
    ]


def breakdown(fig2_stream, fig2_conv) -> list:
    """Per Fig. 2 tile: overlap factor, forward/backward, and (with conventional measured) the time model."""
    rows = []
    for p in measured(fig2_stream):
        factor = overlap_factor(p["plan"], p["size"])
        row = {"tile": p["tile"], "overlap_factor": factor, "forward_s": p["forward_s"], "backward_s": p["backward_s"]}
        if ok(fig2_conv):
            row.update(time_breakdown(p, fig2_conv, factor))
        rows.append(row)
    return rows


def overhead_rows(pts: Points, size: int, tiles) -> list:
    """The Fig. 2 points re-measured with each overhead probe (harness.VARIANTS), beside the defaults."""
    if not tiles:
        return []
    keys = [("conventional", None)] + [("streaming", t) for t in tiles]
    return [{"mode": m, "tile": t, **{v: pts.get(m, size, t, v) for v in PROBES}} for m, t in keys]


def analyse(cfg: dict, records: list) -> dict:
    """All derived numbers of one network from its point records and its Points (as a dict)."""
    pts = Points(records)
    size2, tile3 = cfg["fig2_input"], cfg["fig3_tile"]
    f2_stream = [pts.get("streaming", size2, t) for t in cfg["fig2_tiles"]]
    f2_conv = pts.get("conventional", size2)
    f3_stream = [pts.get("streaming", s, tile3) for s in cfg["fig3_sizes"]]
    conv = [pts.get("conventional", s) for s in cfg["conventional_sizes"]]
    conv_fits = conventional_fits([p for p in conv if p], cfg["fit_min_side"])
    headline = max(cfg["fig3_sizes"])
    return {
        "breakdown": breakdown([p for p in f2_stream if p], f2_conv),
        "targets": targets([p for p in f2_stream if p], f2_conv),
        "fig3_fits": fig3_fits([p for p in f3_stream if p], cfg["fit_min_side"]),
        "conventional_fits": conv_fits,
        "conventional_extrapolated": [{"size": s, **extrapolate(conv_fits, s)} for s in cfg["fig3_sizes"]
                                      if not ok(pts.get("conventional", s))],
        "headline": {"size": headline, "tile": tile3, "extrapolated": extrapolate(conv_fits, headline)},
        "overhead": overhead_rows(pts, size2, cfg.get("overhead_tiles", ())),
    }


def quiet_summary(records: list) -> dict:
    """How quiet the machine was over a run's timed points: clean at once, clean after re-measuring, disturbed."""
    timed = [p for p in measured(records) if p["mode"] != "oracle"]
    remeasured = [p for p in timed if p.get("attempts", 1) > 1 or p.get("extra_steps", 0) > 0]
    disturbed = [p for p in timed if not p.get("clean", True)]
    waited = [p for p in timed if (p.get("before") or {}).get("waited_s")]
    return {"points": len(timed), "clean": len(timed) - len(disturbed),
            "load_unknown": sum(p.get("foreign_cores") is None for p in timed),
            "remeasured": [{"point": f"{p['network']} {point_label(p)}", "attempts": p.get("attempts", 1), "extra_steps": p.get("extra_steps", 0),
                            "clean": p.get("clean", True)} for p in remeasured],
            "disturbed": [{"point": f"{p['network']} {point_label(p)}", "why": (p.get("disturbances") or ["?"])[0]} for p in disturbed],
            "waited_before": len(waited),
            "never_quiet": bool(timed) and len(disturbed) * 2 > len(timed)}


def rederive(results: dict) -> dict:
    """Recompute every derived number of a results dict from its stored points (nothing measured)."""
    for net in results["networks"].values():
        net["analysis"] = analyse(net["points_config"], net["points"])
    results["quiet"] = quiet_summary([p for n in results["networks"].values() for p in n["points"]])
    if results.get("second_run"):
        results["second_run"]["comparison"] = against_first(results, results["second_run"]["points"])
    return results


def against_first(results: dict, records: list) -> dict:
    """The comparison of a second run's point records with the run stored in ``results``."""
    again = {"schema": compare.SCHEMA, "networks": {n: {"points": [p for p in records if p["network"] == n]}
                                                    for n in results["networks"]}}
    return compare.compare(again, results, "the run above (bench.json)")
