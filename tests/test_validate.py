"""validate(): parity of real exports (merged and adapter form), failures that name the worst case, bad inputs.

The exports are conftest's session-wide tiny_checkpoint / merged_export / adapter_export (the dynamo exporter
takes 10-40 s a graph); the tests here edit copies of them or work on the metric functions directly, and never
write beside the shared files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from lora_export.errors import ExportError, OutputError, ParityInputError, ProviderUnavailableError
from lora_export.export.adapters import read_adapter, write_adapter
from lora_export.export.convert import ExportResult
from lora_export.export.quantize import convert_fp16
from lora_export.model.checkpoint import read_checkpoint, save_checkpoint
from lora_export.model.transformer import LoRATransformerLM, ModelConfig
from lora_export.parity.cases import parity_cases
from lora_export.parity.metrics import TOLERANCES, Metrics, Tolerance, compare_logits, judge, resolve_tolerance
from lora_export.parity.results import ParityResult
from lora_export.parity.sessions import normalize_providers, open_session
from lora_export.parity.validate import GENERATE_BYTES, validate
from lora_export.pipeline import validate_and_report

CONFIG = ModelConfig(dim=32, depth=1, heads=2, dim_head=16, n_local_attn_heads=1, local_attn_window_size=8,
                     max_seq_len=32, r=4)
FULL_CASES = ["n1", "window_minus_1", "window", "window_plus_1", "not_window_multiple", "max_len", "random_bytes",
              "padding"]
FAST = {"latency_runs": 3}


def make_checkpoint(path: Path, config: ModelConfig, seed: int) -> Path:
    """A checkpoint of ``config`` with seeded random weights (its own base weights)."""
    torch.manual_seed(seed)
    save_checkpoint(path, LoRATransformerLM(config))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the module: on a shared 2-core machine OpenMP's spinning threads otherwise make
    each tiny PyTorch forward pass ~30x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




@pytest.fixture(scope="module")
def merged_result(merged_copy: Path, tiny_checkpoint: Path) -> ParityResult:
    """The untouched merged export with the default providers (CPU, plus CUDA when it runs)."""
    return validate_and_report(merged_copy, tiny_checkpoint, **FAST)


# --------------------------------------------------------------------------- parity of real exports


def test_untouched_merged_export_passes(merged_result: ParityResult, merged_copy: Path) -> None:
    assert merged_result.passed, merged_result.summary
    assert merged_result.status == "passed" and merged_result.precisions is None
    assert merged_result.summary.startswith("PASS")
    assert merged_result.variants == ["merged"]
    assert [case.name for case in merged_result.cases] == FULL_CASES
    assert all(c.passed for c in merged_result.comparisons)
    assert merged_result.generations and all(g.identical for g in merged_result.generations)
    backends = {t.backend for t in merged_result.latencies}
    assert {"PyTorch eager (CPU)", "ORT CPUExecutionProvider"} <= backends
    assert merged_result.report_dir == merged_copy.with_name("tiny_parity")
    assert {p.name for p in merged_result.report_files.values()} == {"parity.json", "parity.md", "parity.html"}
    assert merged_result.report_files["html"].read_text().count("src='data:image/png;base64,") == 2


def test_report_json_validates_against_schema(merged_result: ParityResult, schema: dict) -> None:
    document = json.loads(merged_result.report_files["json"].read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    assert document["schema_version"] == 1 and document["passed"] is True and document["status"] == "passed"
    assert [case["name"] for case in document["cases"]] == FULL_CASES


def test_implicit_cuda_is_reported_not_run(merged_result: ParityResult, cuda_runs: bool) -> None:
    if cuda_runs:
        pytest.skip("CUDA runs on this machine")
    status = next(p for p in merged_result.providers if p.requested == "cuda")
    assert not status.ran and status.reason
    assert "CUDAExecutionProvider" not in {c.provider for c in merged_result.comparisons}
    markdown = merged_result.report_files["markdown"].read_text()
    assert "not available on this machine (reason in parity.json)" in markdown and status.reason not in markdown
    document = json.loads(merged_result.report_files["json"].read_text())
    assert status.reason in [p["reason"] for p in document["providers"]]  # the detail stays in the JSON
    assert "not run" in merged_result.summary


def test_explicit_cuda_that_cannot_run_raises(merged_export: ExportResult, tiny_checkpoint: Path, cuda_runs: bool,
                                              tmp_path: Path) -> None:
    if cuda_runs:
        pytest.skip("CUDA runs on this machine")
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider was requested but cannot run"):
        validate_and_report(merged_export.model_path, tiny_checkpoint, providers=["cpu", "cuda"],
                            explicit_providers=True, report_dir=tmp_path)
    assert issubclass(ProviderUnavailableError, ValueError)


@pytest.mark.gpu
def test_cuda_parity(merged_export: ExportResult, tiny_checkpoint: Path, cuda_runs: bool, tmp_path: Path) -> None:
    if not cuda_runs:
        pytest.skip("CUDA does not run here")
    result = validate_and_report(merged_export.model_path, tiny_checkpoint, providers=["cuda"], explicit_providers=True,
                                 report_dir=tmp_path, **FAST)
    assert result.passed, result.summary
    assert {c.provider for c in result.comparisons} == {"CPUExecutionProvider", "CUDAExecutionProvider"}
    assert "ORT CUDAExecutionProvider" in {t.backend for t in result.latencies}


def test_fp16_model_runs_on_cpu_and_on_cuda_only_where_it_runs(merged_export: ExportResult, tiny_checkpoint: Path,
                                                               cuda_runs: bool, tmp_path: Path, schema: dict) -> None:
    if cuda_runs:
        pytest.skip("CUDA runs on this machine")
    fp16 = convert_fp16(merged_export.model_path, tmp_path / "tiny.fp16.onnx")
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider was requested but cannot run"):
        validate_and_report(fp16, tiny_checkpoint, providers=["cuda"], explicit_providers=True, report_dir=tmp_path)

    result = validate_and_report(fp16, tiny_checkpoint, providers=["cpu"], explicit_providers=True,
                                 report_dir=tmp_path, **FAST)
    assert result.passed and result.precision == "fp16", result.summary
    assert {c.provider for c in result.comparisons} == {"CPUExecutionProvider"}
    document = json.loads(result.report_files["json"].read_text())
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
    assert document["tolerance"]["atol_scale"] == 16 * 2.0**-10


def test_perturbed_weight_fails_and_names_the_worst_case(merged_export: ExportResult, tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    proto = onnx.load(merged_export.model_path)
    bias = next(init for init in proto.graph.initializer if init.name == "lm_head.bias")
    values = numpy_helper.to_array(bias).copy()
    values[101] += 0.05  # byte 'e': every position's logit for it moves by 0.05
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, tmp_path / "perturbed.onnx")

    result = validate_and_report(tmp_path / "perturbed.onnx", tiny_checkpoint, providers=["cpu"], **FAST)
    assert not result.passed
    worst = result.worst
    assert worst is not None and worst.output == "logits" and worst.metrics.worst_index[2] == 101
    assert worst.metrics.max_abs == pytest.approx(0.05, rel=1e-3)
    assert f"worst case '{worst.case}', output 'logits'" in result.summary
    markdown = result.report_files["markdown"].read_text()
    assert "FAIL" in markdown.splitlines()[0]
    assert f"Worst case: '{worst.case}', output 'logits'" in markdown
    assert json.loads(result.report_files["json"].read_text())["worst"]["case"] == worst.case


def test_adapter_form_with_and_without_its_adapter(adapter_export: ExportResult, tiny_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    progress: list[tuple[int, int, str]] = []
    result = validate_and_report(adapter_export.model_path, tiny_checkpoint,
                                 adapter_path=adapter_export.adapter_path, providers=["cpu"], report_dir=tmp_path,
                                 progress=lambda *step: progress.append(step), **FAST)
    assert result.passed, result.summary
    assert progress[-1] == (16, 16, "adapter/CPUExecutionProvider/padding: batch 4 x 32 tokens")
    assert result.variants == ["base", "adapter"]
    by_variant = {v: [c for c in result.comparisons if c.variant == v] for v in result.variants}
    assert [c.case for c in by_variant["base"]] == [c.case for c in by_variant["adapter"]] == FULL_CASES
    base_loss, adapter_loss = (next(c.metrics.loss_ref for c in by_variant[v] if c.case == "max_len")
                               for v in ("base", "adapter"))
    assert abs(base_loss - adapter_loss) > 1e-3  # the adapter really changes the model being compared
    assert {g.variant for g in result.generations} == {"base", "adapter"}


def test_second_adapter_validates_against_its_own_checkpoint_and_the_wrong_one_fails(
        adapter_export: ExportResult, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Same base, other r, alpha and targets: validated against its own checkpoint it passes; against the first
    checkpoint it fails naming a layer (the file runs, but is not that checkpoint's trained LoRA)."""
    from conftest import same_base_other_rank

    from lora_export.export.convert import export_adapter

    payload = read_checkpoint(tiny_checkpoint)
    torch.manual_seed(3)
    other = same_base_other_rank(tiny_checkpoint, r=2, seed=3)
    config = ModelConfig.from_dict({**payload["config"], "r": 2, "lora_alpha": 3.0, "lora_targets": ["q", "ff"]})
    second = LoRATransformerLM(config).eval()
    second.load_state_dict({k: v for k, v in other.state_dict().items() if k in second.state_dict()}, strict=False)
    save_checkpoint(tmp_path / "second.pt", second)
    adapter = export_adapter(tmp_path / "second.pt", adapter_export.model_path, tmp_path / "second.onnx_adapter")
    result = validate_and_report(adapter_export.model_path, tmp_path / "second.pt", adapter_path=adapter,
                                 providers=["cpu"], report_dir=tmp_path / "own", **FAST)
    assert result.passed, result.summary
    wrong = validate_and_report(adapter_export.model_path, tiny_checkpoint, adapter_path=adapter, providers=["cpu"],
                                report_dir=tmp_path / "wrong", **FAST)
    assert wrong.status == "failed" and "is not tiny.pt's trained LoRA: layer " in wrong.summary, wrong.summary
    assert any("blocks.0.attn.to_k" in failure and "not in the adapter" in failure for failure in wrong.failures)


