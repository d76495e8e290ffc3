"""Export a lora-export checkpoint to ONNX, merged, with the LoRA adapters as graph inputs or in adapter slots (each
batch row its own adapter, ``export.slots``); write or check the adapter of another checkpoint (or a pack) for an
exported model. The adapter and slots forms take LoRA inputs on the checkpoint's LoRA layers or on a superset
(``lora_layers``: every adaptable layer, or the union of several checkpoints' targets), so one graph takes any
adapter whose layers are among them; the layers an adapter leaves out run as the base.

Pipeline (both forms): load checkpoint -> build the export module -> torch.onnx.export (dynamo) with
dynamic batch and sequence axes -> onnx.checker + shape inference -> onnxslim (``export.simplify``: kept only if it
shrinks the graph, keeps its interface, checks and gives the same outputs on ONNX Runtime) -> metadata_props ->
atomic save (external data above a threshold) -> in the adapter form, the trained adapter as an ``.onnx_adapter``
file. A model above the threshold (or protobuf's 2 GB) is never serialized whole in memory: no onnxslim (the
summary says why), its weights written to external data first, then shape inference and the checker run on the
file (``onnx_files.check_model_file``). The steps it shares with the genai decoder export live in
``export.core``, the file I/O in ``export.onnx_files``.

Graph interface: ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, seq] (1 = real
token) -> ``logits`` float32 [batch, seq, 256]. The adapter form adds the LoRA inputs described in
``export.adapters``; the slots form ``adapter_ids`` int64 [batch] and those inputs stacked in slots.

From opset 23 on (the default) the global softmax heads are one ONNX ``Attention`` node each, ONNX Runtime's
fused kernel (``model.attention.fused_attention``); the local heads stay blockwise (O(N * w)), linear global
heads decomposed. Below opset 23 the exporter decomposes every head. ``lora_export.attention`` metadata records
which.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import ExportError
from ..files import StagedOutputs, check_outputs
from ..layout import Form, adapter_record_path, default_adapter_path, default_output_path, model_files
from ..progress import SILENT, Progress
from .adapters import (
    ADAPTER_IDS,
    base_layers_note,
    check_adapter,
    lora_input_specs,
    model_version_from_fingerprint,
    read_adapter,
    run_adapter,
    run_probe,
    write_adapter,
)
from .core import (
    ExportSource,
    check_opset,
    export_metadata,
    finish_graph,
    graph_lora_layers,
    serialize_traced,
    staged_export,
    write_companions,
)
from .onnx_files import (
    EXTERNAL_DATA_THRESHOLD,
    check_suffix,
    count_parameters_onnx,
    load_onnx,
    model_file_size,
    read_metadata,
    set_metadata,
    write_model_files,
)
from .simplify import simplify
from .slots import check_pack, is_pack, read_pack, single_pack, slot_feeds
from .tracing import DEFAULT_OPSET, trace_to_onnx


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


def export_outputs(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
                   form: Form = Form.MERGED, adapter_path: str | os.PathLike | None = None
                   ) -> tuple[Path, Path | None]:
    """(model path, adapter path or None) that ``export_onnx`` writes with these arguments, suffixes checked.

    The files they stand for (``model_files``) are checked by ``export_onnx`` itself, before it starts.
    """
    output = Path(output_path) if output_path is not None else default_output_path(checkpoint_path, form)
    check_suffix(output, ".onnx")
    if form is Form.MERGED:
        if adapter_path is not None:
            raise ExportError("an adapter output only applies to the adapters-as-inputs form (merge=False)")
        return output, None
    adapter_out = Path(adapter_path) if adapter_path is not None else default_adapter_path(output)
    check_suffix(adapter_out, ".onnx_adapter")
    return output, adapter_out


class _StageClock:
    """Seconds per named stage of an export, each measured from the end of the one before."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._start
        self._start = now


