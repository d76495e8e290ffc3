"""The seeded inputs of a parity check: held-out prose and random bytes at the lengths that matter, in as many
rows and as long as the model's size allows (``CasePlan``).

Lengths around the local window (w - 1, w, w + 1, not a multiple of w), N = 1 and N = max_seq_len, batches of
1 to 4, padding masks; and a held-out prose prompt for greedy generation. A model of more than
``FULL_PLAN_PARAMETERS`` parameters runs one row per length, and one of more than ``ONE_ROW_PARAMETERS`` stops at
two and a half local windows, with fewer greedy bytes, held-out windows and timed runs: at 1.2B parameters the full
plan would take hours on two CPU cores and GBs of activations (attention scores of batch 4 x 1024 tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..corpus import heldout_text
from ..model.transformer import VOCAB_SIZE, ModelConfig

#: Up to this many parameters every case runs at full length and batch (the plan the demo and the tests run).
FULL_PLAN_PARAMETERS = 100_000_000
#: Up to this many, one row per length up to max_seq_len; above it, lengths up to two and a half local windows.
ONE_ROW_PARAMETERS = 500_000_000
FULL, ONE_ROW, SHORT = "full", "one row per length", "short"
#: Windows of held-out prose that int8 / int4 are judged on, and the precision table measured on, in the full plan.
EVAL_WINDOWS = 16


@dataclass(frozen=True)
class CasePlan:
    """How much a parity check of a model with ``parameters`` weights runs: rows per real-text case (``batch``),
    the longest case (``max_seq`` tokens), greedy bytes (``generate_bytes``), decode steps of a genai decoder
    (``decode_bytes``, None: to the end of the context), held-out prose windows for int8 / int4 and the precision
    table (``eval_windows``), latency warm-up and timed runs; ``reason`` says why, in words."""

    parameters: int
    tier: str  # FULL, ONE_ROW or SHORT
    batch: int
    max_seq: int
    generate_bytes: int
    decode_bytes: int | None
    eval_windows: int
    latency_warmup: int
    latency_runs: int
    reason: str

    def record(self, cases: list[Case], **ran: int) -> dict:
        """The plan as the report states it: {parameters, tier, cases (their count), max_seq (the longest case;
        the plan's own without cases), max_batch, reason} and what else ran (``ran``: e.g. decode_bytes)."""
        longest = max((case.input_ids.shape[1] for case in cases), default=self.max_seq)
        return {"parameters": self.parameters, "tier": self.tier, "cases": len(cases), "max_seq": longest,
                "max_batch": max((case.input_ids.shape[0] for case in cases), default=self.batch), **ran,
                "reason": self.reason}


def ragged_length(config: ModelConfig) -> int:
    """The case length that is not a multiple of the local window w: about 2.5 w (at most max_seq_len)."""
    window = config.local_attn_window_size
    ragged = min(config.max_seq_len, 2 * window + (window + 1) // 2)
    while ragged > 1 and ragged % window == 0:
        ragged -= 1
    return ragged


def case_plan(parameters: int, config: ModelConfig, generate_bytes: int, latency_runs: int,
              latency_warmup: int) -> CasePlan:
    """The plan for a model of ``parameters`` weights and ``config``: the full plan up to FULL_PLAN_PARAMETERS
    (``generate_bytes``, ``latency_runs`` and ``latency_warmup`` as asked), one row per length up to
    ONE_ROW_PARAMETERS (16 greedy bytes, 8 held-out windows, 5 timed runs at most), above it lengths up to
    ``ragged_length`` (8 greedy bytes, 4 windows, 3 timed runs at most). Every plan keeps N = 1 and the lengths
    around the local window."""
    window, longest = config.local_attn_window_size, config.max_seq_len
    size = f"{parameters:,} parameters"
    if parameters <= FULL_PLAN_PARAMETERS:
        return CasePlan(parameters, FULL, 4, longest, generate_bytes, None, EVAL_WINDOWS, latency_warmup, latency_runs,
                        f"{size} (<= {FULL_PLAN_PARAMETERS:,}): every case at full length and batch")
    if parameters <= ONE_ROW_PARAMETERS:
        return CasePlan(parameters, ONE_ROW, 1, longest, min(generate_bytes, 16), 2 * window, EVAL_WINDOWS // 2,
                        min(latency_warmup, 1), min(latency_runs, 5),
                        f"{size} (> {FULL_PLAN_PARAMETERS:,}): one row per length up to max_seq_len = {longest} "
                        f"(padding in 3 rows), at most 16 greedy bytes, {2 * window} decode steps, "
                        f"{EVAL_WINDOWS // 2} held-out windows and 5 timed runs: batches of 4 x {longest} tokens would "
                        "take tens of minutes and GBs of activations on a CPU")
    short = ragged_length(config)
    return CasePlan(parameters, SHORT, 1, short, min(generate_bytes, 8), window, EVAL_WINDOWS // 4,
                    min(latency_warmup, 1), min(latency_runs, 3),
                    f"{size} (> {ONE_ROW_PARAMETERS:,}): one row per length up to N = {short}, past the local "
                    f"window's edges (positions past {short} of max_seq_len = {longest} are not compared), padding "
                    f"in 3 rows, at most 8 greedy bytes, {window} decode steps, {EVAL_WINDOWS // 4} held-out windows "
                    "and 3 timed runs, so that validation takes minutes, not hours, on a CPU")


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


def _padding_case(text: bytes, source: str, longest: int, rows: int, rng: np.random.Generator) -> Case:
    """Right-padded rows of lengths ``longest`` (with 4 ``rows`` or more), half of it and 1, and one left-padded
    row of half the length; padding holds random bytes."""
    half = (longest + 1) // 2
    right = [longest, half, 1] if rows >= 4 else [half, 1]
    pad_ids = _text_rows(text, len(right) + 1, longest, rng)
    mask = np.zeros_like(pad_ids)
    for row, length in enumerate(right):
        mask[row, :length] = 1
    mask[-1, longest - half:] = 1
    pad_ids[mask == 0] = rng.integers(0, VOCAB_SIZE, size=int((mask == 0).sum()))
    return Case("padding", f"right-padded rows of lengths {', '.join(map(str, right))} and one left-padded row "
                f"of length {half}; padding holds random bytes", source, pad_ids, mask)


def parity_cases(config: ModelConfig, seed: int = 0, text: bytes | None = None,
                 source: str = "held-out prose", plan: CasePlan | None = None) -> list[Case]:
    """The seeded case list for a model config (w = local window, L = max_seq_len) under ``plan`` (None: the
    full plan); the real-text cases come from ``text`` (default: the held-out prose), named ``source`` in the
    reports.

    Held-out prose at N = 1 (batch 1); N = w-1, w, w+1 and N not a multiple of w when <= L (batch 2);
    N = L (batch 4); random bytes at N = L (batch 2); and padding at N = L: right-padded rows of lengths L, L/2, 1
    plus one left-padded row (attention_mask zeros; compared at real positions only). Lengths already covered
    are not repeated. A plan caps the rows of each case at ``plan.batch`` (the padding case then leaves out its
    unpadded row) and the lengths at ``plan.max_seq`` (which takes L's place).
    """
    rng = np.random.default_rng(seed)
    text = heldout_text() if text is None else text
    if len(text) <= config.max_seq_len:
        raise ValueError(f"the validation text ({source}) has {len(text)} bytes; it needs more than "
                         f"max_seq_len = {config.max_seq_len}")
    window, max_len = config.local_attn_window_size, config.max_seq_len
    longest, rows = (max_len, 4) if plan is None else (plan.max_seq, plan.batch)
    ragged = ragged_length(config)
    lengths = [
        ("n1", 1, 1, "N = 1, batch 1"),
        ("window_minus_1", window - 1, 2, f"N = w-1 = {window - 1} (one short of the local window)"),
        ("window", window, 2, f"N = w = {window} (exactly one local-attention block)"),
        ("window_plus_1", window + 1, 2, f"N = w+1 = {window + 1} (spills into a second block)"),
        ("not_window_multiple", ragged, 2, f"N = {ragged}, not a multiple of w = {window} (inner padding)"),
        ("max_len", max_len, 4, f"N = max_seq_len = {max_len}, batch {min(4, rows)}"),
    ]
    cases, seen = [], set()
    for name, seq, batch, description in lengths:
        if 1 <= seq <= longest and seq not in seen:
            seen.add(seq)
            ids = _text_rows(text, min(batch, rows), seq, rng)
            cases.append(Case(name, description, source, ids, np.ones_like(ids)))
    random_ids = rng.integers(0, VOCAB_SIZE, size=(min(2, rows), longest), dtype=np.int64)
    cases.append(Case("random_bytes", f"uniform random bytes, N = {longest}, batch {min(2, rows)}", "random bytes",
                      random_ids, np.ones_like(random_ids)))
    cases.append(_padding_case(text, source, longest, rows, rng))
    return cases
