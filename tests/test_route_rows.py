"""passes/route_rows.py: a multi_task site of single adapters becomes stacked weights gathered per row.

Checked: routed == unrouted (every LoRA-family variant and bottleneck kind, ranks and bottleneck sizes that
differ), every row == its child alone and -1 rows == the base model, out-of-range ids, sites left alone with
their reason, and PEFT's own mixed-batch outputs (`adapter_names`, tests/fixtures/routing/, made by
scripts/make_routing_fixture.py) through the CLI pipeline's graph and one ONNX model at two sequence lengths."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxadapt
from conftest import FIXTURES
from fxadapt import MultiTask, Stack
from fxadapt.errors import UserError
from fxadapt.methods.bottleneck.route import RoutedBottleneck
from fxadapt.methods.lora.route import RoutedLinear
from fxadapt.passes.route_rows import route_rows
from fxadapt.spec import parse_spec

ROUTING = FIXTURES / "routing"
CASES = {  # name -> the children's configs (ranks / bottleneck sizes differ: zero-padding must be exact)
    "lora": ["lora[r=2,alpha=4]", "lora[r=4,alpha=8,attn_matrices=['q','k','v']]", "lora[r=8,alpha=4]"],
    "ia3": ["ia3", "ia3[attn_matrices=['q','v']]"],
    "vera": ["vera[r=4]", "vera[r=2]"],
    "dora": ["dora[r=2,alpha=4]", "dora[r=4,alpha=8]"],
    "lora_family_mixed": ["lora[r=2,alpha=4]", "ia3", "dora[r=4,alpha=8]"],
    "seq_bn": ["seq_bn", "seq_bn[reduction_factor=4]"],
    "par_bn": ["par_bn", "par_bn[reduction_factor=8]"],
    "compacter": ["compacter[reduction_factor=4]", "compacter[reduction_factor=8]"],
}


def _randomize(model: fxadapt.AdaptedModel, names: list[str], seed: int = 7) -> None:
    """Non-trivial weights (fresh LoRA B is zero); IA3/VeRA/DoRA factors stay around their init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for module in model.adapter_modules(name):
                for key, param in module.named_parameters():
                    noise = torch.randn(param.shape, generator=gen) * 0.2
                    param.copy_(param + noise if key in ("lora_B", "m.weight", "vera_B", "vera_D") else noise)


def _multi_task(model, configs: list[str]) -> list[str]:
    names = [f"t{i}" for i in range(len(configs))]
    for name, config in zip(names, configs, strict=True):
        model.add_adapter(name, config)
    _randomize(model, names)
    return names


def _run(gm, inputs, task_ids) -> torch.Tensor:
    with torch.no_grad():
        return gm(**inputs, task_ids=torch.tensor(task_ids))[0]


def _routed(gm):
    routed = copy.deepcopy(gm)
    result = route_rows(routed)
    return routed, result.count


@pytest.mark.parametrize("case", list(CASES))
def test_routed_equals_unrouted_and_each_row_its_child_alone(model, case):
    names = _multi_task(model, CASES[case])
    inputs = model.captured.inputs(1, 6, seed=3)
    rows = {k: v.expand(len(names) + 2, -1).contiguous() for k, v in inputs.items()}  # one sentence, every route
    task_ids = [*range(len(names)), -1, 0]
    singles = []
    for name in names:
        model.set_active_adapters(name)
        singles.append(model(**inputs).last_hidden_state)
    model.set_active_adapters(None)
    base = model(**inputs).last_hidden_state
    model.set_active_adapters(MultiTask(*names))
    gm = model.graph_module
    unrouted = _run(gm, rows, task_ids)
    routed_gm, count = _routed(gm)
    assert count > 0 and any(isinstance(m, RoutedLinear | RoutedBottleneck) for m in routed_gm.modules())
    routed = _run(routed_gm, rows, task_ids)
    assert (routed - unrouted).abs().max().item() <= 1e-5
    for i, single in enumerate(singles):
        assert (routed[i] - single[0]).abs().max().item() <= 1e-5
    assert (routed[len(names)] - base[0]).abs().max().item() <= 1e-5  # -1: the base model's row
    assert min((s - base).abs().max().item() for s in singles) > 1e-3  # every child changes the output


def test_python_api_export_is_routed_and_keeps_the_sequence_dynamic(model):
    """AdaptedModel.export() of a MultiTask setup runs route_rows; the program takes two sequence lengths."""
    names = _multi_task(model, CASES["lora_family_mixed"])
    model.set_active_adapters(MultiTask(*names))
    program = model.export()
    assert any(key.startswith("fxadapt.routed.") for key in program.state_dict)
    for batch, length in ((3, 6), (4, 9)):
        inputs = model.captured.inputs(batch, length, seed=length)
        task_ids = torch.tensor([-1, 0, 1, 2][:batch])
        with torch.no_grad():
            expected = model(**inputs, task_ids=task_ids).last_hidden_state
            out = program.module()(**inputs, task_ids=task_ids)
        assert (out[0] - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["lora", "seq_bn"])
def test_out_of_range_task_ids_are_a_user_error(model, case):
    names = _multi_task(model, CASES[case][:2])
    model.set_active_adapters(MultiTask(*names))
    inputs = model.captured.inputs(2, 4, seed=1)
    routed_gm, _ = _routed(model.graph_module)
    for gm in (model.graph_module, routed_gm):
        with pytest.raises(UserError, match=r"task_ids \[2\] .* out of range.* 0\.\.1, or -1"):
            _run(gm, inputs, [0, 2])


