"""Structural forms the architecture sweep (scripts/reach.py) found, on tiny inline models (no export to
ONNX, so each test takes seconds):

- `matmul(x, W.T)` of a stored weight (Falcon's Linear) is captured as `linear(x, W)` — same numbers;
  a matmul of two activations, or of a 3-D weight, is left alone;
- a norm between a sub-layer's output and its residual add (Gemma 2/3's sandwich norms) still gives
  residual sites, and a mixture of experts without per-expert projections still gets its FFN residual;
  a sub-layer without a skip connection gets none;
- a dynamic dim that the model's code guards against its bound (GPT-Neo: `seq != max`) is narrowed;
  a model export cannot capture at all is one UserError.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from fxadapt.capture import capture, export_refining_dims
from fxadapt.errors import UserError
from fxadapt.graph_ops import LINEAR, is_call
from fxadapt.sites import find_sites

HIDDEN = 16


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape

        def heads(t):
            return t.view(b, s, 2, HIDDEN // 2).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(b, s, HIDDEN))


class _SandwichLayer(nn.Module):
    """Pre-norm, and a norm of each sub-layer's output before its residual add (Gemma 2/3)."""

    def __init__(self, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.attn, self.norm1, self.norm2 = _Attention(), nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.post_attn, self.post_ffn = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.up, self.down = nn.Linear(HIDDEN, 32), nn.Linear(32, HIDDEN)

    def forward(self, x):
        attn = self.post_attn(self.attn(self.norm1(x)))
        x = x + attn if self.skip else attn
        ffn = self.post_ffn(self.down(nn.functional.gelu(self.up(self.norm2(x)))))
        return x + ffn if self.skip else ffn


class _MoELayer(nn.Module):
    """Attention, then a mixture of experts stored as one batched weight (no nn.Linear per expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.norm1, self.norm2 = _Attention(), nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.router = nn.Linear(HIDDEN, 4)
        self.experts = nn.Parameter(torch.randn(4, HIDDEN, HIDDEN) * 0.1)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        weights = self.router(h).softmax(-1)  # [b, s, experts]
        per_expert = torch.einsum("bsh,ehk->bsek", h, self.experts)
        return x + (per_expert * weights.unsqueeze(-1)).sum(2)


class _Model(nn.Module):
    def __init__(self, layer: type, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([layer(**kwargs) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return (x,)


def _inputs():
    return {"x": torch.randn(2, 5, HIDDEN)}


def test_sandwich_norms_keep_residual_sites():
    sites = find_sites(capture(_Model(_SandwichLayer), _inputs()).module)
    for layer in range(2):
        for role in ("residual.attn", "residual.ffn"):
            site = sites.residual(role, layer)
            assert site is not None, (role, layer)
            assert is_call(site.hidden, {torch.ops.aten.layer_norm.default}), "h is the normed sub-layer output"
    assert {s.role for s in sites.linears} >= {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"}


def test_no_skip_connection_no_residual_site():
    sites = find_sites(capture(_Model(_SandwichLayer, skip=False), _inputs()).module)
    assert sites.residuals == []


def test_mixture_of_experts_gets_its_ffn_residual():
    sites = find_sites(capture(_Model(_MoELayer), _inputs()).module)
    assert [(s.role, s.layer) for s in sites.residuals] == [
        ("residual.attn", 0), ("residual.ffn", 0), ("residual.attn", 1), ("residual.ffn", 1)]
    assert not any(s.role.startswith("ffn.") for s in sites.linears), "the experts are no projections"


class _TransposedWeight(nn.Module):
    """Falcon's Linear: x @ W.T with W stored [out, in]; and two matmuls that are no projections."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN))
        self.batched = nn.Parameter(torch.randn(2, HIDDEN, HIDDEN))

    def forward(self, x):
        y = x @ self.weight.T
        scores = y @ x.transpose(1, 2)  # activations only
        return (scores @ y + (x.unsqueeze(1) @ self.batched.transpose(1, 2)).sum(1),)


def test_transposed_weight_matmul_is_captured_as_linear():
    model = _TransposedWeight()
    captured = capture(model, _inputs())
    linears = [n for n in captured.module.graph.nodes if is_call(n, LINEAR)]
    assert len(linears) == 1 and linears[0].args[1].target == "weight"
    other = {"x": torch.randn(3, 5, HIDDEN)}
    with torch.no_grad():
        torch.testing.assert_close(captured.module(**other)[0], model(**other)[0], atol=1e-5, rtol=1e-5)


class _GuardsItsBound(nn.Module):
    """Code that treats the longest sequence specially (GPT-Neo's local attention did)."""

    def forward(self, x):
        return (x * 2 if x.shape[1] != 64 else x,)


def test_a_guarded_bound_is_narrowed():
    shapes = {"x": {0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=64)}}
    _, used = export_refining_dims(_GuardsItsBound(), {"x": torch.randn(2, 5)}, shapes)
    assert used["x"][1].max == 63 and used["x"][0].max == 64


class _DataDependent(nn.Module):
    def forward(self, x):
        return (x * 2 if x.sum() > 0 else x,)


def test_an_uncapturable_model_is_one_user_error():
    shapes = {"x": {0: Dim("batch", min=1, max=64)}}
    with pytest.raises(UserError, match="torch.export could not capture _DataDependent"):
        export_refining_dims(_DataDependent(), {"x": torch.randn(2, 5)}, shapes)


class _InterleavedQKV(nn.Module):
    """GPT-NeoX's fused projection: viewed into heads first, then each head's [q k v] split apart."""

    def __init__(self, blocks: bool) -> None:
        super().__init__()
        self.blocks = blocks
        self.qkv, self.o = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        fused = self.qkv(x)
        if self.blocks:  # GPT-2: [q | k | v] blocks of the whole feature axis
            q, k, v = (t.view(b, s, 2, HIDDEN // 2).transpose(1, 2) for t in fused.split(HIDDEN, dim=-1))
        else:
            q, k, v = fused.view(b, s, 2, 3 * HIDDEN // 2).transpose(1, 2).chunk(3, dim=-1)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return (x + self.o(out.transpose(1, 2).reshape(b, s, HIDDEN)),)


@pytest.mark.parametrize("blocks", [True, False])
def test_fused_qkv_chunks_only_for_whole_feature_blocks(blocks):
    model = nn.Module()
    model.layers = nn.ModuleList([_InterleavedQKV(blocks)])
    model.forward = lambda x: model.layers[0](x)
    sites = find_sites(capture(model, _inputs()).module)
    (site,) = [s for s in sites.linears if s.module.endswith("qkv")]
    assert (site.role, site.fused) == (("attn.qkv", ("q", "k", "v")) if blocks else ("attn.q", ()))
