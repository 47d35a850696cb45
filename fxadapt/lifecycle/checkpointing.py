"""Per-layer gradient checkpointing of a lowered graph.

The graph is split (torch.fx split_module) into a head part (embeddings, masks), one submodule per
transformer layer (nodes whose module path holds a numbered layer, `encoder.layer.3.*`, adapter nodes
included since they inherit their anchor's path) and a tail part (pooler, task head). Each layer
submodule runs under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: its activations are
dropped after the forward pass and recomputed in the backward pass, with the same RNG state, so
dropout masks match. Weights enter the layer submodules as inputs, so their gradients flow as usual.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..sites import _layer_prefix

_HEAD, _TAIL = 0, 1_000_000


class Checkpointed(nn.Module):
    """Runs a layer submodule under activation checkpointing in training (plainly under no_grad)."""

    def __init__(self, inner: fx.GraphModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=False)


def _layer_of(node: fx.Node, order: dict[str, int]) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        prefix = _layer_prefix(path) if isinstance(path, str) else None
        if prefix is not None:
            return order.setdefault(prefix, len(order) + 1)
    return None


def split_by_layer(gm: fx.GraphModule) -> fx.GraphModule:
    """The same computation as `gm`, with each layer in a checkpointed submodule."""
    order: dict[str, int] = {}
    parts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        layer = _layer_of(node, order)
        inputs = [parts.get(n.name, _HEAD) for n in node.all_input_nodes]
        if layer is None:
            layer = _HEAD if max(inputs, default=_HEAD) == _HEAD else _TAIL
        parts[node.name] = layer
    if len(order) < 1:
        raise UserError("gradient_checkpointing_enable: the graph has no numbered layers (module paths such as "
                        "encoder.layer.0) to checkpoint.")
    try:
        split = split_module(gm, gm, lambda node: parts[node.name], keep_original_order=True)
    except RuntimeError as exc:
        raise UserError(f"gradient_checkpointing_enable: the graph cannot be split into layers ({exc}); train "
                        "without gradient checkpointing.") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        split.graph._codegen = copy.deepcopy(gm.graph._codegen)  # keep the pytree inputs/outputs (ModelOutput)
    for name, child in list(split.named_children()):
        if name.startswith("submod_") and name not in (f"submod_{_HEAD}", f"submod_{_TAIL}"):
            setattr(split, name, Checkpointed(child))
    split.recompile()
    split.meta.update(gm.meta)
    return split
