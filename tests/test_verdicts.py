"""What a user reads agrees with the verdict (issue 16, items 2, 7, 11 and 13's report parts): an int8 / int4 graph
is judged by one rule wherever it is judged, summaries and first screens carry every verdict, compare-reports
matches genai runs, warns of other inputs, refuses malformed reports in one line and prints no control characters,
and the reports escape what comes from file names."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import onnx
import pytest
from conftest import assert_one_line_error, invoke, make_result

from lora_export.errors import ParityInputError
from lora_export.export.onnx_files import count_parameters_onnx
from lora_export.export.quantize import convert_fp16, convert_ort_format, quantize_int4, quantize_int8
from lora_export.genai.decoder import export_decoder
from lora_export.parity.results import DecodeRun, ParityResult
from lora_export.pipeline import validate_and_report
from lora_export.report.render import render_html, render_markdown, write_reports

FAST = {"providers": ["cpu"], "latency_runs": 2}


@pytest.fixture(scope="module")
def builds(merged_export, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """fp32 / int8 / int4 builds of the shared merged export, in a private folder."""
    folder = tmp_path_factory.mktemp("verdict_builds")
    fp32 = folder / "tiny.onnx"
    shutil.copyfile(merged_export.model_path, fp32)
    return {"fp32": fp32, "int8": quantize_int8(fp32), "int4": quantize_int4(fp32)}


@pytest.fixture(scope="module")
def export_validation(builds, tiny_checkpoint, tmp_path_factory) -> ParityResult:
    """What the export runs: the fp32 model validated with the precision table of its builds."""
    return validate_and_report(builds["fp32"], tiny_checkpoint, report_dir=tmp_path_factory.mktemp("export_report"),
                               precision_models=builds, **FAST)


# --------------------------------------------------------------------------- item 2: one rule for int8 / int4


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_standalone_validation_of_a_quantized_build_agrees_with_the_export(precision, builds, export_validation,
                                                                           tiny_checkpoint, tmp_path):
    row = next(row for row in export_validation.precisions if row["precision"] == precision)
    result = validate_and_report(builds[precision], tiny_checkpoint, report_dir=tmp_path, **FAST)
    judged = [c for c in result.comparisons if c.judged]
    assert [c.case for c in judged] == ["heldout_eval"]  # the export's held-out prose windows, and nothing else
    assert judged[0].metrics.top1_agreement == row["top1_agreement"]
    assert judged[0].metrics.loss_onnx == pytest.approx(row["eval_loss"], rel=1e-9)
    assert result.passed == row["passed"], (result.summary, row)
    # element-wise metrics and greedy bytes are reported, not judged
    assert not any("greedy" in failure for failure in result.failures)
    assert all(c.passed for c in result.comparisons if not c.judged)
    assert "reported, not judged" in result.pass_rule
    document = json.loads(result.report_files["json"].read_text())
    assert document["precision"] == precision  # int4 reports are valid against their schema (checked in compare)
    code, out, err = invoke("compare-reports", result.report_dir, result.report_dir)
    assert code == 0, err


def test_element_wise_tolerances_do_not_apply_to_quantized_graphs(builds, tiny_checkpoint, tmp_path):
    with pytest.raises(ParityInputError, match="not element-wise"):
        validate_and_report(builds["int8"], tiny_checkpoint, atol=1e-2, report_dir=tmp_path, **FAST)


# --------------------------------------------------------------------------- item 7: what a user reads


def test_console_summary_and_first_screen_carry_every_precisions_verdict(export_validation):
    rows = {row["precision"]: row for row in export_validation.precisions}
    for precision in ("int8", "int4"):
        word = "pass" if rows[precision]["passed"] else "FAIL"
        assert f"{precision} {word} (top-1 {rows[precision]['top1_agreement']:.2%}" in export_validation.summary
    page = export_validation.report_files["html"].read_text()
    first_screen = page[:page.index("<h2>")]
    assert "<ul id='precisions'>" in first_screen
    for precision in ("fp32", "int8", "int4"):
        assert f"<strong>{precision}</strong>" in first_screen


def test_quantized_builds_count_the_parameters_of_their_source(builds, tmp_path):
    expected = count_parameters_onnx(onnx.load(builds["fp32"]))
    fp16 = convert_fp16(builds["fp32"], tmp_path / "tiny.fp16.onnx")
    for path in (builds["int8"], builds["int4"], fp16):
        assert count_parameters_onnx(onnx.load(path)) == expected, path.name


def test_no_validation_is_announced_under_no_validate(tiny_checkpoint, tmp_path):
    code, out, err = invoke("export", tiny_checkpoint, "-o", tmp_path / "x.onnx", "--no-validate", "--quiet")
    assert code == 0, err
    assert "time:" in out and "validation follows" not in out


def genai_result(failures: list[str]) -> ParityResult:
    """A hand-built adapter-form genai result: base, trained adapter, base again, every run within its limits."""
    def run(variant: str) -> DecodeRun:
        values = {"variant": variant, "device": "cpu", "prompt": "The quick brown ", "prompt_source": "held-out prose",
                  "prompt_bytes": 16, "new_bytes": 16, "reference": [65] * 16, "generated": [65] * 16,
                  "identical": True, "first_mismatch": None, "max_abs": 1e-6, "tolerance_used": 0.01,
                  "top1_agreement": 1.0, "step_ms": [0.1] * 16}
        return DecodeRun(**{f.name: values[f.name] for f in dataclasses.fields(DecodeRun) if f.name in values})

    result = make_result(failing=False)
    result.status = "failed" if failures else "passed"
    result.summary = f"FAIL: {failures[0]}" if failures else "PASS: decode parity"
    result.cases, result.comparisons, result.generations, result.latencies = [], [], [], []
    result.error_histograms, result.worst, result.failures = {}, None, failures
    result.decode = [run("base"), run("adapter trained"), run("base")]
    return result


def test_a_failing_genai_report_does_not_say_passes_under_the_red_box():
    failure = "adapter model.onnx_adapter: layer blocks.0.attn.to_q holds other weights"
    page = render_html(genai_result([failure]))
    worst = re.search(r"<p id='worst'>(.*?)</p>", page).group(1)
    assert "class='verdict failed'" in page
    assert worst.endswith(f"the verdict fails on another check: {failure}"), worst


def test_genai_reports_leave_out_empty_tables_and_name_each_run_once():
    markdown = render_markdown(genai_result([]))
    for heading in ("## Cases", "## Results", "## Greedy generation", "## Latency"):
        assert heading not in markdown
    assert "## Decode (onnxruntime-genai)" in markdown
    assert [line.split(" | ")[0] for line in markdown.splitlines() if line.startswith("| base")] == [
        "| base", "| base again"]


@pytest.fixture(scope="module")
def genai_reports(tiny_checkpoint, tmp_path_factory) -> tuple[ParityResult, ParityResult]:
    """Two validations of one merged genai decoder."""
    folder = tmp_path_factory.mktemp("verdict_genai")
    model_dir = export_decoder(tiny_checkpoint, folder / "genai", merge=True)
    return tuple(validate_and_report(model_dir, tiny_checkpoint, providers=["cpu"], report_dir=folder / name)
                                     for name in ("a", "b"))


def test_one_genai_run_is_one_run_and_compare_reports_matches_decode_runs(genai_reports):
    first, second = genai_reports
    assert "1 run (merged)" in first.summary
    code, out, err = invoke("compare-reports", first.report_dir, second.report_dir, "--json")
    assert code == 0, err
    diff = json.loads(out)
    assert [row["row"] for row in diff["errors"]] == [["merged", "genai cpu", "decode", "step logits"]]
    assert [row["row"] for row in diff["latency"]] == [["merged", "genai cpu", "per byte"]]
    assert diff["warnings"] == []


def test_compare_reports_warns_of_other_checkpoints_and_adapters(tmp_path):
    a, b = make_result(failing=False), make_result(failing=False)
    b.checkpoint_path, b.adapter_path = Path("/models/other.pt"), Path("/models/other.onnx_adapter")
    write_reports(a, tmp_path / "a")
    write_reports(b, tmp_path / "b")
    code, out, err = invoke("compare-reports", tmp_path / "a", tmp_path / "b")
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, out
    assert "/models/tiny.pt -> /models/other.pt" in warnings[0]
    assert "adapter" in warnings[1] and "/models/other.onnx_adapter" in warnings[1]


def test_validating_an_ort_format_file_says_what_to_validate(builds, tiny_checkpoint, tmp_path):
    ort_path, _ = convert_ort_format(builds["fp32"], tmp_path)
    code, _, err = invoke("validate", ort_path, "--checkpoint", tiny_checkpoint, "--report", tmp_path / "r")
    assert_one_line_error(code, err, "ORT-format model", progress_allowed=False)
    assert "tiny.onnx" in err and "Wire format" not in err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- items 11 and 13: hostile reports


def damaged(document: dict, how: str) -> dict:
    if how == "missing latencies":
        del document["latencies"]
    elif how == "max_abs a string":
        document["comparisons"][0]["metrics"]["max_abs"] = "x"
    elif how == "comparison without metrics":
        del document["comparisons"][0]["metrics"]
    elif how == "status a number":
        document["status"] = 3
    elif how == "decode run without steps":
        document["decode"] = [{"variant": "merged", "device": "cpu"}]
    return document


@pytest.mark.parametrize("how", ["missing latencies", "max_abs a string", "comparison without metrics",
                                 "status a number", "decode run without steps"])
def test_compare_reports_refuses_a_malformed_report_in_one_line(how, tmp_path):
    good = write_reports(make_result(failing=False), tmp_path / "good")["json"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(damaged(json.loads(good.read_text()), how)))
    code, out, err = invoke("compare-reports", good, bad)
    assert_one_line_error(code, err, f"{bad}: not a valid lora-export parity.json", progress_allowed=False)


def test_compare_reports_escapes_control_characters(tmp_path):
    result = make_result(failing=False)
    result.comparisons[0].case = "\x1b]0;owned\x07\x1b[2J"
    result.model_path = Path("/models/\x1b[31mred.onnx")
    write_reports(result, tmp_path / "a")
    code, out, err = invoke("compare-reports", tmp_path / "a", tmp_path / "a")
    assert code == 0, err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out)
    assert "\\x1b]0;owned\\x07\\x1b[2J" in out and "\\x1b[31mred.onnx" in out


def test_a_hostile_data_file_name_is_escaped_in_markdown_and_html(builds, tiny_checkpoint, tmp_path):
    hostile = tmp_path / "<img src=x onerror=alert(1)>[x](javascript:alert(2)).txt"
    hostile.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = validate_and_report(builds["fp32"], tiny_checkpoint, data=[hostile], report_dir=tmp_path / "r", **FAST)
    markdown = result.report_files["markdown"].read_text()
    page = result.report_files["html"].read_text()
    assert hostile.name in " ".join(result.notes)
    assert "<img" not in markdown and not re.search(r"(?<!\\)\]\(javascript", markdown)
    assert "&lt;img src=x onerror=alert(1)>\\[x\\](javascript:alert(2)).txt" in markdown
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
