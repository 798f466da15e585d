"""ResNet front ends as torchvision builds them, with random weights (nothing is downloaded).

``BasicBlock`` and ``Bottleneck`` repeat torchvision's (``torchvision/models/resnet.py``):
the same constructor arguments, attribute names (``conv1``, ``bn1``, ``relu``, ``conv2``,
``bn2``, ``conv3``, ``bn3``, ``downsample``) and forward code, including the one
``nn.ReLU(inplace=True)`` module used twice and the in-place ``out += identity``; so
their state_dict keys and shapes are torchvision's, and a torchvision checkpoint loads
into them. ``resnet_front`` stacks them as ``torchvision.models.ResNet`` does, up to a
chosen stage: ``resnet_front()`` is ResNet-34 through ``layer3``, the front end the
prostate paper streams with frozen (eval-mode) BatchNorm.

Differences from torchvision, none of which changes a computed value: the classifier
head (``layer4`` unless asked for, ``avgpool``, ``fc``) is absent; ``width`` can narrow
every stage (torchvision: 64); the weights are seeded.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

__all__ = ["BasicBlock", "Bottleneck", "conv1x1", "conv3x3", "resnet_front", "freeze_batchnorm",
           "uniform_", "efficientnet_b0_front"]

STAGES = ("layer1", "layer2", "layer3", "layer4")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convolutions and a shortcut (torchvision's)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    """ResNet-50/101/152 block (V1.5: the stride sits on the 3x3 convolution), torchvision's."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


