"""One training step of a small BatchNorm network with BatchNorm in training mode (exact
whole-image statistics, streamed: ``streamcnn.norms``) beside the same network with frozen
statistics, at 4096×4096 and 8192×8192 (tile 1024, float32).

Each point runs in a fresh process: a warm-up step on a 2×2-tile image, then one timed
step (forward and backward). Measured: the step's time, the process's peak resident
memory (VmHWM), CPU time against wall time × threads; and from ``plan()`` the streamed
passes over the tiles.

    python -m bench.training_norm            # ~15 minutes on two cores; reports/training_norm.json
    python -m bench.training_norm 2048       # a smaller image, for a quick look
"""
from __future__ import annotations

import argparse
import json
import time

from bench import study
from bench.config import REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

TRAINING_NORM_JSON = REPORTS / "training_norm.json"
TILE = 1024
MODES = ("training", "frozen")


def network(seed: int = 0):
    """Three stages of 3×3 convolution, BatchNorm, ReLU and 2×2 max-pool (16, 32, 32 channels)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    layers, c = [], 3
    for out in (16, 32, 32):
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        c = out
    return nn.Sequential(*layers)


def worker(side: int, mode: str, threads: int) -> dict:
    import torch
    import torch.nn as nn

    from bench.memory import read_status_bytes
    from streamcnn import Streaming, plan

    torch.set_num_threads(threads)
    front = network()
    front.train(mode == "training")
    model = nn.Sequential(Streaming(front, TILE, progress=False), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                          nn.Linear(32, 2))
    label = torch.tensor([1])

    def step(image):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(image), label).backward()

    corner = min(side, 2 * TILE)
    step(torch.randn(1, 3, corner, corner, generator=torch.Generator().manual_seed(1)))
    image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    _, timing = study.timed(lambda: step(image), threads)
    estimate = plan(front, (1, 3, side, side), TILE)
    return {"side": side, "mode": mode, "tile": TILE, "threads": threads, "step_s": timing["seconds"],
            "cpu_window": timing["cpu_window"], "disturbance": timing["disturbance"],
            "peak_rss_bytes": read_status_bytes("VmHWM"), "tiles": estimate.num_tiles,
            "norms": estimate.norms, "levels": estimate.norm_levels,
            "forward_passes": estimate.forward_passes, "backward_passes": estimate.backward_passes,
            "time_factor_bound": estimate.time_factor, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def measure(side: int, mode: str, threads: int) -> dict:
    return study.in_fresh_process("bench.training_norm", [side, "--mode", mode, "--threads", threads],
                                  3 * 3600, {"side": side, "mode": mode})


def render(stored: dict) -> str:
    head = ("## BatchNorm in training mode inside the streamed part\n\n"
            f"One training step of a small network (three stages of 3×3 convolution, BatchNorm, ReLU, "
            f"2×2 max-pool) with BatchNorm in training mode - exact whole-image statistics, streamed "
            f"([docs/statistics.md](../docs/statistics.md#normalisation-in-training-mode)) - beside the "
            f"same network with frozen statistics, tile {TILE}, float32 (`bench/training_norm.py`; "
            f"`python -m bench.training_norm SIDE` re-measures). Passes are streamed passes over all "
            f"tiles, forward + backward, as `plan()` reports them; its bound on the time factor counts a "
            f"backward pass as three forwards and every statistics pass as a whole pass.")
    if not stored:
        return head + "\n\nNot measured yet."
    rows = []
    for side in sorted({r["side"] for r in stored.values()}):
        frozen = stored.get(f"{side}-frozen", {})
        for mode in MODES:
            r = stored.get(f"{side}-{mode}")
            if r is None or r.get("status") != "measured":
                rows.append([f"{side}²", mode, (r or {}).get("status", "not measured")])
                continue
            ratio = (f"{r['step_s'] / frozen['step_s']:.2f}×" if mode == "training"
                     and frozen.get("status") == "measured" else "")
            rows.append([f"{side}²", mode, f"{r['forward_passes']} + {r['backward_passes']}",
                         f"**{fmt_s(r['step_s'])}**", ratio,
                         f"{r['time_factor_bound']:.1f}×" if mode == "training" else "",
                         f"**{fmt_bytes(r['peak_rss_bytes'])}**", study.cpu_use(r), study.quiet(r),
                         r["date"][:10]])
    header = ["image", "BatchNorm", "passes", "one step", "vs frozen", "plan() bound", "peak RSS",
              "CPU / (wall × threads)", "other work", "measured"]
    return head + "\n\n" + table(header, rows)


def main(argv=None) -> int:
    ap = study.parser("bench.training_norm", __doc__, [4096, 8192])
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.threads)))
        return 0
    records = [measure(side, mode, args.threads) for side in args.sides for mode in MODES]
    return study.finish(TRAINING_NORM_JSON, records, lambda r: f"{r['side']}-{r['mode']}",
                        lambda r: f"{fmt_s(r['step_s'])}, peak RSS {fmt_bytes(r['peak_rss_bytes'])}")


if __name__ == "__main__":
    raise SystemExit(main())
