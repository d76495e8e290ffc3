"""Property-based fuzzing of the untrusted inputs: model config dicts, checkpoint bytes, adapter bytes.

Contracts: ModelConfig.from_dict returns a usable config or raises a one-line ValueError; a mutated
checkpoint / adapter file is either refused with a one-line CheckpointError / AdapterError or reads back
bit-identical to the original (mutations in a container's unused bytes may be harmless).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_lora_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_export.errors import AdapterError, CheckpointError
from lora_export.export.adapters import adapter_tensors, read_adapter, write_adapter
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint
from lora_export.model.transformer import LORA_TARGETS, VOCAB_SIZE, LoRATransformerLM, ModelConfig

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DEFAULTS = ModelConfig()
INT_FIELDS = ("dim", "depth", "heads", "dim_head", "n_local_attn_heads", "local_attn_window_size", "max_seq_len",
              "ff_mult", "r")
ZERO_OK = ("n_local_attn_heads", "r")  # 0 local heads (all global) and r = 0 (no LoRA) are valid
HUGE = 10**12
MODEL_VERSION = 12345

# --------------------------------------------------------------------------- ModelConfig.from_dict

hostile = st.sampled_from([
    128.0, 1.0, 0.5, 1e308, float("nan"), float("inf"), -float("inf"), -1, -7, 0, HUGE, -HUGE, True, False,
    "4", "softmax", "", None, [], [4], [[1, 2], [3]], {}, {"a": 1},
])
small_ints = st.integers(1, 8)


def field_values(name: str, bad: st.SearchStrategy[Any] = hostile) -> st.SearchStrategy[Any]:
    """Good values for one field (small, the default) mixed with ``bad`` ones."""
    default = getattr(DEFAULTS, name)
    good: dict[str, st.SearchStrategy[Any]] = {
        "dropout": st.sampled_from([0.0, 0.1, 0.5, 0.99, 1.0, -0.1]),
        "lora_dropout": st.sampled_from([0.0, 0.25, 1.0]),
        "lora_alpha": st.sampled_from([1.0, 8.0, 16.0, 0.0, -2.0, 3]),
        "global_attn": st.sampled_from(["softmax", "linear", "Softmax", "flash"]),
        "blindspot_size": st.one_of(st.none(), small_ints),
        "lora_targets": st.one_of(st.lists(st.sampled_from([*LORA_TARGETS, "mlp", "Q"]), max_size=4),
                                  st.sampled_from(["q", "qkv", ("q", "v")])),
        "use_rslora": st.booleans(),
        "max_seq_len": st.sampled_from([1, 2, 5, 16, 64, 256]),
        "rank_pattern": st.sampled_from([{}, {"blocks.0.attn.to_q": 2}, {"token_emb": 0}, {"x": 2.5}, {1: 2}]),
        "alpha_pattern": st.sampled_from([{}, {"blocks.0.ff.fc1": 3.0}, {"x": -1.0}, {"x": float("nan")}]),
    }
    return st.one_of(good.get(name, small_ints), st.just(default), bad)


# Half the dicts hold only plausible values and a small max_seq_len (some still out of range or inconsistent,
# e.g. dropout 1.0 or more local heads than heads), so that enough configs are accepted and built.
config_dicts = st.one_of(
    st.fixed_dictionaries({}, optional={f.name: field_values(f.name) for f in fields(ModelConfig)}),
    st.fixed_dictionaries({"max_seq_len": st.sampled_from([1, 2, 5, 16, 64])}, optional={
        f.name: field_values(f.name, st.nothing()) for f in fields(ModelConfig) if f.name != "max_seq_len"}),
)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def contract_violations(values: dict[str, Any]) -> list[str]:
    """Why the validated ranges should have refused ``values`` (empty when they are acceptable)."""
    merged = {**DEFAULTS.to_dict(), **values}
    bad = []
    for name in INT_FIELDS:
        v = merged[name]
        if not is_int(v) or v < (0 if name in ZERO_OK else 1) or v >= HUGE:
            bad.append(f"{name}={v!r}")
    for name in ("dropout", "lora_dropout"):
        if not is_real(merged[name]) or not 0 <= merged[name] < 1:
            bad.append(f"{name}={merged[name]!r}")
    if not is_real(merged["lora_alpha"]):
        bad.append(f"lora_alpha={merged['lora_alpha']!r}")
    if merged["global_attn"] not in ("softmax", "linear"):
        bad.append(f"global_attn={merged['global_attn']!r}")
    blind = merged["blindspot_size"]
    if blind is not None and (not is_int(blind) or not 1 <= blind < HUGE):
        bad.append(f"blindspot_size={blind!r}")
    targets = merged["lora_targets"]
    if (not isinstance(targets, list | tuple) or not all(isinstance(t, str) and t in LORA_TARGETS for t in targets)
            or len(set(targets)) != len(targets)):
        bad.append(f"lora_targets={targets!r}")
    for name, good in (("rank_pattern", lambda v: is_int(v) and 1 <= v < HUGE),
                       ("alpha_pattern", lambda v: is_real(v) and v >= 0)):
        pattern = merged[name]
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and good(v) for k, v in pattern.items()):
            bad.append(f"{name}={pattern!r}")
    return bad


@settings(max_examples=400, **FUZZ)
@given(values=config_dicts)
def test_model_config_from_dict_fuzz(values: dict[str, Any]) -> None:
    try:
        config = ModelConfig.from_dict(dict(values))
    except ValueError as err:
        assert "\n" not in str(err), f"multi-line ValueError: {str(err)!r}"
        return
    # any other exception type propagates: a bug
    violations = contract_violations(values)
    assert not violations, f"from_dict accepted out-of-range values: {violations}"
    assert ModelConfig.from_dict(config.to_dict()) == config, "to_dict/from_dict does not round-trip"
    if config.dim * config.depth > 4096 or config.max_seq_len > 64:
        return
    torch.manual_seed(0)
    try:
        model = LoRATransformerLM(config).eval()
    except ValueError as err:  # only a pattern naming a layer that has no LoRA is known at build time
        assert "is not a LoRA layer" in str(err) and "\n" not in str(err), str(err)
        return
    n = min(5, config.max_seq_len)
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB_SIZE, (1, n), dtype=torch.int64))
    assert logits.shape == (1, n, VOCAB_SIZE)
    assert torch.isfinite(logits).all(), "non-finite logits"


# --------------------------------------------------------------------------- byte mutations


class Case:
    """A fixture's original bytes and what they decode to, with a short repr for Hypothesis' reports."""

    def __init__(self, data: bytes, original: dict[str, Any], scratch: Path) -> None:
        self.data, self.original, self.scratch = data, original, scratch

    def __repr__(self) -> str:
        return f"Case({len(self.data)} bytes, {len(self.original)} tensors)"


@st.composite
def mutations(draw: st.DrawFn, size: int) -> tuple[str, int, bytes | int]:
    """(kind, offset, payload): a bit flip, a truncation, an overwrite or an insertion within ``size`` bytes."""
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert"]))
    offset = draw(st.integers(0, size - 1))
    if kind == "flip":
        return kind, offset, draw(st.integers(0, 7))
    if kind == "truncate":
        return kind, offset, b""
    return kind, offset, draw(st.binary(min_size=1, max_size=64))


def mutate(data: bytes, mutation: tuple[str, int, bytes | int]) -> bytes:
    kind, offset, payload = mutation
    if kind == "flip":
        assert isinstance(payload, int)
        return data[:offset] + bytes([data[offset] ^ (1 << payload)]) + data[offset + 1:]
    if kind == "truncate":
        return data[:offset]
    assert isinstance(payload, bytes)
    if kind == "overwrite":
        return data[:offset] + payload + data[offset + len(payload):]
    return data[:offset] + payload + data[offset:]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.detach().contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.fixture(scope="module")
def checkpoint_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The checkpoint's bytes, the saved model's state_dict, a scratch directory."""
    root = tmp_path_factory.mktemp("fuzz_ckpt")
    model = make_lora_model()
    save_checkpoint(root / "tiny.pt", model, {"seed": 0, "stage": "fuzz"})
    scratch = root / "scratch"
    scratch.mkdir()
    return Case((root / "tiny.pt").read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}, scratch)


