"""Decode parity of a genai decoder directory (``lora-export --genai``): ``validate_decoder``, which ``validate()``
runs for a directory.

The decoder runs through onnxruntime-genai (``lora_export.parity.decode``) on each provider, in the adapter form
base, the adapter under test and base again on one loaded model, and every decoding step's logits are held against
the PyTorch checkpoint; the result is concluded as a scoring graph's is (``verdict.conclude``).

Memory: no two copies of the weights at once. PyTorch runs first (each variant's greedy bytes and the logits along
them), its model and the checkpoint's tensors are freed, then genai loads the decoder on one provider at a time,
freed before the next. A run whose bytes drift from PyTorch's (fp16, int8 near-ties) is judged along its own bytes:
those logits come from the model built once more after every genai model is freed. How many bytes are decoded
follows the model's size (``cases.case_plan``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ParityInputError, ProviderUnavailableError, first_line
from ..export.adapters import attach_adapter
from ..export.ort_session import release_memory
from ..genai.decoder import read_decoder_dir
from ..layout import ADAPTER_FILE, MODEL_FILE, Form
from ..model.checkpoint import build_model, read_checkpoint
from ..model.layers import merge_lora
from ..model.transformer import LoRATransformerLM, ModelConfig
from ..progress import SILENT, Progress
from .cases import FULL, case_plan, generation_prompt
from .decode import GenaiDecode, decode_reference, genai_decode, judge_decode, load_decoder, teacher_forced
from .lineage import adapter_lineage, load_adapter_for
from .metrics import LATENCY_RUNS, LATENCY_WARMUP
from .results import DecodeRun, ParityResult
from .sessions import PROVIDERS, ProviderStatus, normalize_providers
from .subject import Subject, read_subject, validation_text
from .verdict import conclude, decode_pass_rule, decode_summary

Adapters = dict[str, tuple[Path, dict]]  # {name: (.onnx_adapter path, its graph-layout tensors)}
Reference = tuple[list[int], np.ndarray]  # PyTorch's greedy bytes and the teacher-forced logits along them


def _adapter_under_test(subject: Subject, model_dir: Path) -> Adapters:
    """{name: (path, tensors)} of the adapter under test: the adapter given, else the directory's own
    model.onnx_adapter in the adapter form; none in the merged form. Read and held against the graph's LoRA inputs
    (ParityInputError, AdapterError); its lineage needs the model (``_references``)."""
    own = model_dir / ADAPTER_FILE
    given = subject.adapter_path
    under_test = given if given is not None else own if subject.form is Form.ADAPTERS and own.is_file() else None
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


def _variant(key: str | None, form: Form) -> str:
    """A run's variant: 'merged', 'base' (key None) or 'adapter <name>'."""
    return Form.MERGED.value if form is Form.MERGED else "base" if key is None else f"adapter {key}"


def _reference_model(subject: Subject, payload: dict) -> LoRATransformerLM:
    """The checkpoint's model (``payload``) in the decoder's form: LoRA merged, or unmerged for adapters to attach."""
    model = build_model(payload, subject.checkpoint_path)
    if subject.form is Form.MERGED:
        merge_lora(model)
    return model


def _attach(model: LoRATransformerLM, form: Form, adapters: Adapters, key: str | None) -> None:
    """In the adapter form, run ``model`` as variant ``key``: the base with that adapter (None: none) attached."""
    if form is Form.ADAPTERS:
        attach_adapter(model, None if key is None else adapters[key][1])


def _references(subject: Subject, adapters: Adapters, prompt: np.ndarray, new_bytes: int, progress: Progress
                ) -> tuple[dict[str | None, Reference], list[str]]:
    """({variant key: PyTorch's greedy bytes and the logits along them}, the adapter's lineage failures): every
    PyTorch result decode parity needs. The model is built here (the subject lets go of the checkpoint's tensors)
    and freed on return, before genai loads the decoder."""
    model = _reference_model(subject, subject.payload)
    subject.release_weights()
    failures = []
    for path, tensors in adapters.values():  # the file must hold the checkpoint's trained LoRA, not just run
        found, notes = adapter_lineage(path, tensors, model, subject.checkpoint_path)
        failures += found
        subject.notes += notes
    keys = [None, *adapters]
    references = {}
    for key in keys:
        _attach(model, subject.form, adapters, key)
        references[key] = decode_reference(model, prompt, new_bytes)
        progress.advance(len(references), len(keys), f"PyTorch {_variant(key, subject.form)}: {new_bytes} bytes "
                         f"after a {len(prompt)}-byte prompt")
    progress.close()
    return references, failures


def _genai_provider(subject: Subject, adapters: Adapters, prompt: np.ndarray, new_bytes: int, provider: str,
                    explicit: bool, progress: Progress) -> tuple[ProviderStatus, list[tuple[str | None, GenaiDecode]]]:
    """(the provider's status, its runs as (variant key, what genai did)): the decoder loaded on ``provider`` (the
    only genai model alive: freed on return), then every variant decoded (the adapter form: base, each adapter,
    base again). CPU must load it, and so must one asked for explicitly (ProviderUnavailableError); any other that
    cannot is 'not run'. Only loading it is the provider's to fail: an error past that propagates."""
    name = PROVIDERS[provider]
    release_memory()
    try:
        og_model, loaded = load_decoder(subject.model_path, subject.form, adapters, provider)
    except Exception as err:  # genai raises RuntimeError / OrtException when a provider cannot load
        if provider == "cpu" or explicit:
            raise ProviderUnavailableError(f"{name} cannot run {subject.model_path} through onnxruntime-genai: "
                                           f"{first_line(err)}") from None
        return ProviderStatus(provider, name, False, [], first_line(err)), []
    keys = [None] if subject.form is Form.MERGED else [None, *adapters, None]
    runs = []
    for key in keys:
        runs.append((key, genai_decode(og_model, loaded, key, prompt, new_bytes)))
        progress.advance(len(runs), len(keys), f"genai {provider} {_variant(key, subject.form)}: {new_bytes} bytes")
    progress.close()
    return ProviderStatus(provider, name, True, [f"onnxruntime-genai {provider}"]), runs


