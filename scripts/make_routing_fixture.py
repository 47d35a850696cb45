"""Generate tests/fixtures/routing/: a tiny BERT (from a config, save_pretrained), three PEFT LoRA adapters of
different ranks and targets, and PEFT's own mixed-batch outputs (`model(**inputs, adapter_names=[...])`, one
adapter per row, "__base__" for none) at two sequence lengths. tests/test_route_rows.py checks that fxadapt's
routed multi_task compile (graph and ONNX) gives the same numbers with task_ids (-1 for "__base__").

Run in the reference venv (peft 0.21.2, transformers 4.57.6):
    /work/refvenv/bin/python scripts/make_routing_fixture.py [OUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "tests/fixtures/routing"
# Names avoid letters of PEFT's "lora_" prefix (it warns that loading may then reinitialise them).
ADAPTERS = {  # name -> LoraConfig fields: ranks, alphas and targets differ on purpose (zero-padding, absent sites)
    "x": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
    "y": {"r": 4, "lora_alpha": 4,
          "target_modules": r".*encoder\.layer\.\d+\.(attention\.self\.key|intermediate\.dense)"},
    "z": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value"], "lora_dropout": 0.1},
}
ROWS = ["x", "y", "z", "__base__", "y"]  # PEFT's adapter_names; fxadapt's task_ids: index in ADAPTERS, -1 for base
LENGTHS = (7, 11)  # one exported graph must give both


def main() -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    base = BertModel(config).eval()
    base.save_pretrained(OUT / "model")
    model = None
    for name, fields in ADAPTERS.items():
        lora = LoraConfig(init_lora_weights=False, **fields)  # False: B random too, so every adapter acts
        if model is None:
            model = get_peft_model(base, lora, adapter_name=name)
        else:
            model.add_adapter(name, lora)
    model.eval()
    for name in ADAPTERS:
        model.save_pretrained(OUT / "adapters", selected_adapters=[name])
    (OUT / "adapters" / "README.md").unlink(missing_ok=True)  # PEFT's model card: nothing a test reads
    tensors: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(1)
    for length in LENGTHS:
        ids = torch.randint(1, config.vocab_size, (len(ROWS), length), generator=gen)
        mask = torch.ones(len(ROWS), length, dtype=torch.long)
        mask[-1, length - 2:] = 0
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, adapter_names=ROWS)
        tensors.update({f"input_ids_{length}": ids, f"attention_mask_{length}": mask,
                        f"last_hidden_state_{length}": out.last_hidden_state.contiguous(),
                        f"pooler_output_{length}": out.pooler_output.contiguous()})
    names = list(ADAPTERS)
    tensors["task_ids"] = torch.tensor([names.index(r) if r in names else -1 for r in ROWS])
    save_file(tensors, str(OUT / "io.safetensors"))
    (OUT / "case.json").write_text(json.dumps({"adapters": names, "rows": ROWS, "lengths": list(LENGTHS)}, indent=1)
                                   + "\n")


if __name__ == "__main__":
    main()
