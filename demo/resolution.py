"""Resolution pays off: a task that only the full-resolution image solves, trained with streaming.

The images of ``demo.synthetic`` (2048 x 2048 cell-like texture with 7-pixel rings; a positive image holds
a few sharp one-pixel-wide rings among soft ones that any 2x area downsample makes identical to them) are
given to the same small network at 256, 512, 1024 and 2048 pixels.
The downsampled versions train conventionally; the full resolution trains with the fully convolutional
front end wrapped in ``streamcnn.Streaming`` (global max-pool and the linear head come after it), so no
activation of the whole image is ever held. Test AUC per resolution goes to ``reports/resolution.png``.

The saliency map is the gradient of the positive logit with respect to the input image, which the
streaming backward computes tile by tile (``x.requires_grad``): ``reports/saliency.png`` overlays it on
a positive test image with zoomed insets around the planted sharp rings.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from demo import synthetic

MAX_INSETS = 5   # zoomed insets in saliency.png: up to four sharp rings and one soft ring


@dataclass
class Config:
    """Everything that defines the resolution experiment."""

    size: int = 2048
    resolutions: tuple[int, ...] = (256, 512, 1024, 2048)
    n_train: int = 32
    n_test: int = 48
    epochs: int = 8
    batch_size: int = 2
    lr: float = 2e-3
    channels: tuple[int, ...] = (8, 8, 16, 16)
    tile: int = 768
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        """A smoke-test configuration: small images, a few steps."""
        return cls(size=256, resolutions=(64, 128, 256), n_train=6, n_test=6, epochs=1, tile=160)


def detector_front(channels: tuple[int, ...]) -> nn.Sequential:
    """The fully convolutional part: a 4x4 stride-2 stem that still sees every pixel, then conv/pool blocks."""
    c0, c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(1, c0, kernel_size=4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(),
    )


class Detector(nn.Module):
    """Front end (optionally streamed), then global max-pool over the whole image and a linear logit."""

    def __init__(self, channels: tuple[int, ...], tile: int | None):
        super().__init__()
        front = detector_front(channels)
        if tile is not None:
            from streamcnn import Streaming
            front = Streaming(front, tile, progress=False)  # the epoch bar is enough
        self.front = front
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.front(x))[:, 0]


@dataclass
class Data:
    """Full-resolution train and test images (n, size, size), labels, and the test scenes."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_scenes: list


def make_data(cfg: Config) -> Data:
    """Generate the seeded train and test sets (different seeds, so no test image is seen in training)."""
    x_tr, y_tr, _ = synthetic.make_dataset(cfg.n_train, cfg.size, seed=2 * cfg.seed + 1)
    x_te, y_te, scenes = synthetic.make_dataset(cfg.n_test, cfg.size, seed=2 * cfg.seed + 2)
    return Data(x_tr, y_tr, x_te, y_te, scenes)


def at_resolution(data: Data, res: int, size: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Train and test images area-downsampled to ``res``, standardised with training statistics."""
    factor = size // res
    train = synthetic.downsample(data.x_train, factor)
    test = synthetic.downsample(data.x_test, factor)
    mean, std = float(train.mean()), float(train.std())
    as_tensor = lambda a: torch.from_numpy((a - mean) / std).float()[:, None]  # noqa: E731
    return as_tensor(train), as_tensor(test), mean, std


def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Logits, one image at a time (the full-resolution forward is streamed)."""
    model.eval()
    with torch.no_grad():
        return np.array([model(x[i:i + 1]).item() for i in range(len(x))])


def train_at(res: int, data: Data, cfg: Config) -> tuple[Detector, dict]:
    """Train from the shared seeded initialisation at one resolution; return the model and its record."""
    from sklearn.metrics import roc_auc_score

    x_train, x_test, mean, std = at_resolution(data, res, cfg.size)
    streamed = res == cfg.size
    torch.manual_seed(cfg.seed)
    model = Detector(cfg.channels, cfg.tile if streamed else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed)
    y_train = torch.from_numpy(data.y_train).float()
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(cfg.epochs), desc=f"{res}x{res}{' streamed' if streamed else ''}", unit="epoch",
                  leave=False):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        epoch_losses = []
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            epoch_losses.append(loss.item())
        losses.append(float(np.mean(epoch_losses)))
    train_seconds = time.perf_counter() - start
    scores = predict(model, x_test)
    record = {"resolution": res, "downsample": cfg.size // res, "streamed": streamed,
              "auc": float(roc_auc_score(data.y_test, scores)), "train_loss": losses,
              "train_seconds": train_seconds, "test_scores": scores.tolist(), "mean": mean, "std": std}
    return model, record


def saliency(model: Detector, image: np.ndarray, mean: float, std: float) -> tuple[np.ndarray, float]:
    """d(logit)/d(image) through the streaming backward, and the logit; image is full resolution."""
    model.eval()
    x = torch.from_numpy((image - mean) / std).float()[None, None].requires_grad_(True)
    logit = model(x)
    logit.sum().backward()
    return x.grad[0, 0].numpy() / std, float(logit.item())


