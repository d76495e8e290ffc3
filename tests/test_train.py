"""Tests of lora_export.train: data, pretraining, determinism, LoRA adaptation and its metadata."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lora_export.corpus import TextData, load_data, prose_text, read_text_files, stdlib_source_text
from lora_export.files import file_sha256
from lora_export.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from lora_export.model.layers import base_state_dict, lora_state_dict
from lora_export.model.transformer import ModelConfig
from lora_export.train import adapt, pretrain
from lora_export.train.batches import get_batch

TINY = dict(dim=32, depth=1, heads=2, dim_head=16, n_local_attn_heads=1, local_attn_window_size=8,
            max_seq_len=32, dropout=0.0)


@pytest.fixture(scope="module")
def code_data() -> TextData:
    return TextData.from_bytes(stdlib_source_text(max_bytes=60_000), "stdlib")


@pytest.fixture(scope="module")
def prose_data() -> TextData:
    return TextData.from_bytes(prose_text()[:60_000], "prose")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory, code_data: TextData) -> Path:
    model, training = pretrain(ModelConfig(**TINY), code_data, steps=60, batch_size=8, lr=3e-3, eval_every=30,
                               progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "base.pt"
    save_checkpoint(path, model, training)
    return path


def test_corpora_are_deterministic_bytes() -> None:
    code = stdlib_source_text(max_bytes=50_000)
    assert len(code) == 50_000 and code == stdlib_source_text(max_bytes=50_000)
    assert b"def " in code and b"import " in code
    prose = prose_text()
    assert len(prose) > 100_000 and prose == prose_text()
    assert b"statement" in prose


def test_default_corpora() -> None:
    code, prose = load_data(default="stdlib"), load_data(default="prose")
    assert code.description["bytes"] == 4_000_000 and "stdlib source" in code.description["source"]
    assert "pydoc_data.topics" in prose.description["source"]
    assert len(prose.val) == prose.description["val_bytes"] == prose.description["bytes"] // 10
    with pytest.raises(ValueError, match="unknown default corpus"):
        load_data(default="poetry")


def test_split_and_batches() -> None:
    data = TextData.from_bytes(bytes(range(256)) * 40, "test")
    assert data.train.dtype == torch.uint8 and len(data.train) + len(data.val) == 10240
    assert torch.equal(data.val, torch.tensor(list(bytes(range(256)) * 40)[-1024:], dtype=torch.uint8))
    assert data.description["bytes"] == 10240 and len(data.description["sha256"]) == 64
    x1, y1 = get_batch(data.train, 4, 16, torch.Generator().manual_seed(1))
    x2, _ = get_batch(data.train, 4, 16, torch.Generator().manual_seed(1))
    assert x1.shape == y1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(x1, x2)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the inputs shifted by one byte
    assert torch.equal((x1 + 1) % 256, y1)  # consecutive bytes of the corpus


def test_read_text_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    assert read_text_files([tmp_path / "a.txt", tmp_path / "b.txt"]) == b"hello\nworld"
    data = load_data([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert data.description["source"] == "files: a.txt, b.txt"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_text_files([tmp_path / "empty.txt"])
    with pytest.raises(ValueError, match="missing.txt: no such file"):
        read_text_files([tmp_path / "missing.txt"])


def test_pretrain_loss_falls_and_metadata(base_checkpoint: Path) -> None:
    training = read_checkpoint(base_checkpoint)["training"]
    assert training["stage"] == "pretrain" and training["steps"] == 60 and len(training["losses"]) == 60
    assert [step for step, _ in training["eval_losses"]] == [0, 30, 60]
    start, end = training["eval_losses"][0][1], training["eval_losses"][-1][1]
    assert start > math.log(256) - 0.5 and end < start - 1.0
    assert training["parameters"]["total"] == training["parameters"]["trainable"] > 0
    assert training["parameters"]["lora"] == 0
    assert training["data"]["source"] == "stdlib"
    assert_plain(training)


def test_pretrain_is_deterministic(code_data: TextData) -> None:
    config = ModelConfig(**{**TINY, "dropout": 0.1})
    runs = [pretrain(config, code_data, steps=4, batch_size=4, seed=7, progress=False) for _ in range(2)]
    other, _ = pretrain(config, code_data, steps=4, batch_size=4, seed=8, progress=False)
    (a, meta_a), (b, meta_b) = runs
    assert meta_a["losses"] == meta_b["losses"]
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.lm_head.weight, other.lm_head.weight)


def test_pretrain_leaves_global_rng_alone(code_data: TextData) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain(ModelConfig(**TINY), code_data, steps=1, batch_size=2, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_adapt_trains_only_lora(base_checkpoint: Path, prose_data: TextData) -> None:
    base = load_checkpoint(base_checkpoint)
    model, training = adapt(base_checkpoint, r=4, lora_alpha=8, lora_targets=["q", "k", "v", "o", "ff", "emb"],
                            data=prose_data, steps=40, batch_size=8, lr=1e-2, eval_every=20, progress=False)
    before, after = base_state_dict(base), base_state_dict(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora = lora_state_dict(model)
    assert lora and all(lora[k].abs().sum() > 0 for k in lora if k.endswith("lora_B"))
    counts = training["parameters"]
    assert counts["trainable"] == counts["lora"] == sum(v.numel() for v in lora.values())

    assert training["stage"] == "adapt" and training["base_checkpoint"] == "base.pt"
    assert training["base_sha256"] == file_sha256(base_checkpoint)
    # The update starts at zero: the LoRA model's step-0 loss is the base's.
    assert training["eval_losses"][0][1] == pytest.approx(training["base_eval_loss"], abs=1e-5)
    assert training["adapted_eval_loss"] < training["base_eval_loss"] - 0.1
    assert_plain(training)


def test_adapt_is_deterministic(base_checkpoint: Path, prose_data: TextData) -> None:
    runs = [adapt(base_checkpoint, r=2, lora_dropout=0.1, data=prose_data, steps=3, batch_size=2, seed=3,
                  progress=False)[0] for _ in range(2)]
    a, b = (lora_state_dict(m) for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_rejects_bad_settings(base_checkpoint: Path, prose_data: TextData, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        adapt(base_checkpoint, lora_targets=["q", "mlp"], data=prose_data, steps=1, progress=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        adapt(base_checkpoint, data=prose_data, seq_len=64, steps=1, progress=False)
    with pytest.raises(ValueError, match="data too small"):
        adapt(base_checkpoint, data=TextData.from_bytes(b"x" * 100, "tiny"), steps=1, progress=False)
    adapted, training = adapt(base_checkpoint, r=2, data=prose_data, steps=1, progress=False)
    save_checkpoint(tmp_path / "adapted.pt", adapted, training)
    with pytest.raises(ValueError, match="already has LoRA"):
        adapt(tmp_path / "adapted.pt", data=prose_data, steps=1, progress=False)


def assert_plain(value: object) -> None:
    """Metadata holds only plain Python values: dict, list, str, int, float, bool, None."""
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value)
        for v in value.values():
            assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), type(value)


def test_data_directories_are_read_file_by_file_in_path_order(tmp_path):
    from lora_export.corpus import read_text_files

    (tmp_path / "corpus" / "b").mkdir(parents=True)
    (tmp_path / "corpus" / "z.txt").write_bytes(b"last")
    (tmp_path / "corpus" / "b" / "a.txt").write_bytes(b"first")
    (tmp_path / "corpus" / ".hidden").write_bytes(b"never")
    (tmp_path / "one.txt").write_bytes(b"given")
    assert read_text_files([tmp_path / "corpus", tmp_path / "one.txt"]) == b"first\nlast\ngiven"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        read_text_files([tmp_path / "empty"])


def test_progress_off_a_terminal_is_a_few_plain_lines(capsys):
    """A log gets at most one line per tenth of the work, no carriage-return frames, each count once."""
    from lora_export.progress import ConsoleProgress, progress_bar

    bar = ConsoleProgress("pretrain")
    for step in range(250):
        bar.advance(step + 1, 250, f"loss={step:.1f}")
    small = progress_bar(total=8, desc="parity")
    for _ in range(8):
        small.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    pretrain = [line for line in lines if line.startswith("pretrain")]
    assert len(pretrain) == 10 and pretrain[-1].startswith("pretrain: 250/250 (100%) loss=249.0")
    parity = [line.split(" (")[0] for line in lines if line.startswith("parity")]
    assert len(parity) == len(set(parity)) == 8
