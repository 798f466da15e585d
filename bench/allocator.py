"""How much of a point's measured peak is the allocator's: one point in several fresh processes,
with glibc's default malloc and with its mmap threshold fixed.

glibc serves buffers above its mmap threshold with fresh mappings, and raises the threshold (up
to 32 MiB) whenever such a mapping is freed; from then on tile-sized buffers come from the heap,
whose free space can fragment, so the same step may hold one tile-sized buffer more or less,
depending on what the process allocated before. ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold:
every buffer above it is mapped and unmapped, and the resident peak is the tensors' own.

    python -m bench.allocator          # conv3, 2048², tile 256, 4 processes per setting

writes ``reports/allocator.json``; BENCH.md shows it beside the second run's comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from bench.config import REPORTS
from bench.fmt import fmt_bytes, table

ALLOCATOR_JSON = REPORTS / "allocator.json"
RAW = REPORTS / "_raw" / "allocator"
SETTINGS = {  # label -> extra environment of the worker process
    "glibc defaults": {},
    "mmap threshold fixed at 128 KiB": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
}


def _spec(network: str, size: int, tile: int, steps: int, threads: int) -> dict:
    return {"network": network, "mode": "streaming", "size": size, "tile": tile, "reps": steps,
            "max_steps": steps, "warmup": "full", "seed": 0, "threads": threads, "cores": os.cpu_count() or 1,
            "foreign_cores": 0.15, "device": "cpu"}


def probe(network: str, size: int, tile: int, processes: int, steps: int, threads: int) -> dict:
    """Each setting in ``processes`` fresh workers (settings alternate); every step's peak growth."""
    from tqdm import tqdm

    from bench import networks
    from bench.guard import plan_point
    from bench.harness import run_worker  # imported here: BENCH.md's renderer needs none of torch

    spec = _spec(network, size, tile, steps, threads)
    net = networks.get(network)
    plan = plan_point(net, size, tile, 0)
    RAW.mkdir(parents=True, exist_ok=True)
    runs = {label: [] for label in SETTINGS}
    for i in tqdm(range(processes * len(SETTINGS)), desc="allocator probe", unit="process"):
        label = list(SETTINGS)[i % len(SETTINGS)]
        result = run_worker(spec, 1800, RAW / f"worker_{i}.log", SETTINGS[label])
        if "error" in result:
            raise RuntimeError(f"allocator probe, {label}: {result['error']}")
        runs[label].append([s["peak_growth_bytes"] for s in result["steps"]])
    return {"network": network, "size": size, "tile": tile, "threads": threads, "steps": steps,
            "env": SETTINGS, "peaks": runs,
            "plan_bytes": plan["streaming_peak_bytes"] - net.input_bytes(size),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def render(rec: dict) -> str:
    """BENCH.md's note on allocator noise in the memory figures ('' when the probe has not run)."""
    if not rec:
        return ""
    rows = []
    for label, runs in rec["peaks"].items():
        per_process = [max(r) for r in runs]
        every = [p for r in runs for p in r]
        rows.append([label, ", ".join(fmt_bytes(p) for p in per_process),
                     f"{fmt_bytes(min(every))} – {fmt_bytes(max(every))}",
                     f"{max(every) / min(every) - 1:+.1%}"])
    return (f"### Memory from one process to the next: the allocator\n\n"
            f"The same point, {rec['network']} {rec['size']}² with tile {rec['tile']}, measured in "
            f"{len(next(iter(rec['peaks'].values())))} fresh processes per setting ({rec['steps']} timed steps each, "
            f"settings alternating; `python -m bench.allocator`, {rec['date'][:10]}). With glibc's defaults the mmap "
            "threshold adapts (up to 32 MiB) as mapped buffers are freed, so whether a tile-sized buffer is mapped "
            "afresh or taken from the heap depends on what the process did before, and the peak can differ by about "
            "one tile-sized buffer from one process to the next. With the threshold fixed "
            "(`MALLOC_MMAP_THRESHOLD_`) every large buffer is mapped and unmapped and the spread goes away; plan() "
            f"estimates {fmt_bytes(rec['plan_bytes'])}. The figures above use the defaults, as users get them, so "
            "points with small tiles carry this spread from run to run.\n\n"
            + table(["malloc", "peak of each process", "every step: lowest – highest", "spread"], rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.allocator", description=__doc__.splitlines()[0])
    ap.add_argument("--network", default="conv3")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    rec = probe(args.network, args.size, args.tile, args.processes, args.steps, args.threads)
    ALLOCATOR_JSON.write_text(json.dumps(rec, indent=1) + "\n")
    print(render(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
