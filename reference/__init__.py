"""NumPy/CuPy ground truth for the streaming-CNN paper (Pinckaers et al., TPAMI), Sec. 3.

Readable next to the paper: one equation per function, written as the equation
reads, vectorised over positions, on NumPy or CuPy arrays (dispatch on the input's
type, ``reference._xp``). No torch here: torch is one of the oracles in ``verify/``.

===========================  ==============================================  ==========================================
Paper                        Function                                        Proved by
===========================  ==============================================  ==========================================
Eq. 1  valid convolution     ``reference.conv.forward``                      verify/test_reference_conv.py
Eq. 2-3  output split a, b   ``reference.tiling.output_split``,              verify/test_reference_tiling.py
                             ``reference.tiling.input_range``,
                             ``reference.tiling.split``
Eq. 4  concatenation         ``reference.tiling.concat``                     verify/test_reference_tiling.py
Eq. 5  kernel gradient       ``reference.conv.weight_grad``                  verify/test_reference_conv.py
Eq. 6  summed tile gradients ``reference.tiling.summed_weight_grad``         verify/test_reference_tiling.py
                             (terms: ``tiling.tile_weight_grads``)
Eq. 7  input gradient        ``reference.conv.input_grad``                   verify/test_reference_conv.py
Transposed convolution       ``reference.conv.transposed`` (Eq. 7 as the     verify/test_reference_conv.py
(decoders)                   adjoint of Eq. 1)                               (torch's conv_transpose)
Algorithm 1  streaming       ``reference.streaming.streamed`` (vs            verify/test_reference_streaming.py
                             ``reference.streaming.conventional``)
Algorithm 2  tile overlap    ``reference.overlap.algorithm2`` (vs            verify/test_reference_overlap.py
                             ``overlap.analytic_invalid``,
                             ``overlap.analytic_overlap``,
                             ``overlap.receptive_field``)
Residual block (Eq. 1 on     ``reference.graph.Residual``,                   verify/test_reference_graph.py
each path, summed), channel  ``reference.graph.Concat``                      (torch autograd, finite differences)
concatenation
Algorithm 2 on graphs        ``reference.overlap.algorithm2`` on chains      verify/test_reference_overlap.py
                             holding blocks (vs ``analytic_invalid``;        (closed form),
                             the receptive field is the hull over the        verify/test_reference_graph.py
                             paths, ``tiling.Paths.field``)                  (hull vs what torch reads)
===========================  ==============================================  ==========================================

Layers for the chains of Algorithms 1 and 2 (Conv with zero padding at image
borders only, ReLU, MaxPool; forward and backward) are in ``reference.layers``;
the tile layout of Algorithm 1 is ``reference.tiling.plan_axis``. Blocks of two
paths (``reference.graph``) are layers too: ``streaming.conventional`` and
Algorithm 2 take chains holding them; Algorithm 1 here streams chains only.
"""

from reference import conv, graph, layers, overlap, streaming, tiling
from reference._xp import array_module

__all__ = ["array_module", "conv", "graph", "layers", "overlap", "streaming", "tiling"]
