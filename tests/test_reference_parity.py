"""Same numbers as `adapters` 1.3.0: every reference fixture (6 models x seq_bn, double_seq_bn, LoRA q/v,
LoRA at all locations; every adapter parameter perturbed) loads through `{"load": DIR}`, compiles, and
its GraphModule, ONNX and TorchScript outputs match the reference within 1e-5 (max|a - r| <= 1e-5 +
1e-5·max|r|: the graph and TorchScript are bit-exact; ONNX Runtime's attention rounds differently, up to
1.8e-5 on one element of an output of magnitude 3.2)."""

from __future__ import annotations

import pytest

from conftest import reference_cases
from reference_eval import evaluate_case

ATOL = 1e-5


@pytest.mark.parametrize("case", reference_cases())
def test_reference_fixture(case, tmp_path):
    result, errors, change = evaluate_case(case, tmp_path / "out", ATOL)
    assert result.ok, [c for c in result.checks if not c.ok]
    assert change > 1e-4, "the adapter must change the output, or the fixture proves nothing"
    for fmt, (err, ok) in errors.items():
        assert ok, f"{case} {fmt}: max abs error {err:.2e} against adapters 1.3.0"
