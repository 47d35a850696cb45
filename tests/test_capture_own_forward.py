"""A model whose own forward fails on the example inputs is the model's problem, reported as one UserError that
says which model, where it failed and what to check (scripts/reach.py's nystromformer entry, docs/models.md);
a model that runs is captured from that same forward's outputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from fxadapt.capture import run_own_forward
from fxadapt.errors import UserError
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec


def _nystromformer() -> torch.nn.Module:
    # Its landmark pooling reshapes by the configured segment length: it runs at seq 8 without padding only.
    config = transformers.NystromformerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, vocab_size=128, max_position_embeddings=64,
                                              num_landmarks=4, segment_means_seq_len=8)
    torch.manual_seed(0)
    return transformers.NystromformerModel(config).eval()


def test_a_model_failing_on_its_own_is_a_user_error_naming_it():
    with pytest.raises(UserError) as info:
        build(_nystromformer(), parse_spec({"adapters": {"a": "seq_bn"}}))
    message = str(info.value)
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x's Nystromformer runs at this shape; torch.export then finds the sequence length fixed
        # by the config, which capture reports as a UserError naming the model and the dim.
        assert "could not capture NystromformerModel" in message and "(seq)" in message
        return
    for part in ("model 'NystromformerModel' fails in its own forward", "input_ids (2, 8)",
                 "modeling_nystromformer.py:", "check its config for a length it fixes"):
        assert part in message
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error stays attached


def test_a_model_that_runs_gives_its_outputs():
    class Doubling(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids * 2

    ids = torch.arange(6).view(2, 3)
    assert torch.equal(run_own_forward(Doubling(), {"input_ids": ids}, "Doubling"), ids * 2)
