"""ComfyUI workflows in the frontend's UI format ("version 0.4"): load, check, convert to API prompts.

The UI format is what a user saves from the ComfyUI frontend and what ``example_workflows/*.json``
hold. POST /prompt takes the API format instead ({node_id: {"class_type", "inputs"}}). The frontend
does that conversion in ``graphToPrompt`` (frontend 1.27, src/utils/executionUtil.ts and litegraph's
ExecutableNodeDTO); ``ui_to_api`` follows the same rules for the cases our workflows use:

* ``widgets_values`` (a list) holds one value per widget, in widget order: the node's widget inputs
  in ``input_order`` (required, then optional, then inputs missing from input_order), followed by
  widgets that frontend extensions append (the image "upload" button). Widget inputs that are also
  linked keep their slot in ``widgets_values``; the link wins. Socket-only inputs (MODEL, LATENT,
  ``forceInput``) have no slot. A control widget ("control_after_generate": fixed / increment /
  decrement / randomize) follows INT widgets marked ``control_after_generate`` (or named seed /
  noise_seed when unmarked) and marked COMBO widgets (those also get a "control_filter_list" value);
  such values never reach the prompt.
* ``widgets_values`` as a dict maps widget names to values.
* Reroute nodes are followed through; PrimitiveNode values replace the linked widget's value;
  Note / MarkdownNote are ignored; muted nodes (mode 2) are dropped together with every input linked
  to them; bypassed nodes (mode 4) pass an input of matching type through to their outputs.
* List values are wrapped as {"__value__": [...]} as the frontend does (lists mean links).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4

REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_TYPES = frozenset({REROUTE, PRIMITIVE, *NOTE_TYPES})

CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})

# Input types the frontend draws as widgets (ComfyWidgets in src/scripts/widgets.ts plus the custom
# widgets core extensions register). Any other type is a socket and has no widgets_values slot.
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
    "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA",
    "WEBCAM", "AUDIO_RECORD", "AUDIOUPLOAD", "AUDIO_UI", "LOAD_3D", "LOAD_3D_ANIMATION",
    "PREVIEW_3D", "PREVIEW_3D_ANIMATION",
})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
# Core nodes whose frontend extensions append widgets of their own (audio player / recorder, 3D
# viewer state, output-folder picker): their files may hold more widgets_values than the node has.
EXTENSION_WIDGET_NODES = frozenset({
    "LoadAudio", "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus", "RecordAudio",
    "Load3D", "Load3DAnimation", "Preview3D", "Preview3DAnimation", "SaveGLB", "LoadImageOutput",
})


# ----------------------------------------------------------------------------------------------
# loading


def load_workflow(path: str | Path) -> dict:
    """Read a UI-format workflow (.json)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "nodes" not in data:
        raise ValueError(f"{path}: not a ComfyUI UI workflow (no 'nodes')")
    return data


# ----------------------------------------------------------------------------------------------
# node definitions (object_info)


def _spec_type(spec: Any) -> Any:
    return spec[0] if isinstance(spec, (list, tuple)) and spec else spec


def _spec_opts(spec: Any) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def _is_combo(spec: Any) -> bool:
    t = _spec_type(spec)
    return isinstance(t, (list, tuple)) or t == "COMBO"


def _is_widget(spec: Any) -> bool:
    if _spec_opts(spec).get("forceInput"):
        return False
    t = _spec_type(spec)
    return _is_combo(spec) or (isinstance(t, str) and t in WIDGET_TYPES)


def _ordered_inputs(info: dict) -> list[tuple[str, Any]]:
    """(name, spec) of the node's required and optional inputs, in the frontend's order."""
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in list(order.get(section) or []) + list(specs):
            if name in specs and name not in seen:
                seen.add(name)
                out.append((name, specs[name]))
    return out


def _input_names(info: dict) -> set[str]:
    return {name for name, _ in _ordered_inputs(info)}


def _control_extras(name: str, spec: Any) -> int:
    """How many frontend-only values (control widgets) follow this widget in widgets_values."""
    opts = _spec_opts(spec)
    flag = opts.get("control_after_generate")
    if _is_combo(spec):
        return 2 if flag else 0  # control_after_generate + control_filter_list
    if _spec_type(spec) == "INT":
        if flag is None:
            flag = name in ("seed", "noise_seed")
        return 1 if flag else 0
    return 0  # FLOAT / STRING / BOOLEAN widgets never get a control widget


