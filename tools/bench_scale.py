"""Peak memory, wall time per stage and file sizes of ``lora-export`` on models of real size (issue 18).

For each size of ``--params`` a checkpoint from ``tools/make_sized.py`` (made once, kept in ``--work``), then
for each form of ``--forms`` the command a user runs, as a child process in a fresh output directory:

    merged          lora-export CKPT -o model.onnx
    adapters        lora-export CKPT -o model.onnx --adapters-as-inputs
    genai-merged    lora-export CKPT -o genai --genai
    genai-adapters  lora-export CKPT -o genai --genai --adapters-as-inputs
    int8 / int4     lora-export CKPT -o model.onnx --quantize int8 / int4
    fp16            lora-export CKPT -o model.onnx --fp16

each with its validation (the default) and with ``--no-validate`` (``--validation``), ``--rounds`` times.

Measured per run:

* peak RSS: GNU time's ``%M`` (``/usr/bin/time -f %M -o FILE lora-export ...``), the command's ``ru_maxrss``
  (that of the children it waited for included; lora-export runs torch, onnxslim and ONNX Runtime in its own
  process and starts none). Not ``os.wait4`` of a child of this script: Linux keeps the larger of the forking
  process's RSS at exec and the child's own peak, and this script holds torch (for the parameter counts), so a
  small command would read as this script's size; time is forked from a process of a few MB;
* wall time, and per stage (``stage_seconds``): each ``[lora-export] ...`` line (stderr) starts a stage, which ends
  at the next one or at the next stdout line (the CLI prints what landed when a step ends); ``startup`` (interpreter
  and imports) runs to the first, ``exit`` from the last line to the end; ``validation`` is the pipeline's clock
  (``report: ... (validation X s)``), ``other`` the rest. Lines are timestamped as they arrive (the command runs
  with ``PYTHONUNBUFFERED=1``). The export's own clock (``time: load 1.2s, export ...``) is kept beside it;
* the files written (model, .data, adapter, genai directory; the parity report apart), then deleted.

A run past ``--timeout`` gets SIGINT (lora-export removes its staged outputs), INTERRUPT_GRACE_S later SIGKILL.

The machine (``machine_record``) and the load before each run are recorded; a 1-min load >= 1.5 is flagged in the
record and on stderr. Results merge into ``--results``/bench_scale.json keyed by (params, form, validation,
checkpoint format), so sizes can run in separate invocations; bench_scale.md (tables; targets: peak RSS <= 2.0x
the fp32 weights for export, <= 3.0x with validation, at 405M and 1.23B; wall time 1.23B / 105M <= 15) and
bench_scale.png (peak RSS and wall time against parameters, log-log, the 1x floor and the targets drawn) are
rewritten from the whole JSON after every run.

    python tools/bench_scale.py --params 27M 105M 405M 1.23B --work /var/tmp/bench_scale
    python tools/bench_scale.py --params 405M --forms merged adapters --validation without --rounds 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from make_sized import config_for, count_parameters, parse_count

from lora_export.files import atomic_write, read_json, write_json_and_markdown
from lora_export.layout import default_report_dir
from lora_export.machine import machine_record

#: The form -> (output of -o, options) of the command it runs.
FORMS = {"merged": ("model.onnx", []), "adapters": ("model.onnx", ["--adapters-as-inputs"]),
         "genai-merged": ("genai", ["--genai"]), "genai-adapters": ("genai", ["--genai", "--adapters-as-inputs"]),
         "int8": ("model.onnx", ["--quantize", "int8"]), "int4": ("model.onnx", ["--quantize", "int4"]),
         "fp16": ("model.onnx", ["--fp16"])}
VALIDATIONS = {"both": (False, True), "without": (False,), "with": (True,)}
STAGE_PREFIX = "[lora-export] "  # ConsoleProgress's prefix: the CLI's stage lines
#: Peak RSS as a multiple of the fp32 weights: without / with validation; applies from TARGET_FROM parameters.
RSS_TARGET = {False: 2.0, True: 3.0}
TARGET_FROM = 400e6
TIME_RATIO = ("1.23B", "105M", 15.0)  # wall time of the first size over the second's <= the limit
LOAD_LIMIT = 1.5
POLL_S, INTERRUPT_GRACE_S = 0.05, 300.0  # a long call into C defers the interrupt
RESULTS = Path(__file__).parent / "results"
LORA_EXPORT = Path(sys.executable).parent / "lora-export"
TIME = "/usr/bin/time"  # GNU time


@dataclass
class Measured:
    """One command run: how it ended, its wall time and peak RSS, and every line it printed."""

    exit_code: int  # the command's exit status, or minus the signal that ended it
    timed_out: bool
    wall_s: float
    peak_rss_bytes: int | None  # None when it could not be measured (GNU time killed after a timeout)
    events: list[tuple[float, str, str]]  # (seconds since the start, 'stdout' or 'stderr', line)


def _read_lines(stream: IO[str], name: str, start: float, events: list[tuple[float, str, str]]) -> None:
    """Append (seconds since ``start``, ``name``, line) for each line of ``stream`` as it arrives."""
    for line in stream:
        events.append((time.perf_counter() - start, name, line.rstrip("\n")))


def _wait(pid: int, deadline: float) -> tuple[int, bool]:
    """(wait status, timed out) of child ``pid``, the leader of its own process group. Past ``deadline``, or when
    this process is interrupted, the group gets SIGINT (GNU time ignores it; lora-export stops and removes its
    staged outputs), INTERRUPT_GRACE_S later SIGKILL. An interrupt is raised again once the child has ended."""
    timed_out = interrupted = False
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if interrupted:
                    raise KeyboardInterrupt
                return status, timed_out
            now = time.perf_counter()
            if now > deadline:
                os.killpg(pid, signal.SIGKILL if timed_out else signal.SIGINT)
                timed_out, deadline = True, now + INTERRUPT_GRACE_S
            time.sleep(POLL_S)
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted, deadline = True, 0.0


def _default_interrupt() -> None:
    """In the child before it runs the command: SIGINT back to its default, so that the command can be interrupted
    even where this script was started with SIGINT ignored (a pytest-xdist worker; Python then leaves it ignored
    in the command too)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_peak(path: Path) -> tuple[int | None, int | None]:
    """(peak RSS in bytes, the signal that ended the command or None) from GNU time's ``-f %M -o`` file: its last
    line the peak in KiB, before it 'Command terminated by signal N' when a signal ended the command; (None,
    None) when time itself was killed before it wrote."""
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines or not lines[-1].strip().isdigit():
        return None, None
    killed = re.search(r"terminated by signal (\d+)", "\n".join(lines))
    return int(lines[-1]) * 1024, int(killed.group(1)) if killed else None


