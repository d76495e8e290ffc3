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
from ..model.transformer import ModelConfig
from .cases import EVAL_WINDOWS, Case
from .lineage import check_model_matches, load_adapter_for
from .metrics import LATENCY_MAX_SEQ, LATENCY_RUNS, LATENCY_WARMUP, TOLERANCES, compare_logits, judge, percentiles_ms
from .sessions import ProviderStatus, open_session
from .subject import graph_only

HELDOUT_CASE = "heldout_eval"


def check_ort_format(model_path: str | os.PathLike, ort_path: str | os.PathLike) -> float:
    """Hold an ``.ort`` model against the ``.onnx`` it was converted from: both on ONNX Runtime's CPU provider, on
    two seeded batches of held-out prose (LoRA inputs at their defaults); returns the largest |difference| of the
    logits. Raises EdgeExportError when they differ beyond the fp32 tolerance (atol 1e-4 + rtol 1e-3 |onnx|),
    ParityInputError when ONNX Runtime cannot load either."""
    tolerance = TOLERANCES["fp32"]
    feeds = [{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids in
             (heldout_windows(2, 32), heldout_windows(1, 7))]
    outputs = [_cpu_logits(path, feeds) for path in (model_path, ort_path)]  # one session at a time
    worst = 0.0
    for want, got in zip(*outputs, strict=True):
        measured = tolerance.deviation(got, want)
        worst = max(worst, measured.max_abs)
        if not measured.passed:
            raise EdgeExportError(f"{ort_path}: its logits differ from {Path(model_path).name}'s "
                                  f"(max |diff| {measured.max_abs:.3g}): the ORT-format conversion changed the model")
    return worst


def _cpu_logits(path: str | os.PathLike, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The logits of each of ``feeds`` on a CPU session of ``path``, closed on return."""
    session, _ = open_session(path, "cpu")
    return [session.run(OUTPUT_NAMES, inputs)[0] for inputs in feeds]


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


Builds = dict[str, tuple[Path, onnx.ModelProto, dict[str, str]]]  # {precision: (path, graph, lora_export metadata)}


def load_builds(models: Mapping[str, str | os.PathLike]) -> Builds:
    """{precision: (path, graph without its weights, lora_export metadata)} of models that are the precision they
    are given as. Read before the checkpoint: a model under 2 GB holds its weights inline, and reading it takes two
    copies of them for a moment. Raises EdgeExportError or ExportError."""
    builds = {}
    for precision, path in models.items():
        path = Path(path)
        if precision not in PRECISIONS:
            raise EdgeExportError(f"unknown precision {precision!r}, expected one of {', '.join(PRECISIONS)}")
        proto = graph_only(load_onnx(path))
        metadata = read_metadata(proto)
        if metadata.get("precision", "fp32") != precision:
            raise EdgeExportError(f"{path}: is {metadata.get('precision', 'fp32')}, given as {precision}")
        builds[precision] = (path, proto, metadata)
    return builds


def check_builds(builds: Builds, payload: dict, checkpoint_path: Path, form: Form | None = None) -> None:
    """Refuse builds (``load_builds``) that do not belong to the checkpoint (ParityInputError) or mix export forms
    (EdgeExportError; with ``form``, the form of the model validated with them)."""
    for path, proto, metadata in builds.values():
        check_model_matches(proto, metadata, payload, path, checkpoint_path)
    forms = {Form(metadata["form"]) for _, _, metadata in builds.values()} | ({form} if form else set())
    if len(forms) > 1:
        raise EdgeExportError(f"the models mix export forms {sorted(forms)}: compare builds of one export")


def _reference_logits(checkpoint_path: Path, payload: dict, checked: Builds, adapter_path: Path | None,
                      case: Case) -> np.ndarray:
    """PyTorch's logits [W, N, 256] of ``case`` on the checkpoint in the form of the ``checked`` models: merged
    LoRA, or the base with the adapter of ``adapter_path`` attached (None: the bare base). The model is freed on
    return."""
    _, proto, metadata = next(iter(checked.values()))  # one form for all (``check_builds``)
    tensors = None if adapter_path is None else load_adapter_for(adapter_path, proto, metadata)[0]
    model = build_model(payload, checkpoint_path)
    if Form(metadata["form"]) is Form.MERGED:
        merge_lora(model)
    else:
        attach_adapter(model, tensors)
    with torch.no_grad():
        return model(torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask)).numpy()


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


def _measure_build(precision: str, path: Path, case: Case, reference: np.ndarray,
                   run_options: ort.RunOptions | None, latency_inputs: list[dict[str, np.ndarray]], warmup: int,
                   runs: int) -> dict:
    """One build's row (``_quality_row``) with its latency at each of ``latency_inputs``, on its own session: the
    only one open, closed on return."""
    session, status = _precision_session(path, precision)
    row = _quality_row(precision, path, session, status, case, reference, run_options)
    for inputs in latency_inputs if session is not None else []:  # each build in its own warmed block
        batch, seq = inputs["input_ids"].shape
        p50, p90 = percentiles_ms(functools.partial(session.run, OUTPUT_NAMES, inputs, run_options), warmup, runs)
        row["latency"].append({"batch": batch, "seq_len": seq, "p50_ms": p50, "p90_ms": p90})
    return row


def measure_builds(checked: Builds, case: Case, reference: np.ndarray, adapter_path: Path | None, *,
                   shapes: Sequence[tuple[int, int]] | None = None, warmup: int = LATENCY_WARMUP,
                   runs: int = LATENCY_RUNS) -> list[dict]:
    """``compare_precisions``'s rows of the checked builds (``load_builds``, ``check_builds``) against PyTorch's
    logits ``reference`` of ``case`` (computed, and its model freed, before), the adapter of ``adapter_path``
    active in every run: one session at a time, each build measured (quality, then latency) and closed before the
    next opens."""
    run_options, _adapters = activate_adapters(adapter_path) if adapter_path is not None else (None, [])
    rng = np.random.default_rng(0)
    shapes = shapes or [(1, case.input_ids.shape[1])]
    latency_inputs = [{"input_ids": rng.integers(0, 256, shape, dtype=np.int64),
                       "attention_mask": np.ones(shape, np.int64)} for shape in shapes]
    return [_measure_build(precision, path, case, reference, run_options, latency_inputs, warmup, runs)
            for precision, (path, _, _) in checked.items()]


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
    provider with its default threads, fp16 on CUDA where it really runs and on the CPU provider elsewhere. The
    PyTorch reference is computed and freed (with the checkpoint's tensors) before the first session opens, and
    the builds run one session at a time (``measure_builds``).

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
    adapter_path = Path(adapter_path) if adapter_path is not None else None
    checked = load_builds(models)
    payload = read_checkpoint(checkpoint_path)
    check_builds(checked, payload, checkpoint_path)
    case = heldout_case(ModelConfig.from_dict(payload["config"]).max_seq_len, windows)
    reference = _reference_logits(checkpoint_path, payload, checked, adapter_path, case)
    del payload  # the checkpoint's tensors, before the first session opens
    return measure_builds(checked, case, reference, adapter_path, shapes=shapes, warmup=warmup, runs=runs)
