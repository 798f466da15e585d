"""Write ``DEMO.md``: the numbers behind the demo figures, from the JSON files the demos leave behind.

Each demo writes its raw numbers next to its figure; this module only formats them, so rerunning one part
(``python -m demo --only training``, or ``python -m demo.training_equivalence``) refreshes its section and
keeps the others. The runtime line is computed from the same JSON files (each part records its own wall
times), so it always belongs to the results the report shows: a separate timings file, merged over runs,
once reported 308 s of training beside results whose own runs took 485 s.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from demo.training_equivalence import float64_cost

def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value: float) -> str:
    """Short scientific notation for differences (0 stays 0)."""
    return "0" if value == 0 else f"{value:.1e}"


def training_section(res: dict) -> list[str]:
    cfg, r32 = res["config"], res["float32"]
    conv, stream, cmp = r32["conventional"], r32["streaming"], r32["comparison"]
    ctl = r32.get("control_comparison")
    lines = [
        "## 2. Training equivalence (paper Sec. 5, Table 1, Fig. 4)",
        "",
        "![training equivalence](fig4_training_equivalence.png)",
        "",
        f"Table 1 network, He initialisation, trained twice from the same initial weights on the same batches: "
        f"conventionally, and with its first four layers (conv 16, max-pool, conv 32, max-pool, with their "
        f"ReLUs) in `streamcnn.Streaming` with {cfg['tile']}x{cfg['tile']} input tiles"
        + (f" ({res['stream_plan']['num_tiles']} tiles per image, overlapping by "
           f"{res['stream_plan']['overlap'][0]} pixels)" if "stream_plan" in res else "")
        + ". Data: ten classes, each the "
        f"crops of one photograph bundled with scikit-image/scikit-learn, {cfg['image_size']}x{cfg['image_size']} "
        f"pixels ({cfg['train_per_class']} training and {cfg['val_per_class']} validation crops per class; "
        f"validation crops come from a strip of each photograph that training never sees). SGD, learning rate "
        f"{cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, momentum {cfg['momentum']:g} (the paper names "
        f"none), batch {cfg['batch_size']}, {cfg['epochs']} epochs, float32. The *control* run is the "
        f"conventional training again, from initial weights multiplied by (1 + {cfg['control_perturbation']:g} "
        f"x standard normal noise), i.e. about one float32 rounding step: it measures how much round-off "
        f"alone moves this training.",
        "",
        "| epoch | train loss, conventional | train loss, streaming | abs. difference | val. accuracy, "
        "conventional | val. accuracy, streaming | rel. parameter difference | same, control |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in range(r32["epochs"]):
        control = fmt(ctl["param_rel_diff_per_epoch"][e]) if ctl else "-"
        lines.append(
            f"| {e + 1} | {conv['train_loss'][e]:.6f} | {stream['train_loss'][e]:.6f} | "
            f"{fmt(abs(conv['train_loss'][e] - stream['train_loss'][e]))} | {conv['val_acc'][e]:.3f} | "
            f"{stream['val_acc'][e]:.3f} | {fmt(cmp['param_rel_diff_per_epoch'][e])} | {control} |")
    lines += [
        "",
        "Relative parameter difference: ||θ_a - θ_b|| / ||θ_a|| over all weights after the epoch.",
        "",
        "Largest difference between the curves, streaming vs conventional"
        + (" (control vs conventional in brackets):" if ctl else ":"),
        "",
    ]

    def both(key: str, spec: str = ".1e") -> str:
        text = f"{cmp[key]:{spec}}"
        return text + (f" ({ctl[key]:{spec}})" if ctl else "")

    lines += [
        f"- training loss per step: {both('max_abs_diff_step_loss')}; the first step's loss differs by "
        f"{fmt(cmp['first_step_loss_diff'])}",
        f"- training loss per epoch: {both('max_abs_diff_train_loss')}; validation loss: "
        f"{both('max_abs_diff_val_loss')}",
        f"- training accuracy: {both('max_abs_diff_train_acc', '.3g')}; validation accuracy: "
        f"{both('max_abs_diff_val_acc', '.3g')}",
        f"- wall time: conventional {conv['seconds']:.0f} s, streaming {stream['seconds']:.0f} s",
    ]
    if "float64" in res:
        c64 = res["float64"]["comparison"]
        lines += [
            "",
            f"The same comparison in float64, over the first {res['float64']['epochs']} epochs only (a float64 "
            f"epoch took {float64_cost(res):.1f}× a float32 one here, and these already show the agreement): "
            f"largest training-loss "
            f"difference per step {fmt(c64['max_abs_diff_step_loss'])}, largest relative parameter difference "
            f"{fmt(max(c64['param_rel_diff_per_epoch']))}. So streaming computes the same training; in float32 "
            f"the summation order differs, and training amplifies such round-off (a flipped ReLU or max-pool "
            f"decision changes a gradient by far more than the round-off that flipped it) into differences "
            f"that grow during training, as the paper reports."
            + (f" After the last epoch the streamed weights are {fmt(cmp['param_rel_diff_per_epoch'][-1])} "
               f"(relative) from the conventional ones; the control's, started one rounding step away, are "
               f"{fmt(ctl['param_rel_diff_per_epoch'][-1])} away." if ctl else ""),
        ]
    return lines


def resolution_section(res: dict) -> list[str]:
    cfg = res["config"]
    lines = [
        "## 3. Resolution pays off",
        "",
        "![AUC per resolution](resolution.png)",
        "",
        f"Synthetic {cfg['size']}x{cfg['size']} images (`demo/synthetic.py`): cell-like texture with 16 to 24 "
        f"bright rings 7 pixels across. In a positive image 4 to 8 of them are sharp (one pixel wide); all "
        f"others are soft (averaged over the 2x2 blocks of the pixel grid). Any area downsampling by 2 or "
        f"more maps a sharp ring and its soft version to identical pixels, so below full resolution the "
        f"two classes are indistinguishable by construction (chance: AUC 0.5). The same network "
        f"(channels {tuple(cfg['channels'])}, global max-pool, linear) is trained from the same initialisation "
        f"at every resolution: Adam, learning rate {cfg['lr']:g}, batch {cfg['batch_size']}, {cfg['epochs']} "
        f"epochs, {cfg['n_train']} training and {cfg['n_test']} test images (half positive).",
        "",
        "| image size | downsampling | training | test AUC | final training loss | training time |",
        "|---:|---:|:---|---:|---:|---:|",
    ]
    for r in res["records"]:
        mode = f"streaming, {cfg['tile']} px tiles" if r["streamed"] else "conventional"
        lines.append(f"| {r['resolution']} | {r['downsample']}x | {mode} | {r['auc']:.3f} | "
                     f"{r['train_loss'][-1]:.3f} | {r['train_seconds']:.0f} s |")
    sal = res["saliency"]
    lines += [
        "",
        "![saliency](saliency.png)",
        "",
        f"Saliency (gradient of the logit with respect to the full-resolution input, from the streaming "
        f"backward) on the positive test image the model scores highest (test image {sal['test_index']}, logit "
        f"{sal['logit']:+.2f}): "
        f"{100 * sal['fraction_near_sharp_rings']:.1f}% of its total magnitude lies within {sal['radius']} "
        f"pixels of a planted sharp ring, an area of {100 * sal['area_fraction_near_sharp_rings']:.3f}% of the "
        f"image; the largest-gradient pixel is {'' if sal['peak_pixel_near_a_sharp_ring'] else 'not '}next to a "
        f"sharp ring. The global max-pool passes the gradient to one position per channel, so the saliency "
        f"shows the ring(s) that decided the logit; the score map (the linear head applied at every position "
        f"before the max) scores every position: at the sharp rings "
        f"{', '.join(f'{v:+.1f}' for v in sal['ring_scores']['sharp'])}; highest score at any of the "
        f"{len(sal['ring_scores']['soft'])} soft rings {max(sal['ring_scores']['soft']):+.1f}"
        + (f"; highest score away from all rings {sal['ring_scores']['background']:+.1f}."
           if "background" in sal["ring_scores"] else "."),
        "",
        "Streaming plan of one full-resolution training step of the front end:",
        "",
        "```",
        res["stream_plan"],
        "```",
    ]
    return lines


def segmentation_section(res: dict) -> list[str]:
    cfg, plan, test = res["config"], res["stream_plan"], res["test"]
    d, tile, owned = cfg["distance"], cfg["tile"], plan["owned"]
    counts = res["training"]["per_step_counts"]
    lines = [
        "## 5. Segmentation with context wider than a tile",
        "",
        "![segmentation](segmentation.png)",
        "",
        f"Synthetic {cfg['size']}x{cfg['size']} images (`demo/segmentation.py`, seeded): textured noise with "
        f"{cfg['markers'][0]} to {cfg['markers'][1]} small bright markers (discs of radius {cfg['marker_radius']}); "
        f"a pixel's label is 1 where it lies within {d} pixels of a marker's pixel. The label needs context "
        f"{2 * d + 1} pixels wide: a pixel {d} px to the right of a marker (label 1) and one {d + 1} px to its "
        f"right (label 0, with no other marker near) can have identical surroundings out to {d - 1} px, so any "
        f"model that decides a pixel from a narrower window gets one of them wrong. The U-Net (channels "
        f"{tuple(cfg['channels'])}; per level a 2x2 max-pool and a 3x3 convolution, back up by 2x2 "
        f"`nn.ConvTranspose2d`, skips concatenated) sees {plan['receptive_field']} px.",
        "",
        f"It is streamed with {tile}x{tile} input tiles ({plan['num_tiles']} per image): a tile's outputs "
        f"need its {plan['overlap']} px of overlap, so each tile computes a {owned}x{owned} block of the output "
        f"(yellow in the figure), narrower than the {2 * d + 1} px a label depends on: near a block's edge, "
        f"a pixel's label can depend on a marker inside a neighbouring block. (The tile cannot be narrower than the "
        f"receptive field: streaming is exact because each tile's input holds its outputs' whole receptive "
        f"field, and `plan()` gives {plan['min_tile']} px as the least tile here.) Cutting the image into "
        f"independent {tile}x{tile} patches instead, the usual way to fit memory, hides from a positive pixel "
        f"the marker that makes it positive whenever that marker lies in another patch: "
        f"{100 * test['blind_fraction_of_positives']:.0f}% of the held-out images' positive pixels (green in "
        f"the figure); from its patch alone, such a pixel's label cannot be told.",
        "",
        f"Training: Adam, learning rate {cfg['lr']:g}, {cfg['steps']} steps of one new image each, float32, "
        f"every step's loss and gradients from `Streaming(unet, {tile}).pixel_loss(image, mask, "
        f"binary_cross_entropy_with_logits)` (mean over pixels), {res['training']['seconds']:.0f} s. Each "
        f"tile ran one forward and, at once, one backward per step: on every step `last_stats` counted "
        + "; ".join(f"{c['tiles']} tiles, {c['tiles_computed']} computed, {c['backward_recomputed']} recomputed "
                    f"by the loss's backward, and hooks counted {c['module_forward_calls']} forward calls of "
                    f"the U-Net and {c['module_backward_calls']} backward calls through its outputs"
                    for c in counts)
        + f" (the streamed `forward` and its backward would run each tile twice forward: once, and again in "
          f"the recomputation). Held-out: {cfg['n_test']} images the training never saw, predicted by streamed "
          f"inference into a numpy array (`Streaming(unet, {tile})(x, out=array)` under `no_grad`), scores "
          f"their mean:",
        "",
        f"| prediction | IoU of label 1 | pixel error | error on the positives whose marker is outside their "
        f"{tile} px patch |",
        "|:---|---:|---:|---:|",
    ]
    for way, name in (("streamed", f"streamed, {tile} px tiles"),
                      ("patchwise", f"the same network on independent {tile} px patches")):
        r = test[way]
        lines.append(f"| {name} | {r['iou']:.3f} | {100 * r['pixel_error']:.2f}% | {100 * r['blind_error']:.1f}% |")
    lines += [
        "",
        f"(Label 1 covers {100 * test['positive_fraction']:.1f}% of the held-out pixels. The patchwise row runs the "
        f"streamed-trained network on patches to show what the patches hide; a network trained on such patches "
        f"could not tell those pixels from negative ones whose patches look the same.)",
        "",
        "Streamed against conventional autograd on the whole image, on the first step (same weights, the first "
        "training image), relative differences (largest |difference| over the largest |value|, per parameter "
        "tensor, worst tensor):",
        "",
        "| dtype | loss | parameter gradients | tolerance |",
        "|:---|---:|---:|---:|",
    ]
    for dtype, c in res["first_step_check"].items():
        lines.append(f"| {dtype} | {fmt(c['loss_rel_diff'])} | {fmt(c['grad_rel_diff'])} | {c['tolerance']:.0e} |")
    lines += ["", "The tolerances are the tests' (float64: `verify/test_pixel_loss.py`, float32: "
              "`verify/test_upsampling.py`): the tiles compute the same values, and the gradients' sums over "
              "tiles run in another order (round-off only)."]
    return lines


FIGURE_PARTS = ("walkthrough", "residual")  # parts that only draw a figure and keep no results file
TRAINING_RUNS = (("float32", "conventional"), ("float32", "streaming"), ("float32", "control"),
                 ("float64", "conventional"), ("float64", "streaming"))


def training_seconds(res: dict) -> float:
    """Wall time of the training runs recorded in ``training_equivalence.json`` (all of them, not only those shown)."""
    return sum(res[dtype][run]["seconds"] for dtype, run in TRAINING_RUNS if run in res.get(dtype, {}))


def runtime_line(training: dict | None, resolution: dict | None, figures: dict[str, float],
                 segmentation: dict | None = None) -> str:
    """The runtime of the results shown, from their own JSON; ``figures``: this run's figure-only parts."""
    parts = []
    if training:
        parts.append(f"training equivalence {training_seconds(training):.0f} s (its training runs)")
    if resolution:
        parts.append(f"resolution {resolution['seconds']:.0f} s")
    if segmentation:
        parts.append(f"segmentation {segmentation['seconds']:.0f} s")
    parts += [f"{name} {s:.0f} s" for name, s in figures.items()]
    return (f"On {platform.machine()} with {torch.get_num_threads()} torch threads, torch {torch.__version__}: "
            + (", ".join(parts) or "nothing run yet")
            + " (wall clock, recorded by each part with its results; other busy processes on the machine "
              "lengthen it).")


