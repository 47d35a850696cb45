"""Same numbers as `adapters` 1.3.0: every reference fixture (6 models x seq_bn, double_seq_bn, LoRA q/v,
LoRA at all locations; every adapter parameter perturbed) loads through `{"load": DIR}`, compiles, and
its GraphModule, ONNX and TorchScript outputs match the reference within 1e-5, absolute, on every element.

The bound is meaningful because each fixture's own float32 rounding error (|fp32 - fp64| of the reference,
recorded as case.json "fp32_error" where the generator measures it) is at most a quarter of it; see
docs/fixtures.md, "Conditioning"."""

from __future__ import annotations

import pytest

from conftest import reference_case_params
from reference_eval import evaluate_case

ATOL = 1e-5


@pytest.mark.parametrize("case", reference_case_params())
def test_reference_fixture(case, tmp_path, record_property):
    result, errors, change = evaluate_case(case, tmp_path / "out", ATOL)
    for fmt, (err, _) in errors.items():  # in the JUnit XML, for reports (pytest --junitxml)
        record_property(f"max_abs_error_{fmt}", f"{err:.3g}")
    assert result.ok, [c for c in result.checks if not c.ok]
    assert change > 1e-4, "the adapter must change the output, or the fixture proves nothing"
    for fmt, (err, _) in errors.items():
        assert err <= ATOL, f"{case} {fmt}: max abs error {err:.2e} against adapters 1.3.0 (limit {ATOL:.0e})"
