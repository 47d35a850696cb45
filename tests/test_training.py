"""Training an AdaptedModel: train/eval mode as a graph edit (same dropout masks as the original model),
gradients reaching only trainable adapters, the task heads' losses, HF Trainer, bf16 autocast and
gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxadapt
from conftest import REFERENCE
from fxadapt import builtin
from fxadapt.lifecycle.base_graph import capture_base


@pytest.fixture(scope="module")
def seqcls():
    """(eager BertForSequenceClassification, its capture); the capture keeps the eager model for comparisons."""
    eager = builtin.build("builtin:tiny-bert-seqcls")
    return eager, capture_base(eager)


@pytest.fixture(scope="module")
def bare():
    return capture_base(str(REFERENCE / "models" / "bert"))


def _batch(model, batch=4, seq=7, seed=0):
    return model.captured.inputs(batch, seq, seed=seed)


def test_train_mode_draws_the_same_dropout_masks_as_the_original_model(seqcls):
    eager, captured = seqcls
    model = fxadapt.AdaptedModel(*captured)
    inputs = _batch(model)
    eager.train()
    model.train()
    torch.manual_seed(7)
    expected = eager(**inputs).logits
    torch.manual_seed(7)
    assert torch.equal(model(**inputs).logits, expected)  # hidden and attention-probability dropout
    eager.eval()
    model.eval()
    assert torch.equal(model(**inputs).logits, eager(**inputs).logits)
    assert not any(n.args[2] for n in model.graph_module.graph.nodes if "dropout" in str(n.target))


def test_task_head_loss_is_the_models_own(seqcls):
    eager, captured = seqcls
    model = fxadapt.AdaptedModel(*captured)
    inputs, labels = _batch(model), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        assert torch.allclose(model(**inputs, labels=labels).loss, eager(**inputs, labels=labels).loss, atol=1e-6)
    model.add_adapter("a", "lora[r=4,alpha=8]")
    model.train_adapter("a")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # As in the reference, the task head (outside the base model `bert.`) stays trainable.
    assert trainable[:2] == ["base.classifier.bias", "base.classifier.weight"]
    assert all(n.startswith("fxadapt.a.") for n in trainable[2:]) and len(trainable) == 2 + 8


def test_causal_lm_loss_is_the_models_own():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    eager = transformers.GPT2LMHeadModel(config).eval()
    model = fxadapt.adapt(eager)
    inputs = _batch(model, 2, 6)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        assert torch.allclose(model(**inputs, labels=labels).loss, eager(**inputs, labels=labels).loss, atol=1e-6)


def test_a_few_steps_change_only_the_trained_adapter(bare):
    model = fxadapt.AdaptedModel(*bare)
    model.add_adapter("a", "seq_bn")
    model.add_adapter("other", "lora[r=4]")
    model.train_adapter("a")
    assert model.training and model.active_adapters == ["a"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        # Not |h|^2: after the final LayerNorm its gradient nearly vanishes.
        loss = (model(**_batch(model, seed=step)).last_hidden_state - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("fxadapt.a.") for n in changed)
    assert len(changed) == 8  # down and up weight and bias, after the FFN of 2 layers


def test_hf_trainer_trains_adapter_and_flex_head(bare, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    model = fxadapt.AdaptedModel(*bare)
    model.add_adapter("task", "lora[r=4,alpha=8]")
    model.add_classification_head("task", num_labels=3)
    model.train_adapter("task")
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 100, (8,), generator=gen), "attention_mask": torch.ones(8, dtype=torch.long),
             "token_type_ids": torch.zeros(8, dtype=torch.long), "labels": i % 3} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, logging_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    changed = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
               if not torch.equal(p, before[n])}
    assert changed == {"fxadapt.task", "heads.task"}


def test_bf16_autocast_forward_and_backward(bare):
    model = fxadapt.AdaptedModel(*bare)
    model.add_adapter("a", "lora[r=4,alpha=8]")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_batch(model), labels=torch.tensor([0, 1, 1, 0]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for m in model.adapter_modules("a") for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.base.parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(bare):
    model = fxadapt.AdaptedModel(*bare)
    model.add_adapter("a", "seq_bn")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    inputs, labels = _batch(model), torch.tensor([0, 1, 1, 0])

    def run():
        torch.manual_seed(3)  # dropout is active: recomputation must replay the same masks
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return loss.detach(), grads

    plain_loss, plain = run()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert sum(type(m).__name__ == "Checkpointed" for m in model.graph_module.children()) == 2
    loss, grads = run()
    assert torch.equal(loss, plain_loss) and grads.keys() == plain.keys()
    assert all(torch.allclose(grads[n], plain[n], atol=1e-6) for n in grads)
    model.gradient_checkpointing_disable()
