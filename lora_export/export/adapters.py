"""LoRA adapters as ONNX graph inputs, in the layout ONNX Runtime's multi-LoRA API feeds.

For every LoRA layer at module path ``P`` the adapters-as-inputs graph has two inputs:

* ``P.lora_A``: float32 [in_features, P.lora_rank] = lora_A.T   (for the embedding: [256, P.lora_rank])
* ``P.lora_B``: float32 [P.lora_rank, out_features] = scaling * lora_B.T

so the layer computes ``x @ P.lora_A @ P.lora_B`` with no Transpose and no rank-dependent constant.
``P.lora_rank`` is a symbolic dimension of its own per layer, so layers may differ in rank, and each input also
has a same-named rank-0 initializer: a layer the adapter leaves out runs as the base, and a run with no adapter
is the base model. An adapter file (``.onnx_adapter``) holds exactly these named tensors, written with
``onnxruntime.AdapterFormat``; its model version is derived from the base-weights fingerprint. Beside it,
``<adapter>.json`` records the sha256 of every tensor (the format has no checksum of its own): reading the
adapter verifies it, so damaged bytes are refused naming the tensor.

A graph may have LoRA inputs on more layers than one adapter adapts (``--lora-layers``): the layers an adapter
leaves out run as the base (``base_layers``). The slots form (``export.slots``) stacks the same inputs with a
leading slot axis, ``P.lora_A`` [lora_slots, in, r] and ``P.lora_B`` [lora_slots, r, out], plus ``adapter_ids``
int64 [batch]; one adapter fits it as it fits the adapter form (``adapter_input_specs`` drops the slot axis).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..errors import AdapterError, first_line
from ..files import StagedOutputs, check_input_file, read_json, staged_outputs
from ..layout import adapter_record_path
from ..model.layers import LoRALayer, lora_layers
from .ort_session import quiet_session

ADAPTER_VERSION = 1
LORA_SUFFIXES = (".lora_A", ".lora_B")
RECORD_FORMAT = "lora-export-adapter-record"
#: The input of the slots form naming each batch row's adapter slot (int64 [batch]; 0 is the base).
ADAPTER_IDS = "adapter_ids"
#: The symbolic number of slots of every stacked LoRA input.
SLOTS_AXIS = "lora_slots"


def model_version_from_fingerprint(base_fingerprint: str) -> int:
    """A positive int31 tied to the base weights, stored as the adapter's model version."""
    return int(base_fingerprint[:7], 16)


def adapter_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The trained LoRA weights of ``model`` in graph layout (see module docstring), scaling folded into B."""
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().T.float().contiguous().numpy()
        tensors[f"{name}.lora_B"] = (layer.lora_B.detach() * layer.scaling).T.float().contiguous().numpy()
    return tensors


def rank_axis(layer_name: str) -> str:
    """The symbolic rank dimension of one layer's LoRA inputs: ``<layer path>.lora_rank``."""
    return f"{layer_name}.lora_rank"


def _array_sha256(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}|{list(array.shape)}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def adapter_record(tensors: Mapping[str, np.ndarray], model_version: int, slots: list[dict] | None = None) -> dict:
    """The integrity record of an adapter: versions and every tensor's dtype, shape and sha256; a pack's
    (``export.slots``) also lists its ``slots``."""
    record = {
        "format": RECORD_FORMAT,
        "adapter_version": ADAPTER_VERSION,
        "model_version": model_version,
        "tensors": {name: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a)), "sha256": _array_sha256(a)}
                    for name, a in sorted(tensors.items())},
    }
    return record if slots is None else {**record, "slots": slots}


