"""tools/bench_mixed_batch.py (issue 20): one ``--quick`` run, its results held against themselves (ratios from the
medians it reports) and its rows' check against the single-adapter graph."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture(scope="module")
def bench():
    """tools/bench_mixed_batch.py as a module; it imports bench_perf, bench_mixed_generate and make_sized."""
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module("bench_mixed_batch")
    finally:
        sys.path.remove(str(TOOLS))


def test_quick_run_writes_consistent_results(bench, tmp_path):
    assert bench.main(["--quick", "--results", str(tmp_path)]) == 0  # every mixed row matched its own adapter's run
    result = json.loads((tmp_path / "bench_mixed_batch.json").read_text())
    (model,) = result["models"]
    (entry,) = model["threads"]
    assert (model["model"], model["batch"], model["seq"], entry["threads"]) == ("tiny", 8, 64, 1)
    assert entry["slots"] == ["own", "r4", "r12", "r16", "base", "own", "r4", "r12"]
    assert entry["rows_max_abs"] <= 1e-4
    median = {name: entry["ms"][name]["median_ms"] for name in bench.BACKENDS}
    assert all(0 < entry["ms"][name]["min_ms"] <= median[name] for name in bench.BACKENDS)
    slots, one, merged = (median[name] for name in bench.BACKENDS)
    want = {"slots_over_one_adapter": slots / one, "slots_over_merged": slots / merged}
    assert entry["ratios"] == pytest.approx(want)
    assert entry["met"]["slots_over_merged"] == (slots / merged <= 1.25)
    markdown = (tmp_path / "bench_mixed_batch.md").read_text()
    assert "| tiny | " in markdown and f"{entry['ratios']['slots_over_merged']:.3f}" in markdown
