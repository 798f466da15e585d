"""The op fuzzer: random programs built from streamcnn's own op registry, streamed
against conventional autograd (float64). Each must give conventional's numbers or a
clear error - never a wrong number, a crash or a hang.

The catalog (fuzz_catalog.py) holds a generator for every registry entry; programs
(fuzz_program.py) are a stem convolution, random calls on the feature maps made so far
(merges of different receptive fields, channels-last layouts, constants, in-place calls
on clones), and a 1x1 convolution head. Accepted, per example (:func:`check`):

(a) conventional torch raises: streaming raises too (any error);
(b) streaming refuses with a clear error: ``StreamingError``, ``TileTooSmallError``, or a
    ``ValueError`` of streamcnn's about sizes - unless every step is local and valid
    (``Case.must_stream``): then a refusal is a bug. A ``ValueError`` about channel
    counts is a bug too where torch ran the program: each of them mirrors an error
    torch raises itself, so it means a misread count;
(c) otherwise output, input gradient and every parameter gradient within 1e-10
    relative, no gradient on one side only (``streamcnn.testing.compare``).
Anything else (another error, an internal assertion, a hang) fails.

Coverage is deterministic: every registry entry is the focus of a few programs of its
own (``test_every_entry``), and every local entry is called validly and must stream
exactly (``test_local_entries_stream``); ``test_random_programs`` mixes all of them.
"""

from __future__ import annotations

import os
import re
import signal
import traceback
import warnings
from contextlib import contextmanager

import fuzz_catalog
import pytest
import torch
from fuzz_catalog import CATALOG, CURATED, KEYS, Case, ints, name_of_key, programs, registry_entries
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_streaming_properties import SETTINGS

import streamcnn
from streamcnn import Streaming, StreamingError, TileTooSmallError, rules
from streamcnn.testing import ALL_PATHS, Path, compare
from streamcnn.trace import analyse
from streamcnn.trace import trace

F64 = 1e-10
HANG_S = 60  # an example that runs this long is a failure (an endless search, say)
pytestmark = pytest.mark.filterwarnings("ignore")
_PACKAGE = os.path.dirname(streamcnn.__file__)
_CLEAR = re.compile(r"pixel|size|too small|shape")
#: streamcnn's channel-count errors each mirror one torch raises (a convolution's in_channels,
#: a merge of 4 and 6 channels, split sections): where torch ran, one is a misread count
_CHANNELS = re.compile(r"channels|sections")


class Hang(BaseException):
    """An example ran past HANG_S (a BaseException: no ``except Exception`` takes it for a
    refusal)."""


