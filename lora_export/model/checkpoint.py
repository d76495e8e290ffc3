"""Checkpoints: a plain dict of tensors and plain Python values, loaded with weights_only=True only.

Layout (format ``lora-export-checkpoint``, version 1)::

    {"format": str, "format_version": int, "config": ModelConfig as dict,
     "base": {name: tensor}, "lora": {name: tensor}, "training": {seed, steps, losses, data, ...},
     "resume": {"tensors": {name: tensor}, "plain": {...}}}   # optional: the state to resume training from


Two containers hold that layout, chosen by the file name: ``.safetensors`` (tensors ``base.<name>`` /
``lora.<name>`` / ``resume.<name>``; format, config, training record, tensor hashes and the resume state's plain
values as JSON strings in the header's metadata; no pickle at all) and anything else, ``.pt`` (``torch.save`` of
the dict). Nothing here unpickles code:
``torch.load(weights_only=True)`` refuses any pickle that carries a callable, and the payload never runs. Every
problem surfaces as one ``CheckpointError`` line.

Weights may be stored as float32, bfloat16, float16 or float64 (``checkpoint_dtype`` names them). Both containers
are memory-mapped copy-on-write (a loaded tensor changed in place never writes to the file), and ``build_model``
makes the tensors the model's parameters (cast one by one when stored in another dtype): peak memory about 1x the
weights. ``checkpoint_summary`` reads only the config and the tensors' shapes and dtypes, for a memory pre-flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from mmap import MAP_PRIVATE
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, OutputError, first_line, short_repr
from ..files import atomic_write, check_input_file, check_outputs, parse_json
from .layers import base_state_dict, lora_state_dict
from .transformer import LoRATransformerLM, ModelConfig
from .untrusted import check_plain_values, check_zip_integrity, pickle_imports_objects

CHECKPOINT_FORMAT = "lora-export-checkpoint"
CHECKPOINT_VERSION = 1
#: The weight dtypes a checkpoint may hold (a model computes in float32; these convert to it exactly enough), with
#: their short names (``checkpoint_dtype``, reports, ``tools/make_sized.py --dtype``).
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
WEIGHT_DTYPES = tuple(DTYPE_NAMES)
#: Their names in a safetensors header (read by ``checkpoint_summary`` without loading a tensor).
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _hash_tensor(digest: hashlib._Hash, tensor: torch.Tensor, label: str = "") -> None:
    """Feed a tensor's label, dtype, shape and bytes (contiguous, CPU) into ``digest``."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{label}{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or Inf, with no temporary of its size (min and max propagate
    NaN): a big model's check allocates nothing that could fragment memory."""
    return tensor.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    _hash_tensor(digest, tensor)
    return digest.hexdigest()


def base_fingerprint(base: dict[str, torch.Tensor]) -> str:
    """sha256 over the base weights (names, dtypes, shapes, values): equal iff the base is the same."""
    digest = hashlib.sha256()
    for name in sorted(base):
        _hash_tensor(digest, base[name], f"{name}|")
    return digest.hexdigest()


SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = (".pt", SAFETENSORS_SUFFIX)
#: The plain parts of a checkpoint, stored as one JSON string under the safetensors metadata key ``lora_export``
#: (one key: safetensors writes its metadata map in no fixed order, and the file must be byte-stable).
SAFETENSORS_METADATA = ("format", "format_version", "config", "training", "tensor_sha256", "resume_plain")
#: The sections whose tensors a checkpoint holds, in the payload and as safetensors name prefixes.
TENSOR_SECTIONS = ("base", "lora", "resume")
SAFETENSORS_KEY = "lora_export"


def check_checkpoint_output(output: str | os.PathLike, inputs: list[str | os.PathLike], *, overwrite: bool) -> None:
    """Refuse (OutputError, one line), before any work, a checkpoint output that does not end in .pt or
    .safetensors, cannot be written, would replace one of ``inputs`` or exists without ``overwrite``
    (``files.check_outputs``)."""
    if Path(output).suffix not in CHECKPOINT_SUFFIXES:
        raise OutputError(f"{output}: the checkpoint output must end in .pt or .safetensors")
    check_outputs([output], inputs, overwrite=overwrite)


