"""The KV-cache decoder run by onnxruntime-genai's own generator: greedy bytes identical to PyTorch in both forms,
adapters swapped on one loaded model, a bounded local cache, one-line refusals."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
import torch
from conftest import TINY_CONFIG, make_lora_model, run_cli, same_base_other_rank

from lora_export.errors import ExportError
from lora_export.export.adapters import attach_adapter, read_adapter
from lora_export.export.convert import export_adapter
from lora_export.genai.decoder import CACHE_SLACK, export_decoder
from lora_export.genai.generate import Sampling, generate_bytes
from lora_export.layout import ADAPTER_FILE, MODEL_FILE, TOKENIZER_CONFIG, TOKENIZER_FILE
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint
from lora_export.pipeline import validate_and_report
from lora_export.report.render import SCHEMA_PATH

PROMPT = b"Hello, world"  # 12 bytes: longer than the window of 8
NEW = TINY_CONFIG["max_seq_len"] - len(PROMPT)  # to the end of the context: the window is crossed 2.5 times


def torch_greedy(model: torch.nn.Module, prompt: bytes = PROMPT, new: int = NEW) -> list[int]:
    ids = torch.tensor([list(prompt)])
    return model.generate(ids, new, greedy=True)[0, len(prompt):].tolist()


def genai_greedy(model: og.Model, adapters: og.Adapters | None = None, name: str | None = None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW, min_length=len(PROMPT) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(np.frombuffer(PROMPT, np.uint8).astype(np.int32)[None])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(PROMPT):]]


def test_merged_decoder_generates_what_pytorch_generates(genai_merged, tiny_checkpoint):
    expected = torch_greedy(load_checkpoint(tiny_checkpoint))
    assert list(generate_bytes(genai_merged, PROMPT, max_new_bytes=NEW)) == expected
    assert genai_greedy(og.Model(str(genai_merged))) == expected


def test_adapters_swap_on_one_loaded_model(genai_adapters, tiny_checkpoint, tmp_path):
    """base -> trained adapter -> an adapter of another rank -> base, on one og.Model, each as PyTorch generates."""
    other_model = same_base_other_rank(tiny_checkpoint, r=2, seed=4)
    save_checkpoint(tmp_path / "other.pt", other_model)
    other = export_adapter(tmp_path / "other.pt", genai_adapters / MODEL_FILE, tmp_path / "other.onnx_adapter")
    trained = load_checkpoint(tiny_checkpoint)
    base = load_checkpoint(tiny_checkpoint)
    attach_adapter(base, None)
    expected = {"base": torch_greedy(base), "trained": torch_greedy(trained), "other": torch_greedy(other_model)}
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters really change the bytes

    model = og.Model(str(genai_adapters))
    adapters = og.Adapters(model)
    adapters.load(str(genai_adapters / ADAPTER_FILE), "trained")
    adapters.load(str(other), "other")
    for name in ("base", "trained", "other", "base"):
        assert genai_greedy(model, adapters, None if name == "base" else name) == expected[name], name


def test_partial_adapter_runs_its_missing_layers_as_base(genai_adapters, tiny_checkpoint, tmp_path):
    from lora_export.export.adapters import write_adapter

    tensors, version = read_adapter(genai_adapters / ADAPTER_FILE)
    partial = {k: v for k, v in tensors.items() if not k.startswith("blocks.0.attn")}
    write_adapter(tmp_path / "partial.onnx_adapter", partial, version)
    reference = load_checkpoint(tiny_checkpoint)
    attach_adapter(reference, partial)
    got = list(generate_bytes(genai_adapters, PROMPT, max_new_bytes=NEW, adapter=tmp_path / "partial.onnx_adapter"))
    assert got == torch_greedy(reference)


def test_local_cache_is_bounded_and_global_cache_grows(genai_merged):
    """Feeding the decoder graph step by step: the local slot's present stops at window + slack positions."""
    session = ort.InferenceSession(str(genai_merged / MODEL_FILE), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
            if i.name.startswith("past")}
    outputs = [o.name for o in session.get_outputs()]
    lengths = []
    for position in range(TINY_CONFIG["max_seq_len"]):
        feeds = {"input_ids": np.array([[65 + position % 26]]), "attention_mask": np.ones((1, position + 1), np.int64),
                 "position_ids": np.array([[position]]), **past}
        results = session.run(None, feeds)
        presents = zip(outputs[1:], results[1:], strict=True)
        past = {name.replace("present", "past_key_values"): value for name, value in presents}
        lengths.append((past["past_key_values.0.key"].shape[2], past["past_key_values.1.key"].shape[2]))
    window = TINY_CONFIG["local_attn_window_size"] + CACHE_SLACK
    assert [g for g, _ in lengths] == list(range(1, TINY_CONFIG["max_seq_len"] + 1))  # global: the full history
    assert [c for _, c in lengths] == [min(p + 1, window) for p in range(TINY_CONFIG["max_seq_len"])]


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(genai_merged):
    sampled = [list(generate_bytes(genai_merged, PROMPT, max_new_bytes=10, sampling=Sampling(False, 1.5, 20, 7)))
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    top1 = list(generate_bytes(genai_merged, PROMPT, max_new_bytes=10, sampling=Sampling(False, 2.0, 1, 3)))
    assert top1 == list(generate_bytes(genai_merged, PROMPT, max_new_bytes=10))


def test_linear_global_heads_are_refused(tmp_path):
    save_checkpoint(tmp_path / "linear.pt", make_lora_model(global_attn="linear"))
    with pytest.raises(ExportError, match="linear global heads"):
        export_decoder(tmp_path / "linear.pt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.pt"]


def invoke(*args: object) -> tuple[int, bytes, str]:
    """(exit code, stdout as bytes, stderr): generate writes raw bytes."""
    result = run_cli(*args)
    return result.exit_code, result.stdout_bytes, result.stderr


def test_generate_command_streams_bytes(genai_merged, tiny_checkpoint):
    code, out, err = invoke("generate", genai_merged, "--prompt", PROMPT.decode(), "--max-new-bytes", NEW)
    assert code == 0, err
    assert out == PROMPT + bytes(torch_greedy(load_checkpoint(tiny_checkpoint))) + b"\n"


@pytest.mark.parametrize(("args", "needle"), [
    (["--max-new-bytes", "100"], "exceed the model's max_seq_len"),
    (["--device", "tpu"], "Invalid value for '--device'"),
    (["--adapter", "ADAPTER"], "merged decoder takes no adapter"),
    (["--adapter", "missing.onnx_adapter"], "no such adapter file"),
    (["--sample", "--temperature", "0"], "temperature must be"),
])
def test_generate_refuses_bad_input_in_one_line(genai_merged, genai_adapters, args, needle):
    args = [str(genai_adapters / ADAPTER_FILE) if a == "ADAPTER" else a for a in args]
    code, out, err = invoke("generate", genai_merged, "--prompt", "Hi", "--max-new-bytes", 5, *args)
    assert code == 2 and out == b"", err
    lines = [line for line in err.splitlines() if line.strip()]
    assert needle in err and "Traceback" not in err and (len(lines) == 1 or "Usage:" in err), err


def test_generate_refuses_a_directory_that_is_not_a_genai_model(tmp_path):
    with pytest.raises(ExportError, match="not a genai model directory"):
        list(generate_bytes(tmp_path, PROMPT))


def test_genai_export_refuses_a_non_empty_directory(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = invoke(tiny_checkpoint, "--genai", "-o", tmp_path / "out", "--quiet")
    assert code == 2 and "not an empty directory" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- decode parity in the validator


def test_validate_decoder_directories_pass(genai_merged, genai_adapters, tiny_checkpoint, tmp_path):
    result = validate_and_report(genai_merged, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "m")
    assert result.passed, result.summary
    (run,) = result.decode
    assert run.identical and run.prompt_bytes > TINY_CONFIG["local_attn_window_size"]
    assert run.prompt_bytes + run.new_bytes == TINY_CONFIG["max_seq_len"]
    result = validate_and_report(genai_adapters, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "a")
    assert result.passed, result.summary
    assert [run.variant for run in result.decode] == ["base", "adapter trained", "base"]
    assert result.decode[0].generated == result.decode[2].generated != result.decode[1].generated
    document = json.loads((tmp_path / "a" / "parity.json").read_text())
    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()))
    assert "## Decode (onnxruntime-genai)" in (tmp_path / "a" / "parity.md").read_text()
    page = (tmp_path / "a" / "parity.html").read_text()
    assert "Decode latency per byte against position" in page and "as a share of its pass boundary" not in page
    assert re.search(r"<strong>Worst run:</strong> (base|adapter trained) on genai cpu: .*passes</p>", page)


