"""The same compile gives the same bytes: model.onnx, model.ts and model.pt2 carry no temporary names or
object addresses (fxadapt/export/reproducible.py). Two compiles run as two processes, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REFERENCE

BERT_DIR = REFERENCE / "models" / "bert"


@pytest.mark.slow
def test_two_compiles_give_byte_identical_artifacts(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"adapters": {"a": "lora[r=4,alpha=8]", "b": "seq_bn"}, "active": {"stack": ["a", "b"]}}')
    for out in ("one", "two"):
        subprocess.run([sys.executable, "-m", "fxadapt.cli", "compile", str(BERT_DIR), "--spec", str(spec), "-o",
                        str(tmp_path / out), "--format", "all"], check=True, capture_output=True)
    for artifact in ("model.onnx", "model.ts", "model.pt2"):
        first, second = ((tmp_path / out / artifact).read_bytes() for out in ("one", "two"))
        assert first == second, f"{artifact} differs between two compiles of the same spec"
    assert torch.jit.load(str(tmp_path / "one" / "model.ts")) is not None
    assert torch.export.load(str(tmp_path / "one" / "model.pt2")) is not None
