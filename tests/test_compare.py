"""compare-reports as a library (``lora_export.report.compare``): rows matched by variant / provider / case /
output, the largest error changes first, latency ratios, genai decode runs matched by run, warnings for other
inputs, a malformed report refused in one line, control characters escaped."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from conftest import make_result

from lora_export.errors import ReportError
from lora_export.parity.validate import validate
from lora_export.report.compare import compare_reports, load_report, render_comparison
from lora_export.report.render import report_json, write_reports

SHA_A, SHA_B = "a" * 64, "b" * 64
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def document() -> dict:
    """A valid parity.json document: merged, CPU, cases n4 and padding, latency 1.5 ms (PyTorch) and 0.2 ms (ORT)."""
    return report_json(make_result(failing=False))


def with_errors(doc: dict, max_abs: dict[str, float]) -> dict:
    """``doc`` with the named cases' max_abs set (a copy)."""
    doc = copy.deepcopy(doc)
    for comparison in doc["comparisons"]:
        if comparison["case"] in max_abs:
            comparison["metrics"]["max_abs"] = max_abs[comparison["case"]]
    return doc


def decode_run(variant: str, max_abs: float, step_ms: list[float]) -> dict:
    return {"variant": variant, "device": "cpu", "prompt": "The ", "prompt_source": "held-out prose",
            "prompt_bytes": 4, "new_bytes": len(step_ms), "reference": [65] * len(step_ms),
            "generated": [65] * len(step_ms), "identical": True, "first_mismatch": None, "max_abs": max_abs,
            "tolerance_used": max_abs / 1e-4, "top1_agreement": 1.0, "step_ms": step_ms, "failures": []}


def genai_document(runs: list[dict]) -> dict:
    """An adapter-form genai report: no scoring-graph rows, only decode runs."""
    doc = document()
    doc["model"]["form"] = "adapters"
    doc["comparisons"], doc["latencies"], doc["generations"], doc["cases"] = [], [], [], []
    doc["decode"] = runs
    return doc


def save(doc: dict, path: Path) -> Path:
    path.write_text(json.dumps(doc))
    return path


# --------------------------------------------------------------------------- matching and measures


def test_rows_are_matched_by_variant_provider_case_and_output():
    before = document()
    after = with_errors(before, {"padding": 3e-5})
    after["comparisons"].reverse()  # order does not matter, the key does
    next(c for c in after["comparisons"] if c["case"] == "n4")["case"] = "n5"  # n4 is gone, n5 is new
    diff = compare_reports(before, after)
    assert [(row["row"], row["max_abs"]) for row in diff["errors"]] == [
        (["merged", "CPUExecutionProvider", "padding", "logits"], [1e-6, 3e-5])]
    assert diff["removed"] == [["merged", "CPUExecutionProvider", "n4", "logits"]]
    assert diff["added"] == [["merged", "CPUExecutionProvider", "n5", "logits"]]
    assert diff["status"] == ["passed", "passed"] and diff["models"] == ["/models/tiny.onnx"] * 2


def test_a_row_of_another_provider_is_not_matched():
    before = document()
    after = copy.deepcopy(before)
    for comparison in after["comparisons"]:
        comparison["provider"] = "CUDAExecutionProvider"
    diff = compare_reports(before, after)
    assert diff["errors"] == []
    assert len(diff["added"]) == len(diff["removed"]) == 2


def test_the_largest_error_changes_come_first_and_ten_at_most():
    before, after = document(), document()
    template = before["comparisons"][0]
    for doc, scale in ((before, 0.0), (after, 1.0)):
        doc["comparisons"] = []
        for i in range(12):
            row = copy.deepcopy(template)
            row["case"] = f"case{i:02d}"
            row["metrics"]["max_abs"] = 1e-6 + scale * ((i * 7) % 12) * 1e-5  # growths in a shuffled order
            doc["comparisons"].append(row)
    lines = render_comparison(compare_reports(before, after))
    start = lines.index("errors: 12 matched rows; largest changes of max |onnx - torch|:")
    shown = [line.split(" / ")[2] for line in lines[start + 1:start + 11]]
    growth = {f"case{i:02d}": (i * 7) % 12 for i in range(12)}
    assert shown == sorted(growth, key=growth.get, reverse=True)[:10]
    assert not lines[start + 11].startswith("  ")  # the other two are not listed


