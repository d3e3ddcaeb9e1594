"""Ship a ComfyUI model to worker processes and rebuild it there.

A ModelPatcher cannot be pickled whole (its model_sampling class is defined inside a function), so the
controller sends what rebuilds it: the BaseModel class, model_config and model_type, the *unpatched* base
weights (once per base model, through a file the workers memory-map), and the patcher's weight patches
(LoRA etc.), model_options and object patches. Workers cache the base model by `base_key` and apply the
patches per job, exactly as ComfyUI applies them.

What cannot be pickled (a patch function defined inside another node, say) is named in a clear error.
"""
from __future__ import annotations

import collections
import copyreg
import hashlib
import io
import logging
import os
import pickle
import shutil
import tempfile
import threading
import types
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from . import leftovers

log = logging.getLogger("hires_parallel")


class UnshippablePatch(ValueError):
    """A model or conditioning carries an object that cannot be sent to worker processes."""

    user_facing = True


@dataclass
class ModelPayload:
    base_key: str
    weights_file: str
    model_class: type
    model_config: Any
    model_type: Any
    patches: dict
    model_options: dict
    object_patches: dict
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- checks


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{name}"


def check_picklable(obj: Any, where: str, advice: str) -> None:
    """Raise UnshippablePatch naming `where` (and the innermost offending entry) if obj cannot be pickled."""
    try:
        pickle.dumps(obj)
        return
    except Exception as exc:  # noqa: BLE001 -- any pickling failure is reported the same way
        first_error = exc
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_picklable(v, f"{where}[{k!r}]", advice)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_picklable(v, f"{where}[{i}]", advice)
    raise UnshippablePatch(
        f"{where} holds {_describe(obj)}, which cannot be sent to worker processes ({type(first_error).__name__}: "
        f"{first_error}). {advice}"
    )


# ------------------------------------------------------------------------ importable in a worker
# Workers import ComfyUI and this pack only, never other node packs; ComfyUI imports a pack (and its own
# comfy_extras nodes) under a module name made from its file path, which no fresh interpreter can import.
# An object pickled here by such a name passes pickle.dumps and fails in the worker: refused up front.

_WORKER_ADVICE = "Run with 1 device, or remove the node that adds it."


class _NullFile:
    def write(self, data: bytes) -> int:
        return len(data)


class _GlobalsWalker(pickle.Pickler):
    """Pickles into nothing, collecting every class and function that the pickle would name (and so
    the worker would import); tensors are not walked (their classes are noted unless plain)."""

    def __init__(self) -> None:
        super().__init__(_NullFile(), protocol=pickle.HIGHEST_PROTOCOL)
        self.found: dict[int, Any] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if type(obj) not in (torch.Tensor, torch.nn.Parameter):  # e.g. a quantized tensor class of a pack
                self.found.setdefault(id(type(obj)), type(obj))
            return "tensor"
        return None

    def reducer_override(self, obj: Any) -> Any:
        if obj is int:  # the stand-in below
            return NotImplemented
        if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            self.found.setdefault(id(obj), obj)
            return int, ()  # noted; never looked up (a lookup could import, or fail on a path-derived name)
        return NotImplemented


def referenced_globals(obj: Any) -> list[Any]:
    """The classes and functions that pickling ``obj`` refers to by module and name."""
    walker = _GlobalsWalker()
    try:
        walker.dump(obj)
    except Exception:  # noqa: BLE001 -- what cannot be pickled at all is check_picklable's to report
        pass
    return list(walker.found.values())


def _find_top_level(name: str) -> Any:
    """The spec a fresh interpreter with this sys.path would find for top-level module ``name`` (the
    workers inherit the controller's sys.path), ignoring what is already imported here."""
    import sys

    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, None)
        except Exception:  # noqa: BLE001 -- a finder that cannot answer is no answer
            continue
        if spec is not None:
            return spec
    return None


