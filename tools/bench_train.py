"""Training throughput of ``lora-train adapt``: one process against two under torchrun, per precision (issue 19).

For each model of ``--models``, each precision of ``--precisions`` and each mode, ``--rounds`` times (a round runs
every model, precision and mode in turn, so that a drifting load spreads over all of them):

    1x2  OMP_NUM_THREADS=2 lora-train adapt BASE ... --batch-size B
    1x1  OMP_NUM_THREADS=1 lora-train adapt BASE ... --batch-size B
    2x1  OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port P \\
             lora-train adapt BASE ... --batch-size B/2        (gloo on the CPU, nccl on CUDA)

the same global batch of B windows of seq_len bytes in every mode. Models: ``demo`` adapts models/demo-base.pt as
tools/make_demo.py does (r 8, alpha 16 on q, k, v, o, ff); ``25M`` a random base of about 25M parameters in
tools/make_sized.py's architecture (its ``config_for`` at 25M without LoRA, as lora-train adapt needs a base;
made once in the work directory; throughput needs no pretraining). Sizes per device (global batch, seq_len, steps):
``SIZES``; ``--quick`` is a smoke run (demo, fp32, 1x1 and 2x1, one round, tiny batches). On CUDA the modes are
1x1, and 2x1 only where there are two GPUs; fp16 is measured by default there only: on this CPU it runs
emulated, some 20x slower than fp32 (27 s a step at 25M; ``--precisions fp16`` asks for it).

Timing: the training steps only. Off a terminal the command prints ``adapt: n/steps (p%) ...`` at each tenth of
the steps (``lora_export.progress.LineProgress``, rank 0 alone, after the step's loss was averaged over the
processes and read, so once every process and the GPU finished the step); the lines are timestamped as they
arrive. Time per step = (t of the last-but-one line - t of the first) / (steps between them): the first tenth
(warm-up) and the last (the final evaluation, the checkpoint) are left out, and so are the start (interpreter,
imports, torchrun's rendezvous) and the evaluations before the first step. Tokens per step = global batch x
seq_len as the checkpoint's training record says; its world size, device, precision and global batch are checked
against the mode asked for. tok/s: best (min step time) and median of the rounds; scaling efficiency =
tok/s(2x1) / tok/s(1x1) / 2 and tok/s(2x1) / tok/s(1x2), from the medians.

Data: the prose corpus cut so that its held-out tenth is one window: the library evaluates up to 64 held-out
windows three times a run (the base, step 0, the last step; about a minute each at 25M, seq_len 1024, on a 2-core
CPU: outside the timing but not outside the budget). Training draws random windows as always; throughput does
not depend on which bytes.

Recorded: the machine (``machine_record``, ``lscpu``, the GPU), the load average before each run (a 1-min load of
``LOAD_LIMIT`` or more flagged), torch's version, every command. Writes ``--results``/bench_train.json and .md
(bench_train_cuda.* for ``--device cuda``) after every run, so that a run killed from outside leaves what it had
measured. Exit 1 when a run failed (its error recorded, the other runs go on).

    python tools/bench_train.py                      # CPU, default: under 10 minutes on a 2-core machine
    python tools/bench_train.py --device cuda --rounds 2
    python tools/bench_train.py --quick --results /tmp/r
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path

import torch
from bench_scale import LOAD_LIMIT, count_label, decimal, load_warning
from make_sized import config_for, random_model

from lora_export.corpus import load_data, prose_text
from lora_export.files import write_json_and_markdown
from lora_export.machine import machine_record
from lora_export.model.checkpoint import read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results"
DEMO_BASE = ROOT / "models" / "demo-base.pt"
SIZED_PARAMS = 25_000_000
#: lora-train adapt's LoRA and optimizer settings, as tools/make_demo.py adapts the demo.
ADAPT_OPTIONS = ["--lora-r", "8", "--alpha", "16", "--targets", "q,k,v,o,ff", "--lr", "3e-3", "--seed", "0"]
PROGRESS = re.compile(r"^adapt: (\d+)/(\d+) \(")  # LineProgress's line, the bar named after the stage
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Size:
    """What one run trains: global_batch windows of seq_len bytes per step, for steps steps (>= 10: the timing
    needs three tenth-lines)."""

    global_batch: int
    seq_len: int
    steps: int


@dataclass(frozen=True)
class Mode:
    """procs processes (torchrun when more than one) of threads CPU threads each."""

    procs: int
    threads: int

    @property
    def label(self) -> str:
        """'PxT': '2x1' is two processes of one thread."""
        return f"{self.procs}x{self.threads}"


SIZES = {("cpu", "demo"): Size(16, 256, 10), ("cpu", "25M"): Size(2, 256, 10),
         ("cuda", "demo"): Size(64, 256, 30), ("cuda", "25M"): Size(16, 1024, 30)}
QUICK = Size(4, 64, 10)
CPU_MODES = (Mode(1, 2), Mode(1, 1), Mode(2, 1))
PRECISIONS = {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "bf16", "fp16"]}


def executable(name: str) -> str:
    """The console script ``name`` beside this interpreter, else on PATH; exits with one line when missing."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        sys.exit(f"bench_train: {name} not found beside {sys.executable} or on PATH (pip install -e . first)")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_data(work: Path, seq_len: int) -> Path:
    """A prose file whose held-out tenth is exactly one window of seq_len (+ 1 target) bytes, checked by the
    library's own split."""
    path = work / f"prose-{seq_len}.txt"
    path.write_bytes(prose_text()[: 10 * (seq_len + 1) + 5])
    held_out = len(load_data([path]).val)
    if held_out != seq_len + 1:
        sys.exit(f"bench_train: {path} holds out {held_out} bytes, not one window of {seq_len + 1}")
    return path


