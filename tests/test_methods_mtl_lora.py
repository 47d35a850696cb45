"""MTL-LoRA (`mtl_lora`, adapters 1.3.0's MTLLoRAConfig). Its numbers against the reference are the fixtures
`bert__mtl_lora` (three tasks sharing A/B in a multi_task block) and `bert__mtl_lora_gating` (one adapter,
gated) in test_reference_parity.py. Here: config errors that name the field, the update's formula for
both task-specific matrix types ("linear" cannot be built in the reference), refused placements, and
merge_lora leaving MTL-LoRA unmerged with its reason."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fxadapt.capture import flatten_outputs
from fxadapt.errors import UserError
from fxadapt.methods.lora import mtl as mtl_lora
from fxadapt.methods.lora.mtl import MTLLoRA
from fxadapt.passes.merge_lora import merge_lora
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec


def _config(text: str):
    return parse_spec({"adapters": {"a": text}}).adapters["a"].config


@pytest.mark.parametrize("text, field, words", [
    ("mtl_lora[n_up_projection=0]", "$.adapters.a.n_up_projection", "at least one"),
    ("mtl_lora[n_up_projection=2.0]", "$.adapters.a.n_up_projection", "int"),
    ("mtl_lora[task_specific_matrix_type='diagonal']", "$.adapters.a.task_specific_matrix_type", "singular_values"),
    ("mtl_lora[weights_sharpness=0]", "$.adapters.a.weights_sharpness", "> 0"),
    ("mtl_lora[r=0]", "$.adapters.a.r", "positive"),
    ("mtl_lora[composition_mode='scale',r=1]", "$.adapters.a.composition_mode", "ia3"),
    ("mtl_lora[use_dora=True]", "$.adapters.a.use_dora", "DoRA"),
    ("mtl_lora[vera_d=0.1,vera_b=0.0]", "$.adapters.a.vera_d", "VeRA"),
    ("mtl_lora[colour=1]", "$.adapters.a", "'colour'"),
])
def test_config_errors_name_the_field(text, field, words):
    with pytest.raises(UserError) as info:
        _config(text)
    message = str(info.value)
    assert message.startswith(field) and words in message, message


def test_defaults_are_the_reference_config():
    config = _config("mtl_lora")
    assert (config.n_up_projection, config.task_specific_matrix_type, config.weights_sharpness) == (
        1, "singular_values", 0.05)
    assert (config.r, config.alpha, config.attn_matrices, config.variant) == (8, 8, ["q", "v"], "mtl_lora")
    assert config.to_dict()["architecture"] == "mtl_lora"


@pytest.mark.parametrize("matrix", ["singular_values", "linear"])
@pytest.mark.parametrize("shape", [(2, 5, 6), (10, 6)])  # 3-D, and GPT-2's flattened Conv1D input
def test_update_is_the_reference_formula(matrix, shape):
    """s · Σ_i c_i (x A^T M B_i^T), c = exp(w / τ) / Σ exp(w / τ); M = diag(λ) or the full [r, r] matrix."""
    config = _config(f"mtl_lora[r=3,alpha=6,n_up_projection=4,weights_sharpness=0.5,"
                     f"task_specific_matrix_type='{matrix}']")
    module = MTLLoRA(6, 7, config)
    torch.manual_seed(0)
    for p in module.parameters():
        p.data = torch.randn_like(p)
    assert module.lora_B.shape == (4, 7, 3)
    assert module.task_specific.values.shape == ((3,) if matrix == "singular_values" else (3, 3))
    x = torch.randn(shape, dtype=torch.float64)
    a, b, w = (t.double() for t in (module.lora_A, module.lora_B, module.weights))
    m = module.task_specific().double()
    c = torch.softmax(w / 0.5, 0)
    expected = 2.0 * sum(c[i] * (x @ a.T @ m @ b[i].T) for i in range(4))
    got = module.double().delta(x, x)
    assert got.shape == (*shape[:-1], 7)
    assert torch.allclose(got, expected, atol=1e-12)


def test_fused_qkv_is_refused():
    """GPT-2's c_attn (a fused q/k/v site, `chunks` set) cannot hold MTL-LoRA's [n, out, r] lora_B."""
    site = SimpleNamespace(module="h.0.attn.c_attn")
    with pytest.raises(UserError, match="fused q/k/v projection \\(h.0.attn.c_attn\\)"):
        mtl_lora.check_site(site, (True, False, True), "$.adapters.a")
    mtl_lora.check_site(site, (), "$.adapters.a")  # a separate projection is fine


@pytest.mark.slow
def test_merge_leaves_mtl_lora_unmerged_with_a_reason():
    result = build("builtin:tiny-bert", parse_spec({"adapters": {"a": "mtl_lora[n_up_projection=2]"}}))
    modules = [m for m in result.graph.modules() if isinstance(m, MTLLoRA)]
    torch.manual_seed(0)
    for module in modules:
        for p in module.parameters():
            p.data = torch.randn_like(p) * 0.2
    inputs = result.captured.inputs(2, 6)
    with torch.no_grad():
        before = flatten_outputs(result.graph(**inputs))
        assert merge_lora(result.graph).count == 0
        after = flatten_outputs(result.graph(**inputs))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    reasons = result.graph.meta["fxadapt"]["not_merged"]
    assert len(reasons) == len(modules) == 4 and all("MTL-LoRA" in r["reason"] for r in reasons)
