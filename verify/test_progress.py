"""Progress bars follow tqdm's rule (streamcnn/progress.py): ``progress=None``, the default
of ``Streaming`` and of the statistics functions, draws a bar over the tiles when stderr is
a terminal and nothing otherwise; ``True``/``False`` force it on or off. stderr is replaced
by a buffer that says it is, or is not, a terminal."""

import io
import sys

import pytest
import torch
import torch.nn as nn

import streamcnn


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Pipe(io.StringIO):
    def isatty(self):
        return False


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))


def image():
    return torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))


def train_step(progress):
    kwargs = {} if progress == "default" else {"progress": progress}
    streamcnn.Streaming(net().eval(), 16, **kwargs)(image()).sum().backward()


def channel_stats(progress):
    kwargs = {} if progress == "default" else {"progress": progress}
    streamcnn.channel_stats(net().eval(), image(), 16, ["1"], **kwargs)


def update_bn(progress):
    kwargs = {} if progress == "default" else {"progress": progress}
    streamcnn.update_bn([image()], net(), 16, **kwargs)


def lsuv(progress):
    kwargs = {} if progress == "default" else {"progress": progress}
    streamcnn.lsuv_(net().eval(), [image()], 16, **kwargs)


ENTRIES = {"Streaming": (train_step, "streaming backward"),  # entry: (run, the bar's label)
           "channel_stats": (channel_stats, "channel_stats"),
           "update_bn": (update_bn, "update_bn"),
           "lsuv_": (lsuv, "lsuv_")}
CASES = [  # (stderr, progress, a bar drawn)
    (Terminal, "default", True),
    (Pipe, "default", False),
    (Terminal, None, True),
    (Pipe, True, True),
    (Terminal, False, False),
]


@pytest.mark.parametrize("stderr, progress, drawn", CASES)
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_bar_is_drawn_by_tqdms_rule(monkeypatch, entry, stderr, progress, drawn):
    run, label = ENTRIES[entry]
    out = stderr()
    monkeypatch.setattr(sys, "stderr", out)
    run(progress)
    text = out.getvalue()
    assert (label in text and "tile" in text) == drawn, text
    if not drawn:
        assert text == ""


def test_progress_is_none_true_or_false():
    with pytest.raises(TypeError, match="progress must be None, True or False"):
        train_step("yes")
