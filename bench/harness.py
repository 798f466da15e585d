"""Measure points under the protocol: one fresh worker process per attempt, re-measured when disturbed.

See bench.protocol for when a step counts as disturbed. Before every attempt the harness samples
the machine's load (and waits, up to a bound, for it to be quiet); after it, a point with fewer than
``reps`` undisturbed steps is measured again in a fresh process while the attempt bound and the
run's re-measure budget allow.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from bench import networks, protocol
from bench.config import FIXED_MMAP_ENV, REPO_ROOT, Config
from bench.guard import fit_reason, plan_point
from bench.worker import RESULT_PREFIX

# glibc malloc settings that serve every buffer from the heap and keep freed memory there: by default
# buffers above the mmap threshold (at most 32 MiB, however it is set) are mapped and unmapped for every
# tile, and each mapping costs fresh zero-filled pages. An opt-in, see BENCH.md's overhead section.
HEAP_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}
# OpenMP threads that sleep at a barrier instead of spinning: on cores shared with other programs a spinning
# thread can hold the core its partner needs; an opt-in, see BENCH.md's overhead section.
PASSIVE_OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
VARIANTS = {  # how a point is run: what users get, and the per-tile-overhead probes
    "default": {"label": "defaults", "env": {}, "threads": None},
    "heap_malloc": {"label": "malloc without mmap", "env": HEAP_MALLOC_ENV, "threads": None},
    "omp_passive": {"label": "passive OpenMP wait", "env": PASSIVE_OMP_ENV, "threads": None},
    "one_thread": {"label": "1 thread", "env": {}, "threads": 1},
}


class Key(NamedTuple):
    """What identifies a point (tile is None for conventional backprop and the oracle)."""

    network: str
    mode: str      # streaming | conventional | conventional_default | oracle
    size: int
    tile: object
    variant: str = "default"


def pick_device() -> str:
    """'cuda' when a GPU is visible to torch, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_worker(spec: dict, timeout_s: int, log_path=None, extra_env=None) -> dict:
    """Run bench.worker in a fresh interpreter; returns its result or {'error': ...}.

    The worker's stderr (tracebacks, warnings) is kept in ``log_path`` when given;
    ``extra_env`` (e.g. malloc settings) is added to its environment.
    """
    env = {**os.environ, **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if log_path:
        Path(log_path).write_text(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    why = "killed by signal 9 (out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode}"
    last = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no stderr"]
    return {"error": f"worker failed ({why}): {last[0]}" + (f" — full log: {log_path}" if log_path else "")}


def summarise(attempts: list, reps: int) -> dict:
    """A point's numbers from its best attempt: median over its undisturbed steps when it has
    ``reps`` of them (else over all its steps, and the point is marked disturbed). Forward/backward
    split, CPU time and page faults come from the median step itself, so they add up; memory is
    the largest peak over all the attempt's steps."""
    best = protocol.best_attempt([a["steps"] for a in attempts])
    steps = attempts[best]["steps"]
    used, clean = protocol.used_steps(steps, reps)
    mid = protocol.median_step(used)
    worst = lambda k: max((s[k] for s in used if s.get(k) is not None), default=None)  # noqa: E731
    reasons = list(dict.fromkeys(s["disturbed"] for s in steps if s.get("disturbed")))
    return {
        "status": "measured", "clean": clean, "reps": len(used),
        **{k: mid[k] for k in ("step_s", "forward_s", "backward_s", "cpu_s", "cpu_util", "page_faults")},
        "step_s_all": [s["step_s"] for s in used],
        "peak_bytes": max(s["peak_growth_bytes"] for s in steps),
        "peak_bytes_all": [s["peak_growth_bytes"] for s in steps],
        "host_peak_bytes": max(s["host_peak_growth_bytes"] for s in steps),
        "vmhwm_bytes": max(s["vmhwm_bytes"] for s in steps),
        "foreign_cores": worst("foreign_cores"), "steal_cores": worst("steal_cores"), "pressure": worst("pressure"),
        "attempts": len(attempts), "steps_timed": len(steps),
        "extra_steps": sum(len(a["steps"]) for a in attempts) - reps,
        "steps_disturbed": len(steps) - len(protocol.quiet_steps(steps)), "disturbances": reasons[:3],
        "before": attempts[best]["before"],
        "attempt_log": [{"steps": len(a["steps"]), "quiet_steps": len(protocol.quiet_steps(a["steps"])),
                         "wall_s": a["wall_s"], "before": a["before"]} for a in attempts],
        "loss": steps[-1]["loss"], "memory_method": steps[-1]["memory_method"], "layout": attempts[best]["layout"],
    }


def worker_spec(cfg: Config, key: Key, threads: int, device: str, **over) -> dict:
    """What bench.worker.measure needs to measure ``key`` under ``cfg``'s protocol; ``over`` replaces fields."""
    return {"network": key.network, "mode": key.mode, "size": key.size, "tile": key.tile, "reps": cfg.reps,
            "max_steps": cfg.max_steps, "warmup": "full", "seed": cfg.seed, "threads": threads,
            "cores": os.cpu_count() or 1, "foreign_cores": cfg.foreign_cores, "device": device, **over}


def fixed_mmap_memory(cfg: Config, key: Key, device: str) -> dict:
    """The point's peak memory once more, in a fresh process with glibc's mmap threshold fixed
    (config.FIXED_MMAP_ENV): the same warm-up, then one untimed step. Its peak does not depend on the
    process's allocation history, so it repeats from run to run where the timed steps' may not; and
    with freed buffers unmapped at once it is the peak of the live tensors plus library workspaces,
    what plan() models, without glibc's heap fragmentation (BENCH.md's allocator section)."""
    net = networks.get(key.network)
    points = net.points(cfg.name)
    big = key.size > points.full_warmup_max and key.mode == "streaming"
    spec = worker_spec(cfg, key, VARIANTS[key.variant]["threads"] or cfg.threads, device, reps=1, max_steps=1,
                       warmup="small" if big else "full", grads_path=None)
    log = cfg.raw_dir / f"worker_{key.network}_{key.mode}_{key.size}_{key.tile}_fixed_mmap.log"
    result = run_worker(spec, cfg.point_timeout_s, log, FIXED_MMAP_ENV)
    step = result["steps"][0] if "error" not in result else {}
    # the same keys either way, so a probe that succeeds on --resume replaces a failed one entirely
    return {"fixed_mmap_peak_bytes": step.get("peak_growth_bytes"), "fixed_mmap_env": FIXED_MMAP_ENV,
            "fixed_mmap_step_s": step.get("step_s"), "fixed_mmap_disturbed": step.get("disturbed"),
            "fixed_mmap_error": result.get("error")}


class PointRunner:
    """Measures each point once (results shared between figures), keeping every point in raw_dir/points.json."""

    def __init__(self, cfg: Config, device: str, resume_keys=()):
        self.cfg, self.device, self.cache = cfg, device, {}
        self.cores = os.cpu_count() or 1
        self.thresholds = protocol.Thresholds(foreign_cores=cfg.foreign_cores)
        self.remeasure_spent_s, self.remeasure_refused, self.waited_s = 0.0, 0, 0.0
        cfg.raw_dir.mkdir(parents=True, exist_ok=True)
        self.resumed = self._carry_over(set(resume_keys))
        keep = {self.grads_path(k, d) for k in self.cache for d in ("float32", "float64")}
        for stale in [*cfg.raw_dir.glob("grads_*.pt"), *cfg.raw_dir.glob("worker_*.log")]:
            if str(stale) not in keep:
                stale.unlink()  # from an earlier run: must not be mistaken for this run's
        self.save()

    def _carry_over(self, wanted: set) -> int:
        """Keep an interrupted run's clean points that this run wants (``--resume``); return how many.

        A disturbed or failed point is measured again; so is one whose saved gradients are gone."""
        path = self.cfg.raw_dir / "points.json"
        for point in json.loads(path.read_text()) if wanted and path.exists() else []:
            key = Key(*(point[f] for f in Key._fields))
            grads = Path(self.grads_path(key, "float64" if key.mode == "oracle" else "float32"))
            done = point["status"] == "skipped" or (
                point["status"] == "measured" and point.get("clean", True) and grads.exists())
            if key in wanted and done:
                self.cache[key] = {**point, "resumed": True}
        return len(self.cache)

    def grads_path(self, key: Key, dtype: str = "float32") -> str:
        return str(self.cfg.raw_dir / f"grads_{key.network}_{key.mode}_{key.size}_{key.tile}_{key.variant}_{dtype}.pt")

    def threads(self, variant: str) -> int:
        return VARIANTS[variant]["threads"] or self.cfg.threads

    def point(self, key: Key) -> dict:
        """The summary of one point: measured, skipped (would not fit) or failed."""
        if key not in self.cache:
            self.cache[key] = self._oracle(key) if key.mode == "oracle" else self._measure(key)
            self.save()
        if self._wants_fixed_mmap(key):  # also for a point carried over by --resume
            self.cache[key] = {**self.cache[key], **self._fixed_mmap_memory(key)}
            self.save()
        return self.cache[key]

    def _wants_fixed_mmap(self, key: Key) -> bool:
        """Whether a measured point still needs its memory-only probe (CPU only: glibc's allocator)."""
        point = self.cache[key]
        missing = point.get("fixed_mmap_peak_bytes") is None  # never probed, or the probe failed
        return (point["status"] == "measured" and key.mode != "oracle" and key.variant == "default" and missing
                and not self.device.startswith("cuda")
                and networks.get(key.network).points(self.cfg.name).fixed_mmap_memory)

    def _fixed_mmap_memory(self, key: Key) -> dict:
        return fixed_mmap_memory(self.cfg, key, self.device)

    def save(self) -> None:
        """Every point so far, in raw_dir/points.json, so a crash late in a long run loses nothing."""
        (self.cfg.raw_dir / "points.json").write_text(json.dumps(list(self.cache.values()), indent=1))

    def _record(self, key: Key, net, plan: dict) -> dict:
        return {**key._asdict(), "input_bytes": net.input_bytes(key.size), "plan": plan,
                "extra_env": VARIANTS[key.variant]["env"], "threads": self.threads(key.variant)}

    def reps(self, key: Key, points) -> tuple[int, int]:
        """(timed steps, most steps) for a point: the protocol's, except a headline step that
        ``points.headline_reps`` limits (one step of a long step is all a run can afford)."""
        if points.headline_reps and key.mode == "streaming" and key.size == points.headline_size:
            return points.headline_reps, points.headline_reps
        return self.cfg.reps, self.cfg.max_steps

    def _spec(self, key: Key, net, points, **over) -> dict:
        big = key.size > points.full_warmup_max and key.mode == "streaming"
        reps, max_steps = self.reps(key, points)
        return worker_spec(self.cfg, key, self.threads(key.variant), self.device, **{
            "reps": reps, "max_steps": max_steps, "warmup": "small" if big else "full",
            "grads_path": self.grads_path(key), **over})

    def _oracle(self, key: Key) -> dict:
        """Conventional backprop in float64: the reference the float32 gradients are judged by (not timed)."""
        net = networks.get(key.network)
        points = net.points(self.cfg.name)
        plan = plan_point(net, key.size, min(key.size, points.fig3_tile), self.cfg.seed)
        f64 = {"conventional_peak_bytes": 2 * plan["conventional_peak_bytes"]} if "error" not in plan else plan
        record = {**self._record(key, net, {}), "tile": None}
        reason = fit_reason("conventional", key.size, self.device, f64, self.cfg, net.input_bytes(key.size))
        if reason:
            return {**record, "status": "skipped", "reason": reason}
        spec = self._spec(key, net, points, mode="conventional", warmup="none", dtype="float64", reps=1, max_steps=1,
                          grads_path=self.grads_path(key, "float64"))
        result = run_worker(spec, self.cfg.point_timeout_s, self.cfg.raw_dir / f"worker_{key.network}_oracle_{key.size}.log")
        if "error" in result:
            return {**record, "status": "failed", "reason": result["error"]}
        return {**record, "status": "measured", "loss": result["steps"][-1]["loss"]}

    def _measure(self, key: Key) -> dict:
        net = networks.get(key.network)
        points = net.points(self.cfg.name)
        plan = plan_point(net, key.size, key.tile or min(key.size, points.fig3_tile), self.cfg.seed)
        record = self._record(key, net, plan)
        reason = fit_reason(key.mode, key.size, self.device, plan, self.cfg, net.input_bytes(key.size))
        if reason:
            return {**record, "status": "skipped", "reason": reason}
        spec = self._spec(key, net, points)
        attempts = self._attempts(key, spec)
        if isinstance(attempts, str):
            return {**record, "status": "failed", "reason": attempts}
        return {**record, **summarise(attempts, spec["reps"])}

    def _attempts(self, key: Key, spec: dict):
        """Run the point until one attempt is clean or the bound/budget says stop; a str on failure."""
        cfg, threads, attempts = self.cfg, spec["threads"], []
        reps = spec.get("reps", cfg.reps)
        log = cfg.raw_dir / f"worker_{key.network}_{key.mode}_{key.size}_{key.tile}_{key.variant}.log"
        while True:
            max_wait = min(cfg.quiet_wait_s, max(0.0, cfg.quiet_wait_budget_s - self.waited_s))
            before = protocol.wait_for_quiet(threads, self.cores, self.thresholds, cfg.quiet_sample_s, max_wait)
            self.waited_s += before.get("waited_s", 0.0)
            t0 = time.perf_counter()
            result = run_worker(spec, cfg.point_timeout_s, log, VARIANTS[key.variant]["env"])
            wall = time.perf_counter() - t0
            if "error" in result:
                return result["error"] if not attempts else attempts
            attempts.append({"steps": result["steps"], "wall_s": wall, "before": before, "layout": result["layout"]})
            extra = sum(s["step_s"] for s in result["steps"][reps:])  # steps beyond the minimum
            self.remeasure_spent_s += extra + (wall if len(attempts) > 1 else 0)
            if protocol.attempt_ok(result["steps"], reps):
                return attempts
            if not protocol.may_remeasure(len(attempts), cfg.max_attempts, self.remeasure_spent_s,
                                          cfg.remeasure_budget_s, wall):
                self.remeasure_refused += len(attempts) < cfg.max_attempts  # stopped by the budget, not the bound
                return attempts
