"""Parity reports of a ``validate()`` result, written atomically into one directory.

* ``parity.json``: machine-readable, ``"schema_version": 1``, described by ``lora_export/report/parity_schema.json``;
  non-finite metrics (NaN / Inf outputs) are written as null. ``status`` is passed / failed / not run (no provider
  could run the model); ``precisions``, the table across fp32 / fp16 / int8 builds, only when it was measured.
* ``parity.md``: the same tables for people and code review.
* ``parity.html``: self-contained (inline CSS, no links out): the tables plus an error histogram per provider
  and latency bars, drawn with matplotlib's Agg canvas and embedded as ``data:image/png;base64`` URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..files import staged_outputs
from ..layout import REPORT_FILES
from ..parity.metrics import ERROR_HISTOGRAM_EDGES
from ..parity.results import decode_labels
from ..parity.verdict import precision_verdict

if TYPE_CHECKING:
    from ..parity.results import Comparison, Generation, ParityResult

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("parity_schema.json")
#: The headline word of each ParityResult.status.
VERDICTS = {"passed": "PASS", "failed": "FAIL", "not run": "NOT RUN"}


@dataclass
class Section:
    """A titled part of the report: paragraphs, then an optional table (headers + rows), then bullets."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    text_columns: tuple[int, ...] = ()  # columns of generated text: whitespace is made visible in HTML


def _plain(value: Any) -> Any:
    """A JSON-safe copy: Paths and numpy scalars to plain values, NaN / Inf to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _file_record(path: Path, sha256: str | None) -> dict:
    """{path, sha256} of an input file; sha256 only where it was recorded."""
    return {"path": path} if sha256 is None else {"path": path, "sha256": sha256}


def report_json(result: ParityResult) -> dict:
    """The parity.json document (schema_version 1); ``precisions`` only when the result has them."""
    document = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "lora-export", "version": result.tool_version},
        "created": result.created,
        "status": result.status,
        "passed": result.passed,
        "summary": result.summary,
        "model": {"path": result.model_path, "form": result.form, "metadata": result.model_metadata},
        "checkpoint": _file_record(result.checkpoint_path, result.checkpoint_sha256),
        "adapter": None if result.adapter_path is None else _file_record(result.adapter_path, result.adapter_sha256),
        "precision": result.precision,
        "tolerance": asdict(result.tolerance),
        "pass_rule": result.pass_rule,
        "seed": result.seed,
        "providers": [asdict(p) for p in result.providers],
        "variants": result.variants,
        "cases": [case.info() for case in result.cases],
        "comparisons": [asdict(c) for c in result.comparisons],
        "generations": [asdict(g) for g in result.generations],
        "latencies": [asdict(t) for t in result.latencies],
        "worst": None if result.worst is None else asdict(result.worst),
        "failures": result.failures,
        "notes": result.notes,
        "environment": result.environment,
    }
    if result.precisions is not None:
        document["precisions"] = result.precisions
    if result.decode:
        document["decode"] = [asdict(run) for run in result.decode]
    if result.case_plan is not None:
        document["case_plan"] = result.case_plan
    return _plain(document)


def case_plan_text(plan: dict) -> str:
    """One line for how much a validation ran for its model's size (``ParityResult.case_plan``)."""
    return (f"{plan['tier']}: {plan['cases']} cases up to batch {plan['max_batch']} x {plan['max_seq']} tokens "
            f"({plan['parameters']:,} parameters)")