def _module_file(module: str) -> str | None:
    import sys

    mod = sys.modules.get(module) or sys.modules.get(module.partition(".")[0])
    f = getattr(mod, "__file__", None)
    return os.path.realpath(f) if f else None


def _origin_label(module: str) -> str:
    """'the node pack "X"' for a module of a custom node folder, else the module's file or name."""
    f = _module_file(module)
    parts = os.path.normpath(f).split(os.sep) if f else []
    if "custom_nodes" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("custom_nodes")
        return f'the node pack "{os.path.splitext(parts[i + 1])[0]}"'
    top = module.partition(".")[0]
    if not all(p.isidentifier() for p in top.split(".")):  # a path-derived name without a file here
        tail = top.replace("\\", "/").rstrip("/").split("/")[-1].replace("_x_", ".")
        return f'"{tail}" (loaded by ComfyUI from {top.replace("_x_", ".")})'
    return f"module {module}"


def _import_problem(module: str, cache: dict[str, str | None]) -> str | None:
    """Why a worker could not import ``module`` (None when it can)."""
    if module in cache:
        return cache[module]
    import sys

    from .pool import PACKAGE, RUNTIME_PACKAGE, _pack_aliases, comfy_extras_name

    top = module.partition(".")[0]
    problem: str | None = None
    if top in (PACKAGE, RUNTIME_PACKAGE) or top in _pack_aliases():
        problem = None  # this pack: pickled under the name the workers import it by (pool._PackPickler)
    elif comfy_extras_name(module):
        problem = None  # ComfyUI's own node files: pickled as comfy_extras.<name> (pool._PackPickler)
    elif module == "__main__" or top == "__main__":
        problem = "it was defined in the script that started Python (__main__)"
    elif not all(p.isidentifier() for p in module.split(".")):
        problem = "ComfyUI imported its file under a name made from the file's path, which only this process knows"
    else:
        spec = _find_top_level(top)
        if spec is None:
            problem = f"no module {top!r} can be found on the Python path the workers get"
        else:
            loaded, origin = _module_file(top), getattr(spec, "origin", None)
            if loaded and origin and os.path.exists(origin) and os.path.realpath(origin) != loaded:
                problem = f"the workers would import a different module {top!r} ({origin})"
            elif module not in sys.modules and module != top:
                try:
                    found = _find_submodule(module)
                except Exception:  # noqa: BLE001
                    found = False
                if not found:
                    problem = f"module {module!r} is not loaded here and cannot be found"
    cache[module] = problem
    return problem


