"""The union of several stage snapshots: one id per node across stages, one order, all edges.

Renderers lay out the union once, so a node keeps its place when the viewer switches stage or shows a
diff, and nodes removed by a later pass can be drawn where they used to be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .graph_json import same_node


@dataclass
class Union:
    stages: list[dict[str, Any]]
    uid_of: list[dict[str, str]] = field(default_factory=list)  # per stage: node name -> uid
    order: list[str] = field(default_factory=list)  # every uid, consistent with each stage's order
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> its latest record
    present: dict[str, list[int]] = field(default_factory=dict)  # uid -> indices of stages holding it

    def stage_records(self, stage: int) -> dict[str, dict[str, Any]]:
        """uid -> the node's record in that stage."""
        return {self.uid_of[stage][n["name"]]: n for n in self.stages[stage]["nodes"]}

    def edges(self, stage: int) -> list[tuple[str, str]]:
        """(source uid, target uid) for every data edge of one stage."""
        ids = self.uid_of[stage]
        return [(ids[src], ids[n["name"]]) for n in self.stages[stage]["nodes"] for src in n["inputs"]
                if src in ids]

    def all_edges(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for stage in range(len(self.stages)):
            seen.update(dict.fromkeys(self.edges(stage)))
        return list(seen)


def build_union(stages: list[dict[str, Any]]) -> Union:
    """Match nodes across stages by name (see `graph_json.diff` for when a name is a new node)."""
    union = Union(stages)
    last_seen: dict[str, tuple[str, dict[str, Any]]] = {}  # name -> (uid, record) where it was last seen
    used: set[str] = set()
    for index, snap in enumerate(stages):
        ids: dict[str, str] = {}
        for record in snap["nodes"]:
            name = record["name"]
            seen = last_seen.get(name)
            if seen is not None and same_node(seen[1], record):
                uid = seen[0]
            else:
                uid = _fresh(name, snap["stage"], used)
            used.add(uid)
            ids[name] = uid
            last_seen[name] = (uid, record)
            union.records[uid] = record
            union.present.setdefault(uid, []).append(index)
        union.uid_of.append(ids)
        stage_order = [ids[n["name"]] for n in snap["nodes"]]
        union.order = _merge_order(union.order, stage_order)
    return union


def _fresh(name: str, stage: str, used: set[str]) -> str:
    if name not in used:
        return name
    base, count = f"{name}@{stage}", 1
    uid = base
    while uid in used:
        count += 1
        uid = f"{base}{count}"
    return uid


def _merge_order(merged: list[str], stage_order: list[str]) -> list[str]:
    """Insert each uid new in this stage right before the first already-known uid after it (so a node
    a pass replaced stays before its replacement, and new nodes stay next to the nodes they feed)."""
    known = set(merged)
    before: dict[str | None, list[str]] = {}
    anchor: str | None = None
    for uid in reversed(stage_order):
        if uid in known:
            anchor = uid
        else:
            before.setdefault(anchor, []).insert(0, uid)
    out: list[str] = []
    for uid in merged:
        out.extend(before.get(uid, []))
        out.append(uid)
    return out + before.get(None, [])