def _sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def precision_section(rows: list[dict]) -> Section:
    """The table across precisions from ``lora_export.parity.precisions.compare_precisions`` rows."""
    shapes = list(dict.fromkeys((t["batch"], t["seq_len"]) for row in rows for t in row["latency"]))
    fp32_size = next((row["file_size"] for row in rows if row["precision"] == "fp32"), None)
    section = Section(
        "Precisions",
        paragraphs=["Each build against the PyTorch fp32 checkpoint on held-out prose. File sizes include external "
                    "data. p50: milliseconds per forward pass on the row's provider (CPU for fp32, int8 and int4, "
                    "CUDA for fp16), each build timed in its own warmed block. Eval loss: next-byte cross-entropy in "
                    "nats/byte, torch -> onnx (change)."],
        headers=["Precision", "File size MB", "Size vs fp32", "Provider", *(f"p50 ms ({b} x {n})" for b, n in shapes),
                 "Top-1", "Eval loss", "Verdict"],
        bullets=[f"{row['precision']} limits: {row['tolerance']}" for row in rows],
    )
    for row in rows:
        p50 = {(t["batch"], t["seq_len"]): t["p50_ms"] for t in row["latency"]}
        loss = ("n/a" if row["eval_loss"] is None else f"{row['eval_loss_ref']:.4f} -> {row['eval_loss']:.4f} "
                f"({row['eval_loss_change_pct']:+.2f}%)")
        if row["passed"] is None:
            verdict = "not run"
        else:
            verdict = "pass" if row["passed"] else "FAIL: " + "; ".join(row["failures"])
        section.rows.append([
            row["precision"], f"{row['file_size'] / 1e6:,.2f}",
            "n/a" if fp32_size is None else f"{row['file_size'] / fp32_size:.0%}",
            f"{row['provider']}: {row['status']}",
            *("-" if shape not in p50 else f"{p50[shape]:.3f}" for shape in shapes),
            "n/a" if row["top1_agreement"] is None else f"{row['top1_agreement']:.2%}", loss, verdict,
        ])
    return section


def _show(data: list[int]) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in data)


