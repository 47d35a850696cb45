"""Op vocabulary for structure-driven matching: which aten ops are projections, activations, norms,
attention cores or pure data movement. Everything that recognises structure asks this module."""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

# Projections with a stored weight. `addmm` is how GPT-2's Conv1D lowers: addmm(bias, x2d, W[in, out]).
LINEAR = {aten.linear.default}
ADDMM = {aten.addmm.default}

ATTENTION = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default, aten.einsum.default}

ACTIVATIONS = {
    aten.gelu.default, aten.relu.default, aten.relu_.default, aten.silu.default, aten.silu_.default,
    aten.tanh.default, aten.sigmoid.default, aten.elu.default, aten.leaky_relu.default,
    aten.hardtanh.default, aten.softplus.default, aten.mish.default, aten.hardswish.default,
    aten.gelu_.default,
}
NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default, aten.group_norm.default}

# Ops that move or re-type data without mixing features: walking through them keeps "the same tensor".
PASS_THROUGH = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.type_as.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.alias.default, aten.detach.default, operator.getitem,
}
ADD = {aten.add.Tensor, operator.add}


def is_call(node: fx.Node, ops: set) -> bool:
    return node.op == "call_function" and node.target in ops


def weight_node(node: fx.Node) -> fx.Node | None:
    """The get_attr weight of a projection node, or None if it is not a projection with a stored weight."""
    if is_call(node, LINEAR) and len(node.args) > 1:
        weight = node.args[1]
    elif is_call(node, ADDMM):
        weight = node.args[2]
    else:
        return None
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def is_projection(node: fx.Node) -> bool:
    return weight_node(node) is not None


def module_path(node: fx.Node) -> str:
    """Innermost module path of a node from `nn_module_stack` ('' at the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_") else path


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n.op not in ("get_attr",)]
