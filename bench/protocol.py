"""The measurement protocol's rules: which timed steps count as undisturbed, and when a point is measured again.

Competition for the cores is measured, not guessed. Around every timed step the worker reads the
machine's CPU accounting (``/proc/stat``: busy time of all cores, the hypervisor's *steal* included)
and its own process CPU time; **foreign CPU** = machine busy − own, i.e. what other programs (and, on
a virtual machine, other guests) took while the step ran. A step is *disturbed* when foreign CPU
exceeds what the cores our threads leave free could absorb, by more than ``Thresholds.foreign_cores``
(plus two clock ticks per core of resolution slack, which matters for short steps only). The CPU
pressure stall share (``/proc/pressure/cpu``, where available) and the process's CPU time over
wall time × threads are recorded beside it.

A point needs ``reps`` undisturbed steps. The worker adds extra steps (up to ``max_steps``) while it
has fewer; if it still has fewer, the harness measures the point again in a fresh process
(up to ``max_attempts`` in all, and only while the run's re-measure time budget lasts), and keeps
the attempt with most undisturbed steps. A point that never got enough is reported as disturbed.

Nothing here imports torch: the rules are pure functions of samples, testable with fake numbers.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

_USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# /proc/stat cpu columns: user nice system idle iowait irq softirq steal guest guest_nice
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)  # guest time is already inside user/nice
_STEAL_COLUMN = 7
TICK_SLACK = 2  # clock ticks per core: /proc/stat's resolution, allowed on top of the threshold


@dataclass(frozen=True)
class CpuSample:
    """CPU accounting at one instant (all times in seconds since boot or process start)."""

    wall: float                 # time.perf_counter()
    own_s: float                # this process's CPU time, all threads (time.process_time())
    busy_s: float | None        # all cores' busy time, steal included (None: no /proc/stat)
    steal_s: float | None       # time the hypervisor ran other guests on our cores
    pressure_s: float | None    # PSI cpu "some": time at least one runnable task waited for a core


@dataclass(frozen=True)
class Thresholds:
    """When other work counts as competing with a measurement."""

    foreign_cores: float = 0.15  # cores other work may use beyond those our threads leave free


def parse_proc_stat(text: str, hz: int = _USER_HZ) -> tuple[float, float]:
    """(busy seconds, steal seconds) of all cores from a /proc/stat text."""
    first = text.splitlines()[0].split()
    if first[0] != "cpu":
        raise ValueError(f"/proc/stat does not start with the all-cores 'cpu' line: {first[:1]}")
    ticks = [int(v) for v in first[1:]] + [0] * 10
    return sum(ticks[i] for i in _BUSY_COLUMNS) / hz, ticks[_STEAL_COLUMN] / hz


def parse_pressure(text: str) -> float:
    """Total 'some' CPU stall time in seconds from a /proc/pressure/cpu text."""
    for line in text.splitlines():
        if line.startswith("some "):
            fields = dict(f.split("=") for f in line.split()[1:])
            return int(fields["total"]) / 1e6
    raise ValueError("no 'some' line in /proc/pressure/cpu")


def _read(path: str, parse):
    try:
        with open(path) as fh:
            return parse(fh.read())
    except (OSError, ValueError, KeyError, IndexError):
        return None


def sample() -> CpuSample:
    """Read the machine's and this process's CPU accounting now."""
    stat = _read("/proc/stat", parse_proc_stat)
    return CpuSample(wall=time.perf_counter(), own_s=time.process_time(),
                     busy_s=stat[0] if stat else None, steal_s=stat[1] if stat else None,
                     pressure_s=_read("/proc/pressure/cpu", parse_pressure))


def _rate(a, b, wall):
    return None if a is None or b is None or wall <= 0 else max(0.0, b - a) / wall


def window(a: CpuSample, b: CpuSample) -> dict:
    """What happened between two samples: wall time, own CPU, and other work's CPU in cores."""
    wall, own = b.wall - a.wall, b.own_s - a.own_s
    foreign = None if a.busy_s is None or b.busy_s is None else max(0.0, (b.busy_s - a.busy_s) - own)
    return {"wall_s": wall, "own_cpu_s": own,
            "foreign_cores": None if foreign is None or wall <= 0 else foreign / wall,
            "steal_cores": _rate(a.steal_s, b.steal_s, wall),
            "pressure": _rate(a.pressure_s, b.pressure_s, wall)}


