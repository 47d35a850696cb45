"""Lower an adapter setup onto a fresh copy of the captured base graph, with persistent adapter modules.

    graph = insert_adapters(find_sites(copy(base)), active)     # nodes + freshly initialised modules
    graph.fxadapt.<adapter>.<site> := registry.fxadapt.<adapter>.<site>

Insertion creates new modules every time; swapping in the modules kept in the AdaptedModel's own
registry (same paths, `fxadapt.<adapter>.<site>`, see graph_edit.add_module) is what makes trained
weights survive re-lowering. Only `instantiate` (add_adapter) adopts the fresh modules; every other
lowering runs the insertion under a forked RNG, so re-lowering does not disturb the user's seed.

Merged LoRA adapters (merge_adapter) are inserted first and folded into the weights by the
`merge_lora` pass (W' = W + (alpha/r)·B·A, written as a new tensor, so the captured weight object is
never touched and reset_adapter is bit-exact); the active adapters are inserted on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .. import meta
from ..errors import UserError
from ..methods.base import Placement
from ..passes.insert_adapters import insert_adapters
from ..passes.manager import run_passes
from ..passes.merge_lora import merge_lora
from ..sites import SiteMap, find_sites
from ..spec import AdapterDef, Spec
from .base_graph import fresh_copy

REGISTRY = "fxadapt"  # attribute of the AdaptedModel holding the modules, mirroring the graph's paths


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


def _adopt(holder: nn.Module, path: str, module: nn.Module, device: torch.device | None) -> None:
    _, adapter, site = path.split(".")
    registry: nn.ModuleDict = getattr(holder, REGISTRY)
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


def _insert(gm: fx.GraphModule, defs: dict[str, AdapterDef], names: list[str], holder: nn.Module,
            base_prefix: str, hidden: int | None, adopt: bool) -> tuple[fx.GraphModule, SiteMap, list[Placement],
                                                                        dict[str, int]]:
    sites = find_sites(gm)
    # Weights come from the registry, never from a checkpoint directory here (load_adapter fills the registry).
    spec = Spec({n: dataclasses.replace(defs[n], load=None) for n in names}, list(names), {"merge_lora": False})
    rewrite = [("insert_adapters", functools.partial(insert_adapters, spec=spec, sites=sites, base_prefix=base_prefix,
                                                     hidden_size=hidden))]
    rng = contextlib.nullcontext() if adopt else torch.random.fork_rng(devices=[])
    with rng:
        gm, counts = run_passes(gm, rewrite)
    placements = list(gm.meta.get("fxadapt", {}).get("placements", []))
    _bind(gm, placements, holder, adopt)
    return gm, sites, placements, counts


def lower(base: fx.GraphModule, defs: dict[str, AdapterDef], active: list[str], merged: list[str],
          holder: nn.Module, base_prefix: str = "", hidden: int | None = None) -> Lowered:
    """The graph for `active` (eval mode), with the `merged` LoRA adapters folded into the weights."""
    gm = fresh_copy(base)
    counts: dict[str, int] = {}
    if merged:
        gm, _, _, counts = _insert(gm, defs, merged, holder, base_prefix, hidden, adopt=False)
        gm, merge_counts = run_passes(gm, [("merge_lora", merge_lora)])
        left = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.meta.get(meta.ORIGIN)})
        if left:
            reasons = gm.meta.get("fxadapt", {}).get("not_merged") or [{"reason": "it is not a LoRA-family adapter, "
                                                                         "or its weight is shared with another "
                                                                         "projection"}]
            raise UserError(f"merge_adapter({', '.join(map(repr, merged))}): {left[0]} cannot be folded into the "
                            f"weights ({reasons[0]['reason']}); keep the adapter unmerged.")
        counts.update(merge_counts)
        gm.meta.pop("fxadapt", None)
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
