"""Edge builds of the shared tiny exports: int8 and fp16 against PyTorch, ORT format against its source, bad inputs.

The exports are conftest's session-wide merged_export / adapter_export; builds go to private folders (copies of
the models where a test needs the default output beside its input), never beside the shared files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_lora_model, same_base_other_rank, session, torch_logits

from lora_export.errors import EdgeExportError, ExportError, OutputError, ParityInputError
from lora_export.export.adapters import activate_adapters, attach_adapter, lora_input_specs, read_adapter
from lora_export.export.convert import ExportResult, export_adapter
from lora_export.export.int4_recipes import INT4_RECIPES
from lora_export.export.onnx_files import read_metadata
from lora_export.export.quantize import (
    constant_weight_nodes,
    convert_fp16,
    convert_ort_format,
    quantize_int4,
    quantize_int8,
)
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint
from lora_export.parity.metrics import TOLERANCES, compare_logits, judge
from lora_export.parity.precisions import compare_precisions, heldout_windows
from lora_export.pipeline import validate_and_report

FAST = {"warmup": 1, "runs": 3}


def prose_feeds(batch: int, n: int) -> dict[str, np.ndarray]:
    ids = heldout_windows(batch, n)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}



@pytest.fixture(scope="module")
def merged_int8(merged_copy: Path) -> Path:
    """int8 build of the merged copy, at the default output path."""
    return quantize_int8(merged_copy)


@pytest.fixture(scope="module")
def adapters_int8(adapter_export: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 build of the adapters-as-inputs export, in a private folder."""
    return quantize_int8(adapter_export.model_path, tmp_path_factory.mktemp("edge_adapters") / "tiny.int8.onnx")


def test_int8_merged_passes_against_pytorch_and_is_smaller(merged_copy, merged_int8, tiny_checkpoint):
    assert merged_int8 == merged_copy.with_name("tiny.int8.onnx")
    fp32, int8 = compare_precisions(tiny_checkpoint, {"fp32": merged_copy, "int8": merged_int8}, **FAST)
    assert fp32["passed"] and fp32["top1_agreement"] == 1.0
    assert int8["status"] == "ran" and int8["provider"] == "CPUExecutionProvider"
    assert int8["passed"], int8["failures"]
    assert int8["top1_agreement"] >= TOLERANCES["int8"].top1_min
    assert abs(int8["eval_loss_change_pct"]) < 1.0
    assert int8["file_size"] < 0.6 * fp32["file_size"]
    assert [(t["batch"], t["seq_len"]) for t in int8["latency"]] == [(1, 32)]

    model = onnx.load(merged_int8)
    assert read_metadata(model) == {**read_metadata(onnx.load(merged_copy)), "precision": "int8"}
    assert constant_weight_nodes(model) == []  # every weight MatMul and the embedding Gather are quantized
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {node.op_type for node in model.graph.node}


def test_int8_base_keeps_float_adapters_that_swap_in_one_session(adapters_int8, adapter_export, tiny_checkpoint,
                                                                 tmp_path):
    model = onnx.load(adapters_int8)
    specs = lora_input_specs(model)
    assert specs == lora_input_specs(onnx.load(adapter_export.model_path))
    defaults = {init.name: init for init in model.graph.initializer}
    for name, (elem_type, _) in specs.items():
        assert elem_type == onnx.TensorProto.FLOAT
        assert defaults[name].data_type == onnx.TensorProto.FLOAT and 0 in defaults[name].dims
    readers = [node for node in model.graph.node if set(node.input) & set(specs)]
    assert readers and {node.op_type for node in readers} <= {"MatMul", "Gather"}  # LoRA stays float

    sess = session(adapters_int8)
    feeds = prose_feeds(4, 32)
    reference = load_checkpoint(tiny_checkpoint)
    attach_adapter(reference, None)
    base = torch_logits(reference, feeds)
    runs = [("base", None, base)]
    for r, seed in ((2, 1), (6, 2)):
        ckpt = tmp_path / f"r{r}.pt"
        save_checkpoint(ckpt, same_base_other_rank(tiny_checkpoint, r, seed))
        adapter = export_adapter(ckpt, adapters_int8, tmp_path / f"r{r}.onnx_adapter")  # metadata kept: it fits
        attach_adapter(reference, read_adapter(adapter)[0])
        runs.append((f"r{r}", adapter, torch_logits(reference, feeds)))
    for name, adapter, expected in runs:
        run_options, _adapters = activate_adapters(adapter) if adapter is not None else (None, [])
        got = sess.run(None, feeds, run_options)[0]
        metrics, _ = compare_logits(got, expected, feeds["input_ids"], feeds["attention_mask"], TOLERANCES["int8"])
        assert not judge(metrics, TOLERANCES["int8"]), (name, judge(metrics, TOLERANCES["int8"]))
        if adapter is not None:  # the adapter really ran: int8 output is near base + adapter, far from the base
            assert np.abs(got - expected).mean() < 0.2 * np.abs(got - base).mean()


