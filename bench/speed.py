"""Speed without asking: one training step of the paper's Fig. 2 network at 2048×2048 with the
backward's shortcuts - tiles without gradient skipped (a max head), the forward's last tiles
keeping their graphs within a budget (0, half and all of conventional training's peak, as
``plan()`` estimates it) - beside conventional backprop in the tiles' memory layout.

Each point runs in a fresh process: one untimed warm-up step on the same image, then timed
steps until three are undisturbed (at most six; ``bench.protocol``). Measured: the median
step, the peak memory growth of the timed steps (``bench.memory.PeakMemory``), the tiles the
backward recomputed, reused and skipped.

    python -m bench.speed            # ~10 minutes on two quiet cores; reports/speed.json
    python -m bench.speed 1024       # a smaller image, for a quick look
    python -m bench.speed --only no-reuse   # only the points whose key contains "no-reuse"
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from bench import study
from bench.config import REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

SPEED_JSON = REPORTS / "speed.json"
NETWORK = "conv3"
TILES = (256, 512, 768, 1024)
HEADS = ("sum", "max")
BUDGETS = ("0", "half", "all")  # of conventional's peak (plan's estimate)
REPS, MAX_STEPS = 3, 6


def loss_of(y, head: str):
    """The head: a mean over the map (every tile gets gradient), or a global max-pool then a
    mean over channels (the TPAMI paper's heads end in a max-pool: a few tiles get gradient)."""
    return y.mean() if head == "sum" else y.amax((2, 3)).mean()


def worker(side: int, mode: str, tile: int, head: str, budget: str, threads: int, reuse: bool = True) -> dict:
    import torch

    from bench import networks, protocol
    from bench.memory import PeakMemory
    from bench.worker import arrange_input
    from streamcnn import Streaming, plan

    torch.set_num_threads(threads)
    net_spec = networks.get(NETWORK)
    net = net_spec.build(0)
    peak = plan(net, (1, 3, side, side), tile).conventional_peak_bytes if mode == "streaming" else 0
    keep = {"0": 0, "half": peak // 2, "all": peak}[budget]
    model = (Streaming(net, tile, progress=False, keep_graphs=keep, reuse_memory=reuse) if mode == "streaming"
             else net)
    x, layout = arrange_input(net_spec.make_input(side, 0, "cpu"), "conventional" if mode != "streaming"
                              else mode, net)

    def step():
        net.zero_grad(set_to_none=True)
        loss_of(model(x), head).backward()

    step()  # warm-up
    steps, thr = [], protocol.Thresholds()
    while protocol.need_more_steps(steps, REPS, MAX_STEPS):
        with PeakMemory("cpu") as peak:
            _, timing = study.timed(step, threads)
        steps.append({"step_s": timing["seconds"], "disturbed": timing["disturbance"],
                      "cpu_window": timing["cpu_window"], **peak.record()})
    quiet = protocol.quiet_steps(steps) or steps
    backward = model.last_stats.backward if mode == "streaming" else None
    return {"side": side, "mode": mode, "tile": tile, "head": head, "budget": budget, "keep_bytes": keep,
            "reuse_memory": reuse,
            "threads": threads, "layout": layout, "step_s": statistics.median(s["step_s"] for s in quiet),
            "peak_bytes": max(s["peak_growth_bytes"] for s in quiet), "steps": steps,
            "disturbance": "" if protocol.quiet_steps(steps) else steps[-1]["disturbed"],
            "cpu_window": quiet[-1]["cpu_window"],
            "tiles": backward.tiles if backward else None, "recomputed": backward.computed if backward else None,
            "reused": backward.reused if backward else None, "skipped": backward.skipped if backward else None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def key(r: dict) -> str:
    if r["mode"] != "streaming":
        return f"{r['side']}-{r['mode']}-{r['head']}"
    return f"{r['side']}-{r['mode']}-{r['tile']}-{r['head']}-{r['budget']}" + (
        "" if r.get("reuse_memory", True) else "-no-reuse")


def configurations(side: int):
    for head in HEADS:
        yield {"side": side, "mode": "conventional", "tile": 0, "head": head, "budget": "0"}
    for tile in TILES:
        for head in HEADS:
            for budget in BUDGETS:
                yield {"side": side, "mode": "streaming", "tile": tile, "head": head, "budget": budget}
    for head in HEADS:  # the defaults without the allocator setting (streamcnn.allocator)
        yield {"side": side, "mode": "streaming", "tile": 512, "head": head, "budget": "0", "reuse_memory": False}


def measure(c: dict, threads: int) -> dict:
    args = [c["side"], "--mode", c["mode"], "--tile", c["tile"], "--head", c["head"], "--budget", c["budget"],
            "--threads", threads] + ([] if c.get("reuse_memory", True) else ["--no-reuse-memory"])
    return study.in_fresh_process("bench.speed", args, 3600, c)


def _targets(stored: dict, side: int) -> list:
    """The issue's three targets against conventional's step with the same head."""
    def ratio(tile, head, budget):
        s, c = stored.get(f"{side}-streaming-{tile}-{head}-{budget}"), stored.get(f"{side}-conventional-{head}")
        ok = s and c and s.get("status") == c.get("status") == "measured"
        return s["step_s"] / c["step_s"] if ok else None
    rows = []
    for what, args, bound in (("default (tile 512, sum head, budget 0)", (512, "sum", "0"), 1.15),
                              ("max head (tile 512, budget 0)", (512, "max", "0"), 0.6),
                              ("half of conventional's peak as budget (tile 512, sum head)", (512, "sum", "half"),
                               1.05)):
        r = ratio(*args)
        rows.append([what, f"≤ {bound:.2f}×", "not measured" if r is None else f"{r:.2f}×",
                     "" if r is None else ("**met**" if r <= bound else "**not met**")])
    return rows


def render(stored: dict) -> str:
    head = ("## Speed: tiles without gradient skipped, graphs kept within a budget\n\n"
            "One training step of the paper's Fig. 2 network (three 3×3 convolutions, 3-64-3 channels) on a "
            "float32 image, conventional backprop in the tiles' memory layout beside streaming with "
            "`skip_zero_gradients` on (the default) and `keep_graphs` at 0 (the default), half and all of "
            "conventional training's peak as `plan()` estimates it (`bench/speed.py`; `python -m bench.speed` "
            "re-measures). Heads: *sum*, the mean of the map (every tile gets gradient); *max*, a global max-pool "
            "(a few tiles do). Step: the median of the undisturbed timed steps after a warm-up, each point in a "
            "fresh process; peak: the timed steps' resident-memory growth. Tiles: recomputed / reused (kept "
            "graphs) / skipped (zero gradient) in the backward. The rows with `reuse_memory=False` run tile 512 "
            "without the allocator setting that is on by default (`streamcnn.allocator`: glibc unmaps each "
            "tile's large buffers and maps them afresh for the next).")
    if not stored:
        return head + "\n\nNot measured yet."
    parts = [head]
    for side in sorted({r["side"] for r in stored.values()}):
        conv = {h: stored.get(f"{side}-conventional-{h}", {}) for h in HEADS}
        rows = []
        for h in HEADS:
            c = conv[h]
            if c.get("status") == "measured":
                rows.append([f"{side}²", "conventional", h, "", f"**{fmt_s(c['step_s'])}**", "1.00×",
                             f"**{fmt_bytes(c['peak_bytes'])}**", "", study.quiet(c)])
        variants = [(tile, h, budget, "") for tile in TILES for h in HEADS for budget in BUDGETS]
        variants += [(512, h, "0", "-no-reuse") for h in HEADS]
        for tile, h, budget, suffix in variants:
            r = stored.get(f"{side}-streaming-{tile}-{h}-{budget}{suffix}")
            if r is None:
                continue
            if r.get("status") != "measured":
                rows.append([f"{side}²", f"tile {tile}", h, budget, r.get("status", "?")])
                continue
            base = conv[h].get("step_s") if conv[h].get("status") == "measured" else None
            rows.append([f"{side}²", f"tile {tile}" + (", reuse_memory=False" if suffix else ""), h,
                         f"{budget} ({fmt_bytes(r['keep_bytes'])})",
                         f"**{fmt_s(r['step_s'])}**", f"{r['step_s'] / base:.2f}×" if base else "",
                         f"**{fmt_bytes(r['peak_bytes'])}**",
                         f"{r['recomputed']} / {r['reused']} / {r['skipped']}", study.quiet(r)])
        header = ["image", "run", "head", "budget", "one step", "vs conventional", "peak", "tiles", "other work"]
        parts.append(table(header, rows))
        parts.append(table(["target", "bound", "measured", ""], _targets(stored, side)))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = study.parser("bench.speed", __doc__, [2048])
    for name, choices in (("--mode", ("streaming", "conventional")), ("--head", HEADS), ("--budget", BUDGETS)):
        ap.add_argument(name, choices=choices, help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-reuse-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="measure only the points whose key contains this text")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.tile, args.head, args.budget, args.threads,
                                not args.no_reuse_memory)))
        return 0
    path = SPEED_JSON if args.sides == [2048] else REPORTS / "_raw" / "speed.json"  # (others: a look)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for side in args.sides:
        for c in (c for c in configurations(side) if args.only in key(c)):
            print(f"{key(c)} ...", flush=True)
            records.append(measure(c, args.threads))
            study.merge(path, records[-1:], key)  # (an interrupted run keeps what it measured)
    return study.finish(path, records, key, lambda r: f"{fmt_s(r['step_s'])}, peak {fmt_bytes(r['peak_bytes'])}")


if __name__ == "__main__":
    raise SystemExit(main())
