"""fuse_parallel_branches: unmerged LoRA updates that read one tensor (q/k/v of an attention) take one GEMM for
their A's and keep the outputs within float rounding (graph and ONNX); an Average of LoRAs at a site becomes one
product; single branches, branches on different tensors, merged LoRA, DoRA, gates and dropout in training mode
are left alone with a reason."""

from __future__ import annotations

import json

import pytest
import torch
from torch import fx

from conftest import REFERENCE
from fxadapt import meta, pass_list
from fxadapt.capture import export_program, flatten_outputs
from fxadapt.cli import main
from fxadapt.export.onnx import export_onnx, run_onnx
from fxadapt.graph_ops import aten
from fxadapt.lifecycle.base_graph import capture_base, fresh_copy
from fxadapt.methods.lora import FamilyModule, peft
from fxadapt.methods.lora.site import LoRASite
from fxadapt.passes.fuse_parallel import PASS, fuse_parallel_branches
from fxadapt.passes.merge_lora import merge_lora
from fxadapt.sites import find_sites
from fxadapt.spec import AdapterDef, Spec, parse_spec

QKV = "lora[r=4,alpha=7,attn_matrices=['q','k','v']]"  # alpha / r = 1.75: the scaling is not a power of two


def _rewritten(captured, spec: Spec, seed: int = 0) -> fx.GraphModule:
    """The graph after the REWRITE passes, with random adapter weights (B = 0 at init would hide any error)."""
    gm = fresh_copy(captured.module)
    gm, _ = pass_list.rewrite(gm, pass_list.Context(spec, find_sites(gm)))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in gm.named_parameters():
        if name.startswith("fxadapt."):
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    return gm


def _spec(adapters: dict, active=None, merge: bool = False) -> Spec:
    data = {"adapters": adapters, "optimize": {"merge_lora": merge}}
    return parse_spec(data if active is None else {**data, "active": active})


def _peft(**fields) -> Spec:
    config = peft.Config(**fields)
    return Spec({"p": AdapterDef("p", peft, config, "$.adapters.p")}, ["p"], {"merge_lora": False})


def _outputs(gm: fx.GraphModule, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(gm(**inputs))


def _max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _adapter_calls(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FamilyModule | LoRASite)]


def _fused_products(gm: fx.GraphModule) -> list[fx.Node]:
    """The shared A products the pass made: linear(x, fxadapt._fused.*.lora_A)."""
    return [n for n in gm.graph.nodes if n.target is aten.linear.default and n.args[1].op == "get_attr"
            and str(n.args[1].target).startswith("fxadapt._fused.") and n.args[1].target.endswith("lora_A")]


def _equivalent(captured, gm: fx.GraphModule) -> tuple[float, float, dict]:
    """(max error fused vs unfused, max effect of the adapters vs the base model, the pass's record), on a shape
    other than the capture's."""
    inputs = captured.inputs(3, 5)
    before, base = _outputs(gm, inputs), _outputs(captured.module, inputs)
    result = fuse_parallel_branches(gm)
    gm.graph.lint()
    assert result.count > 0
    return _max_error(_outputs(gm, inputs), before), _max_error(before, base), gm.meta["fxadapt"]["fused"]


def test_qkv_loras_share_one_gemm_within_rounding_and_counts_drop(captured):
    captured = captured[0]
    gm = _rewritten(captured, _spec({"a": QKV}))
    error, effect, record = _equivalent(captured, gm)
    assert effect > 1e-3  # the adapters change the outputs, so equal outputs mean the fusion is right
    assert error <= 1e-5
    assert _adapter_calls(gm) == []
    products = _fused_products(gm)
    assert len(products) == len(record["groups"]) == 2  # one per layer
    assert [tuple(gm.get_parameter(p.args[1].target).shape) for p in products] == [(12, 32)] * 2
    assert [[b["site"] for b in g["branches"]] for g in record["groups"]] == [["attn.q", "attn.k", "attn.v"]] * 2
    before, after = record["counts"]["before"], record["counts"]["after"]
    # per layer: 3 x (A, B) products -> one A GEMM and 3 B's
    assert before["matmuls"] - after["matmuls"] == 2 * (6 - 4)
    assert after["nodes"] < before["nodes"]
    for node in gm.graph.nodes:
        origin = node.meta.get(meta.ORIGIN) or {}
        if origin.get("pass") == PASS and node.op == "call_function":
            assert node.meta.get("nn_module_stack") and origin["adapter"] == "a" and origin["method"] == "lora"
            assert origin["layer"] in (0, 1) and origin["site"].startswith("attn.")
    assert [tuple(p.meta["val"].shape)[-1] for p in products] == [12, 12]  # the shared product's shape is known


