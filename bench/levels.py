"""Many levels of whole-map steps at about the cost of one streamed step: level checkpoints.

Two networks whose every block holds a whole-map step, each a level of streamed passes
(``streamcnn.checkpoints``):

- the prostate paper's ResNet-34 through ``layer3`` (``bench.models.resnet_front``) with
  BatchNorm in training mode: 29 BatchNorms in 27 levels. One training step with frozen
  statistics, with today's passes from the image (``checkpoints=False``), and with level
  checkpoints (``"auto"``: in memory here);
- an EfficientNet-B0 front end through the stride-16 stage (``bench.models.
  efficientnet_b0_front``: torchvision's blocks, 11 squeeze-and-excitation gates, BatchNorm
  frozen), streamed with checkpoints beside conventional autograd; also with every stored
  map in files (mode ``disk``: ``checkpoints="disk"``, at tiles 768 to 512), whose pages
  the page cache holds outside the process's resident memory, and ``reuse_memory="small"``
  (buffers of 32 MiB or more returned when freed: the settings for the least memory).

Each point runs in a fresh process: a warm-up step on a 2×2-tile corner, then one timed
training step (forward and backward, cross-entropy on a max-pooled linear head), float32.
Measured: the step's time, the process's peak resident memory (VmHWM: the stored maps in
memory included), CPU time against wall time × threads; from ``plan()``: the passes, its
time estimate and the bytes the checkpoints store.

    python -m bench.levels                 # ~40 minutes on two cores; reports/levels.json
    python -m bench.levels --only resnet34-2048-checkpoints
    python -m bench.levels --only efficientnet_b0-2048-disk-768 --only efficientnet_b0-2048-disk-512
    python -m bench.levels --repeat 3 --only efficientnet_b0-2048-conventional   # median of three
"""
from __future__ import annotations

import json
import os
import time

from bench import study
from bench.config import REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

LEVELS_JSON = REPORTS / "levels.json"
#: (network, side, mode, tile), in the order measured: what the targets need first
POINTS = (("resnet34", 2048, "frozen", 1536), ("resnet34", 2048, "checkpoints", 1536),
          ("efficientnet_b0", 2048, "conventional", 0), ("efficientnet_b0", 2048, "checkpoints", 768),
          ("resnet34", 4096, "frozen", 2048), ("resnet34", 4096, "checkpoints", 2048),
          ("resnet34", 2048, "recompute", 1536), ("efficientnet_b0", 8192, "checkpoints", 768),
          ("efficientnet_b0", 2048, "disk", 768), ("efficientnet_b0", 2048, "disk", 704),
          ("efficientnet_b0", 2048, "disk", 640),
          ("efficientnet_b0", 2048, "disk", 576), ("efficientnet_b0", 2048, "disk", 512))
#: checkpoints= of each streamed mode
STORAGE = {"frozen": "auto", "checkpoints": "auto", "recompute": False, "disk": "disk"}
CHANNELS = {"resnet34": 256, "efficientnet_b0": 112}


def key(net: str, side: int, mode: str, tile: int | None = None) -> str:
    """A point's name; the tile is part of it in mode ``disk``, measured at several."""
    return f"{net}-{side}-{mode}" + (f"-{tile}" if mode == "disk" else "")


def front(net: str, mode: str):
    from bench.models import efficientnet_b0_front, freeze_batchnorm, resnet_front

    if net == "efficientnet_b0":
        return efficientnet_b0_front()
    if mode == "frozen":
        import torch
        sample = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
        return freeze_batchnorm(resnet_front(), sample=sample)
    return resnet_front().train()


