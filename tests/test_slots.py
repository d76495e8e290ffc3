"""The adapter-slots graph and adapter packs: each row of one batch runs its own adapter. References: each row run
alone through the PyTorch model of its adapter's checkpoint (LoRALayer's own parameters), the graph run by real
ONNX Runtime; the pack's bytes against the adapter files they were stacked from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error, invoke, make_lora_model, same_base, session, torch_logits

from lora_export.errors import AdapterError
from lora_export.export.adapters import read_adapter, write_adapter
from lora_export.export.convert import check_adapter_file, export_adapter
from lora_export.export.slots import Pack, pack_adapters, read_pack, slot_feeds
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint
from lora_export.model.transformer import LoRATransformerLM
from lora_export.parity.mixed import MixedBatch
from lora_export.parity.validate import validate


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """own.pt (r 4 on q, k, v, o, ff) exported and validated by the command line with --adapter-slots --lora-layers
    all; on its base two.pt (r 2 on every layer) and six.pt (r 6 on q, v); their adapters written for the slots
    graph; a pack of the three."""
    folder = tmp_path_factory.mktemp("slots")
    own = folder / "own.pt"
    save_checkpoint(own, make_lora_model(lora_targets=["q", "k", "v", "o", "ff"]), {"seed": 0})
    code, _out, err = invoke(own, "--adapter-slots", "--lora-layers", "all", "--no-simplify", "--providers", "cpu",
                             "--quiet")
    assert code == 0, err
    model = folder / "own.slots.onnx"  # the default output of --adapter-slots
    paths = {"own": own, "model": model, "own_adapter": folder / "own.slots.onnx_adapter",
             "two": same_base(own, folder / "two.pt", ["q", "k", "v", "o", "ff", "emb"], 2, 1),
             "six": same_base(own, folder / "six.pt", ["q", "v"], 6, 2)}
    for name in ("two", "six"):
        paths[f"{name}_adapter"] = export_adapter(paths[name], model, folder / f"{name}.onnx_adapter")
    paths["pack"] = folder / "pack.onnx_adapter"
    code, out, err = invoke("pack-adapters", paths["own_adapter"], paths["two_adapter"], paths["six_adapter"],
                            "-o", paths["pack"], "--model", model, "--name", "own", "--name", "two",
                            "--name", "six")
    assert code == 0, err
    assert "4 slots: 0 base, 1 own, 2 two, 3 six" in out
    return paths


def base_model(checkpoint: Path) -> LoRATransformerLM:
    """The checkpoint's model with every LoRA update zeroed: the base."""
    model = load_checkpoint(checkpoint)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            module.lora_B.data.zero_()
    return model


def test_mixed_batch_equals_each_row_alone_in_pytorch(built):
    """Rows of one batch in slots own, base, six, two, six (one row left-padded) equal each row run alone through
    its checkpoint's PyTorch model."""
    pack = read_pack(built["pack"])
    model = onnx.load(built["model"])
    rows = ["own", 0, "six", 2, 3]
    ids = np.random.default_rng(5).integers(0, 256, (5, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, :4] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, **slot_feeds(model, pack).feeds(rows, 5)}
    assert feeds["adapter_ids"].tolist() == [1, 0, 3, 2, 3]
    got = session(built["model"]).run(["logits"], feeds)[0]
    references = {1: load_checkpoint(built["own"]), 0: base_model(built["own"]), 2: load_checkpoint(built["two"]),
                  3: load_checkpoint(built["six"])}
    for row, slot in enumerate(feeds["adapter_ids"]):
        alone = {"input_ids": ids[row:row + 1], "attention_mask": mask[row:row + 1]}
        real = mask[row] == 1
        np.testing.assert_allclose(got[row][real], torch_logits(references[int(slot)], alone)[0][real],
                                   atol=2e-5, rtol=1e-4, err_msg=f"row {row}, slot {slot}")


