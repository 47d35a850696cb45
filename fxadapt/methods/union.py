"""Config unions (AdapterHub's ConfigUnion): several methods under one adapter name.

    "prefix_tuning|par_bn"   or   {"architecture": "union", "configs": [{...}, {...}]}
    mam     = prefix_tuning[bottleneck_size=800] | par_bn             (He et al., 2022)
    unipelt = prefix_tuning[prefix_length=10] | seq_bn | lora[r=8,alpha=2], all gated (Mao et al., 2022)

Each member is emitted by its own method under the shared adapter name, so the checkpoint keys are
the members' own. The reference's pairwise rule applies: two members of one architecture conflict,
except bottleneck members at different locations (mh_adapter / output_adapter) or with a leave_out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import fx

from ..errors import UserError
from ..sites import SiteMap
from .base import MethodConfig, Placement, SiteModule

NAME = "union"

# The registry's lookups (fxadapt/methods/__init__.py), handed over by `use_registry` when the registry is built:
# members are any registered method, and importing the registry here would close the cycle methods <-> union.
_lookups: dict[str, Callable[..., Any]] = {}


def use_registry(method_for_name: Callable[..., Any], method_for_config: Callable[..., Any],
                 build_config: Callable[..., Any]) -> None:
    _lookups.update(method_for_name=method_for_name, method_for_config=method_for_config, build_config=build_config)


# Every block some member may join; `blocks_for` narrows it to the blocks all of a union's members join (in the
# reference each member's layer composes the setup by its own supported_compositions, and one that cannot fails).
BLOCKS: tuple[str, ...] = ("stack", "parallel", "fuse", "split", "batch_split", "average", "multi_task")


@dataclass
class Config(MethodConfig):
    architecture = "union"
    members: list[tuple[ModuleType, MethodConfig]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: str) -> Config:
        configs = values.get("configs")
        extra = sorted(set(values) - {"architecture", "configs"})
        if extra or not isinstance(configs, list) or not configs:
            raise UserError(f"{path}: a union config is {{\"architecture\": \"union\", \"configs\": [...]}} with at "
                            f"least one member config{f'; unknown keys {extra}' if extra else ''}.")
        members = []
        for i, member in enumerate(configs):
            member_path = f"{path}.configs[{i}]"
            if not isinstance(member, dict):
                raise UserError(f"{member_path}: expected a config object.")
            module = _lookups["method_for_config"](member, member_path)
            if module.NAME == NAME:
                raise UserError(f"{member_path}: a union cannot contain another union.")
            members.append((module, module.Config.from_dict(member, member_path)))
        return cls.of(members, path)

    @classmethod
    def of(cls, members: list[tuple[ModuleType, MethodConfig]], path: str) -> Config:
        config = cls(members)
        config.validate(path)
        return config

    def validate(self, path: str) -> None:
        for i, (_, a) in enumerate(self.members):
            for j, (_, b) in enumerate(self.members[:i]):
                if a.architecture != b.architecture or getattr(a, "leave_out", []) or getattr(b, "leave_out", []):
                    continue
                if a.architecture == "bottleneck" and a.mh_adapter != b.mh_adapter and \
                        a.output_adapter != b.output_adapter:
                    continue
                raise UserError(f"{path}: union members {j} and {i} are both {a.architecture} adapters at the same "
                                "place and cannot be combined (the reference's ConfigUnion rule).")

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": "union", "configs": [config.to_dict() for _, config in self.members]}


def describe_sites(config: Config) -> str:
    """For insert_adapters' "no site for this adapter" error."""
    return "the sites of its members"


def blocks_for(config: Config) -> tuple[str, ...]:
    """The blocks this union may join: those every member joins (compose/rules.py asks)."""
    return tuple(b for b in BLOCKS if all(b in _member_blocks(module, member) for module, member in config.members))


def _member_blocks(module: ModuleType, member: MethodConfig) -> tuple[str, ...]:
    narrowed = getattr(module, "blocks_for", None)
    return tuple(narrowed(member)) if narrowed is not None else tuple(getattr(module, "BLOCKS", ()))


def composition_refusal(config: Config) -> str | None:
    """The first member's reason not to compose, naming the member."""
    for i, (module, member) in enumerate(config.members):
        check = getattr(module, "composition_refusal", None)
        reason = check(member) if check is not None else None
        if reason is not None:
            return f"its member {i} ({module.NAME}): {reason}"
    return None


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """Each member's own modules, under the shared adapter name. A composed site holds one module per adapter
    name, so two members acting at one site (e.g. LoRA members told apart only by leave_out, or two members
    with shared tensors) cannot compose."""
    found: list[SiteModule] = []
    owner: dict[tuple[str, int], int] = {}
    for i, (module, member) in enumerate(config.members):
        for item in module.site_modules(sites, name, member, f"{path}.configs[{i}]", gm):
            # lower_composition keeps one set of "shared" tensors per adapter name, whatever their index
            other = owner.setdefault((item.kind, None if item.kind == "shared" else item.index), i)
            if other != i:
                where = "have shared tensors" if item.kind == "shared" else \
                    f"act at the same {item.kind} site ({item.reference_module})"
                raise UserError(f"{path}: union members {other} and {i} both {where}; fxadapt composes a union only "
                                "where each site (and the shared tensors) belongs to one member. Activate the union "
                                "alone, or split it into two adapters.")
            found.append(item)
    return found


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    for i, (module, member) in enumerate(config.members):
        yield from module.emit(gm, sites, adapter, member, f"{path}.configs[{i}]")


# Named unions: member (config name, overrides) pairs, as AdapterHub's MAMConfig / UniPELTConfig.
NAMED: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "mam": [("prefix_tuning", {"bottleneck_size": 800}), ("par_bn", {})],
    "unipelt": [("prefix_tuning", {"prefix_length": 10, "use_gating": True}),
                ("seq_bn", {"reduction_factor": 16, "use_gating": True}),
                ("lora", {"r": 8, "alpha": 2, "use_gating": True})],
}


PRESETS: dict[str, dict[str, Any]] = {}  # named unions resolve through `from_chunks`, not as presets
ALIASES: dict[str, str] = {}


def from_chunks(chunks: list[tuple[str, dict[str, Any]]], path: str) -> Config:
    """A union from parsed config-string chunks (`lora[r=4]|seq_bn`), expanding `mam` and `unipelt`."""
    expanded: list[tuple[str, dict[str, Any]]] = []
    for name, overrides in chunks:
        if name in NAMED:
            if overrides:
                raise UserError(f"{path}: {name!r} takes no options; write its members out instead, e.g. "
                                + "|".join(f"{n}[...]" for n, _ in NAMED[name]) + ".")
            expanded += NAMED[name]
        else:
            expanded.append((name, overrides))
    members = []
    for i, (name, overrides) in enumerate(expanded):
        module, preset = _lookups["method_for_name"](name, f"{path}[{i}]")
        members.append((module, _lookups["build_config"](module, preset, overrides, f"{path}[{i}]")))
    return Config.of(members, path)
