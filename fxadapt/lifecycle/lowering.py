"""Lower an adapter setup onto a fresh copy of the captured base graph, with persistent adapter modules.

    graph = pass_list.rewrite(find_sites(copy(base)), active)   # nodes + freshly initialised modules
    graph.fxadapt.<adapter>.<site> := registry.fxadapt.<adapter>.<site>

Insertion creates new modules every time; swapping in the modules kept in the AdaptedModel's own
registry (same paths, `fxadapt.<adapter>.<site>`, see graph_edit.add_module) is what makes trained
weights survive re-lowering. Only `instantiate` (add_adapter) adopts the fresh modules; every other
lowering runs the insertion under a forked RNG, so re-lowering does not disturb the user's seed.

Merged LoRA adapters (merge_adapter) are inserted first and folded into the weights by the
`merge_lora` pass (W' = W + (alpha/r)·B·A, written as a new tensor, so the captured weight object is
never touched and reset_adapter is bit-exact); the active adapters are inserted on top.

A composition setup (Stack, Parallel, Fuse, ...; fxadapt/composition.py) is lowered by the
`lower_composition` pass instead, which builds one composed module per adapted site holding fresh
adapter modules under `adapters.<name>` and fusions under `adapter_fusion_layer.<fusion>`. Those are
replaced by the registry's persistent modules of the same (adapter, site):

    composed.adapters.<name>                 := fxadapt.<adapter>.L<layer>_<role>   (the same module object)
    composed.adapter_fusion_layer.<fusion>   := fusions.<fusion>.L<layer>_<role>

so the weights are shared by every setup an adapter takes part in (and by single activation). Fusion
modules are created once, by `instantiate_fusion` (add_adapter_fusion), at the sites the pass gives them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from .. import meta, pass_list
from ..compose.fusion_spec import FUSION_METHOD, FusionDef
from ..compose.rules import check_setup
from ..composition import Block, multi_task_children
from ..errors import UserError
from ..graph_edit import slug
from ..methods.base import Placement
from ..sites import SiteMap, find_sites
from ..spec import AdapterDef, Spec
from .base_graph import fresh_copy

REGISTRY = "fxadapt"  # attribute of the AdaptedModel holding the modules, mirroring the graph's paths
FUSIONS = "fusions"  # attribute of the AdaptedModel holding AdapterFusion modules, fusions.<fusion>.<site>


@dataclass
class Lowered:
    graph: fx.GraphModule
    sites: SiteMap
    placements: list[Placement]
    counts: dict[str, int] = field(default_factory=dict)


def registered(holder: nn.Module, path: str) -> nn.Module | None:
    """The registry's module at `fxadapt.<adapter>.<site>`, or None."""
    try:
        return holder.get_submodule(path)
    except AttributeError:
        return None


def registry_path(root: str, name: str, role: str, layer: int) -> str:
    """The registry path of `name`'s module at a site, as insert_adapters (graph_edit.add_module) names it."""
    return f"{root}.{slug(name)}.{slug(f'L{layer}_{role}')}"


def _adopt(holder: nn.Module, path: str, module: nn.Module, device: torch.device | None) -> None:
    root, adapter, site = path.split(".")
    registry: nn.ModuleDict = getattr(holder, root)
    if adapter not in registry:
        registry[adapter] = nn.ModuleDict()
    if device is not None:
        module.to(device)  # like the reference (`lora.to(self.weight.device)`): device only, dtype as created
    module.train(holder.training)
    registry[adapter][site] = module


def _bind(gm: fx.GraphModule, placements: list[Placement], holder: nn.Module, adopt: bool) -> None:
    device = next((p.device for p in gm.parameters()), None)
    for placement in placements:
        kept = registered(holder, placement.module_path)
        if kept is not None:
            gm.add_submodule(placement.module_path, kept)
        elif adopt:
            _adopt(holder, placement.module_path, gm.get_submodule(placement.module_path), device)
        else:  # a registry out of step with its adapters: a bug, not a user error
            raise RuntimeError(f"no persistent module for {placement.module_path}")