def sized_base(work: Path) -> Path:
    """A random base (r = 0) of about SIZED_PARAMS parameters in make_sized.py's architecture, made once."""
    path = work / f"sized-{count_label(SIZED_PARAMS)}-base.pt"
    if not path.exists():
        config = replace(config_for(SIZED_PARAMS), r=0)
        model = random_model(config, seed=0)
        save_checkpoint(path, model, {"made_by": "tools/bench_train.py (make_sized.config_for, r=0)", "seed": 0})
    return path


def adapt_command(base: Path, output: Path, data: Path, size: Size, mode: Mode, precision: str,
                  device: str) -> list[str]:
    """The command of one run: lora-train adapt, under torchrun on 127.0.0.1 for more than one process."""
    command = [executable("lora-train"), "adapt", str(base), "-o", str(output), "--force", "--data", str(data),
               *ADAPT_OPTIONS, "--steps", str(size.steps), "--eval-every", str(size.steps),
               "--batch-size", str(size.global_batch // mode.procs), "--seq-len", str(size.seq_len),
               "--device", device, "--precision", precision]
    if mode.procs == 1:
        return command
    return [executable("torchrun"), "--nproc-per-node", str(mode.procs), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *command]


@dataclass
class Ran:
    """One command run: exit status (minus the signal that ended it), whether it ran out of time, wall time and
    its output lines (stdout and stderr together) with the seconds since the start at which each arrived."""

    exit_code: int
    timed_out: bool
    wall_s: float
    lines: list[tuple[float, str]]


def run_timed(command: list[str], env: dict[str, str], timeout_s: float) -> Ran:
    """Run ``command`` in its own process group with ``env``, its lines timestamped as they arrive; the group is
    killed after ``timeout_s`` (or when this process is interrupted)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", bufsize=1, start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        os.killpg(child.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in child.stdout]
        code = child.wait()
    finally:
        timer.cancel()
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return Ran(code, expired.is_set(), time.perf_counter() - start, lines)


def step_seconds(lines: list[tuple[float, str]]) -> tuple[float, int, list[float]] | None:
    """(seconds per step from the first progress line to the last-but-one, the steps between them, seconds per
    step of each tenth between them) from a run's timestamped lines; None with fewer than three progress lines."""
    marks = [(at, int(found[1])) for at, line in lines if (found := PROGRESS.match(line))]
    if len(marks) < 3:
        return None
    timed = marks[:-1]
    tenths = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in pairwise(timed)]
    (first_at, first_step), (last_at, last_step) = timed[0], timed[-1]
    return (last_at - first_at) / (last_step - first_step), last_step - first_step, tenths