def _find_submodule(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _first_unimportable(obj: Any, cache: dict[str, str | None]) -> tuple[Any, str, str] | None:
    for g in referenced_globals(obj):
        module = getattr(g, "__module__", None)
        if not isinstance(module, str):
            continue  # pickle finds such a function by searching the loaded modules (builtins)
        problem = _import_problem(module, cache)
        if problem:
            return g, module, problem
    return None


def check_worker_importable(obj: Any, where: str, advice: str = _WORKER_ADVICE,
                            _cache: dict[str, str | None] | None = None) -> None:
    """Raise UnshippablePatch naming `where` (the innermost entry), the class or function and its node pack
    when pickling ``obj`` refers to a module a worker cannot import."""
    cache = {} if _cache is None else _cache
    bad = _first_unimportable(obj, cache)
    if bad is None:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_worker_importable(v, f"{where}[{k!r}]", advice, cache)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_worker_importable(v, f"{where}[{i}]", advice, cache)
    g, module, problem = bad
    kind = "class" if isinstance(g, type) else "function"
    name = getattr(g, "__qualname__", None) or getattr(g, "__name__", "?")
    raise UnshippablePatch(
        f"{where} holds the {kind} {name} of {_origin_label(module)}, which the worker processes cannot import "
        f"({problem}). Workers load only ComfyUI and HiRes Parallel, never other node packs. {advice}"
    )


def check_model_importable(model: Any, advice: str = _WORKER_ADVICE) -> None:
    """check_worker_importable for everything make_payload ships of ``model`` (a ModelPatcher)."""
    cache: dict[str, str | None] = {}
    object_patches = {k: _ship_object_patch(k, v) for k, v in model.object_patches.items()}
    check_worker_importable(model.patches, "a weight patch (LoRA) of the model", advice, cache)
    check_worker_importable(model.model_options, "model_options", advice, cache)
    check_worker_importable(object_patches, "an object patch of the model", advice, cache)
    check_worker_importable({"class": type(model.model), "model_config": model.model.model_config}, "the model",
                            "Load the model with ComfyUI's own loaders, or run with 1 device.", cache)


def control_layer_classes(positive: list | None, negative: list | None) -> dict[str, type]:
    """The module classes of every ControlNet model in the conds (chains included), by name: their
    skeleton is pickled with these classes."""
    seen: set[int] = set()
    out: dict[str, type] = {}

    def visit(cn: Any) -> Any:
        while cn is not None and id(cn) not in seen:
            seen.add(id(cn))
            module = getattr(cn, "control_model", None)
            if isinstance(module, torch.nn.Module):
                out.update((f"{t.__module__}.{t.__qualname__}", t) for t in {type(m) for m in module.modules()})
            cn = getattr(cn, "previous_controlnet", None)
        return cn

    _map_controls(positive, visit)
    _map_controls(negative, visit)
    return out


# ------------------------------------------------------------------------- model_sampling object patch


class _ShippedModelSampling:
    """Pickle form of a model_sampling object whose class was made inside a node (ModelSamplingDiscrete etc.)."""

    def __init__(self, obj: torch.nn.Module):
        self.name = type(obj).__name__
        self.bases = type(obj).__bases__
        self.state = dict(obj.__dict__)

    def rebuild(self) -> torch.nn.Module:
        cls = type(self.name, self.bases, {})
        obj = cls.__new__(cls)
        obj.__dict__.update(self.state)
        return obj


def _ship_object_patch(name: str, obj: Any) -> Any:
    if name == "model_sampling" and isinstance(obj, torch.nn.Module):
        try:
            pickle.dumps(obj)
            return obj
        except Exception:  # noqa: BLE001 -- a locally defined class: ship its bases and state instead
            shipped = _ShippedModelSampling(obj)
            check_picklable(shipped.bases, "model_sampling's base classes", "Use a standard model sampling node.")
            return shipped
    return obj


# ------------------------------------------------------------------------------------ base weights


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights without any patch applied (ComfyUI patches loaded weights in place)."""
    sd = model.model.state_dict()
    for key, backup in getattr(model, "backup", {}).items():
        if key in sd:
            sd[key] = backup.weight
    return sd


_TOKEN = "_hires_parallel_identity"  # set on a BaseModel the first time it is shipped


def model_identity(module: Any) -> str:
    """A token attached to the model object itself: it lives and dies with the object, so a model loaded
    later at the same address (which ``id`` would confuse with the freed one) gets a new token."""
    owner, token = module.__dict__.get(_TOKEN, (None, None))
    if owner != id(module):  # never shipped, or a copy (deepcopy / pickle) that carried its original's token
        owner, token = id(module), uuid.uuid4().hex
        module.__dict__[_TOKEN] = (owner, token)  # plain attribute, not a parameter or buffer: not in the state dict
    return token


def base_key(model) -> str:
    """Identity of the base weights: the BaseModel's own token plus a cheap content sample, unpatched
    (the sample catches weights changed in place on the same object)."""
    return _weights_key(model.model, base_state_dict(model))


def _weights_key(module: Any, sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1(f"{type(module).__qualname__}:{model_identity(module)}:{len(sd)}".encode())
    keys = sorted(sd)
    for k in keys[:: max(1, len(keys) // 8)]:
        t = sd[k]
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class NoRoomForWeights(RuntimeError):
    """Neither shared memory nor the disk folder can hold a model's weights for the workers."""

    user_facing = True


MARGIN_BYTES = 256 << 20  # left free beside a weight file (other programs, the next file's temp copy)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def _available_ram() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no figure: the folder's own free space decides
        return None


class WeightStore:
    """Files of weights for the workers, one per model, in groups ("base", "control") that are each kept
    to the newest few; removed when the pool goes away, at exit, or by the next start's sweep.

    Files go to shared memory (/dev/shm: the workers map them without a disk read) when it has room for
    them, else to a disk folder (``HIRES_PARALLEL_WEIGHTS_DIR``, else the system temp folder), with a log
    line; folders are the owner's only (0700), files 0600. A container's default 64 MB /dev/shm therefore
    costs a slower first load instead of "no space left on device"."""

    def __init__(self) -> None:
        leftovers.sweep()
        self.files: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.groups: dict[str, list[str]] = {}  # group -> keys, least recently used first
        self.lock = threading.RLock()
        self.dirs: dict[str, str] = {}  # "shm" / "disk" -> this store's folder there, made when first used
        self.dir = self._folder("shm" if leftovers.shm_dir() else "disk")
        leftovers.on_exit(self.close)

    @staticmethod
    def _root(kind: str) -> str:
        if kind == "shm":
            return leftovers.shm_dir() or tempfile.gettempdir()
        return os.environ.get("HIRES_PARALLEL_WEIGHTS_DIR") or tempfile.gettempdir()

    def _folder(self, kind: str) -> str:
        if kind not in self.dirs:
            root = self._root(kind)
            os.makedirs(root, exist_ok=True)
            self.dirs[kind] = tempfile.mkdtemp(prefix=leftovers.owned_prefix(leftovers.WEIGHTS_PREFIX), dir=root)
        return self.dirs[kind]

    def _place(self, nbytes: int) -> str:
        """The folder a file of ``nbytes`` goes to: shared memory when it fits there (and in free RAM,
        which shared memory uses), else the disk folder; NoRoomForWeights when neither has room."""
        need = nbytes + MARGIN_BYTES
        free: dict[str, int] = {}
        if leftovers.shm_dir():
            free["shm"] = shutil.disk_usage(leftovers.shm_dir()).free
            ram = _available_ram()
            if ram is not None:
                free["shm"] = min(free["shm"], ram)
            if free["shm"] >= need:
                return self._folder("shm")
        disk_root = self._root("disk")
        free["disk"] = shutil.disk_usage(disk_root).free if os.path.isdir(disk_root) else 0
        if free["disk"] >= need:
            if "shm" in free:
                log.warning("HiRes Parallel: /dev/shm (shared memory) has %s free, the model's weights need %s: "
                            "writing them to %s on disk instead (workers load them from there; give the "
                            "container more /dev/shm, e.g. docker --shm-size, for faster starts).",
                            _gib(free["shm"]), _gib(nbytes), disk_root)
            return self._folder("disk")
        where = ", ".join(f"{'/dev/shm' if k == 'shm' else self._root(k)} has {_gib(v)} free" for k, v in free.items())
        raise NoRoomForWeights(
            f"The workers need the model's weights ({_gib(nbytes)}) in a file, but {where}. Free some space, "
            "point HIRES_PARALLEL_WEIGHTS_DIR at a folder with room, or run with 1 device.")

    def file_for(self, model, key: str, keep: int = 2) -> str:
        with self.lock:
            if key not in self.files:
                self.trim("base", keep - 1)  # make room before the new file, not after
            path = self.file_for_data(key, lambda: {k: v.detach().cpu() for k, v in base_state_dict(model).items()},
                                      "base")
            self.trim("base", keep, pinned={key})  # bounded: the newest base models only
            return path

    def file_for_data(self, key: str, make: Callable[[], dict], group: str) -> str:
        """The file for `key`, written from make() (anything torch.load(weights_only=True) reads) when new."""
        with self.lock:
            if key not in self.files:
                data = make()
                nbytes = _payload_bytes(data)
                path = os.path.join(self._place(nbytes), f"{key}.pt")
                tmp = path + f".{uuid.uuid4().hex}.tmp"
                try:
                    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                        torch.save(data, f)
                    os.replace(tmp, path)
                except BaseException:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                    raise
                self.files[key] = path
                self.sizes[key] = nbytes
            order = self.groups.setdefault(group, [])
            if key in order:
                order.remove(key)
            order.append(key)
            return self.files[key]

    def trim(self, group: str, keep: int, pinned: Iterable[str] = ()) -> None:
        """Remove the least recently used files of `group` beyond `keep`, never one in `pinned` (the job's own)."""
        pinned = set(pinned)
        with self.lock:
            order = self.groups.get(group, [])
            for old in [k for k in order if k not in pinned][: max(0, len(order) - max(0, keep))]:
                self._remove(old)

    def _remove(self, key: str) -> None:
        for order in self.groups.values():
            if key in order:
                order.remove(key)
        self.sizes.pop(key, None)
        path = self.files.pop(key, None)
        if path and os.path.exists(path):
            try:
                os.remove(path)  # POSIX: workers that mapped it keep their pages until they drop the model
            except OSError as exc:  # Windows: a file mapped by a worker cannot go yet; the sweep takes it later
                log.info("HiRes Parallel: weight file %s not removed yet (%s)", path, exc)

    def close(self) -> None:
        with self.lock:
            for key in list(self.files):
                self._remove(key)
            for folder in self.dirs.values():
                shutil.rmtree(folder, ignore_errors=True)
            self.dirs = {}


def _payload_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) dict / list, plus a little for the rest (skeletons, names)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_payload_bytes(v) for v in obj.values()) + 64 * len(obj)
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj)
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    return 64