# --------------------------------------------------------------------------- bad input


def test_checkpoint_that_does_not_belong_to_the_model(merged_export: ExportResult, tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    config = read_checkpoint(tiny_checkpoint)["config"]
    other_base = make_checkpoint(tmp_path / "other_seed.pt", ModelConfig.from_dict(config), seed=123)
    with pytest.raises(ParityInputError, match="do not belong together: .*different base weights"):
        validate(merged_export.model_path, other_base)
    other_config = make_checkpoint(tmp_path / "other_config.pt", ModelConfig.from_dict({**config, "dim": 48}), seed=0)
    with pytest.raises(ParityInputError, match="model config differs in dim"):
        validate(merged_export.model_path, other_config)


def test_corrupted_or_foreign_onnx(merged_export: ExportResult, tiny_checkpoint: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(merged_export.model_path.read_bytes()[:5000])
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        validate(truncated, tiny_checkpoint)
    with pytest.raises(ExportError, match="no such ONNX model"):
        validate(tmp_path / "missing.onnx", tiny_checkpoint)
    proto = onnx.load(merged_export.model_path)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "foreign.onnx")
    with pytest.raises(ParityInputError, match="no lora_export metadata"):
        validate(tmp_path / "foreign.onnx", tiny_checkpoint)


def test_adapter_that_does_not_fit(merged_export: ExportResult, adapter_export: ExportResult, tiny_checkpoint: Path,
                                   tmp_path: Path) -> None:
    tensors, version = read_adapter(adapter_export.adapter_path)
    name = next(n for n in tensors if n.endswith("fc1.lora_A"))
    wrong_shape = {**tensors, name: np.zeros((tensors[name].shape[0] + 1, 4), np.float32)}
    write_adapter(tmp_path / "wrong_shape.onnx_adapter", wrong_shape, version)
    with pytest.raises(ParityInputError, match=f"adapter does not fit the model: {name}: dim 0"):
        validate(adapter_export.model_path, tiny_checkpoint, adapter_path=tmp_path / "wrong_shape.onnx_adapter")
    write_adapter(tmp_path / "other_base.onnx_adapter", tensors, version + 1)
    with pytest.raises(ParityInputError, match="written for a different base model"):
        validate(adapter_export.model_path, tiny_checkpoint, adapter_path=tmp_path / "other_base.onnx_adapter")
    with pytest.raises(ParityInputError, match="needs an adapter-form model"):
        validate(merged_export.model_path, tiny_checkpoint, adapter_path=adapter_export.adapter_path)


@pytest.mark.parametrize(("option", "message"), [
    ({"providers": ["tpu"]}, "unknown provider 'tpu'"),
    ({"atol": -1.0}, "atol must be a finite number >= 0"),
])
def test_bad_options(merged_export: ExportResult, tiny_checkpoint: Path, tmp_path: Path, option: dict,
                     message: str) -> None:
    with pytest.raises(ParityInputError, match=message):
        validate_and_report(merged_export.model_path, tiny_checkpoint, report_dir=tmp_path, **option)


def test_validate_writes_no_file_and_the_pipeline_writes_the_reports(merged_export: ExportResult,
                                                                      tiny_checkpoint: Path, tmp_path: Path) -> None:
    """validate() returns the result alone (with the sha256 the reports record); validate_and_report writes them,
    refusing a report directory that cannot hold them before any work."""
    before = sorted(merged_export.model_path.parent.iterdir())
    result = validate(merged_export.model_path, tiny_checkpoint, providers=["cpu"], **FAST)
    assert result.passed and result.report_files == {} and result.report_dir is None
    assert sorted(merged_export.model_path.parent.iterdir()) == before
    assert result.checkpoint_sha256 is not None and len(result.checkpoint_sha256) == 64
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        validate_and_report(merged_export.model_path, tiny_checkpoint, report_dir=tmp_path / "file",
                            generate_bytes=0)  # refused before the arguments are even looked at


# --------------------------------------------------------------------------- cases and metrics


def test_case_list_covers_the_window_edges_and_padding() -> None:
    cases = {case.name: case for case in parity_cases(CONFIG, seed=3)}
    assert list(cases) == FULL_CASES
    lengths = {name: case.input_ids.shape[1] for name, case in cases.items()}
    assert lengths == {"n1": 1, "window_minus_1": 7, "window": 8, "window_plus_1": 9, "not_window_multiple": 20,
                       "max_len": 32, "random_bytes": 32, "padding": 32}
    assert cases["n1"].input_ids.shape[0] == 1 and cases["max_len"].input_ids.shape[0] > 1
    assert cases["padding"].attention_mask.sum(axis=1).tolist() == [32, 16, 1, 16]
    assert cases["padding"].attention_mask[3, 0] == 0  # the left-padded row
    again = parity_cases(CONFIG, seed=3)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(cases.values(), again, strict=True))