def run_measured(command: list[str], cwd: Path, timeout_s: float) -> Measured:
    """Run ``command`` in ``cwd`` under GNU time (TIME) in its own process group, with ``PYTHONUNBUFFERED=1``; its
    lines timestamped as they arrive, its peak RSS as time reports it. Interrupted after ``timeout_s``."""
    peak_file = cwd / ".bench_scale.peak"
    start = time.perf_counter()
    child = subprocess.Popen([TIME, "-f", "%M", "-o", str(peak_file), *command], cwd=cwd,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1, start_new_session=True,
                             preexec_fn=_default_interrupt)
    events: list[tuple[float, str, str]] = []
    readers = [threading.Thread(target=_read_lines, args=(stream, name, start, events), daemon=True)
               for stream, name in ((child.stdout, "stdout"), (child.stderr, "stderr"))]
    for reader in readers:
        reader.start()
    try:
        status, timed_out = _wait(child.pid, start + timeout_s)
        wall_s = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        for reader, stream in zip(readers, (child.stdout, child.stderr), strict=True):
            reader.join(timeout=5.0)
            if not reader.is_alive():  # else a process the command left holds the pipe: closing would block
                stream.close()
        peak, killed_by = read_peak(peak_file)
    finally:
        peak_file.unlink(missing_ok=True)
    return Measured(-killed_by if killed_by else child.returncode, timed_out, wall_s, peak, sorted(events))


