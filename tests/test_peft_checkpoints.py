"""PEFT LoRA checkpoints: detection through `{"load": DIR}`, PEFT's target matching rules, rank/alpha patterns,
rsLoRA, base-parameter overrides, and the errors for what does not fit. (Numbers against PEFT 0.21.2 are the
`*__peft_*` reference fixtures in test_reference_parity.py.)"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import REFERENCE, load_case
from fxadapt.capture import flatten_outputs
from fxadapt.errors import UserError
from fxadapt.methods.lora import peft as peft_lora
from fxadapt.methods.lora.peft import Config, is_target
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec

CASES = REFERENCE / "cases"


def _copy(case: str, tmp_path, **changes):
    """A copy of a fixture's PEFT directory with adapter_config.json fields changed."""
    directory = tmp_path / case
    shutil.copytree(CASES / case / "adapter", directory)
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return directory


def _build(arch: str, directory):
    return build(str(REFERENCE / "models" / arch), parse_spec({"adapters": {"a": {"load": str(directory)}}}))


def _config(**values) -> Config:
    return Config.from_dict({"peft_type": "LORA", **values}, "$")


def test_peft_directories_are_detected():
    adapter = parse_spec({"adapters": {"a": {"load": str(CASES / "bert__peft_lora" / "adapter")}}}).adapters["a"]
    assert adapter.method is peft_lora and adapter.config.target_modules == ["query", "value"]


@pytest.mark.parametrize("values, name, expected", [
    (dict(target_modules=r".*\.(query|value)"), "encoder.layer.0.attention.self.query", True),
    (dict(target_modules=r"query"), "encoder.layer.0.attention.self.query", False),  # a string must match fully
    (dict(target_modules=["query"]), "encoder.layer.0.attention.self.query", True),  # dotted suffix
    (dict(target_modules=["ery"]), "encoder.layer.0.attention.self.query", False),  # not a module boundary
    (dict(target_modules=["self.query"]), "encoder.layer.0.attention.self.query", True),
    (dict(target_modules=["query"], exclude_modules=["0.attention.self.query"]), "encoder.layer.0.attention.self.query",
     False),
    (dict(target_modules=["query"], exclude_modules=r".*layer\.0.*"), "encoder.layer.0.attention.self.query", False),
    (dict(target_modules=["query"], layers_to_transform=[1]), "encoder.layer.0.attention.self.query", False),
    (dict(target_modules=["query"], layers_to_transform=1), "encoder.layer.1.attention.self.query", True),
    # PEFT's default layer regex needs a component before the layer list: a bare Llama's "layers.0..." has none
    (dict(target_modules=["q_proj"], layers_to_transform=[0]), "layers.0.self_attn.q_proj", False),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"), "layers.0.self_attn.q_proj",
     True),
    # an exact name bypasses layers_to_transform, as in PEFT
    (dict(target_modules=["layers.0.self_attn.q_proj"], layers_to_transform=[1]), "layers.0.self_attn.q_proj", True),
    (dict(target_modules=["dense"], modules_to_save=["pooler"]), "pooler.dense", False),
])
def test_target_matching_follows_peft(values, name, expected):
    assert bool(is_target(_config(**values), name, heads=set())) is expected


def test_all_linear_leaves_the_output_head_out():
    heads = {"lm_head", "classifier"}
    assert is_target(_config(target_modules="all-linear"), "layers.0.mlp.up_proj", heads)
    assert not is_target(_config(target_modules="all-linear"), "lm_head", heads)
    # a classification head is left out only for task_type SEQ_CLS (PEFT's rule)
    assert is_target(_config(target_modules="all-linear"), "classifier", heads)
    assert not is_target(_config(target_modules="all-linear", task_type="SEQ_CLS"), "classifier", heads)


