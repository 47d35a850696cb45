"""The bottleneck family beyond seq_bn/double_seq_bn: presets, config validation, PHM layers, shared-parameter
checkpoints and invertible adapters (LM-head reverse). Numeric parity with adapters 1.3.0 is in the reference
fixtures (tests/test_reference_parity.py: *__par_bn, *__compacter*, *__seq_bn_inv, *__adapterplus, ...)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import REFERENCE
from fxadapt import meta
from fxadapt.capture import flatten_outputs
from fxadapt.checkpoints import adapterhub
from fxadapt.errors import UserError
from fxadapt.methods.bottleneck import phm
from fxadapt.methods.bottleneck.invertible import GLOWCoupling, NICECoupling
from fxadapt.pipeline import build, compile_model
from fxadapt.spec import parse_spec

TINY_GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64)


def config_of(definition) -> object:
    return parse_spec({"adapters": {"a": definition}}).adapters["a"].config


def test_presets_follow_adapterhub_config_classes():
    par = config_of("par_bn")
    assert (par.is_parallel, par.reduction_factor, par.scaling, par.init_weights) == (True, 2, 4.0, "mam_adapter")
    assert (par.original_ln_before, par.original_ln_after, par.mh_adapter) == (False, True, False)
    assert config_of("scaled_par_bn").scaling == "learned" and config_of("scaled_parallel").is_parallel
    compacter, plusplus = config_of("compacter"), config_of("compacter++")
    assert (compacter.phm_layer, compacter.reduction_factor, compacter.non_linearity) == (True, 32, "gelu")
    assert (compacter.mh_adapter, plusplus.mh_adapter, plusplus.original_ln_before) == (True, False, True)
    inv, double_inv = config_of("pfeiffer+inv"), config_of("houlsby+inv")
    assert (inv.inv_adapter, inv.inv_adapter_reduction_factor, double_inv.non_linearity) == ("nice", 2, "swish")
    plus = config_of("adapterplus")
    assert (plus.scaling, plus.reduction_factor, plus.original_ln_after, plus.residual_before_ln) == (
        "channel", 96, False, False)
    assert (plus.stochastic_depth, plus.init_weights, plus.non_linearity) == (0.1, "houlsby", "gelu")


def test_legacy_invertible_adapter_key_maps_like_the_reference():
    config = config_of({"invertible_adapter": {"block_type": "glow", "reduction_factor": 4}, "reduction_factor": 8})
    assert (config.inv_adapter, config.inv_adapter_reduction_factor) == ("glow", 4)


@pytest.mark.parametrize("definition, field", [
    ({"config": "par_bn", "bogus": 1}, "bogus"),
    ("par_bn[scaling='vector']", ".scaling"),
    ("seq_bn[init_weights='xavier']", ".init_weights"),
    ("seq_bn[use_gating=1]", ".use_gating"),
    ("seq_bn[residual_before_ln='post_add',original_ln_before=False]", ".residual_before_ln"),
    ("seq_bn[cross_adapter=True]", ".cross_adapter"),
    ("seq_bn[stochastic_depth=1.5]", ".stochastic_depth"),
    ("compacter[phm_dim=0]", ".phm_dim"),
    ("compacter[phm_c_init='zeros']", ".phm_c_init"),
    ("compacter[hypercomplex_nonlinearity='tanh']", ".hypercomplex_nonlinearity"),
    ("compacter[shared_W_phm=True,reduction_factor={'default': 4}]", ".reduction_factor"),
    ("seq_bn[inv_adapter='real_nvp']", ".inv_adapter"),
    ("seq_bn[inv_adapter='nice']", ".inv_adapter_reduction_factor"),
    ({"invertible_adapter": {"type": "nice"}}, ".invertible_adapter"),
])
def test_invalid_configs_name_the_field(definition, field):
    with pytest.raises(UserError, match=f"\\$\\.adapters\\.a.*{field.replace('.', '[.]')}"):
        config_of(definition)


@pytest.mark.parametrize("definition, field", [
    ("par_bn[reduction_factor=64]", "reduction_factor"),  # hidden 32 // 64 = 0
    ("compacter", "phm_dim"),  # reduction_factor 32 -> bottleneck 1, not a multiple of 4
    ("compacter[reduction_factor=4,phm_dim=3]", "phm_dim"),  # 3 does not divide 32
])
def test_model_dependent_sizes_are_user_errors(definition, field):
    with pytest.raises(UserError, match=f"adapters\\.a\\.{field}"):
        build("builtin:tiny-bert", parse_spec({"adapters": {"a": definition}}))


def test_phm_layer_is_a_sum_of_kronecker_products():
    config = config_of("compacter[reduction_factor=4,shared_phm_rule=False,phm_rank=2]")
    layer = phm.PHMLayer(32, 8, "down", config)
    torch.nn.init.normal_(layer.b)
    x = torch.randn(2, 3, 32)
    weight = layer.W_left @ layer.W_right
    expected = x @ sum(torch.kron(layer.phm_rule[i], weight[i]) for i in range(4)) + layer.b
    torch.testing.assert_close(layer(x, {}), expected)


@pytest.mark.parametrize("block", [NICECoupling, GLOWCoupling])
def test_coupling_blocks_invert(block):
    torch.manual_seed(0)
    module = block(33, "relu", 2).eval()  # odd width: halves of 16 and 17
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 33)
    y = module(x)
    assert (y - x).abs().max() > 1e-2
    torch.testing.assert_close(module(y, rev=True), x, atol=1e-5, rtol=1e-5)


def test_every_inserted_node_says_where_it_came_from():
    result = build("builtin:tiny-bert", parse_spec({"adapters": {"a": "compacter++[reduction_factor=4]"}}))
    nodes = [n for n in result.graph.graph.nodes if meta.ORIGIN in n.meta]
    assert any(n.op == "get_attr" for n in nodes), "the shared phm_rule reaches the adapters through get_attr"
    assert all(n.meta[meta.ORIGIN]["adapter"] == "a" for n in nodes)
    roles = [p.role for p in result.graph.meta["fxadapt"]["placements"]]
    assert roles == ["residual.ffn", "residual.ffn", "shared"]


@pytest.mark.slow
def test_shared_parameters_save_and_load_under_reference_keys(tmp_path):
    spec = parse_spec({"adapters": {"a": "compacter[reduction_factor=4]"}})
    built = build("builtin:tiny-bert", spec)
    torch.manual_seed(1)
    for name, p in built.graph.named_parameters():
        if name.startswith("fxadapt."):
            p.data.normal_(0.0, 0.3)
    placements = built.graph.meta["fxadapt"]["placements"]
    config = spec.adapters["a"].config.to_dict()
    adapterhub.save(built.graph, placements, tmp_path / "ckpt", "a", config, {"hidden_size": 32})
    keys = set(adapterhub.read_weights(tmp_path / "ckpt", "$"))
    assert "shared_parameters.a.phm_rule" in keys
    assert "encoder.layer.0.attention.output.adapters.a.adapter_down.0.W_left" in keys
    loaded = build("builtin:tiny-bert", parse_spec({"adapters": {"a": {"load": str(tmp_path / "ckpt")}}}))
    inputs = built.captured.inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(flatten_outputs(loaded.graph(**inputs)), flatten_outputs(built.graph(**inputs)),
                                   rtol=0, atol=0)


def test_checkpoint_without_shared_rule_explains_the_reference_bug(tmp_path):
    # What adapters 1.3.0's save_adapter writes for a bare BertModel (the fixture generator added the tensor back).
    checkpoint = tmp_path / "adapter"
    shutil.copytree(REFERENCE / "cases" / "bert__compacter" / "adapter", checkpoint)
    weights = adapterhub.read_weights(checkpoint, "$")
    del weights["shared_parameters.a.phm_rule"]
    torch.save(weights, checkpoint / "pytorch_adapter.bin")
    with pytest.raises(UserError, match="shared_parameters.a.phm_rule.*does not save a Compacter's shared"):
        build(str(REFERENCE / "models" / "bert"), parse_spec({"adapters": {"a": {"load": str(checkpoint)}}}))


def _inv_calls(result) -> int:
    path = next(p.module_path for p in result.graph.meta["fxadapt"]["placements"] if p.role == "embeddings")
    return sum(1 for n in result.graph.graph.nodes if n.op == "call_module" and n.target == path)


def test_invertible_adapter_is_reversed_before_a_tied_lm_head():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()
    result = build(model, parse_spec({"adapters": {"a": {"config": "seq_bn_inv", "output_adapter": False}}}))
    placement = result.graph.meta["fxadapt"]["placements"][0]
    inv = result.graph.get_submodule(placement.module_path)
    for p in inv.parameters():
        torch.nn.init.normal_(p, std=0.3)
    assert _inv_calls(result) == 2
    # Eager: the forward block after the embeddings (dropout), its inverse on the LM head's input.
    model.transformer.drop.register_forward_hook(lambda module, args, out: inv(out))
    model.lm_head.register_forward_pre_hook(lambda module, args: (inv(args[0], rev=True),))
    inputs = result.captured.inputs(2, 6)
    with torch.no_grad():
        logits = flatten_outputs(result.graph(**inputs))[result.captured.output_names.index("logits")]
        torch.testing.assert_close(logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_untied_lm_head_is_found_by_its_vocabulary_projection():
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         tie_word_embeddings=False)
    result = build(LlamaForCausalLM(config).eval(), parse_spec({"adapters": {"a": "seq_bn_inv"}}))
    assert _inv_calls(result) == 2


def test_models_without_lm_head_get_the_forward_block_only():
    result = build("builtin:tiny-gpt2", parse_spec({"adapters": {"a": "seq_bn_inv"}}))
    assert _inv_calls(result) == 1


@pytest.mark.slow
def test_glow_and_lm_head_reverse_export(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()
    spec = parse_spec({"adapters": {"a": "double_seq_bn_inv[inv_adapter='glow',reduction_factor=4]"}})
    result = compile_model(model, spec, tmp_path / "out", ("onnx", "torchscript"), atol=1e-5)
    assert result.ok, [c for c in result.checks if not c.ok]
    assert {c.artifact for c in result.checks} >= {"onnx", "torchscript"}


def test_stochastic_depth_drops_whole_samples_in_training_only():
    from fxadapt.methods.bottleneck import Bottleneck

    module = Bottleneck(32, 4, config_of("adapterplus[reduction_factor=8,stochastic_depth=0.5]"))
    torch.nn.init.normal_(module.adapter_up.weight)
    x = torch.randn(64, 3, 32)
    with torch.no_grad():
        assert torch.equal(module.eval()(x, x), module(x, x))  # eval: deterministic, nothing dropped
        torch.manual_seed(0)
        dropped = (module.train()(x, x) == x).flatten(1).all(1)  # a dropped sample keeps only its residual
    assert 0 < int(dropped.sum()) < 64
