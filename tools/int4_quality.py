"""int4 builds of the demo model, measured against fp32 to pick the default int4 recipe (issue 22).

The merged export of the checkpoint is built as int4 in every way ONNX Runtime 1.31's ``matmul_nbits_quantizer``
offers: round to nearest (blocks of 16 / 32 / 64 / 128, symmetric or with zero points, accuracy level 4 or 0),
HQQ, GPTQ (calibrated on held-out Python source windows, never on the prose it is measured on) and k-quant, with
per-layer exceptions (the LM head, the first / last block, the feed-forward up-projections in 8 bits or float)
and with the embedding tables in 4 bits. The library's recipes (``lora_export.export.int4_recipes``) are built
by ``quantize_int4`` itself; GPTQ and k-quant, which need the quantizer's other entry (and GPTQ calibration
inputs), by the quantizer directly. fp32 and int8 are measured beside them for scale.

Each build: next-byte top-1 agreement, max / mean |logit diff| and eval loss against the PyTorch fp32 logits on
held-out prose (``parity.precisions.heldout_case``, 64 windows; ``parity.metrics.compare_logits``, as the
precision table measures them), file size, build time, and ms per prefill of one 256-byte window (ONNX Runtime
CPU, 1 thread; ``time_prefills``). The pick: the smallest int4 file with top-1 >= 97 %, or the best top-1 if none
reaches it; the script exits 1 when ``int4_recipes.INT4_DEFAULT`` is not the pick. Writes ``int4_quality.json``
and ``.md`` into ``--out``. About 2 minutes on an idle 2-core machine.

    python tools/int4_quality.py [models/demo.pt] [--out tools/results] [--rounds 7] [--repeats 10]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lora_export.corpus import load_data
from lora_export.export.convert import export_onnx
from lora_export.export.int4_recipes import INT4_DEFAULT, INT4_RECIPES, Int4Recipe
from lora_export.export.onnx_files import model_file_size
from lora_export.export.quantize import quantize_int4, quantize_int8
from lora_export.export.tracing import OUTPUT_NAMES
from lora_export.machine import machine_record
from lora_export.model.checkpoint import load_checkpoint
from lora_export.model.layers import merge_lora
from lora_export.parity.cases import Case
from lora_export.parity.metrics import TOLERANCES, compare_logits, percentiles_ms
from lora_export.parity.precisions import heldout_case

TOP1_TARGET = 0.97
WINDOWS = 64
CALIBRATION_WINDOWS = 16
MIXED = ("head", "first", "up")
#: (label, recipe) of the library's recipes measured, in table order.
RECIPES = [
    *[(f"rtn b{b} {'sym' if s else 'asym'}", Int4Recipe(block_size=b, symmetric=s))
      for b in (16, 32, 64, 128) for s in (False, True)],
    ("rtn b32 asym, accuracy level 0", Int4Recipe(accuracy_level=0)),
    *[(f"hqq b{b}", Int4Recipe(block_size=b, algorithm="hqq")) for b in (16, 32, 64, 128)],
    ("rtn b32, head float", Int4Recipe(float_layers=("head",))),
    ("rtn b32, head 8-bit", Int4Recipe(eight_bit=("head",))),
    ("rtn b32, first + head 8-bit", Int4Recipe(eight_bit=("head", "first"))),
    ("rtn b32, up + head 8-bit", Int4Recipe(eight_bit=("head", "up"))),
    ("rtn b32, first + last + head 8-bit", Int4Recipe(eight_bit=("head", "first", "last"))),
    ("rtn b16, first + last + head 8-bit", Int4Recipe(block_size=16, eight_bit=("head", "first", "last"))),
    ("hqq b16, first + last + head 8-bit", Int4Recipe(block_size=16, algorithm="hqq",
                                                     eight_bit=("head", "first", "last"))),
    ("rtn b32, first + up + head 8-bit", Int4Recipe(eight_bit=MIXED)),
    ("rtn b64, first + up + head 8-bit", Int4Recipe(block_size=64, eight_bit=MIXED)),
    ("rtn b16, first + up + head 8-bit", Int4Recipe(block_size=16, eight_bit=MIXED)),
    ("rtn b32, first + last + up + head 8-bit", Int4Recipe(eight_bit=("head", "first", "last", "up"))),
    ("rtn b32 + 4-bit embeddings", Int4Recipe(embeddings=True)),
    ("rtn b32, first + up + head 8-bit, 4-bit embeddings", Int4Recipe(eight_bit=MIXED, embeddings=True)),
]


def cpu_session(path: Path) -> ort.InferenceSession:
    """A CPU session of ``path`` on 1 intra-op and 1 inter-op thread, ORT's log at errors only."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def calibration_feeds(max_seq_len: int) -> list[dict[str, np.ndarray]]:
    """GPTQ's calibration inputs: CALIBRATION_WINDOWS windows [1, min(256, max_seq_len)] of the held-out Python
    source (``load_data(default='stdlib')``'s validation tail), disjoint from the prose the builds are measured on."""
    data = load_data(default="stdlib").val.numpy()
    seq = min(256, max_seq_len)
    starts = np.linspace(0, len(data) - seq - 1, CALIBRATION_WINDOWS).astype(np.int64)
    return [{"input_ids": data[s: s + seq][None].astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}
            for s in starts]