def _forced(subject: Subject, adapters: Adapters, prompt: np.ndarray, references: dict[str | None, Reference],
            outputs: list[tuple[str, str | None, GenaiDecode]]) -> list[np.ndarray]:
    """The teacher-forced logits along each genai run's own bytes (``outputs``: (provider, key, run)): PyTorch's
    reference where genai generated its bytes; for a run that drifted, from the model built once more (every
    genai model freed by now) and freed on return."""
    forced = [references[key][1] for _, key, _ in outputs]
    drifted = [index for index, (_, key, run) in enumerate(outputs) if run.generated != references[key][0]]
    if drifted:
        model = _reference_model(subject, read_checkpoint(subject.checkpoint_path))
        for index in drifted:
            _, key, run = outputs[index]
            _attach(model, subject.form, adapters, key)
            forced[index] = teacher_forced(model, prompt, run.generated)
    return forced


def _decode_runs(subject: Subject, adapters: Adapters, prompt: np.ndarray, new_bytes: int, source: str,
                 providers: Sequence[str] | None, explicit: bool, progress: Progress
                 ) -> tuple[list[DecodeRun], list[ProviderStatus], list[str]]:
    """(decode parity runs, provider statuses, the adapter's lineage failures): PyTorch first, then genai on each
    provider, then every run judged along its own bytes."""
    references, lineage_failures = _references(subject, adapters, prompt, new_bytes, progress)
    outputs, statuses = [], []
    for provider in normalize_providers(providers):
        status, runs = _genai_provider(subject, adapters, prompt, new_bytes, provider, explicit, progress)
        statuses.append(status)
        outputs += [(provider, key, run) for key, run in runs]
    forced = _forced(subject, adapters, prompt, references, outputs)
    return [judge_decode(run, references[key][0], logits, prompt, subject.tolerance, _variant(key, subject.form),
                         provider, source) for (provider, key, run), logits in zip(outputs, forced, strict=True)
            ], statuses, lineage_failures


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
    (``lora_export.parity.decode``) on each provider; in the adapter form base, the adapter under test and base
    again on one loaded model. The adapter under test is ``adapter_path`` when given, else the directory's own
    model.onnx_adapter; it must hold the checkpoint's trained LoRA (``lineage.adapter_lineage``), and failures name
    that file. The directory is read as data first (``decoder.read_decoder_dir``). data: as validate()'s, for the
    decode prompt (recorded with its source in each run). progress: stage lines and each run counted. The run
    decodes to the end of the context, or as far as the model's case plan allows (``cases.case_plan``, recorded
    in the result's ``case_plan``). Writes no file, as validate()."""
    read_decoder_dir(model_dir)
    _, text, source = validation_text(data)
    subject = read_subject(model_dir, model_dir / MODEL_FILE, checkpoint_path, adapter_path, atol, rtol)
    if adapter_path is not None and subject.form is not Form.ADAPTERS:
        raise ParityInputError(f"--adapter needs an adapter-form decoder; this one was exported {subject.form}")
    config = ModelConfig.from_dict(subject.payload["config"])
    prompt = _decode_prompt(config, seed, text, source, subject.notes)
    plan = case_plan(subject.parameters, config, 1, LATENCY_RUNS, LATENCY_WARMUP)
    new_bytes = min(config.max_seq_len - len(prompt), plan.decode_bytes or config.max_seq_len)
    if plan.tier != FULL:
        subject.notes.append(f"case plan '{plan.tier}': {plan.reason}; the decode runs {new_bytes} bytes")
    adapters = _adapter_under_test(subject, model_dir)
    progress.stage(f"decode parity: {new_bytes} greedy bytes after a {len(prompt)}-byte prompt, PyTorch first, "
                   f"then onnxruntime-genai; case plan '{plan.tier}' for {plan.parameters:,} parameters")
    runs, statuses, lineage_failures = _decode_runs(subject, adapters, prompt, new_bytes, source, providers,
                                                    explicit_providers, progress)
    failures = [f"decode ({run.variant}, genai {run.device}): {reason}" for run in runs for reason in run.failures]
    failures += lineage_failures
    return conclude(
        subject, statuses, failures,
        lambda status: decode_summary(status, runs, failures, statuses, subject.tolerance, subject.precision),
        pass_rule=decode_pass_rule(subject.tolerance), seed=seed,
        variants=list(dict.fromkeys(run.variant for run in runs)), cases=[], comparisons=[], generations=[],
        latencies=[], worst=None, error_histograms={}, decode=runs,
        case_plan=plan.record([], max_seq=len(prompt) + new_bytes, max_batch=1, decode_bytes=new_bytes))
