"""Straight-line fits y = a + b·x for the curves' claims (time and memory linear in pixels).

The inputs span two and a half decades of pixel counts, so an ordinary least-squares fit would be
decided by the largest input alone. The fit is weighted by 1/y² instead: it minimises the
*relative* residuals, so each point has an equal say. R² is the ordinary, unweighted coefficient
of determination of that line, 1 − Σ(y − ŷ)² / Σ(y − ȳ)². A point is *flagged* when it lies more
than ``FLAG_REL`` off the line.
"""
from __future__ import annotations

import math

FLAG_REL = 0.20      # a point more than 20 % off the fitted line is flagged
MIN_POINTS = 3       # a line through two points fits anything: never fit (or extrapolate) through fewer


def weighted_line(xs, ys) -> tuple[float, float]:
    """(a, b) minimising Σ((y − a − b·x) / y)²."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"a line needs at least 2 points with one y each, got {len(xs)} x and {len(ys)} y")
    if any(y <= 0 for y in ys):
        raise ValueError(f"the relative-error fit needs positive y values, got {min(ys)}")
    w = [1.0 / (y * y) for y in ys]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, ys)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    if sxx == 0:
        raise ValueError("a line needs at least two different x values")
    b = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys)) / sxx
    return my - b * mx, b


def r_squared(xs, ys, a: float, b: float) -> float:
    """Unweighted R² of the line a + b·x on (xs, ys)."""
    mean = sum(ys) / len(ys)
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else -math.inf)


def linear_fit(points: list, x_key: str, y_key: str, use=lambda p: True) -> dict | None:
    """Fit y = a + b·x over the points ``use`` accepts; every point gets its deviation and a flag.

    ``points`` are dicts; returns None when fewer than MIN_POINTS are usable, else
    {a, b, r2, n, rows: [{x, y, fit, rel, flagged, used, size}]} (size: the point's, if it has one).
    """
    fitted = [p for p in points if use(p)]
    if len(fitted) < MIN_POINTS:
        return None
    xs, ys = [p[x_key] for p in fitted], [p[y_key] for p in fitted]
    a, b = weighted_line(xs, ys)
    rows = []
    for p in points:
        pred = a + b * p[x_key]
        rel = (p[y_key] - pred) / pred if pred > 0 else math.inf
        rows.append({"x": p[x_key], "y": p[y_key], "fit": pred, "rel": rel, "size": p.get("size"),
                     "flagged": abs(rel) > FLAG_REL, "used": use(p)})
    return {"a": a, "b": b, "r2": r_squared(xs, ys, a, b), "n": len(fitted), "flag_rel": FLAG_REL, "rows": rows}


def predict(fit: dict, x: float) -> float:
    """The fitted line at x."""
    return fit["a"] + fit["b"] * x
