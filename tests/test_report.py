"""Reports of a validate() result: parity.json against its schema, parity.md, self-contained parity.html.

The results here are built by hand (no export), so every rendering path is covered in well under a second.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest
from conftest import make_result

from lora_export.parity.metrics import TOLERANCES
from lora_export.report.render import render_markdown, report_json, write_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def precision_rows() -> list[dict]:
    """compare_precisions rows as it writes them: fp32 and int8 ran on CPU, fp16 did not run."""
    def row(precision: str, size: int, provider: str, status: str, top1: float | None, loss: float | None,
            p50: float | None) -> dict:
        ran = top1 is not None
        return {"precision": precision, "model": f"/models/tiny.{precision}.onnx", "file_size": size,
                "provider": provider, "status": status, "tolerance": TOLERANCES[precision].describe(),
                "top1_agreement": top1, "top1_exact": top1, "max_abs": 1e-6 if ran else None,
                "eval_loss_ref": 5.5 if ran else None, "eval_loss": loss,
                "eval_loss_change_pct": 100.0 * (loss - 5.5) / 5.5 if ran else None,
                "latency": [{"batch": 1, "seq_len": 32, "p50_ms": p50, "p90_ms": p50 * 1.2}] if ran else [],
                "passed": True if ran else None, "failures": []}

    return [row("fp32", 2_000_000, "CPUExecutionProvider", "ran", 1.0, 5.5, 0.41),
            row("int8", 600_000, "CPUExecutionProvider", "ran", 0.97, 5.533, 0.25),
            row("fp16", 1_000_000, "CUDAExecutionProvider", "not run: no GPU", None, None, None)]


class ImageCollector(HTMLParser):
    """The src of every <img>, and whether anything links outside the page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("data:"):
                self.external.append(value)
            if tag == "img" and name == "src":
                self.images.append(value or "")


@pytest.mark.parametrize("failing", [False, True])
def test_reports_written_atomically_and_json_matches_schema(tmp_path: Path, schema: dict, failing: bool) -> None:
    paths = write_reports(make_result(failing), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"parity.json", "parity.md", "parity.html"}  # no temp files
    assert set(paths) == {"json", "markdown", "html"}
    document = json.loads(paths["json"].read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    assert document["schema_version"] == 1
    assert document["passed"] is (not failing)


def test_non_finite_metrics_are_null_in_json(schema: dict) -> None:
    document = report_json(make_result(failing=True))
    nan_case = next(c for c in document["comparisons"] if c["case"] == "nan_case")
    assert nan_case["metrics"]["max_abs"] is None and nan_case["metrics"]["finite"] is False
    assert "NaN or Inf in the output" in nan_case["failures"]
    json.dumps(document, allow_nan=False)  # strict JSON
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)


def test_schema_rejects_a_wrong_version(schema: dict) -> None:
    document = report_json(make_result(failing=False))
    document["schema_version"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)


def test_html_is_self_contained_and_embeds_both_plots(tmp_path: Path) -> None:
    html_path = write_reports(make_result(failing=True), tmp_path)["html"]
    parser = ImageCollector()
    parser.feed(html_path.read_text())
    parser.close()
    assert parser.external == []
    assert len(parser.images) == 2
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "<title>Parity report: tiny.onnx - FAIL</title>" in html_path.read_text()


def test_markdown_has_the_tables_pass_rule_and_worst_case() -> None:
    text = render_markdown(make_result(failing=True))
    assert text.startswith("# Parity report: tiny.onnx - FAIL")
    for heading in ("## Overview", "## Pass rule", "## Providers", "## Cases", "## Results", "## Greedy generation",
                    "## Latency", "## Failures", "## Notes"):
        assert heading in text
    assert "|onnx - torch| <= atol + rtol * |torch|" in text
    assert "Worst case: 'padding', output 'logits'" in text
    assert "| CUDAExecutionProvider | cuda | not run: not available on this machine (reason in parity.json) |" in text
    assert "did not load" not in text  # the long reason is kept for parity.json only
    assert "The a\\|b" in text and "right-padded \\| pipes" in text  # pipes escaped inside table cells


def test_passing_report_has_no_failures_section() -> None:
    text = render_markdown(make_result(failing=False))
    assert "## Failures" not in text and "PASS" in text.splitlines()[0]


def test_precision_table_in_json_markdown_and_html(tmp_path: Path, schema: dict) -> None:
    result = make_result(failing=False)
    assert "precisions" not in report_json(result)  # optional: only when measured
    result.precisions = precision_rows()
    paths = write_reports(result, tmp_path)
    document = json.loads(paths["json"].read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    assert [row["precision"] for row in document["precisions"]] == ["fp32", "int8", "fp16"]
    markdown = paths["markdown"].read_text()
    assert "## Precisions" in markdown
    assert "| Precision | File size MB | Size vs fp32 | Provider | p50 ms (1 x 32) | Top-1 | Eval loss | Verdict |" \
        in markdown
    assert "| int8 | 0.60 | 30% | CPUExecutionProvider: ran | 0.250 | 97.00% | 5.5000 -> 5.5330 (+0.60%) | pass |" \
        in markdown
    assert "| fp16 | 1.00 | 50% | CUDAExecutionProvider: not run: no GPU | - | n/a | n/a | not run |" in markdown
    page = paths["html"].read_text()
    assert "<h2>Precisions</h2>" in page
    assert "<td>int8</td><td>0.60</td><td>30%</td><td>CPUExecutionProvider: ran</td><td>0.250</td>" in page


def test_not_run_report_is_neither_pass_nor_fail(tmp_path: Path, schema: dict) -> None:
    result = make_result(failing=False)
    result.status, result.summary = "not run", "NOT RUN: no execution provider could run the model; ..."
    result.comparisons, result.generations, result.latencies, result.error_histograms = [], [], [], {}
    assert not result.passed
    paths = write_reports(result, tmp_path)
    document = json.loads(paths["json"].read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    assert document["status"] == "not run" and document["passed"] is False
    assert paths["markdown"].read_text().startswith("# Parity report: tiny.onnx - NOT RUN")
    assert "| Result | NOT RUN |" in paths["markdown"].read_text()
    assert "class='verdict not-run' role='status'><strong>NOT RUN</strong>" in paths["html"].read_text()
