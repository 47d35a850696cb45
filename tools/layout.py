"""Box geometry for a view: sizes bottom-up from the precomputed ranks, positions top-down.

The same arithmetic runs in the browser (web/viewer.js, `layoutGroup`); sizes live in `SIZES` and are
handed to the page, so the static SVG and the interactive view look alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hierarchy import ROOT, node_item
from .view import StageView

SIZES = {
    "node_w": 150, "node_h": 40,  # an op
    "group_w": 190, "group_h": 56,  # a collapsed module
    "gap_x": 18, "gap_y": 30,  # between siblings / between rows
    "pad": 12, "header": 26,  # inside an expanded module's frame
}


@dataclass
class Box:
    x: float
    y: float
    w: float
    h: float
    kind: str  # "node", "group" (collapsed module) or "frame" (expanded module)


def layout(view: StageView, expanded: set[str]) -> dict[str, Box]:
    """Boxes for every drawn item; the root frame sits at (0, 0)."""
    hierarchy = view.hierarchy
    live: set[str] = set()  # items holding at least one drawn node
    for uid in view.shown:
        live.add(node_item(uid))
        live.update(hierarchy.ancestors(node_item(uid)))
    expanded = expanded | {ROOT}
    sizes: dict[str, tuple[float, float]] = {}

    def rows_of(gid: str) -> list[list[str]]:
        rows: dict[int, list[str]] = {}
        for child in hierarchy.groups[gid].children:
            if child in live:
                rows.setdefault(hierarchy.place[child][0], []).append(child)
        return [sorted(row, key=lambda c: hierarchy.place[c][1]) for _, row in sorted(rows.items())]

    def size(item: str) -> tuple[float, float]:
        if item in sizes:
            return sizes[item]
        if item.startswith("n:"):
            dims = (SIZES["node_w"], SIZES["node_h"])
        elif item not in expanded:
            dims = (SIZES["group_w"], SIZES["group_h"])
        else:
            rows = rows_of(item)
            widths, heights = [], []
            for row in rows:
                children = [size(c) for c in row]
                widths.append(sum(w for w, _ in children) + SIZES["gap_x"] * (len(children) - 1))
                heights.append(max(h for _, h in children))
            dims = (max(widths + [SIZES["group_w"]]) + 2 * SIZES["pad"],
                    SIZES["header"] + sum(heights) + SIZES["gap_y"] * max(len(rows) - 1, 0) + SIZES["pad"])
        sizes[item] = dims
        return dims

    boxes: dict[str, Box] = {}

    def place(item: str, x: float, y: float) -> None:
        w, h = size(item)
        kind = "node" if item.startswith("n:") else "frame" if item in expanded else "group"
        boxes[item] = Box(x, y, w, h, kind)
        if kind != "frame":
            return
        top = y + SIZES["header"]
        for row in rows_of(item):
            row_w = sum(size(c)[0] for c in row) + SIZES["gap_x"] * (len(row) - 1)
            cx = x + (w - row_w) / 2
            for child in row:
                place(child, cx, top)
                cx += size(child)[0] + SIZES["gap_x"]
            top += max(size(c)[1] for c in row) + SIZES["gap_y"]

    place(ROOT, 0, 0)
    return boxes
