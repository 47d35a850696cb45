"""Prefix tuning in a swappable model (methods/slot_rule.py, export/swappable.py): the prefix adapters of a spec
that agree outside their sizes share one slot, compiled at the longest prefix and the largest bottleneck, with an
additive mask over the prefix positions that the adapter files carry like the prefix weights:

    K' = [P_k ; K],  V' = [P_v ; V],  mask' = [m ; mask]       on the key axis, m: the slot's mask, (P_max,)
    adapter file of a prefix of length P:   prefix weights zero-padded,  m_i = 0 for i < P, MASKED beyond
    every other adapter's file:             m = MASKED everywhere (the identity: no prefix at all)

A masked position gets softmax weight exactly 0 (exp(MASKED - max) underflows to 0 in float32), so a shorter prefix
is exact, and "no prefix" is exact too: the sequence's own keys stay in the same softmax (a row never has every
position masked unless the model's own mask already masks all of its keys). Padding the prefix MLP is exact as well:
a padded wte row only makes a masked position, a padded bottleneck unit adds act(0 + 0) · 0. The mask takes the
form of each core's own mask: additive (0 = attend), bool (True = attend) or masked_fill's (False = attend).
Prefix adapters share a slot when they differ only in prefix length, bottleneck size, dropout and init; a model
holds one prefix slot (`one_slot`: prefixes of another config, e.g. flat and not, need separate models yet).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
from torch import fx, nn

from ... import meta
from ...attention_sites import AttentionCore, emitter_before
from ...errors import UserError
from ...graph_edit import Emitter
from ...graph_ops import aten
from ..slot_rule import SlotRule
from .module import Config, PrefixGroup

MASK_KEY = "mask"  # the slot module's buffer: the additive mask over its prefix positions
MASKED = float(np.finfo(np.float32).min)  # a masked position's mask value (finite: no inf - inf anywhere)


class SlotConfig(Config):
    """A prefix slot's config: a prefix config whose pool carries the mask (`group_class`, module.make_group)."""


class MaskedPrefixGroup(PrefixGroup):
    """A location's prefix pool with the slot's mask (`mask`, (P,)), joined to each core's mask by `join_mask`."""

    def __init__(self, location: str, prefixes: nn.Module) -> None:
        super().__init__(location, prefixes)
        self.register_buffer(MASK_KEY, torch.zeros(prefixes.shape[0]))

    def swap_identity(self, key: str, value: torch.Tensor) -> torch.Tensor | None:
        """The mask of "no prefix" (export/slots.py: identity values); None for the prefix weights (zeros)."""
        return torch.full_like(value, MASKED) if key == MASK_KEY else None

    def join_mask(self, gm: fx.GraphModule, core: AttentionCore, path: str, origin: dict,
                  cache: dict[tuple, fx.Node]) -> int:
        return join_mask(gm, core, path, origin, cache)


SlotConfig.group_class = MaskedPrefixGroup


def join_mask(gm: fx.GraphModule, core: AttentionCore, path: str, origin: dict, cache: dict[tuple, fx.Node]) -> int:
    """mask' = [m ; mask] at `core` (m: the `path` pool's mask, in the form of the core's mask); returns the nodes
    made. Cores that share a mask share the joined one (`cache`)."""
    if core.mask is None or core.mask.node is None:
        if not core.causal:
            raise UserError(f"--swappable: the attention at {core.module} has no attention mask, which a swappable "
                            "prefix needs to mask its unused positions; compile with an attention_mask input, or "
                            "without --swappable.")
        return _join_causal(gm, core, path, origin)
    old, attend = core.mask.node, core.mask.attend
    val = old.meta.get("val")
    if val is None or val.shape[-1] == 1:
        raise UserError(f"--swappable: the attention mask at {core.module} does not span the keys (it broadcasts "
                        "over them); a swappable prefix cannot be masked there. Compile without --swappable.")
    key = (old, path)
    if key in cache:
        core.mask.replace(cache[key])
        return 0
    em = emitter_before(gm, core.mask.user, origin)
    cache[key] = _joined(em, old, val.dim(), attend, _mask(em, path), val.dtype)
    core.mask.replace(cache[key])
    return len(em.created)


