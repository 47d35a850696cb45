"""Optimization pass: adapter branches that read the same tensor become one wider product.

    sibling LoRAs (q, k, v; gate, up)   Δ_i = s_i B_i A_i x
        ==>  h = [s_1 A_1; ...; s_n A_n] x          one GEMM, rank r_1 + ... + r_n
             Δ_i = B_i h[r_1 + ... + r_(i-1) : ... + r_i]
    PEFT LoRA bias                      s (B A x + b_B)  ==>  B (s A x) + s b_B
    VeRA                                s Λ_b B Λ_d A x  ==>  factors (s Λ_d A, Λ_b B), A and B its shared ones
    Average of LoRAs at one site        y' = y + 1/N Σ_c w_c s_c B_c A_c x
        ==>  y' = y + [B_1 | ... | B_N] ([w_1 s_1 / N A_1; ...; w_N s_N / N A_N] x)

so n sibling adapters take n + 1 products instead of 2n, and an Average of N LoRAs 2 instead of 2N (and its
A rows join its siblings' GEMM). Exact up to float rounding: only the order of sums and the place of the
scalar scalings change. What is fused is plain low-rank updates: AdapterHub LoRA (ungated, not a fused q/k/v
LoRA), VeRA (ungated) and PEFT LoRA, alone (insert_adapters), and LoRA / PEFT LoRA under a composed site
(lower_composition's LoRASite) whose setup is one adapter or an Average of adapters. Everything else is left
alone, with its reason in `gm.meta["fxadapt"]["fused"]["left"]` (DoRA rescales the whole output by a norm,
gates average over the sequence, dropout is random in training mode); the groups made and the graph's op and
product counts before and after (passes/op_counts.py) are recorded beside it, and report.json shows them.
New weights are new tensors (`fxadapt._fused.L<layer>_<input>`), so the adapters' own weights are untouched.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxadapt import meta
from fxadapt.composition import Block
from fxadapt.graph_edit import add_module
from fxadapt.graph_ops import aten
from fxadapt.methods.lora import LoRA
from fxadapt.methods.lora.peft import PeftLoRA
from fxadapt.methods.lora.site import LoRASite
from fxadapt.methods.lora.vera import VeRA

from .manager import PassResult
from .op_counts import op_counts

PASS = "fuse_parallel_branches"
HOLDER = "_fused"  # fxadapt._fused.L<layer>_<input>: the fused weights (a name no adapter module path uses)

# Why a family module is no plain low-rank update s·B A x (by class name; anything else: see _low_rank).
DORA = "DoRA scales the whole projection output by m / ||W + s·B A||_row, so its update is no sum of low-rank " \
       "products of x"
NOT_LOW_RANK = {
    "DoRA": DORA,
    "PeftDoRA": DORA,
    "IA3": "(IA)^3 multiplies the projection output; it has no product to share",
    "VeRADoRA": DORA,
}


@dataclass
class Branch:
    """One adapter call to replace: `a` [r, in] (scalings folded in), `b` [out, r], `bias` [out] or None.
    `composed`: the call is a LoRASite returning y + Δ (y is its second argument), else it returns Δ."""

    call: fx.Node
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None
    composed: bool
    adapters: int  # how many adapters' products it holds (an Average: N)


def _low_rank(module: nn.Module, shared: tuple[torch.Tensor, ...] | None = ()
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | str:
    """(s A, B, s b_B) of a plain low-rank update, or why the module is not one. `shared`: the stored tensors
    the call passes after x (VeRA's A and B), None when it passes other values too."""
    dropout = getattr(module, "lora_dropout", None)
    if module.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return "training mode: its dropout is random, so its update is not a fixed product"
    if type(module) in (LoRA, PeftLoRA, VeRA) and module.gated:  # exact types: subclasses compute more
        return "gated: its gate averages over the sequence and scales each update"
    if type(module) is VeRA:  # s Λ_b B Λ_d A x: (s Λ_d A, Λ_b B) are its two thin factors
        if shared is None or len(shared) != 2:
            return "VeRA whose shared A and B are not stored tensors; not fused"
        return module.vera_D @ shared[0] * module.scaling, module.vera_B @ shared[1], None
    if type(module) in (LoRA, PeftLoRA) and shared != ():
        return "it reads more than its input"
    if type(module) is LoRA:
        if module.chunks:
            return "a fused q/k/v LoRA: its A already stacks the enabled matrices (one product)"
        return module.lora_A * module.scaling, module.lora_B, None
    if type(module) is PeftLoRA:
        bias = module.lora_B.bias
        return (module.lora_A.weight * module.scaling, module.lora_B.weight,
                bias * module.scaling if bias is not None else None)
    name = type(module).__name__
    return NOT_LOW_RANK.get(name, f"{name} is not a plain low-rank update s·B A x")


def _site_branch(site: LoRASite, call: fx.Node) -> Branch | str:
    """A composed site of one adapter or an Average of adapters, as one branch (rank: the sum of theirs)."""
    if site.multi_task:
        return "a composed site that routes rows by task_ids (MultiTask); not fused"
    if len(site.branches) != 1:
        return "Parallel: its adapters act on different row blocks; not fused"
    if site.needs_weight or site.shared_counts or len(call.args) != 2:
        return "a composed site with DoRA or VeRA (it reads the projection weight or shared factors); not fused"
    setup = site.branches[0]
    if isinstance(setup, str):
        children, weights, average = [setup], [1.0], False
    elif isinstance(setup, Block) and setup.kind == "average" and all(isinstance(c, str) for c in setup.children):
        children, weights, average = setup.children, setup.weights, True
    else:
        kind = setup.kind if isinstance(setup, Block) else "?"
        return f"a composed {kind} block; only one adapter or an Average of adapters is fused"
    present = [(c, w) for c, w in zip(children, weights, strict=True) if c in site.adapters]
    if not present:
        return "no adapter of the setup acts at this site"
    factors = []
    for child, weight in present:
        found = _low_rank(site.adapters[child])
        if isinstance(found, str):
            return f"{child}: {found}"
        # The site takes the mean of the weighted updates of the adapters present (LoRASite._average).
        scale = weight / len(present) if average else 1.0
        a, b, bias = found
        factors.append((a * scale, b, bias * scale if bias is not None else None))
    biases = [f[2] for f in factors if f[2] is not None]
    return Branch(call, torch.cat([f[0] for f in factors]), torch.cat([f[1] for f in factors], dim=1),
                  torch.stack(biases).sum(0) if biases else None, True, len(factors))


def _branch(gm: fx.GraphModule, call: fx.Node) -> Branch | str:
    module = gm.get_submodule(call.target)
    if isinstance(module, LoRASite):
        return _site_branch(module, call)
    extra = call.args[1:]
    stored = all(isinstance(n, fx.Node) and n.op == "get_attr" for n in extra)
    found = _low_rank(module, tuple(_stored(gm, n) for n in extra) if stored else None)
    return found if isinstance(found, str) else Branch(call, *found, composed=False, adapters=1)


def _stored(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _origin(call: fx.Node) -> dict:
    return {**call.meta.get(meta.ORIGIN, {}), "pass": PASS}


class _Builder:
    """Inserts nodes before a given node; each inherits its anchor's metadata and records its origin."""

    def __init__(self, gm: fx.GraphModule, holder: nn.Module, path: str) -> None:
        self.gm, self.holder, self.path = gm, holder, path
        self.created: list[fx.Node] = []

    def op(self, target, args: tuple, anchor: fx.Node, origin: dict, keep_val: bool) -> fx.Node:
        with self.gm.graph.inserting_before(anchor):
            node = self.gm.graph.call_function(target, args)
        meta.inherit_meta(node, anchor, keep_val=keep_val, **origin)
        self.created.append(node)
        return node

    def weight(self, name: str, value: torch.Tensor, anchor: fx.Node, origin: dict) -> fx.Node:
        with torch.no_grad():  # a new tensor: the adapter's own parameter is never written or shared
            self.holder.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
        with self.gm.graph.inserting_before(anchor):
            node = self.gm.graph.get_attr(f"{self.path}.{name}")
        node.meta[meta.ORIGIN] = dict(origin)
        self.created.append(node)
        return node


def _fuse(gm: fx.GraphModule, x: fx.Node, branches: list[Branch]) -> tuple[int, dict]:
    """One GEMM for the branches' A rows, split, each B after; returns (nodes inserted + removed, the record)."""
    origins = [_origin(b.call) for b in branches]
    first = branches[0].call  # in graph order: the shared product goes before the first branch's use
    shared = {"adapter": ",".join(dict.fromkeys(str(o.get("adapter")) for o in origins)),
              "method": ",".join(dict.fromkeys(str(o.get("method")) for o in origins)), "pass": PASS,
              "site": ",".join(dict.fromkeys(str(o.get("site")) for o in origins)), "layer": origins[0].get("layer")}
    holder = nn.Module()
    path = add_module(gm, HOLDER, f"L{shared['layer']}_{x.name}", holder)
    build = _Builder(gm, holder, path)
    ranks = [b.a.shape[0] for b in branches]
    a = build.weight("lora_A", torch.cat([b.a for b in branches]), first, shared)
    h = build.op(aten.linear.default, (x, a), first, shared, keep_val=False)
    parts, split = [h], None
    if len(branches) > 1:
        split = build.op(aten.split_with_sizes.default, (h, ranks, -1), first, shared, keep_val=False)
        parts = [build.op(operator.getitem, (split, i), first, shared, keep_val=False) for i in range(len(ranks))]
    _shapes(x, holder.lora_A, h, split, parts, ranks)
    for i, (branch, origin, part) in enumerate(zip(branches, origins, parts, strict=True)):
        call = branch.call
        args = (part, build.weight(f"lora_B_{i}", branch.b, call, origin))
        if branch.bias is not None:
            args += (build.weight(f"bias_{i}", branch.bias, call, origin),)
        out = build.op(aten.linear.default, args, call, origin, keep_val=True)
        if branch.composed:  # the site returned y + Δ
            out = build.op(aten.add.Tensor, (call.args[1], out), call, origin, keep_val=True)
        call.replace_all_uses_with(out)
        gm.graph.erase_node(call)
    record = {"input": x.name, "module": path, "rank": sum(ranks),
              "branches": [{"adapter": o.get("adapter"), "method": o.get("method"), "site": o.get("site"),
                            "layer": o.get("layer"), "module": str(b.call.target), "rank": r, "adapters": b.adapters}
                           for o, b, r in zip(origins, branches, ranks, strict=True)]}
    return len(build.created) + len(branches), record


def _shapes(x: fx.Node, a: torch.Tensor, h: fx.Node, split: fx.Node | None, parts: list[fx.Node],
            ranks: list[int]) -> None:
    """`val` of the rank-sized nodes, from x's fake tensor (tools read shapes from it; it has no other use)."""
    val = x.meta.get("val")
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return
    with mode:
        h.meta["val"] = aten.linear.default(val, torch.empty(a.shape, dtype=a.dtype, device=val.device))
        pieces = aten.split_with_sizes.default(h.meta["val"], ranks, -1)
    if split is not None:
        split.meta["val"] = list(pieces)
        for part, piece in zip(parts, pieces, strict=True):
            part.meta["val"] = piece


def _refusal(branches: list[Branch]) -> str | None:
    """Why branches reading one tensor are left alone (None: fuse them)."""
    if len({(b.a.dtype, b.a.device) for b in branches}) != 1:
        return "the adapter branches on its input differ in dtype or device"
    if len(branches) == 1 and branches[0].adapters == 1:
        return "no other adapter branch reads its input"
    return None


def fuse_parallel_branches(gm: fx.GraphModule) -> PassResult:
    before = op_counts(gm)
    by_input: dict[fx.Node, list[Branch]] = {}
    left: list[dict] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.meta.get(meta.ORIGIN) or not node.args:
            continue
        with torch.no_grad():  # the scaled factors are new tensors, not part of any autograd graph
            found = _branch(gm, node)
        if isinstance(found, str):
            left.append({"module": str(node.target), "reason": found})
        elif isinstance(node.args[0], fx.Node):
            by_input.setdefault(node.args[0], []).append(found)
    made, groups = 0, []
    for x, branches in by_input.items():
        reason = _refusal(branches)
        if reason is not None:
            left += [{"module": str(b.call.target), "reason": reason} for b in branches]
            continue
        count, record = _fuse(gm, x, branches)
        made += count
        groups.append(record)
    if made:
        gm.delete_all_unused_submodules()
        gm.recompile()
    gm.meta.setdefault("fxadapt", {})["fused"] = {"groups": groups, "left": left,
                                                  "counts": {"before": before, "after": op_counts(gm)}}
    return PassResult(gm, made)
