"""The paper's Fig. 1 with real numbers: a vector of 14 values, a kernel of 3, three tiles.

``compute()`` runs the reference (``reference.streaming.streamed`` and
``conventional``) on a seeded example and returns every number the figure and
docs/walkthrough.md show; ``main(reports_dir)`` draws
``reports/fig1_1d_walkthrough.png`` from it. Values are small integers, so every
sum in the figure can be checked by hand and streaming and ordinary backprop agree
exactly.

Run: ``python -m demo.walkthrough [--reports-dir reports]``.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np

from demo.figure_cli import run_alone, write_figure
from reference.layers import Conv
from reference.streaming import conventional, streamed

SEED = 29
N, KERNEL, TILE_SIZE = 14, 3, 8  # tile size 8: forward crops of 6, backward crops of up to 8 -> 3 tiles


@dataclass(frozen=True)
class Tile:
    """What one tile of Algorithm 1 computes (ranges are [start, stop) in full-vector coordinates)."""

    forward_crop: tuple[int, int]  # x values the forward pass reads
    out: tuple[int, int]  # its outputs (a, b, c of Eqs. 2-4)
    output: np.ndarray
    grad_fed: tuple[int, int]  # outputs whose gradient the backward pass feeds in
    backward_crop: tuple[int, int]  # x values the backward pass recomputes from
    tile_input_grad: np.ndarray  # dx over backward_crop, incomplete near inner sides
    owned: tuple[int, int]  # x positions whose (complete) gradient this tile contributes
    weight_grad: np.ndarray  # its term of Eq. 6
    weight_grad_so_far: np.ndarray  # kernel gradient after this tile


@dataclass(frozen=True)
class Walkthrough:
    x: np.ndarray
    w: np.ndarray
    r: np.ndarray  # loss L = sum(p * r), so dL/dp = r
    output: np.ndarray  # x * w on the whole vector (Eq. 1)
    grad_out: np.ndarray  # dL/dp
    weight_grad: np.ndarray  # Eq. 5 on the whole vector
    input_grad: np.ndarray  # Eq. 7 on the whole vector
    tiles: tuple[Tile, ...]
    streamed_output: np.ndarray
    streamed_weight_grad: np.ndarray
    streamed_input_grad: np.ndarray


def compute(seed: int = SEED) -> Walkthrough:
    """Every number of the walk-through, from the reference."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 10, N).astype(float)
    w = rng.integers(-2, 3, KERNEL).astype(float)
    r = rng.integers(-2, 3, N - KERNEL + 1).astype(float)
    layers = [Conv(w.reshape(1, 1, KERNEL))]
    as_batch = x.reshape(1, 1, N)
    output, grads, input_grad = conventional(layers, as_batch, lambda p: r.reshape(p.shape))
    record = []
    s_output, s_grads, s_input_grad = streamed(layers, as_batch, TILE_SIZE, lambda p: r.reshape(p.shape), record=record)
    tiles, so_far = [], np.zeros(KERNEL)
    for entry in record:
        (t,) = entry["tile"]
        contribution = entry["weight_grads"][0]["w"].reshape(KERNEL)
        so_far = so_far + contribution
        tiles.append(Tile(t.forward[0], t.out, entry["output"].reshape(-1), t.grad_out, t.backward[0],
                          entry["tile_input_grad"].reshape(-1), t.unique[0], contribution, so_far))
    return Walkthrough(x, w, r, output.reshape(-1), r, grads[0]["w"].reshape(KERNEL), input_grad.reshape(-1),
                       tuple(tiles), s_output.reshape(-1), s_grads[0]["w"].reshape(KERNEL), s_input_grad.reshape(-1))


def probe_example(tile: int = 6) -> dict[str, np.ndarray]:
    """Algorithm 2 on the same kernel size: constant 1/n weights, an all-ones tile of 6, gradient of ones.

    Returns the probe's activations and input gradients for the valid conv (no
    padding) and for a "same" conv (padding 1). Interior values are 1 in both, so
    every value that is not 1 marks an invalid border position.
    """
    ones, w = np.ones((1, 1, tile)), np.full((1, 1, KERNEL), 1.0 / KERNEL)
    result = {}
    for name, padding in (("valid", 0), ("same", 1)):
        layer = Conv(w, padding=padding)
        out = layer.forward(ones)
        result[f"probe_{name}_out"] = out.reshape(-1)
        result[f"probe_{name}_dx"] = layer.input_grad(ones, np.ones_like(out)).reshape(-1)
    return result


def eq5_as_printed(x: np.ndarray, dp: np.ndarray, n: int) -> np.ndarray:
    """The paper's Eq. 5 taken literally, case distinction included: sum_i dp_i x_{i+j} only where 0 <= i - j < |p|.

    Not the kernel gradient (docs/walkthrough.md explains why); the page shows it next to Eq. 5 done right.
    """
    return np.array([sum(dp[i] * x[i + j] for i in range(len(dp)) if 0 <= i - j < len(dp)) for j in range(n)])


