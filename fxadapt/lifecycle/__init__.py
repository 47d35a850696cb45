"""The adapter lifecycle behind `fxadapt.adapt` / `AdaptedModel` (fxadapt/model.py), one job per module:

    base_graph   capture the model once; fresh copies of the pristine graph that share its weights
    lowering     base copy -> find_sites -> insert_adapters (or lower_composition for a block setup) ->
                 persistent adapter and fusion modules swapped in
    modes        train/eval as a graph edit of the dropout flags (torch.export captures eval mode)
    heads        flex classification heads and the loss each Hugging Face head computes
    averaging    average_adapter: linear, lora_linear_only_negate_b, lora_delta_w_svd
    saving       save_adapter/load_adapter: AdapterHub layout (+ PEFT layout for LoRA), atomically
    fusion_io    add/delete/save/load_adapter_fusion, the fusion regularization loss
    peft_layout  PEFT's adapter_config.json / adapter_model.safetensors for LoRA adapters
    checkpointing  per-layer gradient checkpointing of the lowered graph
    summary      adapter_summary() table
"""
