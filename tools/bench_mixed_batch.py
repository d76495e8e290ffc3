"""Mixed-adapter scoring benchmark (issue 20): one batch of 8 rows, each row its own adapter (4 adapters + the base)
through the adapter-slots graph, against the same batch with one adapter for every row (the adapters-as-inputs
graph, ``RunOptions.add_active_adapter``) and against the merged graph. Targets, at (8, 256): slots / one adapter
<= 1.15 and slots / merged <= 1.25.

Per model and thread count (``--threads``), each backend is timed in its own warmed block (never call by call in
turns: ONNX Runtime's intra-op threads spin after a run and slow whatever runs next), ``--rounds`` rounds of
``--repeats`` calls (``bench_perf.blocks_ms``); min and median are reported, the ratios taken from the medians.
Before timing, every row of the mixed batch is held against the same row run through the adapters-as-inputs graph
with that row's adapter file active (``rows_match``): a fast wrong answer counts for nothing.

Models: the demo (models/demo.pt: its trained LoRA and 3 random same-base adapters of ranks 4, 12 and 16,
``bench_mixed_generate.other_adapter``) and, with ``--bigger``, a 25M-parameter random model
(``make_sized``). ``--quick``: a tiny random model (dim 32, one block) at (8, 64) instead, 1 thread, 1 round of 2
calls, no onnxslim: a smoke run for the test suite, whose timings mean nothing. Writes
``--results``/bench_mixed_batch.json and .md with the machine record (CPU, SIMD, load, versions).

    python tools/bench_mixed_batch.py --bigger
    python tools/bench_mixed_batch.py --quick --results /tmp/r
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from bench_mixed_generate import BIGGER_PARAMS, DEMO, OTHER_RANKS, RESULTS, other_adapter
from bench_perf import blocks_ms, ort_session
from make_sized import config_for, random_model

from lora_export.export.adapters import activate_adapters
from lora_export.export.convert import export_onnx
from lora_export.export.slots import pack_adapters, read_pack, slot_feeds
from lora_export.files import write_json_and_markdown
from lora_export.layout import Form
from lora_export.machine import machine_record
from lora_export.model.checkpoint import read_checkpoint, save_checkpoint
from lora_export.model.transformer import ModelConfig

ROWS = 8
#: The model of --quick: small enough that its three exports take seconds.
TINY = ModelConfig(dim=32, depth=1, heads=2, dim_head=16, n_local_attn_heads=1, local_attn_window_size=16,
                   max_seq_len=64, r=4, lora_alpha=8.0, lora_targets=["q", "k", "v", "o", "ff"])
TARGETS = {"slots_over_one_adapter": 1.15, "slots_over_merged": 1.25}
BACKENDS = ("slots, mixed adapters", "adapters-as-inputs, one adapter", "merged")


def prepare(checkpoint: Path, work: Path, simplify_graph: bool) -> dict:
    """The three graphs of ``checkpoint`` (merged, adapters-as-inputs, slots), the 4 adapter files (its own and 3
    random ones of the same base) and their pack, written into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    exported = {form: export_onnx(checkpoint, work / f"model.{form}.onnx", form=form, simplify_graph=simplify_graph)
                for form in (Form.MERGED, Form.ADAPTERS, Form.SLOTS)}
    files = [exported[Form.ADAPTERS].adapter_path]
    files += [other_adapter(checkpoint, rank, seed, work, exported[Form.ADAPTERS].model_path)
              for seed, rank in enumerate(OTHER_RANKS, start=1)]
    pack = pack_adapters(files, work / "pack.onnx_adapter", ["own", *(f"r{rank}" for rank in OTHER_RANKS)],
                         model=exported[Form.SLOTS].model_path)
    return {"models": {form: result.model_path for form, result in exported.items()}, "files": files, "pack": pack}


