"""Decode parity of a genai decoder directory (``lora-export --genai``): ``validate_decoder``, which ``validate()``
runs for a directory.

The decoder runs through onnxruntime-genai (``lora_export.parity.decode``) on each provider, in the adapter form
base, the adapter under test and base again on one loaded model, and every decoding step's logits are held against
the PyTorch checkpoint; the result is concluded as a scoring graph's is (``verdict.conclude``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ParityInputError, ProviderUnavailableError, first_line
from ..genai.decoder import read_decoder_dir
from ..layout import ADAPTER_FILE, MODEL_FILE, Form
from ..model.checkpoint import build_model
from ..model.transformer import LoRATransformerLM, ModelConfig
from .cases import generation_prompt
from .decode import decode_parity, load_decoder
from .lineage import adapter_lineage, load_adapter_for
from .results import DecodeRun, ParityResult
from .sessions import PROVIDERS, ProviderStatus, normalize_providers
from .subject import Subject, read_subject, validation_text
from .verdict import conclude, decode_pass_rule, decode_summary


def _decoder_adapters(subject: Subject, model_dir: Path, model: LoRATransformerLM
                      ) -> tuple[dict[str, tuple[Path, dict]], list[str]]:
    """({name: (path, tensors)} of the adapter under test, its lineage failures): the adapter given, else the
    directory's own model.onnx_adapter in the adapter form; none in the merged form."""
    own = model_dir / ADAPTER_FILE
    given = subject.adapter_path
    under_test = given if given is not None else own if subject.form is Form.ADAPTERS and own.is_file() else None
    if under_test is None:
        return {}, []
    tensors, adapter_notes = load_adapter_for(under_test, subject.proto, subject.metadata)
    failures, lineage_notes = adapter_lineage(under_test, tensors, model, subject.checkpoint_path)
    subject.notes += adapter_notes + lineage_notes
    return {"trained" if given is None else given.stem: (under_test, tensors)}, failures


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


def _decode_runs(subject: Subject, model: LoRATransformerLM, adapters: dict[str, tuple[Path, dict]],
                 prompt: np.ndarray, source: str, providers: Sequence[str] | None, explicit: bool
                 ) -> tuple[list[DecodeRun], list[ProviderStatus]]:
    """(decode parity runs, provider statuses) on each provider; CPU must load the decoder, and so must one asked
    for explicitly (ProviderUnavailableError), any other that cannot is 'not run'. Only loading it through
    onnxruntime-genai is the provider's to fail: an error past that (the PyTorch reference, judging) propagates."""
    runs, statuses = [], []
    for provider in normalize_providers(providers):
        try:
            decoder = load_decoder(subject.model_path, subject.form, adapters, provider)
        except Exception as err:  # genai raises RuntimeError / OrtException when a provider cannot load
            if provider == "cpu" or explicit:
                raise ProviderUnavailableError(f"{PROVIDERS[provider]} cannot run {subject.model_path} through "
                                               f"onnxruntime-genai: {first_line(err)}") from None
            statuses.append(ProviderStatus(provider, PROVIDERS[provider], False, [], first_line(err)))
            continue
        runs += decode_parity(decoder, model, subject.form, adapters, prompt, subject.tolerance, provider,
                              prompt_source=source)
        statuses.append(ProviderStatus(provider, PROVIDERS[provider], True, [f"onnxruntime-genai {provider}"]))
    return runs, statuses


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
) -> ParityResult:
    """validate() for a genai decoder directory (``lora-export --genai``): decode parity through onnxruntime-genai
    (``lora_export.parity.decode``) on each provider; in the adapter form base, the adapter under test and base
    again on one loaded model. The adapter under test is ``adapter_path`` when given, else the directory's own
    model.onnx_adapter; it must hold the checkpoint's trained LoRA (``lineage.adapter_lineage``), and failures name
    that file. The directory is read as data first (``decoder.read_decoder_dir``). data: as validate()'s, for the
    decode prompt (recorded with its source in each run). Writes no file, as validate()."""
    read_decoder_dir(model_dir)
    _, text, source = validation_text(data)
    subject = read_subject(model_dir, model_dir / MODEL_FILE, checkpoint_path, adapter_path, atol, rtol)
    if adapter_path is not None and subject.form is not Form.ADAPTERS:
        raise ParityInputError(f"--adapter needs an adapter-form decoder; this one was exported {subject.form}")
    model = build_model(subject.payload, checkpoint_path)
    adapters, lineage_failures = _decoder_adapters(subject, model_dir, model)
    prompt = _decode_prompt(model.config, seed, text, source, subject.notes)
    runs, statuses = _decode_runs(subject, model, adapters, prompt, source, providers, explicit_providers)
    failures = [f"decode ({run.variant}, genai {run.device}): {reason}" for run in runs for reason in run.failures]
    failures += lineage_failures
    return conclude(
        subject, statuses, failures,
        lambda status: decode_summary(status, runs, failures, statuses, subject.tolerance, subject.precision),
        pass_rule=decode_pass_rule(subject.tolerance), seed=seed,
        variants=list(dict.fromkeys(run.variant for run in runs)), cases=[], comparisons=[], generations=[],
        latencies=[], worst=None, error_histograms={}, decode=runs)
