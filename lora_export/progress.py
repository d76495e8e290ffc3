"""Progress of long work, one protocol for every stage: ``Progress``.

Work reports two kinds of news: ``stage(message)``, a line about the work (a pipeline step begun: 'loading
checkpoint'), and ``advance(done, total, label)``, counted work (``done`` of ``total`` training steps or parity
cases finished, ``label`` naming the latest); ``close()`` ends the counted work. ``Progress()`` (``SILENT``) shows
nothing, ``ConsoleProgress`` shows it (stage lines, and a tqdm bar on a terminal or sparse plain lines elsewhere),
``CallbackProgress`` hands it to functions. Public entry points that took the older forms (a bool, a callback)
convert them once with ``as_progress``.

tqdm redraws its bar with carriage returns, which a log keeps as hundreds of frames on one line; off a terminal
``LineProgress`` writes one line per tenth of the work instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

LINES = 10  # lines written off a terminal over the whole run


class LineProgress:
    """The part of tqdm's interface we use, writing ``desc: done/total (pct%) postfix`` at each tenth."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc = total, desc
        self.n, self.postfix, self._next = 0, "", 1

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        if not (self.total and self.n * LINES >= self._next * self.total):
            return
        while self.n * LINES >= self._next * self.total:  # one line, however many tenths this step crossed
            self._next += 1
        suffix = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n // self.total}%){suffix}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        pass


def progress_bar(*, total: int, desc: str, **tqdm_options: Any) -> tqdm | LineProgress:
    """A tqdm bar on stderr when it is a terminal, else LineProgress."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, **tqdm_options)
    return LineProgress(total, desc)


class Progress:
    """Where long work reports how far it got; this base shows nothing (``SILENT``)."""

    def stage(self, message: str) -> None:
        """A line about the work: a step begun, a count worth knowing."""

    def advance(self, done: int, total: int, label: str = "") -> None:
        """``done`` of ``total`` counted units finished, ``label`` naming the latest."""

    def close(self) -> None:
        """The counted work ended (or was interrupted): a bar goes away."""


SILENT = Progress()


class ConsoleProgress(Progress):
    """Stage lines (``prefix`` + message, on stderr or with ``stdout`` on stdout) and the counted work as a bar
    named ``bar`` (``progress_bar``: tqdm on a terminal, a line per tenth elsewhere; tqdm options such as unit and
    leave pass through)."""

    def __init__(self, bar: str, *, prefix: str = "[lora-export] ", stdout: bool = False, **bar_options: Any) -> None:
        self.name, self.prefix, self.stdout, self.bar_options = bar, prefix, stdout, bar_options
        self._bar: tqdm | LineProgress | None = None

    def stage(self, message: str) -> None:
        print(f"{self.prefix}{message}", file=sys.stdout if self.stdout else sys.stderr, flush=True)

    def advance(self, done: int, total: int, label: str = "") -> None:
        if self._bar is not None and self._bar.total != total:
            self.close()
        if self._bar is None:
            self._bar = progress_bar(total=total, desc=self.name, **self.bar_options)
        self._bar.set_postfix_str(label, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CallbackProgress(Progress):
    """Hands each report to a function: ``on_stage(message)``, ``on_advance(done, total, label)``; None ignores it."""

    def __init__(self, on_stage: Callable[[str], None] | None = None,
                 on_advance: Callable[[int, int, str], None] | None = None) -> None:
        self.on_stage, self.on_advance = on_stage, on_advance

    def stage(self, message: str) -> None:
        if self.on_stage is not None:
            self.on_stage(message)

    def advance(self, done: int, total: int, label: str = "") -> None:
        if self.on_advance is not None:
            self.on_advance(done, total, label)


def as_progress(progress: Progress | bool | Callable[[int, int, str], None] | None, bar: str,
                **console_options: Any) -> Progress:
    """The older forms of a public ``progress`` argument as a Progress: one as is, True a ConsoleProgress with
    the bar named ``bar`` (``console_options`` passed on), False / None SILENT, a function its ``advance``."""
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return CallbackProgress(on_advance=progress)
    return ConsoleProgress(bar, **console_options) if progress else SILENT