def _safetensors_save(payload: dict[str, Any], path: str) -> None:
    from safetensors.torch import save_file

    resume = payload.get("resume", {"tensors": {}, "plain": None})
    sections = {"base": payload["base"], "lora": payload["lora"], "resume": resume["tensors"]}
    tensors = {f"{section}.{name}": tensor.contiguous() for section, state in sections.items()
               for name, tensor in state.items()}
    plain = {key: payload[key] for key in SAFETENSORS_METADATA if key in payload}
    if resume["plain"] is not None:
        plain["resume_plain"] = resume["plain"]
    save_file(tensors, path, metadata={SAFETENSORS_KEY: json.dumps(plain, sort_keys=True)})


def _dtype_refusal(path: Path, section: str, name: str, kind: str) -> CheckpointError:
    """The refusal of a weight stored as ``kind``, not one of WEIGHT_DTYPES."""
    return CheckpointError(f"{path}: {section} weight {name} is {kind}, not a float32, float16, bfloat16 or "
                           "float64 tensor")


def _header_tensor(f: Any, path: Path, section: str, inner: str) -> torch.Tensor:
    """A meta tensor (nothing read) of the dtype and shape the header of the open safetensors ``f`` gives a tensor."""
    view = f.get_slice(f"{section}.{inner}")
    dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
    if dtype is None:
        raise _dtype_refusal(path, section, inner, view.get_dtype())
    return torch.empty(view.get_shape(), dtype=dtype, device="meta")


def _safetensors_load(path: Path, read: bool) -> dict[str, Any]:
    """The checkpoint dict of a .safetensors file; raises ValueError for anything but this module's layout. With
    ``read`` the tensors are ``get_tensor``'s: views of a copy-on-write map of the file, read when used. Without,
    meta tensors of the header's dtypes and shapes."""
    from safetensors import safe_open

    payload: dict[str, Any] = {"base": {}, "lora": {}}
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if SAFETENSORS_KEY not in metadata:
            raise ValueError(f"no '{SAFETENSORS_KEY}' entry in its metadata")
        plain = parse_json(metadata[SAFETENSORS_KEY], f"its '{SAFETENSORS_KEY}' metadata")
        if not isinstance(plain, dict):
            raise ValueError(f"its '{SAFETENSORS_KEY}' metadata is not a JSON object")
        payload.update({key: plain.get(key) for key in SAFETENSORS_METADATA})
        resume_plain = payload.pop("resume_plain")
        sections = {}
        for name in f.keys():
            section, _, inner = name.partition(".")
            if section not in TENSOR_SECTIONS or not inner:
                raise ValueError(f"unexpected tensor {short_repr(name)}")
            if section == "resume":  # optimizer moments, RNG states: not weights, read only when asked
                if read:
                    payload.setdefault("resume", {"tensors": {}, "plain": resume_plain})["tensors"][inner] = (
                        f.get_tensor(name))
                continue
            sections[inner] = section
        if resume_plain is not None:
            payload.setdefault("resume", {"tensors": {}, "plain": resume_plain})
        # the header's shapes against the config before any tensor is read: a header can declare any size
        check_weight_shapes({inner: tuple(f.get_slice(f"{section}.{inner}").get_shape())
                             for inner, section in sections.items()}, expected_shapes(payload["config"], path), path)
        for inner, section in sections.items():
            payload[section][inner] = (f.get_tensor(f"{section}.{inner}") if read
                                       else _header_tensor(f, path, section, inner))
    return payload


def _torch_save(payload: dict[str, Any], path: str) -> None:
    # Through a file object, torch names the zip's root folder "archive" instead of after the temporary
    # file, so the same tensors always give the same bytes.
    with open(path, "wb") as f:
        torch.save(payload, f)


