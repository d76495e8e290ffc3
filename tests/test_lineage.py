"""Lineage (``lora_export.parity.lineage``): a model is refused for a checkpoint that did not produce it, before
anything runs, in one line naming what differs; an adapter file is held against the checkpoint's trained LoRA
layer by layer, and against the model it is to run on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_lora_model, same_base_other_rank

from lora_export.errors import LoraExportError, ParityInputError
from lora_export.export.adapters import read_adapter, write_adapter
from lora_export.export.convert import ExportResult
from lora_export.export.onnx_files import read_metadata
from lora_export.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from lora_export.parity.lineage import adapter_lineage, check_model_matches, load_adapter_for


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def check(export: ExportResult, checkpoint: Path, *, metadata: dict[str, str] | None = None,
          proto: onnx.ModelProto | None = None) -> list[str]:
    """check_model_matches on an export (its own metadata unless given) against a checkpoint file."""
    proto = proto if proto is not None else onnx.load(export.model_path, load_external_data=False)
    metadata = metadata if metadata is not None else read_metadata(proto)
    return check_model_matches(proto, metadata, read_checkpoint(checkpoint), export.model_path, checkpoint)


def lora_input_names(proto: onnx.ModelProto) -> list[str]:
    return [value.name for value in proto.graph.input if value.name.endswith((".lora_A", ".lora_B"))]


# --------------------------------------------------------------------------- check_model_matches


@pytest.mark.parametrize("form", ["merged", "adapters"])
def test_a_model_matches_the_checkpoint_it_was_exported_from(form, merged_export, adapter_export, tiny_checkpoint):
    export = merged_export if form == "merged" else adapter_export
    assert check(export, tiny_checkpoint) == []


@pytest.mark.parametrize("form", ["merged", "adapters"])
def test_a_model_from_another_checkpoint_is_refused_by_its_base_weights(form, merged_export, adapter_export,
                                                                         tmp_path):
    other = tmp_path / "other.pt"
    save_checkpoint(other, make_lora_model(seed=1))  # same config, other weights
    with pytest.raises(ParityInputError) as err:
        check(merged_export if form == "merged" else adapter_export, other)
    message = one_line(err)
    assert "do not belong together" in message and "different base weights (base_sha256)" in message
    assert "other.pt" in message


def test_a_model_of_another_config_is_refused_naming_the_field(merged_export, tmp_path):
    other = tmp_path / "wider.pt"
    save_checkpoint(other, make_lora_model(ff_mult=4))
    with pytest.raises(ParityInputError) as err:
        check(merged_export, other)
    assert "model config differs in ff_mult (model 2, checkpoint 4)" in one_line(err)


def test_lora_settings_bind_a_merged_model_but_not_an_adapter_graph(merged_export, adapter_export, tiny_checkpoint,
                                                                    tmp_path):
    """Same base weights, another LoRA rank: an adapters-as-inputs graph runs any adapter on its base, a merged
    graph has the LoRA folded in."""
    other = tmp_path / "rank2.pt"
    save_checkpoint(other, same_base_other_rank(tiny_checkpoint, r=2, seed=3))
    (note,) = check(adapter_export, other)  # accepted: only the note that the file is not its source
    assert note.startswith("rank2.pt is not the file the model was exported from")
    with pytest.raises(ParityInputError) as err:
        check(merged_export, other)
    assert "model config differs in r (model 4, checkpoint 2)" in one_line(err)


def test_another_file_of_the_same_weights_is_a_note_not_a_refusal(merged_export, adapter_export, tiny_checkpoint,
                                                                  tmp_path):
    resaved = tmp_path / "resaved.pt"
    save_checkpoint(resaved, load_checkpoint(tiny_checkpoint), {"seed": 0, "stage": "saved again"})
    assert resaved.read_bytes() != tiny_checkpoint.read_bytes()
    (merged_note,) = check(merged_export, resaved)
    (adapters_note,) = check(adapter_export, resaved)
    for note in (merged_note, adapters_note):
        assert note.startswith("resaved.pt is not the file the model was exported from (checkpoint_sha256 differs)")
    assert merged_note.endswith("merged LoRA weights may differ")  # folded into the graph: they could differ
    assert "merged LoRA" not in adapters_note  # the adapter graph carries no LoRA weights


@pytest.mark.parametrize(("edit", "needle"), [
    ({"form": "fused"}, "unknown lora_export.form 'fused'"),
    ({"base_sha256": None}, "no lora_export metadata (base_sha256 missing)"),
    ({"model_config": None, "form": None}, "no lora_export metadata (form, model_config missing)"),
    ({"model_config": "{not json"}, "lora_export.model_config"),
    ({"model_config": "[1, 2]"}, "lora_export.model_config is not a JSON object"),
])
def test_wrong_or_missing_metadata_is_refused_in_one_line(edit, needle, merged_export, tiny_checkpoint):
    metadata = read_metadata(onnx.load(merged_export.model_path, load_external_data=False))
    for key, value in edit.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    with pytest.raises(ParityInputError) as err:
        check(merged_export, tiny_checkpoint, metadata=metadata)
    message = one_line(err)
    assert needle in message and str(merged_export.model_path) in message


def test_the_form_in_the_metadata_must_match_the_graph(merged_export, adapter_export, tiny_checkpoint):
    """A merged graph labelled 'adapters', and an adapter graph labelled 'merged', are refused by counting the LoRA
    inputs the graph really has."""
    merged_proto = onnx.load(merged_export.model_path, load_external_data=False)
    adapter_proto = onnx.load(adapter_export.model_path, load_external_data=False)
    assert lora_input_names(merged_proto) == [] and lora_input_names(adapter_proto)

    with pytest.raises(ParityInputError) as err:
        check(merged_export, tiny_checkpoint, metadata={**read_metadata(merged_proto), "form": "adapters"})
    assert "lora_export.form is 'adapters' but the graph has 0 LoRA inputs" in one_line(err)

    with pytest.raises(ParityInputError) as err:
        check(adapter_export, tiny_checkpoint, metadata={**read_metadata(adapter_proto), "form": "merged"})
    count = len(lora_input_names(adapter_proto))
    assert f"lora_export.form is 'merged' but the graph has {count} LoRA inputs" in one_line(err)


def test_a_fixed_sequence_axis_and_an_extra_input_are_refused(merged_export, tiny_checkpoint):
    proto = onnx.load(merged_export.model_path, load_external_data=False)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    seq = fixed.graph.input[0].type.tensor_type.shape.dim[1]
    seq.ClearField("dim_param")
    seq.dim_value = 16
    with pytest.raises(ParityInputError) as err:
        check(merged_export, tiny_checkpoint, proto=fixed)
    assert "has a fixed sequence length 16" in one_line(err)

    extra = onnx.ModelProto()
    extra.CopyFrom(proto)
    extra.graph.input.append(onnx.helper.make_tensor_value_info("temperature", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(ParityInputError) as err:
        check(merged_export, tiny_checkpoint, proto=extra)
    assert "unexpected required graph inputs ['temperature']" in one_line(err)


# --------------------------------------------------------------------------- adapter_lineage


@pytest.fixture(scope="module")
def trained(adapter_export: ExportResult) -> dict[str, np.ndarray]:
    """The export's own .onnx_adapter: the checkpoint's trained LoRA in graph layout."""
    return read_adapter(adapter_export.adapter_path)[0]


def test_the_checkpoints_own_adapter_passes(trained, adapter_export, tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    assert adapter_lineage(adapter_export.adapter_path, trained, model, tiny_checkpoint) == ([], [])


def test_an_adapter_that_differs_fails_naming_the_layer_and_the_files(trained, tiny_checkpoint):
    name = sorted(trained)[0]
    layer = name.rsplit(".", 1)[0]
    changed = {**trained, name: trained[name].copy()}
    changed[name][0, 0] += 0.5
    failures, notes = adapter_lineage(Path("/x/mine.onnx_adapter"), changed, load_checkpoint(tiny_checkpoint),
                                      tiny_checkpoint)
    assert notes == []
    assert failures == [f"adapter mine.onnx_adapter is not tiny.pt's trained LoRA: layer {layer}: {name} differs "
                        "from the checkpoint's (max |diff| 0.5)"]


def test_missing_extra_and_reshaped_layers_each_fail_once(trained, tiny_checkpoint):
    names = sorted(trained)
    dropped, reshaped = names[0], names[2]
    adapter = {k: v for k, v in trained.items() if k != dropped}
    adapter[reshaped] = np.zeros((trained[reshaped].shape[0] + 1, trained[reshaped].shape[1]), np.float32)
    adapter["blocks.9.nowhere.lora_A"] = np.zeros((4, 4), np.float32)
    failures, _ = adapter_lineage(Path("a.onnx_adapter"), adapter, load_checkpoint(tiny_checkpoint), tiny_checkpoint)
    problems = [failure.split("trained LoRA: ", 1)[1] for failure in failures]
    assert sorted(problems) == sorted([
        f"layer {dropped.rsplit('.', 1)[0]}: the checkpoint's trained {dropped} is not in the adapter",
        f"layer {reshaped.rsplit('.', 1)[0]}: {reshaped} is {list(adapter[reshaped].shape)} in the adapter, "
        f"{list(trained[reshaped].shape)} in the checkpoint",
        "layer blocks.9.nowhere: the adapter has blocks.9.nowhere.lora_A, the checkpoint has no LoRA there",
    ])


def test_a_checkpoint_without_lora_gives_a_note_not_a_verdict(trained):
    failures, notes = adapter_lineage(Path("a.onnx_adapter"), trained, make_lora_model(r=0), Path("/m/base.pt"))
    assert failures == []
    assert notes == ["base.pt has no LoRA: the adapter file itself is the reference, its weights are not tied to a "
                     "checkpoint"]


# --------------------------------------------------------------------------- load_adapter_for


def adapter_model(adapter_export: ExportResult) -> tuple[onnx.ModelProto, dict[str, str]]:
    proto = onnx.load(adapter_export.model_path, load_external_data=False)
    return proto, read_metadata(proto)


def test_load_adapter_for_returns_the_files_tensors(adapter_export, trained):
    tensors, notes = load_adapter_for(adapter_export.adapter_path, *adapter_model(adapter_export))
    assert notes == []
    assert sorted(tensors) == sorted(trained)
    for name, array in trained.items():
        np.testing.assert_array_equal(tensors[name], array)


def test_a_partial_adapter_loads_with_a_note_per_left_out_input(adapter_export, trained, tmp_path):
    proto, metadata = adapter_model(adapter_export)
    dropped = sorted(trained)[:2]  # one layer's A and B
    path = tmp_path / "partial.onnx_adapter"
    write_adapter(path, {k: v for k, v in trained.items() if k not in dropped}, read_adapter(
        adapter_export.adapter_path)[1])
    _, notes = load_adapter_for(path, proto, metadata)
    assert notes == [f"{name}: not in the adapter; that layer runs without LoRA" for name in dropped]


def test_an_adapter_needs_an_adapter_form_model(merged_export, adapter_export):
    proto = onnx.load(merged_export.model_path, load_external_data=False)
    with pytest.raises(ParityInputError) as err:
        load_adapter_for(adapter_export.adapter_path, proto, read_metadata(proto))
    assert one_line(err) == "--adapter needs an adapter-form model; this one was exported merged"


def test_an_adapter_for_another_base_is_refused(adapter_export, trained, tmp_path):
    proto, metadata = adapter_model(adapter_export)
    expected = int(metadata["base_sha256"][:7], 16)  # the model version an adapter of this base carries
    path = tmp_path / "elsewhere.onnx_adapter"
    write_adapter(path, trained, expected + 1)
    with pytest.raises(ParityInputError) as err:
        load_adapter_for(path, proto, metadata)
    message = one_line(err)
    assert message.startswith(f"{path}: adapter does not fit the model: ")
    assert f"written for a different base model (model version {expected + 1}, this model is {expected})" in message


def test_an_adapter_that_does_not_fit_the_graph_is_refused(adapter_export, trained, tmp_path):
    proto, metadata = adapter_model(adapter_export)
    path = tmp_path / "extra.onnx_adapter"
    write_adapter(path, {**trained, "blocks.9.nowhere.lora_A": np.zeros((4, 4), np.float32)},
                  int(metadata["base_sha256"][:7], 16))
    with pytest.raises(ParityInputError) as err:
        load_adapter_for(path, proto, metadata)
    assert "blocks.9.nowhere.lora_A: not an input of the model (extra name)" in one_line(err)


def test_a_file_that_is_no_adapter_is_refused_in_one_line(adapter_export, tmp_path):
    path = tmp_path / "junk.onnx_adapter"
    path.write_bytes(b"\x00\x01 not an adapter" * 10)
    with pytest.raises(LoraExportError) as err:  # the reader's own error, or a rewrap of it
        load_adapter_for(path, *adapter_model(adapter_export))
    assert "junk.onnx_adapter" in one_line(err)
