"""ONNX model files as lora-export writes and reads them: loading, ``lora_export.*`` metadata, atomic saving with
external data above a threshold, sizes and weight counts.

Every model lora-export writes carries ``lora_export.*`` metadata_props (sorted, so that one checkpoint always
gives the same bytes) and no per-node debug information; above ``EXTERNAL_DATA_THRESHOLD`` bytes its weights go to
``<name>.data`` beside it, written and moved into place together with the model.

A model too big to serialize in memory (``too_big_for_memory``: above the threshold or protobuf's 2 GB) is
written with its weights to external data first (which frees them from the proto) and then checked as a file
(``check_model_file``: shape inference and the checker on the path).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..errors import ExportError, first_line
from ..files import StagedOutputs, check_input_file, staged_outputs
from ..layout import data_path_of

PROTOBUF_LIMIT = 2 * 1024**3  # protobuf's hard limit for one serialized message
#: Above this many bytes of weights a model goes the file way (external data, checks on the file, no onnxslim):
#: serialized whole in memory, a model costs several copies of its weights (measured: 105M parameters, 0.41 GB of
#: weights, 4.2 GB peak in memory; 405M, 1.6 GB: 17.8 GB in memory, 2.2 GB the file way).
EXTERNAL_DATA_THRESHOLD = 256 * 1024**2
#: The prefix of lora-export's keys in a model's metadata_props.
METADATA_PREFIX = "lora_export."
#: Inputs that carry quantization scales and zero points (and MatMulNBits' g_idx), not weights, by op type.
QUANTIZATION_INPUTS = {"DequantizeLinear": (1, 2), "MatMulInteger": (2, 3), "MatMulNBits": (2, 3, 4)}
#: Element types a weight is stored in: float, or int8 / uint8 quantized.
WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model's graph (not its external weights). Raises ExportError with one line: a missing path,
    a directory, FIFO, socket or device (``files.check_input_file``) or a file that is no ONNX model."""
    path = Path(path)
    check_input_file(path, what="ONNX model", error=ExportError)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX model: {first_line(err)}") from None
    if not model.graph.node or not model.graph.output:  # e.g. an empty file parses as an empty model
        raise ExportError(f"{path}: not an ONNX model (no graph)")
    return model


def check_suffix(path: Path, suffix: str) -> None:
    """Refuse (ExportError), before any work, an output path that does not end in ``suffix``."""
    if path.suffix != suffix:
        raise ExportError(f"{path}: the output must end in {suffix}")


def count_parameters_onnx(model: onnx.ModelProto) -> int:
    """Weights in the graph, whatever their precision: elements of the float and int8 / uint8 initializers, leaving
    out the exporter's one-element constants (scales, fill values) and the quantizers' scales and zero points; a
    ``MatMulNBits`` weight counts its K x N weights, not its packed bytes; the rank-0 LoRA defaults count zero. An
    int8, int4 or fp16 build counts as many as its fp32 source."""
    dynamic_scales = {node.output[1] for node in model.graph.node if node.op_type == "DynamicQuantizeLinear"}
    not_weights, packed = set(), {}
    for node in model.graph.node:
        not_weights.update(node.input[i] for i in QUANTIZATION_INPUTS.get(node.op_type, ()) if i < len(node.input))
        if node.op_type == "Mul" and dynamic_scales & set(node.input):  # a weight's scale times the activations'
            not_weights.update(node.input)
        if node.op_type == "MatMulNBits":
            attributes = {attribute.name: attribute.i for attribute in node.attribute}
            packed[node.input[1]] = attributes["K"] * attributes["N"]
    total = 0
    for init in model.graph.initializer:
        size = packed.get(init.name, int(np.prod(init.dims)))
        if init.name not in not_weights and init.data_type in WEIGHT_TYPES and size > 1:
            total += size
    return total


def attention_kernels(model: onnx.ModelProto) -> str:
    """How a graph computes attention, for its metadata: its fused ``Attention`` nodes, or 'decomposed'."""
    fused = sum(node.op_type == "Attention" for node in model.graph.node)
    return f"fused: {fused} Attention nodes (opset {opset_of(model)})" if fused else "decomposed"


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset a model imports."""
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with local file paths, FX node text).

    They make up most of a small model's bytes and would tie the output to the install location.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Replace metadata_props with ``lora_export.*`` entries (sorted, for byte-identical output)."""
    del model.metadata_props[:]
    for key in sorted(entries):
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, entries[key]


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ``lora_export.*`` metadata_props of a model, prefix removed."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def too_big_for_memory(model: onnx.ModelProto, external_data_threshold: int) -> bool:
    """``weights_too_big_for_memory`` of a proto's initializers, measured one at a time: ``ByteSize()`` of the
    whole model would serialize it, a second copy of the weights."""
    return weights_too_big_for_memory(sum(tensor.ByteSize() for tensor in model.graph.initializer),
                                      external_data_threshold)


def weights_too_big_for_memory(weight_bytes: int, external_data_threshold: int) -> bool:
    """Whether a model with ``weight_bytes`` of weights goes the file way: above the external-data threshold or
    protobuf's 2 GB, where it is never serialized whole in memory (no in-memory checker, shape inference,
    onnxslim or ORT session from bytes)."""
    return weight_bytes > min(external_data_threshold, PROTOBUF_LIMIT)


def size_text(size: int) -> str:
    """A byte count for a person: '2.15 GB', '0.5 MB' or '1000 bytes'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale / 10:
            return f"{size / scale:.3g} {unit}"
    return f"{size} byte{'s' if size != 1 else ''}"


def check_model_file(path: Path, name: Path) -> None:
    """Strict shape inference (written back into the file) and the full onnx.checker on the model FILE ``path``,
    its external data beside it: nothing serializes the model in memory. ``name`` names it in the one-line
    ExportError."""
    try:
        onnx.shape_inference.infer_shapes_path(str(path), check_type=True, strict_mode=True)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # onnx raises ValidationError, InferenceError, ...
        raise ExportError(f"{name}: fails onnx.checker or shape inference: {first_line(err)}") from None


def write_model_files(model: onnx.ModelProto, path: Path, stage: StagedOutputs, external_data_threshold: int,
                      *, on_file: bool = False) -> bool:
    """Save ``model`` into ``stage`` (moved to ``path`` with the stage); weights go to ``<name>.data`` beside it
    when the model exceeds the threshold, and a previous export's ``.data`` is removed otherwise.

    ``on_file`` (a model ``too_big_for_memory``): external data whatever the size (weights already there, as
    ``TracedGraph.save_with_weights`` leaves them in the stage, stay as they are), then the file checked
    (``check_model_file``). Returns whether external data was used.
    """
    external = on_file or model.ByteSize() > external_data_threshold
    data_path = data_path_of(path)
    if external:
        stage.path(data_path)
        onnx.save_model(model, stage.path(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
        if on_file:
            check_model_file(stage.path(path), path)
    else:
        onnx.save_model(model, stage.path(path))
        stage.remove(data_path)
    return external


def save_model(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> bool:
    """Save atomically (model and external data together, or neither); returns whether external data was used."""
    with staged_outputs() as stage:
        return write_model_files(model, path, stage, external_data_threshold)


def model_file_size(path: Path) -> int:
    """Bytes of a model file plus its external-data file ``<name>.data`` when there is one."""
    data = data_path_of(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
