"""PEFT interop against the real ``peft`` library: a PEFT LoRA adapter trained on a tiny lora-export base (rank and
alpha patterns, rsLoRA, an embedding target) imports to a checkpoint whose PyTorch and ONNX Runtime logits equal
the PeftModel's own; a lora-export checkpoint exports to a directory PeftModel.from_pretrained loads with the same
logits; what cannot be represented is one line, exit 2."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CONFIG

peft = pytest.importorskip("peft")

from lora_export.cli import export_cli  # noqa: E402
from lora_export.errors import PeftError  # noqa: E402
from lora_export.export.adapters import activate_adapters  # noqa: E402
from lora_export.export.convert import export_onnx  # noqa: E402
from lora_export.export.peft import from_peft, to_peft  # noqa: E402
from lora_export.layout import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lora_export.model.layers import lora_layers  # noqa: E402
from lora_export.model.transformer import LoRATransformerLM, ModelConfig  # noqa: E402

TARGETS = ["to_q", "to_v", "fc1", "fc2", "token_emb"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoRATransformerLM]:
    torch.manual_seed(0)
    model = LoRATransformerLM(ModelConfig(**{**TINY_CONFIG, "r": 0, "depth": 2})).eval()
    path = tmp_path_factory.mktemp("peft") / "base.pt"
    save_checkpoint(path, model)
    return path, model


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A few SGD steps of PEFT LoRA on the base: per-layer rank and alpha, rsLoRA, the embedding targeted."""
    _, model = base
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
                             rank_pattern={"blocks.0.attn.to_q": 2, "fc2": 6}, alpha_pattern={"fc1": 3.0})
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, 256, (4, 16), generator=generator)
        logits = peft_model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.eval().save_pretrained(directory)
    return directory, peft_model


def ids_and_mask(batch: int = 3, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(n).integers(0, 256, (batch, n), dtype=np.int64)
    return ids, np.ones_like(ids)


def test_imported_peft_adapter_computes_what_the_peft_model_computes(base, peft_dir, tmp_path):
    directory, peft_model = peft_dir
    imported = from_peft(directory, base[0], tmp_path / "imported.safetensors")
    model = load_checkpoint(imported)
    ranks = {path: layer.r for path, layer in lora_layers(model)}
    assert ranks["blocks.0.attn.to_q"] == 2 and ranks["blocks.1.attn.to_q"] == 4 and ranks["blocks.1.ff.fc2"] == 6
    assert model.config.use_rslora and model.config.lora_targets == ["q", "v", "ff", "emb"]
    assert model.config.alpha_pattern == {"blocks.0.ff.fc1": 3.0, "blocks.1.ff.fc1": 3.0}
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(ids)).numpy()
        untrained = base[1](torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(model(torch.from_numpy(ids)).numpy(), expected, atol=1e-5, rtol=1e-5)
    assert np.abs(expected - untrained).max() > 0.1  # the adapter really changes the logits

    for merge in (True, False):  # ONNX Runtime, both forms, against the PeftModel itself
        result = export_onnx(imported, tmp_path / f"m{merge}.onnx", merge=merge)
        session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
        run_options, _adapters = (None, []) if merge else activate_adapters(result.adapter_path)
        got = session.run(None, {"input_ids": ids, "attention_mask": mask}, run_options)[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_exported_adapter_loads_in_peft_with_the_same_logits(base, peft_dir, tmp_path):
    imported = from_peft(peft_dir[0], base[0], tmp_path / "imported.pt")
    out = to_peft(imported, tmp_path / "peft_out")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base[1]), out).eval()
    ids, _ = ids_and_mask(2, 31)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.from_numpy(ids)).numpy(),
                                   load_checkpoint(imported)(torch.from_numpy(ids)).numpy(), atol=1e-6, rtol=1e-6)


def test_safetensors_checkpoint_round_trip_is_byte_stable(base, peft_dir, tmp_path):
    first = from_peft(peft_dir[0], base[0], tmp_path / "a.safetensors")
    model = load_checkpoint(first)
    from lora_export.model.checkpoint import read_checkpoint

    save_checkpoint(tmp_path / "b.safetensors", model, read_checkpoint(first)["training"])
    assert (tmp_path / "b.safetensors").read_bytes() == first.read_bytes()
    assert b"pickle" not in first.read_bytes()[:8] and first.read_bytes()[:1] != b"PK"


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("use_dora", True, "use_dora"),
    ("bias", "all", "bias = 'all'"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("peft_type", "IA3", "peft_type 'IA3'"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
])
def test_unsupported_peft_fields_are_one_line_exit_2(base, peft_dir, tmp_path, field, value, needle):
    directory = tmp_path / "adapter"
    shutil.copytree(peft_dir[0], directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, field: value}))
    result = CliRunner().invoke(export_cli, ["from-peft", str(directory), "--base", str(base[0]), "-o",
                                             str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()


def test_an_adapter_for_another_base_is_refused_naming_the_module(peft_dir, tmp_path):
    other = LoRATransformerLM(ModelConfig(**{**TINY_CONFIG, "r": 0, "depth": 2, "dim": 16}))
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(PeftError, match="do not fit"):
        from_peft(peft_dir[0], tmp_path / "other.pt", tmp_path / "out.pt")


def test_cli_round_trip(base, peft_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(export_cli, ["from-peft", str(peft_dir[0]), "--base", str(base[0]), "-o",
                                        str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(export_cli, ["to-peft", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    again = runner.invoke(export_cli, ["to-peft", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "p")])
    assert again.exit_code == 2 and "not an empty directory" in again.stderr


def test_from_peft_refuses_to_replace_its_inputs_before_any_work(base, peft_dir, tmp_path):
    """The library checks its output like the CLI: not an input, a checkpoint suffix, no silent replace."""
    from lora_export.errors import OutputError
    from lora_export.files import file_sha256

    copy_of_base = tmp_path / "base.pt"
    shutil.copy(base[0], copy_of_base)
    digest = file_sha256(copy_of_base)
    with pytest.raises(OutputError, match="would overwrite the input"):
        from_peft(peft_dir[0], copy_of_base, copy_of_base)
    assert file_sha256(copy_of_base) == digest
    with pytest.raises(OutputError, match="would overwrite the input"):
        from_peft(peft_dir[0], copy_of_base, peft_dir[0] / WEIGHTS_FILE)
    with pytest.raises(OutputError, match=r"must end in \.pt or \.safetensors"):
        from_peft(peft_dir[0], copy_of_base, tmp_path / "out.onnx")
    (tmp_path / "taken.pt").write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        from_peft(peft_dir[0], copy_of_base, tmp_path / "taken.pt", overwrite=False)
    assert (tmp_path / "taken.pt").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt", "taken.pt"]
