"""One Block type (fxadapt/composition.py): the spec's parsed setups and the Python API's Stack, Fuse, ... are
the same class, compare alike and flatten alike."""

from __future__ import annotations

import pytest

import fxadapt
from fxadapt.composition import Block, from_json, parse_composition
from fxadapt.errors import UserError

ADAPTERS = {"a", "b", "c"}


def test_a_parsed_setup_is_built_from_the_public_constructors():
    parsed = parse_composition({"stack": ["a", {"fuse": ["b", "c"], "name": "f"}]}, ADAPTERS)
    built = fxadapt.Stack("a", fxadapt.Fuse("b", "c", name="f"))
    assert parsed == built and type(parsed) is type(built) is fxadapt.Stack
    assert isinstance(parsed.children[1], fxadapt.Fuse) and isinstance(parsed, Block)
    assert fxadapt.AdapterCompositionBlock is Block
    assert parsed.path == "$.active" and parsed.children[1].path == "$.active.stack[1]"  # errors name JSON paths
    assert parsed != fxadapt.Stack("a", fxadapt.Fuse("b", "c"))  # the fusion's name is part of the setup


def test_flatten_is_ordered_and_equal_to_the_reference_set():
    names = fxadapt.Stack("c", fxadapt.Parallel("a", fxadapt.Stack("c", "b"))).flatten()
    assert list(names) == ["c", "a", "b"]  # first appearance: the compiler's adapter order
    assert names == {"a", "b", "c"}  # adapters 1.3.0's flatten() returns a set


def test_fuse_name_and_fusion_name():
    assert fxadapt.Fuse("a", "b").name == fxadapt.Fuse("a", "b").fusion_name == "a,b"
    assert fxadapt.Fuse("a", "b").to_json() == {"fuse": ["a", "b"]}  # a derived name is not written
    assert fxadapt.Fuse("a", "b", name="f").fusion_name == "f"
    assert fxadapt.Stack("a").name is None


@pytest.mark.parametrize("block", [
    fxadapt.Average("a", "b", weights=[1, 1], normalize_weights=False),
    fxadapt.Average("a", "b", weights=[1, 3]),
    fxadapt.Split("a", "b", splits=[2, 3]),
    fxadapt.BatchSplit("a", fxadapt.Stack("b", "c"), batch_sizes=2),
    fxadapt.MultiTask("a", "b"),
])
def test_json_round_trip_keeps_sizes_and_weights(block):
    assert from_json(block.to_json()) == block
    assert parse_composition({"stack": [block.to_json()]}, ADAPTERS).children[0] == block


def test_a_child_that_is_no_name_or_block_is_a_user_error():
    with pytest.raises(UserError, match=r"Stack\(\.\.\.\): a child must be an adapter name or a block"):
        fxadapt.Stack("a", 3)
