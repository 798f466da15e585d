"""Array-module dispatch: the reference runs unchanged on NumPy and CuPy arrays.

Every public function calls :func:`array_module` on its array arguments and uses
the module it returns (``xp.zeros``, ``xp.tensordot``, ...), so results come back
in the caller's array type. CuPy is imported only when an argument already is a
CuPy array; it is never required.
"""

from __future__ import annotations

import numpy


def array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    The test is on the type's top-level module name, so NumPy users never import
    CuPy. Non-array arguments (ints, tuples, None) are ignored.
    """
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy  # lazy: only reached when the caller already holds a CuPy array

            return cupy
    return numpy


def to_numpy(a):
    """A NumPy copy of ``a`` (a no-op for NumPy arrays); used by tests and plots."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return numpy.asarray(a)
