"""genai decoder directories a user can trust (issue 16): the given adapter is held against the given checkpoint,
`check` runs a decoder, `--data` feeds the decode prompt, one fp16 rule on every path, a genai_config.json read as
data against what lora-export writes, and a killed write that does not block the next one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke, make_lora_model, refused, same_base_other_rank, snapshot

from lora_export.export.convert import export_adapter
from lora_export.export.quantize import convert_fp16
from lora_export.genai.decoder import export_decoder
from lora_export.layout import ADAPTER_FILE, GENAI_CONFIG, MODEL_FILE, TOKENIZER_CONFIG, TOKENIZER_FILE
from lora_export.model.checkpoint import save_checkpoint
from lora_export.pipeline import validate_and_report

# --------------------------------------------------------------------------- item 1: the given adapter


def test_given_adapter_is_held_against_the_given_checkpoint(genai_adapters, tiny_checkpoint, tmp_path):
    """Another checkpoint's adapter against tiny.pt fails naming the file passed; the matching pair passes, and the
    directory's own model.onnx_adapter (not under test) is named nowhere."""
    save_checkpoint(tmp_path / "other.pt", same_base_other_rank(tiny_checkpoint, r=2, seed=4))
    other = export_adapter(tmp_path / "other.pt", genai_adapters / MODEL_FILE, tmp_path / "other.onnx_adapter")

    wrong = validate_and_report(genai_adapters, tiny_checkpoint, adapter_path=other, providers=["cpu"],
                                report_dir=tmp_path / "w")
    assert wrong.status == "failed", wrong.summary
    assert any("adapter other.onnx_adapter is not tiny.pt's trained LoRA" in f for f in wrong.failures), wrong.failures
    assert not any(ADAPTER_FILE in f for f in wrong.failures), wrong.failures

    right = validate_and_report(genai_adapters, tmp_path / "other.pt", adapter_path=other, providers=["cpu"],
                                report_dir=tmp_path / "r")
    assert right.passed, right.summary
    assert [run.variant for run in right.decode] == ["base", "adapter other", "base"]


# --------------------------------------------------------------------------- item 3: check on a decoder


def test_check_runs_a_genai_decoder_with_its_own_adapter(genai_adapters):
    code, out, err = invoke("check", genai_adapters / MODEL_FILE, genai_adapters / ADAPTER_FILE)
    assert code == 0 and out.startswith("ok: "), out + err


# --------------------------------------------------------------------------- item 4: --data in genai validation


