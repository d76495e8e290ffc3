"""Tests of ``lora_export.model.checkpoint``: round trip, atomic writes, refusal of pickled code, clear errors."""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_export.errors import CheckpointError
from lora_export.model.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    base_fingerprint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from lora_export.model.layers import LoRALayer, base_state_dict, lora_state_dict, merge_lora
from lora_export.model.transformer import LoRATransformerLM, ModelConfig

# --------------------------------------------------------------------------- helpers


def _model(seed: int = 0, **overrides: Any) -> LoRATransformerLM:
    """Small model with non-zero random LoRA weights, eval mode."""
    torch.manual_seed(seed)
    values: dict[str, Any] = dict(dim=16, depth=2, heads=2, dim_head=8, n_local_attn_heads=1, local_attn_window_size=4,
                                  max_seq_len=16, ff_mult=2, dropout=0.0, r=4, lora_targets=["q", "v", "ff", "emb"],
                                  blindspot_size=2)
    values.update(overrides)
    model = LoRATransformerLM(ModelConfig(**values))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer) and m.r > 0:
                m.lora_B.normal_(0.0, 0.2)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _saved(tmp_path: Path, name: str = "model.pt") -> Path:
    path = tmp_path / name
    save_checkpoint(path, _model(), training={"seed": 3, "steps": 10, "losses": [2.5, 2.0], "data": "toy.txt"})
    return path


def _raw(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_one_line_error(path: Path, err: CheckpointError, *needles: str) -> None:
    """The message is one line, names the file, and mentions each needle (case-insensitive)."""
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"


class _Payload:
    """Pickles to a call of os.system: loading it unsafely runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (self.command,))


# --------------------------------------------------------------------------- round trip


def test_round_trip_identical_logits_and_config(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "model.pt"
    training = {"seed": 3, "steps": 10, "losses": [2.5, 2.0], "data": "toy.txt"}
    save_checkpoint(path, model, training=training)
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.config.to_dict() == model.config.to_dict()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    payload = read_checkpoint(path)
    assert payload["format"] == CHECKPOINT_FORMAT and payload["format_version"] == CHECKPOINT_VERSION
    assert payload["training"] == training
    assert set(payload["lora"]) == set(lora_state_dict(model))
    assert set(payload["base"]) == set(base_state_dict(model))


def test_round_trip_r0_model(tmp_path: Path) -> None:
    model = _model(r=0)
    path = tmp_path / "base.pt"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path)
    assert read_checkpoint(path)["lora"] == {}
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), model(_ids()))


def test_save_refuses_merged_model(tmp_path: Path) -> None:
    model = _model()
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerged"):
        save_checkpoint(tmp_path / "m.pt", model)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic write


def test_save_leaves_no_temp_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    save_checkpoint(path, _model(seed=1))  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert load_checkpoint(path).config == _model(seed=1).config


def test_failing_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save raising half way (after writing some bytes) leaves neither the file nor a temp file."""

    def broken_save(obj: object, f: Any, *args: object, **kwargs: object) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "model.pt", _model())
    assert list(tmp_path.iterdir()) == []


