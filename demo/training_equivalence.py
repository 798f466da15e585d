"""Training equivalence (the paper's Sec. 5, Table 1 and Fig. 4): streaming trains like conventional backprop.

The Table 1 network (five conv + max-pool blocks with 16, 32, 64, 128, 256 channels and a ten-way fully
connected layer) is trained twice from the same He initialisation on the same batches in the same order:
once conventionally and once with its first four layers (conv 16, max-pool, conv 32, max-pool, as in the
authors' own ImageNette notebook) wrapped in ``streamcnn.Streaming`` with 32 x 32 input tiles (overlap
included: 7 x 7 = 49 tiles per 160 x 160 image). SGD with the
paper's learning rate 1e-3 and weight decay 1e-6. The data are crops of ten bundled photographs
(``demo.photo_crops``), 160 x 160 pixels so that the last feature map is the paper's 10 x 10 before the
final max-pool.

In float32, as in practice, the two runs differ only by the summation order inside the convolutions
(~1e-6 relative in a gradient); training carries these round-off differences forward and amplifies them
(a ReLU or a max-pool decision that flips changes a gradient by much more than round-off), so the curves
drift apart slowly, as the paper observes. Two checks put that drift in proportion: a *control* run, the
conventional training started from weights perturbed by one float32 rounding step (relative 1e-7), shows
how far round-off alone moves this training; and a short float64 run shows streaming and conventional
agreeing to ~1e-15.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from demo import photo_crops

TILE = 32
CHANNELS = (16, 32, 64, 128, 256)
STREAMED_LAYERS = 6   # conv16, ReLU, pool, conv32, ReLU, pool: the paper's "first four layers" plus ReLUs


@dataclass
class Config:
    """Everything that defines one equivalence experiment."""

    image_size: int = 160
    train_per_class: int = 24
    val_per_class: int = 10
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.0   # the paper names none; plain SGD
    tile: int = TILE
    seed: int = 0
    float64_epochs: int = 2
    control_perturbation: float = 1e-7   # relative size of the control run's initial-weight perturbation

    @classmethod
    def quick(cls) -> "Config":
        """A smoke-test configuration: a few seconds of training."""
        return cls(image_size=64, train_per_class=3, val_per_class=1, epochs=2, batch_size=10, float64_epochs=1)


def table1_network(num_classes: int = 10) -> nn.Sequential:
    """Table 1: conv3x3 + ReLU + max-pool blocks, a final max-pool to 1x1, a fully connected layer; He init.

    The last max-pool is adaptive: for the paper's setting (160 x 160 input here) it is the 10 x 10 pool.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for i, out_ch in enumerate(CHANNELS):
        layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
        layers.append(nn.MaxPool2d(2) if i < len(CHANNELS) - 1 else nn.AdaptiveMaxPool2d(1))
        in_ch = out_ch
    layers += [nn.Flatten(), nn.Linear(in_ch, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def split_streamed(net: nn.Sequential, tile: int) -> nn.Sequential:
    """A copy of ``net`` whose first ``STREAMED_LAYERS`` modules run tile by tile through ``streamcnn``."""
    from streamcnn import Streaming

    net = copy.deepcopy(net)
    front = nn.Sequential(*net[:STREAMED_LAYERS])
    return nn.Sequential(Streaming(front, tile, progress=False), *net[STREAMED_LAYERS:])


@dataclass
class History:
    """Per-step and per-epoch records of one training run."""

    step_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    params: list[list[np.ndarray]] = field(default_factory=list)   # parameters after each epoch
    seconds: float = 0.0


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size])
            loss += nn.functional.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    return loss / len(x), correct / len(x)


def train(model: nn.Module, data: dict[str, torch.Tensor], cfg: Config, epochs: int, label: str) -> History:
    """Mini-batch SGD on ``data``; the batch order depends only on ``cfg.seed``, never on the model."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    hist = History()
    start = time.perf_counter()
    n = len(data["x_train"])
    for _ in tqdm(range(epochs), desc=label, unit="epoch", leave=False):
        model.train()
        perm = torch.randperm(n, generator=order)
        losses, correct = [], 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = data["x_train"][idx], data["y_train"][idx]
            opt.zero_grad()
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            correct += (logits.argmax(1) == y).sum().item()
        hist.step_loss += losses
        hist.train_loss.append(float(np.mean(losses)))
        hist.train_acc.append(correct / n)
        val_loss, val_acc = evaluate(model, data["x_val"], data["y_val"], cfg.batch_size)
        hist.val_loss.append(val_loss)
        hist.val_acc.append(val_acc)
        hist.params.append([p.detach().double().numpy().copy() for p in model.parameters()])
    hist.seconds = time.perf_counter() - start
    return hist


def load_data(cfg: Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The photo-crop train and validation sets as tensors, standardised with training statistics."""
    x_tr, y_tr = photo_crops.build_split(cfg.train_per_class, cfg.image_size, cfg.seed, "train")
    x_va, y_va = photo_crops.build_split(cfg.val_per_class, cfg.image_size, cfg.seed, "val")
    x_tr, x_va = photo_crops.normalise(x_tr, x_va)
    return {"x_train": torch.from_numpy(x_tr).to(dtype), "y_train": torch.from_numpy(y_tr),
            "x_val": torch.from_numpy(x_va).to(dtype), "y_val": torch.from_numpy(y_va)}


