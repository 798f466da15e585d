"""Every ```python block of README.md and docs/*.md runs here as written, so the examples
cannot drift from the library.

The blocks of one file run in order in one namespace, as a reader who pastes them one after
another would run them: a later block may use what an earlier one defined, but not a for
loop's leftover variable (dropped after its block). What cannot run as written here is
adapted by the entry of ``ADAPT`` for that block, and only by it:

- ``shrink``: (text, replacement) pairs, sizes only, each of which must occur in the block;
- ``given``: names the document leaves to the reader (``loader``, a list of paths),
  bound from ``STAND_INS`` before the block runs; each must be used by the block and be
  undefined until then;
- ``skip``: why the block cannot run here (no GPU, no NCCL); it must still compile.

The files ``biopsy.raw``, ``biopsy.svs`` and ``biopsy-mask.zarr`` the README opens are written,
under those names, into the directory the blocks run in: a uint8 memmap, a 3-level pyramidal
TIFF (OpenSlide's generic-TIFF format) of synthetic pixels, level 1 the size of the shrunk
slide, and a class per pixel of that level. A block
without an entry fails (``test_every_block_has_an_entry``), so a new example is run or its
reason for not running is written down here.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import streamcnn
from bench.models import efficientnet_b0_front, freeze_batchnorm, resnet_front

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

SIDE = 832        # the shrunk image and slide level: 2x2 tiles of TILE px for ResNet-34
TILE = "704"      # the shrunk tile (ResNet-34 through layer3 needs at least 562 px)
WIDTH = 8         # torchvision's resnet34 stand-in: the faithful copy, 8x narrower (same geometry)


@dataclass(frozen=True)
class Adapt:
    shrink: tuple = ()
    given: tuple = ()
    skip: str = ""


NO_GPU = ("torchrun, NCCL and CUDA GPUs; verify/test_ddp.py runs Streaming inside "
          "DistributedDataParallel on CPU (gloo) and checks its gradients")

ADAPT = {  # document -> first line of the block -> how it runs here
    "README.md": {
        "import torch, torch.nn as nn": Adapt(shrink=(("4096, 4096", "1024, 1024"),)),
        "import torchvision": Adapt(
            shrink=(("Streaming(front, 2800)", f"Streaming(front, {TILE})"),
                    ("nn.Linear(512, 2)", f"nn.Linear({WIDTH * 8}, 2)")),  # layer4's width
            given=("torchvision", "loader")),
        "print(plan(front.eval(), (1, 3, 16384, 16384), tile_size=2800))": Adapt(),
        "class Body(nn.Module):": Adapt(),
        "effnet = torchvision.models.efficientnet_b0(weights=None)   # or your pretrained weights":
            Adapt(shrink=(("8192, 8192", "512, 512"), ("Streaming(stages, 1024)", "Streaming(stages, 384)"))),
        "import numpy as np": Adapt(shrink=(("65536, 65536", f"{SIDE}, {SIDE}"),
                                            ("2800", TILE))),
        "import openslide": Adapt(),
        "from streamcnn.slides import tissue_mask": Adapt(),
        "import cucim": Adapt(given=("cucim",)),
        "import streamcnn": Adapt(shrink=(("2800", TILE),), given=("target_domain_paths",)),
        "import functools": Adapt(shrink=(("4096, 4096", "512, 512"), ("(unet, 1024)", "(unet, 256)"),
                                          ("labels[:, :512]", "labels[:, :64]"))),
        "import zarr": Adapt(shrink=(("(unet, 1024,", f"(unet, {TILE},"), ("range(100)", "range(1)"),
                                     ("1024, 1024)", "256, 256)"))),
        "import os, torch.distributed as dist": Adapt(skip=NO_GPU),
        "from streamcnn import Streaming, plan": Adapt(shrink=(("4096, 4096", "512, 512"),
                                                                ("512, overlap", "160, overlap"))),
    },
    "docs/distributed.md": {
        '"""Streamed ResNet-34 front end, one process per GPU: torchrun --nproc_per_node=4 train.py"""':
            Adapt(skip=NO_GPU),
    },
    "docs/statistics.md": {
        "stats = streamcnn.channel_stats(front, [slide_a, slide_b], 2800, "
        "[\"layer1\", \"layer2.0.conv1\"])":
            Adapt(shrink=(("2800", TILE),), given=("streamcnn", "front", "slide_a", "slide_b")),
        "streamcnn.update_bn(slide_loader, front, 2800)   # e.g. target-domain slides, before "
        "fine-tuning": Adapt(shrink=(("2800", TILE),), given=("slide_loader",)),
        "streamcnn.lsuv_(front, calibration_images, 2800, tol=0.01)   # before training":
            Adapt(shrink=(("2800", TILE),), given=("calibration_images",)),
    },
}


# ------------------------------------------------------------------ stand-ins

def narrow_resnet34(weights=None):
    """torchvision.models.resnet34's stand-in: bench/models.py's faithful copy of its blocks
    (torchvision does not load against this CPU torch build), WIDTH channels in layer1."""
    assert weights is None, "no weights are downloaded here"
    return resnet_front((3, 4, 6, 3), width=WIDTH, through="layer4")


def image(seed):
    return torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def cucim_stand_in():
    """cuCIM needs CUDA; its CuImage interface over TiffSlide (as in verify/test_slides.py)."""
    tiffslide = pytest.importorskip("tiffslide")
    from verify.test_slides import CuImageLike
    return SimpleNamespace(CuImage=lambda path: CuImageLike(tiffslide.TiffSlide(path)))


def statistics_front():
    """docs/statistics.md's ``front``: a ResNet front end with ``layer1`` and ``layer2.0.conv1``
    (one block per stage: LSUV makes one pass per convolution), frozen BatchNorm."""
    return freeze_batchnorm(resnet_front((1, 1, 1), width=WIDTH), image(3))


def efficientnet_b0(weights=None):
    """torchvision.models.efficientnet_b0's stand-in: bench/models.py's copy of its blocks, the
    stem and seven MBConv stages as ``features`` (no final 1x1 convolution, unused here)."""
    assert weights is None, "no weights are downloaded here"
    return SimpleNamespace(features=efficientnet_b0_front(stages=7).train())


STAND_INS = {
    "torchvision": lambda: SimpleNamespace(models=SimpleNamespace(resnet34=narrow_resnet34,
                                                                  efficientnet_b0=efficientnet_b0)),
    "loader": lambda: [(image(0), torch.tensor([1]))],
    "cucim": cucim_stand_in,
    "target_domain_paths": lambda: ["biopsy.svs"],
    "streamcnn": lambda: streamcnn,
    "front": statistics_front,
    "slide_a": lambda: image(1),
    "slide_b": lambda: image(2),
    "slide_loader": lambda: [image(1), image(2)],
    "calibration_images": lambda: [image(1)],
}


def write_slides(directory: Path):
    """biopsy.raw (SIDE x SIDE x 3 uint8 memmap), biopsy.svs (a pyramidal TIFF whose level 1
    is SIDE x SIDE), of the synthetic pixels verify/test_slides.py uses, and
    biopsy-mask.zarr, a class per pixel of level 1 (its red channel thresholded)."""
    from verify.test_slides import pyramid, synthetic, write_tiff
    level0 = synthetic(2 * SIDE, 2 * SIDE)
    raw = np.memmap(directory / "biopsy.raw", np.uint8, mode="w+", shape=(SIDE, SIDE, 3))
    raw[:] = level0[::2, ::2]
    raw.flush()
    write_tiff(directory / "biopsy.svs", pyramid(level0))
    import zarr
    mask = zarr.create_array(directory / "biopsy-mask.zarr", shape=(1, SIDE, SIDE), dtype="uint8",
                             chunks=(1, 256, 256))
    mask[:] = (level0[None, ::2, ::2, 0] > 128).astype(np.uint8)


# ------------------------------------------------------------------ blocks

def blocks(document: str) -> list[str]:
    return BLOCK.findall((ROOT / document).read_text())


def first_line(block: str) -> str:
    return block.splitlines()[0]


def adapted(block: str, adapt: Adapt) -> str:
    for text, replacement in adapt.shrink:
        assert text in block, f"the shrink {text!r} -> {replacement!r} is not in the block"
        block = block.replace(text, replacement)
    return block


def used_names(code: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)} | imported(code)


def imported(code: str) -> set[str]:
    return {a.name for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Import) for a in n.names}


def loop_variables(code: str) -> set[str]:
    return {n.id for loop in ast.walk(ast.parse(code)) if isinstance(loop, ast.For)
            for n in ast.walk(loop.target) if isinstance(n, ast.Name)}


def run_block(block: str, adapt: Adapt, namespace: dict, where: str, monkeypatch):
    """Run one block in ``namespace``; a given module the block imports is put in
    ``sys.modules`` for the import to find, any other given name in the namespace."""
    code = adapted(block, adapt)
    if adapt.skip:
        compile(code, where, "exec")
        return
    for name in adapt.given:
        assert name in used_names(code), f"{where}: given name {name!r} is not used"
        assert name not in namespace, f"{where}: {name!r} is given but already defined"
        if name in imported(code):
            monkeypatch.setitem(sys.modules, name, STAND_INS[name]())
        else:
            namespace[name] = STAND_INS[name]()
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, where, "exec"), namespace)
    for name in loop_variables(code):
        namespace.pop(name, None)


# ------------------------------------------------------------------ tests

def test_every_block_has_an_entry():
    for document in DOCUMENTS:
        found = [first_line(b) for b in blocks(document)]
        assert len(found) == len(set(found)), f"{document}: two blocks start alike"
        assert found == list(ADAPT.get(document, {})), \
            f"{document}: each python block needs an entry in ADAPT, in order"


@pytest.fixture(scope="module")
def slides_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("readme")
    write_slides(directory)
    return directory


@pytest.mark.parametrize("document", [d for d in ADAPT if blocks(d)])
def test_the_blocks_run(document, slides_directory, monkeypatch):
    monkeypatch.chdir(slides_directory)
    namespace = {"__name__": "readme"}
    for k, block in enumerate(blocks(document)):
        adapt = ADAPT[document][first_line(block)]
        run_block(block, adapt, namespace, f"{document} python block {k + 1}", monkeypatch)
