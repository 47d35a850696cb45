"""The LoRA family in composition blocks where adapters 1.3.0 gives no reference number (it crashes, or applies
the last child's DoRA magnitude to every row), and PEFT-loaded LoRA, which adapters cannot compose at all.

fxadapt's semantics (docs/composition.md, "fxadapt extensions"): a row block of Parallel / BatchSplit /
MultiTask equals the model with that block's child alone; a PEFT LoRA composes as the AdapterHub LoRA with
the same A, B and scaling. Both are checked here against separate runs; the reference's own cases are the
`*_lora_family` fixtures (test_reference_parity.py)."""

from __future__ import annotations

import pytest
import torch

import fxadapt
from conftest import REFERENCE, load_case
from fxadapt import Average, BatchSplit, MultiTask, Parallel, Stack
from fxadapt.errors import UserError
from fxadapt.lifecycle.base_graph import capture_base
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec

BERT = REFERENCE / "models" / "bert"
PEFT_LORA = REFERENCE / "cases" / "bert__peft_lora" / "adapter"  # r=4, lora_alpha=8, query and value
PEFT_DORA = REFERENCE / "cases" / "bert__peft_dora" / "adapter"
CONFIGS = {"l": "lora[r=4,alpha=8]", "i": "ia3[attn_matrices=['q','v'],intermediate_lora=False]",
           "d": "dora[r=4,alpha=8]", "e": "dora[r=2,alpha=4]", "v": "vera[r=4]",
           "g": "lora[r=2,alpha=4,use_gating=True]"}


def _model(captured, names: str) -> fxadapt.AdaptedModel:
    model = fxadapt.AdaptedModel(*captured)
    gen = torch.Generator().manual_seed(7)
    for name in names:
        model.add_adapter(name, CONFIGS[name])
        with torch.no_grad():
            for module in model.adapter_modules(name):
                for param in module.parameters():
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _single(model, name, inputs) -> torch.Tensor:
    model.set_active_adapters(name)
    return _out(model, inputs)


@pytest.mark.parametrize("children", ["li", "ld", "de", "gv"])
def test_parallel_row_blocks_equal_single_adapter_runs(captured, children):
    """Parallel(a, b) mixing IA3 with LoRA (the reference crashes: its states differ in shape) or DoRA with
    another adapter (the reference applies the last child's magnitude to every row): row block i equals the
    model with child i alone."""
    model = _model(captured, children)
    inputs = model.captured.inputs(2, 6, seed=3)
    model.set_active_adapters(Parallel(*children))
    out = _out(model, inputs)
    expected = torch.cat([_single(model, c, inputs) for c in children])
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5
    assert (expected[:2] - expected[2:]).abs().max().item() > 1e-3  # the children differ, so rows are routed


@pytest.mark.parametrize("children", ["il", "de"])
def test_batch_split_and_multi_task_rows_equal_single_adapter_runs(captured, children):
    model = _model(captured, children)
    inputs = model.captured.inputs(2, 6, seed=4)
    single = {c: _single(model, c, inputs) for c in children}
    model.set_active_adapters(BatchSplit(*children, batch_sizes=[1, 1]))
    out = _out(model, inputs)
    assert (out[:1] - single[children[0]][:1]).abs().max().item() <= 1e-5
    assert (out[1:] - single[children[1]][1:]).abs().max().item() <= 1e-5
    model.set_active_adapters(MultiTask(*children))
    out = _out(model, dict(inputs, task_ids=torch.tensor([1, 0])))
    assert (out[:1] - single[children[1]][:1]).abs().max().item() <= 1e-5
    assert (out[1:] - single[children[0]][1:]).abs().max().item() <= 1e-5


def test_average_of_ia3_and_lora_is_refused(captured):
    model = _model(captured, "il")
    with pytest.raises(UserError, match=r"average block cannot mix \(IA\)\^3 adapters"):
        model.set_active_adapters(Average("i", "l"))


def test_fused_qkv_lora_is_refused_in_a_block():
    """GPT-2's c_attn: the reference's LoRAMergedLinear composes in no block."""
    model = fxadapt.AdaptedModel(*capture_base(str(REFERENCE / "models" / "gpt2")))
    model.add_adapter("a", "lora[r=2]")
    model.add_adapter("b", "lora[r=2]")
    with pytest.raises(UserError, match="fused q/k/v projection .* cannot hold a composed LoRA"):
        model.set_active_adapters(Stack("a", "b"))


def _copy_peft_into_lora(model, peft: str, lora: str) -> None:
    """Give the AdapterHub LoRA `lora` the PEFT adapter's A and B (same r and alpha: same scaling)."""
    by_site = {(p.role, p.layer): m for p, m in zip(model._placements[peft], model.adapter_modules(peft),
                                                    strict=True)}
    with torch.no_grad():
        for placement, module in zip(model._placements[lora], model.adapter_modules(lora), strict=True):
            source = by_site[(placement.role, placement.layer)]
            module.lora_A.copy_(source.lora_A.weight)
            module.lora_B.copy_(source.lora_B.weight)
            assert module.scaling == source.scaling


@pytest.mark.parametrize("setup", [Stack("p", "i"), Stack("g", "p"), Parallel("p", "g"), Average("p", "g"),
                                   BatchSplit("g", "p", batch_sizes=[1, 1]), MultiTask("p", "g")])
