"""share_parameters / unshare_parameters (MTL-LoRA's tied A and B, as adapters 1.3.0): the reference's
multi-task fixture through the Python API, tied training, untying, and bad groups."""

from __future__ import annotations

import pytest
import torch

import fxadapt
from conftest import REFERENCE, load_case
from fxadapt import MultiTask
from fxadapt.errors import UserError

CASE = "bert__mtl_lora"


def _loaded(captured):
    info, io = load_case(CASE)
    model = fxadapt.AdaptedModel(*captured)
    for name, sub in info["adapters"].items():
        model.load_adapter(REFERENCE / "cases" / CASE / sub, load_as=name)
    return model, io


def _tied(model, names):
    """(all tasks hold the same lora_A/lora_B objects at every site, the task matrices are separate objects)"""
    per_task = [model.adapter_modules(n) for n in names]
    same = all(m.lora_A is per_task[0][i].lora_A and m.lora_B is per_task[0][i].lora_B
               for modules in per_task for i, m in enumerate(modules))
    own = all(m.weights is not per_task[0][i].weights for modules in per_task[1:] for i, m in enumerate(modules))
    return same, own


def test_shared_tasks_match_the_reference_and_train_tied(captured):
    """The fixture's tasks were tied with share_parameters in adapters 1.3.0; tied here, the multi_task output
    equals the reference's, one optimizer step keeps A/B identical across tasks, and each task's own
    matrices move separately."""
    model, io = _loaded(captured)
    model.share_parameters(MultiTask("a", "b", "c"))
    assert model.shared_parameters == {"a,b,c": ["a", "b", "c"]}
    assert _tied(model, "abc") == (True, True)
    model.set_active_adapters(MultiTask("a", "b", "c"))
    inputs = {k: io[k] for k in ("input_ids", "attention_mask", "task_ids")}
    with torch.no_grad():
        error = (model(**inputs).last_hidden_state - io["out.last_hidden_state"]).abs().max().item()
    assert error <= 1e-5, f"max abs error {error:.2e} against adapters 1.3.0"

    model.train_adapter(MultiTask("a", "b", "c"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_sites = len(model.adapter_modules("a"))
    assert len(trainable) == n_sites * (2 + 3 * 2)  # shared A, B once; per task: task matrix + weights
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    before = {n: [m.task_specific.values.detach().clone() for m in model.adapter_modules(n)] for n in "abc"}
    out = model(**inputs).last_hidden_state
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()  # not LN-invariant
    optimizer.step()
    assert _tied(model, "abc") == (True, True)
    moved = {n: any(not torch.equal(b, m.task_specific.values) for b, m in zip(before[n], model.adapter_modules(n),
                                                                              strict=True)) for n in "abc"}
    assert all(moved.values()), moved


def test_unshare_gives_each_task_its_own_copy(captured):
    model, _ = _loaded(captured)
    model.share_parameters(["a", "b"], reference_adapter_name="b")
    first_b = model.adapter_modules("b")[0].lora_A.detach().clone()
    assert torch.equal(model.adapter_modules("a")[0].lora_A, first_b)
    model.unshare_parameters("a,b")
    a, b = model.adapter_modules("a")[0], model.adapter_modules("b")[0]
    assert a.lora_A is not b.lora_A and torch.equal(a.lora_A, b.lora_A)
    assert model.shared_parameters == {}


def test_bad_groups_are_user_errors(captured):
    model, _ = _loaded(captured)
    model.add_adapter("plain", "lora")
    model.add_adapter("wide", "mtl_lora[r=8,n_up_projection=3,intermediate_lora=True]")
    with pytest.raises(UserError, match="'plain' is a lora adapter; only multi-task adapters"):
        model.share_parameters(["a", "plain"])
    with pytest.raises(UserError, match="need the same r and n_up_projection"):
        model.share_parameters(["a", "wide"])
    with pytest.raises(UserError, match="reference adapter 'z' is not one of"):
        model.share_parameters(["a", "b"], reference_adapter_name="z")
    with pytest.raises(UserError, match="unknown adapter 'nope'"):
        model.share_parameters(MultiTask("a", "nope"))
    with pytest.raises(UserError, match="no shared parameters named 'a,b'"):
        model.unshare_parameters(["a", "b"])