def write_adapter(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], model_version: int,
                  stage: StagedOutputs | None = None, slots: list[dict] | None = None) -> None:
    """Write ``tensors`` as an ``.onnx_adapter`` file and its integrity record ``<adapter>.json`` (with ``slots``
    for a pack of adapters, ``export.slots``).

    Both land together or not at all: in ``stage`` when given (moved in with the rest of its files), else in a
    stage of their own. ONNX Runtime's own write errors (RuntimeError, e.g. on a full disk) become OSError.
    """
    if stage is None:
        with staged_outputs() as own_stage:
            write_adapter(path, tensors, model_version, own_stage, slots)
        return
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(ADAPTER_VERSION)
    adapter.set_model_version(model_version)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    try:
        adapter.export_adapter(str(stage.path(path)))
    except RuntimeError as err:  # ORT reports a failed write as RuntimeError
        raise OSError(f"ONNX Runtime could not write the adapter: {_ort_message(err)}") from None
    record = json.dumps(adapter_record(tensors, model_version, slots), indent=1, sort_keys=True) + "\n"
    stage.path(adapter_record_path(path)).write_text(record, encoding="utf-8")


def _ort_message(err: BaseException) -> str:
    """ONNX Runtime's first message line without its C++ source location."""
    return re.sub(r"^\S+\.cc:\d+ .*?\) ", "", first_line(err))


def _verify_record(path: Path, tensors: Mapping[str, np.ndarray], model_version: int) -> None:
    """Hold the adapter's tensors against its integrity record, when it has one. Raises AdapterError."""
    record_path = adapter_record_path(path)
    if not (record_path.exists() or record_path.is_symlink()):
        return
    try:
        record = read_json(record_path)
    except ValueError as err:
        raise AdapterError(f"{first_line(err)} (the adapter's integrity record)") from None
    recorded = record.get("tensors") if isinstance(record, dict) else None
    if not isinstance(recorded, dict) or record.get("format") != RECORD_FORMAT:
        raise AdapterError(f"{record_path}: unreadable integrity record: not a lora-export adapter record")
    if record.get("model_version") != model_version:
        raise AdapterError(f"{path}: damaged or altered: model version {model_version} differs from its record "
                           f"({record_path.name})")
    for name in sorted(set(recorded) | set(tensors)):
        if name not in tensors or name not in recorded:
            raise AdapterError(f"{path}: damaged or altered: tensor {name[:80]} is "
                               f"{'missing from the adapter' if name not in tensors else 'not in its record'}")
        entry = recorded[name]
        if not isinstance(entry, dict) or entry.get("sha256") != _array_sha256(tensors[name]):
            raise AdapterError(f"{path}: damaged or altered: tensor {name} does not match its recorded sha256 "
                               f"({record_path.name})")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], int]:
    """(tensors by name, model version) of an ``.onnx_adapter`` file, verified against its integrity record
    when there is one. Raises AdapterError."""
    path = Path(path)
    check_input_file(path, what="adapter file", error=AdapterError)
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
        params = adapter.get_parameters()
        tensors = {k: np.array(v.numpy()) for k, v in params.items()}
        model_version = adapter.get_model_version()
    except Exception as err:  # ORT raises its own exception types for a malformed FlatBuffer
        raise AdapterError(f"{path}: not a readable .onnx_adapter file: {_ort_message(err)}") from None
    _verify_record(path, tensors, model_version)
    return tensors, model_version


def lora_input_specs(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """{input name: (onnx elem type, shape with symbolic dims as str)} of the LoRA graph inputs."""
    specs = {}
    for value in model.graph.input:
        if value.name.endswith(LORA_SUFFIXES):
            tensor_type = value.type.tensor_type
            dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor_type.shape.dim]
            specs[value.name] = (tensor_type.elem_type, dims)
    return specs


