"""Every projection of a captured graph by module path, for adapters that target modules by name (PEFT).

The structural site finder (sites.py) names attention and FFN projections by role; PEFT's
`target_modules` may name any linear layer (a pooler, a classifier head). `find_projections` lists
every projection with a stored weight — one LinearSite per weight, named by the module that calls it
(`nn_module_stack`; GPT-2's Conv1D included), with the site finder's role where it has one and
"linear" elsewhere. `output_heads` says which of them produce a model output directly (through data
movement only), as PEFT's "all-linear" leaves the output head out.
"""

from __future__ import annotations

from collections import deque

from torch import fx

from .graph_ops import ADDMM, PASS_THROUGH, is_call, module_path, weight_node
from .sites import LinearSite, SiteMap


def _tensor(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _layer(path: str, prefixes: list[str]) -> int:
    for index, prefix in enumerate(prefixes):
        if path == prefix or path.startswith(prefix + "."):
            return index
    return -1


def find_projections(gm: fx.GraphModule, sites: SiteMap) -> list[LinearSite]:
    """One LinearSite per projection weight, in graph order; `module` is the calling module's path."""
    by_weight: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        weight = weight_node(node)
        if weight is not None:
            by_weight.setdefault(weight.target, []).append(node)
    known = {site.weight: site for site in sites.linears}
    found = []
    for target, nodes in by_weight.items():
        if target in known:
            found.append(known[target])
            continue
        path = module_path(nodes[0]) or target.rpartition(".")[0]
        shape = _tensor(gm, target).shape
        addmm = is_call(nodes[0], ADDMM)
        fan_in, fan_out = (shape[0], shape[1]) if addmm else (shape[1], shape[0])
        found.append(LinearSite("linear", _layer(path, sites.layer_prefixes), path, target, nodes,
                                "addmm" if addmm else "linear", fan_in, fan_out))
    return found


def output_heads(gm: fx.GraphModule, projections: list[LinearSite]) -> set[str]:
    """Module paths of projections whose value reaches a graph output through data movement only."""
    heads = set()
    for site in projections:
        queue, seen = deque(site.nodes), set()
        while queue and site.module not in heads:
            node = queue.popleft()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "output":
                    heads.add(site.module)
                elif is_call(user, PASS_THROUGH):
                    queue.append(user)
    return heads