@pytest.mark.parametrize(("shift", "failure"), [(5e-3, "step logits"), (100.0, "greedy bytes differ")])
def test_validate_decoder_catches_a_changed_graph(genai_merged, tiny_checkpoint, tmp_path, shift, failure):
    """A bias moved by 5e-3 (50x atol: the bytes may still agree) or by 100 (every byte '~') fails decode parity."""
    broken = tmp_path / "broken"
    shutil.copytree(genai_merged, broken)
    proto = onnx.load(broken / MODEL_FILE)
    bias = next(init for init in proto.graph.initializer if init.name.endswith("lm_head.bias"))
    values = onnx.numpy_helper.to_array(bias).copy()
    values[ord("~")] += shift
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, broken / MODEL_FILE)
    result = validate_and_report(broken, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "r")
    assert result.status == "failed" and any(failure in f for f in result.failures), result.failures


def test_int8_decoder_generates_with_top1_reported(tiny_checkpoint, genai_merged, tmp_path):
    directory = export_decoder(tiny_checkpoint, tmp_path / "int8", precision="int8")
    assert (directory / MODEL_FILE).stat().st_size < (genai_merged / MODEL_FILE).stat().st_size
    result = validate_and_report(directory, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "r")
    (run,) = result.decode
    assert result.precision == "int8" and run.tolerance_used is None
    assert result.passed == (run.top1_agreement >= 0.9) and 0.0 < run.top1_agreement <= 1.0
    assert len(run.generated) == run.new_bytes and "step top-1 agreement" in result.summary


