"""Decode parity: onnxruntime-genai's generator over a ``--genai`` decoder against PyTorch, step by step.

For each variant (merged; or base, then every adapter, then base again, all on one loaded ``og.Model``):
greedy bytes from a prompt longer than the local window (held-out prose, or the user's ``--data``; each run
records it and its source), run to the end of the context (so the window is crossed several times) or, for a big
model, as far as its case plan allows (``cases.CasePlan.decode_bytes``); the logits genai returns at every step
are compared with the PyTorch full forward over the same prefix (teacher-forced on genai's bytes), and the bytes
with PyTorch's own greedy generation. The pieces are separate (``decode_reference``, ``genai_decode``,
``judge_decode``) so that PyTorch runs and is freed before genai loads the decoder
(``lora_export.parity.validate_decoder``). The
end-of-sequence byte's logit is left out of the comparison: genai overwrites it with the lowest float to keep
generation from stopping (``min_length``). Greedy bytes must be identical where the tolerance asks every argmax to agree
(``Tolerance.exact_bytes``: fp32 only): an fp16 decoder is held
to its elementwise tolerance (``Tolerance.deviation``, scaled by each step's logits) and top-1 at every
(teacher-forced) step, an int8 decoder by step top-1 agreement (its
tolerance has no elementwise limit); their bytes are reported but free to drift onto a near-tie's other branch.
Per-byte latency is recorded against position.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..export.adapters import ADAPTER_IDS
from ..genai.decoder import EOS_BYTE
from ..layout import Form
from ..model.transformer import LoRATransformerLM
from ..tolerance import Deviation
from .cases import show_bytes
from .metrics import Tolerance
from .results import DecodeRun

#: The name a slots decoder's pack of adapters is loaded under (genai feeds its stacks as one adapter).
PACK = "pack"


@dataclass
class GenaiDecode:
    """What onnxruntime-genai's generator did in one run: its greedy bytes, its logits at every step [new, V] and
    each step's milliseconds."""

    generated: list[int]
    logits: np.ndarray
    step_ms: list[float]


def _greedy_reference(model: LoRATransformerLM, prompt: np.ndarray, new_bytes: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt[None].astype(np.int64)), new_bytes, greedy=True)
    return out[0, len(prompt):].tolist()


def teacher_forced(model: LoRATransformerLM, prompt: np.ndarray, generated: list[int]) -> np.ndarray:
    """The logits [len(generated), V] each decoding step should have seen: PyTorch's full forward over the prompt
    and ``generated`` (but its last byte), from the prompt's last position on."""
    with torch.no_grad():
        sequence = torch.tensor([list(prompt) + generated[:-1]], dtype=torch.int64)
        return model(sequence)[0, len(prompt) - 1:].numpy()


def decode_reference(model: LoRATransformerLM, prompt: np.ndarray, new_bytes: int) -> tuple[list[int], np.ndarray]:
    """PyTorch's side of a decode run (``model`` in the variant's form): (its ``new_bytes`` greedy bytes after
    ``prompt`` [P], ``teacher_forced`` logits along them [new_bytes, V]): what genai's run is held against when it
    generates the same bytes."""
    reference = _greedy_reference(model, prompt, new_bytes)
    return reference, teacher_forced(model, prompt, reference)


