"""Hostile inputs to lora-export and lora-train: every one is refused with exit 2 (1 only for a failed parity
check or a `check` mismatch) and ONE line ``error: ...``, never a traceback, never runs pickled code, and leaves
the working directory exactly as it was (no new, changed or removed file, hidden temporary files included)."""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import json
import lzma
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
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch
from conftest import TINY_ARGS, assert_refused, make_lora_model, refused, run_cli, snapshot
from safetensors import safe_open
from safetensors.torch import save_file

from lora_export.corpus import prose_text, read_text_files
from lora_export.export.adapters import read_adapter, write_adapter
from lora_export.export.peft import to_peft
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint, tensor_sha256

FAST = ["--no-validate", "--no-simplify", "--quiet"]
TRAIN = ["--steps", "1", "--batch-size", "2", "--quiet"]
INPUTS = ("c.pt", "m.onnx", "a.onnx_adapter", "b.pt", "t.txt")  # checkpoint, adapter model, adapter, base, text
COMMANDS = {
    "export": ("lora-export", ["c.pt", "--merge", *FAST]),
    "export-adapters": ("lora-export", ["export", "c.pt", "--adapters-as-inputs", *FAST]),
    "adapter": ("lora-export", ["adapter", "c.pt", "--model", "m.onnx"]),
    "check": ("lora-export", ["check", "m.onnx", "a.onnx_adapter"]),
    "validate": ("lora-export", ["validate", "m.onnx", "--checkpoint", "c.pt", "--adapter", "a.onnx_adapter",
                                 "--quiet"]),
    "pretrain": ("lora-train", ["pretrain", "-o", "out.pt", "--data", "t.txt", *TINY_ARGS, *TRAIN]),
    "adapt": ("lora-train", ["adapt", "b.pt", "-o", "out.pt", "--data", "t.txt", *TRAIN]),
}
CHECKPOINT_OF = {"export": "c.pt", "export-adapters": "c.pt", "adapter": "c.pt", "validate": "c.pt", "adapt": "b.pt"}
KINDS = ("missing", "directory", "empty", "random", "truncated", "text")


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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
    "pretrain-o-is-data": ("cp t.txt d.pt", "lora-train",
                           ["pretrain", "--data", "d.pt", "-o", "d.pt", *TINY_ARGS, *TRAIN]),
    "adapt-o-is-base": ("", "lora-train", ["adapt", "b.pt", "-o", "b.pt", "--data", "t.txt", *TRAIN]),
    "validate-report-over-checkpoint": ("cp c.pt parity.json", "lora-export",
                                        ["validate", "m.onnx", "--checkpoint", "parity.json", "--report", ".",
                                         "--quiet"]),
    "export-o-is-directory": ("mkdir new.onnx", "lora-export", ["c.pt", "--merge", "-o", "new.onnx", *NV_NS]),
    "export-adapter-output-is-directory": ("mkdir new.onnx_adapter", "lora-export",
                                           ["c.pt", "--adapters-as-inputs", "-o", "new.onnx", "--adapter-output",
                                            "new.onnx_adapter", *NV_NS]),
    "export-o-under-a-file": ("cp c.pt file", "lora-export", ["c.pt", "--merge", "-o", "file/new.onnx", *NV_NS]),
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


