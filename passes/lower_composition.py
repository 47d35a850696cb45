"""Rewrite pass: lower a composition setup (Stack, Parallel, Fuse, Split, BatchSplit, Average, MultiTask)
into the graph. Each site where an adapter of the setup acts gets ONE call to a composed module
(fxadapt/compose/): `y = BottleneckSite(h, x, ln_w, ln_b)` at residual sites, `y' = LoRASite(x, y)` at
projections. The adapters' modules live inside it under `adapters.<name>` (fusions under
`adapter_fusion_layer.<a,b>`), so their state dicts carry the reference's parameter names.

Parallel with N children replicates every model input N times at the graph entry (rows are independent
before the first adapter, so this equals the reference's replication at its first adapter layer); row
block i then runs the setup with the Parallel block replaced by its child i.
"""

from __future__ import annotations

from torch import fx

from fxadapt import checkpoints
from fxadapt.compose import fusion_spec
from fxadapt.compose.bottleneck_site import BottleneckSite
from fxadapt.compose.fusion import Fusion
from fxadapt.compose.invertible_site import lower_invertible
from fxadapt.compose.prefix_site import lower_prefix
from fxadapt.compose.reft_site import lower_reft
from fxadapt.composition import Block
from fxadapt.errors import UserError
from fxadapt.graph_edit import Emitter, add_module
from fxadapt.graph_ops import aten
from fxadapt.methods import bottleneck
from fxadapt.methods.base import Placement, SiteModule, freeze
from fxadapt.methods.lora import projection_io, shared_attrs, weight_and_bias
from fxadapt.methods.lora.site import LoRASite
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
    for kind, lower in LOWER_SITES.items():
        for index, modules in by_kind.get(kind, {}).items():
            made, placed = lower(gm, spec, sites, paths, index, modules, shared)
            inserted += made
            placements += placed
    for name in dict.fromkeys(spec.active):
        adapter = spec.adapters[name]
        if adapter.load is not None:
            checkpoints.load_into(gm, [p for p in placements if p.adapter == name], adapter.load,
                                  f"{adapter.path}.load", base_prefix, hidden_size)
    for fusion in spec.fusions:
        if fusion.load is not None:
            fusion_spec.load_weights([(p.reference_module, gm.get_submodule(p.module_path)) for p in placements
                                      if p.method == "fusion" and p.adapter == fusion.name], fusion.load, fusion.name,
                                     base_prefix, f"{fusion.path}.load")
    gm.meta.setdefault("fxadapt", {})["placements"] = placements
    return PassResult(gm, inserted)


def _lower_residual(gm: fx.GraphModule, spec: Spec, sites: SiteMap, paths: list, index: int,
                    modules: dict[str, SiteModule], shared: dict[str, tuple[fx.Node, ...]]
                    ) -> tuple[int, list[Placement]]:
    """`y = BottleneckSite(h, x, ln_w, ln_b)` at one residual site; returns (nodes made, placements)."""
    site = sites.residuals[index]
    fusions = {f.name: freeze(Fusion(f.config, site.hidden_size)) for f in spec.fusions
               if set(f.adapters) & set(modules)}
    norm = site.norm
    if norm is not None and norm.target != aten.layer_norm.default:
        raise UserError(f"composition at {site.role} of layer {site.layer}: the site's norm is "
                        f"{norm.target}, fxadapt composes bottleneck adapters only around layer_norm.")
    module = BottleneckSite(paths, {n: m.module for n, m in modules.items()}, fusions,
                            (list(norm.args[1]), float(norm.args[4]) if len(norm.args) > 4 else 1e-5)
                            if norm is not None else None)
    path = add_module(gm, "composition", f"L{site.layer}_{site.role}", freeze(module))
    emit = Emitter(gm, site.output, {"adapter": ",".join(modules), "method": "composition", "pass": PASS,
                                     "site": site.role, "layer": site.layer})
    ln_args = (norm.args[2], norm.args[3]) if norm is not None else (None, None)
    uses = [a for n, m in modules.items() if m.module.shared_names for a in shared[n]]  # Compacter's PHM tensors
    out = emit.call_module(path, (site.hidden, site.residual, *ln_args, *uses))
    emit.reroute(site.output, out)
    ref = bottleneck.reference_module(site)
    placements = [Placement(n, spec.adapters[n].method.NAME, site.role, site.layer, f"{path}.adapters.{n}",
                            m.reference_module, 0) for n, m in modules.items()]
    placements += [Placement(f, "fusion", site.role, site.layer, f"{path}.adapter_fusion_layer.{f}",
                             ref.rpartition(".")[0] + ".adapter_fusion_layer", 0) for f in fusions]
    return len(emit.created), placements


