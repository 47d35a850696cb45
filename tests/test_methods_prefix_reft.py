"""Prefix tuning, prompt tuning and ReFT beyond the reference fixtures (whose numbers, ONNX and TorchScript
included, test_reference_parity.py checks): the eager-attention and no-mask paths against the same
reference numbers, sdpa(is_causal=True) against an explicit computation, LoReFT's orthogonal map
against torch's, placement that must not fire, and config/model errors that name the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from conftest import REFERENCE, load_case
from fxadapt import meta
from fxadapt.capture import flatten_outputs
from fxadapt.checkpoints import adapterhub
from fxadapt.errors import UserError
from fxadapt.graph_ops import ATTENTION, SOFTMAX, aten, is_call
from fxadapt.methods import reft
from fxadapt.methods.prefix_tuning import FlatPrefixTuning, PrefixGroup
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec

ATOL = 1e-5


def _load_spec(case: str) -> dict:
    return {"adapters": {"a": {"load": str(REFERENCE / "cases" / case / "adapter")}}, "active": "a"}


def _run(result, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return flatten_outputs(result.graph(**inputs))[0]


@pytest.mark.parametrize("case, model_class", [
    ("bert__prefix_tuning", transformers.BertModel),
    ("llama__prefix_tuning", transformers.LlamaModel),  # GQA: prefixes repeated per KV group before q·kᵀ
    ("bert__prompt_tuning", transformers.BertModel),
])
@pytest.mark.slow
def test_eager_attention_cores_match_the_reference(case, model_class):
    """softmax(q·kᵀ + mask)·v cores: keys are concatenated on kᵀ's last axis, the additive mask padded with 0."""
    info, io = load_case(case)
    model = model_class.from_pretrained(REFERENCE / "models" / info["arch"], attn_implementation="eager").eval()
    result = build(model, parse_spec(_load_spec(case)))
    nodes = list(result.graph.graph.nodes)
    assert not any(is_call(n, ATTENTION) for n in nodes) and any(is_call(n, SOFTMAX) for n in nodes)
    out = _run(result, {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]})
    expected = io["out.last_hidden_state"]
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= ATOL


@pytest.mark.parametrize("case", ["bert__noreft_suffix", "bert__loreft"])
def test_reft_without_attention_mask_uses_the_whole_row(case):
    """A graph captured without attention_mask intervenes on the first/last positions of the full row."""
    info, io = load_case(case)
    model = transformers.BertModel.from_pretrained(REFERENCE / "models" / info["arch"]).eval()
    ids = io["input_ids"][[0, 0]]  # row 0 has no padding, so the reference's positions are the row's ends
    result = build(model, parse_spec(_load_spec(case)), example_inputs={"input_ids": ids})
    assert (_run(result, {"input_ids": ids}) - io["out.last_hidden_state"][[0, 0]]).abs().max() <= ATOL


def test_reft_leaves_other_positions_untouched():
    """noreft at the last layer only, prefix 1 and suffix 3: every other position keeps the base output."""
    _, io = load_case("bert__noreft_suffix")
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    out = _run(build(str(REFERENCE / "models" / "bert"), parse_spec(_load_spec("bert__noreft_suffix"))), inputs)
    reference_base = io["out_base.last_hidden_state"]
    # row 0: 7 real tokens -> positions 0 and 4..6; row 1: 5 real tokens -> 0 and 2..4
    untouched = {0: [1, 2, 3], 1: [1, 5, 6]}
    for row, positions in untouched.items():
        assert (out[row, positions] - reference_base[row, positions]).abs().max() <= ATOL
    touched = {0: [0, 4, 5, 6], 1: [0, 2, 3, 4]}
    for row, positions in touched.items():
        assert (out[row, positions] - reference_base[row, positions]).abs().amax(-1).min() > 1e-3


class _CausalBlock(nn.Module):
    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        if prefix is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the intended semantics, written out: every query sees the prefix, then causal
            pk, pv = (p.unsqueeze(0).expand(x.shape[0], -1, -1, -1) for p in prefix)
            s = x.shape[1]
            mask = torch.cat([torch.ones(s, pk.shape[2], dtype=torch.bool), torch.ones(s, s).tril().bool()], 1)
            a = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(x.shape))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class _CausalModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_CausalBlock(), _CausalBlock()])

    def forward(self, x: torch.Tensor, prefixes=None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, None if prefixes is None else (prefixes[2 * i], prefixes[2 * i + 1]))
        return x


def test_causal_sdpa_without_mask_gets_an_explicit_mask():
    torch.manual_seed(0)
    model = _CausalModel().eval()
    x = torch.randn(2, 6, 16)
    result = build(model, parse_spec({"adapters": {"a": "prefix_tuning[prefix_length=3,bottleneck_size=8]"}}),
                   example_inputs={"x": x})
    cores = [n for n in result.graph.graph.nodes if is_call(n, ATTENTION)]
    assert all(n.kwargs.get("is_causal") is False and n.kwargs.get("attn_mask") is not None for n in cores)
    with torch.no_grad():
        prefixes = result.graph.get_submodule("fxadapt.a.prefix_self_prefix")()
        x2 = torch.randn(3, 6, 16)  # custom example inputs: only the batch is dynamic
        assert (result.graph(x=x2) - model(x2, prefixes)).abs().max() <= ATOL


