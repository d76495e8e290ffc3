"""The two training stages: pretrain the byte-level base LM, then adapt it with LoRA (only lora_A / lora_B train).

Data are raw bytes (vocab 256): by default Python source from the standard library for pretraining and English
prose (the reference text behind ``help()``, from ``pydoc_data.topics``) for adaptation, or the user's own files.
A corpus is split once, deterministically: the last ``val_fraction`` is held out. The loss is next-byte
cross-entropy in nats.

Each stage checks every setting before any work, then trains on ``--device`` in ``--precision``, in one process
or in every process torchrun started (``distributed``), optionally writing step checkpoints that ``resume`` picks
up. The caller's global RNG state is left as it was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..corpus import TextData, load_data
from ..errors import TrainingError
from ..files import file_sha256
from ..model.checkpoint import base_fingerprint, build_model, read_checkpoint, save_checkpoint
from ..model.layers import count_parameters, lora_state_dict, mark_only_lora_as_trainable
from ..model.transformer import LoRATransformerLM, ModelConfig
from ..progress import Progress, as_progress
from .batches import evaluate
from .distributed import Distributed
from .loop import Run, TrainSettings, train_loop
from .runtime import Precision, resolve_device
from .state import ResumeState, check_same_run, read_resume

#: At most this many step checkpoints per run (``--save-every``): each is checked before any work.
MAX_STEP_CHECKPOINTS = 1000


def check_hyperparameters(*, steps: int, batch_size: int, seq_len: int | None, lr: float, eval_every: int,
                          r: int | None = None, lora_alpha: float | None = None, lora_dropout: float | None = None,
                          grad_accum: int = 1, save_every: int | None = None,
                          lora_targets: Sequence[str] | None = None) -> None:
    """Raise ValueError with one clear line for training settings out of range (checked before any work).

    steps, batch_size, eval_every, grad_accum, and seq_len, r, save_every (when given) >= 1; lr finite and > 0;
    lora_alpha finite and > 0; lora_dropout in [0, 1); lora_targets (when given) not empty; at most
    MAX_STEP_CHECKPOINTS step checkpoints.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("eval_every", eval_every), ("r", r), ("grad_accum", grad_accum), ("save_every", save_every)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha}")
    if lora_dropout is not None and not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if lora_targets is not None and not lora_targets:
        raise ValueError("lora_targets is empty: name at least one group (q, k, v, o, ff, emb) or module name, path "
                         "or pattern")
    if save_every is not None and steps // save_every > MAX_STEP_CHECKPOINTS:
        raise ValueError(f"save_every {save_every} would write {steps // save_every} checkpoints over {steps} steps "
                         f"(at most {MAX_STEP_CHECKPOINTS})")


