"""The captured base model and fresh copies of its pristine graph, one per lowering.

A copy has its own nodes (and shallow copies of their metadata) but binds the *same* parameter and
buffer objects as the captured module: base weights are stored once, and whatever changes them
(full fine-tuning, `.to()`, DDP's broadcast) is seen by every later lowering.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import fx
from torch.export import Dim

from ..capture import Captured, _max_positions, capture, export_program, load_model, output_names_of


def capture_base(model: torch.nn.Module | str, example_inputs: dict[str, torch.Tensor] | None = None,
                 task: str | None = None) -> tuple[Captured, torch.nn.Module | None]:
    """Capture a model for the lifecycle; returns (captured, the eager model when one was loaded or given).

    With `example_inputs`, every tensor shaped like the first 2-D token input (input_ids,
    token_type_ids, attention_mask, ...) gets dynamic batch *and* sequence dims, others a dynamic batch.
    """
    if isinstance(model, str):
        model = load_model(model, task)
    if example_inputs is None:
        return capture(model, task=task), model
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("seq", min=1, max=_max_positions(config))
    tokens = next((t.shape[:2] for t in example_inputs.values() if t.dim() == 2 and not t.is_floating_point()), None)
    shapes: dict[str, dict[int, Any]] = {}
    for name, tensor in example_inputs.items():
        same_tokens = tokens is not None and tensor.dim() >= 2 and tensor.shape[:2] == tokens
        shapes[name] = {0: batch, 1: seq} if same_tokens else {0: batch}
    model.eval()
    with torch.no_grad():
        eager = model(**example_inputs)
    ep = export_program(model, example_inputs, shapes)
    captured = Captured(module=ep.module(), input_names=list(example_inputs), output_names=output_names_of(eager),
                        example_inputs=dict(example_inputs), dynamic_shapes=shapes, source=type(model).__name__,
                        config=config, info={"class": type(model).__name__,
                                             "base_model_prefix": getattr(model, "base_model_prefix", "")})
    return captured, model


def unlock_modes(gm: fx.GraphModule) -> None:
    """torch.export's module refuses `.train()`/`.eval()` (instance attributes that raise); fxadapt owns the
    mode switch as a graph edit (lifecycle/modes.py), so plain `nn.Module.train` may run on it again."""
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)


def fresh_copy(base: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a deep copy of the pristine graph, sharing every weight object with `base`."""
    with warnings.catch_warnings():
        # Deep-copying the pytree codegen's TreeSpec warns about a deprecated isinstance check: not ours.
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(base.graph)
    gm = fx.GraphModule(base, graph)
    gm.meta.update({k: v for k, v in base.meta.items() if k != "fxadapt"})
    return gm
