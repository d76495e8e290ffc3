"""Export a lora-export checkpoint to ONNX, merged or with the LoRA adapters as graph inputs.

Pipeline (both forms): load checkpoint -> build the export module -> torch.onnx.export (dynamo) with
dynamic batch and sequence axes -> onnx.checker + shape inference -> onnxslim (kept only if it shrinks
the graph, keeps its interface, checks and gives the same outputs on ONNX Runtime) -> metadata_props ->
atomic save (external data above a threshold) -> in the adapter form, the trained adapter as an ``.onnx_adapter`` file.

Graph interface: ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, seq] (1 = real
token) -> ``logits`` float32 [batch, seq, 256]. The adapter form adds the LoRA inputs described in
``lora_export.adapters``.

From opset 23 on (the default) the global softmax heads are one ONNX ``Attention`` node each, ONNX Runtime's
fused kernel (``lora_export.attention.fused_attention``); the local heads stay blockwise (O(N * w)), linear global
heads decomposed. Below opset 23 the exporter decomposes every head. ``lora_export.attention`` metadata records
which.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .. import __version__
from ..errors import ExportError, OutputError, first_line
from ..files import StagedOutputs, check_outputs, file_sha256, staged_outputs
from ..layout import Form, adapter_record_path, data_path_of, default_adapter_path, default_output_path, model_files
from ..model.checkpoint import base_fingerprint, build_model, read_checkpoint
from ..model.transformer import ModelConfig
from .adapters import (
    adapter_tensors,
    check_adapter,
    lora_input_specs,
    model_version_from_fingerprint,
    read_adapter,
    run_adapter,
    write_adapter,
)
from .ort_session import quiet_session
from .tracing import DEFAULT_OPSET, add_rank0_defaults, trace_to_onnx

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's hard limit for one file
#: How the CLI names each form (its flags): --merge, --adapters-as-inputs.
METADATA_PREFIX = "lora_export."


@dataclass
class ExportResult:
    """What export_onnx wrote and what it measured."""

    model_path: Path
    adapter_path: Path | None
    form: Form
    opset: int
    nodes_exported: int
    nodes_final: int
    simplified: bool
    simplify_note: str
    parameters: int
    file_size: int
    external_data: bool
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def summary(self, validation_follows: bool = True) -> str:
        """Human-readable multi-line summary for the CLI; its time line says whether a validation follows."""
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        lines = [
            f"form:        {self.form.title} (opset {self.opset})",
            f"model:       {self.model_path} ({self.file_size / 1e6:.2f} MB"
            + (", external data)" if self.external_data else ")"),
            f"nodes:       {self.nodes_exported} exported -> {self.nodes_final} final ({self.simplify_note})",
            f"parameters:  {self.parameters:,}",
            f"time:        {stages}" + (" (validation follows)" if validation_follows else ""),
        ]
        if self.adapter_path is not None:
            lines.insert(2, f"adapter:     {self.adapter_path}")
        return "\n".join(lines)


#: Inputs that carry quantization scales and zero points (and MatMulNBits' g_idx), not weights, by op type.
QUANTIZATION_INPUTS = {"DequantizeLinear": (1, 2), "MatMulInteger": (2, 3), "MatMulNBits": (2, 3, 4)}
#: Element types a weight is stored in: float, or int8 / uint8 quantized.
WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


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


def probe_feeds(model: onnx.ModelProto, config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs (with a random rank-2 adapter in the adapter form) used to compare two graphs."""
    rng = np.random.default_rng(seed)
    n = min(config.max_seq_len, config.local_attn_window_size + 5)
    feeds = {"input_ids": rng.integers(0, 256, (2, n), dtype=np.int64), "attention_mask": np.ones((2, n), np.int64)}
    for name, (_, dims) in lora_input_specs(model).items():
        shape = [2 if isinstance(d, str) else d for d in dims]
        feeds[name] = rng.normal(0, 0.05, shape).astype(np.float32)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """logits from an in-memory model on ONNX Runtime CPU."""
    session = quiet_session(model.SerializeToString())
    return session.run(["logits"], feeds)[0]


