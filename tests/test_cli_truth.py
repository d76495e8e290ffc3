"""What the README and the help texts say is what the commands do (issue 16, item 8): several paths after one
--data, to-peft --force, default output names in the help, one rule for missing output directories, the README's
sample output, and PyTorch generate() greedy and bounded like the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, TINY_CONFIG, invoke, make_lora_model, same_base_other_rank

from lora_export.cli import export_cli, train_cli
from lora_export.corpus import prose_text, stdlib_source_text
from lora_export.files import staged_outputs
from lora_export.layout import CONFIG_FILE, WEIGHTS_FILE
from lora_export.model.checkpoint import read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = [*TINY_ARGS, "--batch-size", "4", "--eval-every", "1", "--quiet"]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def help_text(*command: str) -> str:
    code, out, _ = invoke(*command, "--help")
    assert code == 0
    return " ".join(out.split())  # click wraps the lines; the names stay whole


# --------------------------------------------------------------------------- --data a.txt dir/


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "a.txt").write_bytes(prose_text()[:20_000])
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.py").write_bytes(stdlib_source_text(max_bytes=20_000))
    return tmp_path / "a.txt", tmp_path / "corpus"


def test_one_data_flag_takes_a_file_and_a_directory(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    """`lora-train pretrain --data a.txt corpus/` as the README writes it trains on both."""
    out = tmp_path / "base.pt"
    code, stdout, stderr = invoke("pretrain", "--data", *corpus, "-o", out, "--steps", "1", *TINY_TRAIN, cli=train_cli)
    assert code == 0, stderr
    assert read_checkpoint(out)["training"]["data"]["source"] == "files: a.txt, corpus"
    assert "wrote" in stdout


@pytest.mark.parametrize("command", ["pretrain", "adapt", "validate"])
def test_data_paths_end_at_the_next_option(command: str, corpus: tuple[Path, Path], tmp_path: Path) -> None:
    """Every command with --data parses several paths after it and goes on with the options that follow (with a
    bad input, so that nothing runs: the error is about it, not about an unexpected extra argument)."""
    if command == "validate":
        cli, args = export_cli, ["validate", tmp_path / "m.onnx", "--data", *corpus, "--checkpoint", tmp_path / "c.pt"]
    else:
        first = [] if command == "pretrain" else [tmp_path / "base.pt"]
        cli, args = train_cli, [command, *first, "--data", *corpus, "--steps", "0", "-o", tmp_path / "x.pt"]
    code, _, stderr = invoke(*args, cli=cli)
    assert code == 2 and "unexpected extra argument" not in stderr, stderr
    assert ("m.onnx: no such ONNX model" if command == "validate" else "steps must be >= 1") in stderr, stderr


def test_validate_reads_every_data_path_after_one_flag(merged_export, tiny_checkpoint, corpus, tmp_path) -> None:
    code, _, stderr = invoke("validate", merged_export.model_path, "--checkpoint", tiny_checkpoint,
                             "--data", *corpus, "--report", tmp_path / "r", "--quiet")
    assert code == 0, stderr
    assert "your data: a.txt, corpus" in (tmp_path / "r" / "parity.md").read_text()


# --------------------------------------------------------------------------- to-peft --force


def test_to_peft_refuses_a_filled_directory_without_force_and_replaces_with_it(tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "peft"
    code, _, stderr = invoke("to-peft", tiny_checkpoint, "-o", out)
    assert code == 0, stderr
    (out / "README.md").write_text("mine\n")
    before = {name: (out / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    other = tmp_path / "other.pt"
    save_checkpoint(other, same_base_other_rank(tiny_checkpoint, r=2, seed=1))

    code, _, stderr = invoke("to-peft", other, "-o", out)
    assert code == 2 and "pass --force" in stderr and "Traceback" not in stderr, stderr
    assert {name: (out / name).read_bytes() for name in before} == before

    code, _, stderr = invoke("to-peft", other, "-o", out, "--force")
    assert code == 0, stderr
    assert json.loads((out / CONFIG_FILE).read_text())["r"] == 2
    assert (out / WEIGHTS_FILE).read_bytes() != before[WEIGHTS_FILE]
    assert (out / "README.md").read_text() == "mine\n"
    assert files_under(out) == {CONFIG_FILE, WEIGHTS_FILE, "README.md"}  # no staging left behind


# --------------------------------------------------------------------------- the help names the real outputs


@pytest.fixture(scope="module")
def written(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """What each default-output command writes for a checkpoint named model.pt (the name the help texts use)."""
    written, folders = {}, {}
    for name, args in {
        "merged": ["--quantize", "int8", "--ort-format"],
        "adapters": ["--adapters-as-inputs", "--no-validate"],
        "genai": ["--genai", "--no-validate"],
    }.items():
        folder = folders[name] = tmp_path_factory.mktemp(name)
        shutil.copy(tiny_checkpoint, folder / "model.pt")
        code, _, stderr = invoke(folder / "model.pt", "--no-simplify", "--quiet", *args)
        assert code == 0, stderr
        written[name] = files_under(folder) - {"model.pt"}
    folder = tmp_path_factory.mktemp("adapter")
    shutil.copy(tiny_checkpoint, folder / "other.pt")
    code, _, stderr = invoke("adapter", folder / "other.pt", "--model",
                             folders["adapters"] / "model.adapters.onnx")
    assert code == 0, stderr
    written["adapter"] = files_under(folder) - {"other.pt"}
    return written


def test_export_help_names_every_default_output(written: dict[str, set[str]]) -> None:
    text = help_text("export")
    merged = written["merged"]
    assert {"model.onnx", "model.int8.onnx", "model.ort", "model.int8.ort"} <= merged
    for path in merged | written["adapters"]:
        name = path.split("/")[0] + "/" if "/" in path else path  # a report file: its directory
        if not name.endswith(".onnx_adapter.json"):  # the adapter's integrity record goes where the adapter goes
            assert name in text, name
    genai_dirs = {Path(path).parts[0] + "/" for path in written["genai"]}
    assert genai_dirs == {"model_genai/"} and "model_genai/" in text
    assert "model.adapters.onnx_adapter" in help_text()  # the group's overview too
    assert all(name in help_text() for name in ("model.adapters.onnx", "model_genai/"))


def test_adapter_help_names_its_default_output(written: dict[str, set[str]]) -> None:
    assert "other.onnx_adapter" in written["adapter"]
    assert "other.pt -> other.onnx_adapter" in help_text("adapter")


# --------------------------------------------------------------------------- missing output directories


def test_missing_output_directories_are_made_like_the_report_directory(tiny_checkpoint, tmp_path) -> None:
    """`-o edge/x.onnx` with edge/ missing works, as `--report new/dir` does."""
    code, _, stderr = invoke(tiny_checkpoint, "-o", tmp_path / "edge" / "x.onnx", "--no-simplify",
                             "--report", tmp_path / "reports" / "x", "--quiet")
    assert code == 0, stderr
    assert {"edge/x.onnx", "reports/x/parity.json"} <= files_under(tmp_path)
    code, _, stderr = invoke("to-peft", tiny_checkpoint, "-o", tmp_path / "peft" / "deep" / "dir")
    assert code == 0, stderr
    assert files_under(tmp_path / "peft") == {f"deep/dir/{CONFIG_FILE}", f"deep/dir/{WEIGHTS_FILE}"}


def test_directories_made_for_a_failed_result_are_removed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staged_outputs() as stage:
        stage.path(tmp_path / "a" / "b" / "f.txt").write_text("x")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_an_output_directory_that_cannot_be_made_is_refused_before_work(tiny_checkpoint, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    code, _, stderr = invoke(tiny_checkpoint, "-o", tmp_path / "file" / "sub" / "x.onnx", "--no-validate")
    assert code == 2 and "cannot be created" in stderr and "Traceback" not in stderr, stderr
    assert files_under(tmp_path) == {"file"}


# --------------------------------------------------------------------------- README sample output


def readme_generate_samples() -> list[tuple[list[str], str]]:
    """(arguments, shown output) of each `lora-export generate` line in the README's Quick start."""
    quick_start = ROOT.joinpath("README.md").read_text().split("## Quick start")[1].split("## ")[0]
    samples = []
    for block in re.split(r"\n(?=lora-export generate )", quick_start.split("--genai --adapters-as-inputs")[1]):
        if not block.startswith("lora-export generate"):
            continue
        command, *shown = block.split("```")[0].rstrip("\n").split("\n")
        prompt = re.search(r"--prompt (\$'[^']*'|'[^']*')", command).group(1)
        text = prompt[2:-1].encode().decode("unicode_escape") if prompt.startswith("$") else prompt[1:-1]
        rest = command.split(prompt)[1].split()
        samples.append((["--prompt", text, *rest], "\n".join(re.sub(r"^#(   )?", "", line) for line in shown)))
    return samples


