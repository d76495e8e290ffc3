"""Compare two parity reports (``parity.json``): what changed in verdict, errors and latency between two runs.

Rows are matched by (variant, provider, case, output) for errors and by (variant, backend, shape) for latency;
rows present in only one report are listed as added or removed. Like polygraphy's ``--load-outputs`` comparison or
Olive's metric comparison, but of the parity verdicts lora-export writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .files import read_json


class ReportError(ValueError):
    """A parity.json that cannot be read or compared; one line."""


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """A parity.json (or the report directory holding it) as a dict. Raises ReportError."""
    path = Path(path)
    if path.is_dir():
        path = path / "parity.json"
    try:
        document = read_json(path)
    except ValueError as err:
        raise ReportError(f"{err} (expected a report directory or its parity.json)") from None
    if not isinstance(document, dict) or document.get("schema_version") != 1 or "comparisons" not in document:
        raise ReportError(f"{path}: not a lora-export parity.json (schema_version 1)")
    return document


def _errors(document: dict) -> dict[tuple, dict]:
    return {(c["variant"], c["provider"], c["case"], c["output"]): c["metrics"] for c in document["comparisons"]}


def _latencies(document: dict) -> dict[tuple, float]:
    return {(t["variant"], t["backend"], f"{t['batch']}x{t['seq_len']}"): t["p50_ms"] for t in document["latencies"]}


def compare_reports(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """{status: [before, after], errors: [...], latency: [...], added: [...], removed: [...]}: per matched error
    row max_abs and tolerance_used before / after, per latency row p50 before / after and their ratio."""
    errors_a, errors_b = _errors(before), _errors(after)
    latency_a, latency_b = _latencies(before), _latencies(after)
    errors = [{"row": list(key), "max_abs": [errors_a[key]["max_abs"], errors_b[key]["max_abs"]],
               "tolerance_used": [errors_a[key]["tolerance_used"], errors_b[key]["tolerance_used"]]}
              for key in errors_a if key in errors_b]
    latency = [{"row": list(key), "p50_ms": [latency_a[key], latency_b[key]],
                "ratio": latency_b[key] / latency_a[key] if latency_a[key] else None}
               for key in latency_a if key in latency_b]
    return {
        "status": [before["status"], after["status"]],
        "models": [before["model"]["path"], after["model"]["path"]],
        "errors": errors,
        "latency": latency,
        "added": [list(key) for key in errors_b if key not in errors_a],
        "removed": [list(key) for key in errors_a if key not in errors_b],
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def render_comparison(diff: dict[str, Any]) -> list[str]:
    """Human-readable lines: verdicts, the largest error changes first, every latency ratio."""
    lines = [f"verdict: {diff['status'][0]} -> {diff['status'][1]}  ({diff['models'][0]} -> {diff['models'][1]})"]

    def growth(row: dict) -> float:
        before, after = row["max_abs"]
        return (after or 0.0) - (before or 0.0)

    rows = sorted(diff["errors"], key=growth, reverse=True)
    lines.append(f"errors: {len(rows)} matched rows; largest changes of max |onnx - torch|:")
    for row in rows[:10]:
        (a, b), (ta, tb) = row["max_abs"], row["tolerance_used"]
        lines.append(f"  {' / '.join(row['row'])}: max_abs {_fmt(a)} -> {_fmt(b)}, tolerance used {_fmt(ta)} -> "
                     f"{_fmt(tb)}")
    lines.append("latency p50 (ms), after / before:")
    for row in diff["latency"]:
        (a, b), ratio = row["p50_ms"], row["ratio"]
        lines.append(f"  {' / '.join(row['row'])}: {a:.3f} -> {b:.3f} ({_fmt(ratio)}x)")
    for name in ("added", "removed"):
        if diff[name]:
            lines.append(f"{name}: {', '.join(' / '.join(row) for row in diff[name][:10])}")
    return lines
