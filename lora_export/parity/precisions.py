"""What each edge build costs: every precision of an export held against the PyTorch fp32 checkpoint, and an
``.ort`` model against the ``.onnx`` it came from.

``compare_precisions`` measures file size, ONNX Runtime latency (each build in its own warmed block), next-byte
top-1 agreement and eval loss on held-out prose, judged by the per-precision ``lora_export.parity.metrics.TOLERANCES``.
fp16 is measured on CUDA where a CUDA session really gets CUDAExecutionProvider, else on ONNX Runtime's CPU provider
(which runs it, casting where it lacks float16 kernels), judged by the same fp16 rule either way.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..corpus import heldout_text
from ..errors import EdgeExportError
from ..export.adapters import activate_adapters, attach_adapter
from ..export.onnx_files import load_onnx, model_file_size, read_metadata
from ..export.quantize import PRECISIONS
from ..export.tracing import OUTPUT_NAMES
from ..layout import Form
from ..model.checkpoint import build_model, read_checkpoint
from ..model.layers import merge_lora
from ..model.transformer import LoRATransformerLM
from .cases import Case
from .lineage import check_model_matches, load_adapter_for
from .metrics import LATENCY_MAX_SEQ, LATENCY_RUNS, LATENCY_WARMUP, TOLERANCES, compare_logits, judge, percentiles_ms
from .sessions import ProviderStatus, open_session

EVAL_WINDOWS = 16
HELDOUT_CASE = "heldout_eval"


def check_ort_format(model_path: str | os.PathLike, ort_path: str | os.PathLike) -> float:
    """Hold an ``.ort`` model against the ``.onnx`` it was converted from: both on ONNX Runtime's CPU provider, on
    two seeded batches of held-out prose (LoRA inputs at their defaults); returns the largest |difference| of the
    logits. Raises EdgeExportError when they differ beyond the fp32 tolerance (atol 1e-4 + rtol 1e-3 |onnx|),
    ParityInputError when ONNX Runtime cannot load either."""
    tolerance = TOLERANCES["fp32"]
    feeds = [{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids in
             (heldout_windows(2, 32), heldout_windows(1, 7))]
    outputs = []
    for path in (model_path, ort_path):
        session, _ = open_session(path, "cpu")
        outputs.append([session.run(OUTPUT_NAMES, inputs)[0] for inputs in feeds])
    worst = 0.0
    for want, got in zip(*outputs, strict=True):
        measured = tolerance.deviation(got, want)
        worst = max(worst, measured.max_abs)
        if not measured.passed:
            raise EdgeExportError(f"{ort_path}: its logits differ from {Path(model_path).name}'s "
                                  f"(max |diff| {measured.max_abs:.3g}): the ORT-format conversion changed the model")
    return worst


# --------------------------------------------------------------------------- comparison


def heldout_windows(count: int, seq_len: int) -> np.ndarray:
    """``count`` windows of ``seq_len`` bytes at evenly spaced offsets of the held-out prose -> int64 [count, seq]."""
    data = np.frombuffer(heldout_text(), dtype=np.uint8)
    starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
    return np.stack([data[s: s + seq_len] for s in starts]).astype(np.int64)


def heldout_case(max_seq_len: int, windows: int = EVAL_WINDOWS) -> Case:
    """The held-out prose every precision's quality is measured on, and int8 / int4 judged on wherever they are
    judged (``compare_precisions``, ``validate``): ``windows`` windows of min(256, max_seq_len) bytes, no padding."""
    input_ids = heldout_windows(windows, min(LATENCY_MAX_SEQ, max_seq_len))
    return Case(HELDOUT_CASE, f"{windows} windows of held-out prose: top-1 agreement and eval loss judge int8 and "
                "int4 here", "held-out prose", input_ids, np.ones_like(input_ids))


def _check_models(models: Mapping[str, str | os.PathLike], payload: dict, checkpoint_path: Path
                  ) -> dict[str, tuple[Path, onnx.ModelProto, dict[str, str]]]:
    """{precision: (path, graph, lora_export metadata)} of models that belong to the checkpoint and are the
    precision they are given as. Raises EdgeExportError, ExportError or ParityInputError."""
    checked = {}
    for precision, path in models.items():
        path = Path(path)
        if precision not in PRECISIONS:
            raise EdgeExportError(f"unknown precision {precision!r}, expected one of {', '.join(PRECISIONS)}")
        proto = load_onnx(path)
        metadata = read_metadata(proto)
        check_model_matches(proto, metadata, payload, path, checkpoint_path)
        if metadata.get("precision", "fp32") != precision:
            raise EdgeExportError(f"{path}: is {metadata.get('precision', 'fp32')}, given as {precision}")
        checked[precision] = (path, proto, metadata)
    return checked


def _reference_model(checkpoint_path: Path, payload: dict,
                     checked: Mapping[str, tuple[Path, onnx.ModelProto, dict[str, str]]],
                     adapter_path: Path | None) -> LoRATransformerLM:
    """The checkpoint's model in the form of the ``checked`` models (one form for all): merged LoRA, or the base
    with the adapter of ``adapter_path`` attached (None: the bare base)."""
    forms = {Form(metadata["form"]) for _, _, metadata in checked.values()}
    if len(forms) > 1:
        raise EdgeExportError(f"the models mix export forms {sorted(forms)}: compare builds of one export")
    tensors = None
    if adapter_path is not None:
        _, proto, metadata = next(iter(checked.values()))
        tensors, _ = load_adapter_for(adapter_path, proto, metadata)
    model = build_model(payload, checkpoint_path)
    if forms == {Form.MERGED}:
        merge_lora(model)
    else:
        attach_adapter(model, tensors)
    return model


def _quality_row(precision: str, path: Path, session: ort.InferenceSession | None, status: ProviderStatus,
                 case: Case, reference: np.ndarray, run_options: ort.RunOptions | None) -> dict:
    """One build's row of ``compare_precisions`` without latency: its logits on ``case`` against ``reference``,
    judged by TOLERANCES[precision]; metrics None and passed None when ``session`` is None (not run)."""
    tolerance = TOLERANCES[precision]
    row = {"precision": precision, "model": str(path), "file_size": model_file_size(path), "provider": status.name,
           "status": status.status(), "tolerance": tolerance.describe(), "top1_agreement": None,
           "top1_exact": None, "max_abs": None, "eval_loss_ref": None, "eval_loss": None,
           "eval_loss_change_pct": None, "latency": [], "passed": None, "failures": []}
    if session is None:
        return row
    feeds = {"input_ids": case.input_ids, "attention_mask": case.attention_mask}
    got = session.run(OUTPUT_NAMES, feeds, run_options)[0]
    metrics, _ = compare_logits(got, reference, case.input_ids, case.attention_mask, tolerance)
    failures = judge(metrics, tolerance)
    row.update(top1_agreement=metrics.top1_agreement, top1_exact=metrics.top1_exact, max_abs=metrics.max_abs,
               eval_loss_ref=metrics.loss_ref, eval_loss=metrics.loss_onnx,
               eval_loss_change_pct=100.0 * (metrics.loss_onnx - metrics.loss_ref) / metrics.loss_ref,
               passed=not failures, failures=failures)
    return row


def _precision_session(path: Path, precision: str) -> tuple[ort.InferenceSession | None, ProviderStatus]:
    """The session a build is measured in: fp16 on CUDA where a CUDA session really runs it, everything else (and
    fp16 without CUDA) on the CPU provider."""
    if precision == "fp16":
        session, status = open_session(path, "cuda")
        if session is not None:
            return session, status
    return open_session(path, "cpu")


def compare_precisions(
    checkpoint_path: str | os.PathLike,
    models: Mapping[str, str | os.PathLike],
    *,
    adapter_path: str | os.PathLike | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    windows: int = EVAL_WINDOWS,
    warmup: int = LATENCY_WARMUP,
    runs: int = LATENCY_RUNS,
) -> list[dict]:
    """Each build of ``models`` ({precision: .onnx path}, all exported from ``checkpoint_path``) against PyTorch fp32.

    The reference is the checkpoint in the models' form: merged LoRA, or for the adapters form the base, or base +
    the adapter of ``adapter_path`` (which is then active in every ONNX Runtime run). Quality is measured on
    ``windows`` held-out prose windows (the last 10% of pydoc_data.topics, as training splits it) of
    N = min(256, max_seq_len) bytes; latency (warm-up, then p50 / p90 of ``runs``, each model in its own block) at
    each (batch, seq) of ``shapes``, default [(1, N)], on random bytes. fp32 and int8 run on ONNX Runtime's CPU
    provider with its default threads, fp16 on CUDA where it really runs and on the CPU provider elsewhere.

    One dict per model, in the given order: precision, model (path), file_size (bytes, external data included),
    provider, status ('ran' or 'not run: <reason>'), tolerance (the precision's TOLERANCES, in words),
    top1_agreement, top1_exact, max_abs, eval_loss_ref (PyTorch), eval_loss (ONNX Runtime), eval_loss_change_pct
    (100 * (eval_loss - eval_loss_ref) / eval_loss_ref), latency (list of {batch, seq_len, p50_ms, p90_ms}),
    passed and failures (``metrics.judge`` on ``heldout_case``). A model that did not run has None metrics, []
    latency and passed None. Raises a LoraExportError (one line) for models that do not belong to the checkpoint
    or cannot load: EdgeExportError, ParityInputError, CheckpointError, ExportError or AdapterError, by the stage
    that refused them.
    """
    checkpoint_path = Path(checkpoint_path)
    payload = read_checkpoint(checkpoint_path)
    checked = _check_models(models, payload, checkpoint_path)
    model = _reference_model(checkpoint_path, payload, checked,
                             Path(adapter_path) if adapter_path is not None else None)
    case = heldout_case(model.config.max_seq_len, windows)
    with torch.no_grad():
        reference = model(torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask)).numpy()
    run_options, _adapters = activate_adapters(adapter_path) if adapter_path is not None else (None, [])
    rows, sessions = {}, {}
    for precision, (path, _, _) in checked.items():
        session, status = _precision_session(path, precision)
        rows[precision] = _quality_row(precision, path, session, status, case, reference, run_options)
        if session is not None:
            sessions[precision] = session
    rng = np.random.default_rng(0)
    shapes = shapes or [(1, case.input_ids.shape[1])]
    latency_inputs = [{"input_ids": rng.integers(0, 256, shape, dtype=np.int64),
                       "attention_mask": np.ones(shape, np.int64)} for shape in shapes]
    for precision, session in sessions.items():  # each build in its own warmed block
        for inputs in latency_inputs:
            batch, seq = inputs["input_ids"].shape
            p50, p90 = percentiles_ms(functools.partial(session.run, OUTPUT_NAMES, inputs, run_options), warmup, runs)
            rows[precision]["latency"].append({"batch": batch, "seq_len": seq, "p50_ms": p50, "p90_ms": p90})
    return list(rows.values())
