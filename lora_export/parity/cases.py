"""The seeded inputs of a parity check: held-out prose and random bytes at the lengths that matter.

Lengths around the local window (w - 1, w, w + 1, not a multiple of w), N = 1 and N = max_seq_len, batches of
1 to 4, padding masks; and a held-out prose prompt for greedy generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..corpus import heldout_text
from ..model.transformer import VOCAB_SIZE, ModelConfig


@dataclass
class Case:
    """One seeded input: input_ids and attention_mask int64 [batch, seq] (1 = real token)."""

    name: str
    description: str
    source: str  # where the bytes come from
    input_ids: np.ndarray
    attention_mask: np.ndarray

    def info(self) -> dict:
        """The plain facts of the case for reports (no arrays)."""
        batch, seq = self.input_ids.shape
        return {"name": self.name, "description": self.description, "source": self.source, "batch": batch,
                "seq_len": seq, "real_tokens": int(self.attention_mask.sum())}


def show_bytes(data: Iterable[int]) -> str:
    """Bytes for a report: printable ASCII as is, everything else (and the backslash) as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in map(int, data))


# --------------------------------------------------------------------------- cases


def _text_rows(text: bytes, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` windows of ``seq`` bytes from ``text`` at seeded offsets -> int64 [batch, seq]."""
    data = np.frombuffer(text, dtype=np.uint8)
    starts = rng.integers(0, len(data) - seq, size=batch)
    return np.stack([data[s: s + seq] for s in starts]).astype(np.int64)


def generation_prompt(length: int, rng: np.random.Generator, text: bytes | None = None) -> np.ndarray:
    """A prompt [1, length] int64 from ``text`` (default: the held-out prose): the start of a seeded line that
    begins with a letter, or a seeded window of the text when no line is long enough."""
    text = heldout_text() if text is None else text
    lines = [line.strip() for line in text.split(b"\n")]
    lines = [line for line in lines if len(line) >= length and line[:1].isalpha()]
    if not lines:
        return _text_rows(text, 1, length, rng)
    line = lines[int(rng.integers(len(lines)))]
    return np.frombuffer(line[:length], dtype=np.uint8).astype(np.int64)[None, :]


def parity_cases(config: ModelConfig, seed: int = 0, text: bytes | None = None,
                 source: str = "held-out prose") -> list[Case]:
    """The seeded case list for a model config (w = local window, L = max_seq_len); the real-text cases come from
    ``text`` (default: the held-out prose), named ``source`` in the reports.

    Held-out prose at N = 1 (batch 1); N = w-1, w, w+1 and N not a multiple of w when <= L (batch 2);
    N = L (batch 4); random bytes at N = L; and padding at N = L: right-padded rows of lengths L, L/2, 1 plus
    one left-padded row (attention_mask zeros; compared at real positions only). Lengths already covered
    are not repeated.
    """
    rng = np.random.default_rng(seed)
    text = heldout_text() if text is None else text
    if len(text) <= config.max_seq_len:
        raise ValueError(f"the validation text ({source}) has {len(text)} bytes; it needs more than "
                         f"max_seq_len = {config.max_seq_len}")
    window, max_len = config.local_attn_window_size, config.max_seq_len
    ragged = min(max_len, 2 * window + (window + 1) // 2)
    while ragged > 1 and ragged % window == 0:
        ragged -= 1
    lengths = [
        ("n1", 1, 1, "N = 1, batch 1"),
        ("window_minus_1", window - 1, 2, f"N = w-1 = {window - 1} (one short of the local window)"),
        ("window", window, 2, f"N = w = {window} (exactly one local-attention block)"),
        ("window_plus_1", window + 1, 2, f"N = w+1 = {window + 1} (spills into a second block)"),
        ("not_window_multiple", ragged, 2, f"N = {ragged}, not a multiple of w = {window} (inner padding)"),
        ("max_len", max_len, 4, f"N = max_seq_len = {max_len}, batch 4"),
    ]
    cases, seen = [], set()
    for name, seq, batch, description in lengths:
        if 1 <= seq <= max_len and seq not in seen:
            seen.add(seq)
            ids = _text_rows(text, batch, seq, rng)
            cases.append(Case(name, description, source, ids, np.ones_like(ids)))
    random_ids = rng.integers(0, VOCAB_SIZE, size=(2, max_len), dtype=np.int64)
    cases.append(Case("random_bytes", f"uniform random bytes, N = {max_len}, batch 2", "random bytes",
                      random_ids, np.ones_like(random_ids)))
    pad_ids = _text_rows(text, 4, max_len, rng)
    mask = np.zeros_like(pad_ids)
    half = (max_len + 1) // 2
    mask[0, :], mask[1, :half], mask[2, :1], mask[3, max_len - half:] = 1, 1, 1, 1
    pad_ids[mask == 0] = rng.integers(0, VOCAB_SIZE, size=int((mask == 0).sum()))
    cases.append(Case("padding", f"right-padded rows of lengths {max_len}, {half}, 1 and one left-padded row "
                      f"of length {half}; padding holds random bytes", source, pad_ids, mask))
    return cases


