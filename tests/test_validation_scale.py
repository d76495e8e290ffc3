"""Validation that scales (issue 18): the PyTorch reference is computed and its model freed before any ONNX Runtime
session (or genai model) opens, one session at a time, and a case plan sized by the parameter count, recorded in
the result and shown in the progress lines. Tiny models of conftest; a big model's size is a patched count."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest

import lora_export.parity.decode as decode_module
import lora_export.parity.precisions as precisions_module
import lora_export.parity.sessions as sessions_module
import lora_export.parity.subject as subject_module
import lora_export.parity.validate as validate_module
import lora_export.parity.validate_decoder as decoder_module
from lora_export.export.convert import ExportResult
from lora_export.export.quantize import convert_ort_format, quantize_int8
from lora_export.model.checkpoint import read_checkpoint
from lora_export.parity.precisions import check_ort_format, compare_precisions
from lora_export.parity.validate import validate
from lora_export.progress import CallbackProgress

FAST = {"providers": ["cpu"], "latency_runs": 2}
BIG = 1_230_000_000  # parameters of the largest model of issue 18


class Lifetimes:
    """Weak references to every PyTorch model built and every ORT session / genai model opened, with a check at
    each opening: a model was built before it (the reference comes first) and every model and every earlier
    session is gone (collected by reference counting alone: nothing still refers to them)."""

    def __init__(self) -> None:
        self.models: list[weakref.ref] = []
        self.sessions: list[weakref.ref] = []
        self.opened = 0

    def built(self, real):
        def build(*args, **kwargs):
            model = real(*args, **kwargs)
            self.models.append(weakref.ref(model))
            return model
        return build

    def check_opening(self) -> None:
        assert self.models, "a session opened before the PyTorch reference was computed"
        assert all(ref() is None for ref in self.models), "the PyTorch model is alive while a session opens"
        assert all(ref() is None for ref in self.sessions), "an earlier session is alive while another opens"
        self.opened += 1

    def opening(self, real):
        def open_(*args, **kwargs):
            self.check_opening()
            opened = real(*args, **kwargs)
            self.sessions.append(weakref.ref(opened[0] if isinstance(opened, tuple) else opened))
            return opened
        return open_


@pytest.fixture
def lifetimes(monkeypatch: pytest.MonkeyPatch) -> Lifetimes:
    """Every model build and session opening of the parity code, watched."""
    watch = Lifetimes()
    for module in (validate_module, precisions_module, decoder_module):
        monkeypatch.setattr(module, "build_model", watch.built(module.build_model))
    monkeypatch.setattr(sessions_module, "quiet_session", watch.opening(sessions_module.quiet_session))
    monkeypatch.setattr(decoder_module, "load_decoder", watch.opening(decoder_module.load_decoder))
    return watch


@pytest.fixture(scope="module")
def builds(merged_export: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 and int8 builds of the shared merged export, in a private folder."""
    folder = tmp_path_factory.mktemp("scale_builds")
    fp32 = folder / "tiny.onnx"
    shutil.copyfile(merged_export.model_path, fp32)
    return {"fp32": fp32, "int8": quantize_int8(fp32)}


def big(monkeypatch: pytest.MonkeyPatch, parameters: int = BIG) -> None:
    """Make every checkpoint count ``parameters``."""
    monkeypatch.setattr(subject_module, "checkpoint_parameters", lambda payload: parameters)


# --------------------------------------------------------------------------- one copy of the weights at a time


def test_scoring_graph_frees_the_model_before_each_session_and_opens_one_at_a_time(
        lifetimes: Lifetimes, builds: dict[str, Path], tiny_checkpoint: Path) -> None:
    result = validate(builds["fp32"], tiny_checkpoint, precision_models=builds, **FAST)
    assert result.passed, result.summary
    assert lifetimes.opened == 3  # the model validated, then each build of the precision table
    assert [row["status"] for row in result.precisions] == ["ran", "ran"]


