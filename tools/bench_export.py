"""Benchmark the exporter on the demo model, in one run.

Export wall time per stage for both forms, then latency of ONNX Runtime CPU (merged, adapters-as-inputs
with the trained adapter active) against PyTorch eager (unmerged model, fp32, no_grad) at
(batch, N) = (1, 256) and (8, 256), all measured side by side in this process (in alternating rounds, so
drifting load from other processes skews all three alike), reported as ratios.

Targets: merged ORT / PyTorch <= 0.6 at (1, 256); adapters-as-inputs / merged <= 1.10.

    python tools/bench_export.py [models/demo.pt] [--rounds 5] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lora_export.adapters import activate_adapters
from lora_export.checkpoint import load_checkpoint
from lora_export.export import export_onnx


def rounds_percentiles_ms(steps: dict, rounds: int, per_round: int) -> dict[str, tuple[float, float]]:
    """{name: (p50, p90) ms} over ``rounds`` rounds of ``per_round`` timed calls of each step in turn.

    Blocks of calls rather than single calls: the thread pools of PyTorch and of each ORT session spin for a
    while after a call and would slow a different backend called right after. One untimed call follows each
    switch; the rounds spread slow drifts of machine load over all backends alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (float(np.percentile(t, 50)), float(np.percentile(t, 90))) for name, t in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="models/demo.pt")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per backend per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for ORT and torch (0 = default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict = {"checkpoint": args.checkpoint, "torch_threads": torch.get_num_threads(), "export": {}}
    with tempfile.TemporaryDirectory() as tmp:
        exports = {}
        for form, merge in (("merged", True), ("adapters", False)):
            start = time.perf_counter()
            exports[form] = export_onnx(args.checkpoint, Path(tmp) / f"{form}.onnx", merge=merge)
            results["export"][form] = {
                "total_s": time.perf_counter() - start,
                "stages_s": exports[form].stage_seconds,
                "nodes": [exports[form].nodes_exported, exports[form].nodes_final],
                "note": exports[form].simplify_note,
            }
            print(f"export {form}: {results['export'][form]['total_s']:.1f}s  {exports[form].stage_seconds}")

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if args.threads:
            options.intra_op_num_threads = args.threads
        sessions = {form: ort.InferenceSession(str(r.model_path), options, providers=["CPUExecutionProvider"])
                    for form, r in exports.items()}
        run_options, _adapters = activate_adapters(exports["adapters"].adapter_path)
        model = load_checkpoint(args.checkpoint)
        n = min(256, model.config.max_seq_len)

        results["latency"] = {}
        for batch in (1, 8):
            rng = np.random.default_rng(batch)
            ids = rng.integers(0, 256, (batch, n), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(feeds["attention_mask"])

            def pytorch(ids_t=ids_t, mask_t=mask_t):
                with torch.no_grad():
                    model(ids_t, mask_t)

            steps = {
                "pytorch": pytorch,
                "ort_merged": lambda feeds=feeds: sessions["merged"].run(None, feeds),
                "ort_adapters": lambda feeds=feeds: sessions["adapters"].run(None, feeds, run_options),
            }
            row = {name: {"p50_ms": p50, "p90_ms": p90}
                   for name, (p50, p90) in rounds_percentiles_ms(steps, args.rounds, args.repeats).items()}
            row["merged_over_pytorch"] = row["ort_merged"]["p50_ms"] / row["pytorch"]["p50_ms"]
            row["adapters_over_merged"] = row["ort_adapters"]["p50_ms"] / row["ort_merged"]["p50_ms"]
            results["latency"][f"{batch}x{n}"] = row

    print(f"\n{'(batch, N)':<12}{'PyTorch ms':>12}{'ORT merged':>12}{'ORT adapt.':>12}"
          f"{'merged/PT':>12}{'adapt/merged':>14}")
    for shape, row in results["latency"].items():
        print(f"{shape:<12}{row['pytorch']['p50_ms']:>12.2f}{row['ort_merged']['p50_ms']:>12.2f}"
              f"{row['ort_adapters']['p50_ms']:>12.2f}{row['merged_over_pytorch']:>12.2f}"
              f"{row['adapters_over_merged']:>14.2f}")
    first = results["latency"][f"1x{n}"]
    print(f"\ntarget merged/PyTorch <= 0.60 at (1, {n}): {first['merged_over_pytorch']:.2f} "
          f"({'met' if first['merged_over_pytorch'] <= 0.6 else 'not met'})")
    worst = max(row["adapters_over_merged"] for row in results["latency"].values())
    print(f"target adapters/merged <= 1.10: worst {worst:.2f} ({'met' if worst <= 1.10 else 'not met'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