def stage_seconds(events: list[tuple[float, str, str]], wall_s: float,
                  validation_s: float | None) -> list[tuple[str, float]]:
    """[(stage, seconds)] in order: ``startup`` to the first stage line; each stage line to the next stage or stdout
    line (a stage still open at the end runs to ``wall_s``); ``validation`` when given (the pipeline's clock);
    ``exit`` from the last line to the end of the command when no stage was open; ``other`` the rest of
    ``wall_s`` (the gaps between stages)."""
    stages: list[tuple[str, float]] = []
    name: str | None = "startup"
    opened = last = 0.0
    for at, stream, line in events:
        last = at
        is_stage = stream == "stderr" and line.startswith(STAGE_PREFIX)
        if not is_stage and stream != "stdout":
            continue  # a progress line within a stage
        if name is not None:
            stages.append((name, at - opened))
        name, opened = (line[len(STAGE_PREFIX):], at) if is_stage else (None, at)
    if validation_s is not None:
        stages.append(("validation", validation_s))
    stages.append((name, wall_s - opened) if name is not None else ("exit", wall_s - last))
    stages.append(("other", max(0.0, wall_s - sum(seconds for _, seconds in stages))))
    return stages


def parse_summary(lines: list[str]) -> tuple[dict[str, float], float | None]:
    """(the export's clock from the summary's ``time:`` line: {'load': 1.2, 'export': ...}, validation seconds
    from ``report: ... (validation X s)`` or None) of the command's stdout lines."""
    clock: dict[str, float] = {}
    validation_s = None
    for line in lines:
        if line.startswith("time:"):
            clock = {name: float(value) for name, value in re.findall(r"(\w[\w ]*?) ([\d.]+)s\b", line[5:])}
        found = re.search(r"\(validation ([\d.]+) s\)$", line)
        if line.startswith("report:") and found:
            validation_s = float(found.group(1))
    return clock, validation_s


def file_sizes(directory: Path, report_dir: Path) -> dict[str, int]:
    """{path relative to ``directory``: bytes} of every file written there outside ``report_dir``."""
    return {str(path.relative_to(directory)): path.stat().st_size for path in sorted(directory.rglob("*"))
            if path.is_file() and report_dir not in path.parents}


def count_label(count: int) -> str:
    """27_000_000 -> '27M', 1_230_000_000 -> '1.23B', 4_086_016 -> '4.086M' (4 significant digits)."""
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.4g}{suffix}"
    return str(count)


def load_warning(load: tuple[float, float, float]) -> str | None:
    """A line when the 1-min load is LOAD_LIMIT or more: the figures are not those of a quiet machine."""
    if load[0] < LOAD_LIMIT:
        return None
    return f"1-min load {load[0]:.2f} >= {LOAD_LIMIT} before the run: not a quiet machine"


def ensure_checkpoint(work: Path, params: int, suffix: str, timeout_s: float) -> Path:
    """The checkpoint of ``params`` parameters in ``work`` (``sized-<label><suffix>``), made by make_sized.py in a
    child process when missing (under a partial name, renamed when complete)."""
    path = work / f"sized-{count_label(params)}{suffix}"
    if path.exists():
        return path
    partial = path.with_name(f"{path.stem}.partial{suffix}")
    command = [sys.executable, str(Path(__file__).parent / "make_sized.py"), "--params", str(params), "-o",
               str(partial), "--force"]
    print(f"bench_scale: making {path}", file=sys.stderr, flush=True)
    made = run_measured(command, work, timeout_s)
    if made.exit_code != 0:
        last = made.events[-1][2] if made.events else "no output"
        sys.exit(f"bench_scale: make_sized.py --params {params} failed (exit {made.exit_code}): {last}")
    partial.replace(path)
    return path


def rss_multiple(peak: int | None, parameters: int) -> float | None:
    """A peak RSS as a multiple of the fp32 weights (``parameters`` x 4 bytes); None when not measured."""
    return None if peak is None else peak / (parameters * 4)


