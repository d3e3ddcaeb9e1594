"""HiRes Parallel: high-resolution and multi-device diffusion sampling for ComfyUI.

ComfyUI imports this folder by path under a module name of its own; the same code is also the
package ``hires_parallel`` (``pip install -e .``), which is how tests and worker processes import it.
Nothing heavy happens at import time: nodes are registered through ``comfy_entrypoint``.
"""
import sys

__version__ = "0.1.0"

# Served by ComfyUI under /extensions/<folder name>/ (JS extension, help pages).
WEB_DIRECTORY = "./web"

# When ComfyUI loads us under its path-derived name, register the same module as `hires_parallel`
# too, so code that imports `hires_parallel` (pickled job payloads, workers) finds this pack.
if __name__ != "hires_parallel" and "hires_parallel" not in sys.modules:
    sys.modules["hires_parallel"] = sys.modules[__name__]


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this to get the extension that lists our nodes."""
    from .nodes import HiResParallelExtension
    from .parallel.runtime import leftovers
    from .web_routes import register

    # ComfyUI calls this on its main thread, where signal handlers can be set: SIGTERM / SIGHUP then
    # remove the weight files and stop the workers, as a normal exit does. Leftovers of killed runs go now.
    leftovers.install_signal_handlers()
    leftovers.sweep()

    try:
        register()  # the web panel's routes; a no-op without a running PromptServer
    except Exception as e:  # noqa: BLE001 - the nodes must load even if the panel cannot
        import logging

        logging.getLogger("hires_parallel").warning("HiRes Parallel: web panel routes not registered: %s", e)
    return HiResParallelExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint", "__version__"]