def write(reports_dir: Path, seconds: dict[str, float], quick: bool = False) -> Path:
    """(Re)write ``reports_dir/DEMO.md``; ``seconds`` are this run's timings per part.

    Only the figure-only parts' timings are taken from ``seconds``; the runtime of the training and
    resolution results comes from their JSON files (see the module docstring).
    """
    lines = [
        "# Demo results",
        "",
        "Generated by `python -m demo`" + (" --quick (smoke-test sizes, not the real results)" if quick else "")
        + " (`make demo`); do not edit by hand.",
        "",
        "## 1. The 1D walk-through (paper Fig. 1)",
        "",
        "![1D walk-through](fig1_1d_walkthrough.png)",
        "",
        "Explained step by step in [docs/walkthrough.md](../docs/walkthrough.md).",
        "",
    ]
    training = load(reports_dir / "training_equivalence.json")
    lines += (training_section(training) if training else ["## 2. Training equivalence", "", "(not run)"])
    lines.append("")
    resolution = load(reports_dir / "resolution.json")
    lines += (resolution_section(resolution) if resolution else ["## 3. Resolution pays off", "", "(not run)"])
    lines += [
        "",
        "## 4. How a residual block's two paths set the overlap",
        "",
        "![residual overlap](residual_overlap.png)",
        "",
        "Explained in [docs/residual.md](../docs/residual.md).",
        "",
    ]
    segmentation = load(reports_dir / "segmentation.json")
    lines += (segmentation_section(segmentation) if segmentation
              else ["## 5. Segmentation with context wider than a tile", "", "(not run)"])
    figures = {k: v for k, v in seconds.items() if k in FIGURE_PARTS}
    lines += ["", "## Runtime", "", runtime_line(training, resolution, figures, segmentation), ""]
    path = reports_dir / "DEMO.md"
    path.write_text("\n".join(lines))
    return path