def _lower_linear(gm: fx.GraphModule, spec: Spec, sites: SiteMap, paths: list, index: int,
                  modules: dict[str, SiteModule], shared: dict[str, tuple[fx.Node, ...]]
                  ) -> tuple[int, list[Placement]]:
    """`y' = LoRASite(x, y[, task_ids][, W, b], *shared)` at every graph node of one projection (see LoRASite);
    returns (nodes made, placements)."""
    site = sites.linears[index]
    if site.in_features != site.out_features and any(_chains(branch, modules) for branch in paths):
        raise UserError(f"{spec.setup.path}: a stack feeds each LoRA-family adapter's update into the next one's "
                        "input (as the reference does), which needs a square projection, but "
                        f"{site.module} ({site.role}, layer {site.layer}) maps {site.in_features} -> "
                        f"{site.out_features} features; the reference fails there too. Stack adapters that adapt "
                        "different projections (e.g. attn_matrices only), or use parallel or average.")
    task_ids = _task_ids(gm) if _has_multi_task(spec.setup) else None
    uses = {n: shared[n] for n in modules if n in shared}
    module = LoRASite(paths, {n: m.module for n, m in modules.items()}, task_ids is not None,
                      {n: len(nodes) for n, nodes in uses.items()})
    path = add_module(gm, "composition", f"L{site.layer}_{site.role}", freeze(module))
    origin = {"adapter": ",".join(modules), "method": "composition", "pass": PASS, "site": site.role,
              "layer": site.layer}
    inserted = 0
    for node in site.nodes:
        x, y = projection_io(node, True)
        emit = Emitter(gm, y, origin)
        inputs = ((task_ids,) if task_ids is not None else ()) + (weight_and_bias(node) if module.needs_weight else ())
        out = emit.call_module(path, (x, y, *inputs, *[a for nodes in uses.values() for a in nodes]))
        emit.reroute(y, out)
        inserted += len(emit.created)
    placements = [Placement(n, spec.adapters[n].method.NAME, site.role, site.layer, f"{path}.adapters.{n}",
                            m.reference_module, 0) for n, m in modules.items()]
    return inserted, placements


def _chains(setup: Block | str, present: dict) -> bool:
    """Whether a stack in `setup` runs two or more of the adapters `present` at a site one after the other."""
    if isinstance(setup, str):
        return False
    if setup.kind == "stack":
        acting = [c for c in setup.children if any(n in present for n in ([c] if isinstance(c, str) else c.flatten()))]
        if len(acting) > 1:
            return True
    return any(_chains(child, present) for child in setup.children if isinstance(child, Block))


# How a composed site of each SiteModule kind is lowered, in this order: ReFT wraps a layer output before its
# residual site is composed, so the composed output feeds the intervention.
LOWER_SITES = {"invertible": lower_invertible, "reft": lower_reft, "residual": _lower_residual,
               "linear": _lower_linear, "prefix": lower_prefix}


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


def _has_multi_task(block: Block) -> bool:
    return block.kind == "multi_task" or any(isinstance(c, Block) and _has_multi_task(c) for c in block.children)


def _task_ids(gm: fx.GraphModule) -> fx.Node:
    node = next((n for n in _placeholders(gm) if n.name == "task_ids"), None)
    if node is None:
        raise UserError("$.active: a multi_task block needs a per-row \"task_ids\" model input; compile with "
                        "task_ids among the inputs.")
    return node
