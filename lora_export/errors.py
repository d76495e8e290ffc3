"""Every error lora-export raises, one line each, and the exit codes.

All error classes derive from :class:`LoraExportError` (a ValueError): the command line turns any of them into
``error: <line>`` on stderr and exit 2 (``EXIT_BAD_INPUT``). Each stage raises its own subclass, so a message
says where it comes from, and callers catch the base class instead of rewrapping one class into another.
"""

from __future__ import annotations

import signal

EXIT_PARITY_FAILED = 1
EXIT_BAD_INPUT = 2
#: A distributed training run whose other processes failed or stopped answering (not bad input: rerun or resume).
EXIT_PEERS_FAILED = 3
INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 128 + signal.SIGTERM


class LoraExportError(ValueError):
    """Bad input or an impossible request, refused with one line naming the file and the problem."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def short_repr(value: object, limit: int = 60) -> str:
    """repr() of a plain value for a one-line error, cut at ``limit`` characters; never expands a container
    (it may hold shared references that expand to billions of items) or converts a huge int."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return "a huge integer"
    if value is None or isinstance(value, bool | int | float | str):
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return f"a {type(value).__name__}"


class CheckpointError(LoraExportError):
    """A checkpoint that cannot be read; the message is one line naming the file and the problem."""


class ExportError(LoraExportError):
    """An export that cannot go ahead (bad input or an output that cannot be written); one line."""


class AdapterError(LoraExportError):
    """An adapter that cannot be read or does not fit its model; the message names every problem."""


class OutputError(LoraExportError):
    """An output that cannot or must not be written (checked before any work); one line naming the path."""


class ParityInputError(LoraExportError):
    """validate() cannot run on these inputs (one line): a model and checkpoint that do not belong together,
    an unreadable model, checkpoint or adapter, an adapter that does not fit, a bad option. CLI exit code 2."""


class ProviderUnavailableError(ParityInputError):
    """An execution provider the user asked for explicitly could not run (e.g. CUDA libraries missing)."""


class PeftError(LoraExportError):
    """A PEFT adapter directory lora-export cannot read or write; one line."""


class EdgeExportError(LoraExportError):
    """An edge build or comparison that cannot go ahead (bad input, failed conversion, unwritable output); one line."""


class GenerationError(LoraExportError):
    """Generation that cannot start (bad directory, adapter, prompt, device or option); one line."""


class ReportError(LoraExportError):
    """A parity.json that cannot be read or compared; one line."""


class MemoryLimitError(LoraExportError):
    """A command whose estimated peak memory is above what this process may use, refused before any work: one line
    naming both figures, the cheaper options that would fit and the option to go ahead anyway."""


class TrainingError(LoraExportError):
    """Training that cannot start or resume: a device that does not work, settings or a resume checkpoint that do
    not fit the run, a distributed environment that is not whole; one line."""


class PeersFailedError(RuntimeError):
    """Another process of a distributed run died or timed out (a collective failed): one line, exit
    ``EXIT_PEERS_FAILED``. Not a LoraExportError: the input was fine."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that every cleanup runs."""