def test_latency_ratios_are_after_over_before():
    before = document()
    after = copy.deepcopy(before)
    after["latencies"][0]["p50_ms"] = 3.0  # PyTorch: 1.5 -> 3.0
    after["latencies"][1]["p50_ms"] = 0.1  # ORT: 0.2 -> 0.1
    diff = compare_reports(before, after)
    ratios = {row["row"][1]: (row["p50_ms"], row["ratio"]) for row in diff["latency"]}
    assert ratios == {"PyTorch eager (CPU)": ([1.5, 3.0], 2.0), "ORT CPUExecutionProvider": ([0.2, 0.1], 0.5)}
    assert all(row["row"][2] == "1x4" for row in diff["latency"])  # batch x seq_len
    lines = render_comparison(diff)
    assert "  merged / PyTorch eager (CPU) / 1x4: 1.500 -> 3.000 (2x)" in lines
    assert "  merged / ORT CPUExecutionProvider / 1x4: 0.200 -> 0.100 (0.5x)" in lines


def test_a_zero_latency_before_has_no_ratio():
    before = document()
    before["latencies"][0]["p50_ms"] = 0.0
    (row, _) = compare_reports(before, document())["latency"]
    assert row["ratio"] is None
    lines = render_comparison(compare_reports(before, document()))
    assert any(line.startswith("  merged / PyTorch eager (CPU) / 1x4: 0.000 -> 1.500 (n/a") for line in lines)


def test_genai_decode_runs_are_matched_by_run_and_timed_per_byte():
    """base, adapter, base again: the closing base run is its own row ('base again'), and latency is the median
    ms per generated byte."""
    before = genai_document([decode_run("base", 1e-6, [1.0, 2.0, 9.0]), decode_run("adapter a", 2e-6, [1.0, 1.0]),
                             decode_run("base", 3e-6, [4.0, 4.0, 4.0])])
    after = genai_document([decode_run("base", 5e-6, [2.0, 4.0, 1.0]), decode_run("adapter a", 2e-6, [3.0, 3.0]),
                            decode_run("base", 3e-6, [1.0, 2.0, 3.0])])
    diff = compare_reports(before, after)
    assert [(row["row"], row["max_abs"]) for row in diff["errors"]] == [
        (["base", "genai cpu", "decode", "step logits"], [1e-6, 5e-6]),
        (["adapter a", "genai cpu", "decode", "step logits"], [2e-6, 2e-6]),
        (["base again", "genai cpu", "decode", "step logits"], [3e-6, 3e-6])]
    assert [(row["row"], row["p50_ms"], row["ratio"]) for row in diff["latency"]] == [
        (["base", "genai cpu", "per byte"], [2.0, 2.0], 1.0),
        (["adapter a", "genai cpu", "per byte"], [1.0, 3.0], 3.0),
        (["base again", "genai cpu", "per byte"], [4.0, 2.0], 0.5)]
    assert diff["added"] == diff["removed"] == []


def test_a_decode_run_without_steps_has_no_latency_row():
    doc = genai_document([decode_run("merged", 1e-6, [])])
    diff = compare_reports(doc, doc)
    assert [row["row"] for row in diff["errors"]] == [["merged", "genai cpu", "decode", "step logits"]]
    assert diff["latency"] == []


# --------------------------------------------------------------------------- warnings


def test_the_same_inputs_give_no_warning():
    doc = document()
    doc["checkpoint"]["sha256"] = SHA_A
    moved = copy.deepcopy(doc)
    moved["checkpoint"]["path"] = "/elsewhere/tiny.pt"  # the same file (by sha256) in another place
    assert compare_reports(doc, moved)["warnings"] == []


def test_other_checkpoints_adapters_and_sources_are_warned_about():
    before, after = document(), document()
    before["checkpoint"]["sha256"], after["checkpoint"]["sha256"] = SHA_A, SHA_B
    after["adapter"] = {"path": "/models/b.onnx_adapter"}
    before["model"]["metadata"]["checkpoint_sha256"] = "1" * 64
    after["model"]["metadata"]["checkpoint_sha256"] = "2" * 64
    assert compare_reports(before, after)["warnings"] == [
        "the reports validated different checkpoints: /models/tiny.pt (sha256 aaaaaaaaaaaa...) -> /models/tiny.pt "
        "(sha256 bbbbbbbbbbbb...)",
        "only one report validated an adapter: none -> /models/b.onnx_adapter",
        "the models were exported from different checkpoints: checkpoint_sha256 111111111111... -> 222222222222...",
    ]
    lines = render_comparison(compare_reports(before, after))
    assert [line for line in lines if line.startswith("warning: ")] == lines[:3]


