"""Composition blocks: spec errors name the block, the rule and the JSON path; numbers are checked against
adapters 1.3.0 by the composition fixtures in tests/test_reference_parity.py (bert/llama x each block)."""

from __future__ import annotations

import pytest

from conftest import REFERENCE
from fxadapt.composition import pinned_dims
from fxadapt.errors import UserError
from fxadapt.spec import parse_spec

CASES = REFERENCE / "cases"


def _spec(active, adapters=None, fusions=None):
    data = {"adapters": adapters or {"a": "seq_bn", "b": "seq_bn", "l": "lora"}, "active": active}
    if fusions is not None:
        data["fusions"] = fusions
    return parse_spec(data)


def test_stack_is_parsed_and_flattened():
    spec = _spec({"stack": ["a", {"parallel": ["b", "l"]}]})
    assert spec.active == ["a", "b", "l"]
    assert spec.setup.kind == "stack"
    assert spec.to_json()["active"] == {"stack": ["a", {"parallel": ["b", "l"]}]}


@pytest.mark.parametrize("active, message", [
    ({"parallel": ["a", {"parallel": ["b", "l"]}]}, "cannot nest parallel inside parallel"),
    ({"stack": ["a", {"average": ["b", {"fuse": ["a", "b"]}]}]}, "too deep"),
    ({"split": ["a", "b"], "splits": [3]}, "$.active.splits"),
    ({"fuse": ["a", "b"]}, "has no fusion definition"),
    ({"split": ["a", "l"], "splits": [3, 4]}, "a split block cannot hold adapter 'l' (lora"),
    ({"stack": [{"parallel": ["a", "b"]}, {"parallel": ["a", "l", "b"]}]}, "need equal numbers of children"),
])
def test_bad_setups_name_the_block_and_rule(active, message):
    with pytest.raises(UserError) as info:
        _spec(active)
    assert message in str(info.value)
    assert "$.active" in str(info.value)


def test_rules_read_each_methods_blocks_and_refusal(monkeypatch):
    """compose/rules.py asks the adapter's method module (BLOCKS, composition_refusal), never its name."""
    from fxadapt.methods import lora

    monkeypatch.setattr(lora, "BLOCKS", ("average",))
    with pytest.raises(UserError, match=r"a stack block cannot hold adapter 'l' \(lora.*compose only in average"):
        _spec({"stack": ["a", "l"]})
    monkeypatch.setattr(lora, "BLOCKS", ("stack",))
    monkeypatch.setattr(lora, "composition_refusal", lambda config: f"r={config.r} is odd", raising=False)
    with pytest.raises(UserError, match=r"\$\.adapters\.l cannot be composed: r=8 is odd"):
        _spec({"stack": ["a", "l"]})
    monkeypatch.setattr(lora, "composition_refusal", lambda config: None)
    assert _spec({"stack": ["a", "l"]}).active == ["a", "l"]


def test_lora_family_variants_compose_and_methods_without_blocks_do_not():
    adapters = {"i": "ia3", "v": "vera[r=4]", "d": "dora", "g": "lora[use_gating=True]", "p": "prompt_tuning"}
    assert _spec({"stack": ["i", "v", "d", "g"]}, adapters).active == ["i", "v", "d", "g"]
    with pytest.raises(UserError, match="prompt_tuning adapters compose only in no block"):
        _spec({"stack": ["i", "p"]}, adapters)


def test_fusion_definitions():
    spec = _spec({"fuse": ["a", "b"]}, fusions=[{"adapters": ["a", "b"], "config": "static"}])
    assert spec.fusions[0].name == "a,b" and spec.fusions[0].config["value"] is False
    with pytest.raises(UserError, match=r"\$\.fusions\[0\]\.adapters: unknown adapter 'z'"):
        _spec({"fuse": ["a", "b"]}, fusions=[{"adapters": ["a", "z"]}])
    with pytest.raises(UserError, match=r"\$\.fusions\[0\]\.temperature"):
        _spec({"fuse": ["a", "b"]}, fusions=[{"adapters": ["a", "b"], "temperature": True}])
    loaded = parse_spec({"adapters": {"a": {"load": "adapter_a"}, "b": {"load": "adapter_b"}},
                         "active": {"fuse": ["a", "b"]}, "fusions": [{"load": "fusion_a_b"}]}, CASES / "bert__fuse")
    assert loaded.fusions[0].name == "a,b"


def test_pinned_dims():
    assert pinned_dims(_spec({"batch_split": ["a", "b"], "batch_sizes": [1, 2]}).setup) == {"batch": 3}
    assert pinned_dims(_spec({"split": ["a", "b"], "splits": 4}).setup) == {"seq": 8}
    assert pinned_dims(_spec({"stack": ["a", "b"]}).setup) == {}


@pytest.mark.slow
def test_split_must_cover_the_sequence(tmp_path):
    from fxadapt.pipeline import build

    spec = _spec({"split": ["a", "b"], "splits": [3, 3]})
    spec.setup.splits = [3, 3]
    import torch

    inputs = {"input_ids": torch.ones(2, 7, dtype=torch.long), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with pytest.raises(UserError, match=r"\$\.active\.splits: the splits sum to 6 but the sequence length is 7"):
        build(str(REFERENCE / "models" / "bert"), spec, example_inputs=inputs)


def test_batch_split_must_cover_the_batch():
    import torch

    from fxadapt.pipeline import build

    spec = _spec({"batch_split": ["a", "b"], "batch_sizes": [1, 1]})
    inputs = {"input_ids": torch.ones(3, 7, dtype=torch.long), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    with pytest.raises(UserError, match=r"\$\.active\.batch_sizes: the sizes sum to 2 but the batch size is 3"):
        build(str(REFERENCE / "models" / "bert"), spec, example_inputs=inputs)


def test_broken_fusion_checkpoints_are_user_errors(tmp_path):
    """A missing fusion directory, one without its config, or corrupt fusion weights: errors naming the path."""
    import shutil

    from fxadapt.compose.fusion_spec import read_weights

    def spec(fusion_dir):
        return parse_spec({"adapters": {"a": {"load": str(CASES / "bert__fuse" / "adapter_a")},
                                        "b": {"load": str(CASES / "bert__fuse" / "adapter_b")}},
                           "active": {"fuse": ["a", "b"]}, "fusions": [{"load": str(fusion_dir)}]})

    with pytest.raises(UserError, match=r"\$\.fusions\[0\]\.load: checkpoint directory .* does not exist"):
        spec(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no adapter_fusion_config.json; expected a directory written by "
                                        "save_adapter_fusion"):
        spec(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(CASES / "bert__fuse" / "fusion_a_b", broken)
    for weights in broken.glob("*fusion*.*"):
        if weights.suffix != ".json":
            weights.write_bytes(b"not a weight file")
    with pytest.raises(UserError, match="is corrupt or not a weight file"):
        read_weights(broken, "$.fusions[0].load")
