"""Find attention cores with their query/key/value/mask operands, from graph structure alone.

A core is `scaled_dot_product_attention(q, k, v, mask)` or the eager pattern
`softmax(matmul(q, k^T) * scale + mask) -> matmul(p, v)` (see `fxadapt.sites`). Methods that change
what attention sees (prefix tuning adds key/value positions, prompt tuning adds sequence positions)
need the operands and the mask, which the projection-oriented site finder does not keep:

    sdpa:   mask is the `attn_mask` operand; bool (True = attend) or additive float (0 = attend)
    eager:  scores + mask (additive, 0 = attend), where(mask, scores, fill) (True = attend) or
            masked_fill(scores, mask, fill) (False = attend)

Operands are read from the current graph (late), so earlier rewrites are respected.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import fx

from . import meta
from .graph_edit import Emitter
from .graph_ops import ADD, ATTENTION, MATMUL, NORMS, SOFTMAX, aten, is_call, module_path, tensor_inputs
from .sites import LinearSite, SiteMap, _backtrace, _layer_prefix, attention_cores

_WHERE = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
_MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}


@dataclass
class MaskUse:
    """Where a core reads its mask: `user.args[index]` (int) or `user.kwargs[index]` (str)."""

    user: fx.Node
    index: int | str
    attend: bool | float = 0.0  # the mask value meaning "attend to this key"

    @property
    def node(self) -> fx.Node | None:
        if isinstance(self.index, int):
            return self.user.args[self.index] if len(self.user.args) > self.index else None
        return self.user.kwargs.get(self.index)

    def replace(self, new: fx.Node) -> None:
        """Point this core (only) at another mask; other cores sharing the old mask keep it."""
        if isinstance(self.index, int):
            args = list(self.user.args)
            args[self.index] = new
            self.user.args = tuple(args)
        else:
            self.user.kwargs = {**self.user.kwargs, self.index: new}


@dataclass
class AttentionCore:
    node: fx.Node  # the sdpa node, or the softmax of an eager core
    kind: str  # "sdpa" | "eager"
    layer: int
    module: str  # module path of the attention module that runs the core
    cross: bool
    scores: fx.Node | None  # eager: matmul(q, k^T)
    output: fx.Node  # sdpa node, or matmul(p, v)
    mask: MaskUse | None
    causal: bool  # sdpa with is_causal=True (the mask is implicit)
    heads: int  # heads of the key operand as the core sees it (after any GQA repeat)
    kv_heads: int  # heads of the key projection (before GQA repeat)
    head_dim: int
    hidden_size: int  # input width of the key projection

    # key/value operand holders: (node, arg index); key positions lie on `key_axis` of the key operand
    @property
    def key_user(self) -> tuple[fx.Node, int]:
        return (self.node, 1) if self.kind == "sdpa" else (self.scores, 1)

    @property
    def value_user(self) -> tuple[fx.Node, int]:
        return (self.node, 2) if self.kind == "sdpa" else (self.output, 1)

    @property
    def key_axis(self) -> int:
        return -2 if self.kind == "sdpa" else -1  # eager multiplies by k^T: keys on the last axis

    @property
    def key(self) -> fx.Node:
        user, index = self.key_user
        return user.args[index]

    @property
    def value(self) -> fx.Node:
        user, index = self.value_user
        return user.args[index]


def _reaches(start: fx.Node, target: fx.Node, limit: int = 32) -> bool:
    """Whether `target` is `start` or one of its ancestors within a few steps."""
    queue, seen = deque([start]), set()
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node is target:
            return True
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        queue.extend(tensor_inputs(node))
    return False


def _eager_mask(softmax: fx.Node, scores: fx.Node) -> MaskUse | None:
    """The mask on the path scores -> softmax: an additive term, a where() or a masked_fill()."""
    node = softmax.args[0]
    for _ in range(16):
        if node is scores or not isinstance(node, fx.Node):
            return None
        if is_call(node, ADD) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            main = 0 if _reaches(node.args[0], scores) else 1
            return MaskUse(node, 1 - main, 0.0)
        if is_call(node, _WHERE) and isinstance(node.args[0], fx.Node):  # where(keep, scores, fill) or reversed
            keeps = isinstance(node.args[1], fx.Node) and _reaches(node.args[1], scores)
            return MaskUse(node, 0, keeps)
        if is_call(node, _MASKED_FILL):
            return MaskUse(node, 1, False)
        parents = [p for p in tensor_inputs(node) if _reaches(p, scores)]
        if len(parents) != 1:
            return None
        node = parents[0]
    return None


def _sdpa_mask(core: fx.Node) -> tuple[MaskUse | None, bool]:
    mask = MaskUse(core, 3) if len(core.args) > 3 else MaskUse(core, "attn_mask")
    causal = bool(core.args[5] if len(core.args) > 5 else core.kwargs.get("is_causal", False))
    node = mask.node
    if node is None:
        return None, causal
    val = node.meta.get("val")
    mask.attend = True if val is not None and val.dtype == torch.bool else 0.0
    return mask, causal


def _projection_site(sites: SiteMap, operand: fx.Node) -> tuple[LinearSite | None, fx.Node | None]:
    hits = _backtrace(operand, NORMS | ATTENTION | SOFTMAX)
    if len(hits) != 1:
        return None, None
    projection = hits[0][0]
    site = next((s for s in sites.linears if projection in s.nodes), None)
    return site, projection


def find_attention_cores(gm: fx.GraphModule, sites: SiteMap) -> list[AttentionCore]:
    """Every attention core in graph order, with its layer (numbered as `sites` numbers layers)."""
    cores = []
    for node, q, k, _v, out in attention_cores(gm):
        if is_call(node, ATTENTION):
            kind, scores = "sdpa", None
            mask, causal = _sdpa_mask(node)
        else:
            kind, causal = "eager", False
            scores = next((u for u in k.users if is_call(u, MATMUL) and u.args[:2] == (q, k)), None)
            if scores is None:
                continue
            mask = _eager_mask(node, scores)
        prefix = _layer_prefix(module_path(node))
        if prefix not in sites.layer_prefixes:
            continue
        k_val = k.meta.get("val")
        if k_val is None or k_val.dim() != 4:
            continue
        heads = int(k_val.shape[1])
        head_dim = int(k_val.shape[-1] if kind == "sdpa" else k_val.shape[-2])
        site, projection = _projection_site(sites, k)
        kv_heads, hidden = heads, heads * head_dim
        if site is not None:
            width = site.out_features // (len(site.fused) if site.fused else 1)
            kv_heads, hidden = width // head_dim, site.in_features
        role = (meta.site_of(projection) or {}).get("role", "") if projection is not None else ""
        cores.append(AttentionCore(
            node, kind, sites.layer_prefixes.index(prefix), module_path(node), role.startswith("xattn"), scores,
            out, mask, causal, heads, kv_heads, head_dim, hidden,
        ))
    return cores


_ORDER_COMPARISONS = {aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.tril.default,
                      aten.triu.default}


def is_causal(core: AttentionCore) -> bool:
    """Whether a core masks by position order: sdpa's is_causal, or a mask built by comparing two position
    tensors (`kv_idx <= q_idx`) or with tril/triu. Padding-only masks compare with scalars only."""
    if core.causal:
        return True
    mask = core.mask.node if core.mask is not None else None
    queue, seen = deque([mask] if mask is not None else []), set()
    while queue and len(seen) < 256:
        node = queue.popleft()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if is_call(node, _ORDER_COMPARISONS):
            return True
        queue.extend(tensor_inputs(node))
    return False


def emitter_before(gm: fx.GraphModule, node: fx.Node, origin: dict[str, object]) -> Emitter:
    """An Emitter whose nodes go right before `node` (and inherit its metadata)."""
    emitter = Emitter(gm, node, origin)
    emitter.cursor = node.prev
    return emitter


def pad_mask(gm: fx.GraphModule, mask: fx.Node, pads: dict[int, int], attend: bool | float,
             origin: dict[str, object], cache: dict[tuple, fx.Node]) -> fx.Node:
    """`mask` with `pads[dim]` "attend" entries prepended on each dim (one node per mask and padding).

    Dims of size 1 broadcast over the longer axis and are left alone."""
    val = mask.meta.get("val")
    ndim = val.dim()
    amounts = [0] * ndim
    for dim, amount in pads.items():
        if val.shape[dim] != 1:
            amounts[dim % ndim] = amount
    key = (mask, tuple(amounts), attend)
    if key not in cache:
        flat: list[int] = []
        for amount in reversed(amounts):  # constant_pad_nd lists (left, right) from the last dim backwards
            flat += [amount, 0]
        while flat and flat[-2:] == [0, 0]:
            flat = flat[:-2]
        emitter = Emitter(gm, mask, origin)
        cache[key] = emitter.call_function(aten.constant_pad_nd.default, (mask, flat, attend), keep_val=False)
    return cache[key]


__all__ = ["AttentionCore", "MaskUse", "emitter_before", "find_attention_cores", "is_causal", "pad_mask"]
