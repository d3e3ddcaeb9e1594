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


@pytest.fixture(scope="module", autouse=True)
def _stop_pool_after_module():
    """Each module leaves no worker pool behind (the next module may want other devices or settings)."""
    yield
    from hires_parallel.parallel.runtime.pool import shutdown_pool

    shutdown_pool()


@pytest.fixture(scope="module")
def sd15():
    """The tiny SD1.5-family model most tests of this layer use (support.tiny_models.build_sd15, seed 0)."""
    from support.tiny_models import build_sd15

    return build_sd15(seed=0)