def _make_layer(block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One stage, as ``ResNet._make_layer`` builds it (no dilation): the first block
    strides and gets a 1x1 convolution + BatchNorm shortcut when the shape changes."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def resnet_front(layers=(3, 4, 6), width: int = 64, block=BasicBlock, through: str = "layer3",
                 in_channels: int = 3, seed: int = 0) -> nn.Sequential:
    """``nn.Sequential(conv1, bn1, relu, maxpool, layer1, ..., <through>)`` of a torchvision ResNet.

    ``layers``: blocks per stage, at least up to ``through`` (ResNet-34 and -50:
    ``(3, 4, 6, 3)``; ResNet-18: ``(2, 2, 2, 2)``); ``block``: ``BasicBlock`` (ResNet-18/34)
    or ``Bottleneck`` (ResNet-50 and deeper); ``width``: planes of ``layer1`` (torchvision:
    64), doubled at each later stage; ``through``: the last stage kept, one of
    ``layer1`` .. ``layer4``. Geometry (kernels, strides, paddings, depth) is torchvision's
    whatever the width. Weights are initialised as torchvision does (Kaiming-normal
    convolutions, BatchNorm weight 1 and bias 0), from ``seed`` without touching the
    global RNG. The module is in training mode; see ``freeze_batchnorm``.

    Example: ``freeze_batchnorm(resnet_front(width=8), torch.randn(2, 3, 96, 96))`` is a
    narrow ResNet-34 through ``layer3`` with frozen BatchNorm.
    """
    if through not in STAGES:
        raise ValueError(f"through must be one of {STAGES}, got {through!r}")
    n_stages = STAGES.index(through) + 1
    if len(layers) < n_stages:
        raise ValueError(f"layers {tuple(layers)} gives blocks for {len(layers)} stages, but "
                         f"through={through!r} needs {n_stages}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods = OrderedDict(
            conv1=nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
            bn1=nn.BatchNorm2d(width), relu=nn.ReLU(inplace=True),
            maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        inplanes = width
        for i in range(n_stages):
            planes = width * 2**i
            mods[STAGES[i]] = _make_layer(block, inplanes, planes, layers[i], 1 if i == 0 else 2)
            inplanes = planes * block.expansion
        net = nn.Sequential(mods)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    return net


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def freeze_batchnorm(net: nn.Module, sample: torch.Tensor | None = None,
                     seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``net`` non-trivial running statistics and affine weights,
    then switch ``net`` to eval mode (frozen BatchNorm, as streaming requires); returns it.

    With ``sample``, the running mean and variance are those of ``sample``'s activations
    (one training-mode forward, no gradient, cumulative averages), as after training on
    such data; magnitudes then stay moderate however deep the network. Without it they are
    drawn at random (mean in [-1, 1], variance in [0.5, 2]). Either way the weights are
    drawn from [0.5, 1.5] and the biases from [-0.5, 0.5], from ``seed`` (the global RNG is
    untouched); the parameters keep their dtype and device.
    """
    norms = [m for m in net.modules() if isinstance(m, _NORMS)]
    if sample is not None:
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the statistics of this one batch
        net.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # dropout draws; RNG untouched
            net(sample.clone())  # a copy, as in-place first layers would change the sample
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for m in norms:
        if sample is None:
            uniform_(m.running_mean, -1.0, 1.0, gen)
            uniform_(m.running_var, 0.5, 2.0, gen)
        if m.affine:
            uniform_(m.weight, 0.5, 1.5, gen)
            uniform_(m.bias, -0.5, 0.5, gen)
    return net.eval()


def uniform_(t: torch.Tensor, lo: float, hi: float, generator: torch.Generator) -> None:
    """Fill ``t`` (any dtype or device) with U[lo, hi) draws from a CPU ``generator``."""
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo)


def resnet34_prostate(seed: int = 0) -> nn.Sequential:
    """The prostate paper's streamed part: ResNet-34 through ``layer3`` with frozen BatchNorm.

    Random weights (seeded; nothing is downloaded). The BatchNorm statistics are those of a
    seeded 256×256 standard-normal image - the benchmark's inputs are standard normal too -
    so activations keep moderate magnitudes through all 16 blocks, as with trained weights.
    """
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 3, 256, 256, generator=gen)
    return freeze_batchnorm(resnet_front(seed=seed), sample=sample, seed=seed)


# ------------------------------------------------------------------ EfficientNet-B0

def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision/models/_utils.py: _make_divisible."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=nn.SiLU):
    """torchvision/ops/misc.py: Conv2dNormActivation (padding (k - 1) // 2, no conv bias)."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision/ops/misc.py: SqueezeExcitation (the same attributes and forward)."""

    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU,
                 scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input):
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input):
        scale = self._scale(input)
        return scale * input


class MBConv(nn.Module):
    """torchvision/models/efficientnet.py: MBConv - expand (1x1), depthwise, squeeze-and-
    excitation (squeeze channels max(1, input // 4), SiLU), project (1x1, no activation), and
    the residual where the stride is 1 and the channels agree (``se_layer``, ``act``,
    ``scale_activation`` and ``squeeze`` as MobileNetV3's InvertedResidual sets them). torchvision's stochastic
    depth before the residual is left out: the identity in eval mode, which the benchmark uses."""

    def __init__(self, cin: int, cout: int, expand: float, k: int, stride: int,
                 se_layer=SqueezeExcitation, act=nn.SiLU, scale_activation=nn.Sigmoid,
                 squeeze: int | None = None):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = _make_divisible(cin * expand, 8)
        layers = []
        if hidden != cin:
            layers.append(conv_bn_act(cin, hidden, 1, act=act))
        layers.append(conv_bn_act(hidden, hidden, k, stride, groups=hidden, act=act))
        layers.append(se_layer(hidden, squeeze or max(1, cin // 4), activation=act,
                               scale_activation=scale_activation))
        layers.append(conv_bn_act(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result = result + input
        return result


#: torchvision's efficientnet_b0 stages: expand ratio, kernel, stride, input and output
#: channels, layers (width and depth multipliers 1.0)
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def efficientnet_b0_front(stages: int = 5, seed: int = 0) -> nn.Sequential:
    """``torchvision.models.efficientnet_b0().features[:1 + stages]``: the stem and the first
    ``stages`` MBConv stages (5: through the stride-16 stage, 112 channels, 11 blocks each
    with squeeze-and-excitation), with torchvision's initialisation (Kaiming-normal fan-out
    convolutions, BatchNorm weight 1 and bias 0) from ``seed``, then BatchNorm frozen at the
    statistics of a seeded 256×256 standard-normal image (``freeze_batchnorm``): eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = [conv_bn_act(3, 32, 3, 2)]
        for expand, k, stride, cin, cout, n in B0_STAGES[:stages]:
            features.append(nn.Sequential(*(MBConv(cin if i == 0 else cout, cout, expand, k,
                                                   stride if i == 0 else 1) for i in range(n))))
        net = nn.Sequential(*features)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    sample = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    return freeze_batchnorm(net, sample=sample, seed=seed)


class UNet(nn.Module):
    """A 2D U-Net for per-pixel classification (Ronneberger et al. 2015, with padded convolutions,
    as most reimplementations have it): ``levels`` resolutions of two 3x3 convolutions (padding 1)
    and ReLU each, ``widths`` channels per level, 2x2 max-pool down, a 2x2 stride-2 transposed
    convolution up (halving the channels), the skip concatenated before the level's convolutions,
    and a 1x1 head to ``classes`` logits at the input's resolution. No BatchNorm. An input's sides
    must be divisible by 2^(levels - 1)."""

    def __init__(self, in_channels: int = 3, widths=(16, 32, 64, 128), classes: int = 2):
        super().__init__()

        def twice(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))

        self.downs = nn.ModuleList(twice(cin, cout) for cin, cout in zip((in_channels,) + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in widths[:0:-1])
        self.fuse = nn.ModuleList(twice(c, c // 2) for c in widths[:0:-1])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(self.ups, self.fuse):
            x = fuse(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


def unet(seed: int = 0) -> UNet:
    """bench.dense's network: a four-level U-Net (16-32-64-128 channels, 3 input channels, 2
    classes), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet()