def check_record(training: dict, size: Size, mode: Mode, precision: str, device: str) -> str | None:
    """Why the checkpoint's training record does not show the run asked for (None when it does)."""
    expected = {"world_size": mode.procs, "global_batch": size.global_batch, "seq_len": size.seq_len,
                "device": device, "precision": precision, "steps": size.steps}
    wrong = {key: training.get(key) for key, value in expected.items() if training.get(key) != value}
    return f"the checkpoint's record says {wrong}, asked for {expected}" if wrong else None


def measure(base: Path, model: str, data: Path, size: Size, mode: Mode, precision: str, device: str, work: Path,
            keep: bool, timeout_s: float) -> dict:
    """One run of ``mode`` and its record: command, load before, exit, timing, tokens per step and the checkpoint's
    training record (world size, global batch, losses first and last)."""
    output = work / f"{model}-{precision}-{mode.label}.pt"
    output.unlink(missing_ok=True)
    command = adapt_command(base, output, data, size, mode, precision, device)
    env = {**os.environ, "OMP_NUM_THREADS": str(mode.threads), "PYTHONUNBUFFERED": "1"}
    load = os.getloadavg()
    record = {"model": model, "precision": precision, "mode": mode.label, "procs": mode.procs,
              "threads": mode.threads, "command": command,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "load_before": list(load),
              "load_warning": load_warning(load)}
    ran = run_timed(command, env, timeout_s)
    timing = step_seconds(ran.lines)
    record.update(exit_code=ran.exit_code, timed_out=ran.timed_out, wall_s=ran.wall_s, error=None,
                  log_tail=[line for _, line in ran.lines[-5:]])
    if ran.exit_code != 0 or timing is None or not output.exists():
        record["error"] = f"exit {ran.exit_code}" + (" (timed out)" if ran.timed_out else "") + (
            "" if timing else ", no timing (fewer than 3 progress lines)")
        return record
    training = read_checkpoint(output)["training"]
    step_s, steps_timed, tenths = timing
    tokens = training["global_batch"] * training["seq_len"]
    record.update(error=check_record(training, size, mode, precision, device), step_s=step_s,
                  steps_timed=steps_timed, tenths_step_s=tenths, tokens_per_step=tokens, tok_per_s=tokens / step_s,
                  checkpoint=str(output) if keep else None, parameters=training["parameters"],
                  training={key: training[key] for key in ("world_size", "global_batch", "batch_size", "seq_len",
                                                           "grad_accum", "device", "precision", "steps")},
                  loss_first_last=[training["losses"][0], training["losses"][-1]])
    if not keep:
        output.unlink()
    return record


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, precision, mode), in run order: rounds, min and median step time, best and median
    tok/s (None when no round succeeded), the highest load before a round, the first error."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["model"], record["precision"], record["mode"]), []).append(record)
    rows = []
    for (model, precision, mode), rounds in groups.items():
        good = [record for record in rounds if record["error"] is None]
        steps = [record["step_s"] for record in good]
        tokens = good[0]["tokens_per_step"] if good else None
        rows.append({"model": model, "precision": precision, "mode": mode, "rounds": len(rounds), "ok": len(good),
                     "parameters": good[0]["parameters"]["total"] if good else None,
                     "global_batch": good[0]["training"]["global_batch"] if good else None,
                     "seq_len": good[0]["training"]["seq_len"] if good else None, "tokens_per_step": tokens,
                     "step_s_min": min(steps, default=None),
                     "step_s_median": statistics.median(steps) if steps else None,
                     "tok_per_s_best": tokens / min(steps) if steps else None,
                     "tok_per_s_median": tokens / statistics.median(steps) if steps else None,
                     "load_max": max(record["load_before"][0] for record in rounds),
                     "error": next((record["error"] for record in rounds if record["error"]), None)})
    return rows


