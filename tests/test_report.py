"""Reports of a validate() result: parity.json against its schema, parity.md, self-contained parity.html.

The results here are built by hand (no export), so every rendering path is covered in well under a second.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from lora_export.report import ERROR_HISTOGRAM_EDGES, SCHEMA_PATH, render_markdown, report_json, write_reports
from lora_export.validate import (
    TOLERANCES,
    Case,
    Comparison,
    Generation,
    Latency,
    Metrics,
    ParityResult,
    ProviderStatus,
    judge,
    pass_rule,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(max_abs: float = 1e-6, finite: bool = True) -> Metrics:
    return Metrics(max_abs=max_abs, max_rel=max_abs * 10, mean_abs=max_abs / 5, cosine=1.0,
                   tolerance_used=max_abs / 1e-4, outside=0 if max_abs < 1e-4 else 7, elements=512,
                   worst_index=[1, 3, 200], finite=finite, top1_agreement=1.0, top1_exact=1.0,
                   loss_ref=5.5, loss_onnx=5.5 + max_abs)


def make_result(failing: bool) -> ParityResult:
    """A two-case result on CPU (CUDA not run); with ``failing`` the second case is off by 0.05 or NaN."""
    tolerance = TOLERANCES["fp32"]
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    cases = [Case("n4", "N = 4, batch 2", "held-out prose", ids, mask),
             Case("padding", "right-padded | pipes", "held-out prose", ids, mask)]
    bad = metrics(0.05) if failing else metrics()
    comparisons = [Comparison("merged", "CPUExecutionProvider", "n4", "logits", metrics(), True, []),
                   Comparison("merged", "CPUExecutionProvider", "padding", "logits", bad, not failing,
                              judge(bad, tolerance))]
    if failing:
        nan_metrics = metrics(float("nan"), finite=False)
        comparisons.append(Comparison("merged", "CPUExecutionProvider", "nan_case", "logits", nan_metrics, False,
                                      judge(nan_metrics, tolerance)))
    failures = [f"case '{c.case}': {reason}" for c in comparisons for reason in c.failures]
    return ParityResult(
        passed=not failing, summary="FAIL: worst case 'padding', output 'logits'" if failing else "PASS: all good",
        model_path=Path("/models/tiny.onnx"), checkpoint_path=Path("/models/tiny.pt"), adapter_path=None,
        form="merged", precision="fp32", tolerance=tolerance, pass_rule=pass_rule(tolerance, 24), seed=0,
        model_metadata={"form": "merged", "opset": "18"},
        providers=[ProviderStatus("cpu", "CPUExecutionProvider", True, ["CPUExecutionProvider"]),
                   ProviderStatus("cuda", "CUDAExecutionProvider", False, ["CPUExecutionProvider"],
                                  "the CUDA provider library did not load")],
        variants=["merged"], cases=cases, comparisons=comparisons,
        generations=[Generation("merged", "CPUExecutionProvider", "The a|b", "xyz\\x98", "xyz\\x98", True, None)],
        latencies=[Latency("merged", "PyTorch eager (CPU)", 1, 4, 3, 20, 1.5, 2.0),
                   Latency("merged", "ORT CPUExecutionProvider", 1, 4, 3, 20, 0.2, 0.3)],
        failures=failures, worst=comparisons[1] if failing else None, notes=["a note"],
        error_histograms={"CPUExecutionProvider": np.arange(len(ERROR_HISTOGRAM_EDGES) - 1)},
        created="2026-01-01T00:00:00+00:00",
    )


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


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


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
    assert "Worst: case 'padding', output 'logits'" in text
    assert "not run: the CUDA provider library did not load" in text
    assert "The a\\|b" in text and "right-padded \\| pipes" in text  # pipes escaped inside table cells


def test_passing_report_has_no_failures_section() -> None:
    text = render_markdown(make_result(failing=False))
    assert "## Failures" not in text and "PASS" in text.splitlines()[0]