def test_metrics_ignore_padding_and_catch_nan() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ref = rng.normal(size=(2, 5, 256)).astype(np.float32)
    got = ref.copy()
    got[1, 2:] += 100.0  # only padded positions differ
    metrics, _ = compare_logits(got, ref, ids, mask, TOLERANCES["fp32"])
    assert metrics.max_abs == 0 and metrics.elements == 7 * 256 and metrics.top1_agreement == 1.0
    assert judge(metrics, TOLERANCES["fp32"]) == []
    got[0, 1, 7] = np.nan
    metrics, _ = compare_logits(got, ref, ids, mask, TOLERANCES["fp32"])
    assert not metrics.finite and "NaN or Inf in the output" in judge(metrics, TOLERANCES["fp32"])


def test_top1_counts_ties_within_tolerance_as_agreement() -> None:
    ids = np.zeros((1, 2), np.int64)
    mask = np.ones((1, 2), np.int64)
    ref = np.zeros((1, 2, 256), np.float32)
    ref[0, :, 3], ref[0, :, 4] = 1.0, 1.0 - 2e-5  # a near-tie between bytes 3 and 4
    got = ref.copy()
    got[0, 0, 4] = 1.0 + 1e-6  # flips the argmax of position 0 within the tolerance
    metrics, _ = compare_logits(got, ref, ids, mask, TOLERANCES["fp32"])
    assert metrics.top1_exact == 0.5 and metrics.top1_agreement == 1.0
    got[0, 1, 9] = 2.0  # a decisive flip at position 1
    metrics, _ = compare_logits(got, ref, ids, mask, TOLERANCES["fp32"])
    assert metrics.top1_agreement == 0.5
    assert any("top-1 agreement 50.00%" in f for f in judge(metrics, TOLERANCES["fp32"]))


