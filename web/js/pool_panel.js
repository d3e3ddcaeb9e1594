// HiRes Parallel: the worker-pool sidebar panel.
// Shows pool state, devices, the live step of a patch-parallel job (every rank runs each step together),
// per-rank step time and bytes per step of the last run, the last error with its hint, and Restart /
// Shut down buttons. Data: GET /hires_parallel/status, then the "hires_parallel.status" messages the server
// pushes as jobs progress (web_routes.py, parallel/runtime/monitor.py).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "hires_parallel.status";
const TAB_ID = "hires-parallel";
const TOOLTIP = "HiRes Parallel: worker pool";
const KEEP = 200; // history kept for the test probe

// A plain-data probe for tests and for debugging from the browser console.
const probe = (window.hiresParallel ??= {});
const state = (probe.panel = { registered: false, mounted: false, events: [], renders: [], snapshot: null });
let root = null; // the element the sidebar gave us while the tab is open
let busyAction = null;
let note = "";

function push(list, item) {
  list.push(item);
  if (list.length > KEEP) list.splice(0, list.length - KEEP);
}

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function bytes(n) {
  if (n == null) return "-";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

function secs(s) {
  if (s == null) return "-";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

function mean(xs) {
  return xs && xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
}

function poolState(pool) {
  if (!pool || !pool.exists) return ["off", "not started: the workers start on the first patch-parallel run"];
  if (pool.busy) return ["busy", "running a job"];
  if (pool.warm) return ["warm", "warm: workers ready, model cached"];
  return ["cold", "cold: the workers start on the next job"];
}

const STYLE = `
.hp-panel { padding: 10px 12px; font-size: 13px; color: var(--fg-color, #ddd); display: flex; flex-direction: column; gap: 10px; }
.hp-panel h3 { margin: 0; font-size: 15px; display: flex; align-items: center; gap: 8px; }
.hp-badge { font-size: 11px; padding: 1px 7px; border-radius: 9px; background: #555; color: #fff; }
.hp-badge[data-state="warm"] { background: #2e7d32; } .hp-badge[data-state="busy"] { background: #1565c0; }
.hp-badge[data-state="cold"] { background: #6d6d6d; } .hp-badge[data-state="off"] { background: #444; }
.hp-muted { color: var(--descrip-text, #999); font-size: 12px; }
.hp-section { border-top: 1px solid var(--border-color, #444); padding-top: 8px; display: flex; flex-direction: column; gap: 4px; }
.hp-section > b { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--descrip-text, #aaa); }
.hp-bar { height: 6px; background: var(--comfy-input-bg, #222); border-radius: 3px; overflow: hidden; }
.hp-bar > div { height: 100%; background: #42a5f5; }
.hp-scroll { overflow-x: auto; }
.hp-table { border-collapse: collapse; width: 100%; font-size: 11px; }
.hp-table th, .hp-table td { text-align: right; padding: 2px 3px; white-space: nowrap; border-bottom: 1px solid var(--border-color, #333); }
.hp-table th:first-child, .hp-table td:first-child { text-align: left; }
.hp-error pre { white-space: pre-wrap; max-height: 140px; overflow: auto; margin: 0; font-size: 11px; color: var(--error-text, #ff6b6b); }
.hp-buttons { display: flex; flex-wrap: wrap; gap: 6px; }
.hp-buttons button { flex: 1; white-space: nowrap; padding: 5px 6px; border-radius: 5px; border: 1px solid var(--border-color, #555);
  background: var(--comfy-input-bg, #2b2b2b); color: var(--fg-color, #ddd); cursor: pointer; }
.hp-buttons button:disabled { opacity: .5; cursor: default; }
`;

function ensureStyle() {
  if (document.getElementById("hp-panel-style")) return;
  document.head.append(h("style", { id: "hp-panel-style" }, STYLE));
}

function jobSection(job) {
  if (!job) return h("div", { class: "hp-section", "data-hp": "job", "data-step": "" }, h("b", {}, "Job"),
    h("span", { class: "hp-muted" }, "No patch-parallel job running."));
  const pct = job.total ? Math.round((100 * job.step) / job.total) : 0;
  return h("div", { class: "hp-section", "data-hp": "job", "data-step": `${job.step}/${job.total}` },
    h("b", {}, "Job"),
    h("span", {}, `Step ${job.step} / ${job.total} on ${job.world_size} device(s)` +
      (job.cfg_parallel ? ", CFG parallel" : "")),
    h("div", { class: "hp-bar" }, h("div", { style: `width:${pct}%` })),
    h("span", { class: "hp-muted" },
      `last step ${secs(job.step_s.at(-1))}, mean ${secs(mean(job.step_s))}, ` +
      `start-up and first step ${secs(job.startup_s)}. All ranks run each step together.`));
}

function ranksSection(snap) {
  const job = snap.job;
  const run = snap.last_run;
  let head;
  let rows;
  if (job) {
    head = ["rank", "step", "s/step"];
    const last = job.step_s.at(-1);
    rows = job.devices.map((d, r) => [{ text: `${r} ${d}`, rank: r }, `${job.step}/${job.total}`, secs(last)]);
  } else if (run && run.ranks && run.ranks.length) {
    head = ["rank", "s/step", "sent/step", "recv/step"];
    rows = run.ranks.map((r) => {
      const kinds = Object.entries(r.bytes_sent_per_step || {}).map(([k, v]) => `${k} ${bytes(v)}`).join(", ");
      return [{ text: `${r.rank} ${r.device}`, rank: r.rank, title: `${r.steps} steps` },
        { text: secs(r.mean_step_s), title: (r.step_s || []).map((x) => secs(x)).join(", ") },
        { text: bytes(r.total_sent_per_step), title: kinds || "nothing sent" }, bytes(r.total_received_per_step)];
    });
  } else {
    return h("div", { class: "hp-section", "data-hp": "ranks" }, h("b", {}, "Ranks"),
      h("span", { class: "hp-muted" }, "No run yet."));
  }
  const table = h("table", { class: "hp-table" },
    h("tr", {}, head.map((t) => h("th", {}, t))),
    rows.map((row) => h("tr", { "data-rank": row[0].rank },
      row.map((c) => (typeof c === "object" ? h("td", { title: c.title }, c.text) : h("td", {}, String(c)))))));
  const caption = job ? "Live (rank 0 reports; the ranks are in lock-step)." : "Last run: mean time and bytes per step.";
  return h("div", { class: "hp-section", "data-hp": "ranks" }, h("b", {}, "Ranks"), h("div", { class: "hp-scroll" }, table),
    h("span", { class: "hp-muted" }, caption));
}

function lastRunSection(run) {
  if (!run) return null;
  const when = run.finished ? new Date(run.finished * 1000).toLocaleTimeString() : "";
  const steps = run.ranks && run.ranks[0] ? run.ranks[0].steps : "?";
  const weights = run.band_weights ? `, band weights ${run.band_weights.join(":")}` : "";
  return h("div", { class: "hp-section", "data-hp": "last-run" }, h("b", {}, "Last run"),
    h("span", {}, `${run.world_size} device(s) (${(run.devices || []).join(", ")}), ${run.mode} mode` +
      `${run.cfg_parallel ? ", CFG parallel" : ""}${weights}: ${steps} steps in ${secs(run.seconds)}`),
    run.plan ? h("span", { "data-hp": "plan", title: (run.plan.ranked || []).join("\n") },
      h("b", {}, "Plan (auto): "), run.plan.reason) : null,
    run.trace ? h("span", { class: "hp-muted", "data-hp": "trace" }, "Trace per step: " + run.trace.map((t) =>
      `rank ${t.rank} compute ${secs(t.per_step.compute_s)}, waiting ${secs(t.per_step.wait_s)}, ` +
      `hidden ${secs(t.per_step.hidden_s)}`).join("; ")) : null,
    h("span", { class: "hp-muted" }, when ? `finished ${when}` : ""));
}

function errorSection(err, run) {
  if (!err) return null;
  const older = run && run.finished && run.finished > err.time;
  return h("div", { class: "hp-section hp-error", "data-hp": "error" },
    h("b", {}, older ? "Last error (before the last good run)" : "Last error"),
    h("span", {}, `${err.type} at ${new Date(err.time * 1000).toLocaleTimeString()}`),
    h("pre", {}, err.message),
    h("span", { "data-hp": "hint" }, h("b", {}, "Hint: "), err.hint));
}

function render() {
  const snap = state.snapshot;
  if (!root) return;
  ensureStyle();
  const pool = (snap && snap.pool) || {};
  const [word, text] = poolState(pool);
  const facts = pool.exists
    ? `${pool.world_size} worker(s): ${pool.devices.join(", ")}; backend ${pool.backend || "-"}, ` +
      `${pool.threads_per_worker} thread(s) each; started ${pool.starts}x, ${pool.jobs_run} job(s) run` +
      (pool.pids && pool.pids.length ? `; pids ${pool.pids.join(", ")}` : "")
    : "Devices are chosen by the sampler node (devices, device_kind).";
  const busy = busyAction !== null;
  const panel = h("div", { class: "hp-panel", "data-hp": "panel" },
    h("h3", {}, "Worker pool", h("span", { class: "hp-badge", "data-hp": "state", "data-state": word }, word)),
    h("span", { "data-hp": "state-text" }, text),
    h("span", { class: "hp-muted", "data-hp": "devices" }, facts),
    snap ? jobSection(snap.job) : h("span", { class: "hp-muted" }, "Loading..."),
    snap ? ranksSection(snap) : null,
    snap ? lastRunSection(snap.last_run) : null,
    snap ? errorSection(snap.last_error, snap.last_run) : null,
    h("div", { class: "hp-buttons" },
      h("button", { "data-hp": "restart", disabled: busy, title: "Stop the workers; they start again on the next job (a running job is stopped)", onclick: () => act("restart") },
        busyAction === "restart" ? "Restarting..." : "Restart"),
      h("button", { "data-hp": "shutdown", disabled: busy, title: "Stop the workers and free their memory", onclick: () => act("shutdown") },
        busyAction === "shutdown" ? "Shutting down..." : "Shut down"),
      h("button", { "data-hp": "refresh", disabled: busy, title: "Read the status again", onclick: () => refresh() }, "Refresh")),
    note ? h("span", { class: "hp-muted", "data-hp": "note" }, note) : null);
  root.replaceChildren(panel);
  push(state.renders, { state: word, step: snap && snap.job ? `${snap.job.step}/${snap.job.total}` : null, time: Date.now() });
}

function update(snap) {
  state.snapshot = snap;
  render();
}

async function refresh() {
  try {
    const res = await api.fetchApi("/hires_parallel/status");
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    note = "";
    update(await res.json());
  } catch (e) {
    note = `Status unavailable: ${e.message}`;
    render();
  }
}

async function act(action) {
  busyAction = action;
  render();
  try {
    const res = await api.fetchApi(`/hires_parallel/pool/${action}`, { method: "POST" });
    const data = await res.json();
    note = data.ok ? (action === "restart" ? "Workers stopped; they start again on the next job." : "Workers stopped.")
      : `${action} failed: ${data.error}`;
    busyAction = null;
    update(data);
  } catch (e) {
    busyAction = null;
    note = `${action} failed: ${e.message}`;
    render();
  }
}

// Registered at import: the server's messages are dropped (with a warning) for types nobody listens to.
api.addEventListener(EVENT, (e) => {
  const d = e.detail || {};
  push(state.events, { kind: d.kind, seq: d.seq, step: d.job ? `${d.job.step}/${d.job.total}` : null });
  update(d);
});

app.registerExtension({
  name: "HiResParallel.PoolPanel",
  setup() {
    const manager = app.extensionManager;
    if (!manager || typeof manager.registerSidebarTab !== "function") {
      console.info("[HiRes Parallel] this frontend has no sidebar tabs; the pool panel is not shown.");
      return;
    }
    manager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-server",
      title: "HiRes Parallel",
      tooltip: TOOLTIP,
      type: "custom",
      render: (el) => {
        root = el;
        state.mounted = true;
        render();
        refresh();
      },
      destroy: () => {
        root = null;
        state.mounted = false;
      },
    });
    state.registered = true;
  },
});
