"""Launch one worker subprocess per point; skip points that would not fit in memory."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.config import REPO_ROOT, Config
from bench.memory import mem_available_bytes
from bench.network import build_network, input_bytes, input_shape
from bench.worker import RESULT_PREFIX

GIB = 2**30
LIBRARY_OVERHEAD_BYTES = GIB // 2  # torch + numpy loaded in the worker
# glibc malloc settings that keep tile-sized buffers (up to glibc's 32 MiB mmap ceiling) in the heap
# between tiles instead of mmap/munmap-ing them for every tile; see report "allocator" section.
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)}
PLAN_SAFETY_FACTOR = 2.0  # plan() counts tensors only; CPU conv workspaces add up to ~1.7x (measured)


def pick_device() -> str:
    """'cuda' when a GPU is visible to torch, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def plan_point(size: int, tile: int, seed: int) -> dict:
    """streamcnn.plan() for the benchmark network as a JSON-able dict (with 'text' = its str)."""
    from streamcnn import plan

    try:
        p = plan(build_network(seed), input_shape(size), tile)
    except (ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    fields = {f.name: _jsonable(getattr(p, f.name)) for f in dataclasses.fields(p)}
    return {**fields, "text": str(p)}


def available_bytes(device: str) -> int:
    """Memory a new point may use now: free GPU memory, or the OS's MemAvailable."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    return mem_available_bytes()


def needed_bytes(mode: str, size: int, device: str, plan: dict) -> int:
    """Bytes a point is expected to need: input + plan()'s step estimate (with margin) + libraries."""
    key = f"{mode}_peak_bytes"
    if plan.get(key) is None:
        raise ValueError(f"plan() gave no {key} for size {size}: {plan.get('error', 'missing field')}")
    step = plan[key] - input_bytes(size)  # plan() counts the input too
    libraries = 0 if device.startswith("cuda") else LIBRARY_OVERHEAD_BYTES
    return int(input_bytes(size) + PLAN_SAFETY_FACTOR * step + libraries)


def fit_reason(mode: str, size: int, device: str, plan: dict, cfg: Config):
    """None if the point should fit in memory now, else a sentence saying why it is skipped."""
    try:
        need = needed_bytes(mode, size, device, plan)
    except ValueError as err:
        return str(err)
    have = available_bytes(device) - cfg.memory_margin_bytes
    if need > have:
        return (f"needs ~{need / GIB:.1f} GiB (input + {PLAN_SAFETY_FACTOR}x plan() estimate"
                f" + libraries) but only {max(have, 0) / GIB:.1f} GiB are available")
    return None


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


def summarise(result: dict) -> dict:
    """The median step (by step time; its forward/backward split, CPU time and page faults come
    from that same step, so they add up) and the worst peak memory over all measured steps."""
    steps = result["steps"]
    mid = sorted(steps, key=lambda st: st["step_s"])[(len(steps) - 1) // 2]
    return {
        "status": "measured",
        "reps": len(steps),
        **{k: mid[k] for k in ("step_s", "forward_s", "backward_s", "cpu_s", "page_faults")},
        "step_s_all": [st["step_s"] for st in steps],
        "peak_bytes": max(st["peak_growth_bytes"] for st in steps),
        "peak_bytes_all": [st["peak_growth_bytes"] for st in steps],
        "loss": steps[-1]["loss"],
        "memory_method": result["memory_method"],
    }


class PointRunner:
    """Measures (mode, size, tile) points once each, reusing results shared between figures."""

    def __init__(self, cfg: Config, device: str, extra_env=None, reload: bool = False):
        """``reload``: take the points of the last run from raw_dir/points.json instead of starting afresh."""
        self.cfg, self.device, self.cache, self.extra_env = cfg, device, {}, dict(extra_env or {})
        cfg.raw_dir.mkdir(parents=True, exist_ok=True)
        if reload:
            points = json.loads((cfg.raw_dir / "points.json").read_text())
            self.cache = {tuple(p.pop("key")): p for p in points}
            return
        for stale in [*cfg.raw_dir.glob("grads_*.pt"), *cfg.raw_dir.glob("worker_*.log"), cfg.raw_dir / "points.json"]:
            stale.unlink(missing_ok=True)  # from an earlier run: must not be mistaken for this run's

    def grads_path(self, mode: str, size: int, tile, dtype: str = "float32") -> str:
        return str(self.cfg.raw_dir / f"grads_{mode}_{size}_{tile}_{dtype}.pt")

    def oracle(self, size: int) -> dict:
        """Conventional backprop in float64 at ``size``: the reference the float32 gradients are judged by."""
        key = ("oracle", size, None)
        if key not in self.cache:
            plan = plan_point(size, min(size, self.cfg.fig3_tile), self.cfg.seed)
            f64 = {"conventional_peak_bytes": 2 * plan["conventional_peak_bytes"]} if "error" not in plan else plan
            reason = fit_reason("conventional", size, self.device, f64, self.cfg)
            record = {"mode": "oracle", "size": size, "tile": None, "input_bytes": input_bytes(size), "plan": {}}
            if reason:
                self.cache[key] = {**record, "status": "skipped", "reason": reason}
            else:
                spec = {**self.spec("conventional", size, None, 1), "warmup": "none", "dtype": "float64",
                        "grads_path": self.grads_path("conventional", size, None, "float64")}
                result = run_worker(spec, self.cfg.point_timeout_s, self.cfg.raw_dir / f"worker_oracle_{size}.log")
                self.cache[key] = ({**record, "status": "failed", "reason": result["error"]} if "error" in result
                                   else {**record, "status": "measured", "loss": result["steps"][-1]["loss"]})
            self.save()
        return self.cache[key]

    def spec(self, mode: str, size: int, tile, reps: int) -> dict:
        warmup = "full" if size <= self.cfg.full_warmup_max or mode == "conventional" else "small"
        return {"mode": mode, "size": size, "tile": tile, "reps": reps, "warmup": warmup,
                "seed": self.cfg.seed, "threads": self.cfg.threads, "device": self.device,
                "grads_path": self.grads_path(mode, size, tile)}

    def point(self, mode: str, size: int, tile=None, reps=None) -> dict:
        """The summary of one point: measured, skipped (would not fit) or failed."""
        tile = tile if mode == "streaming" else None
        key = (mode, size, tile)
        if key not in self.cache:
            self.cache[key] = self._measure(mode, size, tile, reps or self.cfg.reps)
            self.save()
        return self.cache[key]

    def save(self) -> None:
        """Every point so far, in raw_dir/points.json, so a crash late in a long run loses nothing."""
        points = [{"key": list(k), **v} for k, v in self.cache.items()]
        (self.cfg.raw_dir / "points.json").write_text(json.dumps(points, indent=1))

    def _measure(self, mode: str, size: int, tile, reps: int) -> dict:
        plan = plan_point(size, tile or min(size, self.cfg.fig3_tile), self.cfg.seed)
        record = {"mode": mode, "size": size, "tile": tile, "input_bytes": input_bytes(size), "plan": plan,
                  "extra_env": self.extra_env, "threads": self.cfg.threads}
        reason = fit_reason(mode, size, self.device, plan, self.cfg)
        if reason:
            return {**record, "status": "skipped", "reason": reason}
        log = self.cfg.raw_dir / f"worker_{mode}_{size}_{tile}.log"
        result = run_worker(self.spec(mode, size, tile, reps), self.cfg.point_timeout_s, log, self.extra_env)
        if "error" in result:
            return {**record, "status": "failed", "reason": result["error"]}
        return {**record, **summarise(result)}
