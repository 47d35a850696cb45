"""Exports that do not depend on how a transformers version registers ModelOutput in pytree.

transformers 4.57 registers ModelOutput without a keys function (`tree_flatten_with_path` fails on
it), 5.x with one. TorchScript's output naming reads mappings as plain dicts, and
`export/prepare.for_export` returns the graph's outputs as a plain dict of the same fields, so a `.pt2`
loads in a process that never defined (or imported) the output class. The output class here is
registered the 4.57 way.
"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

from fxadapt.capture import export_program, flatten_outputs
from fxadapt.export.prepare import for_export, plain_output_spec
from fxadapt.export.torchscript import export_torchscript


class KeylessOutput(OrderedDict):
    """A ModelOutput stand-in: a mapping registered in pytree without flatten_with_keys_fn."""


pytree.register_pytree_node(
    KeylessOutput,
    lambda out: (list(out.values()), list(out.keys())),
    lambda values, keys: KeylessOutput(zip(keys, values, strict=True)),
)


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        hidden = self.proj(x)
        return KeylessOutput(last_hidden_state=hidden, pooled=hidden.mean(1))


def _captured():
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 5, 8)}
    shapes = {"x": {0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=64)}}
    return export_program(TwoOutputs(), inputs, shapes).module(), inputs, shapes


def test_the_stand_in_has_no_keys_function_as_in_transformers_4_57():
    with pytest.raises(ValueError, match="flatten_with_keys_fn"):
        pytree.tree_flatten_with_path(KeylessOutput(a=torch.zeros(1)))


def test_torchscript_names_the_outputs_of_an_unprepared_keyless_program():
    gm, inputs, shapes = _captured()
    scripted = export_torchscript(export_program(gm, inputs, shapes), ["x"], ["pooled", "last_hidden_state"])
    other = torch.randn(3, 4, 8)
    pooled, hidden = scripted(other)
    assert torch.allclose(pooled, gm(x=other)["pooled"]) and torch.allclose(hidden, gm(x=other)["last_hidden_state"])


def test_prepared_outputs_are_a_plain_dict_in_the_same_order():
    gm, inputs, _ = _captured()
    prepared, count = for_export(gm)
    assert count == 0 and prepared is not gm, "only the output structure changed"
    out = prepared(**inputs)
    assert type(out) is dict and list(out) == ["last_hidden_state", "pooled"]
    for got, want in zip(flatten_outputs(out), flatten_outputs(gm(**inputs)), strict=True):
        assert torch.equal(got, want)
    assert isinstance(gm(**inputs), KeylessOutput), "the graph the user sees keeps its output class"


def test_plain_spec_keeps_tuples_and_leaf_order():
    spec = pytree.tree_structure(KeylessOutput(a=1, b=(2, KeylessOutput(c=3))))
    plain = plain_output_spec(spec)
    assert pytree.tree_unflatten([1, 2, 3], plain) == {"a": 1, "b": (2, {"c": 3})}


def test_torchscript_names_outputs_of_a_keyless_model_output(tmp_path):
    gm, inputs, shapes = _captured()
    ep = export_program(for_export(gm)[0], inputs, shapes)
    scripted = export_torchscript(ep, ["x"], ["pooled", "last_hidden_state"])
    other = torch.randn(3, 4, 8)
    pooled, hidden = scripted(other)
    expected = gm(x=other)
    assert torch.allclose(pooled, expected["pooled"]) and torch.allclose(hidden, expected["last_hidden_state"])


@pytest.mark.slow
def test_pt2_loads_in_a_process_without_the_output_class(tmp_path):
    gm, inputs, shapes = _captured()
    path = tmp_path / "model.pt2"
    torch.export.save(export_program(for_export(gm)[0], inputs, shapes), str(path))
    other = torch.randn(3, 4, 8)
    torch.save({"x": other, "want": gm(x=other)["pooled"]}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"out = torch.export.load({str(path)!r}).module()(x=io['x'])\n"
        "assert type(out) is dict, type(out)\n"
        "assert torch.allclose(out['pooled'], io['want'])\n"
        "assert 'transformers' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