def widget_layout(info: dict) -> list[tuple[str | None, bool]]:
    """The node's widgets_values slots as (input name or None, optional?) pairs, in order.

    Value slots carry the input name; control slots (control_after_generate, control_filter_list)
    and extension widgets (upload button) carry None. ``optional`` marks slots that older frontends
    did not always write (control widgets, upload button), so a shorter list is still well-formed.
    """
    layout: list[tuple[str | None, bool]] = []
    upload = False
    for name, spec in _ordered_inputs(info):
        if not _is_widget(spec):
            continue
        layout.append((name, False))
        layout.extend([(None, True)] * _control_extras(name, spec))
        if _is_combo(spec) and any(_spec_opts(spec).get(k) for k in UPLOAD_FLAGS):
            upload = True
    if upload:
        layout.append((None, True))
    return layout


def _widget_default(spec: Any) -> Any:
    """The value a freshly created frontend widget has (used when widgets_values lacks it)."""
    opts = _spec_opts(spec)
    if "default" in opts:
        return opts["default"]
    t = _spec_type(spec)
    if isinstance(t, (list, tuple)):
        return t[0] if t else None
    if t == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else None
    return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(t)


def _is_control_value(v: Any) -> bool:
    # Current frontends write a mode string; very old ones wrote a boolean ("randomize" on/off).
    return (isinstance(v, str) and v in CONTROL_VALUES) or isinstance(v, bool)


def _map_list_values(values: list, widgets: list[tuple[str, Any]], upload: bool) -> dict[str, Any]:
    extras = [_control_extras(name, spec) for name, spec in widgets]
    expected = len(widgets) + sum(extras)
    # 1. The layout the current frontend writes (control slots where the spec puts them).
    if len(values) in (expected, expected + int(upload)):
        out: dict[str, Any] = {}
        i = 0
        exact = True
        for (name, _spec), n_extra in zip(widgets, extras):
            out[name] = values[i]
            if n_extra and not _is_control_value(values[i + 1]):
                exact = False
                break
            i += 1 + n_extra
        if exact:
            return out
    # 2. Files from other frontend versions: control slots where a control mode string sits.
    out = {}
    i = 0
    for k, (name, spec) in enumerate(widgets):
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        later = sum(1 + e for e in extras[k + 1:])
        int_or_combo = _is_combo(spec) or _spec_type(spec) == "INT"
        if (
            int_or_combo and i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES
            and (extras[k] or len(values) - i > later)
        ):
            i += 1
            # a combo's control_filter_list (free text) follows when values are left over
            if _is_combo(spec) and i < len(values) and len(values) - i > later:
                i += 1
    return out


def _map_widget_values(node: dict, info: dict) -> dict[str, Any]:
    """Widget input name -> value, from the node's widgets_values (list or dict), else the default."""
    values = node.get("widgets_values")
    ordered = _ordered_inputs(info)
    widgets = [(name, spec) for name, spec in ordered if _is_widget(spec)]
    if isinstance(values, dict):
        names = {name for name, _ in widgets}
        out = {k: v for k, v in values.items() if k in names}
    elif isinstance(values, list):
        upload = any(_is_combo(s) and any(_spec_opts(s).get(k) for k in UPLOAD_FLAGS) for _, s in widgets)
        out = _map_list_values(values, widgets, upload)
    elif values is None:
        out = {}
    else:
        raise ValueError(f"node {node.get('id')} ({node.get('type')}): widgets_values is a {type(values).__name__}")
    for name, spec in widgets:
        if name not in out:
            default = _widget_default(spec)
            if default is not None:
                out[name] = default
    return out


# ----------------------------------------------------------------------------------------------
# links


def _links_by_id(workflow: dict) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            rec = {
                "id": link["id"], "from": link["origin_id"], "from_slot": link["origin_slot"],
                "to": link["target_id"], "to_slot": link["target_slot"], "type": link.get("type"),
            }
        else:
            if len(link) < 5:
                raise ValueError(f"malformed link {link!r}: expected [id, from, from_slot, to, to_slot, type]")
            rec = {
                "id": link[0], "from": link[1], "from_slot": link[2], "to": link[3], "to_slot": link[4],
                "type": link[5] if len(link) > 5 else None,
            }
        out[rec["id"]] = rec
    return out