def scaling(rows: list[dict]) -> list[dict]:
    """Per (model, precision): tok/s(2x1) / tok/s(1x1) / 2 (efficiency) and tok/s(2x1) / tok/s(1x2), medians;
    None where a mode is missing or failed."""
    speed = {(row["model"], row["precision"], row["mode"]): row["tok_per_s_median"] for row in rows}
    result = []
    for model, precision in dict.fromkeys((row["model"], row["precision"]) for row in rows):
        two, one, threads = (speed.get((model, precision, label)) for label in ("2x1", "1x1", "1x2"))
        result.append({"model": model, "precision": precision,
                       "efficiency_2x1_vs_1x1": two / one / 2 if two and one else None,
                       "ratio_2x1_vs_1x2": two / threads if two and threads else None})
    return result


def lscpu() -> dict[str, str] | None:
    """lscpu's fields (the flags left out: machine_record has the ones that matter); None without lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields if key.strip() != "Flags"}


def machine(device: str) -> dict:
    """machine_record(), lscpu, and on CUDA the GPUs torch sees and its CUDA version."""
    record = {**machine_record(), "lscpu": lscpu()}
    if device == "cuda":
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        record["torch_cuda"] = torch.version.cuda
    return record


def render_markdown(result: dict) -> str:
    """The results as markdown: the machine, one row per (model, precision, mode), the scaling per (model,
    precision); a 1-min load of LOAD_LIMIT or more marked (!)."""
    m = result["machine"]
    cpu = (m["lscpu"] or {}).get("Model name", m["cpu"])
    lines = [f"# Training throughput of `lora-train adapt` ({result['device']})", "",
             f"{result['started']}; {cpu}, {m['cores']} cores; torch {m['versions']['torch']}"
             + (f"; GPUs {', '.join(m['gpus'])}" if m.get("gpus") else "")
             + f"; {result['rounds']} round(s); `{' '.join(result['argv'])}`", "",
             "Mode PxT: P processes of T threads; the same global batch in every mode. Step time: min / median of "
             "the rounds, training steps only (tools/bench_train.py says how).", "",
             "| model | parameters | precision | mode | global batch x seq_len | tokens/step | step ms (min / median) "
             "| tok/s (best / median) | load before (max) | status |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for row in result["summary"]:
        load = f"{row['load_max']:.2f}" + (" (!)" if row["load_max"] >= LOAD_LIMIT else "")
        lines.append(f"| {row['model']} | {count_label(row['parameters']) if row['parameters'] else '-'} | "
                     f"{row['precision']} | {row['mode']} | {row['global_batch']} x {row['seq_len']} | "
                     f"{row['tokens_per_step']} | {decimal(row['step_s_min'], 1e-3, 0)} / "
                     f"{decimal(row['step_s_median'], 1e-3, 0)} | {decimal(row['tok_per_s_best'], 1, 0)} / "
                     f"{decimal(row['tok_per_s_median'], 1, 0)} | {load} | {row['error'] or 'ok'} |")
    lines += ["", "Scaling (medians): efficiency = tok/s(2x1) / tok/s(1x1) / 2; against threads = tok/s(2x1) / "
              "tok/s(1x2).", "", "| model | precision | efficiency 2x1 vs 1x1 | 2x1 / 1x2 |", "|---|---|---:|---:|"]
    lines += [f"| {row['model']} | {row['precision']} | {decimal(row['efficiency_2x1_vs_1x1'])} | "
              f"{decimal(row['ratio_2x1_vs_1x2'])} |" for row in result["scaling"]]
    return "\n".join(lines) + "\n"


def result_stem(device: str) -> str:
    """The name of the result files: bench_train for the CPU, bench_train_<device> otherwise."""
    return "bench_train" if device == "cpu" else f"bench_train_{device}"


def write_results(args: argparse.Namespace, started: str, host: dict, records: list[dict]) -> None:
    """The results of ``records`` so far, as JSON and markdown in args.results (created), each written atomically."""
    rows = summarize(records)
    result = {"tool": "tools/bench_train.py", "argv": args.argv, "started": started, "device": args.device,
              "quick": args.quick, "rounds": args.rounds, "machine": host,
              "sizes": {model: asdict(QUICK if args.quick else SIZES[(args.device, model)]) for model in args.models},
              "summary": rows, "scaling": scaling(rows), "runs": records}
    write_json_and_markdown(args.results, result_stem(args.device), result, render_markdown(result))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked; --quick and the device's defaults applied; ``argv`` kept as args.argv."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (model, precision, mode)")
    parser.add_argument("--models", nargs="+", choices=["demo", "25M"], default=["demo", "25M"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 bf16 on the CPU, fp32 bf16 fp16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="smoke run: demo, fp32, 1x1 and 2x1, 1 round, tiny sizes")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds a run may take before it is killed")
    parser.add_argument("--work", type=Path, help="keep the bases, data and each run's checkpoint (the last round's) "
                                                  "here [default: a temporary directory, checkpoints deleted as read]")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of bench_train.json / .md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_train: --device cuda: torch sees no CUDA device\n")
    if args.quick:
        args.rounds, args.models = 1, ["demo"]
        args.precisions = args.precisions or ["fp32"]
    args.precisions = args.precisions or PRECISIONS[args.device]
    return args


def modes_for(device: str, quick: bool) -> list[Mode]:
    """1x2, 1x1, 2x1 on the CPU (1x1, 2x1 when quick); 1x1 on CUDA, and 2x1 where there are two GPUs."""
    if device == "cuda":
        return [Mode(1, 1)] + ([Mode(2, 1)] if torch.cuda.device_count() >= 2 else [])
    return [mode for mode in CPU_MODES if not (quick and mode.threads > 1)]


def run_all(args: argparse.Namespace, work: Path, save: Callable[[list[dict]], None]) -> list[dict]:
    """Every run, round by round; a line per run on stderr, ``save(records so far)`` after each."""
    modes = modes_for(args.device, args.quick)
    sizes = {model: QUICK if args.quick else SIZES[(args.device, model)] for model in args.models}
    bases = {model: DEMO_BASE if model == "demo" else sized_base(work) for model in args.models}
    data = {model: write_data(work, size.seq_len) for model, size in sizes.items()}
    records = []
    for round_ in range(args.rounds):
        for model in args.models:
            for precision in args.precisions:
                for mode in modes:
                    record = measure(bases[model], model, data[model], sizes[model], mode, precision, args.device,
                                     work, args.work is not None, args.timeout)
                    records.append({**record, "round": round_})
                    save(records)
                    speed = f"{record['tok_per_s']:.0f} tok/s" if record["error"] is None else record["error"]
                    print(f"bench_train: round {round_ + 1}/{args.rounds} {model} {precision} {mode.label}: {speed}"
                          f" (load {record['load_before'][0]:.2f})", file=sys.stderr, flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every run succeeded, else 1."""
    args = parse_args(argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    host = machine(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        records = run_all(args, work, lambda so_far: write_results(args, started, host, so_far))
    for suffix in (".json", ".md"):
        print(f"bench_train: wrote {args.results / result_stem(args.device)}{suffix}", file=sys.stderr)
    return 1 if any(record["error"] for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
