"""Progress for long work: a tqdm bar on a terminal, sparse plain lines elsewhere (a CI log, a pipe, a file).

tqdm redraws its bar with carriage returns, which a log keeps as hundreds of frames on one line; off a terminal
``LineProgress`` writes one line per tenth of the work instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

LINES = 10  # lines written off a terminal over the whole run


class LineProgress:
    """The part of tqdm's interface we use, writing ``desc: done/total (pct%) postfix`` at each tenth."""

    def __init__(self, iterable: Iterable[Any] | None, total: int, desc: str, enabled: bool) -> None:
        self.iterable, self.total, self.desc, self.enabled = iterable, total, desc, enabled
        self.n, self.postfix, self._next = 0, "", 1

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        if not (self.enabled and self.total and self.n * LINES >= self._next * self.total):
            return
        while self.n * LINES >= self._next * self.total:  # one line, however many tenths this step crossed
            self._next += 1
        suffix = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n // self.total}%){suffix}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str,
                 enabled: bool = True, **tqdm_options: Any) -> tqdm | LineProgress:
    """A tqdm bar on stderr when it is a terminal, else LineProgress; nothing at all when not ``enabled``."""
    if total is None and iterable is not None:
        total = len(iterable)  # type: ignore[arg-type]
    if enabled and sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, **tqdm_options)
    return LineProgress(iterable, total or 0, desc, enabled)
