"""Teaching demonstrations of streaming CNNs; ``python -m demo [--quick]`` regenerates them all.

* ``demo.walkthrough``: the paper's Fig. 1, a 14-value vector streamed in three tiles.
* ``demo.residual``: how a residual block's two paths set the overlap (Algorithm 2 on a graph).
* ``demo.training_equivalence``: the paper's Fig. 4 / Table 1, conventional and streamed training side by side.
* ``demo.resolution``: a synthetic task that only the full resolution solves, plus a streamed saliency map.
"""
