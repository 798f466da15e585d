"""Each activation computed once: reused overlaps against recomputed ones (``Streaming(...,
overlap="reuse")``, ``streamcnn.strips``).

Recomputing overlaps, a tile computes every map over its whole window, and its neighbours
compute the shared part again, in the forward and in the backward's recomputation: the
overlap factor r (``plan().recompute_factor``) multiplies the work. Reusing them, each
position is computed once per pass and the tiles read the rest from strips. The work model
of a streamed step is then 2F + B (a forward, the backward's recomputation, the backward)
against conventional backprop's F + B, with F and B measured in the same run.

- the paper's Fig. 2 network (three 3x3 convolutions) at 2048², tiles 128 to 1024;
- ResNet-34 through ``layer3`` (BatchNorm frozen) at 2048², tiles 768 to 1536;
- ResNet-34 at 16384² with tile 2800, reused only (the recomputing step is ``make bench``'s).

Each point runs in a fresh process: a warm-up step on a 2×2-tile corner, then one timed
training step (forward, the output's mean as the loss as in ``make bench``, backward: every
tile gets a gradient, so none is skipped), float32, the tiles in the layout ``Streaming``
picks and conventional backprop's input in it too.
Peak RSS is the process's VmHWM (the image, the strips and their gradients included).

    python -m bench.overlap                      # ~35 minutes on two cores; reports/overlap.json
    python -m bench.overlap --only resnet34-2048-reuse-768
    python -m bench.overlap --skip-large         # without the 16384² step (~25 minutes less)
"""
from __future__ import annotations

import json
import os
import time

from bench import study
from bench.config import REPORTS
from bench.fmt import fmt_bytes, fmt_s, table

OVERLAP_JSON = REPORTS / "overlap.json"
FIG = "overlap_fig2.png"
TILES = {"conv3": (128, 256, 512, 1024), "resnet34": (768, 1024, 1280, 1536)}
#: ResNet-34 tiles also measured with a strip budget of a quarter of the strips at every step
#: (mode "quarter": Streaming(overlap="reuse", strip_budget=plan().strip_bytes // 4))
BUDGET_TILES = (768, 1280)
#: (network, side, mode, tile), in the order measured
POINTS = tuple([("resnet34", 2048, "conventional", 0)]
               + [("resnet34", 2048, m, t) for t in TILES["resnet34"] for m in ("reuse", "recompute")]
               + [("conv3", 2048, "conventional", 0)]
               + [("conv3", 2048, m, t) for t in TILES["conv3"] for m in ("reuse", "recompute")]
               + [("resnet34", 4096, "conventional", 0)]
               + [("resnet34", 2048, "quarter", t) for t in BUDGET_TILES]
               + [("resnet34", 16384, "reuse", 2800)])


def key(net: str, side: int, mode: str, tile: int = 0) -> str:
    return f"{net}-{side}-{mode}" + (f"-{tile}" if mode != "conventional" else "")


def front(net: str):
    import torch

    from bench.models import freeze_batchnorm, resnet_front
    from bench.network import build_network

    if net == "conv3":
        return build_network()
    sample = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    return freeze_batchnorm(resnet_front(), sample=sample)


