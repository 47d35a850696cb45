"""TorchScript export: tiny HF models exported with dynamic batch/seq dims must script, keep their
numbers on the example shape and on a different one, survive save/load, and fail loudly when they
cannot be converted."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import pytest
import torch
import transformers as tf
from torch import nn
from torch.export import Dim

from fxadapt.export.torchscript import export_torchscript

INPUTS = ["input_ids", "attention_mask"]
TOL = 1e-5


def _bert() -> nn.Module:
    return tf.BertModel(
        tf.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )


def _gpt2() -> nn.Module:
    return tf.GPT2Model(
        tf.GPT2Config(
            vocab_size=100,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        )
    )


def _llama() -> nn.Module:
    return tf.LlamaModel(
        tf.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            use_cache=False,
        )
    )


def _distilbert() -> nn.Module:
    return tf.DistilBertModel(
        tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "bert": (_bert, ["last_hidden_state", "pooler_output"]),
    "gpt2": (_gpt2, ["last_hidden_state"]),
    "llama": (_llama, ["last_hidden_state"]),
    "distilbert": (_distilbert, ["last_hidden_state"]),
}


def _inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq // 2 :] = 0  # padding in the second row
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=g), "attention_mask": mask}


def _export(model: nn.Module, max_seq: int = 64) -> torch.export.ExportedProgram:
    dims = {"input_ids": {0: Dim("batch", max=1024), 1: Dim("seq", max=max_seq)}}
    dims["attention_mask"] = dims["input_ids"]
    return torch.export.export(model, (), _inputs(2, 8), dynamic_shapes=dims, strict=False)


def _reference(ep: torch.export.ExportedProgram, kwargs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return torch.utils._pytree.tree_leaves(ep.module()(**kwargs))


def _max_err(sm: torch.jit.ScriptModule, ep: torch.export.ExportedProgram, batch: int, seq: int) -> float:
    kwargs = _inputs(batch, seq, seed=batch * 100 + seq)
    ref = _reference(ep, kwargs)
    with torch.no_grad():
        got = sm(*(kwargs[n] for n in INPUTS))
    assert isinstance(got, tuple) and len(got) == len(ref)
    for r, o in zip(ref, got, strict=True):
        assert r.shape == o.shape and r.dtype == o.dtype
    return max(float((r - o).abs().max()) for r, o in zip(ref, got, strict=True))


_EXPORTED: dict[str, torch.export.ExportedProgram] = {}


def _exported(name: str) -> torch.export.ExportedProgram:
    if name not in _EXPORTED:
        torch.manual_seed(0)
        _EXPORTED[name] = _export(MODELS[name][0]().eval())
    return _EXPORTED[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_exported_program_on_two_shapes(name: str) -> None:
    ep = _exported(name)
    sm = export_torchscript(ep, INPUTS, MODELS[name][1])
    assert isinstance(sm, torch.jit.ScriptModule)
    # The example shape, a different batch and sequence length, then the example shape again (the
    # profiling executor specialises after a few calls; results must not depend on call history).
    for batch, seq in [(2, 8), (3, 5), (2, 8), (1, 64)]:
        assert _max_err(sm, ep, batch, seq) < TOL, (name, batch, seq)


def test_save_load_round_trip(tmp_path) -> None:
    ep = _exported("bert")
    path = str(tmp_path / "bert.pt")
    sm = export_torchscript(ep, INPUTS, MODELS["bert"][1], path=path)
    assert os.path.isfile(path) and glob.glob(str(tmp_path / "*.tmp")) == []
    loaded = torch.jit.load(path)
    for batch, seq in [(2, 8), (3, 5)]:
        assert _max_err(loaded, ep, batch, seq) < TOL
    assert set(loaded.state_dict()) >= set(ep.state_dict)  # original dotted names survive
    torch.testing.assert_close(dict(loaded.state_dict()), dict(sm.state_dict()))


def test_failed_save_leaves_no_file(tmp_path, monkeypatch) -> None:
    def broken_save(module: torch.jit.ScriptModule, f: str) -> None:
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_torchscript(_exported("distilbert"), INPUTS, ["last_hidden_state"], path=str(tmp_path / "m.pt"))
    assert os.listdir(tmp_path) == []


def test_outputs_follow_output_names_by_key() -> None:
    ep = _exported("bert")
    sm = export_torchscript(ep, list(reversed(INPUTS)), ["pooler_output", "last_hidden_state"])
    kwargs = _inputs(3, 5)
    hidden, pooled = _reference(ep, kwargs)
    got_pooled, got_hidden = sm(kwargs["attention_mask"], kwargs["input_ids"])
    torch.testing.assert_close(got_pooled, pooled, atol=TOL, rtol=0)
    torch.testing.assert_close(got_hidden, hidden, atol=TOL, rtol=0)


class _LowRank(nn.Module):
    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, dim) * 0.1)
        self.B = nn.Parameter(torch.randn(dim, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.T @ self.B.T * 2.0


def test_inserted_call_module_survives_reexport() -> None:
    """Graph surgery as the pass pipeline does it: a call_module adapter spliced into the unlifted
    graph, re-exported (which inlines the submodule), then converted."""
    torch.manual_seed(0)
    base = _exported("distilbert")
    gm = base.module()
    gm.add_submodule("adapter", _LowRank(32, 4))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    hidden = out.args[0][0]
    with gm.graph.inserting_before(out):
        delta = gm.graph.call_module("adapter", (hidden,))
        summed = gm.graph.call_function(torch.ops.aten.add.Tensor, (hidden, delta))
    out.args = ((summed, *out.args[0][1:]),)
    gm.recompile()
    ep = _export(gm)
    assert not any(n.op == "call_module" for n in ep.graph.nodes)

    sm = export_torchscript(ep, INPUTS, ["last_hidden_state"])
    for batch, seq in [(2, 8), (3, 5)]:
        assert _max_err(sm, ep, batch, seq) < TOL
    kwargs = _inputs(3, 5)
    assert float((_reference(ep, kwargs)[0] - _reference(base, kwargs)[0]).abs().max()) > 1e-3  # adapter is live


class _ShapeMath(nn.Module):
    """Symbolic int arithmetic, a no_grad region (a higher-order op in the exported graph), a
    non-persistent buffer and a created tensor whose size is computed from input dims."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = x.shape[0], x.shape[1]
        with torch.no_grad():
            y = self.lin(x)
        flat = y.reshape(b * s, -1) * self.scale
        pos = torch.arange(s - 1, dtype=torch.float32) / torch.sym_float(s) ** 0.5
        return flat.sum(-1).reshape(b, s)[:, : s // 2 + 1] + pos.sum(), torch.full((torch.sym_max(b, 2), s), 3.0)


def test_shape_arithmetic_and_no_grad_region() -> None:
    m = _ShapeMath().eval()
    ep = torch.export.export(m, (torch.randn(2, 8, 6),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False)
    sm = export_torchscript(ep, ["x"], ["a", "b"])
    for shape in [(2, 8, 6), (3, 5, 6), (1, 3, 6)]:
        x = torch.randn(shape)
        for r, o in zip(ep.module()(x), sm(x), strict=True):
            torch.testing.assert_close(o, r, atol=TOL, rtol=0)


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))


def test_errors_name_the_problem() -> None:
    ep = torch.export.export(_Branchy(), (torch.randn(3),), strict=False)
    with pytest.raises(RuntimeError, match="node 'cond'.*higher-order op 'cond'"):
        export_torchscript(ep, ["x"], ["y"])

    # An op call TorchScript rejects (here: a graph edited to pass a string): the error names the node.
    ep = torch.export.export(nn.ReLU(), (torch.randn(3),), strict=False)
    relu = next(n for n in ep.graph.nodes if n.op == "call_function")
    relu.args = ("not a tensor",)
    with pytest.raises(RuntimeError, match="node 'relu' .*aten.relu"):
        export_torchscript(ep, ["input"], ["y"])

    ep = _exported("distilbert")
    with pytest.raises(RuntimeError, match="input_names .* do not match .*input_ids"):
        export_torchscript(ep, ["input_ids", "token_type_ids"], ["last_hidden_state"])
    with pytest.raises(RuntimeError, match="output_names"):
        export_torchscript(ep, INPUTS, ["last_hidden_state", "pooler_output"])