def test_peft_targets_with_different_ranks_and_a_lora_bias(captured):
    captured = captured[0]
    spec = _peft(target_modules=["query", "key", "value"], r=4, lora_alpha=6, rank_pattern={"key": 2, "value": 6},
                 alpha_pattern={"value": 5}, lora_bias=True, use_rslora=True)
    gm = _rewritten(captured, spec, seed=1)
    error, effect, record = _equivalent(captured, gm)
    assert effect > 1e-3 and error <= 1e-5
    assert [[b["rank"] for b in g["branches"]] for g in record["groups"]] == [[4, 2, 6]] * 2
    assert [g["rank"] for g in record["groups"]] == [12, 12]
    assert {b["method"] for g in record["groups"] for b in g["branches"]} == {"peft_lora"}



def test_vera_siblings_share_one_gemm_of_their_thin_factors(captured):
    captured = captured[0]
    gm = _rewritten(captured, _spec({"a": "vera[r=4,alpha=7,attn_matrices=['q','k','v']]"}), seed=3)
    error, effect, record = _equivalent(captured, gm)
    assert effect > 1e-3 and error <= 1e-5
    assert _adapter_calls(gm) == []
    assert [[b["method"] for b in g["branches"]] for g in record["groups"]] == [["vera"] * 3] * 2

def test_average_of_loras_is_one_product_per_site(captured):
    captured = captured[0]
    spec = _spec({"a": "lora[r=4,alpha=7]", "b": "lora[r=8,alpha=3]"},
                 {"average": ["a", "b"], "weights": [0.3, 0.7]})
    gm = _rewritten(captured, spec, seed=2)
    error, effect, record = _equivalent(captured, gm)
    assert effect > 1e-3 and error <= 1e-5
    assert _adapter_calls(gm) == []
    # q and v of a layer read one tensor: both sites' 2 + 2 A's in one GEMM of rank 24
    assert [(g["rank"], [b["adapters"] for b in g["branches"]]) for g in record["groups"]] == [(24, [2, 2])] * 2
    assert record["counts"]["before"]["matmuls"] - record["counts"]["after"]["matmuls"] == 2 * (8 - 3)


@pytest.mark.slow
def test_fused_graph_exports_to_onnx_with_fewer_nodes(captured, tmp_path):
    captured = captured[0]
    gm = _rewritten(captured, _spec({"a": QKV}))
    unfused = export_onnx(export_program(gm, captured.example_inputs, captured.dynamic_shapes),
                          tmp_path / "unfused.onnx", captured.output_names)["nodes"]
    inputs = captured.inputs(3, 5)
    reference = _outputs(gm, inputs)
    assert fuse_parallel_branches(gm).count > 0
    fused = export_onnx(export_program(gm, captured.example_inputs, captured.dynamic_shapes),
                        tmp_path / "fused.onnx", captured.output_names)["nodes"]
    assert fused < unfused
    got = [torch.from_numpy(a) for a in run_onnx(tmp_path / "fused.onnx", inputs)]
    assert _max_error(got, reference) <= 1e-5


def test_pass_list_runs_it_only_with_merge_lora_off(captured):
    captured = captured[0]
    unmerged = _spec({"a": QKV})
    gm, counts = pass_list.optimize(_rewritten(captured, unmerged), pass_list.Context(unmerged))
    assert counts["fuse_parallel_branches"] > 0 and _adapter_calls(gm) == []
    merged = _spec({"a": QKV}, merge=True)
    _, counts = pass_list.optimize(_rewritten(captured, merged), pass_list.Context(merged))
    assert "fuse_parallel_branches" not in counts


def _left_alone(captured, spec: Spec, train: bool = False) -> dict:
    """Run the pass on a graph it must not change: the code, outputs and adapter calls stay as they were."""
    gm = _rewritten(captured, spec)
    if train:
        for module in gm.modules():
            if isinstance(module, FamilyModule):
                module.train()
    code, calls = gm.code, _adapter_calls(gm)
    inputs = captured.inputs(2, 4)
    before = _outputs(gm, inputs) if not train else None
    assert fuse_parallel_branches(gm).count == 0
    assert gm.code == code and _adapter_calls(gm) == calls and _fused_products(gm) == []
    if before is not None:
        assert _max_error(_outputs(gm, inputs), before) == 0.0
    record = gm.meta["fxadapt"]["fused"]
    assert record["groups"] == [] and record["counts"]["before"] == record["counts"]["after"]
    return {entry["module"]: entry["reason"] for entry in record["left"]}


