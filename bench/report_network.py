"""One network's section of BENCH.md: headline step, targets, Fig. 2, Fig. 3 with its fits, gradient check."""
from bench.analysis import Points, ok, plan_estimate
from bench.fmt import DISTURBED, fmt_bytes, fmt_pct, fmt_s, fmt_x, mark, step_cell, table

LIKE = "conventional backprop with its input in the layout Streaming gives its tiles (like for like)"


def render_network(name: str, net: dict, machine: dict) -> str:
    parts = [f"## {net['title']} (`{name}`)", _headline(net, machine), _paper(net), _targets(net), _fig2(net),
             _breakdown(net),
             _overhead(net, machine), _fig3(net), _fits(net), _grads(net)]
    return "\n\n".join(p for p in parts if p)


def _headline(net, machine) -> str:
    pts, res = Points(net["points"]), net["analysis"]
    size, tile = res["headline"]["size"], res["headline"]["tile"]
    s, conv = pts.get("streaming", size, tile), pts.get("conventional", size)
    head = f"### Headline: one training step at {size}×{size} ({size * size / 1e6:.3g} megapixels)"
    if not ok(s):
        return f"{head}\n\nNot measured on this run: {(s or {}).get('reason', 'not run')}."
    inp, ext, fits = s["input_bytes"], res["headline"]["extrapolated"], res["conventional_fits"]
    if ok(conv):
        conv_head, c_time, c_mem = "conventional, measured", conv["step_s"], conv["peak_bytes"]
    else:
        sizes = ", ".join(f"{x}²" for x in fits["sizes"]) or "none"
        conv_head = f"conventional, extrapolated (line in pixels over {sizes})"
        c_time, c_mem = ext["time"], ext["memory"]
    plan_s, plan_c = plan_estimate(s, "streaming"), plan_estimate(s, "conventional")
    plus = lambda v: None if v is None else v + inp  # noqa: E731
    rows = [
        ["time per step", step_cell(s), fmt_s(c_time), "–", "–"],
        ["peak memory above the input", fmt_bytes(s["peak_bytes"]), fmt_bytes(c_mem),
         fmt_bytes(plan_s), fmt_bytes(plan_c)],
        ["peak memory including the input", fmt_bytes(s["peak_bytes"] + inp), fmt_bytes(plus(c_mem)),
         fmt_bytes(plus(plan_s)), fmt_bytes(plus(plan_c))],
        ["input", fmt_bytes(inp), fmt_bytes(inp), fmt_bytes(inp), fmt_bytes(inp)],
    ]
    text = (f"{head}\n\nWith streaming (tile {tile}) one step took **{fmt_s(s['step_s'])}** and needed "
            f"**{fmt_bytes(s['peak_bytes'])}** above the {fmt_bytes(inp)} input."
            f"{_verdict(plus(c_mem), 'measured' if ok(conv) else 'by the fitted line', plus(plan_c), machine)}"
            f"{_speed(s, conv, c_time)} Each column has one source: measured, a fitted line, or plan(). "
            f"The input does not require a gradient (as in the paper).")
    return text + "\n\n" + table(["", "streaming, measured", conv_head, "plan(), streaming", "plan(), conventional"],
                                 rows)


def _paper(net) -> str:
    """The paper's own claim for this setting, beside plan() and the measurement (one source each)."""
    if not net.get("paper"):
        return ""
    pts, res = Points(net["points"]), net["analysis"]
    size, tile = res["headline"]["size"], res["headline"]["tile"]
    s = pts.get("streaming", size, tile)
    if not ok(s) or not s.get("plan", {}).get("conventional_peak_bytes"):
        return net["paper"]
    p = s["plan"]
    return (f"{net['paper']} For the same input and tile, plan() estimates that conventional backprop through "
            f"the streamed part needs **{fmt_bytes(p['conventional_peak_bytes'])}** (float32, one image, tensors "
            f"autograd keeps; the layers after it, the optimiser and library workspaces not counted) and streaming "
            f"{fmt_bytes(p['streaming_peak_bytes'])}; measured here, streaming needed "
            f"**{fmt_bytes(s['peak_bytes'])}** above the input and took {fmt_s(s['step_s'])} per step.")


