"""Parity validation: does an exported ONNX model compute what its PyTorch checkpoint computes?

``validate(model.onnx, model.pt)`` rebuilds the reference from the checkpoint in the same form as the export
(merged: base + merged LoRA; adapter form: the base alone and, given an adapter file, base + that adapter),
runs seeded cases on ONNX Runtime's CPU provider (and CUDA when asked for or present), and compares
``logits`` [batch, seq, 256] at the real (attention_mask = 1) positions:

* max absolute error, max relative error ``|a - b| / |b|`` with ``b`` the reference (polygraphy's definition:
  zeros of ``b`` are replaced by float64 epsilon), mean absolute error, cosine similarity, NaN/Inf;
* the share of the tolerance used, ``max |a - b| / (atol + rtol * |b|)``: at most 1 is numpy-allclose;
* next-byte top-1 agreement and the next-byte cross-entropy of both (the held-out eval loss);
* greedy generation: bytes generated from a held-out prompt, re-running the graph on the growing sequence.

Which provider ran is read from the created session's ``get_providers()``. A provider that did not run is
reported as ``not run: <reason>``; when the user asked for it explicitly that is a ``ProviderUnavailableError``.
fp16 models (``lora_export.precision`` metadata) are measured on CUDA only: ONNX Runtime's CPU provider has few
float16 kernels, so it is reported as not run. When no provider ran, the result's ``status`` is ``'not run'``:
neither passed nor failed. Given the edge builds of the model (``precision_models``), the report also carries
``lora_export.edge.compare_precisions``'s table across fp32 / fp16 / int8.
``torch`` is imported at module load, before any session is created: a PyTorch built for the same CUDA major
version then lets ONNX Runtime's CUDA provider find its libraries. Reports are written by ``lora_export.report``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from . import __version__
from .adapters import (
    AdapterError,
    activate_adapters,
    attach_adapter,
    check_adapter,
    model_version_from_fingerprint,
    read_adapter,
)
from .checkpoint import CheckpointError, base_fingerprint, build_model, file_sha256, first_line, read_checkpoint
from .export import FORMS, INPUT_NAMES, OUTPUT_NAMES, ExportError, load_onnx, read_metadata
from .layers import merge_lora
from .model import VOCAB_SIZE, LoRATransformerLM, ModelConfig
from .report import ERROR_HISTOGRAM_EDGES, write_reports
from .train import TextData, prose_text

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
REQUIRED_METADATA = ("form", "base_sha256", "model_config")
GENERATE_BYTES = 24
PROMPT_BYTES = 16
LATENCY_WARMUP = 3
LATENCY_RUNS = 20
LATENCY_MAX_SEQ = 256
POLYGRAPHY_EPSILON = 2.220446049250313e-16
FP16_CPU_REASON = "ONNX Runtime's CPU provider has few float16 kernels; fp16 parity is measured on CUDA"
#: ParityResult.status values: 'not run' when no provider could run the model (neither passed nor failed).


class ParityInputError(ValueError):
    """validate() cannot run on these inputs (one line): a model and checkpoint that do not belong together,
    an unreadable model, checkpoint or adapter, an adapter that does not fit, a bad option. CLI exit code 2."""


class ProviderUnavailableError(ParityInputError):
    """An execution provider the user asked for explicitly could not run (e.g. CUDA libraries missing)."""


@dataclass(frozen=True)
class Tolerance:
    """The pass limits of one precision.

    atol / rtol: every logit at a real position must satisfy |onnx - torch| <= atol + rtol * |torch|
    (numpy allclose); None switches the elementwise check off (int8 is judged by top-1 and eval loss).
    top1_min: least share of real positions whose next-byte argmax agrees. loss_delta_max: largest allowed
    |eval loss(onnx) - eval loss(torch)| in nats per byte, None for not judged.
    """

    atol: float | None
    rtol: float | None
    top1_min: float
    loss_delta_max: float | None

    def describe(self) -> str:
        """One line, e.g. 'atol 0.0001, rtol 0.001, top-1 >= 100%'."""
        parts = [] if self.atol is None else [f"atol {self.atol:g}", f"rtol {self.rtol:g}"]
        parts.append(f"top-1 >= {self.top1_min:.0%}")
        if self.loss_delta_max is not None:
            parts.append(f"|eval loss delta| <= {self.loss_delta_max:g} nats/byte")
        return ", ".join(parts)


#: Default limits per precision; the reference is always the fp32 PyTorch model.
#: fp32: ORT and PyTorch sum in different orders (blocked MatMul, fused LayerNorm / Softmax), which leaves
#: ~1e-6 absolute noise on logits of magnitude ~1 and grows with depth and width. atol 1e-4 sits ~100x above
#: that floor and ~100x below a real bug (one wrong weight moves logits by 1e-2 or more); rtol 1e-3 keeps
#: large logits of trained models (|z| ~ 10-30) to the same relative precision.
#: fp16 (10-bit mantissa, ~1e-3 relative per op) and int8 (judged by top-1 and held-out eval loss) are for
#: the quantised exports of a later issue.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, top1_min=1.0, loss_delta_max=None),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, top1_min=0.99, loss_delta_max=0.01),
    "int8": Tolerance(atol=None, rtol=None, top1_min=0.9, loss_delta_max=0.05),
}


@dataclass
class ProviderStatus:
    """One requested execution provider: whether a session really ran on it, and why not."""

    requested: str  # 'cpu' or 'cuda'
    name: str  # e.g. 'CUDAExecutionProvider'
    ran: bool
    session_providers: list[str]  # session.get_providers() of the created session ([] when none)
    reason: str | None = None  # why it did not run

    def status(self) -> str:
        """'ran' or 'not run: <reason>'."""
        return "ran" if self.ran else f"not run: {self.reason}"


@dataclass
class Case:
    """One seeded input: input_ids and attention_mask int64 [batch, seq] (1 = real token)."""

    name: str
    description: str
    source: str  # where the bytes come from
    input_ids: np.ndarray
    attention_mask: np.ndarray

    def info(self) -> dict:
        """The plain facts of the case for reports (no arrays)."""
        batch, seq = self.input_ids.shape
        return {"name": self.name, "description": self.description, "source": self.source, "batch": batch,
                "seq_len": seq, "real_tokens": int(self.attention_mask.sum())}


@dataclass
class Metrics:
    """ONNX output vs reference at the real positions of one case; None where a metric does not apply."""

    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    tolerance_used: float | None  # max |a-b| / (atol + rtol |b|); <= 1 passes the elementwise check
    outside: int  # elements outside atol + rtol |b| (0 when the elementwise check is off)
    elements: int  # elements compared
    worst_index: list[int]  # [batch row, position, byte] of the largest |a - b|
    finite: bool  # no NaN / Inf in the ONNX output and the reference
    top1_agreement: float  # share of positions whose ONNX argmax is the reference's top byte (ties within tol.)
    top1_exact: float  # share of positions with exactly the same argmax
    loss_ref: float | None  # next-byte cross-entropy (nats/byte) of the reference; None for N = 1
    loss_onnx: float | None


@dataclass
class Comparison:
    """The verdict on one (variant, provider, case, output)."""

    variant: str
    provider: str
    case: str
    output: str
    metrics: Metrics
    passed: bool
    failures: list[str]


@dataclass
class Generation:
    """Greedy generation from one prompt on PyTorch and on one provider (bytes shown with \\x escapes)."""

    variant: str
    provider: str
    prompt: str
    reference: str
    onnx: str
    identical: bool
    first_mismatch: int | None  # index into the generated bytes


@dataclass
class Latency:
    """Wall-clock latency of one forward pass at one shape, after warm-up."""

    variant: str
    backend: str  # 'PyTorch eager (CPU)' or 'ORT <provider>'
    batch: int
    seq_len: int
    warmup: int
    runs: int
    p50_ms: float
    p90_ms: float


@dataclass
class ParityResult:
    """Everything validate() measured; ``status`` is the verdict, ``report_files`` what it wrote."""

    status: str  # 'passed', 'failed' or 'not run'
    summary: str  # one line naming the worst case and output when failing
    model_path: Path
    checkpoint_path: Path
    adapter_path: Path | None
    form: str  # 'merged' or 'adapters'
    precision: str
    tolerance: Tolerance
    pass_rule: str
    seed: int
    model_metadata: dict[str, str]  # the model's lora_export.* metadata_props, prefix removed
    providers: list[ProviderStatus]
    variants: list[str]
    cases: list[Case]
    comparisons: list[Comparison]
    generations: list[Generation]
    latencies: list[Latency]
    failures: list[str]
    worst: Comparison | None  # the most severe failing comparison
    notes: list[str]
    error_histograms: dict[str, np.ndarray]  # provider -> counts of log10 |onnx - torch| in ERROR_HISTOGRAM_EDGES
    created: str
    tool_version: str = __version__
    #: rows of ``lora_export.edge.compare_precisions`` (validate's precision_models), None when not measured
    precisions: list[dict] | None = None
    report_dir: Path | None = None
    report_files: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Parity holds on every provider that ran, and at least one ran."""
        return self.status == "passed"


