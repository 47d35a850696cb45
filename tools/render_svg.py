"""A static SVG of the collapsed graph, drawn from our own layout (no Graphviz needed)."""

from __future__ import annotations

from xml.sax.saxutils import escape

from .hierarchy import Hierarchy
from .layout import SIZES, Box, layout
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

_FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif"
_LEGEND_H = 34
_MARGIN = 16


def render_svg(view: StageView, expanded: set[str], title: str) -> str:
    """The view at this expansion, with a title and a legend of adapter and diff colours."""
    items, edges = visible(view, expanded)
    boxes = layout(view, expanded)
    colors = adapter_colors(key for r in view.records.values() for key in adapter_keys(r))
    width = max(b.x + b.w for b in boxes.values()) + 2 * _MARGIN
    height = max(b.y + b.h for b in boxes.values()) + 2 * _MARGIN + _LEGEND_H
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="{-_MARGIN} {-_MARGIN - _LEGEND_H} {width:.0f} {height:.0f}" style="{_FONT}">',
        '<defs>' + "".join(_marker(name, color) for name, color in
                           [("plain", "#64748b")] + list(DIFF_COLORS.items())) + '</defs>',
        f'<rect x="{-_MARGIN}" y="{-_MARGIN - _LEGEND_H}" width="{width:.0f}" height="{height:.0f}" fill="#fff"/>',
        _legend(title, colors, view.base is not None),
    ]
    hierarchy = view.hierarchy
    frames = sorted((i for i in boxes if boxes[i].kind == "frame"), key=lambda i: len(hierarchy.ancestors(i)))
    out += [_frame(hierarchy, gid, boxes[gid], view, colors) for gid in frames]
    out += [_edge(boxes[a], boxes[b], kind) for a, b, kind in edges if a in boxes and b in boxes]
    for item in items:
        box = boxes.get(item)
        if box is None or box.kind == "frame":
            continue
        if item.startswith("n:"):
            out.append(_node(view, item[2:], box, colors))
        else:
            out.append(_group(hierarchy, item, box, view, colors))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _marker(name: str, color: str) -> str:
    return (f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>')


def _legend(title: str, colors: dict[str, str], diffing: bool) -> str:
    parts = [f'<text x="0" y="{-_LEGEND_H + 12}" font-size="13" font-weight="600" fill="#0f172a">'
             f'{escape(title)}</text>']
    x = 0.0
    chips = [(key, color) for key, color in colors.items()]
    if diffing:
        chips += [(name, color) for name, color in DIFF_COLORS.items() if name != "rewired"]
    for label, color in chips:
        parts.append(f'<rect x="{x}" y="{-_LEGEND_H + 18}" width="12" height="12" rx="3" fill="{color}"/>'
                     f'<text x="{x + 16}" y="{-_LEGEND_H + 28}" font-size="11" fill="#334155">{escape(label)}</text>')
        x += 28 + 7 * len(label)
    return "".join(parts)


def _edge(a: Box, b: Box, kind: str) -> str:
    x1, y1 = a.x + a.w / 2, a.y + a.h
    x2, y2 = b.x + b.w / 2, b.y
    bend = max(abs(y2 - y1) / 2, 20)
    color = DIFF_COLORS.get(kind, "#94a3b8")
    dash = ' stroke-dasharray="5 4"' if kind == "removed" else ""
    return (f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}" '
            f'fill="none" stroke="{color}" stroke-width="{1.6 if kind else 1.1}"{dash} '
            f'marker-end="url(#arrow-{kind or "plain"})"/>')


