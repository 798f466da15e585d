"""The backend's modules import one way, from the layer that uses to the layer used:
``_args``/``errors``/``progress`` -> ``geometry`` (no torch) -> ``binding``, ``channels_last``
-> ``rules`` -> ``trace`` -> ``tiling``, ``slides`` (NumPy only), ``sources``, ``inputs``
-> ``state`` -> ``memory`` -> ``plan`` -> ``function`` -> ``streaming`` -> ``testing``. Checked on the
source: an import of a higher layer (a cycle) fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "streamcnn"
ORDER = ["_args", "errors", "progress", "allocator", "geometry", "binding", "channels_last", "rules", "trace",
         "tiling", "moments", "slides", "sources", "inputs", "state", "norms", "prefetch", "dedup",
         "memory", "plan", "function", "passes", "streaming", "statistics", "testing", "tuning", "__init__"]


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
