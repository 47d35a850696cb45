"""`fxadapt inspect` output: render stage snapshots (from `graph_json.snapshot`) in one format."""

from __future__ import annotations

import json
from typing import Any

from fxadapt.errors import UserError

from .graph_json import FORMAT, VERSION, diff
from .render_text import render_text

FORMATS = ("html", "text", "dot", "json", "svg")


def render(stages: list[dict[str, Any]], fmt: str, *, depth: int = 2, base: int | None = None) -> str:
    """Render the snapshots, in pipeline order (e.g. captured, rewritten, optimized), as `fmt`.

    `dot` and `svg` draw the last stage with modules shallower than `depth` expanded, diffed against
    stage `base` (default: the stage before it). `html` embeds every stage and lets the reader choose.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown inspect format {fmt!r}; choose one of: {', '.join(FORMATS)}.")
    if not stages:
        raise UserError("nothing to render: no graph snapshots were taken.")
    if fmt == "json":
        return render_json(stages)
    if fmt == "text":
        return render_text(stages)
    # The graph formats below need networkx (hierarchy.py) and the layout code; json and text do not.
    from .hierarchy import build_hierarchy
    from .union import build_union

    union = build_union(stages)
    hierarchy = build_hierarchy(union)
    if fmt == "html":
        from .render_html import render_html

        return render_html(union, hierarchy)
    from .view import default_expanded, stage_view

    if base is None and len(stages) > 1:
        base = len(stages) - 2
    view = stage_view(union, hierarchy, len(stages) - 1, base)
    title = stages[-1]["stage"] + (f" vs {stages[base]['stage']}" if base is not None else "")
    expanded = default_expanded(hierarchy, depth)
    if fmt == "svg":
        from .render_svg import render_svg

        return render_svg(view, expanded, title)
    from .render_dot import render_dot

    return render_dot(view, expanded, title)


def render_json(stages: list[dict[str, Any]]) -> str:
    """The documented interchange format: every stage's snapshot and the diff of each consecutive pair."""
    document = {
        "format": FORMAT + ".stages",
        "version": VERSION,
        "stages": stages,
        "diffs": [diff(before, after) for before, after in zip(stages, stages[1:], strict=False)],
    }
    return json.dumps(document, indent=1) + "\n"
