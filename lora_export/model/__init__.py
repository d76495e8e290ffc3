"""The model: LoRA layers, the attention, the transformer, checkpoints."""
