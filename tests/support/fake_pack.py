"""A module as ComfyUI loads a custom node pack: registered under a name made from its folder's path, its
file under custom_nodes/. Pickles in this process, imports in no other (tests of the worker-import check)."""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Iterator

SOURCE = (
    "class PackCFG:\n"
    "    def __call__(self, args):\n"
    "        return args['cond']\n"
    "def pack_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):\n"
    "    return x\n"
    "import torch\n"
    "class PackConv(torch.nn.Conv2d):\n"
    "    pass\n"
)


def fake_pack_module(tmp_path: Path) -> Iterator[types.ModuleType]:
    """Yield the pack's `ops` module (PackCFG, pack_sampler, PackConv); unregistered afterwards."""
    folder = tmp_path / "ComfyUI" / "custom_nodes" / "SomePack"
    folder.mkdir(parents=True)
    (folder / "ops.py").write_text("# stand-in\n")
    package = types.ModuleType(str(folder).replace(".", "_x_"))  # ComfyUI: sys.modules[path] = the pack
    package.__file__, package.__path__ = str(folder / "__init__.py"), [str(folder)]
    name = package.__name__ + ".ops"  # what the pack's `from .ops import ...` registers
    mod = types.ModuleType(name)
    mod.__file__ = str(folder / "ops.py")
    exec(SOURCE, mod.__dict__)
    sys.modules[package.__name__], sys.modules[name] = package, mod
    try:
        yield mod
    finally:
        del sys.modules[name], sys.modules[package.__name__]
