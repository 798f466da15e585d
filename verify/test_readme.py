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


def test_the_layout_table_links_every_doc():
    """README's Layout table links each file of docs/ (a newcomer found two missing)."""
    layout = README[README.index("## Layout"):]
    docs = Path(__file__).resolve().parent.parent / "docs"
    for doc in sorted(docs.glob("*.md")):
        assert f"](docs/{doc.name})" in layout, f"README's Layout table does not link docs/{doc.name}"
