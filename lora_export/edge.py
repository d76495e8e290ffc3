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
temporary file or folder beside the output, then a rename): a failure raises ``EdgeExportError`` with one line and
leaves no output behind.

``compare_precisions`` measures the builds against the PyTorch fp32 checkpoint for the report: file size, ORT
latency, next-byte top-1 agreement and eval loss on held-out prose. Pass limits are the per-precision
``lora_export.validate.TOLERANCES``. fp16 runs only where a CUDA session really gets CUDAExecutionProvider
(ORT's CPU provider has few float16 kernels); elsewhere its row says ``not run: <reason>``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.external_data_helper import load_external_data_for_model

from .adapters import AdapterError, activate_adapters, attach_adapter, lora_input_specs
from .cases import heldout_text
from .checkpoint import CheckpointError, build_model, first_line, read_checkpoint
from .export import (
    EXTERNAL_DATA_THRESHOLD,
    ExportError,
    check_output_path,
    load_onnx,
    model_file_size,
    model_files,
    read_metadata,
    save_model,
    set_metadata,
)
from .files import OutputError, check_outputs, staged_outputs
from .layers import merge_lora
from .lineage import check_model_matches, load_adapter_for
from .metrics import (
    LATENCY_MAX_SEQ,
    LATENCY_RUNS,
    LATENCY_WARMUP,
    TOLERANCES,
    ParityInputError,
    compare_logits,
    judge,
    percentiles_ms,
)
from .providers import open_session
from .tracing import OUTPUT_NAMES

PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: int4 blocks: 32 weights share a scale and a zero point (onnxruntime-genai's model builder's default block size).
INT4_BLOCK_SIZE = 32
#: MatMulNBits ``accuracy_level`` 4: activations quantized to int8 for the int4 x int8 CPU kernels.
INT4_ACCURACY_LEVEL = 4
#: Operators whose constant weights dynamic quantization turns into int8. ORT's dynamic (IntegerOps) mode has no
#: Gemm; the exporter writes Linear as MatMul + Add, so there is none to quantize.
QUANTIZED_OP_TYPES = ("MatMul", "Gather")
EVAL_WINDOWS = 16
#: ONNX Runtime's default logger severity (warning), restored after a conversion silenced it.
ORT_DEFAULT_LOG_SEVERITY = 2


class EdgeExportError(ValueError):
    """An edge build or comparison that cannot go ahead (bad input, failed conversion, unwritable output); one line."""


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
    """The model with its weights (external data too); refuses one that is not fp32 already."""
    model_path = Path(model_path)
    try:
        model = load_onnx(model_path)
        load_external_data_for_model(model, str(model_path.parent))
    except ExportError as err:
        raise EdgeExportError(str(err)) from None
    except OSError as err:
        raise EdgeExportError(f"{model_path}: cannot read its external data: {err.strerror or err}") from None
    precision = read_metadata(model).get("precision", "fp32")
    if precision != "fp32":
        raise EdgeExportError(f"{model_path}: is already {precision}; convert the fp32 export instead")
    return model


def precision_output_path(model_path: Path, precision: str) -> Path:
    """The default output of an edge build: ``<stem>.<precision>.onnx`` beside the model."""
    return model_path.with_suffix(f".{precision}.onnx")


def ort_format_outputs(model_path: Path, output_dir: Path | None = None) -> tuple[Path, Path]:
    """(``<stem>.ort``, ``<stem>.required_operators.config``) that ``convert_ort_format`` writes."""
    directory = output_dir if output_dir is not None else model_path.parent
    return directory / model_path.with_suffix(".ort").name, directory / f"{model_path.stem}.required_operators.config"


def _output_path(model_path: Path, output_path: str | os.PathLike | None, precision: str) -> Path:
    """``output_path`` checked (it must not replace the model or its data), or ``<stem>.<precision>.onnx``."""
    output = Path(output_path) if output_path is not None else precision_output_path(model_path, precision)
    try:
        check_output_path(output, ".onnx")
        check_outputs(model_files(output), model_files(model_path))
    except (ExportError, OutputError) as err:
        raise EdgeExportError(str(err)) from None
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
    Raises EdgeExportError.
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

    Default output: ``<stem>.int4.onnx`` beside the model. Raises EdgeExportError.
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
    ``convert_model_fp16``). Default output: ``<stem>.fp16.onnx`` beside the model. Raises EdgeExportError.
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
    Returns (ort path, config path). Raises EdgeExportError.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    model_path = Path(model_path)
    if model_path.suffix != ".onnx":
        raise EdgeExportError(f"{model_path}: the model must end in .onnx")
    outputs = ort_format_outputs(model_path, Path(output_dir) if output_dir is not None else None)
    try:
        load_onnx(model_path)
        check_outputs(outputs, model_files(model_path))
    except (ExportError, OutputError) as err:
        raise EdgeExportError(str(err)) from None
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


