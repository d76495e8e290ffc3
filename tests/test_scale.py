"""Models of real size (issue 18), on tiny models: the file way of exporting a model too big for memory (forced
with a tiny --external-data-threshold) gives what the in-memory way gives, in both forms and in genai; and
tools/make_sized.py writes checkpoints of the size asked for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli, session

from lora_export.export.adapters import read_adapter
from lora_export.export.convert import export_onnx
from lora_export.export.onnx_files import PROTOBUF_LIMIT, size_text, too_big_for_memory
from lora_export.files import file_sha256
from lora_export.genai.decoder import export_decoder
from lora_export.layout import ADAPTER_FILE, MODEL_FILE
from lora_export.model.checkpoint import read_checkpoint

TINY_THRESHOLD = 1000  # bytes: every tiny model is above it
#: Sizes of the decoder graph's symbolic axes in the feeds of ``decoder_feeds``.
DECODER_AXES = {"batch": 2, "seq": 3, "total": 8, "past_seq": 5, "past_local": 4}


def scoring_feeds(adapter: dict[str, np.ndarray] | None = None, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, 256, (2, 13), dtype=np.int64), "attention_mask": np.ones((2, 13), np.int64)}
    return {**feeds, **(adapter or {})}


def decoder_feeds(path: Path, adapter: dict[str, np.ndarray], seed: int = 5) -> dict[str, np.ndarray]:
    """Random feeds for every input of the decoder graph at ``path`` (past 5 positions, 3 new), the adapter's
    tensors for its LoRA inputs."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, 256, (2, 3), dtype=np.int64), "attention_mask": np.ones((2, 8), np.int64),
             "position_ids": np.tile(np.arange(5, 8, dtype=np.int64), (2, 1)), **adapter}
    for value in session(path).get_inputs():
        if value.name not in feeds:
            shape = [DECODER_AXES[d] if isinstance(d, str) else d for d in value.shape]
            dtype = np.float16 if value.type == "tensor(float16)" else np.float32
            feeds[value.name] = rng.normal(0, 1, shape).astype(dtype)
    return feeds


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(path).run(None, feeds)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapters"])
def test_file_way_gives_the_inline_outputs(merge, merged_export, adapter_export, tiny_checkpoint, tmp_path):
    inline = merged_export if merge else adapter_export
    result = export_onnx(tiny_checkpoint, tmp_path / "big.onnx", merge=merge, external_data_threshold=TINY_THRESHOLD)
    assert result.external_data and (tmp_path / "big.onnx.data").is_file()
    assert not result.simplified and result.nodes_final == result.nodes_exported
    assert "(simplification skipped: model above 1000 bytes)" in result.summary()
    assert onnx.load(result.model_path, load_external_data=False).graph.value_info  # shapes inferred on the file
    assert result.parameters == inline.parameters
    adapters = [{}] if merge else [{}, read_adapter(inline.adapter_path)[0]]  # rank-0 defaults, then the adapter
    for adapter in adapters:
        feeds = scoring_feeds(adapter)
        np.testing.assert_allclose(outputs(result.model_path, feeds)[0], outputs(inline.model_path, feeds)[0],
                                   rtol=1e-5, atol=1e-5)
    if not merge:
        assert file_sha256(result.adapter_path) == file_sha256(inline.adapter_path)


def test_no_simplify_says_so_above_the_threshold(tiny_checkpoint, tmp_path):
    result = export_onnx(tiny_checkpoint, tmp_path / "big.onnx", simplify_graph=False,
                         external_data_threshold=TINY_THRESHOLD)
    assert result.external_data and result.simplify_note == "simplification skipped (--no-simplify)"