def worker(net: str, side: int, mode: str, tile: int, threads: int) -> dict:
    import torch

    from bench.memory import read_status_bytes
    from bench.worker import tile_layout
    from streamcnn import Streaming, plan

    torch.set_num_threads(threads)
    body = front(net)
    streamed = mode != "conventional"
    overlap = "reuse" if mode == "quarter" else mode
    budget = plan(body, (1, 3, side, side), tile, overlap="reuse").strip_bytes // 4 \
        if mode == "quarter" else None
    model = Streaming(body, tile, progress=False, overlap=overlap, strip_budget=budget) \
        if streamed else body

    def step(image):  # (the mean of the output, as make bench's steps: every tile has a
        model.zero_grad(set_to_none=True)  # gradient, so none is skipped)
        t0 = time.perf_counter()
        loss = model(image).mean()
        t1 = time.perf_counter()
        loss.backward()
        return loss.item(), t1 - t0, time.perf_counter() - t1
    layout = torch.channels_last if tile_layout(torch.empty(1, 3, 8, 8), body) == "channels_last" \
        else torch.contiguous_format

    def image(n: int, seed: int):
        x = torch.randn(1, 3, n, n, generator=torch.Generator().manual_seed(seed))
        return x if streamed else x.contiguous(memory_format=layout)  # (the tiles' layout)

    step(image(min(side, 2 * tile) if streamed else 256, 1))
    x = image(side, 0)
    (_, forward_s, backward_s), timing = study.timed(lambda: step(x), threads)
    record = {"net": net, "side": side, "mode": mode, "tile": tile, "threads": threads,
              "step_s": timing["seconds"], "forward_s": forward_s, "backward_s": backward_s,
              "cpu_window": timing["cpu_window"], "disturbance": timing["disturbance"],
              "peak_rss_bytes": read_status_bytes("VmHWM"), "layout": str(layout),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # (AVX2 and AVX512
              # machines run other kernels at other speeds: ratios within one machine only)
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if streamed:
        p = plan(body, (1, 3, side, side), tile, overlap=overlap, strip_budget=budget)
        record.update(tiles=p.num_tiles, recompute_factor=p.recompute_factor, strip_budget=budget,
                      strip_steps=len(p.strip_steps), steps=len(p.steps) - 1,
                      reuse_factor=p.reuse_factor, plan_strip_bytes=p.strip_bytes,
                      strip_bytes=model.last_stats.strip_bytes)
    return record


def measure(net: str, side: int, mode: str, tile: int, threads: int) -> dict:
    return study.in_fresh_process("bench.overlap", [net, side, "--mode", mode, "--tile", tile,
                                                    "--threads", threads], 3 * 3600,
                                  {"net": net, "side": side, "mode": mode, "tile": tile})


def _ok(r) -> bool:
    return bool(r) and r.get("status") == "measured"


def _today(net: str = "resnet34", side: int = 16384, tile: int = 2800) -> tuple:
    """``make bench``'s recomputing step at ``side``² (record or None), conventional backprop's
    time extrapolated there by its fitted line (seconds or None) and the CPU capability of the
    machine that measured them, from reports/bench.json."""
    path = REPORTS / "bench.json"
    if not path.exists():
        return None, None, None
    res = json.loads(path.read_text())
    network = (res.get("networks") or {}).get(net) or {}
    rec = next((p for p in network.get("points", []) if p.get("mode") == "streaming"
                and p.get("size") == side and p.get("tile") == tile and p.get("status") == "measured"), None)
    extra = (network.get("analysis") or {}).get("conventional_extrapolated") or []
    found = next((e for e in extra if e.get("size") == side), None)
    return rec, (found or {}).get("time"), (res.get("machine") or {}).get("cpu_capability")


def same_machine(a: dict, b: dict) -> bool:
    """Whether two rows ran the same CPU kernels (torch's capability, recorded since rows were
    measured on both AVX2 and AVX512 machines; rows from before that compare with each other)."""
    return a.get("cpu_capability") == b.get("cpu_capability")


def extrapolated(stored: dict, r: dict, side: int = 16384) -> tuple:
    """Conventional backprop's step at ``side``² on ``r``'s machine (``(seconds, how)``, None
    where nothing measured there): this study's conventional step at 2048² scaled by the pixels
    (the lower of the two extrapolations where 4096² took more than 4x as long, as on the AVX2
    machine: the comparison then favours conventional backprop), with the line a + b·pixels
    through 2048² and 4096² named beside it; else ``make bench``'s fitted line where
    reports/bench.json was measured on the same machine."""
    small, large = (stored.get(key("resnet34", n, "conventional")) for n in (2048, 4096))
    if _ok(small) and same_machine(small, r):
        scaled = small["step_s"] * side ** 2 / small["side"] ** 2
        how = f"this study's conventional step at 2048² ({fmt_s(small['step_s'])}) times the pixels"
        if _ok(large) and same_machine(large, r):
            (n0, t0), (n1, t1) = (small["side"] ** 2, small["step_s"]), (large["side"] ** 2, large["step_s"])
            line = t0 + (t1 - t0) / (n1 - n0) * (side ** 2 - n0)
            how += (f" (the line through it and 4096², {fmt_s(t1)}, would give {fmt_s(line)}: on this "
                    f"machine conventional backprop's step grew faster than its pixels)"
                    if line > scaled else "")
            if line < scaled:
                return line, f"the line through this study's conventional steps at 2048² and 4096² ({fmt_s(t1)})"
        return scaled, how
    _, seconds, capability = _today()
    if seconds and capability == r.get("cpu_capability"):
        return seconds, "`make bench`'s fitted line (reports/bench.json, same machine)"
    return None, None


def render(stored: dict) -> str:
    """BENCH.md's section on reused overlaps."""
    head = ("## Each activation computed once: reused overlaps\n\n"
            "`Streaming(..., overlap=\"reuse\")` ([README](../README.md#reused-overlaps)): each tile "
            "computes every map only where no earlier tile did and reads the rest from strips that "
            "earlier tiles stored, so each position is computed once per pass, against r times "
            "(`plan().recompute_factor`) when the overlap is recomputed. One training step, float32, the "
            "output's mean as the loss (as `make bench`), one fresh process per row (`python -m bench.overlap`, "
            "`bench/overlap.py`); conventional backprop's forward F and backward B are measured in the "
            "same run, and a streamed step's work model is 2F + B (forward, recomputation, backward). "
            "Peak RSS is the process's VmHWM, the image and the strips (and, in the backward, their "
            "gradients) included; *strips* is what the forward stored.")
    if not stored:
        return head + "\n\nNot measured yet."
    parts = [head, f"![Fig. 2 with both curves]({FIG})"]
    for net in ("resnet34", "conv3"):
        base = stored.get(key(net, 2048, "conventional"))
        rows = []
        if _ok(base):
            model = 2 * base["forward_s"] + base["backward_s"]
            rows.append(["conventional", "–", "–", "–", f"{fmt_s(base['step_s'])} (F {fmt_s(base['forward_s'])}, "
                         f"B {fmt_s(base['backward_s'])}, 2F+B {fmt_s(model)})", "", fmt_bytes(base["peak_rss_bytes"]),
                         "–", study.cpu_use(base), study.quiet(base), _measured(base)])
        for tile in TILES[net]:
            for mode in ("reuse", "quarter", "recompute"):
                if mode == "quarter" and (net != "resnet34" or tile not in BUDGET_TILES):
                    continue
                r = stored.get(key(net, 2048, mode, tile))
                if not _ok(r):
                    rows.append([_mode({"mode": mode}), str(tile), "", "", (r or {}).get("status", "not measured"),
                                 "", "", "", "", "", ""])
                    continue
                factor = r["recompute_factor"] if mode == "recompute" else r["reuse_factor"]
                ratio = (f"**{r['step_s'] / model:.2f}×**" if same_machine(r, base) else
                         "– (another machine)") if _ok(base) else ""
                rows.append([_mode(r), str(tile), str(r["tiles"]), f"{factor:.2f}×", f"**{fmt_s(r['step_s'])}**",
                             ratio, f"**{fmt_bytes(r['peak_rss_bytes'])}**",
                             fmt_bytes(r["strip_bytes"]) if mode != "recompute" else "–",
                             study.cpu_use(r), study.quiet(r), _measured(r)])
        title = ("ResNet-34 through layer3, BatchNorm frozen" if net == "resnet34"
                 else "the Fig. 2 network (three 3×3 convolutions)")
        parts.append(f"### {title}, 2048²\n\n" + table(
            ["overlap", "tile", "tiles", "positions per pass (r)", "one step", "vs 2F + B", "peak RSS",
             "strips", "CPU / (wall × threads)", "other work", "measured"], rows))
    parts.append(_large(stored))
    return "\n\n".join(parts)


def _mode(r: dict) -> str:
    if r["mode"] != "quarter":
        return r["mode"]
    steps = f", strips at {r['strip_steps']} of {r['steps']} steps" if "strip_steps" in r else ""
    return f"reuse, strip_budget ¼{steps}"


def _measured(r: dict) -> str:
    return r["date"][:10] + (f" ({r['cpu_capability']})" if r.get("cpu_capability") else "")


def _large(stored: dict) -> str:
    r = stored.get(key("resnet34", 16384, "reuse", 2800))
    lines = ["### ResNet-34 at 16384², tile 2800"]
    if not _ok(r):
        return "\n\n".join(lines + [f"Reused: {(r or {}).get('status', 'not measured')}."])
    conventional, how = extrapolated(stored, r)
    today, _, capability = _today()
    rows = [["reused", f"**{fmt_s(r['step_s'])}**",
             f"**{r['step_s'] / conventional:.2f}×**" if conventional else "–",
             f"**{fmt_bytes(r['peak_rss_bytes'])}**", fmt_bytes(r["strip_bytes"]), study.quiet(r), _measured(r)]]
    if today:
        same = capability == r.get("cpu_capability")
        rows.append(["recomputed (`make bench`)", fmt_s(today["step_s"]),
                     f"{today['step_s'] / conventional:.2f}×" if conventional and same else "– (another machine)",
                     fmt_bytes(today["vmhwm_bytes"]), "–", "quiet" if today.get("clean") else "disturbed",
                     f"reports/bench.json ({capability})"])
    note = (f"Conventional backprop cannot run here (it needs ~157 GiB); its time, extrapolated by {how}, "
            f"is {fmt_s(conventional)}." if conventional else
            "No conventional time measured on this row's machine to extrapolate from.")
    return "\n\n".join(lines + [note, table(["overlap", "one step", "vs conventional (extrapolated)",
                                             "peak RSS", "strips", "other work", "measured"], rows)])


def draw(stored: dict, path) -> None:
    """Fig. 2 redrawn: step time and peak RSS against the tile, overlap recomputed and reused,
    for both networks at 2048², conventional backprop as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for col, net in enumerate(("conv3", "resnet34")):
        base = stored.get(key(net, 2048, "conventional"))
        for mode, style in (("recompute", "o--"), ("reuse", "s-")):
            pts = [(t, stored.get(key(net, 2048, mode, t))) for t in TILES[net]]
            pts = [(t, r) for t, r in pts if _ok(r)]
            if not pts:
                continue
            tiles = [t for t, _ in pts]
            axes[0][col].plot(tiles, [r["step_s"] for _, r in pts], style, label=f"overlap {mode}d")
            axes[1][col].plot(tiles, [r["peak_rss_bytes"] / 2**30 for _, r in pts], style, label=f"overlap {mode}d")
        if _ok(base):
            axes[0][col].axhline(base["step_s"], color="k", lw=1, label="conventional (F + B)")
            axes[0][col].axhline(2 * base["forward_s"] + base["backward_s"], color="k", lw=1, ls=":",
                                 label="2F + B")
            axes[1][col].axhline(base["peak_rss_bytes"] / 2**30, color="k", lw=1, label="conventional")
        axes[0][col].set_title("Fig. 2 network" if net == "conv3" else "ResNet-34 through layer3")
        axes[0][col].set_ylabel("one training step (s)")
        axes[1][col].set_ylabel("peak RSS (GiB)")
        axes[1][col].set_xlabel("tile (px), image 2048²")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = study.point_parser("bench.overlap", __doc__, "net-side-mode[-tile]")
    ap.add_argument("--skip-large", action="store_true", help="leave out the 16384² step")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.net, args.side, args.mode, args.tile, args.threads)))
        return 0
    chosen = [p for p in POINTS if (not args.only or key(*p) in args.only)
              and not (args.skip_large and p[1] > 2048)]
    failed = 0
    for net, side, mode, tile in chosen:
        record = measure(net, side, mode, tile, args.threads)
        stored = study.merge(OVERLAP_JSON, [record],
                             lambda r: key(r["net"], r["side"], r["mode"], r.get("tile") or 0))
        draw(stored, REPORTS / FIG)
        failed += record.get("status") != "measured"
        print(key(net, side, mode, tile), record.get("status"),
              fmt_s(record["step_s"]) if "step_s" in record else record.get("reason", "")[-300:], flush=True)
    if (REPORTS / "bench.json").exists():
        study.rerender()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