def relative_param_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """||a - b|| / ||a|| over all parameters as one vector (robust to tensors that are near zero)."""
    diff = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
    norm = sum(float(np.sum(x ** 2)) for x in a)
    return float(np.sqrt(diff / norm))


def compare(conv: History, stream: History) -> dict:
    """Largest differences between two runs' curves, and their parameter drift per epoch."""
    def gap(a, b):
        return float(np.max(np.abs(np.subtract(a, b))))
    return {
        "max_abs_diff_step_loss": gap(conv.step_loss, stream.step_loss),
        "max_abs_diff_train_loss": gap(conv.train_loss, stream.train_loss),
        "max_abs_diff_train_acc": gap(conv.train_acc, stream.train_acc),
        "max_abs_diff_val_loss": gap(conv.val_loss, stream.val_loss),
        "max_abs_diff_val_acc": gap(conv.val_acc, stream.val_acc),
        "first_step_loss_diff": abs(conv.step_loss[0] - stream.step_loss[0]),
        "param_rel_diff_per_epoch": [relative_param_diff(a, b) for a, b in zip(conv.params, stream.params)],
        "step_loss_abs_diff": np.abs(np.subtract(conv.step_loss, stream.step_loss)).tolist(),
    }


def perturbed(net: nn.Module, relative: float, seed: int) -> nn.Module:
    """A copy of ``net`` with every weight multiplied by (1 + relative * N(0, 1))."""
    net = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1 + relative * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def run_pair(cfg: Config, dtype: torch.dtype, epochs: int, control: bool) -> dict:
    """Train conventional and streamed copies of one initialisation (and optionally the perturbed control)."""
    data = load_data(cfg, dtype)
    torch.manual_seed(cfg.seed)
    conventional = table1_network().to(dtype)
    streamed = split_streamed(conventional, cfg.tile)
    runs = {"conventional": conventional, "streaming": streamed}
    if control:
        runs["control"] = perturbed(conventional, cfg.control_perturbation, cfg.seed + 1)
    name = str(dtype).replace("torch.", "")
    hists = {key: train(model, data, cfg, epochs, f"{key} {name}") for key, model in runs.items()}
    result = {"dtype": name, "epochs": epochs,
              "comparison": compare(hists["conventional"], hists["streaming"])}
    if control:
        result["control_comparison"] = compare(hists["conventional"], hists["control"])
    for key, hist in hists.items():
        record = asdict(hist)
        record.pop("params")
        result[key] = record
    return result


def stream_plan(cfg: Config) -> dict:
    """Tiles and memory of streaming the front end for one training batch (``streamcnn.plan``)."""
    import streamcnn

    front = nn.Sequential(*table1_network()[:STREAMED_LAYERS])
    plan = streamcnn.plan(front, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), cfg.tile)
    return {"num_tiles": plan.num_tiles, "overlap": list(plan.overlap), "text": str(plan)}


