"""Number formatting and Markdown tables for BENCH.md and the printed comparison."""
MIB, GIB = 2**20, 2**30
DISTURBED = "⚠"  # marks a number measured while other work competed for the cores


def fmt_bytes(n) -> str:
    """'512 MiB' / '3.00 GiB' / '–'."""
    if n is None:
        return "–"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{abs(n) / MIB:.0f} MiB" if abs(n) < MIB / 2 else f"{n / MIB:.0f} MiB"  # no "-0 MiB"


def fmt_s(t) -> str:
    if t is None:
        return "–"
    return f"{t:.2f} s" if abs(t) < 100 else f"{t:.0f} s ({t / 60:.1f} min)"


def fmt_dur(t) -> str:
    """A budget or a wait: '45 s' / '10 min'."""
    return f"{t:.0f} s" if t < 120 else f"{t / 60:.0f} min"


def fmt_ms(t) -> str:
    return "–" if t is None else f"{t * 1e3:.3g} ms"


def fmt_x(v, digits=2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def fmt_pct(v) -> str:
    return "–" if v is None else f"{v:+.1%}"


def table(header, rows) -> str:
    """A Markdown table; a short row (a failed record's) is padded with empty cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in [*row, *[""] * (len(header) - len(row))]) + " |" for row in rows]
    return "\n".join(lines)


def mark(point) -> str:
    """' ⚠' after a number from a disturbed point, '' otherwise."""
    return f" {DISTURBED}" if point and not point.get("clean", True) else ""


def step_cell(point) -> str:
    """Median step time with its min–max over the steps it came from, and the disturbance mark."""
    if not point or point.get("status") != "measured":
        return (point or {}).get("status", "–")
    times = point.get("step_s_all") or [point["step_s"]]
    rng = (f" ({min(times):.2f}–{max(times):.2f})" if len(times) > 1 and point["step_s"] < 100 else
           " (1 step)" if len(times) == 1 else "")
    return fmt_s(point["step_s"]) + rng + mark(point)


def point_label(p) -> str:
    tile = f" tile {p['tile']}" if p.get("tile") else ""
    variant = "" if p.get("variant", "default") == "default" else f" ({p['variant']})"
    return f"{p['mode']} {p['size']}²{tile}{variant}"
