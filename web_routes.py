"""HTTP routes of the web panel, under /hires_parallel/ (ComfyUI serves them under /api/hires_parallel/ too).

    GET  /hires_parallel/status          pool state, the run in progress, the last run, the last error + hint
    GET  /hires_parallel/layout?height=&width=&devices=&device_kind=&mode=&weights=&cfg_parallel=&cfg=&comfy_gpu=
                               &checkpoint=&family=&align=
                                         the band split a sampler node would use (split_rows), in latent and
                                         pixel rows; {"ok": false, "error": ...} when the settings give none
    GET  /hires_parallel/align?checkpoint=&family=
                                         the band alignment a run of that model uses (layout.band_alignment)
    POST /hires_parallel/pool/shutdown   stop the workers and free the shared weight files
    POST /hires_parallel/pool/restart    stop the workers; they start again on the next job

The actions take no parameters: a caller can stop the pool but never choose what is launched. Every change
is also pushed to the browsers as a "hires_parallel.status" message (parallel/runtime/monitor.py).
``register()`` runs from the pack's entry point; it does nothing without a running PromptServer.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Mapping

from .parallel.runtime import monitor
from .parallel.split.layout import band_alignment

log = logging.getLogger("hires_parallel")

PREFIX = "/hires_parallel"
PIXELS_PER_LATENT_ROW = 8  # SD1.x/2.x/SDXL latents: the families patch-parallel sampling splits
# The band alignment comes from the model, with the rule a run uses (parallel.layout.band_alignment): SD1.x/2.x 8,
# SDXL 4. The overlay names the checkpoint its sampler's model comes from (or a family); when the model is
# unknown the SD1.x rule is shown and the answer also carries the bands of the families that align otherwise.
DEFAULT_FAMILY = "sd15"
FAMILIES = ("sd15", "sdxl")
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet")  # where ComfyUI keeps loadable UNets
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


def _file_alignment(path: str, mtime_ns: int) -> int | None:
    key = (path, mtime_ns)
    if key not in _ALIGN_CACHE:
        align = None
        if path.lower().endswith((".safetensors", ".sft")):
            try:
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:  # reads the header only
                    align = band_alignment(list(f.keys()))
            except Exception as e:  # noqa: BLE001 - a broken or foreign file: the model stays unknown
                log.debug("HiRes Parallel: no band alignment from %s: %s", path, e)
        if len(_ALIGN_CACHE) > 256:
            _ALIGN_CACHE.clear()
        _ALIGN_CACHE[key] = align
    return _ALIGN_CACHE[key]


_ALIGN_CACHE: dict[tuple[str, int], int | None] = {}


def checkpoint_path(name: str) -> str | None:
    """The file of a checkpoint / UNet name as ComfyUI's loaders resolve it; None outside ComfyUI or if absent."""
    try:
        import folder_paths  # ComfyUI's own module: there in a server, absent in the unit tests
    except ImportError:
        return None
    for folder in MODEL_FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except Exception:  # noqa: BLE001 - a folder this ComfyUI does not know
            path = None
        if path:
            return path
    return None


def checkpoint_alignment(name: str) -> int | None:
    """The band alignment of a checkpoint file, from the tensor names in its header; None when unknown."""
    path = checkpoint_path(name) if name else None
    if not path:
        return None
    import os

    try:
        return _file_alignment(os.path.abspath(path), os.stat(path).st_mtime_ns)
    except OSError:
        return None


def alignment_for(query: Mapping[str, str]) -> dict:
    """The band alignment for a query: ``align`` (explicit), else ``family``, else ``checkpoint`` (read from the
    file's header), else the SD1.x rule with ``known`` False. Always with the rule's answer per family."""
    from .parallel.split.layout import LayoutError

    by_family = {f: band_alignment(f) for f in FAMILIES}
    explicit = query.get("align", "")
    family = (query.get("family") or "").strip()
    checkpoint = (query.get("checkpoint") or "").strip()
    if explicit not in ("", None):
        align = _int(query, "align", 0, 1, 64)
        return {"align": align, "source": f"align={align}", "known": True, "by_family": by_family}
    if family:
        try:
            align = band_alignment(family)
        except LayoutError as e:
            raise BadRequest(str(e)) from None
        return {"align": align, "source": f"family {family}", "known": True, "by_family": by_family}
    if checkpoint:
        align = checkpoint_alignment(checkpoint)
        if align is not None:
            return {"align": align, "source": checkpoint, "known": True, "by_family": by_family}
    return {"align": by_family[DEFAULT_FAMILY], "source": f"{DEFAULT_FAMILY} rule (model unknown)", "known": False,
            "by_family": by_family}