def save_checkpoint(path: str | os.PathLike, model: LoRATransformerLM, training: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None, resume: dict[str, Any] | None = None) -> None:
    """Write model config, base weights, LoRA weights, training metadata and tensor hashes atomically, as
    safetensors when ``path`` ends in ``.safetensors``, else as a torch zip (``.pt``). ``dtype`` (of WEIGHT_DTYPES;
    None: the model's own) is the weights' stored dtype, which the hashes cover; a cast copy is held while writing.
    The model must be unmerged (base and LoRA kept apart); a merged one is refused. Every tensor must be finite.
    ``resume``: {"tensors": {name: tensor}, "plain": {...}}, the state training resumes from (``train.state``),
    stored as it is (its own hashes are its owner's business).
    """
    merged = any(getattr(m, "merged", False) for m in model.modules())
    if merged:
        raise ValueError("save_checkpoint needs an unmerged model: call unmerge_lora(model) first")
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"save_checkpoint: dtype {dtype} is not one of {', '.join(map(str, WEIGHT_DTYPES))}")
    # no clone (.to is the tensor itself in its own dtype): a copy would double the memory of a big model
    base = {k: v.detach().cpu().to(dtype or v.dtype) for k, v in base_state_dict(model).items()}
    lora = {k: v.detach().cpu().to(dtype or v.dtype) for k, v in lora_state_dict(model).items()}
    for name, tensor in {**base, **lora}.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"save_checkpoint refused: {name} holds NaN or Inf")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "base": base,
        "lora": lora,
        "training": dict(training or {}),
        "tensor_sha256": {name: tensor_sha256(tensor) for name, tensor in sorted({**base, **lora}.items())},
    }
    if resume is not None:
        payload["resume"] = {"tensors": {k: v.detach().cpu() for k, v in resume["tensors"].items()},
                             "plain": resume["plain"]}
    check_plain_values(payload["training"], "training")
    write = _safetensors_save if str(path).endswith(SAFETENSORS_SUFFIX) else _torch_save
    atomic_write(path, lambda tmp: write(payload, tmp))


# --------------------------------------------------------------------------- reading, never trusting


def _check_tensors(payload: dict[str, Any], path: Path, hashes: bool) -> None:
    """Values are tensors of WEIGHT_DTYPES, each matching its recorded sha256 (as stored: before any cast; compared
    only with ``hashes``), and the record names exactly the tensors there are. A .safetensors checkpoint must have
    the record: lora-export has always written one there, so a missing record is damage. A .pt may lack it (written
    by an older lora-export or by hand)."""
    recorded = payload.get("tensor_sha256")
    if recorded is None and path.suffix == SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{path}: corrupt checkpoint: its 'tensor_sha256' record is missing (damaged or "
                              "altered metadata)")
    if recorded is not None and not isinstance(recorded, dict):
        raise CheckpointError(f"{path}: malformed checkpoint: 'tensor_sha256' is not a dict")
    for section in ("base", "lora"):
        for name, tensor in payload[section].items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in WEIGHT_DTYPES:
                kind = str(tensor.dtype) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise _dtype_refusal(path, section, name, kind)
            if recorded is not None and name not in recorded:
                raise CheckpointError(f"{path}: corrupt checkpoint: tensor {short_repr(name)} is not in its "
                                      "'tensor_sha256' record (damaged or altered)")
            if hashes and recorded is not None and recorded[name] != tensor_sha256(tensor):
                raise CheckpointError(f"{path}: corrupt checkpoint: tensor {name} does not match its recorded "
                                      "sha256 (damaged or altered bytes)")
    if recorded is not None:
        missing = sorted(set(recorded) - set(payload["base"]) - set(payload["lora"]))
        if missing:
            raise CheckpointError(f"{path}: corrupt checkpoint: recorded tensor {short_repr(missing[0])} is missing")