# ------------------------------------------------------------------------------------ controller side


_ADVICE = "Remove the node that adds it, or run with 1 device."


def make_payload(model, store: WeightStore) -> ModelPayload:
    """Everything a worker needs to rebuild `model` (a ModelPatcher), checked for picklability first."""
    key = base_key(model)
    object_patches = {k: _ship_object_patch(k, v) for k, v in model.object_patches.items()}
    check_picklable(model.patches, "a weight patch (LoRA) of the model", _ADVICE)
    check_picklable(model.model_options, "model_options", _ADVICE)
    check_picklable(object_patches, "an object patch of the model", _ADVICE)
    check_picklable(model.model.model_config, "the model's config", "This model family cannot be shipped.")
    check_model_importable(model, _ADVICE)  # pickles here, yet a worker could not import it (other node packs)
    payload = ModelPayload(
        base_key=key,
        weights_file=store.file_for(model, key),
        model_class=type(model.model),
        model_config=model.model.model_config,
        model_type=model.model.model_type,
        patches={k: list(v) for k, v in model.patches.items()},
        model_options=model.model_options,
        object_patches=object_patches,
        meta={"dtype": str(model.model.get_dtype())},
    )
    return payload


# ---------------------------------------------------------------------------------------- worker side


def build_model(payload: ModelPayload, cache: dict):
    """A ModelPatcher equal to the controller's, with the base model cached in `cache` by base_key."""
    import comfy.model_management
    import comfy.model_patcher

    entry = cache.get("base_model")
    if entry is None or entry[0] != payload.base_key:
        cache.pop("base_model", None)  # one base model per worker: free the old one first
        sd = torch.load(payload.weights_file, map_location="cpu", mmap=True, weights_only=True)
        base = payload.model_class(payload.model_config, model_type=payload.model_type,
                                   device=comfy.model_management.unet_offload_device())
        # assign: the parameters ARE the file's memory-mapped pages (copy-on-write), so N workers on one
        # machine share one copy of the weights in RAM instead of holding N; moving to a GPU copies from them.
        missing, unexpected = base.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f"rebuilt model does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        base.eval()
        patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        cache["base_model"] = (payload.base_key, patcher)
        cache["base_loads"] = cache.get("base_loads", 0) + 1
    patcher = cache["base_model"][1].clone()
    patcher.patches = {k: list(v) for k, v in payload.patches.items()}
    patcher.patches_uuid = uuid.uuid4()
    patcher.model_options = comfy.model_patcher.create_model_options_clone(payload.model_options)
    patcher.object_patches = {
        k: (v.rebuild() if isinstance(v, _ShippedModelSampling) else v) for k, v in payload.object_patches.items()
    }
    return patcher


