"""Orchestrates ``python -m bench``: measure every point, then write JSON, figures and BENCH.md."""
import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from bench import analysis, plots, report
from bench.config import FULL, QUICK, Config
from bench.harness import TUNED_MALLOC_ENV, PointRunner, pick_device
from bench.machine import describe
from bench.network import input_bytes
from bench.micro import run_micro

FIG2_PNG, FIG3_PNG = "fig2_memory_vs_tile.png", "fig3_time_vs_input.png"
VARIANTS = {"tuned": "tuned malloc", "one_thread": "1 thread"}  # re-measured Fig. 2 points, see allocator_rows


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Streaming vs conventional backprop on this machine (the paper's Figs. 2 and 3): writes "
                    "fig2_memory_vs_tile.png, fig3_time_vs_input.png, bench.json and BENCH.md into reports/.")
    ap.add_argument("--quick", action="store_true",
                    help="small smoke run (< 3 min); writes to reports/_raw/quick/ instead of reports/")
    ap.add_argument("--no-micro", action="store_true", help="skip the pytest-benchmark micro-benchmarks")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: rebuild bench.json, figures and BENCH.md from the last run's raw points")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per point (default: all cores); the report records it")
    return ap.parse_args(argv)


def point_jobs(cfg: Config):
    """(runner, mode, size, tile, reps) for every point, cheapest first, the headline last.

    runner "default" measures with the C library's default allocator settings and all cores
    (what users get); the VARIANTS repeat a few Fig. 2 points with tuned malloc settings and
    with one thread, to show where small tiles lose time.
    """
    jobs = [("default", "conventional", cfg.fig2_input, None, cfg.reps)]
    jobs += [("default", "streaming", cfg.fig2_input, t, cfg.reps) for t in cfg.fig2_tiles]
    for size in cfg.fig3_sizes:
        jobs.append(("default", "conventional", size, None, cfg.reps))
        reps = cfg.headline_reps if size == cfg.headline_size else cfg.reps
        jobs.append(("default", "streaming", size, cfg.fig3_tile, reps))
    if cfg.headline_size not in cfg.fig3_sizes:
        jobs.append(("default", "streaming", cfg.headline_size, cfg.fig3_tile, cfg.headline_reps))
    jobs += [("default", "oracle", s, None, 1) for s in sorted({cfg.fig2_input, *cfg.fig3_sizes}) if s <= cfg.oracle_max]
    jobs += [(which, mode, cfg.fig2_input, tile, cfg.reps) for which in VARIANTS for mode, tile in allocator_points(cfg)]
    return sorted(jobs, key=lambda j: (j[2] == cfg.headline_size and j[1] == "streaming" and j[0] == "default", j[2]))


def allocator_points(cfg: Config):
    """(mode, tile) re-measured with the tuned allocator: conventional, the smallest tile, the Fig. 3 tile."""
    tiles = sorted({cfg.fig2_tiles[0], cfg.fig3_tile} & set(cfg.fig2_tiles))
    return [("conventional", None)] + [("streaming", t) for t in tiles]


def measure_all(cfg: Config, runners: dict) -> None:
    """Measure every job (results land in the runners' caches); a conventional size that does not fit ends the conventional series."""
    conv_stopped = None
    bar = tqdm(point_jobs(cfg), desc=f"bench ({cfg.name})", unit="point")
    for which, mode, size, tile, reps in bar:
        runner = runners[which]
        eta = _eta(runners["default"], size) if mode == "streaming" else ""
        label = f"{mode} {size}² tile {tile or '-'} ×{reps}" + (f" ({VARIANTS[which]})" if which in VARIANTS else "")
        bar.set_postfix_str(f"{label} {eta}".strip())
        if mode == "conventional" and which == "default" and conv_stopped and size > conv_stopped:
            runner.cache[(mode, size, None)] = {"mode": mode, "size": size, "tile": None, "status": "skipped",
                                                "input_bytes": input_bytes(size),
                                                "reason": f"a smaller input ({conv_stopped}²) already did not fit",
                                                "plan": {}}
            continue
        point = runner.oracle(size) if mode == "oracle" else runner.point(mode, size, tile, reps)
        if point["status"] != "measured":
            tqdm.write(f"  {label}: {point['status']} — {point['reason']}")
            if mode == "conventional" and which == "default":
                conv_stopped = size


def _eta(runner: PointRunner, size: int) -> str:
    """A rough per-step time guess from the largest streaming point measured so far."""
    done = [p for (m, _, _), p in runner.cache.items() if m == "streaming" and p.get("status") == "measured"]
    if not done:
        return ""
    ref = max(done, key=lambda p: p["size"])
    return f"(~{ref['step_s'] * (size / ref['size']) ** 2:.0f} s/step)"