def _bind_composed(gm: fx.GraphModule, placements: list[Placement], holder: nn.Module) -> None:
    """Replace the composed modules' fresh adapters and fusions by the registry's modules of the same site. A
    module the pass registered at its own registry path (`fxadapt.<adapter>.<site>`, e.g. one a composed site
    reads through get_attr) is bound at that path, as a single adapter's."""
    for placement in placements:
        own_path = placement.module_path.count(".") == 2 and placement.module_path.startswith(REGISTRY + ".")
        root = FUSIONS if placement.method == FUSION_METHOD else REGISTRY
        path = placement.module_path if own_path else registry_path(root, placement.adapter, placement.role,
                                                                   placement.layer)
        kept = registered(holder, path)
        if kept is None and root == REGISTRY:  # a method registering by another key (PEFT: its module's name)
            path = next((p.module_path for p in getattr(holder, "_placements", {}).get(placement.adapter, [])
                         if (p.role, p.layer) == (placement.role, placement.layer)), path)
            kept = registered(holder, path)
        fresh = gm.get_submodule(placement.module_path)
        if kept is None or type(kept) is not type(fresh) or [p.shape for p in kept.parameters()] != [
                p.shape for p in fresh.parameters()]:  # the registry out of step with its adapters: a bug
            raise RuntimeError(f"no persistent module matching {placement.module_path} "
                               f"({placement.adapter} at {placement.role} of layer {placement.layer})")
        if own_path:
            gm.add_submodule(path, kept)
            continue
        parent, _, key = placement.module_path.rpartition(".")
        gm.get_submodule(parent)[key] = kept  # a ModuleDict: adapters / adapter_fusion_layer


def composition_spec(defs: dict[str, AdapterDef], setup: Block, fusions: list[FusionDef]) -> Spec:
    """The Spec of a composition setup over the registry's adapters (checked by compose/rules.check_setup)."""
    names = list(dict.fromkeys(setup.flatten()))
    # Weights come from the registry, never from a checkpoint directory here.
    spec = Spec({n: dataclasses.replace(defs[n], load=None) for n in names}, names, {"merge_lora": False}, setup,
                [dataclasses.replace(f, load=None) for f in fusions])
    check_setup(spec)
    return spec


def _run_insertion(gm: fx.GraphModule, spec: Spec, sites: SiteMap, base_prefix: str, hidden: int | None,
                   fork_rng: bool) -> tuple[fx.GraphModule, dict[str, int]]:
    """The REWRITE passes of pass_list (insert_adapters, or lower_composition for a setup); with `fork_rng` the
    fresh modules' initialisation does not advance the user's RNG (only adopted modules are initialised from it,
    as in the reference)."""
    with torch.random.fork_rng(devices=[]) if fork_rng else contextlib.nullcontext():
        return pass_list.rewrite(gm, pass_list.Context(spec, sites, base_prefix, hidden))


def _insert(gm: fx.GraphModule, defs: dict[str, AdapterDef], names: list[str], holder: nn.Module,
            base_prefix: str, hidden: int | None, adopt: bool, setup: Block | None = None,
            fusions: list[FusionDef] | None = None) -> tuple[fx.GraphModule, SiteMap, list[Placement],
                                                             dict[str, int]]:
    sites = find_sites(gm)
    if setup is not None:  # a spec with a setup: pass_list runs lower_composition instead of insert_adapters
        spec = composition_spec(defs, setup, fusions or [])
    else:
        # Weights come from the registry, never from a checkpoint directory (load_adapter fills the registry).
        spec = Spec({n: dataclasses.replace(defs[n], load=None) for n in names}, list(names), {"merge_lora": False})
    gm, counts = _run_insertion(gm, spec, sites, base_prefix, hidden, fork_rng=not adopt)
    placements = list(gm.meta.get("fxadapt", {}).get("placements", []))
    if setup is not None:
        _bind_composed(gm, placements, holder)
    else:
        _bind(gm, placements, holder, adopt)
    return gm, sites, placements, counts


