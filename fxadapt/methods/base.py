"""What every adapter method provides (the `Method` protocol below) and the types it hands out.

A method is a module (or package) registered in fxadapt/methods/__init__.py. It defines `Config` (AdapterHub
field names and defaults, validation in `validate`) and an `emit(gm, sites, adapter, config, path)` generator
that inserts the method's nodes and yields one `Placement` per adapted site, so checkpoints can map
parameters to the reference's keys. Composition (passes/lower_composition.py, compose/rules.py) reads
`BLOCKS`, `composition_refusal(config)` and `site_modules(...)`; see `Method` for the whole contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from torch import fx, nn

from ..errors import UserError
from .field_types import check_values

if TYPE_CHECKING:
    from ..sites import SiteMap


@dataclass
class MethodConfig:
    """Base of method configs. Field names are AdapterHub's, so its adapter_config.json loads as is."""

    architecture: ClassVar[str] = ""
    # average_adapter's combine_strategy values this method's adapters accept (lifecycle/averaging.py).
    combine_strategies: ClassVar[tuple[str, ...]] = ("linear",)
    # Reference fields with no effect on the forward pass (initialisation only), accepted as is.
    _inert: ClassVar[tuple[str, ...]] = ("init_weights", "init_weights_seed", "dtype")

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: str) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"architecture"})
        if unknown:
            raise UserError(
                f"{path}: unknown {cls.architecture} config key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys are: {', '.join(sorted(names))}."
            )
        check_values(cls, {k: v for k, v in values.items() if k != "architecture"}, path)
        config = cls(**{k: v for k, v in values.items() if k != "architecture"})
        config.validate(path)
        return config

    def validate(self, path: str) -> None:
        """Raise UserError naming the field for invalid values."""

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    def fail(self, path: str, key: str, message: str) -> UserError:
        return UserError(f"{path}.{key}: {message}")


@dataclass
class Placement:
    """One adapted site: the module inserted into the graph and its reference checkpoint prefix."""

    adapter: str
    method: str
    role: str
    layer: int
    module_path: str  # where the adapter module lives in the GraphModule
    reference_module: str  # reference container of this adapter, e.g. "encoder.layer.0.output.adapters"
    nodes_inserted: int


@dataclass
class SiteModule:
    """One adapter module for a composed site. `kind` says which site list `index` points into ("linear":
    sites.linears, "residual": sites.residuals); lower_composition dispatches on it. Kind "shared" (index 0)
    is a module several sites of the adapter read (VeRA's A and B): registered once at
    `fxadapt.<adapter>.shared`, its tensors passed to the composed sites as get_attr nodes."""

    kind: str
    index: int
    module: nn.Module
    reference_module: str  # reference checkpoint prefix, as Placement.reference_module


def require_type(config: MethodConfig, path: str, key: str, kinds: tuple[type, ...]) -> None:
    value = getattr(config, key)
    if isinstance(value, bool) and bool not in kinds:
        raise config.fail(path, key, f"expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}.")
    if not isinstance(value, kinds):
        raise config.fail(path, key, f"expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}.")


def freeze(module: nn.Module) -> nn.Module:
    """Adapters are inserted in eval mode like the captured graph; training switches them later."""
    return module.eval()


@runtime_checkable
class Method(Protocol):
    """The contract of a registered method module (`isinstance(module, Method)` checks the names are there;
    tests/test_method_contract.py checks the signatures too).

    NAME      the method's name, as in Placement.method for its plain form (variants may say more, e.g. "dora")
    Config    its MethodConfig subclass; `Config.from_dict(values, path)` validates and raises UserError
              naming the field (`<path>.<field>: ...`)
    PRESETS   config names (AdapterHub's ADAPTER_CONFIG_MAP) -> field values; ALIASES: other name -> preset
    BLOCKS    the composition blocks it may join (the reference's `supported_compositions`)

    How it is wired into the graph: `emit` inserts its nodes at the sites it adapts and yields a Placement per
    module, with `module_path` (where the module lives in the GraphModule) and `reference_module`, the prefix
    of its tensors in the reference checkpoint: a checkpoint key is `<reference_module>.<adapter>.<tensor>`
    (e.g. `...attention.self.query.loras.a.lora_A`), the module's state_dict names mirroring the reference's.

    Where it acts, for composition: `site_modules` builds the same modules per site without touching the graph
    (SiteModule.kind "linear"/"residual" + index into the SiteMap, or "shared" for tensors several sites read).

    Fold/merge: a method whose modules sit on a projection (the LoRA family) subclasses
    lora.family.FamilyModule; `fold(W, b, shared) -> (W', b')` folds it into the projection so that
    W' x + b' equals the adapted output (passes/merge_lora.py), or raises for what cannot be merged.

    Optional declarations, read with getattr where a generic module would otherwise switch on NAME:
    peft_layout(config) -> bool   save_adapter also writes PEFT's layout (lifecycle/saving.py)
    describe_sites(config) -> str the sites it needs, for the "no site" error (passes/insert_adapters.py)
    blocks_for(config) -> tuple   the blocks this config may join, narrower than BLOCKS (a union: those all its
                                  members join; compose/rules.py)
    SHARABLE                      tensor names share_parameters ties across a multi-task group (lifecycle/sharing.py)
    LOWERERS                      SiteModule.kind -> (stage, lowerer) for the kinds of site it composes: the
                                  lowerer(gm, spec, sites, paths, index, modules, shared) -> (nodes, placements)
                                  lowers one composed site; stage 0 runs before 1 (passes/lower_composition.py)
    FUSABLE                       its adapters may join a Fuse block (AdapterFusion; lifecycle/fusion_io.py)
    ROUTERS                       composed-site class -> router(gm, node, site) -> (routed module, call args) or
                                  the reason it is left alone: a multi_task site's weights stacked and gathered
                                  per row (passes/route_rows.py; methods/lora/route.py, methods/bottleneck/route.py)
    Config.combine_strategies     average_adapter strategies beyond "linear" (lifecycle/averaging.py)
    SLOT                          a SlotRule: how its adapters share, pad and fold in a swappable model, or why
                                  they cannot be swapped (methods/slot_rule.py; export/slots.py, swappable.py)
    """

    NAME: str
    Config: type[MethodConfig]
    PRESETS: dict[str, dict[str, Any]]
    ALIASES: dict[str, str]
    BLOCKS: tuple[str, ...]

    def emit(self, gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Any,
             path: str) -> Iterator[Placement]:
        """Insert the adapter's nodes into `gm`; one Placement per inserted module."""
        ...

    def site_modules(self, sites: SiteMap, name: str, config: Any, path: str,
                     gm: fx.GraphModule) -> list[SiteModule]:
        """The method's own module per site, for a composed site; the graph is left as is."""
        ...

    def composition_refusal(self, config: Any) -> str | None:
        """Why this config cannot join a composition block, or None when it can."""
        ...
