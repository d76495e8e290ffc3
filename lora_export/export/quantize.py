"""Edge builds of an exported model: int8 for CPU, fp16 for GPU, ORT format for reduced-operator builds.

Every build reads an fp32 export written by ``lora_export.export`` (either form) and writes beside it by default:

* ``quantize_int8``: ``model.int8.onnx``. ONNX Runtime's dynamic quantization (``quantize_dynamic``): int8 weights
  for every MatMul whose weight is a constant initializer (per output channel) and for the token-embedding Gather,
  activations quantized to uint8 at run time. In the adapters form the LoRA MatMuls take graph inputs, so only
  nodes reading a constant initializer are quantized (an initializer that is also a graph input is not constant):
  the base is int8, the adapters stay float32 inputs with their rank-0 defaults and still swap per run.
* ``quantize_int4``: ``model.int4.onnx``, block-wise weight-only int4 (``MatMulNBits``) by an ``Int4Recipe``
  (``int4_recipes``; default ``INT4_DEFAULT``: the LM head, first block and feed-forward up-projections in 8 bits).
* ``convert_fp16``: ``model.fp16.onnx``. float16 weights and compute (ONNX Runtime's copy of the
  onnxconverter-common converter) with the graph boundary kept as it was: int64 ids and mask in, float32 logits
  out, float32 LoRA inputs and rank-0 defaults. It is meant for the CUDA provider.
* ``convert_ort_format``: ``model.ort`` and ``model.required_operators.config`` (the names ONNX Runtime's
  ``convert_onnx_models_to_ort`` gives them), made by that tool with its ``Fixed`` optimization style. The config
  lists the operators (``domain;opset;Op,Op``) to pass to ``build.sh --minimal_build --include_ops_by_config``.

Two ways to build (int8, int4, fp16), chosen per source (``_goes_on_file``): in memory (the ``*_model_*``
functions on the proto, checked, saved by ``save_model``) for a model stored whole in its ``.onnx``, or on file
(``build_precision`` / ``write_precision``) for one with external data or ``too_big_for_memory``: nothing serializes
a model whole in memory, the output has external data and is checked as a file (``check_model_file``). int4 and
fp16 hold the fp32 weights once (loaded into the proto the converter edits in place; fp16 infers shapes by path).
int8 hands ``quantize_dynamic`` a path (``use_external_data_format``); ONNX Runtime then holds the weights three
times (its load, and in ``ONNXQuantizer`` a deep copy saved to ``/tmp`` and reloaded while both are alive).

The ONNX outputs carry ``lora_export.precision`` (``fp32`` / ``fp16`` / ``int8`` / ``int4``; absent means fp32)
next to the source's other ``lora_export.*`` metadata; the ``.ort`` file keeps its source's metadata. Every write is
atomic (staged beside the output, then moved into place): a failed conversion or write raises
``EdgeExportError`` with one line and leaves no output behind; an unreadable model is ``load_onnx``'s
ExportError, an output that cannot be written ``check_outputs``' OutputError, both raised before any work; an on-file
output that fails the checker is ``check_model_file``'s ExportError.

``parity.precisions`` measures what each build costs against the PyTorch fp32 checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from ..errors import EdgeExportError, first_line
from ..files import StagedOutputs, check_outputs, staged_outputs
from ..layout import data_path_of, model_files, ort_format_outputs, precision_output_path
from .adapters import lora_input_specs
from .int4_recipes import INT4_DEFAULT, Int4Recipe, apply_int4_recipe, layer_groups
from .onnx_files import (
    EXTERNAL_DATA_THRESHOLD,
    check_model_file,
    check_suffix,
    load_onnx,
    read_metadata,
    save_model,
    set_metadata,
    too_big_for_memory,
    write_model_files,
)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: The precisions a build converts an fp32 model to.
BUILT_PRECISIONS = ("int8", "int4", "fp16")
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


def _read_fp32_graph(model_path: Path) -> onnx.ModelProto:
    """``load_onnx`` (external data not read); refuses a model not fp32. Raises ExportError or EdgeExportError."""
    model = load_onnx(model_path)
    precision = read_metadata(model).get("precision", "fp32")
    if precision != "fp32":
        raise EdgeExportError(f"{model_path}: is already {precision}; convert the fp32 export instead")
    return model


def _goes_on_file(model: onnx.ModelProto, external_data_threshold: int) -> bool:
    """Whether ``model`` (as ``load_onnx`` gives it) is built on file: its weights are in external data (it was
    too big for memory when exported) or it is ``too_big_for_memory`` for ``external_data_threshold``."""
    external = any(uses_external_data(tensor) for tensor in model.graph.initializer)
    return external or too_big_for_memory(model, external_data_threshold)


def _graph_of(model_path: Path) -> onnx.ModelProto:
    """The graph of a model file without weights (names, types, shapes, external-data entries: what a build is
    checked against); external data is not read, inline weights are dropped. Raises ExportError (``load_onnx``)."""
    model = load_onnx(model_path)
    for tensor in model.graph.initializer:
        tensor.ClearField("raw_data")
    # A fresh message: protobuf (upb) frees cleared fields only with their whole message, here with ``model``
    return onnx.load_from_string(model.SerializeToString())


def _load_weights(model: onnx.ModelProto, model_path: Path) -> onnx.ModelProto:
    """``model`` (read from ``model_path``) with its external data read in; returns it. Raises EdgeExportError."""
    try:
        load_external_data_for_model(model, str(model_path.parent))
    except Exception as err:  # OSError, onnx's ValidationError (missing or bad file), ValueError (bad bounds)
        raise EdgeExportError(f"{model_path}: cannot read its external data: {first_line(err)}") from None
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


def _build(model_path: str | os.PathLike, output_path: str | os.PathLike | None, precision: str,
           external_data_threshold: int, per_channel: bool = True, int4: Int4Recipe = INT4_DEFAULT) -> Path:
    """The ``precision`` build of the fp32 export at ``model_path``, in memory or on file (``_goes_on_file``)."""
    model_path = Path(model_path)
    output = _output_path(model_path, output_path, precision)
    source = _read_fp32_graph(model_path)
    if _goes_on_file(source, external_data_threshold):
        del source  # its inline weights: build_precision reads the file again, never two copies at once
        return build_precision(model_path, output, precision, per_channel=per_channel, int4=int4)
    name = str(model_path)
    if precision == "int8":
        built = quantize_model_int8(source, name, per_channel=per_channel)
    else:
        built = quantize_model_int4(source, name, int4) if precision == "int4" else convert_model_fp16(source, name)
    return _save(built, source, output, precision)


# --------------------------------------------------------------------------- on file


def build_precision(source_path: str | os.PathLike, output_path: str | os.PathLike, precision: str, *,
                    float16_io: Sequence[str] = (), per_channel: bool = True, int4: Int4Recipe = INT4_DEFAULT
                    ) -> Path:
    """``write_precision`` to ``output_path`` in a stage of its own (atomic); returns the path. The output must end
    in .onnx and not replace the source or its data (checked before any work: ExportError / OutputError)."""
    source_path = Path(source_path)
    output = _output_path(source_path, output_path, precision)
    with staged_outputs() as stage:
        write_precision(source_path, output, precision, stage, float16_io=float16_io, per_channel=per_channel,
                        int4=int4)
    return output


def write_precision(source_path: str | os.PathLike, output: str | os.PathLike, precision: str,
                    stage: StagedOutputs, *, float16_io: Sequence[str] = (), per_channel: bool = True,
                    int4: Int4Recipe = INT4_DEFAULT, name: str | None = None, scratch_source: bool = False
                    ) -> onnx.ModelProto:
    """Write the ``precision`` (int8 / int4 / fp16) build of the fp32 model FILE ``source_path`` (external data
    beside it, or inline) into ``stage`` as ``output`` + ``<output>.data``, the file way (module docstring);
    returns the written graph without its weights (for node and parameter counts).

    ``float16_io`` (fp16), ``per_channel`` (int8) and ``int4`` (the recipe) as in ``convert_model_fp16`` /
    ``quantize_int8`` / ``quantize_int4``. Metadata:
    the source's ``lora_export.*`` with ``precision`` set (the source's own precision is not checked). Checked as
    the in-memory builds are, then as a file. ``name`` names the model in errors (default ``source_path``);
    scratch files go into a folder in the stage. ``scratch_source``: the source lies in the caller's own scratch
    folder, so int8 reads it in place instead of from a copy (``_scratch_copy``). Raises ExportError (an
    unreadable source, an output failing the checker) or EdgeExportError (a failed conversion or write, an unknown
    precision).
    """
    source_path, output = Path(source_path), Path(output)
    name = name or str(source_path)
    if precision not in BUILT_PRECISIONS:
        raise EdgeExportError(f"{name}: cannot build {precision!r}, expected one of {', '.join(BUILT_PRECISIONS)}")
    source = _graph_of(source_path)
    metadata = {**read_metadata(source), "precision": precision}
    staged = stage.path(output)
    stage.path(data_path_of(output))
    try:
        with tempfile.TemporaryDirectory(prefix=".scratch.", dir=staged.parent) as scratch:
            if precision == "int8":
                copy = source_path if scratch_source else _scratch_copy(source_path, source, Path(scratch))
                built = _quantize_dynamic(copy, source, staged, per_channel, name, external=True)
                set_metadata(built, metadata)
                onnx.save_model(built, staged)  # the graph only: its weights stay in the data file ORT wrote
                check_model_file(staged, output)
                return built
            if precision == "int4":
                built = _int4_in_place(_load_weights(load_onnx(source_path), source_path), source, name, int4)
            else:
                built = _fp16_on_file(source_path, source, Path(scratch), name, float16_io)
        set_metadata(built, metadata)
        write_model_files(built, output, stage, EXTERNAL_DATA_THRESHOLD, on_file=True)
    except OSError as err:
        raise EdgeExportError(f"{output}: cannot write: {err.strerror or err}") from None
    # The written graph read again: ``built`` holds the weights' memory until it goes, though saving cleared them
    return onnx.load(staged, load_external_data=False)


def _scratch_copy(model_path: Path, graph: onnx.ModelProto, directory: Path) -> Path:
    """``model_path`` and the external-data files its initializers name (``graph``: its graph) copied into
    ``directory`` (``shutil.copyfile``: in the kernel, no weights in this process); returns the model's copy.

    ``quantize_dynamic`` given a path writes its shape-inferred copy beside the model (``<stem>-inferred.onnx``,
    then deleted) and reads the weights from there, so it gets a copy and nothing is written beside the user's
    model. A copy, not a link: onnx refuses external data behind a symbolic link or with several hard links.
    Raises EdgeExportError for an external-data location outside the model's folder, OSError for a failed copy.
    """
    locations = {ExternalDataInfo(tensor).location for tensor in graph.graph.initializer
                 if uses_external_data(tensor)}
    for location in sorted({model_path.name, *locations}):
        relative = Path(location)
        if relative.is_absolute() or ".." in relative.parts:
            raise EdgeExportError(f"{model_path}: external data {location!r} lies outside the model's folder")
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path.parent / relative, directory / relative)
    return directory / model_path.name


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
                  per_channel: bool = True, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write an int8 build of an fp32 export with ONNX Runtime dynamic quantization; returns its path.

    Quantized: the nodes of ``constant_weight_nodes`` (MatMul weights per output channel when ``per_channel``, the
    embedding table per tensor); activations are quantized to uint8 at run time. Weights are signed int8 in a
    7-bit range (``reduce_range``): x86 CPUs without VNNI multiply uint8 x int8 with 16-bit intermediate sums that
    saturate at full 8-bit range. ``quant_pre_process`` is not run: its symbolic shape inference fails on the
    local-attention graph, and without it the optimization pass removes 2 of ~120 nodes. A model with external
    data or above ``external_data_threshold`` is built on file (see the module docstring).

    The result is checked: no float weight MatMul / Gather is left, LoRA inputs and their rank-0 defaults are
    unchanged (see ``_check_lora_inputs``). Default output: ``<stem>.int8.onnx`` beside the model.
    Raises ExportError / OutputError (an unreadable model, a bad output) or EdgeExportError (see module docstring).
    """
    return _build(model_path, output_path, "int8", external_data_threshold, per_channel)