def _mappable(path: Path) -> bool:
    """Whether torch.load can memory-map the file: a zip whose members are stored, as torch.save writes them (the
    mapped bytes of a re-compressed zip would be compressed ones)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    except Exception:  # not a zip, or a damaged one: torch.load reads it whole and says what is wrong
        return False


def _load(path: Path, read: bool) -> Any:
    """The unvalidated checkpoint dict of a regular file (CheckpointError, one line, if none): ``_safetensors_load``,
    or ``torch.load(weights_only=True)``, mapped copy-on-write (read when used) if ``_mappable``, else read whole."""
    check_input_file(path, error=CheckpointError)
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            return _safetensors_load(path, read)
        except CheckpointError:
            raise
        except PermissionError:
            raise CheckpointError(f"{path}: permission denied") from None
        except Exception as err:  # SafetensorError, JSONDecodeError, ValueError, ...
            raise CheckpointError(f"{path}: not a readable lora-export safetensors checkpoint: "
                                  f"{first_line(err)[:200]}") from None
    try:
        # torch warns about pickle protocols before refusing; we say it in one line
        with warnings.catch_warnings(), torch.serialization.set_default_mmap_options(MAP_PRIVATE):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_mappable(path))
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except Exception as err:  # torch.load raises many types (UnpicklingError, RuntimeError, KeyError, ...)
        if "GLOBAL" in str(err) or pickle_imports_objects(path):
            raise CheckpointError(
                f"{path}: refused: it contains pickled code or objects, not only tensors (weights_only=True)"
            ) from None
        if isinstance(err, pickle.UnpicklingError):
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?)") from None
        detail = f"{type(err).__name__}: {first_line(err).split('. ')[0][:200]}"
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {detail}") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate the raw checkpoint dict. Raises CheckpointError with one clear line.

    Refused: anything but a regular file, pickled code (never run), bytes that fail the zip's CRC-32 or a
    tensor's recorded sha256 (or a .safetensors without that record), plain values that are not a small tree of
    plain types, and a layout other than this module's. Names and shapes are held against the config before any
    tensor is hashed, and for .safetensors before any is read (its header can declare any size).
    The tensors map the file copy-on-write (``_load``): the pages read (hashing reads all) are page cache.
    """
    path = Path(path)
    payload = _load(path, read=True)
    if path.suffix != SAFETENSORS_SUFFIX:
        check_zip_integrity(path)
    return _validated(payload, path, hashes=True)


@dataclass(frozen=True)
class CheckpointSummary:
    """What a checkpoint holds (``checkpoint_summary``). parameters: elements of all weights (base + LoRA); dtype:
    ``checkpoint_dtype``'s name ('fp32', 'bf16', 'fp16', 'fp64' or 'mixed: ...'); weight_bytes: bytes as stored."""

    parameters: int
    dtype: str
    weight_bytes: int


def checkpoint_summary(path: str | os.PathLike) -> CheckpointSummary:
    """Parameter count, dtype and stored size of a checkpoint, from its config and tensor shapes and dtypes only
    (the safetensors header; the pickle of a memory-mapped torch zip), for a memory pre-flight before it is loaded.

    Refuses (CheckpointError, one line) what ``read_checkpoint`` refuses before reading tensor bytes: not a regular
    file, pickled code, a malformed layout, config, names, shapes or dtypes. Neither the zip's CRC-32 nor the
    tensors' sha256 is checked (both read every byte): ``read_checkpoint`` does that when the checkpoint is loaded.
    """
    path = Path(path)
    payload = _validated(_load(path, read=False), path, hashes=False)
    tensors = [*payload["base"].values(), *payload["lora"].values()]
    return CheckpointSummary(parameters=sum(t.numel() for t in tensors), dtype=checkpoint_dtype(payload),
                             weight_bytes=sum(t.numel() * t.element_size() for t in tensors))


def checkpoint_dtype(payload: dict[str, Any]) -> str:
    """The dtype the weights of a checkpoint dict (``read_checkpoint``) are stored in, for export metadata and
    reports: 'fp32', 'bf16', 'fp16' or 'fp64' (``DTYPE_NAMES``) when all share one, else 'mixed: ' and each with its
    share of the parameters, largest first (e.g. 'mixed: bf16 98.8%, fp32 1.2%')."""
    counts: dict[str, int] = {}
    for tensor in [*payload["base"].values(), *payload["lora"].values()]:
        counts[DTYPE_NAMES[tensor.dtype]] = counts.get(DTYPE_NAMES[tensor.dtype], 0) + tensor.numel()
    if len(counts) == 1:
        return next(iter(counts))
    shares = sorted(counts.items(), key=lambda item: -item[1])
    return "mixed: " + ", ".join(f"{name} {100 * count / sum(counts.values()):.1f}%" for name, count in shares)


