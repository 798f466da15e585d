"""The backend's modules import one way, from the layer that uses to the layer used:
``_args``/``errors``/``progress`` -> ``geometry`` (no torch) -> ``binding``, ``channels_last``
-> ``rules`` -> ``trace`` -> ``tiling``, ``slides`` (NumPy only), ``sources``, ``inputs``
-> ``state`` -> ``memory`` -> ``plan`` -> ``function`` -> ``streaming`` -> ``testing``. So do the
benchmarks', in the layers of ``BENCH_LAYERS``. Checked on the source: an import of a higher layer (a
cycle) fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "streamcnn"
ORDER = ["_args", "errors", "progress", "allocator", "geometry", "reuse", "binding", "channels_last", "rules", "trace",
         "tiling", "moments", "slides", "sources", "inputs", "state", "reductions", "norms", "checkpoints", "strips", "prefetch", "dedup", "skipping",
         "keeping",
         "memory", "plan", "function", "passes", "dense", "streaming", "statistics", "testing", "tuning", "__init__"]


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_every_module_is_in_the_layer_order():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(ORDER)


def test_imports_point_down_only():
    for rank, module in enumerate(ORDER):
        for used in imports(module):
            assert ORDER.index(used) < rank, f"streamcnn.{module} imports streamcnn.{used} (a higher layer)"


def test_geometry_is_free_of_torch():
    source = (PACKAGE / "geometry.py").read_text()
    assert "import torch" not in source


def test_slides_needs_numpy_only():
    """streamcnn.slides reads any object with OpenSlide's interface: it imports neither
    torch nor a slide library, so importing streamcnn never needs one."""
    tree = ast.parse((PACKAGE / "slides.py").read_text())
    modules = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert modules <= {"__future__", "math", "numpy"}, modules


# bench/: measurement -> derivation -> rendering, with the JSON records between them. Each layer lists its
# modules in import order (a module imports only those before it in its own layer) and the lower layers it
# may import. Derivation reads the records only, never how they were measured; rendering imports the
# studies' BENCH.md sections (and guard's margins, which BENCH.md states), never the reverse.
BENCH = PACKAGE.parent / "bench"
BENCH_LAYERS = {
    "shared": (["__init__", "fmt", "network", "networks", "models", "config"], set()),
    "measurement": (["protocol", "memory", "machine", "worker", "guard", "harness", "jobs", "test_micro_reference",
                     "micro", "study", "slide", "dedup", "calibration", "training_norm", "allocator", "speed",
                     "dense", "levels", "overlap", "reuse_memory", "probe_memory"], {"shared"}),
    "derivation": (["fit", "compare", "analysis"], {"shared"}),
    "rendering": (["plots", "dedup_plot", "report_network", "report", "render"],
                  {"shared", "measurement", "derivation"}),
    "command line": (["run", "__main__"], {"shared", "measurement", "derivation", "rendering"}),
}
BENCH_LAYER = {m: layer for layer, (modules, _) in BENCH_LAYERS.items() for m in modules}


def bench_imports(module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse((BENCH / f"{module}.py").read_text())):  # function-level ones count
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bench":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
    return found


def test_every_bench_module_is_in_a_layer():
    assert sorted(p.stem for p in BENCH.glob("*.py")) == sorted(BENCH_LAYER)


def test_bench_imports_point_down_only():
    for layer, (modules, lower) in BENCH_LAYERS.items():
        for rank, module in enumerate(modules):
            for used in bench_imports(module):
                assert BENCH_LAYER[used] in lower or used in modules[:rank], (
                    f"bench.{module} ({layer}) imports bench.{used} ({BENCH_LAYER[used]}): an upward import")