def _float(query: Mapping[str, str], name: str) -> float | None:
    text = str(query.get(name, "")).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number; got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"{name} must be a finite number; got {text!r}")
    return value


def layout_for(query: Mapping[str, str]) -> dict:
    """The band split for a node's settings. Raises BadRequest for a malformed query and the pack's own
    input errors (ParallelInputError, LayoutError) for settings that give no layout."""
    from .parallel.runtime import submit
    from .parallel.split.layout import LayoutError, ParallelPlan, split_rows

    height = _int(query, "height", DEFAULT_SIZE, 8, MAX_SIZE)
    width = _int(query, "width", DEFAULT_SIZE, 8, MAX_SIZE)
    requested = _int(query, "devices", 0, 0, 64)
    alignment = alignment_for(query)
    align = alignment["align"]
    kind = query.get("device_kind") or "auto"
    mode = query.get("mode") or "exact"
    cfg_setting = query.get("cfg_parallel") or "auto"
    negative = str(query.get("negative", "1")).lower() not in ("0", "false", "no")
    cfg_scale = _float(query, "cfg")  # None: unknown (a guider fed by another node), decided as preflight does
    auto = mode in submit.AUTO_MODES  # decided at run time: the preview shows exact bands on every device
    if auto:
        mode = "exact"
    if mode not in submit.MODES:
        raise submit.ParallelInputError(f"mode must be one of {submit.NODE_MODES}; got {mode!r}.")
    devices = submit.resolve_devices(requested, kind, query.get("comfy_gpu") or "share", auto=auto)
    world = len(devices)
    # The same rules as submit.preflight: batch mode shares each call's batch out and splits no rows.
    batch_mode = mode == "batch"
    cfg = False if batch_mode else submit.resolve_cfg_parallel(cfg_setting, world, negative, cfg_scale)
    plan = ParallelPlan(world, cfg, batch_split=world if batch_mode else 0)
    weights = None if batch_mode else submit.band_weights(query.get("weights", ""), plan)
    rows = height // PIXELS_PER_LATENT_ROW
    split_bands = world > 1 and not batch_mode
    if split_bands:
        split = split_rows(rows, plan.bands_per_group, align, weights, pixel_scale=PIXELS_PER_LATENT_ROW)
    else:
        split = [(0, rows)]  # one device runs the whole image; batch mode splits no rows
    bands = []
    for b, (start, end) in enumerate(split):
        ranks = plan.peer_ranks(b) if split_bands else list(range(world))
        bands.append({"index": b, "ranks": ranks, "devices": [devices[r] for r in ranks],
                      "latent_rows": [start, end],
                      "pixel_rows": [start * PIXELS_PER_LATENT_ROW, end * PIXELS_PER_LATENT_ROW]})
    by_family = {}
    if split_bands and not alignment["known"]:  # what the other families' runs would use
        for family, other in alignment["by_family"].items():
            if other == align:
                continue
            try:
                by_family[family] = [list(r) for r in split_rows(rows, plan.bands_per_group, other, weights)]
            except LayoutError as e:
                by_family[family] = str(e)
    return {
        "ok": True, "height": height, "width": width, "latent_rows": rows,
        "latent_cols": width // PIXELS_PER_LATENT_ROW, "align": align, "align_source": alignment["source"],
        "model_known": alignment["known"], "align_by_family": alignment["by_family"],
        "bands_by_family": by_family, "pixel_scale": PIXELS_PER_LATENT_ROW,
        "devices_requested": requested, "devices": devices, "world_size": world, "mode": mode, "auto": auto,
        "cfg_parallel": plan.cfg_parallel, "batch_groups": plan.batch_groups, "bands_per_group": len(bands),
        "band_weights": weights, "bands": bands,
    }


def _json(data: Any, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status)


async def status_handler(request):
    return _json(monitor.snapshot())


async def align_handler(request):
    try:
        return _json({"ok": True, **alignment_for(request.rel_url.query)})
    except BadRequest as e:
        return _json({"ok": False, "error": str(e)}, status=400)


async def layout_handler(request):
    try:
        return _json(layout_for(request.rel_url.query))
    except BadRequest as e:
        return _json({"ok": False, "error": str(e)}, status=400)
    except ValueError as e:  # ParallelInputError / LayoutError: a valid question whose answer is "no layout"
        return _json({"ok": False, "error": str(e)})


def _stop_pool(free_weights: bool) -> None:
    from .parallel.runtime.pool import shutdown_pool

    shutdown_pool()  # a running job sees the stop within 0.1 s and fails with a clear message
    if free_weights:
        from .parallel.runtime import submit

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
    routes.get(PREFIX + "/align")(align_handler)
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


__all__ = ["PREFIX", "alignment_for", "layout_for", "add_routes", "register"]
