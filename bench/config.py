"""Settings of one benchmark run: where it writes, and the measurement protocol's parameters."""
import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.networks import NETWORKS

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORTS = REPO_ROOT / "reports"
# glibc's mmap threshold held at its initial 128 KiB instead of adapting: every buffer above it is mapped when
# allocated and unmapped when freed, so a step's peak RSS no longer depends on what the process freed before
# (with the adaptive default it varies by up to one tile-sized buffer between processes; BENCH.md's allocator
# section). Used for the memory-only probe of each point, never for timed steps.
FIXED_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


@dataclass(frozen=True)
class Config:
    """One benchmark run; which points each network gets is in bench.networks."""

    name: str                             # "full" or "quick": picks each network's Points
    out_dir: Path                         # BENCH.md, bench.json, figures
    raw_dir: Path                         # scratch: gradients, worker logs, points.json (git-ignored)
    networks: tuple = tuple(NETWORKS)
    reps: int = 3                         # undisturbed timed steps per point (median, min–max reported)
    extra_steps: int = 2                  # further timed steps a worker may add to replace disturbed ones
    max_attempts: int = 2                 # fresh-process attempts per point when too few steps were quiet
    remeasure_budget_s: float = 600.0     # total time the run may spend on extra steps and attempts
    foreign_cores: float = 0.15           # other work's cores tolerated beyond those our threads leave free
    quiet_sample_s: float = 1.0           # length of the load sample taken before each point
    quiet_wait_s: float = 60.0            # how long to wait for a quiet machine before a point
    quiet_wait_budget_s: float = 600.0    # total waiting per run; once spent, points start after one sample
    micro_max_time: float = 1.0           # pytest-benchmark --benchmark-max-time per case
    seed: int = 0                         # network weights, input, and the order of the points
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    point_timeout_s: int = 3600
    memory_margin_bytes: int = 2 * 2**30  # keep this much RAM free when deciding what fits
    slide_sides: tuple = (32768,)         # uint8 memmap slides trained on from disk (bench.slide)

    @property
    def max_steps(self) -> int:
        return self.reps + self.extra_steps


FULL = Config(name="full", out_dir=REPORTS, raw_dir=REPORTS / "_raw" / "full")

QUICK = Config(name="quick", out_dir=REPORTS / "_raw" / "quick", raw_dir=REPORTS / "_raw" / "quick",
               extra_steps=1, remeasure_budget_s=20.0, quiet_sample_s=0.5, quiet_wait_s=1.0, quiet_wait_budget_s=10.0,
               micro_max_time=0.1, slide_sides=(4096,))
