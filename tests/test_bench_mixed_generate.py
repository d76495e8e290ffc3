"""tools/bench_mixed_generate.py (issue 20): its rows and figures from known inputs, and one ``--quick`` run whose
batched bytes the tool itself holds against the single-row bytes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


@pytest.fixture(scope="module")
def bench():
    """tools/bench_mixed_generate.py as a module; it imports make_sized.py from beside it."""
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module("bench_mixed_generate")
    finally:
        sys.path.remove(str(TOOLS))


def test_rows_have_eight_lengths_and_cycle_through_the_base_and_every_adapter(bench):
    files = [Path(f"a{index}.onnx_adapter") for index in range(4)]
    prompts, adapters = bench.rows_for(files, context=256, new_bytes=64)
    assert len(prompts) == len(set(map(len, prompts))) == 8 and max(map(len, prompts)) <= 96
    assert adapters == [None, *files, None, files[0], files[1]]
    prompts, _ = bench.rows_for(files, context=64, new_bytes=16)
    assert max(map(len, prompts)) + 16 <= 64


def test_figures_are_tokens_over_seconds_and_the_speedup_compares_medians(bench, tmp_path):
    checkpoint = ROOT / "models" / "demo.pt"
    seconds = {"batched": [1.0, 2.0, 4.0], "single_api": [8.0, 8.0, 9.0], "single_warm": [5.0, 6.0, 7.0]}
    row = bench.summary("m", checkpoint, [b"ab"] * 8, [None] * 8, 10, seconds, [True, True, True])
    assert row["figures"]["batched"]["tok_per_s_best"] == 80.0 and row["figures"]["batched"]["tok_per_s_median"] == 40.0
    assert row["speedup"] == {"single_api": 4.0, "single_warm": 3.0} and row["met"] and row["identical"]
    differed = bench.summary("m", checkpoint, [b"ab"] * 8, [None] * 8, 10, seconds, [True, False, True])
    assert differed["identical"] is False


def test_quick_run_writes_its_figures_and_finds_the_batched_bytes_equal_to_single_rows(tmp_path):
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(TOOLS / "bench_mixed_generate.py"), "--quick", "--results",
                           str(results), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((results / "bench_mixed_generate.json").read_text())
    (model,) = result["models"]
    assert model["identical"] and model["rows"] == 8 and model["new_bytes"] == 16
    assert all(figure["tok_per_s_median"] > 0 and len(figure["seconds"]) == 1 for figure in model["figures"].values())
    assert sorted(set(model["adapters"]) - {None}) == ["model.onnx_adapter", "r12.onnx_adapter", "r16.onnx_adapter",
                                                       "r4.onnx_adapter"]
    assert result["machine"]["versions"]["onnxruntime_genai"]
    assert "| quick |" in (results / "bench_mixed_generate.md").read_text()