def check_settings(config: ModelConfig, data: TextData, settings: TrainSettings,
                   resume: str | os.PathLike | None = None) -> None:
    """Raise ValueError with one clear line for settings that cannot train (seq_len resolved)."""
    if settings.fsdp and (settings.save_every or resume is not None):
        raise TrainingError("--fsdp with --save-every or --resume is not supported: the optimizer state is "
                            "sharded; train without them, or use DDP (no --fsdp) for resumable runs")
    check_hyperparameters(steps=settings.steps, batch_size=settings.batch_size, seq_len=settings.seq_len,
                          lr=settings.lr, eval_every=settings.eval_every, grad_accum=settings.grad_accum,
                          save_every=settings.save_every)
    if settings.seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {settings.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    for part in ("train", "val"):
        n = len(getattr(data, part))
        if n < settings.seq_len + 1:
            raise ValueError(f"data too small: {data.description['bytes']} bytes leave {n} {part} bytes, "
                             f"need at least {settings.seq_len + 1} for seq_len {settings.seq_len}")


def step_checkpoint_paths(output: str | os.PathLike | None, steps: int, save_every: int | None) -> dict[int, Path]:
    """The step checkpoints a run writes beside ``output``, by step: <stem>.step<k><suffix> every save_every steps,
    the last step excepted (that one is ``output`` itself); none without output or save_every."""
    if output is None or not save_every:
        return {}
    output = Path(output)
    return {k: output.with_name(f"{output.stem}.step{k}{output.suffix}") for k in range(save_every, steps, save_every)}


def global_batch_line(settings: TrainSettings, world_size: int) -> str:
    """The run's global batch, spelled out (printed at the start)."""
    windows = settings.batch_size * world_size * settings.grad_accum
    return (f"global batch: {settings.batch_size} windows x {world_size} process(es) x {settings.grad_accum} "
            f"accumulation = {windows} windows of {settings.seq_len} bytes ({windows * settings.seq_len:,} tokens)")


def report_parameters(model: LoRATransformerLM, progress: Progress) -> dict[str, int]:
    """count_parameters(model), reported to ``progress`` on one line."""
    counts = count_parameters(model)
    progress.stage(f"parameters: total {counts['total']:,} | trainable {counts['trainable']:,} | "
                   f"lora {counts['lora']:,}")
    return counts


def training_progress(progress: Progress | bool, stage: str, distributed: Distributed) -> Progress:
    """``progress`` as a Progress on rank 0 (True: the parameter line on stdout and a bar named after the stage);
    silent on every other rank."""
    return as_progress(progress if distributed.is_main else False, stage, prefix="", stdout=True)


def _record(stage: str, data: TextData, parameters: dict[str, int], history: dict[str, Any],
            settings: TrainSettings, run: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``training`` metadata: the stage, its settings (seed, steps, batch_size, seq_len, lr,
    weight_decay, eval_every first), how it ran (``run``: world size, global batch, device, precision, resume),
    the data, parameter counts, loss history, the stage's ``extra`` fields, and the torch version."""
    fixed = {k: getattr(settings, k) for k in ("seed", "steps", "batch_size", "seq_len", "lr", "weight_decay",
                                               "eval_every", "grad_accum")}
    return {"stage": stage, **fixed, **run, "data": dict(data.description), "parameters": parameters, **history,
            **extra, "torch_version": str(torch.__version__)}


def run_identity(stage: str, config: ModelConfig, data: TextData, settings: TrainSettings, world_size: int,
                 base: str | None) -> dict[str, Any]:
    """The settings a resumed run must share with the one it resumes (``state.RUN_IDENTITY``)."""
    return {"stage": stage, "seed": settings.seed, "steps": settings.steps, "seq_len": settings.seq_len,
            "lr": settings.lr, "weight_decay": settings.weight_decay, "grad_accum": settings.grad_accum,
            "windows_per_draw": settings.batch_size * world_size, "data_sha256": data.description["sha256"],
            "base_fingerprint": base, "config": config.to_dict()}


def fit(model: LoRATransformerLM, data: TextData, settings: TrainSettings, launch: Launch, progress: Progress,
        record: Callable[[dict[str, list]], dict[str, Any]],
        output: str | os.PathLike | None) -> tuple[LoRATransformerLM, dict[str, list], dict[str, Any]]:
    """Train ``model`` (moved to the device, back on the CPU after) as the settings say, in this process's place
    among torchrun's; rank 0 writes a step checkpoint beside ``output`` every save_every steps. Returns the trained
    model (on the CPU; sharded ones gathered back whole: on rank 0 only, the others get ``model`` as it was), the
    history and how the run ran (world size, global batch, device, precision)."""
    distributed, device = launch.distributed, launch.device
    precision = Precision(settings.precision, device)
    progress.stage(global_batch_line(settings, distributed.world_size))
    ran = {"world_size": distributed.world_size,
           "global_batch": settings.batch_size * distributed.world_size * settings.grad_accum,
           "device": device.type, "precision": precision.name, "fsdp": settings.fsdp}
    run = Run(model.to(device), settings, distributed, device, precision)
    paths = step_checkpoint_paths(output, settings.steps, settings.save_every)

    def save_step(step: int, history: dict[str, list], state: dict[str, Any]) -> None:
        save_checkpoint(paths[step], run.model, {**record(history), **ran, "step": step}, resume=state)
        progress.stage(f"wrote {paths[step]}")

    distributed.start(device, settings.dist_timeout_s)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            history = train_loop(run, data, launch.identity, progress, launch.state, save_step if paths else None)
        if settings.fsdp and distributed.active:
            state = distributed.full_state(run.model)  # a collective: every process takes part
            model = gathered(model.config, state) if distributed.is_main else model
    finally:
        distributed.stop()
    return model.cpu().eval(), history, ran


def gathered(config: ModelConfig, state: dict[str, torch.Tensor]) -> LoRATransformerLM:
    """A plain model holding ``state`` (a sharded model's weights gathered back): built on the meta device, the
    tensors assigned, the same parameters trainable as in training."""
    with torch.device("meta"):
        model = LoRATransformerLM(config)
    model.load_state_dict(state, assign=True)
    if config.r > 0:
        mark_only_lora_as_trainable(model)
    return model


def _settings(config: ModelConfig, values: dict[str, Any]) -> TrainSettings:
    """TrainSettings from a stage's keyword values, seq_len defaulting to the model's max_seq_len."""
    settings = TrainSettings(**values)
    return replace(settings, seq_len=config.max_seq_len if settings.seq_len is None else settings.seq_len)


@dataclass
class Launch:
    """A stage checked and placed before any training: this process among torchrun's, its device, the run's
    identity (``state.RUN_IDENTITY``), and what it resumes (checkpoint payload and state, and the training
    record's ``resumed_from`` entry; all empty without ``--resume``)."""

    distributed: Distributed
    device: torch.device
    identity: dict[str, Any]
    payload: dict[str, Any] | None = None
    state: ResumeState | None = None
    resumed: dict[str, Any] = field(default_factory=dict)


def launch(stage: str, config: ModelConfig, data: TextData, settings: TrainSettings,
           resume: str | os.PathLike | None, base: str | None) -> Launch:
    """Check the settings (``check_settings``), find this process's place and device, and read ``resume`` (checked
    to belong to this run: ``check_same_run``). Raises ValueError / TrainingError / CheckpointError, one line."""
    check_settings(config, data, settings, resume)
    distributed = Distributed.from_environment()
    device = resolve_device(settings.device, distributed.local_rank)
    identity = run_identity(stage, config, data, settings, distributed.world_size, base)
    if resume is None:
        return Launch(distributed, device, identity)
    payload, state = read_resume(resume)
    check_same_run(resume, state, identity)
    return Launch(distributed, device, identity, payload, state, {"resumed_from": [Path(resume).name, state.step]})


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
    *,
    grad_accum: int = 1,
    device: str = "auto",
    precision: str = "fp32",
    save_every: int | None = None,
    output: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    dist_timeout_s: float = 600.0,
    fsdp: bool = False,
) -> tuple[LoRATransformerLM, dict[str, Any]]:
    """Train the base LM (config.r must be 0; every parameter trains) from scratch, or from ``resume``'s step.

    data defaults to the stdlib source corpus; seq_len to config.max_seq_len. progress: a Progress, or True for
    the parameter line on stdout and a 'pretrain' bar on stderr, False for nothing. ``output``: where the caller
    will write the final checkpoint; step checkpoints (``save_every``) go beside it. Returns the model (eval mode,
    CPU) and the checkpoint's ``training`` metadata (plain Python values).
    """
    if config.r != 0:
        raise ValueError(f"pretrain trains the base model: config.r must be 0, got {config.r}")
    data = data if data is not None else load_data(default="stdlib")
    settings = _settings(config, dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                                      eval_every=eval_every, weight_decay=weight_decay, grad_accum=grad_accum,
                                      device=device, precision=precision, save_every=save_every,
                                      dist_timeout_s=dist_timeout_s, fsdp=fsdp))
    started = launch("pretrain", config, data, settings, resume, None)
    progress = training_progress(progress, "pretrain", started.distributed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LoRATransformerLM(config)
    if started.payload is not None:
        model.load_state_dict(started.payload["base"])
    parameters = report_parameters(model, progress)

    def record(history: dict[str, list]) -> dict[str, Any]:
        return _record("pretrain", data, parameters, history, settings, started.resumed,
                       {"final_eval_loss": history["eval_losses"][-1][1]})

    model, history, ran = fit(model, data, settings, started, progress, record, output)
    return model.eval(), {**record(history), **ran}


def _read_base(path: str | os.PathLike) -> tuple[dict[str, Any], LoRATransformerLM]:
    """The checkpoint payload and model of a base to adapt; ValueError for one that has LoRA already."""
    payload = read_checkpoint(path)
    base = build_model(payload, path)
    if base.config.r != 0:
        raise ValueError(f"{path}: already has LoRA (r={base.config.r}); adapt a base (r=0) checkpoint")
    return payload, base


def _adapted_model(config: ModelConfig, base: dict[str, torch.Tensor], seed: int,
                   payload: dict[str, Any] | None) -> LoRATransformerLM:
    """The model to adapt: the base's weights and LoRA initialised under ``seed`` (or a resume payload's LoRA),
    only lora_A / lora_B trainable."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LoRATransformerLM(config)
    lora = payload["lora"] if payload is not None else lora_state_dict(model)
    model.load_state_dict({**base, **lora})  # strict: every base key
    mark_only_lora_as_trainable(model)
    return model


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
    *,
    grad_accum: int = 1,
    device: str = "auto",
    precision: str = "fp32",
    save_every: int | None = None,
    output: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    dist_timeout_s: float = 600.0,
    fsdp: bool = False,
) -> tuple[LoRATransformerLM, dict[str, Any]]:
    """Add LoRA (rank r on lora_targets) to a base (r = 0) checkpoint and train only lora_A / lora_B.

    data defaults to the prose corpus; seq_len to the base's max_seq_len; progress, output and resume as
    ``pretrain``'s (the bar named 'adapt'). The metadata holds the held-out loss of the base model (as loaded, no
    LoRA) and of the adapted model on the same bytes: ``base_eval_loss`` and ``adapted_eval_loss``. Raises
    CheckpointError for an unreadable base, TrainingError for a resume checkpoint of another run.
    """
    check_hyperparameters(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_every=eval_every, r=r,
                          lora_alpha=lora_alpha, lora_dropout=lora_dropout, grad_accum=grad_accum,
                          save_every=save_every, lora_targets=lora_targets)
    base_payload, base = _read_base(base_checkpoint_path)
    config = replace(base.config, r=r, lora_alpha=lora_alpha, lora_targets=list(lora_targets),
                     lora_dropout=lora_dropout, use_rslora=use_rslora)
    data = data if data is not None else load_data(default="prose")
    settings = _settings(config, dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                                      eval_every=eval_every, weight_decay=0.0, grad_accum=grad_accum,
                                      device=device, precision=precision, save_every=save_every,
                                      dist_timeout_s=dist_timeout_s, fsdp=fsdp))
    fingerprint = base_fingerprint(base_payload["base"])
    started = launch("adapt", config, data, settings, resume, fingerprint)
    base_eval_loss = evaluate(base, data.val, settings.seq_len) if started.distributed.is_main else math.nan
    progress = training_progress(progress, "adapt", started.distributed)
    model = _adapted_model(config, base_payload["base"], seed, started.payload)
    del base
    parameters = report_parameters(model, progress)
    base_record = {"base_checkpoint": Path(base_checkpoint_path).name,
                   "base_sha256": file_sha256(base_checkpoint_path), "base_fingerprint": fingerprint,
                   "base_eval_loss": base_eval_loss}

    def record(history: dict[str, list]) -> dict[str, Any]:  # the base is hashed once, not at every save
        return _record("adapt", data, parameters, history, settings, started.resumed,
                       {**base_record, "adapted_eval_loss": history["eval_losses"][-1][1]})

    model, history, ran = fit(model, data, settings, started, progress, record, output)
    return model.eval(), {**record(history), **ran}
