"""What a one-figure demo does when run: draw into the reports folder, from ``python -m demo`` or on its own."""
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