def _verdict(c_total, how: str, plan_total, machine) -> str:
    """Whether conventional backprop fits this machine's RAM, by plan() (and by measurement or the fitted line)."""
    ram = machine.get("mem_total_bytes")
    if not ram or plan_total is None:
        return ""
    fits = "more than" if plan_total > ram else "within"
    also = f" ({fmt_bytes(c_total)} {how})" if c_total is not None else ""
    return (f" Conventional backprop would need **{fmt_bytes(plan_total)}** including the input by plan()'s "
            f"estimate{also}: {fits} this machine's {fmt_bytes(ram)} of RAM.")


def _speed(s, conv, c_time) -> str:
    if not c_time:
        return " Conventional time: not extrapolated (fewer than 3 undisturbed measured inputs)."
    how = "measured" if ok(conv) else "extrapolated"
    dirty = (f" ({DISTURBED} measured while other work competed for the cores: not a clean comparison)"
             if mark(s) or mark(conv if ok(conv) else None) else "")
    return f" Streaming took {s['step_s'] / c_time:.2f}× the {how} time of {LIKE}{dirty}."


def _targets(net) -> str:
    cfg, res = net["points_config"], net["analysis"]
    verdict = {True: "**met**", False: "**not met**", None: "not evaluated"}
    rows = [[t["target"], t.get("tile") or "–", t["detail"], verdict[t["met"]]] for t in res["targets"]]
    size = cfg["fig2_input"]
    return (f"### Targets at {size}×{size}\n\nAgainst {LIKE}. \"Best tile\" is the tile with the lowest peak "
            f"memory for the memory targets and the fastest step for the time target, among tiles smaller than the "
            f"image (a single tile is plain backprop); the last row asks whether one tile does both.\n\n"
            + table(["target", "tile", "measured", "result"], rows))


def _cells(p):
    """step, forward, backward, CPU/(wall×threads), other work, peak, peak with mmap threshold fixed, plan,
    ratio for one point."""
    if not ok(p):
        return [(p or {}).get("status", "–")] + ["–"] * 8
    est = plan_estimate(p, "streaming" if p["mode"] == "streaming" else "conventional")
    return [step_cell(p), fmt_s(p["forward_s"]), fmt_s(p["backward_s"]),
            "–" if p.get("cpu_util") is None else f"{p['cpu_util']:.2f}",
            f"{_cores((p.get('before') or {}).get('foreign_cores'))} / {_cores(p.get('foreign_cores'))}",
            fmt_bytes(p["peak_bytes"]), fmt_bytes(p.get("fixed_mmap_peak_bytes")),
            fmt_bytes(est), fmt_x(p["peak_bytes"] / est if est else None)]


def _cores(v) -> str:
    return "–" if v is None else f"{v:.2f}"


POINT_HEADER = ["step: median (min–max)", "forward", "backward", "CPU / (wall × threads)",
                "other work before / during (cores)",
                "peak memory", "peak, mmap threshold fixed", "plan()", "measured / plan"]


def _table_without_empty_probe(header: list, rows: list) -> str:
    """The table, less its memory-probe column where the network has no probe (every cell '–')."""
    i = next((i for i, h in enumerate(header) if "mmap threshold fixed" in h), None)
    if i is not None and all(r[i] == "–" for r in rows):
        header, rows = header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in rows]
    return table(header, rows)


def _fig2(net) -> str:
    cfg, pts = net["points_config"], Points(net["points"])
    size = cfg["fig2_input"]
    rows = []
    for t in cfg["fig2_tiles"]:
        p = pts.get("streaming", size, t)
        tiles = ((p or {}).get("plan") or {}).get("tiles_per_axis")
        rows.append([t, "×".join(map(str, tiles)) if tiles else "–"] + _cells(p))
    rows.append(["conventional, tiles' layout", "–"] + _cells(pts.get("conventional", size)))
    default = pts.get("conventional_default", size)
    if default:
        rows.append(["conventional, default layout (not like for like)", "–"] + _cells(default))
    png = net["figures"]["fig2"]
    return (f"### Fig. 2: memory and time vs tile size (input {size}×{size})\n\n![Fig. 2]({png})\n\n"
            + _table_without_empty_probe(["tile", "tiles"] + POINT_HEADER, rows))


