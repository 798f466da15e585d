"""Segmentation with context wider than a tile: a U-Net trained tile by tile with ``Streaming.pixel_loss``.

The task (``make_scene``): textured noise with a few small bright markers (discs of radius 3); a pixel's
label is 1 where it lies within ``distance`` (20) pixels of a marker's pixel. The label therefore depends on
pixels 20 px away: a pixel 20 px to the right of a marker (label 1) and one 21 px to its right (label 0, if
no other marker is near) can have identical surroundings out to 19 px, so any model that decides a pixel
from a window narrower than 2 x 20 + 1 = 41 px must get one of them wrong. The U-Net (``UNet``: three
levels, max-pool down, ``nn.ConvTranspose2d`` up) sees 59 px.

Streamed with 80 x 80 input tiles, the U-Net's tiles overlap by 48 px, so each tile computes a 32 x 32
block of the output: the context a pixel's label needs (41 px) is wider than the block its tile computes,
and comes from input that neighbouring tiles own too. (No tile can be narrower than the receptive field:
streaming is exact because each tile's input holds its outputs' whole receptive field.) Cutting the image
into independent tile-sized patches, the usual way to fit memory, would hide from many positive pixels the
marker that makes them positive (the figure shows the trained network applied so). Streaming gives every
tile the overlap its outputs need, so the loss and gradients are the whole image's: checked against
conventional autograd on the first step, in float64 and float32.

``pixel_loss`` runs each tile once, forward and at once its backward (``streamcnn.dense``): the demo counts
the network's forward calls and the backward calls through its outputs on every step, and ``last_stats``
records that the loss's backward recomputed no tile. Held-out images are predicted by streamed inference
into a numpy array (``Streaming(net, tile)(x, out=array)`` under ``no_grad``).
"""
from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from demo import figure_cli

# relative; summation order only: verify/test_pixel_loss.py's float64, verify/test_upsampling.py's float32
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
TRAIN, TEST = 0, 1   # seed streams of the training and held-out scenes


@dataclass
class Config:
    """Everything that defines the segmentation experiment."""

    size: int = 256             # image edge (training and held-out images)
    tile: int = 80              # streamed input tile edge, overlap included
    distance: int = 20          # label: a marker pixel within this many pixels
    markers: tuple[int, int] = (3, 6)   # markers per image, drawn uniformly from this range (inclusive)
    marker_radius: int = 3
    marker_amplitude: float = 5.0       # in units of the texture's standard deviation
    channels: tuple[int, ...] = (8, 16, 16, 32)
    steps: int = 150            # one new image per step
    lr: float = 5e-3            # Adam
    n_test: int = 4
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        """A smoke-test configuration: 3 x 3 tiles, a few steps."""
        return cls(size=128, markers=(1, 3), steps=4, n_test=1)


# ---------------------------------------------------------------- the task

@dataclass(frozen=True)
class Scene:
    image: np.ndarray     # (H, W) float32
    label: np.ndarray     # (H, W) float32, 1 within ``distance`` of a marker's pixel
    centres: np.ndarray   # (n, 2) int: the markers' (y, x)
    markers: np.ndarray   # (H, W) bool: the markers' pixels