@dataclass
class _Variant:
    """A way to run the model: its name, the adapter tensors of the reference, the ORT run options."""

    name: str
    tensors: dict[str, np.ndarray] | None
    run_options: ort.RunOptions | None
    adapter: ort.LoraAdapter | None = None  # kept alive while run_options refers to it


# --------------------------------------------------------------------------- inputs


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def check_model_matches(proto: onnx.ModelProto, metadata: dict[str, str], payload: dict, model_path: Path,
                        checkpoint_path: Path) -> list[str]:
    """Refuse (ParityInputError) a model that the checkpoint did not produce; return notes for the report.

    Checks the lora_export metadata (form, model_config, base weights fingerprint) against the checkpoint,
    then the graph interface: input_ids / attention_mask int64 [batch, seq] with a dynamic seq axis, logits
    [batch, seq, 256], LoRA inputs present exactly in the adapter form, no other required input.
    ``metadata``: the model's lora_export.* metadata_props (``export.read_metadata``).
    """
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ParityInputError(f"{model_path}: no lora_export metadata ({', '.join(missing)} missing): "
                               "validate checks models written by `lora-export`")
    form = metadata["form"]
    if form not in FORMS:
        raise ParityInputError(f"{model_path}: unknown lora_export.form {form!r}, expected one of {FORMS}")
    mismatch = f"{model_path} and {checkpoint_path} do not belong together"
    try:
        model_config = json.loads(metadata["model_config"])
    except json.JSONDecodeError:
        raise ParityInputError(f"{model_path}: lora_export.model_config is not valid JSON") from None
    if model_config != payload["config"]:
        keys = sorted(k for k in set(model_config) | set(payload["config"])
                      if model_config.get(k) != payload["config"].get(k))
        detail = ", ".join(f"{k} (model {model_config.get(k)!r}, checkpoint {payload['config'].get(k)!r})"
                           for k in keys[:3])
        raise ParityInputError(f"{mismatch}: model config differs in {detail}")
    if metadata["base_sha256"] != base_fingerprint(payload["base"]):
        raise ParityInputError(f"{mismatch}: the model was exported from different base weights (base_sha256)")

    graph_inputs = {value.name: value for value in proto.graph.input}
    initializers = {init.name for init in proto.graph.initializer}
    for name in INPUT_NAMES:
        value = graph_inputs.get(name)
        if value is None:
            raise ParityInputError(f"{model_path}: graph input {name!r} is missing")
        dims = _dims(value)
        if value.type.tensor_type.elem_type != onnx.TensorProto.INT64 or len(dims) != 2:
            raise ParityInputError(f"{model_path}: graph input {name!r} must be int64 [batch, seq], got {dims}")
        if isinstance(dims[1], int) and dims[1] > 0:
            raise ParityInputError(f"{model_path}: graph input {name!r} has a fixed sequence length {dims[1]}; "
                                   "validate needs the dynamic seq axis lora-export writes")
    outputs = {value.name: _dims(value) for value in proto.graph.output}
    logits = outputs.get(OUTPUT_NAMES[0])
    if logits is None or len(logits) != 3 or logits[2] not in (VOCAB_SIZE, "", 0):
        raise ParityInputError(f"{model_path}: expected output 'logits' [batch, seq, {VOCAB_SIZE}], got {outputs}")
    lora_inputs = [name for name in graph_inputs if name.endswith((".lora_A", ".lora_B"))]
    if (form == "adapters") != bool(lora_inputs):
        raise ParityInputError(f"{model_path}: lora_export.form is {form!r} but the graph has "
                               f"{len(lora_inputs)} LoRA inputs")
    extra = sorted(set(graph_inputs) - set(INPUT_NAMES) - set(lora_inputs) - initializers)
    if extra:
        raise ParityInputError(f"{model_path}: unexpected required graph inputs {extra[:3]}")

    notes = []
    recorded = metadata.get("checkpoint_sha256")
    if recorded is not None and recorded != file_sha256(checkpoint_path):
        notes.append(f"{checkpoint_path.name} is not the file the model was exported from (checkpoint_sha256 "
                     "differs); base weights and config match" + (", but merged LoRA weights may differ"
                                                                  if form == "merged" else ""))
    return notes


