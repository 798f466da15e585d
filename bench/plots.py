"""Figs. 2 and 3 of the paper for one network, redrawn from its measured points and fits.

Hollow markers are points measured while other programs competed for the cores (see BENCH.md);
"conventional" is conventional backprop in the tiles' memory layout (like for like). A time's
whisker spans its point's steps within ``OUTLYING`` of their median; a step further off (a
slow first step, say) is a small hollow circle drawn after the axis is set, so one step cannot
stretch a time axis: beyond the axis it sits on the edge, labelled with its time. Legends sit
below their panels, where they cover no data.
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from bench.analysis import Points, measured, ok, plan_estimate  # noqa: E402
from bench.fit import predict  # noqa: E402

MIB = 2**20
STREAM, CONV, DEFAULT, PLAN = "tab:blue", "tab:red", "tab:orange", "0.35"
OUTLYING = 0.25  # a step this far (relative) from its point's median is drawn apart from the whisker


MIN_LABEL_GAP = 0.06  # of the log axis' span between labelled ticks; closer ones (2896 beside 3072) overprint


def tick_labels(sides, preferred=()) -> list:
    """One label per side, blank where it would overprint a label already placed; ``preferred`` sides first."""
    span = math.log2(max(sides) / min(sides)) or 1.0
    placed = []
    for s in sorted(sides, key=lambda s: (s not in preferred, s)):
        if all(abs(math.log2(s / q)) >= MIN_LABEL_GAP * span for q in placed):
            placed.append(s)
    return [str(s) if s in placed else "" for s in sides]


def _side_axis(ax, sides, label, preferred=()):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sides)
    ax.set_xticklabels(tick_labels(sides, preferred), rotation=0)
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def _log_y(ax):
    """Log y axis with plain-number labels at 1, 2, 5 × powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _once(ax, label):
    """``label`` unless the axes already have an entry with it (one legend entry for all disturbed points)."""
    return "_nolegend_" if label in ax.get_legend_handles_labels()[1] else label


def _series(ax, points, key, x, color, label, scale=1.0, line="-", marker="o", errors=False, timed=True):
    """Measured points joined by a line, with whiskers over their steps when ``errors``. For timed
    quantities (``timed``), points measured while other work competed for the cores are drawn hollow.
    Returns the outlying steps, ``[(x, seconds)]``, for ``_outlying_steps`` to draw last."""
    pts = [p for p in measured(points) if p.get(key) is not None]
    if not pts:
        return []
    xs, ys = [p[x] for p in pts], [p[key] / scale for p in pts]
    ax.plot(xs, ys, linestyle=line, marker=marker, color=color, label=label)
    outlying = []
    if errors:
        near = [_near_steps(p, key) for p in pts]
        yerr = [[p[key] - min(n) for p, n in zip(pts, near)], [max(n) - p[key] for p, n in zip(pts, near)]]
        ax.errorbar(xs, ys, yerr=yerr, fmt="none", ecolor=color, capsize=3)
        outlying = [(p[x], s) for p, n in zip(pts, near) for s in p["step_s_all"] if s not in n]
    bad = [p for p in pts if timed and not p.get("clean", True)]
    if bad:
        ax.plot([p[x] for p in bad], [p[key] / scale for p in bad], marker, linestyle="none", mfc="white", color=color,
                ms=8, label=_once(ax, "disturbed (other work on the cores)"))
    return outlying


def _near_steps(point, key) -> list:
    """The point's steps within ``OUTLYING`` of its median (the median itself when none is)."""
    median = point[key]
    return [s for s in point["step_s_all"] if abs(s - median) <= OUTLYING * median] or [median]


def _outlying_steps(ax, steps, color) -> None:
    """Steps far from their point's median as small hollow circles, drawn once the axis is set so
    that it is not scaled to them; one beyond the axis sits on its edge, labelled with its time."""
    if not steps:
        return
    ax.autoscale(False)
    lo, hi = ax.get_ylim()
    label = f"a step more than {OUTLYING:.0%} off its point's median (not in the whisker)"
    for x, seconds in steps:
        y = min(max(seconds, lo), hi)
        ax.plot([x], [y], "o", mfc="none", ms=5, color=color, clip_on=False, label=_once(ax, label))
        if y != seconds:
            ax.annotate(f"{seconds:.3g} s", (x, y), textcoords="offset points", fontsize=7, color=color,
                        xytext=(5, -10 if y == hi else 4))


