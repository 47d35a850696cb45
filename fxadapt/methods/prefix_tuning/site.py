"""Prefix tuning under a composition setup: the reference's PrefixTuningLayer (Stack, Parallel, BatchSplit).

At each attention core, for keys and values alike, each row gets the prefixes of the prefix adapters acting
on it, in setup order, each new one in front (the reference's compose_stack prepends):

    Stack(p, q):        K' = [P_q ; P_p ; K]                    every row
    Parallel(p, q):     rows of copy i:  [P_child_i ; K]        (inputs are replicated at the graph entry)
    BatchSplit(p, q):   rows [0, n_p): [P_p ; K], the next n_q rows: [P_q ; K]
    mask' = mask with L "attend" entries in front,  L = every row's total prefix length

A gated prefix (UniPELT, `use_gating`) is scaled per row by its gate on that row's attention input x, as alone:
g = mean_seq(sigmoid(W_g x + b_g)), keys by g[:, 0], values by g[:, -1] (module.gate_scores); a row's gate
reads that row's x, so in a Parallel copy i the gate sees copy i's hidden states.

Adapters of other methods in the setup (Stack(prefix, seq_bn)), and a union's other members, act at their own
sites. Rows whose prefixes differ in total length are refused: the reference pads the shorter ones with
pad-token keys that the row then attends (PrefixTuningLayer.pad_and_concat), which no single adapter would do.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ...attention_sites import AttentionCore, emitter_before
from ...composition import Block
from ...errors import UserError
from ...graph_edit import add_module
from ...graph_ops import aten
from ...sites import SiteMap
from ..base import Placement, SiteModule, freeze
from . import module as prefix_tuning

PASS = "lower_composition"
Segment = tuple[int | None, list[int]]  # (rows, or None for all rows of the copy; prefix inputs, front last)


class PrefixSite(nn.Module):
    """`forward(operand, axis, *prefixes, *gates)`: each prefix (kv_heads, P, d) is one adapter's key or value
    prefix at this core, and each gated adapter (`gated[i]`) adds its gate column (rows,) after the prefixes;
    `copies[i]` lists the row segments of Parallel copy i and which prefixes they take."""

    def __init__(self, copies: list[list[Segment]], heads: int, kv_heads: int, head_dim: int,
                 gated: list[bool] | None = None) -> None:
        super().__init__()
        self.copies = copies
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.gated = gated or []

    def forward(self, operand: torch.Tensor, axis: int, *inputs: torch.Tensor) -> torch.Tensor:
        count = len(inputs) - sum(self.gated)
        prefixes, gate_columns = inputs[:count], iter(inputs[count:])
        gates = [next(gate_columns) if i < len(self.gated) and self.gated[i] else None for i in range(count)]
        rows = operand.shape[0] // len(self.copies)
        parts, start = [], 0
        for segments in self.copies:
            for size, picks in segments:
                n = rows if size is None else size
                if any(gates[i] is not None for i in picks):
                    # Per row: each gated prefix times its row's gate (the same values as alone), then joined.
                    parts.append(torch.cat([self._rows(prefixes[i], n, gates[i], start) for i in reversed(picks)],
                                           dim=2))
                else:
                    prefix = torch.cat([prefixes[i] for i in reversed(picks)], dim=1)  # (kv_heads, L, d)
                    parts.append(self._rows(prefix, n, None, start))
                start = start + n
        prefix = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if axis == -1:  # eager attention multiplies by kᵀ
            prefix = prefix.transpose(-1, -2)
        return torch.cat([prefix, operand], dim=axis)

    def _rows(self, prefix: torch.Tensor, n: int, gate: torch.Tensor | None, start) -> torch.Tensor:
        """(kv_heads, L, d) -> (n, heads, L, d), times gate[start:start + n] per row when gated."""
        if self.heads != self.kv_heads:  # grouped-query attention: repeat like the model's repeat_kv
            prefix = prefix.unsqueeze(1).expand(self.kv_heads, self.heads // self.kv_heads, -1, -1)
            prefix = prefix.reshape(self.heads, -1, self.head_dim)
        prefix = prefix.unsqueeze(0).expand(n, -1, -1, -1)
        return prefix if gate is None else prefix * gate[start:start + n].view(-1, 1, 1, 1)


def _batch(block: Block) -> int | None:
    """The batch a BatchSplit pins (the outermost one's sum), or None."""
    if block.kind == "batch_split":
        return sum(block.splits)
    sizes = [_batch(c) for c in block.children if isinstance(c, Block)]
    return next((s for s in sizes if s is not None), None)


def _rows(setup: Block | str, n: int, present: set[str]) -> list[list[str]]:
    """Per row of n: the prefix adapters acting on it, in setup order."""
    if isinstance(setup, str):
        return [[setup] if setup in present else [] for _ in range(n)]
    if setup.kind == "batch_split":
        return [row for child, size in zip(setup.children, setup.splits, strict=True)
                for row in _rows(child, size, present)]
    result: list[list[str]] = [[] for _ in range(n)]
    for child in setup.children:  # a stack; other blocks hold no prefix adapter (their BLOCKS say so)
        result = [a + b for a, b in zip(result, _rows(child, n, present), strict=True)]
    return result


def segments(setup: Block | str, present: list[str]) -> list[tuple[int | None, list[str]]]:
    """Row segments of one Parallel copy with the prefix adapters each takes (consecutive equal rows merged)."""
    total = _batch(setup) if isinstance(setup, Block) else None
    rows = _rows(setup, total or 1, set(present))
    if total is None:
        return [(None, rows[0])]
    merged: list[tuple[int | None, list[str]]] = []
    for row in rows:
        if merged and merged[-1][1] == row:
            merged[-1] = (merged[-1][0] + 1, row)
        else:
            merged.append((1, row))
    return merged


def lower_prefix(gm: fx.GraphModule, spec, sites: SiteMap, paths: list, index: int,
                 modules: dict[str, SiteModule], shared: dict) -> tuple[int, list[Placement]]:
    """One pool call per adapter at this location, its gates per core; per core one PrefixSite for its keys and
    one for its values."""
    location = prefix_tuning.LOCATIONS[index]
    cores = prefix_tuning.attention_cores(gm, sites, "$.active")
    # The prefix config travels with its pool (make_group): a union adapter's is its prefix member's.
    configs = {n: item.module.config for n, item in modules.items()}
    members = {n: prefix_tuning.groups(cores, configs[n], spec.adapters[n].path).get(location, []) for n in modules}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    inserted, placements, pools, gates = 0, [], {}, {}
    for name, item in modules.items():
        path = add_module(gm, name, f"prefix_{location}", item.module)
        first = min((c.key_user[0] for c in members[name]), key=order.__getitem__)
        em = emitter_before(gm, first, _origin(name, location, members[name][0].layer))
        pools[name] = em.call_module(path, (), keep_val=False)
        inserted += len(em.created)
        placements += [Placement(name, prefix_tuning.NAME, "attn.prefix", -1, path, reference, 0)
                       for reference in prefix_tuning.aliases(cores)]
        for core in members[name] if configs[name].use_gating else []:
            gate = prefix_tuning.make_gate(core, configs[name])
            gate_path = add_module(gm, name, prefix_tuning.gate_site(core, location), gate)
            gates[(name, core.node)] = (gate_path, prefix_tuning.gate_input(sites, core))
            placements.append(prefix_tuning.gate_placement(name, core, gate_path))
    masks: dict[tuple, fx.Node] = {}
    for core in cores:
        present = [n for n in modules if any(c.node is core.node for c in members[n])]
        if present:
            inserted += _lower_core(gm, paths, core, present, configs, members, pools, gates, location, masks)
    return inserted + len(masks), placements


def _lower_core(gm: fx.GraphModule, paths: list, core: AttentionCore, present: list[str], configs: dict,
                members: dict, pools: dict[str, fx.Node], gates: dict, location: str, masks: dict) -> int:
    copies = [segments(branch, present) for branch in paths]
    lengths = {sum(configs[n].prefix_length for n in names) for copy in copies for _, names in copy}
    if len(lengths) > 1:
        raise UserError(f"$.active: at layer {core.layer}, rows of this setup get prefixes of different total "
                        f"lengths {sorted(lengths)}; fxadapt composes prefix tuning only where every row gets "
                        "the same length (give the adapters equal prefix_length, or activate them separately).")
    length = lengths.pop()
    if length == 0:
        return 0
    picks = [[(size, [present.index(n) for n in names]) for size, names in copy] for copy in copies]
    gated = [(n, core.node) in gates for n in present]
    origin = _origin(",".join(present), location, core.layer)
    path = add_module(gm, "composition", f"L{core.layer}_{location}", freeze(
        PrefixSite(picks, core.heads, core.kv_heads, core.head_dim, gated)))
    created = 0
    scores = {}
    if any(gated):  # before both users: the gate scales the keys and the values
        nodes = list(gm.graph.nodes)
        em = emitter_before(gm, min(core.key_user[0], core.value_user[0], key=nodes.index), origin)
        scores = {n: prefix_tuning.gate_scores(em, *gates[(n, core.node)]) for n in present if (n, core.node) in gates}
        created += len(em.created)
    for slot, ((user, arg), axis) in enumerate(((core.key_user, core.key_axis), (core.value_user, -2))):
        em = emitter_before(gm, user, origin)
        prefixes = []
        for name in present:
            position = next(i for i, c in enumerate(members[name]) if c.node is core.node)
            prefixes.append(em.call_function(aten.select.int, (pools[name], 0, 2 * position + slot), keep_val=False))
        # keys take the gate's column 0, values its last (the same column when shared_gating)
        columns = [em.call_function(aten.select.int, (scores[n], 1, -slot), keep_val=False) for n in scores]
        joined = em.call_module(path, (user.args[arg], axis, *prefixes, *columns), keep_val=False)
        user.args = user.args[:arg] + (joined,) + user.args[arg + 1:]
        created += len(em.created)
    return created + prefix_tuning.extend_mask(gm, core, length, origin, masks)


def _origin(adapter: str, location: str, layer: int) -> dict[str, object]:
    return {"adapter": adapter, "method": prefix_tuning.NAME, "pass": PASS, "site": f"attn.{location}",
            "layer": layer}
