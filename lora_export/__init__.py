"""lora-export: train LoRA attention language models and ship them to ONNX Runtime with proof of parity."""

from .attention import LoRASelfAttention
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .layers import (
    LoRAEmbedding,
    LoRALinear,
    count_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)
from .model import LoRATransformerLM, ModelConfig

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRASelfAttention",
    "LoRATransformerLM",
    "ModelConfig",
    "count_parameters",
    "load_checkpoint",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "save_checkpoint",
    "unmerge_lora",
]
