"""The HTML parity report as a reader sees it: laid out by a real browser (headless Chromium, Debian's package), the
verdict, the worst case and the provider status sit in the first screen of a passing and of a failing run; colour
is never the only signal of a verdict; the page is one self-contained file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from lora_export.export.convert import ExportResult
from lora_export.pipeline import validate_and_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


#: Installing a browser is the environment's job (``.ci/run`` installs Debian's ``chromium``), never a test's.
CHROMIUM = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
VIEWPORT = (1280, 900)
#: Appended to a copy of the report (never to the report itself): writes each key element's box into the DOM.
PROBE = """<script>
const boxes = {};
for (const id of ["verdict", "worst", "providers"]) {
  const el = document.getElementById(id);
  boxes[id] = el ? el.getBoundingClientRect().bottom : null;
}
const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(boxes);
document.body.appendChild(out);
</script>"""


@pytest.fixture(scope="module")
def reports(merged_export: ExportResult, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    """parity.html of a passing run and of a failing one (a bias of the graph moved by 100x atol)."""
    work = tmp_path_factory.mktemp("browser")
    passing = validate_and_report(merged_export.model_path, tiny_checkpoint, providers=["cpu"],
                                  report_dir=work / "pass", latency_runs=2)
    proto = onnx.load(merged_export.model_path)
    bias = next(init for init in proto.graph.initializer if init.name.endswith("lm_head.bias"))
    values = numpy_helper.to_array(bias).copy()
    values[3] += 1e-2
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, work / "broken.onnx")
    failing = validate_and_report(work / "broken.onnx", tiny_checkpoint, providers=["cpu"], report_dir=work / "fail",
                                  latency_runs=2)
    assert passing.status == "passed" and failing.status == "failed"
    return {"passed": passing.report_files["html"], "failed": failing.report_files["html"]}


class _Verdicts(HTMLParser):
    """Collects (class, text) of every element whose class colours a verdict."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []
        self.found: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        marked = next((c for c in classes if c in ("passed", "failed", "not-run")), None)
        self.stack.append(marked)
        if marked:
            self.found.append([marked, ""])

    def handle_endtag(self, tag: str) -> None:
        if self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if any(self.stack) and self.found:
            self.found[-1][1] += data


@pytest.mark.parametrize("status", ["passed", "failed"])
def test_colour_is_never_the_only_signal_and_the_page_is_self_contained(reports, status):
    page = reports[status].read_text()
    parser = _Verdicts()
    parser.feed(page)
    assert parser.found
    words = {"passed": ("PASS", "pass", "ran", "yes"), "failed": ("FAIL", "NO"), "not-run": ("not", "NOT RUN")}
    for cls, text in parser.found:
        assert text.strip().startswith(words[cls]), (cls, text[:60])
    assert "role='status'" in page
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing loaded from elsewhere
    assert ("Worst case:" in page) and (status.upper()[:4] in page)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("status", ["passed", "failed"])
def test_first_screen_shows_verdict_worst_case_and_providers(reports, status, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(reports[status].read_text().replace("</body>", PROBE + "</body>"))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    match = re.search(r"<pre id=\"probe\">(.*?)</pre>", result.stdout)
    assert match, result.stderr[-2000:]
    bottoms = json.loads(match.group(1).replace("&quot;", '"'))
    for element, bottom in bottoms.items():
        assert bottom is not None and 0 < bottom <= VIEWPORT[1], (element, bottom)
    screenshot = tmp_path / f"{status}.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", f"--screenshot={screenshot}",
                    reports[status].as_uri()], capture_output=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