def batch_feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Seeded input_ids and an all-ones attention_mask [batch, seq]."""
    ids = np.random.default_rng(batch * 1000 + seq).integers(0, 256, (batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def rows_match(sessions: dict, prepared: dict, feeds: dict, mixed: dict, slots: list[int]) -> float:
    """max |slots graph - adapters-as-inputs graph| over every row of the mixed batch, each row's reference run
    with that row's adapter file active (slot 0: no adapter)."""
    got = sessions[BACKENDS[0]].run(["logits"], {**feeds, **mixed})[0]
    worst = 0.0
    for slot in sorted(set(slots)):
        run_options, _keep = activate_adapters(*([] if slot == 0 else [prepared["files"][slot - 1]]))
        want = sessions[BACKENDS[1]].run(["logits"], feeds, run_options)[0]
        rows = [row for row, chosen in enumerate(slots) if chosen == slot]
        worst = max(worst, float(np.abs(got[rows] - want[rows]).max()))
    return worst


def measure_threads(prepared: dict, threads: int, batch: int, seq: int, rounds: int, repeats: int) -> dict:
    """One thread count: each backend's min / median ms in its own block, and the rows' agreement."""
    models = prepared["models"]
    sessions = {BACKENDS[0]: ort_session(models[Form.SLOTS], threads),
                BACKENDS[1]: ort_session(models[Form.ADAPTERS], threads),
                BACKENDS[2]: ort_session(models[Form.MERGED], threads)}
    feeds = batch_feeds(batch, seq)
    pack = read_pack(prepared["pack"])
    slots = [(row + 1) % pack.size for row in range(batch)]  # own, r4, r12, r16, base, own, ...
    mixed = slot_feeds(onnx.load(models[Form.SLOTS], load_external_data=False), pack).feeds(slots, batch)
    max_abs = rows_match(sessions, prepared, feeds, mixed, slots)
    run_options, _keep = activate_adapters(prepared["files"][0])
    steps: dict[str, Callable[[], object]] = {
        BACKENDS[0]: lambda: sessions[BACKENDS[0]].run(["logits"], {**feeds, **mixed}),
        BACKENDS[1]: lambda: sessions[BACKENDS[1]].run(["logits"], feeds, run_options),
        BACKENDS[2]: lambda: sessions[BACKENDS[2]].run(["logits"], feeds),
    }
    timings = {}
    for name, step in steps.items():
        times = blocks_ms(step, rounds, repeats)
        timings[name] = {"min_ms": min(times), "median_ms": float(np.median(times))}
        print(f"bench_mixed_batch: {threads} thread(s) ({batch}, {seq}) {name}: min {min(times):.2f} ms, median "
              f"{np.median(times):.2f} ms", file=sys.stderr, flush=True)
    median = {name: timing["median_ms"] for name, timing in timings.items()}
    ratios = {"slots_over_one_adapter": median[BACKENDS[0]] / median[BACKENDS[1]],
              "slots_over_merged": median[BACKENDS[0]] / median[BACKENDS[2]]}
    return {"threads": threads, "ms": timings, "ratios": ratios,
            "met": {key: ratios[key] <= TARGETS[key] for key in TARGETS}, "rows_max_abs": max_abs,
            "slots": [pack.names[slot] for slot in slots]}


def measure(name: str, checkpoint: Path, work: Path, args: argparse.Namespace) -> dict:
    """One model: its graphs prepared once, then every thread count."""
    prepared = prepare(checkpoint, work, simplify_graph=not args.quick)
    payload = read_checkpoint(checkpoint)
    seq = min(args.seq, payload["config"]["max_seq_len"])
    return {"model": name, "checkpoint": str(checkpoint),
            "parameters": sum(t.numel() for section in ("base", "lora") for t in payload[section].values()),
            "batch": ROWS, "seq": seq,
            "threads": [measure_threads(prepared, threads, ROWS, seq, args.rounds, args.repeats)
                        for threads in args.threads]}


