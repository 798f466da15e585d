"""Orchestrates ``python -m bench``: measure every point under the protocol, derive, then write the reports
(bench.render), or with ``--render-only`` only the last two."""
import argparse
import dataclasses
import time
from pathlib import Path

from tqdm import tqdm

from bench import analysis, compare, networks, render, report, slide
from bench.config import FULL, QUICK, REPO_ROOT, REPORTS, Config
from bench.harness import VARIANTS, Key, PointRunner, pick_device
from bench.jobs import GROUPS, interleave, network_jobs, select
from bench.machine import describe
from bench.micro import run_micro


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Streaming vs conventional backprop on this machine (the paper's Figs. 2 and 3, per network): "
                    "writes figures, bench.json and BENCH.md into reports/, and compares them with the committed run.")
    ap.add_argument("--quick", action="store_true",
                    help="small smoke run (a few minutes); writes to reports/_raw/quick/ instead of reports/")
    ap.add_argument("--no-micro", action="store_true", help="skip the pytest-benchmark micro-benchmarks")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: recompute every derived number from bench.json's points and redraw")
    ap.add_argument("--repeat", metavar="GROUPS",
                    help=f"second run: measure again only these point groups (comma-separated, of {', '.join(GROUPS)}),"
                         " compare them with reports/bench.json and add that table to it and to BENCH.md")
    ap.add_argument("--resume", action="store_true",
                    help="keep the clean points an interrupted run of the same kind left in its points.json "
                         "and measure only the rest (the report says how many were carried over)")
    ap.add_argument("--list", action="store_true", help="print the points this run would measure, in order, and exit")
    ap.add_argument("--network", action="append", choices=sorted(networks.NETWORKS),
                    help="measure only this network (repeatable; default: all registered)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per point (default: all cores); the report records it")
    return ap.parse_args(argv)


def make_config(args) -> Config:
    cfg = QUICK if args.quick else FULL
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.network:
        cfg = dataclasses.replace(cfg, networks=tuple(args.network))
    if args.repeat:
        cfg = dataclasses.replace(cfg, raw_dir=cfg.raw_dir.parent / f"{cfg.name}_repeat")
    return cfg


def unavailable(cfg: Config) -> dict:
    """{network: why} for the run's networks whose builder does not import here."""
    return {name: why for name in cfg.networks if (why := networks.get(name).unavailable())}


def all_jobs(cfg: Config, device: str) -> dict:
    """{Key: groups} for every available network of the run; unavailable networks are announced and left out."""
    jobs, missing = {}, unavailable(cfg)
    for name in cfg.networks:
        if name in missing:
            print(f"bench: skipping network {name}: {missing[name]}")
            continue
        pts = networks.get(name).points(cfg.name)
        jobs.update(network_jobs(name, pts, default_layout_differs=not device.startswith("cuda")))
    return jobs


def measure_all(cfg: Config, runner: PointRunner, jobs: dict) -> None:
    """Measure every job in interleaved order (results land in the runner's cache)."""
    bar = tqdm(interleave(jobs, cfg.seed), desc=f"bench ({cfg.name})", unit="point")
    for key in bar:
        label = f"{key.network} {key.mode} {key.size}² tile {key.tile or '-'}" + (
            f" ({VARIANTS[key.variant]['label']})" if key.variant != "default" else "")
        bar.set_postfix_str(label)
        point = runner.point(key)
        if point["status"] != "measured":
            tqdm.write(f"  {label}: {point['status']} — {point['reason']}")
        elif not point.get("clean", True):
            tqdm.write(f"  {label}: disturbed after {point['attempts']} attempt(s) — {point['disturbances'][0]}")


def grad_agreement(runner: PointRunner, network: str) -> list:
    """Every measured float32 point's gradient error against the float64 conventional oracle at its size."""
    rows, cache = [], runner.cache
    for key, oracle in sorted(cache.items(), key=lambda kv: kv[0].size):
        if key.network != network or key.mode != "oracle" or oracle["status"] != "measured":
            continue
        oracle_path = runner.grads_path(key, "float64")
        conv_key = Key(network, "conventional", key.size, None)
        conv_err = (analysis.grad_errors(runner.grads_path(conv_key), oracle_path)
                    if analysis.ok(cache.get(conv_key)) else None)
        for k, p in sorted(cache.items(), key=lambda kv: kv[0].tile or 0):
            if k.network == network and k.mode == "streaming" and k.size == key.size and k.variant == "default" \
                    and analysis.ok(p):
                rows.append({"size": key.size, "tile": k.tile, "conventional": conv_err,
                             "streaming": analysis.grad_errors(runner.grads_path(k), oracle_path),
                             "loss_streaming": p["loss"], "loss_float64": oracle["loss"]})
    return rows


def network_results(cfg: Config, name: str, runner: PointRunner) -> dict:
    """One network's section of bench.json: its point list, its derived numbers and its gradient check."""
    net = networks.get(name)
    points = dataclasses.asdict(net.points(cfg.name))
    records = [p for k, p in runner.cache.items() if k.network == name]
    return {"title": net.title, "figures": net.figures(), "points_config": points, "points": records,
            "paper": net.paper,
            "analysis": analysis.analyse(points, records), "grad_agreement": grad_agreement(runner, name)}


def protocol_record(cfg: Config, runner: PointRunner) -> dict:
    return {"reps": cfg.reps, "max_steps": cfg.max_steps, "max_attempts": cfg.max_attempts,
            "remeasure_budget_s": cfg.remeasure_budget_s, "remeasure_spent_s": runner.remeasure_spent_s,
            "remeasure_refused_by_budget": runner.remeasure_refused, "foreign_cores": cfg.foreign_cores,
            "quiet_sample_s": cfg.quiet_sample_s, "quiet_wait_s": cfg.quiet_wait_s,
            "quiet_wait_budget_s": cfg.quiet_wait_budget_s, "waited_s": runner.waited_s, "order_seed": cfg.seed,
            "cores": runner.cores, "resumed_points": runner.resumed}


