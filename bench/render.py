"""Writes a results dict out as reports: bench.json, every figure and BENCH.md; and re-renders them
from the stored JSON without measuring (``python -m bench --render-only``, and each study's command
line once it has stored its records)."""
import json
from pathlib import Path

from bench import analysis, dedup_plot, plots, report
from bench.compare import SCHEMA
from bench.config import REPORTS

# records each written by its own command (slide.json also by every run), shown in BENCH.md when present:
# python -m bench.slide, bench.allocator, bench.calibration, bench.training_norm, bench.dedup, bench.speed, bench.dense,
# bench.levels, bench.overlap
STUDIES = ("slide", "allocator", "update_bn", "training_norm", "dedup", "speed", "dense", "levels", "overlap")


def load_results(path: Path, why: str) -> dict:
    """A bench.json written with the measurement protocol, or an error saying how to get one."""
    hint = "run `python -m bench` (`make bench`) first"
    if not path.exists():
        raise SystemExit(f"{path} does not exist ({why}): {hint}")
    results = json.loads(path.read_text())
    if results.get("schema", 1) < SCHEMA:
        raise SystemExit(f"{path} has schema {results.get('schema', 1)}, from before the measurement protocol "
                         f"({why}): {hint}")
    return results


def write(out_dir: Path, results: dict) -> None:
    """bench.json (with the studies' records found in ``out_dir``), each network's two figures, the
    dedup figure and BENCH.md into ``out_dir``."""
    for name in STUDIES:
        if (out_dir / f"{name}.json").exists():
            results[name] = json.loads((out_dir / f"{name}.json").read_text())
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    m = results["machine"]
    machine = f"{m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}"
    for net in results["networks"].values():
        plots.draw_fig2(net, out_dir / net["figures"]["fig2"], machine)
        plots.draw_fig3(net, out_dir / net["figures"]["fig3"], machine, m["mem_total_bytes"])
    dedup_plot.figure(results.get("dedup") or {}, out_dir / "dedup.png")  # before BENCH.md, which shows it if drawn
    (out_dir / "BENCH.md").write_text(report.render(results))


def rerender(out_dir: Path = REPORTS) -> dict:
    """Recompute every derived number from ``out_dir``'s bench.json and write the reports again."""
    results = analysis.rederive(load_results(out_dir / "bench.json", "--render-only redraws it"))
    write(out_dir, results)
    return results
