"""V3 nodes: thin adapters between ComfyUI objects and our algorithms / runtime."""
try:
    from comfy_api.v0_0_2 import ComfyExtension, io  # pinned V3 API version
except ImportError as exc:  # imported outside ComfyUI with no checkout on sys.path
    from ..comfy_host import HOW_TO, ComfyUINotFound

    raise ComfyUINotFound(HOW_TO) from exc

from .asg import ASG_NODES
from .coop import COOP_NODES
from .parallel_sampler import PARALLEL_NODES
from .parataa import PARATAA_NODES
from .relay import RELAY_NODES


class HiResParallelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*RELAY_NODES, *PARALLEL_NODES, *PARATAA_NODES, *COOP_NODES, *ASG_NODES]


__all__ = ["HiResParallelExtension"]