def decode_section(result: ParityResult) -> Section:
    """Decode parity through onnxruntime-genai: one row per run, latency per byte early and late in the context."""
    section = Section(
        "Decode (onnxruntime-genai)",
        paragraphs=["Greedy decoding by onnxruntime-genai's generator with its KV cache, to the end of the context. "
                    "Step logits against the PyTorch full forward over the same prefix; bytes against PyTorch's "
                    "greedy generation. ms/byte: median time of generate_next_token over the first and the last "
                    "quarter of the generated positions (a bounded local cache keeps the late bytes as cheap)."],
        headers=["Variant", "Device", "Prompt + new", "max abs", "tol. used", "Step top-1", "Identical",
                 "ms/byte early", "ms/byte late", "Generated", "Verdict"], text_columns=(9,),
    )
    for run, label in zip(result.decode, decode_labels([(r.variant, r.device) for r in result.decode]), strict=True):
        quarter = max(1, len(run.step_ms) // 4)
        section.rows.append([
            label, run.device, f"{run.prompt_bytes} + {run.new_bytes}", _sci(run.max_abs),
            _sci(run.tolerance_used), f"{run.top1_agreement:.2%}",
            "yes" if run.identical else f"NO (from byte {run.first_mismatch})",
            f"{np.median(run.step_ms[1:1 + quarter] or run.step_ms):.3f}", f"{np.median(run.step_ms[-quarter:]):.3f}",
            _show(run.generated), "pass" if run.passed else "FAIL: " + "; ".join(run.failures)])
    return section


def _worst_run(result: ParityResult) -> str:
    """The decode run closest to its limits, in words."""
    labels = decode_labels([(r.variant, r.device) for r in result.decode])
    run, label = max(zip(result.decode, labels, strict=True),
                     key=lambda pair: (not pair[0].passed, pair[0].tolerance_used or 0.0, -pair[0].top1_agreement))
    limit = ("" if run.tolerance_used is None else f"{run.tolerance_used:.1%} of the tolerance, ") + (
        f"step top-1 {run.top1_agreement:.1%}")
    bytes_ = "bytes identical" if run.identical else f"bytes differ from byte {run.first_mismatch}"
    outcome = "passes" if run.passed else "; ".join(run.failures)
    return f"{label} on genai {run.device}: max |error| {run.max_abs:.3g}, {limit}, {bytes_}; {outcome}"


def worst_line(result: ParityResult) -> tuple[str, str] | None:
    """('Worst case' or 'Worst run', what it is and how it fares) for the first screen and the overview, on a pass
    too; when it passes but the verdict fails, the line names the check that failed. None when nothing ran."""
    if result.worst is not None:
        worst, label = result.worst, "Worst case"
        outcome = "; ".join(worst.failures) if worst.failures else (
            "passes" + ("" if worst.metrics.tolerance_used is None
                        else f" at {worst.metrics.tolerance_used:.1%} of its tolerance"))
        text = (f"'{worst.case}', output '{worst.output}' (variant {worst.variant}, {worst.provider}): max |error| "
                f"{worst.metrics.max_abs:.3g} at [row, position, byte] = {worst.metrics.worst_index}, {outcome}")
        passes = not worst.failures
    elif result.decode:
        label, text = "Worst run", _worst_run(result)
        passes = all(run.passed for run in result.decode)
    else:
        return None
    if passes and result.failures:
        text += f"; the verdict fails on another check: {result.failures[0]}"
    return label, text


def _comparison_verdict(comparison: Comparison) -> str:
    if not comparison.passed:
        return "FAIL: " + "; ".join(comparison.failures)
    return "pass" if comparison.judged else "reported, not judged"


def _identical(generation: Generation, judged: bool) -> str:
    if generation.identical:
        return "yes"
    if judged:
        return f"NO (from byte {generation.first_mismatch})"
    return f"differ from byte {generation.first_mismatch} (reported, not judged)"


def _overview_section(result: ParityResult) -> Section:
    """The verdict, the inputs and the settings, with the worst case's line below."""
    overview = Section("Overview", headers=["Item", "Value"], rows=[
        ["Result", VERDICTS[result.status]],
        ["Summary", result.summary],
        ["Model", f"{result.model_path} (form {result.form}, opset {result.model_metadata.get('opset', '?')})"],
        ["Checkpoint", str(result.checkpoint_path)],
        ["Adapter", "none" if result.adapter_path is None else str(result.adapter_path)],
        ["Variants", ", ".join(result.variants)],
        ["Precision", f"{result.precision}: {result.tolerance.describe()}"],
        ["Seed", str(result.seed)],
        *([] if result.case_plan is None else [["Case plan", case_plan_text(result.case_plan)]]),
        ["Created", f"{result.created} by lora-export {result.tool_version}"],
    ])
    worst = worst_line(result)
    if worst is not None:
        overview.paragraphs.append(f"{worst[0]}: {worst[1]}.")
    return overview


def _results_section(result: ParityResult) -> Section:
    """One row of metrics and verdict per comparison."""
    comparisons = Section(
        "Results",
        paragraphs=["Metrics over the real (attention_mask = 1) positions. 'tol. used' is "
                    "max |onnx - torch| / (atol + rtol * |torch|): at most 1 passes. max rel is polygraphy's "
                    "|onnx - torch| / |torch|. Loss: next-byte cross-entropy in nats/byte, torch -> onnx."],
        headers=["Variant", "Provider", "Case", "Output", "max abs", "max rel", "mean abs", "cosine", "tol. used",
                 "top-1", "loss", "finite", "Verdict"],
    )
    for c in result.comparisons:
        m = c.metrics
        top1 = f"{m.top1_agreement:.2%}" + ("" if m.top1_exact == m.top1_agreement else f" (exact {m.top1_exact:.2%})")
        loss = "n/a" if m.loss_ref is None else f"{m.loss_ref:.6f} -> {m.loss_onnx:.6f}"
        comparisons.rows.append([c.variant, c.provider, c.case, c.output, _sci(m.max_abs), _sci(m.max_rel),
                                 _sci(m.mean_abs), f"{m.cosine:.8f}", _sci(m.tolerance_used), top1, loss,
                                 "yes" if m.finite else "NO", _comparison_verdict(c)])
    return comparisons


def _latency_section(result: ParityResult) -> Section:
    """Milliseconds per forward pass, with the machine that measured them."""
    env = result.environment or {}
    versions = env.get("versions", {})
    machine = (f" Measured on {env.get('cpu')}, {env.get('cores')} cores, load {env.get('load_average')}, "
               f"torch {versions.get('torch')} / onnxruntime {versions.get('onnxruntime')}"
               "; each backend timed in its own warmed block. A shared or loaded machine slows PyTorch more than "
               "ONNX Runtime: compare ratios within one report, not figures across machines." if env else "")
    return Section("Latency", paragraphs=["Milliseconds per forward pass after warm-up." + machine],
                   headers=["Variant", "Backend", "Shape", "p50 ms", "p90 ms", "Runs (warm-up)"],
                   rows=[[t.variant, t.backend, f"{t.batch} x {t.seq_len}", f"{t.p50_ms:.3f}", f"{t.p90_ms:.3f}",
                          f"{t.runs} ({t.warmup})"] for t in result.latencies])


def report_sections(result: ParityResult) -> list[Section]:
    """The report's content, shared by the Markdown and HTML renderings."""
    providers = Section("Providers", headers=["Provider", "Requested as", "Status", "Session providers"], rows=[
        [p.name, p.requested, p.brief(), ", ".join(p.session_providers) if p.ran else "- (no session on it)"]
        for p in result.providers
    ])
    cases = Section("Cases", headers=["Case", "Batch", "N", "Real tokens", "Source", "What it covers"], rows=[
        [info["name"], str(info["batch"]), str(info["seq_len"]), str(info["real_tokens"]), info["source"],
         info["description"]] for info in (case.info() for case in result.cases)
    ])
    generations = Section(
        "Greedy generation",
        paragraphs=["Bytes generated greedily from a held-out prompt; ONNX Runtime re-runs the graph on the "
                    "growing sequence (no KV cache), cropped to max_seq_len. Non-ASCII bytes are shown as "
                    "\\x escapes."],
        headers=["Variant", "Provider", "Prompt", "PyTorch", "ONNX Runtime", "Identical"], text_columns=(2, 3, 4),
        rows=[[g.variant, g.provider, g.prompt, g.reference, g.onnx,
               _identical(g, result.tolerance.elementwise)] for g in result.generations],
    )
    sections = [_overview_section(result), Section("Pass rule", paragraphs=[result.pass_rule]), providers, cases,
                _results_section(result), generations, _latency_section(result)]
    if result.precisions is not None:
        sections.append(precision_section(result.precisions))
    if result.decode:
        sections.append(decode_section(result))
    if result.failures:
        sections.append(Section("Failures", bullets=result.failures))
    if result.notes:
        sections.append(Section("Notes", bullets=result.notes))
    return [section for section in sections if section.rows or not section.headers]  # no empty tables


def _md_text(text: str) -> str:
    """Text (file names, generated bytes, messages) as Markdown that shows it and does nothing else: what could open
    an HTML tag, comment or autolink (``<`` before a letter, /, ! or ?), an entity, a link or a code span is escaped
    (a plain ``<=`` stays readable); one line."""
    text = re.sub(r"&(?=#?\w+;)", "&amp;", text)
    text = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
    for char in "[]`":
        text = text.replace(char, "\\" + char)
    return text.replace("\r", " ").replace("\n", " ")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|")


def render_markdown(result: ParityResult) -> str:
    """parity.md: a title line and the sections as Markdown tables; every text escaped (``_md_text``)."""
    lines = [f"# Parity report: {_md_text(result.model_path.name)} - {VERDICTS[result.status]}", ""]
    for section in report_sections(result):
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [_md_text(paragraph), ""]
        if section.headers:
            lines.append("| " + " | ".join(_md_cell(h) for h in section.headers) + " |")
            lines.append("|" + "---|" * len(section.headers))
            lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in section.rows]
            lines.append("")
        if section.bullets:
            lines += [f"- {_md_text(bullet)}" for bullet in section.bullets] + [""]
    return "\n".join(lines)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def error_histogram_png(result: ParityResult) -> bytes:
    """One histogram per variant and provider of each logit's error as a share of its pass boundary
    atol + rtol * |torch| (log10; the boundary at 0), counts on a log axis."""
    keys = list(result.error_histograms)
    figure = Figure(figsize=(7, 2.2 * max(1, len(keys))), layout="constrained")
    axes = figure.subplots(max(1, len(keys)), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=False):
        counts = result.error_histograms[key]
        variant, _, provider = key.rpartition(" | ")  # "<variant> | <provider>"
        ax.stairs(counts, ERROR_HISTOGRAM_EDGES, fill=True, color="tab:blue")
        ax.set_yscale("log")
        ax.axvline(0.0, color="tab:red", linestyle="--", label="pass boundary (atol + rtol |torch|)")
        ax.legend(loc="upper left", fontsize="small")
        used = max((c.metrics.tolerance_used or 0.0 for c in result.comparisons
                    if c.provider == provider and variant in ("", c.variant)), default=0.0)
        ax.set_title(f"{variant or 'all variants'} on {provider}: {int(counts.sum())} logits, worst {used:.1%} of "
                     "its boundary", fontsize="medium")
        ax.set_ylabel("logits")
    boundary = "" if result.tolerance.atol is not None else " (fp32 boundary, for scale)"
    axes[-1].set_xlabel(f"log10 |onnx - torch| / (atol + rtol |torch|){boundary}; exact at "
                        f"{ERROR_HISTOGRAM_EDGES[0]:g}")
    return _png(figure)


