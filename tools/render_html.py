"""`--format html`: one self-contained page (inline CSS, JS and data; no network) to explore the stages.

Python does the graph work (union of stages, module hierarchy, ranks and orders per module, diffs);
the page's JavaScript (web/*.js) only sizes boxes, draws SVG and handles clicks, so expanding a module
of a 12-layer model stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from fxadapt.errors import UserError

from .graph_json import diff
from .hierarchy import Hierarchy
from .layout import SIZES
from .style import CATEGORY_FILL, DIFF_COLORS, METHOD_GLYPH, adapter_colors, adapter_keys, category, node_title
from .union import Union

WEB = Path(__file__).with_name("web")
# Order matters: model.js defines what draw.js and app.js use.
SCRIPTS = ("model.js", "draw.js", "panel.js", "app.js")
# Fields the page does not need: the hierarchy replaces module_stack, users are derived from inputs,
# and index changes whenever a pass inserts a node (dropping it lets identical records be shared).
_DROP = ("module_stack", "users", "index")


def render_html(union: Union, hierarchy: Hierarchy) -> str:
    data = page_data(union, hierarchy)
    title = "fxadapt inspect — " + " → ".join(s["stage"] for s in union.stages)
    try:
        page = (WEB / "viewer.html").read_text()
        css = (WEB / "viewer.css").read_text() + _generated_css()
        scripts = "\n".join((WEB / name).read_text() for name in SCRIPTS)
    except FileNotFoundError as exc:
        raise UserError(f"the HTML viewer's assets are missing from this installation ({exc.filename}); "
                        "reinstall fxadapt, or use --format svg.") from None
    # Replaced in one pass, last the data, so text inside the data can never be taken for a marker.
    for marker, value in (("/*CSS*/", css), ("/*JS*/", scripts), ("__TITLE__", escape(title)),
                          ("__DATA__", _script_json(data))):
        page = page.replace(marker, value, 1)
    return page


def page_data(union: Union, hierarchy: Hierarchy) -> dict[str, Any]:
    """Everything the page shows, deduplicated: a record shared by several stages is stored once."""
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    stages = []
    for index, snap in enumerate(union.stages):
        nodes = []
        for record in snap["nodes"]:
            slim = {k: v for k, v in record.items() if k not in _DROP}
            key = json.dumps(slim, sort_keys=True)
            if key not in seen:
                seen[key] = len(records)
                records.append(slim)
            nodes.append([union.uid_of[index][record["name"]], seen[key]])
        stages.append({"stage": snap["stage"], "nodes": nodes})
    count = len(union.stages)
    keys = [key for snap in union.stages for r in snap["nodes"] for key in adapter_keys(r)]
    return {
        "sizes": SIZES,
        "stages": stages,
        "records": records,
        "groups": {gid: {"path": g.path, "label": g.label, "type": g.type, "depth": g.depth,
                         "children": g.children} for gid, g in hierarchy.groups.items()},
        "parent": hierarchy.parent,
        "place": hierarchy.place,
        "diffs": {f"{i},{j}": diff(union.stages[i], union.stages[j]) for i in range(count)
                  for j in range(i + 1, count)},
        "category": {uid: category(r) for uid, r in union.records.items()},
        "title": {uid: node_title(r) for uid, r in union.records.items()},
        "colors": {"adapters": adapter_colors(keys), "diff": DIFF_COLORS},
        "glyphs": METHOD_GLYPH,
    }


def _generated_css() -> str:
    """Colour rules from style.py, so the page and the SVG/DOT renderers agree."""
    rules = [f".cat-{name} > rect {{ fill: {color}; }}" for name, color in CATEGORY_FILL.items()]
    rules += [f".node.{name} > rect {{ stroke: {color}; }}\n.status.{name} {{ background: {color}; }}"
              for name, color in DIFF_COLORS.items()]
    return "\n" + "\n".join(rules) + "\n"


def _script_json(data: dict[str, Any]) -> str:
    """JSON safe inside <script>: no `</script>` or `<!--` can end or confuse the element."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
