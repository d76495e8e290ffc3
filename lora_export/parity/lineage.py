"""Lineage: does an exported model (and an adapter file) come from a given checkpoint?

Checked before anything runs, from the ``lora_export.*`` metadata the exporter writes (form, model config,
base-weights fingerprint) and the graph interface; a mismatch is one ``ParityInputError`` line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..errors import ParityInputError
from ..export.adapters import (
    ADAPTER_IDS,
    adapter_tensors,
    check_adapter,
    model_version_from_fingerprint,
    read_adapter,
)
from ..export.tracing import INPUT_NAMES, OUTPUT_NAMES
from ..files import file_sha256, parse_json
from ..layout import Form
from ..model.checkpoint import base_fingerprint
from ..model.transformer import VOCAB_SIZE, LoRATransformerLM
from ..tolerance import deviation

REQUIRED_METADATA = ("form", "base_sha256", "model_config")
#: The config fields of the LoRA alone: an adapters-as-inputs graph does not depend on them (any adapter on the
#: same base runs on it), so a second adapter's checkpoint may differ there.
LORA_FIELDS = ("r", "lora_alpha", "lora_targets", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern")
#: Config fields added after the first exports, with the value older metadata implies.
LATER_FIELDS = {"rank_pattern": {}, "alpha_pattern": {}}


def _comparable(config: dict, form: Form) -> dict:
    """A stored model config as validation compares it: later fields filled in, LoRA fields left out for the
    adapters and slots forms."""
    config = {**LATER_FIELDS, **config}
    return {k: v for k, v in config.items() if k not in LORA_FIELDS} if form is not Form.MERGED else config


# --------------------------------------------------------------------------- inputs


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_metadata(metadata: dict[str, str], payload: dict, model_path: Path, checkpoint_path: Path) -> Form:
    """The model's form, once its lora_export metadata (form, model_config, base fingerprint) matches the
    checkpoint; raises ParityInputError otherwise."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ParityInputError(f"{model_path}: no lora_export metadata ({', '.join(missing)} missing): "
                               "validate checks models written by `lora-export`")
    if metadata["form"] not in {f.value for f in Form}:
        raise ParityInputError(f"{model_path}: unknown lora_export.form {metadata['form']!r}, expected one of "
                               f"{tuple(f.value for f in Form)}")
    form = Form(metadata["form"])
    mismatch = f"{model_path} and {checkpoint_path} do not belong together"
    try:
        model_config = parse_json(metadata["model_config"], f"{model_path}: lora_export.model_config")
    except ValueError as err:
        raise ParityInputError(str(err)) from None
    if not isinstance(model_config, dict):
        raise ParityInputError(f"{model_path}: lora_export.model_config is not a JSON object")
    ours, theirs = _comparable(model_config, form), _comparable(payload["config"], form)
    if ours != theirs:
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        detail = ", ".join(f"{k} (model {ours.get(k)!r}, checkpoint {theirs.get(k)!r})" for k in keys[:3])
        raise ParityInputError(f"{mismatch}: model config differs in {detail}")
    if metadata["base_sha256"] != base_fingerprint(payload["base"]):
        raise ParityInputError(f"{mismatch}: the model was exported from different base weights (base_sha256)")
    return form


def _check_interface(proto: onnx.ModelProto, form: Form, decoder: bool, model_path: Path) -> None:
    """Raise ParityInputError unless the graph has input_ids / attention_mask int64 [batch, seq] with a dynamic
    seq axis, logits [batch, seq, 256], LoRA inputs exactly in the adapters form and no other required input
    (a KV-cache ``decoder`` also takes position_ids and its cache)."""
    graph_inputs = {value.name: value for value in proto.graph.input}
    initializers = {init.name for init in proto.graph.initializer}
    for name in INPUT_NAMES:
        value = graph_inputs.get(name)
        if value is None:
            raise ParityInputError(f"{model_path}: graph input {name!r} is missing")
        dims = _dims(value)
        if value.type.tensor_type.elem_type != onnx.TensorProto.INT64 or len(dims) != 2:
            raise ParityInputError(f"{model_path}: graph input {name!r} must be int64 [batch, seq], got {dims}")
        if isinstance(dims[1], int) and dims[1] > 0:
            raise ParityInputError(f"{model_path}: graph input {name!r} has a fixed sequence length {dims[1]}; "
                                   "validate needs the dynamic seq axis lora-export writes")
    outputs = {value.name: _dims(value) for value in proto.graph.output}
    logits = outputs.get(OUTPUT_NAMES[0])
    if logits is None or len(logits) != 3 or logits[2] not in (VOCAB_SIZE, "", 0):
        raise ParityInputError(f"{model_path}: expected output 'logits' [batch, seq, {VOCAB_SIZE}], got {outputs}")
    lora_inputs = [name for name in graph_inputs if name.endswith((".lora_A", ".lora_B"))]
    if (form is not Form.MERGED) != bool(lora_inputs):
        raise ParityInputError(f"{model_path}: lora_export.form is '{form}' but the graph has "
                               f"{len(lora_inputs)} LoRA inputs")
    slot_inputs = [ADAPTER_IDS] if form is Form.SLOTS else []
    if slot_inputs and ADAPTER_IDS not in graph_inputs:
        raise ParityInputError(f"{model_path}: lora_export.form is 'slots' but the graph has no {ADAPTER_IDS} input")
    extra = sorted(set(graph_inputs) - set(INPUT_NAMES) - set(lora_inputs) - set(slot_inputs) - initializers)
    if decoder:  # the KV-cache decoder's position and cache inputs
        extra = [name for name in extra if name != "position_ids" and not name.startswith("past_key_values.")]
    if extra:
        raise ParityInputError(f"{model_path}: unexpected required graph inputs {extra[:3]}")


