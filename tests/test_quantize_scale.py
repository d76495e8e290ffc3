"""Edge builds of models too big for memory (issue 18), on the tiny exports: the file way (a source with external
data, or a forced tiny threshold) writes ``<name>.data``, passes the checker by path and gives what the in-memory
build of the same model gives; it never touches the source, and a failure leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import session

from lora_export.errors import EdgeExportError, ExportError, OutputError
from lora_export.export.adapters import read_adapter
from lora_export.export.onnx_files import count_parameters_onnx, read_metadata
from lora_export.export.quantize import (
    build_precision,
    convert_fp16,
    convert_model_fp16,
    quantize_int4,
    quantize_int8,
    write_precision,
)
from lora_export.files import file_sha256, staged_outputs

TINY_THRESHOLD = 1000  # bytes: every tiny model is above it
BUILDS = {"int8": quantize_int8, "int4": quantize_int4, "fp16": convert_fp16}


def tree(directory: Path) -> dict[str, str]:
    """{name: sha256} of every file in ``directory``, hidden ones included."""
    return {path.name: file_sha256(path) for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def external_source(merged_export, tmp_path_factory) -> Path:
    """The merged export re-saved with every weight in ``tiny.onnx.data``, beside a user's file named as
    quantize_dynamic's scratch copy would be (``<stem>-inferred.onnx``)."""
    path = tmp_path_factory.mktemp("external") / "tiny.onnx"
    onnx.save_model(onnx.load(merged_export.model_path), path, save_as_external_data=True,
                    location="tiny.onnx.data", size_threshold=0)
    (path.parent / "tiny-inferred.onnx").write_bytes(b"the user's own file")
    return path