def render_markdown(result: dict) -> str:
    """The results as markdown: the machine, then one row per model and thread count."""
    m = result["machine"]
    lines = ["# Mixed-adapter scoring: one batch, each row its own adapter (tools/bench_mixed_batch.py)", "",
             f"{result['started']}; {m['cpu']}, {m['cores']} cores, load {m['load_average']}; onnxruntime "
             f"{m['versions']['onnxruntime']}; {result['rounds']} round(s) x {result['repeats']} calls; "
             f"`{' '.join(result['argv'])}`", "",
             f"{ROWS} rows, slots {', '.join(result['models'][0]['threads'][0]['slots'])}. ms min / median per "
             f"backend, each in its own warmed block; ratios from the medians; targets: slots / one adapter <= "
             f"{TARGETS['slots_over_one_adapter']}, slots / merged <= {TARGETS['slots_over_merged']}.", "",
             f"| model | parameters | shape | threads | {' ms | '.join(BACKENDS)} ms | slots / one adapter "
             "| slots / merged | rows max abs diff |",
             "|---|---:|---|---:|---:|---:|---:|---|---|---:|"]
    for row in result["models"]:
        for entry in row["threads"]:
            cells = [f"{entry['ms'][name]['min_ms']:.2f} / {entry['ms'][name]['median_ms']:.2f}" for name in BACKENDS]
            verdicts = [f"{entry['ratios'][key]:.3f} ({'met' if entry['met'][key] else 'MISSED'})" for key in TARGETS]
            lines.append(f"| {row['model']} | {row['parameters']:,} | ({row['batch']}, {row['seq']}) | "
                         f"{entry['threads']} | {' | '.join(cells)} | {' | '.join(verdicts)} | "
                         f"{entry['rows_max_abs']:.1e} |")
    return "\n".join(lines) + "\n"


def write_results(results: Path, result: dict) -> list[Path]:
    """bench_mixed_batch.json and .md in ``results`` (created), each written atomically."""
    return write_json_and_markdown(results, "bench_mixed_batch", result, render_markdown(result))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; --quick applied."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per backend (min and median over them)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per backend per round")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (at most the model's max_seq_len)")
    parser.add_argument("--bigger", action="store_true", help=f"also a {BIGGER_PARAMS / 1e6:.0f}M-parameter model")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny random model at (8, 64), 1 thread, 1 x 2 calls")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of bench_mixed_batch.json / .md")
    parser.add_argument("--work", type=Path, help="keep the exports here (default: a temporary directory)")
    args = parser.parse_args(argv)
    args.argv = ["tools/bench_mixed_batch.py", *(sys.argv[1:] if argv is None else argv)]
    if args.quick:
        args.threads, args.rounds, args.repeats, args.seq, args.bigger = "1", 1, 2, 64, False
    args.threads = [int(value) for value in args.threads.split(",")]
    if args.rounds < 1 or args.repeats < 1 or args.seq < 1 or min(args.threads) < 1:
        parser.error("--threads, --rounds, --repeats and --seq must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every mixed-batch row matched its single-adapter run (1e-4), else 1."""
    args = parse_args(argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    host = machine_record()
    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="bench_mixed_batch-") as temporary:
        work = args.work or Path(temporary)
        sized = [("tiny", TINY)] if args.quick else [(f"{BIGGER_PARAMS / 1e6:.0f}M", config_for(BIGGER_PARAMS))]
        models = [] if args.quick else [measure("demo", DEMO, work / "demo", args)]
        for name, config in sized if args.quick or args.bigger else []:
            work.mkdir(parents=True, exist_ok=True)
            save_checkpoint(work / f"{name}.pt", random_model(config, seed=0))
            models.append(measure(name, work / f"{name}.pt", work / name, args))
    result = {"tool": "tools/bench_mixed_batch.py", "argv": args.argv, "started": started, "quick": args.quick,
              "rounds": args.rounds, "repeats": args.repeats, "targets": TARGETS, "machine": host, "models": models}
    for path in write_results(args.results, result):
        print(f"bench_mixed_batch: wrote {path}", file=sys.stderr)
    return 0 if all(entry["rows_max_abs"] <= 1e-4 for model in models for entry in model["threads"]) else 1


if __name__ == "__main__":
    sys.exit(main())
