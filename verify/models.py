"""Small faithful copies of torchvision's graph-shaped blocks, for the graph equivalence tests.

Each class repeats torchvision's (``torchvision/models/densenet.py``, ``mobilenetv2.py``,
``vgg.py``, ``convnext.py``, ``torchvision/ops/misc.py``, ``ops/stochastic_depth.py``):
constructor arguments, attribute names and forward code, so that torch.fx sees the same
graph (the same ``torch.cat`` of a list, in-place ``+=``, ``torch.permute``, ``F.dropout``
with ``training=self.training``, the fx-wrapped ``stochastic_depth`` call). Only the
builders differ: small channel counts and few blocks, so the tests run in seconds; the
kernels, strides, paddings and block structure are torchvision's. Where a class departs
from torchvision, its docstring says how; none of the departures changes a value computed
in eval mode. The ResNet blocks live in ``bench/models.py`` (the benchmark uses them).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from bench.models import freeze_batchnorm, uniform_
from bench.models import resnet_front as bench_resnet

# ---------------------------------------------------------------- torchvision.ops


class Conv2dNormActivation(nn.Sequential):
    """Convolution, optional norm, optional activation (``torchvision.ops.misc``).

    Departure: 2D only and without the ``conv_layer`` argument (torchvision's
    ``ConvNormActivation`` base class also builds 3D variants)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None, groups: int = 1,
                 norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, dilation: int = 1,
                 inplace: bool | None = True, bias: bool | None = None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                            dilation=dilation, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class Permute(nn.Module):
    """A view of the input with its dimensions permuted (``torchvision.ops.misc``)."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """Randomly zero whole residual branches (``torchvision.ops.stochastic_depth``); the
    identity in eval mode. Departure: no API-usage logging call."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input

    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


torch.fx.wrap("stochastic_depth")  # as torchvision: fx records one call, not its branches


class StochasticDepth(nn.Module):
    """See ``stochastic_depth`` (``torchvision.ops.stochastic_depth``)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


# ---------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3 on the concatenation of all earlier features.

    Departure: no ``memory_efficient`` checkpointing path (torchvision's default,
    ``memory_efficient=False``, runs exactly this code)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                               stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input) -> Tensor:
        if isinstance(input, Tensor):
            prev_features = [input]
        else:
            prev_features = input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees the concatenation of the block input and
    all earlier layers' outputs; the block returns the concatenation of all of them."""

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int,
                 growth_rate: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                bn_size=bn_size, drop_rate=drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN, ReLU, 1x1 convolution, 2x2 average pooling (stride 2)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                              bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def densenet_front(growth_rate: int = 3, block_config=(3, 2), num_init_features: int = 4,
                   bn_size: int = 2, drop_rate: float = 0.2, seed: int = 0) -> nn.Sequential:
    """``DenseNet.features`` up to the last dense block (no ``norm5``): the 7x7/2 stem
    (conv0, norm0, relu0, pool0), then dense blocks with a transition between each pair,
    as torchvision builds them (densenet121: growth 32, blocks (6, 12, 24, 16), 64 initial
    features, bn_size 4). ``drop_rate`` > 0 puts ``F.dropout`` in the graph (identity in
    eval). Training mode; see ``frozen``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3,
                                bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            features.add_module("denseblock%d" % (i + 1), _DenseBlock(
                num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                growth_rate=growth_rate, drop_rate=drop_rate))
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                features.add_module("transition%d" % (i + 1), _Transition(
                    num_input_features=num_features, num_output_features=num_features // 2))
                num_features = num_features // 2
    return features


# ---------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expansion (ReLU6), depthwise 3x3 (ReLU6), linear 1x1 projection; the input is
    added only when the stride is 1 and the channel counts match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
                 norm_layer=None) -> None:
        super().__init__()
        self.stride = stride
        if stride not in [1, 2]:
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d

        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1,
                                               norm_layer=norm_layer,
                                               activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 norm_layer=norm_layer, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


# (t, c, n, s) rows as torchvision's inverted_residual_setting: expansion, channels, repeats,
# first stride. Covers expand_ratio 1, residual and non-residual blocks, stride 1 and 2.
MOBILENET_SETTING = ((1, 4, 1, 1), (6, 6, 2, 2), (6, 8, 3, 2))


def mobilenet_v2_front(setting=MOBILENET_SETTING, input_channel: int = 4,
                       seed: int = 0) -> nn.Sequential:
    """``MobileNetV2.features`` without the last 1x1 convolution: the 3x3/2 ReLU6 stem
    and the inverted residual blocks of ``setting``. Departure: channel counts are used
    as given (torchvision rounds them with ``_make_divisible(c * width_mult, 8)``).
    Training mode; see ``frozen``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2,
                                                          activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1,
                                                 expand_ratio=t))
                input_channel = c
    return nn.Sequential(*features)


