"""Checkpoints: a plain dict of tensors and plain Python values, loaded with weights_only=True only.

Layout (format ``lora-export-checkpoint``, version 1)::

    {"format": str, "format_version": int, "config": ModelConfig as dict,
     "base": {name: tensor}, "lora": {name: tensor}, "training": {seed, steps, losses, data, ...}}

Nothing here unpickles code: ``torch.load(weights_only=True)`` refuses any pickle that carries a
callable, and the payload never runs. Every problem surfaces as one ``CheckpointError`` line.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .layers import base_state_dict, lora_state_dict
from .model import LoRATransformerLM, ModelConfig

CHECKPOINT_FORMAT = "lora-export-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line naming the file and the problem."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside ``path``, then rename it into place.

    A failure leaves no partial file behind. Raises OSError if the directory is not writable.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_dir_problem(directory: Path) -> str | None:
    """Why files cannot be written into ``directory`` (checked before any work is done), or None."""
    if not directory.is_dir():
        return f"{directory}: output directory does not exist"
    if not os.access(directory, os.W_OK):
        return f"{directory}: output directory is not writable"
    return None


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_fingerprint(base: dict[str, torch.Tensor]) -> str:
    """sha256 over the base weights (names, dtypes, shapes, values): equal iff the base is the same."""
    digest = hashlib.sha256()
    for name in sorted(base):
        tensor = base[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _torch_save(payload: dict[str, Any], path: str) -> None:
    # Through a file object, torch names the zip's root folder "archive" instead of after the temporary
    # file, so the same tensors always give the same bytes.
    with open(path, "wb") as f:
        torch.save(payload, f)


def save_checkpoint(path: str | os.PathLike, model: LoRATransformerLM, training: dict[str, Any] | None = None) -> None:
    """Write model config, base weights, LoRA weights and training metadata atomically.

    The model must be unmerged (base and LoRA kept apart); a merged one is refused.
    """
    merged = any(getattr(m, "merged", False) for m in model.modules())
    if merged:
        raise ValueError("save_checkpoint needs an unmerged model: call unmerge_lora(model) first")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "base": {k: v.detach().cpu().clone() for k, v in base_state_dict(model).items()},
        "lora": {k: v.detach().cpu().clone() for k, v in lora_state_dict(model).items()},
        "training": dict(training or {}),
    }
    atomic_write(path, lambda tmp: _torch_save(payload, tmp))


def pickle_imports_objects(path: Path) -> bool:
    """Whether a raw pickle file imports globals or builds objects, scanned with pickletools, never run.

    Called only after torch's weights-only unpickler refused the file, to tell code-carrying pickles
    (which it reports as an unsupported opcode for protocols 4 and 5) from corrupt bytes.
    """
    code_ops = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
    try:
        with open(path, "rb") as f:
            return any(op.name in code_ops for op, _, _ in pickletools.genops(f))
    except Exception:  # not a parsable pickle stream: corrupt, not code
        return False


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate the raw checkpoint dict. Raises CheckpointError with one clear line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a .pt checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; we say it in one line
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or pickle_imports_objects(path):
            raise CheckpointError(
                f"{path}: refused: it contains pickled code or objects, not only tensors (weights_only=True)"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?)") from None
    except Exception as err:  # torch.load raises many types (RuntimeError, KeyError, ...) on corrupt bytes
        detail = f"{type(err).__name__}: {first_line(err).split('. ')[0]}"
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {detail}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lora-export checkpoint (missing format '{CHECKPOINT_FORMAT}')")
    version = payload.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format_version {version!r} (this tool reads {CHECKPOINT_VERSION})"
        )
    for key, kind in (("config", dict), ("base", dict), ("lora", dict), ("training", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: malformed checkpoint: '{key}' missing or not a {kind.__name__}")
    return payload


def build_model(payload: dict[str, Any], path: str | os.PathLike = "checkpoint") -> LoRATransformerLM:
    """Rebuild the model from a validated checkpoint dict, in eval mode."""
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed model config: {err}") from None
    model = LoRATransformerLM(config)
    expected = model.state_dict()
    state = {**payload["base"], **payload["lora"]}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path}: weights do not match the model config: {detail}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(
                f"{path}: shape mismatch for {name}: checkpoint has {got}, config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    return model.eval()


def load_checkpoint(path: str | os.PathLike) -> LoRATransformerLM:
    """Load a checkpoint into a LoRATransformerLM (eval mode). Raises CheckpointError."""
    return build_model(read_checkpoint(path), path)
