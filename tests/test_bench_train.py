"""tools/bench_train.py (issue 19): its step timing against lines of known arrival times, and one ``--quick`` run
whose one- and two-process runs are checked against the checkpoints they wrote."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_export.model.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


@pytest.fixture(scope="module")
def bench_train():
    """tools/bench_train.py as a module; it imports bench_scale.py and make_sized.py from beside it."""
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module("bench_train")
    finally:
        sys.path.remove(str(TOOLS))


def test_step_time_leaves_out_the_first_and_last_tenth(bench_train):
    """20 steps, a line every 2: the first tenth took 5 s (warm-up), the last 9 s (evaluation, checkpoint), the
    eight between 0.5 s a step, except the fourth at 1.0: 16 steps in 9 s. Other lines are ignored."""
    at, lines = 5.0, [(0.1, "parameters: total 1 | trainable 1 | lora 1"), (0.2, "W torchrun warning")]
    for tenth in range(1, 11):
        at += 5.0 if tenth == 1 else 9.0 if tenth == 10 else 2.0 if tenth == 5 else 1.0
        lines.append((at, f"adapt: {2 * tenth}/20 ({10 * tenth}%) loss=1.0, eval=2.0"))
    seconds, steps, tenths = bench_train.step_seconds(lines)
    assert steps == 16
    assert seconds == pytest.approx(9.0 / 16)
    assert tenths == pytest.approx([0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5])
    assert bench_train.step_seconds(lines[:4]) is None  # two progress lines: nothing between first and last


def test_quick_run_has_one_and_two_processes_on_the_same_global_batch(tmp_path):
    """Both process counts measured with positive tok/s; the checkpoints (read here, not from the JSON) say one
    and two processes trained on the same global batch, split 4 / 2 + 2, and their first losses agree (the data
    order depends on the global batch only)."""
    results, work = tmp_path / "results", tmp_path / "work"
    done = subprocess.run([sys.executable, str(TOOLS / "bench_train.py"), "--quick", "--results", str(results),
                           "--work", str(work)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((results / "bench_train.json").read_text())
    runs = {run["procs"]: run for run in result["runs"]}
    assert sorted(runs) == [1, 2] and all(run["error"] is None for run in runs.values())
    assert all(run["tok_per_s"] > 0 and run["steps_timed"] >= 8 for run in runs.values())

    records = {procs: read_checkpoint(run["checkpoint"])["training"] for procs, run in runs.items()}
    assert [records[procs]["world_size"] for procs in (1, 2)] == [1, 2]
    assert [records[procs]["batch_size"] for procs in (1, 2)] == [4, 2]
    assert records[1]["global_batch"] == records[2]["global_batch"] == 4
    for procs, run in runs.items():
        assert run["tokens_per_step"] == records[procs]["global_batch"] * records[procs]["seq_len"]
        assert run["tok_per_s"] == pytest.approx(run["tokens_per_step"] / run["step_s"])
    assert records[1]["losses"][0] == pytest.approx(records[2]["losses"][0], abs=1e-4)
    assert "| demo | " in (results / "bench_train.md").read_text()