def test_genai_export_into_an_existing_empty_directory(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    export_decoder(tiny_checkpoint, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["genai_config.json", MODEL_FILE,
                                                                    TOKENIZER_FILE, TOKENIZER_CONFIG]


def test_fp16_decoder_keeps_its_cache_in_fp16_and_hot_swaps_float32_adapters(tiny_checkpoint, genai_adapters,
                                                                               tmp_path):
    """--fp16: float16 weights and cache, float32 logits and LoRA inputs; the fp32 export's adapter file runs on it,
    and decode parity holds within the fp16 tolerance through genai on CPU (ORT casts where it lacks fp16 kernels)."""
    directory = export_decoder(tiny_checkpoint, tmp_path / "fp16", merge=False, precision="fp16")
    proto = onnx.load(directory / MODEL_FILE)
    types = {value.name: value.type.tensor_type.elem_type for value in (*proto.graph.input, *proto.graph.output)}
    cache = [name for name in types if name.startswith(("past_key_values.", "present."))]
    assert cache and all(types[name] == onnx.TensorProto.FLOAT16 for name in cache)
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert all(types[name] == onnx.TensorProto.FLOAT for name in types if ".lora_" in name)
    weights = [init for init in proto.graph.initializer if init.name not in types and np.prod(init.dims) > 1]
    assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights)

    model = og.Model(str(directory))
    adapters = og.Adapters(model)
    adapters.load(str(genai_adapters / ADAPTER_FILE), "fp32-export")  # the fp32 export's file, as is
    trained = genai_greedy(model, adapters, "fp32-export")
    assert len(trained) == NEW and trained != genai_greedy(model)

    result = validate_and_report(directory, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "r")
    assert result.passed and result.precision == "fp16", result.summary
    assert all(run.tolerance_used is not None and 0 < run.tolerance_used <= 1 for run in result.decode)
    assert [run.variant for run in result.decode] == ["base", "adapter trained", "base"]


def test_fp16_decoder_fails_parity_when_a_weight_is_off_by_more_than_fp16_rounding(tiny_checkpoint, tmp_path):
    directory = export_decoder(tiny_checkpoint, tmp_path / "fp16", precision="fp16")
    proto = onnx.load(directory / MODEL_FILE)
    bias = next(init for init in proto.graph.initializer if init.name.endswith("lm_head.bias"))
    values = onnx.numpy_helper.to_array(bias).copy()
    values[ord("~")] += np.float16(0.5)  # 25x the fp16 atol
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, directory / MODEL_FILE)
    result = validate_and_report(directory, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "r")
    assert result.status == "failed" and any("the tolerance" in failure for failure in result.failures)


