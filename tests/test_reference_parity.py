"""Same numbers as `adapters` 1.3.0: every reference fixture (6 models x seq_bn, double_seq_bn, LoRA q/v,
LoRA at all locations; every adapter parameter perturbed) loads through `{"load": DIR}`, compiles, and
its GraphModule, ONNX and TorchScript outputs match the reference within 1e-5."""

from __future__ import annotations

import pytest
import torch

from conftest import REFERENCE, load_case, reference_cases
from fxadapt.capture import flatten_outputs
from fxadapt.export.onnx import run_onnx
from fxadapt.pipeline import compile_model
from fxadapt.spec import parse_spec

ATOL = 1e-5


@pytest.mark.parametrize("case", reference_cases())
def test_reference_fixture(case, tmp_path):
    info, io = load_case(case)
    spec = parse_spec({"adapters": {"a": {"load": str(REFERENCE / "cases" / case / "adapter")}}, "active": "a"})
    model_dir = str(REFERENCE / "models" / info["arch"])
    result = compile_model(model_dir, spec, tmp_path / "out", ("onnx", "torchscript"), atol=ATOL)
    assert result.ok, [c for c in result.checks if not c.ok]

    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    names = result.captured.output_names
    expected = {f: io[f"out.{f}"] for f in info["outputs"]}
    # The adapter changes the output (the fixture would prove nothing otherwise).
    assert all((expected[f] - io[f"out_base.{f}"]).abs().max() > 1e-4 for f in expected)

    graph_out = flatten_outputs(result.graph(**inputs))
    onnx_out = run_onnx(tmp_path / "out" / "model.onnx", inputs)
    scripted = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    ts_out = list(scripted(*[inputs[n] for n in result.captured.input_names]))
    for field, ref in expected.items():
        index = names.index(field)
        for label, got in (("graph", graph_out[index]), ("onnx", torch.from_numpy(onnx_out[index])),
                           ("torchscript", ts_out[index])):
            err = (got - ref).abs().max().item()
            assert err <= ATOL, f"{case} {label} {field}: max abs error {err:.2e}"