def test_rank_and_alpha_patterns_and_rslora():
    config = _config(target_modules=["key"], r=4, lora_alpha=8, rank_pattern={"intermediate.dense": 2},
                     alpha_pattern={r"layer\.1\..*key": 16}, use_rslora=True)
    assert config.rank_and_alpha("encoder.layer.0.intermediate.dense") == (2, 8)
    assert config.rank_and_alpha("encoder.layer.1.attention.self.key") == (4, 16)
    assert config.rank_and_alpha("encoder.layer.0.attention.self.key") == (4, 8)
    assert config.scaling(4, 16) == 16 / math.sqrt(4) and _config(target_modules=["k"]).scaling(4, 16) == 4


@pytest.mark.slow
def test_hand_written_all_linear_equals_the_saved_expansion(tmp_path):
    """PEFT saves "all-linear" expanded; written by hand, fxadapt expands it to the same layers and numbers."""
    info, io = load_case("bert_seqcls__peft_all_linear")
    directory = _copy("bert_seqcls__peft_all_linear", tmp_path, target_modules="all-linear")
    result = _build("bert_seqcls", directory)
    modules = {p.reference_module for p in result.graph.meta["fxadapt"]["placements"]}
    assert modules == set(json.loads((CASES / "bert_seqcls__peft_all_linear" / "adapter" /
                                      "adapter_config.json").read_text())["target_modules"])
    assert "classifier" not in modules and "bert.pooler.dense" in modules
    with torch.no_grad():
        out = flatten_outputs(result.graph(input_ids=io["input_ids"], attention_mask=io["attention_mask"]))
    assert (out[0] - io["out.logits"]).abs().max() <= 1e-5


def test_bias_and_modules_to_save_override_base_parameters():
    result = _build("bert", CASES / "bert__peft_all_linear" / "adapter")
    overridden = result.graph.meta["fxadapt"]["overridden"]
    assert "embeddings.LayerNorm.bias" in overridden and "encoder.layer.0.attention.self.query.bias" in overridden
    seqcls = _build("bert_seqcls", CASES / "bert_seqcls__peft_all_linear" / "adapter")
    assert {"classifier.weight", "classifier.bias"} <= set(seqcls.graph.meta["fxadapt"]["overridden"])


def test_target_modules_matching_nothing_is_an_error(tmp_path):
    directory = _copy("bert__peft_lora", tmp_path, target_modules=["q_proj", "v_proj"])
    with pytest.raises(UserError, match=r"\$\.adapters\.a: the PEFT target_modules .* match no linear layer"):
        _build("bert", directory)


@pytest.mark.parametrize("changes, words", [
    (dict(peft_type="IA3"), "load.peft_type"),
    (dict(use_qalora=True), "load.use_qalora"),
    (dict(layer_replication=[[0, 1]]), "load.layer_replication"),
    (dict(r=0), "load.r"),
    (dict(bias="some"), "load.bias"),
    (dict(target_modules=None), "load.target_modules"),
    (dict(target_modules="(unclosed"), "load.target_modules"),
    (dict(rank_pattern={"query": -1}), "load.rank_pattern.query"),
])
def test_config_errors_name_the_field(tmp_path, changes, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        parse_spec({"adapters": {"a": {"load": str(_copy("bert__peft_lora", tmp_path, **changes))}}})


def test_inactive_unknown_options_are_ignored(tmp_path):
    directory = _copy("bert__peft_lora", tmp_path, some_future_option=None, use_future_thing=False)
    assert parse_spec({"adapters": {"a": {"load": str(directory)}}}).adapters["a"].config.r == 4


@pytest.mark.slow
def test_checkpoint_tensors_must_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _copy("bert__peft_lora", tmp_path)
    weights = load_file(str(directory / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("query.lora_A.weight"))
    save_file({k: v for k, v in weights.items() if k != key}, str(directory / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="lacks"):
        _build("bert", directory)
    save_file({**weights, "base_model.model.encoder.layer.0.attention.self.key.lora_A.weight": weights[key].clone()},
              str(directory / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="no place"):
        _build("bert", directory)
    save_file({**weights, key: torch.zeros(3, 32)}, str(directory / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="shape"):
        _build("bert", directory)
