"""Hostile inputs to lora-export and lora-train: every one is refused with exit 2 (1 only for a failed parity
check or a `check` mismatch) and ONE line ``error: ...``, never a traceback, never runs pickled code, and leaves
the working directory exactly as it was (no new, changed or removed file, hidden temporary files included)."""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_lora_model

from lora_export.adapters import read_adapter, write_adapter
from lora_export.checkpoint import save_checkpoint
from lora_export.cli import export_cli, train_cli
from lora_export.train import prose_text

CLIS = {"lora-export": export_cli, "lora-train": train_cli}
FAST = ["--no-validate", "--no-simplify", "--quiet"]
TRAIN = ["--steps", "1", "--batch-size", "2", "--quiet"]
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--local-heads", "1", "--window", "8",
        "--max-seq-len", "32", "--dropout", "0"]
INPUTS = ("c.pt", "m.onnx", "a.onnx_adapter", "b.pt", "t.txt")  # checkpoint, adapter model, adapter, base, text
COMMANDS = {
    "export": ("lora-export", ["c.pt", "--merge", *FAST]),
    "export-adapters": ("lora-export", ["export", "c.pt", "--adapters-as-inputs", *FAST]),
    "adapter": ("lora-export", ["adapter", "c.pt", "--model", "m.onnx"]),
    "check": ("lora-export", ["check", "m.onnx", "a.onnx_adapter"]),
    "validate": ("lora-export", ["validate", "m.onnx", "--checkpoint", "c.pt", "--adapter", "a.onnx_adapter",
                                 "--quiet"]),
    "pretrain": ("lora-train", ["pretrain", "-o", "out.pt", "--data", "t.txt", *TINY, *TRAIN]),
    "adapt": ("lora-train", ["adapt", "b.pt", "-o", "out.pt", "--data", "t.txt", *TRAIN]),
}
CHECKPOINT_OF = {"export": "c.pt", "export-adapters": "c.pt", "adapter": "c.pt", "validate": "c.pt", "adapt": "b.pt"}
KINDS = ("missing", "directory", "empty", "random", "truncated", "text")
STARTED = "[lora-export] exporting"  # the progress line of the (slow) torch export: work has begun


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def snapshot(root: Path) -> dict[str, tuple]:
    """{relative path: (size, sha256)} of every file under root, hidden ones included; folders and links too."""
    state: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir",)
            else:
                data = path.read_bytes()
                state[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return state


def assert_refused(outcome: tuple, before: dict, cwd: Path, codes: tuple[int, ...] = (2,), needle: str | None = None,
                   marker: Path | None = None, no_work: bool = False) -> None:
    """Everything a refusal must be: exit code, one `error:` line, no traceback, no file touched, no payload run."""
    code, out, err, exception = outcome
    shown = f"exit {code}\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}\nexception: {exception!r}"
    assert code in codes, shown
    assert exception is None or isinstance(exception, SystemExit), shown
    assert "Traceback" not in out + err, shown
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[lora-export]")]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        message = lines[0]
    else:  # 1: a failed parity check or `check` mismatch, reported on stdout
        assert len(lines) <= 1 and all(line.startswith("error: ") for line in lines), shown
        assert not out.startswith(("ok", "PASS")) and re.search(r"^(mismatch|FAIL)", out, re.M), shown
        message = out + err
    if needle is not None:
        assert needle.lower() in message.lower(), shown
    if no_work:
        assert STARTED not in err, f"the export started before refusing\n{shown}"
    if marker is not None:
        assert not marker.exists(), "the pickled payload ran"
    after = snapshot(cwd)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files created, removed or changed: {changed}\n{shown}"


def refused(tool: str, args: list[str], **expect: object) -> None:
    """Run tool (in-process, in the current directory) on args and assert_refused on the outcome."""
    cwd = Path.cwd()
    before = snapshot(cwd)
    result = CliRunner().invoke(CLIS[tool], [str(a) for a in args])
    assert_refused((result.exit_code, result.stdout, result.stderr, result.exception), before, cwd, **expect)


def make_hostile(path: Path, kind: str) -> None:
    """Replace the input at path with a missing file, a directory, or bad bytes of one kind."""
    real = path.read_bytes()
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "truncated":
        path.write_bytes(real[: len(real) // 2])
    elif kind == "text":
        path.write_text("This is a text file with a model's name, not a model.\n" * 40)


def edit_checkpoint(path: Path, edit) -> None:
    """Load a checkpoint as save_checkpoint wrote it, edit the dict in place, torch.save it back."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def deep_list() -> list:
    """40 levels of shared references: 2**40 paths through a few hundred bytes of pickle."""
    b: list = []
    for _ in range(40):
        b = [b, b]
    return b


@pytest.fixture(scope="module")
def sources(tiny_checkpoint, adapter_export, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile_sources")
    save_checkpoint(folder / "b.pt", make_lora_model(r=0), {"seed": 0, "stage": "test"})
    (folder / "t.txt").write_bytes(prose_text()[:20_000])
    return dict(zip(INPUTS, (tiny_checkpoint, adapter_export.model_path, adapter_export.adapter_path,
                             folder / "b.pt", folder / "t.txt"), strict=True))


@pytest.fixture
def work(sources, tmp_path, monkeypatch) -> Path:
    """A working directory holding copies of every input (and of the files the export wrote beside it, such as
    an integrity record `<adapter>.json`, renamed along), made the current directory."""
    for name, source in sources.items():
        for companion in filter(Path.is_file, source.parent.glob(f"{glob.escape(source.name)}.*")):
            shutil.copyfile(companion, tmp_path / (name + companion.name[len(source.name):]))
        shutil.copyfile(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# 1. unreadable inputs, in every input slot of every command
BAD_FILES = [(cmd, name, kind) for cmd, (_, args) in COMMANDS.items() for name in INPUTS if name in args
             for kind in (KINDS if name != "t.txt" else KINDS[:3])]


@pytest.mark.parametrize(("command", "name", "kind"), BAD_FILES, ids=["-".join(p) for p in BAD_FILES])
def test_unreadable_input(work, command, name, kind):
    make_hostile(work / name, kind)
    tool, args = COMMANDS[command]
    refused(tool, args, needle=name)


# 2. code-carrying pickles
PICKLES = [(cmd, form) for cmd in CHECKPOINT_OF for form in ("protocol2", "protocol5", "torch-zip")]


@pytest.mark.parametrize(("command", "form"), PICKLES, ids=["-".join(p) for p in PICKLES])
def test_pickled_code_never_runs(work, command, form):
    marker = work / "PWNED"
    path = work / CHECKPOINT_OF[command]
    if form == "torch-zip":
        torch.save({"format": "lora-export-checkpoint", "format_version": 1, "x": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=int(form[-1])))
    tool, args = COMMANDS[command]
    refused(tool, args, needle="code", marker=marker)


# 3. outputs that would overwrite an input; 4. outputs and options checked before any work
NV_NS = ["--no-validate", "--no-simplify"]
OUTPUT_CASES = {
    "export-default-output-is-input": ("cp c.pt m.onnx", "lora-export", ["m.onnx", "--merge", *NV_NS]),
    "export-o-is-checkpoint": ("", "lora-export", ["c.pt", "--merge", "-o", "c.pt", *NV_NS]),
    "export-default-adapter-output-is-input": ("cp c.pt c.onnx_adapter", "lora-export",
                                               ["c.onnx_adapter", "--adapters-as-inputs", "-o", "c.onnx", *NV_NS]),
    "export-o-symlink-to-checkpoint": ("ln c.pt x.onnx", "lora-export", ["c.pt", "--merge", "-o", "x.onnx", *NV_NS]),
    "adapter-default-output-is-checkpoint": ("cp c.pt c.onnx_adapter", "lora-export",
                                             ["adapter", "c.onnx_adapter", "--model", "m.onnx"]),
    "adapter-o-is-model": ("", "lora-export", ["adapter", "c.pt", "--model", "m.onnx", "-o", "m.onnx"]),
    "adapter-o-is-checkpoint": ("", "lora-export", ["adapter", "c.pt", "--model", "m.onnx", "-o", "c.pt"]),
    "pretrain-o-is-data": ("cp t.txt d.pt", "lora-train", ["pretrain", "--data", "d.pt", "-o", "d.pt", *TINY, *TRAIN]),
    "adapt-o-is-base": ("", "lora-train", ["adapt", "b.pt", "-o", "b.pt", "--data", "t.txt", *TRAIN]),
    "validate-report-over-checkpoint": ("cp c.pt parity.json", "lora-export",
                                        ["validate", "m.onnx", "--checkpoint", "parity.json", "--report", ".",
                                         "--quiet"]),
    "export-o-is-directory": ("mkdir new.onnx", "lora-export", ["c.pt", "--merge", "-o", "new.onnx", *NV_NS]),
    "export-adapter-output-is-directory": ("mkdir new.onnx_adapter", "lora-export",
                                           ["c.pt", "--adapters-as-inputs", "-o", "new.onnx", "--adapter-output",
                                            "new.onnx_adapter", *NV_NS]),
    "export-o-in-missing-directory": ("", "lora-export", ["c.pt", "--merge", "-o", "missing/new.onnx", *NV_NS]),
    "export-atol-negative": ("", "lora-export", ["c.pt", "--merge", "-o", "new.onnx", "--no-simplify", "--atol", "-1"]),
    "export-rtol-nan": ("", "lora-export", ["c.pt", "--merge", "-o", "new.onnx", "--no-simplify", "--rtol", "nan"]),
    "export-providers-foo": ("", "lora-export", ["c.pt", "--merge", "-o", "new.onnx", "--no-simplify", "--providers",
                                                 "foo"]),
}


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_output_refused_before_any_work(work, case):
    setup, tool, args = OUTPUT_CASES[case]
    if setup:
        action, *names = setup.split()
        if action == "cp":
            shutil.copyfile(work / names[0], work / names[1])
        elif action == "ln":
            os.symlink(names[0], work / names[1])
        else:
            (work / names[0]).mkdir()
    refused(tool, args, no_work=True)


# 5. shared-reference bombs: refused at the cost of an ordinary bad file, in child processes that can be killed
DEEP = {
    "format_version": lambda p: p.__setitem__("format_version", deep_list()),
    "global_attn": lambda p: p["config"].__setitem__("global_attn", deep_list()),
    "lora_targets": lambda p: p["config"].__setitem__("lora_targets", [deep_list()]),
}


@pytest.fixture(scope="module")
def deep_runs(tiny_checkpoint, tmp_path_factory) -> dict[str, tuple]:
    """Every case, and as a baseline an ordinary bad checkpoint (heads = -1: start-up, imports, torch.load), run as
    child processes one after another: killed after 120 s, capped at 4 GB of address space so that a runaway copy
    fails alone. Each result carries the child's CPU seconds (from wait4), which a loaded machine hardly moves."""
    exe = str(Path(sys.executable).with_name("lora-export"))
    results: dict[str, tuple] = {}
    for case, edit in {"baseline": lambda p: p["config"].__setitem__("heads", -1), **DEEP}.items():
        cwd = tmp_path_factory.mktemp(f"deep_{case}")
        shutil.copyfile(tiny_checkpoint, cwd / "c.pt")
        edit_checkpoint(cwd / "c.pt", edit)
        before, out, err = snapshot(cwd), tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([exe, "c.pt", "--merge", *FAST], cwd=cwd, stdout=out, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (4 << 30, 4 << 30))
        start = time.perf_counter()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > 120:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        texts = [(f.seek(0), f.read(), f.close())[1] for f in (out, err)]
        results[case] = ((proc.returncode, *texts, None), before, cwd, usage.ru_utime + usage.ru_stime)
    return results


@pytest.mark.parametrize("case", DEEP)
def test_shared_reference_bomb_refused_fast(deep_runs, case):
    outcome, before, cwd, cpu_seconds = deep_runs[case]
    (baseline_code, *_), *_, baseline = deep_runs["baseline"]
    assert baseline_code == 2, deep_runs["baseline"]
    assert cpu_seconds < baseline + 2, f"{case}: {cpu_seconds:.1f} CPU s; an ordinary bad file: {baseline:.1f}"
    assert_refused(outcome, before, cwd)


# 6. bad config values; 7. NaN in a base weight; 8. one flipped bit in the weight data
BAD_CONFIG = {"dim": 128.0, "max_seq_len": 10**12, "local_attn_window_size": 10**12, "heads": -1,
              "dropout": float("nan"), "global_attn": 7, "r": True}
CONFIG_CASES = [(cmd, key) for cmd in ("export", "adapt") for key in BAD_CONFIG]


@pytest.mark.parametrize(("command", "key"), CONFIG_CASES, ids=["-".join(p) for p in CONFIG_CASES])
def test_bad_config_value(work, command, key):
    edit_checkpoint(work / CHECKPOINT_OF[command], lambda p: p["config"].__setitem__(key, BAD_CONFIG[key]))
    refused(*COMMANDS[command])


@pytest.mark.parametrize("command", ["export", "adapt"])
def test_nan_in_base_weight(work, command):
    path = work / CHECKPOINT_OF[command]
    edit_checkpoint(path, lambda p: p["base"]["lm_head.weight"].__setitem__((0, 0), float("nan")))
    refused(*COMMANDS[command], needle="lm_head.weight")


def flip_bit_in_largest_storage(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor storage of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename)), key=lambda i: i.file_size)
        original = archive.read(info)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    assert data[start: start + info.file_size] == original  # really the tensor's bytes
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", list(CHECKPOINT_OF))
def test_flipped_bit_in_checkpoint(work, command):
    flip_bit_in_largest_storage(work / CHECKPOINT_OF[command])
    refused(*COMMANDS[command])


# 9. corrupt adapters: never 'ok' or a pass
@pytest.mark.parametrize("command", ["check", "validate"])
def test_flipped_byte_in_adapter_data(work, command):
    path = work / "a.onnx_adapter"
    data = bytearray(path.read_bytes())
    tensors, _ = read_adapter(path)
    starts = {name: data.find(array.tobytes()) for name, array in tensors.items()}
    assert min(starts.values()) >= 0, starts  # every tensor's bytes are stored as they are
    end = max(starts[name] + array.nbytes for name, array in tensors.items())  # the last tensor in the file
    data[end - 1] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(*COMMANDS[command], codes=(1, 2))


def test_nan_in_adapter(work):
    path = work / "a.onnx_adapter"
    tensors, version = read_adapter(path)
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    write_adapter(path, tensors, version)
    refused(*COMMANDS["check"], codes=(1, 2), needle="nan")


# 10. training hyper-parameters
HYPER = {"alpha-nan": ["--alpha", "nan"], "alpha-inf": ["--alpha", "inf"], "r-0": ["--r", "0"], "r--1": ["--r", "-1"],
         "lr--1": ["--lr", "-1"], "steps-0": ["--steps", "0"], "lora-dropout-1.5": ["--lora-dropout", "1.5"]}


@pytest.mark.parametrize("case", HYPER)
def test_bad_training_setting(work, case):
    tool, args = COMMANDS["adapt"]
    refused(tool, [*args, *HYPER[case]])
