"""One training step on a slide that is not in memory: an 8-bit RGB memmap on disk.

Whole-slide images are stored as 8-bit RGB and are larger than memory as float32. Here a
deterministic ``side × side × 3`` uint8 file is made once under ``reports/_raw/slide/``, then a
fresh process trains one step of a strided front end on it through
``Streaming(front, 4096, transform=normalise)(ImageArray(memmap, "HWC"))``: each tile is read
from disk when needed (forward, and again in the backward recomputation) and normalised to
float32 per tile. Measured: the time of the step, the process's peak resident memory (VmHWM,
the whole process: Python, torch and all), CPU time against wall time × threads, and per pass
the seconds spent reading tiles, waiting for a read and computing (reads are prefetched,
``Streaming``'s default; ``bench/dedup.py`` compares with and without).

    python -m bench.slide 32768 65536   # measure, merge into reports/slide.json, re-render BENCH.md

``make bench`` measures the 32768² slide (a 3 GiB file; 12 GiB as float32); the 65536² one
(12 GiB on disk, ~15 minutes) is measured by hand with the command above. Each entry of
reports/slide.json keeps its own date and machine.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench import study
from bench.config import REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

SLIDE_JSON = REPORTS / "slide.json"
RAW = REPORTS / "_raw" / "slide"
TILE = 4096
MEAN, STD = (0.78, 0.60, 0.72), (0.15, 0.20, 0.15)


def front(seed: int = 0):
    """A strided front end (output stride 16): conv 3→8 s2, ReLU, max-pool 2, conv 8→16 s2, ReLU,
    max-pool 2; followed in training by global max-pooling and a linear head."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2))


def normalise(tile):
    """uint8 (N, 3, h, w) tile -> float32, normalised per channel (on the module's device)."""
    import torch

    mean = torch.tensor(MEAN, device=tile.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=tile.device).view(1, 3, 1, 1)
    return (tile.float() / 255 - mean) / std


def slide_path(side: int) -> Path:
    return RAW / f"slide_{side}.u8"


def make_slide(side: int, seed: int = 0) -> Path:
    """The ``side × side × 3`` uint8 file (made once, in 1024-row bands, from a seeded generator)."""
    path = slide_path(side)
    if path.exists() and path.stat().st_size == side * side * 3:
        return path
    RAW.mkdir(parents=True, exist_ok=True)
    need = side * side * 3
    free = shutil.disk_usage(RAW).free
    if free < need + 2 * 2**30:
        raise OSError(f"a {side}² slide needs {fmt_bytes(need)} on disk; {fmt_bytes(free)} are free")
    data = np.memmap(path, np.uint8, "w+", shape=(side, side, 3))
    rng = np.random.default_rng(seed)
    for row in range(0, side, 1024):
        data[row:row + 1024] = rng.integers(0, 256, (min(1024, side - row), side, 3), dtype=np.uint8)
    data.flush()
    del data
    return path


def worker(side: int, threads: int) -> dict:
    """In a fresh process: one warm-up step on a corner of the slide, then one timed step on all."""
    import torch
    import torch.nn as nn

    from bench import protocol
    from bench.memory import read_status_bytes
    from streamcnn import ImageArray, Streaming, plan

    torch.set_num_threads(threads)
    slide = np.memmap(slide_path(side), np.uint8, "r", shape=(side, side, 3))
    net = front()
    model = nn.Sequential(Streaming(net, TILE, transform=normalise, progress=False), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(16, 2))
    step = study.training_step(model, torch.tensor([1]))

    corner = min(side, 2 * TILE)
    step(ImageArray(slide[:corner, :corner], "HWC"))  # warm-up: libraries, allocator
    before = protocol.sample()
    loss, forward_s, backward_s = step(ImageArray(slide, "HWC"))
    win = protocol.window(before, protocol.sample())
    estimate = plan(net, (1, 3, side, side), TILE, input_dtype=torch.uint8, input_device="array",
                    transform=normalise)
    return {"side": side, "tile": TILE, "threads": threads, "loss": loss, "forward_s": forward_s,
            "backward_s": backward_s, "step_s": forward_s + backward_s,
            "peak_rss_bytes": read_status_bytes("VmHWM"), "cpu_window": win,
            "disturbance": protocol.disturbance(win, threads, os.cpu_count() or 1, protocol.Thresholds()),
            "file_bytes": side * side * 3, "float32_bytes": side * side * 3 * 4,
            "plan_device_bytes": estimate.device_peak_bytes, "tiles": estimate.num_tiles,
            "prefetch": model[0].last_stats.prefetch, "passes": study.passes(model[0].last_stats),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def measure(side: int, threads: int, timeout_s: int = 3600) -> dict:
    """Make the slide and run :func:`worker` in a fresh process; a failure becomes a record."""
    try:
        make_slide(side)
    except OSError as err:
        return {"side": side, "status": "skipped", "reason": str(err)}
    return study.in_fresh_process("bench.slide", [side, "--threads", threads], timeout_s,
                                  {"side": side})


def merge(records: list, path: Path = SLIDE_JSON) -> dict:
    """reports/slide.json with these records replacing the same sides (others kept as measured)."""
    return study.merge(path, records, key=lambda r: r["side"])


def render(stored: dict) -> str:
    """BENCH.md's section on the slides read from disk."""
    head = ("## A slide larger than memory: uint8 memmap on disk\n\n"
            f"One training step of a strided front end (output stride 16) on a side × side × 3 uint8 "
            f"memmap, streamed with tile {TILE} and a per-tile transform to normalised float32 "
            f"(`bench/slide.py`; `python -m bench.slide SIDE` re-measures). Peak RSS is the whole "
            f"process's VmHWM (Python and torch included); read-only memmap pages are dropped from the "
            f"process after each tile read (`streamcnn.sources`), so they stay in the kernel's page cache "
            f"and do not count as the process's memory.")
    if not stored:
        return head + "\n\nNot measured yet."
    rows = []
    for key in sorted(stored, key=int):
        r = stored[key]
        if r.get("status") != "measured":
            rows.append([f"{r['side']}²", r.get("status"), r.get("reason", "")[:80]])
            continue
        rows.append([f"{r['side']}² ({r['side'] ** 2 / 1e9:.2f} GP)", fmt_bytes(r["file_bytes"]),
                     fmt_bytes(r["float32_bytes"]), f"**{fmt_bytes(r['peak_rss_bytes'])}**",
                     fmt_bytes(r["plan_device_bytes"]),
                     f"**{fmt_s(r['step_s'])}** ({fmt_s(r['forward_s'])} + {fmt_s(r['backward_s'])})",
                     study.time_split(r), study.cpu_use(r), study.quiet(r), r["date"][:10]])
    header = ["slide", "on disk (uint8)", "as float32", "peak RSS", "plan(), device", "one step (fwd + bwd)",
              "read / wait / compute (s), fwd; bwd", "CPU / (wall × threads)", "other work", "measured"]
    return head + "\n\n" + table(header, rows)


def main(argv=None) -> int:
    args = study.parser("bench.slide", __doc__, [32768]).parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return 0
    return study.finish(SLIDE_JSON, [measure(side, args.threads) for side in args.sides],
                        lambda r: r["side"], lambda r: f"{fmt_s(r['step_s'])}, peak RSS "
                        f"{fmt_bytes(r['peak_rss_bytes'])}")


if __name__ == "__main__":
    raise SystemExit(main())