def discs(centres: np.ndarray, size: int, radius: int) -> np.ndarray:
    """(len(centres), size, size) bool: each marker's pixels, a disc of ``radius`` around its centre."""
    yy, xx = np.mgrid[:size, :size]
    return np.stack([(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2 for y, x in centres])


def make_scene(cfg: Config, split: int, index: int) -> Scene:
    """Scene ``index`` of ``split`` (TRAIN or TEST): seeded by (seed, split, index), so the two never share one.

    Texture: white noise smoothed over 2 px, standardised, plus a slow shading (smoothed over 24 px, std 0.7);
    the markers add ``marker_amplitude`` on discs of ``marker_radius``."""
    rng = np.random.default_rng([cfg.seed, split, index])
    n = cfg.size
    texture = ndimage.gaussian_filter(rng.standard_normal((n, n)), 2)
    shading = ndimage.gaussian_filter(rng.standard_normal((n, n)), 24)
    image = texture / texture.std() + 0.7 * shading / shading.std()
    centres = rng.integers(0, n, (int(rng.integers(cfg.markers[0], cfg.markers[1] + 1)), 2))
    markers = np.any(discs(centres, n, cfg.marker_radius), axis=0)
    label = ndimage.distance_transform_edt(~markers) <= cfg.distance
    return Scene((image + cfg.marker_amplitude * markers).astype(np.float32), label.astype(np.float32),
                 centres, markers)


def tensors(scene: Scene, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and label as (1, 1, H, W) tensors."""
    return (torch.from_numpy(scene.image)[None, None].to(dtype),
            torch.from_numpy(scene.label)[None, None].to(dtype))


def patch_boxes(size: int, patch: int) -> list[slice]:
    """Non-overlapping ``patch``-long intervals covering ``size`` (the last one shorter)."""
    return [slice(a, min(a + patch, size)) for a in range(0, size, patch)]


def blind_positives(scene: Scene, cfg: Config) -> np.ndarray:
    """Positive pixels none of whose markers within ``distance`` has a pixel in the pixel's own tile-sized
    patch (of ``patch_boxes``): from that patch alone their label cannot be told (the same patch, with those
    markers moved elsewhere, would make them negative)."""
    n = cfg.size
    markers = discs(scene.centres, n, cfg.marker_radius)
    reach = [ndimage.distance_transform_edt(~disc) <= cfg.distance for disc in markers]
    seen = np.zeros((n, n), bool)   # a marker within reach has a pixel in the same patch
    for rows in patch_boxes(n, cfg.tile):
        for cols in patch_boxes(n, cfg.tile):
            for disc, near in zip(markers, reach):
                if disc[rows, cols].any():
                    seen[rows, cols] |= near[rows, cols]
    return (scene.label > 0.5) & ~seen


# ---------------------------------------------------------------- the network

class UNet(nn.Module):
    """A U-Net: a 3x3 stem, per level a 2x2 max-pool and a 3x3 convolution, back up by 2x2 transposed
    convolutions, each joined to its skip and fused by a 3x3 convolution; one logit per pixel."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 16, 32)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU())
        pairs = list(zip(channels, channels[1:]))
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(a, b, 3, padding=1), nn.ReLU())
                                   for a, b in pairs)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in pairs)
        self.fuse = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * a, a, 3, padding=1), nn.ReLU())
                                  for a, _ in pairs)
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x):
        levels = [self.stem(x)]   # each level's map, finest first
        for down in self.downs:
            levels.append(down(levels[-1]))
        x = levels.pop()
        for up, fuse in zip(reversed(self.ups), reversed(self.fuse)):
            x = fuse(torch.cat([levels.pop(), up(x)], 1))
        return self.head(x)


per_pixel = functools.partial(F.binary_cross_entropy_with_logits, reduction="none")


def stream_plan(net: nn.Module, cfg: Config) -> dict:
    """The tiles of one training image, and the block of output each interior tile owns."""
    from streamcnn import plan

    p = plan(net, (1, 1, cfg.size, cfg.size), cfg.tile)
    return {"num_tiles": p.num_tiles, "tiles_per_axis": list(p.tiles_per_axis), "overlap": p.overlap[0],
            "receptive_field": p.receptive_field[0], "min_tile": p.min_tile_size[0],
            "owned": cfg.tile - p.overlap[0], "coverage": p.coverage}


# ---------------------------------------------------------------- the check and the training

def first_step_check(initial: nn.Module, scene: Scene, cfg: Config, dtype: torch.dtype) -> dict:
    """The first step's loss and parameter gradients, streamed (``pixel_loss``) and by conventional autograd
    on the whole image, from the same weights: relative differences (``streamcnn.testing.rel_err``)."""
    from streamcnn import Streaming
    from streamcnn.testing import rel_err

    net = copy.deepcopy(initial).to(dtype)
    params = list(net.parameters())
    x, t = tensors(scene, dtype)
    streamed = Streaming(net, cfg.tile, progress=False).pixel_loss(x, t, per_pixel)
    s_grads = torch.autograd.grad(streamed, params)
    conventional = per_pixel(net(x), t).mean()
    c_grads = torch.autograd.grad(conventional, params)
    name = str(dtype).replace("torch.", "")
    return {"loss_streamed": streamed.item(), "loss_conventional": conventional.item(),
            "loss_rel_diff": abs(streamed.item() - conventional.item()) / abs(conventional.item()),
            "grad_rel_diff": max(rel_err(s, c) for s, c in zip(s_grads, c_grads)),
            "tolerance": TOLERANCE[name]}


class CallCounter:
    """Logs a module's forward calls, and the backward calls through their outputs (with ``pixel_loss``, one
    each per tile): a forward hook that puts a gradient hook on the output. The hook's closure holds lists:
    streaming refuses hooks whose state changes while a tile runs, but a list in a closure is a log."""

    def __init__(self, module: nn.Module):
        forward, backward = self.forward, self.backward = [], []

        def called(module, args, output):
            forward.append(None)
            if output.requires_grad:
                output.register_hook(lambda grad: backward.append(None))

        self.handle = module.register_forward_hook(called)

    def take(self) -> tuple[int, int]:
        """Calls since the last ``take``: (forward, backward)."""
        counts = (len(self.forward), len(self.backward))
        self.forward.clear()
        self.backward.clear()
        return counts

    def remove(self) -> None:
        self.handle.remove()


