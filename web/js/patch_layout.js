// HiRes Parallel: the patch-layout overlay under our sampler nodes.
// Draws the row bands each device holds for the node's devices / device_kind / mode / cfg_parallel /
// device_weights and the latent size of the connected EmptyLatentImage-like node (else a default size).
// The split itself comes from the server (GET /hires_parallel/layout, computed with split_rows), so the
// overlay shows exactly what a run would use; answers are cached per setting, so redraws cost nothing.
// Bands align to the model's total downsampling (SD1.x 8 latent rows, SDXL 4), the rule a run uses
// (parallel/split/layout.py band_alignment): the overlay follows the sampler's model input up to its loader and
// sends the checkpoint name; the server reads the file's header. With no loader found the SD1.x rule is
// drawn and the text also gives the SDXL rows.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODES = new Set(["HiResParallelPatchParallelKSampler", "HiResParallelPatchParallelGuider"]);
const DEFAULT_SIZE = { width: 1024, height: 1024 };
const BOX_H = 64;
const GAP = 6;
const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];
const MAX_CACHE = 200;

const probe = (window.hiresParallel ??= {});
const overlays = (probe.overlays ??= {}); // node id -> what the last draw showed (tests read this)
const cache = new Map(); // query string -> {pending: true} | layout | {error}
let reported = false;

function widgetValue(node, name) {
  const w = node.widgets && node.widgets.find((x) => x.name === name);
  return w ? w.value : undefined;
}

// Width and height widgets (EmptyLatentImage and its kin); Reroutes are followed.
function sizeOf(node, seen = new Set()) {
  if (!node || seen.has(node.id)) return null;
  seen.add(node.id);
  const width = Number(widgetValue(node, "width"));
  const height = Number(widgetValue(node, "height"));
  if (Number.isFinite(width) && Number.isFinite(height) && width > 0 && height > 0) {
    return { width, height, source: node.title || node.type };
  }
  if (node.type === "Reroute") return sizeOf(node.getInputNode(0), seen);
  return null;
}

function latentSize(node) {
  let found = null;
  const slot = node.findInputSlot("latent_image");
  if (slot >= 0) {
    found = sizeOf(node.getInputNode(slot));
  } else {
    // The guider has no latent: take the one of the SamplerCustomAdvanced it feeds.
    for (const target of node.getOutputNodes(0) || []) {
      const s = target.findInputSlot("latent_image");
      found = s >= 0 ? sizeOf(target.getInputNode(s)) : null;
      if (found) break;
    }
  }
  return found || { ...DEFAULT_SIZE, source: null };
}

// The checkpoint (or UNet) file the node's model comes from: follow "model" inputs (LoRA loaders, model
// patches, Reroutes) up to a node with a ckpt_name / unet_name widget.
const MODEL_FILE_WIDGETS = ["ckpt_name", "unet_name"];
function modelFile(node, seen = new Set()) {
  if (!node || seen.has(node.id) || seen.size > 50) return null;
  seen.add(node.id);
  for (const name of MODEL_FILE_WIDGETS) {
    const value = widgetValue(node, name);
    if (typeof value === "string" && value) return value;
  }
  const slot = node.type === "Reroute" ? 0 : node.findInputSlot ? node.findInputSlot("model") : -1;
  return slot >= 0 ? modelFile(node.getInputNode(slot), seen) : null;
}

function queryFor(node, size) {
  const params = new URLSearchParams({
    height: String(size.height),
    width: String(size.width),
    devices: String(widgetValue(node, "devices") ?? 0),
    device_kind: String(widgetValue(node, "device_kind") ?? "auto"),
    mode: String(widgetValue(node, "mode") ?? "exact"),
    cfg_parallel: String(widgetValue(node, "cfg_parallel") ?? "auto"),
    weights: String(widgetValue(node, "device_weights") ?? ""),
    comfy_gpu: String(widgetValue(node, "comfy_gpu") ?? "share"),
  });
  const cfg = widgetValue(node, "cfg");  // at cfg 1 there is no negative pass: no CFG halves
  if (cfg !== undefined && cfg !== null) params.set("cfg", String(cfg));
  const slot = node.findInputSlot("model");
  const checkpoint = slot >= 0 ? modelFile(node.getInputNode(slot)) : null;
  if (checkpoint) params.set("checkpoint", checkpoint);
  return params.toString();
}

// "bands align to 4 rows (my_xl.safetensors)"; for an unknown model
// "bands align to 8 rows (sd15 rule (model unknown)); sdxl: 352/320/352 px".
function alignText(lay) {
  let text = `bands align to ${lay.align} rows (${lay.align_source})`;
  for (const [family, rows] of Object.entries(lay.bands_by_family || {})) {
    text += Array.isArray(rows) ? `; ${family}: ${rows.map(([s, e]) => (e - s) * lay.pixel_scale).join("/")} px`
      : `; ${family}: no layout`;
  }
  return text;
}

function fetchLayout(query) {
  if (cache.size > MAX_CACHE) cache.clear();
  cache.set(query, { pending: true });
  api.fetchApi(`/hires_parallel/layout?${query}`)
    .then((res) => res.json())
    .then((data) => cache.set(query, data.ok ? data : { error: data.error || "no layout" }))
    .catch((e) => cache.set(query, { error: `layout unavailable: ${e.message}` }))
    .finally(() => app.graph && app.graph.setDirtyCanvas(true, true));
}

