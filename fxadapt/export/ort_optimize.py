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

from .onnx_attention import MS_DOMAIN, fuse_attention

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
    import onnx  # heavy, and only the ONNX formats need it

    model = onnx.load(str(source))
    inputs = overridable(model)
    defaults = detach_defaults(model)
    attention = fuse_attention(model)
    model_type = optimizer_model_type(config)
    heads = int(getattr(config, "num_attention_heads", 0) or 0) if config is not None else 0
    hidden = int(getattr(config, "hidden_size", 0) or 0) if config is not None else 0
    optimized, stats, model_type, failures = _optimize(model, model_type, heads, hidden)
    check_inputs_kept(inputs, optimized, "the ONNX Runtime optimizer")
    optimized.graph.initializer.extend(defaults)
    fused = {op: n for op, n in stats.items() if n}
    if attention:
        fused["MultiHeadAttention"] = max(fused.get("MultiHeadAttention", 0), attention)
    tmp = target.with_name(target.name + ".tmp")
    try:
        onnx.save(optimized, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    info = {"model_type": model_type, "num_heads": heads, "hidden_size": hidden, "ort_optimize": fused,
            "nodes": len(optimized.graph.node)}
    return {**info, "optimizer_failed": failures} if failures else info


def _optimize(model: Any, model_type: str, heads: int, hidden: int) -> tuple[Any, dict[str, int], str, list[str]]:
    """The optimizer's output for `model_type`, else for "bert" (generic fusions), else `model` itself: its
    model-specific passes assume their own exporter's graph (on GPT-2's dynamo export, gpt2's crashed and bert's
    wrote a Gemm of a rank-3 input), so a result must load in ONNX Runtime to be taken.
    Returns (model, fused op counts, the type used or "none", the failures)."""
    import onnx  # heavy, as above
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    failures = []
    logger = logging.getLogger("onnxruntime.transformers")
    level, logger.level = logger.level, logging.ERROR  # it logs every fusion it tries at WARNING
    try:
        for candidate in dict.fromkeys((model_type, "bert")):
            try:
                optimized = optimize_model(onnx.ModelProto.FromString(model.SerializeToString()),
                                           model_type=candidate, num_heads=heads, hidden_size=hidden, opt_level=0)
                _add_contrib_opset(optimized.model)
                options = ort.SessionOptions()
                options.log_severity_level = 3
                ort.InferenceSession(optimized.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                return optimized.model, optimized.get_fused_operator_statistics(), candidate, failures
            except Exception as exc:  # any failure of a third-party pass: try the next, report all
                failures.append(f"{candidate}: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        logger.setLevel(level)
    return model, {}, "none", failures


def _add_contrib_opset(model: Any) -> None:
    """The optimizer adds com.microsoft ops without declaring their opset where none was there (Llama's
    SkipSimplifiedLayerNormalization); onnx's shape inference (the quantizer's first step) then refuses them."""
    import onnx  # heavy, as above

    declared = any(o.domain == MS_DOMAIN for o in model.opset_import)
    if not declared and any(n.domain == MS_DOMAIN for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


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