def ort_outputs(path: Path, adapter: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of the model at ``path`` on fixed ids (and the adapter's LoRA inputs) on ORT CPU."""
    rng = np.random.default_rng(7)
    feeds = {"input_ids": rng.integers(0, 256, (2, 11), dtype=np.int64), "attention_mask": np.ones((2, 11), np.int64)}
    return session(path).run(None, {**feeds, **adapter})


def weights(path: Path) -> dict[str, np.ndarray]:
    """The initializers of a model file (external data read), by name."""
    return {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("precision", list(BUILDS))
@pytest.mark.parametrize("form", ["merged-external-source", "adapters-tiny-threshold"])
def test_file_build_equals_the_in_memory_build(precision, form, merged_export, adapter_export, external_source,
                                               tmp_path):
    """Identical, not just close: both ways run the same converter on the same weights with the same inferred
    shapes, so every weight and every logit must match bit for bit."""
    inline = merged_export if form.startswith("merged") else adapter_export
    source, options = (external_source, {}) if form.startswith("merged") else (
        inline.model_path, {"external_data_threshold": TINY_THRESHOLD})
    before = tree(source.parent)
    reference = BUILDS[precision](inline.model_path, tmp_path / "memory" / f"tiny.{precision}.onnx")
    built = BUILDS[precision](source, tmp_path / "file" / f"tiny.{precision}.onnx", **options)

    assert tree(source.parent) == before  # nothing written beside the source, its files as they were
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name, f"{built.name}.data"]
    assert not Path(f"{reference}.data").exists()
    onnx.checker.check_model(str(built), full_check=True)
    graph = onnx.load(built, load_external_data=False)
    assert read_metadata(graph) == read_metadata(onnx.load(reference))
    assert read_metadata(graph)["precision"] == precision
    assert [(n.op_type, list(n.input)) for n in graph.graph.node] == [
        (n.op_type, list(n.input)) for n in onnx.load(reference).graph.node]
    expected_weights, got_weights = weights(reference), weights(built)
    assert got_weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        np.testing.assert_array_equal(got_weights[name], value, err_msg=name)
    adapters = [{}] if inline is merged_export else [{}, read_adapter(inline.adapter_path)[0]]
    for adapter in adapters:
        for got, expected in zip(ort_outputs(built, adapter), ort_outputs(reference, adapter), strict=True):
            np.testing.assert_array_equal(got, expected)


def test_write_precision_lands_with_its_stage_and_keeps_float16_io(merged_export, external_source, tmp_path):
    """The decoder's building block: the build goes into the caller's stage, lands with the caller's other files,
    and makes the graph outputs named in float16_io float16 as the in-memory converter does."""
    output, config = tmp_path / "genai" / "model.onnx", tmp_path / "genai" / "genai_config.json"
    with staged_outputs() as stage:
        graph = write_precision(external_source, output, "fp16", stage, float16_io=["logits"])
        stage.path(config).write_text("{}")
        assert not output.exists()
    assert sorted(p.name for p in output.parent.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data"]
    reference = convert_model_fp16(onnx.load(merged_export.model_path), "tiny", float16_io=["logits"])
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert count_parameters_onnx(graph) == count_parameters_onnx(reference)
    onnx.save_model(reference, tmp_path / "reference.onnx")
    (got,), (expected,) = ort_outputs(output, {}), ort_outputs(tmp_path / "reference.onnx", {})
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, expected)


def test_write_precision_reads_a_scratch_source_in_place(external_source, tmp_path, monkeypatch):
    """A source in the caller's own scratch folder (the decoder's staged fp32 file) goes to quantize_dynamic as
    it is, no copy; the build is the same."""
    import onnxruntime.quantization

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for name in ("tiny.onnx", "tiny.onnx.data"):
        (scratch / name).write_bytes((external_source.parent / name).read_bytes())
    real, seen = onnxruntime.quantization.quantize_dynamic, []

    def spy(model_input: object, *args: object, **kwargs: object) -> None:
        seen.append(model_input)
        real(model_input, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", spy)
    output = tmp_path / "out" / "tiny.int8.onnx"
    with staged_outputs() as stage:
        write_precision(scratch / "tiny.onnx", output, "int8", stage, scratch_source=True)
    assert seen == [scratch / "tiny.onnx"] and sorted(p.name for p in scratch.iterdir()) == [
        "tiny.onnx", "tiny.onnx.data"]
    reference = quantize_int8(external_source, tmp_path / "reference" / "tiny.int8.onnx")
    assert seen[1] != seen[0]  # the user's export: read from a copy
    for got, expected in zip(ort_outputs(output, {}), ort_outputs(reference, {}), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("precision", list(BUILDS))
def test_failed_check_on_file_leaves_nothing(precision, external_source, tmp_path, monkeypatch):
    """The output and its data are written in full before the checker runs on the file; its failure must take
    them away again."""
    real_check = onnx.checker.check_model

    def fail_on_files(model: onnx.ModelProto | str, *args: object, **kwargs: object) -> None:
        if isinstance(model, str):
            raise onnx.checker.ValidationError("broken on purpose")
        real_check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", fail_on_files)
    before = tree(external_source.parent)
    with pytest.raises(ExportError, match="fails onnx.checker or shape inference: broken on purpose$"):
        BUILDS[precision](external_source, tmp_path / "out" / "tiny.onnx")
    assert list(tmp_path.iterdir()) == [] and tree(external_source.parent) == before


def test_quantizer_failure_mid_write_leaves_nothing(external_source, tmp_path, monkeypatch):
    """quantize_dynamic gets a copy of the source by path (its scratch files go beside that, not beside the
    user's model) and writes the output's weights to external data; what it half-wrote goes when it fails."""
    calls = []

    def half_write(model_input: object, output: Path, **kwargs: object) -> None:
        calls.append((model_input, kwargs["use_external_data_format"]))
        Path(output).write_bytes(b"half a model")
        Path(f"{output}.data").write_bytes(b"half the weights")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", half_write)
    with pytest.raises(EdgeExportError, match="quantization failed: disk on fire$"):
        quantize_int8(external_source, tmp_path / "tiny.int8.onnx")
    ((model_input, external),) = calls
    assert isinstance(model_input, Path) and model_input.name == "tiny.onnx" and external
    assert model_input.parent != external_source.parent
    assert list(tmp_path.iterdir()) == []


def test_file_build_never_replaces_its_source(external_source, tmp_path):
    before = tree(external_source.parent)
    link = tmp_path / "link.onnx"
    link.symlink_to(external_source)
    for output in (external_source, link):
        with pytest.raises(OutputError, match="would overwrite the input"):
            build_precision(external_source, output, "int4")
        with pytest.raises(OutputError, match="would overwrite the input"):
            quantize_int8(external_source, output)
    with pytest.raises(EdgeExportError, match="cannot build 'fp32'"):
        build_precision(external_source, tmp_path / "x.onnx", "fp32")
    assert tree(external_source.parent) == before and list(tmp_path.iterdir()) == [link]