def full_run(cfg: Config, args, device: str, started: float) -> dict:
    machine = describe(device, cfg.threads)
    reference, label = compare.load_reference(REPORTS / "bench.json", REPO_ROOT)  # quick runs compare what they can
    jobs = all_jobs(cfg, device)
    runner = PointRunner(cfg, device, resume_keys=jobs if args.resume else ())
    measure_all(cfg, runner, jobs)
    results = {"schema": compare.SCHEMA, "run": cfg.name, "machine": machine,
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
               "protocol": protocol_record(cfg, runner), "unavailable": unavailable(cfg),
               "networks": {n: network_results(cfg, n, runner) for n in cfg.networks if any(k.network == n for k in jobs)}}
    analysis.rederive(results)
    results["slide"] = slide.merge([slide.measure(side, cfg.threads) for side in cfg.slide_sides],
                                   cfg.out_dir / "slide.json")
    results["micro"] = {"skipped": "--no-micro"} if args.no_micro else run_micro(cfg)
    results["comparison"] = (compare.compare(results, reference, label) if reference
                             else {"reference": label, "rows": [], "missing": True})
    results["elapsed_s"] = time.perf_counter() - started
    return results


def second_run(cfg: Config, args, device: str, started: float) -> dict:
    """Measure the selected groups again and add the comparison with the stored run to its bench.json."""
    path = cfg.out_dir / "bench.json"
    results = render.load_results(path, "--repeat compares with it")
    groups = [g.strip() for g in args.repeat.split(",") if g.strip()]
    jobs = {}
    for name, net in results["networks"].items():  # the stored run's own points, whatever the registry says now
        if name not in cfg.networks:
            continue
        jobs.update(network_jobs(name, networks.Points(**net["points_config"]), not device.startswith("cuda")))
    jobs = select(jobs, groups)
    runner = PointRunner(cfg, device, resume_keys=jobs if args.resume else ())
    measure_all(cfg, runner, jobs)
    records = list(runner.cache.values())
    results["second_run"] = {"groups": groups, "machine": describe(device, cfg.threads),
                             "protocol": protocol_record(cfg, runner), "points": records,
                             "quiet": analysis.quiet_summary(records),
                             "elapsed_s": time.perf_counter() - started}
    return analysis.rederive(results)  # adds the second run's comparison


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    started = time.perf_counter()
    if args.list:
        return list_points(cfg, args)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = render.rerender(cfg.out_dir)
        print(f"re-rendered {cfg.out_dir / 'BENCH.md'}")
        return _exit_status(results)
    print(destination(cfg), flush=True)
    results = (second_run if args.repeat else full_run)(cfg, args, pick_device(), started)
    render.write(cfg.out_dir, results)
    comp = (results.get("second_run") or {}).get("comparison") if args.repeat else results.get("comparison")
    if comp is not None:
        print("\n" + report.comparison_text(comp))
    print(f"measured in {(time.perf_counter() - started) / 60:.1f} min and wrote {cfg.out_dir / 'BENCH.md'}")
    print(destination(cfg) + "; " + scratch_size(cfg))
    return _exit_status(results)


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it (as a user types it), with a slash."""
    path = Path(path).resolve()
    return f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}/"


def destination(cfg: Config) -> str:
    """Where a measuring run writes, said when it starts and again when it ends."""
    if cfg.out_dir == cfg.raw_dir:  # a quick run: nothing lands in reports/ itself
        return (f"bench: this {cfg.name} run writes its BENCH.md, bench.json, figures and scratch (saved "
                f"gradients, worker logs) into {_shown(cfg.out_dir)}, not into reports/")
    return (f"bench: writes BENCH.md, bench.json and figures into {_shown(cfg.out_dir)}, scratch (saved "
            f"gradients, worker logs) into {_shown(cfg.raw_dir)}")


def scratch_size(cfg: Config) -> str:
    """How much the run's scratch folder holds now, and how to remove it."""
    files = [f for f in Path(cfg.raw_dir).rglob("*") if f.is_file()] if Path(cfg.raw_dir).exists() else []
    size = sum(f.stat().st_size for f in files)
    return f"{_shown(cfg.raw_dir)} holds {size / 1e6:.0f} MB (rm -r {_shown(cfg.raw_dir)} removes it)"


def _exit_status(results: dict) -> int:
    """1 when a measurement crashed (a bug, not a point that did not fit): CI must see it."""
    points = [p for net in results["networks"].values() for p in net["points"]]
    points += [r for r in (results.get("slide") or {}).values()]
    failed = [p for p in points if p.get("status") == "failed" or p.get("fixed_mmap_error")]
    for p in failed:
        print(f"bench: a measurement failed: {p.get('network', 'slide')} {p.get('mode', '')} "
              f"{p.get('size', p.get('side'))}: {(p.get('reason') or p.get('fixed_mmap_error') or '')[:300]}")
    return 1 if failed else 0


def list_points(cfg: Config, args) -> int:
    """Print the run's points in measuring order (what --repeat would select, when given)."""
    jobs = all_jobs(cfg, pick_device())
    if args.repeat:
        jobs = select(jobs, [g.strip() for g in args.repeat.split(",") if g.strip()])
    for i, key in enumerate(interleave(jobs, cfg.seed), 1):
        print(f"{i:3d}  {key.network:10s} {key.mode:21s} {key.size:6d}² tile {str(key.tile or '-'):5s} "
              f"{key.variant:13s} [{', '.join(sorted(jobs[key]))}]")
    return 0