def _node(view: StageView, uid: str, box: Box, colors: dict[str, str]) -> str:
    record = view.records[uid]
    origin = record.get("origin")
    status = view.status.get(uid, "")
    fill = colors[adapter_key(origin)] if origin else CATEGORY_FILL[category(record)]
    ink = "#fff" if origin else "#0f172a"
    stroke = DIFF_COLORS.get(status, "#94a3b8")
    width = 2.5 if status else 1
    dash = ' stroke-dasharray="5 3" opacity="0.55"' if status == "removed" else ""
    tip = escape(f"{record['name']} {record['target']} {shape_text(record)}")
    # A node with adapters merged into its weights carries a bar per adapter, in the adapter's colour.
    bars = "".join(f'<rect x="{box.x + 3 + 6 * i}" y="{box.y + 4}" width="4" height="{box.h - 8}" rx="2" '
                   f'fill="{colors[adapter_key(m)]}"/>' for i, m in enumerate(record.get("merged") or []))
    return (f'<g><title>{tip}</title><rect x="{box.x}" y="{box.y}" width="{box.w}" height="{box.h}" rx="6" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"{dash}/>{bars}'
            f'<text x="{box.x + box.w / 2}" y="{box.y + 17}" font-size="12" font-weight="600" fill="{ink}" '
            f'text-anchor="middle">{escape(_fit(node_title(record), 22))}</text>'
            f'<text x="{box.x + box.w / 2}" y="{box.y + 31}" font-size="10" fill="{ink}" opacity="0.75" '
            f'text-anchor="middle">{escape(_fit(record["name"], 26))}</text></g>')


def _group(hierarchy: Hierarchy, gid: str, box: Box, view: StageView, colors: dict[str, str]) -> str:
    group = hierarchy.groups[gid]
    info = summary(view, gid)
    return (f'<g><title>{escape(group.path or "model")} ({escape(group.type)})</title>'
            f'<rect x="{box.x}" y="{box.y}" width="{box.w}" height="{box.h}" rx="8" fill="#f8fafc" '
            f'stroke="#475569" stroke-width="1.2"/>'
            f'<text x="{box.x + 10}" y="{box.y + 18}" font-size="12" font-weight="600" fill="#0f172a">'
            f'{escape(_fit(group.label, 26))}</text>'
            f'<text x="{box.x + 10}" y="{box.y + 32}" font-size="10" fill="#64748b">'
            f'{escape(_fit(group_subtitle(group.type, info["nodes"]["all"]), 30))}</text>'
            + _chips(info, colors, box.x + 10, box.y + box.h - 16)[0] + "</g>")


def _frame(hierarchy: Hierarchy, gid: str, box: Box, view: StageView, colors: dict[str, str]) -> str:
    group = hierarchy.groups[gid]
    shade = ["#ffffff", "#f8fafc", "#f1f5f9", "#eef2f7"][group.depth % 4]
    chips, chips_w = _chips(summary(view, gid), colors, box.x + box.w - 10, box.y + 7, anchor_right=True)
    room = max(8, int((box.w - chips_w - 30) / 6.5))  # header text gets what the chips leave
    return (f'<g><rect x="{box.x}" y="{box.y}" width="{box.w}" height="{box.h}" rx="10" fill="{shade}" '
            f'stroke="#cbd5e1"/><text x="{box.x + 10}" y="{box.y + 17}" font-size="11" font-weight="600" '
            f'fill="#334155">{escape(_fit(frame_header(group.label, group.type), room))}</text>{chips}</g>')


def _chips(info: dict, colors: dict[str, str], x: float, y: float, anchor_right: bool = False) -> tuple[str, float]:
    """Small tags: adapters inside a module (filled), then +inserted, −removed, ⊕merged counts (outlined).

    Returns the markup and its width."""
    tags = [(key.split("/")[0], colors[key], True) for key in sorted(info["adapters"])]
    marks = {"inserted": "+", "removed": "−", "merged": "⊕"}
    tags += [(f"{marks[k]}{info['changes'][k]}", DIFF_COLORS[k], False) for k in marks if info["changes"].get(k)]
    widths = [10 + 6.5 * len(text) for text, _, _ in tags]
    total = sum(widths) + 4 * len(tags)
    if anchor_right:
        x -= total
    out = []
    for (text, color, filled), w in zip(tags, widths, strict=True):
        paint = f'fill="{color}"' if filled else f'fill="#fff" stroke="{color}" stroke-width="1.3"'
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="13" rx="6.5" {paint}/>'
                   f'<text x="{x + w / 2:.1f}" y="{y + 10}" font-size="9.5" font-weight="700" '
                   f'fill="{"#fff" if filled else color}" text-anchor="middle">{escape(text)}</text>')
        x += w + 4
    return "".join(out), total


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["render_svg", "SIZES"]
