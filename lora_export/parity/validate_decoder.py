"""Decode parity of a genai decoder directory (``lora-export --genai``): ``validate_decoder``, which ``validate()``
runs for a directory.

The decoder runs through onnxruntime-genai (``lora_export.parity.decode``) on each provider, in the adapter and slots
forms base, the adapter under test and base again on one loaded model (the slots form's adapter as slot 1 of a
pack), and every decoding step's logits are held against the PyTorch checkpoint; the result is concluded as a
scoring graph's is (``verdict.conclude``). The slots form also decodes a mixed batch on each provider genai ran on:
base and adapter rows side by side, on the decode prompt and on a shorter one (left-padded), in one ONNX Runtime run
per step (``genai.batch``); each row is held against PyTorch decoding that row alone with its adapter, as every
other run is (variant ``mixed batch row <i> (<variant>)``).

Memory: no two copies of the weights at once. PyTorch runs first (each variant's greedy bytes and the logits along
them), its model and the checkpoint's tensors are freed, then genai loads the decoder on one provider at a time,
freed before the next (and before the mixed batch's ONNX Runtime session, freed in turn). A run whose bytes drift
from PyTorch's (fp16, int8 near-ties) is judged along its own bytes: those logits come from the model built once
more after every genai model is freed. How many bytes are decoded follows the model's size (``cases.case_plan``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ParityInputError, ProviderUnavailableError, first_line
from ..export.adapters import attach_adapter
from ..export.ort_session import release_memory
from ..export.slots import ADAPTER_SUFFIX, pack_adapters, read_pack
from ..genai.batch import decode_batch
from ..genai.decoder import read_decoder_dir
from ..layout import ADAPTER_FILE, MODEL_FILE, Form
from ..model.checkpoint import build_model, read_checkpoint
from ..model.layers import merge_lora
from ..model.transformer import LoRATransformerLM, ModelConfig
from ..progress import SILENT, Progress
from .cases import FULL, case_plan, generation_prompt
from .decode import (
    PACK,
    GenaiDecode,
    decode_reference,
    genai_decode,
    judge_decode,
    load_decoder,
    teacher_forced,
)
from .lineage import adapter_lineage, load_adapter_for
from .metrics import LATENCY_RUNS, LATENCY_WARMUP
from .results import DecodeRun, ParityResult
from .sessions import PROVIDERS, ProviderStatus, normalize_providers
from .subject import Subject, read_subject, validation_text
from .verdict import conclude, decode_pass_rule, decode_summary

Adapters = dict[str, tuple[Path, dict]]  # {name: (.onnx_adapter path, its graph-layout tensors)}
Reference = tuple[list[int], np.ndarray]  # PyTorch's greedy bytes and the teacher-forced logits along them
RowKey = tuple[str | None, int]  # a decoded row: (its variant key, its prompt's length)


@dataclass
class _Decoded:
    """One decode to judge: the provider it ran on, its variant key (None: the base), its prompt [P], what it
    generated, and its row in the slots form's mixed batch (None: a run of its own through genai)."""

    provider: str
    key: str | None
    prompt: np.ndarray
    run: GenaiDecode
    row: int | None = None


def _adapter_under_test(subject: Subject, model_dir: Path) -> Adapters:
    """{name: (path, tensors)} of the adapter under test: the adapter given, else the directory's own
    model.onnx_adapter in the adapter and slots forms; none in the merged form. Read and held against the graph's
    LoRA inputs (ParityInputError, AdapterError); its lineage needs the model (``_references``)."""
    own = model_dir / ADAPTER_FILE
    given = subject.adapter_path
    under_test = given if given is not None else own if subject.form is not Form.MERGED and own.is_file() else None
    if under_test is None:
        return {}
    tensors, notes = load_adapter_for(under_test, subject.proto, subject.metadata)
    subject.notes += notes
    return {"trained" if given is None else given.stem: (under_test, tensors)}