def fmt(values) -> str:
    """Integers without a trailing .0, as the figure and the docs print them."""
    return "[" + ", ".join(f"{v:g}" for v in np.asarray(values).tolist()) + "]"


# ---------------------------------------------------------------- drawing
TILE_COLOURS = ["#4C72B0", "#DD8452", "#55A868"]
PALE = {c: p for c, p in zip(TILE_COLOURS, ["#D6E0F0", "#F6DCC7", "#D3EBD9"])}
MID = {c: p for c, p in zip(TILE_COLOURS, ["#9DB3D8", "#EDB48A", "#9CCFA8"])}  # overlap cells
INCOMPLETE, NEUTRAL, TEXT = "#E15759", "#EEEEEE", "#222222"


class Canvas:
    """Rows of numbered cells on a grid: column c is x_c; outputs sit under their window's centre."""

    def __init__(self, ax, note_x=14.4):
        self.ax, self.y, self.note_x = ax, 0.0, note_x

    def title(self, text):
        self.y -= 1.0
        self.ax.text(-6.2, self.y, text, fontsize=12.5, fontweight="bold", va="center", color=TEXT)
        self.y -= 0.9

    def row(self, label, cells, note=None, label_colour=TEXT):
        """cells: (column, value, face colour, edge colour, text colour, hatch) per cell; a value may be text."""
        self.ax.text(-0.8, self.y, label, ha="right", va="center", fontsize=10.5, color=label_colour)
        for col, value, face, edge, ink, hatch in cells:
            self.ax.add_patch(_rect(col, self.y, face, edge, hatch))
            self.ax.text(col, self.y, value if isinstance(value, str) else f"{value:g}", ha="center", va="center",
                         fontsize=10.5, color=ink, fontweight="bold" if ink != TEXT else "normal")
        if note:
            self.ax.text(self.note_x, self.y, note, va="center", fontsize=9.5, color="#555555")
        self.y -= 1.05

    def save(self, path, x_lim, width, suptitle):
        """Fit the figure to the rows drawn (equal aspect, no axes), title it and write it to ``path``."""
        import matplotlib.pyplot as plt

        fig, ax = self.ax.figure, self.ax
        y_lim = (self.y - 0.3, -0.3)
        ax.set_xlim(*x_lim)
        ax.set_ylim(*y_lim)
        ax.set_aspect("equal")
        ax.axis("off")
        # size the figure to the drawing, so the equal-aspect axes fill it
        title = 0.55
        height = width * (y_lim[1] - y_lim[0]) / (x_lim[1] - x_lim[0]) + title
        fig.set_size_inches(width, height)
        fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - title / height)
        fig.suptitle(suptitle, fontsize=14, y=1 - 0.2 / height)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def indices(self, columns, labels, prefix):
        for col, i in zip(columns, labels):
            self.ax.text(col, self.y + 0.15, f"{prefix}{i}", ha="center", va="center", fontsize=7.5, color="#888888")
        self.y -= 0.55


def _rect(col, y, face, edge, hatch=None):
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch((col - 0.42, y - 0.4), 0.84, 0.8, boxstyle="round,pad=0.0,rounding_size=0.08",
                          facecolor=face, edgecolor=edge, linewidth=1.2, hatch=hatch)


