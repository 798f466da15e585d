"""demo/report.py formats whatever results exist and keeps the timings of parts that were not rerun."""
from __future__ import annotations

import json

from demo import report


def test_report_without_results_says_not_run(tmp_path):
    path = report.write(tmp_path, {"walkthrough": 1.0})
    text = path.read_text()
    assert "## 2. Training equivalence" in text and "(not run)" in text
    assert "walkthrough 1 s" in text


def test_report_keeps_timings_of_earlier_parts(tmp_path):
    report.write(tmp_path, {"training": 100.0})
    report.write(tmp_path, {"resolution": 50.0})
    runtime = json.loads((tmp_path / report.RUNTIME_FILE).read_text())
    assert runtime == {"training": 100.0, "resolution": 50.0}
