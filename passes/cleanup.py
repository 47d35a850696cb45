"""Dead-code elimination: drop nodes no output depends on (e.g. the original residual add and
LayerNorm a bottleneck rewrite replaced), then the submodules and attributes nothing uses anymore."""

from __future__ import annotations

from torch import fx

from .manager import PassResult


def eliminate_dead_code(gm: fx.GraphModule) -> PassResult:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        # get_attr nodes of removed consumers linger unless erased explicitly.
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, before - len(gm.graph.nodes))
