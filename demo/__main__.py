"""``python -m demo [--quick] [--only PART ...]``: regenerate the teaching figures and reports/DEMO.md.

Full runs write to ``reports/`` (committed); ``--quick`` runs tiny versions for smoke tests and writes to
``reports/_raw/quick/`` (git-ignored) so the committed figures are never overwritten by them.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with
# any other busy process, spinning threads stall each other's parallel regions; measured here, a streamed
# 2048 x 2048 training step took 1.1 s with passive waiting against 1.1 to 9 s with the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

PARTS = ("walkthrough", "residual", "training", "resolution", "segmentation")


def run_part(name: str, reports_dir: Path, quick: bool) -> None:
    """Import and run one demo (imports are lazy so one broken part cannot stop the others)."""
    if name == "walkthrough":
        from demo import walkthrough
        walkthrough.main(reports_dir)
    elif name == "residual":
        from demo import residual
        residual.main(reports_dir)
    elif name == "training":
        from demo import training_equivalence
        training_equivalence.main(reports_dir, quick=quick)
    elif name == "resolution":
        from demo import resolution
        resolution.main(reports_dir, quick=quick)
    elif name == "segmentation":
        from demo import segmentation
        segmentation.main(reports_dir, quick=quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs into reports/_raw/quick/")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    parser.add_argument("--reports", type=Path, default=None, help="output folder (default: see above)")
    args = parser.parse_args(argv)
    reports_dir = args.reports or (Path("reports/_raw/quick") if args.quick else Path("reports"))
    reports_dir.mkdir(parents=True, exist_ok=True)

    from demo import report

    seconds, failed = {}, []
    for name in args.only:
        print(f"== demo: {name}", flush=True)
        start = time.perf_counter()
        try:
            run_part(name, reports_dir, args.quick)
        except Exception:  # report every broken part, then fail at the end
            traceback.print_exc()
            failed.append(name)
        seconds[name] = time.perf_counter() - start
        print(f"== demo: {name} took {seconds[name]:.0f} s", flush=True)
    report.write(reports_dir, seconds, quick=args.quick)
    print(f"wrote {reports_dir / 'DEMO.md'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