def measure(checkpoint: Path, params: int, parameters: int, form: str, validate: bool, work: Path,
            timeout_s: float) -> dict:
    """Run ``form`` on ``checkpoint`` of ``params`` parameters asked for (``parameters`` made) with or without its
    validation, in a fresh directory under ``work`` removed afterwards; its record."""
    output, options = FORMS[form]
    # --no-memory-check: the pre-flight's estimate is fitted to these very figures, so it must not stop the run
    command = [str(LORA_EXPORT), str(checkpoint), "-o", output, *options, "--no-memory-check"] + (
        [] if validate else ["--no-validate"])
    out_dir = Path(tempfile.mkdtemp(prefix=f"out-{count_label(params)}-{form}-", dir=work))
    load = os.getloadavg()
    warning = load_warning(load)
    if warning:
        print(f"bench_scale: warning: {warning}", file=sys.stderr, flush=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    try:
        run = run_measured(command, out_dir, timeout_s)
        files = file_sizes(out_dir, default_report_dir(out_dir / output))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    stdout = [line for _, stream, line in run.events if stream == "stdout"]
    stderr = [line for _, stream, line in run.events if stream == "stderr"]
    clock, validation_s = parse_summary(stdout)
    return {"params": params, "label": count_label(params), "parameters": parameters, "form": form,
            "validate": validate, "checkpoint": checkpoint.suffix.lstrip("."), "command": shlex.join(command),
            "started": started, "load_before": list(load), "load_warning": warning, "exit_code": run.exit_code,
            "timed_out": run.timed_out, "error": None if run.exit_code == 0 or not stderr else stderr[-1],
            "wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes,
            "rss_multiple": rss_multiple(run.peak_rss_bytes, parameters),
            "stages": stage_seconds(run.events, run.wall_s, validation_s), "export_clock": clock,
            "validation_s": validation_s, "files": files, "files_bytes": sum(files.values()),
            "log": [list(event) for event in run.events]}


def record_key(record: dict) -> tuple[int, int, bool, str]:
    """What a record measures, in table order: (params, form's place in FORMS, validated, checkpoint format)."""
    return record["params"], list(FORMS).index(record["form"]), record["validate"], record["checkpoint"]


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the keys ``new`` measured again, plus ``new``; sorted by key, rounds in order."""
    measured = {record_key(record) for record in new}
    kept = [record for record in old if record_key(record) not in measured]
    return sorted(kept + new, key=lambda record: (record_key(record), record["round"]))


def status_of(record: dict) -> str:
    """'ok', 'timeout', 'killed (signal N)' or 'exit N'."""
    if record["timed_out"]:
        return "timeout"
    code = record["exit_code"]
    return "ok" if code == 0 else f"killed (signal {-code})" if code < 0 else f"exit {code}"


def summarize(records: list[dict]) -> list[dict]:
    """One row per key: the first record's fields, the fastest wall time and the highest peak RSS of its rounds,
    the first status that is not 'ok' (else 'ok')."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(record_key(record), []).append(record)
    rows = []
    for key in sorted(groups):
        rounds = groups[key]
        peak = max((record["peak_rss_bytes"] for record in rounds if record["peak_rss_bytes"] is not None),
                   default=None)
        statuses = [status_of(record) for record in rounds]
        rows.append({**rounds[0], "rounds": len(rounds), "wall_s": min(record["wall_s"] for record in rounds),
                     "peak_rss_bytes": peak, "rss_multiple": rss_multiple(peak, rounds[0]["parameters"]),
                     "status": next((status for status in statuses if status != "ok"), "ok"),
                     "load_max": max(record["load_before"][0] for record in rounds)})
    return rows


def target_text(row: dict) -> str:
    """The peak-RSS target of a row and whether it was met, or '-' below TARGET_FROM parameters."""
    if row["params"] < TARGET_FROM:
        return "-"
    limit = RSS_TARGET[row["validate"]]
    met = row["status"] == "ok" and row["rss_multiple"] is not None and row["rss_multiple"] <= limit
    return f"<= {limit}x: {'met' if met else 'MISSED'}"


def time_ratio_lines(rows: list[dict]) -> list[str]:
    """Markdown table rows: wall time of TIME_RATIO's first size over its second's, per form, validation and
    checkpoint format that has both."""
    big, small, limit = TIME_RATIO
    walls = {(row["params"], row["form"], row["validate"], row["checkpoint"]): row["wall_s"] for row in rows
             if row["status"] == "ok"}
    lines = []
    for (params, form, validate, checkpoint), wall in walls.items():
        other = walls.get((parse_count(small), form, validate, checkpoint))
        if params == parse_count(big) and other:
            ratio = wall / other
            lines.append(f"| {form} | {'yes' if validate else 'no'} | {checkpoint} | {ratio:.1f} | "
                         f"{'met' if ratio <= limit else 'MISSED'} |")
    return lines


def decimal(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """``value / scale`` with ``digits`` decimals, '-' for None (not measured)."""
    return "-" if value is None else f"{value / scale:.{digits}f}"


def progress_line(record: dict) -> str:
    """One line about a finished run, for the console."""
    return (f"{record['label']} {record['form']} {'with' if record['validate'] else 'without'} validation: "
            f"{status_of(record)}, {record['wall_s']:.1f} s, peak RSS {decimal(record['peak_rss_bytes'], 1e9)} GB "
            f"({decimal(record['rss_multiple'])}x the fp32 weights), files {decimal(record['files_bytes'], 1e9, 3)} GB")


def results_line(row: dict) -> str:
    """The results-table row of a summarized row (``summarize``); a load of LOAD_LIMIT or more marked (!)."""
    load = f"{row['load_max']:.2f}" + (" (!)" if row["load_max"] >= LOAD_LIMIT else "")
    return (f"| {row['label']} | {count_label(row['parameters'])} | {row['form']} | "
            f"{'yes' if row['validate'] else 'no'} | {row['checkpoint']} | {row['wall_s']:.1f} | "
            f"{decimal(row['peak_rss_bytes'], 1e9)} | {decimal(row['rss_multiple'])} | {target_text(row)} | "
            f"{decimal(row['files_bytes'], 1e9, 3)} | {row['status']} | {row['rounds']} | {load} |")


def render_markdown(records: list[dict]) -> str:
    """bench_scale.md: the results table, the time ratios, the stages of each run and the machines."""
    rows = summarize(records)
    big, small, limit = TIME_RATIO
    lines = ["# lora-export at scale (tools/bench_scale.py)", "",
             f"Peak RSS of the whole command over its fp32 weights (parameters x 4 bytes); targets from "
             f"{count_label(int(TARGET_FROM))} parameters: export <= {RSS_TARGET[False]}x, export + validation <= "
             f"{RSS_TARGET[True]}x. Wall: the fastest round; peak RSS: the highest.", "",
             "| params | parameters | form | validation | ckpt | wall s | peak RSS GB | x fp32 weights | target | "
             "files GB | status | rounds | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [results_line(row) for row in rows]
    ratios = time_ratio_lines(rows)
    lines += ["", f"Wall time {big} / {small} (target <= {limit}):", ""]
    lines += (["| form | validation | ckpt | ratio | target |", "|---|---|---|---|---|", *ratios] if ratios
              else [f"not measured: needs both {big} and {small} of a form"])
    lines += ["", "Stages (s; the first round of each):", "", "| params | form | validation | stages |",
              "|---|---|---|---|"]
    for row in rows:
        stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in row["stages"])
        lines.append(f"| {row['label']} | {row['form']} | {'yes' if row['validate'] else 'no'} | {stages} |")
    machines = {(m["cpu"], m["cores"], m.get("memory_gb")) for m in (row["machine"] for row in rows)}
    lines += ["", "Machines: " + "; ".join(f"{cpu}, {cores} cores, {memory} GB" for cpu, cores, memory in
                                          sorted(machines, key=str)), ""]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """bench_scale.png: peak RSS (with the 1x floor and the 2x / 3x targets) and wall time against parameters,
    log-log, one line per form and validation (dashed: export only); runs that failed as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(records)
    figure, (rss_axes, time_axes) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = dict(zip(FORMS, plt.get_cmap("tab10").colors, strict=False))
    for form in FORMS:
        for validate in (False, True):
            series = [row for row in rows if row["form"] == form and row["validate"] == validate]
            for done, marker in ((True, "o-" if validate else "o--"), (False, "x")):
                points = [row for row in series if (row["status"] == "ok") == done and row["peak_rss_bytes"]]
                if not points:
                    continue
                label = f"{form}{' + validation' if validate else ''}" + ("" if done else " (failed)")
                xs = [row["parameters"] for row in points]
                rss_axes.plot(xs, [row["peak_rss_bytes"] / 1e9 for row in points], marker, color=colors[form],
                              label=label)
                time_axes.plot(xs, [row["wall_s"] for row in points], marker, color=colors[form], label=label)
    counts = [row["parameters"] for row in rows] or [1e6]
    span = [min(counts) / 1.3, max(counts) * 1.3]
    for multiple, style in ((1, "k-"), (RSS_TARGET[False], "k--"), (RSS_TARGET[True], "k:")):
        rss_axes.plot(span, [multiple * count * 4 / 1e9 for count in span], style, linewidth=1,
                      label="1x fp32 weights (floor)" if multiple == 1 else f"{multiple}x target")
    for axes, ylabel in ((rss_axes, "peak RSS (GB)"), (time_axes, "wall time (s)")):
        axes.set(xscale="log", yscale="log", xlabel="parameters", ylabel=ylabel)
        axes.grid(True, which="both", alpha=0.3)
    rss_axes.legend(fontsize=7)
    time_axes.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda name: figure.savefig(name, format="png", dpi=110))
    plt.close(figure)


def write_results(results: Path, records: list[dict]) -> None:
    """bench_scale.json (every record), .md and .png into ``results``, each replaced whole."""
    write_json_and_markdown(results, "bench_scale", {"records": records}, render_markdown(records))
    plot(records, results / "bench_scale.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", nargs="+", required=True, help="sizes: 27M 105M 405M 1.23B ...")
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--validation", choices=list(VALIDATIONS), default="both",
                        help="measure each form without (--no-validate), with its validation, or both")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each (size, form, validation)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds a run may take before it is killed")
    parser.add_argument("--work", type=Path, help="where checkpoints are kept for later runs [default: a temp dir]")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of bench_scale.json/.md/.png")
    parser.add_argument("--checkpoint-format", choices=["pt", "safetensors"], default="pt")
    args = parser.parse_args(argv)
    try:
        args.params = [parse_count(text) for text in args.params]
    except ValueError as err:
        parser.exit(2, f"bench_scale: {err}\n")
    if args.rounds < 1 or args.timeout <= 0:
        parser.exit(2, "bench_scale: --rounds must be >= 1 and --timeout > 0\n")
    for tool, fix in ((LORA_EXPORT, "install lora-export into this interpreter's environment"),
                      (Path(TIME), "install GNU time")):
        if not tool.is_file():
            parser.exit(2, f"bench_scale: {tool}: missing ({fix})\n")
    return args


def load_records(path: Path) -> list[dict]:
    """The records of an earlier bench_scale.json (none when it is missing); ValueError with one line when it is
    not one."""
    if not path.exists():
        return []
    records = read_json(path)
    if not isinstance(records, dict) or not isinstance(records.get("records"), list):
        raise ValueError(f"{path}: not a bench_scale.json (no 'records' list)")
    return records["records"]


def bench_size(args: argparse.Namespace, params: int, work: Path, records: list[dict], machine: dict) -> list[dict]:
    """Every run of one size (``args.rounds`` x forms x validations), the results rewritten after each; returns
    ``records`` merged with them."""
    checkpoint = ensure_checkpoint(work, params, f".{args.checkpoint_format}", args.timeout)
    parameters = count_parameters(config_for(params))
    new: list[dict] = []
    for round_index in range(args.rounds):
        for form in args.forms:
            for validate in VALIDATIONS[args.validation]:
                record = measure(checkpoint, params, parameters, form, validate, work, args.timeout)
                new.append({**record, "round": round_index, "machine": machine})
                print(progress_line(record), flush=True)
                write_results(args.results, merge_records(records, new))
    return merge_records(records, new)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = load_records(args.results / "bench_scale.json")
    except ValueError as err:
        sys.exit(f"bench_scale: {err}")
    memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    machine = {**machine_record(), "memory_gb": memory_gb}
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for params in args.params:
            records = bench_size(args, params, work, records, machine)
    print(f"bench_scale: wrote {args.results}/bench_scale.json, .md, .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
