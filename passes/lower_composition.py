"""Rewrite pass: lower a composition setup (Stack, Parallel, Fuse, Split, BatchSplit, Average, MultiTask)
into the graph. Each site where an adapter of the setup acts gets ONE call to a composed module (the
family's site.py, lowered by the family's LOWERERS): `y = BottleneckSite(h, x, ln_w, ln_b)` at residual
sites, `y' = LoRASite(x, y)` at projections. The adapters' modules live inside it under `adapters.<name>` (fusions under
`adapter_fusion_layer.<a,b>`), so their state dicts carry the reference's parameter names.

Parallel with N children replicates every model input N times at the graph entry (rows are independent
before the first adapter, so this equals the reference's replication at its first adapter layer); row
block i then runs the setup with the Parallel block replaced by its child i.
"""

from __future__ import annotations

from torch import fx

from fxadapt.checkpoints.loading import load_into
from fxadapt.compose import fusion_spec
from fxadapt.composition import Block
from fxadapt.errors import UserError
from fxadapt.graph_edit import Emitter, add_module, shared_attrs
from fxadapt.graph_ops import aten
from fxadapt.methods import BY_ARCHITECTURE
from fxadapt.methods.base import Placement, SiteModule, freeze
from fxadapt.sites import SiteMap
from fxadapt.spec import Spec

from .manager import PassResult

PASS = "lower_composition"


def branches(setup: Block) -> list[Block | str]:
    """The setup per Parallel copy i: every Parallel block replaced by its i-th child (or [setup]). Parallel
    blocks sit at the top or in the top Stack (the reference's depth rule); several in one Stack share one
    replication, as in the reference (the first replicates, later ones split the replicated batch alike), so
    copy i runs child i of each (compose/rules.py requires equal child counts)."""
    if setup.kind == "parallel":
        return list(setup.children)
    channels = next((len(c.children) for c in setup.children if isinstance(c, Block) and c.kind == "parallel"), 0)
    if not channels:
        return [setup]
    return [Block(setup.kind, [c.children[i] if isinstance(c, Block) and c.kind == "parallel" else c
                               for c in setup.children], setup.path, setup.splits, setup.weights, setup.name)
            for i in range(channels)]


def lower_composition(gm: fx.GraphModule, spec: Spec, sites: SiteMap, base_prefix: str = "",
                      hidden_size: int | None = None) -> PassResult:
    setup: Block = spec.setup
    paths = branches(setup)
    # Each method builds its own modules per site (methods/base.py SiteModule); composed sites by kind.
    by_kind: dict[str, dict[int, dict[str, SiteModule]]] = {}
    for name in dict.fromkeys(spec.active):
        adapter = spec.adapters[name]
        if "." in name:
            raise UserError(f"{adapter.path}: adapter names in a composition cannot contain \".\".")
        found = adapter.method.site_modules(sites, name, adapter.config, adapter.path, gm)
        if not found:
            raise UserError(f"{adapter.path}: the model has no site for this {adapter.method.NAME} adapter.")
        for item in found:
            by_kind.setdefault(item.kind, {}).setdefault(item.index, {})[name] = item
    unknown = sorted(set(by_kind) - set(LOWER_SITES) - {"shared"})
    if unknown:
        raise UserError(f"$.active: fxadapt cannot compose adapters at {', '.join(unknown)} sites yet.")
    placements: list[Placement] = []
    inserted = 0
    if len(paths) > 1 or setup.kind == "parallel":
        inserted += _replicate_inputs(gm, len(paths))
    # A "shared" SiteModule (e.g. VeRA's A and B) is registered once per adapter; the composed sites read its
    # tensors through get_attr nodes, in its state_dict order.
    shared: dict[str, tuple[fx.Node, ...]] = {}
    for modules in by_kind.get("shared", {}).values():
        for name, item in modules.items():
            path = add_module(gm, name, "shared", freeze(item.module))
            origin = {"adapter": name, "method": spec.adapters[name].method.NAME, "pass": PASS, "site": "shared",
                      "layer": -1}
            shared[name] = shared_attrs(gm, tuple(f"{path}.{k}" for k in item.module.state_dict()), origin)
            inserted += len(shared[name])
            placements.append(Placement(name, spec.adapters[name].method.NAME, "shared", -1, path,
                                        item.reference_module, len(shared[name])))
    for kind, (_, lower) in sorted(LOWER_SITES.items(), key=lambda item: item[1][0]):
        for index, modules in by_kind.get(kind, {}).items():
            made, placed = lower(gm, spec, sites, paths, index, modules, shared)
            inserted += made
            placements += placed
    for name in dict.fromkeys(spec.active):
        adapter = spec.adapters[name]
        if adapter.load is not None:
            load_into(gm, [p for p in placements if p.adapter == name], adapter.load,
                                  f"{adapter.path}.load", base_prefix, hidden_size)
    for fusion in spec.fusions:
        if fusion.load is not None:
            modules = [(p.reference_module, gm.get_submodule(p.module_path)) for p in placements
                       if p.method == fusion_spec.FUSION_METHOD and p.adapter == fusion.name]
            fusion_spec.load_weights(modules, fusion.load, fusion.name, base_prefix, f"{fusion.path}.load")
    gm.meta.setdefault("fxadapt", {})["placements"] = placements
    return PassResult(gm, inserted)


# How a composed site of each SiteModule kind is lowered: every method declares (stage, lowerer) per kind of its
# own (`LOWERERS`, methods/base.py); stage 0 runs first (ReFT wraps a layer output before its residual site is
# composed, so the composed output feeds the intervention), registry order within a stage.
LOWER_SITES = {kind: entry for method in BY_ARCHITECTURE.values()
               for kind, entry in getattr(method, "LOWERERS", {}).items()}


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _replicate_inputs(gm: fx.GraphModule, channels: int) -> int:
    """x -> repeat(x, [N, 1, ...]) for every tensor input (the reference's Parallel replication)."""
    count = 0
    for node in _placeholders(gm):
        value = node.meta.get("val")
        if value is None or not hasattr(value, "dim"):
            continue
        emit = Emitter(gm, node, {"adapter": "parallel", "method": "composition", "pass": PASS, "site": "inputs",
                                  "layer": -1})
        rep = emit.call_function(aten.repeat.default, (node, [channels] + [1] * (value.dim() - 1)), keep_val=False)
        emit.reroute(node, rep)
        count += 1
    return count