def add_task_ids_input(gm: fx.GraphModule) -> None:
    """A `task_ids` model input after the captured ones (MultiTask routes row r to child task_ids[r]), with
    the pytree signature of the captured module extended to match."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.placeholder("task_ids")
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        names = [*codegen.pytree_info.orig_args, "task_ids"]
        _, in_spec = pytree.tree_flatten(((), {n: 0 for n in names}))
        gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, codegen.pytree_info.out_spec))
    gm.recompile()


def lower(base: fx.GraphModule, defs: dict[str, AdapterDef], active: list[str], merged: list[str],
          holder: nn.Module, base_prefix: str = "", hidden: int | None = None, setup: Block | None = None,
          fusions: list[FusionDef] | None = None) -> Lowered:
    """The graph for `active` (eval mode), with the `merged` LoRA adapters folded into the weights; with a
    composition `setup` (whose adapters `active` lists), that setup and the `fusions` its Fuse blocks use."""
    gm = fresh_copy(base)
    counts: dict[str, int] = {}
    if merged:
        gm, _, _, counts = _insert(gm, defs, merged, holder, base_prefix, hidden, adopt=False)
        # The OPTIMIZE list folds them (merge_lora) and drops their modules (eliminate_dead_code).
        gm, merge_counts = pass_list.optimize(gm, pass_list.Context(options={"merge_lora": True}))
        left = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.meta.get(meta.ORIGIN)})
        if left:
            reasons = gm.meta.get("fxadapt", {}).get("not_merged") or [{"reason": "it is not a LoRA-family adapter, "
                                                                         "or its weight is shared with another "
                                                                         "projection"}]
            raise UserError(f"merge_adapter({', '.join(map(repr, merged))}): {left[0]} cannot be folded into the "
                            f"weights ({reasons[0]['reason']}); keep the adapter unmerged.")
        counts.update(merge_counts)
        gm.meta.pop("fxadapt", None)
    if setup is not None:
        both = [n for n in dict.fromkeys(setup.flatten()) if n in merged]
        if both:
            raise UserError(f"{setup.path}: adapter {both[0]!r} is merged into the weights (merge_adapter); call "
                            "reset_adapter() before composing it, or activate it alone.")
        if multi_task_children(setup):
            add_task_ids_input(gm)
        gm, sites, placements, insert_counts = _insert(gm, defs, active, holder, base_prefix, hidden, adopt=False,
                                                       setup=setup, fusions=fusions)
        counts.update(insert_counts)
        return Lowered(gm, sites, placements, counts)
    names = [n for n in active if n not in merged]
    if not names:
        return Lowered(gm, find_sites(gm), [], counts)
    gm, sites, placements, insert_counts = _insert(gm, defs, names, holder, base_prefix, hidden, adopt=False)
    counts.update(insert_counts)
    return Lowered(gm, sites, placements, counts)


def instantiate(base: fx.GraphModule, adapter: AdapterDef, holder: nn.Module, base_prefix: str = "",
                hidden: int | None = None) -> tuple[fx.GraphModule, list[Placement]]:
    """Create a new adapter's modules in the registry (initialised as the method does); returns a scratch graph
    bound to them (checkpoint loaders write through it) and the adapter's placements."""
    gm = fresh_copy(base)
    gm, _, placements, _ = _insert(gm, {adapter.name: adapter}, [adapter.name], holder, base_prefix, hidden,
                                   adopt=True)
    return gm, placements


def instantiate_fusion(base: fx.GraphModule, defs: dict[str, AdapterDef], fusion: FusionDef, holder: nn.Module,
                       base_prefix: str = "", hidden: int | None = None, dropout: float = 0.0) -> list[Placement]:
    """Create an AdapterFusion's modules in the registry (`fusions.<fusion>.<site>`), initialised as the
    reference's BertFusion (with the global RNG, as add_adapter_fusion there), at the residual sites where
    lower_composition puts it; returns its placements (module_path: the registry path)."""
    setup = Block("fuse", list(fusion.adapters), f"add_adapter_fusion({fusion.name!r})", name=fusion.name)
    gm = fresh_copy(base)
    sites = find_sites(gm)
    # The scratch graph's fresh modules must not use the user's RNG; the adopted fusion modules below do.
    gm, _ = _run_insertion(gm, composition_spec(defs, setup, [fusion]), sites, base_prefix, hidden, fork_rng=True)
    found = [p for p in gm.meta["fxadapt"]["placements"] if p.method == FUSION_METHOD]
    device = next((p.device for p in base.parameters()), None)
    placements = []
    for placement in sorted(found, key=lambda p: (p.layer, p.role != "residual.attn")):  # the reference's order
        scratch = gm.get_submodule(placement.module_path)
        size = next(m for m in scratch.modules() if isinstance(m, nn.Linear)).in_features
        path = registry_path(FUSIONS, fusion.name, placement.role, placement.layer)
        # The scratch module's own class (the bottleneck family's Fusion), initialised as the reference's.
        _adopt(holder, path, type(scratch)(fusion.config, size, dropout, bert_init=True), device)
        placements.append(dataclasses.replace(placement, module_path=path))
    return placements