# ---------------------------------------------------------------------------------------- ControlNets

_UNSUPPORTED = "is not supported by patch-parallel sampling yet: run with 1 device"
# ControlNet attributes that are not plain settings: shipped apart (the model, the chain), rebuilt in the
# worker (load_device is the worker's own), or refused when set (vae, hooks, a custom preprocess_image).
_CONTROL_SPECIAL = frozenset({
    "control_model", "control_model_wrapped", "load_device", "previous_controlnet", "preprocess_image", "vae",
    "extra_hooks",
})
# Per-run state that pre_run / get_control set and cleanup clears: never shipped, rebuilt by the run.
_CONTROL_RUNTIME = frozenset({"cond_hint", "extra_concat", "timestep_range", "model_sampling_current"})
# ComfyUI's load bookkeeping (ModelPatcher.__init__ / load / lowvram) on a control model's modules: a
# module rebuilt in a worker must start unloaded there, whatever the controller's copy went through.
_ROOT_LOAD_STATE = frozenset({
    "device", "model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram", "current_weight_patches_uuid",
})
_MODULE_LOAD_STATE = frozenset({"comfy_patched_weights", "prev_comfy_cast_weights", "weight_function", "bias_function"})
_CONTROL_KEEP = 2  # control models kept (controller files, worker cache) beyond those of the current job


