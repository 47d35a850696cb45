"""Composition blocks and AdapterFusion in the Python API (fxadapt.adapt / AdaptedModel): the reference
fixtures of `adapters` 1.3.0 through load_adapter / load_adapter_fusion / set_active_adapters(block), the
CLI's graph for the same saved files, train_adapter_fusion, weights shared across setups, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import fxadapt
from conftest import REFERENCE, load_case
from fxadapt import Average, BatchSplit, Fuse, MultiTask, Parallel, Split, Stack
from fxadapt.errors import UserError

BERT = REFERENCE / "models" / "bert"
CASES = ["bert__stack_bn", "bert__fuse", "bert__stack_fuse", "bert__parallel_bn", "bert__stack_parallel",
         "bert__split_bn", "bert__batch_split_bn", "bert__average_bn", "bert__stack_lora", "bert__parallel_lora",
         "bert__average_lora", "bert__batch_split_lora", "bert__multi_task_lora", "bert__parallel_mixed"]


def _inputs(model, batch=2, seq=6):
    return model.captured.inputs(batch, seq, seed=3)


def _perturb(modules, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _two_fused(model):
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "seq_bn[reduction_factor=8]")
    model.add_adapter_fusion(Fuse("a", "b"))
    _perturb(model.adapter_modules("a") + model.adapter_modules("b") + model._fusion_modules("a,b"))


@pytest.mark.parametrize("case", CASES)
def test_reference_fixture_through_the_python_api(captured, case):
    """Each composition fixture: its adapters and fusion loaded, its setup activated (a fxadapt block built from
    case.json), the output equal to adapters 1.3.0's within 1e-5 (measured: 0.0 for all)."""
    info, io = load_case(case)
    model = fxadapt.AdaptedModel(*captured)
    for name, sub in info["adapters"].items():
        model.load_adapter(REFERENCE / "cases" / case / sub, load_as=name)
    for fusion in info["fusions"]:
        assert model.load_adapter_fusion(REFERENCE / "cases" / case / fusion["load"]) == "a,b"
    setup = fxadapt.blocks.from_json(info["setup"])
    model.set_active_adapters(setup)
    assert model.active_adapters == setup
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    inputs.update({name: io[name] for name in info["inputs"]})  # MultiTask's task_ids
    error = (_out(model, inputs) - io["out.last_hidden_state"]).abs().max().item()
    assert error <= 1e-5, f"{case}: max abs error {error:.2e} against adapters 1.3.0"


@pytest.mark.parametrize("case", ["bert__stack_lora", "bert__stack_bn"])
def test_a_list_of_names_is_a_stack_as_in_the_reference(captured, case):
    """adapters 1.3.0 reads set_active_adapters(["a", "b"]) as Stack("a", "b") (for LoRA: b reads a's output)."""
    info, io = load_case(case)
    assert info["setup"] == {"stack": ["a", "b"]}
    model = fxadapt.AdaptedModel(*captured)
    for name, sub in info["adapters"].items():
        model.load_adapter(REFERENCE / "cases" / case / sub, load_as=name)
    model.set_active_adapters(["a", "b"])
    assert model.active_adapters == Stack("a", "b")
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    error = (_out(model, inputs) - io["out.last_hidden_state"]).abs().max().item()
    assert error <= 1e-5, f"{case}: max abs error {error:.2e} against adapters 1.3.0"


def test_blocks_mirror_the_reference_classes():
    assert Fuse("a", "b").name == "a,b" and Fuse(Stack("a", "c"), "b").name == "c,b"
    assert Fuse("a", "b", name="f").to_json() == {"fuse": ["a", "b"], "name": "f"}
    assert Average("a", "b", weights=[1, 3]).weights == [0.25, 0.75]
    assert BatchSplit("a", "b", batch_sizes=2).batch_sizes == [2, 2]
    assert Stack("a", Parallel("b", "c")).flatten() == {"a", "b", "c"}
    assert Stack("a", Parallel("b", "c")).parallel_channels == 2
    assert repr(Stack("a", Split("b", "c", splits=[1, 2]))) == "Stack[a, Split[b, c]]"
    assert fxadapt.blocks.from_json(Stack("a", MultiTask("b", "c")).to_json()) == Stack("a", MultiTask("b", "c"))