def test_readme_generate_samples_are_what_the_commands_print(tmp_path: Path) -> None:
    """The Quick start's generate examples, run on the shipped demo model, print exactly the shown text."""
    from lora_export.genai.decoder import export_decoder

    samples = readme_generate_samples()
    assert len(samples) == 3
    directory = export_decoder(ROOT / "models" / "demo.pt", tmp_path / "demo_genai", merge=False)
    for args, shown in samples:
        args = [str(directory / Path(a).name) if a.endswith(".onnx_adapter") else a for a in args]
        code, out, stderr = invoke("generate", directory, *args)
        assert code == 0, stderr
        assert out.rstrip("\n") == shown, (args, out)


# --------------------------------------------------------------------------- PyTorch generate()


def tiny_model() -> torch.nn.Module:
    return make_lora_model(seed=3)


def test_generate_is_greedy_by_default_like_the_cli() -> None:
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 12)
    with torch.no_grad():
        for t in range(5, 17):
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1)), t
    sampled = model.generate(prompt, 12, greedy=False, temperature=5.0, seed=1)
    assert torch.equal(model.generate(prompt, 12, greedy=False, temperature=5.0, seed=1), sampled)  # seeded
    assert not torch.equal(sampled, out)


def test_generate_refuses_a_budget_past_max_seq_len() -> None:
    model = tiny_model()
    limit = TINY_CONFIG["max_seq_len"]
    prompt = torch.zeros(1, limit - 4, dtype=torch.int64)
    assert model.generate(prompt, 4).shape == (1, limit)
    with pytest.raises(ValueError, match=f"prompt \\({limit - 4} bytes\\) \\+ 5 new bytes exceed the model's "
                                         f"max_seq_len {limit}"):
        model.generate(prompt, 5)
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate(prompt, 1, greedy=False, temperature=0.0)

