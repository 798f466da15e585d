"""How a residual block's two paths set the overlap: Algorithm 2 on ``y = x + conv(ReLU(conv(x)))``.

``compute()`` runs the reference (``reference.graph.Residual``, ``reference.overlap``) and returns every
number docs/residual.md quotes; ``main(reports_dir)`` draws ``reports/residual_overlap.png`` from it.
Deterministic (no random numbers) and quick.

Run: ``python -m demo.residual [--reports-dir reports]``.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from demo.figure_cli import run_alone, write_figure
from demo.walkthrough import INCOMPLETE, NEUTRAL, PALE, TEXT, TILE_COLOURS, Canvas
from reference import overlap
from reference.graph import Concat, Residual
from reference.layers import Conv, MaxPool, ReLU
from reference.tiling import Field, chain_field

TILE = 12  # Algorithm 2's tile, in input positions
K = 10  # the output whose receptive field the figure draws


def conv(kernel, **kw):
    """A one-channel convolution with Algorithm 2's constant weights 1/n (the probe's kernel, lines 3-4)."""
    return Conv(np.full((1, 1, kernel), 1.0 / kernel), **kw)


def conv_path():
    """The residual path of a ResNet basic block: conv 3, ReLU, conv 3, both with padding 1."""
    return [conv(3, padding=1), ReLU(), conv(3, padding=1)]


# The blocks of the table on the page: (path a, path b), merged by a sum or a concatenation.
TABLE = {
    "ResNet basic block": (Residual, conv_path(), []),
    "ResNet downsampling block": (Residual, [conv(3, stride=2, padding=1), ReLU(), conv(3, padding=1)],
                                  [conv(1, stride=2)]),
    "Inception-style concatenation": (Concat, [MaxPool(3, stride=1, padding=1), conv(1)], [conv(5, padding=2)]),
    "valid convolutions": (Residual, [conv(3), conv(3)], [conv(5)]),
}


@dataclass(frozen=True)
class TableRow:
    field_a: Field
    field_b: Field
    field: Field  # the block's: the hull
    rf_minus_stride: int  # analytic_overlap's forward overlap
    algorithm2_overlap: int  # Algorithm 2's, on a tile that starts and ends on the stride grid


@dataclass(frozen=True)
class Residual1D:
    identity: np.ndarray  # the identity path's probe values on the tile (the tile itself)
    conv1: np.ndarray  # the conv path's probe after its first conv (and the ReLU, which changes nothing >= 0)
    conv2: np.ndarray  # ... after its second conv: the path's output
    block: np.ndarray  # the block's output probe: the sum
    band_identity: tuple[int, int]
    band_conv1: tuple[int, int]
    band_conv_path: tuple[int, int]
    band_block: tuple[int, int]
    grad_band_block: tuple[int, int]  # invalid input gradients of the block (gradient of ones on its output)
    field_identity: Field
    field_conv_path: Field
    field_block: Field
    overlap: int  # rf - stride (analytic_overlap)
    algorithm2_overlap: int  # tile - valid outputs * stride (Algorithm 2)
    table: dict[str, TableRow]


def _aligned_tile(field: Field) -> int:
    """A tile of rf + a multiple of the stride, large enough for valid outputs (as verify/test_reference_overlap.py)."""
    return field.size + field.stride * (-(-(field.size + field.offset) // field.stride) + 1)


def table_row(merge, path_a, path_b) -> TableRow:
    block = [merge(path_a, path_b)]
    field = overlap.receptive_field(block, 1)[0]
    return TableRow(chain_field([layer.window(1)[0] for layer in path_a]),
                    chain_field([layer.window(1)[0] for layer in path_b]), field,
                    overlap.analytic_overlap(block, 1)[0].forward,
                    overlap.algorithm2(block, _aligned_tile(field)).forward_overlap[0])


def compute() -> Residual1D:
    """Every number of docs/residual.md, from the reference."""
    path, ones = conv_path(), np.ones((1, 1, TILE))
    block = Residual(path, [])
    conv1 = path[1].forward(path[0].forward(ones))
    conv2 = path[2].forward(conv1)
    found_block = overlap.algorithm2([block], TILE)
    return Residual1D(
        identity=ones.reshape(-1), conv1=conv1.reshape(-1), conv2=conv2.reshape(-1),
        block=block.forward(ones).reshape(-1),
        band_identity=(0, 0),  # the identity reads no padding: nothing to find
        band_conv1=overlap.algorithm2(path[:1], TILE).forward[-1][0],
        band_conv_path=overlap.algorithm2(path, TILE).forward[-1][0],
        band_block=found_block.forward[-1][0], grad_band_block=found_block.backward[0][0],
        field_identity=chain_field([]), field_conv_path=overlap.receptive_field(path, 1)[0],
        field_block=overlap.receptive_field([block], 1)[0],
        overlap=overlap.analytic_overlap([block], 1)[0].forward,
        algorithm2_overlap=found_block.forward_overlap[0],
        table={name: table_row(*spec) for name, spec in TABLE.items()},
    )


def frac(value: float) -> str:
    """A probe value as the fraction it is (its denominators are powers of the kernel size)."""
    return str(Fraction(float(value)).limit_denominator(1000))


def fmt(values) -> str:
    """``[a, b, ...]`` with fractions, as docs/residual.md prints them."""
    return "[" + ", ".join(frac(v) for v in np.asarray(values).tolist()) + "]"


# ---------------------------------------------------------------- drawing
BLUE, ORANGE, GREEN = TILE_COLOURS


def _probe_row(c, label, values, interior, colour, band, note):
    """One row of probe values: contaminated cells (not the interior value) in red."""
    cells = [(i, frac(v), PALE[colour] if np.isclose(v, interior) else "#F8D3D4",
              colour if np.isclose(v, interior) else INCOMPLETE, TEXT if np.isclose(v, interior) else INCOMPLETE, None)
             for i, v in enumerate(values)]
    c.row(label, cells, note=f"band {band[0]} | {band[1]}" + (f": {note}" if note else ""), label_colour=colour)


def _span_row(c, label, start, stop, colour, note):
    """Input positions 0..19, the read ones [start, stop) filled."""
    cells = [(i, "", colour if start <= i < stop else NEUTRAL, colour if start <= i < stop else "#CCCCCC",
              TEXT, None) for i in range(20)]
    c.row(label, cells, note=note, label_colour=colour)


def _tile_rows(c, data, name, start, colour):
    lo, hi = data.band_block
    c.row(f"tile {name}: x[{start}:{start + TILE}]",
          [(start + i, "1", PALE[colour], colour, TEXT, None) for i in range(TILE)], label_colour=colour)
    cells = []
    for i, v in enumerate(data.block):
        valid = lo <= i < TILE - hi
        cells.append((start + i, frac(v), colour if valid else "#F8D3D4", colour if valid else INCOMPLETE,
                      "white" if valid else INCOMPLETE, None))
    c.row(f"tile {name}: block output", cells, label_colour=colour,
          note=f"valid: {start + lo}..{start + TILE - hi - 1}")


def draw(data: Residual1D, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    c = Canvas(ax, note_x=TILE + 0.4)
    c.title("1   Algorithm 2 on a residual block, y = x + conv(ReLU(conv(x))): kernels set to 1/3, an all-ones tile of 12")
    c.indices(range(TILE), range(TILE), "")
    _probe_row(c, "identity path", data.identity, 1, BLUE, data.band_identity, "reads no padding")
    _probe_row(c, "conv path, conv 1", data.conv1, 1, ORANGE, data.band_conv1, "read one padded zero")
    _probe_row(c, "conv path, conv 2", data.conv2, 1, ORANGE, data.band_conv_path, "contaminated by conv 1's band")
    _probe_row(c, "sum: block output", data.block, 2, GREEN, data.band_block, "interior 2; the wider path's band")

    f_path, f_block, k = data.field_conv_path, data.field_block, K
    c.note_x = 20.0
    c.title(f"2   What output {k} reads: each path's window, and the block's receptive field, their hull")
    c.indices(range(20), range(20), "x")
    _span_row(c, "identity path", k, k + 1, BLUE, f"size {data.field_identity.size}, offset {data.field_identity.offset}")
    _span_row(c, "conv path", k - f_path.offset, k - f_path.offset + f_path.size, ORANGE,
              f"size {f_path.size}, offset {f_path.offset}")
    _span_row(c, "block (hull)", k - f_block.offset, k - f_block.offset + f_block.size, GREEN,
              f"size {f_block.size}, offset {f_block.offset}")

    c.title(f"3   Interior tiles of {TILE} overlapping by rf - stride = {data.overlap}: their valid outputs abut")
    _tile_rows(c, data, "A", 0, BLUE)
    _tile_rows(c, data, "B", TILE - data.overlap, ORANGE)

    c.save(path, (-7.2, 25.5), 14.0, "How a residual block's two paths set the overlap (numbers from reference/)")


def main(reports_dir: pathlib.Path) -> None:
    """Render reports/residual_overlap.png (called by ``python -m demo``)."""
    write_figure(draw, compute(), reports_dir, "residual_overlap.png")


if __name__ == "__main__":
    run_alone(main, __doc__)
