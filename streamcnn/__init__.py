"""streamcnn: train CNNs on images of any size by streaming tiles through the front end.

Public API:
    Streaming(module, tile_size)        nn.Module that runs ``module`` tile by tile
    Streaming.pixel_loss(x, target, loss_fn)  a per-pixel loss, each tile run and
                                        backpropagated once (dense prediction)
    Streaming(...)(x, out=array)        inference written into an array (no_grad)
    ImageArray(array, layout)           an image read tile by tile (memmap, zarr, h5py)
    ImageArray.from_slide(slide, level) a whole-slide image level (OpenSlide, TiffSlide)
    slides.tissue_mask(slide)           a low-resolution tissue mask (Otsu on saturation)
    plan(module, input_shape, tile_size) -> StreamPlan (tiles, overlap, memory estimates)
    receptive_field(module, ndim, tile_size=None)  per-axis receptive field
    channel_stats(module, images, tile_size, names)  exact per-channel statistics, streamed
    update_bn(loader, module, tile_size)  torch.optim.swa_utils.update_bn, streamed
    lsuv_(module, images, tile_size)    unit variance per output channel (LSUV), streamed
    testing.compare(module, x, tile_size)  check streaming against conventional autograd
    tuning.keep_freed_memory()          glibc keeps freed memory process-wide (Streaming
                                        already does during its passes: allocator)

Layers, bottom to top (imports point down only; verify/test_layout.py checks it):
``_args``/``errors``/``progress`` (when tile bars show), ``allocator`` (glibc's heap
during a pass) -> ``geometry`` (integer tile
geometry, no torch), ``reuse`` (which positions a tile computes when overlaps are reused)
-> ``binding`` (arguments as torch binds them), ``channels_last``
(when tiles may take that layout)
-> ``rules`` (which torch operation is which geometric step) -> ``trace`` (torch.fx graph
-> steps) -> ``tiling``, ``moments`` (Chan's merge),
``slides`` (whole-slide images, NumPy only), ``sources`` (where tiles are read from),
``inputs`` (checks) -> ``state`` (what a forward read) -> ``checkpoints`` (level
checkpoints), ``strips`` (reused overlaps: the traced program on new positions) -> ``prefetch`` (reads on a thread
of their own), ``dedup`` (identical tiles computed once), ``skipping`` (tiles without
gradient), ``keeping`` (graphs kept within a budget) -> ``memory``, ``plan`` (estimates
before running) -> ``function`` (tile loop, autograd node) -> ``passes`` (statistics
passes) -> ``dense`` (a per-pixel loss tile by tile, outputs into arrays) -> ``streaming``
(the module) -> ``statistics`` (channel_stats, update_bn, lsuv_)
-> ``testing``.
"""

from . import geometry, slides, testing, tuning
from .errors import StreamingError, TileTooSmallError
from .plan import StreamPlan, plan, receptive_field
from .moments import ChannelStats
from .sources import ImageArray
from .statistics import channel_stats, lsuv_, update_bn
from .streaming import Streaming

__all__ = ["Streaming", "ImageArray", "plan", "StreamPlan", "receptive_field", "geometry",
           "slides", "testing", "tuning", "StreamingError", "TileTooSmallError",
           "channel_stats", "update_bn", "lsuv_", "ChannelStats"]