def test_int4_merged_is_judged_by_top1_and_loss_with_every_weight_matmul_in_4_bits(merged_copy, tiny_checkpoint,
                                                                                   tmp_path):
    """The tiny random model's logits are near-ties, so 16 levels per block flip some argmaxes: the verdict must
    follow the int4 limits exactly, and the error stay far below the logits' own spread."""
    int4_path = quantize_int4(merged_copy, tmp_path / "tiny.int4.onnx", recipe=INT4_RECIPES["rtn"])
    fp32, int4 = compare_precisions(tiny_checkpoint, {"fp32": merged_copy, "int4": int4_path}, **FAST)
    limits = TOLERANCES["int4"]
    assert int4["status"] == "ran" and 0.7 <= int4["top1_agreement"] < 1.0
    assert int4["passed"] == (int4["top1_agreement"] >= limits.top1_min
                              and int4["eval_loss"] - int4["eval_loss_ref"] <= limits.loss_delta_max), int4
    feeds = prose_feeds(4, 32)
    exact, approx = session(merged_copy).run(None, feeds)[0], session(int4_path).run(None, feeds)[0]
    assert np.abs(approx - exact).mean() < 0.25 * exact.std()  # a broken scale or zero point: ~1x
    model = onnx.load(int4_path)
    assert read_metadata(model)["precision"] == "int4"
    assert constant_weight_nodes(model, ("MatMul",)) == []
    blocks = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert blocks and all({a.name: a.i for a in node.attribute}["bits"] == 4 for node in blocks)
    assert all({a.name: a.i for a in node.attribute}["block_size"] == 32 for node in blocks)


def test_int4_base_keeps_float_adapters_that_swap(adapter_export, tiny_checkpoint, tmp_path):
    int4_path = quantize_int4(adapter_export.model_path, tmp_path / "tiny.int4.onnx")
    model = onnx.load(int4_path)
    assert lora_input_specs(model) == lora_input_specs(onnx.load(adapter_export.model_path))
    feeds = prose_feeds(4, 32)
    reference = load_checkpoint(tiny_checkpoint)
    trained = torch_logits(reference, feeds)
    attach_adapter(reference, None)
    base = torch_logits(reference, feeds)
    sess = session(int4_path)
    run_options, _adapters = activate_adapters(adapter_export.adapter_path)
    got_base, got_trained = sess.run(None, feeds)[0], sess.run(None, feeds, run_options)[0]
    for got, expected, other in ((got_base, base, trained), (got_trained, trained, base)):
        metrics, _ = compare_logits(got, expected, feeds["input_ids"], feeds["attention_mask"], TOLERANCES["int4"])
        assert metrics.top1_agreement >= 0.7
        assert metrics.loss_onnx - metrics.loss_ref <= TOLERANCES["int4"].loss_delta_max
        assert np.abs(got - expected).mean() < 0.5 * np.abs(got - other).mean()  # the right variant ran


def test_ort_format_of_merged_model_matches_its_source(merged_copy):
    ort_path, config_path = convert_ort_format(merged_copy)
    assert (ort_path, config_path) == (merged_copy.with_suffix(".ort"),
                                       merged_copy.with_name("tiny.required_operators.config"))
    feeds = prose_feeds(2, 19)
    np.testing.assert_allclose(session(ort_path).run(None, feeds)[0], session(merged_copy).run(None, feeds)[0],
                               atol=1e-6, rtol=1e-6)
    text = config_path.read_text()
    assert f"# - {ort_path.resolve()}\n" in text  # the header names the final .ort, not the tool's temp folder
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    ops = {op for line in lines for op in line.split(";")[2].split(",")}
    assert all(len(line.split(";")) == 3 for line in lines)
    assert {"MatMul", "Gather", "Softmax"} <= ops


def test_ort_format_of_int8_adapters_model_swaps_adapters(adapters_int8, adapter_export, tmp_path):
    ort_path, config_path = convert_ort_format(adapters_int8, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.int8.ort", "tiny.int8.required_operators.config"]
    assert any("Quantize" in line for line in config_path.read_text().splitlines())
    feeds = prose_feeds(2, 11)
    run_options, _adapters = activate_adapters(adapter_export.adapter_path)
    for options in (None, run_options):
        np.testing.assert_allclose(session(ort_path).run(None, feeds, options)[0],
                                   session(adapters_int8).run(None, feeds, options)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["merged", "adapters"])
def test_fp16_build_keeps_float32_boundary(form, merged_export, adapter_export, tiny_checkpoint, tmp_path, cuda_runs):
    source = merged_export.model_path if form == "merged" else adapter_export.model_path
    path = convert_fp16(source, tmp_path / "tiny.fp16.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    model, fp32 = onnx.load(path), onnx.load(source)
    boundary = [(v.name, v.type.tensor_type.elem_type) for v in (*fp32.graph.input, *fp32.graph.output)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)] == boundary
    specs = lora_input_specs(model)
    assert len(specs) == (14 if form == "adapters" else 0)
    types = {init.name: init.data_type for init in model.graph.initializer}
    assert {types[name] for name in specs} <= {onnx.TensorProto.FLOAT}  # rank-0 defaults stay float32
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    weights = [init for init in model.graph.initializer
               if init.name not in specs and init.data_type in floats and len(init.dims) == 2]
    assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights)
    assert read_metadata(model)["precision"] == "fp16"
    session(path)  # ONNX Runtime loads it

    (row,) = compare_precisions(tiny_checkpoint, {"fp16": path}, **FAST)  # CUDA where it runs, else CPU
    assert row["provider"] == ("CUDAExecutionProvider" if cuda_runs else "CPUExecutionProvider")
    assert row["status"] == "ran" and row["passed"] and row["latency"], row


