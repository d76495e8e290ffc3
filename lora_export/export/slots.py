"""Adapter packs: many ordinary adapters of one base stacked into the slots a slots-form graph takes, so that each
row of a batch runs with its own adapter in one run (BGMV, as vLLM / Punica serve many fine-tunes).

A pack is an ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``, as every adapter) holding, per LoRA layer P:

* ``P.lora_A``: float32 [S, in, r_max(P)], ``P.lora_B``: float32 [S, r_max(P), out]

where slot 0 is all zeros (the base) and slot i the i-th adapter packed; an adapter of smaller rank is zero-padded
to r_max (exact: the padded columns of A meet the padded rows of B), a layer an adapter leaves out is zeros. Its
integrity record (``<pack>.json``) also lists the slots: ``[{slot, name, file, sha256}]`` (slot 0: the base, no
file). A slots-form graph (``lora-export --adapter-slots``) takes the stacks as inputs beside ``adapter_ids`` int64
[batch]: row b computes with slot ``adapter_ids[b]``.

ONNX Runtime does not check ``adapter_ids`` as lora-export needs: a negative id is read from the end of the stack
(another adapter, silently), an id past it fails inside a Gather kernel on CPU and may read anything elsewhere,
and one id for a batch of many rows is broadcast to every row. ``SlotFeeds.feeds`` refuses each of them, one line,
before any run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import AdapterError
from ..files import check_outputs, file_sha256, read_json
from ..layout import adapter_record_path, model_files
from .adapters import (
    ADAPTER_IDS,
    adapter_input_specs,
    base_layers_note,
    check_adapter,
    check_tensors,
    lora_input_specs,
    model_version_from_fingerprint,
    read_adapter,
    write_adapter,
)
from .onnx_files import check_suffix, load_onnx, read_metadata
from .tracing import MAX_SLOTS

#: The name of slot 0, the base model (zeros in every stack).
BASE_SLOT = "base"
ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass
class Pack:
    """A pack of adapters (see the module docstring): its stacks by input name (``P.lora_A`` [S, in, r_max],
    ``P.lora_B`` [S, r_max, out]), its slot names (``names[0]`` is ``base``), the model version of their base,
    and where it was read from (None for one built in memory)."""

    tensors: dict[str, np.ndarray]
    names: list[str]
    model_version: int
    path: Path | None = None

    @property
    def size(self) -> int:
        """The number of slots S, the base included."""
        return len(self.names)

    def slot_ids(self, rows: Sequence[str | int]) -> np.ndarray:
        """adapter_ids int64 [len(rows)]: each row's slot, given by name or by index (0 is the base). Raises
        AdapterError (one line) for a name the pack does not have or an index outside 0..S-1."""
        index = {name: slot for slot, name in enumerate(self.names)}
        ids = []
        for row, slot in enumerate(rows):
            if isinstance(slot, str):
                if slot not in index:
                    raise AdapterError(f"row {row}: no slot named {slot[:80]!r} in {self.where} (slots: "
                                       f"{', '.join(self.names[:8])}{', ...' if self.size > 8 else ''})")
                slot = index[slot]
            if isinstance(slot, bool) or not isinstance(slot, int | np.integer) or not 0 <= slot < self.size:
                raise AdapterError(f"row {row}: adapter id {slot!r} is out of range: {self.where} has slots "
                                   f"0..{self.size - 1}")
            ids.append(int(slot))
        return np.array(ids, dtype=np.int64)

    @property
    def where(self) -> str:
        """The pack's path for messages ('the pack' for one built in memory)."""
        return "the pack" if self.path is None else str(self.path)