def export_onnx(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    merge: bool = True,
    form: Form | None = None,
    lora_layers: Sequence[str | os.PathLike] = (),
    adapter_path: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    simplify_graph: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    progress: Progress = SILENT,
    overwrite: bool = True,
) -> ExportResult:
    """Export a checkpoint to ONNX; the Python face of ``lora-export model.pt --merge``.

    merge=True folds scaling * B @ A into the base weights and exports a plain transformer graph.
    merge=False exports the adapters-as-inputs graph and writes the trained adapter to ``adapter_path``
    (default ``<output stem>.onnx_adapter``). ``form`` (when given, instead of ``merge``): ``Form.SLOTS`` exports
    the slots graph (``adapter_ids`` [batch] and stacked LoRA inputs: each row its own adapter, ``export.slots``)
    and writes the trained adapter as in the adapter form. ``lora_layers`` (adapter and slots forms): LoRA inputs
    also on these layers (``core.graph_lora_layers``: ``all``, ``lora_targets`` entries, checkpoints on the same
    base), which run as the base until an adapter feeds them. Every file it writes (``layout.model_files``) is
    checked before any work (``files.check_outputs``; one that exists is replaced only with ``overwrite``). Raises
    CheckpointError / ExportError / OutputError with one line.
    """
    say = progress.stage
    check_opset(opset)
    checkpoint_path, form = Path(checkpoint_path), Form.of(merge) if form is None else form
    if lora_layers and form is Form.MERGED:
        raise ExportError("lora layers apply to a graph with LoRA inputs (--adapters-as-inputs, --adapter-slots), "
                          "not to the merged form")
    output, adapter_out = export_outputs(checkpoint_path, output_path, form=form, adapter_path=adapter_path)
    check_outputs(model_files(output, adapter_out), [checkpoint_path], overwrite=overwrite)
    clock = _StageClock()
    say("loading checkpoint")
    source = ExportSource.read(checkpoint_path)
    adapter = source.adapter(form)
    lora_paths = graph_lora_layers(source, lora_layers)
    clock.done("load")
    with staged_export(output) as stage:
        proto, layer_names, nodes_exported, too_big = _traced_graph(source, form, opset, lora_paths, output, stage,
                                                                    external_data_threshold, progress, clock)
        proto, simplified, note = _simplified(proto, source, simplify_graph, too_big, say, clock)
        finish_graph(proto, form)
        _set_lora_metadata(proto, source, form, opset, layer_names)
        if not too_big:
            onnx.checker.check_model(proto, full_check=True)
        say(f"writing {output}" + (f" and {adapter_out}" if adapter_out is not None else "")
            + (", then checking it (onnx.checker, shape inference)" if too_big else ""))
        external = write_model_files(proto, output, stage, external_data_threshold, on_file=bool(too_big))
        write_companions(stage, source, adapter=None if adapter_out is None else (adapter_out, adapter))
    clock.done("save")
    return ExportResult(
        model_path=output, adapter_path=adapter_out, form=form, opset=opset, nodes_exported=nodes_exported,
        nodes_final=len(proto.graph.node), simplified=simplified, simplify_note=note,
        parameters=count_parameters_onnx(proto), file_size=model_file_size(output), external_data=external,
        stage_seconds=clock.seconds,
    )


def _set_lora_metadata(proto: onnx.ModelProto, source: ExportSource, form: Form, opset: int,
                       layer_names: list[str]) -> None:
    """The scoring graph's metadata (``core.export_metadata``) with the checkpoint's LoRA settings and the graph's
    LoRA input layers."""
    config = source.model.config
    set_metadata(proto, export_metadata(proto, source, form, opset, {
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_targets": config.lora_targets,
        "use_rslora": config.use_rslora, "lora_layers": layer_names}))


def _traced_graph(source: ExportSource, form: Form, opset: int, lora_paths: list[str] | None, output: Path,
                  stage: StagedOutputs, external_data_threshold: int, progress: Progress, clock: _StageClock
                  ) -> tuple[onnx.ModelProto, list[str], int, str]:
    """The scoring graph of ``source`` in ``form`` with LoRA inputs on ``lora_paths`` (None: the checkpoint's LoRA
    layers): (proto, its LoRA layer names, its node count as exported, why it is too big for memory or ''). One
    that fits is checked here (strict shape inference, full onnx.checker); one too big has its weights written into
    ``stage`` already (``core.serialize_traced``) and is checked as a file once written
    (``onnx_files.check_model_file``)."""
    progress.stage(f"exporting ({form}, opset {opset}) with torch.onnx dynamo")
    traced = trace_to_onnx(source.model, form, opset, lora_paths)
    clock.done("export")
    proto, too_big = serialize_traced(traced, output, stage, external_data_threshold, progress)
    layer_names, nodes_exported = traced.layer_names, len(proto.graph.node)
    del traced  # the exporter's graph and its own copies of folded constants, before anything else is built
    if too_big:
        clock.done("write weights")
        return proto, layer_names, nodes_exported, too_big
    progress.stage("checking (onnx.checker, shape inference)")
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    clock.done("check")
    return proto, layer_names, nodes_exported, ""