def quantize_model_int8(source: onnx.ModelProto, name: str, *, per_channel: bool = True) -> onnx.ModelProto:
    """The int8 build of an fp32 graph in memory (see quantize_int8; ``name`` names it in errors), checked."""
    with tempfile.TemporaryDirectory(prefix="lora_export.int8.") as tmp:
        return _quantize_dynamic(source, source, Path(tmp) / "model.int8.onnx", per_channel, name)


def _quantize_dynamic(model_input: onnx.ModelProto | Path, source: onnx.ModelProto, output: Path, per_channel: bool,
                      name: str, external: bool = False) -> onnx.ModelProto:
    """ONNX Runtime's ``quantize_dynamic`` of ``model_input`` (the fp32 graph ``source`` or a path to it) into
    ``output`` (``external``: weights in ``<output>.data``, not read back): the nodes of ``constant_weight_nodes``.
    Returns the model written, checked: no float weight MatMul / Gather left, LoRA inputs as they were. Raises
    EdgeExportError."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = constant_weight_nodes(source)
    if not nodes:
        raise EdgeExportError(f"{name}: no MatMul or Gather with a constant weight to quantize")
    try:
        with _quiet_onnxruntime():
            quantize_dynamic(model_input, output, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                             nodes_to_quantize=nodes, per_channel=per_channel, reduce_range=True,
                             weight_type=QuantType.QInt8, use_external_data_format=external)
            quantized = onnx.load(output, load_external_data=not external)
    except Exception as err:  # the quantizer raises many exception types
        raise EdgeExportError(f"{name}: ONNX Runtime quantization failed: {first_line(err)}") from None
    left = constant_weight_nodes(quantized)
    if left:
        raise EdgeExportError(f"{name}: quantization left {len(left)} weight nodes in float: {left[:3]}")
    _check_lora_inputs(source, quantized, "int8 quantization")
    return quantized


# --------------------------------------------------------------------------- int4


def quantize_int4(model_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
                  recipe: Int4Recipe = INT4_DEFAULT, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
                  ) -> Path:
    """Write an int4 build of an fp32 export for the edge; returns its path. See ``quantize_model_int4``.

    Default output: ``<stem>.int4.onnx`` beside the model. Built on file as quantize_int8 (the weights held once,
    the quantizer editing the loaded model in place). Raises as quantize_int8.
    """
    return _build(model_path, output_path, "int4", external_data_threshold, int4=recipe)


def quantize_model_int4(source: onnx.ModelProto, name: str, recipe: Int4Recipe = INT4_DEFAULT) -> onnx.ModelProto:
    """The int4 build of an fp32 graph in memory (``name`` names it in errors), checked; ``source`` is not edited.

    ONNX Runtime's ``MatMulNBitsQuantizer`` as ``recipe`` says (``int4_recipes``): block-wise weight-only
    quantization (blocks of ``recipe.block_size`` along the input axis, a float scale and by default a 4-bit zero
    point per block) of every MatMul whose weight is a constant initializer, as ``com.microsoft.MatMulNBits``
    nodes: 4 bits, 8 for the recipe's ``eight_bit`` layer groups, float MatMuls left for its ``float_layers``.
    Embeddings stay float unless ``recipe.embeddings``. LoRA inputs and their rank-0 defaults are left float32
    (they are not constant), so adapters still swap.
    """
    model = onnx.ModelProto()
    model.CopyFrom(source)  # the quantizer edits the model it is given
    return _int4_in_place(model, source, name, recipe)


def _int4_in_place(model: onnx.ModelProto, source: onnx.ModelProto, name: str, recipe: Int4Recipe
                   ) -> onnx.ModelProto:
    """``model`` (an fp32 graph with its weights) quantized to int4 in place (see ``quantize_model_int4``) and
    checked against ``source``, the same graph unedited (its weights need not be loaded): no float weight MatMul
    left but the recipe's float layers, no float embedding with ``recipe.embeddings``. Raises EdgeExportError."""
    nodes = constant_weight_nodes(source, ("MatMul",))
    if not nodes:
        raise EdgeExportError(f"{name}: no MatMul with a constant weight to quantize")
    tables = constant_weight_nodes(source, ("Gather",))
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs a line per node at INFO
    try:
        groups = layer_groups(source, nodes) if recipe.float_layers else {}
        kept = {node for group in recipe.float_layers for node in groups[group]}
        with _quiet_onnxruntime():
            quantized = apply_int4_recipe(model, recipe, nodes, tables)
    except EdgeExportError as err:
        raise EdgeExportError(f"{name}: {err}; build with the 'rtn' int4 recipe instead") from None
    except Exception as err:  # the quantizer raises many exception types
        raise EdgeExportError(f"{name}: ONNX Runtime int4 quantization failed: {first_line(err)}") from None
    finally:
        logger.setLevel(level)
    left = [node for node in constant_weight_nodes(quantized, ("MatMul",)) if node not in kept]
    if left:
        raise EdgeExportError(f"{name}: int4 quantization left {len(left)} weight MatMuls in float: {left[:3]}")
    if recipe.embeddings and constant_weight_nodes(quantized, ("Gather",)):
        raise EdgeExportError(f"{name}: int4 quantization left the embeddings in float")
    _check_lora_inputs(source, quantized, "int4 quantization")
    return quantized


