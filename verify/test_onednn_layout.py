"""The default tile layout avoids a oneDNN bug: a 1x1 strided convolution on channels-last
input whose input channels are not a multiple of oneDNN's channel block gets a wrong weight
gradient, spins, or corrupts the heap on AVX2 CPUs (uxlfoundation/oneDNN#6035; reproduced here
with ``ONEDNN_MAX_CPU_ISA=AVX2``: the second ``convolution_backward`` of a (2, 6, 30, 30)
channels-last input spins or aborts; streamed in that layout, the ResNet block below spins or
gets gradients 0.7 off, relative; so does an ``F.conv2d`` call of such a convolution, which
the trace marks). The AVX2 check runs in a child process, where the ISA
cap takes effect, with a timeout so a hang fails instead of stalling the suite."""

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from streamcnn import Streaming
from streamcnn.channels_last import onednn_unsafe_convs, use_channels_last
from streamcnn.trace import analyse

CPU = torch.device("cpu")


def downsample(in_channels: int, stride=2, kernel=1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, in_channels, 3, padding=1),
                         nn.Conv2d(in_channels, 4, kernel, stride=stride))


@pytest.mark.parametrize("in_channels, stride, kernel, unsafe", [
    (6, 2, 1, True), (3, 2, 1, True), (24, 2, 1, True),  # not a multiple of the block
    (16, 2, 1, False), (64, 2, 1, False),               # ResNet's downsample convs
    (6, 1, 1, False), (6, 2, 3, False)])                 # stride 1, or a wider kernel
def test_only_1x1_strided_convolutions_off_the_channel_block_are_unsafe(in_channels, stride, kernel,
                                                                         unsafe):
    net = downsample(in_channels, stride, kernel)
    assert (onednn_unsafe_convs(net) == ["1"]) is unsafe
    if torch.backends.mkldnn.is_available():
        assert use_channels_last(CPU, torch.float32, net) is not unsafe
        assert use_channels_last(CPU, torch.float32)  # without the module: the plain rule


class FunctionalDownsample(nn.Module):
    """``downsample`` with its second convolution an ``F.conv2d`` call, which no module walk sees."""

    def __init__(self, in_channels: int, stride=2, kernel=1, groups=1):
        super().__init__()
        self.stem = nn.Conv2d(3, in_channels, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(4, in_channels // groups, kernel, kernel) * 0.3)
        self.stride, self.groups = stride, groups

    def forward(self, x):
        return F.conv2d(torch.relu(self.stem(x)), self.weight, stride=self.stride, groups=self.groups)


@pytest.mark.parametrize("in_channels, stride, kernel, groups, unsafe", [
    (6, 2, 1, 1, True), (6, (2, 1), 1, 1, True), (32, 2, 1, 4, True),  # 8 per group
    (16, 2, 1, 1, False), (32, 2, 1, 2, False), (6, 1, 1, 1, False), (6, 2, 3, 1, False)])
def test_functional_convolutions_are_found_by_the_trace(in_channels, stride, kernel, groups, unsafe):
    net = FunctionalDownsample(in_channels, stride, kernel, groups)
    assert onednn_unsafe_convs(net) == []  # the module walk cannot see it
    found = onednn_unsafe_convs(net, analyse(net, 2, 3))
    assert (found == ["operation 'conv2d'"]) is unsafe, found
    assert found in ([], ["operation 'conv2d'"])


@pytest.mark.parametrize("net, listed", [
    (downsample(6), r"\['1'\]"),                                  # a layer, by its path
    (FunctionalDownsample(6), r"\[\"operation 'conv2d'\"\]")])    # a call, by its step
def test_explicit_channels_last_on_such_a_network_warns_and_the_default_does_not(net, listed):
    x = torch.randn(1, 3, 40, 40)
    with pytest.warns(UserWarning, match=rf"1x1 strided convolutions {listed}.*oneDNN#6035"):
        Streaming(net, 24, channels_last=True)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Streaming(net, 24)(x)


CHILD = textwrap.dedent("""
    import sys
    import torch, torch.nn as nn, torch.nn.functional as F
    from bench.models import BasicBlock
    from streamcnn import Streaming
    from streamcnn.testing import rel_err
    kind, layout = sys.argv[1:]  # module|functional, default|forced (channels_last=True)

    class Functional(nn.Module):  # the downsample as an F.conv2d call
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6, 1, 1) * 0.3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.weight, stride=2))

    torch.manual_seed(0)
    down = (nn.Sequential(nn.Conv2d(6, 4, 1, 2, bias=False), nn.BatchNorm2d(4)) if kind == "module"
            else Functional())
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        BasicBlock(6, 4, stride=2, downsample=down)).eval()
    x = torch.randn(2, 3, 81, 77)
    g = torch.randn(2, 4, 41, 39)
    option = {"channels_last": True} if layout == "forced" else {}
    params = list(net.parameters())

    def gradients(model, path):  # the parameters' and, where asked for, the input's
        if path == "autograd.grad":  # a leaf without grad, as in training
            return list(torch.autograd.grad(model(x), params, g))
        leaf = x.clone().requires_grad_(path != "training")
        model(leaf * 1.0 if path == "non-leaf" else leaf).backward(g)
        found = [p.grad for p in params] + [leaf.grad]
        net.zero_grad(set_to_none=True)
        return found

    worst = 0.0
    for path in ("training", "saliency", "non-leaf", "autograd.grad"):
        want = gradients(net, path)
        for _ in range(2):  # twice: on channels-last tiles the bug does not strike every run
            got = gradients(Streaming(net, 30, **option), path)
            assert [t is None for t in got] == [t is None for t in want], path
            worst = max([worst] + [rel_err(s, c) for s, c in zip(got, want) if c is not None])
    assert worst <= 1e-4, worst
    print("ok", worst)
""")


def run_child(kind: str, layout: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """CHILD on oneDNN's AVX2 kernels; raises subprocess.TimeoutExpired if it hangs."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": root}
    return subprocess.run([sys.executable, "-c", CHILD, kind, layout], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
@pytest.mark.parametrize("kind", ["module", "functional"])
def test_streaming_such_a_network_on_avx2_kernels_gives_conventional_gradients(kind):
    """float32, 1e-4 relative (summation order); conventional runs in NCHW, where oneDNN is right.
    Parameter and input gradients on every entry path (training, saliency, a non-leaf input,
    autograd.grad). (Run with layout "forced", the child fails: gradients 0.7 off, a hang, or
    an abort.)"""
    try:
        done = run_child(kind, "default")
    except subprocess.TimeoutExpired:
        pytest.fail("the streamed step hung on oneDNN's AVX2 kernels")
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr[-3000:]
