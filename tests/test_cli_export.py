"""The lora-export command line: the literal quick-start command, exit codes, one-line errors, no partial files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error, invoke

from lora_export.cli import export_cli
from lora_export.export.quantize import convert_fp16

ROOT = Path(__file__).resolve().parent.parent


def test_literal_quick_start_command_on_the_demo_model(tmp_path):
    """`lora-export models/demo.pt --merge` as a new user types it, in a fresh copy of the repository files."""
    (tmp_path / "models").mkdir()
    shutil.copy(ROOT / "models" / "demo.pt", tmp_path / "models" / "demo.pt")
    exe = Path(sys.executable).with_name("lora-export")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(exe), "models/demo.pt", "--merge"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "form:        merged" in done.stdout and "PASS" in done.stdout
    assert (tmp_path / "models" / "demo.onnx").is_file()
    assert (tmp_path / "models" / "demo_parity" / "parity.html").is_file()
    assert "[lora-export] exporting" in done.stderr  # progress through the stages


def test_help_lists_every_command():
    """The Commands section of --help is exactly the registered commands, each with its one-line help."""
    code, out, _ = invoke("--help")
    assert code == 0
    listed = {line.split()[0]: line for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert set(listed) == set(export_cli.commands)
    for name, command in export_cli.commands.items():
        assert " ".join(command.help.split()[:3]) in listed[name]


@pytest.mark.parametrize("content", [None, b"not a checkpoint", "pickle"])
def test_bad_checkpoints_exit_2_with_one_line(tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "pickle":
        marker = tmp_path / "PWNED"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        path.write_bytes(pickle.dumps(Payload()))
    elif content is not None:
        path.write_bytes(content)
    code, _, err = invoke(path, "--merge")
    assert_one_line_error(code, err, str(path))
    assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["model.pt"])


def test_conflicting_flags_and_unwritable_output(tiny_checkpoint, tmp_path):
    code, _, err = invoke(tiny_checkpoint, "--merge", "--adapters-as-inputs")
    assert code == 2 and "exclude each other" in err
    code, _, err = invoke(tiny_checkpoint, "--merge", "--adapter-output", tmp_path / "x.onnx_adapter")
    assert_one_line_error(code, err, "adapter output only applies")
    code, _, err = invoke(tiny_checkpoint, "--merge", "-o", Path(os.devnull) / "missing" / "x.onnx")
    assert_one_line_error(code, err, "output directory cannot be created")
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_base_exits_2(adapter_export, tmp_path):
    from conftest import make_lora_model

    from lora_export.model.checkpoint import save_checkpoint

    other = tmp_path / "other.pt"
    save_checkpoint(other, make_lora_model(seed=5))
    code, _, err = invoke("adapter", other, "--model", adapter_export.model_path, "-o", tmp_path / "o.onnx_adapter")
    assert_one_line_error(code, err, "base weights differ")
    assert not (tmp_path / "o.onnx_adapter").exists()


def test_check_command(adapter_export, merged_export):
    code, out, _ = invoke("check", adapter_export.model_path, adapter_export.adapter_path)
    assert code == 0 and out.startswith("ok:")
    code, out, _ = invoke("check", merged_export.model_path, adapter_export.adapter_path)
    assert code == 1 and "has no LoRA inputs" in out


def test_validate_exit_codes(merged_export, tiny_checkpoint, tmp_path):
    code, out, err = invoke("validate", merged_export.model_path, "--checkpoint", tiny_checkpoint,
                            "--report", tmp_path / "ok", "--quiet")
    assert code == 0, err
    assert (tmp_path / "ok" / "parity.json").is_file()

    model = onnx.load(merged_export.model_path)
    bias = next(i for i in model.graph.initializer if i.name == "lm_head.bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[7] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    code, out, _ = invoke("validate", broken, "--checkpoint", tiny_checkpoint, "--report", tmp_path / "bad",
                          "--quiet")
    assert code == 1
    assert out.startswith("FAIL")



def test_explicit_cuda_that_cannot_run_exits_2(merged_export, tiny_checkpoint, tmp_path, cuda_runs):
    if cuda_runs:
        pytest.skip("CUDA really runs on this machine")
    code, _, err = invoke("validate", merged_export.model_path, "--checkpoint", tiny_checkpoint,
                          "--providers", "cuda", "--report", tmp_path / "r", "--quiet")
    assert_one_line_error(code, err, "CUDAExecutionProvider")


def test_fp16_model_validates_on_cpu(merged_export, tiny_checkpoint, tmp_path):
    fp16 = convert_fp16(merged_export.model_path, tmp_path / "tiny.fp16.onnx")
    code, out, err = invoke("validate", fp16, "--checkpoint", tiny_checkpoint, "--providers", "cpu", "--report",
                            tmp_path / "r", "--quiet")
    assert code == 0 and out.startswith("PASS") and "CPUExecutionProvider" in out, out + err


def test_export_with_int8_and_ort_format(tiny_checkpoint, tmp_path):
    code, out, err = invoke(tiny_checkpoint, "--merge", "--quantize", "int8", "--ort-format", "-o", tmp_path / "m.onnx",
                            "--quiet")
    assert code == 0, err
    names = {p.name for p in tmp_path.iterdir()}
    assert {"m.onnx", "m.int8.onnx", "m.ort", "m.int8.ort", "m_parity"} <= names
    assert (tmp_path / "m.int8.onnx").stat().st_size < (tmp_path / "m.onnx").stat().st_size
    report = (tmp_path / "m_parity" / "parity.md").read_text()
    assert "int8" in report and "Precisions" in report


def test_adapter_outputs_that_would_destroy_or_half_write_are_refused(adapter_export, tiny_checkpoint, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(adapter_export.model_path, model)
    before = model.read_bytes()
    code, _, err = invoke("adapter", tiny_checkpoint, "--model", model, "-o", model)
    assert_one_line_error(code, err, "must end in .onnx_adapter")
    code, _, err = invoke(tiny_checkpoint, "--adapters-as-inputs", "-o", tmp_path / "x.onnx",
                          "--adapter-output", Path(os.devnull) / "x.onnx_adapter")
    assert_one_line_error(code, err, "output directory cannot be created")
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_short_help_option():
    code, out, _ = invoke("-h")
    assert code == 0 and "validate" in out


def test_forms_have_their_own_default_outputs_and_replacing_one_takes_force(tiny_checkpoint, tmp_path):
    """merged and adapters-as-inputs of one checkpoint never collide; a second export to an existing output is
    refused (exit 2, file untouched) until --force; --json puts exactly one verdict object on stdout; the .ort
    builds are checked against their .onnx and listed; compare-reports tells two runs apart."""
    checkpoint = tmp_path / "c.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    code, out, err = invoke(checkpoint, "--json", "--ort-format", "--providers", "cpu")
    assert code == 0, err
    verdict = json.loads(out)  # the only stdout line
    assert verdict["status"] == "passed" and verdict["worst"]["case"] and verdict["providers"] == {
        "CPUExecutionProvider": True}
    assert "ORT format:" in err and "matches its fp32 .onnx" in err
    code, _, err = invoke(checkpoint, "--adapters-as-inputs", "--no-validate")
    assert code == 0, err
    assert {p.name for p in tmp_path.iterdir()} >= {"c.onnx", "c.ort", "c.adapters.onnx", "c.adapters.onnx_adapter",
                                                     "c_parity"}
    before = (tmp_path / "c.onnx").read_bytes()
    code, _, err = invoke(checkpoint, "--no-validate")
    assert_one_line_error(code, err, "exists; pass --force to replace it")
    assert (tmp_path / "c.onnx").read_bytes() == before
    code, _, err = invoke(checkpoint, "--force", "--report", tmp_path / "second", "--providers", "cpu")
    assert code == 0, err
    code, out, err = invoke("compare-reports", tmp_path / "c_parity", tmp_path / "second")
    assert code == 0 and out.startswith("verdict: passed -> passed") and "latency p50" in out, err
    code, _, err = invoke("compare-reports", tmp_path / "c_parity", tmp_path / "missing")
    assert_one_line_error(code, err, "no such file")