def _fixed_mmap_series(ax, points, x):
    """The memory-only probe's peaks (glibc's mmap threshold fixed), where the run measured them."""
    _series(ax, points, "fixed_mmap_peak_bytes", x, STREAM, "streaming, mmap threshold fixed (memory probe)", MIB,
            line="none", marker="^", timed=False)


def _plan_series(ax, points, which, x, color, label):
    pts = [p for p in points if p and plan_estimate(p, which)]
    if pts:
        ax.plot([p[x] for p in pts], [plan_estimate(p, which) / MIB for p in pts], "x:", color=color, alpha=0.7,
                label=label)


def _hline(ax, value, color, style, label):
    if value is not None:
        ax.axhline(value, color=color, linestyle=style, label=label)


def _fit_line(ax, fit, scale, color, label):
    """The fitted line a + b·pixels across the fitted sides, with flagged points ringed."""
    if not fit:
        return
    lo, hi = min(r["x"] for r in fit["rows"]), max(r["x"] for r in fit["rows"])
    xs = [lo * (hi / lo) ** (i / 60) for i in range(61)]
    ax.plot([x ** 0.5 for x in xs], [predict(fit, x) / scale for x in xs], "--", color=color, lw=1, alpha=0.8,
            label=label)
    flagged = [r for r in fit["rows"] if r["flagged"]]
    if flagged:
        ax.plot([r["x"] ** 0.5 for r in flagged], [r["y"] / scale for r in flagged], "s", mfc="none", ms=11,
                color="black", label=f"more than {fit['flag_rel']:.0%} off the fit")


def draw_fig2(net: dict, path, machine: str) -> None:
    """Peak memory and step time vs tile size at a fixed input; conventional as reference lines."""
    cfg, pts = net["points_config"], Points(net["points"])
    size = cfg["fig2_input"]
    stream = [p for p in (pts.get("streaming", size, t) for t in cfg["fig2_tiles"]) if p]
    conv, default = pts.get("conventional", size), pts.get("conventional_default", size)
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 7), layout="constrained")
    _series(ax_m, stream, "peak_bytes", "tile", STREAM, "streaming, measured", MIB, timed=False)
    _fixed_mmap_series(ax_m, stream, "tile")
    _plan_series(ax_m, stream, "streaming", "tile", PLAN, "streaming, plan() estimate")
    _hline(ax_m, conv["peak_bytes"] / MIB if ok(conv) else None, CONV, "-", "conventional (tiles' layout), measured")
    conv_est = plan_estimate(conv, "conventional")
    _hline(ax_m, conv_est / MIB if conv_est else None, CONV, ":", "conventional, plan() estimate")
    _hline(ax_m, default["peak_bytes"] / MIB if ok(default) else None, DEFAULT, "-.",
           "conventional, default layout (not like for like)")
    _log_y(ax_m)
    ax_m.set_ylabel("peak memory of one step above the input (MiB, log)")
    ax_m.set_title(f"Memory vs tile size, input {size}×{size}")
    outlying = _series(ax_t, stream, "step_s", "tile", STREAM, "streaming (median, whisker: its steps)",
                       errors=True)
    _series(ax_t, stream, "backward_s", "tile", STREAM, "streaming, backward part", line="--", marker="s")
    _hline(ax_t, conv["step_s"] if ok(conv) else None, CONV, "-", "conventional (tiles' layout)")
    _hline(ax_t, default["step_s"] if ok(default) else None, DEFAULT, "-.", "conventional, default layout")
    ax_t.set_ylim(bottom=0)
    ax_t.set_ylabel("time per training step (s)")
    ax_t.set_title("Time vs tile size")
    for ax in (ax_m, ax_t):
        _side_axis(ax, list(cfg["fig2_tiles"]), "tile size (pixels per side)")
    _outlying_steps(ax_t, outlying, STREAM)
    _legends_below(ax_m, ax_t)
    _finish(fig, path, net["title"], machine)


