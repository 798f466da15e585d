"""Figs. 2 and 3 of the paper, redrawn from the measured points."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from bench.analysis import measured, plan_estimate  # noqa: E402

MIB = 2**20
STREAM, CONV, PLAN = "tab:blue", "tab:red", "0.35"


def _side_axis(ax, sides, label):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sides)
    ax.set_xticklabels([str(s) for s in sides], rotation=0)
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def _xy(points, key, scale=1.0, x="tile"):
    pts = [p for p in measured(points) if p.get(key) is not None]
    return [p[x] for p in pts], [p[key] / scale for p in pts]


def _plan_xy(points, which, x):
    pts = [p for p in points if plan_estimate(p, which)]
    return [p[x] for p in pts], [plan_estimate(p, which) / MIB for p in pts]


def _log_y(ax):
    """Log y axis with plain-number labels at 1, 2, 5 × powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _annotate_last(ax, points, key, scale, text, below=True):
    pts = measured(points)
    if pts:
        p = max(pts, key=lambda q: q["size"])
        ax.annotate(text(p), (p["size"], p[key] / scale), textcoords="offset points", xytext=(-8, -6 if below else 8),
                    va="top" if below else "bottom", bbox={"fc": "white", "ec": "none", "alpha": 0.8},
                    ha="right", fontsize=8, color=STREAM)


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min"


def _mem(n: float) -> str:
    return f"{n / MIB:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _hline(ax, value, color, style, label):
    if value is not None:
        ax.axhline(value, color=color, linestyle=style, label=label)


def draw_fig2(result: dict, path, machine: str) -> None:
    """Peak memory and step time vs tile size at a fixed input, conventional as reference lines."""
    stream, conv, size = result["streaming"], result["conventional"], result["input"]
    tiles = [p["tile"] for p in stream]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.3))
    ax_m.plot(*_xy(stream, "peak_bytes", MIB), "o-", color=STREAM, label="streaming, measured")
    ax_m.plot(*_plan_xy(stream, "streaming", "tile"), "x:", color=PLAN, label="streaming, plan() estimate")
    conv_ok = conv.get("status") == "measured"
    _hline(ax_m, conv["peak_bytes"] / MIB if conv_ok else None, CONV, "-", "conventional, measured")
    conv_est = plan_estimate(conv, "conventional")
    _hline(ax_m, conv_est / MIB if conv_est else None, CONV, ":", "conventional, plan() estimate")
    _log_y(ax_m)
    ax_m.set_ylabel("peak memory of one step above the input (MiB, log)")
    ax_m.set_title(f"Memory vs tile size, input {size}×{size}")
    ts = measured(stream)
    ax_t.errorbar([p["tile"] for p in ts], [p["step_s"] for p in ts],
                  yerr=[[p["step_s"] - min(p["step_s_all"]) for p in ts], [max(p["step_s_all"]) - p["step_s"] for p in ts]],
                  fmt="o-", color=STREAM, capsize=3, label="streaming (median, min–max)")
    ax_t.plot(*_xy(stream, "backward_s"), "s--", color=STREAM, alpha=0.5, ms=4, label="streaming, backward part")
    _hline(ax_t, conv["step_s"] if conv_ok else None, CONV, "-", "conventional")
    ax_t.set_ylim(bottom=0)
    ax_t.set_ylabel("time per training step (s)")
    ax_t.set_title("Time vs tile size")
    for ax in (ax_m, ax_t):
        _side_axis(ax, tiles, "tile size (pixels per side)")
        ax.legend(fontsize=8, loc="best")
    _finish(fig, path, machine)


def draw_fig3(result: dict, path, machine: str, mem_total_bytes: int = 0) -> None:
    """Step time and peak memory vs input size at a fixed tile; conventional extrapolated where it does not fit."""
    stream, conv, est = result["streaming"], result["conventional"], result["conventional_estimated"]
    sizes = sorted({p["size"] for p in stream} | {p["size"] for p in conv})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.3))
    ax_t.plot(*_xy(stream, "step_s", x="size"), "o-", color=STREAM, label=f"streaming (tile {result['tile']})")
    ax_t.plot(*_xy(conv, "step_s", x="size"), "o-", color=CONV, label="conventional, measured")
    ax_m.plot(*_xy(stream, "peak_bytes", MIB, x="size"), "o-", color=STREAM, label="streaming, measured")
    ax_m.plot(*_plan_xy(stream, "streaming", "size"), "x:", color=STREAM, alpha=0.6,
              label="streaming, plan() estimate")
    ax_m.plot(*_xy(conv, "peak_bytes", MIB, x="size"), "o-", color=CONV, label="conventional, measured")
    ax_m.plot(*_plan_xy(stream, "conventional", "size"), "x:", color=CONV, alpha=0.6,
              label="conventional, plan() estimate")
    _draw_estimated(ax_t, conv, est, "step_s", 1.0)
    _draw_estimated(ax_m, conv, est, "peak_bytes", MIB)
    if mem_total_bytes:
        _hline(ax_m, mem_total_bytes / MIB, "0.5", "-.", "this machine's RAM")
    ax_t.set_ylabel("time per training step (s, log)")
    ax_t.set_title("Time vs input size")
    ax_m.set_ylabel("peak memory of one step above the input (MiB, log)")
    ax_m.set_title("Memory vs input size")
    _annotate_last(ax_t, stream, "step_s", 1.0, lambda p: f"{p['size']}²: {_seconds(p['step_s'])} per step")
    _annotate_last(ax_m, stream, "peak_bytes", MIB, lambda p: f"{p['size']}²: {_mem(p['peak_bytes'])}", below=False)
    for ax in (ax_t, ax_m):
        _log_y(ax)
        _side_axis(ax, sizes, "input size (pixels per side)")
        ax.legend(fontsize=8, loc="best")
    _finish(fig, path, machine)


def _draw_estimated(ax, conv, estimates: list, key: str, scale: float) -> None:
    """Dashed line from the last measured conventional point through the extrapolated ones."""
    if not estimates:
        return
    last = measured(conv)[-1:]
    pts = sorted(estimates, key=lambda e: e["size"])
    xs = [p["size"] for p in last] + [e["size"] for e in pts]
    ys = [p[key] / scale for p in last] + [e[key] / scale for e in pts]
    ax.plot(xs, ys, "o--", color=CONV, mfc="none", label="conventional, estimated (extrapolated)")


def _finish(fig, path, machine):
    """Title with the network and machine, then save and release the figure."""
    fig.suptitle(f"Three 3×3 convolutions (3→3→64→3 channels), forward + backward — {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
