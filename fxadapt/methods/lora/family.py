"""What the LoRA family (LoRA, (IA)^3, VeRA, DoRA, PEFT LoRA) shares: how a module meets its projection.

A family module is applied to one projection y = W x + b in one of three ways (its `composition`):

    "add"      y' = y + module(x, *shared)            LoRA, VeRA, PEFT LoRA
    "scale"    y' = y * module(x)                     (IA)^3
    "replace"  y' = module(x, y, W, b, *shared)       DoRA (needs W for its column norm)

Under a composition block (site.py) the same modules give `update(hidden, x)` (the
reference's module forward on the composed state) and `combine(y, update, W, b)` (how the last one's
update meets y); both are the module's own forward split in two, not a copy of it.

`shared` are get_attr nodes of parameters several modules read (VeRA's frozen A and B). Every module
can `fold` itself into the projection's weight and bias (W', b') so that W' x + b' equals y' — the
merge pass relies on it — unless it is gated, whose output depends on the whole input sequence.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx, nn

from ...errors import UserError
from ...graph_edit import Emitter
from ...graph_ops import ADDMM, aten, is_call
from ...sites import LinearSite


class FamilyModule(nn.Module):
    """Base of LoRA-family adapter modules (see the module docstring for the three compositions)."""

    composition: ClassVar[str] = "add"
    # Gated modules average a gate over the sequence: on GPT-2's 2-D `addmm` they read the 3-D tensors.
    gated: bool = False

    def update(self, hidden: torch.Tensor | None, layer_input: torch.Tensor,
               shared: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """Under a composition, the reference's module forward(hidden_states, layer_input): this module's update
        of `hidden` (the previous adapter's update in a Stack; None before the first, when it reads
        `layer_input`). A gate always reads `layer_input`."""
        raise NotImplementedError

    def combine(self, y: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, shared: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """How a composed update meets the projection output y when this module acted last (the reference's
        `last.com(layer_output, hidden, scaling=1.0)`): added or multiplied; "replace" modules override it."""
        if self.composition == "add":
            return y + update
        if self.composition == "scale":
            return y * update
        raise NotImplementedError

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None,
             shared: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') with W' x + b' == the adapted output; `weight` is [out, in] whatever the graph's layout."""
        raise NotImplementedError


def gate_mean(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The reference's gate: sigmoid(gate(x)) averaged over the sequence, [batch, heads]."""
    return torch.mean(torch.sigmoid(gate(x)), dim=1)


def projection_io(node: fx.Node, sequence: bool) -> tuple[fx.Node, fx.Node]:
    """(x, y) of a projection node. GPT-2's Conv1D runs as `view(addmm(b, view(x, [-1, in]), W), [B, S, out])`;
    with `sequence` the 3-D x and y around it are returned, since a gate averages over the sequence."""
    if not is_call(node, ADDMM):
        return node.args[0], node
    x, y = node.args[1], node
    if sequence:
        users = list(node.users)
        if (is_call(x, {aten.view.default, aten.reshape.default}) and len(users) == 1
                and is_call(users[0], {aten.view.default, aten.reshape.default})):
            return x.args[0], users[0]
        raise UserError(f"gated adapters need the 3-D input of {node.name} (a Conv1D-style addmm), but it is not "
                        "wrapped in views; turn use_gating off for this model.")
    return x, y


def weight_and_bias(node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """The weight and bias nodes of a linear or addmm projection (bias None when absent)."""
    if is_call(node, ADDMM):
        return node.args[2], node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[1], bias


def apply_at(gm: fx.GraphModule, site: LinearSite, module: FamilyModule, module_path: str, origin: dict,
             shared: tuple[fx.Node, ...] = ()) -> int:
    """Insert a call of `module` at every graph node of `site` (see the module docstring); returns nodes made."""
    count = 0
    for node in site.nodes:
        x, y = projection_io(node, module.gated)
        weight, bias = weight_and_bias(node)
        emitter = Emitter(gm, y, origin)
        if module.composition == "add":
            delta = emitter.call_module(module_path, (x, *shared))
            out = emitter.call_function(aten.add.Tensor, (y, delta))
        elif module.composition == "scale":
            scale = emitter.call_module(module_path, (x,), keep_val=False)
            out = emitter.call_function(aten.mul.Tensor, (y, scale))
        else:
            out = emitter.call_module(module_path, (x, y, weight, bias, *shared))
        emitter.reroute(y, out)
        count += len(emitter.created)
    return count
