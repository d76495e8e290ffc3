"""Training: pretrain the byte-level base LM, then adapt it with LoRA (only lora_A / lora_B train).

Data are raw bytes (vocab 256): by default Python source from the standard library for pretraining and
English prose (the reference text behind ``help()``, from ``pydoc_data.topics``) for adaptation, or
the user's own files. A corpus is split once, deterministically: the last ``val_fraction`` is held out.

Training batches are ``batch_size`` random contiguous windows of seq_len + 1 bytes (inputs and next-byte
targets), drawn with a seeded ``torch.Generator``. The loss is next-byte cross-entropy in nats; the
held-out loss is averaged over fixed, evenly spaced windows so that every evaluation sees the same bytes.

Everything is deterministic under ``seed`` (for a given machine and thread count): model init, dropout
and batches come from it, and the caller's global RNG state is left as it was. CPU kernels are
deterministic already; ``torch.use_deterministic_algorithms`` is not switched on because it costs a
multi-second import of torch._inductor on every run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..corpus import TextData, load_data
from ..files import file_sha256
from ..model.checkpoint import base_fingerprint, build_model, read_checkpoint
from ..model.layers import count_parameters, lora_state_dict, mark_only_lora_as_trainable
from ..model.transformer import LoRATransformerLM, ModelConfig
from ..progress import Progress, as_progress

EVAL_WINDOWS = 64


# --------------------------------------------------------------------------- data


def get_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of data (1-D uint8): inputs x [B, seq_len] and next-byte targets y [B, seq_len], int64."""
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: LoRATransformerLM, data: torch.Tensor, seq_len: int, n_windows: int = EVAL_WINDOWS) -> float:
    """Mean next-byte cross-entropy (nats) over up to n_windows evenly spaced windows of data (1-D uint8).

    Runs in eval mode (no dropout) and restores the model's previous mode.
    """
    was_training = model.training
    model.eval()
    starts = torch.linspace(0, len(data) - seq_len - 1, n_windows).long().unique()
    windows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
    losses = []
    for batch in windows.split(16):
        logits = model(batch[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    model.train(was_training)
    return torch.stack(losses).sum().item() / (len(windows) * seq_len)


# --------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from lr to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def check_hyperparameters(*, steps: int, batch_size: int, seq_len: int | None, lr: float, eval_every: int,
                          r: int | None = None, lora_alpha: float | None = None,
                          lora_dropout: float | None = None) -> None:
    """Raise ValueError with one clear line for training settings out of range (checked before any work).

    steps, batch_size, eval_every, seq_len (when given) and r (when given) >= 1; lr finite and > 0; lora_alpha
    finite and > 0; lora_dropout in [0, 1).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("eval_every", eval_every), ("r", r)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha}")
    if lora_dropout is not None and not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")


def check_settings(config: ModelConfig, data: TextData, steps: int, batch_size: int, seq_len: int,
                   lr: float, eval_every: int) -> None:
    """Raise ValueError with one clear line for settings that cannot train."""
    check_hyperparameters(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_every=eval_every)
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    for part in ("train", "val"):
        n = len(getattr(data, part))
        if n < seq_len + 1:
            raise ValueError(
                f"data too small: {data.description['bytes']} bytes leave {n} {part} bytes, "
                f"need at least {seq_len + 1} for seq_len {seq_len}"
            )


def train_loop(
    model: LoRATransformerLM,
    data: TextData,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    weight_decay: float,
    eval_every: int,
    generator: torch.Generator,
    progress: Progress,
) -> dict[str, Any]:
    """AdamW on the model's trainable parameters with next-byte cross-entropy, gradient clipping at 1.0.

    Matrices (ndim >= 2) get weight decay, biases and norms do not. The held-out loss is measured at
    step 0, every eval_every steps and after the last step; ``progress`` advances by step, labelled with the
    running and held-out loss. Returns {'losses': per-step training loss, 'eval_losses': [[step, held-out loss],
    ...]}.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    warmup = min(100, steps // 10)
    losses, eval_losses = [], [[0, evaluate(model, data.val, seq_len)]]
    running = None
    model.train()
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            x, y = get_batch(data.train, batch_size, seq_len, generator)
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

            losses.append(loss.item())
            running = losses[-1] if running is None else 0.95 * running + 0.05 * losses[-1]
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                eval_losses.append([step + 1, evaluate(model, data.val, seq_len)])
            progress.advance(step + 1, steps, f"loss={running:.3f}, eval={eval_losses[-1][1]:.3f}")
    finally:
        progress.close()
    return {"losses": losses, "eval_losses": eval_losses}


def report_parameters(model: LoRATransformerLM, progress: Progress) -> dict[str, int]:
    """count_parameters(model), reported to ``progress`` on one line."""
    counts = count_parameters(model)
    progress.stage(f"parameters: total {counts['total']:,} | trainable {counts['trainable']:,} | "
                   f"lora {counts['lora']:,}")
    return counts


def training_progress(progress: Progress | bool, stage: str) -> Progress:
    """``progress`` as a Progress: True prints the parameter line on stdout and a bar named after the stage."""
    return as_progress(progress, stage, prefix="", stdout=True)


def _training_record(stage: str, data: TextData, parameters: dict[str, int], history: dict[str, Any],
                     settings: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``training`` metadata: the stage, its ``settings`` (seed, steps, batch_size, seq_len, lr,
    weight_decay, eval_every, in that order), the data, parameter counts, loss history, the stage's ``extra``
    fields, and the torch version."""
    return {"stage": stage, **settings, "data": dict(data.description), "parameters": parameters, **history,
            **extra, "torch_version": str(torch.__version__)}


def pretrain(
    config: ModelConfig,
    data: TextData | None = None,
    steps: int = 1000,
    batch_size: int = 16,
    seq_len: int | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 100,
    weight_decay: float = 0.1,
    progress: Progress | bool = True,
) -> tuple[LoRATransformerLM, dict[str, Any]]:
    """Train the base LM (config.r must be 0; every parameter trains) from scratch.

    data defaults to the stdlib source corpus; seq_len defaults to config.max_seq_len. progress: a Progress, or
    True for the parameter line on stdout and a 'pretrain' bar on stderr, False for nothing.
    Returns the model (eval mode) and the checkpoint's ``training`` metadata (plain Python values).
    """
    if config.r != 0:
        raise ValueError(f"pretrain trains the base model: config.r must be 0, got {config.r}")
    data = data if data is not None else load_data(default="stdlib")
    seq_len = config.max_seq_len if seq_len is None else seq_len
    check_settings(config, data, steps, batch_size, seq_len, lr, eval_every)
    progress = training_progress(progress, "pretrain")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LoRATransformerLM(config)
        parameters = report_parameters(model, progress)
        generator = torch.Generator().manual_seed(seed)
        history = train_loop(model, data, steps, batch_size, seq_len, lr, weight_decay, eval_every,
                             generator, progress)
    settings = {"seed": seed, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                "weight_decay": weight_decay, "eval_every": eval_every}
    training = _training_record("pretrain", data, parameters, history, settings,
                                {"final_eval_loss": history["eval_losses"][-1][1]})
    return model.eval(), training


def adapt(
    base_checkpoint_path: str | os.PathLike,
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = ("q", "k", "v", "o", "ff"),
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    data: TextData | None = None,
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int | None = None,
    lr: float = 2e-3,
    seed: int = 0,
    eval_every: int = 50,
    progress: Progress | bool = True,
) -> tuple[LoRATransformerLM, dict[str, Any]]:
    """Add LoRA (rank r on lora_targets) to a base (r = 0) checkpoint and train only lora_A / lora_B.

    data defaults to the prose corpus; seq_len defaults to the base's max_seq_len; progress as ``pretrain``'s (the
    bar named 'adapt'). The metadata holds
    the held-out loss of the base model (as loaded, no LoRA) and of the adapted model on the same bytes:
    ``base_eval_loss`` and ``adapted_eval_loss``. Raises CheckpointError for an unreadable base.
    """
    check_hyperparameters(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_every=eval_every, r=r,
                          lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    if not lora_targets:
        raise ValueError("lora_targets is empty: name at least one of q, k, v, o, ff, emb")
    payload = read_checkpoint(base_checkpoint_path)
    base = build_model(payload, base_checkpoint_path)
    if base.config.r != 0:
        raise ValueError(f"{base_checkpoint_path}: already has LoRA (r={base.config.r}); adapt a base (r=0) checkpoint")
    config = replace(base.config, r=r, lora_alpha=lora_alpha, lora_targets=list(lora_targets),
                     lora_dropout=lora_dropout, use_rslora=use_rslora)
    data = data if data is not None else load_data(default="prose")
    seq_len = config.max_seq_len if seq_len is None else seq_len
    check_settings(config, data, steps, batch_size, seq_len, lr, eval_every)
    base_eval_loss = evaluate(base, data.val, seq_len)
    progress = training_progress(progress, "adapt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LoRATransformerLM(config)
        model.load_state_dict({**payload["base"], **lora_state_dict(model)})  # strict: every base key
        mark_only_lora_as_trainable(model)
        parameters = report_parameters(model, progress)
        generator = torch.Generator().manual_seed(seed)
        history = train_loop(model, data, steps, batch_size, seq_len, lr, 0.0, eval_every, generator, progress)
    settings = {"seed": seed, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                "weight_decay": 0.0, "eval_every": eval_every}
    training = _training_record("adapt", data, parameters, history, settings, {
        "base_checkpoint": Path(base_checkpoint_path).name,
        "base_sha256": file_sha256(base_checkpoint_path),
        "base_fingerprint": base_fingerprint(payload["base"]),
        "base_eval_loss": base_eval_loss,
        "adapted_eval_loss": history["eval_losses"][-1][1],
    })
    return model.eval(), training
