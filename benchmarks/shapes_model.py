"""The shapes model under its old import name (``import shapes_model`` with benchmarks/ on sys.path).

The code lives in the pack, ``hires_parallel.embedded.shapes_model`` (embedded/shapes_model.py), so an installed
pack can load the model; this name is the very same module object (patches and caches are shared).
"""
import sys

from hires_parallel.embedded import shapes_model as _embedded

sys.modules[__name__] = _embedded