def _decode_prompt(config: ModelConfig, seed: int, text: bytes | None, source: str, notes: list[str]) -> np.ndarray:
    """The seeded decode prompt [P]: past the local window, half the context at most, so the run decodes the rest;
    from the user's text when given (noted), else the held-out prose."""
    length = min(config.local_attn_window_size + 8, config.max_seq_len // 2)
    if text is not None and len(text) <= length:
        raise ParityInputError(f"the validation text ({source}) has {len(text)} bytes; the decode prompt needs "
                               f"more than {length}")
    if text is not None:
        notes.append(f"the decode prompt comes from {source} ({len(text):,} bytes), not the built-in held-out prose")
    return generation_prompt(length, np.random.default_rng(seed + 1), text)[0]


def _mixed_rows(form: Form, adapters: Adapters, prompt: np.ndarray) -> list[tuple[str | None, np.ndarray]]:
    """The slots form's mixed batch (none in the other forms): every variant (base, each adapter) on the decode
    prompt and on its first two thirds, neighbouring rows on different adapters, so one batch holds each adapter
    and left-padded rows."""
    if form is not Form.SLOTS:
        return []
    short = prompt[: max(1, 2 * len(prompt) // 3)]
    return [(key, row_prompt) for row_prompt in (prompt, short) for key in (None, *adapters)]


def _variant(key: str | None, form: Form, row: int | None = None) -> str:
    """A run's variant: 'merged', 'base' (key None) or 'adapter <name>'; a mixed-batch row's says so."""
    variant = Form.MERGED.value if form is Form.MERGED else "base" if key is None else f"adapter {key}"
    return variant if row is None else f"mixed batch row {row} ({variant})"


def _reference_model(subject: Subject, payload: dict) -> LoRATransformerLM:
    """The checkpoint's model (``payload``) in the decoder's form: LoRA merged, or unmerged for adapters to attach."""
    model = build_model(payload, subject.checkpoint_path)
    if subject.form is Form.MERGED:
        merge_lora(model)
    return model


def _attach(model: LoRATransformerLM, form: Form, adapters: Adapters, key: str | None) -> None:
    """In the adapter and slots forms, run ``model`` as variant ``key``: the base with that adapter (None: none)
    attached."""
    if form is not Form.MERGED:
        attach_adapter(model, None if key is None else adapters[key][1])


def _references(subject: Subject, adapters: Adapters, rows: list[tuple[str | None, np.ndarray]], new_bytes: int,
                progress: Progress) -> tuple[dict[RowKey, Reference], list[str]]:
    """({(variant key, prompt length): PyTorch's greedy bytes and the logits along them}, the adapter's lineage
    failures): every PyTorch result decode parity needs, each row (variant, prompt) decoded alone. The model is
    built here (the subject lets go of the checkpoint's tensors) and freed on return, before genai loads the
    decoder."""
    model = _reference_model(subject, subject.payload)
    subject.release_weights()
    failures = []
    for path, tensors in adapters.values():  # the file must hold the checkpoint's trained LoRA, not just run
        found, notes = adapter_lineage(path, tensors, model, subject.checkpoint_path)
        failures += found
        subject.notes += notes
    references: dict[RowKey, Reference] = {}
    for key, prompt in rows:
        _attach(model, subject.form, adapters, key)
        references[(key, len(prompt))] = decode_reference(model, prompt, new_bytes)
        progress.advance(len(references), len(rows), f"PyTorch {_variant(key, subject.form)}: {new_bytes} bytes "
                         f"after a {len(prompt)}-byte prompt")
    progress.close()
    return references, failures


def _genai_provider(subject: Subject, adapters: Adapters, pack: Path | None, prompt: np.ndarray, new_bytes: int,
                    provider: str, explicit: bool, progress: Progress) -> tuple[ProviderStatus, list[_Decoded]]:
    """(the provider's status, its runs): the decoder loaded on ``provider`` (the only genai model alive: freed on
    return), then every variant decoded (the adapter and slots forms: base, each adapter, base again; the slots
    form's adapters as the slots of ``pack``). CPU must load it, and so must one asked for explicitly
    (ProviderUnavailableError); any other that cannot is 'not run'. Only loading it is the provider's to fail: an
    error past that propagates."""
    name = PROVIDERS[provider]
    release_memory()
    try:
        og_model, loaded = load_decoder(subject.model_path, subject.form, adapters, provider, pack)
    except Exception as err:  # genai raises RuntimeError / OrtException when a provider cannot load
        if provider == "cpu" or explicit:
            raise ProviderUnavailableError(f"{name} cannot run {subject.model_path} through onnxruntime-genai: "
                                           f"{first_line(err)}") from None
        return ProviderStatus(provider, name, False, [], first_line(err)), []
    keys = [None] if subject.form is Form.MERGED else [None, *adapters, None]
    slots = {key: slot for slot, key in enumerate([None, *adapters])} if subject.form is Form.SLOTS else {}
    runs = []
    for key in keys:
        run = genai_decode(og_model, loaded, PACK if slots and pack else key, prompt, new_bytes, slots.get(key))
        runs.append(_Decoded(provider, key, prompt, run))
        progress.advance(len(runs), len(keys), f"genai {provider} {_variant(key, subject.form)}: {new_bytes} bytes")
    progress.close()
    return ProviderStatus(provider, name, True, [f"onnxruntime-genai {provider}"]), runs


def _mixed_batch(subject: Subject, adapters: Adapters, pack: Path | None, rows: list[tuple[str | None, np.ndarray]],
                 new_bytes: int, provider: str, progress: Progress) -> list[_Decoded]:
    """The slots form's mixed batch decoded in one run per step (``genai.batch.decode_batch``: ONNX Runtime, each
    row its own slot of ``pack``, the rows left-padded) on ``provider``, each row's step logits kept."""
    release_memory()
    slots = {key: slot for slot, key in enumerate([None, *adapters])}
    progress.stage(f"mixed batch on {provider} (ONNX Runtime): {len(rows)} rows, one run per step")
    batch = decode_batch(subject.model_path, [bytes(row_prompt.astype(np.uint8)) for _, row_prompt in rows],
                         [slots[key] for key, _ in rows], None if pack is None else read_pack(pack),
                         max_new_bytes=new_bytes, device=provider, keep_logits=True)
    return [_Decoded(provider, key, row_prompt, GenaiDecode(generated, batch.logits[row], batch.step_ms), row)
            for row, ((key, row_prompt), generated) in enumerate(zip(rows, batch.generated, strict=True))]


def _forced(subject: Subject, adapters: Adapters, references: dict[RowKey, Reference], outputs: list[_Decoded]
            ) -> list[np.ndarray]:
    """The teacher-forced logits along each run's own bytes: PyTorch's reference where the run generated its
    bytes; for a run that drifted, from the model built once more (every genai model freed by now) and freed on
    return."""
    forced = [references[(out.key, len(out.prompt))][1] for out in outputs]
    drifted = [index for index, out in enumerate(outputs)
               if out.run.generated != references[(out.key, len(out.prompt))][0]]
    if drifted:
        model = _reference_model(subject, read_checkpoint(subject.checkpoint_path))
        for index in drifted:
            out = outputs[index]
            _attach(model, subject.form, adapters, out.key)
            forced[index] = teacher_forced(model, out.prompt, out.run.generated)
    return forced


def _decode_runs(subject: Subject, adapters: Adapters, prompt: np.ndarray, new_bytes: int, source: str,
                 providers: Sequence[str] | None, explicit: bool, progress: Progress
                 ) -> tuple[list[DecodeRun], list[ProviderStatus], list[str]]:
    """(decode parity runs, provider statuses, failures: each run's, named by variant, runtime and provider, then
    the adapter's lineage failures): PyTorch first, then on each provider genai and, in the slots form, the mixed
    batch, then every run judged along its own bytes."""
    mixed = _mixed_rows(subject.form, adapters, prompt)
    alone = [(key, prompt) for key in (None, *adapters)]
    references, lineage_failures = _references(subject, adapters, alone + [
        (key, row_prompt) for key, row_prompt in mixed if len(row_prompt) != len(prompt)], new_bytes, progress)
    outputs, statuses = [], []
    with tempfile.TemporaryDirectory(prefix="lora-export-pack.") as scratch:
        pack = _pack(subject, adapters, Path(scratch))
        for provider in normalize_providers(providers):
            status, runs = _genai_provider(subject, adapters, pack, prompt, new_bytes, provider, explicit, progress)
            statuses.append(status)
            outputs += runs
            if status.ran and mixed:
                outputs += _mixed_batch(subject, adapters, pack, mixed, new_bytes, provider, progress)
    forced = _forced(subject, adapters, references, outputs)
    runs = [judge_decode(out.run, references[(out.key, len(out.prompt))][0], logits, out.prompt, subject.tolerance,
                         _variant(out.key, subject.form, out.row), out.provider, source)
            for out, logits in zip(outputs, forced, strict=True)]
    failures = [f"decode ({run.variant}, {'genai' if out.row is None else 'ONNX Runtime'} {run.device}): {reason}"
                for run, out in zip(runs, outputs, strict=True) for reason in run.failures]
    return runs, statuses, failures + lineage_failures


def _pack(subject: Subject, adapters: Adapters, scratch: Path) -> Path | None:
    """The slots form's adapters under test packed into ``scratch`` (slot i + 1 the i-th; ``export.slots``), as
    genai feeds them (a pack is an adapter file) and the mixed batch reads them; None in the other forms or
    without adapters."""
    if subject.form is not Form.SLOTS or not adapters:
        return None
    return pack_adapters([path for path, _ in adapters.values()], scratch / f"{PACK}{ADAPTER_SUFFIX}", list(adapters),
                         model=subject.model_path / MODEL_FILE)


def validate_decoder(
    model_dir: Path,
    checkpoint_path: Path,
    *,
    adapter_path: Path | None = None,
    providers: Sequence[str] | None = None,
    explicit_providers: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    data: Sequence[str | os.PathLike] = (),
    progress: Progress = SILENT,
) -> ParityResult:
    """validate() for a genai decoder directory (``lora-export --genai``): decode parity through onnxruntime-genai
    (``lora_export.parity.decode``) on each provider; in the adapter and slots forms base, the adapter under test
    and base again on one loaded model, and in the slots form a mixed batch (see the module docstring). The adapter
    under test is ``adapter_path`` when given, else the directory's own model.onnx_adapter; it must hold the
    checkpoint's trained LoRA (``lineage.adapter_lineage``), and failures name that file. The directory is read as
    data first (``decoder.read_decoder_dir``). data: as validate()'s, for the decode prompt (recorded with its
    source in each run). progress: stage lines and each run counted. The run decodes to the end of the context, or
    as far as the model's case plan allows (``cases.case_plan``, recorded in the result's ``case_plan``). Writes no
    file, as validate()."""
    read_decoder_dir(model_dir)
    _, text, source = validation_text(data)
    subject = read_subject(model_dir, model_dir / MODEL_FILE, checkpoint_path, adapter_path, atol, rtol)
    if adapter_path is not None and subject.form is Form.MERGED:
        raise ParityInputError(f"--adapter needs an adapter-form or slots decoder; this one was exported "
                               f"{subject.form}")
    config = ModelConfig.from_dict(subject.payload["config"])
    prompt = _decode_prompt(config, seed, text, source, subject.notes)
    plan = case_plan(subject.parameters, config, 1, LATENCY_RUNS, LATENCY_WARMUP)
    new_bytes = min(config.max_seq_len - len(prompt), plan.decode_bytes or config.max_seq_len)
    if plan.tier != FULL:
        subject.notes.append(f"case plan '{plan.tier}': {plan.reason}; the decode runs {new_bytes} bytes")
    adapters = _adapter_under_test(subject, model_dir)
    progress.stage(f"decode parity: {new_bytes} greedy bytes after a {len(prompt)}-byte prompt, PyTorch first, "
                   f"then onnxruntime-genai; case plan '{plan.tier}' for {plan.parameters:,} parameters")
    runs, statuses, failures = _decode_runs(subject, adapters, prompt, new_bytes, source, providers,
                                            explicit_providers, progress)
    return conclude(
        subject, statuses, failures,
        lambda status: decode_summary(status, runs, failures, statuses, subject.tolerance, subject.precision),
        pass_rule=decode_pass_rule(subject.tolerance), seed=seed,
        variants=list(dict.fromkeys(run.variant for run in runs)), cases=[], comparisons=[], generations=[],
        latencies=[], worst=None, error_histograms={}, decode=runs,
        case_plan=plan.record([], max_seq=len(prompt) + new_bytes, max_batch=1, decode_bytes=new_bytes))
