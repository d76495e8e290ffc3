"""Training: pretrain the byte-level base LM, adapt it with LoRA; one process or many (torchrun), any device."""

from .loop import TrainSettings
from .stages import adapt, pretrain

__all__ = ["TrainSettings", "adapt", "pretrain"]