def test_adapters_without_a_hash_are_compared_by_path():
    before, after = document(), document()
    before["adapter"], after["adapter"] = {"path": "/a.onnx_adapter"}, {"path": "/b.onnx_adapter"}
    assert compare_reports(before, after)["warnings"] == [
        "the reports validated different adapters: /a.onnx_adapter -> /b.onnx_adapter"]
    after["adapter"] = {"path": "/a.onnx_adapter"}
    assert compare_reports(before, after)["warnings"] == []


# --------------------------------------------------------------------------- load_report


def test_a_report_directory_or_its_parity_json_loads(tmp_path):
    paths = write_reports(make_result(failing=True), tmp_path / "r")
    assert load_report(tmp_path / "r") == load_report(paths["json"]) == json.loads(paths["json"].read_text())


@pytest.mark.parametrize(("edit", "where"), [
    (lambda d: d["comparisons"][1]["metrics"].update(max_abs="x"), "at comparisons/1/metrics/max_abs: 'x' is not"),
    (lambda d: d.pop("latencies"), "at the top level: 'latencies' is a required property"),
    (lambda d: d.update(status="maybe"), "at status: 'maybe' is not one of"),
    (lambda d: d["latencies"][0].update(p50_ms=-1), "at latencies/0/p50_ms: -1 is less than the minimum of 0"),
])
def test_a_malformed_report_is_refused_in_one_line_naming_the_field(edit, where, tmp_path):
    doc = document()
    edit(doc)
    path = save(doc, tmp_path / "bad.json")
    with pytest.raises(ReportError) as err:
        load_report(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not a valid lora-export parity.json: {where}"), message


@pytest.mark.parametrize("content", ["[1, 2]", '{"schema_version": 2}', "{}"])
def test_a_document_that_is_no_parity_report_is_refused(content, tmp_path):
    path = tmp_path / "other.json"
    path.write_text(content)
    with pytest.raises(ReportError, match=r"other\.json: not a lora-export parity\.json \(schema_version 1\)$"):
        load_report(path)


def test_unreadable_json_and_missing_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "broken.json").write_text('{"schema_version": 1,')
    for path in (tmp_path / "broken.json", tmp_path / "absent"):
        with pytest.raises(ReportError) as err:
            load_report(path)
        assert "\n" not in str(err.value) and path.name in str(err.value)


def test_a_long_offending_value_is_cut_short_and_escaped(tmp_path):
    doc = document()
    doc["status"] = "\x1b[2J" + "x" * 5000
    path = save(doc, tmp_path / "long.json")
    with pytest.raises(ReportError) as err:
        load_report(path)
    message = str(err.value)
    assert len(message) < len(str(path)) + 300 and message.endswith("...")
    assert not CONTROL.search(message) and "\\x1b[2J" in message


# --------------------------------------------------------------------------- control characters


def test_text_from_a_report_is_printed_with_its_control_characters_escaped():
    before = document()
    before["comparisons"][0]["case"] = "n4\nverdict: passed -> passed\x1b[2J"
    before["model"]["path"] = "/models/\x9bred.onnx"
    after = copy.deepcopy(before)
    after["adapter"] = {"path": "/a\x07.onnx_adapter"}
    lines = render_comparison(compare_reports(before, after))
    text = "\n".join(lines)
    assert not CONTROL.search(text.replace("\n", ""))
    assert "\\x9bred.onnx" in text and "/a\\x07.onnx_adapter" in text
    assert "n4\\nverdict: passed -> passed\\x1b[2J" in text
    assert sum(line.startswith("verdict: ") for line in lines) == 1  # the case name did not forge a line


# --------------------------------------------------------------------------- a real report


def test_a_real_report_compared_with_itself_changes_nothing(merged_copy, tiny_checkpoint, tmp_path):
    result = validate(merged_copy, tiny_checkpoint, providers=["cpu"], latency_runs=2)
    doc = report_json(result)
    paths = write_reports(result, tmp_path / "again")
    diff = compare_reports(doc, load_report(paths["json"]))
    keys = [[c.variant, c.provider, c.case, c.output] for c in result.comparisons]
    assert [row["row"] for row in diff["errors"]] == keys
    assert all(row["max_abs"][0] == row["max_abs"][1] for row in diff["errors"])
    assert len(diff["latency"]) == len(result.latencies) and all(row["ratio"] == 1.0 for row in diff["latency"])
    assert diff["warnings"] == diff["added"] == diff["removed"] == []
    model = result.model_path
    assert render_comparison(diff)[0] == f"verdict: passed -> passed  ({model} -> {model})"
