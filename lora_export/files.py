"""The promise about the user's files: outputs are checked before any work, never replace an input, and land
completely or not at all.

* ``check_outputs(outputs, inputs)`` refuses, before any work starts, an output that is a directory, lies in a
  directory that is not writable or cannot be created, or resolves to an input (through symlinks, hard links or
  a case-insensitive file system): one ``OutputError`` line.
* Missing directories on an output's path are created when its files are staged, like ``--report DIR``'s, and
  removed again if the result does not land (see ``StagedOutputs``).
* ``staged_outputs()`` writes every file of one result (a model, its external data, its adapter, its integrity
  record; a report's three files) into a hidden staging directory beside its final place, then moves them all
  into place. A failure or an interrupt before the move leaves every old output as it was and no new one; the move
  itself backs up what it replaces and restores it if a rename fails.
* A staging directory holds a lock for as long as its process lives (``fcntl.flock``, released by the kernel even
  on SIGKILL), so the next run removes staging directories a killed process left behind without touching those of
  an export still running beside it.
* Inputs are read from regular files only (``check_input_file``, ``open_input``): a directory, FIFO, socket or
  device is one ``ValueError`` line, never a hang; every JSON input goes through ``read_json`` / ``parse_json``,
  which cap its size (before reading) and its nesting depth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no stale-directory cleanup, staging still works
    fcntl = None  # type: ignore[assignment]

STAGING_SUFFIX = ".lora-export-tmp"
LOCK_NAME = ".lock"
#: A staging directory without a lock file (its creator died between mkdtemp and the lock) counts as stale
#: once it is this old.
UNLOCKED_STALE_SECONDS = 600


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


def output_dir_problem(directory: Path) -> str | None:
    """Why files cannot be written into ``directory`` (checked before any work is done), or None.

    A missing directory is fine when its nearest existing ancestor is a writable directory: staging creates it.
    """
    if directory.is_dir():
        return None if os.access(directory, os.W_OK) else f"{directory}: output directory is not writable"
    ancestor = directory
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        return f"{directory}: output directory cannot be created ({ancestor} is not a writable directory)"
    return None


def make_missing_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those this call created, outermost first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made beside us meanwhile: not ours to remove
            continue
        created.append(path)
    return created


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file: equal after resolving symlinks, or the same inode when both exist."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = True) -> None:
    """Refuse (OutputError) outputs that cannot be written or would replace an input, before any work.

    An output must not be an existing directory, must lie in a writable directory or one that can be made
    (``output_dir_problem``), must not name (through symlinks or hard links) any of ``inputs`` (None entries are
    skipped) or another output; with
    ``overwrite`` False it must not exist at all (the CLI's default: replacing a file takes ``--force``).
    """
    outputs = [Path(p) for p in outputs]
    inputs = [Path(p) for p in inputs if p is not None]
    for index, output in enumerate(outputs):
        if output.is_dir():
            raise OutputError(f"{output}: is a directory, expected a file path")
        problem = output_dir_problem(output.parent)
        if problem:
            raise OutputError(problem)
        for source in inputs:
            if _same_file(output, source):
                raise OutputError(f"{output}: the output would overwrite the input {source}; choose another output")
        for other in outputs[:index]:
            if _same_file(output, other):
                raise OutputError(f"{output}: named twice as an output ({other})")
        if not overwrite and (output.exists() or output.is_symlink()):
            raise OutputError(f"{output}: exists; pass --force to replace it (or choose another output)")


def check_output_dir(directory: str | os.PathLike, files: Iterable[str],
                     inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse (OutputError) an output directory that is a file or cannot be created, or whose ``files`` would
    replace an input or a directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory}: exists and is not a directory")
    if directory.is_dir():
        check_outputs([directory / name for name in files], inputs)
        return
    problem = output_dir_problem(directory)
    if problem:
        raise OutputError(problem)


def check_empty_output_dir(directory: str | os.PathLike, files: Iterable[str],
                           inputs: Iterable[str | os.PathLike | None] = (), *, overwrite: bool = False,
                           refusal: str = "") -> None:
    """Refuse (OutputError), before any work, a directory that one result is to fill: :func:`check_output_dir`,
    and unless ``overwrite`` it must be new or empty ("exists and is not an empty directory" + ``refusal``, e.g.
    how to replace it). Staging left there by a killed earlier write is removed first: it is not content.

    The result's files are then written with :func:`staged_outputs`, which makes the directory and its missing
    parents and removes them again if the result does not land."""
    directory = Path(directory)
    remove_stale_staging(directory)
    if not overwrite and directory.is_dir() and any(directory.iterdir()):
        raise OutputError(f"{directory}: exists and is not an empty directory{refusal}")
    check_output_dir(directory, files, inputs)


def _lock(directory: Path) -> int:
    """Create and hold (flock) the lock file of a staging directory; returns its descriptor."""
    fd = os.open(directory / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _is_stale(directory: Path) -> bool:
    """Whether a staging directory's process is gone: its lock can be taken (or it never got one and is old)."""
    lock = directory / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            return time.time() - directory.stat().st_mtime > UNLOCKED_STALE_SECONDS
        return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove staging directories in ``directory`` left by killed processes; returns what was removed."""
    if fcntl is None or not directory.is_dir():
        return []
    removed = []
    for entry in directory.glob(f".*{STAGING_SUFFIX}"):
        if entry.is_dir() and not entry.is_symlink() and _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class StagedOutputs:
    """Files of one result, written to staging directories beside their final places and moved in together.

    ``path(final)`` gives the temporary path to write ``final`` to; ``remove(final)`` marks a file to delete
    with the move (a stale companion, e.g. old external data). A final directory that is missing is created
    with its missing parents, and removed again by cleanup() unless commit() succeeded. Used through
    :func:`staged_outputs`.
    """

    def __init__(self) -> None:
        self._staging: dict[Path, tuple[Path, int]] = {}  # final directory -> (staging directory, lock fd)
        self._files: dict[Path, Path] = {}  # final path -> temporary path
        self._removals: list[Path] = []
        self._created: list[Path] = []  # directories made for this result, outermost first
        self._committed = False

    def _staging_dir(self, parent: Path) -> Path:
        key = parent.resolve()
        if key not in self._staging:
            self._created += make_missing_dirs(parent)
            remove_stale_staging(parent)
            directory = Path(tempfile.mkdtemp(prefix=".", suffix=STAGING_SUFFIX, dir=parent))
            self._staging[key] = (directory, _lock(directory))
        return self._staging[key][0]

    def path(self, final: str | os.PathLike) -> Path:
        """Where to write ``final`` now; it is moved into place by commit()."""
        final = Path(final)
        if final not in self._files:
            self._files[final] = self._staging_dir(final.parent) / final.name
        return self._files[final]

    def remove(self, final: str | os.PathLike) -> None:
        """Delete ``final`` (if it exists) when the staged files move into place."""
        self._removals.append(Path(final))

    def commit(self) -> None:
        """Move every written file into place and do the removals: all of them or, on failure, none."""
        mode = default_file_mode()
        moves = [(tmp, final) for final, tmp in self._files.items() if tmp.exists()]
        removals = [p for p in self._removals if p.exists() and p not in self._files]
        done: list[tuple[Path, Path | None]] = []  # (final, backup of what it replaced)
        try:
            for final in removals:
                backup = self._staging_dir(final.parent) / f"{final.name}.replaced"
                os.replace(final, backup)
                done.append((final, backup))
            for tmp, final in moves:
                os.chmod(tmp, mode)  # mkstemp-like private modes become the usual ones
                backup = None
                if final.exists() or final.is_symlink():
                    backup = tmp.with_name(f"{tmp.name}.replaced")
                    os.replace(final, backup)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    if backup is not None:
                        os.replace(backup, final)
                    raise
                done.append((final, backup))
        except BaseException:
            for final, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is None:
                        final.unlink()
                    else:
                        os.replace(backup, final)
            raise
        self._committed = True

    def cleanup(self) -> None:
        """Remove the staging directories (and whatever is left in them), and without a commit the directories
        made for this result (those still empty: another process may have written there meanwhile)."""
        for directory, fd in self._staging.values():
            shutil.rmtree(directory, ignore_errors=True)
            os.close(fd)
        self._staging.clear()
        if not self._committed:
            for directory in reversed(self._created):
                with contextlib.suppress(OSError):
                    directory.rmdir()
        self._created.clear()


@contextlib.contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """A :class:`StagedOutputs` whose files move into place when the block ends without an exception."""
    stage = StagedOutputs()
    try:
        yield stage
        stage.commit()
    finally:
        stage.cleanup()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary path beside ``path``, then rename it into place.

    A failure leaves no partial file behind and the old file as it was.
    """
    with staged_outputs() as stage:
        write(str(stage.path(path)))


def write_json_and_markdown(directory: str | os.PathLike, stem: str, result: object, markdown: str) -> list[Path]:
    """``<stem>.json`` (``result``, indented) and ``<stem>.md`` (``markdown``) in ``directory`` (created), each
    written atomically; returns their paths. The benchmarks' result files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.json", directory / f"{stem}.md"]
    for path, text in zip(paths, (json.dumps(result, indent=1) + "\n", markdown), strict=True):
        atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
    return paths


# --------------------------------------------------------------------------- reading inputs

#: The largest JSON file (or JSON metadata value) read: lora-export's configs, records and reports are kilobytes,
#: and parsed JSON can take some 25 times its text in Python objects, so a hostile file costs under 0.5 GiB.
MAX_JSON_BYTES = 16 << 20
#: The deepest nesting of a JSON value read (lora-export's own files nest a few levels).
MAX_JSON_DEPTH = 64


def _input_problem(status: os.stat_result, max_bytes: int | None) -> str | None:
    """Why a file with this status may not be read as an input, or None."""
    mode = status.st_mode
    if stat.S_ISDIR(mode):
        return "is a directory, expected a file"
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"is {kind}, not a regular file (reading it could block or never end)"
    if max_bytes is not None and status.st_size > max_bytes:
        return f"{status.st_size:,} bytes, more than the {max_bytes:,} read from such a file"
    return None


def check_input_file(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file",
                     error: type[ValueError] = ValueError) -> int:
    """Refuse (``error``, a ValueError class, one line naming ``path``) an input that is missing, cannot be read,
    is not a regular file (a directory, FIFO, socket or device: reading one can block forever or never end) or is
    larger than ``max_bytes``; returns its size. Symlinks are followed. The one rule for every input file
    lora-export reads; ``what`` names it in the message for a missing file ("no such <what>"), ``error`` is the
    reading stage's own class (CheckpointError, AdapterError, ...)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as err:
        raise error(f"{path}: cannot be read: {err.strerror or err}") from None
    problem = _input_problem(status, max_bytes)
    if problem:
        raise error(f"{path}: {problem}")
    return status.st_size


@contextlib.contextmanager
def open_input(path: str | os.PathLike, max_bytes: int | None = None) -> Iterator[BinaryIO]:
    """``path`` opened for binary reading after :func:`check_input_file`, whose rule is checked again on the open
    file: it is opened non-blocking, so a FIFO put in its place after the first check cannot hang the open (on a
    regular file the flag changes nothing). Raises ValueError naming the path."""
    check_input_file(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ValueError(f"{path}: cannot be read: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as file:
        problem = _input_problem(os.fstat(fd), max_bytes)
        if problem:
            raise ValueError(f"{path}: {problem}")
        yield file


def parse_json(text: str | bytes, where: str, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON value of ``text`` (bytes are UTF-8). Raises ValueError, one line starting with ``where``: longer
    than ``max_bytes``, not JSON, or nested deeper than MAX_JSON_DEPTH (never a RecursionError)."""
    if len(text) > max_bytes:
        raise ValueError(f"{where}: more than {max_bytes:,} bytes of JSON")
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except RecursionError:  # json's own recursion guard, far below the depth that could crash
        raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an int past Python's digit limit
        raise ValueError(f"{where}: not readable JSON: {str(err)[:200]}") from None
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:  # depth checked without recursion, so that no later reader of the value can hit a limit
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return value


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON value of a file (UTF-8). Raises ValueError with one line naming the file: missing or not a
    regular file (:func:`check_input_file`), larger than ``max_bytes`` (known from its size before reading), not
    JSON, or nested deeper than MAX_JSON_DEPTH. The one reader of every JSON file lora-export takes as input."""
    with open_input(path, max_bytes) as file:
        try:
            raw = file.read(max_bytes + 1)  # one more byte: a file that grew since the check is still refused
        except OSError as err:
            raise ValueError(f"{path}: cannot be read: {err.strerror or err}") from None
    return parse_json(raw, str(path), max_bytes)
