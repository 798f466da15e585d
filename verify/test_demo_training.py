"""The demo networks stream correctly: a streamed SGD step of the Table 1 network equals a conventional one,
and the streamed saliency (input gradient) of the resolution demo's detector equals plain autograd's.

Oracle: torch's own autograd on the unstreamed module. float64, so the only differences are summation
order: tolerance 1e-10 relative (observed ~1e-15)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("streamcnn")

from demo import resolution, training_equivalence as te  # noqa: E402

RTOL = 1e-10


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(b.abs().max().item(), 1e-300)
    err = (a - b).abs().max().item() / scale
    assert err < RTOL, f"{what}: relative difference {err:.2e} >= {RTOL:.0e}"


def test_table1_network_matches_the_paper():
    net = te.table1_network()
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net) == 4
    assert isinstance(net[-1], nn.Linear) and net[-1].out_features == 10
    # 160 x 160 input: four 2x2 pools leave the paper's 10 x 10 map for the final max-pool
    assert net[:-3](torch.zeros(1, 3, 160, 160)).shape == (1, 256, 10, 10)


def test_streamed_sgd_step_equals_conventional_float64():
    torch.manual_seed(0)
    conventional = te.table1_network().double()
    streamed = te.split_streamed(conventional, te.TILE)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    for model in (conventional, streamed):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
        for _ in range(2):  # two steps, so momentum is exercised
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert len(list(streamed.parameters())) == len(list(conventional.parameters()))
    for (name, p), q in zip(conventional.named_parameters(), streamed.parameters()):
        assert_close(q.detach(), p.detach(), f"parameter {name} after two SGD steps")


def test_streamed_detector_saliency_equals_autograd_float64():
    torch.manual_seed(0)
    channels = (4, 4, 8, 8)
    streamed = resolution.Detector(channels, tile=128).double()
    conventional = copy.deepcopy(streamed)
    conventional.front = conventional.front.module  # the same layers without Streaming
    x = torch.randn(1, 1, 192, 192, dtype=torch.float64)  # 2 x 2 tiles of 128
    grads = []
    for model in (streamed, conventional):
        xi = x.clone().requires_grad_(True)
        model(xi).sum().backward()
        grads.append(xi.grad)
    assert grads[1].abs().max() > 0
    assert_close(grads[0], grads[1], "input gradient (saliency)")


def test_saliency_helper_uses_the_streamed_backward():
    torch.manual_seed(0)
    model = resolution.Detector((4, 4, 8, 8), tile=96)
    image = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    grad, logit = resolution.saliency(model, image, mean=0.5, std=0.25)
    assert grad.shape == image.shape and np.isfinite(grad).all() and np.abs(grad).max() > 0
    with torch.no_grad():
        expected = model(torch.from_numpy((image - 0.5) / 0.25)[None, None]).item()
    assert logit == pytest.approx(expected, rel=1e-6)


def test_fig4_says_why_the_float64_series_is_short(tmp_path):
    """The float64 pair trains only Config.float64_epochs epochs; the figure says so, with the
    per-epoch cost taken from the run's own record, and redraws from JSON without training."""
    import json

    def record(epochs, conv_s, stream_s):
        return {"epochs": epochs, "conventional": {"seconds": conv_s}, "streaming": {"seconds": stream_s}}

    results = {"float32": record(20, 100.0, 200.0), "float64": record(2, 30.0, 60.0)}
    assert te.float64_note(results) == ("float64 run: first 2 epochs only\n"
                                        "(a float64 epoch took 3.0× a float32 one here)")
    committed = Path(__file__).resolve().parent.parent / "reports" / "training_equivalence.json"
    (tmp_path / committed.name).write_text(committed.read_text())
    te.render(tmp_path)
    assert (tmp_path / "fig4_training_equivalence.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(committed.read_text())["float64"]["epochs"] == te.Config().float64_epochs