def test_failing_overwrite_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed overwrite leaves the previous checkpoint intact and loadable."""
    path = _saved(tmp_path)
    before = path.read_bytes()

    def broken_save(obj: object, f: str, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _model(seed=1))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert path.read_bytes() == before
    load_checkpoint(path)


# --------------------------------------------------------------------------- pickled code


def _assert_payload_live(tmp_path: Path, data: bytes) -> None:
    """Control: unpickling ``data`` unsafely really runs the command (so 'did not run' means something)."""
    marker = tmp_path / "PWNED"
    assert not marker.exists()
    pickle.loads(data)  # deliberate, in a temp dir: proves the payload is live
    assert marker.exists()
    marker.unlink()


def test_torch_saved_code_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 1, "config": _Payload(f"touch {marker}")}, path)
    for loader in (read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            loader(path)
        _assert_one_line_error(path, info.value, "refused")
        assert not marker.exists()
    _assert_payload_live(tmp_path, pickle.dumps(_Payload(f"touch {marker}")))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_raw_pickle_code_payload_is_refused(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "PWNED"
    data = pickle.dumps(_Payload(f"touch {marker}"), protocol=protocol)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _assert_one_line_error(path, info.value, "refused")
    assert not marker.exists()
    _assert_payload_live(tmp_path, data)


# --------------------------------------------------------------------------- malformed files


def _truncated(tmp_path: Path) -> Path:
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    return path


def _edited(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], Path]:
    """A valid checkpoint, loaded raw, edited, and written back with torch.save (without the tensor hashes, as
    another writer would: the structural checks are what these cases test)."""

    def make(tmp_path: Path) -> Path:
        path = _saved(tmp_path)
        payload = _raw(path)
        payload.pop("tensor_sha256")
        edit(payload)
        torch.save(payload, path)
        return path

    return make


def _foreign_dict(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save({"format": "someone-else", "state_dict": {"w": torch.zeros(2)}}, path)
    return path


def _bare_state_dict(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(_model().state_dict(), path)
    return path


MALFORMED: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "truncated": (_truncated, ("truncated or corrupt",)),
    "random-bytes": (_random_bytes, ()),
    "empty": (_empty, ("truncated or corrupt",)),
    "foreign-format": (_foreign_dict, ("not a lora-export checkpoint",)),
    "bare-state-dict": (_bare_state_dict, ("not a lora-export checkpoint",)),
    "format-version": (_edited(lambda d: d.update(format_version=99)), ("format_version", "99")),
    "missing-base": (_edited(lambda d: d.pop("base")), ("'base'", "missing")),
    "lora-not-dict": (_edited(lambda d: d.update(lora=[1, 2])), ("'lora'",)),
    "wrong-shape": (_edited(lambda d: d["base"].update({"lm_head.weight": torch.zeros(3, 3)})),
                    ("shape mismatch", "lm_head.weight", "(3, 3)", "(256, 16)")),
    "unknown-config-key": (_edited(lambda d: d["config"].update(n_layers=2)),
                           ("unknown model config keys", "n_layers")),
    "bad-config-value": (_edited(lambda d: d["config"].update(lora_targets=["mlp"])), ("lora_targets", "mlp")),
    "missing-weight": (_edited(lambda d: d["lora"].pop("blocks.0.attn.to_q.lora_A")),
                       ("missing", "blocks.0.attn.to_q.lora_A")),
    "extra-weight": (_edited(lambda d: d["base"].update({"blocks.9.x": torch.zeros(1)})), ("unexpected", "blocks.9.x")),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_one_line_error(tmp_path: Path, case: str) -> None:
    make, needles = MALFORMED[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _assert_one_line_error(path, info.value, *needles)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nope.pt")
    _assert_one_line_error(tmp_path / "nope.pt", info.value, "no such file")
    folder = tmp_path / "ckpt.pt"
    folder.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    _assert_one_line_error(folder, info.value, "directory")


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
CORRUPT_BYTES = {
    "random-4k": random.Random(0).randbytes(4096),
    "git-lfs-pointer": LFS_POINTER,
    "text-hello": b"hello world\n",
    "text-abc": b"abc\n",
}


@pytest.mark.parametrize("name", list(CORRUPT_BYTES))
def test_corrupt_bytes_raise_checkpoint_error(tmp_path: Path, name: str) -> None:
    """Any non-checkpoint bytes give a CheckpointError, never a raw KeyError / IndexError from the unpickler."""
    path = tmp_path / "model.pt"
    path.write_bytes(CORRUPT_BYTES[name])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _assert_one_line_error(path, info.value)


@pytest.mark.parametrize("name", list(CORRUPT_BYTES))
def test_corrupt_bytes_not_reported_as_pickled_code(tmp_path: Path, name: str) -> None:
    """Corrupt bytes are named as unreadable / corrupt, not as a refused code payload."""
    path = tmp_path / "model.pt"
    path.write_bytes(CORRUPT_BYTES[name])
    try:
        load_checkpoint(path)
    except CheckpointError as err:
        message = str(err).lower()
        assert "refused" not in message and "pickled code" not in message, message
    except Exception:  # a wrong exception type is test_corrupt_bytes_raise_checkpoint_error's job
        pass
    else:
        pytest.fail("corrupt bytes loaded without error")


# --------------------------------------------------------------------------- base fingerprint


def test_base_fingerprint(tmp_path: Path) -> None:
    model = _model()
    base = base_state_dict(model)
    fingerprint = base_fingerprint(base)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    # Same base: recomputation, a cloned dict, and the base read back from a checkpoint.
    assert base_fingerprint({k: v.clone() for k, v in base.items()}) == fingerprint
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    assert base_fingerprint(read_checkpoint(path)["base"]) == fingerprint
    # LoRA weights do not enter the base fingerprint.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer) and m.r > 0:
                m.lora_A.add_(1.0)
                m.lora_B.add_(1.0)
    assert base_fingerprint(base_state_dict(model)) == fingerprint
    # One changed element of one base tensor changes it.
    changed = {k: v.clone() for k, v in base.items()}
    changed["blocks.1.ff.fc2.bias"][3] += 1e-3
    assert base_fingerprint(changed) != fingerprint
    # So do a renamed tensor and a dtype change with equal values.
    renamed = dict(base)
    renamed["lm_head.weight_"] = renamed.pop("lm_head.weight")
    assert base_fingerprint(renamed) != fingerprint
    assert base_fingerprint({**base, "norm.bias": base["norm.bias"].double()}) != fingerprint
    # A different base model (other seed) differs.
    assert base_fingerprint(base_state_dict(_model(seed=1))) != fingerprint


def test_base_fingerprint_zero_dim_tensor() -> None:
    """Scalar tensors (e.g. BatchNorm's num_batches_tracked) must hash too."""
    a = base_fingerprint({"scale": torch.tensor(1.0)})
    b = base_fingerprint({"scale": torch.tensor(2.0)})
    assert a != b