def allowed_foreign_cores(threads: int, cores: int, wall_s: float, thr: Thresholds, hz: int = _USER_HZ) -> float:
    """Foreign cores a window of ``wall_s`` tolerates: free cores + threshold + tick resolution."""
    spare = max(0, cores - threads)
    return spare + thr.foreign_cores + TICK_SLACK * cores / hz / max(wall_s, 1e-9)


def disturbance(win: dict, threads: int, cores: int, thr: Thresholds) -> str | None:
    """Why the window counts as disturbed, or None if other work left our threads their cores."""
    foreign = win.get("foreign_cores")
    if foreign is None:
        return None  # no /proc/stat: cannot tell (recorded as unknown, see machine description)
    limit = allowed_foreign_cores(threads, cores, win["wall_s"], thr)
    if foreign > limit:
        steal = min(win.get("steal_cores") or 0.0, foreign)  # tick rounding can put steal above the total
        return (f"other work used {foreign:.2f} cores ({steal:.2f} of them hypervisor steal) while "
                f"{threads} thread(s) ran on {cores} cores (allowed {limit:.2f})")
    return None


def wait_for_quiet(threads: int, cores: int, thr: Thresholds, sample_s: float, max_wait_s: float,
                   read=sample, sleep=time.sleep) -> dict:
    """Sample the machine before a point (nothing of ours runs) until it is quiet or ``max_wait_s`` passed.

    Returns the last sample's foreign cores, the 1-minute load average, how long was waited and
    whether the machine was quiet when the point started.
    """
    waited = 0.0
    while True:
        a = read()
        sleep(sample_s)
        win = window(a, read())
        reason = disturbance(win, threads, cores, thr)
        if reason is None or waited + sample_s > max_wait_s:
            return {"foreign_cores": win["foreign_cores"], "steal_cores": win["steal_cores"],
                    "load_avg_1min": _loadavg(), "waited_s": waited, "quiet": reason is None}
        waited += sample_s


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ---- decisions on a point's steps and attempts (pure) ----

def quiet_steps(steps: list) -> list:
    """The undisturbed steps (each step dict carries 'disturbed': a reason or None)."""
    return [s for s in steps if not s.get("disturbed")]


def need_more_steps(steps: list, reps: int, max_steps: int) -> bool:
    """Whether the worker should time another step: fewer than ``reps`` quiet ones and room left."""
    return len(steps) < max_steps and len(quiet_steps(steps)) < reps


def attempt_ok(steps: list, reps: int) -> bool:
    """An attempt is clean when it has at least ``reps`` undisturbed steps."""
    return len(quiet_steps(steps)) >= reps


def best_attempt(attempts: list) -> int:
    """Index of the attempt to report: most quiet steps, then least foreign CPU, then the earliest."""
    def score(i):
        steps = attempts[i]
        worst = max((s.get("foreign_cores") or 0.0 for s in steps), default=0.0)
        return (-len(quiet_steps(steps)), worst, i)
    return min(range(len(attempts)), key=score)


def may_remeasure(attempts_done: int, max_attempts: int, spent_s: float, budget_s: float, cost_s: float) -> bool:
    """Whether another fresh-process attempt is allowed by the attempt bound and the time budget."""
    return attempts_done < max_attempts and spent_s + cost_s <= budget_s


def used_steps(steps: list, reps: int) -> tuple[list, bool]:
    """(steps the point's numbers come from, clean?): the quiet steps when there are enough, else all."""
    quiet = quiet_steps(steps)
    return (quiet, True) if len(quiet) >= reps else (list(steps), False)


def median_step(steps: list) -> dict:
    """The step with the median time (lower median for an even count), so its parts add up."""
    return sorted(steps, key=lambda s: s["step_s"])[(len(steps) - 1) // 2]