def _join_causal(gm: fx.GraphModule, core: AttentionCore, path: str, origin: dict) -> int:
    """sdpa(is_causal=True): the causal mask written out (bool), the prefix columns in front."""
    em = emitter_before(gm, core.node, origin)
    query = core.node.args[0]
    length = em.call_function(aten.sym_size.int, (query, -2))  # causal cores are self-attention: q and k align
    ones = em.call_function(aten.new_ones.default, (query, [length, length]), {"dtype": torch.bool}, keep_val=False)
    causal = em.call_function(aten.tril.default, (ones,), keep_val=False)
    mask = _joined(em, causal, 2, True, _mask(em, path), torch.bool)
    kwargs = {k: v for k, v in core.node.kwargs.items() if k not in ("attn_mask", "is_causal")}
    for position, name in ((4, "dropout_p"), (6, "scale"), (7, "enable_gqa")):
        if len(core.node.args) > position:
            kwargs[name] = core.node.args[position]
    core.node.args = tuple(core.node.args[:3])
    core.node.kwargs = {**kwargs, "attn_mask": mask, "is_causal": False}
    return len(em.created)


def _mask(em: Emitter, path: str) -> fx.Node:
    """A get_attr of the pool's mask, placed at the emitter's cursor."""
    with em.graph.inserting_after(em.cursor):
        node = em.graph.get_attr(f"{path}.{MASK_KEY}")
    node.meta[meta.ORIGIN] = dict(em.origin)
    em.created.append(node)
    em.cursor = node
    return node


def _joined(em: Emitter, old: fx.Node, ndim: int, attend: bool | float, mask: fx.Node, dtype: torch.dtype) -> fx.Node:
    """cat([m broadcast over the old mask's other dims, old], -1), m turned into the old mask's form."""
    call = em.call_function
    first = call(aten.slice.Tensor, (old, -1, 0, 1), keep_val=False)  # (..., 1): the old mask's other dims
    zeros = call(aten.zeros_like.default, (first,), {"dtype": torch.float32}, keep_val=False)
    row = call(aten.view.default, (mask, [1] * (ndim - 1) + [-1]), keep_val=False)
    part = call(aten.add.Tensor, (zeros, row), keep_val=False)  # (..., P), additive: 0 = attend
    if attend is True:
        part = call(aten.eq.Scalar, (part, 0), keep_val=False)
    elif attend is False:
        part = call(aten.ne.Scalar, (part, 0), keep_val=False)
    elif dtype != torch.float32:
        part = call(aten._to_copy.default, (part,), {"dtype": dtype}, keep_val=False)
    return call(aten.cat.default, ([part, old], -1), keep_val=False)


def _shareable(config: Config) -> bool:
    return not config.use_gating


def _refusal(config: Config) -> str | None:
    if config.use_gating:
        return "a gated prefix is scaled by a gate on the input, which its mask does not cover yet"
    return None


def _widen(configs: list[Config]) -> SlotConfig:
    """The longest prefix and the largest bottleneck of the slot's adapters."""
    values = {f.name: getattr(configs[0], f.name) for f in fields(configs[0])}
    values.update(prefix_length=max(c.prefix_length for c in configs),
                  bottleneck_size=max(c.bottleneck_size for c in configs))
    return SlotConfig(**values)


def _derived(config: Config, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The mask of an adapter of `config` in its slot: 0 on its own prefix positions, MASKED on the padding."""
    if key != MASK_KEY:
        return None
    mask = np.full(shape, MASKED, dtype=np.float32)
    mask[:config.prefix_length] = 0.0
    return mask


SLOT = SlotRule(free=("prefix_length", "bottleneck_size", "dropout", "init_weights_seed"),
                sites=("encoder_prefix", "cross_prefix", "leave_out"), shareable=_shareable, widen=_widen,
                refusal=_refusal, derived=_derived,
                in_union="a prefix is swappable as an adapter of its own (its slot's mask), not in a config union yet",
                one_slot="a second prefix slot would prefix the attention cores the first one already prefixes, which "
                         "the prefix rewrite does not do yet")
