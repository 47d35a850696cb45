"""Run one reference fixture through `compile_model` and measure each format against `adapters`' outputs.

Shared by tests/test_reference_parity.py and bench/parity_report.py (which prints the table).

The ~116 cases use six tiny models, so each (model, pinned dims) is captured once per process and every case
compiles a deep copy of that capture: the rewrite passes edit the graph and register parameters in place."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from unittest import mock

import torch

from conftest import REFERENCE, load_case
from fxadapt import pipeline
from fxadapt.capture import Captured, capture, flatten_outputs
from fxadapt.export.onnx import run_onnx
from fxadapt.export.verify import compare
from fxadapt.pipeline import Result, build, compile_model
from fxadapt.spec import parse_spec

FORMATS = ("graph", "onnx", "torchscript")
_CAPTURES: dict[tuple, Captured] = {}


def cached_capture(model, example_inputs=None, task=None, **pins) -> Captured:
    """`capture`, run once per (model directory, task, pinned dims); each call gets its own deep copy (graph,
    parameters, inputs, dynamic shapes and info; node metadata is copied per node, as fx copies graphs).
    A module, or given example inputs (MultiTask's task_ids), is captured afresh."""
    if not isinstance(model, str) or example_inputs is not None:
        return capture(model, example_inputs, task=task, **pins)
    key = (model, task, tuple(sorted(pins.items())))
    if key not in _CAPTURES:
        _CAPTURES[key] = capture(model, task=task, **pins)
    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated LeafSpec on copy
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(_CAPTURES[key])


def evaluate_case(case: str, out_dir: Path, atol: float = 1e-5) -> tuple[Result, dict[str, tuple[float, bool]], float]:
    """(compile result, per format (max abs error vs the reference, within atol + atol · max|ref|),
    min |reference - base| change)."""
    info, io = load_case(case)
    # The reference computes LoRA unmerged; merging's float rounding is tested in test_merge_lora.py.
    spec = parse_spec({"adapters": {"a": {"load": str(REFERENCE / "cases" / case / "adapter")}}, "active": "a",
                       "optimize": {"merge_lora": False}}) if "adapters" not in info else _composition_spec(case, info)
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    inputs.update({name: io[name] for name in info.get("inputs", [])})  # e.g. MultiTask's task_ids
    # MultiTask captures on given inputs (with task_ids), which pins their sequence length.
    with mock.patch.object(pipeline, "capture", cached_capture):
        model = str(REFERENCE / "models" / info["arch"])
        built = build(model, spec, example_inputs=inputs) if info.get("inputs") else None
        result = compile_model(model, spec, out_dir, ("onnx", "torchscript"), atol=atol, rtol=atol, built=built)
    names = result.captured.output_names
    with torch.no_grad():
        outputs = {
            "graph": flatten_outputs(result.graph(**inputs)),
            "onnx": [torch.from_numpy(a) for a in run_onnx(out_dir / "model.onnx", inputs)],
            "torchscript": list(torch.jit.load(str(out_dir / "model.ts"))(*[inputs[n] for n in names_in(result)])),
        }
    errors = {}
    for fmt in FORMATS:
        pairs = [(outputs[fmt][names.index(f)], io[f"out.{f}"]) for f in info["outputs"]]
        errors[fmt] = (max((got - ref).abs().max().item() for got, ref in pairs),
                       all(compare(["out"], [ref], [got], atol, atol)[0].ok for got, ref in pairs))
    change = min(_change(io[f"out.{f}"], io[f"out_base.{f}"]) for f in info["outputs"])
    return result, errors, change


def _composition_spec(case: str, info: dict):
    """A composition case (scripts/fixtures/composition.py): several adapters, a setup, fusions; it is
    captured with dynamic dims except those BatchSplit and Split pin."""
    return parse_spec({"adapters": {n: {"load": d} for n, d in info["adapters"].items()}, "active": info["setup"],
                       "fusions": info.get("fusions", []), "optimize": {"merge_lora": False}},
                      REFERENCE / "cases" / case)


def _change(out: torch.Tensor, base: torch.Tensor) -> float:
    """Max |out - base|; prompt tuning lengthens the output, so then compare the input's (last) positions."""
    if out.shape[0] != base.shape[0]:  # Parallel: N copies of the batch
        base = base.repeat(out.shape[0] // base.shape[0], *[1] * (base.dim() - 1))
    if out.shape != base.shape:
        out = out[:, out.shape[1] - base.shape[1]:]
    return (out - base).abs().max().item()


def names_in(result: Result) -> list[str]:
    return result.captured.input_names
