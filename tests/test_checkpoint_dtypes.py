"""Checkpoints of real models (issue 18): bf16 / fp16 weights in .pt and .safetensors, memory-mapped loading that
never writes to the file, a model that shares the loaded tensors instead of copying them, and
``checkpoint_summary``, which reads no tensor data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from conftest import TINY_CONFIG, make_lora_model

from lora_export.errors import CheckpointError
from lora_export.model.checkpoint import (
    CheckpointSummary,
    build_model,
    checkpoint_dtype,
    checkpoint_summary,
    read_checkpoint,
    save_checkpoint,
    tensor_sha256,
)
from lora_export.model.layers import merge_lora
from lora_export.model.transformer import LoRATransformerLM, ModelConfig

SUFFIXES = (".pt", ".safetensors")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rounded_copy(dtype: torch.dtype) -> LoRATransformerLM:
    """The reference: the fp32 model whose every weight went through ``dtype`` and back (what a checkpoint stored
    in ``dtype`` holds), built independently of the code under test."""
    model = make_lora_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype).float())
    return model


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s data (/proc/self/maps), or None for anonymous memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _perms, _offset, _device, inode, *name = line.split()
        low, high = (int(bound, 16) for bound in span.split("-"))
        if low <= address < high:
            return name[0] if name and inode != "0" else None
    return None


# --------------------------------------------------------------------------- half-precision checkpoints


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", list(HALF))
def test_half_checkpoint_loads_to_fp32_model_of_the_cast_weights(tmp_path: Path, suffix: str, name: str) -> None:
    path = tmp_path / f"c{suffix}"
    save_checkpoint(path, make_lora_model(), {"stage": "test"}, dtype=HALF[name])
    payload = read_checkpoint(path)
    assert {t.dtype for t in [*payload["base"].values(), *payload["lora"].values()]} == {HALF[name]}
    assert checkpoint_dtype(payload) == name
    model = build_model(payload, path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(IDS), _rounded_copy(HALF[name]).eval()(IDS))


def test_build_model_in_another_dtype_casts_each_weight(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    model = make_lora_model()
    save_checkpoint(path, model)
    built = build_model(read_checkpoint(path), path, dtype=torch.bfloat16)
    assert built.state_dict().keys() == model.state_dict().keys()
    for name, tensor in built.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, model.state_dict()[name].to(torch.bfloat16))


@pytest.mark.parametrize(("dtype", "value"),
                         [(torch.float64, 1e300), (torch.bfloat16, float("nan")), (torch.float16, float("-inf"))],
                         ids=["fp64-overflows", "bf16-nan", "fp16-inf"])
def test_weight_not_finite_in_the_model_is_refused(tmp_path: Path, dtype: torch.dtype, value: float) -> None:
    """Checked after the cast: a float64 weight finite as stored but not in float32 is refused too."""
    path = tmp_path / "c.pt"
    save_checkpoint(path, make_lora_model(), dtype=dtype)
    payload = torch.load(path, weights_only=True)
    payload["base"]["blocks.0.ff.fc2.weight"][3, 1] = value
    payload["tensor_sha256"]["blocks.0.ff.fc2.weight"] = tensor_sha256(payload["base"]["blocks.0.ff.fc2.weight"])
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"weight blocks\.0\.ff\.fc2\.weight holds NaN or Inf$"):
        build_model(read_checkpoint(path), path)


def test_flipped_byte_in_bf16_tensor_is_refused_by_its_sha256(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"  # no zip CRC-32 in front: the sha256 record is the only guard
    save_checkpoint(path, make_lora_model(), {"stage": "test"}, dtype=torch.bfloat16)
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    start, _end = json.loads(data[8:8 + header_size])["base.lm_head.weight"]["data_offsets"]
    data[8 + header_size + start + 1] ^= 0x01  # the low mantissa bit of a bf16 value is byte 0; flip in byte 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight does not match its recorded sha256") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


def test_checkpoint_dtype_of_mixed_weights() -> None:
    payload = {"base": {"a": torch.zeros(3, 4, dtype=torch.bfloat16)}, "lora": {"b": torch.zeros(4)}}
    assert checkpoint_dtype(payload) == "mixed: bf16 75.0%, fp32 25.0%"


def test_save_checkpoint_refuses_a_dtype_that_cannot_be_loaded(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch.int8"):
        save_checkpoint(tmp_path / "c.pt", make_lora_model(), dtype=torch.int8)
    assert not (tmp_path / "c.pt").exists()


def test_make_sized_writes_the_dtype_asked_for(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_sized", Path(__file__).parent.parent / "tools/make_sized.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = tmp_path / "s.safetensors"
    assert tool.main(["--params", "4M", "--dtype", "fp16", "-o", str(path)]) == 0
    payload = read_checkpoint(path)
    assert checkpoint_dtype(payload) == "fp16"
    count = tool.count_parameters(ModelConfig.from_dict(payload["config"]))
    assert path.stat().st_size == pytest.approx(2 * count, rel=0.01)


# --------------------------------------------------------------------------- checkpoint_summary


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_summary_counts_parameters_and_stored_bytes(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    model = make_lora_model()
    path = tmp_path / f"c{suffix}"
    save_checkpoint(path, model, dtype=dtype)
    count = sum(p.numel() for p in model.parameters())
    name = "fp32" if dtype == torch.float32 else "bf16"
    assert checkpoint_summary(path) == CheckpointSummary(parameters=count, dtype=name,
                                                         weight_bytes=count * dtype.itemsize)


class _NoTensorReads:
    """safetensors.safe_open whose get_tensor fails: the header (metadata, names, dtypes, shapes) is all it gives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._file = _real_safe_open(*args, **kwargs)

    def __enter__(self) -> _NoTensorReads:
        self._file.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        if name in ("get_tensor", "get_tensors"):
            raise AssertionError(f"safe_open.{name} called")
        return getattr(self._file, name)