def _breakdown(net) -> str:
    rows = net["analysis"]["breakdown"]
    if not rows or "model_s" not in rows[0]:
        return ""
    body = [[r["tile"], fmt_x(r["overlap_factor"], 3), fmt_s(r["extra_s"]), fmt_s(r["recompute_s"]),
             fmt_s(r["overlap_s"]), fmt_s(r["other_s"]), fmt_s(r["model_s"])] for r in rows]
    return ("#### Where the time goes\n\nStreaming first runs the forward pass tile by tile without keeping "
            "activations, then, per tile, recomputes that tile's forward (gradient checkpointing) and backpropagates "
            "it. With conventional forward time F and backward time B (tiles' layout, measured above) and an overlap "
            "factor r (pixels the tiles cover, overlap counted each time, over image pixels, from plan()), the work "
            "model is r·(2F + B) against F + B: *recompute* = r·F, *overlap* = (r−1)·(F+B), and *other* = measured − "
            "model (per-tile overhead and cache effects; negative means tiles run faster than the whole image)."
            + _overlap_example(net) + "\n\n"
            + table(["tile", "overlap factor r", "extra vs conventional", "recompute", "overlap", "other", "model time"],
                    body))


def _overlap_example(net) -> str:
    """Why r can be large: the tile starts of the Fig. 2 point with the largest overlap factor."""
    factors = {r["tile"]: r["overlap_factor"] or 0 for r in net["analysis"]["breakdown"]}
    pts = [p for p in Points(net["points"]).records if ok(p) and p["tile"] in factors
           and p["size"] == net["points_config"]["fig2_input"] and p.get("variant", "default") == "default"
           and (p.get("plan") or {}).get("tile_starts")]
    if not pts:
        return ""
    p = max(pts, key=lambda q: factors[q["tile"]])
    return (f" r counts every pixel a tile computes, the overlap with its neighbours included: with tile {p['tile']} "
            f"on {p['size']} pixels the tiles start at {', '.join(map(str, p['plan']['tile_starts'][0]))} (the last "
            f"one shorter, ending at the image edge), so each tile recomputes the overlap it shares with the one "
            f"before it (r = {factors[p['tile']]:.2f}). Larger tiles share the same overlap among fewer tiles and "
            f"keep r near 1.")


def _overhead(net, machine) -> str:
    rows = []
    for r in net["analysis"]["overhead"]:
        d, heap, passive, one = (r.get(k) or {} for k in ("default", "heap_malloc", "omp_passive", "one_thread"))
        rows.append([r["mode"], r["tile"] or "–", step_cell(d), step_cell(heap), step_cell(passive), step_cell(one),
                     _faults(d), _faults(heap), fmt_bytes(d.get("peak_bytes")), fmt_bytes(heap.get("peak_bytes"))])
    if not rows:
        return ""
    size, threads = net["points_config"]["fig2_input"], machine["torch_threads"]
    return ("#### Per-tile overhead: allocator and threads\n\nTwo costs a tile-by-tile step can pay more often than "
            "a whole-image step. (a) The allocator: with glibc's defaults, every buffer above the mmap threshold "
            "(adaptive, at most 32 MiB) is mapped when torch allocates it and unmapped when torch frees it, so each "
            "tile's large activations arrive as fresh zero-filled pages (the page-fault counts). (b) Threads: each "
            "convolution is a parallel region whose threads meet at a barrier; OpenMP threads spin there by default, "
            "which costs little on free cores but, when other programs share the cores, can hold the core a partner "
            f"thread needs. The same {size}² points were measured again in fresh processes with "
            "`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736` (every buffer from the heap, freed memory kept "
            "for the next tile), with `OMP_WAIT_POLICY=PASSIVE` (threads sleep at barriers) and with one torch "
            "thread. All three are process-wide opt-ins a user may `export` before starting Python; the benchmark "
            "never sets them for the other figures. Before every timed step the harness returns free heap memory "
            "to the system (`malloc_trim`, for a tight memory baseline), so each step starts from the same state.\n\n"
            + table(["mode", "tile", f"step, defaults ({threads} threads)", "step, malloc without mmap",
                     "step, passive OpenMP wait", "step, 1 thread", "page faults, defaults",
                     "page faults, without mmap", "peak, defaults", "peak, without mmap"], rows))


