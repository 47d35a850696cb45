"""What one picture shows: a stage (optionally diffed against an earlier one) at some expansion.

Python renderers (dot, svg) use this; the HTML viewer does the same in JavaScript (web/viewer.js),
from the same union and hierarchy data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .graph_json import diff
from .hierarchy import ROOT, Hierarchy, node_item
from .style import adapter_keys
from .union import Union


@dataclass
class StageView:
    union: Union
    hierarchy: Hierarchy
    stage: int
    base: int | None
    status: dict[str, str] = field(default_factory=dict)  # uid -> inserted/removed/merged/rewired
    shown: set[str] = field(default_factory=set)  # uids drawn: the stage's nodes (+ removed ones)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (src uid, dst uid, status)
    # uid -> the node as it is in this stage, or as it was in the base stage if it was removed.
    records: dict[str, dict] = field(default_factory=dict)


def stage_view(union: Union, hierarchy: Hierarchy, stage: int = -1, base: int | None = None) -> StageView:
    """The nodes and edges of `stage`; with `base`, removed nodes and edges too, each with a status."""
    stage %= len(union.stages)
    base = None if base is None else base % len(union.stages)
    view = StageView(union, hierarchy, stage, base)
    now = union.uid_of[stage]
    view.shown = set(now.values())
    view.records = union.stage_records(stage)
    edges = union.edges(stage)
    if base is None:
        view.edges = [(a, b, "") for a, b in edges]
        return view
    before = union.uid_of[base]
    change = diff(union.stages[base], union.stages[stage])
    for key in ("rewired", "merged", "inserted"):  # later keys win: an inserted node is only "inserted"
        view.status.update({now[name]: key for name in change[key]})
    view.status.update({before[name]: "removed" for name in change["removed"]})
    view.shown |= {before[name] for name in change["removed"]}
    old_records = union.stage_records(base)
    view.records.update({before[name]: old_records[before[name]] for name in change["removed"]})
    old_edges = set(union.edges(base))
    new_edges = set(edges)
    view.edges = [(a, b, "" if (a, b) in old_edges else "inserted") for a, b in edges]
    view.edges += [(a, b, "removed") for a, b in union.edges(base) if (a, b) not in new_edges]
    return view


def default_expanded(hierarchy: Hierarchy, depth: int) -> set[str]:
    """Modules shallower than `depth` (1: only the model's own level is open); folded ops stay shut."""
    return {gid for gid, group in hierarchy.groups.items() if group.depth < depth and not gid.endswith("#ops")}


def visible(view: StageView, expanded: set[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Items drawn (open groups' children, recursively) and the edges between them, deduplicated."""
    expanded = expanded | {ROOT}
    rep: dict[str, str] = {}
    for uid in view.shown:
        item = node_item(uid)
        rep[uid] = next((g for g in view.hierarchy.ancestors(item) if g not in expanded), item)
    items = sorted(set(rep.values()) | _open_groups(view, expanded, rep),
                   key=lambda i: (len(view.hierarchy.ancestors(i)), view.hierarchy.place.get(i, (0, 0))))
    # Several edges can collapse onto one pair of boxes: the pair is new only if none of them existed
    # before, and gone only if none of them exists now (a rewired edge inside a module is neither).
    now: set[tuple[str, str]] = set()
    before: set[tuple[str, str]] = set()
    for a, b, kind in view.edges:
        if a not in rep or b not in rep or rep[a] == rep[b]:
            continue
        key = (rep[a], rep[b])
        if kind != "removed":
            now.add(key)
        if kind != "inserted":
            before.add(key)
    pairs = list(dict.fromkeys(sorted(now | before)))
    return items, [(a, b, "" if (a, b) in now and (a, b) in before else "inserted" if (a, b) in now
                    else "removed") for a, b in pairs]


def _open_groups(view: StageView, expanded: set[str], rep: dict[str, str]) -> set[str]:
    """Expanded groups that hold something drawn (they are drawn as frames)."""
    out = set()
    for item in rep.values():
        out.update(g for g in view.hierarchy.ancestors(item) if g in expanded and g != ROOT)
    return out


def summary(view: StageView, gid: str) -> dict[str, Counter]:
    """Inside a group: adapters acting (`adapter/method` -> nodes created or merged into), diff statuses
    (-> count) and `nodes` ("all" -> count)."""
    adapters: Counter = Counter()
    changes: Counter = Counter()
    nodes: Counter = Counter()
    for uid in view.shown:
        if gid in view.hierarchy.ancestors(node_item(uid)):
            nodes["all"] += 1
            for key in adapter_keys(view.records[uid]):
                adapters[key] += 1
            if uid in view.status:
                changes[view.status[uid]] += 1
    return {"adapters": adapters, "changes": changes, "nodes": nodes}
