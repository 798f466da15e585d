"""``streamcnn.update_bn`` at the prostate paper's scale: every BatchNorm of ResNet-34 through
``layer3`` recalibrated on one 16384×16384 image streamed with tiles of 2800, beside one
training step of the same front end at the same size (the ResNet-34 network's headline point
in bench.json).

A fresh process runs a warm-up ``update_bn`` on a 2×2-tile image (or one of the same size), then the measured one on
the whole image (float32, random pixels: the time does not depend on them). Measured: wall
time, CPU time against wall time × threads, the process's peak resident memory (VmHWM), the
number of streamed passes and tiles.

    python -m bench.calibration            # ~2 hours on two cores; writes reports/update_bn.json
    python -m bench.calibration 4096       # a smaller image, for a quick look
"""
from __future__ import annotations

import json
import time

from bench import study
from bench.config import REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

UPDATE_BN_JSON = REPORTS / "update_bn.json"
TILE = 2800


def worker(side: int, threads: int, checkpoints: bool = True) -> dict:
    import torch

    import streamcnn
    import streamcnn.passes as passes
    from bench.memory import read_status_bytes
    from bench.models import resnet_front

    torch.set_num_threads(threads)
    front = resnet_front().eval()
    counted = {"passes": 0, "tiles": 0}
    real = passes.StatisticsPass.run

    def run(self, probes):
        counted["passes"] += 1
        counted["tiles"] += passes.total_tiles(self.runner)
        return real(self, probes)

    corner = min(side, 2 * TILE)
    warm = torch.randn(1, 3, corner, corner, generator=torch.Generator().manual_seed(1))
    storage = "auto" if checkpoints else False
    streamcnn.update_bn([warm], front, TILE, progress=False, checkpoints=storage)
    counted.update(passes=0, tiles=0)
    passes.StatisticsPass.run = run
    image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    _, timing = study.timed(lambda: streamcnn.update_bn([image], front, TILE, progress=False,
                                                        checkpoints=storage), threads)
    bns = [m for m in front.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return {"side": side, "tile": TILE, "threads": threads, **counted, "batchnorms": len(bns),
            "checkpoints": checkpoints,
            "update_bn_s": timing["seconds"], "cpu_window": timing["cpu_window"],
            "disturbance": timing["disturbance"], "peak_rss_bytes": read_status_bytes("VmHWM"),
            "image_bytes": image.numel() * image.element_size(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def measure(side: int, threads: int, checkpoints: bool = True) -> dict:
    flag = [] if checkpoints else ["--recompute"]
    return study.in_fresh_process("bench.calibration", [side, "--threads", threads, *flag], 6 * 3600,
                                  {"side": side, "checkpoints": checkpoints})


def key(record: dict) -> str:
    """A record's key: the side, with "-checkpoints" when passes started at stored maps (records
    from before level checkpoints have no such field: every pass started at the image)."""
    return f"{record['side']}-checkpoints" if record.get("checkpoints") else str(record["side"])


def _training_step(results: dict, side: int) -> dict | None:
    """The ResNet-34 streamed point of this side in bench.json, if measured."""
    points = ((results.get("networks") or {}).get("resnet34") or {}).get("points", [])
    return next((p for p in points if p.get("mode") == "streaming" and p.get("size") == side
                 and p.get("tile") == TILE and p.get("step_s")), None)


def render(stored: dict, results: dict) -> str:
    """BENCH.md's section on update_bn."""
    head = ("## Recalibrating BatchNorm on a whole image: `update_bn`\n\n"
            f"`streamcnn.update_bn` (= `torch.optim.swa_utils.update_bn`, streamed; "
            f"[docs/statistics.md](../docs/statistics.md)) on the prostate paper's ResNet-34 front end "
            f"through `layer3`, one float32 image, tile {TILE} (`bench/calibration.py`; "
            f"`python -m bench.calibration SIDE` re-measures; `--recompute` without checkpoints). Each "
            f"batch takes one streamed pass per level of BatchNorms (BatchNorms on parallel branches "
            f"share one), each stopping its tiles after that level; no graph is built. From the image, "
            f"each pass recomputes every layer before its level; with level checkpoints (the default) "
            f"it starts at the maps its level begins at, which the pass before stored (in memory up to "
            f"half of what is available, then in files: at 16384² the stem's output alone is 16 GiB). The "
            f"16384² rows were measured while the files stayed mapped for the whole step, so their "
            f"pages counted in the RSS; since 2026-12-07 a file is mapped only while a tile reads or "
            f"writes its part, and its pages stay in the page cache, outside the RSS. Beside it: one training step of the same front end at "
            f"the same size (frozen BatchNorm, this file's ResNet-34 table). Peak RSS is the whole "
            f"process's VmHWM, the image (3 GiB at 16384²) included.")
    if not stored:
        return head + "\n\nNot measured yet."
    rows = []
    for name in sorted(stored, key=lambda k: (int(k.split("-")[0]), k)):
        r = stored[name]
        if r.get("status") != "measured":
            rows.append([f"{r['side']}²", r.get("status"), r.get("reason", "")[:80]])
            continue
        step = _training_step(results, r["side"])
        rows.append([f"{r['side']}²", "level checkpoints" if r.get("checkpoints") else "from the image",
                     f"{r['batchnorms']} BatchNorms, {r['passes']} passes, "
                     f"{r['tiles']} tiles", f"**{fmt_s(r['update_bn_s'])}**",
                     f"**{fmt_bytes(r['peak_rss_bytes'])}**",
                     f"{fmt_s(step['step_s'])} (forward {fmt_s(step['forward_s'])}), "
                     f"{fmt_bytes(step['peak_bytes'])}" if step else "–",
                     study.cpu_use(r), study.quiet(r), r["date"][:10]])
    header = ["image", "passes start", "passes", "update_bn", "peak RSS", "one training step (time, memory as in its table)",
              "CPU / (wall × threads)", "other work", "measured"]
    return head + "\n\n" + table(header, rows)


def main(argv=None) -> int:
    ap = study.parser("bench.calibration", __doc__, [16384])
    ap.add_argument("--recompute", action="store_true",
                    help="every pass from the image (checkpoints=False), as before level checkpoints")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, not args.recompute)))
        return 0
    return study.finish(UPDATE_BN_JSON, [measure(side, args.threads, not args.recompute)
                                         for side in args.sides], key, lambda r: f"{fmt_s(r['update_bn_s'])} in {r['passes']} "
                        f"passes, peak RSS {fmt_bytes(r['peak_rss_bytes'])}")


if __name__ == "__main__":
    raise SystemExit(main())