def check_model_matches(proto: onnx.ModelProto, metadata: dict[str, str], payload: dict, model_path: Path,
                        checkpoint_path: Path) -> list[str]:
    """Refuse (ParityInputError) a model that the checkpoint did not produce; return notes for the report.

    Checks the lora_export metadata (form, model_config, base weights fingerprint) against the checkpoint,
    then the graph interface: input_ids / attention_mask int64 [batch, seq] with a dynamic seq axis, logits
    [batch, seq, 256], LoRA inputs present exactly in the adapter form, no other required input.
    ``metadata``: the model's lora_export.* metadata_props (``export.onnx_files.read_metadata``).
    """
    form = _check_metadata(metadata, payload, model_path, checkpoint_path)
    _check_interface(proto, form, metadata.get("graph") == "decoder", model_path)
    notes = []
    recorded = metadata.get("checkpoint_sha256")
    if recorded is not None and recorded != file_sha256(checkpoint_path):
        notes.append(f"{checkpoint_path.name} is not the file the model was exported from (checkpoint_sha256 "
                     "differs); base weights and config match" + (", but merged LoRA weights may differ"
                                                                  if form is Form.MERGED else ""))
    return notes


def adapter_weight_mismatches(adapter: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> list[str]:
    """Where an adapter file's tensors differ from a checkpoint's trained LoRA (``adapters.adapter_tensors``, the
    same graph layout with scaling folded into B), one line per layer; [] when the file holds exactly those weights.
    """
    problems = []
    for name in sorted(set(adapter) | set(trained)):
        layer = name.rsplit(".", 1)[0]
        if name not in trained:
            problems.append(f"layer {layer}: the adapter has {name}, the checkpoint has no LoRA there")
        elif name not in adapter:
            problems.append(f"layer {layer}: the checkpoint's trained {name} is not in the adapter")
        elif adapter[name].shape != trained[name].shape:
            problems.append(f"layer {layer}: {name} is {list(adapter[name].shape)} in the adapter, "
                            f"{list(trained[name].shape)} in the checkpoint")
        elif not (measured := deviation(adapter[name], trained[name], atol=1e-7, rtol=1e-6)).passed:
            problems.append(f"layer {layer}: {name} differs from the checkpoint's (max |diff| {measured.max_abs:.3g})")
    return list(dict.fromkeys(problems))


def adapter_lineage(adapter_path: Path, adapter: dict[str, np.ndarray], model: LoRATransformerLM,
                    checkpoint_path: Path) -> tuple[list[str], list[str]]:
    """(failures, notes) of holding the adapter file at ``adapter_path`` (its tensors ``adapter``) against
    ``model``'s trained LoRA (the checkpoint at ``checkpoint_path``): one failure per differing layer, naming that
    file. A checkpoint without LoRA has nothing to hold it against: no failure, a note that the file itself is the
    reference."""
    trained = adapter_tensors(model)
    if not trained:
        return [], [f"{checkpoint_path.name} has no LoRA: the adapter file itself is the reference, its weights are "
                    "not tied to a checkpoint"]
    return [f"adapter {adapter_path.name} is not {checkpoint_path.name}'s trained LoRA: {problem}"
            for problem in adapter_weight_mismatches(adapter, trained)], []


def load_adapter_for(adapter_path: Path, proto: onnx.ModelProto, metadata: dict[str, str]
                     ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read an .onnx_adapter and hold it against the model before any run; returns (tensors, notes). Raises
    AdapterError for a file that cannot be read, ParityInputError for an adapter that does not fit the model."""
    if metadata["form"] == Form.MERGED:
        raise ParityInputError(f"--adapter needs an adapter-form model; this one was exported {metadata['form']}")
    tensors, version = read_adapter(adapter_path)
    errors, notes = check_adapter(proto, tensors)
    expected = model_version_from_fingerprint(metadata["base_sha256"])
    if version != expected:
        errors.append(f"written for a different base model (model version {version}, this model is {expected})")
    if errors:
        raise ParityInputError(f"{adapter_path}: adapter does not fit the model: {'; '.join(errors)}")
    return tensors, notes


