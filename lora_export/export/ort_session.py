"""The one way lora-export opens an ONNX Runtime session: quiet (errors only) and on the providers asked for.

Quiet because an adapters-as-inputs graph makes ORT warn once per LoRA input (overridable initializers), which
would bury every message of ours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnxruntime as ort

CPU = "CPUExecutionProvider"


def quiet_session(model: str | os.PathLike, providers: Sequence[str] = (CPU,)) -> ort.InferenceSession:
    """An InferenceSession of a model file (its external data beside it) with ORT's log at errors only.

    From a path, never serialized bytes: bytes would be a second whole copy of the model, and cannot hold one above
    protobuf's 2 GB. ORT's own exceptions pass through: callers turn them into one line naming the file.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=list(providers))
