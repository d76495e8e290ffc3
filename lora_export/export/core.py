"""The steps every export of a checkpoint shares, whatever graph it traces (the scoring graph of
``export.convert``, the KV-cache decoder of ``genai.decoder``):

0. refuse an opset the exporter cannot write (``check_opset``), before anything else;
1. read the checkpoint, build its model and fingerprint its base weights (``ExportSource.read``);
2. take its trained adapter, refusing the adapters-as-inputs form of a checkpoint without LoRA layers
   (``ExportSource.adapter``), before tracing (the merged form folds the LoRA into the model), and the layers the
   graph gets LoRA inputs on (``graph_lora_layers``: its own, or a superset such as every adaptable layer);
3. after tracing: drop per-node debug information and, in the adapter and slots forms, give every LoRA input its
   rank-0 default (``finish_graph``);
4. the ``lora_export.*`` metadata every export carries (``export_metadata``);
5. serialize the traced graph (``serialize_traced``): in memory when it fits, or, for a model too big for memory,
   its weights written straight from the torch tensors to external data in the stage, the graph read back
   without them;
6. write model (+ external data), companion files and the adapter together or not at all, a failed write raising
   one ExportError line (``write_export`` inside ``staged_export``); a model too big for memory is checked there,
   as a file, instead of in memory after tracing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import __version__
from ..errors import ExportError, first_line
from ..files import StagedOutputs, file_sha256, staged_outputs
from ..layout import Form, data_path_of
from ..model.checkpoint import CHECKPOINT_SUFFIXES, base_fingerprint, build_model, checkpoint_dtype, read_checkpoint
from ..model.layers import lora_layers
from ..model.transformer import (
    LoRATransformerLM,
    ModelConfig,
    adaptable_module_paths,
    lora_module_paths,
    resolve_targets,
)
from ..progress import Progress
from .adapters import adapter_tensors, model_version_from_fingerprint, write_adapter
from .onnx_files import (
    PROTOBUF_LIMIT,
    attention_kernels,
    size_text,
    strip_debug_info,
    weights_too_big_for_memory,
)
from .tracing import TracedGraph, add_rank0_defaults

#: The ONNX opsets an export may target: the dynamo exporter needs 18 or newer; 23 is the newest it writes.
MIN_OPSET, MAX_OPSET = 18, 23
#: The ``graph_lora_layers`` entry for every adaptable layer.
ALL_LAYERS = "all"


def check_opset(opset: int) -> None:
    """Refuse (ExportError, one line) an opset outside MIN_OPSET..MAX_OPSET; every export calls it before any
    work, output checks included."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} "
                          f"(the dynamo exporter needs >= {MIN_OPSET})")


@dataclass
class ExportSource:
    """A checkpoint read for export: its path, its model config (a dict), the model built from it (fp32 whatever
    the checkpoint stores), the fingerprint of its base weights (which ties adapters to the base) and the dtype its
    weights are stored in (``checkpoint_dtype``: 'fp32', 'bf16', ...)."""

    path: Path
    config: dict[str, Any]
    model: LoRATransformerLM
    fingerprint: str
    dtype: str

    @classmethod
    def read(cls, path: Path) -> ExportSource:
        """Read and build ``path``; the checkpoint dict itself is not kept (its tensors are the model's, or for a
        bf16 / fp16 checkpoint the stored ones, freed once cast). Raises CheckpointError (one line)."""
        payload = read_checkpoint(path)
        fingerprint, dtype = base_fingerprint(payload["base"]), checkpoint_dtype(payload)
        return cls(path, payload["config"], build_model(payload, path), fingerprint, dtype)

    def adapter(self, form: Form) -> dict[str, np.ndarray]:
        """The trained adapter the ``form`` ships (graph layout, ``adapter_tensors``): none when merged. Raises
        ExportError for the adapter form of a checkpoint without LoRA layers. Call it before tracing."""
        if form is Form.MERGED:
            return {}
        tensors = adapter_tensors(self.model)
        if not tensors:
            raise ExportError(f"{self.path}: has no LoRA layers (r = 0): export it merged")
        return tensors


def finish_graph(proto: onnx.ModelProto, form: Form) -> None:
    """Make a traced graph what lora-export ships: no per-node debug information (``strip_debug_info``) and, in
    the adapter and slots forms, a rank-0 default for every LoRA input (no adapter fed = the base model)."""
    strip_debug_info(proto)
    if form is not Form.MERGED:
        add_rank0_defaults(proto)