def _validated(payload: Any, path: Path, hashes: bool) -> dict[str, Any]:
    """The loaded checkpoint dict, checked: plain values, format and version, sections, names, shapes and dtypes,
    and with ``hashes`` the tensors' recorded sha256 (reading every byte)."""
    try:
        check_plain_values(payload, "checkpoint")
    except ValueError as err:
        raise CheckpointError(f"{path}: refused: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lora-export checkpoint (missing format '{CHECKPOINT_FORMAT}')")
    version = payload.get("format_version")
    if version != CHECKPOINT_VERSION or isinstance(version, bool):
        raise CheckpointError(f"{path}: unsupported checkpoint format_version {short_repr(version)} "
                              f"(this tool reads {CHECKPOINT_VERSION})")
    for key, kind in (("config", dict), ("base", dict), ("lora", dict), ("training", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: malformed checkpoint: '{key}' missing or not a {kind.__name__}")
    check_weight_shapes(_shapes({**payload["base"], **payload["lora"]}), expected_shapes(payload["config"], path),
                        path)  # before any hash: a hash of a tensor the config cannot hold is wasted work
    _check_tensors(payload, path, hashes)
    resume = payload.get("resume")
    if resume is not None and not (isinstance(resume, dict) and isinstance(resume.get("plain"), dict)
                                   and isinstance(resume.get("tensors"), dict)
                                   and all(isinstance(t, torch.Tensor) for t in resume["tensors"].values())):
        raise CheckpointError(f"{path}: malformed checkpoint: 'resume' is not a dict of tensors and plain values")
    return payload


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...] | str]:
    """The shape of each tensor of ``state`` (the type name of anything else)."""
    return {name: tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            for name, value in state.items()}


def expected_shapes(config: Any, path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the weights a model config needs, from a meta-device skeleton (no memory).
    Raises CheckpointError for a config that is not valid (``ModelConfig.from_dict``)."""
    try:
        with torch.device("meta"):
            skeleton = LoRATransformerLM(ModelConfig.from_dict(config)).state_dict()
    except Exception as err:  # any failure to build from a file's values is the file's problem
        raise CheckpointError(f"{path}: malformed model config: {first_line(err)}") from None
    return {name: tuple(tensor.shape) for name, tensor in skeleton.items()}


def check_weight_shapes(shapes: dict[str, tuple[int, ...] | str], expected: dict[str, tuple[int, ...]],
                        path: str | os.PathLike) -> None:
    """Refuse (CheckpointError) weights whose names or shapes differ from those the config needs."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {[short_repr(n) for n in unexpected[:3]]}"
        raise CheckpointError(f"{path}: weights do not match the model config: {detail}")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise CheckpointError(f"{path}: shape mismatch for {name}: checkpoint has {shape}, config needs "
                                  f"{expected[name]}")


def build_model(payload: dict[str, Any], path: str | os.PathLike = "checkpoint",
                dtype: torch.dtype = torch.float32) -> LoRATransformerLM:
    """Rebuild the model from a validated checkpoint dict, in eval mode, every parameter of ``dtype``. Raises
    CheckpointError. Config, names and shapes are checked on a meta-device skeleton first; every weight must be
    finite (after the cast). No copy: the model is built on the meta device and the payload's tensors become its
    parameters (``load_state_dict(assign=True)``), those stored in another dtype cast tensor by tensor (the stored
    ones stay mapped pages of the file). So the model shares memory with ``payload``: changing it in place
    (``merge_lora``, training) changes the payload's tensors of ``dtype`` too, never the file (``read_checkpoint``
    maps it copy-on-write). Build one model per payload; read the checkpoint again for an untouched one.
    """
    state = {**payload["base"], **payload["lora"]}
    check_weight_shapes(_shapes(state), expected_shapes(payload["config"], path), path)
    config = ModelConfig.from_dict(payload["config"])
    for name, tensor in state.items():
        state[name] = tensor = tensor.to(dtype)  # the tensor itself when it has that dtype
        if not all_finite(tensor):
            raise CheckpointError(f"{path}: weight {name} holds NaN or Inf")
    try:
        with torch.device("meta"):
            model = LoRATransformerLM(config)
        model.load_state_dict(state, assign=True)
    except Exception as err:  # any failure to build from a file's values is the file's problem
        raise CheckpointError(f"{path}: cannot build the model: {first_line(err)}") from None
    return model.eval()


def load_checkpoint(path: str | os.PathLike) -> LoRATransformerLM:
    """Load a checkpoint into a LoRATransformerLM (eval mode). Raises CheckpointError."""
    return build_model(read_checkpoint(path), path)