@pytest.mark.gpu
def test_fp16_parity_on_cuda(merged_export, tiny_checkpoint, tmp_path, cuda_runs):
    if not cuda_runs:
        pytest.skip("CUDA does not run here")
    path = convert_fp16(merged_export.model_path, tmp_path / "tiny.fp16.onnx")
    (row,) = compare_precisions(tiny_checkpoint, {"fp16": path}, **FAST)
    assert row["status"] == "ran" and row["passed"], row


def test_corrupt_model_raises_and_writes_nothing(merged_export, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(merged_export.model_path.read_bytes()[:5000])
    for build in (quantize_int8, convert_fp16, convert_ort_format):
        with pytest.raises(ExportError, match="not a readable ONNX model"):
            build(corrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.onnx"]


def test_quantization_failure_raises_and_writes_nothing(merged_export, tmp_path, monkeypatch):
    def fail(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no kernel for this\nsecond line")

    monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", fail)
    with pytest.raises(EdgeExportError, match="quantization failed: no kernel for this$"):
        quantize_int8(merged_export.model_path, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_ort_conversion_failure_leaves_nothing(tmp_path):
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([node], "g", [value], [onnx.helper.make_tensor_value_info(
        "y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "bad.onnx")
    with pytest.raises(EdgeExportError, match="ORT format conversion failed"):
        convert_ort_format(tmp_path / "bad.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_bad_outputs_and_sources_are_refused(merged_export, merged_int8, tmp_path):
    with pytest.raises(OutputError, match="cannot be created"):
        quantize_int8(merged_export.model_path, Path(os.devnull) / "missing" / "x.onnx")
    with pytest.raises(OutputError, match="cannot be created"):
        convert_ort_format(merged_export.model_path, Path(os.devnull) / "missing")
    with pytest.raises(ExportError, match="must end in .onnx"):
        convert_fp16(merged_export.model_path, tmp_path / "x.bin")
    with pytest.raises(OutputError, match="would overwrite the input"):
        quantize_int8(merged_int8, merged_int8)
    with pytest.raises(EdgeExportError, match="is already int8"):
        convert_fp16(merged_int8, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory(merged_export, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(OutputError, match="not writable"):
            quantize_int8(merged_export.model_path, locked / "x.onnx")
        with pytest.raises(OutputError, match="not writable"):
            convert_ort_format(merged_export.model_path, locked)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_compare_with_the_trained_adapter_active(adapter_export, adapters_int8, tiny_checkpoint):
    rows = compare_precisions(tiny_checkpoint, {"fp32": adapter_export.model_path, "int8": adapters_int8},
                              adapter_path=adapter_export.adapter_path, shapes=[(2, 16)], **FAST)
    assert [row["precision"] for row in rows] == ["fp32", "int8"]
    assert all(row["passed"] for row in rows), [row["failures"] for row in rows]
    assert rows[0]["max_abs"] < 1e-4
    assert [(t["batch"], t["seq_len"]) for t in rows[1]["latency"]] == [(2, 16)]


def test_compare_refuses_models_that_do_not_fit(merged_copy, tiny_checkpoint, tmp_path):
    with pytest.raises(EdgeExportError, match="is fp32, given as int8"):
        compare_precisions(tiny_checkpoint, {"int8": merged_copy})
    with pytest.raises(EdgeExportError, match="unknown precision 'bf16'"):
        compare_precisions(tiny_checkpoint, {"bf16": merged_copy})
    other = tmp_path / "other.pt"
    save_checkpoint(other, make_lora_model(seed=99))
    with pytest.raises(ParityInputError, match="do not belong together"):
        compare_precisions(other, {"fp32": merged_copy})


def test_validate_reports_the_precision_table(merged_copy, merged_int8, tiny_checkpoint, tmp_path):
    with pytest.raises(EdgeExportError, match="is fp32, given as int8"):
        validate_and_report(merged_copy, tiny_checkpoint, precision_models={"int8": merged_copy}, report_dir=tmp_path)
    result = validate_and_report(merged_copy, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path, latency_runs=2,
                                 precision_models={"fp32": merged_copy, "int8": merged_int8})
    assert result.passed, result.summary
    assert [(row["precision"], row["status"], row["passed"]) for row in result.precisions] == [
        ("fp32", "ran", True), ("int8", "ran", True)]
    assert json.loads(result.report_files["json"].read_text())["precisions"][1]["precision"] == "int8"
    markdown = result.report_files["markdown"].read_text()
    assert "## Precisions" in markdown and "| int8 | " in markdown
    assert "<td>int8</td>" in result.report_files["html"].read_text()