def check_ort_format(model_path: str | os.PathLike, ort_path: str | os.PathLike) -> float:
    """Hold an ``.ort`` model against the ``.onnx`` it was converted from: both on ONNX Runtime's CPU provider, on
    two seeded batches of held-out prose (LoRA inputs at their defaults); returns the largest |difference| of the
    logits. Raises EdgeExportError when they differ beyond the fp32 tolerance (atol 1e-4 + rtol 1e-3 |onnx|)."""
    tolerance = TOLERANCES["fp32"]
    feeds = [{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids in
             (heldout_windows(2, 32), heldout_windows(1, 7))]
    outputs = []
    for path in (model_path, ort_path):
        try:
            session, _ = open_session(path, "cpu")
        except ParityInputError as err:
            raise EdgeExportError(str(err)) from None
        outputs.append([session.run(OUTPUT_NAMES, inputs)[0] for inputs in feeds])
    worst = 0.0
    for want, got in zip(*outputs, strict=True):
        diff = np.abs(got.astype(np.float64) - want)
        worst = max(worst, float(diff.max()))
        if not (diff <= tolerance.atol + tolerance.rtol * np.abs(want)).all():
            raise EdgeExportError(f"{ort_path}: its logits differ from {Path(model_path).name}'s "
                                  f"(max |diff| {float(diff.max()):.3g}): the ORT-format conversion changed the model")
    return worst


# --------------------------------------------------------------------------- comparison


def heldout_windows(count: int, seq_len: int) -> np.ndarray:
    """``count`` windows of ``seq_len`` bytes at evenly spaced offsets of the held-out prose -> int64 [count, seq]."""
    data = np.frombuffer(heldout_text(), dtype=np.uint8)
    starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
    return np.stack([data[s: s + seq_len] for s in starts]).astype(np.int64)


def _check_models(models: Mapping[str, str | os.PathLike], payload: dict, checkpoint_path: Path
                  ) -> dict[str, tuple[Path, onnx.ModelProto, dict[str, str]]]:
    """{precision: (path, graph, lora_export metadata)} of models that belong to the checkpoint and are the
    precision they are given as. Raises EdgeExportError, ExportError or ParityInputError."""
    checked = {}
    for precision, path in models.items():
        path = Path(path)
        if precision not in PRECISIONS:
            raise EdgeExportError(f"unknown precision {precision!r}, expected one of {', '.join(PRECISIONS)}")
        proto = load_onnx(path)
        metadata = read_metadata(proto)
        check_model_matches(proto, metadata, payload, path, checkpoint_path)
        if metadata.get("precision", "fp32") != precision:
            raise EdgeExportError(f"{path}: is {metadata.get('precision', 'fp32')}, given as {precision}")
        checked[precision] = (path, proto, metadata)
    return checked


def compare_precisions(
    checkpoint_path: str | os.PathLike,
    models: Mapping[str, str | os.PathLike],
    *,
    adapter_path: str | os.PathLike | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    windows: int = EVAL_WINDOWS,
    warmup: int = LATENCY_WARMUP,
    runs: int = LATENCY_RUNS,
) -> list[dict]:
    """Each build of ``models`` ({precision: .onnx path}, all exported from ``checkpoint_path``) against PyTorch fp32.

    The reference is the checkpoint in the models' form: merged LoRA, or for the adapters form the base, or base +
    the adapter of ``adapter_path`` (which is then active in every ONNX Runtime run). Quality is measured on
    ``windows`` held-out prose windows (the last 10% of pydoc_data.topics, as training splits it) of
    N = min(256, max_seq_len) bytes; latency (warm-up, then p50 / p90 of ``runs``, each model in its own block) at
    each (batch, seq) of ``shapes``, default [(1, N)], on random bytes. fp32 and int8 run on ONNX Runtime's CPU
    provider with its default threads, fp16 on CUDA only.

    One dict per model, in the given order: precision, model (path), file_size (bytes, external data included),
    provider, status ('ran' or 'not run: <reason>'), tolerance (the precision's TOLERANCES, in words),
    top1_agreement, top1_exact, max_abs, eval_loss_ref (PyTorch), eval_loss (ONNX Runtime), eval_loss_change_pct
    (100 * (eval_loss - eval_loss_ref) / eval_loss_ref), latency (list of {batch, seq_len, p50_ms, p90_ms}),
    passed and failures (from ``validate.judge``). A model that did not run has None metrics, [] latency and
    passed None. Raises EdgeExportError for models that do not belong to the checkpoint or cannot load.
    """
    checkpoint_path = Path(checkpoint_path)
    try:
        payload = read_checkpoint(checkpoint_path)
        checked = _check_models(models, payload, checkpoint_path)
        forms = {metadata["form"] for _, _, metadata in checked.values()}
        if len(forms) > 1:
            raise EdgeExportError(f"the models mix export forms {sorted(forms)}: compare builds of one export")
        tensors = None
        if adapter_path is not None:
            _, proto, metadata = next(iter(checked.values()))
            tensors, _ = load_adapter_for(Path(adapter_path), proto, metadata)
    except (CheckpointError, ExportError, ParityInputError, AdapterError) as err:
        raise EdgeExportError(str(err)) from None

    model = build_model(payload, checkpoint_path)
    if forms == {"merged"}:
        merge_lora(model)
    else:
        attach_adapter(model, tensors)
    seq_len = min(LATENCY_MAX_SEQ, model.config.max_seq_len)
    input_ids = heldout_windows(windows, seq_len)
    attention_mask = np.ones_like(input_ids)
    with torch.no_grad():
        reference = model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()
    run_options, _adapters = activate_adapters(adapter_path) if adapter_path is not None else (None, [])
    rng = np.random.default_rng(0)
    latency_inputs = [{"input_ids": rng.integers(0, 256, shape, dtype=np.int64),
                       "attention_mask": np.ones(shape, np.int64)} for shape in (shapes or [(1, seq_len)])]

    rows, sessions = {}, {}
    for precision, (path, _, _) in checked.items():
        tolerance = TOLERANCES[precision]
        try:
            session, status = open_session(path, "cuda" if precision == "fp16" else "cpu")
        except ParityInputError as err:
            raise EdgeExportError(str(err)) from None
        row = {"precision": precision, "model": str(path), "file_size": model_file_size(path), "provider": status.name,
               "status": status.status(), "tolerance": tolerance.describe(), "top1_agreement": None,
               "top1_exact": None, "max_abs": None, "eval_loss_ref": None, "eval_loss": None,
               "eval_loss_change_pct": None, "latency": [], "passed": None, "failures": []}
        if session is not None:
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
            got = session.run(OUTPUT_NAMES, feeds, run_options)[0]
            metrics, _ = compare_logits(got, reference, input_ids, attention_mask, tolerance)
            failures = judge(metrics, tolerance)
            row.update(top1_agreement=metrics.top1_agreement, top1_exact=metrics.top1_exact, max_abs=metrics.max_abs,
                       eval_loss_ref=metrics.loss_ref, eval_loss=metrics.loss_onnx,
                       eval_loss_change_pct=100.0 * (metrics.loss_onnx - metrics.loss_ref) / metrics.loss_ref,
                       passed=not failures, failures=failures)
            sessions[precision] = session
        rows[precision] = row
    for precision, session in sessions.items():  # each build in its own warmed block
        for inputs in latency_inputs:
            batch, seq = inputs["input_ids"].shape
            p50, p90 = percentiles_ms(functools.partial(session.run, OUTPUT_NAMES, inputs, run_options), warmup, runs)
            rows[precision]["latency"].append({"batch": batch, "seq_len": seq, "p50_ms": p50, "p90_ms": p90})
    return list(rows.values())
