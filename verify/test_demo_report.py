"""demo/report.py formats whatever results exist, and its runtime line belongs to the results it shows."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from demo import report

REPORTS = pathlib.Path(__file__).resolve().parents[1] / "reports"


def test_report_without_results_says_not_run(tmp_path):
    path = report.write(tmp_path, {"walkthrough": 1.0})
    text = path.read_text()
    assert "## 2. Training equivalence" in text and "(not run)" in text
    assert "walkthrough 1 s" in text


def _runs(res: dict) -> list[dict]:
    """Every training run recorded in the JSON, found by walking it (not by report.TRAINING_RUNS)."""
    return [run for dtype in ("float32", "float64") if dtype in res
            for run in res[dtype].values() if isinstance(run, dict) and "seconds" in run]


def _run_seconds(res: dict) -> list[float]:
    return [run["seconds"] for run in _runs(res)]


@pytest.mark.skipif(not (REPORTS / "training_equivalence.json").exists(), reason="no committed demo results")
def test_runtime_line_comes_from_the_results_shown(tmp_path):
    """The runtime is computed from the JSON the sections are rendered from, whatever this run timed.

    The bug this guards against: a timings file merged over runs said training took 308 s
    beside a training_equivalence.json whose own runs add up to 485 s.
    """
    for name in ("training_equivalence.json", "resolution.json"):
        shutil.copy(REPORTS / name, tmp_path / name)
    training = json.loads((tmp_path / "training_equivalence.json").read_text())
    resolution = json.loads((tmp_path / "resolution.json").read_text())
    text = report.write(tmp_path, {"training": 307.9, "resolution": 1.0, "walkthrough": 1.3}).read_text()
    runtime = text.split("## Runtime")[1]
    assert len(_run_seconds(training)) == 5
    assert f"training equivalence {sum(_run_seconds(training)):.0f} s" in runtime
    assert f"resolution {resolution['seconds']:.0f} s" in runtime and "walkthrough 1 s" in runtime
    assert "308" not in runtime and "resolution 1 s" not in runtime

    for i, run in enumerate(_runs(training), start=1):  # rerun one part: the line follows its JSON
        run["seconds"] = float(i)
    (tmp_path / "training_equivalence.json").write_text(json.dumps(training))
    assert "training equivalence 15 s" in report.write(tmp_path, {}).read_text()