def _identity(a):
    return a


def _is_identity(fn: Any) -> bool:
    """True for `lambda a: a` (ControlBase's default preprocess_image, wherever it was written)."""
    code, ref = getattr(fn, "__code__", None), _identity.__code__
    return (
        isinstance(fn, types.FunctionType) and fn.__closure__ is None and code.co_argcount == 1
        and code.co_kwonlyargcount == 0 and code.co_code == ref.co_code and code.co_consts == ref.co_consts
    )


@dataclass
class ShippedControlNet:
    """Pickle form of one comfy.controlnet.ControlNet of a chain (see ship_conditioning)."""

    cls: type
    model_key: str  # "" when only checked (preflight)
    model_file: str
    attrs: dict  # plain settings: cond_hint_original, strength, timestep_percent_range, ...
    previous: "ShippedControlNet | None" = None


class _SkeletonPickler(pickle.Pickler):
    """Pickles a module's structure without its weights: state-dict tensors become placeholders.

    cldm.ControlNet keeps no constructor config (and its head count cannot be read back from the weights),
    so the structure itself is shipped; the weights go beside it and are loaded with strict=True.
    """

    def __init__(self, file: io.BytesIO, root: torch.nn.Module) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.root = root
        self.names = {id(t): name for name, t in root.state_dict(keep_vars=True).items()}

    def persistent_id(self, obj: Any) -> Any:
        name = self.names.get(id(obj)) if isinstance(obj, torch.Tensor) else None
        if name is None:
            return None
        return ("hires_parallel_tensor", name, tuple(obj.shape), obj.dtype, isinstance(obj, torch.nn.Parameter),
                bool(obj.requires_grad))

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.nn.Module):
            return NotImplemented
        drop = _MODULE_LOAD_STATE | (_ROOT_LOAD_STATE if obj is self.root else frozenset())
        state = {k: v for k, v in obj.__dict__.items() if k not in drop}
        if "prev_comfy_cast_weights" in obj.__dict__:  # lowvram switched casting on: undo, as ComfyUI's unload does
            state["comfy_cast_weights"] = obj.__dict__["prev_comfy_cast_weights"]
        return copyreg.__newobj__, (type(obj),), state


