"""Parity validation: does an exported ONNX model compute what its PyTorch checkpoint computes?

``validate(model.onnx, model.pt)`` rebuilds the reference from the checkpoint in the same form as the export
(merged: base + merged LoRA; adapter form: the base alone and, given an adapter file, base + that adapter),
runs seeded cases on ONNX Runtime's CPU provider (and CUDA when asked for or present), and compares
``logits`` [batch, seq, 256] at the real (attention_mask = 1) positions of the seeded cases of
``lora_export.parity.cases`` with the metrics and verdict of ``lora_export.parity.metrics``, and greedily generates
bytes from a held-out prompt on both (re-running the graph on the growing sequence): the bytes must be identical.
An int8 / int4 model is judged by the rule of the export's precision table wherever it is judged: top-1 agreement
and eval loss on the held-out prose of ``precisions.heldout_case``; its other cases and greedy bytes are reported,
not judged.

The model and adapter must come from the checkpoint (``lora_export.parity.lineage``). What ran is read from each
session (``lora_export.parity.sessions``); a provider that did not run is ``not run: <reason>``, an error when the
user asked for it explicitly. fp16 models (``lora_export.precision`` metadata) run on every provider that can open
them (ONNX Runtime's CPU provider runs the fp16 graph, casting where it lacks float16 kernels), held to fp16's limit
scaled by the logits (``Tolerance.deviation``). When no provider ran, the result's ``status`` is ``'not run'``:
neither passed nor failed. Given the edge builds of the model (``precision_models``), the result also carries
the precision table across fp32 / fp16 / int8 (``lora_export.parity.precisions.measure_builds``).

Memory: no two copies of the weights at once. The graph is read without its weights; PyTorch computes every
reference first (each case's logits, the greedy bytes, its latency, the precision table's held-out logits: small
arrays), case by case; the checkpoint's tensors are dropped once the model is built and the model is freed before
the first ONNX Runtime session opens; then one session at a time (per provider, then per edge build), each closed
before the next opens. How many cases, how long and in how many rows follows the model's size
(``cases.case_plan``), stated in the result's ``case_plan`` and, when smaller than the full plan, in its notes.

validate() writes no file: it returns a ParityResult, whose reports ``lora_export.report.render.write_reports``
writes (``lora_export.pipeline.validate_and_report`` does both, as the command line does).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..errors import ParityInputError, ProviderUnavailableError
from ..export.adapters import activate_adapters, attach_adapter, model_version_from_fingerprint
from ..export.tracing import OUTPUT_NAMES
from ..layout import Form
from ..model.checkpoint import build_model
from ..model.layers import merge_lora
from ..model.transformer import VOCAB_SIZE, LoRATransformerLM, ModelConfig
from ..progress import Progress, as_progress
from .cases import FULL, Case, CasePlan, case_plan, generation_prompt, parity_cases, show_bytes
from .lineage import adapter_lineage
from .metrics import (
    ERROR_HISTOGRAM_EDGES,
    LATENCY_MAX_SEQ,
    LATENCY_RUNS,
    LATENCY_WARMUP,
    Tolerance,
    compare_logits,
    judge,
    percentiles_ms,
)
from .mixed import MIXED, MixedBatch, base_feeds
from .precisions import HELDOUT_CASE, Builds, check_builds, heldout_case, load_builds, measure_builds
from .results import Comparison, Generation, Latency, ParityResult
from .sessions import ProviderStatus, open_session, requested_providers
from .subject import Subject, given_adapter, read_subject, validation_text
from .validate_decoder import validate_decoder
from .verdict import conclude, counted, pass_rule, scoring_summary

GENERATE_BYTES = 24
PROMPT_BYTES = 16
ORT_FORMAT_ID = b"ORTM"  # the flatbuffer file identifier of an ORT-format model, at bytes 4..8
PYTORCH = "PyTorch eager (CPU)"


@dataclass
class _Variant:
    """A way to run the model: its name, the adapter tensors of the reference, the ORT run options; a slots-form
    graph's variants feed adapter_ids (``slots``), the mixed batch its pack (``mixed``)."""

    name: str
    tensors: dict[str, np.ndarray] | None
    run_options: ort.RunOptions | None
    adapter: ort.LoraAdapter | None = None  # kept alive while run_options refers to it
    slots: bool = False
    mixed: MixedBatch | None = None

    def lora_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """What a run of ``batch`` rows feeds besides input_ids and attention_mask: a slots-form graph's
        adapter_ids (all 0 for the base; the mixed batch's slots and pack)."""
        if self.mixed is not None:
            return self.mixed.ort_feeds(batch)
        return base_feeds(batch) if self.slots else {}

    def torch_logits(self, model: LoRATransformerLM, input_ids: np.ndarray, attention_mask: np.ndarray
                     ) -> np.ndarray:
        """The PyTorch reference's logits [B, N, 256] (``model`` in the variant's form; the mixed batch: each row
        alone with its slot's adapter)."""
        if self.mixed is not None:
            return self.mixed.reference(model, input_ids, attention_mask)
        return _reference(model, input_ids, attention_mask)


