"""Where and in what precision training computes: ``--device`` and ``--precision``.

The master weights, the optimizer state and the checkpoints stay float32; ``bf16`` and ``fp16`` run the forward
pass under ``torch.autocast`` (matmuls in half precision, reductions and the loss in float32), ``fp16`` with a
``torch.amp.GradScaler`` so that small gradients do not flush to zero. ``auto`` picks CUDA only when a tensor
really computes there (``torch.cuda.is_available()`` alone can be true on a machine whose driver then fails).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import TrainingError, first_line

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_failure() -> str | None:
    """Why CUDA cannot train here (one line), or None when a small computation on it succeeds."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU-only build of torch, no GPU, or no driver)"
    try:
        probe = torch.ones(8, device="cuda")
        (probe @ probe).item()
    except Exception as err:  # driver, architecture or library mismatch: any of them means no CUDA here
        return f"CUDA fails: {first_line(err)[:200]}"
    return None


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """The device ``--device`` names for the process of ``local_rank`` on its machine (CUDA: GPU local_rank).

    Raises TrainingError for an unknown choice, for 'cuda' when CUDA does not work, and for a local rank without
    its own GPU.
    """
    if choice not in DEVICES:
        raise TrainingError(f"--device must be one of {', '.join(DEVICES)}, got {choice!r}")
    failure = cuda_failure() if choice != "cpu" else "not asked for"
    if failure is not None:
        if choice == "cuda":
            raise TrainingError(f"--device cuda: {failure}; train with --device cpu")
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise TrainingError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                            "start at most that many processes per node")
    return torch.device("cuda", local_rank)


class Precision:
    """The autocast context and gradient scaler of ``--precision`` (fp32, bf16, fp16) on ``device``."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in PRECISIONS:
            raise TrainingError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("--precision bf16: this GPU has no bfloat16; use fp16")
        self.name, self.device_type, self.dtype = name, device.type, PRECISIONS[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the enclosed forward pass in this precision (a no-op for fp32)."""
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            yield