# --------------------------------------------------------------------------- fp16


def convert_fp16(model_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write a float16 build of an fp32 export for the CUDA provider; returns its path.

    Float initializers and compute in float16, float32 at every graph input and output (see
    ``convert_model_fp16``). Default output: ``<stem>.fp16.onnx`` beside the model. Built on file as quantize_int8
    (shapes inferred by path, each weight converted in place). Raises as quantize_int8.
    """
    return _build(model_path, output_path, "fp16", external_data_threshold)


def convert_model_fp16(source: onnx.ModelProto, name: str, float16_io: Sequence[str] = ()) -> onnx.ModelProto:
    """The float16 build of an fp32 graph in memory (``name`` names it in errors), checked; ``source`` is not
    edited (the converter works on the shape-inferred copy it makes).

    ``onnxruntime.transformers.float16.convert_float_to_float16``: float initializers and compute in float16;
    every float graph input and output stays float32 behind a Cast, except those named in ``float16_io``, which
    become float16 (a decoder's cache: half the memory). The converter appends its Casts at the end of the node
    list, so the graph is topologically sorted again (``OnnxModel.topological_sort``). A rank-0 default is read only
    by its input's Cast and stays float32, so LoRA inputs and ``.onnx_adapter`` files stay float32.
    """
    return _fp16(source, source, name, float16_io, shapes_inferred=False)


def _fp16_on_file(source_path: Path, source: onnx.ModelProto, scratch: Path, name: str,
                  float16_io: Sequence[str]) -> onnx.ModelProto:
    """The float16 build of the model file ``source_path`` (``source``: its graph): shapes inferred by path into
    ``scratch`` (the converter's own inference serializes the model in memory), the weights read in and converted
    in place. Raises EdgeExportError."""
    inferred = scratch / "inferred.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(str(source_path), str(inferred))
        model = onnx.load(inferred, load_external_data=False)
    except Exception as err:  # onnx raises InferenceError, ValidationError, ...
        raise EdgeExportError(f"{name}: float16 conversion failed: {first_line(err)}") from None
    return _fp16(_load_weights(model, source_path), source, name, float16_io, shapes_inferred=True)


def _fp16(model: onnx.ModelProto, source: onnx.ModelProto, name: str, float16_io: Sequence[str],
          shapes_inferred: bool) -> onnx.ModelProto:
    """``model`` converted to float16 (see ``convert_model_fp16``) and checked against ``source``, the fp32 graph
    unedited (its weights need not be loaded). ``shapes_inferred``: ``model`` carries its inferred shapes and is
    converted in place; otherwise the converter infers them on a copy and ``model`` is left as it was."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    kept = [value.name for value in (*source.graph.input, *source.graph.output) if value.name not in float16_io]
    try:
        with _quiet_onnxruntime():
            converted = convert_float_to_float16(model, keep_io_types=kept, disable_shape_infer=shapes_inferred)
            OnnxModel(converted).topological_sort()
    except Exception as err:  # the converter raises many exception types
        raise EdgeExportError(f"{name}: float16 conversion failed: {first_line(err)}") from None

    def boundary(graph: onnx.ModelProto) -> list[tuple[str, int]]:
        return [(value.name, value.type.tensor_type.elem_type) for value in (*graph.graph.input, *graph.graph.output)]

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
