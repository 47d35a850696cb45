"""The graph every export format is made from: the rewritten graph with exporter-proof spellings.

    contiguous(x)  ->  clone(x, memory_format=torch.contiguous_format)

Why: under symbolic shapes the ONNX exporter's decomposition treats `contiguous` of a transposed tensor
as a no-op (its strides cannot be decided) and then fails on the `view` that follows (T5's attention
output: transpose -> contiguous -> view -> "Cannot view a tensor with shape ... and strides ...").
torch.export's default decompositions avoid the failure but take ~3x longer and lower ops ONNX has
natively (layer_norm), so they stay the fallback. An explicit contiguous-format copy computes the same
values; ONNX has no strides, so it costs nothing there, and a copy of a contiguous tensor is cheap
elsewhere.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx

aten = torch.ops.aten


def for_export(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (same parameters and buffers, copied graph) in the spellings above; the rewritten
    graph the user sees is left as it is. Returns (graph, rewrites)."""
    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated LeafSpec on copy
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    count = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.contiguous.default:
            node.target = aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
            count += 1
    return (fx.GraphModule(gm, graph) if count else gm), count
