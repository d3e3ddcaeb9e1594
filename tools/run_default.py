"""The main command under its old path: runs ``hires_parallel.embedded.run_default`` (embedded/run_default.py).

The code lives inside the pack so that an installed pack (which ships no tools/) has it too:

    python embedded/run_default.py --out out/shapes_2x.png       # the same command
"""
from __future__ import annotations

import pathlib
import runpy
import sys

if __name__ == "__main__":
    sys.argv[0] = str(pathlib.Path(__file__).resolve().parents[1] / "embedded" / "run_default.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