def adapter_input_specs(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """The shape one adapter's tensors must have for each LoRA input of ``model`` (``lora_input_specs``): the
    input's own in the adapter form, without its leading slot axis in the slots form (A [in, r], B [r, out])."""
    return {name: (elem_type, dims[1:] if dims[:1] == [SLOTS_AXIS] else dims)
            for name, (elem_type, dims) in lora_input_specs(model).items()}


def _layer_of(name: str) -> str:
    """``blocks.0.attn.to_q.lora_A`` -> ``blocks.0.attn.to_q``."""
    return name.rsplit(".", 1)[0]


def base_layers(model: onnx.ModelProto, tensors: Mapping[str, np.ndarray]) -> tuple[list[str], int]:
    """(the layers with LoRA inputs in ``model`` that ``tensors`` leave out, in graph order: they run as the base;
    how many layers have LoRA inputs)."""
    layers = list(dict.fromkeys(_layer_of(name) for name in lora_input_specs(model)))
    adapted = {_layer_of(name) for name in tensors}
    return [layer for layer in layers if layer not in adapted], len(layers)


def base_layers_note(model: onnx.ModelProto, tensors: Mapping[str, np.ndarray]) -> str | None:
    """One line naming the layers of ``model`` the adapter leaves out (``base_layers``), or None when it adapts
    every layer with LoRA inputs."""
    left_out, total = base_layers(model, tensors)
    if not left_out:
        return None
    shown = ", ".join(left_out[:12]) + (f", ... ({len(left_out) - 12} more)" if len(left_out) > 12 else "")
    return (f"{len(left_out)} of {total} LoRA layers are not in the adapter, so each runs without LoRA (as the "
            f"base): {shown}")


def check_tensors(specs: Mapping[str, tuple[int, list[int | str]]], tensors: Mapping[str, np.ndarray]) -> list[str]:
    """What is wrong with adapter ``tensors`` against input ``specs`` (``adapter_input_specs``): a name without an
    input, a dtype other than the input's, a fixed dimension that differs, a tensor of another rank (ndim), A
    and B of one layer with different ranks or without their pair, NaN or Inf."""
    errors = [f"{name}: holds NaN or Inf" for name in sorted(tensors)
              if tensors[name].dtype.kind == "f" and not np.isfinite(tensors[name]).all()]
    errors += [f"{name}: not an input of the model (extra name)" for name in sorted(set(tensors) - set(specs))]
    for name in sorted(set(tensors) & set(specs)):
        elem_type, dims = specs[name]
        array = tensors[name]
        expected_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        if array.dtype != expected_dtype:
            errors.append(f"{name}: dtype {array.dtype}, the model expects {np.dtype(expected_dtype)}")
        if array.ndim != len(dims):
            errors.append(f"{name}: shape {list(array.shape)} has {array.ndim} dims, the model expects {dims}")
            continue
        for axis, (size, want) in enumerate(zip(array.shape, dims, strict=True)):
            if isinstance(want, int) and want != size:
                errors.append(f"{name}: dim {axis} is {size}, the model expects {want} (shape {dims})")
    for a_name in sorted(n for n in tensors if n.endswith(".lora_A")):
        b_name = a_name[: -len(".lora_A")] + ".lora_B"
        a, b = tensors[a_name], tensors.get(b_name)
        if b is None:
            errors.append(f"{a_name}: its pair {b_name} is missing")
        elif a.ndim == b.ndim >= 2 and a.shape[-1] != b.shape[-2]:  # A [(S,) in, r], B [(S,) r, out]
            errors.append(f"{a_name}: rank {a.shape[-1]} differs from {b_name} rank {b.shape[-2]}")
    for b_name in sorted(n for n in tensors if n.endswith(".lora_B")):
        if b_name[: -len(".lora_B")] + ".lora_A" not in tensors:
            errors.append(f"{b_name}: its pair {b_name[: -len('.lora_B')]}.lora_A is missing")
    return errors


def check_adapter(model: onnx.ModelProto, tensors: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """Hold adapter tensors against a model's LoRA inputs (adapter or slots form) before any run.

    Returns (errors, notes). Errors: ``check_tensors``'s, or a model without LoRA inputs. Notes: model LoRA
    inputs the adapter leaves out (those layers run as the base model).
    """
    specs = adapter_input_specs(model)
    if not specs:
        return ["the model has no LoRA inputs (was it exported with --merge?)"], []
    notes = [f"{name}: not in the adapter; that layer runs without LoRA" for name in sorted(set(specs) - set(tensors))]
    return check_tensors(specs, tensors), notes


def attach_adapter(model: nn.Module, tensors: Mapping[str, np.ndarray] | None) -> None:
    """Run ``model`` as base + the given graph-layout adapter, as the ONNX graph would.

    Every LoRA-capable layer named by the adapter takes its A/B from ``tensors``; all other LoRA layers
    get rank-0 tensors (base behaviour), exactly like the graph's rank-0 defaults. ``None`` means no
    adapter: the pure base model.
    """
    tensors = dict(tensors or {})
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    unknown = sorted({n.rsplit(".", 1)[0] for n in tensors} - set(layers))
    if unknown:
        raise AdapterError(f"adapter names layers the model does not have: {unknown[:3]}")
    for name, layer in layers.items():
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None:
            a, b = np.zeros((layer.in_features, 0), np.float32), np.zeros((0, layer.out_features), np.float32)
        layer.use_external_lora(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b)))


