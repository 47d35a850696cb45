"""The spec contract: config strings, presets, AdapterHub config dicts, the shipped JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from fxadapt.errors import UserError
from fxadapt.methods.config_string import parse_config_string
from fxadapt.spec import SCHEMA_PATH, load_spec, parse_spec

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.json"))


def test_config_string_grammar():
    assert parse_config_string("lora[r=4,alpha=8]") == [("lora", {"r": 4, "alpha": 8})]
    assert parse_config_string("lora[attn_matrices=['q','k']]") == [("lora", {"attn_matrices": ["q", "k"]})]
    assert parse_config_string("prefix_tuning|par_bn") == [("prefix_tuning", {}), ("par_bn", {})]
    with pytest.raises(UserError, match="cannot read the options"):
        parse_config_string("lora[r=__import__('os')]")


def test_presets_follow_adapterhub_defaults():
    spec = parse_spec({"adapters": {"p": "pfeiffer", "h": "houlsby", "l": "lora"}, "active": "p"})
    seq, double, lora = (spec.adapters[n].config for n in "phl")
    assert (seq.reduction_factor, seq.non_linearity) == (16, "relu")
    assert (seq.original_ln_before, seq.mh_adapter) == (True, False)
    assert (double.non_linearity, double.original_ln_before, double.mh_adapter) == ("swish", False, True)
    assert (lora.r, lora.alpha, lora.attn_matrices, lora.scaling) == (8, 8, ["q", "v"], 1.0)


def test_adapterhub_config_dict_and_overrides():
    spec = parse_spec({"adapters": {
        "a": {"architecture": "lora", "r": 2, "alpha": 6},
        "b": {"config": "seq_bn[reduction_factor=4]", "non_linearity": "gelu"},
    }, "active": "a"})
    assert spec.adapters["a"].config.scaling == 3.0
    assert (spec.adapters["b"].config.reduction_factor, spec.adapters["b"].config.non_linearity) == (4, "gelu")


def test_load_resolves_relative_to_spec_file(tmp_path):
    fixtures = Path(__file__).parent / "fixtures" / "reference" / "cases" / "bert__seq_bn"
    (tmp_path / "spec.json").write_text(json.dumps({"adapters": {"a": {"load": str(fixtures / "adapter")}}}))
    spec = load_spec(tmp_path / "spec.json")
    assert spec.adapters["a"].load == (fixtures / "adapter").resolve()
    assert spec.adapters["a"].method.NAME == "bottleneck"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_schema(example):
    schema = json.loads(SCHEMA_PATH.read_text())
    data = json.loads(example.read_text())
    jsonschema.validate(data, schema)
    load_spec(example)


def test_schema_rejects_what_the_parser_rejects():
    schema = json.loads(SCHEMA_PATH.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"adapters": {}, "colour": 1}, schema)
    with pytest.raises(UserError):
        parse_spec({"adapters": {}})


FUSE_CASE = Path(__file__).parent / "fixtures" / "reference" / "cases" / "bert__fuse"


def _fuse_spec(fusion: dict, adapters: dict | None = None) -> dict:
    adapters = adapters or {"a": {"load": "adapter_a"}, "b": {"load": "adapter_b"}}
    return {"adapters": adapters, "active": {"fuse": ["a", "b"]}, "fusions": [fusion]}


@pytest.mark.parametrize("fusion", [{"load": "fusion_a_b"}, {"adapters": ["a", "b"], "load": "fusion_a_b"}])
def test_loaded_fusion_with_or_without_its_adapters(fusion):
    """The design's form {"adapters": [...], "load": DIR} and {"load": DIR} alone give the same fusion."""
    jsonschema.validate(_fuse_spec(fusion), json.loads(SCHEMA_PATH.read_text()))
    spec = parse_spec(_fuse_spec(fusion), FUSE_CASE)
    (parsed,) = spec.fusions
    assert parsed.name == "a,b" and parsed.adapters == ["a", "b"] and parsed.load == FUSE_CASE / "fusion_a_b"
    saved = json.loads((FUSE_CASE / "fusion_a_b" / "adapter_fusion_config.json").read_text())["config"]
    assert parsed.config == saved  # the checkpoint's config


@pytest.mark.parametrize(("adapters", "message"), [
    (["b", "a"], r"\$\.fusions\[0\]\.adapters: \['b', 'a'\] disagrees with the checkpoint .* fuses \['a', 'b'\].*"
                 r"another order"),
    (["a", "c"], r"\$\.fusions\[0\]\.adapters: \['a', 'c'\] disagrees with the checkpoint .* fuses \['a', 'b'\]"),
    (["a"], r"\$\.fusions\[0\]\.adapters: \['a'\] disagrees"),
    (["a", "z"], r"\$\.fusions\[0\]\.adapters: unknown adapter 'z'"),
    ("a,b", r"\$\.fusions\[0\]\.adapters: expected the list of fused adapter names"),
])
def test_loaded_fusion_adapters_must_match_the_checkpoint(adapters, message):
    defined = {"a": {"load": "adapter_a"}, "b": {"load": "adapter_b"}, "c": "seq_bn"}
    with pytest.raises(UserError, match=message):
        parse_spec(_fuse_spec({"adapters": adapters, "load": "fusion_a_b"}, defined), FUSE_CASE)


def test_loaded_fusion_over_adapters_the_spec_lacks_names_the_load():
    adapters = {"x": "seq_bn", "y": "seq_bn"}
    data = {"adapters": adapters, "active": "x", "fusions": [{"load": "fusion_a_b"}]}
    with pytest.raises(UserError, match=r"\$\.fusions\[0\]\.load: the checkpoint fuses 'a'"):
        parse_spec(data, FUSE_CASE)
    with pytest.raises(UserError, match=r"\$\.fusions\[0\]: a loaded fusion takes only \"load\" and \"adapters\""):
        parse_spec(_fuse_spec({"adapters": ["a", "b"], "load": "fusion_a_b", "config": "static"}), FUSE_CASE)
