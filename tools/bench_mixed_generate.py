"""Mixed-adapter generation benchmark (issue 20): 8 rows, each with its own adapter (4 adapters + the base, rows of
different prompt lengths), decoded as one batch through the adapter-slots decoder, against the same 8 rows generated
one at a time through onnxruntime-genai. Target: batched tokens per second >= 3x single-row.

Per model, each timed in its own block (never interleaved), min and median over ``--rounds`` rounds:

* batched: ``genai.batch.generate_batch`` end to end (ONNX Runtime session opened, the 4 adapter files packed,
  every row decoded in one run per step);
* single (API): ``genai.generate.generate_bytes`` for each row on the adapters-as-inputs decoder with that row's
  ``.onnx_adapter``, end to end (genai loads the model on every call);
* single (warm): one ``og.Model`` with the 4 adapters loaded once, one generator per row: the load left out.

Tokens per second = rows x new bytes / seconds. Every round also holds the batched bytes against the single-row
bytes, row by row (``identical`` in the results): a speedup from wrong bytes would count for nothing.

Models: the demo (models/demo.pt, its trained LoRA and 3 random same-base adapters of ranks 4, 12 and 16) and, with
``--bigger``, a 25M-parameter random model (tools/make_sized.py's architecture). ``--quick``: a small random model
instead (``QUICK``, exported in seconds), 16 new bytes, 1 round: a smoke run for the test suite, no figure to
quote. Writes ``--results``/bench_mixed_generate.json and .md, with the machine record (CPU, SIMD, load,
versions). The timed calls run after ``gc.freeze()``: the session opener's ``gc.collect`` (``quiet_session``)
would otherwise walk the exporter's leftovers in this process, which a process that only generates never holds.

    python tools/bench_mixed_generate.py --rounds 5 --bigger
    python tools/bench_mixed_generate.py --quick --results /tmp/r
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import torch
from make_sized import config_for, random_model

from lora_export.export.convert import export_adapter
from lora_export.files import write_json_and_markdown
from lora_export.genai.batch import generate_batch
from lora_export.genai.decoder import export_decoder
from lora_export.genai.generate import generate_bytes
from lora_export.layout import ADAPTER_FILE, MODEL_FILE, Form
from lora_export.machine import machine_record
from lora_export.model.checkpoint import read_checkpoint, save_checkpoint
from lora_export.model.transformer import LoRATransformerLM, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.pt"
RESULTS = ROOT / "tools" / "results"
TEXT = (b"The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 12)
ROWS = 8
#: Ranks of the random same-base adapters beside the checkpoint's own (smaller and larger: zero-padded slots).
OTHER_RANKS = (4, 12, 16)
BIGGER_PARAMS = 25_000_000
#: --quick's model: small enough to export in seconds, with local and global heads and every LoRA target but emb.
QUICK = ModelConfig(dim=32, depth=1, heads=2, dim_head=16, n_local_attn_heads=1, local_attn_window_size=8,
                    max_seq_len=64, ff_mult=2, r=4, lora_alpha=8.0, lora_targets=["q", "k", "v", "o", "ff"])
TARGET = 3.0


def other_adapter(checkpoint: Path, rank: int, seed: int, work: Path, model_path: Path) -> Path:
    """An adapter of rank ``rank`` on the checkpoint's base (random LoRA, B drawn with std 0.05), written for the
    adapters-as-inputs ``model_path`` with ``lora-export adapter``'s checks."""
    payload = read_checkpoint(checkpoint)
    torch.manual_seed(seed)
    model = LoRATransformerLM(ModelConfig.from_dict({**payload["config"], "r": rank, "lora_alpha": 2.0 * rank}))
    model.load_state_dict(payload["base"], strict=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_(0.0, 0.05)
    save_checkpoint(work / f"r{rank}.pt", model.eval())
    return export_adapter(work / f"r{rank}.pt", model_path, work / f"r{rank}.onnx_adapter")


def prepare(checkpoint: Path, work: Path) -> tuple[Path, Path, list[Path]]:
    """(slots decoder, adapters-as-inputs decoder, the 4 adapter files) of ``checkpoint``, written into ``work``."""
    slots = export_decoder(checkpoint, work / "slots", form=Form.SLOTS)
    adapters = export_decoder(checkpoint, work / "adapters", merge=False)
    files = [adapters / ADAPTER_FILE]
    files += [other_adapter(checkpoint, rank, seed, work, adapters / MODEL_FILE)
              for seed, rank in enumerate(OTHER_RANKS, start=1)]
    return slots, adapters, files


def rows_for(files: list[Path], context: int, new_bytes: int) -> tuple[list[bytes], list[Path | None]]:
    """The 8 rows: prompts of 8 different lengths (up to the context left for ``new_bytes``) and adapters cycling
    through the base and the 4 files."""
    longest = min(context - new_bytes, 96)
    lengths = np.linspace(max(4, longest // 4), longest, ROWS).astype(int)
    cycle = [None, *files]
    return [TEXT[3 * row: 3 * row + length] for row, length in enumerate(lengths)], [
        cycle[row % len(cycle)] for row in range(ROWS)]


def warm_singles(adapters_dir: Path, files: list[Path]) -> Callable[[list[bytes], list[Path | None], int],
                                                                     list[bytes]]:
    """A function generating each row alone on one og.Model loaded here, every adapter loaded once."""
    model = og.Model(str(adapters_dir))
    loaded = og.Adapters(model)
    for index, path in enumerate(files):
        loaded.load(str(path), str(index))

    def run(prompts: list[bytes], row_adapters: list[Path | None], new_bytes: int) -> list[bytes]:
        outputs = []
        for prompt, adapter in zip(prompts, row_adapters, strict=True):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + new_bytes, min_length=len(prompt) + new_bytes,
                                      do_sample=False)
            generator = og.Generator(model, params)
            if adapter is not None:
                generator.set_active_adapter(loaded, str(files.index(adapter)))
            generator.append_tokens(np.frombuffer(prompt, np.uint8).astype(np.int32)[None])
            while not generator.is_done():
                generator.generate_next_token()
            outputs.append(bytes(int(t) for t in generator.get_sequence(0)[len(prompt):]))
        return outputs

    return run


def timed(step: Callable[[], list[bytes]]) -> tuple[float, list[bytes]]:
    """(seconds, outputs) of one call of ``step``."""
    start = time.perf_counter()
    outputs = step()
    return time.perf_counter() - start, outputs


def measure(name: str, checkpoint: Path, work: Path, rounds: int, new_bytes: int) -> dict:
    """Every round of one model: the three figures' seconds and whether the bytes agreed."""
    slots, adapters, files = prepare(checkpoint, work)
    gc.collect()
    gc.freeze()
    context = ModelConfig.from_dict(read_checkpoint(checkpoint)["config"]).max_seq_len
    prompts, row_adapters = rows_for(files, context, new_bytes)
    warm = warm_singles(adapters, files)
    seconds: dict[str, list[float]] = {"batched": [], "single_api": [], "single_warm": []}
    identical = []
    for round_ in range(rounds):
        batched_s, batched = timed(lambda: generate_batch(slots, prompts, row_adapters, max_new_bytes=new_bytes))
        api_s, api = timed(lambda: [bytes(generate_bytes(adapters, prompt, max_new_bytes=new_bytes, adapter=adapter))
                                    for prompt, adapter in zip(prompts, row_adapters, strict=True)])
        warm_s, warmed = timed(lambda: warm(prompts, row_adapters, new_bytes))
        for key, value in (("batched", batched_s), ("single_api", api_s), ("single_warm", warm_s)):
            seconds[key].append(value)
        identical.append(batched == api == warmed)
        print(f"bench_mixed_generate: {name} round {round_ + 1}/{rounds}: batched {batched_s:.2f} s, single (API) "
              f"{api_s:.2f} s, single (warm) {warm_s:.2f} s, bytes identical: {identical[-1]}", file=sys.stderr,
              flush=True)
    return summary(name, checkpoint, prompts, row_adapters, new_bytes, seconds, identical)


def summary(name: str, checkpoint: Path, prompts: list[bytes], row_adapters: list[Path | None], new_bytes: int,
            seconds: dict[str, list[float]], identical: list[bool]) -> dict:
    """One model's result: tokens per second (best = from the fastest round, median) per figure, and the
    speedups of batched over each single-row figure (from the medians)."""
    tokens = len(prompts) * new_bytes
    figures = {key: {"seconds": values, "tok_per_s_best": tokens / min(values),
                     "tok_per_s_median": tokens / statistics.median(values)} for key, values in seconds.items()}
    speedup = {key: figures["batched"]["tok_per_s_median"] / figures[key]["tok_per_s_median"]
               for key in ("single_api", "single_warm")}
    return {"model": name, "checkpoint": str(checkpoint),
            "parameters": sum(t.numel() for section in ("base", "lora")
                              for t in read_checkpoint(checkpoint)[section].values()),
            "rows": len(prompts), "prompt_bytes": [len(p) for p in prompts],
            "adapters": [None if a is None else a.name for a in row_adapters], "new_bytes": new_bytes,
            "figures": figures, "speedup": speedup, "target": TARGET,
            "met": all(value >= TARGET for value in speedup.values()), "identical": all(identical)}


def render_markdown(result: dict) -> str:
    """The results as markdown: the machine, then one row per model."""
    m = result["machine"]
    lines = ["# Mixed-adapter generation: one batch vs one row at a time (tools/bench_mixed_generate.py)", "",
             f"{result['started']}; {m['cpu']}, {m['cores']} cores, load {m['load_average']}; onnxruntime "
             f"{m['versions']['onnxruntime']}, onnxruntime-genai {m['versions'].get('onnxruntime_genai')}; "
             f"{result['rounds']} round(s); `{' '.join(result['argv'])}`", "",
             f"{ROWS} rows (4 adapters + the base, prompts of different lengths), greedy. Tokens/s best / median of "
             f"the rounds; speedup = batched / single, medians; target >= {TARGET:g}x.", "",
             "| model | parameters | new bytes | batched tok/s | single (API) tok/s | single (warm) tok/s "
             "| speedup vs API | speedup vs warm | target | bytes identical |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in result["models"]:
        f = row["figures"]
        cells = [f"{f[key]['tok_per_s_best']:.0f} / {f[key]['tok_per_s_median']:.0f}"
                 for key in ("batched", "single_api", "single_warm")]
        lines.append(f"| {row['model']} | {row['parameters']:,} | {row['new_bytes']} | {' | '.join(cells)} | "
                     f"{row['speedup']['single_api']:.1f}x | {row['speedup']['single_warm']:.1f}x | "
                     f"{'met' if row['met'] else 'MISSED'} | {'yes' if row['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_results(results: Path, result: dict) -> list[Path]:
    """bench_mixed_generate.json and .md in ``results`` (created), each written atomically."""
    return write_json_and_markdown(results, "bench_mixed_generate", result, render_markdown(result))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; --quick applied."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per model (min and median over them)")
    parser.add_argument("--new-bytes", type=int, default=64, help="bytes each row generates")
    parser.add_argument("--bigger", action="store_true", help=f"also a {BIGGER_PARAMS / 1e6:.0f}M-parameter model")
    parser.add_argument("--quick", action="store_true", help="smoke run: a small random model, 16 new bytes, 1 round")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of bench_mixed_generate.json / .md")
    parser.add_argument("--work", type=Path, help="keep the exports here (default: a temporary directory)")
    args = parser.parse_args(argv)
    args.argv = ["tools/bench_mixed_generate.py", *(sys.argv[1:] if argv is None else argv)]
    if args.quick:
        args.rounds, args.new_bytes, args.bigger = 1, 16, False
    if args.rounds < 1 or args.new_bytes < 1:
        parser.error("--rounds and --new-bytes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every model's batched bytes equalled its single-row bytes, else 1."""
    args = parse_args(argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    host = machine_record()
    with tempfile.TemporaryDirectory(prefix="bench_mixed_generate-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        checkpoints = {"quick": QUICK} if args.quick else {"demo": DEMO}
        if args.bigger:
            checkpoints[f"{BIGGER_PARAMS / 1e6:.0f}M"] = config_for(BIGGER_PARAMS)
        models = []
        for name, source in checkpoints.items():
            checkpoint = source if isinstance(source, Path) else work / f"{name}.pt"
            if not isinstance(source, Path):
                save_checkpoint(checkpoint, random_model(source, seed=0))
            models.append(measure(name, checkpoint, work / name, args.rounds, args.new_bytes))
    result = {"tool": "tools/bench_mixed_generate.py", "argv": args.argv, "started": started, "quick": args.quick,
              "rounds": args.rounds, "machine": host, "models": models}
    for path in write_results(args.results, result):
        print(f"bench_mixed_generate: wrote {path}", file=sys.stderr)
    return 0 if all(model["identical"] for model in models) else 1


if __name__ == "__main__":
    sys.exit(main())
