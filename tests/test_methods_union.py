"""Union configs: `a|b` strings, `mam`, AdapterHub union dicts; the reference's conflict rule.
(Numbers: the bert__mam and bert__union_lora_seq_bn reference fixtures.)"""

from __future__ import annotations

import pytest

from fxadapt.errors import UserError
from fxadapt.spec import parse_spec


def _members(text):
    config = parse_spec({"adapters": {"a": text}}).adapters["a"].config
    return [(module.NAME, member) for module, member in config.members]


def test_mam_is_prefix_tuning_800_plus_parallel_adapter():
    (first, prefix), (second, adapter) = _members("mam")
    assert (first, prefix.bottleneck_size) == ("prefix_tuning", 800)
    assert (second, adapter.is_parallel, adapter.scaling) == ("bottleneck", True, 4.0)


def test_unipelt_is_three_gated_members():
    members = _members("unipelt")
    assert [name for name, _ in members] == ["prefix_tuning", "bottleneck", "lora"]
    assert all(config.use_gating for _, config in members)
    assert (members[0][1].prefix_length, members[2][1].r, members[2][1].alpha) == (10, 8, 2)


def test_union_string_and_dict_agree():
    from_string = parse_spec({"adapters": {"a": "lora[r=4]|seq_bn"}}).adapters["a"].config.to_dict()
    from_dict = parse_spec({"adapters": {"a": from_string}}).adapters["a"].config.to_dict()
    assert from_string == from_dict and [c["architecture"] for c in from_dict["configs"]] == ["lora", "bottleneck"]


@pytest.mark.parametrize("text, message", [
    ("seq_bn|seq_bn", "cannot be combined"),
    ("lora|lora[r=2]", "cannot be combined"),
    ("mam[x=1]", "takes no options"),
    ("lora|nope", "unknown adapter method 'nope'"),
])
def test_bad_unions(text, message):
    with pytest.raises(UserError, match=message):
        parse_spec({"adapters": {"a": text}})


def test_bottleneck_members_at_different_places_combine():
    assert len(_members("seq_bn|double_seq_bn[output_adapter=False]")) == 2
