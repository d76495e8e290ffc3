"""The built-in text corpora (Python standard library source, English prose) and reading the user's text files
(``--data``): shared by training and validation."""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import lzma
import os
import pydoc_data.topics
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import first_line
from .files import check_input_file, open_input

STDLIB_MAX_BYTES = 4_000_000


SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


#: The most ``--data`` may hold in all, after decompression: the corpus is held in memory (a few copies of it).
MAX_DATA_BYTES = 256 << 20


#: Compressed data files, recognised by their first bytes (not their names), and how to open them.
COMPRESSED = {b"\x1f\x8b": ("gzip", gzip.open), b"BZh": ("bzip2", bz2.open), b"\xfd7zXZ\x00": ("xz", lzma.open)}


#: Binary data: a NUL byte anywhere, or more than BINARY_SHARE of the first BINARY_SAMPLE bytes not UTF-8 text
#: (Latin-1 or other 8-bit text stays well below it; random or packed bytes are far above it).
BINARY_SAMPLE = 64 << 10


BINARY_SHARE = 0.3


def stdlib_source_text(max_bytes: int = STDLIB_MAX_BYTES) -> bytes:
    """The standard library's .py files, in sorted path order, joined by newlines and cut at max_bytes.

    Installed packages (site-packages) and test suites are skipped, and so are files that cannot be read.
    """
    paths = []
    for folder, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]  # prune: never walk site-packages
        paths.extend(Path(folder, name) for name in filenames if name.endswith(".py"))
    chunks, total = [], 0
    for path in sorted(paths):
        try:
            chunk = path.read_bytes() + b"\n"
        except OSError:
            continue
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def prose_text() -> bytes:
    """English prose: the pydoc topic texts (Python reference manual sections), in sorted-key order."""
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def text_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to read for ``paths``: each file as given, each directory's files (recursively, sorted by path,
    hidden ones left out). A directory without files is a ValueError."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"{path}: data directory holds no files")
            files += found
        else:
            files.append(path)
    return files


def binary_problem(data: bytes) -> str | None:
    """Why ``data`` is binary rather than text, or None: a NUL byte anywhere (also UTF-16 text), or more than
    BINARY_SHARE of its first BINARY_SAMPLE bytes that are not valid UTF-8."""
    if b"\0" in data:
        return "binary data (NUL bytes), not text"
    sample = data[:BINARY_SAMPLE]
    invalid = sample.decode("utf-8", errors="replace").count("\ufffd") - sample.count("\ufffd".encode())
    if invalid > BINARY_SHARE * len(sample):
        return f"binary data ({invalid / len(sample):.0%} of its first {len(sample):,} bytes are not UTF-8), not text"
    return None


def read_data_file(path: Path, budget: int = MAX_DATA_BYTES) -> bytes:
    """The text of one data file, decompressed when it is gzip, bzip2 or xz data (by its first bytes). Raises
    ValueError naming the file: not a regular file, more than ``budget`` bytes (after decompression; read no
    further), corrupt compressed data, empty, or binary (:func:`binary_problem`)."""
    with open_input(path) as raw:
        kind = "data"
        try:
            magic = raw.read(6)
            raw.seek(0)
            kind, opener = next((found for prefix, found in COMPRESSED.items() if magic.startswith(prefix)),
                                (kind, None))
            stream = opener(raw, "rb") if opener else raw
            data = stream.read(budget + 1)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
            raise ValueError(f"{path}: not readable {kind}: {first_line(err)}") from None
    if len(data) > budget:
        raise ValueError(f"{path}: data beyond the {MAX_DATA_BYTES >> 20} MiB that --data may hold in all"
                         + (" (after decompression)" if kind != "data" else ""))
    if not data:
        raise ValueError(f"{path}: data file is empty")
    problem = binary_problem(data)
    if problem:
        raise ValueError(f"{path}: {problem}: --data takes text files (gzip, bzip2 and xz files are decompressed)")
    return data


def read_text_files(paths: Sequence[str | os.PathLike]) -> bytes:
    """The text of ``text_files(paths)`` (each read by :func:`read_data_file`), in that order, joined by newlines.

    At most MAX_DATA_BYTES in all: file sizes are summed before anything is read, and decompressed data counts
    as it is read. Every refusal is a ValueError naming the file."""
    files = text_files(paths)
    total = sum(check_input_file(path) for path in files)
    if total > MAX_DATA_BYTES:
        raise ValueError(f"{', '.join(str(path) for path in files)[:200]}: {total:,} bytes in all, more than the "
                         f"{MAX_DATA_BYTES >> 20} MiB that --data may hold")
    chunks, budget = [], MAX_DATA_BYTES
    for path in files:
        chunks.append(read_data_file(path, budget))
        budget -= len(chunks[-1])
    return b"\n".join(chunks)


@dataclass
class TextData:
    """A byte corpus split into a training part and a held-out part (1-D uint8 tensors), plus a description.

    ``description`` holds plain values for checkpoint metadata: source, bytes, sha256, train/val bytes.
    """

    train: torch.Tensor
    val: torch.Tensor
    description: dict[str, Any]

    @classmethod
    def from_bytes(cls, raw: bytes, source: str, val_fraction: float = 0.1) -> TextData:
        """Split ``raw`` into train (first 1 - val_fraction) and held-out (last val_fraction) bytes."""
        if not raw:
            raise ValueError(f"data from {source} is empty")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        n_val = int(len(data) * val_fraction)
        description = {
            "source": source,
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "train_bytes": len(data) - n_val,
            "val_bytes": n_val,
        }
        return cls(train=data[: len(data) - n_val], val=data[len(data) - n_val:], description=description)


def load_data(paths: Sequence[str | os.PathLike] = (), default: str = "prose") -> TextData:
    """The user's files if any are given, otherwise the default corpus ('stdlib' or 'prose')."""
    if paths:
        return TextData.from_bytes(read_text_files(paths), "files: " + ", ".join(Path(p).name for p in paths))
    if default == "stdlib":
        return TextData.from_bytes(stdlib_source_text(), f"python {sysconfig.get_python_version()} stdlib source")
    if default == "prose":
        return TextData.from_bytes(prose_text(), f"python {sysconfig.get_python_version()} pydoc_data.topics prose")
    raise ValueError(f"unknown default corpus {default!r}, expected 'stdlib' or 'prose'")


@functools.cache
def heldout_text() -> bytes:
    """The held-out tail (last 10%) of the pydoc_data.topics prose, exactly as training splits it."""
    return TextData.from_bytes(prose_text(), "pydoc_data.topics prose").val.numpy().tobytes()
