"""Optimization pass: fold LoRA-family adapters into the projection weights, leaving no adapter nodes.

    LoRA       y = W x + b + s·B A x              ==>  W' = W + s·B A
    (IA)^3     y = (W x + b) ⊙ v                  ==>  W' = diag(v) W,  b' = v ⊙ b
    VeRA       y = W x + b + s·Λ_b B Λ_d A x      ==>  W' = W + s·Λ_b B Λ_d A
    DoRA       y = f ⊙ (W x + b + s·B A x)        ==>  W' = f ⊙ (W + s·B A),  b' = f ⊙ b   (adapters)
               y = f ⊙ (W x + s·B A x) + b        ==>  W' = f ⊙ (W + s·B A)                (PEFT)
    PEFT LoRA  y = W x + b + s·(B A x + b_B)      ==>  W' = W + s·B A,  b' = b + s·b_B

Each module computes its own (W', b') (`FamilyModule.fold`, with W as [out, in]; transposed here for
Conv1D's `addmm` layout). A weight is merged only when every projection that reads it carries the
same adapter(s) and, for anything but plain additions, exactly one; changing a shared weight or bias
would alter the others. Gated modules are refused: their gate averages over the input sequence, which
no weight can express; so are modules with a `not_mergeable` reason (MTL-LoRA). They stay in the graph
and the reason is recorded in `gm.meta["fxadapt"]["not_merged"]`. New weights are new tensors, so the
unmerged graph's weights stay intact; the projection node records the merge in `meta.MERGED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fxadapt import meta
from fxadapt.graph_ops import ADD, ADDMM, aten, is_call, weight_node
from fxadapt.methods.lora import FamilyModule, weight_and_bias

from .manager import PassResult

MUL = {aten.mul.Tensor}


@dataclass
class Application:
    """One adapter call at one projection: `output` is the node that replaces the projection's value."""

    projection: fx.Node
    call: fx.Node
    output: fx.Node
    module: FamilyModule


def _application(gm: fx.GraphModule, call: fx.Node, module: FamilyModule) -> Application | None:
    if module.composition == "replace":
        projection, output = call.args[1], call
    else:
        combine = ADD if module.composition == "add" else MUL
        users = list(call.users)
        if len(users) != 1 or not is_call(users[0], combine) or len(users[0].args) != 2:
            return None
        output = users[0]
        projection = output.args[0] if output.args[1] is call else output.args[1]
    if not isinstance(projection, fx.Node) or weight_node(projection) is None:
        return None
    x = projection.args[1 if is_call(projection, ADDMM) else 0]
    return Application(projection, call, output, module) if call.args[0] is x else None


def _applications(gm: fx.GraphModule, skipped: list[dict]) -> dict[str, list[Application]]:
    """weight target -> the adapter applications at projections reading it (gated ones recorded as skipped)."""
    found: dict[str, list[Application]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, FamilyModule):
            continue
        if module.gated:
            skipped.append({"module": node.target, "reason": "gated: the gate averages over the input sequence, "
                            "which a merged weight cannot express"})
            continue
        if getattr(module, "not_mergeable", None):
            skipped.append({"module": node.target, "reason": module.not_mergeable})
            continue
        application = _application(gm, node, module)
        if application is not None:
            found.setdefault(weight_node(application.projection).target, []).append(application)
    return found


def _tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def _assign(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    setattr(owner, leaf, nn.Parameter(value.detach(), requires_grad=False))


def _uses(gm: fx.GraphModule) -> dict[str, int]:
    """How many projection nodes read each weight and each bias."""
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if weight_node(node) is None:
            continue
        for attr in weight_and_bias(node):
            if isinstance(attr, fx.Node) and attr.op == "get_attr":
                uses[attr.target] = uses.get(attr.target, 0) + 1
    return uses


def _fold(gm: fx.GraphModule, applications: list[Application]) -> None:
    """Fold one weight's adapters into new weight (and bias) tensors, in graph order."""
    modules = list(dict.fromkeys(a.call.target for a in applications))
    first = applications[0]
    weight_attr, bias_attr = weight_and_bias(first.projection)
    bias_attr = bias_attr if isinstance(bias_attr, fx.Node) and bias_attr.op == "get_attr" else None
    transposed = is_call(first.projection, ADDMM)
    with torch.no_grad():
        weight = _tensor(gm, weight_attr)
        folded = weight.t() if transposed else weight
        bias = _tensor(gm, bias_attr) if bias_attr is not None else None
        for target in modules:
            call = next(a.call for a in applications if a.call.target == target)
            shared = [_tensor(gm, n) for n in call.args[(4 if first.module.composition == "replace" else 1):]]
            folded, bias = gm.get_submodule(target).fold(folded, bias, shared)
    _assign(gm, weight_attr.target, folded.t() if transposed else folded)
    if bias_attr is not None:
        _assign(gm, bias_attr.target, bias)


def merge_lora(gm: fx.GraphModule) -> PassResult:
    merged = 0
    uses = _uses(gm)
    skipped: list[dict] = []
    for target, applications in _applications(gm, skipped).items():
        projections = list(dict.fromkeys(a.projection for a in applications))
        modules = {a.call.target for a in applications}
        kinds = {a.module.composition for a in applications}
        if len(projections) != uses.get(target, 0) or len(applications) != len(projections) * len(modules):
            continue  # a projection reads this weight without (all) the same adapters: merging would change it
        if len(modules) > 1 and kinds != {"add"}:
            continue  # several scaling/replacing adapters compose in graph order; not folded
        _, bias_attr = weight_and_bias(projections[0])
        if isinstance(bias_attr, fx.Node) and uses.get(bias_attr.target, 0) != len(projections):
            continue  # the bias is shared with another projection
        _fold(gm, applications)
        for application in applications:
            origin = application.call.meta.get(meta.ORIGIN, {})
            application.projection.meta.setdefault(meta.MERGED, []).append(
                {"adapter": origin.get("adapter"), "method": origin.get("method"), "pass": "merge_lora"})
            application.output.replace_all_uses_with(application.projection)
            if application.output is not application.call:
                gm.graph.erase_node(application.output)
            extra = [n for n in application.call.all_input_nodes if n.op == "get_attr"]
            gm.graph.erase_node(application.call)
            for node in extra:
                if not node.users and node is not weight_node(application.projection):
                    if node.meta.get(meta.ORIGIN):  # only the adapter's own get_attr nodes (VeRA's A and B)
                        gm.graph.erase_node(node)
        merged += len(modules)
    if skipped:
        gm.meta.setdefault("fxadapt", {})["not_merged"] = skipped
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, merged)