def stream_plan(cfg: Config) -> str:
    """The streamcnn plan (tiles, memory) of one full-resolution training step."""
    import streamcnn
    return str(streamcnn.plan(detector_front(cfg.channels), (cfg.batch_size, 1, cfg.size, cfg.size), cfg.tile))


def pick_saliency_image(data: Data, scores: np.ndarray) -> int:
    """The positive test image with the highest score (ties: the first)."""
    positives = np.flatnonzero(data.y_test == 1)
    return int(positives[np.argmax(scores[positives])])


def plot_resolution(records: list[dict], data: Data, cfg: Config, path: Path) -> None:
    """AUC against resolution, the training losses, and a sharp and a soft ring at each resolution."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 8))
    grid = fig.add_gridspec(2, 2 * len(records), height_ratios=[1.25, 1])
    ax = fig.add_subplot(grid[0, :len(records)])
    res = [r["resolution"] for r in records]
    ax.plot(res, [r["auc"] for r in records], "o-", color="C0", lw=2)
    for r in records:
        ax.annotate(f"{r['auc']:.2f}", (r["resolution"], r["auc"]), textcoords="offset points",
                    xytext=(0, 8), ha="center")
    ax.axhline(0.5, color="gray", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(res, [f"{r}\n{'streamed' if rec['streamed'] else 'conventional'}"
                        for r, rec in zip(res, records)])
    ax.set(ylim=(0.0, 1.05), ylabel=f"test AUC ({len(data.y_test)} images)", xlabel="image size (pixels)",
           title="Finding sharp 7-pixel rings: test AUC per resolution")
    ax.legend(loc="lower right")
    ax = fig.add_subplot(grid[0, len(records):])
    for i, r in enumerate(records):
        ax.plot(np.arange(1, len(r["train_loss"]) + 1), r["train_loss"], "o-", color=f"C{i}",
                label=f"{r['resolution']} px")
    ax.set(xlabel="epoch", ylabel="training loss (BCE)", title="Training loss")
    ax.legend()
    scene = next(s for s in data.test_scenes if s.label == 1)
    sharp_image = data.x_test[data.test_scenes.index(scene)]
    soft_image = with_first_ring_softened(sharp_image, scene)
    centre = scene.sharp[0][:2]
    for i, r in enumerate(records):
        factor = cfg.size // r["resolution"]
        crops = [crop_around(synthetic.downsample(im, factor), centre / factor, max(2, 16 // factor))
                 for im in (sharp_image, soft_image)]
        same = np.abs(crops[0] - crops[1]).max() < 1e-6
        for j, (kind, crop) in enumerate(zip(("sharp", "soft"), crops)):
            ax = fig.add_subplot(grid[1, 2 * i + j])
            ax.imshow(crop, cmap="gray", interpolation="nearest", vmin=crops[0].min(), vmax=crops[0].max())
            ax.set_title(f"{kind}, {r['resolution']} px" + ("\n(identical)" if same and j else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.text(0.5, 0.02, "Bottom: one sharp ring of a positive test image (32 x 32 full-resolution pixels), and the "
             "same image with that ring softened, at each resolution", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def with_first_ring_softened(image: np.ndarray, scene) -> np.ndarray:
    """``image`` with its first sharp ring replaced by the soft version of the same ring."""
    ring = synthetic.draw_rings(scene.size, scene.sharp[:1])
    return (image - ring + synthetic.soften(ring)).astype(image.dtype)


def crop_around(image: np.ndarray, centre, half: int) -> np.ndarray:
    """A (2*half) square of ``image`` around ``centre`` (y, x), clipped to the image."""
    y = int(np.clip(round(centre[0]), half, image.shape[0] - half))
    x = int(np.clip(round(centre[1]), half, image.shape[1] - half))
    return image[y - half:y + half, x - half:x + half]


def score_map(model: Detector, image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The linear head applied at every position of the front end's output (streamed forward, no grad).

    The model's logit is the head applied to the channel-wise global maximum; this map shows, per output
    position, the logit that position's features alone would give, i.e. where the network sees a sharp ring.
    """
    model.eval()
    linear = model.head[-1]
    with torch.no_grad():
        features = model.front(torch.from_numpy((image - mean) / std).float()[None, None])[0]
        scores = torch.einsum("c,chw->hw", linear.weight[0], features) + linear.bias[0]
    return scores.numpy()


def ring_scores(scores: np.ndarray, scene, size: int) -> dict:
    """Highest score-map value within one output cell of each sharp and each soft ring, and elsewhere."""
    stride = size // scores.shape[0]
    away = np.ones(scores.shape, bool)

    def near(rows):
        out = []
        for y, x, _ in rows:
            cy, cx = int(y) // stride, int(x) // stride
            out.append(float(scores[max(0, cy - 1):cy + 2, max(0, cx - 1):cx + 2].max()))
            away[max(0, cy - 2):cy + 3, max(0, cx - 2):cx + 3] = False
        return out

    found = {"sharp": near(scene.sharp), "soft": near(scene.soft)}
    found["background"] = float(scores[away].max())
    return found


