"""Which points the full and the quick benchmark measure."""
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORTS = REPO_ROOT / "reports"


@dataclass(frozen=True)
class Config:
    """Points and settings of one benchmark run (all sizes are image sides in pixels)."""

    name: str
    out_dir: Path                         # BENCH.md, bench.json, figures
    raw_dir: Path                         # scratch: gradients, worker logs, pytest-benchmark JSON (git-ignored)
    fig2_input: int                       # Fig. 2: fixed input side
    fig2_tiles: tuple                     # Fig. 2: streaming tile sides
    fig3_tile: int                        # Fig. 3: fixed tile side
    fig3_sizes: tuple                     # Fig. 3: input sides (streaming and conventional)
    headline_size: int                    # the one big step (also Fig. 3's last point)
    reps: int = 3                         # measured repetitions per point (median reported)
    headline_reps: int = 1                # the headline step is too long to repeat
    full_warmup_max: int = 4096           # above this side, warm up on a 2x2-tile input only
    oracle_max: int = 2048                # float64 gradient oracle for inputs up to this side
    micro_max_time: float = 1.0           # pytest-benchmark --benchmark-max-time per case
    seed: int = 0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    point_timeout_s: int = 3600
    memory_margin_bytes: int = 2 * 2**30  # keep this much RAM free when deciding what fits


FULL = Config(
    name="full",
    out_dir=REPORTS,
    raw_dir=REPORTS / "_raw" / "full",
    fig2_input=2048,
    fig2_tiles=(128, 256, 384, 512, 1024, 2048),
    fig3_tile=512,
    fig3_sizes=(512, 1024, 2048, 4096, 8192, 16384),
    headline_size=16384,
)

QUICK = Config(
    name="quick",
    out_dir=REPORTS / "_raw" / "quick",
    raw_dir=REPORTS / "_raw" / "quick",
    fig2_input=512,
    fig2_tiles=(128, 256, 512),
    fig3_tile=128,
    fig3_sizes=(128, 256, 512),
    headline_size=512,
    oracle_max=256,
    micro_max_time=0.1,
)