def test_compare_precisions_and_the_ort_check_open_one_session_at_a_time(
        lifetimes: Lifetimes, builds: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    rows = compare_precisions(tiny_checkpoint, builds, runs=1, warmup=0)
    assert [row["passed"] for row in rows] == [True, True] and lifetimes.opened == 2
    ort_path, _ = convert_ort_format(builds["fp32"], tmp_path)
    opened = lifetimes.opened
    assert check_ort_format(builds["fp32"], ort_path) < 1e-4
    assert lifetimes.opened == opened + 2  # the .onnx, then the .ort


def test_decoder_frees_the_model_before_genai_loads(lifetimes: Lifetimes, genai_adapters: Path,
                                                    tiny_checkpoint: Path) -> None:
    result = validate(genai_adapters, tiny_checkpoint, providers=["cpu"])
    assert result.passed, result.summary
    assert [run.variant for run in result.decode] == ["base", "adapter trained", "base"]  # on one genai model
    assert len(lifetimes.models) == 1 and lifetimes.opened == 1  # no drift: the model is built once


def test_a_drifted_decode_is_judged_along_genais_bytes_by_a_model_built_after_genai_is_freed(
        lifetimes: Lifetimes, genai_merged: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's greedy bytes are made to differ at byte 3: genai 'drifts'. Its logits are then held against the
    model's forward along genai's own bytes (they agree: the logits pass), which needs the model again; it is
    built once more only after genai's model is gone, and only the bytes fail."""
    real = decode_module._greedy_reference

    def other_bytes(*args, **kwargs):
        reference = real(*args, **kwargs)
        reference[3] = (reference[3] + 1) % 256
        return reference

    monkeypatch.setattr(decode_module, "_greedy_reference", other_bytes)
    genai_models = []
    loader = decoder_module.load_decoder

    def load(*args, **kwargs):
        decoder = loader(*args, **kwargs)
        genai_models.append(weakref.ref(decoder[0]))
        return decoder

    monkeypatch.setattr(decoder_module, "load_decoder", load)
    builder = decoder_module.build_model

    def rebuild(*args, **kwargs):
        assert all(ref() is None for ref in genai_models), "the model was rebuilt while genai's was alive"
        return builder(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "build_model", rebuild)
    result = validate(genai_merged, tiny_checkpoint, providers=["cpu"])
    (run,) = result.decode
    assert result.failures == ["decode (merged, genai cpu): greedy bytes differ from generated byte 3"]
    assert run.tolerance_used is not None and run.tolerance_used <= 1.0
    assert len(lifetimes.models) == 2 and len(genai_models) == 1


# --------------------------------------------------------------------------- the case plan


def test_a_small_model_runs_the_full_plan_and_records_it(merged_export: ExportResult, tiny_checkpoint: Path) -> None:
    result = validate(merged_export.model_path, tiny_checkpoint, **FAST)
    payload = read_checkpoint(tiny_checkpoint)
    parameters = sum(t.numel() for section in ("base", "lora") for t in payload[section].values())
    plan = result.case_plan
    assert {k: plan[k] for k in ("parameters", "tier", "cases", "max_seq", "max_batch", "generate_bytes")} == {
        "parameters": parameters, "tier": "full", "cases": 8, "max_seq": 32, "max_batch": 4, "generate_bytes": 24}
    assert plan["latency_runs"] == 2 and plan["reason"] and not any("case plan" in n for n in result.notes)


@pytest.mark.parametrize(("parameters", "tier", "shapes", "greedy", "runs"), [  # validate's defaults: 24 bytes, 20 runs
    # w = 8, L = 32: every length at one row, padding in 3 rows (L/2, 1, left-padded L/2)
    (200_000_000, "one row per length", {"n1": (1, 1), "window_minus_1": (1, 7), "window": (1, 8),
                                         "window_plus_1": (1, 9), "not_window_multiple": (1, 20),
                                         "max_len": (1, 32), "random_bytes": (1, 32), "padding": (3, 32)}, 16, 5),
    # past 500M: nothing longer than 2.5 w = 20
    (BIG, "short", {"n1": (1, 1), "window_minus_1": (1, 7), "window": (1, 8), "window_plus_1": (1, 9),
                    "not_window_multiple": (1, 20), "random_bytes": (1, 20), "padding": (3, 20)}, 8, 3),
])
def test_a_big_model_runs_fewer_shorter_cases_and_says_so(merged_export: ExportResult, tiny_checkpoint: Path,
                                                          monkeypatch: pytest.MonkeyPatch, parameters: int, tier: str,
                                                          shapes: dict, greedy: int, runs: int) -> None:
    big(monkeypatch, parameters)
    result = validate(merged_export.model_path, tiny_checkpoint, providers=["cpu"])
    assert result.passed, result.summary
    assert {case.name: case.input_ids.shape for case in result.cases} == shapes
    assert [c.case for c in result.comparisons] == list(shapes)
    padding = next(case for case in result.cases if case.name == "padding")
    longest = shapes["padding"][1]
    assert padding.attention_mask.sum(axis=1).tolist() == [(longest + 1) // 2, 1, (longest + 1) // 2]
    assert padding.attention_mask[-1, 0] == 0  # the left-padded row
    plan = result.case_plan
    assert (plan["parameters"], plan["tier"], plan["cases"], plan["max_seq"]) == (
        parameters, tier, len(shapes), longest)
    assert plan["generate_bytes"] == greedy and f"{greedy} greedily generated bytes" in result.pass_rule
    assert {t.runs for t in result.latencies} == {runs} and {t.warmup for t in result.latencies} == {1}
    assert any(note.startswith(f"case plan '{tier}': {parameters:,} parameters") for note in result.notes)


def test_a_big_int8_model_is_judged_on_fewer_heldout_windows(builds: dict[str, Path], tiny_checkpoint: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    big(monkeypatch)
    result = validate(builds["int8"], tiny_checkpoint, **FAST)
    heldout = next(case for case in result.cases if case.name == "heldout_eval")
    assert heldout.input_ids.shape == (4, 32)  # 16 windows in the full plan


def test_a_big_decoder_decodes_fewer_bytes(genai_merged: Path, tiny_checkpoint: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    full = validate(genai_merged, tiny_checkpoint, providers=["cpu"])
    assert full.decode[0].new_bytes == 16 and full.case_plan["decode_bytes"] == 16  # 32 - a 16-byte prompt
    big(monkeypatch)
    result = validate(genai_merged, tiny_checkpoint, providers=["cpu"])
    (run,) = result.decode
    assert result.passed, result.summary
    assert run.new_bytes == len(run.generated) == 8  # one local window
    assert run.generated == full.decode[0].generated[:8]  # greedy: the same bytes, fewer of them
    assert result.case_plan["decode_bytes"] == 8 and result.case_plan["tier"] == "short"


# --------------------------------------------------------------------------- progress


def test_progress_shows_each_case_with_its_shape_pytorch_first(merged_export: ExportResult,
                                                               tiny_checkpoint: Path) -> None:
    stages: list[str] = []
    counts: list[tuple[int, int, str]] = []
    progress = CallbackProgress(stages.append, lambda *count: counts.append(count))
    validate(merged_export.model_path, tiny_checkpoint, progress=progress, **FAST)
    assert stages[0].startswith("PyTorch reference: 8 cases per variant (merged) up to batch 4 x 32 tokens")
    assert stages[1] == "ONNX Runtime on CPUExecutionProvider: 8 cases per variant"
    torch_counts, ort_counts = counts[:8], counts[8:]
    assert torch_counts[2] == (3, 8, "PyTorch merged/window: batch 2 x 8 tokens")
    assert ort_counts[-1] == (8, 8, "merged/CPUExecutionProvider/padding: batch 4 x 32 tokens")
    assert [done for done, _, _ in ort_counts] == list(range(1, 9))


def test_full_plan_cases_are_the_ones_validate_always_ran() -> None:
    """The full plan's cases equal the plan-less case list (the one every earlier report used), array for array."""
    from conftest import TINY_CONFIG

    from lora_export.model.transformer import ModelConfig
    from lora_export.parity.cases import case_plan, parity_cases

    config = ModelConfig(**TINY_CONFIG)
    plain = parity_cases(config, seed=3)
    planned = parity_cases(config, seed=3, plan=case_plan(10**6, config, 24, 20, 3))
    assert [(c.name, c.description) for c in plain] == [(c.name, c.description) for c in planned]
    assert all(np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.attention_mask, b.attention_mask)
               for a, b in zip(plain, planned, strict=True))
