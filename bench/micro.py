"""Run the pytest-benchmark micro-benchmarks and reduce their JSON to a table."""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.config import REPO_ROOT, Config

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
TEST_FILE = Path(__file__).with_name("test_micro_reference.py")


def run_micro(cfg: Config) -> dict:
    """Run bench/test_micro_reference.py in a single-threaded pytest subprocess.

    One thread for torch and for NumPy's BLAS: these ops are tiny, so thread wake-up
    latency (large on a busy 2-core machine) would otherwise dominate torch's timings
    and the ratio would measure scheduling, not the algorithms.
    Returns {'rows': [...], ...} or {'error': ...}.
    """
    json_path = cfg.raw_dir / "micro_benchmark.json"
    json_path.unlink(missing_ok=True)
    env = {**os.environ, **{v: "1" for v in THREAD_VARS}}
    cmd = [sys.executable, "-m", "pytest", str(TEST_FILE), "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO_ROOT),
           f"--benchmark-json={json_path}", f"--benchmark-max-time={cfg.micro_max_time}",
           "--benchmark-min-rounds=3", "--benchmark-columns=median,iqr,rounds"]
    code = subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode
    if not json_path.exists():
        return {"error": f"pytest exited with {code} and wrote no benchmark JSON"}
    summary = summarise_micro(json.loads(json_path.read_text()))
    summary["threads"] = 1
    if code != 0:
        summary["error"] = f"pytest exited with {code} (a case failed or was skipped)"
    return summary


def summarise_micro(data: dict) -> dict:
    """pytest-benchmark JSON -> rows of (case, op, reference median, torch median, ratio)."""
    medians = {}
    for bench in data.get("benchmarks", []):
        info = bench["extra_info"]
        medians[(info["case"], info["op"], info["impl"])] = bench["stats"]["median"]
    rows = []
    for case, op in sorted({(c, o) for c, o, _ in medians}):
        ref, tor = medians.get((case, op, "reference")), medians.get((case, op, "torch"))
        rows.append({"case": case, "op": op, "reference_s": ref, "torch_s": tor,
                     "ratio": ref / tor if ref and tor else None})
    return {"rows": rows, "machine_info": data.get("machine_info", {}).get("cpu", {}).get("brand_raw")}
