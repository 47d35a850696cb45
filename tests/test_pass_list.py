"""The one pass list (fxadapt/pass_list.py): which passes run for which spec, under which report names, and
debug mode's checks after every pass (a wrong pass injected into the list is named)."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import fxadapt
from conftest import REFERENCE
from fxadapt import pass_list, pipeline
from fxadapt.lifecycle.base_graph import capture_base
from fxadapt.pass_checks import OutputsChanged
from fxadapt.passes.manager import PassError, PassResult
from fxadapt.spec import parse_spec

LORA = {"adapters": {"s": "lora[r=4,alpha=8,init_weights='bert']"}}
STACK = {"adapters": {"a": "lora[init_weights='bert']", "b": "lora[init_weights='bert']"},
         "active": {"stack": ["a", "b"]}}


def _scales_first_output(gm: fx.GraphModule, ctx: pass_list.Context) -> PassResult:
    """A wrong 'optimization': multiplies the first output by 1.5."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    first = output.args[0][0]
    with gm.graph.inserting_before(output):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (first, 1.5))
    output.replace_input_with(first, scaled)
    return PassResult(gm, 1)


def _breaks_at_run_time(gm: fx.GraphModule, ctx: pass_list.Context) -> PassResult:
    """A wrong rewrite: lints (every value is defined before use) but fails when run (mm of a 3-d tensor)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    first = output.args[0][0]
    with gm.graph.inserting_before(output):
        gm.graph.call_function(torch.ops.aten.mm.default, (first, first))
    return PassResult(gm, 1)


def test_single_adapters_and_setups_run_their_own_rewrite_pass():
    single = pipeline.build("builtin:tiny-bert", parse_spec(LORA))
    assert list(single.pass_counts) == ["insert_adapters"] and single.pass_counts["insert_adapters"] > 0
    stacked = pipeline.build("builtin:tiny-bert", parse_spec(STACK))
    # lower_composition is its own pass: its nodes are not counted under insert_adapters
    assert list(stacked.pass_counts) == ["lower_composition"] and stacked.pass_counts["lower_composition"] > 0
    origins = {n.meta["fxadapt"]["pass"] for n in stacked.graph.graph.nodes if "fxadapt" in n.meta}
    assert origins == {"lower_composition"}


def test_optimize_list_follows_the_spec_switches():
    assert pass_list.optimize_names(pass_list.Context(parse_spec(LORA))) == ["merge_lora", "eliminate_dead_code"]
    unmerged = parse_spec({**LORA, "optimize": {"merge_lora": False}})
    assert pass_list.optimize_names(pass_list.Context(unmerged)) == ["fuse_parallel_branches",
                                                                    "eliminate_dead_code"]
    assert pass_list.optimize_names(pass_list.Context(options={"merge_lora": False})) == [
        "fuse_parallel_branches", "eliminate_dead_code"]


def test_debug_mode_names_the_first_optimization_pass_that_changes_outputs(tmp_path, monkeypatch):
    wrong = pass_list.Step("scales_outputs", _scales_first_output)
    monkeypatch.setattr(pass_list, "OPTIMIZE", [pass_list.OPTIMIZE[0], wrong, pass_list.OPTIMIZE[1]])
    with pytest.raises(OutputsChanged, match=r"pass 'scales_outputs'.*passes before it: merge_lora.*"
                                             r"last_hidden_state max abs \d\.\d+e[+-]\d+") as info:
        pipeline.compile_model("builtin:tiny-bert", parse_spec(LORA), tmp_path / "out", ("onnx",), debug=True)
    assert "merge_lora'" not in str(info.value).split("passes before it")[0]  # merge_lora kept the numbers
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_without_debug_mode_the_wrong_pass_is_not_caught_after_each_pass(monkeypatch):
    wrong = pass_list.Step("scales_outputs", _scales_first_output)
    monkeypatch.setattr(pass_list, "OPTIMIZE", [*pass_list.OPTIMIZE, wrong])
    monkeypatch.delenv(pass_list.DEBUG_ENV, raising=False)
    result = pipeline.build("builtin:tiny-bert", parse_spec(LORA))
    pipeline.optimize(result, parse_spec(LORA))  # no check: only the final verification would see it
    assert result.pass_counts["scales_outputs"] == 1


@pytest.mark.slow
def test_debug_env_var_checks_rewrite_passes_run(monkeypatch):
    monkeypatch.setattr(pass_list, "REWRITE", [*pass_list.REWRITE, pass_list.Step("breaks", _breaks_at_run_time)])
    monkeypatch.setenv(pass_list.DEBUG_ENV, "1")
    with pytest.raises(PassError, match="pass 'breaks' failed the check after it.*passes before it: insert_adapters"):
        pipeline.build("builtin:tiny-bert", parse_spec(LORA))
    monkeypatch.setenv(pass_list.DEBUG_ENV, "0")
    assert pipeline.build("builtin:tiny-bert", parse_spec(LORA)).pass_counts["breaks"] == 1  # unchecked


@pytest.mark.slow
def test_python_api_compile_runs_the_same_list_and_debug_mode(tmp_path, monkeypatch):
    """AdaptedModel.compile: the same passes under the same names as the CLI, checked after each (env var)."""
    model = fxadapt.AdaptedModel(*capture_base(str(REFERENCE / "models" / "bert")))
    for name in ("a", "b"):
        model.add_adapter(name, "lora[r=4,alpha=8,init_weights='bert']")
    model.set_active_adapters(fxadapt.Stack("a", "b"))
    monkeypatch.setenv(pass_list.DEBUG_ENV, "1")
    result = model.compile(tmp_path / "out", formats=("onnx",))
    assert result.ok
    assert list(result.pass_counts) == ["lower_composition", "merge_lora", "eliminate_dead_code"]
    assert result.pass_counts["lower_composition"] > 0
    wrong = pass_list.Step("scales_outputs", _scales_first_output)
    monkeypatch.setattr(pass_list, "OPTIMIZE", [*pass_list.OPTIMIZE, wrong])
    with pytest.raises(OutputsChanged, match="pass 'scales_outputs'"):
        model.compile(tmp_path / "out2", formats=("onnx",))


def test_python_api_compile_takes_debug_as_an_argument(tmp_path, monkeypatch):
    model = fxadapt.AdaptedModel(*capture_base(str(REFERENCE / "models" / "bert")))
    model.add_adapter("a", "lora[r=4,alpha=8,init_weights='bert']", set_active=True)
    monkeypatch.delenv(pass_list.DEBUG_ENV, raising=False)
    monkeypatch.setattr(pass_list, "OPTIMIZE", [*pass_list.OPTIMIZE, pass_list.Step("scales", _scales_first_output)])
    with pytest.raises(OutputsChanged, match="pass 'scales'"):
        model.compile(tmp_path / "out", formats=("onnx",), debug=True)
    assert not (tmp_path / "out").exists()