def test_saved_fusion_loads_into_a_fresh_model_and_the_cli(model, captured, tmp_path):
    """save_adapter / save_adapter_fusion -> (a) a fresh AdaptedModel, (b) the CLI's graph of a spec loading the
    same directories: identical outputs."""
    _two_fused(model)
    model.set_active_adapters(Stack(Fuse("a", "b")))
    inputs = _inputs(model)
    expected = _out(model, inputs)
    model.save_adapter(tmp_path / "a", "a")
    model.save_adapter(tmp_path / "b", "b")
    model.save_adapter_fusion(tmp_path / "fusion", "a,b")
    saved = json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text())
    assert saved["adapter_names"] == ["a", "b"] and saved["name"] == "a,b" and saved["config"]["value"] is True
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "fusion" / "model_adapter_fusion.safetensors"))
    assert "encoder.layer.0.output.adapter_fusion_layer.a,b.query.weight" in keys and len(keys) == 2 * 5

    other = fxadapt.AdaptedModel(*captured)
    other.load_adapter(tmp_path / "a")
    other.load_adapter(tmp_path / "b")
    assert other.load_adapter_fusion(tmp_path / "fusion", set_active=True) == "a,b"
    assert other.active_adapters == Fuse("a", "b")
    assert torch.equal(_out(other, inputs), expected)

    from fxadapt.pipeline import build
    from fxadapt.spec import parse_spec

    spec = parse_spec({"adapters": {"a": {"load": "a"}, "b": {"load": "b"}}, "active": {"fuse": ["a", "b"]},
                       "fusions": [{"load": "fusion"}], "optimize": {"merge_lora": False}}, tmp_path)
    with torch.no_grad():
        cli = build(str(BERT), spec).graph(**inputs)["last_hidden_state"]
    assert (cli - expected).abs().max() <= 1e-6


def test_train_adapter_fusion_trains_only_the_fusion_unless_adapters_are_unfrozen(model):
    _two_fused(model)
    inputs = _inputs(model)

    def train(**kwargs):
        model.train_adapter_fusion(Fuse("a", "b"), **kwargs)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            loss = model(**inputs).last_hidden_state.pow(2).mean() + model.get_fusion_regularization_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
                if not torch.equal(p, before[n])}

    assert train() == {"fusions.a_b"}
    assert model.training and model.active_adapters == Fuse("a", "b")
    assert not any(p.requires_grad for p in model.base.parameters())
    assert train(unfreeze_adapters=True) == {"fusions.a_b", "fxadapt.a", "fxadapt.b"}
    model.eval()
    assert [r["train"] for r in model.adapter_summary(as_dict=True)][:3] == [True, True, True]


def test_weights_trained_under_a_stack_are_the_single_adapters_weights(model, captured, tmp_path):
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "lora[r=4,alpha=8]")
    model.train_adapter(Stack("a", "b"))
    assert model.active_adapters == Stack("a", "b")
    inputs = _inputs(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    start = [p.detach().clone() for p in model.adapter_modules("a")[0].parameters()]
    for _ in range(3):
        loss = model(**inputs).last_hidden_state.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not all(torch.equal(p, q) for p, q in zip(model.adapter_modules("a")[0].parameters(), start, strict=True))
    model.eval()
    torch.manual_seed(0)
    model.set_active_adapters("a")  # re-lowering draws fresh modules under a forked RNG: the user's is untouched
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))
    alone = _out(model, inputs)
    model.save_adapter(tmp_path / "a", "a")
    other = fxadapt.AdaptedModel(*captured)
    other.load_adapter(tmp_path / "a", set_active=True)
    assert torch.equal(_out(other, inputs), alone)


