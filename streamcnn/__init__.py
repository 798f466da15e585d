"""streamcnn: train CNNs on images of any size by streaming tiles through the front end.

Public API:
    Streaming(module, tile_size)        nn.Module that runs ``module`` tile by tile
    plan(module, input_shape, tile_size) -> StreamPlan (tiles, overlap, memory estimates)
    geometry.receptive_field(module, ndim, tile_size=None)  per-axis receptive field
    testing.compare(module, x, tile_size)  check streaming against conventional autograd
"""

from . import geometry, testing
from .geometry import TileTooSmallError, receptive_field
from .layers import StreamingError
from .plan import StreamPlan, plan
from .streaming import Streaming

__all__ = ["Streaming", "plan", "StreamPlan", "receptive_field", "geometry", "testing",
           "StreamingError", "TileTooSmallError"]
