"""Training: pretraining and LoRA adaptation."""
