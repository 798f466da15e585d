"""The dedup benchmark's figure, drawn from its records: the synthetic slide's layout, each
configuration's step split into computing and waiting for reads, and the tiles computed."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.dedup import CONFIGS, GLASS, TISSUE, inside, islands, label  # noqa: E402

COMPUTE, WAIT, READ = "tab:blue", "tab:orange", "0.6"


def figure(stored: dict, path: Path) -> bool:
    """Draw the largest side and tile measured in every configuration (False: none is)."""
    groups: dict = {}
    for r in stored.values():
        if r.get("status") == "measured":
            groups.setdefault((r["side"], r["tile"]), {})[(r["prefetch"], r["dedup"])] = r
    complete = [k for k, g in groups.items() if len(g) == len(CONFIGS)]
    if not complete:
        return False
    chosen = groups[max(complete)]
    centres = (np.arange(512) + 0.5) / 512
    draw([chosen[c] for c in CONFIGS], inside(islands(), centres, centres), GLASS, TISSUE, path,
         f"{chosen[CONFIGS[0]]['threads']} threads")
    return True


def _name(r: dict) -> str:
    return label(r["prefetch"], r["dedup"]).replace(", ", "\n")


def _slide(ax, tissue: np.ndarray, glass, colour, side: int) -> None:
    """The tissue layout (True: tissue) as the slide's two colours."""
    rgb = np.where(tissue[..., None], np.asarray(colour), np.asarray(glass)).astype(np.uint8)
    ax.imshow(rgb, extent=(0, side, side, 0))
    ax.set_title(f"synthetic slide {side}², {tissue.mean():.0%} tissue", fontsize=9)
    ax.set_xticks([0, side // 2, side])
    ax.set_yticks([0, side // 2, side])


def _times(ax, records: list) -> None:
    """Per configuration: the passes' wall time as computing + waiting for reads, and beside it
    the time spent reading (on whichever thread read)."""
    y = np.arange(len(records))
    compute = [sum(r["passes"][p]["compute_s"] for p in ("forward", "backward")) for r in records]
    wait = [sum(r["passes"][p]["wait_s"] for p in ("forward", "backward")) for r in records]
    read = [sum(r["passes"][p]["read_s"] for p in ("forward", "backward")) for r in records]
    ax.barh(y - 0.17, compute, 0.34, color=COMPUTE, label="computing")
    ax.barh(y - 0.17, wait, 0.34, left=compute, color=WAIT, label="waiting for a read")
    ax.barh(y + 0.17, read, 0.34, color=READ, label="reading (any thread)")
    base = records[-1]["step_s"] if not (records[-1]["prefetch"] or records[-1]["dedup"]) else None
    for i, r in enumerate(records):
        note = f" {r['step_s']:.0f} s" + (f"  ({base / r['step_s']:.2f}×)" if base else "")
        ax.text(compute[i] + wait[i], i - 0.17, note, va="center", fontsize=8)
    ax.set_yticks(y, [_name(r) for r in records], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds, forward + backward passes")
    ax.set_xlim(0, 1.35 * max(c + w for c, w in zip(compute, wait)))
    ax.set_title("one training step", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)


def _tiles(ax, records: list) -> None:
    """Tiles computed in the forward and in the backward, of all the tiles of a pass."""
    y = np.arange(len(records))
    for offset, p, colour in ((-0.17, "forward", "tab:green"), (0.17, "backward", "tab:purple")):
        ax.barh(y + offset, [r["passes"][p]["computed"] for r in records], 0.34, color=colour, label=p)
    total = records[0]["passes"]["forward"]["tiles"]
    ax.axvline(total, color="0.3", ls="--", lw=1, label=f"all {total} tiles")
    ax.set_yticks(y, [_name(r) for r in records], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tiles computed")
    ax.set_title("tiles computed per pass", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)


def draw(records: list, tissue: np.ndarray, glass, colour, path, machine: str = "") -> None:
    """``records``: one side and tile's measured configurations in display order (the one with
    neither switch last); ``tissue``: the slide's layout on a coarse grid."""
    r0 = records[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.5, 1.2]})
    _slide(axes[0], tissue, glass, colour, r0["side"])
    _times(axes[1], records)
    _tiles(axes[2], records)
    fig.suptitle(f"Identical tiles once, reads ahead: tile {r0['tile']}, TiffSlide"
                 + (f" — {machine}" if machine else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