class _Feeds:
    """A GPTQ calibration data reader: ONNX Runtime deep-copies it and iterates the copy."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds

    def __iter__(self):  # noqa: ANN204 - the quantizer's protocol
        return iter(self.feeds)


def ort_algorithm_build(fp32: Path, output: Path, config: object, block_size: int = 32) -> Path:
    """``fp32`` quantized by ``MatMulNBitsQuantizer`` with ``config`` (GPTQ or k-quant: 4 bits, ``block_size``,
    zero points, accuracy level 4; every weight MatMul of a merged graph) and saved to ``output``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(fp32), block_size=block_size, is_symmetric=False, accuracy_level=4,
                                     algo_config=config)
    quantizer.process()
    onnx.save_model(quantizer.model.model, output)
    return output


def other_builds(fp32: Path, folder: Path, max_seq_len: int) -> list[tuple[str, Callable[[], Path]]]:
    """(label, build) of the GPTQ and k-quant variants."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
    )

    feeds = _Feeds(calibration_feeds(max_seq_len))
    return [
        ("gptq b32, calibrated on held-out code", lambda: ort_algorithm_build(
            fp32, folder / "gptq.onnx", GPTQWeightOnlyQuantConfig(calibration_data_reader=feeds))),
        ("gptq b32, act-order + mse, calibrated on held-out code", lambda: ort_algorithm_build(
            fp32, folder / "gptq_mse.onnx",
            GPTQWeightOnlyQuantConfig(calibration_data_reader=feeds, actorder=True, mse=True))),
        ("gptq b128, calibrated on held-out code", lambda: ort_algorithm_build(
            fp32, folder / "gptq128.onnx", GPTQWeightOnlyQuantConfig(calibration_data_reader=feeds), 128)),
        ("k-quant b32", lambda: ort_algorithm_build(fp32, folder / "kquant.onnx", KQuantWeightOnlyQuantConfig())),
    ]


def measure(label: str, build: Callable[[], Path], case: Case, reference: np.ndarray) -> dict:
    """One build's row: built, then its quality against ``reference`` on ``case`` in its own session (closed on
    return); ``path`` is the build, for ``time_prefills``. A build that fails is a row with its error."""
    row = {"variant": label, "error": None}
    start = time.perf_counter()
    try:
        path = build()
    except Exception as err:  # the quantizer raises many exception types: reported, not fatal
        return {**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    row["build_s"] = time.perf_counter() - start
    feeds = {"input_ids": case.input_ids, "attention_mask": case.attention_mask}
    metrics, _ = compare_logits(cpu_session(path).run(OUTPUT_NAMES, feeds)[0], reference, case.input_ids,
                                case.attention_mask, TOLERANCES["int4"])
    kernels = sorted({node.op_type for node in onnx.load(path, load_external_data=False).graph.node
                      if node.domain == "com.microsoft"})
    return {**row, "path": path, "file_size": model_file_size(path), "top1_agreement": metrics.top1_agreement,
            "max_abs": metrics.max_abs, "mean_abs": metrics.mean_abs, "eval_loss_ref": metrics.loss_ref,
            "eval_loss": metrics.loss_onnx, "kernels": kernels}


def time_prefills(rows: list[dict], window: dict[str, np.ndarray], rounds: int, repeats: int) -> None:
    """Set each built row's ``prefill_ms`` (median over ``rounds``), ``prefill_ms_min`` and ``prefill_ms_rounds``:
    in each round every build's session runs ``window`` in a block of its own (one warm-up call, then the median of
    ``repeats``), the builds in turn, so that the machine's drifting load spreads over all of them."""
    built = [row for row in rows if row["error"] is None]
    sessions = [cpu_session(row["path"]) for row in built]
    for row in built:
        row["prefill_ms_rounds"] = []
    for _ in range(rounds):
        for row, session in zip(built, sessions, strict=True):
            p50, _ = percentiles_ms(functools.partial(session.run, OUTPUT_NAMES, window), 1, repeats)
            row["prefill_ms_rounds"].append(p50)
    for row in built:
        row["prefill_ms"] = float(np.median(row["prefill_ms_rounds"]))
        row["prefill_ms_min"] = float(np.min(row["prefill_ms_rounds"]))
        del row["path"]


