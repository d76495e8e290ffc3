"""Graph simplification with onnxslim, kept only when it provably changes nothing but the graph's size.

onnxsim is not used: it grows our graphs.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..errors import first_line
from ..model.transformer import ModelConfig
from ..tolerance import deviation
from .adapters import ADAPTER_IDS, lora_input_specs
from .ort_session import quiet_session


def probe_feeds(model: onnx.ModelProto, config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs (with a random rank-2 adapter in the adapter form; in the slots form two such slots, row i in
    slot i) used to compare two graphs."""
    rng = np.random.default_rng(seed)
    n = min(config.max_seq_len, config.local_attn_window_size + 5)
    feeds = {"input_ids": rng.integers(0, 256, (2, n), dtype=np.int64), "attention_mask": np.ones((2, n), np.int64)}
    for name, (_, dims) in lora_input_specs(model).items():
        shape = [2 if isinstance(d, str) else d for d in dims]
        feeds[name] = rng.normal(0, 0.05, shape).astype(np.float32)
    if ADAPTER_IDS in {value.name for value in model.graph.input}:
        feeds[ADAPTER_IDS] = np.arange(2, dtype=np.int64)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """logits from an in-memory model on ONNX Runtime CPU (a session opened from a temporary file: sessions open
    from paths). Only for models that fit in memory: ``export_onnx`` never simplifies a bigger one."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        onnx.save_model(model, path)
        session = quiet_session(path)
    return session.run(["logits"], feeds)[0]


def simplify(model: onnx.ModelProto, config: ModelConfig) -> tuple[onnx.ModelProto, bool, str]:
    """onnxslim, kept only if it shrinks the graph, keeps its interface (inputs, outputs, the LoRA inputs' rank-0
    defaults), passes the checker and matches the input model on ORT.

    Returns (model to ship, simplified?, a note saying what happened).
    """
    import onnxslim

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            simplified = onnxslim.slim(model)
        onnx.checker.check_model(simplified, full_check=True)
    except Exception as err:  # onnxslim raises many exception types
        return model, False, f"onnxslim failed, kept the exporter's graph: {first_line(err)[:120]}"
    before, after = len(model.graph.node), len(simplified.graph.node)
    if after >= before:
        return model, False, f"onnxslim did not shrink the graph ({before} -> {after} nodes), kept the exporter's"
    if graph_interface(simplified) != graph_interface(model):
        return model, False, "onnxslim changed the graph inputs, outputs or LoRA defaults, kept the exporter's graph"
    feeds = probe_feeds(model, config)
    expected, got = run_ort(model, feeds), run_ort(simplified, feeds)
    measured = deviation(got, expected, atol=1e-5, rtol=1e-4)
    if not measured.passed:
        return model, False, f"onnxslim changed outputs (max abs {measured.max_abs:.2e}), kept the exporter's graph"
    return simplified, True, "simplified with onnxslim"


def graph_interface(model: onnx.ModelProto) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """(input value infos, output value infos, {input with an initializer default: its dims}) of a graph."""
    inputs = {value.name for value in model.graph.input}
    defaults = {init.name: list(init.dims) for init in model.graph.initializer if init.name in inputs}
    return ([str(value.type) + value.name for value in model.graph.input],
            [str(value.type) + value.name for value in model.graph.output], defaults)