def test_sites_that_cannot_be_routed_are_left_alone_with_their_reason(model):
    """A child that is a block (Stack), and bottleneck children whose pre/post steps differ (seq_bn, par_bn)."""
    names = _multi_task(model, ["lora[r=2]", "lora[r=4]", "seq_bn", "par_bn"])
    inputs = model.captured.inputs(2, 4, seed=1)
    for setup, reason in ((MultiTask(Stack(names[0], names[1]), names[1]), "is a block, not a single adapter"),
                          (MultiTask(names[2], names[3]), "differ in pre/post options")):
        model.set_active_adapters(setup)
        routed_gm, count = _routed(model.graph_module)
        assert count == 0
        assert not any(isinstance(m, RoutedLinear | RoutedBottleneck) for m in routed_gm.modules())
        reasons = {r["reason"] for r in routed_gm.meta["fxadapt"]["not_routed"]}
        assert reasons and all(reason in r for r in reasons)
        assert torch.equal(_run(routed_gm, inputs, [1, 0]), _run(model.graph_module, inputs, [1, 0]))


def test_bottleneck_adapters_join_multi_task_but_prefix_tuning_does_not():
    adapters = {"a": "seq_bn", "b": "compacter", "p": "prefix_tuning"}
    assert parse_spec({"adapters": adapters, "active": {"multi_task": ["a", "b"]}}).setup.kind == "multi_task"
    with pytest.raises(UserError, match="a multi_task block cannot hold adapter 'p'"):
        parse_spec({"adapters": adapters, "active": {"multi_task": ["a", "p"]}})


def _peft_spec() -> tuple[dict, dict]:
    case = json.loads((ROUTING / "case.json").read_text())
    spec = {"adapters": {n: {"load": str(ROUTING / "adapters" / n)} for n in case["adapters"]},
            "active": {"multi_task": case["adapters"]}}
    return case, spec


def test_peft_adapter_names_parity_graph():
    """PEFT's `model(**inputs, adapter_names=[...])` (one adapter per row, "__base__") == the PEFT-loaded adapters
    in a multi_task block, unrouted (each row its adapter alone) and routed."""
    from fxadapt import pass_list, pipeline

    case, spec_data = _peft_spec()
    io = load_file(str(ROUTING / "io.safetensors"))
    spec = parse_spec(spec_data)
    unrouted = pipeline.build(str(ROUTING / "model"), spec).graph
    routed, counts = pass_list.optimize(copy.deepcopy(unrouted), pass_list.Context(spec))
    assert counts.get("route_rows", 0) > 0
    for gm in (unrouted, routed):
        for length in case["lengths"]:  # the graph keeps the sequence dynamic
            with torch.no_grad():
                out = gm(input_ids=io[f"input_ids_{length}"], attention_mask=io[f"attention_mask_{length}"],
                         task_ids=io["task_ids"])
            assert (out[0] - io[f"last_hidden_state_{length}"]).abs().max().item() <= 1e-5
            assert (out[1] - io[f"pooler_output_{length}"]).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_peft_adapter_names_parity_onnx_at_two_sequence_lengths(tmp_path):
    """`fxadapt compile` of the routed multi_task: one ONNX model, run at both of PEFT's sequence lengths."""
    import onnxruntime as ort  # heavy optional import, only this test needs it

    from fxadapt.pipeline import compile_model

    case, spec_data = _peft_spec()
    io = load_file(str(ROUTING / "io.safetensors"))
    result = compile_model(str(ROUTING / "model"), parse_spec(spec_data), tmp_path / "out", ("onnx",))
    assert result.pass_counts.get("route_rows", 0) > 0
    session = ort.InferenceSession(str(Path(tmp_path / "out" / "model.onnx")))
    names = [o.name for o in session.get_outputs()]
    for length in case["lengths"]:
        feeds = {"input_ids": io[f"input_ids_{length}"].numpy(), "task_ids": io["task_ids"].numpy(),
                 "attention_mask": io[f"attention_mask_{length}"].numpy()}
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        for key in ("last_hidden_state", "pooler_output"):
            error = abs(torch.from_numpy(outputs[key]) - io[f"{key}_{length}"]).max().item()
            assert error <= 1e-5, (length, key, error)


@pytest.mark.slow
def test_compiled_mixed_families_route_and_verify_at_two_sequence_lengths(tmp_path):
    """A plain list mixing families: bottleneck children are routed at residual sites, the LoRA child at
    projections (each row's child is absent at the other family's sites: those rows keep the base output
    there). compile_model verifies the ONNX model against the unrouted graph at 2x8 and 3x5."""
    from fxadapt.pipeline import compile_model

    spec = parse_spec({"adapters": {"a": "seq_bn", "b": "lora[r=4,alpha=8]", "c": "seq_bn[reduction_factor=4]"},
                       "active": {"multi_task": ["a", "b", "c"]}})
    result = compile_model(str(FIXTURES / "reference" / "models" / "bert"), spec, tmp_path / "out", ("onnx",))
    assert result.pass_counts["route_rows"] > 0 and result.ok
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pinned"] == {} and report["not_routed"] == []