def draw(data: Walkthrough, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    _, ax = plt.subplots()
    c = Canvas(ax)
    centre = 1  # output k sits under x_{k+1}, the centre of its window

    c.title("1   Input x (N = 14) and kernel w (n = 3): the 'valid' convolution p = x * w (Eq. 1) has f + 1 = 12 outputs")
    c.indices(range(N), range(N), "x")
    c.row("x", [(i, v, NEUTRAL, "#999999", TEXT, None) for i, v in enumerate(data.x)])
    c.indices(range(KERNEL), range(KERNEL), "w")
    c.row("w", [(i, v, "#FFF3C4", "#C9A227", TEXT, None) for i, v in enumerate(data.w)])
    c.indices([k + centre for k in range(N - KERNEL + 1)], range(N - KERNEL + 1), "p")
    c.row("p = x * w", [(k + centre, v, NEUTRAL, "#999999", TEXT, None) for k, v in enumerate(data.output)],
          note="whole vector")

    c.title("2   Forward (Alg. 1, lines 1-8): each tile computes 4 outputs from 6 values of x; neighbours overlap by o = n - 1 = 2")
    for t, (tile, colour) in enumerate(zip(data.tiles, TILE_COLOURS)):
        lo, hi = tile.forward_crop
        neighbours = [d.forward_crop for j, d in enumerate(data.tiles) if j != t]
        cells = []
        for i in range(lo, hi):
            shared = any(a <= i < b for a, b in neighbours)
            cells.append((i, data.x[i], MID[colour] if shared else PALE[colour], colour, TEXT, None))
        c.row(f"tile {t + 1}: x[{lo}:{hi}]", cells, label_colour=colour,
              note="darker: read by two tiles" if t == 0 else None)
    for t, (tile, colour) in enumerate(zip(data.tiles, TILE_COLOURS)):
        lo, hi = tile.out
        c.row(f"tile {t + 1} output p[{lo}:{hi}]", [(k + centre, v, colour, colour, "white", None)
                                                  for k, v in zip(range(lo, hi), tile.output)], label_colour=colour)
    c.row("a ⁀ b ⁀ c  (Eq. 4)", [(k + centre, v, TILE_COLOURS[_owner(data.tiles, k)], "#333333", "white", None)
                                 for k, v in enumerate(data.streamed_output)],
          note="= p, value for value")

    c.title("3   Backward (lines 9-15): loss L = Σ p·R, so Δp = R; a tile is fed Δp of its outputs and of the next n - 1")
    c.row("Δp = R", [(k + centre, v, NEUTRAL, "#999999", TEXT, None) for k, v in enumerate(data.grad_out)])
    for t, (tile, colour) in enumerate(zip(data.tiles, TILE_COLOURS)):
        lo, hi = tile.grad_fed
        cells = [(k + centre, data.grad_out[k], colour if tile.out[0] <= k < tile.out[1] else PALE[colour], colour,
                  "white" if tile.out[0] <= k < tile.out[1] else TEXT, None) for k in range(lo, hi)]
        c.row(f"tile {t + 1}: Δp[{lo}:{hi}]", cells, label_colour=colour,
              note="pale: fed only so that the Δx\nthis tile keeps is complete" if t == 0 else None)

    c.title("4   Input gradient (Eq. 7) on each tile, its forward recomputed (checkpointing): keep complete values, drop red")
    for t, (tile, colour) in enumerate(zip(data.tiles, TILE_COLOURS)):
        lo, hi = tile.backward_crop
        cells = []
        for i, v in zip(range(lo, hi), tile.tile_input_grad):
            if tile.owned[0] <= i < tile.owned[1]:
                cells.append((i, v, colour, colour, "white", None))
            elif v != data.input_grad[i]:
                cells.append((i, v, "#F8D3D4", INCOMPLETE, INCOMPLETE, None))
            else:  # complete, but an earlier tile already contributed it
                cells.append((i, v, NEUTRAL, "#BBBBBB", "#777777", None))
        c.row(f"tile {t + 1}: Δx on x[{lo}:{hi}]", cells, label_colour=colour,
              note="dark: kept (complete, this tile's)\nred: incomplete, dropped" if t == 0 else None)
    c.row("assembled Δx", [(i, v, TILE_COLOURS[_owner_x(data.tiles, i)], "#333333", "white", None)
                           for i, v in enumerate(data.streamed_input_grad)], note="= Δx of the whole vector")
    c.row("Δx (Eq. 7, whole)", [(i, v, NEUTRAL, "#999999", TEXT, None) for i, v in enumerate(data.input_grad)])

    c.title("5   Kernel gradient (Eq. 6): each tile adds Eq. 5 over its own Δp; after three tiles it equals the whole (Eq. 5)")
    for t, (tile, colour) in enumerate(zip(data.tiles, TILE_COLOURS)):
        cells = [(j, v, PALE[colour], colour, TEXT, None) for j, v in enumerate(tile.weight_grad)]
        cells += [(j + 6, v, colour, colour, "white", None) for j, v in enumerate(tile.weight_grad_so_far)]
        (lo, hi), x_hi = tile.out, tile.out[1] - 1 + KERNEL
        c.row(f"tile {t + 1} adds Eq. 5 on Δp[{lo}:{hi}], x[{lo}:{x_hi}]", cells, label_colour=colour)
        ax.text(4.0, c.y + 1.05, "→  Δw so far", ha="center", va="center", fontsize=10, color="#555555")
    equal = np.array_equal(data.weight_grad, data.tiles[-1].weight_grad_so_far)
    c.row("Δw, whole vector (Eq. 5)", [(j + 6, v, NEUTRAL, "#333333", TEXT, None) for j, v in enumerate(data.weight_grad)],
          note="= streamed Δw  ✓" if equal else "DIFFERS from the streamed Δw")

    handles = [Patch(facecolor=PALE[col], edgecolor=col, label=f"tile {t + 1}") for t, col in enumerate(TILE_COLOURS)]
    handles += [Patch(facecolor="#F8D3D4", edgecolor=INCOMPLETE, label="incomplete gradient")]
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 0.0), ncol=4, frameon=False, fontsize=10)
    c.save(path, (-6.6, 19.6), 13.5, "Streaming a 1D convolution in three tiles (the paper's Fig. 1, numbers from reference/)")


def _owner(tiles, k):
    return next(t for t, tile in enumerate(tiles) if tile.out[0] <= k < tile.out[1])


def _owner_x(tiles, i):
    return next(t for t, tile in enumerate(tiles) if tile.owned[0] <= i < tile.owned[1])


def main(reports_dir: pathlib.Path) -> None:
    """Render reports/fig1_1d_walkthrough.png (called by ``python -m demo``)."""
    write_figure(draw, compute(), reports_dir, "fig1_1d_walkthrough.png")


if __name__ == "__main__":
    run_alone(main, __doc__)
