"""The one way lora-export opens an ONNX Runtime session: quiet (errors only) and on the providers asked for.

Quiet because an adapters-as-inputs graph makes ORT warn once per LoRA input (overridable initializers), which
would bury every message of ours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnxruntime as ort

CPU = "CPUExecutionProvider"


def quiet_session(model: str | os.PathLike | bytes, providers: Sequence[str] = (CPU,)) -> ort.InferenceSession:
    """An InferenceSession of a model file (or serialized bytes) with ORT's log at errors only.

    ORT's own exceptions pass through: callers turn them into one line naming the file.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers))