def load_adapter_for(adapter_path: Path, proto: onnx.ModelProto, metadata: dict[str, str]
                     ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read an .onnx_adapter and hold it against the model before any run; returns (tensors, notes)."""
    if metadata["form"] != "adapters":
        raise ParityInputError(f"--adapter needs an adapter-form model; this one was exported {metadata['form']}")
    try:
        tensors, version = read_adapter(adapter_path)
    except AdapterError as err:
        raise ParityInputError(str(err)) from None
    errors, notes = check_adapter(proto, tensors)
    expected = model_version_from_fingerprint(metadata["base_sha256"])
    if version != expected:
        errors.append(f"written for a different base model (model version {version}, this model is {expected})")
    if errors:
        raise ParityInputError(f"{adapter_path}: adapter does not fit the model: {'; '.join(errors)}")
    return tensors, notes


def resolve_tolerance(precision: str, atol: float | None, rtol: float | None) -> Tolerance:
    """TOLERANCES[precision] with atol / rtol overridden where given."""
    if precision not in TOLERANCES:
        raise ParityInputError(f"unknown precision {precision!r}, expected one of {', '.join(TOLERANCES)}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and np.isfinite(value)):
            raise ParityInputError(f"{name} must be a finite number >= 0, got {value}")
    tolerance = TOLERANCES[precision]
    if atol is None and rtol is None:
        return tolerance
    return replace(tolerance, atol=atol if atol is not None else tolerance.atol or 0.0,
                   rtol=rtol if rtol is not None else tolerance.rtol or 0.0)


def pass_rule(tolerance: Tolerance, generate_bytes: int) -> str:
    """The pass rule in words, as written in the reports."""
    parts = ["for every variant, provider that ran and case:"]
    if tolerance.atol is not None:
        parts.append(f"every logit at a real position satisfies |onnx - torch| <= atol + rtol * |torch| "
                     f"(atol {tolerance.atol:g}, rtol {tolerance.rtol:g});")
    parts.append("no NaN or Inf;")
    parts.append(f"next-byte top-1 agreement >= {tolerance.top1_min:.0%} of real positions (ONNX's argmax must be "
                 "the reference's top byte, or tie with it within the tolerance);")
    if tolerance.loss_delta_max is not None:
        parts.append(f"|eval loss(onnx) - eval loss(torch)| <= {tolerance.loss_delta_max:g} nats/byte;")
    parts.append(f"and {generate_bytes} greedily generated bytes are identical. A provider that did not run is "
                 "reported as 'not run', never as passed.")
    return "PASS when, " + " ".join(parts)


# --------------------------------------------------------------------------- providers


@contextlib.contextmanager
def _native_stderr_into(buffer: list[str]) -> Iterator[None]:
    """Redirect file descriptor 2, where ONNX Runtime's C++ logger writes, into ``buffer`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            buffer.append(capture.read().decode("utf-8", "replace"))


def _cuda_failure_reason(log: str) -> str:
    """A one-line reason from ONNX Runtime's log of a session that fell back from CUDA to CPU.

    e.g. 'the CUDA provider library did not load (libcublasLt.so.13: cannot open shared object file: ...);
    ONNX Runtime requires cuDNN 9.* and CUDA 13.*'.
    """
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    library = re.search(r"with error: ([^\n]+)", log)
    requirement = re.search(r"Require (.+?)\. Please", log)
    reason = (f"the CUDA provider library did not load ({library.group(1).strip()})" if library
              else "ONNX Runtime fell back to CPUExecutionProvider (the CUDA provider did not load)")
    return f"{reason}; ONNX Runtime requires {requirement.group(1)}" if requirement else reason


def normalize_providers(providers: Sequence[str] | None) -> list[str]:
    """['cpu', ...] from short or full names; CPU always first. None means CPU plus CUDA when it runs."""
    if providers is None:
        return ["cpu", "cuda"]
    aliases = {**{short: short for short in PROVIDERS}, **{full.lower(): short for short, full in PROVIDERS.items()}}
    wanted = []
    for provider in providers:
        short = aliases.get(provider.strip().lower())
        if short is None:
            raise ParityInputError(f"unknown provider {provider!r}: choose from {', '.join(PROVIDERS)}")
        wanted.append(short)
    return ["cpu"] + [p for p in dict.fromkeys(wanted) if p != "cpu"]


def open_session(model_path: str | os.PathLike, provider: str) -> tuple[ort.InferenceSession | None, ProviderStatus]:
    """An ONNX Runtime session on ``provider`` ('cpu' or 'cuda') and what really ran, from get_providers().

    A CUDA session that silently fell back to CPU is closed and reported with the reason from ORT's log.
    Raises ParityInputError when even the CPU session cannot load the model.
    """
    name = PROVIDERS[provider]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if provider == "cpu":
        try:
            session = ort.InferenceSession(str(model_path), options, providers=[name])
        except Exception as err:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
            raise ParityInputError(f"{model_path}: ONNX Runtime cannot load the model: {first_line(err)}"
                                   ) from None
        return session, ProviderStatus(provider, name, True, session.get_providers())

    if name not in ort.get_available_providers():
        reason = f"this onnxruntime build has no {name} (install onnxruntime-gpu)"
        return None, ProviderStatus(provider, name, False, [], reason)
    log: list[str] = []
    error = ""
    with _native_stderr_into(log), contextlib.redirect_stdout(io.StringIO()):
        if hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):  # best effort: finds the nvidia pip packages' libraries
                ort.preload_dlls()
        try:
            session = ort.InferenceSession(str(model_path), options, providers=[name, PROVIDERS["cpu"]])
        except Exception as err:  # e.g. a CUDA driver error raised instead of a fallback
            session, error = None, first_line(err)
    if session is None:
        return None, ProviderStatus(provider, name, False, [], f"session creation failed: {error}")
    ran = session.get_providers()
    if ran[0] != name:
        return None, ProviderStatus(provider, name, False, ran, _cuda_failure_reason("".join(log)))
    return session, ProviderStatus(provider, name, True, ran)


