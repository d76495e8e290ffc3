"""The promise about the user's files: outputs are checked before any work, never replace an input, and land
completely or not at all.

* ``check_outputs(outputs, inputs)`` refuses, before any work starts, an output that is a directory, lies in a
  directory that is missing or not writable, or resolves to an input (through symlinks, hard links or a
  case-insensitive file system): one ``OutputError`` line.
* ``staged_outputs()`` writes every file of one result (a model, its external data, its adapter, its integrity
  record; a report's three files) into a hidden staging directory beside its final place, then moves them all
  into place. A failure or an interrupt before the move leaves every old output as it was and no new one; the move
  itself backs up what it replaces and restores it if a rename fails.
* A staging directory holds a lock for as long as its process lives (``fcntl.flock``, released by the kernel even
  on SIGKILL), so the next run removes staging directories a killed process left behind without touching those of
  an export still running beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no stale-directory cleanup, staging still works
    fcntl = None  # type: ignore[assignment]

STAGING_SUFFIX = ".lora-export-tmp"
LOCK_NAME = ".lock"
#: A staging directory without a lock file (its creator died between mkdtemp and the lock) counts as stale
#: once it is this old.
UNLOCKED_STALE_SECONDS = 600


class OutputError(ValueError):
    """An output that cannot or must not be written (checked before any work); one line naming the path."""


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
    """Why files cannot be written into ``directory`` (checked before any work is done), or None."""
    if not directory.is_dir():
        return f"{directory}: output directory does not exist"
    if not os.access(directory, os.W_OK):
        return f"{directory}: output directory is not writable"
    return None


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

    An output must not be an existing directory, must lie in an existing writable directory, must not name
    (through symlinks or hard links) any of ``inputs`` (None entries are skipped) or another output; with
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
    ancestor = directory.parent
    while not ancestor.exists() and ancestor != ancestor.parent:  # created with mkdir(parents=True)
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise OutputError(f"{directory}: cannot be created ({ancestor} is not a writable directory)")


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
    with the move (a stale companion, e.g. old external data). Used through :func:`staged_outputs`.
    """

    def __init__(self) -> None:
        self._staging: dict[Path, tuple[Path, int]] = {}  # final directory -> (staging directory, lock fd)
        self._files: dict[Path, Path] = {}  # final path -> temporary path
        self._removals: list[Path] = []

    def _staging_dir(self, parent: Path) -> Path:
        key = parent.resolve()
        if key not in self._staging:
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

    def cleanup(self) -> None:
        """Remove the staging directories (and whatever is left in them)."""
        for directory, fd in self._staging.values():
            shutil.rmtree(directory, ignore_errors=True)
            os.close(fd)
        self._staging.clear()


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


def read_json(path: str | os.PathLike) -> object:
    """The JSON value of a file. Raises ValueError with one line: no such file, or not readable JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON: {err}") from None