class _SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.made: dict[str, torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> Any:
        tag, name, shape, dtype, is_param, requires_grad = pid
        if tag != "hires_parallel_tensor":
            raise pickle.UnpicklingError(f"unknown placeholder {tag!r}")
        if name not in self.made:  # tied weights stay tied
            t = torch.empty(shape, dtype=dtype)
            self.made[name] = torch.nn.Parameter(t, requires_grad=requires_grad) if is_param else t
        return self.made[name]


def _skeleton(module: torch.nn.Module, where: str) -> bytes:
    buf = io.BytesIO()
    try:
        _SkeletonPickler(buf, module).dump(module)
    except Exception as exc:  # noqa: BLE001 -- e.g. layers of a class made inside a function (fp8 ops)
        raise UnshippablePatch(
            f"{where}: the ControlNet's model ({_describe(module)}) cannot be sent to worker processes "
            f"({type(exc).__name__}: {exc}); this ControlNet {_UNSUPPORTED}."
        ) from None
    return buf.getvalue()


def _ship_control(cn: Any, where: str, store: WeightStore | None, memo: dict[int, ShippedControlNet],
                  keys: list[str]) -> ShippedControlNet:
    import comfy.cldm.cldm
    import comfy.controlnet

    if id(cn) in memo:  # shared by positive and negative: stays one object, so ComfyUI batches them alike
        return memo[id(cn)]
    if type(cn) is not comfy.controlnet.ControlNet:  # T2IAdapter, ControlLora, ControlNetSD35, ...
        raise UnshippablePatch(f"{where} carries a {_describe(cn)} control, which {_UNSUPPORTED}.")
    model = getattr(cn, "control_model", None)
    if not isinstance(model, comfy.cldm.cldm.ControlNet):
        raise UnshippablePatch(f"{where} carries a ControlNet whose model is {_describe(model)} (not a UNet "
                               f"ControlNet, comfy.cldm.cldm.ControlNet), which {_UNSUPPORTED}.")
    if not _is_identity(getattr(cn, "preprocess_image", _identity)):
        raise UnshippablePatch(f"{where} carries a ControlNet with a custom preprocess_image "
                               f"({_describe(cn.preprocess_image)}), which {_UNSUPPORTED}.")
    if getattr(cn, "vae", None) is not None:
        raise UnshippablePatch(f"{where} carries a ControlNet that encodes its hint with a VAE, which {_UNSUPPORTED}.")
    if getattr(cn, "extra_hooks", None) is not None:
        raise UnshippablePatch(f"{where} carries a ControlNet with hooks, which {_UNSUPPORTED}.")
    # Every other attribute is a plain setting (generic, so settings of newer ComfyUI versions go along too).
    attrs = {k: v for k, v in cn.__dict__.items() if k not in _CONTROL_SPECIAL and k not in _CONTROL_RUNTIME}
    check_picklable(attrs, f"{where}: a ControlNet's settings", f"This ControlNet {_UNSUPPORTED}.")
    previous = None
    if cn.previous_controlnet is not None:
        previous = _ship_control(cn.previous_controlnet, f"{where} (previous ControlNet)", store, memo, keys)
    key = path = ""
    if store is None:
        _skeleton(model, where)  # preflight: fail early on a structure that cannot travel
    else:
        sd = base_state_dict(cn.control_model_wrapped)
        key = "control-" + _weights_key(model, sd)
        path = store.file_for_data(key, lambda: {"skeleton": _skeleton(model, where),
                                                 "state_dict": {k: v.detach().cpu() for k, v in sd.items()}},
                                   "control")
        keys.append(key)
    memo[id(cn)] = shipped = ShippedControlNet(type(cn), key, path, attrs, previous)
    return shipped


def _map_controls(conds: list | None, fn: Callable[[Any], Any]) -> list | None:
    """A copy of a CONDITIONING list with fn applied to each entry's "control" (other entries untouched)."""
    if conds is None:
        return None
    out = []
    for item in conds:
        if isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[1], dict) \
                and item[1].get("control") is not None:
            extra = dict(item[1])
            extra["control"] = fn(extra["control"])
            item = [item[0], extra, *item[2:]]
        out.append(item)
    return out