# ---------------------------------------------------------------- VGG


def make_layers(cfg, batch_norm: bool = False, in_channels: int = 3) -> nn.Sequential:
    """VGG feature layers: 3x3 convolutions (padding 1), [BatchNorm,] in-place ReLU, and
    2x2/2 max-pools at each ``"M"`` (torchvision's ``make_layers``; departure: the
    input channel count is an argument)."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


# VGG-11 ("A") layout at 1/16 of its width, through the fourth pooling stage
VGG_CFG = (4, "M", 8, "M", 16, 16, "M", 32, 32, "M")


def vgg_front(cfg=VGG_CFG, batch_norm: bool = True, seed: int = 0) -> nn.Sequential:
    """``make_layers(cfg, batch_norm)``, seeded; a plain ``nn.Sequential``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_layers(cfg, batch_norm)


# ---------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class CNBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, Linear (x4), GELU, Linear, per-channel layer
    scale, stochastic depth, residual add."""

    def __init__(self, dim, layer_scale: float, stochastic_depth_prob: float,
                 norm_layer=None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            norm_layer(dim),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


def convnext_front(dims=(4, 8), depths=(2, 1), stochastic_depth_prob: float = 0.1,
                   seed: int = 0) -> nn.Sequential:
    """``ConvNeXt.features`` through stage ``len(dims)``: the 4x4/4 patchify stem with
    ``LayerNorm2d``, stages of ``CNBlock``s, and between stages a ``LayerNorm2d`` + 2x2/2
    convolution, with torchvision's linearly growing stochastic-depth probabilities.

    Departures, so that every parameter matters in the gradient checks: weights keep
    torch's default initialisation (torchvision: truncated normal, std 0.02, zero
    biases), and layer scales and LayerNorm affines are drawn from [0.5, 1.5] and
    [-0.5, 0.5] (torchvision: 1e-6, ones and zeros). Eval mode (no BatchNorm here)."""
    norm_layer = partial(LayerNorm2d, eps=1e-6)
    total, block_id = sum(depths), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [Conv2dNormActivation(
            3, dims[0], kernel_size=4, stride=4, padding=0, norm_layer=norm_layer,
            activation_layer=None, bias=True)]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stage = []
            for _ in range(depth):
                sd_prob = stochastic_depth_prob * block_id / (total - 1.0)
                stage.append(CNBlock(dim, 1e-6, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(norm_layer(dim),
                                            nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        features = nn.Sequential(*layers)
    return randomize_scales(features, seed)


def randomize_scales(net: nn.Module, seed: int = 0) -> nn.Module:
    """LayerNorm weights and ``layer_scale`` parameters from [0.5, 1.5], LayerNorm
    biases from [-0.5, 0.5] (seeded, global RNG untouched); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            uniform_(m.weight, 0.5, 1.5, gen)
            uniform_(m.bias, -0.5, 0.5, gen)
        if isinstance(getattr(m, "layer_scale", None), nn.Parameter):  # CNBlock's
            uniform_(m.layer_scale, 0.5, 1.5, gen)
    return net.eval()


# ---------------------------------------------------------------- 1D residual stack


class BasicBlock1d(nn.Module):
    """torchvision's ``BasicBlock`` made 1D (no torchvision original): two convolutions
    of odd ``kernel_size`` with 'same' padding, optionally dilated, the stride on the
    first; the 1x1 strided ``downsample`` shortcut when the shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, kernel_size: int = 3,
                 dilation: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.conv1 = nn.Conv1d(inplanes, planes, kernel_size, stride, pad, dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(planes, planes, kernel_size, 1, pad, dilation, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv1d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm1d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


# (planes, stride, kernel_size, dilation) per block: identity and 1x1 shortcuts, a dilated block
RESNET1D_BLOCKS = ((4, 1, 5, 1), (6, 2, 5, 1), (6, 1, 3, 3), (8, 2, 3, 1))


def resnet1d_stack(in_channels: int = 2, blocks=RESNET1D_BLOCKS, seed: int = 0) -> nn.Sequential:
    """A 1D ResNet front: 7/2 stem convolution, BatchNorm, ReLU, 3/2 max-pool, then
    ``BasicBlock1d``s. Training mode; see ``frozen``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        width = blocks[0][0]
        mods = [nn.Conv1d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm1d(width),
                nn.ReLU(inplace=True), nn.MaxPool1d(3, 2, 1)]
        for planes, stride, k, d in blocks:
            mods.append(BasicBlock1d(width, planes, stride, k, d))
            width = planes
    return nn.Sequential(*mods)