function fit(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText(t + "...").width > width) t = t.slice(0, -1);
  return t + "...";
}

function wrap(ctx, text, width, maxLines) {
  const lines = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (line && ctx.measureText(next).width > width) {
      lines.push(line);
      line = word;
    } else {
      line = next;
    }
  }
  if (line) lines.push(line);
  if (lines.length <= maxLines) return lines;
  const kept = lines.slice(0, maxLines);
  kept[maxLines - 1] = fit(ctx, lines.slice(maxLines - 1).join(" "), width);
  return kept;
}

function drawLayout(node, ctx) {
  if (node.flags && node.flags.collapsed) return;
  const size = latentSize(node);
  const query = queryFor(node, size);
  if (!cache.has(query)) fetchLayout(query);
  const lay = cache.get(query);
  const w = node.size[0];
  const y0 = node.size[1] + GAP;

  ctx.save();
  ctx.fillStyle = "rgba(24, 24, 24, 0.88)";
  ctx.strokeStyle = "rgba(255, 255, 255, 0.15)";
  ctx.beginPath();
  ctx.roundRect(0, y0, w, BOX_H, 6);
  ctx.fill();
  ctx.stroke();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  const sizeText = `${size.width}x${size.height} px` + (size.source ? ` from ${size.source}` : " (default size: no latent size connected)");

  if (lay.pending) {
    ctx.fillStyle = "#bbb";
    ctx.fillText("Patch layout: ...", 8, y0 + 8);
  } else if (lay.error) {
    ctx.fillStyle = "#ff7070";
    wrap(ctx, "Patch layout: " + lay.error, w - 16, 3).forEach((t, i) => ctx.fillText(t, 8, y0 + 5 + 14 * i));
    ctx.fillStyle = "#bbb";
    ctx.fillText(fit(ctx, sizeText, w - 16), 8, y0 + 5 + 14 * 3);
  } else {
    // The image, to scale, cut into its row bands; each labelled with the ranks that hold it.
    const th = BOX_H - 12;
    const tw = Math.max(12, Math.min(110, (th * size.width) / size.height));
    const tx = 6;
    const ty = y0 + 6;
    const total = lay.latent_rows * lay.pixel_scale;
    for (const band of lay.bands) {
      const by = ty + (th * band.pixel_rows[0]) / total;
      const bh = (th * (band.pixel_rows[1] - band.pixel_rows[0])) / total;
      ctx.fillStyle = COLORS[band.index % COLORS.length];
      ctx.fillRect(tx, by, tw, bh);
      ctx.strokeStyle = "rgba(0, 0, 0, 0.6)";
      ctx.strokeRect(tx, by, tw, bh);
      if (bh >= 11) {
        ctx.fillStyle = "#fff";
        ctx.fillText(fit(ctx, "r" + band.ranks.join("+"), tw - 4), tx + 3, by + Math.max(0, bh / 2 - 6));
      }
    }
    const x = tx + tw + 8;
    const room = w - x - 6;
    const split = lay.auto ? `auto: the planner picks at run time (shown: exact on ${lay.world_size})`
      : lay.world_size === 1 ? "1 device: nothing is split"
      : lay.mode === "batch" ? `${lay.world_size} devices share each call's batch; no bands`
      : `${lay.world_size} devices, ${lay.bands_per_group} band(s)` +
        (lay.cfg_parallel ? `, CFG parallel (x${lay.batch_groups})` : "");
    const rows = lay.bands.map((b) => `r${b.ranks.join("+")} ${b.pixel_rows[0]}-${b.pixel_rows[1]}`).join("  ");
    ctx.fillStyle = "#ddd";
    ctx.fillText(fit(ctx, "Patch layout: " + split, room), x, y0 + 6);
    ctx.fillStyle = "#bbb";
    ctx.fillText(fit(ctx, sizeText + "; " + alignText(lay), room), x, y0 + 22);
    ctx.fillText(fit(ctx, "rows (px): " + rows, room), x, y0 + 38);
  }
  ctx.restore();

  const prev = overlays[node.id];
  overlays[node.id] = {
    draws: (prev ? prev.draws : 0) + 1,
    type: node.type,
    query,
    size,
    pending: !!lay.pending,
    error: lay.error || null,
    world_size: lay.world_size ?? null,
    mode: lay.mode ?? null,
    auto: lay.auto ?? false,
    cfg_parallel: lay.cfg_parallel ?? null,
    align: lay.align ?? null,
    align_source: lay.align_source ?? null,
    model_known: lay.model_known ?? null,
    bands_by_family: lay.bands_by_family ?? null,
    align_text: lay.bands ? alignText(lay) : null,
    bands: lay.bands ? lay.bands.map((b) => ({ ranks: b.ranks, latent_rows: b.latent_rows, pixel_rows: b.pixel_rows })) : null,
  };
}

app.registerExtension({
  name: "HiResParallel.PatchLayout",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const original = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const r = original ? original.call(this, ctx, ...rest) : undefined;
      try {
        drawLayout(this, ctx);
      } catch (e) {
        if (!reported) { // once: this runs every frame
          reported = true;
          console.error("[HiRes Parallel] patch-layout overlay failed:", e);
        }
      }
      return r;
    };
  },
});