# --------------------------------------------------------------------------- the verdict itself can fail


def test_open_session_reports_what_really_ran(merged_export: ExportResult, cuda_runs: bool) -> None:
    """CUDA is reported as run exactly when an independent plain session gets it; a fallback to CPU never is."""
    session, status = open_session(merged_export.model_path, "cuda")
    assert status.ran == cuda_runs
    if cuda_runs:
        assert session is not None and session.get_providers()[0] == "CUDAExecutionProvider"
    else:
        assert session is None and status.reason and status.status().startswith("not run: ")
        if "CUDAExecutionProvider" in ort.get_available_providers():  # listed, yet it fell back: say why
            assert status.reason.startswith(("the CUDA provider library did not load", "ONNX Runtime fell back"))
        else:
            assert "install onnxruntime-gpu" in status.reason


@pytest.mark.parametrize("factor", [1.5, 10.0, 90.0])
def test_errors_a_few_times_the_tolerance_fail(factor: float) -> None:
    """One logit off by factor x (atol + rtol |ref|), between 1x and 100x the tolerance, fails the elementwise check."""
    tolerance = TOLERANCES["fp32"]
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (2, 5, 256)).astype(np.float32)
    got = ref.copy()
    got[1, 3, 7] += factor * (tolerance.atol + tolerance.rtol * abs(float(ref[1, 3, 7])))
    ids, mask = np.zeros((2, 5), np.int64), np.ones((2, 5), np.int64)
    metrics, _ = compare_logits(got, ref, ids, mask, tolerance)
    assert metrics.tolerance_used == pytest.approx(factor, rel=1e-3) and metrics.outside == 1
    failures = judge(metrics, tolerance)
    assert len(failures) == 1 and "outside atol" in failures[0]
    metrics, _ = compare_logits(ref.copy(), ref, ids, mask, tolerance)
    assert judge(metrics, tolerance) == []