def test_peft_lora_composes_as_the_adapterhub_lora_with_its_weights(captured, setup):
    """A PEFT-loaded LoRA in a block gives the numbers of the AdapterHub LoRA holding its A, B and scaling
    (whose compositions match adapters 1.3.0: the *_lora and *_lora_family fixtures)."""
    model = _model(captured, "lgi")
    model.load_adapter(PEFT_LORA, load_as="p")
    inputs = model.captured.inputs(2, 6, seed=5)
    if isinstance(setup, MultiTask):
        inputs = dict(inputs, task_ids=torch.tensor([1, 0]))
    model.set_active_adapters(setup)
    out = _out(model, inputs)
    model.set_active_adapters(fxadapt.blocks.from_json(_renamed(setup.to_json(), "p", "l")))
    other = _out(model, inputs)  # l still holds its own (random) weights
    _copy_peft_into_lora(model, "p", "l")
    expected = _out(model, inputs)
    assert (out - expected).abs().max().item() <= 1e-6
    assert (out - other).abs().max().item() > 1e-4  # the PEFT weights reach the output


def _renamed(value, old: str, new: str):
    if isinstance(value, str):
        return new if value == old else value
    if isinstance(value, list):
        return [_renamed(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _renamed(v, old, new) for k, v in value.items()}
    return value


def test_peft_dora_in_parallel_equals_its_single_run(captured):
    model = _model(captured, "l")
    model.load_adapter(PEFT_DORA, load_as="q")
    inputs = model.captured.inputs(2, 6, seed=6)
    model.set_active_adapters(Parallel("q", "l"))
    out = _out(model, inputs)
    expected = torch.cat([_single(model, "q", inputs), _single(model, "l", inputs)])
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["bert__stack_lora_family", "bert__average_lora_family",
                                  "bert__parallel_lora_family", "bert__multi_task_lora_family"])
def test_reference_fixture_through_the_python_api(captured, case):
    """The *_lora_family fixtures (adapters 1.3.0) through load_adapter / set_active_adapters: the registry's
    modules (VeRA's shared A and B included) bound into the composed sites give the reference's numbers."""
    info, io = load_case(case)
    model = fxadapt.AdaptedModel(*captured)
    for name, sub in info["adapters"].items():
        model.load_adapter(REFERENCE / "cases" / case / sub, load_as=name)
    model.set_active_adapters(fxadapt.blocks.from_json(info["setup"]))
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    inputs.update({name: io[name] for name in info["inputs"]})
    error = (_out(model, inputs) - io["out.last_hidden_state"]).abs().max().item()
    assert error <= 1e-5, f"{case}: max abs error {error:.2e} against adapters 1.3.0"


def test_peft_checkpoint_in_a_spec_block_equals_its_single_run(tmp_path):
    """The CLI path: `{"load": PEFT_DIR}` in a Parallel of a spec; row block 0 equals the PEFT adapter alone."""
    info, io = load_case("bert__peft_lora")
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    adapters = {"p": {"load": str(PEFT_LORA)}, "l": "lora[r=2,alpha=4]"}
    spec = parse_spec({"adapters": adapters, "active": {"parallel": ["p", "l"]},
                       "optimize": {"merge_lora": False}}, tmp_path)
    with torch.no_grad():
        out = build(str(BERT), spec).graph(**inputs)["last_hidden_state"]
    rows = io["out.last_hidden_state"].shape[0]
    assert out.shape[0] == 2 * rows
    assert (out[:rows] - io["out.last_hidden_state"]).abs().max().item() <= 1e-5  # PEFT's own number
    with pytest.raises(UserError, match="fused q/k/v projection"):
        build(str(REFERENCE / "models" / "gpt2"), parse_spec(
            {"adapters": {"a": "lora", "b": "lora"}, "active": {"stack": ["a", "b"]}}, tmp_path))


def test_gpt2_conv1d_projections_compose_with_their_own_layout():
    """GPT-2's Conv1D projections (addmm, weight [in, out]): DoRA reads W in that layout, a gate the 3-D input."""
    model = fxadapt.AdaptedModel(*capture_base(str(REFERENCE / "models" / "gpt2")))
    gen = torch.Generator().manual_seed(8)
    configs = {"d": "dora[r=4,alpha=8,selfattn_lora=False,output_lora=True]",
               "g": "lora[r=2,alpha=4,use_gating=True,selfattn_lora=False,intermediate_lora=True,output_lora=True]"}
    for name, config in configs.items():
        model.add_adapter(name, config)
        with torch.no_grad():
            for param in (p for m in model.adapter_modules(name) for p in m.parameters()):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    inputs = model.captured.inputs(2, 6, seed=9)
    model.set_active_adapters(Parallel("d", "g"))
    out = _out(model, inputs)
    expected = torch.cat([_single(model, "d", inputs), _single(model, "g", inputs)])
    assert (out - expected).abs().max().item() <= 1e-5
    assert (expected[:2] - expected[2:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("setup", [{"stack": ["a", "b"]}, {"stack": ["c", {"parallel": ["a", "b"]}]}])
def test_a_stack_over_a_non_square_projection_is_a_user_error(setup):
    """A stack feeds one LoRA's update into the next one's A: on the FFN's 32 -> 64 projection that cannot
    work (the reference crashes with a shape error); fxadapt names the site instead of crashing."""
    ffn = "lora[r=2,alpha=4,intermediate_lora=True,output_lora=True]"
    spec = parse_spec({"adapters": {"a": ffn, "b": ffn, "c": ffn}, "active": setup})
    with pytest.raises(UserError, match=r"square projection.*(32 -> 64|64 -> 32)"):
        build(str(BERT), spec)


def test_a_stack_of_attention_loras_is_not_refused():
    adapters = {"a": "lora[r=2,alpha=4]", "b": "lora[r=4,alpha=8]"}
    spec = parse_spec({"adapters": adapters, "active": {"stack": ["a", "b"]}})
    assert build(str(BERT), spec).pass_counts["lower_composition"] > 0
