"""The one elementwise tolerance rule: an output ``got`` is within tolerance of a reference ``ref`` where
``|got - ref| <= atol + rtol * |ref|`` (numpy's allclose: equality passes, NaN never does), the absolute part
optionally growing with the largest ``|ref|`` along the last axis (one position's logits).

Every elementwise judgement in the package uses it: parity's logits and decode steps (through
``parity.metrics.Tolerance``), the ``.ort`` check, and the export's check that simplification kept the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def boundary(reference: np.ndarray, atol: float, rtol: float, atol_scale: float | None = None) -> np.ndarray:
    """Each element's limit (float64, the shape of ``reference``): atol + rtol * |reference|, plus atol_scale *
    max |reference| over the last axis when atol_scale is set."""
    abs_ref = np.abs(np.asarray(reference, dtype=np.float64))
    limit = atol + rtol * abs_ref
    if atol_scale:
        limit += atol_scale * abs_ref.max(axis=-1, keepdims=True)
    return limit


@dataclass(frozen=True)
class Deviation:
    """|got - ref| (float64) and each element's limit, of the same shape."""

    diff: np.ndarray
    limit: np.ndarray

    @property
    def max_abs(self) -> float:
        """The largest |got - ref| (NaN when an element is NaN)."""
        return float(self.diff.max())

    @property
    def used(self) -> float:
        """The largest share of its limit an element uses, |got - ref| / limit: at most 1 passes. An exact element
        uses nothing, even against a limit of 0; NaN anywhere gives NaN."""
        shares = np.divide(self.diff, self.limit, out=np.zeros_like(self.diff), where=self.diff != 0)
        return float(shares.max())

    @property
    def outside(self) -> int:
        """How many elements are not within their limit (NaN counts as outside)."""
        return int(np.sum(~(self.diff <= self.limit)))

    @property
    def passed(self) -> bool:
        """Every element within its limit."""
        return self.outside == 0


def deviation(got: np.ndarray, reference: np.ndarray, atol: float, rtol: float,
              atol_scale: float | None = None) -> Deviation:
    """``got`` against ``reference`` (same shape) under the rule above, in float64."""
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    return Deviation(diff, boundary(reference, atol, rtol, atol_scale))
