"""One training step on a whole-slide image that is mostly background, read through TiffSlide:
with and without sharing identical tiles (``Streaming(dedup=...)``), with and without reading
the next tile while one computes (``Streaming(prefetch=...)``).

The slide is synthetic and made once under ``reports/_raw/dedup/``: a ``side × side`` RGB uint8
pyramidal tiled TIFF (zlib, 512² TIFF tiles, each level half the one before, down to 1024 px
or less), about 30 % of it tissue islands (ellipses of noisy pink, placed by a seeded
generator in fractions of the side, so every side has the same layout) and the rest one
glass colour. A fresh process per configuration trains one step of ``bench/slide.py``'s
strided front end (tile 4096 unless ``--tile``, a per-tile transform to normalised float32, global max-pool
and a linear head) on level 0 through ``ImageArray.from_slide(tiffslide.TiffSlide(path))``,
after one warm-up step on a random 8192² array. Measured: the step's time (forward +
backward), the process's peak resident memory (VmHWM), the tiles each pass computed, and
per pass the seconds spent reading tiles (on whichever thread read them), waiting for a
read, and computing (``Streaming.last_stats``); CPU time against wall time × threads.

    python -m bench.dedup                  # 32768², four configurations; reports/dedup.json, BENCH.md
    python -m bench.dedup 4096 --tile 512 --out reports/_raw/dedup_check.json   # a quick check

Timings only mean something on a quiet machine: the lead runs the 32768² measurement.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bench import slide as slide_bench
from bench import study
from bench.config import REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

DEDUP_JSON = REPORTS / "dedup.json"
FIGURE = REPORTS / "dedup.png"
RAW = REPORTS / "_raw" / "dedup"
SIDE = 32768
TILE = slide_bench.TILE
TIFF_TILE = 512
COVERAGE = 0.30
GLASS = (242, 240, 245)
TISSUE = (200, 110, 170)
#: (prefetch, dedup) of each configuration, as measured and shown
CONFIGS = ((True, True), (False, True), (True, False), (False, False))


# ------------------------------------------------------------------ the synthetic slide

def islands(seed: int = 0, coverage: float = COVERAGE, grid: int = 512) -> list[tuple]:
    """Ellipses ``(cy, cx, ry, rx)`` in fractions of the side, added until they cover
    ``coverage`` of the image (measured on a ``grid × grid`` raster)."""
    rng = np.random.default_rng(seed)
    centres = (np.arange(grid) + 0.5) / grid
    covered = np.zeros((grid, grid), bool)
    found = []
    while covered.mean() < coverage:
        cy, cx = rng.uniform(0.1, 0.9, 2)
        ry, rx = rng.uniform(0.03, 0.12, 2)
        found.append((cy, cx, ry, rx))
        covered |= inside([found[-1]], centres, centres)
    return found


def inside(ellipses, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Which points of the grid ``ys × xs`` (fractions of the side) lie in an ellipse."""
    hit = np.zeros((len(ys), len(xs)), bool)
    for cy, cx, ry, rx in ellipses:
        hit |= ((ys[:, None] - cy) / ry) ** 2 + ((xs[None, :] - cx) / rx) ** 2 <= 1
    return hit


def tiff_tile(ellipses, size: int, row: int, col: int, level: int, seed: int = 0) -> np.ndarray:
    """TIFF tile ``(row, col)`` of a level ``size`` pixels wide: glass, and noisy tissue inside
    the ellipses (each pixel judged at its centre; the noise seeded by level and tile)."""
    ys = (row * TIFF_TILE + np.arange(TIFF_TILE) + 0.5) / size
    xs = (col * TIFF_TILE + np.arange(TIFF_TILE) + 0.5) / size
    tile = np.empty((TIFF_TILE, TIFF_TILE, 3), np.uint8)
    tile[:] = GLASS
    hit = inside(ellipses, ys, xs)
    if hit.any():
        rng = np.random.default_rng([seed, level, row, col])
        noise = rng.integers(-40, 41, (int(hit.sum()), 3))
        tile[hit] = np.clip(np.asarray(TISSUE) + noise, 0, 255).astype(np.uint8)
    return tile