def test_a_single_adapted_projection_is_left_alone(captured):
    left = _left_alone(captured[0], _spec({"a": "lora[r=4,attn_matrices=['q']]"}))
    assert left == {f"fxadapt.a.L{i}_attn_q": "no other adapter branch reads its input" for i in (0, 1)}


def test_projections_reading_different_tensors_are_not_fused(captured):
    # ffn.up reads the attention block's LayerNorm output, ffn.down the activation: two inputs, one branch each
    spec = _spec({"a": "lora[r=4,selfattn_lora=False,intermediate_lora=True,output_lora=True]"})
    left = _left_alone(captured[0], spec)
    assert len(left) == 4 and set(left.values()) == {"no other adapter branch reads its input"}


def test_merged_lora_leaves_nothing_to_fuse(captured):
    gm = _rewritten(captured[0], _spec({"a": QKV}, merge=True))
    assert merge_lora(gm).count > 0
    assert fuse_parallel_branches(gm).count == 0
    assert gm.meta["fxadapt"]["fused"]["groups"] == [] and gm.meta["fxadapt"]["fused"]["left"] == []


@pytest.mark.parametrize(("config", "reason"), [
    ("lora[r=4,attn_matrices=['q','k','v'],use_dora=True]", "DoRA scales the whole projection output"),
    ("lora[r=4,attn_matrices=['q','k','v'],use_gating=True]", "gated"),
    ("ia3[attn_matrices=['q','k','v'],intermediate_lora=False]", "(IA)^3 multiplies"),
])
def test_updates_that_are_not_plain_low_rank_products_are_left_alone_with_a_reason(captured, config, reason):
    left = _left_alone(captured[0], _spec({"a": config}))
    assert len(left) == 6 and all(r.startswith(reason) for r in left.values()), left


def test_dropout_in_training_mode_is_left_alone(captured):
    left = _left_alone(captured[0], _spec({"a": "lora[r=4,dropout=0.1,attn_matrices=['q','k','v']]"}), train=True)
    assert len(left) == 6 and all(r.startswith("training mode") for r in left.values())


def test_parallel_row_blocks_are_left_alone(captured):
    spec = _spec({"a": "lora[r=4]", "b": "lora[r=8]"}, {"parallel": ["a", "b"]})
    left = _left_alone(captured[0], spec)
    assert len(left) == 4 and all(r.startswith("Parallel") for r in left.values())


@pytest.mark.slow
def test_gate_and_up_of_a_gated_ffn_share_one_gemm():
    """Llama: PEFT LoRA on every projection fuses q/k/v and gate/up per layer; down_proj (its own input) is left."""
    captured, _ = capture_base(str(REFERENCE / "models" / "llama"))
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    gm = _rewritten(captured, _peft(target_modules=targets, r=4, lora_alpha=6, rank_pattern={"up_proj": 2}))
    error, effect, record = _equivalent(captured, gm)
    assert effect > 1e-3 and error <= 1e-5
    sites = [[b["site"] for b in g["branches"]] for g in record["groups"]]
    assert sites == [["attn.q", "attn.k", "attn.v"], ["ffn.gate", "ffn.up"]] * 2
    assert sorted(e["module"].rpartition(".")[2] for e in record["left"]) == ["layers_0_mlp_down_proj",
                                                                              "layers_1_mlp_down_proj"]


@pytest.mark.slow
def test_report_json_shows_the_groups_and_counts(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"a": "lora[r=4,attn_matrices=['q','k','v'],init_weights='bert']"},
                                "optimize": {"merge_lora": False}}))
    assert main(["compile", "--spec", str(spec), "-o", str(tmp_path / "out"), "--format", "onnx", "--debug"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["passes"]) == ["insert_adapters", "fuse_parallel_branches", "eliminate_dead_code"]
    fused = report["fused_branches"]
    assert [len(g["branches"]) for g in fused["groups"]] == [3, 3] and fused["left"] == []
    assert fused["counts"]["after"]["matmuls"] == fused["counts"]["before"]["matmuls"] - 4
