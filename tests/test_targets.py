"""LoRA targets by module (issue 20): ``lora_targets`` entries are groups, module names, paths or fnmatch patterns;
the model carries LoRA on exactly the paths they select. PEFT adapters on any subset of modules (one module name,
layers_to_transform, a regex mixing modules and blocks) import with the PeftModel's own logits, and such checkpoints
export to directories that the real ``PeftModel.from_pretrained`` loads onto the same modules with the same logits.
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG

from lora_export.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from lora_export.model.layers import lora_layers
from lora_export.model.transformer import (
    MAX_TARGET_LENGTH,
    MAX_TARGET_PATTERNS,
    MAX_TARGETS,
    LoRATransformerLM,
    ModelConfig,
    adaptable_module_paths,
    compact_targets,
    lora_module_paths,
    resolve_targets,
)

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo.pt"


def block_paths(blocks: range | list[int], *names: str) -> list[str]:
    """Hand-written module paths, in module order: ``names`` (``attn.to_q``, ``ff.fc1``) in each of ``blocks``."""
    order = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ff.fc1", "ff.fc2"]
    return [f"blocks.{i}.{name}" for i in blocks for name in order if name in names]


def tiny(**overrides: object) -> ModelConfig:
    return ModelConfig(**{**TINY_CONFIG, "r": 2, "depth": 3, **overrides})


@pytest.mark.parametrize(("targets", "expected"), [
    (["fc1"], block_paths(range(3), "ff.fc1")),
    (["blocks.1.attn.to_q"], ["blocks.1.attn.to_q"]),
    (["blocks.*.ff.fc1"], block_paths(range(3), "ff.fc1")),
    (["token_emb"], ["token_emb"]),
    (["emb", "blocks.[02].attn.to_?"], ["token_emb", *block_paths([0, 2], "attn.to_q", "attn.to_k", "attn.to_v")]),
    (["ff", "to_out"], block_paths(range(3), "attn.to_out", "ff.fc1", "ff.fc2")),
    (["q", "fc2", "blocks.1.ff.fc2"], block_paths(range(3), "attn.to_q", "ff.fc2")),
    (["*"], ["token_emb", *block_paths(range(3), "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ff.fc1",
                                       "ff.fc2")]),
])
def test_targets_resolve_to_the_modules_that_carry_lora(targets, expected):
    config = tiny(lora_targets=targets, rank_pattern={expected[-1]: 3})
    assert lora_module_paths(config) == expected
    model = LoRATransformerLM(config)
    ranks = {path: layer.r for path, layer in lora_layers(model)}
    assert ranks == {path: 3 if path == expected[-1] else 2 for path in expected}
    assert sum(1 for name, _ in model.named_parameters() if name.endswith("lora_A")) == len(expected)


def test_adaptable_paths_are_every_lora_capable_module_in_module_order():
    model = LoRATransformerLM(tiny(r=0))
    capable = [name for name, module in model.named_modules() if hasattr(module, "init_lora")]
    assert adaptable_module_paths(model.config) == capable
    assert lora_module_paths(tiny(r=0, lora_targets=["fc1"])) == []


@pytest.mark.parametrize("target", ["fc3", "blocks.3.ff.fc1", "blocks.*.mlp", "Q", "attn", "blocks.0"])
def test_a_target_that_selects_nothing_is_refused_naming_it(target):
    with pytest.raises(ValueError, match=re.escape(repr(target))) as err:
        tiny(lora_targets=["q", target])
    assert "lora_targets" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("targets", "needle"), [
    ("fc1", "must be a list"),
    (["fc1"] * 2, "twice"),
    (["x" * (MAX_TARGET_LENGTH + 1)], "unknown"),
    ([""], "unknown"),
    ([3], "unknown"),
    ([f"blocks.{i}.ff.fc1" for i in range(MAX_TARGETS + 1)], "must be a list of at most"),
    ([f"blocks.0.ff.fc{i}*" for i in range(MAX_TARGET_PATTERNS + 1)], "patterns"),
])
def test_malformed_target_lists_are_refused_in_one_line(targets, needle):
    with pytest.raises(ValueError, match=needle) as err:
        tiny(lora_targets=targets)
    assert "\n" not in str(err.value)


def test_compact_targets_select_exactly_the_given_paths():
    config = tiny()
    adaptable = adaptable_module_paths(config)
    assert compact_targets(adaptable, config) == ["q", "k", "v", "o", "ff", "emb"]
    assert compact_targets(block_paths(range(3), "ff.fc1") + ["token_emb"], config) == ["emb", "fc1"]
    assert compact_targets(["blocks.2.attn.to_q", *block_paths(range(3), "attn.to_v")], config) == [
        "v", "blocks.2.attn.to_q"]
    rng = random.Random(0)
    for _ in range(50):
        chosen = [path for path in adaptable if rng.random() < 0.5] or ["token_emb"]
        assert resolve_targets(compact_targets(chosen, config), adaptable) == chosen


def test_old_group_checkpoint_loads_with_the_same_modules_and_logits():
    model = load_checkpoint(DEMO)
    assert model.config.lora_targets == ["q", "k", "v", "o", "ff"]
    expected = block_paths(range(4), "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ff.fc1", "ff.fc2")
    assert [path for path, _ in lora_layers(model)] == expected
    payload = read_checkpoint(DEMO)
    by_module = LoRATransformerLM(ModelConfig.from_dict(
        {**payload["config"], "lora_targets": ["blocks.*.attn.to_*", "fc1", "fc2"]})).eval()
    by_module.load_state_dict({**payload["base"], **payload["lora"]})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), by_module(ids))


# PEFT interop: each case is (PEFT LoraConfig arguments, lora-export lora_targets for the same modules, the
# lora_targets from_peft writes, the module paths), on a 2-block base.
CASES = {
    "fc1-only": (dict(target_modules=["fc1"]), ["fc1"], ["fc1"], block_paths(range(2), "ff.fc1")),
    "layer-selected": (dict(target_modules=["to_q", "to_v", "fc2"], layers_to_transform=[0], layers_pattern="blocks"),
                       ["blocks.0.attn.to_[qv]", "blocks.0.ff.fc2"],
                       block_paths([0], "attn.to_q", "attn.to_v", "ff.fc2"),
                       block_paths([0], "attn.to_q", "attn.to_v", "ff.fc2")),
    "mixed": (dict(target_modules=r"blocks\.0\.attn\.to_q|.*\.fc1|token_emb", rank_pattern={"token_emb": 2}),
              ["blocks.0.attn.to_q", "blocks.*.ff.fc1", "token_emb"], ["emb", "fc1", "blocks.0.attn.to_q"],
              ["token_emb", "blocks.0.attn.to_q", "blocks.0.ff.fc1", "blocks.1.ff.fc1"]),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoRATransformerLM]:
    torch.manual_seed(0)
    model = LoRATransformerLM(ModelConfig(**{**TINY_CONFIG, "r": 0, "depth": 2})).eval()
    path = tmp_path_factory.mktemp("targets") / "base.pt"
    save_checkpoint(path, model)
    return path, model


def peft_paths(peft_model: torch.nn.Module) -> list[str]:
    """The module paths (relative to the base) that PEFT itself put a LoRA layer on, in module order."""
    from peft.tuners.lora import LoraLayer

    return [name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)]


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_on_some_modules_imports_with_the_peft_logits(base, tmp_path, case):
    peft = pytest.importorskip("peft")
    from lora_export.export.peft import from_peft

    peft_args, _, imported_targets, paths = CASES[case]
    peft_model = peft.get_peft_model(copy.deepcopy(base[1]), peft.LoraConfig(r=4, lora_alpha=8, **peft_args)).eval()
    assert peft_paths(peft_model) == paths
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "adapter")

    model = load_checkpoint(from_peft(tmp_path / "adapter", base[0], tmp_path / "imported.safetensors"))
    assert model.config.lora_targets == imported_targets
    assert [path for path, _ in lora_layers(model)] == paths
    expected = logits(peft_model)
    assert (expected - logits(base[1])).abs().max() > 0.1  # the adapter really changes the logits
    np.testing.assert_allclose(logits(model).numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_on_some_modules_exports_to_peft_with_the_same_logits(base, tmp_path, case):
    peft = pytest.importorskip("peft")
    from lora_export.export.peft import to_peft

    peft_args, targets, _, paths = CASES[case]
    config = ModelConfig.from_dict({**read_checkpoint(base[0])["config"], "r": 4, "lora_alpha": 8.0,
                                    "lora_targets": targets, "rank_pattern": peft_args.get("rank_pattern", {})})
    model = LoRATransformerLM(config).eval()
    model.load_state_dict(base[1].state_dict(), strict=False)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.2)
    save_checkpoint(tmp_path / "ckpt.pt", model)

    out = to_peft(tmp_path / "ckpt.pt", tmp_path / "peft_out")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base[1]), out).eval()
    assert peft_paths(reloaded) == paths
    expected = logits(model)
    assert (expected - logits(base[1])).abs().max() > 0.1
    np.testing.assert_allclose(logits(reloaded).numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)
