"""ONNX export through torch.onnx (dynamo) and execution in ONNX Runtime.

Inputs are named like the forward's keyword arguments and outputs like the ModelOutput fields;
batch and sequence axes stay dynamic because the ExportedProgram carries them. The file is written to
a temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch


def export_onnx(ep: torch.export.ExportedProgram, path: Path, output_names: list[str]) -> dict[str, object]:
    """Write `ep` as ONNX to `path`; returns {"nodes": count, "decomposed": bool}.

    A graph that fails inside the exporter's own decomposition step (before export/prepare.py, T5's
    attention did: a view of non-contiguous symbolic strides) is retried after torch.export's default
    decompositions. That route is the fallback only: it takes ~3x longer and lowers ops like layer_norm
    that ONNX has natively.
    """
    import onnx  # heavy, and only the ONNX format needs it

    tmp = path.with_name(path.name + ".tmp")
    decomposed = False
    try:
        program = _to_onnx(ep, output_names)
    except torch.onnx.errors.OnnxExporterError:
        decomposed = True
        program = _to_onnx(ep.run_decompositions(), output_names)
    try:
        program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"nodes": len(onnx.load(str(path), load_external_data=False).graph.node), "decomposed": decomposed}


def _to_onnx(ep: torch.export.ExportedProgram, output_names: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(ep, (), dynamo=True, output_names=output_names, verbose=False, external_data=False)


def run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime as ort  # heavy (native runtime), loaded only to verify an ONNX export

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in inputs.items() if k in feed_names}
    return session.run(None, feed)
