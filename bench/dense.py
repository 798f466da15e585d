"""A U-Net's training step with a per-pixel loss, streamed by pixel_loss, beside conventional training.

Issue #32: ``Streaming.pixel_loss`` (each tile runs its forward and, at once, its backward: no
recomputation, no stitched output) beside conventional training (``loss_fn(net(x),
target).mean().backward()``) and ``Streaming`` with the loss on the stitched output
(``loss_fn(Streaming(net, tile)(x), target).mean().backward()``: a forward, then the backward
recomputes each tile).

The network is ``bench.models.unet``: four levels (16-32-64-128 channels), 3x3 convolutions with
padding, 2x2 max-pool down, 2x2 stride-2 transposed convolutions up, skips concatenated, a 1x1 head
to 2 classes, no BatchNorm. The loss: per-pixel cross-entropy (``reduction="none"``, then the mean)
against a seeded int64 label map; the image is seeded standard-normal float32.

Each point runs in a fresh process: an untimed warm-up step (on the image, or for streamed points
above 2048² on a 2×2-tile image), then timed steps until enough are undisturbed (``bench.protocol``;
``STEPS`` says how many per image side). Measured: the median step, the peak memory growth of the
timed steps (``bench.memory.PeakMemory``), the loss, and from ``plan()`` the tiles and the overlap
factor r (pixels the tiles compute at the input over the image's). A conventional point that
``bench.guard`` says would not fit in memory is recorded as skipped, with the reason.

    python -m bench.dense            # ~20-25 minutes on two quiet cores; reports/dense.json, BENCH.md
    python -m bench.dense 2048       # one image side (~5 minutes); reports/_raw/dense.json
    python -m bench.dense --only pixel_loss   # only the points whose key contains this text
    python -m bench.dense --quick    # a 160² smoke run, under a minute; reports/_raw/quick/dense.json

The durations are estimates from a 1024² run (STEPS); 8192²'s two points take about ten minutes of it.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

from bench import study
from bench.config import FULL, REPORTS
from bench.fmt import fmt_bytes, fmt_s, fmt_x, table

DENSE_JSON = REPORTS / "dense.json"
QUICK_JSON = REPORTS / "_raw" / "quick" / "dense.json"
MODES = ("conventional", "pixel_loss", "stitched")
#: image side -> (tile of every streamed mode, a second tile for pixel_loss or None). plan() at 2048²:
#: conventional 3.6 GiB; tile 512 covers 1.41× the pixels with 0.23 GiB per tile, tile 768 1.20× with 0.51 GiB
TILES = {2048: (512, 768), 4096: (1024, None), 8192: (1024, None), 160: (128, 160)}
QUICK_SIDES = [160]
#: image side -> (undisturbed timed steps wanted, most timed steps): the protocol's 3 of at most 5 where a step
#: takes seconds, fewer where it takes minutes (estimated from a 1024² run on two cores, in seconds per step:
#: 2048² conventional ~8, pixel_loss ~15, stitched ~40; 4096² ~45 and ~100; 8192² ~175 and ~400)
STEPS = {2048: (3, 5), 4096: (2, 3), 8192: (1, 1)}
QUICK_STEPS = (1, 1)
TIME_FACTOR, MEMORY_SHARE = 1.15, 1 / 8  # the target: within 1.15 r conventional's time, 1/8 its memory
CLASSES, SEED = 2, 0


def loss_fn():
    import torch.nn.functional as F

    return functools.partial(F.cross_entropy, reduction="none")


def labels(side: int, seed: int = SEED):
    """A seeded (1, side, side) int64 label map of ``CLASSES`` classes."""
    import torch

    return torch.randint(0, CLASSES, (1, side, side), generator=torch.Generator().manual_seed(seed + 2))


def worker(side: int, mode: str, tile: int, threads: int, reps: int, max_steps: int) -> dict:
    import torch

    from bench import protocol
    from bench.memory import PeakMemory
    from bench.models import unet
    from bench.network import make_input
    from bench.worker import arrange_input
    from streamcnn import Streaming, plan

    torch.set_num_threads(threads)
    net, ce = unet(SEED), loss_fn()
    streamed = Streaming(net, tile, progress=False) if mode != "conventional" else None

    def step(x, target):
        net.zero_grad(set_to_none=True)
        if mode == "pixel_loss":
            loss = streamed.pixel_loss(x, target, ce)
        else:
            loss = ce((streamed or net)(x), target).mean()
        loss.backward()
        return loss.item()

    small = side if mode == "conventional" or side <= 2048 else min(side, 2 * tile)
    x, layout = arrange_input(make_input(small, SEED, "cpu"), "streaming" if streamed else mode, net)
    step(x, labels(small))  # warm-up
    if small != side:
        x, _ = arrange_input(make_input(side, SEED, "cpu"), "streaming", net)
    target = labels(side)
    steps, losses = [], []
    while protocol.need_more_steps(steps, reps, max_steps):
        with PeakMemory("cpu") as peak:
            loss, timing = study.timed(lambda: step(x, target), threads)
        losses.append(loss)
        steps.append({"step_s": timing["seconds"], "disturbed": timing["disturbance"],
                      "cpu_window": timing["cpu_window"], **peak.record()})
    quiet = protocol.quiet_steps(steps) or steps
    estimate = plan(net, (1, 3, side, side), tile or TILES[side][0])
    return {"side": side, "mode": mode, "tile": tile, "threads": threads, "layout": layout,
            "step_s": statistics.median(s["step_s"] for s in quiet), "step_s_all": [s["step_s"] for s in steps],
            "peak_bytes": max(s["peak_growth_bytes"] for s in quiet), "steps": steps,
            "disturbance": "" if protocol.quiet_steps(steps) else steps[-1]["disturbed"],
            "cpu_window": quiet[-1]["cpu_window"], "loss": losses[-1],
            "tiles": estimate.num_tiles if streamed else 1, "r": estimate.coverage if streamed else 1.0,
            "recomputed": streamed.last_stats.backward.computed if mode == "stitched" else 0,
            "plan_conventional_bytes": estimate.conventional_peak_bytes, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def key(r: dict) -> str:
    return f"{r['side']}-{r['mode']}" + (f"-{r['tile']}" if r["mode"] != "conventional" else "")


def configurations(side: int):
    tile, second = TILES[side]
    yield {"side": side, "mode": "conventional", "tile": 0}
    yield {"side": side, "mode": "pixel_loss", "tile": tile}
    yield {"side": side, "mode": "stitched", "tile": tile}
    if second:
        yield {"side": side, "mode": "pixel_loss", "tile": second}


def fit_reason(c: dict):
    """None if the point should fit in the memory available now, else why it is skipped
    (``bench.guard``'s rule on plan()'s estimate, with the label map as input)."""
    from bench.guard import fit_reason as guard
    from bench.models import unet
    from streamcnn import plan

    p = plan(unet(SEED), (1, 3, c["side"], c["side"]), c["tile"] or TILES[c["side"]][0])
    label_bytes = 8 * c["side"] ** 2
    peaks = {"conventional_peak_bytes": p.conventional_peak_bytes + label_bytes,
             "streaming_peak_bytes": p.streaming_peak_bytes + label_bytes}
    mode = "conventional" if c["mode"] == "conventional" else "streaming"
    return guard(mode, c["side"], "cpu", peaks, FULL, p.input_bytes + label_bytes)


def measure(c: dict, threads: int, steps: tuple) -> dict:
    reason = fit_reason(c)
    if reason:
        return {**c, "status": "skipped", "reason": reason}
    args = [c["side"], "--mode", c["mode"], "--tile", c["tile"], "--threads", threads, "--steps", *steps]
    return study.in_fresh_process("bench.dense", args, 3 * 3600, c)


# ------------------------------------------------------------------ BENCH.md

def _conventional(stored: dict, side: int):
    r = stored.get(f"{side}-conventional")
    return r if r and r.get("status") == "measured" else None


def verdicts(stored: dict) -> dict:
    """The target judged at each pixel_loss point measured beside conventional training: key ->
    time ratio, its bound 1.15 r, memory share, whether each is met, and whether either step
    was disturbed."""
    out = {}
    for k, r in sorted(stored.items()):
        conv = _conventional(stored, r["side"])
        if r["mode"] != "pixel_loss" or r.get("status") != "measured" or conv is None:
            continue
        ratio, share = r["step_s"] / conv["step_s"], r["peak_bytes"] / conv["peak_bytes"]
        out[k] = {"ratio": ratio, "bound": TIME_FACTOR * r["r"], "share": share,
                  "time_met": ratio <= TIME_FACTOR * r["r"], "memory_met": share <= MEMORY_SHARE,
                  "disturbed": bool(r.get("disturbance") or conv.get("disturbance"))}
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _rows(stored: dict, side: int, judged: dict) -> list:
    conv = _conventional(stored, side)
    rows = []
    for mode in MODES:
        for r in sorted((r for r in stored.values() if r["side"] == side and r["mode"] == mode),
                        key=lambda r: r["tile"]):
            tile = r["tile"] or "–"
            if r.get("status") != "measured":
                rows.append([mode, tile, "", "", f"{r.get('status', '?')}: {(r.get('reason') or '')[-300:]}"])
                continue
            v = judged.get(key(r))
            memory = (fmt_x(r["peak_bytes"] / conv["peak_bytes"]) if conv else
                      f"{r['peak_bytes'] / r['plan_conventional_bytes']:.2f}× of plan()'s")
            rows.append([mode, tile, r["tiles"], f"{r['r']:.2f}", f"**{fmt_s(r['step_s'])}**",
                         fmt_x(r["step_s"] / conv["step_s"] if conv else None),
                         fmt_s(TIME_FACTOR * r["r"] * conv["step_s"]) if v else "", _met(v["time_met"]) if v else "",
                         f"**{fmt_bytes(r['peak_bytes'])}**", memory, _met(v["memory_met"]) if v else "",
                         f"{r['loss']:.6f}", study.quiet(r)])
    return rows


def _summary(judged: dict) -> str:
    if not judged:
        return "No pixel_loss point could be judged: conventional training was not measured beside one."
    met = [k for k, v in judged.items() if v["time_met"] and v["memory_met"]]
    timely = [k for k, v in judged.items() if v["time_met"] and not v["memory_met"]]
    disturbed = sum(v["disturbed"] for v in judged.values())
    return (f"The target (time and memory) is met at {len(met)} of {len(judged)} pixel_loss points measured "
            f"beside conventional training" + (f" ({', '.join(met)})" if met else "") + "."
            + (f" {', '.join(timely)} meets the time bound with a larger tile, trading memory for time (more than "
               f"an eighth of conventional's)." if timely else "")
            + (f" {disturbed} of them had other work competing for the cores (\"other work\"): rerun those on a "
               f"quiet machine before trusting the verdict." if disturbed else ""))


def render(stored: dict) -> str:
    head = ("## Dense prediction: a U-Net trained with a per-pixel loss, tile by tile\n\n"
            "One training step of a four-level U-Net (`bench.models.unet`: 16-32-64-128 channels, 3×3 "
            "convolutions, max-pool down, 2×2 transposed convolutions up, skips concatenated, 2 classes, no "
            "BatchNorm) with per-pixel cross-entropy against a seeded label map, float32 (`bench/dense.py`; "
            "`python -m bench.dense` re-measures): *conventional*, `loss_fn(net(x), target).mean().backward()` "
            "in the tiles' memory layout; *pixel_loss*, `Streaming(net, tile).pixel_loss(x, target, loss_fn)` "
            "(each tile's forward and backward at once); *stitched*, `loss_fn(Streaming(net, tile)(x), "
            "target).mean()` (a streamed forward, then a backward that recomputes every tile). r: the pixels all "
            "tiles compute at the input over the image's (`plan().coverage`). Step: the median of the undisturbed "
            "timed steps after a warm-up, each point in a fresh process (`bench.protocol`; three of at most five "
            "timed steps at 2048², fewer where a step takes minutes); peak: the timed steps' resident-memory "
            "growth above the image, the label map and the weights (`bench.memory`). "
            f"Target (issue #32): a pixel_loss step within {TIME_FACTOR} × r × conventional time where "
            f"conventional fits, at an eighth of its memory or less. Where conventional does not fit (skipped by "
            f"the bench's memory guard) no time is judged, and memory is set beside plan()'s estimate of "
            f"conventional's peak (tensors only: a measured peak is higher).")
    if not stored:
        return head + "\n\nNot measured yet."
    judged = verdicts(stored)
    header = ["mode", "tile", "tiles", "r", "one step", "× conventional", f"bound {TIME_FACTOR}·r·conventional",
              "time target", "peak", "÷ conventional", "memory ≤ ⅛", "loss", "other work"]
    return "\n\n".join([head, _summary(judged)] + [
        f"### {side}×{side}\n\n" + table(header, _rows(stored, side, judged))
        for side in sorted({r["side"] for r in stored.values()})])


def main(argv=None) -> int:
    ap = study.parser("bench.dense", __doc__, sorted(STEPS))
    ap.formatter_class, ap.epilog = argparse.RawDescriptionHelpFormatter, __doc__[__doc__.index("    python -m"):]
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="measure only the points whose key (e.g. 2048-pixel_loss-512) "
                                               "contains this text")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SIDES[0]}² image, one timed step "
                                                         f"per point, into {QUICK_JSON.relative_to(REPORTS.parent)}")
    ap.add_argument("--out", type=Path, help="records file (default reports/dense.json for the full run, then "
                                             "BENCH.md is re-rendered; reports/_raw/dense.json for other sides)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.tile, args.threads, *args.steps)))
        return 0
    sides = QUICK_SIDES if args.quick else args.sides
    unknown = [s for s in sides if s not in TILES]
    if unknown:
        ap.error(f"no tiles chosen for side(s) {unknown}: the sides are {sorted(STEPS)} (TILES in bench/dense.py)")
    path = args.out or (QUICK_JSON if args.quick else DENSE_JSON if sides == sorted(STEPS)
                        else REPORTS / "_raw" / "dense.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for side in sides:
        for c in (c for c in configurations(side) if args.only in key(c)):
            print(f"{key(c)} ...", flush=True)
            records.append(measure(c, args.threads, STEPS.get(side, QUICK_STEPS)))
            study.merge(path, records[-1:], key)  # (an interrupted run keeps what it measured)
    return study.finish(path, records, key, lambda r: f"{fmt_s(r['step_s'])}, peak {fmt_bytes(r['peak_bytes'])}, "
                                                      f"r {r['r']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