def plot_saliency(image: np.ndarray, grad: np.ndarray, scores: np.ndarray, scene, logit: float,
                  path: Path) -> None:
    """Saliency and score map over the whole image, and zoomed insets around sharp rings and a soft ring."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    magnitude = np.abs(grad)
    # at overview scale single-pixel gradients vanish: show each pixel's neighbourhood maximum
    overview = ndimage.maximum_filter(magnitude, size=max(3, image.shape[0] // 128))
    insets = [("sharp", row) for row in scene.sharp[:MAX_INSETS - 1]] + [("soft", scene.soft[0])]
    per_ring = ring_scores(scores, scene, image.shape[0])
    fig = plt.figure(figsize=(18, 6.4), layout="constrained")
    grid = fig.add_gridspec(2, 2 + len(insets), width_ratios=[3, 3] + [1] * len(insets))
    left = fig.add_subplot(grid[:, 0])
    left.imshow(image, cmap="gray")
    left.imshow(np.ma.masked_less(overview, overview.max() * 0.05), cmap="autumn", alpha=0.8)
    left.set_title(f"saliency |d logit / d image| (logit {logit:+.1f})", fontsize=10)
    middle = fig.add_subplot(grid[:, 1])
    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
    shown = middle.imshow(scores, cmap="viridis", extent=extent, interpolation="nearest")
    fig.colorbar(shown, ax=middle, shrink=0.6, label="per-position score")
    middle.set_title("score map: the head at every position, before the global max", fontsize=10)
    for ax in (left, middle):
        for kind, (y, x, _) in insets:
            ax.add_patch(plt.Circle((x, y), image.shape[0] / 40, fill=False,
                                    color="cyan" if kind == "sharp" else "magenta", lw=1.2))
        ax.set_xticks([])
        ax.set_yticks([])
    half = 16
    for k, (kind, row) in enumerate(insets):
        score = per_ring[kind][k if kind == "sharp" else 0]
        top = fig.add_subplot(grid[0, 2 + k])
        top.imshow(crop_around(image, row[:2], half), cmap="gray", interpolation="nearest")
        top.set_title(f"{kind} ring\nscore {score:+.1f}", fontsize=9, color="darkcyan" if kind == "sharp"
                      else "darkmagenta")
        bottom = fig.add_subplot(grid[1, 2 + k])
        bottom.imshow(crop_around(magnitude, row[:2], half), cmap="magma", interpolation="nearest",
                      vmin=0, vmax=magnitude.max())
        bottom.set_title("its saliency", fontsize=9)
        for a in (top, bottom):
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle("The full-resolution model on its most confident positive test image (cyan: sharp rings, "
                 "magenta: a soft ring; insets 32 x 32 pixels, saliency on one colour scale)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def saliency_share(grad: np.ndarray, scene, radius: int = 16) -> dict:
    """How much of the saliency lies near the sharp rings, versus their share of the image area."""
    magnitude = np.abs(grad)
    near = np.zeros(magnitude.shape, bool)
    for y, x, _ in scene.sharp:
        near[max(0, int(y) - radius):int(y) + radius + 1, max(0, int(x) - radius):int(x) + radius + 1] = True
    total = float(magnitude.sum())
    peak = np.unravel_index(np.argmax(magnitude), magnitude.shape)
    return {"radius": radius,
            "fraction_near_sharp_rings": float(magnitude[near].sum() / total) if total else 0.0,
            "area_fraction_near_sharp_rings": float(near.mean()),
            "peak_pixel_near_a_sharp_ring": bool(near[peak])}


def main(reports_dir: Path, quick: bool = False) -> dict:
    """Run all resolutions, write ``resolution.png``, ``saliency.png`` and ``resolution.json``."""
    cfg = Config.quick() if quick else Config()
    start = time.perf_counter()
    data = make_data(cfg)
    generate_seconds = time.perf_counter() - start
    records, full_model = [], None
    for res in cfg.resolutions:
        model, record = train_at(res, data, cfg)
        records.append(record)
        print(f"  {res:>5} px: test AUC {record['auc']:.3f} ({record['train_seconds']:.0f} s training)")
        if res == cfg.size:
            full_model = model
    full = records[-1]
    index = pick_saliency_image(data, np.asarray(full["test_scores"]))
    grad, logit = saliency(full_model, data.x_test[index], full["mean"], full["std"])
    scores = score_map(full_model, data.x_test[index], full["mean"], full["std"])
    scene = data.test_scenes[index]
    plot_resolution(records, data, cfg, reports_dir / "resolution.png")
    plot_saliency(data.x_test[index], grad, scores, scene, logit, reports_dir / "saliency.png")
    results = {"config": asdict(cfg), "generate_seconds": generate_seconds, "records": records,
               "saliency": {"test_index": index, "logit": logit, **saliency_share(grad, scene),
                            "ring_scores": ring_scores(scores, scene, cfg.size)},
               "stream_plan": stream_plan(cfg), "seconds": time.perf_counter() - start}
    (reports_dir / "resolution.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    from demo import figure_cli

    figure_cli.run_experiment(main, __doc__)
