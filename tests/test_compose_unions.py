"""Config unions (mam, unipelt, "a|b") and gated prefix tuning in composition blocks (issue #10).

A union joins the blocks all its members join (union.blocks_for; the reference composes each member in its own
layer, and a member's layer that cannot compose the block fails there); each member acts at its own sites under
the union's name. A gated prefix composes like a plain one, scaled per row by its own gate. Parity with
adapters 1.3.0: the *__stack_mam, *__parallel_mam, *__batch_split_unipelt, *__parallel_unipelt,
*__average_union, *__stack_prefix_gated, *__parallel_prefix_gated, bert__stack_unipelt and
llama__stack_unipelt_bn reference fixtures (scripts/fixtures/composition_unions.py)."""

from __future__ import annotations

import pytest
import torch

from fxadapt.capture import flatten_outputs
from fxadapt.errors import UserError
from fxadapt.methods import union
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec


def _build(adapters: dict, active):
    return build("builtin:tiny-bert", parse_spec({"adapters": adapters, "active": active,
                                                  "optimize": {"merge_lora": False}}))


def test_a_union_joins_only_the_blocks_all_its_members_join():
    spec = parse_spec({"adapters": {"m": "mam", "u": "lora|seq_bn", "p": "prefix_tuning[use_gating=True]"},
                       "active": "m"})
    assert union.blocks_for(spec.adapters["m"].config) == ("stack", "parallel", "batch_split")
    joined = union.blocks_for(spec.adapters["u"].config)  # LoRA has no split or fuse, seq_bn does
    assert {"stack", "parallel", "batch_split", "average"} <= set(joined) and not {"split", "fuse"} & set(joined)
    assert spec.adapters["p"].method.composition_refusal(spec.adapters["p"].config) is None


@pytest.mark.parametrize("adapters, active, message", [
    ({"m": "mam", "b": "seq_bn"}, {"average": ["m", "b"]},
     "average block cannot hold adapter 'm' (union, $.adapters.m); this config composes only in stack, parallel, "
     "batch_split"),
    ({"u": "lora|seq_bn", "v": "lora|seq_bn"}, {"split": ["u", "v"], "splits": [2, 3]},
     "split block cannot hold adapter 'u'"),
    ({"u": "lora|seq_bn", "b": "seq_bn"}, {"fuse": ["u", "b"]}, "fuse block cannot hold adapter 'u'"),
    ({"u": "lora[r=2,leave_out=[1]]|lora[r=4,leave_out=[1]]"}, {"stack": ["u"]},
     "union members 0 and 1 both act at the same linear site"),
    ({"u": "vera|compacter[reduction_factor=4]", "b": "seq_bn"}, {"stack": ["u", "b"]},
     "union members 0 and 1 both have shared tensors"),
])
def test_unions_where_the_reference_cannot_compose_them_are_user_errors(adapters, active, message):
    with pytest.raises(UserError) as info:
        _build(adapters, active)
    assert message in str(info.value)


def test_a_gated_prefix_in_a_one_adapter_stack_is_the_gated_prefix_alone():
    config = {"p": "prefix_tuning[prefix_length=3,bottleneck_size=8,use_gating=True,shared_gating=False]"}
    single, composed = _build(config, "p"), _build(config, {"stack": ["p"]})
    assert any(p.role == "attn.prefix_gate" for p in composed.graph.meta["fxadapt"]["placements"])
    generator = torch.Generator().manual_seed(0)
    modules = {(p.role, p.layer): single.graph.get_submodule(p.module_path)
               for p in single.graph.meta["fxadapt"]["placements"]}
    with torch.no_grad():
        for module in dict.fromkeys(modules.values()):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        for p in composed.graph.meta["fxadapt"]["placements"]:
            composed.graph.get_submodule(p.module_path).load_state_dict(modules[(p.role, p.layer)].state_dict())
        inputs = single.captured.inputs(2, 5)
        want = flatten_outputs(single.graph(**inputs))
        got = flatten_outputs(composed.graph(**inputs))
    # The gates are N(0, 1) draws, far from sigmoid(.) = 1: a composed site that dropped them would differ.
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
