"""Adapter methods: one package per family (config dataclass + graph emitter + its composed-site lowerers),
registered here by name, one line per method.

Names and presets follow AdapterHub's ADAPTER_CONFIG_MAP; a config's `architecture` field
(AdapterHub's adapter_config.json) picks the method module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..errors import UserError
from . import bottleneck, lora, prefix_tuning, reft, union
from .base import MethodConfig
from .lora import mtl as mtl_lora
from .prefix_tuning import prompt_tuning

# Method modules by AdapterHub `architecture`, one line per method. Bottleneck configs are saved without that field.
BY_ARCHITECTURE: dict[str, ModuleType] = {
    "bottleneck": bottleneck,
    "lora": lora,
    "prefix_tuning": prefix_tuning,
    "prompt_tuning": prompt_tuning,
    "reft": reft,
    "mtl_lora": mtl_lora,
    "union": union,
}

# AdapterHub config names fxadapt does not implement yet: a clear message, not "unknown".
PLANNED: set[str] = set()


def _presets() -> dict[str, tuple[ModuleType, dict[str, Any]]]:
    table: dict[str, tuple[ModuleType, dict[str, Any]]] = {}
    for module in BY_ARCHITECTURE.values():
        for name, values in module.PRESETS.items():
            table[name] = (module, values)
        for alias, target in module.ALIASES.items():
            table[alias] = (module, module.PRESETS[target])
    return table


PRESETS = _presets()


def method_for_name(name: str, path: str) -> tuple[ModuleType, dict[str, Any]]:
    """(method module, preset values) for a config name such as `seq_bn` or `lora`."""
    if name in PRESETS:
        return PRESETS[name]
    if name in PLANNED:
        raise UserError(f"{path}: adapter method {name!r} is not implemented in fxadapt yet; supported: "
                        f"{', '.join(sorted(PRESETS))}.")
    raise UserError(f"{path}: unknown adapter method {name!r}; supported: {', '.join(sorted(PRESETS))}.")


def method_for_config(values: dict[str, Any], path: str) -> ModuleType:
    """The method module of an AdapterHub config dict, by its `architecture` field."""
    architecture = values.get("architecture") or "bottleneck"
    if isinstance(architecture, str) and architecture in BY_ARCHITECTURE:
        return BY_ARCHITECTURE[architecture]
    raise UserError(f"{path}.architecture: unknown adapter architecture {architecture!r}; expected one of "
                    f"{', '.join(BY_ARCHITECTURE)}.")


def build_config(module: ModuleType, preset: dict[str, Any], overrides: dict[str, Any], path: str) -> MethodConfig:
    return module.Config.from_dict({**preset, **overrides}, path)


union.use_registry(method_for_name, method_for_config, build_config)  # union members are registered methods


__all__ = ["BY_ARCHITECTURE", "MethodConfig", "build_config", "method_for_config", "method_for_name"]
