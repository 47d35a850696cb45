"""The LoRA family beyond plain LoRA: (IA)^3, VeRA/DVoRA, DoRA, gated LoRA (numbers against `adapters` 1.3.0
are the reference fixtures in test_reference_parity.py). Here: presets, config errors that name the field,
placement, refusals, and merge_lora folding every mergeable member with the merged graph equal to the
unmerged one within 1e-5 (and refusing gated modules)."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import REFERENCE
from fxadapt import meta
from fxadapt.capture import flatten_outputs
from fxadapt.errors import UserError
from fxadapt.methods.lora import FamilyModule
from fxadapt.passes.merge_lora import merge_lora
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec


def _config(text: str):
    return parse_spec({"adapters": {"a": text}}).adapters["a"].config


@pytest.mark.parametrize("text, field, words", [
    ("lora[r=0]", "$.adapters.a.r", "positive"),
    ("vera[r=-2]", "$.adapters.a.r", "positive"),
    ("ia3[colour=1]", "$.adapters.a", "'colour'"),
    ("ia3[r=2]", "$.adapters.a.r", "r must be 1"),
    ("lora[composition_mode='scale']", "$.adapters.a.r", "r must be 1"),
    ("lora[composition_mode='mul']", "$.adapters.a.composition_mode", "\"scale\""),
    ("ia3[dropout=0.1]", "$.adapters.a.dropout", "dropout"),
    ("ia3[use_dora=True]", "$.adapters.a.use_dora", "add"),
    ("vera[vera_d=1]", "$.adapters.a.vera_d", "float"),
    ("lora[vera_d=0.1]", "$.adapters.a.vera_b", "both"),
    ("lora[use_gating=1]", "$.adapters.a.use_gating", "true or false"),
    ("dora[init_weights='xavier']", "$.adapters.a.init_weights", "expected one of"),
])
def test_config_errors_name_the_field(text, field, words):
    with pytest.raises(UserError) as info:
        _config(text)
    message = str(info.value)
    assert message.startswith(field) and words in message, message


def test_presets_are_the_reference_configs():
    ia3 = _config("ia3")
    assert (ia3.variant, ia3.r, ia3.alpha, ia3.attn_matrices, ia3.intermediate_lora) == ("ia3", 1, 1, ["k", "v"], True)
    assert (_config("vera").variant, _config("vera").vera_d, _config("vera").vera_b) == ("vera", 0.1, 0.0)
    assert _config("dora").variant == "dora" and _config("dvora").variant == "dvora"
    assert _config("lora[composition_mode='scale',r=1]").variant == "ia3"  # "scale" is (IA)^3 whatever the name


@pytest.mark.slow
def test_ia3_placement_follows_the_reference_code():
    """k, v and the FFN's first projection; in a gated FFN the reference's "intermediate" is down_proj."""
    bert = build("builtin:tiny-bert", parse_spec({"adapters": {"a": "ia3"}}))
    assert {p.role for p in bert.graph.meta["fxadapt"]["placements"]} == {"attn.k", "attn.v", "ffn.up"}
    llama = build("builtin:tiny-llama", parse_spec({"adapters": {"a": "ia3"}}))
    assert {p.role for p in llama.graph.meta["fxadapt"]["placements"]} == {"attn.k", "attn.v", "ffn.down"}
    assert all(p.method == "ia3" for p in llama.graph.meta["fxadapt"]["placements"])


@pytest.mark.parametrize("model, text, words", [
    ("builtin:tiny-bert", "vera[intermediate_lora=True]", "one shape"),  # 32->32 attention vs 32->64 FFN
    ("builtin:tiny-llama", "vera", "one shape"),  # GQA: v_proj is narrower than q_proj
    ("builtin:tiny-gpt2", "vera", "fused q/k/v"),
    ("builtin:tiny-gpt2", "dora", "fused q/k/v"),
])
@pytest.mark.slow
def test_refused_placements_say_why(model, text, words):
    with pytest.raises(UserError, match=words):
        build(model, parse_spec({"adapters": {"a": text}}))


def _perturbed(model: str, text: str):
    result = build(model, parse_spec({"adapters": {"a": text}}))
    torch.manual_seed(0)
    for module in result.graph.modules():
        if isinstance(module, FamilyModule) or type(module).__name__ == "VeraShared":
            for p in module.parameters(recurse=False):
                p.data = torch.randn_like(p) * 0.2
            if hasattr(module, "m"):  # a magnitude near ||W|| keeps DoRA's output in range
                module.m.weight.data = module.m.weight.data.abs() + 0.5
    for name, p in result.graph.named_parameters():  # freshly initialised biases are zero: folds must see them
        if name.endswith(".bias") and not name.startswith("fxadapt."):
            p.data = torch.randn_like(p) * 0.1
    return result


def _family_nodes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                  FamilyModule))


def _check_merge(result, expected: int):
    inputs = result.captured.inputs(3, 6)
    with torch.no_grad():
        before = flatten_outputs(result.graph(**inputs))
        assert merge_lora(result.graph).count == expected
        after = flatten_outputs(result.graph(**inputs))
    assert _family_nodes(result.graph) == 0
    merged = [n for n in result.graph.graph.nodes if meta.MERGED in n.meta]
    assert len(merged) >= expected
    assert max((a - b).abs().max().item() for a, b in zip(before, after, strict=True)) <= 1e-5


@pytest.mark.parametrize("model, text, expected", [
    ("builtin:tiny-bert", "ia3[alpha=2,output_lora=True]", 8),
    ("builtin:tiny-gpt2", "ia3[attn_matrices=['k']]", 4),  # fused q/k/v (factor 1 in q and v) and Conv1D c_fc
    ("builtin:tiny-bert", "vera[r=4,alpha=8,attn_matrices=['q','k','v']]", 6),
    ("builtin:tiny-bert", "lora[r=4,alpha=16,use_dora=True,intermediate_lora=True,output_lora=True]", 8),
    ("builtin:tiny-gpt2", "lora[use_dora=True,selfattn_lora=False,intermediate_lora=True,output_lora=True]", 4),
    ("builtin:tiny-bert-seqcls", "dvora[r=4,alpha=8]", 4),
    ("builtin:tiny-llama", "lora[r=4,alpha=8,use_dora=True,intermediate_lora=True]", 6),
])
@pytest.mark.slow
def test_merge_matches_unmerged(model, text, expected):
    _check_merge(_perturbed(model, text), expected)


@pytest.mark.parametrize("case, expected", [
    ("bert__peft_dora", 10),  # regex targets incl. the attention output and FFN dense layers, PEFT DoRA
    ("gpt2__peft_dora", 4),  # Conv1D (addmm) layout
    ("gpt2__peft_rslora", 4),  # biases overridden by the checkpoint (bias="lora_only")
    ("llama__peft_all_linear", 14),
])
@pytest.mark.slow
def test_merge_matches_unmerged_for_peft_checkpoints(case, expected):
    spec = parse_spec({"adapters": {"a": {"load": str(REFERENCE / "cases" / case / "adapter")}}})
    _check_merge(build(str(REFERENCE / "models" / case.split("__")[0]), spec), expected)


@pytest.mark.parametrize("text", ["lora[use_gating=True]", "ia3[use_gating=True]", "vera[use_gating=True]"])
def test_merge_refuses_gated_modules(text):
    result = _perturbed("builtin:tiny-bert", text)
    nodes = _family_nodes(result.graph)
    weights = {n: p.clone() for n, p in result.graph.named_parameters() if not n.startswith("fxadapt.")}
    assert merge_lora(result.graph).count == 0
    assert _family_nodes(result.graph) == nodes > 0
    assert all(torch.equal(p, weights[n]) for n, p in result.graph.named_parameters() if n in weights)
    reasons = result.graph.meta["fxadapt"]["not_merged"]
    assert len(reasons) == nodes and all("gated" in r["reason"] for r in reasons)


def test_gated_lora_on_conv1d_averages_over_the_sequence():
    """GPT-2's Conv1D runs on a flattened [B*S, in] input, but the reference's gate averages over S, so the
    gate is placed on the 3-D tensors around the addmm. In a causal model, changing the last token then
    changes the first position's output (through the gate) but never another sequence's."""
    result = _perturbed("builtin:tiny-gpt2", "lora[use_gating=True,intermediate_lora=True]")
    inputs = result.captured.inputs(2, 6)
    other = {k: v.clone() for k, v in inputs.items()}
    other["attention_mask"][:] = 1
    inputs["attention_mask"][:] = 1
    other["input_ids"][0, -1] = (other["input_ids"][0, -1] + 1) % 100
    with torch.no_grad():
        first = flatten_outputs(result.graph(**inputs))[0]
        second = flatten_outputs(result.graph(**other))[0]
    assert torch.allclose(first[1], second[1], atol=1e-6)
    assert not torch.allclose(first[0, 0], second[0, 0], atol=1e-6)


def test_vera_checkpoint_without_shared_matrices_is_refused(tmp_path):
    """adapters 1.3.0 drops VeRA's shared A/B when saving from a model without a head: say so, do not guess."""
    from fxadapt.checkpoints import adapterhub

    directory = tmp_path / "vera"
    shutil.copytree(REFERENCE / "cases" / "bert_seqcls__vera" / "adapter", directory)
    weights = adapterhub.read_weights(directory, "$")
    torch.save({k: v for k, v in weights.items() if "shared_parameters" not in k}, directory / "pytorch_adapter.bin")
    spec = parse_spec({"adapters": {"a": {"load": str(directory)}}})
    with pytest.raises(UserError, match="shared"):
        build(str(REFERENCE / "models" / "bert_seqcls"), spec)
