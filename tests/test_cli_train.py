"""Tests of the lora-train command line (pretrain, adapt) and its one-line errors with exit status 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_ARGS

from lora_export.cli import train_cli
from lora_export.corpus import prose_text, stdlib_source_text
from lora_export.model.checkpoint import load_checkpoint, read_checkpoint

FAST = ["--batch-size", "4", "--eval-every", "10", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    (folder / "code.py").write_bytes(stdlib_source_text(max_bytes=30_000))
    (folder / "prose.txt").write_bytes(prose_text()[:30_000])
    (folder / "empty.txt").write_bytes(b"")
    return {path.stem: path for path in folder.iterdir()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, Path]) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "base.pt"
    result = CliRunner().invoke(train_cli, ["pretrain", "-o", str(path), "--steps", "20", "--data", str(corpus["code"]),
                                            *TINY_ARGS, *FAST])
    assert result.exit_code == 0, result.output
    return path


def test_pretrain_writes_loadable_checkpoint(base: Path) -> None:
    model = load_checkpoint(base)
    assert model.config.dim == 32 and model.config.r == 0 and model.config.max_seq_len == 32
    training = read_checkpoint(base)["training"]
    assert training["stage"] == "pretrain" and training["steps"] == 20
    assert training["data"]["source"] == "files: code.py"


def test_adapt_writes_loadable_checkpoint(base: Path, corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "adapted.pt"
    args = ["adapt", str(base), "-o", str(out), "--steps", "10", "--r", "4", "--alpha", "8", "--targets", "q,v,ff,emb",
            "--rslora", "--data", str(corpus["prose"]), *FAST]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert "eval loss on held-out data: base" in result.output and "-> adapted" in result.output
    model = load_checkpoint(out)
    assert model.config.r == 4 and model.config.lora_targets == ["q", "v", "ff", "emb"] and model.config.use_rslora
    training = read_checkpoint(out)["training"]
    assert training["stage"] == "adapt" and {"base_eval_loss", "adapted_eval_loss", "base_sha256"} <= set(training)


def test_progress_prints_parameter_counts(base: Path, corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "adapted.pt"
    args = ["adapt", str(base), "-o", str(out), "--steps", "1", "--data", str(corpus["prose"])]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert "parameters: total" in result.output and "| lora " in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["adapt", "{missing}", "--data", "{prose}"], "no such file"),
        (["adapt", "{prose}", "--data", "{prose}"], "prose.txt: not a readable checkpoint"),
        (["adapt", "{base}", "--data", "{prose}", "--targets", "q,mlp"], "lora_targets: unknown 'mlp'"),
        (["adapt", "{base}", "--data", "{prose}", "--targets", ","], "lora_targets is empty"),
        (["adapt", "{base}", "--data", "{prose}", "--seq-len", "64"], "exceeds the model's max_seq_len 32"),
        (["adapt", "{base}", "--data", "{empty}"], "data file is empty"),
        (["adapt", "{base}", "--data", "{missing}"], "no such file"),
        (["adapt", "{base}", "--data", "{prose}", "--r", "0"], "r must be >= 1"),
        (["pretrain", "--data", "{prose}", "--steps", "0"], "steps must be >= 1"),
        (["pretrain", "--data", "{prose}", "--heads", "2", "--local-heads", "3"], "n_local_attn_heads"),
        (["pretrain", "--data", "{prose}", "--dim", "0"], "dim must be in 1..65536, got 0"),
        (["pretrain", "--data", "{prose}", "-o", "{devnull}/x.pt"], "cannot be created"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, base: Path, corpus: dict[str, Path],
                                          tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    values = {"base": base, "missing": tmp_path / "missing", "devnull": os.devnull, **corpus}
    args = [arg.format(**{k: str(v) for k, v in values.items()}) for arg in args]
    args += ([] if "-o" in args else ["-o", str(out)]) + ([] if "--steps" in args else ["--steps", "1"])
    result = CliRunner().invoke(train_cli, [*args, "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output and not out.exists()
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_usage_errors_are_clicks(tmp_path: Path) -> None:
    result = CliRunner().invoke(train_cli, ["pretrain", "-o", str(tmp_path / "x.pt"), "--global-attn", "cosine"])
    assert result.exit_code == 2 and "Invalid value for '--global-attn'" in result.output
    result = CliRunner().invoke(train_cli, ["pretrain"])
    assert result.exit_code == 2 and "Missing option '-o'" in result.output