# --------------------------------------------------------------------------- cases


@functools.cache
def heldout_text() -> bytes:
    """The held-out tail (last 10%) of the pydoc_data.topics prose, exactly as training splits it."""
    return TextData.from_bytes(prose_text(), "pydoc_data.topics prose").val.numpy().tobytes()


def _text_rows(text: bytes, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` windows of ``seq`` bytes from ``text`` at seeded offsets -> int64 [batch, seq]."""
    data = np.frombuffer(text, dtype=np.uint8)
    starts = rng.integers(0, len(data) - seq, size=batch)
    return np.stack([data[s: s + seq] for s in starts]).astype(np.int64)


def generation_prompt(length: int, rng: np.random.Generator) -> np.ndarray:
    """A held-out prose prompt [1, length] int64: the start of a seeded line that begins with a letter."""
    lines = [line.strip() for line in heldout_text().split(b"\n")]
    lines = [line for line in lines if len(line) >= length and line[:1].isalpha()]
    line = lines[int(rng.integers(len(lines)))]
    return np.frombuffer(line[:length], dtype=np.uint8).astype(np.int64)[None, :]


def parity_cases(config: ModelConfig, seed: int = 0) -> list[Case]:
    """The seeded case list for a model config (w = local window, L = max_seq_len).

    Held-out prose at N = 1 (batch 1); N = w-1, w, w+1 and N not a multiple of w when <= L (batch 2);
    N = L (batch 4); random bytes at N = L; and padding at N = L: right-padded rows of lengths L, L/2, 1 plus
    one left-padded row (attention_mask zeros; compared at real positions only). Lengths already covered
    are not repeated.
    """
    rng = np.random.default_rng(seed)
    text = heldout_text()
    window, max_len = config.local_attn_window_size, config.max_seq_len
    ragged = min(max_len, 2 * window + (window + 1) // 2)
    while ragged > 1 and ragged % window == 0:
        ragged -= 1
    lengths = [
        ("n1", 1, 1, "N = 1, batch 1"),
        ("window_minus_1", window - 1, 2, f"N = w-1 = {window - 1} (one short of the local window)"),
        ("window", window, 2, f"N = w = {window} (exactly one local-attention block)"),
        ("window_plus_1", window + 1, 2, f"N = w+1 = {window + 1} (spills into a second block)"),
        ("not_window_multiple", ragged, 2, f"N = {ragged}, not a multiple of w = {window} (inner padding)"),
        ("max_len", max_len, 4, f"N = max_seq_len = {max_len}, batch 4"),
    ]
    cases, seen = [], set()
    for name, seq, batch, description in lengths:
        if 1 <= seq <= max_len and seq not in seen:
            seen.add(seq)
            ids = _text_rows(text, batch, seq, rng)
            cases.append(Case(name, description, "held-out prose", ids, np.ones_like(ids)))
    random_ids = rng.integers(0, VOCAB_SIZE, size=(2, max_len), dtype=np.int64)
    cases.append(Case("random_bytes", f"uniform random bytes, N = {max_len}, batch 2", "random bytes",
                      random_ids, np.ones_like(random_ids)))
    pad_ids = _text_rows(text, 4, max_len, rng)
    mask = np.zeros_like(pad_ids)
    half = (max_len + 1) // 2
    mask[0, :], mask[1, :half], mask[2, :1], mask[3, max_len - half:] = 1, 1, 1, 1
    pad_ids[mask == 0] = rng.integers(0, VOCAB_SIZE, size=int((mask == 0).sum()))
    cases.append(Case("padding", f"right-padded rows of lengths {max_len}, {half}, 1 and one left-padded row "
                      f"of length {half}; padding holds random bytes", "held-out prose", pad_ids, mask))
    return cases


# --------------------------------------------------------------------------- metrics


def next_byte_loss(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> float | None:
    """Mean next-byte cross-entropy (nats) of logits [B, N, V] where position and target are both real."""
    valid = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
    if not valid.any():
        return None
    scores = logits[:, :-1][valid].astype(np.float64)
    targets = input_ids[:, 1:][valid]
    top = scores.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=-1))
    return float(np.mean(log_norm - scores[np.arange(len(targets)), targets]))


def compare_logits(got: np.ndarray, ref: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
                   tolerance: Tolerance) -> tuple[Metrics, np.ndarray]:
    """Metrics of ONNX logits ``got`` against the reference ``ref`` (both [B, N, V]) at real positions.

    Returns (metrics, counts of log10 |got - ref| over ERROR_HISTOGRAM_EDGES; exact matches in the first bin).
    """
    real = attention_mask != 0
    a, b = got[real].astype(np.float64), ref[real].astype(np.float64)  # [P, V]
    diff = np.abs(a - b)
    abs_b = np.abs(b)
    rel = diff / np.where(b == 0, POLYGRAPHY_EPSILON, abs_b)
    flat_a, flat_b = a.ravel(), b.ravel()
    norms = np.linalg.norm(flat_a) * np.linalg.norm(flat_b)
    cosine = float(flat_a @ flat_b / norms) if norms > 0 else float(np.array_equal(flat_a, flat_b))
    worst = np.unravel_index(int(np.nanargmax(diff)) if not np.isnan(diff).all() else 0, diff.shape)
    row, pos = np.argwhere(real)[worst[0]]
    if tolerance.atol is not None:
        allowed = tolerance.atol + tolerance.rtol * abs_b
        used = np.divide(diff, allowed, out=np.zeros_like(diff), where=diff != 0)  # 0/0 (exact) uses nothing
        tolerance_used, outside = float(used.max()), int(np.sum(~(diff <= allowed)))
        tie = tolerance.atol + tolerance.rtol * np.abs(b.max(axis=-1))
    else:
        tolerance_used, outside, tie = None, 0, 0.0
    pick = a.argmax(axis=-1)
    ref_at_pick = b[np.arange(len(b)), pick]
    metrics = Metrics(
        max_abs=float(diff.max()), max_rel=float(rel.max()), mean_abs=float(diff.mean()), cosine=cosine,
        tolerance_used=tolerance_used, outside=outside, elements=int(diff.size),
        worst_index=[int(row), int(pos), int(worst[1])],
        finite=bool(np.isfinite(a).all() and np.isfinite(b).all()),
        top1_agreement=float(np.mean(ref_at_pick >= b.max(axis=-1) - tie)),
        top1_exact=float(np.mean(pick == b.argmax(axis=-1))),
        loss_ref=next_byte_loss(ref, input_ids, attention_mask),
        loss_onnx=next_byte_loss(got, input_ids, attention_mask),
    )
    low, high = ERROR_HISTOGRAM_EDGES[0], ERROR_HISTOGRAM_EDGES[-1]
    log_diff = np.log10(np.clip(diff[np.isfinite(diff)], 10.0**low, 10.0**high))
    return metrics, np.histogram(log_diff, bins=ERROR_HISTOGRAM_EDGES)[0]


def judge(metrics: Metrics, tolerance: Tolerance) -> list[str]:
    """The reasons ``metrics`` fail ``tolerance`` (empty: passed)."""
    failures = []
    if not metrics.finite:
        failures.append("NaN or Inf in the output")
    if metrics.tolerance_used is not None and not metrics.tolerance_used <= 1.0:
        failures.append(f"max_abs {metrics.max_abs:.3e}: {metrics.outside}/{metrics.elements} values outside "
                        f"atol {tolerance.atol:g} + rtol {tolerance.rtol:g} * |ref| "
                        f"({metrics.tolerance_used:.3g}x the tolerance)")
    if not metrics.top1_agreement >= tolerance.top1_min:
        failures.append(f"top-1 agreement {metrics.top1_agreement:.2%} < {tolerance.top1_min:.0%}")
    if tolerance.loss_delta_max is not None and metrics.loss_ref is not None:
        delta = abs(metrics.loss_onnx - metrics.loss_ref)
        if not delta <= tolerance.loss_delta_max:
            failures.append(f"eval loss delta {delta:.3g} > {tolerance.loss_delta_max:g} nats/byte")
    return failures


# --------------------------------------------------------------------------- runs


def _show_bytes(data: np.ndarray) -> str:
    """Bytes [n] for a report: printable ASCII as is, everything else (and the backslash) as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in data.tolist())


def _run(session: ort.InferenceSession, variant: _Variant, input_ids: np.ndarray,
         attention_mask: np.ndarray) -> np.ndarray:
    """logits [B, N, 256] from ONNX Runtime, with the variant's adapter active."""
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    return session.run(OUTPUT_NAMES, feeds, variant.run_options)[0]


def _reference(model: LoRATransformerLM, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """logits [B, N, 256] from the PyTorch reference (fp32, eval)."""
    with torch.no_grad():
        return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()


def greedy_generation(session: ort.InferenceSession, variant: _Variant, model: LoRATransformerLM,
                      prompt: np.ndarray, new_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(PyTorch bytes, ONNX bytes), each [new_bytes], greedily generated from prompt [1, P] int64.

    ONNX Runtime re-runs the whole graph on the growing sequence (no KV cache), cropped to the last
    max_seq_len bytes like ``LoRATransformerLM.generate``.
    """
    with torch.no_grad():
        reference = model.generate(torch.from_numpy(prompt), new_bytes, greedy=True)[0, prompt.shape[1]:].numpy()
    ids = prompt
    for _ in range(new_bytes):
        window = ids[:, -model.config.max_seq_len:]
        next_id = _run(session, variant, window, np.ones_like(window))[:, -1].argmax(axis=-1)
        ids = np.concatenate([ids, next_id[:, None].astype(np.int64)], axis=1)
    return reference, ids[0, prompt.shape[1]:]


def interleaved_percentiles_ms(steps: Mapping[str, Callable[[], object]], warmup: int, runs: int
                               ) -> dict[str, tuple[float, float]]:
    """{name: (p50, p90) in milliseconds} of ``runs`` timed calls of each step, after ``warmup`` untimed ones.

    The steps take turns (one call of each per round), so load from other processes on a shared machine drifts
    over all of them alike and their ratios stay fair.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (float(np.percentile(t, 50)), float(np.percentile(t, 90))) for name, t in times.items()}


def percentiles_ms(step: Callable[[], object], warmup: int, runs: int) -> tuple[float, float]:
    """(p50, p90) in milliseconds of ``runs`` timed calls after ``warmup`` untimed ones."""
    return interleaved_percentiles_ms({"step": step}, warmup, runs)["step"]


def _variants(form: str, adapter_path: Path | None, tensors: dict[str, np.ndarray] | None) -> list[_Variant]:
    """merged -> [merged]; adapters -> [base] or [base, adapter] when an adapter file is given."""
    if form == "merged":
        return [_Variant("merged", None, None)]
    variants = [_Variant("base", None, None)]
    if adapter_path is not None:
        run_options, (adapter,) = activate_adapters(adapter_path)
        variants.append(_Variant("adapter", tensors, run_options, adapter))
    return variants


def _summary(status: str, comparisons: list[Comparison], worst: Comparison | None, failures: list[str],
             providers: list[ProviderStatus], tolerance: Tolerance) -> str:
    """One line: PASS with the tolerance headroom, FAIL naming the worst case and output, or NOT RUN."""
    not_run = "; ".join(f"{p.name} not run: {p.reason}" for p in providers if not p.ran)
    ran = [p.name for p in providers if p.ran]
    if status == "not run":
        return f"NOT RUN: no execution provider could run the model; {not_run}"
    if status == "passed":
        used = [c.metrics.tolerance_used for c in comparisons if c.metrics.tolerance_used is not None]
        headroom = f", worst {max(used):.1%} of the tolerance" if used else ""
        line = (f"PASS: {len(comparisons)} comparisons on {', '.join(ran)} within {tolerance.describe()}"
                f"{headroom}; greedy generation identical")
    elif worst is not None:
        line = (f"FAIL: worst case '{worst.case}', output '{worst.output}' (variant {worst.variant}, "
                f"{worst.provider}): {worst.failures[0]}; {len(failures)} failing checks")
    else:
        line = f"FAIL: {failures[0]}; {len(failures)} failing checks"
    return f"{line}; {not_run}" if not_run else line


def _progress_callback(progress: bool | Callable[[int, int, str], None], total: int
                       ) -> tuple[Callable[[int, str], None], Callable[[], None]]:
    """(report(done, label), close()) for a tqdm bar (progress=True), a callback, or nothing."""
    if callable(progress):
        return (lambda done, label: progress(done, total, label)), (lambda: None)
    if not progress:
        return (lambda done, label: None), (lambda: None)
    bar = tqdm(total=total, desc="parity", unit="case", file=sys.stderr, leave=False)

    def report(done: int, label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(done - bar.n)

    return report, bar.close


def validate(
    model_path: str | os.PathLike,
    checkpoint_path: str | os.PathLike,
    *,
    adapter_path: str | os.PathLike | None = None,
    providers: Sequence[str] | None = None,
    explicit_providers: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    report_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool | Callable[[int, int, str], None] = False,
    generate_bytes: int = GENERATE_BYTES,
    latency_runs: int = LATENCY_RUNS,
    precision_models: Mapping[str, str | os.PathLike] | None = None,
) -> ParityResult:
    """Check an exported ONNX model against its checkpoint on ONNX Runtime and write the parity reports.

    providers: 'cpu' / 'cuda' (or full provider names); CPU always runs; None means CPU plus CUDA when a
    CUDA session really gets CUDAExecutionProvider. explicit_providers: the user named the providers
    (``--providers``): one that cannot run raises ProviderUnavailableError instead of a 'not run' line.
    atol / rtol override the precision's TOLERANCES entry (the precision is the model's
    ``lora_export.precision`` metadata, fp32 when absent). An fp16 model is run on CUDA only: CPU is reported
    as not run (FP16_CPU_REASON), CUDA is always tried, and an explicit CPU-only request is a ParityInputError.
    report_dir defaults to ``<model stem>_parity/`` beside the model. progress: True for a tqdm bar on stderr,
    or a callback(done, total, label) per case. precision_models: {precision: .onnx path} of builds of the
    same export (e.g. fp32 / fp16 / int8) for the report's precision table, measured by
    ``lora_export.edge.compare_precisions`` with ``latency_runs`` timed runs.

    Returns the ParityResult (``status`` 'passed' / 'failed' / 'not run' when no provider could run the model,
    ``summary``, ``report_files``); raises ParityInputError for inputs that cannot be validated (CLI exit 2).
    """
    if generate_bytes < 1 or latency_runs < 1:
        raise ParityInputError(f"generate_bytes and latency_runs must be >= 1, got {generate_bytes}, {latency_runs}")
    model_path, checkpoint_path = Path(model_path), Path(checkpoint_path)
    adapter_path = Path(adapter_path) if adapter_path is not None else None
    try:
        proto = load_onnx(model_path)
        payload = read_checkpoint(checkpoint_path)
    except (ExportError, CheckpointError) as err:
        raise ParityInputError(str(err)) from None
    metadata = read_metadata(proto)
    notes = check_model_matches(proto, metadata, payload, model_path, checkpoint_path)
    form = metadata["form"]
    precision = metadata.get("precision", "fp32")
    tolerance = resolve_tolerance(precision, atol, rtol)
    tensors = None
    if adapter_path is not None:
        tensors, adapter_notes = load_adapter_for(adapter_path, proto, metadata)
        notes += adapter_notes
    requested = normalize_providers(providers)
    if precision == "fp16":
        if explicit_providers and requested == ["cpu"]:
            raise ParityInputError(f"fp16 models run on CUDA: {FP16_CPU_REASON}; ask for cuda, not cpu only")
        requested = ["cpu", "cuda"]  # CPU is reported as not run; CUDA is where fp16 is measured
    report_dir = Path(report_dir) if report_dir is not None else model_path.with_name(f"{model_path.stem}_parity")
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ParityInputError(f"{report_dir}: cannot create the report directory: {err.strerror or err}") from None

    sessions, statuses = {}, []
    for provider in requested:
        if provider == "cpu" and precision == "fp16":
            statuses.append(ProviderStatus("cpu", PROVIDERS["cpu"], False, [], FP16_CPU_REASON))
            continue
        session, status = open_session(model_path, provider)
        if not status.ran and explicit_providers:
            raise ProviderUnavailableError(f"{status.name} was requested but cannot run: {status.reason}")
        statuses.append(status)
        if session is not None:
            sessions[status.name] = session

    precisions = None
    if precision_models:
        from .edge import EdgeExportError, compare_precisions  # edge imports this module

        try:
            precisions = compare_precisions(checkpoint_path, precision_models, adapter_path=adapter_path,
                                            runs=latency_runs)
        except EdgeExportError as err:
            raise ParityInputError(str(err)) from None

    model = build_model(payload, checkpoint_path)
    if form == "merged":
        merge_lora(model)
    variants = _variants(form, adapter_path, tensors)
    cases = parity_cases(model.config, seed)
    rng = np.random.default_rng(seed + 1)
    prompt = generation_prompt(min(PROMPT_BYTES, model.config.max_seq_len), rng)
    latency_seq = min(LATENCY_MAX_SEQ, model.config.max_seq_len)
    latency_ids = rng.integers(0, VOCAB_SIZE, size=(1, latency_seq), dtype=np.int64)
    latency_mask = np.ones_like(latency_ids)

    comparisons, generations, latencies = [], [], []
    histograms = {name: np.zeros(len(ERROR_HISTOGRAM_EDGES) - 1, np.int64) for name in sessions}
    total = len(variants) * len(sessions) * len(cases)
    report_progress, close_progress = _progress_callback(progress, total)
    try:
        for variant in variants if sessions else []:  # no provider ran: nothing to compare or time
            if form == "adapters":
                attach_adapter(model, variant.tensors)
            references = [_reference(model, case.input_ids, case.attention_mask) for case in cases]
            step = functools.partial(_reference, model, latency_ids, latency_mask)
            latencies.append(Latency(variant.name, "PyTorch eager (CPU)", 1, latency_seq, LATENCY_WARMUP,
                                     latency_runs, *percentiles_ms(step, LATENCY_WARMUP, latency_runs)))
            for name, session in sessions.items():
                for case, reference in zip(cases, references, strict=True):
                    got = _run(session, variant, case.input_ids, case.attention_mask)
                    metrics, counts = compare_logits(got, reference, case.input_ids, case.attention_mask,
                                                     tolerance)
                    failures = judge(metrics, tolerance)
                    comparisons.append(Comparison(variant.name, name, case.name, OUTPUT_NAMES[0], metrics,
                                                  not failures, failures))
                    histograms[name] += counts
                    report_progress(len(comparisons), f"{variant.name}/{name}/{case.name}")
                ref_bytes, onnx_bytes = greedy_generation(session, variant, model, prompt, generate_bytes)
                mismatch = np.flatnonzero(ref_bytes != onnx_bytes)
                generations.append(Generation(variant.name, name, _show_bytes(prompt[0]), _show_bytes(ref_bytes),
                                              _show_bytes(onnx_bytes), not mismatch.size,
                                              int(mismatch[0]) if mismatch.size else None))
                step = functools.partial(_run, session, variant, latency_ids, latency_mask)
                latencies.append(Latency(variant.name, f"ORT {name}", 1, latency_seq, LATENCY_WARMUP, latency_runs,
                                         *percentiles_ms(step, LATENCY_WARMUP, latency_runs)))
    finally:
        close_progress()

    failures = [f"case '{c.case}', output '{c.output}' (variant {c.variant}, {c.provider}): {reason}"
                for c in comparisons for reason in c.failures]
    failures += [f"greedy generation differs (variant {g.variant}, {g.provider}) from generated byte "
                 f"{g.first_mismatch}: torch '{g.reference}' vs onnx '{g.onnx}'"
                 for g in generations if not g.identical]
    failures += [f"precision {row['precision']} ({row['provider']}): {reason}"
                 for row in precisions or [] for reason in row["failures"]]
    failing = [c for c in comparisons if not c.passed]
    worst = max(failing, key=lambda c: (not c.metrics.finite, c.metrics.tolerance_used or 0.0,
                                        -c.metrics.top1_agreement), default=None)
    verdict = "not run" if not sessions else "failed" if failures else "passed"
    result = ParityResult(
        status=verdict, summary=_summary(verdict, comparisons, worst, failures, statuses, tolerance),
        model_path=model_path, checkpoint_path=checkpoint_path, adapter_path=adapter_path, form=form,
        precision=precision, tolerance=tolerance, pass_rule=pass_rule(tolerance, generate_bytes), seed=seed,
        model_metadata=metadata, providers=statuses, variants=[v.name for v in variants], cases=cases,
        comparisons=comparisons, generations=generations, latencies=latencies, failures=failures, worst=worst,
        notes=notes, error_histograms=histograms,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), precisions=precisions,
        report_dir=report_dir,
    )
    result.report_files = write_reports(result, report_dir)
    return result
