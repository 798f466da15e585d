"""The README's numbers come from the code: its plan() output for the prostate paper's
setting is regenerated here and must appear verbatim (a faithful ResNet-34 front end,
bench/models.py, stands in for torchvision's, which does not import here)."""

from pathlib import Path

import streamcnn
from bench.models import resnet_front

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_prostate_plan_in_readme_is_current():
    text = str(streamcnn.plan(resnet_front().eval(), (1, 3, 16384, 16384), 2800))
    assert text in README