@contextmanager
def time_limit(seconds: float):
    def fail(*_):
        raise Hang(f"ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_refusal(err: BaseException) -> bool:
    """A clear error of streamcnn's: StreamingError, TileTooSmallError, or a ValueError
    raised inside streamcnn about sizes (not channel counts: see _CHANNELS)."""
    if isinstance(err, (StreamingError, TileTooSmallError)):
        return True
    if type(err).__name__ in ("ValueError", "GridMismatch"):
        frames = traceback.extract_tb(err.__traceback__)
        inside = bool(frames) and frames[-1].filename.startswith(_PACKAGE)
        message = str(err)
        return inside and bool(_CLEAR.search(message)) and not _CHANNELS.search(message)
    return False


def streamed_raises(case: Case, tile, **streaming_kwargs) -> bool:
    """Whether a streamed forward and backward raises."""
    x = case.x.clone().requires_grad_()
    try:
        y = Streaming(case.program, tile, **streaming_kwargs)(x)
        y.backward(torch.ones_like(y))
    except Exception:  # noqa: BLE001 - any error is streaming's answer to torch's
        return True
    return False


def tiles(case: Case, data) -> tuple:
    """Tile sizes from the minimum upwards, several tiles per image where the image allows."""
    rf = streamcnn.receptive_field(case.program, case.ndim, channels=case.x.shape[1])
    sizes = case.x.shape[2:]
    return tuple(r.min_tile_size + data.draw(ints(0, max(0, n - r.min_tile_size - 1)), label="extra")
                 for r, n in zip(rf, sizes))


def _loss_for(case: Case, path):
    """``path``, with a random output gradient where a normalisation over space is streamed:
    from a sum loss the gradient upstream of it is zero in exact arithmetic (h is constant
    per channel, which (N1) removes), so only rounding noise would be compared."""
    if path.loss == "random":
        return path
    try:
        graph = analyse(case.program, case.ndim, case.x.shape[1])
    except Exception:  # noqa: BLE001 - refused or raising programs are judged by check
        return path
    if any(step.norm is not None for step in graph.steps):
        return Path(path.entry, path.method, "random")
    return path


def check(case: Case, path, data, **streaming_kwargs) -> str:
    """Stream ``case`` along ``path``; the outcome ("exact", "refused", "raises"), or an
    AssertionError (or the unexpected error itself) where streaming is wrong."""
    with time_limit(HANG_S), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tile = tiles(case, data)
            tile = tile[0] if case.ndim == 1 else tile
            if case.raises:
                assert streamed_raises(case, tile, **streaming_kwargs), \
                    f"conventional torch raises ({case.raises}) but the streamed run does not"
                return "raises"
            result = compare(case.program, case.x, tile, paths=_loss_for(case, path),
                             input_grad=not case.leaf_only, **streaming_kwargs)
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - classified here
            if case.raises:
                return "raises"
            if not is_refusal(err):
                raise
            if case.must_stream:
                raise AssertionError(f"a program whose steps are all local was refused: "
                                     f"{type(err).__name__}: {err}") from err
            return "refused"
    assert result.worst <= F64, result
    return "exact"


def traced_entries(program) -> set:
    """The registry entries the traced program calls (what streamcnn's analysis looks up)."""
    root, graph = trace(program)
    found = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in rules.FUNCTIONS:
            found.add(("function", node.target))
        elif node.op == "call_method" and node.target in rules.METHODS:
            found.add(("method", node.target))
        elif node.op == "call_module":
            found.add(("module", type(root.get_submodule(node.target))))
    return found


def entry_id(key) -> str:
    form, target = key
    if form == "method":
        return f"Tensor.{target}"
    module = getattr(target, "__module__", "") or ""
    short = {"torch.nn.functional": "F", "torch._C._nn": "F", "_operator": "operator",
             "torch.functional": "torch"}.get(module, module.split(".")[0] or "torch")
    return f"{short}.{name_of_key(key)}" if form == "function" else f"nn.{target.__name__}"


# ---------------------------------------------------------------- the catalog


def test_every_registry_entry_has_a_generator():
    """A new op in the registry needs a generator here (and none is stale)."""
    registry, catalog = set(registry_entries()), set(CATALOG)
    assert not registry - catalog, f"no generator for {sorted(map(entry_id, registry - catalog))}"
    assert not catalog - registry, f"not in the registry: {sorted(map(entry_id, catalog - registry))}"


def test_entry_ids_are_unique():
    assert len({entry_id(k) for k in KEYS}) == len(KEYS)


# ---------------------------------------------------------------- the properties


#: examples per entry, by generator: more where the call forms are many (which dims a
#: reduction reads: ``dim=()``, ``x.std(True)``, ``x.norm(2, 1)``; bounds and operands)
EXAMPLES = {fuzz_catalog.reduction: 10, fuzz_catalog.clamp: 4, fuzz_catalog.arithmetic: 3,
            fuzz_catalog.pieces: 4, fuzz_catalog.cat: 6, fuzz_catalog.getitem: 6,
            fuzz_catalog.pad: 4, fuzz_catalog.pool: 4, fuzz_catalog.conv: 4,
            fuzz_catalog.conv_layer: 3, fuzz_catalog.permute: 3, fuzz_catalog.attribute: 4,
            fuzz_catalog.size: 4, fuzz_catalog.where: 4, fuzz_catalog.layer_norm: 3,
            fuzz_catalog.linear: 3}


@pytest.mark.parametrize("key", KEYS, ids=entry_id)
def test_every_entry(key):
    """Each registry entry, called as the fuzzer draws it (valid or not, any layout),
    where the output depends on it: conventional's numbers or a clear error."""
    @settings(max_examples=EXAMPLES.get(CATALOG[key], 2), **SETTINGS)
    @given(data=st.data())
    def run(data):
        case = data.draw(programs(focus=key), label="case")
        assert key in traced_entries(case.program), f"{entry_id(key)} is not in the traced graph"
        event(check(case, data.draw(st.sampled_from(ALL_PATHS), label="path"), data))

    run()


@pytest.mark.parametrize("key", CURATED, ids=entry_id)
@settings(max_examples=1, **SETTINGS)
@given(data=st.data())
def test_local_entries_stream(key, data):
    """Each local entry, called validly after local steps: streamed exactly, never refused."""
    case = data.draw(programs(focus=key, valid=True), label="case")
    assert case.raises is None, f"the generator drew a call torch rejects: {case.raises}"
    assert case.must_stream, "the generator drew a call that is not local"
    assert check(case, data.draw(st.sampled_from(ALL_PATHS), label="path"), data) == "exact"


@settings(max_examples=120, **SETTINGS)
@given(programs(), st.sampled_from(ALL_PATHS), st.data())
def test_random_programs(case, path, data):
    """One to five random steps from the whole catalog on the maps made so far."""
    event(check(case, path, data))


@pytest.mark.parametrize("key", CURATED, ids=entry_id)
@settings(max_examples=1, **SETTINGS)
@given(data=st.data())
def test_local_entries_stream_reusing_overlaps(key, data):
    """As ``test_local_entries_stream`` with ``overlap="auto"``: reused where the program
    allows it (a window, pointwise step or merge of maps), recomputed elsewhere."""
    case = data.draw(programs(focus=key, valid=True), label="case")
    assert case.raises is None and case.must_stream
    path = data.draw(st.sampled_from(ALL_PATHS), label="path")
    assert check(case, path, data, overlap="auto") == "exact"


@settings(max_examples=120, **SETTINGS)
@given(programs(), st.sampled_from(ALL_PATHS), st.data())
def test_random_programs_reusing_overlaps(case, path, data):
    """Random programs with ``overlap="auto"``: conventional's numbers or a clear error."""
    event(check(case, path, data, overlap="auto"))
