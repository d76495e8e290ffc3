"""Shared fixtures: one tiny LoRA checkpoint and its two ONNX exports, built once per test session.

Exporting with the dynamo exporter takes seconds even for a tiny model, so every test file that needs
an exported model uses these instead of exporting its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from lora_export.export.convert import ExportResult, export_onnx
from lora_export.model.checkpoint import read_checkpoint, save_checkpoint
from lora_export.model.transformer import LoRATransformerLM, ModelConfig

# One intra-op thread per test process: the suite runs under pytest -n 2 on 2 cores, and tiny models are
# many times slower when two processes each spin up two threads.
torch.set_num_threads(1)

TINY_CONFIG = dict(
    dim=32, depth=1, heads=4, dim_head=8, n_local_attn_heads=2, local_attn_window_size=8, blindspot_size=4,
    max_seq_len=32, ff_mult=2, r=4, lora_alpha=8.0, lora_targets=["q", "k", "v", "o", "ff", "emb"],
)


def make_lora_model(seed: int = 0, **overrides: object) -> LoRATransformerLM:
    """A tiny random LoRA model whose lora_B are non-zero, so the adapter visibly changes outputs."""
    torch.manual_seed(seed)
    model = LoRATransformerLM(ModelConfig(**{**TINY_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:  # distinct values, so no exporter pass can deduplicate them
                param.add_(torch.randn_like(param) * 0.1)
    return model


def same_base_other_rank(checkpoint: Path, r: int, seed: int) -> LoRATransformerLM:
    """A model with the checkpoint's base weights and a different, random LoRA of rank r."""
    payload = read_checkpoint(checkpoint)
    torch.manual_seed(seed)
    model = LoRATransformerLM(ModelConfig.from_dict({**payload["config"], "r": r})).eval()
    model.load_state_dict(payload["base"], strict=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LoRA checkpoint (r = 4 on q, k, v, o, ff, emb)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, make_lora_model(), {"seed": 0, "stage": "test"})
    return path


@pytest.fixture(scope="session")
def merged_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """tiny.pt exported with --merge."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("merged") / "tiny.onnx", merge=True)


@pytest.fixture(scope="session")
def adapter_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """tiny.pt exported with the adapters as graph inputs, plus tiny.onnx_adapter."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("adapters") / "tiny.onnx", merge=False)


@pytest.fixture(scope="session")
def merged_copy(merged_export: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The merged export copied to a folder of its own, so outputs written beside it by default (int8 builds,
    parity reports) never touch the shared export."""
    path = tmp_path_factory.mktemp("merged_copy") / "tiny.onnx"
    shutil.copyfile(merged_export.model_path, path)
    return path


@pytest.fixture(scope="session")
def cuda_runs() -> bool:
    """Whether ONNX Runtime really runs on CUDA here, decided without lora_export's code (whose answer the tests
    check): a one-node model in a plain session asked for CUDA, and the providers that session really got."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # a CUDA build that fails outright instead of falling back
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"
