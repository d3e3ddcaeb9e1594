"""The worker model cache's key (payload.base_key) names one model object for its whole life: a model
loaded later at the address of a freed one must not reuse the freed one's weights, even when the cheap
content sample of the key matches (a merge or fine-tune that differs only in unsampled weights)."""
from __future__ import annotations

import copy
import gc
import types

import torch

from hires_parallel.parallel.runtime import payload
from hires_parallel.parallel.runtime.payload import base_key


class _Net(torch.nn.Module):
    def __init__(self, poke: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)  # 256 weights: the key samples the first 64 of a few tensors
        if poke is not None:
            with torch.no_grad():
                self.a.weight[10, 3] = poke  # beyond the sampled values


def _patcher(module: torch.nn.Module) -> types.SimpleNamespace:
    return types.SimpleNamespace(model=module, backup={})


def test_a_new_model_at_a_freed_models_address_gets_a_new_key(monkeypatch) -> None:
    # Address reuse, made certain: every object "lives" at the same address, as a model loaded right after
    # ComfyUI freed another one may.
    monkeypatch.setattr(payload, "id", lambda obj: 0x7F00DEAD, raising=False)
    first = _Net()
    old_key = base_key(_patcher(first))
    assert base_key(_patcher(first)) == old_key  # stable for the same object
    del first
    gc.collect()
    fine_tune = _Net(poke=123.0)
    assert torch.equal(fine_tune.a.weight.reshape(-1)[:64], _Net().a.weight.reshape(-1)[:64])  # sample matches
    assert not torch.equal(fine_tune.a.weight, _Net().a.weight)
    assert base_key(_patcher(fine_tune)) != old_key


def test_a_copy_is_another_model() -> None:
    net = _Net()
    key = base_key(_patcher(net))
    twin = copy.deepcopy(net)  # carries the original's token in its __dict__
    with torch.no_grad():
        twin.a.weight[10, 3] = 5.0
    assert base_key(_patcher(twin)) != key
    assert base_key(_patcher(net)) == key
    assert "_hires_parallel_identity" not in net.state_dict()