def stack_adapters(adapters: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The stacks of ``adapters`` (graph-layout tensors, A [in, r], B [r, out], scaling in B) as slots 1..n after
    a slot 0 of zeros: per layer, A [n + 1, in, r_max] and B [n + 1, r_max, out], smaller ranks and the layers an
    adapter leaves out zero-filled. The adapters must agree on each layer's in / out (``check_tensors``)."""
    layers = sorted({name.rsplit(".", 1)[0] for adapter in adapters for name in adapter})
    stacks = {}
    for layer in layers:
        a_name, b_name = f"{layer}.lora_A", f"{layer}.lora_B"
        having = [adapter for adapter in adapters if a_name in adapter]
        rank = max(adapter[a_name].shape[1] for adapter in having)
        size_in, size_out = having[0][a_name].shape[0], having[0][b_name].shape[1]
        a_stack = np.zeros((len(adapters) + 1, size_in, rank), np.float32)
        b_stack = np.zeros((len(adapters) + 1, rank, size_out), np.float32)
        for slot, adapter in enumerate(adapters, start=1):
            if a_name in adapter:
                r = adapter[a_name].shape[1]
                a_stack[slot, :, :r], b_stack[slot, :r, :] = adapter[a_name], adapter[b_name]
        stacks[a_name], stacks[b_name] = a_stack, b_stack
    return stacks


def _shared_specs(adapters: Sequence[Mapping[str, np.ndarray]]) -> dict[str, tuple[int, list[int | str]]]:
    """Input specs for holding adapters against each other without a model: float32, A [in, rank], B [rank, out]
    with in / out those of the first adapter that has the layer."""
    specs: dict[str, tuple[int, list[int | str]]] = {}
    for adapter in adapters:
        for name, array in adapter.items():
            if name not in specs and array.ndim == 2:
                dims = ["rank", array.shape[1]] if name.endswith(".lora_B") else [array.shape[0], "rank"]
                specs[name] = (onnx.TensorProto.FLOAT, dims)
    return specs


def _slots_model(model_path: str | os.PathLike) -> tuple[onnx.ModelProto, dict[str, str]]:
    """(graph, lora_export metadata) of a slots-form model; AdapterError (one line) for any other."""
    model = load_onnx(model_path)
    if ADAPTER_IDS not in {value.name for value in model.graph.input}:
        raise AdapterError(f"{model_path}: not a slots-form model (export it with --adapter-slots)")
    return model, read_metadata(model)


def _read_adapters(paths: Sequence[Path], model_path: str | os.PathLike | None) -> tuple[list[dict], int]:
    """(the tensors of each adapter file, their common model version), every problem refused before anything is
    written: a pack among them, adapters of different bases, tensors that do not fit the model (when given) or
    each other. Raises AdapterError (one line)."""
    adapters, versions = [], []
    for path in paths:
        tensors, version = read_adapter(path)
        if any(array.ndim != 2 for array in tensors.values()):
            raise AdapterError(f"{path}: a pack of adapters (stacked tensors), not one adapter")
        adapters.append(tensors)
        versions.append(version)
    for path, version in zip(paths, versions, strict=True):
        if version != versions[0]:
            raise AdapterError(f"{path}: written for another base than {paths[0]} (model version {version} != "
                               f"{versions[0]}): a pack holds adapters of one base")
    model, metadata = _slots_model(model_path) if model_path is not None else (None, {})
    if "base_sha256" in metadata and versions[0] != model_version_from_fingerprint(metadata["base_sha256"]):
        raise AdapterError(f"{paths[0]}: written for another base model than {model_path} (model version "
                           f"{versions[0]} != {model_version_from_fingerprint(metadata['base_sha256'])})")
    specs = _shared_specs(adapters)
    for path, tensors in zip(paths, adapters, strict=True):
        errors = check_adapter(model, tensors)[0] if model is not None else check_tensors(specs, tensors)
        if errors:
            raise AdapterError(f"{path}: does not fit {model_path or 'the other adapters'}: {'; '.join(errors)}")
    return adapters, versions[0]


def _slot_names(paths: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """The slot names: ``names`` or the files' names without ``.onnx_adapter``; distinct, not empty, not 'base'."""
    chosen = list(names) if names is not None else [path.name.removesuffix(ADAPTER_SUFFIX) for path in paths]
    if len(chosen) != len(paths):
        raise AdapterError(f"{len(chosen)} names for {len(paths)} adapters: give one name per adapter")
    for name in chosen:
        if not name or name == BASE_SLOT or chosen.count(name) > 1:
            why = "empty" if not name else "slot 0's name" if name == BASE_SLOT else "given twice"
            raise AdapterError(f"slot name {name[:80]!r} is {why}: give each adapter a distinct name (--name)")
    return [BASE_SLOT, *chosen]


def pack_adapters(paths: Sequence[str | os.PathLike], output: str | os.PathLike, names: Sequence[str] | None = None,
                  *, model: str | os.PathLike | None = None, overwrite: bool = True) -> Path:
    """Stack ordinary adapter files of one base into a pack for a slots-form graph (``lora-export pack-adapters``):
    slot i is ``paths[i - 1]``, named ``names[i - 1]`` (default: its file name without ``.onnx_adapter``).

    Every adapter is read and verified (integrity record), held against the others (same model version, same
    layer sizes) and, given ``model`` (a slots-form graph), against its base and LoRA inputs as ``lora-export
    adapter`` does; the output and its record are checked before any work (``files.check_outputs``). Returns the
    pack's path; raises AdapterError / OutputError (one line).
    """
    paths, output = [Path(path) for path in paths], Path(output)
    if not paths:
        raise AdapterError("no adapters to pack: give at least one .onnx_adapter file")
    if len(paths) >= MAX_SLOTS:
        raise AdapterError(f"{len(paths)} adapters: a slots graph takes at most {MAX_SLOTS - 1} besides the base")
    check_suffix(output, ADAPTER_SUFFIX)
    check_outputs(model_files(adapter_path=output), [*paths, *([] if model is None else model_files(Path(model)))],
                  overwrite=overwrite)
    slot_names = _slot_names(paths, names)
    adapters, version = _read_adapters(paths, model)
    slots = [{"slot": 0, "name": BASE_SLOT, "file": None, "sha256": None}]
    slots += [{"slot": slot, "name": name, "file": path.name, "sha256": file_sha256(path)}
              for slot, (name, path) in enumerate(zip(slot_names[1:], paths, strict=True), start=1)]
    write_adapter(output, stack_adapters(adapters), version, slots=slots)
    return output


def read_pack(path: str | os.PathLike) -> Pack:
    """Read a pack written by ``pack_adapters``, verified against its integrity record (which names the slots).
    Raises AdapterError (one line) for a file that is not a readable pack."""
    path = Path(path)
    tensors, version = read_adapter(path)
    record_path = adapter_record_path(path)
    record = read_json(record_path) if record_path.is_file() else None
    slots = record.get("slots") if isinstance(record, dict) else None
    if not isinstance(slots, list) or not slots:
        raise AdapterError(f"{path}: not a pack of adapters: no slot list in {record_path.name} (write one with "
                           "lora-export pack-adapters)")
    names = [entry.get("name") if isinstance(entry, dict) and entry.get("slot") == slot else None
             for slot, entry in enumerate(slots)]
    if names[0] != BASE_SLOT or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise AdapterError(f"{record_path}: a damaged slot list (slot i must be entry i, slot 0 the base, names "
                           "distinct)")
    for name, array in sorted(tensors.items()):
        if array.ndim != 3 or array.shape[0] != len(names):
            raise AdapterError(f"{path}: {name} is {list(array.shape)}, a pack of {len(names)} slots holds "
                               f"[{len(names)}, ., .] stacks")
    return Pack(tensors, names, version, path)


def check_pack(model: onnx.ModelProto, pack: Pack) -> tuple[list[str], list[str]]:
    """Hold a pack against a slots-form graph before any run: (errors, notes). Errors: a model of another form or
    base, a stack the graph has no input for or whose sizes, dtype or rank pairing do not fit, NaN or Inf.
    Notes: the graph's LoRA layers the pack leaves out (they run as the base for every slot)."""
    if ADAPTER_IDS not in {value.name for value in model.graph.input}:
        return ["not a slots-form model (export it with --adapter-slots)"], []
    errors = check_tensors(lora_input_specs(model), pack.tensors)
    base = read_metadata(model).get("base_sha256")
    if base is not None and pack.model_version != model_version_from_fingerprint(base):
        errors.insert(0, f"model version {pack.model_version} != {model_version_from_fingerprint(base)}: the pack "
                         "was written for another base model")
    note = base_layers_note(model, pack.tensors)
    return errors, [] if note is None else [note]


@dataclass
class SlotFeeds:
    """A pack held against a slots-form graph once (``slot_feeds``); then the feeds of any batch (``feeds``)."""

    pack: Pack
    stacks: dict[str, np.ndarray]  # every LoRA input of the graph: the pack's stack, or an empty one (the base)

    def feeds(self, rows: Sequence[str | int], batch: int) -> dict[str, np.ndarray]:
        """``adapter_ids`` [batch] and every stack, for a batch whose row b uses slot ``rows[b]`` (a name or an
        index). Raises AdapterError (one line) unless there is one valid slot per row."""
        if len(rows) != batch:
            raise AdapterError(f"{len(rows)} adapter ids for a batch of {batch} rows: give one slot per row")
        return {ADAPTER_IDS: self.pack.slot_ids(rows), **self.stacks}


def slot_feeds(model: onnx.ModelProto, pack: Pack) -> SlotFeeds:
    """The feeds of ``pack`` for the slots-form ``model``: its stacks, and for every graph LoRA layer the pack
    leaves out an empty stack (A [S, in, 0], B [S, 0, out]: the base in every slot). Raises AdapterError (one
    line) for a pack that does not fit (``check_pack``)."""
    errors, _notes = check_pack(model, pack)
    if errors:
        raise AdapterError(f"{pack.where}: does not fit the model: {'; '.join(errors)}")
    stacks = dict(pack.tensors)
    for name, (elem_type, dims) in adapter_input_specs(model).items():
        if name not in stacks:
            shape = [pack.size, *(0 if isinstance(d, str) else d for d in dims)]
            stacks[name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    return SlotFeeds(pack, stacks)


def single_pack(tensors: Mapping[str, np.ndarray], model_version: int, name: str = "adapter") -> Pack:
    """A pack in memory of one ordinary adapter: slot 0 the base, slot 1 ``tensors``."""
    return Pack(stack_adapters([tensors]), [BASE_SLOT, name], model_version)


def is_pack(path: str | os.PathLike) -> bool:
    """Whether the adapter file at ``path`` is a pack: its integrity record lists slots."""
    record_path = adapter_record_path(path)
    if not record_path.is_file():
        return False
    try:
        record = read_json(record_path)
    except ValueError:
        return False  # read_adapter refuses the damaged record, naming it
    return isinstance(record, dict) and "slots" in record

