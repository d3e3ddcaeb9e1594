"""HTTP routes of the web panel, under /hires_parallel/ (ComfyUI serves them under /api/hires_parallel/ too).

    GET  /hires_parallel/status          pool state, the run in progress, the last run, the last error + hint
    GET  /hires_parallel/layout?height=&width=&devices=&device_kind=&mode=&weights=&cfg_parallel=&align=
                                         the band split a sampler node would use (split_rows), in latent and
                                         pixel rows; {"ok": false, "error": ...} when the settings give none
    POST /hires_parallel/pool/shutdown   stop the workers and free the shared weight files
    POST /hires_parallel/pool/restart    stop the workers; they start again on the next job

The actions take no parameters: a caller can stop the pool but never choose what is launched. Every change
is also pushed to the browsers as a "hires_parallel.status" message (parallel/monitor.py).
``register()`` runs from the pack's entry point; it does nothing without a running PromptServer.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Mapping

from .parallel import monitor

log = logging.getLogger("hires_parallel")

PREFIX = "/hires_parallel"
PIXELS_PER_LATENT_ROW = 8  # SD1.x/2.x/SDXL latents: the families patch-parallel sampling splits
DEFAULT_ALIGN = 8  # SD1.x/2.x UNets (3 downsamplings); SDXL needs 4, so 8 is valid for both
DEFAULT_SIZE = 1024
MAX_SIZE = 16384  # ComfyUI's MAX_RESOLUTION
_registered: set[int] = set()  # ids of route tables we added to (ComfyUI may call the entry point twice)


class BadRequest(ValueError):
    """A malformed query (not a layout that cannot be made)."""


def _int(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name, "")
    if raw in ("", None):
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise BadRequest(f"{name} must be an integer; got {raw!r}.") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}; got {value}.")
    return value


def layout_for(query: Mapping[str, str]) -> dict:
    """The band split for a node's settings. Raises BadRequest for a malformed query and the pack's own
    input errors (ParallelInputError, LayoutError) for settings that give no layout."""
    from .parallel import submit
    from .parallel.layout import ParallelPlan, split_rows

    height = _int(query, "height", DEFAULT_SIZE, 8, MAX_SIZE)
    width = _int(query, "width", DEFAULT_SIZE, 8, MAX_SIZE)
    requested = _int(query, "devices", 0, 0, 64)
    align = _int(query, "align", DEFAULT_ALIGN, 1, 64)
    kind = query.get("device_kind") or "auto"
    mode = query.get("mode") or "exact"
    cfg_setting = query.get("cfg_parallel") or "auto"
    negative = str(query.get("negative", "1")).lower() not in ("0", "false", "no")
    if mode not in submit.MODES:
        raise submit.ParallelInputError(f"mode must be one of {submit.MODES}; got {mode!r}.")
    devices = submit.resolve_devices(requested, kind)
    world = len(devices)
    # The same rules as submit.preflight: batch mode shares each call's batch out and splits no rows.
    batch_mode = mode == "batch"
    cfg = False if batch_mode else submit.resolve_cfg_parallel(cfg_setting, world, negative)
    plan = ParallelPlan(world, cfg, batch_split=world if batch_mode else 0)
    weights = None if batch_mode else submit.band_weights(query.get("weights", ""), plan)
    rows = height // PIXELS_PER_LATENT_ROW
    if world == 1:
        split = [(0, rows)]  # one device runs the whole image in-process: nothing is split
    else:
        split = split_rows(rows, plan.bands_per_group, align, weights, pixel_scale=PIXELS_PER_LATENT_ROW)
    bands = []
    for b, (start, end) in enumerate(split):
        ranks = plan.peer_ranks(b)
        bands.append({"index": b, "ranks": ranks, "devices": [devices[r] for r in ranks],
                      "latent_rows": [start, end],
                      "pixel_rows": [start * PIXELS_PER_LATENT_ROW, end * PIXELS_PER_LATENT_ROW]})
    return {
        "ok": True, "height": height, "width": width, "latent_rows": rows,
        "latent_cols": width // PIXELS_PER_LATENT_ROW, "align": align, "pixel_scale": PIXELS_PER_LATENT_ROW,
        "devices_requested": requested, "devices": devices, "world_size": world, "mode": mode,
        "cfg_parallel": plan.cfg_parallel, "batch_groups": plan.batch_groups, "bands_per_group": len(bands),
        "band_weights": weights, "bands": bands,
    }


def _json(data: Any, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status)


async def status_handler(request):
    return _json(monitor.snapshot())


async def layout_handler(request):
    try:
        return _json(layout_for(request.rel_url.query))
    except BadRequest as e:
        return _json({"ok": False, "error": str(e)}, status=400)
    except ValueError as e:  # ParallelInputError / LayoutError: a valid question whose answer is "no layout"
        return _json({"ok": False, "error": str(e)})


def _stop_pool(free_weights: bool) -> None:
    from .parallel.pool import shutdown_pool

    shutdown_pool()  # a running job sees the stop within 0.1 s and fails with a clear message
    if free_weights:
        from .parallel import submit

        submit.close_weight_store()


async def _pool_action(action: str, free_weights: bool):
    loop = asyncio.get_running_loop()
    try:  # shutdown waits for the workers to exit: keep it off the server's event loop
        await loop.run_in_executor(None, _stop_pool, free_weights)
    except Exception as e:  # noqa: BLE001 - e.g. a worker that could not be stopped: say so, by pid
        log.warning("HiRes Parallel: pool %s failed: %s", action, e)
        return _json({"ok": False, "action": action, "error": str(e), **monitor.snapshot()}, status=500)
    monitor.publish(action)
    return _json({"ok": True, "action": action, **monitor.snapshot()})


async def shutdown_handler(request):
    return await _pool_action("shutdown", free_weights=True)


async def restart_handler(request):
    # The weight files stay, so the next job's fresh workers load the model without sending it again.
    return await _pool_action("restart", free_weights=False)


def add_routes(routes) -> None:
    """Add our routes to an aiohttp RouteTableDef (PromptServer.routes, or a test app's)."""
    routes.get(PREFIX + "/status")(status_handler)
    routes.get(PREFIX + "/layout")(layout_handler)
    routes.post(PREFIX + "/pool/shutdown")(shutdown_handler)
    routes.post(PREFIX + "/pool/restart")(restart_handler)


def register(server: Any = None) -> bool:
    """Add the routes to ComfyUI's server and push monitor events through it. Cheap and idempotent;
    False (and nothing done) when there is no PromptServer, e.g. when tests import the pack."""
    if server is None:
        mod = sys.modules.get("server")  # ComfyUI's server.py, imported by main.py before custom nodes
        server = getattr(getattr(mod, "PromptServer", None), "instance", None)
    routes = getattr(server, "routes", None)
    if routes is None:
        return False
    if id(routes) not in _registered:
        add_routes(routes)
        _registered.add(id(routes))
    send_sync = server.send_sync
    monitor.set_sink(lambda event, data: send_sync(event, data))
    return True


__all__ = ["PREFIX", "layout_for", "add_routes", "register"]