def test_decoder_validation_takes_its_prompt_from_data_and_records_it(genai_merged, tiny_checkpoint, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("Quixotic zebras vex the jumping fox over and over again.\n" * 4)
    code, out, err = invoke("validate", genai_merged, "--checkpoint", tiny_checkpoint, "--data", text,
                            "--providers", "cpu", "--report", tmp_path / "r", "--quiet")
    assert code == 0, out + err
    (run,) = json.loads((tmp_path / "r" / "parity.json").read_text())["decode"]
    assert run["prompt_source"] == "your data: mine.txt"
    assert len(run["prompt"]) == run["prompt_bytes"] and run["prompt"] in text.read_text()

    default = validate_and_report(genai_merged, tiny_checkpoint, providers=["cpu"], report_dir=tmp_path / "d")
    assert default.decode[0].prompt_source == "held-out prose" and default.decode[0].prompt not in text.read_text()


def test_decoder_validation_refuses_data_too_short_for_its_prompt(genai_merged, tiny_checkpoint, tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    code, out, err = invoke("validate", genai_merged, "--checkpoint", tiny_checkpoint, "--data", tmp_path / "short.txt",
                            "--providers", "cpu", "--report", tmp_path / "r", "--quiet")
    assert code == 2 and err.startswith("error: ") and "short.txt" in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- item 5: one fp16 rule


def test_fp16_limit_follows_the_logits_scale():
    """16 fp16 epsilons of the largest |logit| at each position, plus one epsilon relative; a given atol replaces
    the scaled part, a given rtol only the relative one."""
    from lora_export.parity.metrics import resolve_tolerance

    eps = 2.0**-10
    reference = np.array([[[0.0, 1.0, -20.0], [0.5, 0.25, 0.0]]])
    fp16 = resolve_tolerance("fp16", None, None)
    expected = np.array([[[16 * eps * 20, 16 * eps * 20 + eps, 16 * eps * 20 + 20 * eps],
                          [16 * eps * 0.5 + 0.5 * eps, 16 * eps * 0.5 + 0.25 * eps, 16 * eps * 0.5]]])
    np.testing.assert_allclose(fp16.deviation(reference, reference).limit, expected)
    given_atol = resolve_tolerance("fp16", 0.1, None)
    np.testing.assert_allclose(given_atol.deviation(reference, reference).limit, 0.1 + eps * abs(reference))
    assert resolve_tolerance("fp16", None, 0.5).atol_scale == fp16.atol_scale == 16 * eps
    assert resolve_tolerance("fp32", None, None).deviation(reference, reference).limit.shape == reference.shape


@pytest.fixture(scope="module")
def large_logits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA model whose logits reach ~|20| like a trained one's (the head scaled up): fp16 rounding noise
    there is a share of that scale, not of each logit."""
    model = make_lora_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    path = tmp_path_factory.mktemp("large") / "large.pt"
    save_checkpoint(path, model)
    return path


def test_fp16_decoder_of_large_logits_passes_on_the_scaled_limit(large_logits_checkpoint, tmp_path):
    directory = export_decoder(large_logits_checkpoint, tmp_path / "fp16", merge=False, precision="fp16")
    result = validate_and_report(directory, large_logits_checkpoint, providers=["cpu"], report_dir=tmp_path / "r")
    assert result.passed, result.summary
    assert max(abs(run.max_abs) for run in result.decode) > 0.01  # beyond a fixed fp16 atol of 1e-2
    assert "16 epsilons of that logit's magnitude" in result.pass_rule
    code, out, err = invoke("check", directory / MODEL_FILE, directory / ADAPTER_FILE)  # fp16 cache inputs
    assert code == 0 and out.startswith("ok: "), out + err


def test_fp16_scoring_graph_runs_on_cpu_under_the_same_rule(large_logits_checkpoint, tmp_path):
    from lora_export.export.convert import export_onnx

    exported = export_onnx(large_logits_checkpoint, tmp_path / "large.onnx", merge=True)
    fp16 = convert_fp16(exported.model_path, tmp_path / "large.fp16.onnx")
    result = validate_and_report(fp16, large_logits_checkpoint, providers=["cpu"], explicit_providers=True,
                                 report_dir=tmp_path / "r", latency_runs=1)
    assert result.passed, result.summary
    assert {c.provider for c in result.comparisons} == {"CPUExecutionProvider"}
    assert "16 epsilons of that logit's magnitude" in result.pass_rule


# --------------------------------------------------------------------------- item 9: genai_config.json as data


def _hostile_dir(source: Path, root: Path, mutate: str, scoring_graph: Path) -> Path:
    """A copy of a decoder directory with one hostile change."""
    directory = root / "genai"
    shutil.copytree(source, directory)
    config_path = directory / GENAI_CONFIG
    config = json.loads(config_path.read_text())
    if mutate == "custom_ops_library":
        config["model"]["decoder"]["session_options"] = {"custom_ops_library": "custom_ops.so"}
    elif mutate == "enable_profiling":
        config["model"]["decoder"]["session_options"] = {"enable_profiling": str(root.parent / "elsewhere" / "prof")}
    elif mutate == "context_huge":
        config["model"]["context_length"] = 100000
    elif mutate == "context_1e400":
        config_path.write_text(config_path.read_text().replace('"context_length": 32', '"context_length": 1e400'))
        return directory
    elif mutate == "scoring_graph":
        shutil.copyfile(scoring_graph, directory / MODEL_FILE)
    config_path.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("command", ["generate", "validate"])
@pytest.mark.parametrize(("mutate", "needle"), [
    ("custom_ops_library", "model.decoder.session_options: not a key lora-export writes"),
    ("enable_profiling", "model.decoder.session_options: not a key lora-export writes"),
    ("context_huge", "model.context_length is 100000, lora-export writes 32"),
    ("context_1e400", "model.context_length is inf"),
    ("scoring_graph", "not a lora-export genai decoder graph"),
])
def test_hostile_genai_config_is_refused_in_one_line(genai_merged, merged_export, tiny_checkpoint, tmp_path,
                                                     monkeypatch, command, mutate, needle):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "elsewhere").mkdir()
    directory = _hostile_dir(genai_merged, work, mutate, merged_export.model_path)
    shutil.copyfile(tiny_checkpoint, work / "c.pt")
    monkeypatch.chdir(work)
    args = (["generate", "genai", "--prompt", "Hi", "--max-new-bytes", "100" if mutate == "context_huge" else "5"]
            if command == "generate" else ["validate", "genai", "--checkpoint", "c.pt", "--providers", "cpu"])
    refused("lora-export", args, needle=needle)
    assert directory.is_dir() and not any((tmp_path / "elsewhere").iterdir())


# --------------------------------------------------------------------------- item 13: kill -9 during a write


def test_genai_export_after_a_killed_write_clears_its_staging(tiny_checkpoint, tmp_path):
    """A process killed (SIGKILL) while staging files into the directory leaves a staging folder there; the next
    --genai export removes it and writes the directory instead of calling it not empty."""
    directory = tmp_path / "out"
    directory.mkdir()
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal\n"
        "from lora_export.files import staged_outputs\n"
        "with staged_outputs() as stage:\n"
        f"    stage.path({str(directory / MODEL_FILE)!r}).write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")]  # the killed write's staging is there

    before = snapshot(tmp_path)
    code, out, err = invoke(tiny_checkpoint, "--genai", "-o", directory, "--no-validate", "--quiet")
    assert code == 0, out + err
    assert sorted(os.listdir(directory)) == [GENAI_CONFIG, MODEL_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG]
    assert before.keys() - snapshot(tmp_path).keys() == {p for p in before if p.startswith("out/.")}


def test_a_bug_in_the_reference_path_propagates_instead_of_blaming_the_provider(genai_merged, tiny_checkpoint,
                                                                                monkeypatch):
    """Only loading the decoder through onnxruntime-genai is a provider's failure; an error in our own PyTorch
    reference (or judging) is a bug and propagates as itself, neither exit 2 nor a CUDA 'not run'."""
    import lora_export.parity.decode as decode_module
    from lora_export.parity.validate_decoder import validate_decoder

    def broken_reference(*args, **kwargs):
        raise ZeroDivisionError("a bug in the reference")

    monkeypatch.setattr(decode_module, "_greedy_reference", broken_reference)
    with pytest.raises(ZeroDivisionError, match="a bug in the reference"):
        validate_decoder(genai_merged, tiny_checkpoint, providers=["cpu"])
    with pytest.raises(ZeroDivisionError, match="a bug in the reference"):
        validate_decoder(genai_merged, tiny_checkpoint, providers=None)
