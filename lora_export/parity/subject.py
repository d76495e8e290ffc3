"""What a parity check is about, read and held against each other before anything runs: the model and its
checkpoint (``Subject``), the adapter or pack given (``given_adapter``), the user's validation text (``--data``), and
the files a check reads (which no output beside it may replace). Shared by the scoring-graph check
(``parity.validate``) and the decoder check (``parity.validate_decoder``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..corpus import read_text_files, text_files
from ..errors import ParityInputError
from ..export.onnx_files import load_onnx, read_metadata
from ..export.slots import Pack, check_pack, is_pack, read_pack
from ..layout import MODEL_FILE, Form, model_files
from ..model.checkpoint import read_checkpoint
from .lineage import check_model_matches, load_adapter_for
from .metrics import Tolerance, resolve_tolerance

WEIGHT_SECTIONS = ("base", "lora")  # the checkpoint payload's tensors
TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                      "string_data")


@dataclass
class Subject:
    """What a parity check is about: the model (a genai decoder's directory), its graph (``graph_only``: no
    weights) and ``lora_export.*`` metadata, the checkpoint's payload (its weights until ``release_weights``) and
    parameter count, the adapter given, the export's form and precision, the tolerance they are held to, and the
    notes for the reports so far."""

    model_path: Path
    checkpoint_path: Path
    adapter_path: Path | None
    proto: onnx.ModelProto
    payload: dict
    metadata: dict[str, str]
    form: Form
    precision: str
    tolerance: Tolerance
    notes: list[str]
    parameters: int  # of the checkpoint: base and LoRA weights

    def release_weights(self) -> None:
        """Drop the checkpoint's tensors from ``payload`` (its config and records stay): once the reference model
        is built they are a second copy of the weights."""
        self.payload = {key: value for key, value in self.payload.items() if key not in WEIGHT_SECTIONS}


def graph_only(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` without the data of its initializers (names, types and shapes kept): a parity check
    reads the graph's interface, and the inline weights of a model under 2 GB are a copy of the model. A copy,
    because clearing a field does not free protobuf's memory: the weights go when the caller drops ``proto``
    (cleared here, in place)."""
    for tensor in proto.graph.initializer:
        for data in TENSOR_DATA_FIELDS:
            tensor.ClearField(data)
    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    return graph


def checkpoint_parameters(payload: dict) -> int:
    """The parameter count of a checkpoint's payload: the elements of its base and LoRA tensors."""
    return sum(tensor.numel() for section in WEIGHT_SECTIONS for tensor in payload[section].values())


def read_subject(model_path: Path, graph_path: Path, checkpoint_path: Path, adapter_path: Path | None,
                 atol: float | None, rtol: float | None) -> Subject:
    """Read the graph ``graph_path`` (the model itself, or a decoder directory's model.onnx) and the checkpoint,
    check that the model comes from the checkpoint (``lineage.check_model_matches``) and resolve the tolerance of
    its precision (``atol`` / ``rtol`` override it). The graph's weights are dropped (``graph_only``) before the
    checkpoint is read. Raises a LoraExportError (one line)."""
    proto = graph_only(load_onnx(graph_path))
    payload = read_checkpoint(checkpoint_path)
    metadata = read_metadata(proto)
    notes = check_model_matches(proto, metadata, payload, graph_path, checkpoint_path)
    precision = metadata.get("precision", "fp32")
    return Subject(model_path, checkpoint_path, adapter_path, proto, payload, metadata, Form(metadata["form"]),
                   precision, resolve_tolerance(precision, atol, rtol), notes, checkpoint_parameters(payload))


def given_adapter(subject: Subject) -> tuple[dict[str, np.ndarray] | None, Pack | None]:
    """(the tensors of the adapter given, or None without one; the pack given to a slots-form graph, or None),
    held against the model's LoRA inputs (``lineage.load_adapter_for``, ``slots.check_pack``); notes added to the
    subject's. Raises ParityInputError / AdapterError (one line)."""
    if subject.adapter_path is None:
        return None, None
    if subject.form is Form.SLOTS and is_pack(subject.adapter_path):
        pack = read_pack(subject.adapter_path)
        errors, notes = check_pack(subject.proto, pack)
        if errors:
            raise ParityInputError(f"{subject.adapter_path}: pack does not fit the model: {'; '.join(errors)}")
        subject.notes += notes
        return None, pack
    tensors, notes = load_adapter_for(subject.adapter_path, subject.proto, subject.metadata)
    subject.notes += notes
    return tensors, None


def _data_files(data: Sequence[str | os.PathLike]) -> list[Path]:
    """The files of the user's ``--data`` paths (directories walked); raises ParityInputError (one line)."""
    try:
        return text_files(data)
    except (OSError, ValueError) as err:  # also the OSError of an unreadable directory: one line, exit 2
        raise ParityInputError(str(err)) from None


def validation_text(data: Sequence[str | os.PathLike]) -> tuple[list[Path], bytes | None, str]:
    """(the files, their text, its source for the reports) of the user's ``--data`` paths (directories walked once,
    so the files read are the files listed); (files [], None, 'held-out prose') without them. Raises
    ParityInputError (one line)."""
    files = _data_files(data)
    try:
        text = read_text_files(files) if files else None
    except (OSError, ValueError) as err:
        raise ParityInputError(str(err)) from None
    source = "your data: " + ", ".join(Path(path).name for path in data) if data else "held-out prose"
    return files, text, source


def validation_inputs(model_path: str | os.PathLike, checkpoint_path: str | os.PathLike,
                      adapter_path: str | os.PathLike | None = None,
                      data: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Every file a parity check reads with these arguments (a genai directory: its model.onnx; the files in
    ``data``'s directories), which no output written beside it (its reports) may replace. Raises ParityInputError
    for ``data`` that cannot be walked."""
    model_path = Path(model_path)
    graph = model_path / MODEL_FILE if model_path.is_dir() else model_path
    adapter = Path(adapter_path) if adapter_path is not None else None
    return [*model_files(graph), Path(checkpoint_path), *model_files(adapter_path=adapter), *_data_files(data)]
