"""What a demo does when run: draw into the reports folder, from ``python -m demo`` or on its own (``run_alone``
for a figure, ``run_experiment`` for a demo with a ``--quick`` mode)."""
from __future__ import annotations

import argparse
import pathlib


def write_figure(draw, data, reports_dir, filename: str) -> pathlib.Path:
    """``draw(data, path)`` into ``reports_dir/filename``, saying where it went."""
    path = pathlib.Path(reports_dir) / filename
    draw(data, path)
    print(f"wrote {path}")
    return path


def run_alone(main, doc: str) -> None:
    """The command line of ``python -m demo.<name>``: ``--reports-dir`` (default reports/), then ``main``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reports-dir", type=pathlib.Path, default=pathlib.Path("reports"))
    main(parser.parse_args().reports_dir)


def run_experiment(main, doc: str) -> None:
    """The command line of a training demo ``python -m demo.<name>``: ``--quick`` (tiny, into
    reports/_raw/quick/), ``--reports`` (the folder), then ``main(folder, quick=...)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images and few steps, for smoke tests")
    parser.add_argument("--reports", type=pathlib.Path, default=None, help="output folder")
    args = parser.parse_args()
    default = pathlib.Path("reports/_raw/quick") if args.quick else pathlib.Path("reports")
    main(args.reports or default, quick=args.quick)
