"""Find adapter sites in a captured graph from its structure alone.

Roles (model-agnostic):
- `attn.q/k/v` — projections feeding an attention core's query/key/value (through reshapes, RoPE,
  head repeats); `attn.qkv` when one fused projection feeds all three through a split (GPT-2).
- `attn.o` — the projection consuming the attention core's output.
- `ffn.up/gate/down` — a `linear -> activation -> linear` chain whose last projection feeds a residual
  add; in a gated FFN `down(act(gate(x)) * up(x))` the branch through the activation is the gate.
- `residual.attn` / `residual.ffn` — the residual add after each sub-layer, with the post-residual
  LayerNorm where the model has one inside the same layer (post-LN models such as BERT).
- `embeddings` — the residual stream entering the first layer.
Cross-attention cores (query and key projected from different tensors) get `xattn.*` roles.

An attention core is `scaled_dot_product_attention`, or `softmax` fed by `matmul(q, k^T)` and feeding
`matmul(p, v)` (eager attention). Layers are numbered in graph order of their module-path prefix
(`encoder.layer.3`), which matches the reference's numbering, decoder after encoder.
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import fx

from . import meta
from .graph_ops import (
    ACTIVATIONS,
    ADDMM,
    ATTENTION,
    MATMUL,
    NORMS,
    PASS_THROUGH,
    SOFTMAX,
    aten,
    is_call,
    is_projection,
    module_path,
    tensor_inputs,
    weight_node,
)
from .residual_walk import next_sublayer_add, residual_add, shape_of

# Scores with a bias folded in: baddbmm(bias, q, k^T) (ALiBi in BLOOM).
_BADDBMM = {aten.baddbmm.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
_MAX_WALK = 400


@dataclass
class LinearSite:
    """A projection the LoRA family can adapt. All graph nodes that use the same weight are adapted
    together, as replacing the module does in the reference."""

    role: str
    layer: int
    module: str
    weight: str  # get_attr target of the weight
    nodes: list[fx.Node]
    layout: str  # "linear": weight [out, in]; "addmm": weight [in, out] (Conv1D)
    in_features: int
    out_features: int
    fused: tuple[str, ...] = ()  # for attn.qkv: the roles of the equal output chunks, in order


@dataclass
class ResidualSite:
    """The residual add after a sub-layer: out = norm(h + x) (post-LN) or h + x (pre-LN)."""

    role: str
    layer: int
    module: str  # module path of the add
    projection_module: str  # module path of the sub-layer's output projection
    add: fx.Node
    hidden_index: int  # which operand of `add` is h, the sub-layer output; the other is x
    norm: fx.Node | None
    hidden_size: int

    # h and x are read from the add's current operands: an earlier rewrite (an adapter at the
    # previous sub-layer) may have rerouted x.
    @property
    def hidden(self) -> fx.Node:
        return self.add.args[self.hidden_index]

    @property
    def residual(self) -> fx.Node:
        return self.add.args[1 - self.hidden_index]

    @property
    def output(self) -> fx.Node:
        return self.norm if self.norm is not None else self.add


@dataclass
class SiteMap:
    linears: list[LinearSite] = field(default_factory=list)
    residuals: list[ResidualSite] = field(default_factory=list)
    embeddings: fx.Node | None = None
    layer_prefixes: list[str] = field(default_factory=list)
    gated_ffn: bool = False

    def linear(self, role: str, layer: int) -> LinearSite | None:
        return next((s for s in self.linears if s.role == role and s.layer == layer), None)

    def residual(self, role: str, layer: int) -> ResidualSite | None:
        return next((s for s in self.residuals if s.role == role and s.layer == layer), None)

    @property
    def num_layers(self) -> int:
        return len(self.layer_prefixes)


def _layer_prefix(path: str) -> str | None:
    match = re.match(r"^(.*?\.\d+)(\.|$)", path)
    return match.group(1) if match else None


def _backtrace(start: fx.Node, stop_ops: set) -> list[tuple[fx.Node, int | None, bool]]:
    """Projections reachable backwards from `start` without crossing a projection or a stop op.

    Returns (projection, split index or None, passed an activation) per projection found; the
    activation flag is OR-ed over all paths (GPT-2's tanh-GELU reaches c_fc both ways)."""
    found: dict[fx.Node, tuple[int | None, bool]] = {}
    seen: set[tuple[fx.Node, int | None, bool]] = set()
    queue = deque([(start, None, False)])
    while queue and len(seen) < _MAX_WALK:
        node, chunk, act = queue.popleft()
        if (node, chunk, act) in seen:
            continue
        seen.add((node, chunk, act))
        if is_projection(node):
            old = found.get(node, (chunk, False))
            found[node] = (old[0] if old[0] is not None else chunk, old[1] or act)
            continue
        if node.op != "call_function" or is_call(node, stop_ops):
            continue
        act_here = act or is_call(node, ACTIVATIONS)
        if node.target is operator.getitem and is_call(node.args[0], _SPLITS):
            queue.append((node.args[0], node.args[1], act_here))
            continue
        for parent in tensor_inputs(node):
            queue.append((parent, chunk, act_here))
    return [(n, c, a) for n, (c, a) in found.items()]


def _splits_features(projection: fx.Node) -> bool:
    """Whether the projection's output is split along its whole feature axis ([q | k | v] blocks, GPT-2's
    c_attn), not after a view into heads (per-head [q k v] groups, GPT-NeoX)."""
    features = shape_of(projection)[-1] if shape_of(projection) else None
    queue, seen, splits = deque([projection]), set(), []
    while queue and len(seen) < 32:
        for user in queue.popleft().users:
            if user in seen:
                continue
            seen.add(user)
            if is_call(user, _SPLITS):
                splits.append(user)
            elif is_call(user, PASS_THROUGH) and user.target is not operator.getitem:
                queue.append(user)
    for split in splits:
        shape = shape_of(split.args[0])
        position = 1 if is_call(split, {aten.unbind.int}) else 2
        dim = split.args[position] if len(split.args) > position else split.kwargs.get("dim", 0)
        # The split axis must be the outermost of the feature axes: [..., 3·h] or [..., 3, h], not [..., heads, 3·d].
        if shape is None or math.prod(shape[dim % len(shape):]) != features:
            return False
    return bool(splits)


def _forward_projection(start: fx.Node) -> fx.Node | None:
    """The first projection reached forwards from `start` through data-movement ops only."""
    queue, seen = deque([start]), set()
    while queue and len(seen) < _MAX_WALK:
        node = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if is_projection(user):
                return user
            if is_call(user, PASS_THROUGH):
                queue.append(user)
    return None


def _core_operands(core: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(q, k, v, output) operand nodes of an attention core."""
    if is_call(core, ATTENTION):
        return core.args[0], core.args[1], core.args[2], core
    # Eager attention: softmax(matmul(q, k^T) ...) -> matmul(p, v).
    scores = None
    queue, seen = deque([core.args[0]]), set()
    while queue and len(seen) < 64:
        node = queue.popleft()
        if node in seen or node.op != "call_function" or is_projection(node):
            continue
        seen.add(node)
        if (is_call(node, MATMUL) and len(node.args) >= 2) or is_call(node, _BADDBMM):
            scores = node
            break
        queue.extend(tensor_inputs(node))
    out = None
    queue, seen = deque([core]), set()
    while queue and out is None:
        node = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if is_call(user, MATMUL) and user.args[0] is node:
                out = user
                break
            if is_call(user, PASS_THROUGH):
                queue.append(user)
    if scores is None or out is None:
        return None
    q, k = scores.args[1:3] if is_call(scores, _BADDBMM) else scores.args[:2]
    return q, k, out.args[1], out


def attention_cores(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(core, q, k, v, output) for every attention core (sdpa, or eager softmax) in graph order."""
    for node in gm.graph.nodes:
        if is_call(node, ATTENTION) or is_call(node, SOFTMAX):
            operands = _core_operands(node)
            if operands is not None:
                yield (node, *operands)


def _projection_info(node: fx.Node, gm: fx.GraphModule) -> tuple[str, int, int]:
    weight = weight_node(node)
    tensor = gm.get_parameter(weight.target) if weight.target in dict(gm.named_parameters()) else getattr(
        gm, weight.target
    )
    if is_call(node, ADDMM):
        return "addmm", tensor.shape[0], tensor.shape[1]
    return "linear", tensor.shape[1], tensor.shape[0]


def find_sites(gm: fx.GraphModule) -> SiteMap:
    """Tag the graph's nodes with site roles (`meta.SITE`) and return the site map."""
    sites = SiteMap()
    prefixes: list[str] = []

    def layer_of(path: str) -> int:
        prefix = _layer_prefix(path)
        if prefix is None:
            return -1
        if prefix not in prefixes:
            prefixes.append(prefix)
        return prefixes.index(prefix)

    # Every projection that uses one weight is adapted together.
    by_weight: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        w = weight_node(node)
        if w is not None:
            by_weight.setdefault(w.target, []).append(node)

    roles: dict[str, tuple[str, int, tuple[str, ...]]] = {}  # weight -> (role, layer, fused roles)
    attn_outputs: list[tuple[fx.Node, str]] = []

    def claim(node: fx.Node, role: str, fused: tuple[str, ...] = ()) -> None:
        weight = weight_node(node).target
        if weight not in roles:
            roles[weight] = (role, layer_of(module_path(node)), fused)

    for _core, q, k, v, out in attention_cores(gm):
        found = {}
        for name, operand in (("q", q), ("k", k), ("v", v)):
            hits = _backtrace(operand, NORMS | ATTENTION | SOFTMAX)
            if len(hits) == 1:
                found[name] = hits[0]
        if not found:
            continue
        inputs = {name: hit[0].args[1 if is_call(hit[0], ADDMM) else 0] for name, hit in found.items()}
        cross = "q" in inputs and "k" in inputs and inputs["q"] is not inputs["k"]
        kind = "xattn" if cross else "attn"
        projections = {hit[0] for hit in found.values()}
        fused_projection = next(iter(projections)) if len(projections) == 1 else None
        if fused_projection is not None and all(hit[1] is not None for hit in found.values()) \
                and _splits_features(fused_projection):
            fused = tuple(sorted(found, key=lambda n: found[n][1]))
            claim(fused_projection, f"{kind}.qkv", fused)
        elif fused_projection is not None:
            # One projection feeds q, k and v through a per-head interleaved layout (BLOOM's, Falcon's and
            # GPT-NeoX's query_key_value): no [q | k | v] blocks to adapt apart, so it is adapted whole under
            # the query's role, as PEFT adapts `query_key_value`.
            claim(fused_projection, f"{kind}.q")
        else:
            for name, (proj, _, _) in found.items():
                claim(proj, f"{kind}.{name}")
        o_proj = _forward_projection(out)
        if o_proj is not None:
            claim(o_proj, f"{kind}.o")
            attn_outputs.append((o_proj, kind))

    ffn_downs: list[fx.Node] = []
    for weight, nodes in by_weight.items():
        if weight in roles:
            continue
        down = nodes[0]
        if residual_add(down) is None:
            continue
        inp = down.args[1] if is_call(down, ADDMM) else down.args[0]
        hits = _backtrace(inp, NORMS | ATTENTION | SOFTMAX)
        if not hits or not any(act for _, _, act in hits):
            continue
        if len(hits) == 1:
            claim(hits[0][0], "ffn.up")
        elif len(hits) == 2 and hits[0][2] != hits[1][2]:
            for proj, _, act in hits:
                claim(proj, "ffn.gate" if act else "ffn.up")
            sites.gated_ffn = True
        else:
            continue
        claim(down, "ffn.down")
        ffn_downs.append(down)

    for weight, (role, layer, fused) in roles.items():
        nodes = by_weight[weight]
        layout, fan_in, fan_out = _projection_info(nodes[0], gm)
        site = LinearSite(role, layer, module_path(nodes[0]), weight, nodes, layout, fan_in, fan_out, fused)
        sites.linears.append(site)
        for node in nodes:
            node.meta[meta.SITE] = {"role": role, "layer": layer, "module": site.module}

    residual_roles = [(o, "residual." + kind) for o, kind in attn_outputs] + [
        (d, "residual.ffn") for d in ffn_downs
    ]
    for projection, role in residual_roles:
        found_add = residual_add(projection)
        if found_add is None:
            continue
        add, hidden, _ = found_add
        _add_residual(sites, role, layer_of(module_path(projection)), add, hidden, module_path(projection))
    # A sub-layer without projections of its own (a mixture of experts whose experts are stored as one
    # batched tensor) still has its residual add: the add after the attention's, fed by it and by a
    # value computed from it.
    for site in [s for s in sites.residuals if s.role == "residual.attn"]:
        if sites.residual("residual.ffn", site.layer) is None:
            found_add = next_sublayer_add(site.output)
            if found_add is not None and _layer_prefix(module_path(found_add[0])) == _layer_prefix(site.module):
                add, hidden = found_add
                _add_residual(sites, "residual.ffn", site.layer, add, hidden, module_path(hidden))

    sites.linears.sort(key=lambda s: (s.layer, s.role))
    sites.residuals.sort(key=lambda s: (s.layer, s.role))
    sites.layer_prefixes = prefixes
    first = [s for s in sites.residuals if s.layer == 0]
    if first:
        sites.embeddings = min(first, key=lambda s: list(gm.graph.nodes).index(s.add)).residual
        sites.embeddings.meta.setdefault(meta.SITE, {"role": "embeddings", "layer": -1, "module": ""})
    return sites


def _add_residual(sites: SiteMap, role: str, layer: int, add: fx.Node, hidden: fx.Node, projection_module: str) -> None:
    users = list(add.users)
    norm = None
    # Post-LN: the add's only consumer is a LayerNorm of the same layer (a final norm outside the
    # layer, like GPT-2's ln_f after the last block, is not part of the sub-layer).
    if len(users) == 1 and is_call(users[0], NORMS):
        if _layer_prefix(module_path(users[0])) == _layer_prefix(module_path(add)):
            norm = users[0]
    shape = shape_of(add)
    site = ResidualSite(role, layer, module_path(add), projection_module, add, add.args.index(hidden), norm,
                        shape[-1] if shape else -1)
    sites.residuals.append(site)
    add.meta[meta.SITE] = {"role": role, "layer": layer, "module": site.module}


def describe(sites: SiteMap) -> str:
    """A per-layer table of the sites, for `fxadapt sites`."""
    lines = []
    for index, prefix in enumerate(sites.layer_prefixes):
        lines.append(f"layer {index}  ({prefix})")
        for site in sites.linears:
            if site.layer == index:
                extra = f" fused {'/'.join(site.fused)}" if site.fused else ""
                lines.append(
                    f"  {site.role:<14} {site.module:<48} {site.layout} {site.in_features}->{site.out_features}"
                    f"{extra}"
                )
        for site in sites.residuals:
            if site.layer == index:
                norm = "post-LN " + module_path(site.norm) if site.norm is not None else "pre-LN"
                lines.append(f"  {site.role:<14} {site.module:<48} {norm}")
    if sites.embeddings is not None:
        lines.append(f"embeddings: {sites.embeddings.name}")
    if sites.gated_ffn:
        lines.append("ffn: gated (act(gate(x)) * up(x))")
    return "\n".join(lines)
