"""Execution providers: open an ONNX Runtime session on CPU or CUDA and say what really ran.

What ran is read from the created session's ``get_providers()``, never from ``get_available_providers()``:
onnxruntime-gpu lists CUDA even where its libraries fail to load, and then silently runs on CPU. A provider that
did not run is reported as ``not run: <reason>``, with the reason taken from ONNX Runtime's own log.
``torch`` is imported before any session is created: a PyTorch built for the same CUDA major version then lets
ONNX Runtime's CUDA provider find its libraries.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnxruntime as ort
import torch  # noqa: F401  (loads the CUDA libraries a CUDA build of torch ships, before ONNX Runtime looks)

from ..errors import ParityInputError, ProviderUnavailableError, first_line
from ..export.ort_session import quiet_session

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class ProviderStatus:
    """One requested execution provider: whether a session really ran on it, and why not."""

    requested: str  # 'cpu' or 'cuda'
    name: str  # e.g. 'CUDAExecutionProvider'
    ran: bool
    session_providers: list[str]  # session.get_providers() of the created session ([] when none)
    reason: str | None = None  # why it did not run

    def status(self) -> str:
        """'ran' or 'not run: <reason>'."""
        return "ran" if self.ran else f"not run: {self.reason}"

    def brief(self) -> str:
        """For summaries and tables: 'ran', or why not in a few words. A CPU that did not run was skipped on purpose
        (fp16), and says why; an accelerator that did not run was only tried (asked for explicitly, one that cannot
        run is an error), so it is 'not available on this machine', its long reason kept in parity.json."""
        if self.ran:
            return "ran"
        return f"not run: {self.reason}" if self.requested == "cpu" else (
            "not run: not available on this machine (reason in parity.json)")


# --------------------------------------------------------------------------- providers


@contextlib.contextmanager
def _native_stderr_into(buffer: list[str]) -> Iterator[None]:
    """Redirect file descriptor 2, where ONNX Runtime's C++ logger writes, into ``buffer`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            buffer.append(capture.read().decode("utf-8", "replace"))


def _cuda_failure_reason(log: str) -> str:
    """A one-line reason from ONNX Runtime's log of a session that fell back from CUDA to CPU.

    e.g. 'the CUDA provider library did not load (libcublasLt.so.13: cannot open shared object file: ...);
    ONNX Runtime requires cuDNN 9.* and CUDA 13.*'.
    """
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    library = re.search(r"with error: ([^\n]+)", log)
    requirement = re.search(r"Require (.+?)\. Please", log)
    reason = (f"the CUDA provider library did not load ({library.group(1).strip()})" if library
              else "ONNX Runtime fell back to CPUExecutionProvider (the CUDA provider did not load)")
    return f"{reason}; ONNX Runtime requires {requirement.group(1)}" if requirement else reason


def normalize_providers(providers: Sequence[str] | None) -> list[str]:
    """['cpu', ...] from short or full names; CPU always first. None means CPU plus CUDA when it runs."""
    if providers is None:
        return ["cpu", "cuda"]
    aliases = {**{short: short for short in PROVIDERS}, **{full.lower(): short for short, full in PROVIDERS.items()}}
    wanted = []
    for provider in providers:
        short = aliases.get(provider.strip().lower())
        if short is None:
            raise ParityInputError(f"unknown provider {provider!r}: choose from {', '.join(PROVIDERS)}")
        wanted.append(short)
    return ["cpu"] + [p for p in dict.fromkeys(wanted) if p != "cpu"]


def missing_from_build(provider: str) -> str | None:
    """Why ``provider`` ('cpu' or 'cuda') cannot run whatever the model, decided without opening a session: this
    onnxruntime build lacks it. None when it may run (only a session tells: ``open_session``)."""
    name = PROVIDERS[provider]
    if name in ort.get_available_providers():
        return None
    return f"this onnxruntime build has no {name}" + (" (install onnxruntime-gpu)" if provider == "cuda" else "")


def requested_providers(providers: Sequence[str] | None, explicit: bool) -> list[str]:
    """The providers to run (``normalize_providers``, 'cpu' first). One asked for explicitly that this onnxruntime
    build lacks is refused (ProviderUnavailableError) before any work: not after a big model's PyTorch reference."""
    wanted = normalize_providers(providers)
    for provider in wanted if explicit else []:
        missing = missing_from_build(provider)
        if missing is not None:
            raise ProviderUnavailableError(f"{PROVIDERS[provider]} was requested but cannot run: {missing}")
    return wanted


def open_session(model_path: str | os.PathLike, provider: str) -> tuple[ort.InferenceSession | None, ProviderStatus]:
    """An ONNX Runtime session on ``provider`` ('cpu' or 'cuda') and what really ran, from get_providers().

    A CUDA session that silently fell back to CPU is closed and reported with the reason from ORT's log.
    Raises ParityInputError when even the CPU session cannot load the model.
    """
    name = PROVIDERS[provider]
    missing = missing_from_build(provider)
    if missing is not None:
        return None, ProviderStatus(provider, name, False, [], missing)
    if provider == "cpu":
        try:
            session = quiet_session(model_path, [name])
        except Exception as err:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
            raise ParityInputError(f"{model_path}: ONNX Runtime cannot load the model: {first_line(err)}"
                                   ) from None
        return session, ProviderStatus(provider, name, True, session.get_providers())

    log: list[str] = []
    error = ""
    with _native_stderr_into(log), contextlib.redirect_stdout(io.StringIO()):
        if hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):  # best effort: finds the nvidia pip packages' libraries
                ort.preload_dlls()
        try:
            session = quiet_session(model_path, [name, PROVIDERS["cpu"]])
        except Exception as err:  # e.g. a CUDA driver error raised instead of a fallback
            session, error = None, first_line(err)
    if session is None:
        return None, ProviderStatus(provider, name, False, [], f"session creation failed: {error}")
    ran = session.get_providers()
    if ran[0] != name:
        return None, ProviderStatus(provider, name, False, ran, _cuda_failure_reason("".join(log)))
    return session, ProviderStatus(provider, name, True, ran)