def plot(results: dict, path: Path) -> None:
    """Fig. 4: loss and accuracy per epoch for both methods, and how far apart they are (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r32 = results["float32"]
    conv, stream, cmp = r32["conventional"], r32["streaming"], r32["comparison"]
    epochs = np.arange(1, r32["epochs"] + 1)
    fig, axes = plt.subplots(1, 3, figsize=(17, 6), width_ratios=[1, 1, 1.3], layout="constrained")
    ax = axes[0]
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        ax.plot(epochs, conv[key], style, color="C0", lw=3, alpha=0.5, label=f"conventional, {key[:-5]}")
        ax.plot(epochs, stream[key], style, color="C3", lw=1.2, marker=".", label=f"streaming, {key[:-5]}")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, style in (("train_acc", "-"), ("val_acc", "--")):
        ax.plot(epochs, conv[key], style, color="C0", lw=3, alpha=0.5, label=f"conventional, {key[:-4]}")
        ax.plot(epochs, stream[key], style, color="C3", lw=1.2, marker=".", label=f"streaming, {key[:-4]}")
    ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax = axes[2]
    steps_per_epoch = len(conv["step_loss"]) / r32["epochs"]
    step_epochs = (np.arange(len(cmp["step_loss_abs_diff"])) + 1) / steps_per_epoch
    floor = 1e-17   # exact zeros are drawn here on the log scale
    ax.semilogy(step_epochs, np.maximum(cmp["step_loss_abs_diff"], floor), ".", ms=4, color="C3",
                label="|Δ loss| per step: streaming vs conventional")
    ax.semilogy(epochs, np.maximum(cmp["param_rel_diff_per_epoch"], floor), "o-", color="C3",
                label="‖Δθ‖/‖θ‖: streaming vs conventional")
    if "control_comparison" in r32:
        ctl = r32["control_comparison"]
        ax.semilogy(step_epochs, np.maximum(ctl["step_loss_abs_diff"], floor), ".", ms=4, color="0.55",
                    label="|Δ loss| per step: control (conventional, weights ×(1+1e-7·noise))")
        ax.semilogy(epochs, np.maximum(ctl["param_rel_diff_per_epoch"], floor), "s--", color="0.55", ms=4,
                    label="‖Δθ‖/‖θ‖: control")
    if "float64" in results:
        _plot_float64(ax, results, steps_per_epoch, floor)
    ax.set(xlabel="epoch", ylabel="difference (log scale; exact 0 drawn at 1e-17)",
           title="How far apart: float32 (red) vs round-off control (grey), float64 (black)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    cfg = results["config"]
    fig.suptitle(f"Table 1 network from one initialisation, trained conventionally and with conv-pool-conv-pool "
                 f"streamed in {cfg['tile']}x{cfg['tile']} tiles (float32, SGD lr {cfg['lr']:g})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_float64(ax, results: dict, steps_per_epoch: float, floor: float) -> None:
    """The float64 pair's differences, in black, and a note where they stop: the float64 run is
    ``float64_epochs`` long (Config), as its first epochs already show the agreement."""
    c64, epochs = results["float64"]["comparison"], results["float64"]["epochs"]
    e64 = (np.arange(len(c64["step_loss_abs_diff"])) + 1) / steps_per_epoch
    ax.semilogy(e64, np.maximum(c64["step_loss_abs_diff"], floor), "x", ms=5, color="k",
                label=f"|Δ loss| per step: streaming vs conventional, float64 (first {epochs} epochs)")
    last = np.maximum(c64["param_rel_diff_per_epoch"], floor)
    ax.semilogy(np.arange(1, len(last) + 1), last, "k^-", ms=5, label=f"‖Δθ‖/‖θ‖: float64 (first {epochs} epochs)")
    ax.annotate(float64_note(results), (len(last), last[-1]), textcoords="offset points", xytext=(12, 0),
                fontsize=7, va="center")


def float64_cost(results: dict) -> float:
    """Seconds per epoch of the float64 pair over the float32 pair's (both methods), as recorded."""
    def per_epoch(r):
        return (r["conventional"]["seconds"] + r["streaming"]["seconds"]) / r["epochs"]
    return per_epoch(results["float64"]) / per_epoch(results["float32"])


def float64_note(results: dict) -> str:
    """Why the float64 series stops, from the run's own record: its length and cost per epoch."""
    return (f"float64 run: first {results['float64']['epochs']} epochs only\n"
            f"(a float64 epoch took {float64_cost(results):.1f}× a float32 one here)")


def render(reports_dir: Path) -> None:
    """Redraw ``fig4_training_equivalence.png`` from ``training_equivalence.json``, training nothing."""
    results = json.loads((reports_dir / "training_equivalence.json").read_text())
    plot(results, reports_dir / "fig4_training_equivalence.png")


def run(cfg: Config) -> dict:
    """float32 with the control run, then float64 for ``cfg.float64_epochs`` epochs (~3x slower on CPU)."""
    results = {"config": asdict(cfg), "stream_plan": stream_plan(cfg),
               "float32": run_pair(cfg, torch.float32, cfg.epochs, control=True)}
    if cfg.float64_epochs:
        results["float64"] = run_pair(cfg, torch.float64, cfg.float64_epochs, control=False)
    return results


def main(reports_dir: Path, quick: bool = False) -> dict:
    """Run the experiment, write ``fig4_training_equivalence.png`` and the raw numbers as JSON."""
    cfg = Config.quick() if quick else Config()
    results = run(cfg)
    plot(results, reports_dir / "fig4_training_equivalence.png")
    (reports_dir / "training_equivalence.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds of training, for smoke tests")
    parser.add_argument("--reports", type=Path, default=None, help="output folder")
    parser.add_argument("--render-only", action="store_true",
                        help="train nothing: redraw the figure from the folder's training_equivalence.json")
    args = parser.parse_args()
    default = Path("reports/_raw/quick") if args.quick else Path("reports")
    if args.render_only:
        render(args.reports or default)
    else:
        main(args.reports or default, quick=args.quick)
