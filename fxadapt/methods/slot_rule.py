"""How a method's adapters take part in a swappable model (export/slots.py, export/swappable.py).

A method module declares `SLOT = SlotRule(...)`; the export code reads it with `rule_of(method)` and never
switches on method names. A method without one keeps a slot of its own (never padded, never shared), is inserted
at its own sites, and is swappable unless the compile's per-file check finds its zeros are not the identity.

    shared slot:  adapters with `shareable(config)` whose configs agree outside `free` and `sites` are compiled once
                  as `widen(configs)` (the largest size, scaling 1); each adapter's file fills it zero-padded, its
                  `scaling(config, module)` folded into the tensors named in `fold`
    stacked:      its slots share residual sites through one Stack (bottleneck adapters), which is exact only when
                  they agree in the config fields named in `layout` (where they sit around the residual add)
    refusal:      why a config cannot be swapped by values alone (None: it can); `in_union`: why not as a union member;
                  `one_slot`: why a model holds at most one slot of the method
    derived:      slot tensors that are no checkpoint tensor, from the config (a prefix slot's mask)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _never(config: Any) -> bool:
    return False


def _one(config: Any, module: str) -> float:
    return 1.0


def _swappable(config: Any) -> str | None:
    return None


def _underived(config: Any, key: str, shape: tuple[int, ...]) -> None:
    return None


def _first(configs: list[Any]) -> Any:
    return configs[0]


@dataclass(frozen=True)
class SlotRule:
    """A method's swappable-slot rule (see the module docstring)."""

    # config fields adapters of one shared slot may differ in: size, scaling, training-only fields
    free: tuple[str, ...] = ()
    # config fields saying where the adapter acts; an exported checkpoint may cover a part of its slot's sites
    sites: tuple[str, ...] = ()
    # state-dict keys (of the adapter's modules) the adapter's scaling is folded into in a shared slot
    fold: tuple[str, ...] = ()
    # whether an adapter of this config fills a padded slot exactly
    shareable: Callable[[Any], bool] = _never
    # (config, reference module) -> the factor the adapter multiplies its `fold` tensors' output by there
    scaling: Callable[[Any, str], float] = _one
    # the configs of a shared slot's adapters -> the slot's config (largest size, scaling 1)
    widen: Callable[[list[Any]], Any] = _first
    # its adapters share residual sites through one Stack; `layout`: the fields that must agree for that
    stacked: bool = False
    layout: tuple[str, ...] = ()
    # config -> why it cannot be swapped, or None; `in_union`: why it cannot be swapped as a config union's member
    refusal: Callable[[Any], str | None] = _swappable
    in_union: str | None = None
    # why a model holds at most one slot of this method (adapters of another config cannot get a second one), or None
    one_slot: str | None = None
    # (config, key, shape) -> the value a slot tensor takes for an adapter of `config` where the adapter's own
    # compile or checkpoint has no such tensor (a prefix slot's mask), else None
    derived: Callable[[Any, str, tuple[int, ...]], Any] = _underived
    # the checkpoint format its saved adapters use ("adapterhub" or "peft": keys and file names)
    checkpoint: str = "adapterhub"


DEFAULT = SlotRule()


def rule_of(method: Any) -> SlotRule:
    """The method module's slot rule (DEFAULT where it declares none)."""
    return getattr(method, "SLOT", None) or DEFAULT


def refused(reason: str) -> Callable[[Any], str]:
    """A refusal that holds for every config of a method."""

    def refusal(config: Any) -> str:
        return reason

    return refusal