def resident_bytes(pid: int) -> int:
    """The resident memory of a running process (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def run_child(args: list[str], cwd: Path, address_space: int | None = None,
              max_resident: int | None = None) -> tuple[tuple, resource.struct_rusage]:
    """Run `lora-export args` as a child process in cwd: killed after 120 s, or (polled every 10 ms) once its
    resident memory passes ``max_resident``, its address space capped at ``address_space``. Returns the outcome
    (code, stdout, stderr, None) and the child's own resource usage (wait4: peak resident memory, CPU seconds)."""
    exe = str(Path(sys.executable).with_name("lora-export"))
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    # preexec_fn makes Popen fork instead of vfork: a vforked child's exec keeps this (big) test process's
    # resident high-water mark as its own ru_maxrss, a forked one starts from its own small one
    proc = subprocess.Popen([exe, *args], cwd=cwd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: None)
    if address_space is not None:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (address_space, address_space))
    start = time.perf_counter()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > 120 or (max_resident and resident_bytes(proc.pid) > max_resident):
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    texts = [(f.seek(0), f.read(), f.close())[1] for f in (out, err)]
    return (proc.returncode, *texts, None), usage


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
    results: dict[str, tuple] = {}
    for case, edit in {"baseline": lambda p: p["config"].__setitem__("heads", -1), **DEEP}.items():
        cwd = tmp_path_factory.mktemp(f"deep_{case}")
        shutil.copyfile(tiny_checkpoint, cwd / "c.pt")
        edit_checkpoint(cwd / "c.pt", edit)
        before = snapshot(cwd)
        outcome, usage = run_child(["c.pt", "--merge", *FAST], cwd, address_space=4 << 30)
        results[case] = (outcome, before, cwd, usage.ru_utime + usage.ru_stime)
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


# 11. compressed and binary --data: decompressed, or refused naming the file
def test_compressed_data_is_read_as_its_text(tmp_path):
    text = prose_text()[:5000]
    for name, compress in (("t.txt.gz", gzip.compress), ("t.bz2", bz2.compress), ("t.xz", lzma.compress)):
        (tmp_path / name).write_bytes(compress(text))
        assert read_text_files([tmp_path / name]) == text, name


BINARY_DATA = {
    "random.bin": random.Random(0).randbytes(4096),  # NUL bytes
    "latin.dat": bytes(range(0x80, 0x100)) * 16,  # no NUL, none of it UTF-8
    "cut.gz": gzip.compress(prose_text()[:20_000])[:2000],  # compressed data cut short
}
BINARY_CASES = [(command, name) for command in ("adapt", "validate") for name in BINARY_DATA]


@pytest.mark.parametrize(("command", "name"), BINARY_CASES, ids=["-".join(c) for c in BINARY_CASES])
def test_binary_data_refused(work, command, name):
    (work / name).write_bytes(BINARY_DATA[name])
    tool, args = COMMANDS[command]
    args = [name if arg == "t.txt" else arg for arg in args] if command == "adapt" else [*args, "--data", name]
    refused(tool, args, needle=name)