def slide_path(side: int) -> Path:
    return RAW / f"slide_{side}.tif"


def make_slide(side: int, seed: int = 0) -> Path:
    """The pyramidal TIFF of this side (written once, tile by tile, never whole in memory)."""
    import tifffile

    path = slide_path(side)
    if path.exists():
        return path
    RAW.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(RAW).free
    if free < side * side * 3 // 2 + 2 * 2**30:
        raise OSError(f"a {side}² slide needs up to {fmt_bytes(side * side * 3 // 2)} on disk; "
                      f"{fmt_bytes(free)} are free")
    ellipses = islands(seed)
    sizes = [side]
    while sizes[-1] > 1024:
        sizes.append(sizes[-1] // 2)
    partial = path.with_suffix(".partial")
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        for level, size in enumerate(sizes):
            n = -(-size // TIFF_TILE)
            tiles = (tiff_tile(ellipses, size, r, c, level, seed) for r in range(n) for c in range(n))
            tif.write(tiles, shape=(size, size, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE),
                      compression="zlib", photometric="rgb", subfiletype=1 if level else 0)
    partial.rename(path)
    return path


# ------------------------------------------------------------------ one configuration, in a fresh process

def worker(side: int, threads: int, prefetch: bool, dedup: bool, tile: int = TILE) -> dict:
    """One warm-up step on a random array, then one measured step on the slide."""
    import tiffslide
    import torch
    import torch.nn as nn

    from bench.memory import read_status_bytes
    from streamcnn import ImageArray, Streaming

    torch.set_num_threads(threads)
    streaming = Streaming(slide_bench.front(), tile, transform=slide_bench.normalise,
                          prefetch=prefetch, dedup=dedup, progress=False)
    model = nn.Sequential(streaming, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    step = study.training_step(model, torch.tensor([1]))

    corner = min(side, 2 * tile)
    warm = np.random.default_rng(1).integers(0, 256, (corner, corner, 3), dtype=np.uint8)
    step(ImageArray(warm, "HWC"))
    with tiffslide.TiffSlide(slide_path(side)) as reader:
        (loss, forward_s, backward_s), timing = study.timed(
            lambda: step(ImageArray.from_slide(reader, 0)), threads)
    stats = streaming.last_stats
    return {"side": side, "tile": tile, "threads": threads, "prefetch": prefetch, "dedup": dedup,
            "loss": loss, "forward_s": forward_s, "backward_s": backward_s,
            "step_s": forward_s + backward_s, "peak_rss_bytes": read_status_bytes("VmHWM"),
            "cpu_window": timing["cpu_window"], "disturbance": timing["disturbance"],
            "passes": study.passes(stats),
            "file_bytes": slide_path(side).stat().st_size, "coverage": COVERAGE,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def key(record: dict) -> str:
    return f"{record['side']} tile {record['tile']}, {label(record['prefetch'], record['dedup'])}"


def label(prefetch: bool, dedup: bool) -> str:
    return f"{'prefetch' if prefetch else 'no prefetch'}, {'dedup' if dedup else 'no dedup'}"


def measure(side: int, threads: int, tile: int = TILE, configs=CONFIGS,
            timeout_s: int = 4 * 3600) -> list[dict]:
    """Make the slide, then run :func:`worker` in a fresh process per configuration."""
    try:
        make_slide(side)
    except OSError as err:
        return [{"side": side, "tile": tile, "prefetch": p, "dedup": d, "status": "skipped",
                 "reason": str(err)} for p, d in configs]
    return [study.in_fresh_process("bench.dedup", [side, "--threads", threads, "--tile", tile,
                                                   "--prefetch", int(p), "--dedup", int(d)], timeout_s,
                                   {"side": side, "tile": tile, "prefetch": p, "dedup": d})
            for p, d in configs]


# ------------------------------------------------------------------ BENCH.md

SECTION = "A slide that is mostly background: identical tiles computed once, reads prefetched"


def render(stored: dict) -> str:
    """BENCH.md's section on dedup and prefetch."""
    head = (f"## {SECTION}\n\n"
            f"One training step of `bench/slide.py`'s strided front end (uint8 tiles "
            f"normalised to float32 per tile) on a synthetic pyramidal TIFF read through "
            f"`ImageArray.from_slide(tiffslide.TiffSlide(path))`: about {COVERAGE:.0%} of it tissue "
            f"islands, the rest one glass colour (`bench/dedup.py`; `python -m bench.dedup SIDE` "
            f"re-measures). *dedup*: a tile whose pixels and geometry equal an earlier tile's is "
            f"computed once per pass (`streamcnn.dedup`); *prefetch*: the next tile is read on a "
            f"thread of its own while one computes (`streamcnn.prefetch`). Tiles: computed in the "
            f"forward / in the backward, of all. Read / wait / compute: seconds per pass (forward; "
            f"backward) spent reading tiles (decoding included, on whichever thread read them), "
            f"waiting for a read, and everything else. Peak RSS is the whole process's VmHWM. "
            f"Prefetching hides a read only where a core is free for it: with torch's threads on "
            f"every core the reading thread slows the compute (compare the compute seconds with "
            f"and without).")
    if not stored:
        return head + "\n\nNot measured yet."
    rows = [_row(r) for r in sorted(stored.values(), key=_order)]
    header = ["slide", "configuration", "tiles computed", "one step (fwd + bwd)", "read / wait / compute (s)",
              "peak RSS", "loss", "CPU / (wall × threads)", "other work", "measured"]
    shown = "\n\n![identical tiles once, reads ahead](dedup.png)" if FIGURE.exists() else ""
    return head + shown + "\n\n" + table(header, rows) + _speedups(stored)


def _order(r: dict):
    return r["side"], r["tile"], CONFIGS.index((r["prefetch"], r["dedup"]))


def _row(r: dict) -> list:
    name = label(r["prefetch"], r["dedup"])
    if r.get("status") != "measured":
        return [f"{r['side']}²", name, r.get("status"), (r.get("reason") or "")[:80]]
    f, b = r["passes"]["forward"], r["passes"]["backward"]
    return [f"{r['side']}² (tile {r['tile']})", name, f"{f['computed']} / {b['computed']} of {f['tiles']}",
            f"**{fmt_s(r['step_s'])}** ({fmt_s(r['forward_s'])} + {fmt_s(r['backward_s'])})",
            study.time_split(r),
            f"**{fmt_bytes(r['peak_rss_bytes'])}**", f"{r['loss']:.6f}", study.cpu_use(r), study.quiet(r),
            r["date"][:10]]


def _speedups(stored: dict) -> str:
    """One line per side: the step time without either against each configuration."""
    lines = []
    for side, tile in sorted({(r["side"], r["tile"]) for r in stored.values()}):
        got = {(r["prefetch"], r["dedup"]): r for r in stored.values()
               if (r["side"], r["tile"]) == (side, tile) and r.get("status") == "measured"}
        base = got.get((False, False))
        if not base:
            continue
        parts = [f"{label(p, d)} {base['step_s'] / r['step_s']:.2f}×" for (p, d), r in
                 sorted(got.items(), reverse=True) if (p, d) != (False, False)]
        if parts:
            lines.append(f"- {side}², tile {tile}: the step time of *no prefetch, no dedup* over that of "
                         + ", ".join(parts))
    return "\n\n" + "\n".join(lines) if lines else ""


def main(argv=None) -> int:
    ap = study.parser("bench.dedup", __doc__, [SIDE])
    ap.add_argument("--tile", type=int, default=TILE, help=f"streaming tile (default {TILE})")
    ap.add_argument("--out", type=Path, default=DEDUP_JSON,
                    help="records file (default reports/dedup.json, then BENCH.md is re-rendered)")
    ap.add_argument("--prefetch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dedup", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, bool(args.prefetch), bool(args.dedup),
                                args.tile)))
        return 0
    records = [r for side in args.sides for r in measure(side, args.threads, args.tile)]
    return study.finish(args.out, records, key, lambda r: (
        f"{fmt_s(r['step_s'])}, {r['passes']['forward']['computed']} of {r['passes']['forward']['tiles']} "
        f"tiles computed, peak RSS {fmt_bytes(r['peak_rss_bytes'])}"))


if __name__ == "__main__":
    raise SystemExit(main())