def genai_decode(og_model: object, adapters: object, name: str | None, prompt: np.ndarray, new_bytes: int,
                 slot: int | None = None) -> GenaiDecode:
    """genai's greedy bytes after ``prompt`` (adapter ``name`` active, None for none; the slots decoder: ``slot`` of
    the pack active as ``name``, fed as ``adapter_ids``), its logits at every step [new_bytes, V] and each step's
    milliseconds."""
    import onnxruntime_genai as og

    length = len(prompt) + new_bytes
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(og_model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    if slot is not None:
        generator.set_model_input(ADAPTER_IDS, np.array([slot], np.int64))
    generator.append_tokens(prompt[None].astype(np.int32))
    step_logits, step_ms = [], []
    while not generator.is_done():
        start = time.perf_counter()
        generator.generate_next_token()
        step_ms.append((time.perf_counter() - start) * 1e3)
        step_logits.append(np.array(generator.get_output("logits"))[0, -1])
    return GenaiDecode([int(t) for t in generator.get_sequence(0)[len(prompt):]], np.stack(step_logits), step_ms)


def judge_steps(got: np.ndarray, expected: np.ndarray, mismatch: int | None, tolerance: Tolerance
                ) -> tuple[Deviation, float, list[str]]:
    """genai's step logits ``got`` against PyTorch's teacher-forced ``expected`` (both [steps, V], the EOS byte
    left out) and ``mismatch`` (the first generated byte that differs from PyTorch's greedy one, None for none).

    Returns (the logits' deviation, step top-1 agreement, the reasons they fail ``tolerance``; empty: passed). The
    logits are held to the elementwise limit where the tolerance has one, the bytes only where
    ``tolerance.exact_bytes``."""
    measured = tolerance.deviation(got, expected)
    top1 = float(np.mean(got.argmax(axis=-1) == expected.argmax(axis=-1)))
    failures = []
    if not np.isfinite(got).all():
        failures.append("NaN or Inf in genai's logits")
    if tolerance.elementwise and not measured.passed:
        failures.append(f"step logits: max_abs {measured.max_abs:.3e} is {measured.used:.3g}x the tolerance "
                        f"({tolerance.limit_text('torch')})")
    if not top1 >= tolerance.top1_min:
        failures.append(f"step top-1 agreement {top1:.2%} < {tolerance.top1_min:.0%}")
    if mismatch is not None and tolerance.exact_bytes:
        failures.append(f"greedy bytes differ from generated byte {mismatch}")
    return measured, top1, failures


def judge_decode(genai: GenaiDecode, reference: list[int], forced: np.ndarray, prompt: np.ndarray,
                 tolerance: Tolerance, variant: str, device: str, prompt_source: str = "held-out prose") -> DecodeRun:
    """Hold genai's run against PyTorch: every step's logits against ``forced`` (``teacher_forced`` along genai's
    own bytes: the reference's when genai generated the same bytes) and, when ``tolerance.exact_bytes``, its bytes
    against PyTorch's greedy ``reference``."""
    keep = np.arange(genai.logits.shape[-1]) != EOS_BYTE
    mismatch = next((i for i, (a, b) in enumerate(zip(genai.generated, reference, strict=True)) if a != b), None)
    measured, top1, failures = judge_steps(genai.logits[:, keep].astype(np.float64), forced[:, keep], mismatch,
                                           tolerance)
    return DecodeRun(variant, device, show_bytes(prompt), prompt_source, len(prompt), len(reference), reference,
                     genai.generated, mismatch is None, mismatch, measured.max_abs,
                     measured.used if tolerance.elementwise else None, top1, genai.step_ms, failures)


def load_decoder(model_dir: Path, form: Form, adapters: Mapping[str, tuple[Path, dict]], device: str = "cpu",
                 pack: Path | None = None) -> tuple[object, object | None]:
    """(og.Model, og.Adapters holding each of ``adapters`` by name, or in the slots form the ``pack`` of them as
    ``PACK``; None in the merged form) of a genai decoder directory on ``device``: everything ``genai_decode`` asks
    of onnxruntime-genai before it runs. Raises what onnxruntime-genai raises (RuntimeError / OrtException) when
    the provider cannot load the decoder."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    if device == "cuda":
        config.append_provider("cuda")
    og_model = og.Model(config)
    if form is Form.MERGED:
        return og_model, None
    loaded = og.Adapters(og_model)
    if form is Form.SLOTS:
        files = {} if pack is None else {PACK: pack}
    else:
        files = {name: path for name, (path, _) in adapters.items()}
    for name, path in files.items():
        loaded.load(str(path), name)
    return og_model, loaded
