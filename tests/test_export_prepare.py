"""export/prepare.for_export: contiguous(x) -> clone(x, contiguous_format) in the graph every format is
exported from. Equivalence (same outputs in PyTorch and ONNX Runtime, on two shapes) on T5's
transpose -> contiguous -> view, and a graph without the pattern left as it is. The failure the rewrite
prevents needs T5's whole attention block to appear; tests/test_reach.py checks that tiny T5 (and every
other model) exports without the decomposition fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from fxadapt.capture import export_program
from fxadapt.export.onnx import export_onnx, run_onnx
from fxadapt.export.prepare import for_export


class Heads(nn.Module):
    """[B, H, S, D] -> transpose -> contiguous -> view [B, S, H·D], as T5's attention output."""

    def forward(self, x):
        batch, heads, seq, dim = x.shape
        return (x.transpose(1, 2).contiguous().view(batch, seq, heads * dim) * 2,)


def _captured(module):
    inputs = {"x": torch.randn(2, 4, 6, 8)}
    shapes = {"x": {0: Dim("batch", min=1, max=64), 2: Dim("seq", min=1, max=64)}}
    return export_program(module, inputs, shapes).module(), inputs, shapes


@pytest.mark.slow
def test_contiguous_becomes_a_contiguous_clone_and_onnx_exports_directly(tmp_path):
    gm, inputs, shapes = _captured(Heads())
    prepared, count = for_export(gm)
    assert count == 1 and prepared is not gm
    assert any(n.target == torch.ops.aten.contiguous.default for n in gm.graph.nodes), "the original is untouched"
    other = {"x": torch.randn(3, 4, 5, 8)}
    for check in (inputs, other):
        assert torch.equal(prepared(**check)[0], gm(**check)[0])
    info = export_onnx(export_program(prepared, inputs, shapes), tmp_path / "m.onnx", ["y"])
    assert info["decomposed"] is False
    got = run_onnx(tmp_path / "m.onnx", other)[0]
    assert torch.allclose(torch.from_numpy(got), gm(**other)[0], atol=1e-6)


def test_a_graph_without_contiguous_is_returned_unchanged():
    class Plain(nn.Module):
        def forward(self, x):
            return (x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1),)

    gm, _, _ = _captured(Plain())
    prepared, count = for_export(gm)
    assert count == 0 and prepared is gm
