"""Pass manager and the cleanup pass; metadata of inserted nodes. (insert_adapters' numeric tests are the
reference fixtures; merge_lora's are in test_merge_lora.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import fx

from fxadapt import meta
from fxadapt.capture import flatten_outputs
from fxadapt.passes.cleanup import eliminate_dead_code
from fxadapt.passes.manager import PassError, PassResult, run_passes
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec


@pytest.fixture(scope="module")
def seq_bn_result():
    return build("builtin:tiny-bert", parse_spec({"adapters": {"a": "seq_bn"}}))


def test_inserted_nodes_keep_metadata_and_say_where_they_came_from(seq_bn_result):
    inserted = [n for n in seq_bn_result.graph.graph.nodes if meta.ORIGIN in n.meta]
    assert inserted
    for node in inserted:
        origin = node.meta[meta.ORIGIN]
        assert origin["adapter"] == "a" and origin["method"] == "bottleneck" and origin["pass"] == "insert_adapters"
        assert node.meta.get("nn_module_stack"), node.name  # inherited from the anchor
    assert {n.meta[meta.ORIGIN]["layer"] for n in inserted} == {0, 1}


def test_cleanup_removes_only_dead_nodes():
    result = build("builtin:tiny-bert", parse_spec({"adapters": {"a": "seq_bn[original_ln_before=False]"}}))
    gm = result.graph
    inputs = result.captured.inputs(2, 5)
    with torch.no_grad():
        before = flatten_outputs(gm(**inputs))
    removed = eliminate_dead_code(gm)
    # with original_ln_before=False the model's own h + x and its LayerNorm feed nothing anymore
    assert removed.count >= 4
    with torch.no_grad():
        after = flatten_outputs(gm(**inputs))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert eliminate_dead_code(gm).count == 0  # negative: nothing left to remove


def test_manager_counts_and_names_the_failing_pass():
    gm = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).module()

    def noop(g: fx.GraphModule) -> PassResult:
        return PassResult(g, 0)

    def breaks(g: fx.GraphModule) -> PassResult:
        output = next(n for n in g.graph.nodes if n.op == "output")
        first = next(iter(g.graph.nodes))
        with g.graph.inserting_before(first):  # uses a value before it is defined
            g.graph.call_function(torch.ops.aten.neg.default, (output.args[0][0],))
        return PassResult(g, 1)

    _, counts = run_passes(gm, [("noop", noop)])
    assert counts == {"noop": 0}

    def check(g, name):
        raise AssertionError("numbers differ")

    with pytest.raises(PassError, match="pass 'noop'.*passes before it: none.*numbers differ"):
        run_passes(gm, [("noop", noop)], check=check)
    with pytest.raises(PassError, match="pass 'breaks'.*passes before it: noop"):
        run_passes(gm, [("noop", noop), ("breaks", breaks)])


def test_manager_keeps_a_check_error_class_and_says_which_pass_it_followed():
    gm = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).module()

    class Drift(PassError):
        pass

    def check(g, name):
        if name == "second":
            raise Drift("outputs moved by 0.5")

    def noop(g: fx.GraphModule) -> PassResult:
        return PassResult(g, 0)

    with pytest.raises(Drift, match="pass 'second' failed the check after it.*passes before it: first.*0.5"):
        run_passes(gm, [("first", noop), ("second", noop)], check=check)
    _, counts = run_passes(gm, [("first", noop)], check=check)  # negative: the check passes after 'first'
    assert counts == {"first": 0}