# 12. inputs that are not regular files, and giants: refused before they are read
@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO at path for the block. A thread opens and closes its writing end whenever a reader waits on it, so
    code that (wrongly) reads it sees an empty file instead of hanging the test."""
    os.mkfifo(path)
    stop = threading.Event()

    def unblock() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):  # ENXIO: no reader is waiting
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            stop.wait(0.02)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def memory_cap(extra: int = 1 << 30) -> Iterator[None]:
    """Cap this process's address space at its present size plus ``extra`` for the block: a command that reads a
    giant input whole fails (MemoryError) within 1 GiB instead of filling the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) << 10
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def giant(path: Path, size: int = 4 << 30) -> None:
    """Make path a sparse file of ``size`` bytes (no disk space, no time)."""
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def peft_source(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint's LoRA as a PEFT adapter directory."""
    return to_peft(tiny_checkpoint, tmp_path_factory.mktemp("peft") / "p")


@pytest.fixture
def peft_work(work, peft_source) -> Path:
    """``work`` with the PEFT adapter directory copied in as p/, for `from-peft p --base b.pt`."""
    shutil.copytree(peft_source, work / "p")
    return work


FROM_PEFT = ["from-peft", "p", "--base", "b.pt", "-o", "out.pt"]
COMPARE = ["compare-reports", "parity.json", "parity.json"]
SPECIAL = {  # (command, the input made special): every file a command opens
    "adapt-data": (COMMANDS["adapt"], "t.txt"),
    "validate-data": (("lora-export", [*COMMANDS["validate"][1], "--data", "t.txt"]), "t.txt"),
    "from-peft-config": (("lora-export", FROM_PEFT), "p/adapter_config.json"),
    "from-peft-weights": (("lora-export", FROM_PEFT), "p/adapter_model.safetensors"),
    "check-adapter-record": (COMMANDS["check"], "a.onnx_adapter.json"),
    "check-adapter": (COMMANDS["check"], "a.onnx_adapter"),
    "compare-reports": (("lora-export", COMPARE), "parity.json"),
    "export-checkpoint": (COMMANDS["export"], "c.pt"),
}


@pytest.mark.parametrize("case", SPECIAL)
def test_fifo_input_refused(peft_work, case):
    (tool, args), name = SPECIAL[case]
    (peft_work / name).unlink(missing_ok=True)
    with fifo(peft_work / name):
        refused(tool, args, needle="FIFO")


@pytest.mark.parametrize("command", ["adapt", "validate"])
def test_device_as_data_refused(work, command):
    tool, args = COMMANDS[command]
    args = ["/dev/zero" if arg == "t.txt" else arg for arg in args] if command == "adapt" else [
        *args, "--data", "/dev/zero"]
    with memory_cap():
        refused(tool, args, needle="/dev/zero")


GIANTS = {case: SPECIAL[case] for case in ("adapt-data", "validate-data", "from-peft-config", "check-adapter-record",
                                           "compare-reports")}


@pytest.mark.parametrize("case", GIANTS)
def test_giant_input_refused_within_1_gib(peft_work, case):
    (tool, args), name = GIANTS[case]
    giant(peft_work / name)
    with memory_cap():
        refused(tool, args, needle=name.split("/")[-1])


def test_decompression_bomb_refused_within_1_gib(work):
    (work / "bomb.gz").write_bytes(gzip.compress(b"a" * (300 << 20), compresslevel=1))
    tool, args = COMMANDS["adapt"]
    with memory_cap():
        refused(tool, [*args, "--data", "bomb.gz"], needle="bomb.gz")


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the JSON header of a .safetensors file, the offset where its data starts)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(size)), 8 + size


@pytest.fixture
def safetensors_checkpoint(work) -> Path:
    """c.pt of ``work`` saved again as c.safetensors."""
    path = work / "c.safetensors"
    save_checkpoint(path, load_checkpoint(work / "c.pt"), {"seed": 0, "stage": "test"})
    return path


def test_giant_tensor_declared_in_safetensors_header_costs_under_1_gib(safetensors_checkpoint):
    """A header whose lm_head.weight is 2**30 floats (4 GiB, the file padded out sparsely): refused from the
    header's shapes, before the tensor is read or hashed."""
    path = safetensors_checkpoint
    header, start = safetensors_header(path)
    raw, data = path.read_bytes()[start:], b""
    for name, entry in sorted(header.items(), key=lambda item: item[1].get("data_offsets", [-1])):
        if name not in ("__metadata__", "base.lm_head.weight"):  # the others packed as before, lm_head last
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = [len(data), len(data) + end - begin]
            data += raw[begin:end]
    header["base.lm_head.weight"].update(shape=[1 << 30], data_offsets=[len(data), len(data) + (4 << 30)])
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    with open(path, "r+b") as f:
        f.truncate(8 + len(encoded) + len(data) + (4 << 30))
    before = snapshot(path.parent)
    outcome, usage = run_child([path.name, "--merge", *FAST], path.parent, max_resident=1 << 30)
    assert usage.ru_maxrss << 10 < 1 << 30, f"peak resident memory {usage.ru_maxrss >> 10} MiB\n{outcome}"
    assert_refused(outcome, before, path.parent, needle="lm_head.weight")


def test_giant_non_checkpoint_costs_under_1_gib(work):
    """4 GiB of zeros as a checkpoint: torch refuses it, and the scan for pickled code reads only its start."""
    giant(work / "c.pt")
    before = snapshot(work)
    outcome, usage = run_child(["c.pt", "--merge", *FAST], work, max_resident=1 << 30)
    assert usage.ru_maxrss << 10 < 1 << 30, f"peak resident memory {usage.ru_maxrss >> 10} MiB\n{outcome}"
    assert_refused(outcome, before, work, needle="c.pt")


