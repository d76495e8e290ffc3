"""One adapters-as-inputs graph for adapters whose targets differ (``--lora-layers``): LoRA inputs on every
adaptable layer, or on the union of several checkpoints' LoRA layers; an adapter on a subset runs the rest as the
base. References: each checkpoint's own PyTorch model (LoRALayer's parameters), run by real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error, invoke, make_lora_model, same_base, session, torch_logits

from lora_export.errors import ExportError
from lora_export.export.adapters import activate_adapters
from lora_export.export.convert import export_adapter, export_onnx
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint

#: The adaptable layers of the one-block tiny model, written out (not computed by the code under test).
EVERY_LAYER = ["token_emb", "blocks.0.attn.to_q", "blocks.0.attn.to_k", "blocks.0.attn.to_v",
               "blocks.0.attn.to_out", "blocks.0.ff.fc1", "blocks.0.ff.fc2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qkvoff.pt (r 4 on q, k, v, o, ff), and on its base qvemb.pt (r 3 on q, v, emb) and fc1.pt (r 2 on fc1)."""
    folder = tmp_path_factory.mktemp("union")
    base = folder / "qkvoff.pt"
    save_checkpoint(base, make_lora_model(lora_targets=["q", "k", "v", "o", "ff"]), {"seed": 0})
    return {"qkvoff": base, "qvemb": same_base(base, folder / "qvemb.pt", ["q", "v", "emb"], 3, 5),
            "fc1": same_base(base, folder / "fc1.pt", ["fc1"], 2, 6)}


@pytest.fixture(scope="module")
def union_model(checkpoints: dict[str, Path]) -> Path:
    """qkvoff.pt exported by the command line with --adapters-as-inputs --lora-layers all."""
    output = checkpoints["qkvoff"].with_name("all.adapters.onnx")
    code, out, err = invoke(checkpoints["qkvoff"], "--adapters-as-inputs", "--lora-layers", "all", "-o", output,
                            "--no-validate", "--no-simplify", "--quiet")
    assert code == 0, err
    return output


def lora_layers_of(model_path: Path) -> list[str]:
    """The layers a graph has LoRA A inputs for, in input order."""
    return [value.name.removesuffix(".lora_A") for value in onnx.load(model_path).graph.input
            if value.name.endswith(".lora_A")]


