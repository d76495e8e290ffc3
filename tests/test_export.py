"""Both export forms against PyTorch on ONNX Runtime CPU, the adapter contract, determinism, external data."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_CONFIG, same_base_other_rank, session, torch_logits

from lora_export.errors import AdapterError, ExportError, OutputError
from lora_export.export.adapters import (
    activate_adapters,
    adapter_tensors,
    attach_adapter,
    check_adapter,
    model_version_from_fingerprint,
    read_adapter,
    write_adapter,
)
from lora_export.export.convert import check_adapter_file, export_adapter, export_onnx
from lora_export.export.onnx_files import read_metadata
from lora_export.files import file_sha256
from lora_export.layout import adapter_record_path
from lora_export.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from lora_export.model.layers import merge_lora
from lora_export.pipeline import validate_and_report

SHAPES = [(1, 1), (2, 5), (2, 9), (1, 8), (3, TINY_CONFIG["max_seq_len"])]  # window 8: 9 is not a multiple


def feeds(batch: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, n), np.int64)
    return {"input_ids": rng.integers(0, 256, (batch, n), dtype=np.int64), "attention_mask": mask}


@pytest.mark.parametrize("batch,n", SHAPES)
def test_merged_matches_pytorch(merged_export, tiny_checkpoint, batch, n):
    model = load_checkpoint(tiny_checkpoint)
    merge_lora(model)
    inputs = feeds(batch, n, seed=n)
    got = session(merged_export.model_path).run(None, inputs)[0]
    np.testing.assert_allclose(got, torch_logits(model, inputs), atol=2e-5, rtol=1e-4)


def test_merged_graph_has_no_lora_and_base_parameter_count(merged_export, tiny_checkpoint):
    model = onnx.load(merged_export.model_path)
    names = [i.name for i in model.graph.initializer] + [i.name for i in model.graph.input]
    names += [n.name for n in model.graph.node] + [o for n in model.graph.node for o in n.input]
    assert not [n for n in names if "lora" in n.lower()]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    base_params = sum(v.numel() for k, v in read_checkpoint(tiny_checkpoint)["base"].items())
    weights = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                  if i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) > 1)
    assert weights == base_params == merged_export.parameters


def test_metadata(merged_export, adapter_export, tiny_checkpoint):
    for result, form in ((merged_export, "merged"), (adapter_export, "adapters")):
        meta = read_metadata(onnx.load(result.model_path))
        assert meta["form"] == form
        assert meta["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
        assert meta["opset"] == "23"
        assert '"r": 4' in meta["lora_config"]
        # the blindspot global heads are one fused Attention node per block; the local heads stay blockwise
        assert meta["attention"] == "fused: 1 Attention nodes (opset 23)"
        assert result.simplify_note.startswith(("simplified with onnxslim", "onnxslim did not shrink"))


def test_onnxslim_shrinks_a_two_block_graph_and_keeps_its_lora_inputs(tmp_path):
    from conftest import make_lora_model

    from lora_export.export.adapters import lora_input_specs

    save_checkpoint(tmp_path / "two.pt", make_lora_model(depth=2, local_attn_window_size=64, max_seq_len=256))
    plain = export_onnx(tmp_path / "two.pt", tmp_path / "plain.onnx", merge=False, simplify_graph=False,
                        adapter_path=tmp_path / "plain.onnx_adapter")
    result = export_onnx(tmp_path / "two.pt", tmp_path / "two.onnx", merge=False)
    assert result.simplify_note == "simplified with onnxslim", result.simplify_note
    assert result.nodes_final < result.nodes_exported == plain.nodes_final
    assert lora_input_specs(onnx.load(result.model_path)) == lora_input_specs(onnx.load(plain.model_path))
    verdict = validate_and_report(result.model_path, tmp_path / "two.pt", adapter_path=result.adapter_path,
                                  providers=["cpu"], report_dir=tmp_path / "report")
    assert verdict.passed, verdict.summary


def test_opset_below_23_decomposes_attention_and_still_matches_pytorch(tiny_checkpoint, tmp_path):
    result = export_onnx(tiny_checkpoint, tmp_path / "m18.onnx", merge=True, opset=18)
    proto = onnx.load(result.model_path)
    assert read_metadata(proto)["attention"] == "decomposed"
    assert not any(node.op_type == "Attention" for node in proto.graph.node)
    model = load_checkpoint(tiny_checkpoint)
    merge_lora(model)
    inputs = feeds(3, 20, seed=7)
    expected = model(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]).bool())
    got = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], expected.detach().numpy()[real], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("batch,n", SHAPES)
def test_adapter_form_without_adapter_is_base_and_with_adapter_is_merged(adapter_export, tiny_checkpoint, batch, n):
    model = load_checkpoint(tiny_checkpoint)
    inputs = feeds(batch, n, seed=100 + n)
    sess = session(adapter_export.model_path)

    attach_adapter(model, None)
    base = torch_logits(model, inputs)
    np.testing.assert_allclose(sess.run(None, inputs)[0], base, atol=2e-5, rtol=1e-4)

    merged = load_checkpoint(tiny_checkpoint)
    merge_lora(merged)
    expected = torch_logits(merged, inputs)
    run_options, _adapters = activate_adapters(adapter_export.adapter_path)
    got = sess.run(None, inputs, run_options)[0]
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    assert np.abs(expected - base).max() > 1e-2  # the adapter really changes the model


def test_adapter_inputs_contract(adapter_export):
    model = onnx.load(adapter_export.model_path)
    assert model.ir_version >= 4
    initializers = {i.name: i for i in model.graph.initializer}
    lora_inputs = [i for i in model.graph.input if i.name.endswith((".lora_A", ".lora_B"))]
    assert len(lora_inputs) == 2 * (1 + 4 + 2)  # emb + q, k, v, o + ff.fc1, ff.fc2 in one block
    assert "blocks.0.attn.to_q.lora_A" in {i.name for i in lora_inputs}
    for value in lora_inputs:
        dims = value.type.tensor_type.shape.dim
        rank_axis = 1 if value.name.endswith("lora_A") else 0
        layer = value.name.rsplit(".", 1)[0]
        assert dims[rank_axis].dim_param == f"{layer}.lora_rank"  # a rank of its own per layer
        assert 0 in initializers[value.name].dims  # rank-0 default
    transposes = [n for n in model.graph.node if n.op_type == "Transpose"
                  and any(i.endswith((".lora_A", ".lora_B")) for i in n.input)]
    assert not transposes


def test_adapter_file_holds_scaled_transposed_weights(adapter_export, tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    tensors, version = read_adapter(adapter_export.adapter_path)
    layer = model.blocks[0].attn.to_v
    np.testing.assert_allclose(tensors["blocks.0.attn.to_v.lora_A"], layer.lora_A.detach().T.numpy())
    np.testing.assert_allclose(tensors["blocks.0.attn.to_v.lora_B"],
                               (layer.lora_B.detach() * (8.0 / 4)).T.numpy(), rtol=1e-6)
    meta = read_metadata(onnx.load(adapter_export.model_path))
    assert version == model_version_from_fingerprint(meta["base_sha256"])


def test_two_adapters_of_different_ranks_swap_in_one_session(adapter_export, tiny_checkpoint, tmp_path):
    sess = session(adapter_export.model_path)
    inputs = feeds(2, 11, seed=7)
    for r, seed in ((2, 1), (6, 2)):
        other = same_base_other_rank(tiny_checkpoint, r, seed)
        ckpt = tmp_path / f"r{r}.pt"
        save_checkpoint(ckpt, other)
        adapter = export_adapter(ckpt, adapter_export.model_path, tmp_path / f"r{r}.onnx_adapter")
        merge_lora(other)
        run_options, _adapters = activate_adapters(adapter)
        got = sess.run(None, inputs, run_options)[0]
        np.testing.assert_allclose(got, torch_logits(other, inputs), atol=2e-5, rtol=1e-4)
    # and back to the trained adapter, in the same session
    trained = load_checkpoint(tiny_checkpoint)
    merge_lora(trained)
    run_options, _adapters = activate_adapters(adapter_export.adapter_path)
    got = sess.run(None, inputs, run_options)[0]
    np.testing.assert_allclose(got, torch_logits(trained, inputs), atol=2e-5, rtol=1e-4)


def test_adapter_of_another_base_is_refused(adapter_export, tmp_path):
    from conftest import make_lora_model

    ckpt = tmp_path / "other_base.pt"
    save_checkpoint(ckpt, make_lora_model(seed=99))
    with pytest.raises(ExportError, match="base weights differ"):
        export_adapter(ckpt, adapter_export.model_path, tmp_path / "x.onnx_adapter")
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_check_names_every_mismatch(adapter_export, tiny_checkpoint):
    model = onnx.load(adapter_export.model_path)
    good = adapter_tensors(load_checkpoint(tiny_checkpoint))
    assert check_adapter(model, good) == ([], [])

    bad = dict(good)
    bad["blocks.0.attn.to_z.lora_A"] = bad.pop("blocks.0.attn.to_q.lora_A")  # wrong name
    bad["blocks.0.attn.to_k.lora_A"] = bad["blocks.0.attn.to_k.lora_A"][:5]  # wrong shape (in features)
    bad["blocks.0.attn.to_v.lora_A"] = bad["blocks.0.attn.to_v.lora_A"].astype(np.float64)  # wrong dtype
    bad["blocks.0.ff.fc1.lora_B"] = np.zeros((3, 64), np.float32)  # rank 3 against A's rank 4
    errors, notes = check_adapter(model, bad)
    text = "\n".join(errors)
    assert "blocks.0.attn.to_z.lora_A: not an input of the model" in text
    assert "blocks.0.attn.to_k.lora_A: dim 0 is 5, the model expects 32" in text
    assert "blocks.0.attn.to_v.lora_A: dtype float64" in text
    assert "blocks.0.ff.fc1.lora_A: rank 4 differs from blocks.0.ff.fc1.lora_B rank 3" in text
    assert any("blocks.0.attn.to_q.lora_A: not in the adapter" in n for n in notes)


def test_check_adapter_file_detects_other_base(adapter_export, tiny_checkpoint, tmp_path):
    tensors = adapter_tensors(load_checkpoint(tiny_checkpoint))
    write_adapter(tmp_path / "wrong.onnx_adapter", tensors, model_version=12345)
    errors, _ = check_adapter_file(adapter_export.model_path, tmp_path / "wrong.onnx_adapter")
    assert "another base model" in errors[0]
    assert check_adapter_file(adapter_export.model_path, adapter_export.adapter_path) == ([], [])


def test_export_is_deterministic(merged_export, tiny_checkpoint, tmp_path):
    again = export_onnx(tiny_checkpoint, tmp_path / "again.onnx", merge=True)
    assert file_sha256(again.model_path) == file_sha256(merged_export.model_path)


def test_external_data_round_trip(merged_export, tiny_checkpoint, tmp_path):
    result = export_onnx(tiny_checkpoint, tmp_path / "ext.onnx", merge=True, external_data_threshold=0)
    assert result.external_data
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size > 3 * (tmp_path / "ext.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    inputs = feeds(2, 13, seed=3)
    np.testing.assert_array_equal(session(result.model_path).run(None, inputs)[0],
                                  session(merged_export.model_path).run(None, inputs)[0])


def test_bad_inputs_leave_nothing_behind(tiny_checkpoint, tmp_path):
    with pytest.raises(OutputError, match="cannot be created"):
        export_onnx(tiny_checkpoint, Path(os.devnull) / "missing" / "x.onnx")
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(tiny_checkpoint, tmp_path / "x.txt")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(tiny_checkpoint, tmp_path / "x.onnx", opset=11)
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("keep", [
    {"token_emb": 4, "blocks.0.attn.to_v": 4},  # a partial adapter: blocks.0's other layers left out
    {"token_emb": 1, "blocks.0.attn.to_q": 2, "blocks.0.attn.to_k": 4, "blocks.0.ff.fc2": 3},  # ranks differ
])
def test_partial_and_mixed_rank_adapters_check_run_and_validate(adapter_export, tiny_checkpoint, tmp_path, keep):
    """Layers an adapter leaves out run their rank-0 default, and layers may differ in rank: `check` says ok only
    because it ran, ONNX Runtime computes what PyTorch computes, and validate passes."""
    trained, version = read_adapter(adapter_export.adapter_path)
    adapter = {}
    for layer, rank in keep.items():  # each kept layer cut to its rank; the others left out
        adapter[f"{layer}.lora_A"] = np.ascontiguousarray(trained[f"{layer}.lora_A"][:, :rank])
        adapter[f"{layer}.lora_B"] = np.ascontiguousarray(trained[f"{layer}.lora_B"][:rank])
    path = tmp_path / "part.onnx_adapter"
    write_adapter(path, adapter, version)
    errors, notes = check_adapter_file(adapter_export.model_path, path)
    assert errors == [] and any("runs without LoRA" in note for note in notes)

    reference = load_checkpoint(tiny_checkpoint)
    attach_adapter(reference, adapter)  # the base plus exactly these low-rank updates
    inputs = feeds(2, 11, seed=3)
    run_options, _adapters = activate_adapters(path)
    got = session(adapter_export.model_path).run(None, inputs, run_options)[0]
    np.testing.assert_allclose(got, torch_logits(reference, inputs), atol=2e-5, rtol=1e-4)
    # graph and file agree, but the file is not the checkpoint's trained adapter: validate fails naming a layer
    result = validate_and_report(adapter_export.model_path, tiny_checkpoint, adapter_path=path, providers=["cpu"],
                                 report_dir=tmp_path / "r", latency_runs=1)
    assert result.status == "failed" and all("trained LoRA: layer " in f for f in result.failures), result.failures
    assert not [c for c in result.comparisons if not c.passed]  # every numeric comparison itself passed


def test_check_adapter_names_nan_and_inf_tensors(adapter_export):
    """Values are held against the model too, before any run: a NaN or Inf tensor is an error naming it."""
    model = onnx.load(adapter_export.model_path)
    tensors, _ = read_adapter(adapter_export.adapter_path)
    tensors["blocks.0.ff.fc1.lora_B"] = tensors["blocks.0.ff.fc1.lora_B"].copy()
    tensors["blocks.0.ff.fc1.lora_B"][0, 1] = np.nan
    tensors["token_emb.lora_A"] = tensors["token_emb.lora_A"].copy()
    tensors["token_emb.lora_A"][3, 0] = np.inf
    errors, _ = check_adapter(model, tensors)
    assert sorted(e for e in errors if "NaN or Inf" in e) == [
        "blocks.0.ff.fc1.lora_B: holds NaN or Inf", "token_emb.lora_A: holds NaN or Inf"]


def test_adapter_whose_tensor_changed_but_not_its_record_is_refused(adapter_export, tmp_path):
    """A finite, same-shape change to one tensor is caught by the integrity record written with the original."""
    tensors, version = read_adapter(adapter_export.adapter_path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    write_adapter(tmp_path / "changed.onnx_adapter", tensors, version)
    (tmp_path / "a.onnx_adapter").write_bytes((tmp_path / "changed.onnx_adapter").read_bytes())
    original_record = adapter_record_path(adapter_export.adapter_path)
    adapter_record_path(tmp_path / "a.onnx_adapter").write_bytes(original_record.read_bytes())
    with pytest.raises(AdapterError, match=re.escape(f"tensor {name} does not match its recorded sha256")):
        read_adapter(tmp_path / "a.onnx_adapter")


def test_load_onnx_names_what_a_non_file_is(tmp_path):
    from lora_export.export.onnx_files import load_onnx

    (tmp_path / "dir.onnx").mkdir()
    os.mkfifo(tmp_path / "fifo.onnx")
    with pytest.raises(ExportError, match=r"dir\.onnx: is a directory"):
        load_onnx(tmp_path / "dir.onnx")
    with pytest.raises(ExportError, match=r"fifo\.onnx: is a FIFO"):
        load_onnx(tmp_path / "fifo.onnx")
    with pytest.raises(ExportError, match=r"missing\.onnx: no such ONNX model"):
        load_onnx(tmp_path / "missing.onnx")


def test_adapter_of_a_checkpoint_without_lora_is_refused_with_the_shared_message(adapter_export, tiny_checkpoint,
                                                                                tmp_path):
    save_checkpoint(tmp_path / "r0.pt", same_base_other_rank(tiny_checkpoint, r=0, seed=1))
    with pytest.raises(ExportError, match=r"r0\.pt: has no LoRA layers \(r = 0\)"):
        export_adapter(tmp_path / "r0.pt", adapter_export.model_path, tmp_path / "x.onnx_adapter")
    assert not (tmp_path / "x.onnx_adapter").exists()
