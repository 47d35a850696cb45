"""Site finding from graph structure: one table over tiny models of many families, plus negatives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxadapt.capture import capture
from fxadapt.errors import UserError
from fxadapt.pipeline import build
from fxadapt.sites import describe, find_sites
from fxadapt.spec import parse_spec

# model -> (attention projections per layer, ffn roles, norm placement, layers)
CASES = {
    "tiny-bert": ({"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.up", "ffn.down"}, "post", 2),
    "tiny-bert-seqcls": ({"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.up", "ffn.down"}, "post", 2),
    "tiny-distilbert": ({"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.up", "ffn.down"}, "post", 2),
    "tiny-deberta-v2": ({"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.up", "ffn.down"}, "post", 2),
    "tiny-gpt2": ({"attn.qkv", "attn.o"}, {"ffn.up", "ffn.down"}, "pre", 2),
    "tiny-llama": ({"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.up", "ffn.gate", "ffn.down"}, "pre", 2),
    "tiny-t5": ({"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.up", "ffn.down"}, "pre", 4),
    "tiny-bart": ({"attn.q", "attn.k", "attn.v", "attn.o"}, {"ffn.up", "ffn.down"}, "post", 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_sites_per_layer(name):
    attn, ffn, norm, layers = CASES[name]
    sites = find_sites(capture(f"builtin:{name}").module)
    assert sites.num_layers == layers
    for layer in range(layers):
        roles = {s.role for s in sites.linears if s.layer == layer}
        assert attn | ffn <= roles, (layer, roles)
        residuals = [s for s in sites.residuals if s.layer == layer and s.role in ("residual.attn", "residual.ffn")]
        assert len(residuals) == 2
        assert all((s.norm is not None) == (norm == "post") for s in residuals)
    assert sites.embeddings is not None
    assert "layer 0" in describe(sites)


def test_gpt2_fused_qkv_chunks():
    sites = find_sites(capture("builtin:tiny-gpt2").module)
    qkv = sites.linear("attn.qkv", 0)
    assert qkv.fused == ("q", "k", "v") and qkv.layout == "addmm" and qkv.out_features == 96


@pytest.mark.slow
def test_cross_attention_is_separate():
    sites = find_sites(capture("builtin:tiny-bart").module)
    decoder = [s for s in sites.linears if s.module.startswith("decoder.layers.0.encoder_attn")]
    assert {s.role for s in decoder} == {"xattn.q", "xattn.k", "xattn.v", "xattn.o"}


def test_classifier_head_is_not_an_ffn():
    """A pooler -> tanh -> classifier chain has no residual add: it must not become an FFN site."""
    sites = find_sites(capture("builtin:tiny-bert-seqcls").module)
    assert not any("classifier" in s.module or "pooler" in s.module for s in sites.linears)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_model_without_sites_is_a_user_error():
    model = _MLP().eval()
    spec = parse_spec({"adapters": {"a": "lora"}})
    with pytest.raises(UserError, match="no site for this lora adapter"):
        build(model, spec, example_inputs={"x": torch.randn(2, 8)})