def _faults(p) -> str:
    n = (p or {}).get("page_faults")
    return "–" if n is None else f"{n / 1e3:.0f} k"


def _fig3(net) -> str:
    cfg, pts, res = net["points_config"], Points(net["points"]), net["analysis"]
    tile = cfg["fig3_tile"]
    fit_rows = {r["x"]: r for r in ((res["fig3_fits"].get("time") or {}).get("rows") or [])}
    est = {e["size"]: e for e in res["conventional_extrapolated"]}
    rows = []
    for size in sorted(set(cfg["fig3_sizes"]) | set(cfg["conventional_sizes"])):
        p, c = pts.get("streaming", size, tile), pts.get("conventional", size)
        f = fit_rows.get(size * size)
        e = est.get(size) or {}
        c_time = (step_cell(c) if ok(c) else f"~{fmt_s(e['time'])} (fit)" if e.get("time")
                  else (c or {}).get("status", "–"))
        c_mem = fmt_bytes(c["peak_bytes"]) if ok(c) else (f"~{fmt_bytes(e['memory'])} (fit)" if e.get("memory") else "–")
        rows.append([f"{size}²", f"{size * size / 1e6:.3g}", step_cell(p) if p else "–",
                     fmt_s(f["fit"]) if f else "–", _off(f),
                     fmt_bytes(p["peak_bytes"]) if ok(p) else "–",
                     fmt_bytes(p.get("fixed_mmap_peak_bytes")) if ok(p) else "–", fmt_bytes(plan_estimate(p, "streaming")),
                     c_time, c_mem, fmt_bytes(plan_estimate(p or c, "conventional"))])
    return (f"### Fig. 3: time and memory vs input size (tile {tile})\n\n![Fig. 3]({net['figures']['fig3']})\n\n"
            "Conventional backprop (tiles' layout) is measured while it fits in memory; where it does not, its numbers "
            "come from a straight line in pixels fitted to its undisturbed measured points (\"fit\"; dashed in the "
            "figure), never from one point, and only with at least three.\n\n"
            + _table_without_empty_probe(
                ["input", "MP", "streaming step", "line", "off the line", "streaming peak",
                 "streaming peak, mmap threshold fixed", "plan() streaming", "conventional step", "conventional peak",
                 "plan() conventional"], rows))


def _off(row) -> str:
    """A point's deviation from the fitted line, flagged beyond the limit, noted when not fitted."""
    if not row:
        return "–"
    return (fmt_pct(row["rel"]) + (" **flagged**" if row["flagged"] else "")
            + ("" if row["used"] else " (disturbed, not fitted)"))


def _fit_sentence(fit, what, b_text, a_text) -> str:
    if not fit:
        return f"- **{what}**: fewer than 3 usable points, no fit."
    flagged = [r for r in fit["rows"] if r["flagged"]]
    flags = ("no point is more than {:.0%} off the line".format(fit["flag_rel"]) if not flagged else
             "**flagged** (more than {:.0%} off): ".format(fit["flag_rel"])
             + ", ".join(f"{r['size']}² ({fmt_pct(r['rel'])})" for r in flagged))
    return (f"- **{what}** = a + b·pixels: b = {b_text(fit['b'])}, a = {a_text(fit['a'])}, R² = {fit['r2']:.4f} "
            f"over {fit['n']} inputs; {flags}.")


def _computed_sentence(f3: dict, us) -> str:
    """The time line against the pixels the tiles compute, where overlap makes that differ from the input's."""
    factors = {int(k): v for k, v in (f3.get("overlap_factors") or {}).items() if v}
    if not f3.get("time_computed") or not factors or max(factors.values()) < 1.05:
        return ""  # overlap repeats under 5 % of the work: the line in input pixels says it all
    spread = ", ".join(f"{k}² {v:.2f}×" for k, v in sorted(factors.items()))
    return _fit_sentence(f3["time_computed"], "streamed step time against the pixels the tiles compute "
                         f"(overlapping tiles repeat work: plan()'s coverage {spread})", us, fmt_s)


