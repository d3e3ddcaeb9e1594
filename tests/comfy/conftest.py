import pytest


@pytest.fixture(autouse=True, scope="session")
def _comfy_in_process(comfy_root):
    """Every test of this layer runs with the real ComfyUI imported."""
    return comfy_root
