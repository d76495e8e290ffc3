"""Shared fixtures and helpers: one tiny LoRA checkpoint, its two ONNX exports and its two genai decoders, built
once per test session; the CLI runner, the one-line-error and refusal checks, a file-tree snapshot, a plain ORT
session, and a hand-built ParityResult.

Exporting with the dynamo exporter takes seconds even for a tiny model, so every test file that needs
an exported model uses these instead of exporting its own. Test files import the helpers with
``from conftest import ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner, Result

from lora_export.cli import export_cli, train_cli
from lora_export.export.convert import ExportResult, export_onnx
from lora_export.genai.decoder import export_decoder
from lora_export.model.checkpoint import read_checkpoint, save_checkpoint
from lora_export.model.transformer import LoRATransformerLM, ModelConfig
from lora_export.parity.cases import Case
from lora_export.parity.metrics import ERROR_HISTOGRAM_EDGES, TOLERANCES, Metrics, judge
from lora_export.parity.results import Comparison, Generation, Latency, ParityResult
from lora_export.parity.sessions import ProviderStatus
from lora_export.parity.validate import pass_rule
from lora_export.report.render import SCHEMA_PATH

# One intra-op thread per test process: the suite runs under pytest -n 2 on 2 cores, and tiny models are
# many times slower when two processes each spin up two threads.
torch.set_num_threads(1)

TINY_CONFIG = dict(
    dim=32, depth=1, heads=4, dim_head=8, n_local_attn_heads=2, local_attn_window_size=8, blindspot_size=4,
    max_seq_len=32, ff_mult=2, r=4, lora_alpha=8.0, lora_targets=["q", "k", "v", "o", "ff", "emb"],
)
#: A tiny model's shape as lora-train options.
TINY_ARGS = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--local-heads", "1", "--window", "8",
             "--max-seq-len", "32", "--dropout", "0"]
CLIS = {"lora-export": export_cli, "lora-train": train_cli}
STARTED = "[lora-export] exporting"  # the progress line of the (slow) torch export: work has begun


def make_lora_model(seed: int = 0, **overrides: object) -> LoRATransformerLM:
    """A tiny random LoRA model whose lora_B are non-zero, so the adapter visibly changes outputs."""
    torch.manual_seed(seed)
    model = LoRATransformerLM(ModelConfig(**{**TINY_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:  # distinct values, so no exporter pass can deduplicate them
                param.add_(torch.randn_like(param) * 0.1)
    return model


def same_base(base_checkpoint: Path, path: Path, targets: list[str], r: int, seed: int) -> Path:
    """A checkpoint on ``base_checkpoint``'s base weights with a random LoRA of rank ``r`` on ``targets``."""
    payload = read_checkpoint(base_checkpoint)
    torch.manual_seed(seed)
    model = LoRATransformerLM(ModelConfig.from_dict({**payload["config"], "lora_targets": targets, "r": r})).eval()
    model.load_state_dict(payload["base"], strict=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.3)
    save_checkpoint(path, model, {"seed": seed})
    return path


def same_base_other_rank(checkpoint: Path, r: int, seed: int) -> LoRATransformerLM:
    """A model with the checkpoint's base weights and a different, random LoRA of rank r."""
    payload = read_checkpoint(checkpoint)
    torch.manual_seed(seed)
    model = LoRATransformerLM(ModelConfig.from_dict({**payload["config"], "r": r})).eval()
    model.load_state_dict(payload["base"], strict=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LoRA checkpoint (r = 4 on q, k, v, o, ff, emb)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, make_lora_model(), {"seed": 0, "stage": "test"})
    return path


@pytest.fixture(scope="session")
def merged_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """tiny.pt exported with --merge."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("merged") / "tiny.onnx", merge=True)


@pytest.fixture(scope="session")
def adapter_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """tiny.pt exported with the adapters as graph inputs, plus tiny.onnx_adapter."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("adapters") / "tiny.onnx", merge=False)


