"""Slots of a swappable model: adapters of one kind at the same sites share one set of adapter tensors.

    slot of LoRA adapters k = 1..N:   y' = y + B_s A_s x,   A_s = [A_k; 0],  B_s = [s_k B_k, 0]   (rank r_s = max r_k)
    slot of bottlenecks:              A(t) = up_s(act(down_s t)),  down_s = [D_k; 0],  up_s = [s_k U_k, 0]

The slot is compiled at the largest rank / bottleneck size of its adapters, with scaling 1; an adapter's file
fills it zero-padded, with the adapter's own scaling s_k folded into its B / up weights (and biases). Exact:
a padded LoRA rank unit adds 0 (its A row and B column are 0), a padded bottleneck unit adds act(0) · 0 (its up
column is 0). So the model's adapter cost grows with the number of *kinds* of adapters, not adapters, and a
checkpoint of a smaller rank (or of a subset of the slot's sites) fits an existing slot (`fxadapt adapters
export`). Adapters a slot cannot pad exactly (DoRA: its row norm is over the unscaled B A; VeRA's shared
matrices; Compacter's Kronecker factors; ReFT; unions) keep a slot of their own, at their own size. Which
adapters share a slot, the fields they may differ in, the slot's config and the scaling folded: the method's
SlotRule (`method.SLOT`, methods/slot_rule.py); a method without one keeps a slot of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..errors import UserError
from ..methods.slot_rule import rule_of
from ..spec import AdapterDef, Spec


def shareable(adapter: AdapterDef) -> bool:
    """Whether the adapter can fill a padded slot exactly (its method's SlotRule decides)."""
    return rule_of(adapter.method).shareable(adapter.config)


def kind_key(method: Any, config_dict: dict[str, Any]) -> str:
    """The config without the fields adapters of one slot may differ in: equal keys share a slot."""
    free = rule_of(method).free
    return json.dumps([method.NAME, {k: v for k, v in sorted(config_dict.items()) if k not in free}], default=str)


def differences(method: Any, config_dict: dict[str, Any], slot_dict: dict[str, Any]) -> list[str]:
    """The config fields (beyond size, scaling and sites) in which a checkpoint differs from a slot."""
    rule = rule_of(method)
    keys = (set(config_dict) | set(slot_dict)) - set(rule.free) - set(rule.sites)
    return sorted(k for k in keys if json.dumps(config_dict.get(k), default=str) != json.dumps(slot_dict.get(k),
                                                                                                default=str))


def folded(method: Any, config: Any, module: str, key: str, value: np.ndarray) -> np.ndarray:
    """A padded slot tensor `key` at `module` with the adapter's scaling folded in, where its method folds it."""
    rule = rule_of(method)
    if key not in rule.fold:
        return value
    return value * np.asarray(rule.scaling(config, module), value.dtype)


def slot_config(adapters: list[AdapterDef]) -> Any:
    """The config of a slot: the first adapter's, at the largest size of all, with scaling 1."""
    return rule_of(adapters[0].method).widen([a.config for a in adapters])


@dataclass
class Slots:
    """Which slot holds each adapter (`of`), the adapters of each slot, and the spec compiled: one adapter
    per slot (`compiled`, the slot's name); `shared` are the padded slots (the others are an adapter itself)."""

    of: dict[str, str]
    members: dict[str, list[str]]
    shared: set[str]
    compiled: dict[str, AdapterDef]


def group(spec: Spec) -> Slots:
    """The slots of a swappable spec: shareable adapters of one method and key together, the others alone."""
    groups: dict[str, list[str]] = {}
    for name, adapter in spec.adapters.items():
        key = kind_key(adapter.method, adapter.config.to_dict()) if shareable(adapter) else f"alone:{name}"
        groups.setdefault(key, []).append(name)
    of, members, shared, compiled = {}, {}, set(), {}
    taken = set(spec.adapters)
    for key, names in groups.items():
        first = spec.adapters[names[0]]
        if key.startswith("alone:"):
            slot, definition = names[0], first
        else:
            slot = f"{first.method.NAME}_slot"
            while slot in taken:  # a slot's name is never an adapter's (both name graph modules)
                slot += "_"
            definition = AdapterDef(slot, first.method, slot_config([spec.adapters[n] for n in names]), first.path)
            shared.add(slot)
        taken.add(slot)
        members[slot] = names
        compiled[slot] = definition
        of.update(dict.fromkeys(names, slot))
    return Slots(of, members, shared, compiled)


def pad(value: np.ndarray, shape: tuple[int, ...], blocks: int = 1) -> np.ndarray | None:
    """`value` zero-padded at the end of every dimension to `shape` (None if it is larger somewhere). With
    `blocks` > 1 dimension 0 holds that many equal blocks (a fused q/k/v LoRA's stacked A), each padded."""
    if value.ndim != len(shape) or any(have > want for have, want in zip(value.shape, shape, strict=True)):
        return None
    if blocks > 1:
        if value.shape[0] % blocks or shape[0] % blocks:
            return None
        parts = np.split(value, blocks, axis=0)
        inner = (shape[0] // blocks, *shape[1:])
        padded = [pad(p, inner) for p in parts]
        return None if any(p is None for p in padded) else np.concatenate(padded, axis=0)
    out = np.zeros(shape, dtype=value.dtype)
    out[tuple(slice(0, d) for d in value.shape)] = value
    return out


def identity_value(gm: fx.GraphModule, path: str, module: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """The value of `module`'s tensor `key` with which the adapter is the identity (see swappable.py)."""
    declared = getattr(module, "swap_identity", None)  # a module that knows its own (a prefix slot's mask)
    own = declared(key, value) if declared is not None else None
    if own is not None:
        return own
    if getattr(module, "composition", None) == "scale" and key == "lora_B":
        return torch.full_like(value, 1.0 / module.scaling)  # (IA)^3: y' = y ⊙ (alpha · l), identity l = 1/alpha
    if getattr(module, "composition", None) == "replace" and key in ("m.weight", "lora_magnitude_vector"):
        # DoRA: m / ||W + B A||_row ⊙ y is y for B = 0 and m = ||W||_row (of the base weight, read from the graph)
        return _base_row_norm(gm, path, module).reshape(value.shape).to(value.dtype)
    return torch.zeros_like(value)


def _base_row_norm(gm: fx.GraphModule, path: str, module: nn.Module) -> torch.Tensor:
    """||W||_row of the projection a DoRA module `path` replaces: its call's weight argument (x, y, W, b)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == path and isinstance(node.args[2], fx.Node) \
                and node.args[2].op == "get_attr":
            weight: Any = gm
            for part in str(node.args[2].target).split("."):
                weight = getattr(weight, part)
            weight = weight.detach()
            return torch.linalg.norm(weight.t() if getattr(module, "transposed", False) else weight, dim=1)
    raise UserError(f"--swappable: the DoRA module {path} does not read its projection's weight from the graph; "
                    "compile this adapter without --swappable.")


def fill_value(identity: torch.Tensor) -> float:
    return float(identity.flatten()[0]) if identity.numel() else 0.0