def test_cli_summary_says_why_and_validation_passes(tiny_checkpoint, tmp_path):
    result = run_cli("export", tiny_checkpoint, "--adapters-as-inputs", "-o", tmp_path / "big.onnx",
                     "--external-data-threshold", str(TINY_THRESHOLD), "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "simplification skipped: model above 1000 bytes" in result.output
    assert (tmp_path / "big.onnx.data").is_file()


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapters"])
def test_genai_file_way_gives_the_inline_outputs(merge, genai_merged, genai_adapters, tiny_checkpoint, tmp_path):
    inline = genai_merged if merge else genai_adapters
    directory = export_decoder(tiny_checkpoint, tmp_path / "genai", merge=merge,
                               external_data_threshold=TINY_THRESHOLD)
    assert (directory / f"{MODEL_FILE}.data").is_file() and not (inline / f"{MODEL_FILE}.data").exists()
    adapter = {} if merge else read_adapter(directory / ADAPTER_FILE)[0]
    feeds = decoder_feeds(inline / MODEL_FILE, adapter)
    for got, expected in zip(outputs(directory / MODEL_FILE, feeds), outputs(inline / MODEL_FILE, feeds), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("precision", "merge"), [("int8", True), ("int4", False), ("fp16", True)])
def test_genai_builds_the_file_way_as_in_memory(precision, merge, tiny_checkpoint, tmp_path):
    """A decoder too big for memory in int8 / int4 / fp16: fp32 weights written from the torch tensors to a scratch
    file, built from it: the same outputs as the decoder built in memory, and no scratch file left behind."""
    inline = export_decoder(tiny_checkpoint, tmp_path / "inline", merge=merge, precision=precision)
    directory = export_decoder(tiny_checkpoint, tmp_path / "file", merge=merge, precision=precision,
                               external_data_threshold=TINY_THRESHOLD)
    assert (directory / f"{MODEL_FILE}.data").is_file() and not (inline / f"{MODEL_FILE}.data").exists()
    assert sorted(p.name for p in directory.iterdir()) == sorted([p.name for p in inline.iterdir()]
                                                                 + [f"{MODEL_FILE}.data"])
    adapter = {} if merge else read_adapter(directory / ADAPTER_FILE)[0]
    feeds = decoder_feeds(inline / MODEL_FILE, adapter)
    for got, expected in zip(outputs(directory / MODEL_FILE, feeds), outputs(inline / MODEL_FILE, feeds), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("genai", [False, True], ids=["scoring", "genai"])
def test_file_way_never_serializes_the_whole_model(genai, tiny_checkpoint, tmp_path, monkeypatch):
    """Above the threshold the weights go from the torch tensors to the data file: the exporter's whole-model proto
    (a second copy of every weight) is never built, and the traced base shares the checkpoint model's tensors."""
    from torch.onnx._internal.exporter._onnx_program import ONNXProgram

    from lora_export.export import tracing

    def refuse(_program):
        raise AssertionError("the whole model was serialized in memory")

    monkeypatch.setattr(ONNXProgram, "model_proto", property(refuse))
    shared = []
    real_base_model_of = tracing.base_model_of

    def spy(model, state):
        base = real_base_model_of(model, state)
        shared.append(all(base.state_dict()[name].data_ptr() == tensor.data_ptr() for name, tensor in state.items()))
        return base

    monkeypatch.setattr(tracing, "base_model_of", spy)
    if genai:
        export_decoder(tiny_checkpoint, tmp_path / "genai", external_data_threshold=TINY_THRESHOLD)
    else:
        export_onnx(tiny_checkpoint, tmp_path / "big.onnx", merge=False, external_data_threshold=TINY_THRESHOLD)
    assert shared == [True]
    with pytest.raises(AssertionError, match="serialized in memory"):  # the inline way does build it
        export_onnx(tiny_checkpoint, tmp_path / "small.onnx")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bf16_checkpoint_exports_an_fp32_graph_and_says_so(suffix, tmp_path):
    """A checkpoint stored in bf16 (as real models are) exports, the file way too: an fp32 graph equal to the
    model built from the bf16 weights cast to fp32, its metadata naming the stored dtype."""
    import torch
    from conftest import make_lora_model

    from lora_export.export.onnx_files import read_metadata
    from lora_export.model.checkpoint import save_checkpoint

    model = make_lora_model()
    checkpoint = tmp_path / f"bf16{suffix}"
    save_checkpoint(checkpoint, model, dtype=torch.bfloat16)
    result = export_onnx(checkpoint, tmp_path / "bf16.onnx", merge=False, external_data_threshold=TINY_THRESHOLD)
    assert read_metadata(onnx.load(result.model_path, load_external_data=False))["checkpoint_dtype"] == "bf16"
    with torch.no_grad():
        for parameter in model.parameters():  # the reference: bf16-rounded weights, computed in fp32
            parameter.copy_(parameter.to(torch.bfloat16).float())
    feeds = scoring_feeds(read_adapter(result.adapter_path)[0])
    expected = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).detach()
    np.testing.assert_allclose(outputs(result.model_path, feeds)[0], expected.numpy(), atol=2e-4, rtol=1e-4)


def test_too_big_for_memory_is_the_threshold_or_protobufs_limit(merged_export):
    proto = onnx.load(merged_export.model_path)
    assert too_big_for_memory(proto, TINY_THRESHOLD)
    assert not too_big_for_memory(proto, PROTOBUF_LIMIT * 4)
    assert [size_text(n) for n in (PROTOBUF_LIMIT, 500_000, 1000, 1)] == ["2.15 GB", "0.5 MB", "1000 bytes", "1 byte"]


# --------------------------------------------------------------------------- tools/make_sized.py


def make_sized():
    spec = importlib.util.spec_from_file_location("make_sized", Path(__file__).parent.parent / "tools/make_sized.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("params", ["27M", "105M", "405M", "1.23B"])
def test_make_sized_picks_a_config_of_the_size(params):
    tool = make_sized()
    target = tool.parse_count(params)
    config = tool.config_for(target)
    assert abs(tool.count_parameters(config) - target) / target < 0.05
    assert (config.r, config.local_attn_window_size, config.max_seq_len) == (16, 128, 1024)
    assert config.lora_targets == ["q", "k", "v", "o", "ff"]


def test_make_sized_writes_random_lora(tmp_path):
    tool = make_sized()
    assert tool.main(["--params", "27M", "-o", str(tmp_path / "s.safetensors")]) == 0
    payload = read_checkpoint(tmp_path / "s.safetensors")
    assert payload["lora"] and all(t.abs().sum() > 0 for t in payload["lora"].values())
    count = sum(t.numel() for section in ("base", "lora") for t in payload[section].values())
    assert count == payload["training"]["parameters"]
    with pytest.raises(SystemExit):
        tool.main(["--params", "lots", "-o", str(tmp_path / "t.pt")])