def collect(cfg: Config, runner: PointRunner, variants=None) -> dict:
    """Arrange the cached points by figure and derive extrapolations, breakdowns and targets."""
    get = runner.cache.get
    fig2_stream = [get(("streaming", cfg.fig2_input, t)) for t in cfg.fig2_tiles]
    fig2_conv = get(("conventional", cfg.fig2_input, None))
    fig3_stream = [get(("streaming", s, cfg.fig3_tile)) for s in cfg.fig3_sizes]
    fig3_conv = [get(("conventional", s, None)) for s in cfg.fig3_sizes]
    missing = [s for s, p in zip(cfg.fig3_sizes, fig3_conv) if p["status"] != "measured"]
    headline_size = cfg.headline_size
    measured_sizes = {p["size"] for p in analysis.measured(fig3_conv)}
    est_sizes = sorted((set(missing) | {headline_size}) - measured_sizes)
    est_mem = analysis.extrapolate(fig3_conv, est_sizes, "peak_bytes")
    est_time = analysis.extrapolate(fig3_conv, est_sizes, "step_s")
    estimated = [{"size": s, "peak_bytes": est_mem[s], "step_s": est_time[s]} for s in est_sizes if s in est_mem]
    breakdown = []
    for p in analysis.measured(fig2_stream):
        factor = analysis.overlap_factor(p["plan"], p["size"])
        row = {"tile": p["tile"], "overlap_factor": factor, "forward_s": p["forward_s"], "backward_s": p["backward_s"]}
        if fig2_conv.get("status") == "measured":
            row.update(analysis.time_breakdown(p, fig2_conv, factor))
        breakdown.append(row)
    return {
        "fig2": {"input": cfg.fig2_input, "streaming": fig2_stream, "conventional": fig2_conv, "breakdown": breakdown},
        "fig3": {"tile": cfg.fig3_tile, "streaming": fig3_stream, "conventional": fig3_conv,
                 "conventional_estimated": estimated},
        "headline": headline(cfg, get(("streaming", headline_size, cfg.fig3_tile)),
                             get(("conventional", headline_size, None)), estimated),
        "targets": analysis.targets(fig2_stream, fig2_conv),
        "grad_agreement": grad_agreement(runner),
        "allocator": allocator_rows(cfg, runner, variants),
    }


def allocator_rows(cfg: Config, runner: PointRunner, variants=None) -> dict:
    """The same Fig. 2 points with the defaults and with each variant (tuned malloc, one thread)."""
    rows = []
    for mode, tile in allocator_points(cfg) if variants else []:
        key = (mode, cfg.fig2_input, tile)
        rows.append({"mode": mode, "tile": tile, "default": runner.cache.get(key),
                     **{name: v.cache.get(key) for name, v in variants.items()}})
    return {"env": TUNED_MALLOC_ENV, "variants": VARIANTS, "rows": rows}


def headline(cfg: Config, stream: dict, conv, estimated) -> dict:
    """The big streaming step next to what conventional backprop would need."""
    est = next((e for e in estimated if e["size"] == cfg.headline_size), None)
    return {"size": cfg.headline_size, "tile": cfg.fig3_tile, "streaming": stream,
            "conventional_measured": conv if conv and conv.get("status") == "measured" else None,
            "conventional_extrapolated": est,
            "conventional_plan_bytes": analysis.plan_estimate(stream, "conventional")}


def grad_agreement(runner: PointRunner) -> list:
    """Every measured float32 point's gradient error against the float64 conventional oracle."""
    rows = []
    for (kind, size, _), oracle_point in sorted(runner.cache.items(), key=lambda kv: kv[0][1]):
        if kind != "oracle" or oracle_point["status"] != "measured":
            continue
        oracle = runner.grads_path("conventional", size, None, "float64")
        conv = runner.cache.get(("conventional", size, None))
        conv_err = (analysis.grad_errors(runner.grads_path("conventional", size, None), oracle)
                    if conv and conv["status"] == "measured" else None)
        for (mode, s, tile), p in sorted(runner.cache.items(), key=lambda kv: kv[0][2] or 0):
            if mode == "streaming" and s == size and p["status"] == "measured":
                rows.append({"size": size, "tile": tile, "conventional": conv_err,
                             "streaming": analysis.grad_errors(runner.grads_path(mode, size, tile), oracle),
                             "loss_streaming": p["loss"], "loss_float64": oracle_point["loss"]})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    started, load_start = time.perf_counter(), _load()
    device = pick_device()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    runner = PointRunner(cfg, device, reload=args.render_only)
    variants = {
        "tuned": PointRunner(dataclasses.replace(cfg, raw_dir=cfg.raw_dir / "tuned_malloc"), device,
                             TUNED_MALLOC_ENV, reload=args.render_only),
        "one_thread": PointRunner(dataclasses.replace(cfg, raw_dir=cfg.raw_dir / "one_thread", threads=1), device,
                                  reload=args.render_only),
    }
    if args.render_only:
        previous = json.loads((cfg.out_dir / "bench.json").read_text())
    else:
        measure_all(cfg, {"default": runner, **variants})
    results = {"schema": 1, "run": cfg.name, "machine": describe(device, cfg.threads),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}}
    results.update(collect(cfg, runner, variants))
    if args.render_only:  # keep what was measured then, not what this process sees now
        results.update({k: previous[k] for k in ("machine", "micro", "elapsed_s")})
    else:
        results["micro"] = {"skipped": "--no-micro"} if args.no_micro else run_micro(cfg)
        results["elapsed_s"] = time.perf_counter() - started
        results["machine"]["load_avg_1min_at_start"] = load_start
    write_outputs(cfg, results)
    verb = "re-rendered" if args.render_only else f"measured in {results['elapsed_s'] / 60:.1f} min and wrote"
    print(f"{verb} {cfg.out_dir / 'BENCH.md'}")
    return 0


def _load():
    """1-minute load average (other processes competing for the cores), or None."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def write_outputs(cfg: Config, results: dict) -> None:
    """bench.json, the two figures and BENCH.md into cfg.out_dir."""
    out = cfg.out_dir
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    machine = f"{results['machine']['cpu_model']}, {results['machine']['torch_threads']} threads, torch {results['machine']['torch']}"
    plots.draw_fig2(results["fig2"], out / FIG2_PNG, machine)
    plots.draw_fig3(results["fig3"], out / FIG3_PNG, machine, results["machine"]["mem_total_bytes"])
    (out / "BENCH.md").write_text(report.render(results, FIG2_PNG, FIG3_PNG))
