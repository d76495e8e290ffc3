"""Edge builds of an exported model: int8 for CPU, fp16 for GPU, ORT format for reduced-operator builds.

Every build reads an fp32 export written by ``lora_export.export`` (either form) and writes beside it by default:

* ``quantize_int8``: ``model.int8.onnx``. ONNX Runtime's dynamic quantization (``quantize_dynamic``): int8 weights
  for every MatMul whose weight is a constant initializer (per output channel) and for the token-embedding Gather,
  activations quantized to uint8 at run time. In the adapters form the LoRA MatMuls take graph inputs, so only
  nodes reading a constant initializer are quantized (an initializer that is also a graph input is not constant):
  the base is int8, the adapters stay float32 inputs with their rank-0 defaults and still swap per run.
* ``convert_fp16``: ``model.fp16.onnx``. float16 weights and compute (ONNX Runtime's copy of the
  onnxconverter-common converter) with the graph boundary kept as it was: int64 ids and mask in, float32 logits
  out, float32 LoRA inputs and rank-0 defaults. It is meant for the CUDA provider.
* ``convert_ort_format``: ``model.ort`` and ``model.required_operators.config`` (the names ONNX Runtime's
  ``convert_onnx_models_to_ort`` gives them), made by that tool with its ``Fixed`` optimization style. The config
  lists the operators (``domain;opset;Op,Op``) to pass to ``build.sh --minimal_build --include_ops_by_config``.

The ONNX outputs carry ``lora_export.precision`` (``fp32`` / ``fp16`` / ``int8``; absent means fp32) next to the
source's other ``lora_export.*`` metadata; the ``.ort`` file keeps its source's metadata. Every write is atomic (a
temporary file or folder beside the output, then a rename): a failed build or write raises ``EdgeExportError`` with
one line and leaves no output behind; an unreadable model is ``load_onnx``'s ExportError, an output that cannot be
written ``check_outputs``' OutputError, both raised before any work.

``parity.precisions`` measures what each build costs against the PyTorch fp32 checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model

from ..errors import EdgeExportError, first_line
from ..files import check_outputs, staged_outputs
from ..layout import model_files, ort_format_outputs, precision_output_path
from .adapters import lora_input_specs
from .onnx_files import EXTERNAL_DATA_THRESHOLD, check_suffix, load_onnx, read_metadata, save_model, set_metadata

PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: int4 blocks: 32 weights share a scale and a zero point (onnxruntime-genai's model builder's default block size).
INT4_BLOCK_SIZE = 32
#: MatMulNBits ``accuracy_level`` 4: activations quantized to int8 for the int4 x int8 CPU kernels.
INT4_ACCURACY_LEVEL = 4
#: Operators whose constant weights dynamic quantization turns into int8. ORT's dynamic (IntegerOps) mode has no
#: Gemm; the exporter writes Linear as MatMul + Add, so there is none to quantize.
QUANTIZED_OP_TYPES = ("MatMul", "Gather")
#: ONNX Runtime's default logger severity (warning), restored after a conversion silenced it.
ORT_DEFAULT_LOG_SEVERITY = 2


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Silence ONNX Runtime's tools for the block: their prints, Python warnings and C++ session warnings.

    (The adapters form makes every session warn that the LoRA initializers are graph inputs, which is the point.)
    """
    loggers = [logging.getLogger(), logging.getLogger("ort_format_model.utils")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _read_fp32_source(model_path: str | os.PathLike) -> onnx.ModelProto:
    """The model with its weights (external data too); refuses one that is not fp32 already. Raises ExportError
    (``load_onnx``) or EdgeExportError."""
    model_path = Path(model_path)
    model = load_onnx(model_path)
    try:
        load_external_data_for_model(model, str(model_path.parent))
    except OSError as err:
        raise EdgeExportError(f"{model_path}: cannot read its external data: {err.strerror or err}") from None
    precision = read_metadata(model).get("precision", "fp32")
    if precision != "fp32":
        raise EdgeExportError(f"{model_path}: is already {precision}; convert the fp32 export instead")
    return model


def _output_path(model_path: Path, output_path: str | os.PathLike | None, precision: str) -> Path:
    """``output_path`` checked (it must not replace the model or its data), or ``<stem>.<precision>.onnx``. Raises
    ExportError (``check_suffix``) or OutputError (``check_outputs``)."""
    output = Path(output_path) if output_path is not None else precision_output_path(model_path, precision)
    check_suffix(output, ".onnx")
    check_outputs(model_files(output), model_files(model_path))
    return output


def _check_lora_inputs(before: onnx.ModelProto, after: onnx.ModelProto, what: str) -> None:
    """The LoRA inputs must leave a conversion as they came in: float32 graph inputs of the same shape, each with
    its same-named float32 rank-0 default initializer."""
    specs = lora_input_specs(before)
    if lora_input_specs(after) != specs:
        raise EdgeExportError(f"{what} changed the LoRA graph inputs (names, types or shapes)")
    defaults = {init.name: init for init in after.graph.initializer}
    expected = {init.name: list(init.dims) for init in before.graph.initializer if init.name in specs}
    for name, dims in expected.items():
        init = defaults.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or list(init.dims) != dims:
            raise EdgeExportError(f"{what} dropped or altered the rank-0 default of LoRA input {name}")


def _save(model: onnx.ModelProto, source: onnx.ModelProto, output: Path, precision: str) -> Path:
    """Set lora_export.precision (keeping the source's lora_export.* metadata), check, and save atomically."""
    set_metadata(model, {**read_metadata(source), "precision": precision})
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # onnx raises ValidationError, InferenceError, ...
        raise EdgeExportError(f"{output}: the {precision} model fails onnx.checker: {first_line(err)}") from None
    try:
        save_model(model, output, EXTERNAL_DATA_THRESHOLD)
    except OSError as err:
        raise EdgeExportError(f"{output}: cannot write: {err.strerror or err}") from None
    return output


# --------------------------------------------------------------------------- int8


def constant_weight_nodes(model: onnx.ModelProto, op_types: Sequence[str] = QUANTIZED_OP_TYPES) -> list[str]:
    """Names of the float ``op_types`` nodes (MatMul, Gather) whose weight (MatMul's B, Gather's table) is a
    constant initializer.

    An initializer that is also a graph input (a LoRA input with its rank-0 default) is not constant: it can be
    fed at run time, so the nodes that read it are not listed.
    """
    inputs = {value.name for value in model.graph.input}
    constants = {init.name for init in model.graph.initializer
                 if init.name not in inputs and init.data_type == onnx.TensorProto.FLOAT}
    weight_index = {"MatMul": 1, "Gather": 0}
    return [node.name for node in model.graph.node
            if node.op_type in op_types and node.input[weight_index[node.op_type]] in constants]


def quantize_int8(model_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
                  per_channel: bool = True) -> Path:
    """Write an int8 build of an fp32 export with ONNX Runtime dynamic quantization; returns its path.

    Quantized: the nodes of ``constant_weight_nodes`` (MatMul weights per output channel when ``per_channel``, the
    embedding table per tensor); activations are quantized to uint8 at run time. Weights are signed int8 in a
    7-bit range (``reduce_range``): x86 CPUs without VNNI multiply uint8 x int8 with 16-bit intermediate sums that
    saturate at full 8-bit range. ``quant_pre_process`` is not run: its symbolic shape inference fails on the
    local-attention graph, and without it the optimization pass removes 2 of ~120 nodes. The quantizer works on
    the model in memory, so models over protobuf's 2 GB limit are not supported.

    The result is checked: no float weight MatMul / Gather is left, LoRA inputs and their rank-0 defaults are
    unchanged (see ``_check_lora_inputs``). Default output: ``<stem>.int8.onnx`` beside the model.
    Raises ExportError / OutputError (an unreadable model, a bad output) or EdgeExportError (see module docstring).
    """
    model_path = Path(model_path)
    output = _output_path(model_path, output_path, "int8")
    source = _read_fp32_source(model_path)
    return _save(quantize_model_int8(source, str(model_path), per_channel=per_channel), source, output, "int8")


def quantize_model_int8(source: onnx.ModelProto, name: str, *, per_channel: bool = True) -> onnx.ModelProto:
    """The int8 build of an fp32 graph in memory (see quantize_int8; ``name`` names it in errors), checked."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = constant_weight_nodes(source)
    if not nodes:
        raise EdgeExportError(f"{name}: no MatMul or Gather with a constant weight to quantize")
    with tempfile.TemporaryDirectory(prefix="lora_export.int8.") as tmp, _quiet_onnxruntime():
        quantized_path = Path(tmp) / "model.int8.onnx"
        try:
            quantize_dynamic(source, quantized_path, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                             nodes_to_quantize=nodes, per_channel=per_channel, reduce_range=True,
                             weight_type=QuantType.QInt8)
            quantized = onnx.load(quantized_path)
        except Exception as err:  # the quantizer raises many exception types
            raise EdgeExportError(f"{name}: ONNX Runtime quantization failed: {first_line(err)}") from None
    left = constant_weight_nodes(quantized)
    if left:
        raise EdgeExportError(f"{name}: quantization left {len(left)} weight nodes in float: {left[:3]}")
    _check_lora_inputs(source, quantized, "int8 quantization")
    return quantized


# --------------------------------------------------------------------------- int4


def quantize_int4(model_path: str | os.PathLike, output_path: str | os.PathLike | None = None) -> Path:
    """Write an int4 build of an fp32 export for the edge; returns its path. See ``quantize_model_int4``.

    Default output: ``<stem>.int4.onnx`` beside the model. Raises as quantize_int8.
    """
    model_path = Path(model_path)
    output = _output_path(model_path, output_path, "int4")
    source = _read_fp32_source(model_path)
    return _save(quantize_model_int4(source, str(model_path)), source, output, "int4")


def quantize_model_int4(source: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The int4 build of an fp32 graph in memory (``name`` names it in errors), checked.

    ONNX Runtime's ``MatMulNBitsQuantizer``: block-wise weight-only int4 (blocks of ``INT4_BLOCK_SIZE`` along the
    input axis, asymmetric: a float scale and a 4-bit zero point per block) for every MatMul whose weight is a
    constant initializer, as ``com.microsoft.MatMulNBits`` nodes with ``INT4_ACCURACY_LEVEL``. Embeddings stay
    float. LoRA inputs and their rank-0 defaults are left float32 (they are not constant), so adapters still swap.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nodes = constant_weight_nodes(source, ("MatMul",))
    # It quantizes every MatMul with an initializer B unless told not to, LoRA inputs' rank-0 defaults included
    readers_of_inputs = [node.name for node in source.graph.node if node.op_type == "MatMul" and node.name not in nodes]
    if not nodes:
        raise EdgeExportError(f"{name}: no MatMul with a constant weight to quantize")
    model = onnx.ModelProto()
    model.CopyFrom(source)  # the quantizer edits the model it is given
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs a line per node at INFO
    try:
        with _quiet_onnxruntime():
            quantizer = MatMulNBitsQuantizer(model, block_size=INT4_BLOCK_SIZE, is_symmetric=False,
                                             accuracy_level=INT4_ACCURACY_LEVEL, nodes_to_exclude=readers_of_inputs)
            quantizer.process()
            quantized = quantizer.model.model
    except Exception as err:  # the quantizer raises many exception types
        raise EdgeExportError(f"{name}: ONNX Runtime int4 quantization failed: {first_line(err)}") from None
    finally:
        logger.setLevel(level)
    left = constant_weight_nodes(quantized, ("MatMul",))
    if left:
        raise EdgeExportError(f"{name}: int4 quantization left {len(left)} weight MatMuls in float: {left[:3]}")
    _check_lora_inputs(source, quantized, "int4 quantization")
    return quantized


# --------------------------------------------------------------------------- fp16


def convert_fp16(model_path: str | os.PathLike, output_path: str | os.PathLike | None = None) -> Path:
    """Write a float16 build of an fp32 export for the CUDA provider; returns its path.

    Float initializers and compute in float16, float32 at every graph input and output (see
    ``convert_model_fp16``). Default output: ``<stem>.fp16.onnx`` beside the model. Raises as quantize_int8.
    """
    model_path = Path(model_path)
    output = _output_path(model_path, output_path, "fp16")
    source = _read_fp32_source(model_path)
    return _save(convert_model_fp16(source, str(model_path)), source, output, "fp16")


def convert_model_fp16(source: onnx.ModelProto, name: str, float16_io: Sequence[str] = ()) -> onnx.ModelProto:
    """The float16 build of an fp32 graph in memory (``name`` names it in errors), checked.

    ``onnxruntime.transformers.float16.convert_float_to_float16``: float initializers and compute in float16;
    every float graph input and output stays float32 behind a Cast, except those named in ``float16_io``, which
    become float16 (a decoder's cache: half the memory). The converter appends its Casts at the end of the node
    list, so the graph is topologically sorted again (``OnnxModel.topological_sort``). A rank-0 default is read only
    by its input's Cast and stays float32, so LoRA inputs and ``.onnx_adapter`` files stay float32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    kept = [value.name for value in (*source.graph.input, *source.graph.output) if value.name not in float16_io]
    try:
        with _quiet_onnxruntime():
            converted = onnx.ModelProto()
            converted.CopyFrom(source)
            converted = convert_float_to_float16(converted, keep_io_types=kept)
            OnnxModel(converted).topological_sort()
    except Exception as err:  # the converter raises many exception types
        raise EdgeExportError(f"{name}: float16 conversion failed: {first_line(err)}") from None

    def boundary(model: onnx.ModelProto) -> list[tuple[str, int]]:
        return [(value.name, value.type.tensor_type.elem_type) for value in (*model.graph.input, *model.graph.output)]

    expected = [(value_name, onnx.TensorProto.FLOAT16 if value_name in float16_io else elem_type)
                for value_name, elem_type in boundary(source)]
    if boundary(converted) != expected:
        raise EdgeExportError(f"{name}: float16 conversion changed the graph inputs or outputs")
    _check_lora_inputs(source, converted, "float16 conversion")
    return converted


# --------------------------------------------------------------------------- ORT format


def convert_ort_format(model_path: str | os.PathLike, output_dir: str | os.PathLike | None = None
                       ) -> tuple[Path, Path]:
    """Convert an ONNX model (any precision) to ORT format with ONNX Runtime's ``convert_onnx_models_to_ort``.

    Writes ``<stem>.ort`` and ``<stem>.required_operators.config`` into ``output_dir`` (default: beside the model),
    optimized with the tool's ``Fixed`` style (for the CPU provider and other non-compiling providers; NCHWc
    layout left out so the file runs on ARM too). The tool works in a temporary folder in ``output_dir``; both
    files are renamed into place when it succeeded (ort first, then the config).
    Returns (ort path, config path). Raises as quantize_int8.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    model_path = Path(model_path)
    if model_path.suffix != ".onnx":
        raise EdgeExportError(f"{model_path}: the model must end in .onnx")
    outputs = ort_format_outputs(model_path, Path(output_dir) if output_dir is not None else None)
    load_onnx(model_path)
    check_outputs(outputs, model_files(model_path))
    try:
        with staged_outputs() as stage, _quiet_onnxruntime():
            tmp = stage.path(outputs[0]).parent
            convert_onnx_models_to_ort(model_path, output_dir=tmp, optimization_styles=[OptimizationStyle.Fixed])
            for output in outputs:
                stage.path(output)
            config = stage.path(outputs[1])  # its header names the .ort it was made from: the final path, not tmp
            config.write_text(config.read_text().replace(str(tmp.resolve()), str(outputs[1].parent.resolve())))
    except OSError as err:
        raise EdgeExportError(f"{err.filename or outputs[0]}: cannot write: {err.strerror or err}") from None
    except Exception as err:  # the tool raises ORT's own exception types
        raise EdgeExportError(f"{model_path}: ORT format conversion failed: {first_line(err)}") from None
    return outputs
