"""The trainer at scale on the CPU: torchrun with gloo on 127.0.0.1 (2 processes on one node, and 2 "nodes" of one
process each) against one process with the same global batch; resume equality; bf16 / fp16 autocast; the
one-line refusals; a rank that dies.

Reference: the 1-process run. DDP averages the two processes' gradients of their half-batches, which is the
gradient of the whole batch up to float32 summation order, so weights after a few AdamW steps agree to 1e-5
(absolute; the LoRA weights are O(0.1)) and the logged losses to 1e-5 relative. Dropout is off in these runs:
each process draws its own masks, so with dropout the runs agree in distribution only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_ARGS

from lora_export.cli import train_cli
from lora_export.corpus import TextData, prose_text, stdlib_source_text
from lora_export.errors import TrainingError
from lora_export.model.checkpoint import read_checkpoint
from lora_export.train import adapt

BIN = Path(sys.executable).parent
ADAPT = ["--lora-r", "2", "--steps", "4", "--eval-every", "2", "--quiet", "--seq-len", "16"]
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, nnodes: int = 1, node_rank: int = 0, nproc: int = 2, port: int | None = None,
             env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    """Start ``lora-train ARGS`` under torchrun on 127.0.0.1 (static rendezvous; one thread per process)."""
    command = [str(BIN / "torchrun"), f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={port or free_port()}", "--max-restarts=0",
               str(BIN / "lora-train"), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + (err or "")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    (folder / "prose.txt").write_bytes(prose_text()[:20_000])
    (folder / "code.py").write_bytes(stdlib_source_text(max_bytes=20_000))
    path = folder / "base.pt"
    result = CliRunner().invoke(train_cli, ["pretrain", "-o", str(path), "--steps", "10", "--batch-size", "4",
                                            "--data", str(folder / "code.py"), "--quiet", *TINY_ARGS])
    assert result.exit_code == 0, result.output
    return path


def data_args(base: Path) -> list[str]:
    return ["--data", str(base.parent / "prose.txt")]


def assert_same_training(reference: Path, other: Path) -> None:
    a, b = read_checkpoint(reference), read_checkpoint(other)
    assert a["lora"].keys() == b["lora"].keys()
    for name in a["lora"]:
        torch.testing.assert_close(b["lora"][name], a["lora"][name], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(b["training"]["losses"]), torch.tensor(a["training"]["losses"]),
                               rtol=1e-5, atol=0)
    assert a["training"]["global_batch"] == b["training"]["global_batch"]


@pytest.fixture(scope="module")
def one_process(base: Path) -> Path:
    """The reference: one process, 8 windows per step."""
    out = base.parent / "one.pt"
    code, output = finish(subprocess.Popen([str(BIN / "lora-train"), "adapt", str(base), "-o", str(out), *ADAPT,
                                            "--batch-size", "8", *data_args(base)], stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True))
    assert code == 0, output
    return out


def test_two_processes_equal_one(base: Path, one_process: Path) -> None:
    out = base.parent / "two.pt"
    code, output = finish(torchrun(["adapt", str(base), "-o", str(out), *ADAPT, "--batch-size", "4",
                                    *data_args(base)]))
    assert code == 0, output
    assert_same_training(one_process, out)
    training = read_checkpoint(out)["training"]
    assert (training["world_size"], training["global_batch"], training["batch_size"]) == (2, 8, 4)
    assert output.count("wrote") == 1  # rank 0 alone writes and reports
    lora = read_checkpoint(out)["lora"]
    assert max(t.abs().max() for n, t in lora.items() if n.endswith("lora_B")) > 0  # training moved the weights


def test_fsdp_two_processes_equal_one(base: Path, one_process: Path) -> None:
    """The model sharded over 2 processes (fully_shard): the same training, and the checkpoint whole again."""
    out = base.parent / "fsdp.pt"
    code, output = finish(torchrun(["adapt", str(base), "-o", str(out), *ADAPT, "--batch-size", "4", "--fsdp",
                                    *data_args(base)]))
    assert code == 0, output
    assert "Warning" not in output, output
    assert_same_training(one_process, out)
    payload = read_checkpoint(out)
    assert payload["training"]["fsdp"] is True
    assert all(torch.equal(t, read_checkpoint(base)["base"][n]) for n, t in payload["base"].items())  # frozen


def test_fsdp_refuses_step_checkpoints(base: Path, tmp_path: Path) -> None:
    data = TextData.from_bytes((base.parent / "prose.txt").read_bytes(), "prose")
    with pytest.raises(TrainingError, match="--fsdp with --save-every or --resume is not supported"):
        adapt(base, r=2, data=data, steps=4, batch_size=4, seq_len=16, progress=False, fsdp=True, save_every=2,
              output=tmp_path / "x.pt")


def test_two_nodes_equal_one_node(base: Path, one_process: Path) -> None:
    out, port = base.parent / "nodes.pt", free_port()
    nodes = [torchrun(["adapt", str(base), "-o", str(out), *ADAPT, "--batch-size", "4", *data_args(base)],
                      nnodes=2, node_rank=rank, nproc=1, port=port) for rank in (0, 1)]
    results = [finish(node) for node in nodes]
    assert [code for code, _ in results] == [0, 0], results
    assert_same_training(one_process, out)
    assert read_checkpoint(out)["training"]["world_size"] == 2


def test_gradient_accumulation_keeps_the_global_batch(base: Path, one_process: Path) -> None:
    """One process with 2 micro-batches of 4 per step: the same windows per step, in 2 draws instead of one."""
    out = base.parent / "accum.pt"
    result = CliRunner().invoke(train_cli, ["adapt", str(base), "-o", str(out), *ADAPT, "--batch-size", "4",
                                            "--grad-accum", "2", *data_args(base)])
    assert result.exit_code == 0, result.output
    training = read_checkpoint(out)["training"]
    assert training["global_batch"] == 8 and training["grad_accum"] == 2
    reference = read_checkpoint(one_process)["training"]["losses"]
    assert abs(training["losses"][0] - reference[0]) < 0.5  # same data distribution, other windows


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_resume_is_bit_identical(base: Path, tmp_path: Path, suffix: str) -> None:
    data = TextData.from_bytes((base.parent / "prose.txt").read_bytes(), "prose")
    common = dict(r=2, lora_dropout=0.2, data=data, steps=6, batch_size=4, seq_len=16, eval_every=2, seed=5,
                  progress=False, device="cpu")
    full, full_record = adapt(base, save_every=3, output=tmp_path / f"full{suffix}", **common)
    step3 = tmp_path / f"full.step3{suffix}"
    assert step3.exists() and not (tmp_path / f"full.step6{suffix}").exists()
    resumed, record = adapt(base, resume=step3, **common)
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert record["losses"] == full_record["losses"] and record["eval_losses"] == full_record["eval_losses"]
    assert record["resumed_from"] == [step3.name, 3]
    # and an uninterrupted run that never saved is the same run
    plain, _ = adapt(base, **common)
    assert all(torch.equal(t, plain.state_dict()[n]) for n, t in full.state_dict().items())


def test_resume_refuses_another_run(base: Path, tmp_path: Path) -> None:
    data = TextData.from_bytes((base.parent / "prose.txt").read_bytes(), "prose")
    common = dict(r=2, data=data, batch_size=4, seq_len=16, eval_every=2, progress=False, device="cpu")
    adapt(base, steps=4, save_every=2, output=tmp_path / "a.pt", **common)
    with pytest.raises(TrainingError, match="lr was 0.002, this run has 0.001"):
        adapt(base, steps=4, resume=tmp_path / "a.step2.pt", **{**common, "lr": 1e-3})
    with pytest.raises(TrainingError, match="no resume state"):
        adapt(base, steps=4, resume=base, **common)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cpu_trains(base: Path, precision: str) -> None:
    data = TextData.from_bytes((base.parent / "prose.txt").read_bytes(), "prose")
    model, record = adapt(base, r=4, lr=1e-2, data=data, steps=12, batch_size=8, seq_len=16, eval_every=12,
                          progress=False, device="cpu", precision=precision)
    assert record["precision"] == precision and record["device"] == "cpu"
    assert record["eval_losses"][-1][1] < record["eval_losses"][0][1]  # held-out loss went down
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(base: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(train_cli, ["adapt", str(base), "-o", str(tmp_path / "x.pt"), *ADAPT,
                                            "--device", "cuda", *data_args(base)])
    assert result.exit_code == 2
    assert "--device cuda" in one_error_line(result.output) and not (tmp_path / "x.pt").exists()


def test_incomplete_torchrun_environment_is_one_line(base: Path, tmp_path: Path) -> None:
    result = subprocess.run([str(BIN / "lora-train"), "adapt", str(base), "-o", str(tmp_path / "x.pt"), *ADAPT,
                             *data_args(base)], env={**os.environ, "RANK": "0", "WORLD_SIZE": "2"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "incomplete torchrun environment" in one_error_line(result.stderr)


def test_bad_input_under_torchrun_is_said_once(base: Path, tmp_path: Path) -> None:
    code, output = finish(torchrun(["adapt", str(base), "-o", str(tmp_path / "x.pt"), *ADAPT, "--resume",
                                    str(tmp_path / "missing.pt"), *data_args(base)]))
    assert code != 0
    assert output.count("missing.pt: no such file") == 1, output  # rank 0 says it; rank 1 exits quietly


def _rank_pid(marker: str, rank: int, deadline: float) -> int:
    """The pid of the trainer process of ``rank`` whose environment holds ``marker``."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"LORA_TEST_MARKER={marker}".encode() in environ and f"RANK={rank}".encode() in environ:
                cmdline = (entry / "cmdline").read_bytes()
                if b"lora-train" in cmdline and b"torchrun" not in cmdline:
                    return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")


def test_a_rank_that_dies_ends_the_others(base: Path, tmp_path: Path) -> None:
    """Two nodes; node 1's trainer is killed mid-run: node 0's trainer does not hang, it ends with one line."""
    marker, port = uuid.uuid4().hex, free_port()
    args = ["adapt", str(base), "-o", str(tmp_path / "x.pt"), "--lora-r", "2", "--steps", "100000", "--quiet",
            "--seq-len", "16", "--batch-size", "4", "--dist-timeout", "30", *data_args(base)]
    nodes = [torchrun(args, nnodes=2, node_rank=rank, nproc=1, port=port, env={"LORA_TEST_MARKER": marker})
             for rank in (0, 1)]
    try:
        victim = _rank_pid(marker, 1, time.monotonic() + 60)
        time.sleep(3)  # well into training
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        code, output = finish(nodes[0], timeout=90)
        assert time.monotonic() - start < 60
        assert code != 0
        ours = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1 and "another process failed or stopped answering" in ours[0], output
        assert not (tmp_path / "x.pt").exists()
    finally:
        for node in nodes:
            node.kill()
            node.communicate()
