"""The Python lifecycle (fxadapt.adapt / AdaptedModel): add/activate/delete, save -> load round trips,
reference checkpoints, average_adapter against the reference's formulas, merge -> reset, compile, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fxadapt
from conftest import REFERENCE, load_case
from fxadapt.checkpoints import adapterhub
from fxadapt.errors import UserError

BERT = REFERENCE / "models" / "bert"
LORA = "lora[r=4,alpha=8,intermediate_lora=True]"


def _inputs(model, batch=2, seq=6):
    return model.captured.inputs(batch, seq, seed=3)


def _perturb(model, name, seed=0):
    """Random adapter weights, so that no adapter equals the identity (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.adapter_modules(name):
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_inactive_adapters_leave_the_base_model_and_weights_survive_relowering(model):
    inputs = _inputs(model)
    base = _out(model, inputs)
    model.add_adapter("bn", "seq_bn")
    model.add_adapter("lo", LORA)
    assert torch.equal(_out(model, inputs), base)
    model.set_active_adapters("bn")
    with_bn = _out(model, inputs)
    assert (with_bn - base).abs().max() > 1e-4
    model.set_active_adapters("lo")
    model.set_active_adapters(["lo"])
    model.active_adapters = "bn"
    assert torch.equal(_out(model, inputs), with_bn)  # same module objects after three re-lowerings
    assert model.active_adapters == ["bn"]
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and any(n.startswith("fxadapt.lo.L0_") for n in names)
    model.delete_adapter("bn")
    assert model.active_adapters is None and torch.equal(_out(model, inputs), base)
    assert not any(n.startswith("fxadapt.bn.") for n, _ in model.named_parameters())


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", LORA])
def test_save_then_load_reproduces_outputs_exactly(model, captured, tmp_path, config):
    model.add_adapter("a", config, set_active=True)
    _perturb(model, "a")
    inputs = _inputs(model)
    expected = _out(model, inputs)
    layouts = model.save_adapter(tmp_path / "a", "a")
    assert layouts == (["adapterhub", "peft"] if config == LORA else ["adapterhub"])
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["name"] == "a" and saved["hidden_size"] == 32 and saved["model_type"] == "bert"

    other = fxadapt.AdaptedModel(*captured)
    assert other.load_adapter(tmp_path / "a", load_as="b", set_active=True) == "b"
    assert torch.equal(_out(other, inputs), expected)


def test_lora_is_also_saved_in_peft_layout(model, tmp_path):
    model.add_adapter("a", LORA, set_active=True)
    _perturb(model, "a")
    model.save_adapter(tmp_path / "a", "a")
    config = json.loads((tmp_path / "a" / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    weights = load_file(str(tmp_path / "a" / "peft" / "adapter_model.safetensors"))
    query = "base_model.model.encoder.layer.0.attention.self.query"
    assert torch.equal(weights[f"{query}.lora_A.weight"], model.fxadapt.a.L0_attn_q.lora_A)
    assert torch.equal(weights[f"{query}.lora_B.weight"], model.fxadapt.a.L0_attn_q.lora_B)
    assert len(weights) == 2 * 3 * 2  # A and B for q, v and the FFN's first projection, in 2 layers
    assert sorted(config["target_modules"])[0] == "encoder.layer.0.attention.self.query"
    pytest.importorskip("fxadapt.methods.lora.peft", reason="PEFT checkpoints are read by the peft_lora method")
    inputs = _inputs(model)
    expected = _out(model, inputs)
    assert model.load_adapter(tmp_path / "a" / "peft", load_as="p", set_active=True) == "p"
    assert (_out(model, inputs) - expected).abs().max() <= 1e-6


def test_reference_checkpoint_loads_with_reference_outputs(model):
    info, io = load_case("bert__lora_all")
    name = model.load_adapter(REFERENCE / "cases" / "bert__lora_all" / "adapter", set_active=True)
    assert name == info["adapter_name"]
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    assert (_out(model, inputs) - io["out.last_hidden_state"]).abs().max() <= 1e-5


def _reference_average(modules, weights, strategy, svd_rank=None):
    """adapters 1.3.0's LoRA.average_adapter, written out independently of fxadapt's implementation."""
    if strategy == "linear":
        return {k: sum(w * getattr(m, k) for m, w in zip(modules, weights, strict=True)) for k in ("lora_A", "lora_B")}
    if strategy == "lora_linear_only_negate_b":
        return {"lora_A": sum(abs(w) * m.lora_A for m, w in zip(modules, weights, strict=True)),
                "lora_B": sum(w * m.lora_B for m, w in zip(modules, weights, strict=True))}
    delta = sum(w * (m.lora_B @ m.lora_A) for m, w in zip(modules, weights, strict=True))
    u, s, v = torch.linalg.svd(delta)
    return {"lora_A": v[:svd_rank, :], "lora_B": u[:, :svd_rank] @ torch.diag(s[:svd_rank])}


@pytest.mark.parametrize("strategy", ["linear", "lora_linear_only_negate_b", "lora_delta_w_svd"])
def test_average_adapter_matches_the_reference_formulas(model, strategy):
    for seed, name in enumerate(("x", "y")):
        model.add_adapter(name, LORA)
        _perturb(model, name, seed)
    svd_rank = 3 if strategy == "lora_delta_w_svd" else None
    model.average_adapter("avg", ["x", "y"], weights=[2.0, -1.0], combine_strategy=strategy, svd_rank=svd_rank)
    assert model.adapters["avg"].config.r == (3 if svd_rank else 4)
    with torch.no_grad():
        for avg, x, y in zip(*(model.adapter_modules(n) for n in ("avg", "x", "y")), strict=True):
            expected = _reference_average([x, y], [2.0, -1.0], strategy, svd_rank)
            for key, value in expected.items():
                assert torch.allclose(getattr(avg, key), value, atol=1e-6), key
    model.set_active_adapters("avg")
    _out(model, _inputs(model))  # the averaged adapter runs


def test_merge_then_reset_restores_weights_bit_exactly(model):
    model.add_adapter("a", LORA, set_active=True)
    _perturb(model, "a")
    inputs = _inputs(model)
    unmerged = _out(model, inputs)
    key = "encoder.layer.0.attention.self.query.weight"
    original = model.graph_module.get_parameter(key)
    snapshot = original.detach().clone()
    model.merge_adapter("a")
    merged_weight = model.graph_module.get_parameter(key)
    assert not torch.equal(merged_weight, snapshot)
    assert not any(n.op == "call_module" and "fxadapt" in str(n.target) for n in model.graph_module.graph.nodes)
    assert (_out(model, inputs) - unmerged).abs().max() <= 1e-5
    model.reset_adapter()
    assert model.graph_module.get_parameter(key) is original and torch.equal(original, snapshot)
    assert torch.equal(_out(model, inputs), unmerged)


def test_summary_lists_adapters_heads_and_the_base(model):
    model.add_adapter("a", "seq_bn", set_active=True)
    model.add_classification_head("a", num_labels=3)
    rows = {row["name"]: row for row in model.adapter_summary(as_dict=True)}
    assert rows["a"]["#param"] == 2 * (32 * 2 + 2 + 2 * 32 + 32) and rows["a"]["active"]
    assert rows["head a"]["#param"] == 32 * 32 + 32 + 32 * 3 + 3
    assert rows["Full model"]["%param"] == 100.0
    assert "bottleneck" in model.adapter_summary()


@pytest.mark.slow
def test_compile_writes_the_cli_artifacts_with_the_head(model, tmp_path):
    model.add_adapter("a", LORA, set_active=True)
    _perturb(model, "a")
    model.add_classification_head("a", num_labels=3)
    model.train()  # compile exports the eval graph whatever the mode
    result = model.compile(tmp_path / "out", formats=("onnx",))
    assert result.ok and model.training
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["outputs"] == ["logits"] and report["artifacts"]["onnx"]["ok"]
    assert report["passes"]["merge_lora"] == 6
    program = model.export()
    inputs = _inputs(model, 3, 5)
    model.eval()
    with torch.no_grad():
        assert (program.module()(**inputs)["logits"] - model(**inputs).logits).abs().max() <= 1e-5


# -- bad input -------------------------------------------------------------------------------------------------
def test_unknown_adapters_are_user_errors(model):
    with pytest.raises(UserError, match="unknown adapter 'nope'"):
        model.set_active_adapters("nope")
    with pytest.raises(UserError, match="nothing to train"):
        model.train_adapter([])
    with pytest.raises(UserError, match="unknown adapter method"):
        model.add_adapter("a", "no_such_method")
    model.add_adapter("a", "seq_bn")
    with pytest.raises(UserError, match="already exists"):
        model.add_adapter("a", "seq_bn")
    with pytest.raises(UserError, match="LoRA-family"):
        model.merge_adapter("a")
    assert model._merged == []
    with pytest.raises(UserError, match="no Fuse block"):
        model.train_adapter_fusion("a")


def test_averaging_needs_equal_configs_and_a_known_strategy(model):
    model.add_adapter("x", LORA)
    model.add_adapter("y", "lora[r=2]")
    with pytest.raises(UserError, match="different configurations"):
        model.average_adapter("avg", ["x", "y"])
    with pytest.raises(UserError, match="unknown combine_strategy"):
        model.average_adapter("avg", ["x", "x"], combine_strategy="median")
    with pytest.raises(UserError, match="svd_rank"):
        model.average_adapter("avg", ["x", "x"], combine_strategy="lora_delta_w_svd")
    assert "avg" not in model.adapters


def test_loading_checkpoints_of_another_method_size_or_architecture_fails_clearly(model, tmp_path):
    model.add_adapter("a", LORA)
    model.save_adapter(tmp_path / "lora", "a")
    data = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    # Another method: a bottleneck config over LoRA weights.
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "adapter.safetensors").write_bytes((tmp_path / "lora" / "adapter.safetensors").read_bytes())
    (tmp_path / "method" / "adapter_config.json").write_text(json.dumps({**data, "config": {"architecture": None}}))
    with pytest.raises(UserError, match="lacks"):
        model.load_adapter(tmp_path / "method", load_as="m")
    # Another hidden size.
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**data, "hidden_size": 64}))
    with pytest.raises(UserError, match="hidden size 64"):
        model.load_adapter(tmp_path / "lora", load_as="b")
    # Another architecture: a GPT-2 adapter into BERT.
    with pytest.raises(UserError, match="lacks|no place"):
        model.load_adapter(REFERENCE / "cases" / "gpt2__lora_qv" / "adapter", load_as="c")
    assert list(model.adapters) == ["a"]  # failed loads leave nothing behind


def test_a_failed_save_leaves_the_previous_files_intact(model, tmp_path, monkeypatch):
    model.add_adapter("a", "seq_bn")
    target = tmp_path / "a"
    model.save_adapter(target, "a")
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    _perturb(model, "a")

    def broken(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapterhub, "save_file", broken)
    with pytest.raises(UserError, match="previous files are unchanged"):
        model.save_adapter(target, "a")
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directories left
