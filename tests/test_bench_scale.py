"""tools/bench_scale.py (issue 18): the peak RSS and stage times it measures against children whose memory and
timing are known, its parsing of the CLI's lines, its merging and tables of records, and one real run of
``lora-export`` on the smallest sized checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).parent.parent / "tools"
MIB = 1 << 20


def bench_scale():
    """tools/bench_scale.py as a module (registered, as its dataclass needs); it imports make_sized.py from beside
    it, as when run as a script."""
    if "bench_scale" not in sys.modules:
        if str(TOOLS) not in sys.path:
            sys.path.insert(0, str(TOOLS))
        spec = importlib.util.spec_from_file_location("bench_scale", TOOLS / "bench_scale.py")
        sys.modules["bench_scale"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["bench_scale"]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# --------------------------------------------------------------------------- measuring a command


def test_peak_rss_is_the_commands_own_not_this_process(tmp_path):
    """A child that holds 300 MiB peaks at 300 MiB + the interpreter; one that allocates nothing at the interpreter
    alone, although this process holds 400 MiB more when it starts them (os.wait4 of a direct child would report
    this process's size at the fork for both)."""
    tool = bench_scale()
    ballast = b"\x01" * (400 * MIB)  # this process's RSS high-water mark
    idle = tool.run_measured(python("pass"), tmp_path, 30)
    held = tool.run_measured(python(f"x = b'\\x01' * {300 * MIB}"), tmp_path, 30)
    assert len(ballast) == 400 * MIB
    assert idle.exit_code == held.exit_code == 0
    assert 2 * MIB < idle.peak_rss_bytes < 60 * MIB
    assert 300 * MIB < held.peak_rss_bytes < idle.peak_rss_bytes + 300 * MIB + 30 * MIB
    assert list(tmp_path.iterdir()) == []  # GNU time's file removed


def test_stage_times_follow_the_lines_as_they_arrive(tmp_path):
    """Stage lines on stderr and summary lines on stdout (unflushed: the child runs unbuffered) timed as printed:
    stage a sleeps 1.0 s, stage b 0.5 s; exit status kept."""
    tool = bench_scale()
    code = ("import sys, time\nprint('[lora-export] a', file=sys.stderr)\ntime.sleep(1.0)\n"
            "print('[lora-export] b', file=sys.stderr)\nprint('parity: 1/2 (50%)', file=sys.stderr)\ntime.sleep(0.5)\n"
            "print('time:        load 0.2s, export 1.5s')\ntime.sleep(0.3)\nsys.exit(3)")
    run = tool.run_measured(python(code), tmp_path, 30)
    assert run.exit_code == 3 and not run.timed_out
    stages = dict(tool.stage_seconds(run.events, run.wall_s, None))
    assert list(stages) == ["startup", "a", "b", "exit", "other"]
    assert 1.0 <= stages["a"] < 2.5 and 0.5 <= stages["b"] < 2.0 and 0.3 <= stages["exit"] < 2.0
    assert stages["other"] < 0.2
    assert sum(stages.values()) == pytest.approx(run.wall_s)


def test_timeout_interrupts_then_kills(tmp_path, monkeypatch):
    """Past the timeout the command gets SIGINT; one that ignores it is killed after the grace (no peak then). The
    timeout leaves the interpreter time to start on a loaded machine: a SIGINT before GNU time has forked it goes
    to time alone, which ignores it."""
    tool = bench_scale()
    run = tool.run_measured(python("import time; time.sleep(60)"), tmp_path, 5)
    assert run.timed_out and run.exit_code != 0 and run.wall_s < 15 and run.peak_rss_bytes > 0
    monkeypatch.setattr(tool, "INTERRUPT_GRACE_S", 0.5)
    stubborn = python("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)")
    run = tool.run_measured(stubborn, tmp_path, 5)
    assert run.timed_out and run.wall_s < 15 and run.peak_rss_bytes is None
    assert tool.status_of({"timed_out": run.timed_out, "exit_code": run.exit_code}) == "timeout"


# --------------------------------------------------------------------------- parsing and records


def same_stages(stages: list[tuple[str, float]], expected: list[tuple[str, float]]) -> bool:
    """The same stage names in order, and the same seconds to 1e-9."""
    return ([name for name, _ in stages] == [name for name, _ in expected]
            and [s for _, s in stages] == pytest.approx([s for _, s in expected], abs=1e-9))


def test_stages_from_the_cli_lines():
    """The CLI's lines (stage lines, progress lines, summary, verdict) split into stages by hand-computed times."""
    tool = bench_scale()
    events = [(2.0, "stderr", "[lora-export] loading checkpoint"),
              (3.0, "stderr", "[lora-export] exporting (merged, opset 23) with torch.onnx dynamo"),
              (5.0, "stderr", "[lora-export] writing model.onnx"),
              (5.5, "stdout", "time:        load 1.0s, export 2.0s, check 0.1s, simplify 0.0s, save 0.4s "
                              "(validation follows)"),
              (6.0, "stderr", "[lora-export] quantizing to int8 (onnxruntime.quantization)"),
              (7.0, "stdout", "int8:        model.int8.onnx (4.03 MB)"),
              (9.0, "stderr", "parity: 1/8 (12%) merged/CPUExecutionProvider/n1"),
              (10.0, "stdout", "PASS: 8 comparisons ..."),
              (10.0, "stdout", "report: model_parity/parity.html (validation 2.9 s)")]
    stdout = [line for _, stream, line in events if stream == "stdout"]
    clock, validation_s = tool.parse_summary(stdout)
    assert clock == {"load": 1.0, "export": 2.0, "check": 0.1, "simplify": 0.0, "save": 0.4}
    assert validation_s == 2.9
    assert same_stages(tool.stage_seconds(events, 10.5, validation_s), [
        ("startup", 2.0), ("loading checkpoint", 1.0), ("exporting (merged, opset 23) with torch.onnx dynamo", 2.0),
        ("writing model.onnx", 0.5), ("quantizing to int8 (onnxruntime.quantization)", 1.0), ("validation", 2.9),
        ("exit", 0.5), ("other", 0.6)])
    crashed = tool.stage_seconds(events[:2], 4.5, None)  # a stage open at the end runs to the end
    assert same_stages(crashed, [("startup", 2.0), ("loading checkpoint", 1.0),
                                 ("exporting (merged, opset 23) with torch.onnx dynamo", 1.5), ("other", 0.0)])


def record(tool, label: str, form: str, validate: bool, wall: float, peak: int | None, round_index: int = 0,
           exit_code: int = 0) -> dict:
    params = tool.parse_count(label)
    return {"params": params, "label": label, "parameters": params, "form": form, "validate": validate,
            "checkpoint": "pt", "round": round_index, "wall_s": wall, "peak_rss_bytes": peak,
            "rss_multiple": tool.rss_multiple(peak, params), "exit_code": exit_code, "timed_out": False,
            "load_before": [0.5, 0.5, 0.5], "files_bytes": params * 4, "stages": [["startup", 1.0]],
            "machine": {"cpu": "cpu", "cores": 2, "memory_gb": 25.3}}


def test_records_merge_by_key_and_summarize(tmp_path):
    """A key measured again replaces all its old rounds, other keys stay; a row is the fastest wall and the
    highest peak of its rounds, failed if any round failed; targets and the 1.23B / 105M ratio judged."""
    tool = bench_scale()
    old = [record(tool, "405M", "merged", False, 100.0, 3_000_000_000, 0),
           record(tool, "405M", "merged", False, 90.0, 3_100_000_000, 1),
           record(tool, "405M", "merged", True, 200.0, 4_000_000_000)]
    new = [record(tool, "405M", "merged", False, 80.0, 4_000_000_000, 0),
           record(tool, "405M", "merged", False, 70.0, 3_500_000_000, 1, exit_code=-9)]
    merged = tool.merge_records(old, new)
    assert [(r["validate"], r["wall_s"]) for r in merged] == [(False, 80.0), (False, 70.0), (True, 200.0)]
    rows = tool.summarize(merged)
    assert [(r["wall_s"], r["peak_rss_bytes"], r["rounds"], r["status"]) for r in rows] == [
        (70.0, 4_000_000_000, 2, "killed (signal 9)"), (200.0, 4_000_000_000, 1, "ok")]
    assert rows[1]["rss_multiple"] == pytest.approx(4e9 / 1.62e9)
    assert [tool.target_text(row) for row in rows] == ["<= 2.0x: MISSED", "<= 3.0x: met"]
    ratios = [record(tool, "1.23B", "adapters", True, 1600.0, 10**10), record(tool, "105M", "adapters", True, 100.0,
                                                                               10**9)]
    markdown = tool.render_markdown(merged + ratios + [record(tool, "27M", "int4", False, 9.0, None, exit_code=-9)])
    assert "| adapters | yes | pt | 16.0 | MISSED |" in markdown
    assert "| 27M | 27M | int4 | no | pt | 9.0 | - | - | - |" in markdown
    assert tool.load_warning((1.5, 0.1, 0.1)) and tool.load_warning((1.49, 9.0, 9.0)) is None


# --------------------------------------------------------------------------- one real run


def test_real_run_of_the_smallest_size(tmp_path):
    """bench_scale.py --params 200K --forms adapters --validation without: the checkpoint made once and reused,
    lora-export run as a user runs it, its files (model + adapter, about the fp32 weights) measured and removed,
    its stages those of the CLI, the JSON, table and plot written."""
    tool = bench_scale()
    work, results = tmp_path / "work", tmp_path / "results"
    assert tool.main(["--params", "200K", "--forms", "adapters", "--validation", "without", "--work", str(work),
                      "--results", str(results)]) == 0
    (run,) = json.loads((results / "bench_scale.json").read_text())["records"]
    assert (run["form"], run["validate"], run["exit_code"], run["params"]) == ("adapters", False, 0, 200_000)
    assert run["command"].endswith("-o model.onnx --adapters-as-inputs --no-memory-check --no-validate")
    assert set(run["files"]) == {"model.onnx", "model.onnx_adapter", "model.onnx_adapter.json"}
    assert 0.95 < run["files_bytes"] / (run["parameters"] * 4) < 1.2
    checkpoint = work / "sized-200K.pt"
    assert run["peak_rss_bytes"] > checkpoint.stat().st_size
    assert [name for name, _ in run["stages"]][:3] == ["startup", "loading checkpoint",
                                                       "exporting (adapters, opset 23) with torch.onnx dynamo"]
    assert set(run["export_clock"]) >= {"load", "export"} and run["validation_s"] is None
    assert sorted(path.name for path in work.iterdir()) == ["sized-200K.pt"]  # outputs removed
    made = checkpoint.stat().st_mtime_ns
    assert tool.ensure_checkpoint(work, 200_000, ".pt", 60) == checkpoint and checkpoint.stat().st_mtime_ns == made
    assert "| 200K | 4.086M | adapters | no | pt |" in (results / "bench_scale.md").read_text()
    assert (results / "bench_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