def latency_png(result: ParityResult) -> bytes:
    """Horizontal bars of p50 latency per variant and backend, whiskers up to p90."""
    timings = result.latencies
    figure = Figure(figsize=(7, 0.5 * len(timings) + 1.2), layout="constrained")
    ax = figure.subplots()
    p50 = [t.p50_ms for t in timings]
    spread = [[0.0] * len(timings), [t.p90_ms - t.p50_ms for t in timings]]
    ax.barh([f"{t.variant} | {t.backend}" for t in timings], p50, xerr=spread, color="tab:green", capsize=3)
    ax.set_xscale("log")  # one slow backend must not flatten the others
    ax.invert_yaxis()
    shape = f"batch {timings[0].batch}, N = {timings[0].seq_len}" if timings else ""
    ax.set_xlabel(f"ms per forward pass, log scale ({shape}; bar p50, whisker p90)")
    return _png(figure)


def decode_latency_png(result: ParityResult) -> bytes:
    """genai's time per generated byte against its position in the context, one line per decode run."""
    figure = Figure(figsize=(7, 3), layout="constrained")
    ax = figure.subplots()
    for run, label in zip(result.decode, decode_labels([(r.variant, r.device) for r in result.decode]), strict=True):
        positions = np.arange(run.prompt_bytes, run.prompt_bytes + len(run.step_ms))
        ax.plot(positions, run.step_ms, linewidth=0.8, label=f"{label} ({run.device})")
    if result.decode:
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize="small")
    ax.set_xlabel("position of the generated byte in the context")
    ax.set_ylabel("ms per byte (generate_next_token)")
    return _png(figure)


