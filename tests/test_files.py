"""The promise about the user's files (``lora_export.files``): outputs never replace inputs, multi-file outputs
land completely or not at all, interrupts and killed processes leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_export.cli import export_cli
from lora_export.errors import OutputError
from lora_export.export import adapters
from lora_export.files import (
    LOCK_NAME,
    STAGING_SUFFIX,
    check_output_dir,
    check_outputs,
    remove_stale_staging,
    staged_outputs,
)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too) with its bytes; directories as b'<dir>'."""
    return {str(p.relative_to(root)): (b"<dir>" if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def test_outputs_naming_an_input_are_refused_through_symlinks_and_hard_links(tmp_path):
    source = tmp_path / "model.pt"
    source.write_bytes(b"weights")
    (tmp_path / "link.onnx").symlink_to(source)
    os.link(source, tmp_path / "hard.onnx")
    for output in (source, tmp_path / "link.onnx", tmp_path / "hard.onnx", tmp_path / "." / "model.pt"):
        with pytest.raises(OutputError, match="would overwrite the input"):
            check_outputs([output], [source])
    with pytest.raises(OutputError, match="named twice"):
        check_outputs([tmp_path / "a.onnx", tmp_path / "a.onnx"])
    with pytest.raises(OutputError, match="is a directory"):
        check_outputs([tmp_path])
    check_outputs([tmp_path / "new.onnx"], [source])  # a fresh name is fine


def test_report_directory_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_dir(tmp_path / "file", ["parity.json"])
    model = tmp_path / "parity.json"
    model.write_text("{}")
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_output_dir(tmp_path, ["parity.json"], [model])
    check_output_dir(tmp_path / "new" / "deeper", ["parity.json"], [model])  # made with parents
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_staged_files_land_together_or_not_at_all(tmp_path):
    old = {"a.onnx": b"old model", "a.onnx.data": b"old data"}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    before = tree(tmp_path)
    with pytest.raises(OSError, match="disk full"), staged_outputs() as stage:
        stage.path(tmp_path / "a.onnx").write_bytes(b"new model")
        stage.path(tmp_path / "a.onnx_adapter").write_bytes(b"half an adap")
        raise OSError("disk full")
    assert tree(tmp_path) == before  # old outputs intact, no new file, no staging directory

    with staged_outputs() as stage:
        stage.path(tmp_path / "a.onnx").write_bytes(b"new model")
        stage.remove(tmp_path / "a.onnx.data")
    assert tree(tmp_path) == {"a.onnx": b"new model"}


def test_a_failed_rename_restores_what_was_replaced(tmp_path, monkeypatch):
    (tmp_path / "a.onnx").write_bytes(b"old model")
    before = tree(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("a.onnx_adapter"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), staged_outputs() as stage:
        stage.path(tmp_path / "a.onnx").write_bytes(b"new model")
        stage.path(tmp_path / "a.onnx_adapter").write_bytes(b"adapter")
    monkeypatch.undo()
    assert tree(tmp_path) == before


def test_stale_staging_of_a_killed_process_is_removed_but_a_live_one_is_kept(tmp_path):
    stale = tmp_path / f".dead{STAGING_SUFFIX}"
    stale.mkdir()
    (stale / LOCK_NAME).write_text("")  # nobody holds the lock: its process is gone
    (stale / "model.onnx").write_bytes(b"partial")
    with staged_outputs() as stage:
        live = stage.path(tmp_path / "m.onnx").parent
        assert remove_stale_staging(tmp_path) == []  # the running stage holds its lock
        assert live.is_dir() and not stale.exists()  # opening the stage removed the stale one
        stage.path(tmp_path / "m.onnx").write_bytes(b"model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_sigkill_during_a_stage_leaves_a_directory_the_next_run_removes(tmp_path):
    code = ("import sys, time; from pathlib import Path; from lora_export.files import staged_outputs\n"
            "with staged_outputs() as stage:\n"
            "    stage.path(Path(sys.argv[1]) / 'm.onnx').write_bytes(b'partial'); print('staged', flush=True)\n"
            "    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "staged"
    child.kill()
    child.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(STAGING_SUFFIX)]  # what SIGKILL leaves
    with staged_outputs() as stage:
        stage.path(tmp_path / "m.onnx").write_bytes(b"model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_adapter_write_failure_leaves_no_model_behind(tiny_checkpoint, tmp_path, monkeypatch):
    """ONNX Runtime raises RuntimeError (not OSError) when the disk fills while it writes the adapter: the export
    must end in one line with exit 2, and the model written just before must not land without its adapter."""

    class FullDisk(adapters.ort.AdapterFormat):
        def export_adapter(self, path: str) -> None:
            Path(path).write_bytes(b"\0" * 10)
            raise RuntimeError("adapter_format_utils.cc:42 onnxruntime::Save Failed to write: No space left on device")

    monkeypatch.setattr(adapters.ort, "AdapterFormat", FullDisk)
    result = CliRunner().invoke(export_cli, [str(tiny_checkpoint), "--adapters-as-inputs", "-o",
                                             str(tmp_path / "m.onnx"), "--no-validate", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0]
    assert list(tmp_path.iterdir()) == []


def default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a shell starts a command (a test runner's worker may ignore SIGINT, and
    an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize(("signum", "code", "line"), [(signal.SIGINT, 130, "error: interrupted"),
                                                     (signal.SIGTERM, 143, "error: terminated")])
def test_signal_during_export_exits_with_one_line_and_no_files(tiny_checkpoint, tmp_path, signum, code, line):
    """SIGINT (Ctrl-C) or SIGTERM once the export has begun: one line, exit 130 / 143, nothing left behind."""
    exe = Path(sys.executable).with_name("lora-export")
    child = subprocess.Popen([str(exe), str(tiny_checkpoint), "--merge", "-o", str(tmp_path / "m.onnx")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             preexec_fn=default_signals)
    seen = []
    for progress in child.stderr:  # wait until the work has really started
        seen.append(progress)
        if "exporting" in progress:
            break
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    lines = [text for text in ("".join(seen) + err).splitlines() if text and not text.startswith("[lora-export]")]
    assert child.returncode == code and lines == [line], (child.returncode, err)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_imports_exits_130(tiny_checkpoint, tmp_path):
    """SIGINT while torch and ONNX Runtime are still being imported: one line, exit 130."""
    exe = Path(sys.executable).with_name("lora-export")
    child = subprocess.Popen([str(exe), str(tiny_checkpoint), "--merge", "-o", str(tmp_path / "m.onnx")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             preexec_fn=default_signals)
    maps, deadline = Path(f"/proc/{child.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # torch is loading: the imports
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and err.strip().splitlines() == ["error: interrupted"], (child.returncode, err)
    assert list(tmp_path.iterdir()) == []
