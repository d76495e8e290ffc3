"""lora-export: train LoRA attention language models and ship them to ONNX Runtime with proof of parity.

The names below load on first use (PEP 562), so the command-line entry points start without importing torch
until they are inside their interrupt handler.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "CheckpointError": "checkpoint",
    "LoRAEmbedding": "layers",
    "LoRALinear": "layers",
    "LoRASelfAttention": "attention",
    "LoRATransformerLM": "model",
    "ModelConfig": "model",
    "count_parameters": "layers",
    "load_checkpoint": "checkpoint",
    "lora_state_dict": "layers",
    "mark_only_lora_as_trainable": "layers",
    "merge_lora": "layers",
    "save_checkpoint": "checkpoint",
    "unmerge_lora": "layers",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'lora_export' has no attribute {name!r}")