def test_no_pack_fed_is_the_base_for_every_row(built):
    model = onnx.load(built["model"])
    defaults = {init.name: list(init.dims) for init in model.graph.initializer if init.name.endswith("lora_A")}
    assert defaults["token_emb.lora_A"] == [1, 256, 0] and defaults["blocks.0.ff.fc1.lora_A"] == [1, 32, 0]
    assert {prop.key: prop.value for prop in model.metadata_props}["lora_export.form"] == "slots"
    ids = np.random.default_rng(6).integers(0, 256, (3, 9), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = session(built["model"]).run(["logits"], {**feeds, "adapter_ids": np.zeros(3, np.int64)})[0]
    np.testing.assert_allclose(got, torch_logits(base_model(built["own"]), feeds), atol=2e-5, rtol=1e-4)


def test_pack_holds_each_adapter_in_its_slot_zero_padded(built):
    """Slot 0 is zeros; slot i holds adapter i exactly, zero-padded to the layer's largest rank; a layer an adapter
    leaves out is zeros; the record names each slot's file and its sha256."""
    pack = read_pack(built["pack"])
    adapters = [read_adapter(built[f"{name}_adapter"])[0] for name in ("own", "two", "six")]
    a_stack = pack.tensors["blocks.0.attn.to_q.lora_A"]
    assert a_stack.shape == (4, 32, 6)  # r_max of to_q: six's 6
    assert not pack.tensors["token_emb.lora_B"][[0, 1, 3]].any()  # only two adapts the embedding
    for slot, adapter in enumerate(adapters, start=1):
        for name, tensor in adapter.items():
            stack = pack.tensors[name]
            r = tensor.shape[1] if name.endswith("lora_A") else tensor.shape[0]
            kept = stack[slot][:, :r] if name.endswith("lora_A") else stack[slot][:r]
            padding = stack[slot][:, r:] if name.endswith("lora_A") else stack[slot][r:]
            np.testing.assert_array_equal(kept, tensor)
            assert not padding.any() and not stack[0].any()
    record = json.loads(built["pack"].with_name("pack.onnx_adapter.json").read_text())
    assert [(s["slot"], s["name"], s["file"]) for s in record["slots"]] == [
        (0, "base", None), (1, "own", "own.slots.onnx_adapter"), (2, "two", "two.onnx_adapter"),
        (3, "six", "six.onnx_adapter")]
    assert record["slots"][2]["sha256"] == hashlib.sha256(built["two_adapter"].read_bytes()).hexdigest()
    assert pack.names == ["base", "own", "two", "six"]


def test_check_runs_packs_and_single_adapters_on_the_slots_graph(built):
    assert check_adapter_file(built["model"], built["pack"]) == ([], [])
    errors, notes = check_adapter_file(built["model"], built["six_adapter"])
    assert errors == [] and "5 of 7 LoRA layers are not in the adapter" in notes[0]
    code, out, err = invoke("check", built["model"], built["pack"])
    assert code == 0 and f"ok: {built['pack']} fits {built['model']}" in out, out + err


def test_bad_rows_are_one_line_before_any_run(built):
    feeds = slot_feeds(onnx.load(built["model"]), read_pack(built["pack"]))
    for rows, batch, needle in [([0, 4], 2, "row 1: adapter id 4 is out of range"),
                                ([-1], 1, "row 0: adapter id -1 is out of range"),
                                (["nine"], 1, "row 0: no slot named 'nine'"),
                                ([True], 1, "adapter id True is out of range"),
                                ([1], 3, "1 adapter ids for a batch of 3 rows")]:
        with pytest.raises(AdapterError, match=needle):
            feeds.feeds(rows, batch)


def test_bad_packs_are_one_line_before_anything_is_written(built, tmp_path):
    """An adapter for another base (against the others, and against --model), a pack fed to a graph without its
    layers: one line each, no pack written."""
    own_tensors, version = read_adapter(built["own_adapter"])
    stranger = tmp_path / "stranger.onnx_adapter"
    write_adapter(stranger, own_tensors, version + 1)
    out = tmp_path / "p.onnx_adapter"
    code, _out, err = invoke("pack-adapters", built["two_adapter"], stranger, "-o", out)
    assert_one_line_error(code, err, "written for another base than")
    code, _out, err = invoke("pack-adapters", stranger, "-o", out, "--model", built["model"])
    assert_one_line_error(code, err, "written for another base model than")
    code, _out, err = invoke("pack-adapters", built["two_adapter"], built["six_adapter"], "-o", out, "--name", "x")
    assert_one_line_error(code, err, "1 names for 2 adapters")
    code, _out, err = invoke("pack-adapters", built["pack"], "-o", out)
    assert_one_line_error(code, err, "a pack of adapters (stacked tensors), not one adapter")
    assert not out.exists() and not out.with_name("p.onnx_adapter.json").exists()
    pack = read_pack(built["pack"])
    alien = Pack({**pack.tensors, "blocks.0.attn.nowhere.lora_A": np.zeros((4, 32, 2), np.float32),
                  "blocks.0.attn.nowhere.lora_B": np.zeros((4, 2, 32), np.float32)}, pack.names, pack.model_version)
    with pytest.raises(AdapterError, match="blocks.0.attn.nowhere.lora_A: not an input of the model"):
        slot_feeds(onnx.load(built["model"]), alien)
    with pytest.raises(AdapterError, match="written for another base model"):
        slot_feeds(onnx.load(built["model"]), Pack(pack.tensors, pack.names, version + 1))


def test_pack_adapters_python_api_names_default_to_file_names(built, tmp_path):
    path = pack_adapters([built["six_adapter"], built["two_adapter"]], tmp_path / "p.onnx_adapter")
    pack = read_pack(path)
    assert pack.names == ["base", "six", "two"] and pack.slot_ids(["two", "six", 0]).tolist() == [2, 1, 0]


def test_export_validates_the_mixed_batch_as_its_own_variant(built, schema):
    """The export's validation ran the slots graph's base and mixed-batch variants, every case passed, and the
    report says which slot is which; parity.json fits its schema."""
    report = json.loads((built["model"].with_name("own.slots_parity") / "parity.json").read_text())
    jsonschema.validate(report, schema)
    assert report["status"] == "passed" and report["model"]["form"] == "slots"
    assert report["variants"] == ["base", "mixed batch"]
    mixed = [c for c in report["comparisons"] if c["variant"] == "mixed batch"]
    assert len(mixed) == len(report["cases"]) and all(c["passed"] for c in mixed)
    assert any("4 slots (0 base, 1 trained, 2 seeded rank r+1, 3 seeded rank 1" in note for note in report["notes"])


def test_validate_with_a_pack_runs_its_slots(built):
    result = validate(built["model"], built["own"], adapter_path=built["pack"], providers=["cpu"], latency_runs=1,
                      generate_bytes=4)
    assert result.status == "passed", result.summary
    assert any("4 slots (0 base, 1 own, 2 two, 3 six) of the pack given" in note for note in result.notes)


def test_validation_fails_when_rows_run_in_other_slots(built, monkeypatch):
    """The per-row reference is sharp: ONNX Runtime fed each row's neighbour's slot fails the mixed batch."""
    original = MixedBatch.ort_feeds

    def shifted(self: MixedBatch, batch: int) -> dict[str, np.ndarray]:
        feeds = original(self, batch)
        return {**feeds, "adapter_ids": (feeds["adapter_ids"] + 1) % self.size}

    monkeypatch.setattr(MixedBatch, "ort_feeds", shifted)
    result = validate(built["model"], built["own"], providers=["cpu"], latency_runs=1, generate_bytes=4)
    assert result.status == "failed"
    assert {c.variant for c in result.comparisons if not c.passed} == {"mixed batch"}