def test_export_a_few_times_outside_the_tolerance_fails_validation(merged_export: ExportResult,
                                                                   tiny_checkpoint: Path, tmp_path: Path) -> None:
    """End to end: a bias moved by 5x atol (rtol 0) fails, though top-1 and generation may well agree."""
    proto = onnx.load(merged_export.model_path)
    bias = next(init for init in proto.graph.initializer if init.name == "lm_head.bias")
    values = numpy_helper.to_array(bias).copy()
    values[33] += 5e-3
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, tmp_path / "off.onnx")
    result = validate(tmp_path / "off.onnx", tiny_checkpoint, providers=["cpu"], atol=1e-3, rtol=0.0, **FAST)
    assert result.status == "failed"
    assert max(c.metrics.tolerance_used for c in result.comparisons) == pytest.approx(5.0, rel=1e-2)


def test_a_generation_mismatch_fails(merged_export: ExportResult, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A model whose every next byte is '~' generates other bytes than PyTorch: validation fails and says where."""
    proto = onnx.load(merged_export.model_path)
    bias = next(init for init in proto.graph.initializer if init.name == "lm_head.bias")
    values = numpy_helper.to_array(bias).copy()
    values[ord("~")] += 100.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, tmp_path / "tilde.onnx")
    result = validate(tmp_path / "tilde.onnx", tiny_checkpoint, providers=["cpu"], **FAST)
    (generation,) = result.generations
    assert not generation.identical and set(generation.onnx) == {"~"}
    assert generation.first_mismatch == next(i for i, c in enumerate(generation.reference) if c != "~")
    assert result.status == "failed"
    assert any(f.startswith("greedy generation differs") for f in result.failures)


def test_generation_alone_decides_the_verdict(merged_copy: Path, tiny_checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits within tolerance but a different generated byte still fail (the generation check is not decoration)."""
    import lora_export.parity.validate as validate_module

    real = validate_module.greedy_generation

    def one_byte_off(*args, **kwargs):
        reference, got = real(*args, **kwargs)
        got = got.copy()
        got[-1] = (got[-1] + 1) % 256
        return reference, got

    monkeypatch.setattr(validate_module, "greedy_generation", one_byte_off)
    result = validate_and_report(merged_copy, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path, **FAST)
    assert all(c.passed for c in result.comparisons)
    assert result.status == "failed" and any(f.startswith("greedy generation differs") for f in result.failures)
    assert result.generations[0].first_mismatch == GENERATE_BYTES - 1


# --------------------------------------------------------------------------- mutants the mutation run left alive


def _metrics_for(diff: float, loss_ref: float | None = None, loss_onnx: float | None = None,
                 tolerance: Tolerance | None = None) -> Metrics:
    """Metrics of a reference of zeros against an output off by ``diff`` at one logit (exact in binary)."""
    ref = np.zeros((1, 2, 256), np.float32)
    got = ref.copy()
    got[0, 1, 3] = diff
    ones = np.ones((1, 2), np.int64)
    metrics, _ = compare_logits(got, ref, ones, ones, tolerance or Tolerance(2.0**-10, 0.0, 0.0, None))
    metrics.loss_ref, metrics.loss_onnx = loss_ref, loss_onnx
    return metrics


def test_an_error_exactly_at_the_tolerance_passes_and_just_above_fails() -> None:
    """|a - b| <= atol + rtol |b| is numpy's allclose: equality passes (2^-10 is exact in float32 and float64)."""
    tolerance = Tolerance(2.0**-10, 0.0, 0.0, None)
    at_limit = _metrics_for(2.0**-10)
    assert at_limit.tolerance_used == 1.0 and at_limit.outside == 0 and judge(at_limit, tolerance) == []
    assert judge(_metrics_for(2.0**-10 + 2.0**-20), tolerance)


def test_eval_loss_delta_is_judged_up_to_its_limit() -> None:
    tolerance = Tolerance(None, None, 0.0, 0.25)
    assert judge(_metrics_for(0.0, 2.0, 2.25, tolerance), tolerance) == []  # exactly the limit passes
    (failure,) = judge(_metrics_for(0.0, 2.0, 2.5, tolerance), tolerance)
    assert failure == "eval loss delta 0.5 > 0.25 nats/byte"
    assert judge(_metrics_for(0.0, None, None, tolerance), tolerance) == []  # N = 1: no loss to judge


def test_providers_by_full_name_and_the_error_lists_the_choices() -> None:
    assert normalize_providers(["CUDAExecutionProvider", "cpuexecutionprovider"]) == ["cpu", "cuda"]
    with pytest.raises(ParityInputError, match="unknown provider 'tpu': choose from cpu, cuda$"):
        normalize_providers(["tpu"])


@pytest.mark.parametrize(("atol", "rtol", "expected"), [
    (None, None, (1e-4, 1e-3)), (0.5, None, (0.5, 1e-3)), (None, 0.5, (1e-4, 0.5)), (0.25, 0.5, (0.25, 0.5)),
])
def test_a_tolerance_override_replaces_only_what_is_given(atol, rtol, expected) -> None:
    tolerance = resolve_tolerance("fp32", atol, rtol)
    assert (tolerance.atol, tolerance.rtol) == expected and tolerance.top1_min == TOLERANCES["fp32"].top1_min
    assert resolve_tolerance("int8", None, None) == TOLERANCES["int8"]  # int8 keeps its elementwise check off


def test_validation_on_the_users_own_text(merged_export: ExportResult, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--data: the real-text cases and the prompt come from the user's files (a directory too), and say so."""
    (tmp_path / "data" / "sub").mkdir(parents=True)
    own = b"Quarterly revenue grew in every region we serve.\n" * 8
    (tmp_path / "data" / "a.txt").write_bytes(own)
    (tmp_path / "data" / "sub" / "b.txt").write_bytes(own.upper())
    result = validate_and_report(merged_export.model_path, tiny_checkpoint, data=[tmp_path / "data"], providers=["cpu"],
                                 report_dir=tmp_path / "r", **FAST)
    assert result.passed, result.summary
    real_text = [case for case in result.cases if case.source != "random bytes"]
    assert real_text and all(case.source == "your data: data" for case in real_text)
    assert any("your data: data" in note for note in result.notes)
    assert result.generations[0].prompt in own.decode() + own.upper().decode()
    (tmp_path / "short.txt").write_bytes(b"too short")
    with pytest.raises(ParityInputError, match="needs more than max_seq_len"):
        validate_and_report(merged_export.model_path, tiny_checkpoint, data=[tmp_path / "short.txt"],
                            report_dir=tmp_path / "s")


def test_data_too_short_is_refused_before_any_session_or_edge_build_runs(merged_export: ExportResult,
                                                                         tiny_checkpoint: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A --data text too short for the cases is a bad input, refused before ORT sessions open and before the
    precision table builds and times every edge build."""
    import lora_export.parity.validate as validate_module

    def must_not_run(*args, **kwargs):
        pytest.fail("ran before the too-short --data text was refused")

    monkeypatch.setattr(validate_module, "measure_builds", must_not_run)
    monkeypatch.setattr(validate_module, "open_session", must_not_run)
    monkeypatch.setattr(validate_module, "build_model", must_not_run)
    (tmp_path / "short.txt").write_bytes(b"too short")
    with pytest.raises(ParityInputError, match="needs more than max_seq_len"):
        validate(merged_export.model_path, tiny_checkpoint, data=[tmp_path / "short.txt"], providers=["cpu"],
                 precision_models={"fp32": merged_export.model_path}, **FAST)
