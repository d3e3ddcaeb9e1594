"""Ship a ComfyUI model to worker processes and rebuild it there.

A ModelPatcher cannot be pickled whole (its model_sampling class is defined inside a function), so the
controller sends what rebuilds it: the BaseModel class, model_config and model_type, the *unpatched* base
weights (once per base model, through a file the workers memory-map), and the patcher's weight patches
(LoRA etc.), model_options and object patches. Workers cache the base model by `base_key` and apply the
patches per job, exactly as ComfyUI applies them.

What cannot be pickled (a patch function defined inside another node, say) is named in a clear error.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch


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


def base_key(model) -> str:
    """Identity of the base weights: the BaseModel object plus a cheap content sample, unpatched."""
    sd = base_state_dict(model)
    h = hashlib.sha1(f"{type(model.model).__qualname__}:{id(model.model)}:{len(sd)}".encode())
    keys = sorted(sd)
    for k in keys[:: max(1, len(keys) // 8)]:
        t = sd[k]
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class WeightStore:
    """Files of base weights for the workers, one per base model, removed when the pool goes away."""

    def __init__(self) -> None:
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="hires_parallel_weights_", dir=root)
        self.files: dict[str, str] = {}
        self.lock = threading.Lock()

    def file_for(self, model, key: str, keep: int = 2) -> str:
        with self.lock:
            if key not in self.files:
                path = os.path.join(self.dir, f"{key}.pt")
                tmp = path + f".{uuid.uuid4().hex}.tmp"
                torch.save({k: v.detach().cpu() for k, v in base_state_dict(model).items()}, tmp)
                os.replace(tmp, path)
                self.files[key] = path
                for old in list(self.files)[:-keep]:  # bounded: the newest base models only
                    self._remove(old)
            return self.files[key]

    def _remove(self, key: str) -> None:
        path = self.files.pop(key, None)
        if path and os.path.exists(path):
            os.remove(path)

    def close(self) -> None:
        with self.lock:
            for key in list(self.files):
                self._remove(key)
            if os.path.isdir(self.dir):
                os.rmdir(self.dir)


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
        missing, unexpected = base.load_state_dict(sd, strict=False)
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
