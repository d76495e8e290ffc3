"""The numbers of a parity check: tolerances per precision, logit metrics, the verdict on them, and timing.

``compare_logits(onnx, reference, ...)`` measures ONNX Runtime's logits [batch, seq, 256] against the PyTorch
reference at the real (attention_mask = 1) positions: max absolute error, max relative error ``|a - b| / |b|``
with ``b`` the reference (polygraphy's definition: zeros of ``b`` are replaced by float64 epsilon), mean absolute
error, cosine similarity, NaN/Inf, the share of the tolerance used ``max |a - b| / (atol + rtol * |b|)`` (at most
1 is numpy-allclose), next-byte top-1 agreement and next-byte cross-entropy. ``judge`` turns them into failures.
The elementwise rule itself is ``lora_export.tolerance``'s, reached through ``Tolerance.deviation``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ParityInputError
from ..tolerance import Deviation, deviation

LATENCY_WARMUP = 3
LATENCY_RUNS = 20
LATENCY_MAX_SEQ = 256
POLYGRAPHY_EPSILON = 2.220446049250313e-16
#: Bin edges of the error histogram: log10 of |onnx - torch| / (atol + rtol * |torch|), each element's error as a
#: share of its own pass boundary (1 = the boundary, 0 in log10), in quarter decades from 1e-8 (exact matches are
#: counted in the first bin) to 1e2 (larger errors in the last). Precisions judged without an elementwise limit
#: (int8, int4) are binned against the fp32 boundary, for scale.
ERROR_HISTOGRAM_EDGES = np.linspace(-8.0, 2.0, 41)


@dataclass(frozen=True)
class Tolerance:
    """The pass limits of one precision.

    atol / rtol: every logit at a real position must satisfy |onnx - torch| <= atol + rtol * |torch|
    (numpy allclose); None switches the elementwise check off (int8 is judged by top-1 and eval loss).
    atol_scale: when set, atol grows by atol_scale * the largest |torch| logit at the same position (fp16: its
    rounding error scales with the logits' size, see FP16_ATOL_EPS); ``Tolerance.deviation`` holds to the limit.
    top1_min: least share of real positions whose next-byte argmax agrees. loss_delta_max: largest allowed
    |eval loss(onnx) - eval loss(torch)| in nats per byte, None for not judged.
    """

    atol: float | None
    rtol: float | None
    top1_min: float
    loss_delta_max: float | None
    atol_scale: float | None = None

    @property
    def elementwise(self) -> bool:
        """Judged at every logit (fp32, fp16). False (int8, int4): judged only by top-1 agreement and eval loss on
        held-out prose (``lora_export.parity.precisions.heldout_case``), wherever the model is judged; every other
        measurement is reported, not judged."""
        return self.atol is not None

    @property
    def exact_bytes(self) -> bool:
        """Greedy bytes must equal PyTorch's: only where every argmax must agree (top1_min 1, fp32). Below that
        (fp16, int8, int4) a near-tie may take the other branch, so the bytes are reported, free to drift."""
        return self.top1_min >= 1.0

    def _atol_text(self, ref: str) -> str:
        if not self.atol_scale:
            return f"{self.atol:g}"
        scaled = f"{self.atol_scale:.3g} * max |{ref}| at the position"
        return f"{scaled} + {self.atol:g}" if self.atol else scaled

    def limit_text(self, ref: str = "ref") -> str:
        """The elementwise limit in words, e.g. 'atol 0.0001 + rtol 0.001 * |ref|'."""
        return f"atol {self._atol_text(ref)} + rtol {self.rtol:g} * |{ref}|"

    def limits(self, ref: str = "ref") -> str:
        """atol and rtol in words, e.g. 'atol 0.0001, rtol 0.001'."""
        return f"atol {self._atol_text(ref)}, rtol {self.rtol:g}"

    def limit_basis(self) -> str:
        """Why the absolute limit scales with the logits, in words for a pass rule ('' when it does not)."""
        if not self.atol_scale:
            return ""
        return (f"the absolute limit follows the logits' scale: fp16 keeps 11 significant bits (epsilon 2^-10), and a "
                f"logit's rounding error grows with the largest logit at its position, so atol there is "
                f"{self.atol_scale / FP16_EPS:g} epsilons of that logit's magnitude")

    def deviation(self, got: np.ndarray, reference: np.ndarray) -> Deviation:
        """``got`` against ``reference`` (both [..., V]) under this tolerance's elementwise limit, atol + atol_scale
        * max |reference| at the position + rtol * |reference| (``lora_export.tolerance``; ``.limit`` holds each
        element's): the one elementwise judgement of logits, decode steps and ``.ort`` models. A tolerance without
        an elementwise limit (int8, int4) measures against fp32's boundary, for scale: its verdict does not use it."""
        limits = self if self.elementwise else TOLERANCES["fp32"]
        return deviation(got, reference, limits.atol, limits.rtol, limits.atol_scale)

    def describe(self) -> str:
        """One line, e.g. 'atol 0.0001, rtol 0.001, top-1 >= 100%'."""
        parts = [] if self.atol is None else [self.limits()]
        parts.append(f"top-1 >= {self.top1_min:.0%}")
        if self.loss_delta_max is not None:
            parts.append(f"|eval loss delta| <= {self.loss_delta_max:g} nats/byte")
        return ", ".join(parts)


#: float16's machine epsilon (10 fraction bits): a value stored in fp16 is within FP16_EPS / 2 of itself, relative.
FP16_EPS = 2.0**-10
#: fp16's absolute limit at a position, in FP16_EPS * the largest |torch| logit there. A logit is a sum of products
#: of fp16-rounded activations and weights, so its error scales with the size of the logits at its position (the
#: hidden state and head weights they come from), not with its own value: a near-zero logit is as noisy as the
#: largest. 16: on the 4-block demo checkpoint the worst position measured 6.1 FP16_EPS * max |torch| (scoring
#: graph on ORT CPU, random bytes; 3.0 through genai), so 16 leaves ~2.6x headroom for deeper models; rtol FP16_EPS
#: covers the logit's own final rounding. Quality beyond rounding is judged by top-1 agreement and eval loss.
FP16_ATOL_EPS = 16

#: Default limits per precision; the reference is always the fp32 PyTorch model.
#: fp32: ORT and PyTorch sum in different orders (blocked MatMul, fused LayerNorm / Softmax), which leaves
#: ~1e-6 absolute noise on logits of magnitude ~1 and grows with depth and width. atol 1e-4 sits ~100x above
#: that floor and ~100x below a real bug (one wrong weight moves logits by 1e-2 or more); rtol 1e-3 keeps
#: large logits of trained models (|z| ~ 10-30) to the same relative precision.
#: fp16 is held elementwise to a limit derived from its precision and the logits' scale (FP16_ATOL_EPS), on every
#: provider that runs it; int8 and int4 (weight-only, 16 levels per block) by top-1 agreement and held-out eval
#: loss, int4 with twice int8's loss margin.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, top1_min=1.0, loss_delta_max=None),
    "fp16": Tolerance(atol=0.0, rtol=FP16_EPS, top1_min=0.99, loss_delta_max=0.01,
                      atol_scale=FP16_ATOL_EPS * FP16_EPS),
    "int8": Tolerance(atol=None, rtol=None, top1_min=0.9, loss_delta_max=0.05),
    "int4": Tolerance(atol=None, rtol=None, top1_min=0.9, loss_delta_max=0.1),
}


@dataclass
class Metrics:
    """ONNX output vs reference at the real positions of one case; None where a metric does not apply."""

    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    tolerance_used: float | None  # max |a-b| / Tolerance.deviation's limit; <= 1 passes the elementwise check
    outside: int  # elements outside Tolerance.deviation's limit (0 when the elementwise check is off)
    elements: int  # elements compared
    worst_index: list[int]  # [batch row, position, byte] of the largest |a - b|
    finite: bool  # no NaN / Inf in the ONNX output and the reference
    top1_agreement: float  # share of positions whose ONNX argmax is the reference's top byte (ties within tol.)
    top1_exact: float  # share of positions with exactly the same argmax
    loss_ref: float | None  # next-byte cross-entropy (nats/byte) of the reference; None for N = 1
    loss_onnx: float | None


def resolve_tolerance(precision: str, atol: float | None, rtol: float | None) -> Tolerance:
    """TOLERANCES[precision] with atol / rtol overridden where given (a given atol is the whole absolute limit: it
    replaces fp16's scaled one)."""
    if precision not in TOLERANCES:
        raise ParityInputError(f"unknown precision {precision!r}, expected one of {', '.join(TOLERANCES)}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and np.isfinite(value)):
            raise ParityInputError(f"{name} must be a finite number >= 0, got {value}")
    tolerance = TOLERANCES[precision]
    if atol is None and rtol is None:
        return tolerance
    if not tolerance.elementwise:
        raise ParityInputError(f"{precision} models are judged by top-1 agreement and eval loss on held-out prose, "
                               "not element-wise: --atol and --rtol do not apply")
    return replace(tolerance, atol=atol if atol is not None else tolerance.atol,
                   rtol=rtol if rtol is not None else tolerance.rtol,
                   atol_scale=None if atol is not None else tolerance.atol_scale)


# --------------------------------------------------------------------------- metrics


def next_byte_loss(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> float | None:
    """Mean next-byte cross-entropy (nats) of logits [B, N, V] where position and target are both real."""
    valid = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
    if not valid.any():
        return None
    scores = logits[:, :-1][valid].astype(np.float64)
    targets = input_ids[:, 1:][valid]
    top = scores.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=-1))
    return float(np.mean(log_norm - scores[np.arange(len(targets)), targets]))


def compare_logits(got: np.ndarray, ref: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
                   tolerance: Tolerance) -> tuple[Metrics, np.ndarray]:
    """Metrics of ONNX logits ``got`` against the reference ``ref`` (both [B, N, V]) at real positions.

    Returns (metrics, counts of log10 |got - ref| / (atol + rtol |ref|) over ERROR_HISTOGRAM_EDGES; exact matches in
    the first bin).
    """
    real = attention_mask != 0
    a, b = got[real].astype(np.float64), ref[real].astype(np.float64)  # [P, V]
    measured = tolerance.deviation(a, b)
    diff = measured.diff
    rel = diff / np.where(b == 0, POLYGRAPHY_EPSILON, np.abs(b))
    flat_a, flat_b = a.ravel(), b.ravel()
    norms = np.linalg.norm(flat_a) * np.linalg.norm(flat_b)
    cosine = float(flat_a @ flat_b / norms) if norms > 0 else float(np.array_equal(flat_a, flat_b))
    worst = np.unravel_index(int(np.nanargmax(diff)) if not np.isnan(diff).all() else 0, diff.shape)
    row, pos = np.argwhere(real)[worst[0]]
    if tolerance.elementwise:
        tolerance_used, outside = measured.used, measured.outside
        tie = measured.limit[np.arange(len(b)), b.argmax(axis=-1)]
    else:
        tolerance_used, outside, tie = None, 0, 0.0
    pick = a.argmax(axis=-1)
    ref_at_pick = b[np.arange(len(b)), pick]
    metrics = Metrics(
        max_abs=measured.max_abs, max_rel=float(rel.max()), mean_abs=float(diff.mean()), cosine=cosine,
        tolerance_used=tolerance_used, outside=outside, elements=int(diff.size),
        worst_index=[int(row), int(pos), int(worst[1])],
        finite=bool(np.isfinite(a).all() and np.isfinite(b).all()),
        top1_agreement=float(np.mean(ref_at_pick >= b.max(axis=-1) - tie)),
        top1_exact=float(np.mean(pick == b.argmax(axis=-1))),
        loss_ref=next_byte_loss(ref, input_ids, attention_mask),
        loss_onnx=next_byte_loss(got, input_ids, attention_mask),
    )
    share = diff / measured.limit
    low, high = ERROR_HISTOGRAM_EDGES[0], ERROR_HISTOGRAM_EDGES[-1]
    log_share = np.log10(np.clip(share[np.isfinite(share)], 10.0**low, 10.0**high))
    return metrics, np.histogram(log_share, bins=ERROR_HISTOGRAM_EDGES)[0]


def judge(metrics: Metrics, tolerance: Tolerance) -> list[str]:
    """The reasons ``metrics`` fail ``tolerance`` (empty: passed)."""
    failures = []
    if not metrics.finite:
        failures.append("NaN or Inf in the output")
    if metrics.tolerance_used is not None and not metrics.tolerance_used <= 1.0:
        failures.append(f"max_abs {metrics.max_abs:.3e}: {metrics.outside}/{metrics.elements} values outside "
                        f"{tolerance.limit_text()} ({metrics.tolerance_used:.3g}x the tolerance)")
    if not metrics.top1_agreement >= tolerance.top1_min:
        failures.append(f"top-1 agreement {metrics.top1_agreement:.2%} < {tolerance.top1_min:.0%}")
    if tolerance.loss_delta_max is not None and metrics.loss_ref is not None:
        delta = abs(metrics.loss_onnx - metrics.loss_ref)
        if not delta <= tolerance.loss_delta_max:
            failures.append(f"eval loss delta {delta:.3g} > {tolerance.loss_delta_max:g} nats/byte")
    return failures


def percentiles_ms(step: Callable[[], object], warmup: int, runs: int) -> tuple[float, float]:
    """(p50, p90) in milliseconds of ``runs`` timed calls after ``warmup`` untimed ones.

    Time each backend in its own block like this, never call by call in turns with another: ONNX Runtime's intra-op
    threads spin for a while after a run, and two sessions taking turns slow each other (~1.5x measured).
    """
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))