def ship_conditioning(positive: list, negative: list | None, store: WeightStore | None) -> tuple[list, list | None]:
    """positive / negative with every ControlNet replaced by a ShippedControlNet (chains included).

    With store None nothing is written: preflight uses it to raise UnshippablePatch early. ControlNets
    shared between entries stay shared (one record). Control model files beyond the newest couple that
    this job does not use are removed.
    """
    memo: dict[int, ShippedControlNet] = {}
    keys: list[str] = []
    shipped = []
    for conds, label in ((positive, "the positive conditioning"), (negative, "the negative conditioning")):
        shipped.append(_map_controls(conds, lambda cn, label=label: _ship_control(cn, label, store, memo, keys)))
    if store is not None:
        store.trim("control", _CONTROL_KEEP, pinned=keys)
    return shipped[0], shipped[1]


def _control_model(record: ShippedControlNet, cache: dict):
    """(module, ModelPatcher) of a control model, from the worker cache or loaded from its file."""
    import comfy.model_management
    import comfy.model_patcher

    models: collections.OrderedDict = cache.setdefault("control_models", collections.OrderedDict())
    if record.model_key not in models:
        data = torch.load(record.model_file, map_location="cpu", mmap=True, weights_only=True)
        module = _SkeletonUnpickler(data["skeleton"]).load()
        module.load_state_dict(data["state_dict"], strict=True)  # copies: the file may go away
        del data
        offload = comfy.model_management.unet_offload_device()
        module.to(offload)
        # One patcher per control model, kept with it: ComfyUI then finds it loaded in later jobs.
        patcher = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=offload)
        models[record.model_key] = (module, patcher)
        cache["control_loads"] = cache.get("control_loads", 0) + 1
    models.move_to_end(record.model_key)
    return models[record.model_key]


def _rebuild_control(record: ShippedControlNet, cache: dict, memo: dict[int, Any]) -> Any:
    if id(record) in memo:
        return memo[id(record)]
    module, patcher = _control_model(record, cache)
    # As ControlNet.copy() builds it: no new patcher, the shared model, then the settings.
    cn = record.cls(None, load_device=patcher.load_device, manual_cast_dtype=record.attrs.get("manual_cast_dtype"))
    cn.control_model = module
    cn.control_model_wrapped = patcher
    cn.__dict__.update(record.attrs)
    if record.previous is not None:
        cn.set_previous_controlnet(_rebuild_control(record.previous, cache, memo))
    memo[id(record)] = cn
    return cn


def rebuild_conditioning(positive: list, negative: list | None, cache: dict) -> tuple[list, list | None]:
    """Worker side of ship_conditioning: real ControlNet objects, control models cached by key in `cache`."""
    memo: dict[int, Any] = {}

    def rebuild(control: Any) -> Any:
        return _rebuild_control(control, cache, memo) if isinstance(control, ShippedControlNet) else control

    out = _map_controls(positive, rebuild), _map_controls(negative, rebuild)
    used = {r.model_key for r in _records(positive) + _records(negative)}
    models = cache.get("control_models", {})
    for key in [k for k in models if k not in used][: max(0, len(models) - _CONTROL_KEEP)]:
        del models[key]  # least recently used first; ComfyUI frees what nothing references any more
    return out


def _records(conds: list | None) -> list[ShippedControlNet]:
    found: list[ShippedControlNet] = []
    _map_controls(conds, lambda c: found.append(c) if isinstance(c, ShippedControlNet) else None)
    for r in list(found):
        while r.previous is not None:
            r = r.previous
            found.append(r)
    return found
