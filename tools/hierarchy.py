"""Group the union graph by module hierarchy and lay out each group's children in ranked rows.

Every group (a module path from `nn_module_stack`) is laid out on its own: its children (sub-groups
and nodes) get a rank (row, top to bottom, longest path from the group's inputs) and an order inside
the row (barycenter sweeps to reduce crossings). A renderer then only sizes boxes bottom-up, so
expanding a group never needs a new graph layout: the browser can do it instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from .union import Union

ROOT = "g:"
# The model's own level, when it has more loose ops than this, gets them folded into one "ops" group, so
# the top level (attention-mask arithmetic in BERT, rotary tables in Llama) shows a handful of boxes.
# Deeper modules keep their ops visible: there they are the computation (the attention core).
_LOOSE_OPS_MAX = 8
_SWEEPS = 4


@dataclass
class Group:
    id: str  # "g:" + module path ("g:" is the model itself; "g:<path>#ops" folds loose ops)
    path: str
    label: str
    type: str  # full module type, e.g. transformers.models.bert.modeling_bert.BertLayer
    parent: str | None
    depth: int
    children: list[str] = field(default_factory=list)  # item ids ("g:..." or "n:<uid>")


@dataclass
class Hierarchy:
    groups: dict[str, Group]
    parent: dict[str, str]  # item id -> id of the group holding it
    place: dict[str, tuple[int, int]]  # item id -> (rank, order) inside its group

    def ancestors(self, item: str) -> list[str]:
        """Group ids from the root down to the item's parent."""
        chain = []
        while item in self.parent:
            item = self.parent[item]
            chain.append(item)
        return chain[::-1]


def node_item(uid: str) -> str:
    return "n:" + uid


def build_hierarchy(union: Union) -> Hierarchy:
    groups, parent = _group_tree(union)
    _fold_loose_ops(groups, parent, union)
    position = _positions(union)
    first = _first_positions(groups, parent, position)
    child_edges = _child_edges(union, parent)
    place: dict[str, tuple[int, int]] = {}
    for group in groups.values():
        group.children.sort(key=first.__getitem__)
        place.update(_rank_and_order(group.children, child_edges.get(group.id, set()), first))
    return Hierarchy(groups, parent, place)


def _group_tree(union: Union) -> tuple[dict[str, Group], dict[str, str]]:
    types: dict[str, str] = {}
    for snap in union.stages:
        types.update(snap.get("modules", {}))
    groups = {ROOT: Group(ROOT, "", _short(types.get("", "")) or "model", types.get("", ""), None, 0)}
    parent: dict[str, str] = {}
    for uid in union.order:
        stack = [entry for entry in union.records[uid]["module_stack"] if entry[0] != ""]
        above = ROOT
        for path, kind in stack:
            gid = "g:" + path
            if gid not in groups:
                up = groups[above]
                groups[gid] = Group(gid, path, _relative(path, up.path), kind or types.get(path, ""), above,
                                    up.depth + 1)
                groups[above].children.append(gid)
                parent[gid] = above
            above = gid
        parent[node_item(uid)] = above
        groups[above].children.append(node_item(uid))
    return groups, parent


def _fold_loose_ops(groups: dict[str, Group], parent: dict[str, str], union: Union) -> None:
    root = groups[ROOT]
    loose = [item for item in root.children if item.startswith("n:")
             and union.records[item[2:]]["op"] in ("call_function", "call_method", "call_module")
             and not union.records[item[2:]].get("origin")]
    if len(loose) <= _LOOSE_OPS_MAX or not any(item.startswith("g:") for item in root.children):
        return
    gid = f"{ROOT}#ops"
    groups[gid] = Group(gid, "", "ops", "", ROOT, 1, loose)
    folded = set(loose)
    root.children = [item for item in root.children if item not in folded] + [gid]
    parent[gid] = ROOT
    for item in loose:
        parent[item] = gid


def _positions(union: Union) -> dict[str, float]:
    """Node item -> place in the union order; get_attr nodes (all at the top of an exported graph)
    count as just before their first user, so a module holding weights does not sort first."""
    position: dict[str, float] = {node_item(uid): i for i, uid in enumerate(union.order)}
    users: dict[str, float] = {}
    for src, dst in union.all_edges():
        if union.records[src]["op"] == "get_attr":
            users[src] = min(users.get(src, float("inf")), position[node_item(dst)] - 0.5)
    position.update({node_item(uid): where for uid, where in users.items()})
    return position


def _first_positions(groups: dict[str, Group], parent: dict[str, str],
                     position: dict[str, float]) -> dict[str, float]:
    """Each item's earliest node position in the union order: the order children start in."""
    first = dict(position)
    for item, pos in position.items():
        up = item
        while up in parent:
            up = parent[up]
            if first.get(up, pos + 1) <= pos:
                break
            first[up] = pos
    for gid in groups:
        first.setdefault(gid, len(position))
    return first


def _child_edges(union: Union, parent: dict[str, str]) -> dict[str, set[tuple[str, str]]]:
    """For every data edge, the pair of siblings it connects inside the lowest common group."""
    chains: dict[str, list[str]] = {}

    def chain(item: str) -> list[str]:
        if item not in chains:
            chains[item] = (chain(parent[item]) if item in parent else []) + [item]
        return chains[item]

    edges: dict[str, set[tuple[str, str]]] = {}
    for src, dst in union.all_edges():
        a, b = chain(node_item(src)), chain(node_item(dst))
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        if 0 < k < min(len(a), len(b)):  # nodes are leaves: neither chain is a prefix of the other
            edges.setdefault(a[k - 1], set()).add((a[k], b[k]))
    return edges


def _rank_and_order(children: list[str], edges: set[tuple[str, str]],
                    first: dict[str, float]) -> dict[str, tuple[int, int]]:
    graph = nx.DiGraph()
    graph.add_nodes_from(children)
    # Keep only edges that agree with graph order: drops the back edges of cycles between sibling
    # groups (a module called twice, or mask ops feeding layers that feed them back).
    graph.add_edges_from((a, b) for a, b in edges if first[a] < first[b])
    rank: dict[str, int] = {}
    for item in nx.lexicographical_topological_sort(graph, key=first.__getitem__):
        rank[item] = max((rank[p] + 1 for p in graph.predecessors(item)), default=0)
    rows: dict[int, list[str]] = {}
    for item in children:
        rows.setdefault(rank[item], []).append(item)
    _reduce_crossings(graph, rows)
    return {item: (r, i) for r, row in rows.items() for i, item in enumerate(row)}


def _reduce_crossings(graph: nx.DiGraph, rows: dict[int, list[str]]) -> None:
    """Barycenter heuristic: sort each row by the mean relative position of its neighbours."""
    def pos() -> dict[str, float]:
        return {item: (i + 0.5) / len(row) for row in rows.values() for i, item in enumerate(row)}

    ranks = sorted(rows)
    for sweep in range(_SWEEPS):
        down = sweep % 2 == 0
        for r in ranks[1:] if down else ranks[-2::-1]:
            where = pos()
            rows[r] = sorted(rows[r], key=lambda item, where=where, down=down: _barycenter(graph, item, where, down))


def _barycenter(graph: nx.DiGraph, item: str, where: dict[str, float], down: bool) -> float:
    near = list(graph.predecessors(item) if down else graph.successors(item))
    return sum(where[n] for n in near) / len(near) if near else where[item]


def _relative(path: str, parent_path: str) -> str:
    return path[len(parent_path) + 1:] if parent_path and path.startswith(parent_path + ".") else path


def _short(kind: str) -> str:
    return kind.rpartition(".")[2]