def graph_lora_layers(source: ExportSource, wanted: Sequence[str | os.PathLike]) -> list[str] | None:
    """The module paths an adapter- or slots-form graph of ``source`` gets LoRA inputs on, in module order: the
    checkpoint's own LoRA layers and those ``wanted`` names (``--lora-layers``); None when nothing is wanted (the
    checkpoint's own). Each entry is ``all`` (every adaptable layer), a checkpoint on the same base (its LoRA
    layers: a graph for the union of several checkpoints' targets) or a ``lora_targets`` entry (a group, module
    name, path or pattern). Raises ExportError or CheckpointError (one line)."""
    if not wanted:
        return None
    adaptable = adaptable_module_paths(source.model.config)
    chosen = {name for name, _ in lora_layers(source.model)}
    for entry in wanted:
        chosen.update(_wanted_layers(str(entry), adaptable, source))
    return [path for path in adaptable if path in chosen]


def _wanted_layers(entry: str, adaptable: list[str], source: ExportSource) -> list[str]:
    """The adaptable module paths one ``graph_lora_layers`` entry names."""
    if entry == ALL_LAYERS:
        return adaptable
    if Path(entry).suffix in CHECKPOINT_SUFFIXES:
        payload = read_checkpoint(Path(entry))
        if base_fingerprint(payload["base"]) != source.fingerprint:
            raise ExportError(f"{entry}: its base weights differ from those of {source.path}: its adapter could not "
                              "run on this graph")
        return lora_module_paths(ModelConfig.from_dict(payload["config"]))
    try:
        return resolve_targets([entry], adaptable)
    except ValueError as err:
        raise ExportError(first_line(err).replace("lora_targets:", "lora layers:", 1)) from None


def export_metadata(proto: onnx.ModelProto, source: ExportSource, form: Form, opset: int,
                    lora_config: Mapping[str, Any], **extra: str) -> dict[str, str]:
    """The ``lora_export.*`` entries of an exported graph (for ``set_metadata``): version, form, opset, attention
    kernels, checkpoint sha256, base fingerprint, model config, the checkpoint's stored dtype, ``lora_config``
    (``merged`` added) and ``extra``."""
    return {
        "version": __version__,
        "form": form.value,
        "opset": str(opset),
        "attention": attention_kernels(proto),
        "checkpoint_sha256": file_sha256(source.path),
        "base_sha256": source.fingerprint,
        "model_config": json.dumps(source.config, sort_keys=True),
        "checkpoint_dtype": source.dtype,
        "lora_config": json.dumps({**lora_config, "merged": form is Form.MERGED}, sort_keys=True),
        **extra,
    }


@contextlib.contextmanager
def staged_export(where: Path) -> Iterator[StagedOutputs]:
    """:func:`files.staged_outputs` for an export's files: an OSError while writing or moving them becomes one
    ExportError line naming the file (``where`` when the error names none), and nothing lands."""
    try:
        with staged_outputs() as stage:
            yield stage
    except OSError as err:
        raise ExportError(f"{err.filename or where}: cannot write: {err.strerror or first_line(err)}") from None


def serialize_traced(traced: TracedGraph, model_path: Path, stage: StagedOutputs, external_data_threshold: int,
                     progress: Progress) -> tuple[onnx.ModelProto, str]:
    """(the traced graph as a proto, why it is too big for memory or ''). One that fits: the whole model in memory.
    One too big (``weights_too_big_for_memory``): its weights written to ``<model>.data`` in ``stage`` straight
    from the torch tensors, and the graph without them (``TracedGraph.save_with_weights``);
    ``onnx_files.write_model_files(on_file=True)`` then saves that graph beside them and checks the file."""
    if not weights_too_big_for_memory(traced.weight_bytes, external_data_threshold):
        return traced.to_proto(), ""
    too_big = f"model above {size_text(min(external_data_threshold, PROTOBUF_LIMIT))}"
    data_path = data_path_of(model_path)
    progress.stage(f"{too_big}: writing its {size_text(traced.weight_bytes)} of weights to {data_path.name}")
    stage.path(data_path)
    return traced.save_with_weights(stage.path(model_path), progress), too_big


def write_companions(stage: StagedOutputs, source: ExportSource, *,
                     adapter: tuple[Path, Mapping[str, np.ndarray]] | None = None,
                     texts: Mapping[Path, str] | None = None) -> None:
    """Write into ``stage`` (opened with :func:`staged_export`: all land together or none) what goes beside the
    model (``onnx_files.write_model_files``): the ``texts`` files (UTF-8) and the ``adapter`` (path, tensors)
    with its integrity record."""
    for path, text in (texts or {}).items():
        stage.path(path).write_text(text, encoding="utf-8")
    if adapter is not None:
        adapter_path, tensors = adapter
        write_adapter(adapter_path, tensors, model_version_from_fingerprint(source.fingerprint), stage)
