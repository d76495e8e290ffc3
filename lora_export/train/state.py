"""What a run needs to go on where it stopped, stored in the checkpoint itself and loaded without unpickling code.

A step checkpoint (``--save-every``) is an ordinary checkpoint (exportable, ``lora-export`` reads it) plus a
``resume`` section: tensors (each AdamW moment as ``optimizer.<param index>.<name>``, the batch generator's state
as ``rng.batches``) and plain values (the step reached, the optimizer's param groups, the gradient scaler's
state, the loss history so far, the settings that fix the run, the tensors' sha256). Dropout needs no stored RNG:
each micro-batch seeds it from (seed, rank, step, micro-batch), so a resumed run draws the same masks.

``--resume CKPT`` takes all of it back; a run stopped at step k and resumed equals the uninterrupted run, bit for
bit on the CPU, as long as the settings in ``RUN_IDENTITY`` (and the model, data and base) are the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingError, short_repr
from ..model.checkpoint import read_checkpoint, tensor_sha256

RESUME_VERSION = 1
#: Settings that fix a run's trajectory: a resume checkpoint must agree on each (the device, the precision, the
#: evaluation and saving intervals may change; the world size may, as long as batch_size x world_size does not).
RUN_IDENTITY = ("stage", "seed", "steps", "seq_len", "lr", "weight_decay", "grad_accum", "windows_per_draw",
                "data_sha256", "base_fingerprint", "config")


@dataclass
class ResumeState:
    """A run's position after ``step`` optimizer steps: the training record's history so far (``losses``,
    ``eval_losses``), the optimizer, scaler and batch-generator state, and the settings it ran with."""

    step: int
    history: dict[str, list]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    generator: torch.Tensor
    identity: dict[str, Any]


def capture(step: int, history: dict[str, list], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            generator: torch.Generator, identity: dict[str, Any]) -> dict[str, Any]:
    """The ``resume`` section of a checkpoint written after ``step`` steps: {"tensors": ..., "plain": ...}."""
    saved = optimizer.state_dict()
    tensors = {"rng.batches": generator.get_state()}
    for index, values in saved["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    plain = {"version": RESUME_VERSION, "step": step, "history": {k: list(v) for k, v in history.items()},
             "identity": identity,
             "param_groups": saved["param_groups"], "scaler": scaler.state_dict(),
             "tensor_sha256": {name: tensor_sha256(tensor) for name, tensor in sorted(tensors.items())}}
    return {"tensors": tensors, "plain": plain}


def _optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list) -> dict[str, Any]:
    """An optimizer state_dict from the flat ``optimizer.<index>.<name>`` tensors."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "optimizer":
            index, _, field = rest.partition(".")
            state.setdefault(int(index), {})[field] = tensor.clone()
    return {"state": state, "param_groups": param_groups}


def read_resume(path: str | os.PathLike) -> tuple[dict[str, Any], ResumeState]:
    """The checkpoint payload (``read_checkpoint``) and its resume state. Raises CheckpointError for an unreadable
    file and TrainingError for a checkpoint without a whole resume section (a final checkpoint, damaged bytes)."""
    payload = read_checkpoint(path)
    section = payload.get("resume")
    if section is None:
        raise TrainingError(f"{path}: no resume state in this checkpoint (only those written by --save-every have "
                            "one)")
    tensors, plain = section["tensors"], section["plain"]
    try:
        if plain["version"] != RESUME_VERSION:
            raise TrainingError(f"{path}: resume state version {short_repr(plain['version'])}, this trainer reads "
                                f"{RESUME_VERSION}")
        recorded = plain["tensor_sha256"]
        if sorted(recorded) != sorted(tensors) or any(recorded[n] != tensor_sha256(t) for n, t in tensors.items()):
            raise TrainingError(f"{path}: corrupt resume state: its tensors do not match their recorded sha256")
        state = ResumeState(step=int(plain["step"]), history=plain["history"],
                            optimizer=_optimizer_state(tensors, plain["param_groups"]), scaler=plain["scaler"],
                            generator=tensors["rng.batches"], identity=plain["identity"])
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, TrainingError):
            raise
        raise TrainingError(f"{path}: malformed resume state ({type(err).__name__}: {short_repr(str(err))})") from None
    return payload, state


def check_same_run(path: str | os.PathLike, state: ResumeState, identity: dict[str, Any]) -> None:
    """Refuse (TrainingError, one line naming the first setting that differs) to resume a run with another
    identity (``RUN_IDENTITY``), or from a step past the run's end."""
    for key in RUN_IDENTITY:
        if state.identity.get(key) != identity.get(key):
            stored, now = short_repr(state.identity.get(key)), short_repr(identity.get(key))
            raise TrainingError(f"{path}: resume checkpoint from another run: {key} was {stored}, this run has {now}")
    if not 0 < state.step < identity["steps"]:
        raise TrainingError(f"{path}: resume step {state.step} is not inside this run's {identity['steps']} steps")


def restore(state: ResumeState, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            generator: torch.Generator) -> None:
    """Put the optimizer, scaler and batch generator back where ``state`` has them."""
    optimizer.load_state_dict(state.optimizer)
    if state.scaler:
        scaler.load_state_dict(state.scaler)
    generator.set_state(state.generator.clone())
