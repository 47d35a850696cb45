"""The bottleneck method in the graph: its module per residual site (`site_modules`, for composition) and the
single-adapter rewrite (`emit`: the adapter's own pre_forward / post_forward on graph nodes)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import fx

from ... import meta
from ...errors import UserError
from ...graph_edit import Emitter, add_module
from ...graph_ops import aten
from ...sites import ResidualSite, SiteMap
from ..base import Placement, SiteModule, freeze
from . import invertible, phm
from .config import NAME, Config
from .module import Bottleneck


def reference_module(site: ResidualSite) -> str:
    """The reference's module for this site: the sub-layer's output module when the residual add
    happens inside it (BERT's SelfOutput/Output), else the layer's `attention_adapters`/`output_adapters`."""
    parent = site.projection_module.rpartition(".")[0]
    if site.module == parent:
        return f"{site.module}.adapters"
    slot = "output_adapters" if site.role == "residual.ffn" else "attention_adapters"
    return f"{site.module}.{slot}.adapters"


def _build(sites: SiteMap, config: Config, path: str) -> tuple[list[tuple[int, Bottleneck]], phm.SharedPHM | None]:
    """The adapter's module per residual site it adapts (index into sites.residuals), and Compacter's shared
    PHM tensors (one module for all layers) when the config shares them. The graph is not touched."""
    roles = (["residual.attn"] if config.mh_adapter else []) + (["residual.ffn"] if config.output_adapter else [])
    built: list[tuple[int, Bottleneck]] = []
    shared: phm.SharedPHM | None = None
    for index, site in enumerate(sites.residuals):
        if site.role not in roles or site.layer in config.leave_out:
            continue
        factor = config.reduction_for(site.layer, path)
        down = int(site.hidden_size // factor)
        if down < 1:
            raise UserError(f"{path}.reduction_factor: {factor} leaves no bottleneck for hidden size "
                            f"{site.hidden_size}; use a factor <= {site.hidden_size}.")
        if config.phm_layer:
            phm.check_sizes(config, site.hidden_size, down, factor, path)
            if shared is None and (config.shared_phm_rule or config.shared_W_phm):
                shared = freeze(phm.SharedPHM(config, site.hidden_size, down))
        names = tuple(shared.names) if shared else ()
        if shared and config.shared_W_phm and shared.get_parameter(names[0]).shape[1] != (
                site.hidden_size // config.phm_dim):
            raise UserError(f"{path}.shared_W_phm: sites of hidden size {site.hidden_size} and another size cannot "
                            "share one PHM weight; set shared_W_phm to false.")
        built.append((index, freeze(Bottleneck(site.hidden_size, down, config, names))))
    return built, shared


def composition_refusal(config: Config) -> str | None:
    return None  # every bottleneck config composes (PHM, invertible and AdapterPlus included)


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """For a composed setup: the invertible block (compose/model_wide.py runs the setup's first adapter's), the
    shared PHM tensors (fed to every composed residual site) and the Bottleneck per residual site."""
    found = []
    if config.inv_adapter:
        found.append(SiteModule("invertible", 0, invertible.make_block(sites, config, path), "invertible_adapters"))
    built, shared = _build(sites, config, path)
    if shared is not None:
        # Outside every layer, like the reference's base_model.shared_parameters[NAME].
        found.append(SiteModule("shared", -1, shared, "shared_parameters"))
    return found + [SiteModule("residual", index, module, reference_module(sites.residuals[index]))
                    for index, module in built]


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    if config.inv_adapter:
        yield from invertible.emit(gm, sites, adapter, config, path)
    built, shared = _build(sites, config, path)
    shared_path = add_module(gm, adapter, "shared", shared) if shared is not None else None
    for index, module in built:
        site = sites.residuals[index]
        module_path = add_module(gm, adapter, f"L{site.layer}_{site.role}", module)
        yield Placement(adapter, NAME, site.role, site.layer, module_path, reference_module(site),
                        _rewrite(gm, site, module_path, module, adapter, shared_path, module.shared_names))
    if shared_path is not None:
        yield Placement(adapter, NAME, "shared", -1, shared_path, "shared_parameters", 0)


def _shared_inputs(emit: Emitter, shared_path: str | None, names: tuple[str, ...]) -> list[fx.Node]:
    """get_attr nodes for the shared PHM tensors, placed and tagged like every other inserted node."""
    nodes = []
    for name in names:
        with emit.graph.inserting_after(emit.cursor):
            node = emit.graph.get_attr(f"{shared_path}.{name}")
        meta.inherit_meta(node, emit.anchor, keep_val=False, **emit.origin)
        emit.created.append(node)
        emit.cursor = node
        nodes.append(node)
    return nodes


def _rewrite(gm: fx.GraphModule, site: ResidualSite, module_path: str, module: Bottleneck, adapter: str,
             shared_path: str | None, names: tuple[str, ...]) -> int:
    """The adapter's own pre_forward / post_forward on graph nodes: where they need the model's h + x (and its
    norm), the model's nodes are reused; other adds and norms are new nodes (the norm a copy of the model's)."""
    h, x, norm = site.hidden, site.residual, site.norm
    emit = Emitter(gm, site.output, {"adapter": adapter, "method": NAME, "pass": "insert_adapters",
                                     "site": site.role, "layer": site.layer})

    def add(a: fx.Node, b: fx.Node) -> fx.Node:
        if (a, b) == (h, x):
            return site.add
        return emit.call_function(aten.add.Tensor, (a, b))

    def layer_norm(t: fx.Node) -> fx.Node:
        return site.output if t is site.add else emit.copy(norm, {site.add: t})

    ln = layer_norm if norm is not None else None
    t, _, residual = module.pre_forward(h, x, ln, add=add)
    adapted = emit.call_module(module_path, (t, residual, *_shared_inputs(emit, shared_path, names)))
    emit.reroute(site.output, module.post_forward(adapted, h, x, ln, add=add))
    return len(emit.created)