@pytest.fixture(scope="session")
def merged_copy(merged_export: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The merged export copied to a folder of its own, so outputs written beside it by default (int8 builds,
    parity reports) never touch the shared export."""
    path = tmp_path_factory.mktemp("merged_copy") / "tiny.onnx"
    shutil.copyfile(merged_export.model_path, path)
    return path


@pytest.fixture(scope="session")
def cuda_runs() -> bool:
    """Whether ONNX Runtime really runs on CUDA here, decided without lora_export's code (whose answer the tests
    check): a one-node model in a plain session asked for CUDA, and the providers that session really got."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # a CUDA build that fails outright instead of falling back
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.fixture(scope="session")
def genai_merged(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.pt as a merged genai decoder directory."""
    return export_decoder(tiny_checkpoint, tmp_path_factory.mktemp("genai") / "merged", merge=True)


@pytest.fixture(scope="session")
def genai_adapters(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.pt as an adapter-form genai decoder directory (model.onnx + model.onnx_adapter)."""
    return export_decoder(tiny_checkpoint, tmp_path_factory.mktemp("genai") / "adapters", merge=False)


@pytest.fixture(scope="session")
def schema() -> dict:
    """parity.json's JSON schema."""
    return json.loads(SCHEMA_PATH.read_text())


# --------------------------------------------------------------------------- the command line


def run_cli(*args: object, cli: click.Command = export_cli) -> Result:
    """``cli`` run in-process on ``args`` (each turned into a string)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def invoke(*args: object, cli: click.Command = export_cli) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``run_cli``."""
    result = run_cli(*args, cli=cli)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, stderr: str, needle: str, *, progress_allowed: bool = True) -> None:
    """Exit 2 and one line 'error: ...' holding ``needle``, no traceback; with ``progress_allowed`` progress lines
    ('[lora-export] ...') may precede it."""
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines()
             if not (progress_allowed and line.startswith("[lora-export]"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr
    assert "Traceback" not in stderr


def snapshot(root: Path) -> dict[str, tuple]:
    """{relative path: (size, sha256)} of every file under root, hidden ones included; folders, links and special
    files (FIFOs) too. Files over 64 MiB (the sparse giants of test_hostile_inputs) are known by size and
    modification time."""
    state: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            status = path.lstat()
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir",)
            elif not stat.S_ISREG(status.st_mode):
                state[rel] = ("special", stat.S_IFMT(status.st_mode))
            elif status.st_size > 64 << 20:
                state[rel] = (status.st_size, status.st_mtime_ns)
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
    result = run_cli(*args, cli=CLIS[tool])
    assert_refused((result.exit_code, result.stdout, result.stderr, result.exception), before, cwd, **expect)


# --------------------------------------------------------------------------- ONNX Runtime and PyTorch side by side


def session(path: Path) -> ort.InferenceSession:
    """A plain CPU session, opened without lora_export's code (whose sessions the tests check)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch model's logits on ORT-style feeds (input_ids, attention_mask)."""
    with torch.no_grad():
        return model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()


# --------------------------------------------------------------------------- a hand-built validation result


def sample_metrics(max_abs: float = 1e-6, finite: bool = True) -> Metrics:
    """Metrics of a case whose largest error is ``max_abs`` (fp32's atol is 1e-4)."""
    return Metrics(max_abs=max_abs, max_rel=max_abs * 10, mean_abs=max_abs / 5, cosine=1.0,
                   tolerance_used=max_abs / 1e-4, outside=0 if max_abs < 1e-4 else 7, elements=512,
                   worst_index=[1, 3, 200], finite=finite, top1_agreement=1.0, top1_exact=1.0,
                   loss_ref=5.5, loss_onnx=5.5 + max_abs)


def make_result(failing: bool) -> ParityResult:
    """A two-case result on CPU (CUDA not run); with ``failing`` the second case is off by 0.05 or NaN."""
    tolerance = TOLERANCES["fp32"]
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    cases = [Case("n4", "N = 4, batch 2", "held-out prose", ids, mask),
             Case("padding", "right-padded | pipes", "held-out prose", ids, mask)]
    bad = sample_metrics(0.05) if failing else sample_metrics()
    comparisons = [Comparison("merged", "CPUExecutionProvider", "n4", "logits", sample_metrics(), True, []),
                   Comparison("merged", "CPUExecutionProvider", "padding", "logits", bad, not failing,
                              judge(bad, tolerance))]
    if failing:
        nan_metrics = sample_metrics(float("nan"), finite=False)
        comparisons.append(Comparison("merged", "CPUExecutionProvider", "nan_case", "logits", nan_metrics, False,
                                      judge(nan_metrics, tolerance)))
    failures = [f"case '{c.case}': {reason}" for c in comparisons for reason in c.failures]
    return ParityResult(
        status="failed" if failing else "passed",
        summary="FAIL: worst case 'padding', output 'logits'" if failing else "PASS: all good",
        model_path=Path("/models/tiny.onnx"), checkpoint_path=Path("/models/tiny.pt"), adapter_path=None,
        form="merged", precision="fp32", tolerance=tolerance, pass_rule=pass_rule(tolerance, 24), seed=0,
        model_metadata={"form": "merged", "opset": "18"},
        providers=[ProviderStatus("cpu", "CPUExecutionProvider", True, ["CPUExecutionProvider"]),
                   ProviderStatus("cuda", "CUDAExecutionProvider", False, ["CPUExecutionProvider"],
                                  "the CUDA provider library did not load")],
        variants=["merged"], cases=cases, comparisons=comparisons,
        generations=[Generation("merged", "CPUExecutionProvider", "The a|b", "xyz\\x98", "xyz\\x98", True, None)],
        latencies=[Latency("merged", "PyTorch eager (CPU)", 1, 4, 3, 20, 1.5, 2.0),
                   Latency("merged", "ORT CPUExecutionProvider", 1, 4, 3, 20, 0.2, 0.3)],
        failures=failures, worst=comparisons[1] if failing else None, notes=["a note"],
        error_histograms={"CPUExecutionProvider": np.arange(len(ERROR_HISTOGRAM_EDGES) - 1)},
        created="2026-01-01T00:00:00+00:00",
    )