@dataclass
class _Inputs:
    """The seeded inputs every variant and provider runs, as the case plan sizes them (``plan``: also the bytes to
    generate and the latency's warm-up and timed runs): the cases, the generation prompt [1, P] and the latency
    input [1, N], for a checkpoint of ``max_seq_len``."""

    plan: CasePlan
    max_seq_len: int
    cases: list[Case]
    prompt: np.ndarray
    latency_ids: np.ndarray


@dataclass
class _Reference:
    """What PyTorch computed for one variant, kept once its model is freed: the logits [B, N, 256] of every case,
    the greedy bytes [G] after the prompt and its latency."""

    logits: list[np.ndarray]
    greedy: np.ndarray
    latency: Latency


@dataclass
class _Measured:
    """What the runs of a scoring graph measured, filled in provider by provider."""

    comparisons: list[Comparison] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)
    latencies: list[Latency] = field(default_factory=list)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)  # '<variant> | <provider>' -> counts

    def by_variant(self, variants: list[_Variant]) -> _Measured:
        """The same measurements variant by variant (providers in the order they ran, PyTorch's latency first), as
        the reports list them."""
        order = {variant.name: index for index, variant in enumerate(variants)}
        latencies = sorted(self.latencies, key=lambda t: (order[t.variant], t.backend != PYTORCH))
        histograms = dict(sorted(self.histograms.items(), key=lambda item: order[item[0].split(" | ")[0]]))
        return _Measured(sorted(self.comparisons, key=lambda c: order[c.variant]),
                         sorted(self.generations, key=lambda g: order[g.variant]), latencies, histograms)


# --------------------------------------------------------------------------- arguments and data


def _check_arguments(model_path: Path, generate_bytes: int, latency_runs: int) -> None:
    """Refuse (ParityInputError, one line) counts below 1, and an ORT-format model (``--ort-format``), which is not
    ONNX, saying how to validate it."""
    if generate_bytes < 1 or latency_runs < 1:
        raise ParityInputError(f"generate_bytes and latency_runs must be >= 1, got {generate_bytes}, {latency_runs}")
    is_ort = model_path.suffix == ".ort"
    if not is_ort and model_path.is_file():
        with open(model_path, "rb") as file:
            is_ort = file.read(8)[4:] == ORT_FORMAT_ID
    if is_ort:
        raise ParityInputError(f"{model_path}: an ORT-format model, not ONNX: validate the .onnx it was converted "
                               f"from (lora-export validate {model_path.with_suffix('.onnx')} --checkpoint ...); the "
                               "export checks each .ort against its .onnx")


def shape_label(case: Case) -> str:
    """'<case>: batch B x N tokens', for progress lines."""
    batch, seq = case.input_ids.shape
    return f"{case.name}: batch {batch} x {seq} tokens"