# 13. JSON nested 100,000 deep, in every JSON file and in ONNX metadata: one line, never a RecursionError
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_CASES = {case: SPECIAL[case] for case in ("from-peft-config", "check-adapter-record")}


@pytest.mark.parametrize("case", DEEP_CASES)
def test_deep_json_file_refused(peft_work, case):
    (tool, args), name = DEEP_CASES[case]
    (peft_work / name).write_text(DEEP_JSON)
    refused(tool, args, needle="nested deeper")


def test_deep_json_in_onnx_metadata_refused(work):
    model = onnx.load(work / "m.onnx")
    entry = next(p for p in model.metadata_props if p.key == "lora_export.model_config")
    entry.value = DEEP_JSON
    onnx.save(model, work / "m.onnx")
    refused(*COMMANDS["validate"], needle="lora_export.model_config")


# 14. PEFT configs: strict types (a string is not a bool, a bool not an int), every field named in one line
PEFT_CONFIGS = {
    "r-null": ("r", None), "r-true": ("r", True), "r-0": ("r", 0), "lora_alpha-null": ("lora_alpha", None),
    "lora_alpha-400-digits": ("lora_alpha", 10**400), "lora_dropout-list": ("lora_dropout", [0.1]),
    "lora_dropout-string": ("lora_dropout", "x"), "use_rslora-string": ("use_rslora", "false"),
    "use_rslora-int": ("use_rslora", 0), "alpha_pattern-null-value": ("alpha_pattern", {"to_q": None}),
    "alpha_pattern-string-value": ("alpha_pattern", {"to_q": "x"}),
}


@pytest.mark.parametrize("case", PEFT_CONFIGS)
def test_malformed_peft_config_field(peft_work, case):
    field, value = PEFT_CONFIGS[case]
    path = peft_work / "p" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, field: value}))
    refused("lora-export", FROM_PEFT, needle=f"{field}[" if isinstance(value, dict) else f"{field} =")


# 15. checkpoints: a float8 weight; a .safetensors whose tensor record was deleted and a tensor altered
def rewrite_safetensors(path: Path, edit) -> None:
    """Load a .safetensors checkpoint's tensors and plain metadata, edit(tensors, plain), save both back."""
    with safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        plain = json.loads(f.metadata()["lora_export"])
    edit(tensors, plain)
    save_file(tensors, path, metadata={"lora_export": json.dumps(plain)})


def test_float8_weight_refused_by_to_peft(safetensors_checkpoint):
    def to_float8(tensors, plain):
        tensors["lora.blocks.0.attn.to_q.lora_A"] = tensors["lora.blocks.0.attn.to_q.lora_A"].to(torch.float8_e4m3fn)
        plain["tensor_sha256"]["blocks.0.attn.to_q.lora_A"] = tensor_sha256(tensors["lora.blocks.0.attn.to_q.lora_A"])

    rewrite_safetensors(safetensors_checkpoint, to_float8)
    refused("lora-export", ["to-peft", safetensors_checkpoint.name, "-o", "out"], needle="float8")


def test_deleted_tensor_record_is_damage(safetensors_checkpoint):
    def alter_without_record(tensors, plain):
        del plain["tensor_sha256"]
        tensors["base.lm_head.weight"][0, 0] += 1.0

    rewrite_safetensors(safetensors_checkpoint, alter_without_record)
    refused("lora-export", [safetensors_checkpoint.name, "--merge", *FAST], needle="tensor_sha256", no_work=True)


# 16. generate --stop-byte: a byte is 0..255 (click's own usage error, exit 2)
@pytest.mark.parametrize("value", ["256", "-1"])
def test_stop_byte_out_of_range(work, value):
    before = snapshot(work)
    result = run_cli("generate", "missing_genai", "--prompt", "a", "--stop-byte", value)
    assert result.exit_code == 2 and "--stop-byte" in result.stderr and "0<=x<=255" in result.stderr, result.stderr
    assert snapshot(work) == before