def frozen(net: nn.Module, sample: Tensor, seed: int = 0) -> nn.Module:
    """``net`` in float64 with frozen BatchNorm whose statistics come from ``sample``
    (``bench.models.freeze_batchnorm``), random norm affines and layer scales; eval mode."""
    net = net.double()
    freeze_batchnorm(net, sample.double(), seed)
    return randomize_scales(net, seed + 1)


# ---------------------------------------------------------------- torchvision detection: FPN


class IntermediateLayerGetter(nn.ModuleDict):
    """torchvision/models/_utils.py: the model's children up to the last returned one, and
    an OrderedDict of the returned ones' outputs."""

    def __init__(self, model: nn.Module, return_layers: dict) -> None:
        if not set(return_layers).issubset([name for name, _ in model.named_children()]):
            raise ValueError("return_layers are not present in model")
        orig_return_layers = return_layers
        return_layers = {str(k): str(v) for k, v in return_layers.items()}
        layers = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            if name in return_layers:
                del return_layers[name]
            if not return_layers:
                break
        super().__init__(layers)
        self.return_layers = orig_return_layers

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out_name = self.return_layers[name]
                out[out_name] = x
        return out


class LastLevelMaxPool(nn.Module):
    """torchvision/ops/feature_pyramid_network.py: a stride-2 subsampling of the last level."""

    def forward(self, x: list, y: list, names: list):
        names.append("pool")
        # Use max pooling to simulate stride 2 subsampling
        x.append(F.max_pool2d(x[-1], kernel_size=1, stride=2, padding=0))
        return x, names


class FeaturePyramidNetwork(nn.Module):
    """torchvision/ops/feature_pyramid_network.py (without the state-dict version hook):
    1x1 lateral convolutions, nearest upsampling to each lateral's size (a size read), 3x3
    output convolutions, an extra block; a dict in, a dict out."""

    def __init__(self, in_channels_list, out_channels, extra_blocks=None, norm_layer=None):
        super().__init__()
        self.inner_blocks = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for in_channels in in_channels_list:
            if in_channels == 0:
                raise ValueError("in_channels=0 is currently not supported")
            inner_block_module = Conv2dNormActivation(
                in_channels, out_channels, kernel_size=1, padding=0, norm_layer=norm_layer,
                activation_layer=None)
            layer_block_module = Conv2dNormActivation(
                out_channels, out_channels, kernel_size=3, norm_layer=norm_layer,
                activation_layer=None)
            self.inner_blocks.append(inner_block_module)
            self.layer_blocks.append(layer_block_module)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        self.extra_blocks = extra_blocks

    def get_result_from_inner_blocks(self, x: Tensor, idx: int) -> Tensor:
        num_blocks = len(self.inner_blocks)
        if idx < 0:
            idx += num_blocks
        out = x
        for i, module in enumerate(self.inner_blocks):
            if i == idx:
                out = module(x)
        return out

    def get_result_from_layer_blocks(self, x: Tensor, idx: int) -> Tensor:
        num_blocks = len(self.layer_blocks)
        if idx < 0:
            idx += num_blocks
        out = x
        for i, module in enumerate(self.layer_blocks):
            if i == idx:
                out = module(x)
        return out

    def forward(self, x: dict) -> dict:
        names = list(x.keys())
        x = list(x.values())
        last_inner = self.get_result_from_inner_blocks(x[-1], -1)
        results = []
        results.append(self.get_result_from_layer_blocks(last_inner, -1))
        for idx in range(len(x) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(x[idx], idx)
            feat_shape = inner_lateral.shape[-2:]
            inner_top_down = F.interpolate(last_inner, size=feat_shape, mode="nearest")
            last_inner = inner_lateral + inner_top_down
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, x, names)
        out = OrderedDict([(k, v) for k, v in zip(names, results)])
        return out


class BackboneWithFPN(nn.Module):
    """torchvision/models/detection/backbone_utils.py: a body returning intermediate layers
    and an FPN over them."""

    def __init__(self, backbone, return_layers, in_channels_list, out_channels, extra_blocks=None,
                 norm_layer=None) -> None:
        super().__init__()
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels_list,
                                         out_channels=out_channels, extra_blocks=extra_blocks,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x):
        x = self.body(x)
        x = self.fpn(x)
        return x


def resnet_fpn(width: int = 4, out_channels: int = 6, seed: int = 0) -> BackboneWithFPN:
    """torchvision's ``resnet_fpn_backbone`` on a narrow ResNet-18 (frozen BatchNorm):
    layer1..layer4 into an FPN, five maps of strides 4, 8, 16, 32 and 64."""
    body = freeze_batchnorm(bench_resnet((1, 1, 1, 1), width=width, through="layer4", seed=seed),
                            torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
    torch.manual_seed(seed)
    return BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                           [width * 2 ** k for k in range(4)], out_channels).eval()
