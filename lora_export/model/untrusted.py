"""Reading files we do not trust without running them: bounded plain values, pickles scanned (never run) for
imports, zip members against their CRC-32. Used by the checkpoint reader (``checkpoint.py``)."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, first_line

#: Limits of the plain values (config, training record) a checkpoint may hold, checked before any of them is
#: compared, hashed or formatted: a few hundred bytes of shared references can otherwise expand to 2^40 items.
MAX_PLAIN_DEPTH = 16
MAX_PLAIN_ITEMS = 1_000_000
MAX_STRING_CHARS = 1 << 20
MAX_INT_MAGNITUDE = 1 << 64


def check_plain_values(value: Any, where: str) -> None:
    """Refuse (ValueError, one line) anything but a bounded tree of None, bool, int, float, str, tensors, and
    lists, tuples and str-keyed dicts of them: too deep, too many items counted with repeats (shared
    references), a huge int or string, or another type."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    visited = 0
    while stack:
        item, path, depth = stack.pop()
        visited += 1
        if visited > MAX_PLAIN_ITEMS:
            raise ValueError(f"{where}: more than {MAX_PLAIN_ITEMS:,} values (or references that expand to as many)")
        if item is None or isinstance(item, bool | float | torch.Tensor):
            continue
        if isinstance(item, int):
            if abs(item) > MAX_INT_MAGNITUDE:
                raise ValueError(f"{path}: integer too large")
            continue
        if isinstance(item, str):
            if len(item) > MAX_STRING_CHARS:
                raise ValueError(f"{path}: string of {len(item):,} characters is too long")
            continue
        if not isinstance(item, dict | list | tuple):
            raise ValueError(f"{path}: unexpected value of type {type(item).__name__}")
        if depth >= MAX_PLAIN_DEPTH:
            raise ValueError(f"{path}: nested deeper than {MAX_PLAIN_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str) or len(key) > 256:
                    raise ValueError(f"{path}: a key that is not a short string ({type(key).__name__})")
                stack.append((child, f"{path}.{key}", depth + 1))
        else:
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _is_tensor_global(module: str, name: str) -> bool:
    """The globals a plain torch checkpoint imports: tensor rebuild functions, storage types, OrderedDict."""
    if module == "collections" and name == "OrderedDict":
        return True
    return module.split(".")[0] == "torch" and (name.startswith("_rebuild_") or name.endswith("Storage"))


#: How much of a pickle the scan for imports reads: a checkpoint's pickle (the tensors' data lies beside it) is
#: kilobytes, and a file of any size costs no more than this.
MAX_PICKLE_SCAN_BYTES = 64 << 20


def pickle_imports_objects(path: Path) -> bool:
    """Whether a checkpoint's pickle imports anything but tensor machinery, scanned with pickletools, never run.

    Reads the first MAX_PICKLE_SCAN_BYTES of the raw file, or of the ``data.pkl`` member of a torch zip
    checkpoint (a pickle cut there counts as corrupt unless an import shows before the cut). Called only after
    torch's weights-only unpickler refused the file, to tell code-carrying pickles (which it reports as an
    unsupported opcode for protocols 4 and 5) from corrupt bytes.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(name for name in archive.namelist() if name.endswith("data.pkl"))
                with archive.open(member) as file:
                    data = file.read(MAX_PICKLE_SCAN_BYTES)
        else:
            with open(path, "rb") as file:  # a regular file: read_checkpoint checked
                data = file.read(MAX_PICKLE_SCAN_BYTES)
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                continue
            if not _is_tensor_global(module, name):
                return True
        return False
    except Exception:  # not a parsable pickle stream: corrupt, not code
        return False


def check_zip_integrity(path: Path) -> None:
    """Verify every member of a torch zip checkpoint against the zip's own CRC-32 (CheckpointError if not)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # BadZipFile, zlib.error, EOFError, ...
        raise CheckpointError(f"{path}: corrupt checkpoint archive: {first_line(err)}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: {bad} fails its CRC-32 check (damaged bytes)")