def _plan_line(inputs: _Inputs, variants: list[_Variant]) -> str:
    """The work of a check in a few words, for its first progress line."""
    cases, plan = inputs.cases, inputs.plan
    return (f"{counted(len(cases), 'case')} per variant ({', '.join(v.name for v in variants)}) up to batch "
            f"{max(c.input_ids.shape[0] for c in cases)} x {max(c.input_ids.shape[1] for c in cases)} tokens, "
            f"{plan.generate_bytes} greedy bytes, {plan.latency_runs} timed runs; case plan '{plan.tier}' for "
            f"{plan.parameters:,} parameters")


# --------------------------------------------------------------------------- runs


def _run(session: ort.InferenceSession, variant: _Variant, input_ids: np.ndarray,
         attention_mask: np.ndarray) -> np.ndarray:
    """logits [B, N, 256] from ONNX Runtime, with the variant's adapter active (or its slots fed)."""
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **variant.lora_feeds(len(input_ids))}
    return session.run(OUTPUT_NAMES, feeds, variant.run_options)[0]


def _reference(model: LoRATransformerLM, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """logits [B, N, 256] from the PyTorch reference (fp32, eval)."""
    with torch.no_grad():
        return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()


def greedy_reference(model: LoRATransformerLM, prompt: np.ndarray, new_bytes: int) -> np.ndarray:
    """PyTorch's greedy bytes [G] after prompt [1, P] int64: ``new_bytes``, or as many as fit in max_seq_len after
    the prompt (learned positions: nothing is cropped)."""
    new_bytes = min(new_bytes, model.config.max_seq_len - prompt.shape[1])
    with torch.no_grad():
        return model.generate(torch.from_numpy(prompt), new_bytes, greedy=True)[0, prompt.shape[1]:].numpy()


def greedy_generation(session: ort.InferenceSession, variant: _Variant, prompt: np.ndarray, reference: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(PyTorch bytes, ONNX bytes): ONNX Runtime greedily generates as many bytes from prompt [1, P] int64 as
    PyTorch's ``reference`` [G] (``greedy_reference``) holds, re-running the whole graph on the growing sequence (no
    KV cache)."""
    ids = prompt
    for _ in range(len(reference)):
        next_id = _run(session, variant, ids, np.ones_like(ids))[:, -1].argmax(axis=-1)
        ids = np.concatenate([ids, next_id[:, None].astype(np.int64)], axis=1)
    return reference, ids[0, prompt.shape[1]:]


def _variants(form: Form, adapter_path: Path | None, tensors: dict[str, np.ndarray] | None,
              mixed: MixedBatch | None) -> list[_Variant]:
    """merged -> [merged]; adapters -> [base] or [base, adapter] when an adapter file is given; slots -> [base,
    mixed batch]."""
    if form is Form.MERGED:
        return [_Variant(Form.MERGED.value, None, None)]
    if form is Form.SLOTS:
        return [_Variant("base", None, None, slots=True), _Variant(MIXED, None, None, slots=True, mixed=mixed)]
    variants = [_Variant("base", None, None)]
    if adapter_path is not None:
        run_options, (adapter,) = activate_adapters(adapter_path)
        variants.append(_Variant("adapter", tensors, run_options, adapter))
    return variants


# --------------------------------------------------------------------------- the steps of validate()


def _reference_model(subject: Subject, tensors: dict[str, np.ndarray] | None
                     ) -> tuple[LoRATransformerLM, list[str]]:
    """(the PyTorch reference in the export's form, the lineage failures of the adapter given): the adapter file
    must hold the checkpoint's trained weights, not just run. The subject lets go of the checkpoint's tensors."""
    model = build_model(subject.payload, subject.checkpoint_path)
    subject.release_weights()
    failures = []
    if tensors is not None:
        failures, notes = adapter_lineage(subject.adapter_path, tensors, model, subject.checkpoint_path)
        subject.notes += notes
    if subject.form is Form.MERGED:
        merge_lora(model)
    return model, failures


def _seeded_inputs(subject: Subject, seed: int, text: bytes | None, source: str, generate_bytes: int,
                   latency_runs: int) -> _Inputs:
    """The cases of the model's case plan (``cases.case_plan``: int8 / int4 with the held-out prose they are judged
    on), the generation prompt and the latency input, seeded by ``seed``, for the checkpoint's config: built
    before anything runs, so a validation text too short for the cases is refused (ParityInputError) before a
    session opens or an edge build is timed. Notes where the user's text is used, and a plan smaller than the
    full one."""
    config = ModelConfig.from_dict(subject.payload["config"])
    plan = case_plan(subject.parameters, config, generate_bytes, latency_runs, LATENCY_WARMUP)
    try:
        cases = parity_cases(config, seed, text, source, plan)
    except ValueError as err:  # the text is the user's --data: a bad input, not a bug
        raise ParityInputError(str(err)) from None
    if text is not None:
        subject.notes.append(f"real-text cases and the generation prompt come from {source} ({len(text):,} bytes), "
                             "not the built-in held-out prose")
    if plan.tier != FULL:
        subject.notes.append(f"case plan '{plan.tier}': {plan.reason}")
    if not subject.tolerance.elementwise:
        cases.append(heldout_case(config.max_seq_len, plan.eval_windows))
    rng = np.random.default_rng(seed + 1)
    # the prompt leaves room for the generated bytes: learned positions end at max_seq_len, nothing is cropped
    prompt = generation_prompt(max(1, min(PROMPT_BYTES, config.max_seq_len - plan.generate_bytes)), rng, text)
    latency_ids = rng.integers(0, VOCAB_SIZE, size=(1, min(LATENCY_MAX_SEQ, config.max_seq_len)), dtype=np.int64)
    return _Inputs(plan, config.max_seq_len, cases, prompt, latency_ids)


def _latency(variant: str, backend: str, step: Callable[[], object], inputs: _Inputs) -> Latency:
    """p50 / p90 of ``step``, one forward pass of the latency input on ``backend``."""
    warmup, runs = inputs.plan.latency_warmup, inputs.plan.latency_runs
    return Latency(variant, backend, 1, inputs.latency_ids.shape[1], warmup, runs,
                   *percentiles_ms(step, warmup, runs))


def _variant_reference(model: LoRATransformerLM, variant: _Variant, inputs: _Inputs, progress: Progress,
                       done: int, total: int) -> _Reference:
    """PyTorch on one variant (``model`` already in its form): each case's logits (progress counted from
    ``done`` of ``total``), the greedy bytes and the latency."""
    logits = []
    for case in inputs.cases:
        logits.append(variant.torch_logits(model, case.input_ids, case.attention_mask))
        progress.advance(done + len(logits), total, f"PyTorch {variant.name}/{shape_label(case)}")
    if variant.mixed is not None:  # greedy bytes and latency: one row, in its slot
        variant.mixed.attach_single_row(model)
    greedy = greedy_reference(model, inputs.prompt, inputs.plan.generate_bytes)
    step = functools.partial(_reference, model, inputs.latency_ids, np.ones_like(inputs.latency_ids))
    return _Reference(logits, greedy, _latency(variant.name, PYTORCH, step, inputs))


def _torch_references(subject: Subject, tensors: dict[str, np.ndarray] | None, variants: list[_Variant],
                      inputs: _Inputs, heldout: Case | None, progress: Progress
                      ) -> tuple[dict[str, _Reference], list[str], np.ndarray | None]:
    """({variant: its PyTorch reference}, the adapter's lineage failures, the logits of ``heldout`` (the precision
    table's held-out prose, None for none) on the last variant): every PyTorch result the check needs, case by case.
    The model is built here and nothing returned refers to it: it is freed on return, before any ONNX Runtime
    session opens, so that a big model's weights are never held twice."""
    model, failures = _reference_model(subject, tensors)
    total = len(variants) * len(inputs.cases)
    references: dict[str, _Reference] = {}
    try:
        for variant in variants:
            if variant.mixed is not None:
                variant.mixed.prepare(model)
                subject.notes.append(variant.mixed.note())
            if subject.form is not Form.MERGED:
                attach_adapter(model, variant.tensors)
            references[variant.name] = _variant_reference(model, variant, inputs, progress,
                                                          len(references) * len(inputs.cases), total)
        heldout_logits = None if heldout is None else _reference(model, heldout.input_ids, heldout.attention_mask)
    finally:
        progress.close()
    return references, failures, heldout_logits


def _compare_cases(session: ort.InferenceSession, provider: str, variant: _Variant, references: list[np.ndarray],
                   inputs: _Inputs, tolerance: Tolerance, measured: _Measured, progress: Progress,
                   done: int, total: int) -> None:
    """Every case on ``session`` against its PyTorch reference logits, judged (an int8 / int4 model: judged on the
    held-out prose alone, the other cases held to no NaN or Inf) and counted into the error histogram; progress
    counted from ``done`` of ``total``."""
    reported_only = replace(tolerance, top1_min=0.0, loss_delta_max=None)
    histogram = measured.histograms.setdefault(f"{variant.name} | {provider}",
                                               np.zeros(len(ERROR_HISTOGRAM_EDGES) - 1, np.int64))
    for index, (case, reference) in enumerate(zip(inputs.cases, references, strict=True)):
        got = _run(session, variant, case.input_ids, case.attention_mask)
        metrics, counts = compare_logits(got, reference, case.input_ids, case.attention_mask, tolerance)
        judged = tolerance.elementwise or case.name == HELDOUT_CASE
        failures = judge(metrics, tolerance if judged else reported_only)
        measured.comparisons.append(Comparison(variant.name, provider, case.name, OUTPUT_NAMES[0], metrics,
                                               not failures, failures, judged))
        histogram += counts
        progress.advance(done + index + 1, total, f"{variant.name}/{provider}/{shape_label(case)}")


def _generation(session: ort.InferenceSession, provider: str, variant: _Variant, reference: np.ndarray,
                inputs: _Inputs) -> Generation:
    """Greedy bytes from the prompt on ``session`` against PyTorch's ``reference``, and where they first differ."""
    ref_bytes, onnx_bytes = greedy_generation(session, variant, inputs.prompt, reference)
    mismatch = np.flatnonzero(ref_bytes != onnx_bytes)
    return Generation(variant.name, provider, show_bytes(inputs.prompt[0]), show_bytes(ref_bytes),
                      show_bytes(onnx_bytes), not mismatch.size, int(mismatch[0]) if mismatch.size else None)


def _measure_provider(model_path: Path, provider: str, explicit: bool, variants: list[_Variant],
                      references: dict[str, _Reference], inputs: _Inputs, tolerance: Tolerance, measured: _Measured,
                      progress: Progress) -> ProviderStatus:
    """One provider's status, and on its session (the only one open: it closes on return) every variant's cases,
    greedy generation and latency. One asked for explicitly that cannot run raises ProviderUnavailableError."""
    session, status = open_session(model_path, provider)
    if not status.ran and explicit:
        raise ProviderUnavailableError(f"{status.name} was requested but cannot run: {status.reason}")
    if session is None:
        return status
    progress.stage(f"ONNX Runtime on {status.name}: {counted(len(inputs.cases), 'case')} per variant")
    total = len(variants) * len(inputs.cases)
    latency_mask = np.ones_like(inputs.latency_ids)
    try:
        for index, variant in enumerate(variants):
            reference = references[variant.name]
            _compare_cases(session, status.name, variant, reference.logits, inputs, tolerance, measured, progress,
                           index * len(inputs.cases), total)
            measured.generations.append(_generation(session, status.name, variant, reference.greedy, inputs))
            step = functools.partial(_run, session, variant, inputs.latency_ids, latency_mask)
            measured.latencies.append(_latency(variant.name, f"ORT {status.name}", step, inputs))
    finally:
        progress.close()
    return status


def _measure(model_path: Path, providers: list[str], explicit: bool, variants: list[_Variant],
             references: dict[str, _Reference], inputs: _Inputs, tolerance: Tolerance, progress: Progress
             ) -> tuple[_Measured, list[ProviderStatus]]:
    """(what ONNX Runtime measured against the PyTorch ``references``, the status of every provider): one session
    at a time (``_measure_provider``). No provider ran: nothing compared, no latency, PyTorch's included."""
    measured = _Measured()
    statuses = [_measure_provider(model_path, provider, explicit, variants, references, inputs, tolerance, measured,
                                  progress) for provider in providers]
    if any(status.ran for status in statuses):
        measured.latencies += [references[variant.name].latency for variant in variants]
    return measured.by_variant(variants), statuses


def _failures(measured: _Measured, precisions: list[dict] | None, tolerance: Tolerance) -> list[str]:
    """Every failing check of a scoring graph in words: comparisons, greedy bytes (where judged), edge builds."""
    failures = [f"case '{c.case}', output '{c.output}' (variant {c.variant}, {c.provider}): {reason}"
                for c in measured.comparisons for reason in c.failures]
    failures += [f"greedy generation differs (variant {g.variant}, {g.provider}) from generated byte "
                 f"{g.first_mismatch}: torch '{g.reference}' vs onnx '{g.onnx}'"
                 for g in measured.generations if not g.identical and tolerance.exact_bytes]
    return failures + [f"precision {row['precision']} ({row['provider']}): {reason}"
                       for row in precisions or [] for reason in row["failures"]]


def _worst(comparisons: list[Comparison]) -> Comparison | None:
    """The most severe failing comparison; on a pass (named too) the judged comparison closest to its limit."""
    failing = [c for c in comparisons if not c.passed]
    return max(failing or [c for c in comparisons if c.judged],
               key=lambda c: (not c.metrics.finite, c.metrics.tolerance_used or 0.0, -c.metrics.top1_agreement),
               default=None)


def _precision_table(builds: Builds | None, heldout: Case | None, heldout_logits: np.ndarray | None,
                     adapter_path: Path | None, plan: CasePlan, progress: Progress) -> list[dict] | None:
    """The rows of the precision table (``precisions.measure_builds``) of the checked ``builds``, None without
    them: each build on ``heldout`` against PyTorch's ``heldout_logits``, one session at a time."""
    if builds is None:
        return None
    progress.stage(f"precision table: {', '.join(builds)} builds on {counted(len(heldout.input_ids), 'window')} of "
                   "held-out prose, one session at a time")
    return measure_builds(builds, heldout, heldout_logits, adapter_path, warmup=plan.latency_warmup,
                          runs=plan.latency_runs)


def _concluded(subject: Subject, inputs: _Inputs, variants: list[_Variant], measured: _Measured,
               statuses: list[ProviderStatus], precisions: list[dict] | None, lineage_failures: list[str],
               seed: int) -> ParityResult:
    """The ParityResult of a scoring graph's check (``verdict.conclude``), with its case plan."""
    failures = _failures(measured, precisions, subject.tolerance) + lineage_failures
    worst = _worst(measured.comparisons)
    plan = inputs.plan
    return conclude(
        subject, statuses, failures,
        lambda status: scoring_summary(status, measured.comparisons, worst, failures, statuses, subject.tolerance,
                                       precisions),
        pass_rule=pass_rule(subject.tolerance, plan.generate_bytes), seed=seed, variants=[v.name for v in variants],
        cases=inputs.cases, comparisons=measured.comparisons, generations=measured.generations,
        latencies=measured.latencies, worst=worst, error_histograms=measured.histograms, precisions=precisions,
        case_plan=plan.record(inputs.cases, generate_bytes=plan.generate_bytes, latency_runs=plan.latency_runs))


def validate(
    model_path: str | os.PathLike,
    checkpoint_path: str | os.PathLike,
    *,
    adapter_path: str | os.PathLike | None = None,
    providers: Sequence[str] | None = None,
    explicit_providers: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    progress: Progress | bool | Callable[[int, int, str], None] = False,
    generate_bytes: int = GENERATE_BYTES,
    latency_runs: int = LATENCY_RUNS,
    precision_models: Mapping[str, str | os.PathLike] | None = None,
    data: Sequence[str | os.PathLike] = (),
) -> ParityResult:
    """Check an exported ONNX model (or a genai decoder directory: ``validate_decoder``) against its checkpoint on
    ONNX Runtime; writes no file (reports: ``lora_export.pipeline.validate_and_report``).

    providers: 'cpu' / 'cuda' (or full provider names); CPU always runs; None means CPU plus CUDA when a CUDA
    session really gets CUDAExecutionProvider. explicit_providers: the user named them (``--providers``): one that
    cannot run raises ProviderUnavailableError instead of a 'not run' line. atol / rtol override the tolerance of
    the model's precision (its ``lora_export.precision`` metadata, fp32 when absent). progress: a Progress (stage
    lines, and each case counted with its shape, on PyTorch and then on each provider), True for a bar on stderr,
    or a callback(done, total, label). generate_bytes and latency_runs: as asked for a model of the full case plan,
    at most the plan's for a bigger one (``cases.case_plan``). precision_models: {precision: .onnx path} of builds
    of the same export (and form) for the precision table (``precisions.measure_builds``, the plan's held-out
    windows and timed runs). data: the user's text files or directories (as ``lora-train --data``) for the
    real-text cases and the generation prompt instead of the built-in held-out prose (named in the cases' source).

    Returns the ParityResult (``status`` 'passed' / 'failed' / 'not run' when no provider could run the model,
    ``summary``); raises a LoraExportError for inputs that cannot be validated (CLI exit 2)."""
    model_path, checkpoint_path = Path(model_path), Path(checkpoint_path)
    adapter_path = Path(adapter_path) if adapter_path is not None else None
    progress = as_progress(progress, "parity", unit="case", leave=False)
    _check_arguments(model_path, generate_bytes, latency_runs)
    if model_path.is_dir():
        return validate_decoder(model_path, checkpoint_path, adapter_path=adapter_path, providers=providers,
                                explicit_providers=explicit_providers, atol=atol, rtol=rtol, seed=seed, data=data,
                                progress=progress)
    _, text, source = validation_text(data)
    builds = None if not precision_models else load_builds(precision_models)  # graphs: before the checkpoint
    subject = read_subject(model_path, model_path, checkpoint_path, adapter_path, atol, rtol)
    inputs = _seeded_inputs(subject, seed, text, source, generate_bytes, latency_runs)
    wanted = requested_providers(providers, explicit_providers)
    tensors, pack = given_adapter(subject)
    if builds is not None:
        check_builds(builds, subject.payload, checkpoint_path, subject.form)
    heldout = None if builds is None else heldout_case(inputs.max_seq_len, inputs.plan.eval_windows)
    mixed = None if subject.form is not Form.SLOTS else MixedBatch(
        subject.proto, pack, tensors, model_version_from_fingerprint(subject.metadata["base_sha256"]), seed)
    variants = _variants(subject.form, adapter_path, tensors, mixed)
    progress.stage(f"PyTorch reference: {_plan_line(inputs, variants)}")
    references, lineage_failures, heldout_logits = _torch_references(subject, tensors, variants, inputs, heldout,
                                                                     progress)
    measured, statuses = _measure(model_path, wanted, explicit_providers, variants, references, inputs,
                                  subject.tolerance, progress)
    precisions = _precision_table(builds, heldout, heldout_logits, adapter_path, inputs.plan, progress)
    return _concluded(subject, inputs, variants, measured, statuses, precisions, lineage_failures, seed)
