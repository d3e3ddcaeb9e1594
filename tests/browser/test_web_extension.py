"""Our web extension in a real headless Chromium against a real ComfyUI server with the frontend package:
it loads without errors, the sidebar panel shows the pool and follows a job step by step, errors come with
a hint, the buttons stop the workers, the patch-layout overlay draws the band split split_rows computes, and
our templates are in the template browser and load into the graph.

The tests share one page and run in file order (a job first warms the pool that Restart then stops).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from hires_parallel.parallel.split.layout import split_rows
from support.browser import PACK_FOLDER, REPO_ROOT, is_ours, save_screenshot

TAB = 'button.side-bar-button[aria-label="HiRes Parallel: worker pool"]'
JOB_TIMEOUT_S = 300
WAIT_MS = 60_000
TEMPLATES = sorted(p.stem for p in (REPO_ROOT / "example_workflows").glob("*.json"))


def sampler_prompt(steps: int = 4, devices: int = 2, cfg_parallel: str = "off", height: int = 128,
                   mode: str = "exact") -> dict:
    """Test model -> Patch-Parallel KSampler on `devices` CPU worker processes -> SaveLatent."""
    return {
        "1": {"class_type": "HiResTestCheckpointLoader", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle on a hill", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": height, "batch_size": 1}},
        "5": {"class_type": "HiResParallelPatchParallelKSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0, "devices": devices, "device_kind": "cpu", "mode": mode,
            "cfg_parallel": cfg_parallel, "device_weights": ""}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "browser/job"}},
    }


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def open_panel(page):
    close_dialogs(page)
    if not page.evaluate("window.hiresParallel.panel.mounted"):
        page.click(TAB)
    page.wait_for_function("window.hiresParallel.panel.mounted", timeout=WAIT_MS)
    return page.wait_for_selector('[data-hp="panel"]', timeout=WAIT_MS)


def panel_state(page) -> str:
    return page.get_attribute('[data-hp="state"]', "data-state")


def test_page_loads_with_our_extension_and_no_errors_from_it(page, console, browser_server):
    names = page.evaluate("window.comfyAPI.app.app.extensions.map((e) => e.name)")
    assert {"HiResParallel.PoolPanel", "HiResParallel.PatchLayout"} <= set(names), names
    served = json.loads(browser_server.get("/extensions").text)
    assert {f"/extensions/{PACK_FOLDER}/js/pool_panel.js", f"/extensions/{PACK_FOLDER}/js/patch_layout.js"} <= set(served)
    ours = [m for m in console if is_ours(m) and m["type"] in ("error", "pageerror", "warning")]
    assert not ours, ours
    others = [m for m in console if m["type"] in ("error", "pageerror")]
    print(f"{len(others)} console errors not from our extension (the frontend offline): {others}")


def test_our_templates_are_in_the_template_browser_and_load_into_the_graph(page, responses, artifacts):
    listed = page.evaluate("window.comfyAPI.api.api.fetchApi('/workflow_templates').then((r) => r.json())")
    assert sorted(listed.get(PACK_FOLDER, [])) == TEMPLATES

    # The template browser, as a user opens it: our folder under Custom Nodes, a card with a thumbnail each.
    if not page.locator(".p-dialog").count():
        page.evaluate("window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.locator(".p-dialog li", has_text=PACK_FOLDER).click()
    for name in TEMPLATES:
        page.locator(".p-dialog", has_text=name).wait_for(timeout=WAIT_MS)
    # The frontend fetches each thumbnail (same name as the workflow) once its card scrolls into view, and
    # shows it from a blob.
    for name in TEMPLATES:
        page.locator(f'.p-dialog [data-testid="template-workflow-{name}"]').scroll_into_view_if_needed()
        page.wait_for_function(
            f"""(() => {{ const i = document.querySelector('.p-dialog img[alt="{name}"]');
                  return i !== null && i.complete && i.naturalWidth >= 256; }})()""",
            timeout=WAIT_MS)
    thumbs = {u.rsplit("/", 1)[-1] for u, status in responses if f"/{PACK_FOLDER}/" in u and u.endswith(".jpg")
              and status == 200}
    assert thumbs == {f"{n}.jpg" for n in TEMPLATES}, responses
    save_screenshot(page, artifacts, "template_browser")
    page.locator(".p-dialog").get_by_text("patch_parallel_ksampler", exact=True).click()
    page.wait_for_function(
        "window.comfyAPI.app.app.graph.nodes.some((n) => n.type === 'HiResParallelPatchParallelKSampler')",
        timeout=WAIT_MS)
    close_dialogs(page)

    # And through the frontend's API, as an extension or script would.
    types = page.evaluate(f"""async () => {{
        const app = window.comfyAPI.app.app;
        const res = await window.comfyAPI.api.api.fetchApi('/workflow_templates/{PACK_FOLDER}/relay_upscale_2x.json');
        await app.loadGraphData(await res.json());
        return app.graph.nodes.map((n) => n.type);
    }}""")
    assert "HiResParallelRelayUpscaleSampler" in types and "HiResParallelPatchParallelKSampler" not in types, types


def test_sidebar_panel_opens_and_shows_the_pool_state(page, artifacts):
    open_panel(page)
    page.wait_for_function("window.hiresParallel.panel.snapshot !== null", timeout=WAIT_MS)
    assert panel_state(page) == "off"  # nothing has run on this server yet
    assert "not started" in page.inner_text('[data-hp="state-text"]')
    assert "No patch-parallel job running" in page.inner_text('[data-hp="job"]')
    assert page.is_enabled('[data-hp="restart"]') and page.is_enabled('[data-hp="shutdown"]')
    # a locator, not the handle open_panel returned: the panel re-renders on every status push
    save_screenshot(page.locator('[data-hp="panel"]'), artifacts, "sidebar_idle")


def test_panel_follows_a_job_step_by_step(page, browser_server, artifacts, test_pack):
    open_panel(page)
    before = page.evaluate("window.hiresParallel.panel.events.length")
    prompt_id = browser_server.queue(sampler_prompt(steps=4, devices=2, cfg_parallel="off"))
    browser_server.wait(prompt_id, timeout=JOB_TIMEOUT_S)
    page.wait_for_function(
        f"window.hiresParallel.panel.events.slice({before}).some((e) => e.kind === 'done')", timeout=WAIT_MS)

    events = page.evaluate(f"window.hiresParallel.panel.events.slice({before})")
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    assert [e["step"] for e in events if e["kind"] == "progress"] == ["1/4", "2/4", "3/4", "4/4"], events
    # Each pushed step was rendered while the job ran: the panel said "busy" with that step.
    renders = page.evaluate("window.hiresParallel.panel.renders")
    shown = {r["step"] for r in renders if r["state"] == "busy"}
    assert {"1/4", "2/4", "3/4", "4/4"} <= shown, renders[-12:]

    # After the run: a warm pool of two CPU workers, and per-rank timing and bytes of the run.
    assert panel_state(page) == "warm"
    assert "cpu, cpu" in page.inner_text('[data-hp="devices"]')
    rows = page.query_selector_all('[data-hp="ranks"] tr[data-rank]')
    assert len(rows) == 2
    for row in rows:
        cells = [c.inner_text() for c in row.query_selector_all("td")]
        rank, s_per_step, sent, received = cells
        assert rank.endswith(" cpu"), cells
        assert s_per_step != "-" and sent not in ("-", "0 B") and received not in ("-", "0 B"), cells
    assert "2 device(s) (cpu, cpu), exact mode: 4 steps" in page.inner_text('[data-hp="last-run"]')
    status = browser_server.get("/hires_parallel/status").json()
    assert status["pool"]["warm"] and status["last_run"]["ranks"][1]["total_sent_per_step"] > 0

    panel = page.locator('[data-hp="panel"]').locator("xpath=..")
    path = save_screenshot(panel, artifacts, "sidebar_after_job")
    if os.environ.get("HIRES_UPDATE_DOCS_IMAGES"):
        target = REPO_ROOT / "docs" / "images" / "sidebar.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        print(f"updated {target}")


def test_panel_shows_the_plan_of_an_auto_run(page, browser_server, test_pack):
    open_panel(page)
    prompt_id = browser_server.queue(sampler_prompt(steps=2, devices=2, cfg_parallel="auto", mode="auto"))
    browser_server.wait(prompt_id, timeout=JOB_TIMEOUT_S)
    page.wait_for_selector('[data-hp="plan"]', timeout=WAIT_MS)
    text = page.inner_text('[data-hp="plan"]')  # looked up again: every status push re-renders the panel
    plan = browser_server.get("/hires_parallel/status").json()["last_run"]["plan"]
    assert text.startswith("Plan (auto):") and plan["reason"][:40] in text, (text, plan)


def test_a_failed_run_shows_its_error_and_hint(page, browser_server, test_pack):
    from support.server import PromptFailed

    open_panel(page)
    # 3 devices cannot be halved for CFG parallel: refused before any work, with a message saying so.
    prompt_id = browser_server.queue(sampler_prompt(steps=2, devices=3, cfg_parallel="on"))
    with pytest.raises(PromptFailed):
        browser_server.wait(prompt_id, timeout=JOB_TIMEOUT_S)
    page.wait_for_selector('[data-hp="error"]', timeout=WAIT_MS)
    text = page.inner_text('[data-hp="error"]')  # looked up again: every status push re-renders the panel
    assert "ParallelInputError" in text and "cannot be halved" in text, text
    assert "Nothing ran" in page.inner_text('[data-hp="hint"]')
    assert panel_state(page) == "warm"  # a refused job leaves the pool as it was


def test_restart_and_shutdown_buttons_stop_the_workers(page, browser_server, artifacts):
    import psutil

    open_panel(page)
    pids = browser_server.get("/hires_parallel/status").json()["pool"]["pids"]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    page.click('[data-hp="restart"]')
    page.wait_for_selector('[data-hp="note"]:has-text("start again on the next job")', timeout=WAIT_MS)
    assert panel_state(page) == "off"
    gone = [p for p in pids if not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE]
    assert gone == pids, f"workers still running after Restart: {set(pids) - set(gone)}"
    assert browser_server.get("/hires_parallel/status").json()["pool"]["exists"] is False

    page.click('[data-hp="shutdown"]')
    page.wait_for_selector('[data-hp="note"]:has-text("Workers stopped.")', timeout=WAIT_MS)
    assert panel_state(page) == "off"
    save_screenshot(page.locator('[data-hp="panel"]'), artifacts, "sidebar_after_shutdown")


OVERLAY_JS = """({node, values}) => {
    const app = window.comfyAPI.app.app;
    const n = app.graph.getNodeById(node);
    for (const [name, value] of Object.entries(values)) {
        const w = n.widgets.find((x) => x.name === name);
        w.value = value;
        if (w.callback) w.callback(value);
    }
    app.graph.setDirtyCanvas(true, true);
}"""


def _set_widgets(page, node: int, **values) -> None:
    page.evaluate(OVERLAY_JS, {"node": node, "values": values})


def _overlay(page, node: int, query_part: str) -> dict:
    page.wait_for_function(
        """([id, part]) => { const o = window.hiresParallel.overlays[id];
              return o && o.query.includes(part) && !o.pending; }""",
        arg=[node, query_part], timeout=WAIT_MS)
    return page.evaluate("(id) => window.hiresParallel.overlays[id]", node)


def test_overlay_draws_the_band_split_of_a_sampler_node(page, browser_server, artifacts):
    close_dialogs(page)
    ids = page.evaluate(f"""async () => {{
        const app = window.comfyAPI.app.app;
        const res = await window.comfyAPI.api.api.fetchApi('/workflow_templates/{PACK_FOLDER}/patch_parallel_ksampler.json');
        await app.loadGraphData(await res.json());
        const ks = app.graph.nodes.find((n) => n.type === 'HiResParallelPatchParallelKSampler');
        const empty = app.graph.nodes.find((n) => n.type === 'EmptyLatentImage');
        app.canvas.ds.scale = 1;
        app.canvas.centerOnNode(ks);
        app.canvas.ds.offset[1] -= 60;  // room for the overlay under the node
        app.graph.setDirtyCanvas(true, true);
        return [ks.id, empty.id];
    }}""")
    ks, empty = ids
    _set_widgets(page, empty, width=768, height=1024)
    _set_widgets(page, ks, devices=2, device_kind="cpu", cfg_parallel="off", device_weights="2,1")
    got = _overlay(page, ks, "weights=2%2C1")
    want = split_rows(1024 // 8, 2, 8, [2.0, 1.0])
    assert got["error"] is None and got["world_size"] == 2 and got["cfg_parallel"] is False, got
    assert [tuple(b["latent_rows"]) for b in got["bands"]] == want
    assert [b["pixel_rows"] for b in got["bands"]] == [[s * 8, e * 8] for s, e in want]
    assert got["size"] == {"width": 768, "height": 1024, "source": "Empty Latent Image"}, got["size"]

    # The first band's colour is on the canvas where the overlay draws it (under the node, left edge).
    page.wait_for_timeout(300)
    pixel = page.evaluate("""(id) => {
        const app = window.comfyAPI.app.app;
        const n = app.graph.getNodeById(id);
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + 9, n.pos[1] + n.size[1] + 16]);
        const dpr = window.devicePixelRatio || 1;
        return Array.from(app.canvas.canvas.getContext('2d').getImageData(x * dpr, y * dpr, 1, 1).data);
    }""", ks)
    assert all(abs(a - b) <= 12 for a, b in zip(pixel[:3], (0x4E, 0x79, 0xA7))), pixel
    save_screenshot(page, artifacts, "overlay_two_bands")

    # It follows the widgets: a new size, CFG parallel on 4 devices (2 bands x cond/uncond), batch mode.
    _set_widgets(page, empty, height=512)
    got = _overlay(page, ks, "height=512")
    assert [tuple(b["latent_rows"]) for b in got["bands"]] == split_rows(512 // 8, 2, 8, [2.0, 1.0])
    _set_widgets(page, ks, devices=4, cfg_parallel="on", device_weights="")
    got = _overlay(page, ks, "devices=4")
    assert got["cfg_parallel"] is True and [b["ranks"] for b in got["bands"]] == [[0, 2], [1, 3]], got
    assert [tuple(b["latent_rows"]) for b in got["bands"]] == split_rows(512 // 8, 2, 8)
    _set_widgets(page, ks, mode="batch")
    got = _overlay(page, ks, "mode=batch")
    assert got["mode"] == "batch" and [b["ranks"] for b in got["bands"]] == [[0, 1, 2, 3]], got
    # Settings that give no layout show the reason instead of bands.
    _set_widgets(page, ks, devices=3, mode="exact")
    got = _overlay(page, ks, "devices=3")
    assert got["bands"] is None and "cannot be halved" in got["error"], got
    save_screenshot(page, artifacts, "overlay_error")


def test_no_console_errors_from_our_extension_during_the_session(console):
    ours = [m for m in console if is_ours(m) and m["type"] in ("error", "pageerror", "warning")]
    assert not ours, ours
