"""What every adapter method provides: a validated config dataclass and a graph emitter.

A method module defines `Config` (AdapterHub field names and defaults, validation in `validate`) and
an `emit(gm, sites, adapter, config)` generator that inserts the method's nodes and yields one
`Placement` per adapted site, so checkpoints can map parameters to the reference's keys.

Composition (passes/lower_composition.py, compose/rules.py) reads three more names of a method module:

    BLOCKS                     the composition blocks it may join (the reference's `supported_compositions`)
    composition_refusal(c)     optional: why config `c` cannot compose (None when it can)
    site_modules(sites, name, config, path, gm) -> list[SiteModule]
                               the method's own module per site, built without touching the graph
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import UserError
from .field_types import check_values


@dataclass
class MethodConfig:
    """Base of method configs. Field names are AdapterHub's, so its adapter_config.json loads as is."""

    architecture: ClassVar[str] = ""
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