def train(net: nn.Module, cfg: Config) -> dict:
    """Adam on a new training scene per step, every step's loss and gradients from ``pixel_loss``."""
    from streamcnn import Streaming

    model = Streaming(net, cfg.tile, progress=False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    counter = CallCounter(net)
    losses, counts = [], set()
    start = time.perf_counter()
    for step in range(cfg.steps):
        x, t = tensors(make_scene(cfg, TRAIN, step))
        loss = model.pixel_loss(x, t, per_pixel)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        fwd, bwd = counter.take()
        stats = model.last_stats
        counts.add((stats.forward.tiles, stats.forward.computed, stats.backward.computed, fwd, bwd))
        if step % 25 == 0 or step == cfg.steps - 1:
            print(f"  step {step:>4}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    counter.remove()
    keys = ("tiles", "tiles_computed", "backward_recomputed", "module_forward_calls", "module_backward_calls")
    return {"loss": losses, "seconds": time.perf_counter() - start,
            "per_step_counts": [dict(zip(keys, c)) for c in sorted(counts)]}


# ---------------------------------------------------------------- evaluation

class Written:
    """A numpy array given as ``out=``, recording the box each tile writes: the block of output it owns."""

    def __init__(self, shape: tuple):
        self.array = np.zeros(shape, np.float32)
        self.shape = shape
        self.boxes: list[tuple] = []

    def __setitem__(self, box: tuple, value) -> None:
        self.array[box] = value
        self.boxes.append(box)

    def __getitem__(self, box: tuple):
        return self.array[box]


def predict(net: nn.Module, image: np.ndarray, tile: int) -> tuple[np.ndarray, list[tuple]]:
    """Logits of ``image`` by streamed inference into a numpy array (``out=``), tile by tile; and the
    (rows, cols) slices each tile wrote."""
    from streamcnn import Streaming

    out = Written((1, 1) + image.shape)
    with torch.no_grad():
        Streaming(net, tile, progress=False)(torch.from_numpy(image)[None, None], out=out)
    return out.array[0, 0], [box[2:] for box in out.boxes]


def predict_patchwise(net: nn.Module, image: np.ndarray, patch: int) -> np.ndarray:
    """Logits of ``image`` from the same network run on independent ``patch``-sized patches (no overlap)."""
    out = np.zeros(image.shape, np.float32)
    boxes = patch_boxes(image.shape[0], patch)
    with torch.no_grad():
        for rows in boxes:
            for cols in boxes:
                out[rows, cols] = net(torch.from_numpy(np.ascontiguousarray(image[rows, cols]))[None, None])[0, 0]
    return out


def scores(logits: np.ndarray, scene: Scene, blind: np.ndarray) -> dict:
    """Pixel error, IoU of the positive class, and the error on the ``blind`` positive pixels."""
    pred, truth = logits > 0, scene.label > 0.5
    union = (pred | truth).sum()
    return {"pixel_error": float((pred != truth).mean()),
            "iou": float((pred & truth).sum() / union) if union else 1.0,
            "blind_error": float((~pred[blind]).mean()) if blind.any() else 0.0}


def evaluate(net: nn.Module, cfg: Config) -> tuple[dict, dict]:
    """Scores on the held-out scenes (mean over them), and the first scene's arrays for the figure."""
    net.eval()
    records, shown = [], None
    for i in range(cfg.n_test):
        scene = make_scene(cfg, TEST, i)
        blind = blind_positives(scene, cfg)
        streamed, blocks = predict(net, scene.image, cfg.tile)
        patchwise = predict_patchwise(net, scene.image, cfg.tile)
        records.append({"streamed": scores(streamed, scene, blind), "patchwise": scores(patchwise, scene, blind),
                        "positive_fraction": float(scene.label.mean()),
                        "blind_fraction_of_positives": float(blind.sum() / max(1, (scene.label > 0.5).sum()))})
        if i == 0:
            shown = {"scene": scene, "streamed": streamed, "patchwise": patchwise, "blind": blind, "blocks": blocks}

    def mean(get):
        return float(np.mean([get(r) for r in records]))

    summary = {way: {key: mean(lambda r: r[way][key]) for key in records[0][way]} for way in ("streamed", "patchwise")}
    summary["positive_fraction"] = mean(lambda r: r["positive_fraction"])
    summary["blind_fraction_of_positives"] = mean(lambda r: r["blind_fraction_of_positives"])
    summary["per_image"] = records
    return summary, shown


# ---------------------------------------------------------------- figure

def plot(results: dict, shown: dict, path: Path) -> None:
    """Loss curve; a held-out image with the blocks the tiles computed, its truth, the streamed prediction,
    and the same network run on independent tile-sized patches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, plan, test = results["config"], results["stream_plan"], results["test"]
    scene, tile = shown["scene"], cfg["tile"]
    fig, axes = plt.subplots(1, 5, figsize=(24, 5.6), width_ratios=[1.3, 1, 1, 1, 1], layout="constrained")
    ax = axes[0]
    loss = np.asarray(results["training"]["loss"])
    steps = np.arange(1, len(loss) + 1)
    ax.semilogy(steps, loss, color="C0", lw=0.8, alpha=0.5, label="per step (a new image each)")
    window = min(10, len(loss))
    ax.semilogy(steps[window - 1:], np.convolve(loss, np.ones(window) / window, mode="valid"), color="C0",
                lw=2, label=f"mean of {window} steps")
    ax.set(xlabel="step", ylabel="mean per-pixel BCE (log scale)", title="Training loss (Streaming.pixel_loss)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.imshow(scene.image, cmap="gray")
    for rows, cols in shown["blocks"]:
        ax.add_patch(plt.Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start,
                                   rows.stop - rows.start, fill=False, color="yellow", lw=0.5, alpha=0.7))
    for y, x in scene.centres:
        ax.add_patch(plt.Circle((x, y), cfg["distance"] + cfg["marker_radius"], fill=False, color="cyan", lw=1))
    ax.set_title(f"held-out image; yellow: the output block each {tile} px tile\ncomputes; cyan: "
                 f"{cfg['distance']} px around each marker", fontsize=10)
    ax = axes[2]
    ax.imshow(scene.label, cmap="gray", vmin=0, vmax=1)
    if shown["blind"].any():
        ax.contour(shown["blind"], levels=[0.5], colors="C2", linewidths=0.8)
    ax.set_title(f"truth; green: positives whose marker lies outside\ntheir own {tile} px patch "
                 f"(right panel's patches)", fontsize=10)
    for ax, key, title in ((axes[3], "streamed", f"streamed, {tile} px tiles, into a numpy array"),
                           (axes[4], "patchwise", f"same network on independent {tile} px patches")):
        ax.imshow(1 / (1 + np.exp(-shown[key])), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"P(label 1): {title}\nheld-out IoU {test[key]['iou']:.2f}, pixel error "
                     f"{100 * test[key]['pixel_error']:.1f}%", fontsize=10)
    for box in patch_boxes(scene.image.shape[0], tile)[1:]:
        axes[4].axhline(box.start - 0.5, color="cyan", lw=0.8)
        axes[4].axvline(box.start - 0.5, color="cyan", lw=0.8)
    for ax in axes[1:]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"A U-Net (receptive field {plan['receptive_field']} px) trained tile by tile: label 1 within "
                 f"{cfg['distance']} px of a marker, wider than the {plan['owned']} px block a tile computes "
                 f"(scores: mean over {cfg['n_test']} held-out images)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(reports_dir: Path, quick: bool = False) -> dict:
    """Check, train, evaluate; write ``segmentation.png`` and ``segmentation.json``."""
    cfg = Config.quick() if quick else Config()
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = UNet(cfg.channels)
    first = make_scene(cfg, TRAIN, 0)
    check = {name: first_step_check(net, first, cfg, dtype)
             for name, dtype in (("float64", torch.float64), ("float32", torch.float32))}
    for name, c in check.items():
        print(f"  first step, streamed vs conventional, {name}: loss {c['loss_rel_diff']:.1e}, "
              f"gradients {c['grad_rel_diff']:.1e} (relative; tolerance {c['tolerance']:.0e})")
    results = {"config": asdict(cfg), "stream_plan": stream_plan(net, cfg), "first_step_check": check,
               "training": train(net, cfg)}
    test, shown = evaluate(net, cfg)
    results["test"] = test
    results["seconds"] = time.perf_counter() - start
    print(f"  held-out: IoU {test['streamed']['iou']:.3f} streamed, {test['patchwise']['iou']:.3f} on patches")
    figure_cli.write_figure(lambda data, path: plot(results, data, path), shown, reports_dir, "segmentation.png")
    (reports_dir / "segmentation.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    figure_cli.run_experiment(main, __doc__)