def worker(net: str, side: int, mode: str, tile: int, threads: int) -> dict:
    import torch
    import torch.nn as nn

    from bench.memory import read_status_bytes
    from streamcnn import Streaming, plan

    torch.set_num_threads(threads)
    body = front(net, mode)
    streamed = mode != "conventional"
    checkpoints = STORAGE.get(mode)
    reuse = "small" if mode == "disk" else True
    part = Streaming(body, tile, progress=False, checkpoints=checkpoints,
                     reuse_memory=reuse) if streamed else body
    model = nn.Sequential(part, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(CHANNELS[net], 2))
    step = study.training_step(model, torch.tensor([1]))
    corner = min(side, 2 * tile) if streamed else 256
    step(torch.randn(1, 3, corner, corner, generator=torch.Generator().manual_seed(1)))
    image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    (_, forward_s, backward_s), timing = study.timed(lambda: step(image), threads)
    record = {"net": net, "side": side, "mode": mode, "tile": tile, "threads": threads,
              "step_s": timing["seconds"], "forward_s": forward_s, "backward_s": backward_s,
              "cpu_window": timing["cpu_window"], "disturbance": timing["disturbance"],
              "peak_rss_bytes": read_status_bytes("VmHWM"),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # (AVX2 vs AVX512:
              # other kernels, other times; compare rows measured on one machine)
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if streamed:
        p = plan(body, (1, 3, side, side), tile, checkpoints=checkpoints)
        record.update(tiles=p.num_tiles, levels=p.norm_levels, passes=p.forward_passes + p.backward_passes,
                      bound=p.time_factor, estimate=p.checkpoint_time_factor,
                      stored_bytes=p.checkpoint_bytes, plan_peak_bytes=p.streaming_peak_bytes)
    else:
        p = plan(body, (1, 3, side, side), 768)
        record.update(plan_peak_bytes=p.conventional_peak_bytes)
    return record


def measure(net: str, side: int, mode: str, tile: int, threads: int, repeat: int = 1) -> dict:
    """One point, in ``repeat`` fresh processes one after another: the record of the median
    step, with every run's step time (``runs``) and peak RSS (``rss_runs``)."""
    records = [study.in_fresh_process("bench.levels", [net, side, "--mode", mode, "--tile", tile,
                                                       "--threads", threads], 3 * 3600,
                                      {"net": net, "side": side, "mode": mode, "tile": tile})
               for _ in range(repeat)]
    done = sorted((r for r in records if r.get("status") == "measured"), key=lambda r: r["step_s"])
    if len(done) < len(records) or repeat == 1:
        return records[-1] if len(done) < len(records) else records[0]
    median = done[(len(done) - 1) // 2]
    return {**median, "runs": [r["step_s"] for r in records],
            "rss_runs": [r["peak_rss_bytes"] for r in records]}


def _ratio(r: dict, base: dict | None) -> str:
    if not base or base.get("status") != "measured" or r is base:
        return ""
    if r.get("cpu_capability") != base.get("cpu_capability"):  # (not one machine's kernels)
        return "– (base measured on another machine)"
    return f"{r['step_s'] / base['step_s']:.2f}× time, {r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}× memory"


def _spread(r: dict) -> str:
    """The runs behind a median, where a point was measured several times."""
    runs = r.get("runs") or []
    if len(runs) < 2:
        return ""
    return f" (median of {len(runs)}: {min(runs):.2f}–{max(runs):.2f} s)"


def render(stored: dict) -> str:
    """BENCH.md's section on level checkpoints."""
    head = ("## Many levels at the cost of one streamed step: level checkpoints\n\n"
            "A whole-map step (BatchNorm in training mode, squeeze-and-excitation's pooling) needs "
            "its statistics before the tiles can use them: one streamed pass per level, forward and "
            "backward. From the image, the pass of level k recomputes every layer before it; with "
            "level checkpoints ([docs/global_steps.md](../docs/global_steps.md#level-checkpoints)) "
            "each pass starts at the maps its level begins at, stored by the pass before. One "
            "training step, float32, a max-pooled linear head (`bench/levels.py`; `python -m "
            "bench.levels` re-measures, one fresh process per row; `--repeat 3` takes the median of "
            "three, the row then giving the range). Peak RSS is the process's VmHWM, "
            "the stored maps in memory (`checkpoints=\"auto\"`) and the image included; in mode *disk* "
            "(`checkpoints=\"disk\"`) the maps are in files, each mapped only while a tile reads or "
            "writes its part, whose pages the page cache holds outside the RSS, and with "
            "`reuse_memory=\"small\"` (buffers of 32 MiB or more go back to the system when "
            "freed); *stored* is "
            "what `plan().checkpoint_bytes` counts; *plan()* gives its bound from the image and its "
            "estimate with checkpoints. Ratios come from rows measured on one machine: *measured* "
            "gives torch's CPU capability where recorded (AVX2 and AVX512 machines run other "
            "kernels at other speeds).")
    if not stored:
        return head + "\n\nNot measured yet."
    rows = []
    for net, side, mode, tile in POINTS:
        r = stored.get(key(net, side, mode, tile))
        if r is None or r.get("status") != "measured":
            rows.append([net, f"{side}²", mode, str(tile or "–"), (r or {}).get("status", "not measured")])
            continue
        base = stored.get(key(net, side, "frozen" if net == "resnet34" else "conventional"))
        plan_cell = ""
        if mode == "recompute":
            plan_cell = f"≤ {r['bound']:.1f}×"
        elif mode in ("checkpoints", "disk"):
            plan_cell = f"~{r['estimate']:.1f}×" if r.get("estimate") else ""
        rows.append([net, f"{side}²", mode, str(tile or "–"),
                     f"{r.get('levels', 0)} levels, {r['tiles']} tiles" if "tiles" in r else "–",
                     f"**{fmt_s(r['step_s'])}**" + _spread(r),
                     f"**{_ratio(r, base)}**" if _ratio(r, base).endswith("memory") else _ratio(r, base),
                     plan_cell, f"**{fmt_bytes(r['peak_rss_bytes'])}**",
                     fmt_bytes(r["stored_bytes"]) if r.get("stored_bytes") else "–",
                     study.cpu_use(r), study.quiet(r),
                     r["date"][:10] + (f" ({r['cpu_capability']})" if r.get("cpu_capability") else "")])
    header = ["network", "image", "mode", "tile", "levels", "one step", "vs frozen / conventional",
              "plan()", "peak RSS", "stored", "CPU / (wall × threads)", "other work", "measured"]
    return head + "\n\n" + table(header, rows)


def main(argv=None) -> int:
    ap = study.point_parser("bench.levels", __doc__, "net-side-mode; net-side-disk-tile")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per point (the median is kept)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.net, args.side, args.mode, args.tile, args.threads)))
        return 0
    chosen = [p for p in POINTS if not args.only or key(*p) in args.only]
    failed = 0
    for net, side, mode, tile in chosen:
        record = measure(net, side, mode, tile, args.threads, args.repeat)
        stored = study.merge(LEVELS_JSON, [record],
                             lambda r: key(r["net"], r["side"], r["mode"], r.get("tile")))
        failed += record.get("status") != "measured"
        print(key(net, side, mode, tile), record.get("status"),
              fmt_s(record["step_s"]) if "step_s" in record else record.get("reason", "")[-300:],
              flush=True)
    if (REPORTS / "bench.json").exists():
        study.rerender()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