@settings(max_examples=300, **FUZZ)
@given(draw=st.data())
def test_checkpoint_byte_mutations(checkpoint_case: Case, draw: st.DataObject) -> None:
    data, original, scratch = checkpoint_case.data, checkpoint_case.original, checkpoint_case.scratch
    mutation = draw.draw(mutations(len(data)), label="mutation")
    path = scratch / "tiny.pt"
    path.write_bytes(mutate(data, mutation))
    start = time.perf_counter()
    try:
        model = load_checkpoint(path)
    except CheckpointError as err:
        assert "\n" not in str(err), f"multi-line CheckpointError: {str(err)!r}"
        return
    finally:
        # a hang guard, not a speed target
        assert time.perf_counter() - start < 10.0, "load_checkpoint hung (over 10 s)"
    loaded = model.state_dict()
    assert set(loaded) == set(original)
    changed = sorted(name for name in original if not same_bits(loaded[name], original[name]))
    assert not changed, f"mutated checkpoint loaded with different weights: {changed[:3]}"


@pytest.fixture(scope="module")
def adapter_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The adapter's bytes, its tensors, a scratch directory holding copies of the sidecar files that
    write_adapter wrote beside it (an integrity record, if any), so a read there sees them."""
    root = tmp_path_factory.mktemp("fuzz_adapter")
    tensors = adapter_tensors(make_lora_model())
    write_adapter(root / "tiny.onnx_adapter", tensors, MODEL_VERSION)
    sidecars = sorted(p for p in root.iterdir() if p.name != "tiny.onnx_adapter")
    scratch = root / "scratch"
    scratch.mkdir()
    for sidecar in sidecars:
        shutil.copyfile(sidecar, scratch / sidecar.name)
    return Case((root / "tiny.onnx_adapter").read_bytes(), tensors, scratch)


@settings(max_examples=300, **FUZZ)
@given(draw=st.data())
def test_adapter_byte_mutations(adapter_case: Case, draw: st.DataObject) -> None:
    data, original, scratch = adapter_case.data, adapter_case.original, adapter_case.scratch
    mutation = draw.draw(mutations(len(data)), label="mutation")
    path = scratch / "tiny.onnx_adapter"
    path.write_bytes(mutate(data, mutation))
    try:
        tensors, model_version = read_adapter(path)
    except AdapterError as err:
        assert "\n" not in str(err), f"multi-line AdapterError: {str(err)!r}"
        return
    assert set(tensors) == set(original), f"names changed: {sorted(set(tensors) ^ set(original))[:3]}"
    changed = sorted(n for n in original if tensors[n].dtype != original[n].dtype
                     or tensors[n].shape != original[n].shape or tensors[n].tobytes() != original[n].tobytes())
    assert not changed, f"mutated adapter read back with different tensors: {changed[:3]}"
    assert model_version == MODEL_VERSION, f"mutated adapter read back with model version {model_version}"
