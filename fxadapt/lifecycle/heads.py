"""Prediction heads on top of the graph's outputs, and the loss a Hugging Face task head computes.

Flex classification head (the reference's `ClassificationHead` with its defaults, layers=2):

    logits = Linear_h->n( Dropout( tanh( Linear_h->h( Dropout( last_hidden_state[:, 0] ) ) ) ) )

parameters named `0..4` like the reference's nn.Sequential (`heads.<name>.1.weight`, `heads.<name>.4.weight`),
initialised like BERT's `_init_weights` (normal(0, initializer_range), zero bias). Loss: cross-entropy,
or MSE when num_labels == 1 (regression), as the reference head does.

A captured Hugging Face task model already returns its logits; with `labels` fxadapt computes the loss
that model's head would, using transformers' own loss functions (`transformers.loss.loss_utils`):
sequence classification (regression / single-label CE / multi-label BCE by `config.problem_type`),
token classification (CE), masked LM (CE, ignore -100) and causal LM (CE on shifted labels).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..methods.activation import make_activation


class ClassificationHead(nn.Sequential):
    """The reference's ClassificationHead (first-token pooling, `layers` blocks of dropout + linear)."""

    def __init__(self, hidden: int, num_labels: int, layers: int = 2, activation: str | None = "tanh",
                 dropout: float = 0.1, init_range: float = 0.02) -> None:
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise UserError(f"add_classification_head: num_labels must be a positive integer, got {num_labels!r}.")
        if not isinstance(layers, int) or layers < 1:
            raise UserError(f"add_classification_head: layers must be an integer >= 1, got {layers!r}.")
        modules: list[nn.Module] = []
        for index in range(layers):
            modules.append(nn.Dropout(dropout))
            if index < layers - 1:
                modules.append(nn.Linear(hidden, hidden))
                if activation:
                    modules.append(make_activation(activation, "add_classification_head.activation_function"))
            else:
                modules.append(nn.Linear(hidden, num_labels))
        super().__init__(*modules)
        self.config = {"head_type": "classification", "num_labels": num_labels, "layers": layers,
                       "activation_function": activation, "label2id": None, "use_pooler": False, "bias": True,
                       "dropout_prob": dropout}
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, init_range)
                    module.bias.zero_()

    def logits(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return self(last_hidden_state[:, 0])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config["num_labels"] == 1:
            return F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
        return F.cross_entropy(logits.view(-1, self.config["num_labels"]), labels.view(-1))


def loss_type_of(model: nn.Module | None, class_name: str) -> str | None:
    """The Hugging Face loss family of a task model (`ForSequenceClassification`, ...), or None for bare models."""
    loss_type = getattr(model, "loss_type", None) if model is not None else None
    if loss_type:
        return loss_type
    for suffix in ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForCausalLM",
                   "ForQuestionAnswering"):
        if class_name.endswith(suffix):
            return suffix
    return "ForCausalLM" if class_name.endswith("LMHeadModel") else None


def task_loss(loss_type: str | None, outputs: Any, labels: torch.Tensor, config: Any,
              num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
    """The loss the captured model's own head computes from its logits and `labels`."""
    # transformers internals (heavy), needed only when training computes the loss.
    from transformers.loss.loss_utils import (
        ForCausalLMLoss,
        ForMaskedLMLoss,
        ForSequenceClassificationLoss,
        ForTokenClassification,
    )

    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    if logits is None or loss_type is None:
        raise UserError("forward(labels=...): this model has no task head, so fxadapt cannot compute a loss; add "
                        "one with model.add_classification_head(name, num_labels), capture a task model such as "
                        "AutoModelForSequenceClassification, or compute the loss from the outputs yourself.")
    if loss_type == "ForSequenceClassification":
        return ForSequenceClassificationLoss(labels, logits, config)
    if loss_type == "ForTokenClassification":
        return ForTokenClassification(logits, labels, config)
    vocab = logits.shape[-1]
    if loss_type == "ForMaskedLM":
        return ForMaskedLMLoss(logits, labels, vocab, num_items_in_batch=num_items_in_batch)
    if loss_type == "ForCausalLM":
        return ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=num_items_in_batch)
    raise UserError(f"forward(labels=...): computing the {loss_type} loss is not supported by fxadapt; compute it "
                    "from the returned logits.")


class HeadsMixin:
    """Flex heads of AdaptedModel (fxadapt/model.py), which provides the attributes used here."""

    def add_classification_head(self, head_name: str, num_labels: int = 2, layers: int = 2,
                                activation_function: str | None = "tanh", overwrite_ok: bool = False,
                                dropout_prob: float | None = None, set_active: bool = True) -> None:
        """A flex classification head on the first token (lifecycle/heads.py); active unless set_active=False."""
        path = f"add_classification_head({head_name!r})"
        if "last_hidden_state" not in self.captured.output_names:
            raise UserError(f"{path}: the captured model has no last_hidden_state output (it returns "
                            f"{', '.join(self.captured.output_names)}); capture a bare encoder such as AutoModel.")
        if head_name in self.heads and not overwrite_ok:
            raise UserError(f"{path}: a head named {head_name!r} already exists; pass overwrite_ok=True.")
        if dropout_prob is None:
            dropout_prob = next((v for v in (getattr(self.config, "classifier_dropout", None),
                                             getattr(self.config, "hidden_dropout_prob", None)) if v is not None), 0.0)
        head = ClassificationHead(self._hidden, num_labels, layers, activation_function, dropout_prob,
                                  getattr(self.config, "initializer_range", 0.02))
        device = next(self.base.parameters()).device
        self.heads[head_name] = head.to(device).train(self.training)
        if set_active:
            self.active_head = head_name

    def delete_head(self, head_name: str) -> None:
        self.heads.pop(head_name)
        if self.active_head == head_name:
            self.active_head = None
