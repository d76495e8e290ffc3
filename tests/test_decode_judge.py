"""Decode judging without onnxruntime-genai: a scripted stand-in for genai's generator returns logits we choose, so
the per-step judgement of ``lora_export.parity.decode.judge_decode`` (the pass boundary of ``Tolerance.deviation``, its
inclusive edge, NaN / Inf, the top-1 rule, exact bytes for fp32 and reported bytes for fp16 / int8) is checked on
numbers known in advance."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, make_lora_model

from lora_export.genai.decoder import EOS_BYTE
from lora_export.parity import decode
from lora_export.parity.metrics import FP16_EPS, TOLERANCES, Tolerance
from lora_export.parity.results import DecodeRun

PROMPT = np.frombuffer(b"Hello, world", np.uint8).astype(np.int64)  # 12 bytes
NEW = TINY_CONFIG["max_seq_len"] - len(PROMPT)  # 20 steps
EDGE = 2.0**-10  # a limit every float can meet exactly
#: atol only, every argmax must agree: the boundary is EDGE at every logit.
EXACT = Tolerance(atol=EDGE, rtol=0.0, top1_min=1.0, loss_delta_max=None)
KEEP = np.arange(256) != EOS_BYTE  # genai overwrites the end-of-sequence logit: it is never compared

Edit = Callable[[int, np.ndarray], None]  # (step, that step's logits [256], float64) -> None, edits in place


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_lora_model(seed=5)


def greedy(model: torch.nn.Module) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(PROMPT[None]), NEW, greedy=True)
    return out[0, len(PROMPT):].tolist()


def teacher_forced(model: torch.nn.Module, generated: list[int]) -> np.ndarray:
    """The logits each step should have seen, computed as decode parity computes them ([NEW, 256])."""
    with torch.no_grad():
        sequence = torch.tensor([list(PROMPT) + generated[:-1]], dtype=torch.int64)
        return model(sequence)[0, len(PROMPT) - 1:].numpy()


def fake_genai(steps: np.ndarray, generated: list[int]) -> types.ModuleType:
    """A stand-in for onnxruntime_genai whose generator yields ``generated`` with ``steps`` [NEW, 256] as the
    logits of each step."""
    class Generator:
        def __init__(self, _model: object, _params: object) -> None:
            self.done = 0

        def append_tokens(self, tokens: np.ndarray) -> None:
            assert tokens.tolist() == [list(PROMPT)]

        def set_active_adapter(self, _adapters: object, _name: str) -> None:
            raise AssertionError("no adapter in these runs")

        def is_done(self) -> bool:
            return self.done == len(generated)

        def generate_next_token(self) -> None:
            self.done += 1

        def get_output(self, name: str) -> np.ndarray:
            assert name == "logits"
            return steps[self.done - 1][None, None]

        def get_sequence(self, _index: int) -> list[int]:
            return list(PROMPT) + generated[:self.done]

    class GeneratorParams:
        def __init__(self, _model: object) -> None:
            pass

        def set_search_options(self, **options: object) -> None:
            assert options == {"max_length": len(PROMPT) + NEW, "min_length": len(PROMPT) + NEW, "do_sample": False}

    module = types.ModuleType("onnxruntime_genai")
    module.Generator, module.GeneratorParams = Generator, GeneratorParams
    return module


def judge_run(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, tolerance: Tolerance,
              edit: Edit | None = None, generated: list[int] | None = None) -> DecodeRun:
    """A decode run on the stand-in, judged as validate_decoder judges it: genai's bytes are ``generated``
    (PyTorch's greedy bytes by default), its logits PyTorch's teacher-forced ones in float64, edited by ``edit``."""
    generated = greedy(model) if generated is None else generated
    steps = teacher_forced(model, generated).astype(np.float64)
    for step in range(NEW):
        if edit is not None:
            edit(step, steps[step])
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", fake_genai(steps, generated))
    reference, _ = decode.decode_reference(model, PROMPT, NEW)
    run = decode.genai_decode(None, None, None, PROMPT, NEW)
    return decode.judge_decode(run, reference, decode.teacher_forced(model, PROMPT, run.generated), PROMPT, tolerance,
                               "merged", "cpu")


def top_kept(logits: np.ndarray) -> int:
    """The byte of the largest compared logit."""
    return int(np.flatnonzero(KEEP)[logits[KEEP].argmax()])


def raise_top(amount: float, at: int | None = None) -> Edit:
    """Add ``amount`` to the largest compared logit (the argmax stays where it is), at step ``at`` or every step."""
    def edit(step: int, logits: np.ndarray) -> None:
        if at is None or step == at:
            logits[top_kept(logits)] += amount
    return edit


def flip_top1(steps: set[int]) -> Edit:
    """At the given steps, make the second-largest compared logit the largest."""
    def edit(step: int, logits: np.ndarray) -> None:
        if step in steps:
            order = np.flatnonzero(KEEP)[np.argsort(logits[KEEP])]
            logits[order[-2]] = logits[order[-1]] + 1.0
    return edit


# --------------------------------------------------------------------------- the boundary


def test_the_boundary_is_atol_plus_rtol_times_the_reference():
    reference = np.array([[0.0, -2.0, 10.3], [1.1, 0.5, -0.25]], np.float32)
    exact = np.abs(reference.astype(np.float64))  # float32 logits, a float64 boundary
    limit = TOLERANCES["fp32"].deviation(reference, reference).limit
    np.testing.assert_allclose(limit, 1e-4 + 1e-3 * exact, rtol=1e-15)


def test_fp16s_boundary_grows_with_the_largest_logit_at_its_position():
    reference = np.array([[0.0, -8.0, 2.0], [1.0, 0.5, -0.25]])
    fp16 = TOLERANCES["fp16"]
    expected = fp16.atol_scale * np.array([[8.0], [1.0]]) + FP16_EPS * np.abs(reference)
    np.testing.assert_allclose(fp16.deviation(reference, reference).limit, expected, rtol=1e-15)
    assert fp16.atol_scale == 16 * FP16_EPS  # 16 epsilons of the position's largest logit


def test_exact_bytes_only_where_every_argmax_must_agree():
    assert {name: t.exact_bytes for name, t in TOLERANCES.items()} == {
        "fp32": True, "fp16": False, "int8": False, "int4": False}


# --------------------------------------------------------------------------- a decode run judged step by step


def test_genai_equal_to_pytorch_passes_with_nothing_used(monkeypatch, model):
    run = judge_run(monkeypatch, model, TOLERANCES["fp32"])
    assert run.passed and run.identical and run.first_mismatch is None
    assert run.max_abs == 0.0 and run.tolerance_used == 0.0 and run.top1_agreement == 1.0
    assert run.generated == run.reference == greedy(model) and len(run.step_ms) == NEW


def test_an_error_on_the_boundary_passes_and_one_beyond_fails(monkeypatch, model):
    """|genai - torch| <= boundary is inclusive: exactly EDGE passes; EDGE + 2^-20 at a single step fails."""
    on_edge = judge_run(monkeypatch, model, EXACT, raise_top(EDGE))
    assert on_edge.max_abs == EDGE and on_edge.tolerance_used == 1.0 and on_edge.passed, on_edge.failures

    beyond = judge_run(monkeypatch, model, EXACT, raise_top(EDGE + 2.0**-20, at=7))
    assert beyond.tolerance_used == pytest.approx(1 + 2.0**-10, rel=1e-12)
    assert beyond.failures == [f"step logits: max_abs {EDGE + 2.0**-20:.3e} is {1 + 2.0**-10:.3g}x the tolerance "
                               f"({EXACT.limit_text('torch')})"]


def test_the_boundary_scales_with_rtol_and_each_steps_logits(monkeypatch, model):
    """fp16: an error of 15 epsilons of the position's largest logit passes, 17 fail (the limit is 16 plus the
    logit's own rtol share)."""
    def scaled(epsilons: float) -> Edit:
        def edit(_step: int, logits: np.ndarray) -> None:
            logits[top_kept(logits)] += epsilons * FP16_EPS * np.abs(logits[KEEP]).max()
        return edit

    assert judge_run(monkeypatch, model, TOLERANCES["fp16"], scaled(15)).passed
    over = judge_run(monkeypatch, model, TOLERANCES["fp16"], scaled(17.5))
    assert [f.split(":")[0] for f in over.failures] == ["step logits"]
    assert 1.0 < over.tolerance_used <= 17.5 / 16


def test_the_end_of_sequence_logit_is_never_compared(monkeypatch, model):
    def bury_eos(_step: int, logits: np.ndarray) -> None:
        logits[EOS_BYTE] = np.finfo(np.float32).min  # what genai writes there to keep generating
    run = judge_run(monkeypatch, model, TOLERANCES["fp32"], bury_eos)
    assert run.passed and run.max_abs == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_step_fails(monkeypatch, model, bad):
    def poison(step: int, logits: np.ndarray) -> None:
        if step == 3:
            logits[int(np.flatnonzero(KEEP)[0])] = bad
    for tolerance in (TOLERANCES["fp32"], TOLERANCES["int8"]):
        run = judge_run(monkeypatch, model, tolerance, poison)
        assert "NaN or Inf in genai's logits" in run.failures and not run.passed, (tolerance, run.failures)


def test_int8_is_judged_by_step_top1_alone(monkeypatch, model):
    """No elementwise limit: a large error that keeps every argmax passes; top-1 below 90% fails."""
    int8 = TOLERANCES["int8"]
    shifted = judge_run(monkeypatch, model, int8, raise_top(5.0))
    assert shifted.passed and shifted.tolerance_used is None and shifted.max_abs == 5.0

    one_off = judge_run(monkeypatch, model, int8, flip_top1({4}))  # 19 of 20 steps agree: 95%
    assert one_off.passed and one_off.top1_agreement == 19 / 20

    three_off = judge_run(monkeypatch, model, int8, flip_top1({1, 4, 9}))  # 17 of 20: 85%
    assert three_off.failures == ["step top-1 agreement 85.00% < 90%"]


def test_fp32_needs_every_steps_argmax(monkeypatch, model):
    """Within the elementwise limit but with one argmax moved (a near tie), fp32's top-1 rule of 100% fails."""
    loose = replace(TOLERANCES["fp32"], atol=100.0)
    run = judge_run(monkeypatch, model, loose, flip_top1({0}))
    assert run.failures == ["step top-1 agreement 95.00% < 100%"]


def test_other_bytes_fail_fp32_and_are_only_reported_for_fp16_and_int8(monkeypatch, model):
    """genai took another byte at position 6: fp32 asks for PyTorch's exact bytes; fp16 and int8 record the drift
    (their logits are judged teacher-forced on genai's bytes, here exactly right)."""
    drifted = greedy(model)
    drifted[6] = (drifted[6] + 1) % 256
    for precision in ("fp32", "fp16", "int8"):
        run = judge_run(monkeypatch, model, TOLERANCES[precision], generated=drifted)
        assert not run.identical and run.first_mismatch == 6 and run.generated == drifted
        expected = ["greedy bytes differ from generated byte 6"] if precision == "fp32" else []
        assert run.failures == expected, (precision, run.failures)
