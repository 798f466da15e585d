"""The benchmarked networks, keyed by name: each with its own tile and input-size lists.

A network is registered with a builder given as ``"module:function"`` (imported only when the
network is measured, so an optional dependency cannot break the others), its input channels,
and one :class:`Points` for the full run and one for the quick run. Every network gets its own
figure pair and its own section of BENCH.md. To add one, add an entry to ``NETWORKS``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from bench.network import input_bytes, input_shape, make_input


@dataclass(frozen=True)
class Points:
    """Where one network is measured in one kind of run (all sizes are image sides in pixels)."""

    fig2_input: int                   # Fig. 2: fixed input side
    fig2_tiles: tuple                 # Fig. 2: streaming tile sides
    fig3_tile: int                    # Fig. 3: fixed tile side
    fig3_sizes: tuple                 # Fig. 3: streamed input sides; the largest is the headline step
    conventional_sizes: tuple         # conventional backprop in the tiles' layout (skipped where it won't fit)
    default_layout_sizes: tuple = ()  # conventional in torch's default layout: separate, labelled rows
    overhead_tiles: tuple = ()        # Fig. 2 tiles re-measured with each overhead probe (harness.VARIANTS)
    fit_min_side: int = 1024          # Fig. 3's straight-line fits use inputs from this side up
    oracle_max: int = 2048            # float64 gradient oracle for inputs up to this side
    full_warmup_max: int = 4096       # above this side, the warm-up step runs on a 2x2-tile input
    headline_reps: int | None = None  # timed steps of the streamed headline step (None: the protocol's)
    fixed_mmap_memory: bool = False   # also measure each point's memory in a fresh process, mmap threshold fixed

    @property
    def headline_size(self) -> int:
        return max(self.fig3_sizes)


@dataclass(frozen=True)
class Network:
    """One benchmarked network: how to build it and where to measure it."""

    name: str
    title: str            # figure titles and the BENCH.md section heading
    builder: str          # "module:function"; function(seed) -> nn.Module, seeded
    in_channels: int
    full: Points
    quick: Points
    figure_prefix: str    # figure files are {prefix}fig2_memory_vs_tile.png and {prefix}fig3_time_vs_input.png
    paper: str = ""       # what the paper says of this setting (quoted beside plan() and the measurement)

    def build(self, seed: int):
        module, _, func = self.builder.partition(":")
        return getattr(importlib.import_module(module), func)(seed)

    def unavailable(self):
        """None if the builder imports, else why not (e.g. an optional package is missing)."""
        try:
            importlib.import_module(self.builder.partition(":")[0])
        except ImportError as err:
            return f"{self.builder} does not import: {err}"
        return None

    def points(self, kind: str) -> Points:
        if kind not in ("full", "quick"):
            raise ValueError(f"run kind must be 'full' or 'quick', got {kind!r}")
        return getattr(self, kind)

    def figures(self) -> dict:
        return {"fig2": f"{self.figure_prefix}fig2_memory_vs_tile.png",
                "fig3": f"{self.figure_prefix}fig3_time_vs_input.png"}

    def input_shape(self, size: int) -> tuple:
        return input_shape(size, self.in_channels)

    def input_bytes(self, size: int) -> int:
        return input_bytes(size, self.in_channels)

    def make_input(self, size: int, seed: int, device: str):
        return make_input(size, seed, device, self.in_channels)


CONV3 = Network(
    name="conv3",
    title="Three 3×3 convolutions (3→3→64→3 channels), the paper's Figs. 2–3",
    builder="bench.network:build_network",
    in_channels=3,
    # Full run: ~30 min on 2 quiet cores, two thirds of it the 16384² steps, and ~12 min more for the memory
    # probes with the mmap threshold fixed (fixed_mmap_memory: one more untimed step per point).
    full=Points(fig2_input=2048, fig2_tiles=(128, 256, 384, 512, 1024, 2048),
                fig3_tile=512, fig3_sizes=(1024, 2048, 3072, 4096, 8192, 16384),
                # Conventional stops at 2896² on CPU: from 2897² oneDNN's weight-gradient kernel falls back to its
                # reference loop (see ONEDNN_CLIFF in report.py; ResNet-34's first layer too).
                conventional_sizes=(1024, 2048, 2896, 8192), default_layout_sizes=(2048,),
                overhead_tiles=(128, 512), fixed_mmap_memory=True),
    quick=Points(fig2_input=512, fig2_tiles=(128, 256, 512), fig3_tile=128, fig3_sizes=(128, 256, 512),
                 conventional_sizes=(128, 256, 512), default_layout_sizes=(512,), overhead_tiles=(128,),
                 fit_min_side=128, oracle_max=256, fixed_mmap_memory=True),
    figure_prefix="",  # the paper's network keeps the plain names the README links to
)

RESNET34 = Network(
    name="resnet34",
    title="ResNet-34 through layer3 with frozen BatchNorm, the prostate paper's streamed part",
    builder="bench.models:resnet34_prostate",
    in_channels=3,
    # ~4.7 µs per pixel streamed on 2 cores (receptive field 547 px, overlap 560 px at tile 2800), so the
    # points are few: ~9 min for Fig. 2, ~15 min for Fig. 3, ~32 min for the 16384² step (1.54× its pixels).
    # The memory probes (fixed_mmap_memory) add one untimed step per point, ~45 min: without them the gap between
    # plan() and the peak under glibc's defaults (heap fragmentation: every activation is under 32 MiB at tiles of
    # 1536 px and less) could not be told apart from a gap in plan()'s tensor count.
    full=Points(fig2_input=2048, fig2_tiles=(1280, 1536, 2048), fig3_tile=2800,
                fig3_sizes=(1024, 2048, 4096, 16384), conventional_sizes=(1024, 1536, 2048, 2896, 4096),
                fit_min_side=1024, oracle_max=0, headline_reps=1, fixed_mmap_memory=True),
    quick=Points(fig2_input=640, fig2_tiles=(600, 640), fig3_tile=600, fig3_sizes=(600, 640),
                 conventional_sizes=(600, 640), fit_min_side=600, oracle_max=0),
    figure_prefix="resnet34_",
    paper=("The prostate paper (Pinckaers et al., IEEE TMI 2021) streamed this part of a ResNet-34 over "
           "16384×16384 biopsies with 2800×2800 tiles and wrote that training it without streaming \"would "
           "require a accelerator card with 2.4 terabyte of memory\" (their whole network and setting)."),
)

NETWORKS = {net.name: net for net in (CONV3, RESNET34)}


def get(name: str) -> Network:
    """The registered network ``name``, with an error listing the registered ones."""
    if name not in NETWORKS:
        raise ValueError(f"no benchmarked network {name!r}; registered: {', '.join(NETWORKS)}")
    return NETWORKS[name]
