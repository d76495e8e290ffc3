"""The console entry points ``lora-export`` and ``lora-train``.

They import the command line (and with it torch and ONNX Runtime, a second or more) inside the interrupt
handler, so a Ctrl-C at any moment prints one line and exits with 130 instead of a KeyboardInterrupt traceback;
SIGTERM is handled alike (exit 143), unwinding so that staged outputs are cleaned up.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from .errors import INTERRUPTED_EXIT, TERMINATED_EXIT, Terminated


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


def _run(command: str) -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        from . import cli

        getattr(cli, command)()
    except Terminated:
        print("error: terminated", file=sys.stderr)
        raise SystemExit(TERMINATED_EXIT) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None


def export_main() -> None:
    """``lora-export``."""
    _run("export_cli")


def train_main() -> None:
    """``lora-train``."""
    _run("train_cli")
