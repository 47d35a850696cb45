"""Train/eval mode as a graph edit: torch.export captures eval mode, fxadapt flips the flags itself.

An eval-mode capture keeps every dropout as `aten.dropout(x, p, train=False)`; Hugging Face attention
passes its probability dropout only in training (`dropout_p = 0.0 if not self.training else p_attn`),
so the capture holds `sdpa(q, k, v)` without `dropout_p`, or `dropout(softmax(...), 0.0, False)` on the
eager path. Switching to training mode is therefore

    dropout(x, p, False)             -> dropout(x, p, True)
    sdpa(q, k, v, ...)               -> sdpa(q, k, v, ..., dropout_p=p_attn)
    dropout(softmax(s), 0.0, False)  -> dropout(softmax(s), p_attn, True)

and eval mode restores the captured arguments (kept in node metadata). p_attn comes from the model
config (ATTENTION_DROPOUT_KEYS) unless `adapt(..., attention_dropout=p)` overrides it. Dropout inside
adapter modules follows the modules' own `.train()`, as in the reference. With the same RNG seed, the
train-mode graph draws the same dropout masks as the original model (tests/test_training.py).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..graph_ops import ATTENTION, PASS_THROUGH, SOFTMAX, aten, is_call

# Config fields holding the attention-probability dropout, in the order Hugging Face configs use them:
# BERT/RoBERTa/ELECTRA/DeBERTa/ViT, DistilBERT/Llama/Mistral/Qwen2/BART, GPT-2.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
# Node-metadata key holding the captured (eval-mode) dropout probability and flag of a node this module edits.
EVAL_ARGS = "fxadapt_eval_args"


def attention_dropout_of(config: Any) -> float:
    for key in ATTENTION_DROPOUT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _after_softmax(node: fx.Node) -> bool:
    """Whether a dropout reads attention probabilities (a softmax, through casts and views)."""
    source = node.args[0]
    while isinstance(source, fx.Node) and is_call(source, PASS_THROUGH - {aten.dropout.default}):
        source = source.args[0]
    return isinstance(source, fx.Node) and is_call(source, SOFTMAX)


def set_mode(gm: fx.GraphModule, training: bool, attention_dropout: float) -> int:
    """Edit every (sub)graph of `gm` for train or eval mode; returns the number of nodes edited."""
    edited = 0
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        changed = 0
        for node in module.graph.nodes:
            if is_call(node, {aten.dropout.default}):
                changed += _edit_dropout(node, training, attention_dropout)
            elif is_call(node, ATTENTION):
                changed += _edit_attention(node, training, attention_dropout)
        if changed:
            module.recompile()
        edited += changed
    return edited


def _replace(node: fx.Node, args: tuple, kwargs: dict) -> int:
    if node.args == args and node.kwargs == kwargs:
        return 0
    node.args, node.kwargs = args, kwargs
    return 1


def _edit_dropout(node: fx.Node, training: bool, attention_dropout: float) -> int:
    # Only scalars are remembered: node references in metadata would go stale when the graph is split.
    p_eval, train_eval = node.meta.setdefault(EVAL_ARGS, (node.args[1], node.args[2]))
    p = attention_dropout if training and p_eval == 0.0 and _after_softmax(node) else p_eval
    return _replace(node, (node.args[0], p, True if training else train_eval, *node.args[3:]), dict(node.kwargs))


def _edit_attention(node: fx.Node, training: bool, attention_dropout: float) -> int:
    # sdpa(query, key, value, attn_mask=None, dropout_p=0.0, ...): dropout_p is the 5th argument.
    positional = len(node.args) > 4
    (captured_p,) = node.meta.setdefault(EVAL_ARGS, (node.args[4] if positional else node.kwargs.get("dropout_p"),))
    p = attention_dropout if training and not captured_p and attention_dropout else captured_p
    if positional:
        return _replace(node, (*node.args[:4], p, *node.args[5:]), dict(node.kwargs))
    kwargs = {k: v for k, v in node.kwargs.items() if k != "dropout_p"}
    if p is not None:
        kwargs["dropout_p"] = p
    return _replace(node, node.args, kwargs)
