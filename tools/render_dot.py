"""`--format dot`: the collapsed graph as Graphviz DOT, expanded modules as nested clusters."""

from __future__ import annotations

from .hierarchy import ROOT
from .style import (
    CATEGORY_FILL,
    DIFF_COLORS,
    adapter_colors,
    adapter_key,
    adapter_keys,
    category,
    frame_header,
    group_subtitle,
    node_title,
    shape_text,
)
from .view import StageView, summary, visible


def render_dot(view: StageView, expanded: set[str], title: str) -> str:
    items, edges = visible(view, expanded)
    hierarchy = view.hierarchy
    colors = adapter_colors(key for r in view.records.values() for key in adapter_keys(r))
    children: dict[str, list[str]] = {}
    for item in items:
        children.setdefault(hierarchy.parent.get(item, ROOT), []).append(item)
    lines = [
        "digraph fxadapt {",
        f"  label={_q(title)}; labelloc=t; rankdir=TB; compound=true; fontname=\"Helvetica\";",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#94a3b8", arrowsize=0.6];',
    ]

    def emit(gid: str, indent: str) -> None:
        for item in children.get(gid, []):
            if item in children:  # an expanded module: a cluster holding its children
                group = hierarchy.groups[item]
                label = frame_header(group.label, group.type)
                lines.append(f"{indent}subgraph {_q('cluster_' + item)} {{")
                lines.append(f"{indent}  label={_q(label)}; style=\"rounded,filled\"; fillcolor=\"#f8fafc\"; "
                             "color=\"#cbd5e1\";")
                emit(item, indent + "  ")
                lines.append(f"{indent}}}")
            elif item.startswith("n:"):
                lines.append(f"{indent}{_q(item)} [{_node_attrs(view, item[2:], colors)}];")
            else:
                lines.append(f"{indent}{_q(item)} [{_group_attrs(view, item, colors)}];")

    emit(ROOT, "  ")
    for a, b, kind in edges:
        if a in children or b in children:
            continue  # an edge into an open cluster is drawn to its members instead
        attrs = f' [color="{DIFF_COLORS[kind]}", penwidth=1.6{", style=dashed" if kind == "removed" else ""}]' \
            if kind else ""
        lines.append(f"  {_q(a)} -> {_q(b)}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_attrs(view: StageView, uid: str, colors: dict[str, str]) -> str:
    record = view.records[uid]
    origin = record.get("origin")
    status = view.status.get(uid, "")
    fill = colors[adapter_key(origin)] if origin else CATEGORY_FILL[category(record)]
    label = f"{node_title(record)}\\n{record['name']}"
    attrs = [f"label={_q(label, raw=True)}", f'fillcolor="{fill}"',
             f"tooltip={_q(record['target'] + ' ' + shape_text(record))}"]
    if origin:
        attrs.append('fontcolor="white"')
    if status:
        attrs += [f'color="{DIFF_COLORS[status]}"', "penwidth=2.5"]
        if status == "removed":
            attrs.append('style="rounded,filled,dashed"')
    return ", ".join(attrs)


def _group_attrs(view: StageView, gid: str, colors: dict[str, str]) -> str:
    group = view.hierarchy.groups[gid]
    info = summary(view, gid)
    extra = [key.split("/")[0] for key in sorted(info["adapters"])]
    marks = {"inserted": "+", "removed": "-", "merged": "merged "}
    extra += [f"{marks[k]}{n}" for k, n in sorted(info["changes"].items()) if k in marks]
    label = f"{group.label}\\n{group_subtitle(group.type, info['nodes']['all'])}"
    if extra:
        label += f"\\n[{' '.join(extra)}]"
    color = next((colors[k] for k in sorted(info["adapters"])), "#475569")
    return f'label={_q(label, raw=True)}, fillcolor="#f1f5f9", color="{color}", penwidth=1.5, shape=box3d'


def _q(text: str, raw: bool = False) -> str:
    """A DOT double-quoted string; `raw` keeps `\\n` line breaks already in the text."""
    body = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + (body.replace("\\\\n", "\\n") if raw else body) + '"'
