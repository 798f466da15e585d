"""Which points a run measures, tagged by the figure they belong to, in an interleaved order."""
import random

from bench.harness import Key
from bench.networks import Points

GROUPS = ("fig2", "fig3", "overhead", "oracle")  # --repeat may select any of these
PROBE_VARIANTS = ("heap_malloc", "omp_passive", "one_thread")


def network_jobs(name: str, pts: Points, default_layout_differs: bool = True) -> dict:
    """{Key: set of groups} for one network. A point shared by two figures is measured once.

    ``default_layout_differs``: whether torch's default layout differs from the tiles' layout on
    this device (on a GPU it does not, and the separate default-layout rows would repeat the
    like-for-like ones).
    """
    jobs = {}

    def add(group, mode, size, tile=None, variant="default"):
        jobs.setdefault(Key(name, mode, size, tile, variant), set()).add(group)

    for tile in pts.fig2_tiles:
        add("fig2", "streaming", pts.fig2_input, tile)
    add("fig2", "conventional", pts.fig2_input)
    for size in pts.fig3_sizes:
        add("fig3", "streaming", size, pts.fig3_tile)
    for size in pts.conventional_sizes:
        add("fig3", "conventional", size)
    for size in pts.default_layout_sizes if default_layout_differs else ():
        add("fig2" if size == pts.fig2_input else "fig3", "conventional_default", size)
    for variant in PROBE_VARIANTS if pts.overhead_tiles else ():
        add("overhead", "conventional", pts.fig2_input, None, variant)
        for tile in pts.overhead_tiles:
            add("overhead", "streaming", pts.fig2_input, tile, variant)
    for size in sorted({pts.fig2_input, *pts.fig3_sizes}):
        if size <= pts.oracle_max:
            add("oracle", "oracle", size)
    return jobs


def select(jobs: dict, groups) -> dict:
    """The jobs that belong to any of ``groups``."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown point group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
    return {k: g for k, g in jobs.items() if g & set(groups)}


def interleave(keys, seed: int) -> list:
    """The keys in a seeded random order, so modes, sizes and networks are not measured in blocks
    and a slow drift of the machine does not line up with any of them. Oracles (untimed) go first:
    the gradient checks need them, and they say nothing about speed."""
    order = sorted(keys, key=lambda k: (k.network, k.mode, k.size, k.tile or 0, k.variant))
    random.Random(seed).shuffle(order)
    return sorted(order, key=lambda k: k.mode != "oracle")