def reference_logits(checkpoint: Path, case: Case) -> np.ndarray:
    """PyTorch's fp32 logits [W, N, 256] of ``case`` on the checkpoint with its LoRA merged (the merged export's
    model)."""
    model = load_checkpoint(checkpoint)
    merge_lora(model)
    with torch.no_grad():
        return model(torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask)).numpy()


def pick(rows: list[dict]) -> tuple[dict, bool]:
    """(the chosen int4 row, whether it reaches TOP1_TARGET): the smallest file among the int4 rows at or above
    the target, else the best top-1."""
    built = [row for row in rows if row["error"] is None and row["precision"] == "int4"]
    good = [row for row in built if row["top1_agreement"] >= TOP1_TARGET]
    if good:
        return min(good, key=lambda row: (row["file_size"], -row["top1_agreement"])), True
    return max(built, key=lambda row: row["top1_agreement"]), False


def markdown(results: dict) -> str:
    """The table of ``results`` (``main``) in Markdown, with the pick and the machine."""
    fp32 = results["rows"][0]
    lines = ["| variant | top-1 | max / mean abs logit diff | eval loss | file | x fp32 | ms/prefill (min) | build s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if row["error"] is not None:
            lines.append(f"| {row['variant']} | failed: {row['error']} | | | | | | |")
            continue
        mark = " **(default)**" if row["variant"] == results["pick"]["variant"] else ""
        lines.append(f"| {row['variant']}{mark} | {100 * row['top1_agreement']:.2f} % | {row['max_abs']:.2f} / "
                     f"{row['mean_abs']:.3f} | {row['eval_loss']:.4f} | {row['file_size'] / 1e6:.3f} MB | "
                     f"{row['file_size'] / fp32['file_size']:.3f} | {row['prefill_ms']:.1f} "
                     f"({row['prefill_ms_min']:.1f}) | {row.get('build_s', 0.0):.1f} |")
    chosen = results["pick"]
    verdict = "reaches" if results["pick_reaches_target"] else "does not reach"
    machine = results["machine"]
    return "\n".join([
        f"# int4 builds of {results['checkpoint']} (merged), against PyTorch fp32", "",
        f"{results['windows']} held-out prose windows of {results['seq_len']} bytes; eval loss fp32 "
        f"{fp32['eval_loss_ref']:.4f} nats/byte; prefill = one window, ONNX Runtime CPU, 1 thread, each build "
        f"warmed and timed in a block of its own ({results['repeats']} calls, median), builds in turn, median of "
        f"{results['rounds']} rounds. Machine: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores; "
        f"{', '.join(name for name, present in machine.get('simd', {}).items() if present)}), 1-minute load "
        f"{machine.get('load_average', ['?'])[0]:.2f} at the start, onnxruntime {ort.__version__}.", "",
        *lines, "",
        f"Pick: **{chosen['variant']}**, the smallest int4 build with top-1 >= {TOP1_TARGET:.0%} ({verdict} it): "
        f"{100 * chosen['top1_agreement']:.2f} %, {chosen['file_size'] / fp32['file_size']:.3f}x fp32. "
        f"`INT4_DEFAULT` = {results['default']['describe']} "
        f"({'the pick' if results['default_is_pick'] else 'NOT the pick: update int4_recipes.INT4_RECIPES'}).", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="models/demo.pt", type=Path)
    parser.add_argument("--out", default=Path("tools/results"), type=Path)
    parser.add_argument("--rounds", default=7, type=int, help="rounds of prefill timing (each build once a round)")
    parser.add_argument("--repeats", default=10, type=int, help="timed prefills per build and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)  # the quantizers log a line per node
    with tempfile.TemporaryDirectory(prefix="int4_quality.") as tmp:
        folder = Path(tmp)
        fp32 = export_onnx(args.checkpoint, folder / "model.onnx", merge=True).model_path
        max_seq_len = load_checkpoint(args.checkpoint).config.max_seq_len
        case = heldout_case(max_seq_len, WINDOWS)
        reference = reference_logits(args.checkpoint, case)
        builds = [("fp32", "fp32", lambda: fp32), ("int8 (quantize_dynamic)", "int8",
                                                   lambda: quantize_int8(fp32, folder / "int8.onnx"))]
        builds += [(label, "int4", functools.partial(quantize_int4, fp32, folder / f"v{i}.onnx", recipe=recipe))
                   for i, (label, recipe) in enumerate(RECIPES)]
        builds += [(label, "int4", build) for label, build in other_builds(fp32, folder, max_seq_len)]
        rows = []
        for label, precision, build in builds:
            rows.append({**measure(label, build, case, reference), "precision": precision})
            row = rows[-1]
            print(f"{label:55s} " + (f"failed: {row['error']}" if row["error"] else
                  f"top-1 {100 * row['top1_agreement']:6.2f} %  {row['file_size']:>9,} B"), flush=True)
        window = {"input_ids": case.input_ids[:1], "attention_mask": case.attention_mask[:1]}
        time_prefills(rows, window, args.rounds, args.repeats)
    chosen, reached = pick(rows)
    recipes = dict(RECIPES)
    results = {"checkpoint": str(args.checkpoint), "windows": WINDOWS, "seq_len": int(case.input_ids.shape[1]),
               "rounds": args.rounds, "repeats": args.repeats, "target_top1": TOP1_TARGET,
               "machine": machine_record(), "rows": rows, "pick": chosen, "pick_reaches_target": reached,
               "default": {**asdict(INT4_DEFAULT), "describe": INT4_DEFAULT.describe()},
               "default_is_pick": recipes.get(chosen["variant"]) == INT4_DEFAULT,
               "named_recipes": {name: recipe.describe() for name, recipe in INT4_RECIPES.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "int4_quality.md").write_text(markdown(results))
    print(markdown(results))
    sys.exit(0 if results["default_is_pick"] else 1)


if __name__ == "__main__":
    main()