@pytest.mark.parametrize("rank", [1, 3])
def test_loreft_orthogonal_map_equals_torch(rank):
    """HouseholderWeight (plain ops, exportable) == torch's orthogonal parametrization, incl. the int diagonal."""
    n = 8
    torch.manual_seed(rank)
    linear = nn.utils.parametrizations.orthogonal(nn.Linear(n, rank, bias=False))
    ours = reft.HouseholderWeight(rank, n)
    with torch.no_grad():
        original = torch.randn(rank, n) * 0.3
        diagonal = torch.tensor([-1.4, 1.0, 0.7][:rank])  # truncates to -1, 1, 0
        original[range(rank), range(rank)] = diagonal
        linear.parametrizations.weight.original.copy_(original)
        state = {"original": original, "0.base": linear.parametrizations.weight[0].base}
        ours.load_state_dict(state)
        expected = linear.weight
        assert torch.allclose(ours(), expected, atol=1e-6)
        if rank == 3:  # |d| < 1: torch's map zeroes that row, so LoReFT silently loses a dimension
            assert expected[2].abs().max() == 0 and ours()[2].abs().max() == 0
        assert torch.allclose(ours()[:2] @ ours()[:2].mT, torch.eye(min(rank, 2)), atol=1e-5)


def test_prefix_leave_out_inserts_nothing_in_left_out_layers():
    result = build(str(REFERENCE / "models" / "bert"), parse_spec(_load_spec("bert__prefix_tuning_leave_out")))
    cats = [n for n in result.graph.graph.nodes if is_call(n, {aten.cat.default}) and meta.origin_of(n)]
    assert cats and {meta.origin_of(n)["layer"] for n in cats} == {1}  # key and value of layer 1 only


def test_prefix_pool_takes_the_checkpoints_location_name():
    group = PrefixGroup("self_prefix", FlatPrefixTuning(1, 2, 8, 4, parse_spec(
        {"adapters": {"a": "prefix_tuning_flat[prefix_length=2]"}}).adapters["a"].config))
    group.match_checkpoint({"x.a.self.control_trans": None}, "x.a.")  # DistilBERT spells it `self`
    assert list(group.state_dict()) == ["self.control_trans"]
    group.match_checkpoint({"x.a.cross.control_trans": None}, "x.a.")  # not an alias of `self`: unchanged
    assert list(group.state_dict()) == ["self.control_trans"]


def test_saved_direft_config_loses_subtract_projection(tmp_path):
    """adapters 1.3.0 does not save DiReFT's subtract_projection=False; without it a checkpoint is NoReFT."""
    directory = tmp_path / "direft"
    shutil.copytree(REFERENCE / "cases" / "bert__direft" / "adapter", directory)
    assert parse_spec(_load_spec("bert__direft")).adapters["a"].config.subtract_projection is False  # patched
    data = json.loads((directory / adapterhub.CONFIG_FILE).read_text())
    del data["config"]["subtract_projection"]
    (directory / adapterhub.CONFIG_FILE).write_text(json.dumps(data))
    loaded = parse_spec({"adapters": {"a": {"load": str(directory)}}}).adapters["a"].config
    assert loaded.subtract_projection is True and parse_spec({"adapters": {"a": "direft"}}).adapters[
        "a"].config.subtract_projection is False


@pytest.mark.parametrize("text, field", [
    ("prefix_tuning[prefix_length=0]", "prefix_length"),
    ("prefix_tuning[bottleneck_size=1.5]", "bottleneck_size"),
    ("prefix_tuning[use_gating=1]", "use_gating"),
    ("prefix_tuning[non_linearity='wobble']", "non_linearity"),
    ("prefix_tuning[leave_out='0']", "leave_out"),
    ("prompt_tuning[prompt_length=0]", "prompt_length"),
    ("prompt_tuning[combine='suffix']", "combine"),
    ("prompt_tuning[prompt_init='from_string',prompt_init_text='great movie']", "prompt_init"),
    ("loreft[prefix_positions=0]", "prefix_positions"),
    ("loreft[layers='odd']", "layers"),
    ("loreft[r=0]", "r"),
    ("noreft[dtype='bfloat16']", "dtype"),
    ("direft[orthogonality=1]", "orthogonality"),
])
def test_config_errors_name_the_field(text, field):
    with pytest.raises(UserError, match=rf"\$\.adapters\.a\.{field}\b"):
        parse_spec({"adapters": {"a": text}})


@pytest.mark.parametrize("arch, text, words", [
    ("bert", "prompt_tuning[prompt_length=64]", r"\.prompt_length: 64 leaves no room"),
    ("llama", "prompt_tuning", "causal"),
    ("gpt2", "prompt_tuning", "causal"),
    ("bert", "loreft[layers=[0,5]]", r"\.layers: .*not \[5\]"),
    ("bert", "loreft[r=32]", r"\.r: an orthogonal projection"),
    ("bert", "prefix_tuning[leave_out=[0,1]]", "no attention core is left"),
])
@pytest.mark.slow
def test_model_errors_name_the_field(arch, text, words):
    with pytest.raises(UserError, match=words):
        build(str(REFERENCE / "models" / arch), parse_spec({"adapters": {"a": text}}))
