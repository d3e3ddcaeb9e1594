import pytest


@pytest.fixture(autouse=True, scope="session")
def _comfy_in_process(comfy_root):
    """Every test of this layer runs with the real ComfyUI imported."""
    return comfy_root


@pytest.fixture()
def one_thread():
    """Single-device references with 1 thread, like each worker rank: differences then come from the split only."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
