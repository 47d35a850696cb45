"""`--ort-optimize`: ONNX Runtime's transformer optimizer over the exported model -> OUT/model.opt.onnx.

    model.onnx --fuse_attention--> MultiHeadAttention per layer (export/onnx_attention.py)
               --onnxruntime.transformers.optimizer--> SkipLayerNormalization, BiasGelu, ...

The optimized graph is a separate file: it holds com.microsoft contrib ops that only ONNX Runtime runs,
while model.onnx stays portable. The optimizer runs at opt_level 0 (its Python fusions only): a session
applies ONNX Runtime's own graph optimizations at load time anyway, and a saved ORT-optimized graph would
be tied to the machine it was written on.

Swappable adapters (weights as graph inputs with initializer defaults) must stay inputs: neither fusion
may fold them. Their defaults are detached while the optimizer runs (`detached_defaults`), so to it they
are plain inputs it cannot read, fold or transpose in place (it did: a LoRA weight's initializer came back
transposed under the input's old shape), and put back afterwards. `check_inputs_kept` refuses a result
that lost one; `adapter_weights` / `missing_adapter_weights` tell whether every adapter weight survived.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import Any

from .onnx_attention import fuse_attention

ADAPTER_PREFIX = "fxadapt."  # adapter parameters live under the graph's `fxadapt` submodule
# Hugging Face model_type -> the optimizer's model type; encoders not named here use its "bert" fusions.
MODEL_TYPES = {"gpt2": "gpt2", "bart": "bart", "t5": "t5", "mt5": "t5", "gpt_neox": "gpt_neox", "phi": "phi",
               "vit": "vit", "swin": "swin", "clip": "clip", "qwen3": "qwen3"}
# Suffixes onnxruntime.quantization gives a quantized weight's initializers (name_quantized, _scale, ...).
QUANTIZED_SUFFIXES = ("_quantized", "_scale", "_zero_point")


def optimizer_model_type(config: Any) -> str:
    return MODEL_TYPES.get(getattr(config, "model_type", None) or "", "bert")


def optimize_onnx(source: Path, target: Path, config: Any) -> dict[str, Any]:
    """Write the optimized `source` to `target`. Returns {"model_type", "num_heads", "hidden_size",
    "ort_optimize": {fused op: count}, "nodes"}."""
    import onnx  # heavy, and only the ONNX formats need them
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(source))
    inputs = overridable(model)
    defaults = detach_defaults(model)
    attention = fuse_attention(model)
    model_type = optimizer_model_type(config)
    heads = int(getattr(config, "num_attention_heads", 0) or 0) if config is not None else 0
    hidden = int(getattr(config, "hidden_size", 0) or 0) if config is not None else 0
    logger = logging.getLogger("onnxruntime.transformers")
    level, logger.level = logger.level, logging.ERROR  # it logs every fusion it tries at WARNING
    try:
        optimized = optimize_model(model, model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0)
    finally:
        logger.setLevel(level)
    check_inputs_kept(inputs, optimized.model, "the ONNX Runtime optimizer")
    optimized.model.graph.initializer.extend(defaults)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    if attention:
        fused["MultiHeadAttention"] = max(fused.get("MultiHeadAttention", 0), attention)
    tmp = target.with_name(target.name + ".tmp")
    try:
        onnx.save(optimized.model, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {"model_type": model_type, "num_heads": heads, "hidden_size": hidden, "ort_optimize": fused,
            "nodes": len(optimized.model.graph.node)}


def op_counts(model: Any) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def overridable(model: Any) -> set[str]:
    """Graph inputs that also have an initializer: defaults a caller may override (swappable adapters)."""
    initializers = {i.name for i in model.graph.initializer}
    return {i.name for i in model.graph.input if i.name in initializers}


def detach_defaults(model: Any) -> list[Any]:
    """Remove (and return) the initializers of overridable inputs; extend graph.initializer to restore them."""
    names = overridable(model)
    defaults = [i for i in model.graph.initializer if i.name in names]
    kept = [i for i in model.graph.initializer if i.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return defaults


def check_inputs_kept(names: set[str], model: Any, step: str) -> None:
    """Raise where `step` folded away an input a caller may feed (a bug here, not the user's)."""
    lost = sorted(names - {i.name for i in model.graph.input})
    if lost:
        raise RuntimeError(f"{step} removed the graph input(s) {', '.join(lost[:5])}; swappable adapter weights "
                           "must stay inputs")


def adapter_weights(model: Any) -> set[str]:
    """Names of adapter weights (initializers or inputs) in an ONNX model."""
    names = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    return {n for n in names if n.startswith(ADAPTER_PREFIX)}


def missing_adapter_weights(expected: set[str], model: Any) -> list[str]:
    """The adapter weights of `expected` that `model` no longer holds by name (a quantized weight counts as
    held: the quantizer stores W as W_quantized with its scale and zero point)."""
    present = adapter_weights(model)
    for name in list(present):
        for suffix in QUANTIZED_SUFFIXES:
            if name.endswith(suffix):
                present.add(name[: -len(suffix)])
    return sorted(expected - present)
