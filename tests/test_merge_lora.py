"""merge_lora: W' = W + (alpha/r)·B·A leaves no LoRA nodes, keeps the base graph's ONNX node count and
matches the unmerged graph; it refuses weights that an unadapted projection also reads."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from fxadapt.capture import capture, export_program, flatten_outputs
from fxadapt.export.onnx import export_onnx, run_onnx
from fxadapt.methods.lora import LoRA
from fxadapt.passes.merge_lora import merge_lora
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec

SPEC = "lora[r=4,alpha=16,attn_matrices=['q','k','v'],intermediate_lora=True,output_lora=True]"


def _perturbed(model: str, spec: str):
    result = build(model, parse_spec({"adapters": {"a": spec}}))
    torch.manual_seed(0)
    for module in result.graph.modules():
        if isinstance(module, LoRA):
            for p in module.parameters():
                p.data = torch.randn_like(p) * 0.2
    return result


def _lora_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LoRA))


@pytest.mark.slow
def test_merged_onnx_has_base_node_count_and_matches_unmerged(tmp_path):
    base = capture("builtin:tiny-bert")
    base_nodes = export_onnx(export_program(base.module, base.example_inputs, base.dynamic_shapes),
                             tmp_path / "base.onnx", base.output_names)["nodes"]

    result = _perturbed("builtin:tiny-bert", SPEC)
    captured = result.captured
    unmerged_path = tmp_path / "unmerged.onnx"
    unmerged_nodes = export_onnx(export_program(result.graph, captured.example_inputs, captured.dynamic_shapes),
                                 unmerged_path, captured.output_names)["nodes"]
    inputs = captured.inputs(3, 6)
    with torch.no_grad():
        eager = flatten_outputs(result.graph(**inputs))

    merged = merge_lora(result.graph)
    assert merged.count == 10  # q, k, v, FFN up and down in each of 2 layers
    assert _lora_nodes(result.graph) == 0
    merged_path = tmp_path / "merged.onnx"
    merged_nodes = export_onnx(export_program(result.graph, captured.example_inputs, captured.dynamic_shapes),
                               merged_path, captured.output_names)["nodes"]
    assert merged_nodes == base_nodes < unmerged_nodes

    for a, b, ref in zip(run_onnx(merged_path, inputs), run_onnx(unmerged_path, inputs), eager, strict=True):
        assert abs(a - b).max() <= 1e-5
        assert (torch.from_numpy(a) - ref).abs().max() <= 1e-5


def test_merge_folds_fused_qkv_of_gpt2():
    result = _perturbed("builtin:tiny-gpt2", "lora[r=4,alpha=8,attn_matrices=['q','v']]")
    inputs = result.captured.inputs(2, 6)
    with torch.no_grad():
        before = flatten_outputs(result.graph(**inputs))
        assert merge_lora(result.graph).count == 2
        after = flatten_outputs(result.graph(**inputs))
    assert _lora_nodes(result.graph) == 0
    assert max((a - b).abs().max().item() for a, b in zip(before, after, strict=True)) <= 1e-5


def test_no_merge_when_the_weight_is_shared_with_an_unadapted_projection():
    """A weight read by two projections, only one adapted: folding would change the other one."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x), self.proj(x * 2)

    gm = torch.export.export(Tied(), (torch.randn(2, 8),)).module()
    first = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    gm.add_submodule("lora", LoRA(8, 8, parse_spec({"adapters": {"a": "lora[r=2]"}}).adapters["a"].config))
    with gm.graph.inserting_after(first):
        delta = gm.graph.call_module("lora", (first.args[0],))
    with gm.graph.inserting_after(delta):
        add = gm.graph.call_function(torch.ops.aten.add.Tensor, (first, delta))
    first.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    gm.recompile()
    weight_before = gm.proj.weight.clone()
    assert merge_lora(gm).count == 0
    assert torch.equal(gm.proj.weight, weight_before) and _lora_nodes(gm) == 1
