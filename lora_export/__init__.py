"""lora-export: train LoRA attention language models and ship them to ONNX Runtime with proof of parity.

Every public name of every stage is importable from here (``from lora_export import export_onnx, validate``);
the names load on first use (PEP 562), so the command-line entry points start without importing torch until
they are inside their interrupt handler.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "adapt": "train.stages",
    "check_adapter_file": "export.convert",
    "CheckpointError": "errors",
    "convert_fp16": "export.quantize",
    "convert_ort_format": "export.quantize",
    "count_parameters": "model.layers",
    "export_adapter": "export.convert",
    "export_decoder": "genai.decoder",
    "export_onnx": "export.convert",
    "export_pipeline": "pipeline",
    "Form": "layout",
    "from_peft": "export.peft",
    "BatchDecoder": "genai.batch",
    "generate_batch": "genai.batch",
    "generate_bytes": "genai.generate",
    "load_checkpoint": "model.checkpoint",
    "load_data": "corpus",
    "lora_state_dict": "model.layers",
    "LoRAEmbedding": "model.layers",
    "LoraExportError": "errors",
    "LoRALinear": "model.layers",
    "LoRASelfAttention": "model.attention",
    "LoRATransformerLM": "model.transformer",
    "mark_only_lora_as_trainable": "model.layers",
    "merge_lora": "model.layers",
    "ModelConfig": "model.transformer",
    "pack_adapters": "export.slots",
    "pretrain": "train.stages",
    "quantize_int4": "export.quantize",
    "quantize_int8": "export.quantize",
    "read_pack": "export.slots",
    "save_checkpoint": "model.checkpoint",
    "to_peft": "export.peft",
    "TrainSettings": "train.loop",
    "unmerge_lora": "model.layers",
    "validate": "parity.validate",
    "validate_and_report": "pipeline",
    "ValidationOptions": "pipeline",
    "write_reports": "report.render",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'lora_export' has no attribute {name!r}")
