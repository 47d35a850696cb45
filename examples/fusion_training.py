"""AdapterFusion end to end in Python: two task adapters, a fusion over them, training, saving, export.

    python examples/fusion_training.py [OUT_DIR]

Runs on the built-in tiny BERT (no download) in well under a minute on a CPU. The toy tasks are made
up for the example and read the first token, where the classification head looks: task "a" asks whether
its id is below 54, task "b" whether it is even, and the fused task whether exactly one of the two holds
(it needs both adapters' features).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import fxadapt
from fxadapt import Fuse


def batches(steps: int, seed: int, target, size: int = 32):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(8, 100, (size, 12), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, target(ids).long()


def train(model: fxadapt.AdaptedModel, head: str, target, steps: int = 150, seed: int = 0) -> float:
    """AdamW steps on what is trainable now; returns the accuracy on 512 held-out sequences."""
    model.active_head = head
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for inputs, labels in batches(steps, seed, target):
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        inputs, labels = next(batches(1, seed + 100, target, size=512))
        return (model(**inputs).logits.argmax(-1) == labels).float().mean().item()


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = fxadapt.adapt("builtin:tiny-bert")
    has = {"a": lambda ids: ids[:, 0] < 54, "b": lambda ids: ids[:, 0] % 2 == 0}
    for task in ("a", "b"):
        model.add_adapter(task, "seq_bn[reduction_factor=2]")
        model.add_classification_head(task, num_labels=2)
        model.train_adapter(task)
        print(f"adapter {task}: accuracy {train(model, task, has[task]):.2f}")
        model.save_adapter(out / task, task)

    model.add_adapter_fusion(Fuse("a", "b"), config="dynamic")
    model.add_classification_head("both", num_labels=2)
    model.train_adapter_fusion(Fuse("a", "b"))  # only the fusion layers (and heads) train
    accuracy = train(model, "both", lambda ids: has["a"](ids) ^ has["b"](ids), seed=1)
    print(f"fusion a,b: accuracy {accuracy:.2f} (chance 0.50)")
    model.save_adapter_fusion(out / "fusion", "a,b")
    print(model.adapter_summary())

    result = model.compile(out / "onnx", formats=("onnx",))  # verified against the PyTorch graph
    print(f"exported {out / 'onnx' / 'model.onnx'}: all checks ok = {result.ok}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
