"""Composition calls each method's own forward: a composed site runs the same Bottleneck.pre_forward / run /
post_forward as the single-adapter emitter, so Compacter (shared PHM tensors), AdapterPlus, parallel and
invertible adapters give the single adapter's numbers inside a block. Invertible adapters and ReFT follow the
reference's first-adapter rule; refused setups name the rule. Parity with adapters 1.3.0 per block is in the
reference fixtures (*__stack_compacter_inv, *__parallel_prefix, *__stack_reft, bert__stack_two_parallels, ...)."""

from __future__ import annotations

import pytest
import torch

import fxadapt
from conftest import REFERENCE, load_case
from fxadapt.capture import flatten_outputs
from fxadapt.errors import UserError
from fxadapt.lifecycle.base_graph import capture_base
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec


def _build(adapters: dict, active, model: str = "builtin:tiny-bert"):
    return build(model, parse_spec({"adapters": adapters, "active": active, "optimize": {"merge_lora": False}}))


def _perturb(result, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(result.graph.named_parameters()):
            if name.startswith("fxadapt."):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def _copy_adapters(source, target) -> None:
    """Give `target`'s modules the weights of `source`'s at the same (adapter, role, layer)."""
    modules = {(p.adapter, p.role, p.layer): source.graph.get_submodule(p.module_path)
               for p in source.graph.meta["fxadapt"]["placements"]}
    placements = target.graph.meta["fxadapt"]["placements"]
    assert {(p.adapter, p.role, p.layer) for p in placements} == set(modules)
    for p in placements:
        target.graph.get_submodule(p.module_path).load_state_dict(modules[(p.adapter, p.role, p.layer)].state_dict())


def _run(result, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(result.graph(**inputs))


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    "seq_bn", "double_seq_bn", "par_bn", "adapterplus[reduction_factor=8]", "compacter[reduction_factor=4]",
    "compacter++[reduction_factor=4,shared_W_phm=True]", "seq_bn_inv",
    "seq_bn[residual_before_ln='post_add',use_gating=True]"])
def test_a_one_adapter_stack_is_the_single_adapter(config):
    single = _build({"a": config}, "a")
    composed = _build({"a": config}, {"stack": ["a"]})
    assert any(p.module_path.startswith("fxadapt.composition.") for p in composed.graph.meta["fxadapt"]["placements"])
    _perturb(single, 0)
    _copy_adapters(single, composed)
    inputs = single.captured.inputs(2, 5)
    for got, want in zip(_run(composed, inputs), _run(single, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_compacter_parallel_runs_each_copy_as_its_adapter_alone():
    # The reference crashes here (Compacter acts after attention, Compacter++ does not): fxadapt's semantics.
    adapters = {"a": "compacter[reduction_factor=4]", "b": "compacter++[reduction_factor=4]"}
    composed = _build(adapters, {"parallel": ["a", "b"]})
    _perturb(composed, 1)
    inputs = composed.captured.inputs(2, 5)
    out = _run(composed, inputs)[0]
    for row, name in enumerate(adapters):
        alone = _build({name: adapters[name]}, name)
        modules = {(p.role, p.layer): composed.graph.get_submodule(p.module_path)
                   for p in composed.graph.meta["fxadapt"]["placements"] if p.adapter == name}
        for p in alone.graph.meta["fxadapt"]["placements"]:
            alone.graph.get_submodule(p.module_path).load_state_dict(modules[(p.role, p.layer)].state_dict())
        torch.testing.assert_close(out[2 * row:2 * row + 2], _run(alone, inputs)[0], rtol=1e-6, atol=1e-6)


def _called(result) -> set[str]:
    return {n.target for n in result.graph.graph.nodes if n.op == "call_module"}


def test_only_the_setups_first_invertible_block_runs():
    result = _build({"x": "seq_bn_inv", "y": "seq_bn_inv[inv_adapter_reduction_factor=4]"}, {"stack": ["x", "y"]})
    called = _called(result)
    assert "fxadapt.x.invertible" in called and "fxadapt.y.invertible" not in called
    assert isinstance(result.graph.get_submodule("fxadapt.y.invertible"), torch.nn.Module)  # kept for checkpoints


def test_reft_acts_only_as_the_setups_first_adapter():
    first = _called(_build({"r": "noreft", "b": "seq_bn"}, {"stack": ["r", "b"]}))
    later = _called(_build({"r": "noreft", "b": "seq_bn"}, {"stack": ["b", "r"]}))
    assert {f"fxadapt.r.L{i}_reft" for i in (0, 1)} <= first
    assert not any(t.startswith("fxadapt.r.") for t in later)


@pytest.mark.parametrize("adapters, active, message", [
    ({"p": "prefix_tuning[prefix_length=4]", "q": "prefix_tuning[prefix_length=6]"}, {"parallel": ["p", "q"]},
     "prefixes of different total lengths [4, 6]"),
    ({"p": "prefix_tuning[prefix_length=4]", "b": "seq_bn"}, {"batch_split": ["p", "b"], "batch_sizes": [1, 1]},
     "prefixes of different total lengths [0, 4]"),
    ({"p": "prefix_tuning[prefix_length=4,use_gating=True]", "q": "prefix_tuning[prefix_length=6,use_gating=True]"},
     {"batch_split": ["p", "q"], "batch_sizes": [1, 1]}, "prefixes of different total lengths [4, 6]"),
    ({"r": "loreft", "b": "seq_bn"}, {"parallel": ["r", "b"]}, "a parallel block cannot hold adapter 'r'"),
    ({"p": "prefix_tuning", "b": "seq_bn"}, {"average": ["p", "b"]}, "average block cannot hold adapter 'p'"),
])
def test_setups_the_methods_cannot_join_are_user_errors(adapters, active, message):
    with pytest.raises(UserError) as info:
        _build(adapters, active)
    assert message in str(info.value)


@pytest.mark.parametrize("case", ["bert__stack_compacter_inv", "bert__parallel_prefix", "bert__stack_reft",
                                  "bert__stack_two_parallels",
                                  # unions and gated prefix tuning: AdaptedModel binds its own gates too
                                  pytest.param("bert__batch_split_unipelt", marks=pytest.mark.slow),
                                  pytest.param("llama__stack_prefix_gated", marks=pytest.mark.slow)])
def test_new_fixtures_through_the_python_api(case):
    """The same setups through AdaptedModel (the registry's own modules bound into the composed graph)."""
    info, io = load_case(case)
    model = fxadapt.AdaptedModel(*capture_base(str(REFERENCE / "models" / info["arch"])))
    for name, sub in info["adapters"].items():
        model.load_adapter(REFERENCE / "cases" / case / sub, load_as=name)
    model.set_active_adapters(fxadapt.blocks.from_json(info["setup"]))
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    error = (out - io["out.last_hidden_state"]).abs().max().item()
    assert error <= 1e-5, f"{case}: max abs error {error:.2e} against adapters 1.3.0"