def draw_fig3(net: dict, path, machine: str, mem_total_bytes: int = 0) -> None:
    """Step time and peak memory vs input size at a fixed tile, with the straight-line fits in pixels."""
    cfg, pts, res = net["points_config"], Points(net["points"]), net["analysis"]
    stream = [p for p in (pts.get("streaming", s, cfg["fig3_tile"]) for s in cfg["fig3_sizes"]) if p]
    conv = [p for p in (pts.get("conventional", s) for s in cfg["conventional_sizes"]) if p]
    sides = sorted({p["size"] for p in stream} | {p["size"] for p in conv})
    fits = res["fig3_fits"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 7.5), layout="constrained")
    outlying = _series(ax_t, stream, "step_s", "size", STREAM,
                       f"streaming (tile {cfg['fig3_tile']}), median, whisker: its steps", errors=True)
    _fit_line(ax_t, fits["time"], 1.0, STREAM, _fit_label(fits["time"], "µs/px", 1e6, "s"))
    _series(ax_t, conv, "step_s", "size", CONV, "conventional (tiles' layout)")
    _series(ax_m, stream, "peak_bytes", "size", STREAM, "streaming, measured", MIB, timed=False)
    _fixed_mmap_series(ax_m, stream, "size")
    _fit_line(ax_m, fits["memory"], MIB, STREAM, _fit_label(fits["memory"], "B/px", 1, "MiB", MIB))
    _plan_series(ax_m, stream, "streaming", "size", PLAN, "streaming, plan() estimate")
    _series(ax_m, conv, "peak_bytes", "size", CONV, "conventional, measured", MIB, timed=False)
    _plan_series(ax_m, stream, "conventional", "size", CONV, "conventional, plan() estimate")
    _draw_extrapolated(ax_t, ax_m, conv, res["conventional_extrapolated"])
    if mem_total_bytes:
        _hline(ax_m, mem_total_bytes / MIB, "0.5", "-.", "this machine's RAM")
    ax_t.set_ylabel("time per training step (s, log)")
    ax_t.set_title("Time vs input size")
    ax_m.set_ylabel("peak memory of one step above the input (MiB, log)")
    ax_m.set_title("Memory vs input size")
    for ax in (ax_t, ax_m):
        _log_y(ax)
        _side_axis(ax, sides, "input size (pixels per side)", preferred=[p["size"] for p in stream])
    _outlying_steps(ax_t, outlying, STREAM)
    _legends_below(ax_t, ax_m)
    _finish(fig, path, net["title"], machine)


def _fit_label(fit, unit, b_scale, a_unit, a_scale=1.0):
    if not fit:
        return None
    return (f"fit a + b·pixels: b = {fit['b'] * b_scale:.3g} {unit}, a = {fit['a'] / a_scale:.3g} {a_unit}, "
            f"R² = {fit['r2']:.4f}")


def _draw_extrapolated(ax_t, ax_m, conv, estimates: list) -> None:
    """Dashed hollow points from the last measured conventional point through the fit's extrapolations."""
    last = sorted(measured(conv), key=lambda p: p["size"])[-1:]
    for ax, key, est_key, scale in ((ax_t, "step_s", "time", 1.0), (ax_m, "peak_bytes", "memory", MIB)):
        est = [e for e in estimates if e.get(est_key) is not None]
        if est and last:
            xs = [last[0]["size"]] + [e["size"] for e in est]
            ys = [last[0][key] / scale] + [e[est_key] / scale for e in est]
            ax.plot(xs, ys, "o--", color=CONV, mfc="none", label="conventional, extrapolated (fit in pixels)")


def _legends_below(*axes):
    """Each panel's legend under its axis: it covers none of the data."""
    for ax in axes:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)


def _finish(fig, path, title, machine):
    """Title with the network and machine, then save and release the figure (laid out by
    matplotlib's constrained layout, which makes room for the legends below the panels)."""
    fig.suptitle(f"{title}: forward + backward — {machine}", fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)
