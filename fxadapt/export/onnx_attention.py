"""Fuse the decomposed scaled-dot-product attention of a torch.onnx (dynamo) export into one
`com.microsoft.MultiHeadAttention` node, which ONNX Runtime runs as one kernel.

    Q4 = Transpose[0,2,1,3](Reshape(q, [B,S,N,D]))       (K4, V4 the same from k, v)
    P  = Softmax((Q4 · c_q) @ (K4ᵀ · c_k) + bias)         (Kᵀ: Transpose[0,1,3,2], or the exporter's
                                                          Reshape -> Transpose[0,2,1] -> Reshape)
    P' = Where(IsNaN(P), 0, P)                           (optional: sdpa's guard for fully masked rows)
    o  = Reshape(Transpose[0,2,1,3](P' @ V4), [B,S,N·D])
    ->  o = MultiHeadAttention(q, k, v, attention_bias=bias; num_heads=N, scale=c_q·c_k)

Why: ONNX Runtime's transformer optimizer fuses attention only from the patterns the TorchScript exporter
and older transformers emit; the dynamo exporter writes sdpa as the chain above (scale split as √c on each
side, Kᵀ through a 3-D reshape), which none of its patterns match, so it fuses no attention at all.

What is left alone (a rule that does not fire): a Softmax whose chain differs anywhere (another axis, a
scale that is not a scalar constant, extra consumers of an intermediate, q/k/v not rank-3 before the
head split, an additive bias that is not rank 4, heads merged into anything but a known rank-3 [B, S, N·D]:
GPT-2's Conv1D reshapes them to [B·S, N·D] for its Gemm). A fully masked row (attention_mask all zeros) gives
the runtime kernel's value, not sdpa's zeros; transformers' mask is finfo.min, not -inf, so such a row is
a uniform average in both. The pipeline verifies the fused model's outputs on two shapes either way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    """Producer/consumer lookups and constant values over one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.initializers = {i.name: i for i in graph.initializer if i.name not in self.inputs}
        typed = [*graph.input, *graph.value_info, *graph.output]
        self.shapes = {v.name: v.type.tensor_type.shape for v in typed if v.type.HasField("tensor_type")}

    def node(self, name: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer (not overridable by an input) or a Constant node's output."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.node(name, "Constant")
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape.dim) if shape is not None and shape.dim else None

    def dim(self, name: str, axis: int) -> int | None:
        shape = self.shapes.get(name)
        if shape is None or len(shape.dim) <= axis:
            return None
        return shape.dim[axis].dim_value or None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _heads(g: _Graph, name: str) -> str | None:
    """`name` = Transpose[0,2,1,3](Reshape(x, [B,S,N,D])) with x rank 3: x."""
    transpose = g.node(name, "Transpose")
    if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is None or g.rank(reshape.input[0]) != 3:
        return None
    return reshape.input[0]


def _scaled(g: _Graph, name: str) -> tuple[str, float]:
    """`name` = Mul(x, c) with c a scalar constant: (x, c); otherwise (name, 1.0)."""
    mul = g.node(name, "Mul")
    if mul is not None:
        for i in (0, 1):
            value = g.constant(mul.input[1 - i])
            if value is not None and value.size == 1:
                return mul.input[i], float(value.reshape(()))
    return name, 1.0


def _keys_transposed(g: _Graph, name: str) -> str | None:
    """`name` = K4 with its last two dims swapped: K4."""
    transpose = g.node(name, "Transpose")
    if transpose is not None and _perm(transpose) == [0, 1, 3, 2]:
        return transpose.input[0]
    outer = g.node(name, "Reshape")  # the exporter's spelling: [B,N,T,D] -> [B·N,T,D] -> [B·N,D,T] -> [B,N,D,T]
    middle = g.node(outer.input[0], "Transpose") if outer is not None else None
    inner = g.node(middle.input[0], "Reshape") if middle is not None and _perm(middle) == [0, 2, 1] else None
    if inner is None:
        return None
    return inner.input[0]


def _match(g: _Graph, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """The MultiHeadAttention node replacing the chain around `softmax` (its final Reshape's output)."""
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return None
    probs = softmax.output[0]
    if len(g.consumers.get(probs, [])) == 2:  # Where(IsNaN(P), 0, P)
        users = g.consumers[probs]
        nan = next((u for u in users if u.op_type == "IsNaN"), None)
        where = next((u for u in users if u.op_type == "Where"), None)
        zero = g.constant(where.input[1]) if where is not None else None
        if nan is None or where is None or where.input[0] != nan.output[0] or zero is None or np.any(zero != 0):
            return None
        probs = where.output[0]
    pv = g.only_consumer(probs)
    if pv is None or pv.op_type != "MatMul" or pv.input[0] != probs:
        return None
    out_t = g.only_consumer(pv.output[0])
    out_r = g.only_consumer(out_t.output[0]) if out_t is not None and out_t.op_type == "Transpose" else None
    if out_r is None or _perm(out_t) != [0, 2, 1, 3] or out_r.op_type != "Reshape" or g.rank(out_r.output[0]) != 3:
        return None  # the heads merged into [B, S, N·D], what MultiHeadAttention returns (GPT-2 flattens to 2-D)
    scores, bias = softmax.input[0], ""
    add = g.node(scores, "Add")
    if add is not None:
        qk_side = next((i for i in (0, 1) if g.node(add.input[i], "MatMul") is not None), None)
        if qk_side is None or g.only_consumer(scores) is None:
            return None
        scores, bias = add.input[qk_side], add.input[1 - qk_side]
        if g.rank(bias) not in (None, 4):
            return None
    qk = g.node(scores, "MatMul")
    if qk is None or g.only_consumer(scores) is None:
        return None
    q4, c_q = _scaled(g, qk.input[0])
    kt, c_k = _scaled(g, qk.input[1])
    query, keys, values = _heads(g, q4), _keys_transposed(g, kt), _heads(g, pv.input[1])
    key = _heads(g, keys) if keys is not None else None
    if query is None or key is None or values is None:
        return None
    heads = g.dim(q4, 1) or g.dim(pv.input[1], 1)
    if heads is None:
        return None
    fused = helper.make_node("MultiHeadAttention", [query, key, values, "", "", bias], [out_r.output[0]],
                             name=f"fxadapt_mha_{softmax.name or out_r.output[0]}", domain=MS_DOMAIN,
                             num_heads=heads, scale=c_q * c_k)
    return fused


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matching sdpa chain of `model` (in place) into MultiHeadAttention; returns how many.
    Nodes of a chain that something else still reads are kept: only what becomes unused is removed."""
    g = _Graph(model.graph)
    replaced: dict[int, onnx.NodeProto] = {}  # id(final Reshape) -> its MultiHeadAttention
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]:
        fused = _match(g, softmax)
        if fused is not None:
            replaced[id(g.producer[fused.output[0]])] = fused
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    _remove_unused(nodes, {o.name for o in model.graph.output})
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n is not None)
    read = {name for n in model.graph.node for name in n.input} | {i.name for i in model.graph.input}
    kept = [i for i in model.graph.initializer if i.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replaced)


def _remove_unused(nodes: list[onnx.NodeProto | None], outputs: set[str]) -> None:
    """Set to None every node none of whose outputs is read any more, until none is left (the chains leave
    their shape arithmetic behind; every standard ONNX op is free of side effects)."""
    changed = True
    while changed:
        read = {name for n in nodes if n is not None for name in n.input} | outputs
        changed = False
        for i, node in enumerate(nodes):
            if node is not None and not any(o in read for o in node.output if o):
                nodes[i], changed = None, True