_real_safe_open = safetensors.safe_open


def test_summary_of_safetensors_reads_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_lora_model(), dtype=torch.float16)
    monkeypatch.setattr(safetensors, "safe_open", _NoTensorReads)
    assert checkpoint_summary(path).dtype == "fp16"
    with pytest.raises(CheckpointError, match="get_tensor called"):  # the patch bites: read_checkpoint reads them
        read_checkpoint(path)


def test_summary_of_pt_reads_no_tensor_bytes(tmp_path: Path) -> None:
    """Damaged tensor bytes pass unseen (neither the zip CRC-32 nor a sha256 is computed, both of which read every
    byte), while read_checkpoint refuses them; the summary's tensors are maps of the file, not loaded copies."""
    path = tmp_path / "c.pt"
    model = make_lora_model()
    save_checkpoint(path, model)
    data = bytearray(path.read_bytes())
    data[data.index(model.lm_head.weight.detach().numpy().tobytes()[:64]) + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert checkpoint_summary(path).parameters == sum(p.numel() for p in model.parameters())
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_checkpoint(path)


@pytest.mark.parametrize("case", ["code", "directory", "shape"])
def test_summary_refuses_what_read_checkpoint_refuses(tmp_path: Path, case: str) -> None:
    path = tmp_path / "c.pt"
    if case == "code":
        torch.save({"format": "lora-export-checkpoint", "x": _Code()}, path)
    elif case == "directory":
        path.mkdir()
    else:
        save_checkpoint(path, make_lora_model())
        payload = torch.load(path, weights_only=True)
        payload["config"]["dim"] = 64
        torch.save(payload, path)
    with pytest.raises(CheckpointError) as summary_err:
        checkpoint_summary(path)
    with pytest.raises(CheckpointError) as read_err:
        read_checkpoint(path)
    assert str(summary_err.value) == str(read_err.value) and "\n" not in str(summary_err.value)


class _Code:
    """Pickles to a call of os.getcwd: code, refused unrun."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (os.getcwd, ())


# --------------------------------------------------------------------------- no copies, file never written


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_fp32_model_is_the_payload_tensors(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    save_checkpoint(path, make_lora_model())
    payload = read_checkpoint(path)
    model = build_model(payload, path)
    stored = {**payload["base"], **payload["lora"]}
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == \
        {name: t.data_ptr() for name, t in stored.items()}
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    fresh = LoRATransformerLM(ModelConfig(**TINY_CONFIG))  # trainability as a model built the ordinary way
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in fresh.named_parameters()}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_file_unchanged_after_load_merge_and_training(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    save_checkpoint(path, make_lora_model())
    before = _file_sha256(path)
    model = build_model(read_checkpoint(path), path)
    query = model.blocks[0].attn.to_q
    assert _mapped_file(query.weight) == str(path)  # the weights are the file's pages, mapped
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits = model(IDS)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS.reshape(-1)).backward()
    lora_b = query.lora_B.detach().clone()
    optimizer.step()
    assert not torch.equal(query.lora_B, lora_b)  # trained in place, in the mapped memory
    weight = query.weight.detach().clone()
    merge_lora(model)
    assert not torch.equal(query.weight, weight)  # merged in place, in the mapped memory
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # every page of every tensor written
    assert _file_sha256(path) == before
    assert read_checkpoint(path)  # still its own recorded hashes


def test_recompressed_pt_without_hash_record_loads_its_real_values(tmp_path: Path) -> None:
    """A torch zip re-compressed by another tool cannot be mapped (its mapped bytes would be deflated ones): it is
    read whole, so even without a sha256 record to catch it the weights are the true values, not garbage."""
    stored, path = tmp_path / "stored.pt", tmp_path / "deflated.pt"
    model = make_lora_model()
    save_checkpoint(stored, model)
    payload = torch.load(stored, weights_only=True)
    del payload["tensor_sha256"]  # as an older lora-export wrote it
    torch.save(payload, stored)
    with zipfile.ZipFile(stored) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member.filename))
    loaded = read_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal({**loaded["base"], **loaded["lora"]}[name], tensor), name
