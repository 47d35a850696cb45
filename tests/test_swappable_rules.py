"""Swappable slots are decided by each method's SlotRule (`method.SLOT`, fxadapt/methods/slot_rule.py), not by
method names in the export code: refusals (a union by its members), sharing, widening and folded scaling."""

from __future__ import annotations

import numpy as np

from fxadapt.export import slots, swappable
from fxadapt.methods.slot_rule import DEFAULT, SlotRule, rule_of
from fxadapt.spec import parse_spec


def _spec(adapters: dict) -> dict:
    return parse_spec({"adapters": adapters, "active": next(iter(adapters))}).adapters


def test_refusal_and_sharing_come_from_the_method_rule():
    adapters = _spec({"gated_ia3": "ia3[use_gating=True]", "union": "lora|seq_bn", "prompt": "prompt_tuning",
                      "reft": "loreft", "ia3": "ia3"})
    assert "gated (IA)^3" in swappable.refusal(adapters["gated_ia3"])
    assert "prompt" in swappable.refusal(adapters["prompt"])
    assert swappable.refusal(adapters["union"]) is None and swappable.refusal(adapters["reft"]) is None
    assert rule_of(adapters["reft"].method) is DEFAULT  # no SLOT: a slot of its own
    assert [slots.shareable(adapters[n]) for n in ("ia3", "union", "reft")] == [True, False, False]
    union = _spec({"u": "unipelt"})["u"]  # refused through its prefix tuning member
    assert swappable.refusal(union).startswith("its prefix_tuning member:")


def test_a_method_rule_decides_the_slot_config_and_the_folded_scaling():
    adapters = _spec({"a": "lora[r=4,alpha=8]", "b": "lora[r=8,alpha=2]", "s": "seq_bn[reduction_factor=8,scaling=3.0]",
                      "t": "seq_bn"})
    lora = slots.slot_config([adapters["a"], adapters["b"]])
    assert (lora.r, lora.alpha) == (8, 8)
    bottleneck = slots.slot_config([adapters["s"], adapters["t"]])
    assert (bottleneck.reduction_factor, bottleneck.scaling) == (8, 1.0)  # the larger bottleneck (smaller factor)
    one = np.ones(2, np.float32)
    assert np.array_equal(slots.folded(adapters["a"].method, adapters["a"].config, "m", "lora_B", one), 2 * one)
    assert np.array_equal(slots.folded(adapters["a"].method, adapters["a"].config, "m", "lora_A", one), one)
    assert np.array_equal(slots.folded(adapters["s"].method, adapters["s"].config, "m", "adapter_up.bias", one),
                          3 * one)
    assert rule_of(adapters["s"].method).stacked and not rule_of(adapters["a"].method).stacked
    assert SlotRule().refusal(adapters["a"].config) is None and not SlotRule().shareable(adapters["a"].config)