def _types_match(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection for type strings ("*" and "" match anything; "A,B" lists)."""
    if a in (None, "", "*", 0) or b in (None, "", "*", 0):
        return True
    a, b = str(a).upper(), str(b).upper()
    if a == b:
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


class _Resolver:
    def __init__(self, workflow: dict):
        self.nodes = {n["id"]: n for n in workflow["nodes"]}
        self.links = _links_by_id(workflow)

    def node(self, node_id: Any) -> dict:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise ValueError(f"link refers to missing node {node_id}") from None

    def link(self, link_id: Any) -> dict:
        try:
            return self.links[link_id]
        except KeyError:
            raise ValueError(f"node input refers to missing link {link_id}") from None

    def resolve_input(self, node: dict, slot: int, type_: Any, visited: set) -> tuple | None:
        """Where input ``slot`` of ``node`` really comes from.

        Returns ("node", id, slot), ("muted", id), ("primitive", value) or None (nothing connected).
        """
        key = (node["id"], "I", slot)
        if key in visited:
            raise ValueError(f"circular link through node {node['id']} ({node.get('type')})")
        visited.add(key)
        inputs = node.get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        link = self.link(inputs[slot]["link"])
        return self.resolve_output(self.node(link["from"]), link["from_slot"], type_, visited)

    def resolve_output(self, node: dict, slot: int, type_: Any, visited: set) -> tuple | None:
        key = (node["id"], "O", slot)
        if key in visited:
            raise ValueError(f"circular link through node {node['id']} ({node.get('type')})")
        visited.add(key)
        ntype = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if ntype in NOTE_TYPES:
            raise ValueError(f"a link comes out of note node {node['id']} ({ntype})")
        if ntype == PRIMITIVE:
            values = node.get("widgets_values")
            if not values:
                return None
            return ("primitive", values[0] if isinstance(values, list) else next(iter(values.values())))
        if mode == MODE_BYPASS:
            idx = self.bypass_slot(node, slot, type_)
            return None if idx < 0 else self.resolve_input(node, idx, type_, visited)
        if ntype == REROUTE:
            return self.resolve_input(node, 0, type_, visited)
        if mode == MODE_NEVER:
            return ("muted", node["id"])
        return ("node", node["id"], slot)

    @staticmethod
    def bypass_slot(node: dict, slot: int, type_: Any) -> int:
        """ExecutableNodeDTO#getBypassSlotIndex: the input a bypassed node passes to output ``slot``."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if type_ in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type) and _types_match(inputs[slot].get("type"), type_):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == type_:
                return i
        for i, inp in enumerate(inputs):
            if _types_match(inp.get("type"), out_type) and _types_match(inp.get("type"), type_):
                return i
        return -1


def _check_no_subgraphs(workflow: dict) -> None:
    subgraphs = ((workflow.get("definitions") or {}).get("subgraphs")) or []
    if not subgraphs:
        return
    ids = {sg.get("id") for sg in subgraphs}
    used = [n for n in workflow["nodes"] if n.get("type") in ids]
    if used:
        raise ValueError(
            "subgraphs are not supported by ui_to_api: nodes "
            + ", ".join(f"{n['id']}" for n in used)
            + " use subgraph definitions; unpack them in the frontend (Unpack Subgraph) first"
        )


def _wrap(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------
# conversion


def ui_to_api(workflow: dict, object_info: dict, replace_types: dict[str, str] | None = None) -> dict:
    """Convert a UI-format workflow into the API prompt that POST /prompt takes.

    ``replace_types`` swaps node classes ({"CheckpointLoaderSimple": "HiResTestCheckpointLoader"}):
    the node's widget values are read with the original class's layout (what the file was saved
    with), then the inputs the replacement does not have are dropped. Raises ValueError for node
    types missing from ``object_info``, used subgraphs, dangling links and bad replacements.
    """
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise ValueError("not a UI workflow: expected a dict with a 'nodes' list")
    replace_types = dict(replace_types or {})
    _check_no_subgraphs(workflow)
    res = _Resolver(workflow)

    real_nodes = [
        n for n in workflow["nodes"]
        if n.get("type") not in VIRTUAL_TYPES and n.get("mode", MODE_ALWAYS) not in (MODE_NEVER, MODE_BYPASS)
    ]
    # Every node type must be known, even for dropped (muted / bypassed) nodes' replacements.
    for n in workflow["nodes"]:
        t = n.get("type")
        if t in VIRTUAL_TYPES:
            continue
        target = replace_types.get(t, t)
        if target not in object_info:
            what = f"{t!r} (replaced by {target!r})" if target != t else repr(t)
            raise ValueError(
                f"node {n.get('id')} has type {what}, which the server does not know (not in object_info); "
                "is its custom node pack installed and did it import?"
            )

    prompt: dict[str, dict] = {}
    for node in real_nodes:
        orig_type = node["type"]
        class_type = replace_types.get(orig_type, orig_type)
        layout_info = object_info.get(orig_type) or object_info[class_type]
        inputs: dict[str, Any] = {}
        for name, value in _map_widget_values(node, layout_info).items():
            inputs[name] = _wrap(value)

        for slot, inp in enumerate(node.get("inputs") or []):
            if inp.get("link") is None:
                continue
            name = inp.get("name")
            widget = inp.get("widget") or {}
            if widget.get("name"):
                name = widget["name"]
            found = res.resolve_input(node, slot, inp.get("type"), set())
            if found is None:
                continue  # nothing behind the link: a widget keeps its own value
            kind = found[0]
            if kind == "primitive":
                inputs[name] = _wrap(found[1])
            elif kind == "muted":
                inputs.pop(name, None)  # frontend drops inputs linked to removed nodes
            else:
                inputs[name] = [str(found[1]), int(found[2])]

        if class_type != orig_type:
            keep = _input_names(object_info[class_type])
            inputs = {k: v for k, v in inputs.items() if k in keep}
        entry = {"class_type": class_type, "inputs": inputs}
        title = node.get("title")
        entry["_meta"] = {"title": title or (object_info.get(class_type) or {}).get("display_name") or class_type}
        prompt[str(node["id"])] = entry

    # Links into dropped nodes' outputs are gone; links out of replaced nodes must still fit.
    for nid, entry in prompt.items():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2:
                src = prompt.get(value[0])
                if src is None:
                    del entry["inputs"][name]
                    continue
                outs = object_info[src["class_type"]].get("output") or []
                if value[1] >= len(outs):
                    raise ValueError(
                        f"node {nid} input {name!r} is linked to output {value[1]} of node {value[0]} "
                        f"({src['class_type']}), which has only {len(outs)} outputs"
                    )
    for orig, new in replace_types.items():
        if orig in object_info and new in object_info:
            a = object_info[orig].get("output") or []
            b = object_info[new].get("output") or []
            used = {
                v[1] for e in prompt.values() for v in e["inputs"].values()
                if isinstance(v, list) and len(v) == 2 and prompt[v[0]]["class_type"] == new
            }
            for s in used:
                if s < len(a) and s < len(b) and not _types_match(a[s], b[s]):
                    raise ValueError(f"replacement {new!r} output {s} is {b[s]!r}, but {orig!r} gives {a[s]!r}")
    return prompt


# ----------------------------------------------------------------------------------------------
# validation


def workflow_problems(workflow: dict, object_info: dict | None = None) -> list[str]:
    """Everything that makes ``workflow`` not well-formed for the frontend (empty list when fine)."""
    p: list[str] = []
    if not isinstance(workflow, dict):
        return ["workflow is not a JSON object"]
    if "version" not in workflow:
        p.append("no 'version'")
    nodes = workflow.get("nodes")
    links = workflow.get("links")
    if not isinstance(nodes, list):
        return p + ["'nodes' is not a list"]
    if not isinstance(links, list):
        return p + ["'links' is not a list"]
    subgraph_ids = {sg.get("id") for sg in ((workflow.get("definitions") or {}).get("subgraphs") or [])}

    by_id: dict[Any, dict] = {}
    for i, n in enumerate(nodes):
        where = f"node #{i}"
        if not isinstance(n, dict):
            p.append(f"{where} is not an object")
            continue
        for key in ("id", "type", "pos", "size"):
            if key not in n:
                p.append(f"{where} (id {n.get('id')}) has no {key!r}")
        if "id" in n:
            if n["id"] in by_id:
                p.append(f"node id {n['id']} is used twice")
            by_id[n["id"]] = n
        for key in ("pos", "size"):
            v = n.get(key)
            if key in n and not (
                (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v))
                or (isinstance(v, dict) and {"0", "1"} <= set(v))
            ):
                p.append(f"node {n.get('id')} {key} is not [x, y]: {v!r}")
        mode = n.get("mode", 0)
        if mode not in (0, 1, 2, 3, 4):
            p.append(f"node {n.get('id')} has unknown mode {mode!r}")

    try:
        link_map = _links_by_id(workflow)
    except (ValueError, KeyError, TypeError) as e:
        return p + [f"links: {e}"]
    if len(link_map) != len(links):
        p.append("a link id is used twice")

    numeric_node_ids = [x for x in by_id if isinstance(x, int)]
    if numeric_node_ids:
        last = workflow.get("last_node_id", (workflow.get("state") or {}).get("lastNodeId"))
        if not isinstance(last, int) or last < max(numeric_node_ids):
            p.append(f"last_node_id {last!r} < largest node id {max(numeric_node_ids)}")
    if link_map:
        last = workflow.get("last_link_id", (workflow.get("state") or {}).get("lastLinkId"))
        if not isinstance(last, int) or last < max(link_map):
            p.append(f"last_link_id {last!r} < largest link id {max(link_map)}")

    for lid, l in link_map.items():
        src, dst = by_id.get(l["from"]), by_id.get(l["to"])
        if src is None:
            p.append(f"link {lid} comes from missing node {l['from']}")
        else:
            outs = src.get("outputs") or []
            if not (0 <= l["from_slot"] < len(outs)):
                p.append(f"link {lid} comes from output {l['from_slot']} of node {l['from']}, which has {len(outs)} outputs")
            elif lid not in (outs[l["from_slot"]].get("links") or []):
                p.append(f"link {lid} is not listed in node {l['from']} output {l['from_slot']} links")
        if dst is None:
            p.append(f"link {lid} goes to missing node {l['to']}")
        else:
            ins = dst.get("inputs") or []
            if not (0 <= l["to_slot"] < len(ins)):
                p.append(f"link {lid} goes to input {l['to_slot']} of node {l['to']}, which has {len(ins)} inputs")
            elif ins[l["to_slot"]].get("link") != lid:
                p.append(f"link {lid} goes to node {l['to']} input {l['to_slot']}, whose link is {ins[l['to_slot']].get('link')!r}")

    for nid, n in by_id.items():
        for s, inp in enumerate(n.get("inputs") or []):
            lid = inp.get("link")
            if lid is None:
                continue
            l = link_map.get(lid)
            if l is None:
                p.append(f"node {nid} input {s} ({inp.get('name')}) uses missing link {lid}")
            elif l["to"] != nid or l["to_slot"] != s:
                p.append(f"node {nid} input {s} uses link {lid}, which goes to node {l['to']} input {l['to_slot']}")
        for s, out in enumerate(n.get("outputs") or []):
            for lid in out.get("links") or []:
                l = link_map.get(lid)
                if l is None:
                    p.append(f"node {nid} output {s} lists missing link {lid}")
                elif l["from"] != nid or l["from_slot"] != s:
                    p.append(f"node {nid} output {s} lists link {lid}, which comes from node {l['from']} output {l['from_slot']}")

    if object_info is not None:
        for nid, n in by_id.items():
            t = n.get("type")
            if t in VIRTUAL_TYPES or t in subgraph_ids:
                continue
            info = object_info.get(t)
            if info is None:
                p.append(f"node {nid}: type {t!r} is not in object_info")
                continue
            known = _input_names(info)
            for inp in n.get("inputs") or []:
                name = (inp.get("widget") or {}).get("name") or inp.get("name")
                if name not in known:
                    p.append(f"node {nid} ({t}): input {name!r} is not an input of {t}")
            outs = info.get("output") or []
            for s, out in enumerate(n.get("outputs") or []):
                if s >= len(outs):
                    p.append(f"node {nid} ({t}): output slot {s} does not exist ({len(outs)} outputs)")
                elif not _types_match(out.get("type"), outs[s]):
                    p.append(f"node {nid} ({t}): output {s} has type {out.get('type')!r}, {t} gives {outs[s]!r}")
            values = n.get("widgets_values")
            if isinstance(values, list):
                layout = widget_layout(info)
                need = sum(1 for _, opt in layout if not opt)
                if len(values) < need:
                    p.append(f"node {nid} ({t}): {len(values)} widgets_values, {t} has {need} widgets")
                elif len(values) > len(layout) and t not in EXTENSION_WIDGET_NODES:
                    p.append(f"node {nid} ({t}): {len(values)} widgets_values, more than the {len(layout)} widget slots of {t}")
    return p


def validate_ui_workflow(workflow: dict, object_info: dict | None = None) -> None:
    """Raise ValueError listing every problem when ``workflow`` is not well-formed for the frontend.

    Checks: version present; each node has id, type, pos, size; node and link ids unique;
    last_node_id / last_link_id >= the largest ids; every link's ends exist and agree with the
    nodes' inputs[].link and outputs[].links (both directions). With ``object_info``: node types
    exist, input names and output types agree with the node definitions, and widgets_values has as
    many values as the node has widgets.
    """
    problems = workflow_problems(workflow, object_info)
    if problems:
        raise ValueError("workflow is not well-formed:\n  " + "\n  ".join(problems))