#: Cell texts that carry a verdict, and the class that colours them (the word itself always says it too).
CELL_CLASSES = (("FAIL", "failed"), ("NO", "failed"), ("not available", "not-run"), ("not run", "not-run"),
                ("pass", "passed"), ("ran", "passed"), ("yes", "passed"))


def _cell_class(text: str) -> str:
    return next((f" class='{cls}'" for prefix, cls in CELL_CLASSES if text.startswith(prefix)), "")


def _visible_whitespace(text: str) -> str:
    """Generated text with its whitespace shown: a space as a middle dot, a newline as a return symbol."""
    return text.replace(" ", "\u00b7").replace("\\x0a", "\u21b5").replace("\n", "\u21b5") or "(nothing)"


def _html_section(section: Section) -> list[str]:
    body = [f"<h2>{html.escape(section.title)}</h2>"]
    body += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.paragraphs]
    if section.headers:
        body.append("<table><thead><tr>" + "".join(f"<th scope='col'>{html.escape(h)}</th>" for h in section.headers)
                    + "</tr></thead><tbody>")
        for row in section.rows:
            cells = [_visible_whitespace(cell) if index in section.text_columns else cell
                     for index, cell in enumerate(row)]
            failing = any(cell.startswith(("FAIL", "NO ")) for cell in row)
            body.append(f"<tr{' class=row-failed' if failing else ''}>" + "".join(
                f"<td{_cell_class(cell)}>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
        body.append("</tbody></table>")
    if section.bullets:
        body.append("<ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in section.bullets) + "</ul>")
    return body


def render_html(result: ParityResult) -> str:
    """parity.html: one self-contained page. First screen: the verdict (coloured and in words), the summary, the
    worst case (pass or fail), what ran where, and the plots; then every section's table."""
    verdict, status = VERDICTS[result.status], result.status.replace(" ", "-")
    body = [f"<h1>Parity report: {html.escape(result.model_path.name)}</h1>",
            f"<p id='verdict' class='verdict {status}' role='status'><strong>{verdict}</strong> "
            f"{html.escape(result.summary.removeprefix(verdict + ':').strip())}</p>"]
    worst = worst_line(result)
    if worst is not None:
        body.append(f"<p id='worst'><strong>{worst[0]}:</strong> {html.escape(worst[1])}</p>")
    if result.precisions:
        body.append("<ul id='precisions'>" + "".join(
            f"<li><strong>{html.escape(row['precision'])}</strong>: <span{_cell_class(precision_verdict(row))}>"
            f"{html.escape(precision_verdict(row))}</span></li>" for row in result.precisions) + "</ul>")
    body.append("<ul id='providers'>" + "".join(
        f"<li><strong>{html.escape(p.name)}</strong>: <span{_cell_class(p.brief())}>{html.escape(p.brief())}</span>"
        + (f" (session providers: {html.escape(', '.join(p.session_providers))})" if p.ran else "") + "</li>"
        for p in result.providers) + "</ul>")
    plots = ([("Decode latency per byte against position", decode_latency_png)] if result.decode else
             [("Error per variant and provider, as a share of its pass boundary", error_histogram_png),
              ("Latency per backend", latency_png)])
    body.append("<div class='plots'>")
    for title, draw in plots:
        data = base64.b64encode(draw(result)).decode("ascii")
        body.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(title)}</figcaption></figure>")
    body.append("</div>")
    for section in report_sections(result):
        body += _html_section(section)
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:left}th{background:#f3f3f3}"
             ".verdict{font-size:1.15em;padding:.6em .8em;border-radius:4px;border:2px solid}"
             ".verdict.passed{background:#e6f4e6;border-color:#187a18}.verdict.failed{background:#fde8e8;"
             "border-color:#b00}.verdict.not-run{background:#fff4e0;border-color:#a60}"
             "td.passed,span.passed{color:#126312}td.failed,span.failed{color:#a00;font-weight:bold}"
             "td.not-run,span.not-run{color:#8a5300}tr.row-failed{background:#fff0f0}"
             ".plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0;max-width:600px}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>Parity report: {html.escape(result.model_path.name)} - {verdict}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_reports(result: ParityResult, report_dir: str | Path) -> dict[str, Path]:
    """Write parity.json, parity.md and parity.html into ``report_dir``, all three or none; returns their paths."""
    report_dir = Path(report_dir)
    texts = {
        "json": json.dumps(report_json(result), indent=2, allow_nan=False) + "\n",
        "markdown": render_markdown(result),
        "html": render_html(result),
    }
    paths = {kind: report_dir / REPORT_FILES[kind] for kind in texts}
    with staged_outputs() as stage:  # the three files land together
        for kind, text in texts.items():
            stage.path(paths[kind]).write_text(text, encoding="utf-8")
    return paths
