"""Built-in tiny models, generated deterministically from configs (no network, no files).

`builtin:tiny-bert` is the default MODEL of the README's first command; the others serve the
reach table in the tests. Weights come from a fixed seed, so every machine builds the same model.
"""

from __future__ import annotations

import torch
import transformers

from .errors import UserError

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)

# name -> (config class name, model class name, config kwargs)
BUILTINS: dict[str, tuple[str, str, dict]] = {
    "tiny-bert": ("BertConfig", "BertModel", dict(_COMMON, max_position_embeddings=64)),
    "tiny-bert-seqcls": ("BertConfig", "BertForSequenceClassification",
                         dict(_COMMON, max_position_embeddings=64, num_labels=3)),
    "tiny-roberta": ("RobertaConfig", "RobertaModel", dict(_COMMON, max_position_embeddings=66)),
    "tiny-xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(_COMMON, max_position_embeddings=66)),
    "tiny-electra": ("ElectraConfig", "ElectraModel", dict(_COMMON, embedding_size=32, max_position_embeddings=64)),
    "tiny-deberta-v2": ("DebertaV2Config", "DebertaV2Model", dict(_COMMON, max_position_embeddings=64)),
    "tiny-distilbert": ("DistilBertConfig", "DistilBertModel",
                        dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100,
                             max_position_embeddings=64)),
    "tiny-gpt2": ("GPT2Config", "GPT2Model", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)),
    "tiny-llama": ("LlamaConfig", "LlamaModel",
                   dict(_COMMON, num_key_value_heads=2, max_position_embeddings=64)),
    "tiny-mistral": ("MistralConfig", "MistralModel",
                     dict(_COMMON, num_key_value_heads=2, max_position_embeddings=64)),
    "tiny-qwen2": ("Qwen2Config", "Qwen2Model", dict(_COMMON, num_key_value_heads=2, max_position_embeddings=64)),
    "tiny-bart": ("BartConfig", "BartModel",
                  dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                       max_position_embeddings=64)),
    "tiny-t5": ("T5Config", "T5Model",
                dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                     vocab_size=100, decoder_start_token_id=0)),
    "tiny-vit": ("ViTConfig", "ViTModel", dict(_COMMON, image_size=32, patch_size=8)),
}


def is_builtin(name: str) -> bool:
    return name.startswith("builtin:")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """Instantiate `builtin:NAME` with deterministic random weights, in eval mode."""
    key = name.removeprefix("builtin:")
    if key not in BUILTINS:
        raise UserError(f"unknown built-in model {name!r}; choose one of: "
                        + ", ".join("builtin:" + k for k in BUILTINS) + ".")
    config_cls, model_cls, kwargs = BUILTINS[key]
    config = getattr(transformers, config_cls)(**kwargs)
    config.architectures = [model_cls]
    config.use_cache = False
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()
