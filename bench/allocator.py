"""How much of the measured peak memory is the allocator's: points in several fresh processes,
with glibc's default malloc and with its mmap threshold fixed.

glibc serves buffers above its mmap threshold with fresh mappings and raises the threshold (up
to 32 MiB) whenever such a mapping is freed; from then on tile-sized buffers may come from the
heap instead, so the same step may hold one tile-sized buffer more or less, depending on what the
process did before. ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold: every buffer above it is
mapped and unmapped. Step times are recorded too: fresh mappings cost page faults.

    python -m bench.allocator --conventional   # conv3, 2048², tiles 128/256/512 and conventional, 3 processes each

writes ``reports/allocator.json``; BENCH.md shows it beside the second run's comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.config import FIXED_MMAP_ENV, REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

ALLOCATOR_JSON = REPORTS / "allocator.json"
RAW = REPORTS / "_raw" / "allocator"
SETTINGS = {  # label -> extra environment of the worker process
    "glibc defaults": {},
    "mmap threshold fixed at 128 KiB": FIXED_MMAP_ENV,
}


def probe(network: str, size: int, points: list, processes: int, steps: int, threads: int) -> dict:
    """Each (mode, tile) of ``points`` under each setting in ``processes`` fresh workers (settings
    alternate); every step's peak growth and time, and whether other work disturbed it."""
    from tqdm import tqdm

    from bench import networks
    from bench.config import FULL
    from bench.guard import plan_point
    from bench.harness import Key, run_worker, worker_spec  # imported here: BENCH.md's renderer needs no torch

    net = networks.get(network)
    RAW.mkdir(parents=True, exist_ok=True)
    jobs = [(mode, tile, label) for mode, tile in points for _ in range(processes) for label in SETTINGS]
    out = {(mode, tile): {"mode": mode, "tile": tile, "runs": {label: [] for label in SETTINGS}}
           for mode, tile in points}
    for i, (mode, tile, label) in enumerate(tqdm(jobs, desc="allocator probe", unit="process")):
        spec = worker_spec(FULL, Key(network, mode, size, tile, "default"), threads, "cpu", reps=steps, max_steps=steps)
        result = run_worker(spec, 1800, RAW / f"worker_{i}.log", SETTINGS[label])
        if "error" in result:
            raise RuntimeError(f"allocator probe, {mode} tile {tile}, {label}: {result['error']}")
        out[(mode, tile)]["runs"][label].append(
            [{k: s[k] for k in ("peak_growth_bytes", "step_s", "disturbed")} for s in result["steps"]])
    for (mode, tile), rec in out.items():
        plan = plan_point(net, size, tile or size, 0)
        rec["plan_bytes"] = plan[f"{mode}_peak_bytes"] - net.input_bytes(size)
    return {"network": network, "size": size, "threads": threads, "steps": steps, "processes": processes,
            "env": SETTINGS, "points": list(out.values()), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _rows(rec: dict) -> list:
    rows = []
    for point in rec["points"]:
        name = point["mode"] + (f", tile {point['tile']}" if point["tile"] else "")
        base = None
        for label, runs in point["runs"].items():
            peaks = [s["peak_growth_bytes"] for r in runs for s in r]
            times = statistics.median(s["step_s"] for r in runs for s in r)
            base = base or times
            disturbed = sum(bool(s["disturbed"]) for r in runs for s in r)
            rows.append([name, label, ", ".join(fmt_bytes(max(s["peak_growth_bytes"] for s in r)) for r in runs),
                         f"{fmt_bytes(min(peaks))} – {fmt_bytes(max(peaks))}", f"{max(peaks) / min(peaks) - 1:+.1%}",
                         fmt_bytes(point["plan_bytes"]), fmt_s(times), f"{times / base:.2f}×",
                         f"{disturbed} of {len(peaks)}" if disturbed else "none"])
    return rows


def render(rec: dict) -> str:
    """BENCH.md's note on allocator noise in the memory figures ('' when the probe has not run)."""
    if not rec:
        return ""
    return (f"### Memory from one process to the next: the allocator\n\n"
            f"The same {rec['network']} {rec['size']}² points, each measured in {rec['processes']} fresh processes "
            f"per setting ({rec['steps']} timed steps each, settings alternating; `python -m bench.allocator`, "
            f"{rec['date'][:10]}). With glibc's defaults the mmap threshold adapts (up to 32 MiB) as mapped "
            "buffers are freed, so whether a tile-sized buffer is mapped afresh or taken from the heap depends on "
            "what the process did before, and the peak can differ by about one tile-sized buffer from one process "
            "to the next. With the threshold fixed (`MALLOC_MMAP_THRESHOLD_`) every large buffer is mapped and "
            "unmapped. The figures above use the defaults, as users get them, so points with small tiles carry "
            "this spread from run to run; comparisons between runs therefore judge each point's memory-only probe "
            "with the threshold fixed (see How this was measured). Step time: the median over all steps of the "
            "setting, and its ratio to the defaults'; indicative only, since the probe does not measure disturbed steps again (last "
            "column). A fixed threshold would make the memory figures repeat exactly, but it slows streamed steps "
            "(every tile's buffers are mapped afresh) and not conventional ones, so timed steps never use it."
            "\n\n"
            + table(["point", "malloc", "peak of each process", "every step: lowest – highest", "spread", "plan()",
                     "step time", "vs defaults", "disturbed steps"], _rows(rec)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.allocator", description=__doc__.splitlines()[0])
    ap.add_argument("--network", default="conv3")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tiles", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--conventional", action="store_true", help="also conventional backprop at --size")
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    points = [("streaming", t) for t in args.tiles] + ([("conventional", None)] if args.conventional else [])
    rec = probe(args.network, args.size, points, args.processes, args.steps, args.threads)
    ALLOCATOR_JSON.write_text(json.dumps(rec, indent=1) + "\n")
    print(render(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
