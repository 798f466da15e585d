"""The network of the paper's Figs. 2–3, and the seeded square input every benchmarked network trains on."""
import torch
from torch import nn

IN_CHANNELS = 3


def build_network(seed: int = 0) -> nn.Sequential:
    """Three 3x3 convolutions with 3, 64 and 3 output channels (padding 1), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(IN_CHANNELS, 3, kernel_size=3, padding=1),
        nn.Conv2d(3, 64, kernel_size=3, padding=1),
        nn.Conv2d(64, 3, kernel_size=3, padding=1),
    )


def input_shape(size: int, channels: int = IN_CHANNELS) -> tuple:
    """Shape (N, C, H, W) of one square input image of side ``size``."""
    return (1, channels, size, size)


def make_input(size: int, seed: int = 0, device: str = "cpu", channels: int = IN_CHANNELS) -> torch.Tensor:
    """A seeded standard-normal float32 image; it does not require grad (the paper's setting)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(input_shape(size, channels), generator=gen, dtype=torch.float32)
    return x.to(device)


def input_bytes(size: int, channels: int = IN_CHANNELS) -> int:
    """Bytes of one float32 input image of side ``size``."""
    return 4 * channels * size * size
