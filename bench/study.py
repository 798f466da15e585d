"""What the one-off studies (a slide from disk, dedup, update_bn, training-mode BatchNorm) share: a
measurement in a fresh process, read back as one JSON line, a JSON file of records, and the cells
their BENCH.md sections show.

A study's worker runs in its own process so that its peak resident memory (VmHWM) is its own;
it samples the machine's CPU accounting around the measured call (``bench.protocol``) so that
other work competing for the cores is reported beside the number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench import protocol
from bench.config import REPORTS

ROOT = Path(__file__).resolve().parent.parent


def in_fresh_process(module: str, args: list, timeout_s: int, key: dict) -> dict:
    """Run ``python -m module --worker *args``; its last stdout line is the record (a failure
    becomes a record with ``status`` "failed" and the end of stderr)."""
    cmd = [sys.executable, "-m", module, "--worker", *map(str, args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**key, "status": "failed", "reason": f"timed out after {timeout_s} s"}
    if done.returncode:
        return {**key, "status": "failed", "reason": done.stderr.strip()[-2000:]}
    return {"status": "measured", **json.loads(done.stdout.strip().splitlines()[-1])}


def training_step(model, label):
    """``step(image)``: one training step of ``model`` (cross-entropy against ``label``) as
    (loss, forward seconds, backward seconds)."""
    import torch.nn as nn

    def step(image):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(image), label)
        t1 = time.perf_counter()
        loss.backward()
        return loss.item(), t1 - t0, time.perf_counter() - t1
    return step


def timed(call, threads: int) -> tuple[object, dict]:
    """``call()``'s result and its seconds, CPU window and disturbance verdict."""
    before = protocol.sample()
    t0 = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - t0
    win = protocol.window(before, protocol.sample())
    return result, {"seconds": seconds, "cpu_window": win,
                    "disturbance": protocol.disturbance(win, threads, os.cpu_count() or 1,
                                                        protocol.Thresholds())}


def merge(path: Path, records: list, key) -> dict:
    """``path`` with these records replacing those of the same key (others kept as measured)."""
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.update({str(key(r)): r for r in records})
    path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    return stored


def cpu_use(record: dict) -> str:
    """CPU time over wall time × threads, as a table cell."""
    win = record.get("cpu_window") or {}
    if not win.get("wall_s"):
        return "–"
    return f"{win.get('own_cpu_s', 0) / (win['wall_s'] * record['threads']):.2f}"


def passes(stats) -> dict:
    """A ``Streaming.last_stats`` as a record: each pass's tiles, computed tiles, reads and
    read / wait / compute seconds."""
    return {name: {**asdict(p), "compute_s": p.compute_s}
            for name, p in (("forward", stats.forward), ("backward", stats.backward))}


def time_split(record: dict) -> str:
    """Read / wait / compute seconds of the forward; of the backward, as a table cell."""
    if not record.get("passes"):
        return "–"
    return "; ".join(f"{p['read_s']:.1f} / {p['wait_s']:.1f} / {p['compute_s']:.1f}"
                     for p in (record["passes"]["forward"], record["passes"]["backward"]))


def quiet(record: dict) -> str:
    return ("disturbed: " + record["disturbance"]) if record.get("disturbance") else "quiet"


def parser(prog: str, doc: str, sides: list) -> argparse.ArgumentParser:
    """A study's command line: image sides, ``--threads``, and the hidden ``--worker``."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.splitlines()[0])
    ap.add_argument("sides", nargs="*", type=int, default=sides)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return ap


def point_parser(prog: str, doc: str, only: str) -> argparse.ArgumentParser:
    """The command line of a study of named points, each run in a fresh process: the hidden
    worker's arguments (network, side, ``--worker``, ``--mode``, ``--tile``), ``--only``
    (``only`` says how a point is named) and ``--threads``."""
    ap = argparse.ArgumentParser(prog=prog, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("net", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("side", nargs="?", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--only", action="append", help=f"measure only these points ({only})")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return ap


def finish(path: Path, records: list, key, describe) -> int:
    """Merge the records into ``path``, print a line per record, and re-render reports/ when
    ``path`` is one of its files and the results it re-renders from exist."""
    merge(path, records, key)
    for r in records:
        said = describe(r) if r.get("status") == "measured" else (r.get("reason") or "")[-300:]
        print(f"{key(r)}: {r.get('status')} {said}")
    if path.parent == REPORTS and (REPORTS / "bench.json").exists():
        rerender()
    return 0


def rerender() -> None:
    """``python -m bench --render-only`` in a process of its own: BENCH.md's renderer imports every
    study's section, so a study reaches it through the command line, never by an import."""
    subprocess.run([sys.executable, "-m", "bench", "--render-only"], cwd=ROOT, check=True)
