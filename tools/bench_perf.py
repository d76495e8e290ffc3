"""Benchmark the exported graphs on the demo model against PyTorch, the machine's GEMM peak and the targets.

Everything in one run, at 1 and 2 threads (``--threads``), at (batch, N) = (8, 256) and (1, 256):

* the machine (``lora_export.machine.machine_record``: CPU model, SIMD features, load, versions), and its
  fp32 GEMM peak (torch.matmul of 2048 x 2048 x 2048 and of the model's own 2048 x 128 x 512 shape, the best of both);
* latency of PyTorch eager (merged model, no_grad), ``torch.compile`` (inductor) of the same model, and ONNX
  Runtime CPU: merged fp32, adapters-as-inputs with the trained adapter active, int8 and int4 of the merged
  graph. Each backend is timed in its own warmed block (never call by call in turns: ONNX Runtime's intra-op
  threads spin after a run and slow whatever runs next), in ``--rounds`` rounds of ``--repeats`` calls so that
  drifting load spreads over all of them; min and median are reported;
* the kernels ONNX Runtime really ran (the op types of its optimized graph: fused Attention, MatMulNBits, ...);
* quality of int8 and int4 (``compare_precisions``: file size, next-byte top-1 agreement and held-out eval loss
  against PyTorch fp32);
* local-head scaling: an all-local-heads model (window 64, max_seq_len 8192), ORT time at N = 8192 / N = 2048.

Targets (issue 10): ORT merged at (8, 256) >= 50 % of the GEMM peak and <= 0.6x torch.compile; at (1, 256)
<= 0.5x PyTorch eager; adapters / merged <= 1.10 everywhere; int8 / fp32 <= 0.7 at (8, 256) with top-1 >= 98 %;
int4 file <= 0.2x fp32 with top-1 >= 97 %; local scaling <= 4.5.

    python tools/bench_perf.py [models/demo.pt] [--threads 1,2] [--rounds 5] [--repeats 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lora_export.export.adapters import activate_adapters
from lora_export.export.convert import export_onnx
from lora_export.export.quantize import quantize_int4, quantize_int8
from lora_export.machine import machine_record
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint
from lora_export.model.layers import merge_lora
from lora_export.model.transformer import LoRATransformerLM, ModelConfig
from lora_export.parity.precisions import compare_precisions

SHAPES = [(8, 256), (1, 256)]
TARGETS = {"merged_share_of_peak_8x256": 0.50, "merged_over_compile_8x256": 0.60, "merged_over_eager_1x256": 0.50,
           "adapters_over_merged": 1.10, "int8_over_fp32_8x256": 0.70, "int8_top1": 0.98, "int4_size_ratio": 0.20,
           "int4_top1": 0.97, "local_scaling_8192_over_2048": 4.5}


def blocks_ms(step: Callable[[], object], rounds: int, repeats: int) -> list[float]:
    """Times (ms) of ``rounds`` x ``repeats`` calls, one untimed call before each round's block."""
    times = []
    for _ in range(rounds):
        step()
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def model_gflop(config: ModelConfig, batch: int, n: int) -> float:
    """Multiply-adds x 2 of every matmul of one forward pass, counted from the config (merged model)."""
    tokens, inner = batch * n, config.heads * config.dim_head
    per_block = 2 * tokens * config.dim * inner * 4 + 2 * tokens * config.dim * config.dim * config.ff_mult * 2
    local, window = config.n_local_attn_heads, config.local_attn_window_size
    blocks = -(-n // window)
    per_block += 2 * 2 * batch * local * blocks * window * 2 * window * config.dim_head  # blockwise scores + values
    per_block += 2 * 2 * batch * (config.heads - local) * n * n * config.dim_head
    return (config.depth * per_block + 2 * tokens * config.dim * 256) / 1e9


def gemm_peak_gflops(repeats: int) -> float:
    """The best fp32 GFLOP/s of torch.matmul on a large square and on the model's own 2048 x 128 x 512 shape."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (2048, 128, 512), (2048, 512, 128)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        fastest = min(blocks_ms(lambda a=a, b=b: torch.matmul(a, b), 3, repeats))
        best = max(best, 2 * m * k * n / fastest / 1e6)
    return best


def ort_session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernels(optimized: Path) -> dict[str, int]:
    """Op types of ONNX Runtime's optimized graph: what its CPU provider really runs."""
    return dict(Counter(node.op_type for node in onnx.load(optimized).graph.node).most_common())


def feeds(batch: int, n: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(batch * 1000 + n).integers(0, 256, (batch, n), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def local_scaling(tmp: Path, threads: int, rounds: int, repeats: int) -> dict:
    """ORT time at N = 8192 over N = 2048 for an all-local-heads model (window 64), batch 1."""
    config = ModelConfig(dim=128, depth=2, heads=4, dim_head=32, n_local_attn_heads=4, local_attn_window_size=64,
                         max_seq_len=8192, r=0)
    save_checkpoint(tmp / "local.pt", LoRATransformerLM(config))
    session = ort_session(export_onnx(tmp / "local.pt", tmp / "local.onnx", merge=True).model_path, threads)
    times = {}
    for n in (2048, 8192):
        inputs = feeds(1, n)
        times[n] = float(np.median(blocks_ms(lambda i=inputs: session.run(None, i), rounds, max(2, repeats // 3))))
    return {"ms_2048": times[2048], "ms_8192": times[8192], "ratio": times[8192] / times[2048]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="models/demo.pt", type=Path)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per backend per round")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint}: no such checkpoint (make the demo with: python tools/make_demo.py)")
    results: dict = {"machine": machine_record(), "checkpoint": str(args.checkpoint), "rounds": args.rounds,
                     "repeats": args.repeats, "threads": {}}
    print(json.dumps(results["machine"]))
    with tempfile.TemporaryDirectory(prefix="bench_perf.") as tmp_name:
        tmp = Path(tmp_name)
        merged = export_onnx(args.checkpoint, tmp / "merged.onnx", merge=True)
        adapters = export_onnx(args.checkpoint, tmp / "adapters.onnx", merge=False)
        models = {"fp32": merged.model_path, "int8": quantize_int8(merged.model_path),
                  "int4": quantize_int4(merged.model_path)}
        rows = compare_precisions(args.checkpoint, models, runs=1, warmup=0, windows=64)
        quality = {row["precision"]: row for row in rows}
        keys = ("file_size", "top1_agreement", "eval_loss_ref", "eval_loss", "passed")
        results["quality"] = {name: {key: row[key] for key in keys} for name, row in quality.items()}
        results["nodes"] = {"merged": [merged.nodes_exported, merged.nodes_final, merged.simplify_note],
                            "adapters": [adapters.nodes_exported, adapters.nodes_final, adapters.simplify_note]}
        print(json.dumps(results["quality"]), json.dumps(results["nodes"]), flush=True)
        run_options, _loaded = activate_adapters(adapters.adapter_path)
        config = load_checkpoint(args.checkpoint).config

        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            entry: dict = {"gemm_peak_gflops": gemm_peak_gflops(args.repeats), "shapes": {}, "kernels": {}}
            sessions = {}
            for name, path in (("ORT merged", merged.model_path), ("ORT adapters", adapters.model_path),
                               ("ORT int8", models["int8"]), ("ORT int4", models["int4"])):
                sessions[name] = ort_session(path, threads, tmp / f"optimized_{name.split()[1]}.onnx")
                entry["kernels"][name] = kernels(tmp / f"optimized_{name.split()[1]}.onnx")
            model = load_checkpoint(args.checkpoint)
            merge_lora(model)
            model.eval()
            compiled = None if args.no_compile else torch.compile(model)
            for batch, n in SHAPES:
                inputs = feeds(batch, n)
                ids, mask = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]).bool()
                steps: dict[str, Callable[[], object]] = {}
                for name, session in sessions.items():
                    options = run_options if name == "ORT adapters" else None
                    steps[name] = lambda s=session, o=options, i=inputs: s.run(None, i, o)

                def eager(m: torch.nn.Module = model, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> object:
                    with torch.no_grad():
                        return m(ids, mask)

                steps["PyTorch eager"] = eager
                if compiled is not None:
                    eager(compiled)  # compile for this shape before timing
                    steps["torch.compile"] = lambda c=compiled, e=eager: e(c)
                timings = {}
                for name, step in steps.items():
                    times = blocks_ms(step, args.rounds, args.repeats)
                    timings[name] = {"min_ms": min(times), "median_ms": float(np.median(times))}
                    print(f"threads {threads} ({batch}, {n}) {name:14s} min {min(times):8.2f} ms  "
                          f"median {np.median(times):8.2f} ms", flush=True)
                entry["shapes"][f"{batch}x{n}"] = {"gflop": model_gflop(config, batch, n), "ms": timings}
            entry["local_scaling"] = local_scaling(tmp, threads, args.rounds, args.repeats)
            print(f"threads {threads} local scaling {entry['local_scaling']}", flush=True)
            results["threads"][threads] = entry
    results["load_average_end"] = os.getloadavg()
    results["verdicts"] = verdicts(results)
    for line in results["verdicts"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def verdicts(results: dict) -> list[str]:
    """One line per target and thread count: the measured ratio (from medians; min in brackets), met or not."""
    lines = []
    quality = results["quality"]

    def line(name: str, value: float, best: float | None, target: float, higher_is_better: bool = False) -> None:
        met = value >= target if higher_is_better else value <= target
        extra = f" (from min: {best:.3f})" if best is not None else ""
        lines.append(f"{name}: {value:.3f}{extra}, target {'>=' if higher_is_better else '<='} {target} -> "
                     f"{'met' if met else 'NOT met'}")

    for threads, entry in results["threads"].items():
        big, small = entry["shapes"]["8x256"], entry["shapes"]["1x256"]

        def ratio(shape: dict, a: str, b: str, key: str = "median_ms") -> float:
            return shape["ms"][a][key] / shape["ms"][b][key]

        gflops = big["gflop"] / (big["ms"]["ORT merged"]["median_ms"] / 1e3)
        line(f"[{threads}t] ORT merged share of GEMM peak at (8, 256) ({gflops:.0f} of "
             f"{entry['gemm_peak_gflops']:.0f} GFLOP/s)", gflops / entry["gemm_peak_gflops"], None,
             TARGETS["merged_share_of_peak_8x256"], higher_is_better=True)
        if "torch.compile" in big["ms"]:
            line(f"[{threads}t] ORT merged / torch.compile at (8, 256)", ratio(big, "ORT merged", "torch.compile"),
                 ratio(big, "ORT merged", "torch.compile", "min_ms"), TARGETS["merged_over_compile_8x256"])
        line(f"[{threads}t] ORT merged / PyTorch eager at (1, 256)", ratio(small, "ORT merged", "PyTorch eager"),
             ratio(small, "ORT merged", "PyTorch eager", "min_ms"), TARGETS["merged_over_eager_1x256"])
        for label, shape in (("(8, 256)", big), ("(1, 256)", small)):
            line(f"[{threads}t] adapters / merged at {label}", ratio(shape, "ORT adapters", "ORT merged"),
                 ratio(shape, "ORT adapters", "ORT merged", "min_ms"), TARGETS["adapters_over_merged"])
        line(f"[{threads}t] int8 / fp32 at (8, 256)", ratio(big, "ORT int8", "ORT merged"),
             ratio(big, "ORT int8", "ORT merged", "min_ms"), TARGETS["int8_over_fp32_8x256"])
        lines.append(f"[{threads}t] int4 / fp32 at (8, 256): {ratio(big, 'ORT int4', 'ORT merged'):.3f} "
                     f"(no target)")
        line(f"[{threads}t] local scaling time(8192) / time(2048)", entry["local_scaling"]["ratio"], None,
             TARGETS["local_scaling_8192_over_2048"])
    line("int8 top-1", quality["int8"]["top1_agreement"], None, TARGETS["int8_top1"], higher_is_better=True)
    line("int4 top-1", quality["int4"]["top1_agreement"], None, TARGETS["int4_top1"], higher_is_better=True)
    line("int4 / fp32 file size", quality["int4"]["file_size"] / quality["fp32"]["file_size"], None,
         TARGETS["int4_size_ratio"])
    return lines


if __name__ == "__main__":
    main()
