"""Benchmark the int8 edge build against fp32 on the demo model, in one run.

Exports the checkpoint merged (fp32), quantizes it with ``lora_export.edge.quantize_int8``, then measures both on
ONNX Runtime CPU with ``compare_precisions``: file size, latency p50 at (batch, N) = (1, 256) and (8, 256) (N =
max_seq_len if smaller), next-byte top-1 agreement and held-out prose eval loss against PyTorch fp32. Prints the
int8 / fp32 ratios against the targets, and where the int8 file's bytes go (what dynamic quantization of the
MatMul / Gather weights leaves in float). Latency uses ONNX Runtime's default threads, fp32 and int8 taking turns
run by run, so load from other processes on a shared machine skews both alike.

Targets: size <= 0.30x, latency <= 0.70x at both shapes, top-1 >= 98%, eval loss within +2%.

    python tools/bench_edge.py [models/demo.pt] [--runs 30] [--windows 32] [--out-dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import numpy_helper

from lora_export.checkpoint import load_checkpoint
from lora_export.edge import compare_precisions, quantize_int8
from lora_export.export import export_onnx
from lora_export.metrics import LATENCY_MAX_SEQ

TARGETS = {"size_ratio": 0.30, "latency_ratio": 0.70, "top1_agreement": 0.98, "eval_loss_change_pct": 2.0}


def weight_bytes(model_path: Path) -> dict:
    """Initializer bytes of a model by data type, and its largest float32 initializers (name, bytes)."""
    model = onnx.load(model_path)
    by_type: Counter[str] = Counter()
    floats = []
    for init in model.graph.initializer:
        size = numpy_helper.to_array(init).nbytes
        by_type[onnx.TensorProto.DataType.Name(init.data_type)] += size
        if init.data_type == onnx.TensorProto.FLOAT:
            floats.append((init.name, size))
    floats.sort(key=lambda item: -item[1])
    return {"by_type": dict(by_type.most_common()), "largest_float": floats[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="models/demo.pt", type=Path)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per shape (after 3 warm-up runs)")
    parser.add_argument("--windows", type=int, default=32, help="held-out prose windows for quality")
    parser.add_argument("--out-dir", type=Path, help="keep the fp32 and int8 models here (default: a temp folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint}: no such checkpoint (make the demo with: python tools/make_demo.py)")

    seq_len = min(LATENCY_MAX_SEQ, load_checkpoint(args.checkpoint).config.max_seq_len)
    shapes = [(1, seq_len), (8, seq_len)]
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        fp32_path = export_onnx(args.checkpoint, out_dir / "model.onnx", merge=True).model_path
        int8_path = quantize_int8(fp32_path)
        fp32, int8 = compare_precisions(args.checkpoint, {"fp32": fp32_path, "int8": int8_path}, shapes=shapes,
                                        windows=args.windows, runs=args.runs)
        bytes_int8 = weight_bytes(int8_path)

    size_ratio = int8["file_size"] / fp32["file_size"]
    table = [("file size (MB)", f"{fp32['file_size'] / 1e6:.3f}", f"{int8['file_size'] / 1e6:.3f}", f"{size_ratio:.3f}",
              f"<= {TARGETS['size_ratio']:.2f}x", size_ratio <= TARGETS["size_ratio"])]
    ratios = {"size_ratio": size_ratio}
    for fast, slow in zip(int8["latency"], fp32["latency"], strict=True):
        shape = f"{fast['batch']}x{fast['seq_len']}"
        ratios[f"latency_ratio_{shape}"] = ratio = fast["p50_ms"] / slow["p50_ms"]
        table.append((f"latency p50 {shape} (ms)", f"{slow['p50_ms']:.2f}", f"{fast['p50_ms']:.2f}", f"{ratio:.3f}",
                      f"<= {TARGETS['latency_ratio']:.2f}x", ratio <= TARGETS["latency_ratio"]))
    table.append(("top-1 vs PyTorch fp32", f"{fp32['top1_agreement']:.2%}", f"{int8['top1_agreement']:.2%}", "",
                  f">= {TARGETS['top1_agreement']:.0%}", int8["top1_agreement"] >= TARGETS["top1_agreement"]))
    table.append(("eval loss (nats/byte)", f"{fp32['eval_loss']:.4f}", f"{int8['eval_loss']:.4f}",
                  f"{int8['eval_loss_change_pct']:+.2f}%", f"<= +{TARGETS['eval_loss_change_pct']:.0f}%",
                  int8["eval_loss_change_pct"] <= TARGETS["eval_loss_change_pct"]))

    print(f"checkpoint {args.checkpoint}; held-out prose {args.windows} x {seq_len} bytes (PyTorch fp32 eval loss "
          f"{fp32['eval_loss_ref']:.4f}); {args.runs} timed runs per shape")
    print(f"\n{'':<26}{'fp32':>10}{'int8':>10}{'int8/fp32':>11}  target")
    for label, before, after, ratio, target, met in table:
        print(f"{label:<26}{before:>10}{after:>10}{ratio:>11}  {target:<8} {'met' if met else 'NOT met'}")
    print(f"\nint8 initializer bytes by type: {bytes_int8['by_type']}")
    print(f"largest float32 initializers left: {bytes_int8['largest_float']}")
    if args.json:
        summary = {"checkpoint": str(args.checkpoint), "shapes": shapes, "targets": TARGETS, "ratios": ratios,
                   "met": {label: met for label, *_, met in table}, "rows": [fp32, int8],
                   "int8_initializer_bytes": bytes_int8}
        args.json.write_text(json.dumps(summary, indent=2))

if __name__ == "__main__":
    main()
