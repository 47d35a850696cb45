"""`--quantize int8`: ONNX Runtime's dynamic quantization (int8 weights, activations quantized per run)
-> OUT/model.int8.onnx, judged by cosine similarity instead of the fp32 tolerance.

    W_q = round(W / s) (int8, symmetric; s per tensor),  y = (x_q · W_q) · s_x · s   (MatMulInteger)

Rounding moves every output a little (max abs error ~0.15 on BERT-base's hidden states, measured), so
1e-4 is the wrong yardstick. An output passes when the cosine similarity of its flattened values to the
fp32 reference is at least MIN_COSINE; its max abs and relative error are reported beside it.

Swappable adapters (weights as graph inputs with initializer defaults) are left in fp32: their defaults
are detached while the quantizer runs (it quantizes only constant weights) and the nodes that read them are
excluded, so it cannot bake a default into an int8 initializer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ort_optimize import check_inputs_kept, detach_defaults, overridable
from .verify import OutputError

MIN_COSINE = 0.99  # the documented tolerance of a quantized artifact (docs/deploy.md)
SCHEMES = ("int8",)


@dataclass
class QuantizedError(OutputError):
    cosine: float = 0.0
    min_cosine: float = MIN_COSINE

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "cosine": self.cosine, "min_cosine": self.min_cosine}


def quantize_onnx(source: Path, target: Path) -> dict[str, Any]:
    """Quantize `source` dynamically (QInt8 weights) into `target`; returns {"scheme", "quantized", "kept_fp32"}."""
    import onnx  # heavy, and only the quantized format needs them
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    inputs = overridable(model)
    unnamed = [n for n in model.graph.node if not n.name]
    for i, node in enumerate(unnamed):  # nodes_to_exclude works by name: give every node one
        node.name = f"fxadapt_node_{i}"
    keep = [n.name for n in model.graph.node if inputs.intersection(n.input)]
    defaults = detach_defaults(model)
    tmp = target.with_name(target.name + ".tmp")
    try:
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # it advises "pre-processing" on every call, on the root
        try:
            quantize_dynamic(model, str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=keep)
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(tmp))
        check_inputs_kept(inputs, quantized, "dynamic quantization")
        quantized.graph.initializer.extend(defaults)
        onnx.save(quantized, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    count = sum(1 for n in quantized.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    return {"scheme": "int8 (dynamic, QInt8 weights)", "quantized_matmuls": count, "kept_fp32": len(keep)}


def quantized_errors(names: list[str], reference: list[torch.Tensor], actual: list[Any],
                     min_cosine: float | None = None) -> list[QuantizedError]:
    """Per output: max abs / relative error and cosine similarity to the fp32 reference; ok by cosine
    (at least `min_cosine`, default MIN_COSINE)."""
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    errors = []
    for name, ref, got in zip(names, reference, actual, strict=True):
        r = ref.detach().to(torch.float64).numpy().ravel()
        a = np.asarray(got, dtype=np.float64).ravel()
        if r.shape != a.shape:
            errors.append(QuantizedError(name, float("inf"), float("inf"), False, 0.0, min_cosine))
            continue
        max_abs = float(np.max(np.abs(r - a))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        cosine = _cosine(r, a)
        errors.append(QuantizedError(name, max_abs, max_abs / scale if scale > 0 else max_abs,
                                     bool(cosine >= min_cosine), cosine, min_cosine))
    return errors


def _cosine(r: np.ndarray, a: np.ndarray) -> float:
    norms = float(np.linalg.norm(r) * np.linalg.norm(a))
    if norms == 0.0:  # both all zero is a match; one all zero is not
        return 1.0 if not np.any(r) and not np.any(a) else 0.0
    return float(np.dot(r, a) / norms)