def test_compositions_export_with_their_pinned_and_extra_inputs(model):
    model.add_adapter("a", "lora[r=4,alpha=8]")
    model.add_adapter("b", "lora[r=2,alpha=4]")
    _perturb(model.adapter_modules("a") + model.adapter_modules("b"))
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    inputs = _inputs(model, batch=3)
    program = model.export(merge_lora=False)
    with torch.no_grad():
        assert torch.equal(program.module()(**inputs)["last_hidden_state"], _out(model, inputs))
    with pytest.raises(UserError, match="batch_sizes: the sizes sum to 3 but the batch size is 2"):
        model(**_inputs(model, batch=2))
    model.set_active_adapters(MultiTask("a", "b"))
    tasks = torch.tensor([1, 0])
    with pytest.raises(UserError, match="MultiTask setup needs task_ids"):
        model(**_inputs(model))
    out = _out(model, {**_inputs(model), "task_ids": tasks})
    model.set_active_adapters("b")
    assert torch.equal(out[0], _out(model, _inputs(model))[0])  # row 0 went through b


# -- bad input -------------------------------------------------------------------------------------------------
def test_bad_setups_are_user_errors_naming_the_problem(model):
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "seq_bn")
    model.add_adapter("l", "lora[r=4]")
    model.add_adapter("p", "prefix_tuning")
    model.set_active_adapters("a")
    with pytest.raises(UserError, match=r"set_active_adapters.stack\[1\]: unknown adapter 'nope'"):
        model.set_active_adapters(Stack("a", "nope"))
    with pytest.raises(UserError, match=r"no AdapterFusion 'a,b' for this Fuse block; add it with "
                                        r"add_adapter_fusion\(Fuse\('a', 'b'\)\)"):
        model.set_active_adapters(Fuse("a", "b"))
    with pytest.raises(UserError, match=r"fuse\[0\]: cannot nest parallel inside fuse"):
        model.set_active_adapters(Fuse(Parallel("a", "b"), "a"))
    with pytest.raises(UserError, match="too deep"):
        model.set_active_adapters(Stack("a", Parallel("b", Average("a", "b"))))
    with pytest.raises(UserError, match="cannot hold adapter 'p'"):
        model.set_active_adapters(Average("a", "p"))
    with pytest.raises(UserError, match="a fuse block cannot hold adapter 'l'"):
        model.add_adapter_fusion(Fuse("a", "l"))
    model.add_adapter("d", "double_seq_bn")
    with pytest.raises(UserError, match="must all set mh_adapter alike"):
        model.add_adapter_fusion(Fuse("a", "d"))
    model.delete_adapter("d")
    with pytest.raises(UserError, match="need equal numbers of children"):
        model.set_active_adapters(Stack(Parallel("a", "b"), Parallel("a", "b", "a")))
    with pytest.raises(UserError, match="no Fuse block"):
        model.train_adapter_fusion(Stack("a", "b"))
    with pytest.raises(UserError, match="a child must be an adapter name or a block"):
        Stack("a", ["b"])
    model.merge_adapter("l")
    with pytest.raises(UserError, match="'l' is merged into the weights"):
        model.set_active_adapters(Average("l", "l"))
    assert model.active_adapters == ["a"] and list(model.adapters) == ["a", "b", "l", "p"]  # nothing changed
    model.reset_adapter()
    model.add_adapter_fusion(["a", "b"], config="static", set_active=True)
    assert model.active_adapters == Fuse("a", "b") and not hasattr(model.fusions.a_b.L0_residual_ffn, "value")
    with pytest.raises(UserError, match="already exists"):
        model.add_adapter_fusion("a,b")
    model.delete_adapter_fusion(Fuse("a", "b"))
    assert model.active_adapters is None and len(model.fusions) == 0
    model.add_adapter_fusion(Fuse("a", "b", name="f"), set_active=True)  # a named fusion, as in the reference
    assert model.active_adapters == Fuse("a", "b", name="f") and list(model.fusions) == ["f"]
    model.delete_adapter("b")  # its fusion goes with it, and the setup using them
    assert model.active_adapters is None and len(model.fusions) == 0