def simplify(model: onnx.ModelProto, config: ModelConfig) -> tuple[onnx.ModelProto, bool, str]:
    """onnxslim, kept only if it shrinks the graph, keeps its interface (inputs, outputs, the LoRA inputs' rank-0
    defaults), passes the checker and matches the input model on ORT. onnxsim is not used: it grows our graphs.

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
    if not np.allclose(got, expected, atol=1e-5, rtol=1e-4):
        diff = float(np.abs(got - expected).max())
        return model, False, f"onnxslim changed outputs (max abs {diff:.2e}), kept the exporter's graph"
    return simplified, True, "simplified with onnxslim"


def graph_interface(model: onnx.ModelProto) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """(input value infos, output value infos, {input with an initializer default: its dims}) of a graph."""
    inputs = {value.name for value in model.graph.input}
    defaults = {init.name: list(init.dims) for init in model.graph.initializer if init.name in inputs}
    return ([str(value.type) + value.name for value in model.graph.input],
            [str(value.type) + value.name for value in model.graph.output], defaults)


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


def write_model_files(model: onnx.ModelProto, path: Path, stage: StagedOutputs, external_data_threshold: int) -> bool:
    """Save ``model`` into ``stage`` (moved to ``path`` with the stage); weights go to ``<name>.data`` beside it
    when the model exceeds the threshold, and a previous export's ``.data`` is removed otherwise.

    Returns whether external data was used.
    """
    external = model.ByteSize() > external_data_threshold
    data_path = data_path_of(path)
    if external:
        stage.path(data_path)
        onnx.save_model(model, stage.path(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
    else:
        onnx.save_model(model, stage.path(path))
        stage.remove(data_path)
    return external


def save_model(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> bool:
    """Save atomically (model and external data together, or neither); returns whether external data was used."""
    with staged_outputs() as stage:
        return write_model_files(model, path, stage, external_data_threshold)


def check_output_path(path: Path, suffix: str, sources: list[Path | None] | tuple = ()) -> None:
    """Refuse, before any work, an output without ``suffix``, one that cannot be written, or one that would
    replace one of ``sources`` (the command's input files)."""
    if path.suffix != suffix:
        raise ExportError(f"{path}: the output must end in {suffix}")
    try:
        check_outputs([path], sources)
    except OutputError as err:
        raise ExportError(str(err)) from None


def model_file_size(path: Path) -> int:
    """Bytes of a model file plus its external-data file ``<name>.data`` when there is one."""
    data = data_path_of(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def export_outputs(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
                   form: Form = Form.MERGED, adapter_path: str | os.PathLike | None = None
                   ) -> tuple[Path, Path | None]:
    """(model path, adapter path or None) that ``export_onnx`` writes with these arguments, suffixes checked.

    Every file they stand for (``model_files``) is checked before the export starts.
    """
    output = Path(output_path) if output_path is not None else default_output_path(checkpoint_path, form)
    check_output_path(output, ".onnx")
    if form is Form.MERGED:
        if adapter_path is not None:
            raise ExportError("an adapter output only applies to the adapters-as-inputs form (merge=False)")
        return output, None
    adapter_out = Path(adapter_path) if adapter_path is not None else default_adapter_path(output)
    check_output_path(adapter_out, ".onnx_adapter")
    return output, adapter_out


def export_onnx(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    merge: bool = True,
    adapter_path: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    simplify_graph: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint to ONNX; the Python face of ``lora-export model.pt --merge``.

    merge=True folds scaling * B @ A into the base weights and exports a plain transformer graph.
    merge=False exports the adapters-as-inputs graph and writes the trained adapter to ``adapter_path``
    (default ``<output stem>.onnx_adapter``). Raises CheckpointError / ExportError with one line.
    """
    say = progress or (lambda _msg: None)
    checkpoint_path = Path(checkpoint_path)
    form = Form.of(merge)
    output, adapter_out = export_outputs(checkpoint_path, output_path, form=form, adapter_path=adapter_path)
    try:
        check_outputs(model_files(output, adapter_out), [checkpoint_path])
    except OutputError as err:
        raise ExportError(str(err)) from None
    if not 18 <= opset <= 23:
        raise ExportError(f"opset {opset} is not supported: choose 18..23 (the dynamo exporter needs >= 18)")

    stages: dict[str, float] = {}
    start = time.perf_counter()

    def stage_done(name: str) -> None:
        nonlocal start
        stages[name] = time.perf_counter() - start
        start = time.perf_counter()

    say("loading checkpoint")
    payload = read_checkpoint(checkpoint_path)
    model = build_model(payload, checkpoint_path)
    fingerprint = base_fingerprint(payload["base"])
    adapter = adapter_tensors(model)
    if not merge and not adapter:
        raise ExportError(f"{checkpoint_path}: has no LoRA layers (r = 0): export it merged")
    stage_done("load")

    say(f"exporting ({form}, opset {opset}) with torch.onnx dynamo")
    proto, layer_names = trace_to_onnx(model, form, opset)
    nodes_exported = len(proto.graph.node)
    stage_done("export")

    say("checking (onnx.checker, shape inference)")
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    stage_done("check")

    simplified, note = False, "simplification skipped (--no-simplify)"
    if simplify_graph:
        say("simplifying with onnxslim")
        proto, simplified, note = simplify(proto, model.config)
        stage_done("simplify")

    strip_debug_info(proto)
    if form is Form.ADAPTERS:
        add_rank0_defaults(proto)
    set_metadata(proto, {
        "version": __version__,
        "form": form.value,
        "opset": str(opset),
        "attention": attention_kernels(proto),
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "base_sha256": fingerprint,
        "model_config": json.dumps(payload["config"], sort_keys=True),
        "lora_config": json.dumps({
            "r": model.config.r, "lora_alpha": model.config.lora_alpha, "lora_targets": model.config.lora_targets,
            "use_rslora": model.config.use_rslora, "merged": merge, "lora_layers": layer_names,
        }, sort_keys=True),
    })
    onnx.checker.check_model(proto, full_check=True)

    say(f"writing {output}" + (f" and {adapter_out}" if adapter_out is not None else ""))
    try:
        with staged_outputs() as stage:  # model, data and adapter land together or not at all
            external = write_model_files(proto, output, stage, external_data_threshold)
            if adapter_out is not None:
                write_adapter(adapter_out, adapter, model_version_from_fingerprint(fingerprint), stage)
    except OSError as err:
        raise ExportError(f"{err.filename or output}: cannot write: {err.strerror or first_line(err)}") from None
    stage_done("save")

    return ExportResult(
        model_path=output, adapter_path=adapter_out, form=form, opset=opset, nodes_exported=nodes_exported,
        nodes_final=len(proto.graph.node), simplified=simplified, simplify_note=note,
        parameters=count_parameters_onnx(proto), file_size=model_file_size(output), external_data=external,
        stage_seconds=stages,
    )


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model's graph (not its external weights). Raises ExportError with one line."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX model: {first_line(err)}") from None
    if not model.graph.node or not model.graph.output:  # e.g. an empty file parses as an empty model
        raise ExportError(f"{path}: not an ONNX model (no graph)")
    return model


def check_adapter_file(model_path: str | os.PathLike, adapter_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """check_adapter() on files, plus the base check (the adapter's model version must match the model's base),
    then, when nothing is wrong, a real ONNX Runtime run of the model with the adapter active.

    Returns (errors, notes); raises ExportError / AdapterError if a file cannot be read or fails its integrity
    record.
    """
    model_path, adapter_path = Path(model_path), Path(adapter_path)
    model = load_onnx(model_path)
    tensors, model_version = read_adapter(adapter_path)
    errors, notes = check_adapter(model, tensors)
    base = read_metadata(model).get("base_sha256")
    if base is not None and model_version != model_version_from_fingerprint(base):
        errors.insert(0, f"model version {model_version} != {model_version_from_fingerprint(base)}: "
                         "the adapter was written for another base model")
    if not adapter_record_path(adapter_path).is_file():
        notes.append(f"{adapter_path.name} has no integrity record ({adapter_record_path(adapter_path).name}): "
                     "its tensor bytes could not be verified")
    if not errors:
        problem = run_adapter(model_path, adapter_path)
        if problem:
            errors.append(problem)
    return errors, notes


def export_adapter(
    checkpoint_path: str | os.PathLike, model_path: str | os.PathLike, output_path: str | os.PathLike | None = None
) -> Path:
    """Write only the adapter of another checkpoint on the same base, for an adapters-as-inputs model.

    Refuses (ExportError) a checkpoint whose base-weights fingerprint differs from the model's, or whose
    LoRA tensors do not fit the model's inputs (every mismatch named). Returns the adapter path.
    """
    output = Path(output_path) if output_path is not None else default_adapter_path(checkpoint_path)
    check_output_path(output, ".onnx_adapter")
    try:
        check_outputs(model_files(adapter_path=output), [checkpoint_path, *model_files(Path(model_path))])
    except OutputError as err:
        raise ExportError(str(err)) from None
    model = load_onnx(model_path)
    metadata = read_metadata(model)
    if metadata.get("form") != Form.ADAPTERS:
        raise ExportError(f"{model_path}: not an adapters-as-inputs model (exported with --merge?)")
    payload = read_checkpoint(checkpoint_path)
    fingerprint = base_fingerprint(payload["base"])
    if fingerprint != metadata.get("base_sha256"):
        raise ExportError(f"{checkpoint_path}: its base weights differ from the base of {model_path} "
                          f"(fingerprint {fingerprint[:12]} != {metadata.get('base_sha256', '?')[:12]})")
    tensors = adapter_tensors(build_model(payload, checkpoint_path))
    if not tensors:
        raise ExportError(f"{checkpoint_path}: has no LoRA weights (r = 0)")
    errors, _ = check_adapter(model, tensors)
    if errors:
        raise ExportError(f"{checkpoint_path}: adapter does not fit {model_path}: " + "; ".join(errors))
    try:
        with staged_outputs() as stage:
            write_adapter(output, tensors, model_version_from_fingerprint(fingerprint), stage)
    except OSError as err:
        raise ExportError(f"{output}: cannot write: {err.strerror or first_line(err)}") from None
    return output