def ort_logits(model_path: Path, adapter: Path | None, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """logits of the graph on ONNX Runtime with ``adapter`` active (None: none)."""
    run_options, _keep = activate_adapters(*([] if adapter is None else [adapter]))
    return session(model_path).run(["logits"], feeds, run_options)[0]


def test_adapter_of_other_targets_runs_on_the_union_graph(union_model, checkpoints, tmp_path):
    """An adapter on q, v, emb, written for a graph exported from a q, k, v, o, ff checkpoint with --lora-layers all,
    runs in ORT and equals PyTorch with that adapter; the graph's own adapter and no adapter (the base) still
    equal theirs."""
    assert lora_layers_of(union_model) == EVERY_LAYER
    adapter = tmp_path / "qvemb.onnx_adapter"
    code, out, err = invoke("adapter", checkpoints["qvemb"], "--model", union_model, "-o", adapter)
    assert code == 0, err
    assert "blocks.0.attn.to_k, blocks.0.attn.to_out, blocks.0.ff.fc1, blocks.0.ff.fc2" in out
    ids = np.random.default_rng(3).integers(0, 256, (2, 13), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = ort_logits(union_model, adapter, feeds)
    np.testing.assert_allclose(got, torch_logits(load_checkpoint(checkpoints["qvemb"]), feeds), atol=2e-5, rtol=1e-4)
    own = ort_logits(union_model, union_model.with_suffix(".onnx_adapter"), feeds)
    np.testing.assert_allclose(own, torch_logits(load_checkpoint(checkpoints["qkvoff"]), feeds), atol=2e-5, rtol=1e-4)
    base = load_checkpoint(checkpoints["qkvoff"])
    for module in base.modules():  # the base model: every LoRA update zeroed
        if hasattr(module, "lora_B"):
            module.lora_B.data.zero_()
    np.testing.assert_allclose(ort_logits(union_model, None, feeds), torch_logits(base, feeds), atol=2e-5, rtol=1e-4)


def test_check_names_the_layers_that_run_as_the_base(union_model, checkpoints, tmp_path):
    adapter = export_adapter(checkpoints["fc1"], union_model, tmp_path / "fc1.onnx_adapter")
    code, out, err = invoke("check", union_model, adapter)
    assert code == 0, out + err
    assert ("6 of 7 LoRA layers are not in the adapter, so each runs without LoRA (as the base): token_emb, "
            "blocks.0.attn.to_q, blocks.0.attn.to_k, blocks.0.attn.to_v, blocks.0.attn.to_out, blocks.0.ff.fc2") in out
    assert f"ok: {adapter} fits {union_model}" in out


def test_union_of_checkpoints_targets(checkpoints, tmp_path):
    """--lora-layers CKPT: the graph gets the union of its own LoRA layers and the other checkpoint's, and no
    other; the other checkpoint's adapter runs on it as in PyTorch."""
    own = tmp_path / "own.pt"
    save_checkpoint(own, load_checkpoint(checkpoints["qvemb"]), {"seed": 5})
    result = export_onnx(own, tmp_path / "union.onnx", merge=False, lora_layers=[checkpoints["fc1"]],
                         simplify_graph=False)
    assert lora_layers_of(result.model_path) == ["token_emb", "blocks.0.attn.to_q", "blocks.0.attn.to_v",
                                                 "blocks.0.ff.fc1"]
    adapter = export_adapter(checkpoints["fc1"], result.model_path, tmp_path / "fc1.onnx_adapter")
    ids = np.random.default_rng(4).integers(0, 256, (3, 9), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    np.testing.assert_allclose(ort_logits(result.model_path, adapter, feeds),
                               torch_logits(load_checkpoint(checkpoints["fc1"]), feeds), atol=2e-5, rtol=1e-4)
    with pytest.raises(ExportError, match=r"not LoRA inputs of .*: blocks\.0\.attn\.to_k.*--lora-layers"):
        export_adapter(checkpoints["qkvoff"], result.model_path, tmp_path / "qkvoff.onnx_adapter")
    assert not (tmp_path / "qkvoff.onnx_adapter").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--merge", "--lora-layers", "all"], "--lora-layers takes non-empty entries and needs --adapters-as-inputs"),
    (["--adapters-as-inputs", "--lora-layers", "q,,v"], "--lora-layers takes non-empty entries"),
    (["--adapters-as-inputs", "--adapter-slots"], "--adapters-as-inputs and --adapter-slots exclude each other"),
    (["--adapters-as-inputs", "--lora-layers", "blocks.*.nowhere"], "error: lora layers: unknown 'blocks.*.nowhere'"),
    (["--adapter-slots", "--lora-layers", "OTHER_BASE"], "its base weights differ from those of"),
])
def test_bad_lora_layers_are_refused_before_the_export(checkpoints, tmp_path, args, needle):
    """Usage errors (click's) and bad entries (one `error:` line): exit 2 before any tracing, no file written."""
    other = tmp_path / "other.pt"
    save_checkpoint(other, make_lora_model(seed=9), {"seed": 9})
    args = [str(other) if arg == "OTHER_BASE" else arg for arg in args]
    code, out, err = invoke(checkpoints["qkvoff"], *args, "-o", tmp_path / "x.onnx", "--no-validate")
    if needle.startswith("error: "):
        assert_one_line_error(code, err, needle)
    assert code == 2 and needle in err and "Traceback" not in err
    assert "exporting" not in err and not (tmp_path / "x.onnx").exists()