def _simplified(proto: onnx.ModelProto, source: ExportSource, simplify_graph: bool, too_big: str,
                say: Callable[[str], None], clock: _StageClock) -> tuple[onnx.ModelProto, bool, str]:
    """(model to ship, simplified?, note): onnxslim when asked for (``export.simplify``), unless the model is
    ``too_big`` (the reason; '' when it fits): onnxslim and its ORT comparison would hold whole copies of it."""
    if not simplify_graph:
        return proto, False, "simplification skipped (--no-simplify)"
    if too_big:
        return proto, False, f"simplification skipped: {too_big}"
    say("simplifying with onnxslim")
    shipped = simplify(proto, source.model.config)
    clock.done("simplify")
    return shipped


def check_adapter_file(model_path: str | os.PathLike, adapter_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """check_adapter() on files (a pack of adapters: ``slots.check_pack``), plus the base check (the adapter's
    model version must match the model's base), then, when nothing is wrong, a real ONNX Runtime run of the model:
    with the adapter active (adapter form), or in slot 1 beside the base (slots form; a pack: each slot one row).

    Returns (errors, notes); the notes name the layers with LoRA inputs the adapter leaves out, which run as the
    base. Raises ExportError / AdapterError if a file cannot be read or fails its integrity record.
    """
    model_path, adapter_path = Path(model_path), Path(adapter_path)
    model = load_onnx(model_path)
    pack = read_pack(adapter_path) if is_pack(adapter_path) else None
    if pack is not None:
        errors, notes = check_pack(model, pack)
    else:
        tensors, model_version = read_adapter(adapter_path)
        errors = check_adapter(model, tensors)[0]
        note = base_layers_note(model, tensors)
        notes = [] if note is None else [note]
        base = read_metadata(model).get("base_sha256")
        if base is not None and model_version != model_version_from_fingerprint(base):
            errors.insert(0, f"model version {model_version} != {model_version_from_fingerprint(base)}: "
                             "the adapter was written for another base model")
        if ADAPTER_IDS in {value.name for value in model.graph.input}:
            pack = single_pack(tensors, model_version)
    if not adapter_record_path(adapter_path).is_file():
        notes.append(f"{adapter_path.name} has no integrity record ({adapter_record_path(adapter_path).name}): "
                     "its tensor bytes could not be verified")
    if not errors:
        problem = run_adapter(model_path, adapter_path) if pack is None else run_probe(
            model_path, lora_feeds=slot_feeds(model, pack).feeds(range(pack.size), pack.size), batch=pack.size)
        if problem:
            errors.append(problem)
    return errors, notes


def export_adapter(checkpoint_path: str | os.PathLike, model_path: str | os.PathLike,
                   output_path: str | os.PathLike | None = None, *, overwrite: bool = True) -> Path:
    """Write only the adapter of another checkpoint on the same base, for an adapters-as-inputs or slots model.

    The checkpoint's LoRA layers must be a subset of the model's LoRA inputs (the others run as the base; a graph
    exported with ``lora_layers`` takes more than its checkpoint's own). Its files (adapter and integrity record)
    are checked before any work (``files.check_outputs``: they must not replace the checkpoint or the model; one
    that exists is replaced only with ``overwrite``). Refuses (ExportError) a checkpoint whose base-weights
    fingerprint differs from the model's, or whose LoRA tensors do not fit the model's inputs (every mismatch
    named). Returns the adapter path.
    """
    output = Path(output_path) if output_path is not None else default_adapter_path(checkpoint_path)
    check_suffix(output, ".onnx_adapter")
    check_outputs(model_files(adapter_path=output), [checkpoint_path, *model_files(Path(model_path))],
                  overwrite=overwrite)
    model = load_onnx(model_path)
    metadata = read_metadata(model)
    if metadata.get("form") not in (Form.ADAPTERS, Form.SLOTS):
        raise ExportError(f"{model_path}: not an adapters-as-inputs or slots model (exported with --merge?)")
    source = ExportSource.read(Path(checkpoint_path))
    if source.fingerprint != metadata.get("base_sha256"):
        raise ExportError(f"{checkpoint_path}: its base weights differ from the base of {model_path} "
                          f"(fingerprint {source.fingerprint[:12]} != {metadata.get('base_sha256', '?')[:12]})")
    tensors = source.adapter(Form.ADAPTERS)
    missing = sorted({name.rsplit(".", 1)[0] for name in set(tensors) - set(lora_input_specs(model))})
    if missing:
        raise ExportError(f"{checkpoint_path}: has LoRA on layers that are not LoRA inputs of {model_path}: "
                          f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''} (export the model with "
                          "--lora-layers all, or --lora-layers naming this checkpoint)")
    errors, _ = check_adapter(model, tensors)
    if errors:
        raise ExportError(f"{checkpoint_path}: adapter does not fit {model_path}: " + "; ".join(errors))
    with staged_export(output) as stage:
        write_adapter(output, tensors, model_version_from_fingerprint(source.fingerprint), stage)
    return output