def _single_tile_sentence(sizes, tile) -> str:
    """Why the memory lines leave out the inputs one tile covers."""
    if not sizes:
        return ""
    names = ", ".join(f"{s}²" for s in sorted(sizes))
    return (f"- **Memory lines use only the inputs several tiles cover.** At {names} one {tile}-pixel tile covers the "
            "whole image, so the step is plain backprop of that image and its memory is set by the image, not by the "
            "tile; the line's model (a = the tile's working set, b = the buffers as large as the image) does not "
            "apply there. measured / plan() below still checks every input.")


def _fixed_ratios(ratios: list) -> str:
    """The same ratios for the memory probe (glibc's mmap threshold fixed), where inputs have one."""
    fixed = [r for r in ratios if r.get("fixed_ratio") is not None]
    return ("; with glibc's mmap threshold fixed (the memory probe, what plan() models): "
            + ", ".join(f"{r['size']}² {r['fixed_ratio']:.2f}" for r in fixed)) if fixed else ""


def _fits(net) -> str:
    res = net["analysis"]
    f3, conv = res["fig3_fits"], res["conventional_fits"]
    us = lambda b: f"{b * 1e6:.4g} µs per pixel"  # noqa: E731
    bpp = lambda b: f"{b:.4g} bytes per pixel"  # noqa: E731
    ratios = f3.get("plan_ratio") or []
    off = [r for r in ratios if r["flagged"]]
    plan_line = ("- **measured / plan()** per input: " + ", ".join(f"{r['size']}² {r['ratio']:.2f}" for r in ratios)
                 + ("; **off by more than 20 %**: " + ", ".join(f"{r['size']}²" for r in off) if off
                    else "; all within 20 %")
                 + _fixed_ratios(ratios) + ".") if ratios else ""
    bullets = [
        _fit_sentence(f3["time"], "streamed step time", us, fmt_s),
        _computed_sentence(f3, us),
        _single_tile_sentence(f3.get("single_tile"), net["points_config"]["fig3_tile"]),
        _fit_sentence(f3["memory"], "streamed peak memory", bpp, fmt_bytes),
        _fit_sentence(f3["plan_memory"], "plan()'s streamed peak", bpp, fmt_bytes),
        plan_line,
        _fit_sentence(conv["time"], "conventional step time (tiles' layout)", us, fmt_s),
        _fit_sentence(conv["memory"], "conventional peak memory (tiles' layout)", bpp, fmt_bytes),
    ]
    return (f"#### Linearity: straight lines in pixels (inputs from {f3['min_side']}² up)\n\n"
            "Weighted by 1/y², so each input's relative deviation counts equally; R² is the ordinary, unweighted one "
            "of that line. Time uses undisturbed points only; a point more than 20 % off its line is flagged.\n\n"
            + "\n".join(b for b in bullets if b))


def _grads(net) -> str:
    def cells(err):
        return ["–", "–"] if err is None else [f"{err['weights']:.1e}", f"{err['biases']:.1e}"]

    rows = [[f"{r['size']}²", r["tile"], *cells(r["streaming"]), *cells(r["conventional"]),
             f"{r['loss_streaming']:.9g}", f"{r['loss_float64']:.9g}"] for r in net.get("grad_agreement") or []]
    if not rows:
        return ""
    return ("### Sanity check: same gradients\n\nEvery float32 point saves its parameter gradients; they are compared "
            "with conventional backprop in float64 on the same image (relative error ‖g − g₆₄‖/‖g₆₄‖, worst tensor). "
            "Streaming should be as accurate as conventional float32, which has summation-order error too; biases, "
            "whose gradients are sums of millions of nearly cancelling terms, lose the most. The equivalence proofs "
            "are in `verify/`.\n\n"
            + table(["input", "tile", "streaming: weights", "streaming: biases", "conventional f32: weights",
                     "conventional f32: biases", "loss (streaming)", "loss (float64)"], rows))


def skipped_lines(net: dict) -> list:
    """'- mode size: status — reason' for every point that was not measured."""
    return [f"- {p['mode']} {p['size']}²" + (f", tile {p['tile']}" if p["tile"] else "")
            + ("" if p.get("variant", "default") == "default" else f" ({p['variant']})")
            + f": **{p['status']}** — {p['reason']}" for p in net["points"] if p["status"] != "measured"]