def activate_adapters(*paths: str | os.PathLike) -> tuple[ort.RunOptions, list[ort.LoraAdapter]]:
    """RunOptions with the given ``.onnx_adapter`` files active, for ``session.run(None, feeds, run_options)``.

    ONNX Runtime keeps only a reference to each LoraAdapter: keep the returned adapters alive as long as
    the RunOptions is used, or the run reads freed memory.
    """
    run_options = ort.RunOptions()
    adapters = []
    for path in paths:
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        run_options.add_active_adapter(adapter)
        adapters.append(adapter)
    return run_options, adapters


def probe_inputs(session: ort.InferenceSession, batch: int = 1) -> dict[str, np.ndarray]:
    """Two bytes in each of ``batch`` rows for a session's inputs: input_ids and attention_mask, and for a KV-cache
    decoder (``--genai``) position_ids and an empty past (length 0) in each cache input's dtype; LoRA inputs (and
    a slots graph's adapter_ids) are the caller's."""
    ids = np.tile(np.array([[72, 105]], dtype=np.int64), (batch, 1))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(ids.shape[1], dtype=np.int64), (batch, 1))
        elif value.name.startswith("past_key_values."):  # [batch, heads, past, head_size]
            dtype = np.float16 if value.type == "tensor(float16)" else np.float32
            feeds[value.name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), dtype)
    return feeds


def run_probe(model_path: str | os.PathLike, adapter_paths: Sequence[str | os.PathLike] = (),
              lora_feeds: Mapping[str, np.ndarray] | None = None, batch: int = 1) -> str | None:
    """Run the model once on ONNX Runtime's CPU provider (``probe_inputs``: ``batch`` rows of a short input; a genai
    decoder from an empty cache) with ``adapter_paths`` active and ``lora_feeds`` fed; returns why it failed (one
    line), or None when it ran and gave finite logits."""
    try:
        session = quiet_session(model_path)
        run_options, _adapters = activate_adapters(*adapter_paths)
        logits = session.run(["logits"], {**probe_inputs(session, batch), **(lora_feeds or {})}, run_options)[0]
    except Exception as err:  # ORT raises its own exception types
        return f"ONNX Runtime cannot run the model with this adapter: {_ort_message(err)}"
    if not np.isfinite(logits).all():
        return "the model gives NaN or Inf logits with this adapter"
    return None


def run_adapter(model_path: str | os.PathLike, adapter_path: str | os.PathLike) -> str | None:
    """``run_probe`` of an adapters-as-inputs model (or genai decoder) with the adapter file active: why it failed
    (one line), or None."""
    return run_probe(model_path, adapter_paths=(adapter_path,))