def test_genai_cli_refuses_fp16_with_int8(tiny_checkpoint, tmp_path):
    code, _, err = invoke(tiny_checkpoint, "--genai", "--fp16", "--quantize", "int8", "-o", tmp_path / "d")
    assert code == 2 and "choose one of --fp16" in err and not (tmp_path / "d").exists()


def test_int4_decoder_runs_in_genai_with_the_fp32_adapter(tiny_checkpoint, genai_adapters, tmp_path):
    directory = export_decoder(tiny_checkpoint, tmp_path / "int4", merge=False, precision="int4")
    proto = onnx.load(directory / MODEL_FILE)
    assert any(node.op_type == "MatMulNBits" for node in proto.graph.node)
    model = og.Model(str(directory))
    adapters = og.Adapters(model)
    adapters.load(str(genai_adapters / ADAPTER_FILE), "trained")
    base, trained = genai_greedy(model), genai_greedy(model, adapters, "trained")
    assert len(base) == len(trained) == NEW and base != trained
    result = validate_and_report(directory, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "r")
    assert result.precision == "int4" and all(run.tolerance_used is None for run in result.decode)
    assert result.passed == all(run.top1_agreement >= 0.9 for run in result.decode)


def test_decoder_directory_whose_adapter_is_not_the_checkpoints_fails_naming_the_layer(genai_adapters,
                                                                                       tiny_checkpoint, tmp_path):
    from lora_export.export.adapters import write_adapter

    broken = tmp_path / "broken"
    shutil.copytree(genai_adapters, broken)
    tensors, version = read_adapter(broken / ADAPTER_FILE)
    tensors["blocks.0.attn.to_v.lora_B"] = tensors["blocks.0.attn.to_v.lora_B"] * 1.5
    (broken / ADAPTER_FILE).unlink()
    (broken / f"{ADAPTER_FILE}.json").unlink()
    write_adapter(broken / ADAPTER_FILE, tensors, version)
    result = validate_and_report(broken, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "r")
    assert result.status == "failed"
    assert any("is not tiny.pt's trained LoRA: layer blocks.0.attn.to_v" in f for f in result.failures), result.failures


@pytest.mark.parametrize("opset", [5, 24])
def test_decoder_refuses_an_unsupported_opset_before_any_work(tiny_checkpoint, tmp_path, opset):
    with pytest.raises(ExportError, match=f"opset {opset} is not supported: choose 18..23"):
        export_decoder(tiny_checkpoint, tmp_path / "g", opset=opset)
    assert list(tmp_path.iterdir()) == []
    # the rule comes before the output check: a bad opset is named even when the directory is refused too
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="opset"):
        export_decoder(tiny_checkpoint, tmp_path / "full", opset=opset)


def test_genai_cli_refuses_an_unsupported_opset_in_one_line(tiny_checkpoint, tmp_path):
    result = run_cli(tiny_checkpoint, "--genai", "--opset", 5, "-o", tmp_path / "g", "--no-validate")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "opset" in result.stderr and "18" in result.stderr and "23" in result.stderr
    assert list(tmp_path.iterdir()) == []
