"""The training loop: AdamW on the trainable parameters, next-byte cross-entropy, one process or many.

One optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` windows per process (``batches.get_batch``:
every process's shard of the same global draw), so the global batch is batch_size x world_size x grad_accum
windows. Gradients are averaged over micro-batches and processes (DDP), clipped at norm 1.0, then stepped; the
learning rate warms up linearly and decays along a cosine to a tenth. The forward pass runs in ``--precision``
(``runtime.Precision``), the weights and the optimizer state stay float32.

Deterministic under ``seed`` (for a given machine, thread count and world size): the batches come from one seeded
generator, dropout is seeded per micro-batch from (seed, rank, step, micro-batch), so a resumed run
(``state.ResumeState``) repeats the uninterrupted one. CPU kernels are deterministic already;
``torch.use_deterministic_algorithms`` is not switched on because it costs a multi-second import of
torch._inductor on every run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..corpus import TextData
from ..model.transformer import LoRATransformerLM
from ..progress import Progress
from .batches import evaluate, get_batch
from .distributed import Distributed, no_sync, peers_guard
from .runtime import Precision
from .state import ResumeState, capture, restore


@dataclass
class TrainSettings:
    """How one stage trains. batch_size is per process and micro-batch; seq_len None: the model's max_seq_len;
    save_every None: no step checkpoints; device 'auto', 'cpu' or 'cuda'; precision 'fp32', 'bf16' or 'fp16';
    dist_timeout_s: how long a collective waits for the other processes before the run ends; fsdp: shard the
    model over the processes instead of replicating it (``Distributed.wrap``)."""

    steps: int
    batch_size: int
    seq_len: int | None
    lr: float
    weight_decay: float
    eval_every: int
    seed: int = 0
    grad_accum: int = 1
    device: str = "auto"
    precision: str = "fp32"
    save_every: int | None = None
    dist_timeout_s: float = 600.0
    fsdp: bool = False


@dataclass
class Run:
    """A stage ready to train: the model (on ``device``, not wrapped), its settings (seq_len resolved), where this
    process stands among the others, and the precision."""

    model: LoRATransformerLM
    settings: TrainSettings
    distributed: Distributed
    device: torch.device
    precision: Precision


#: Called by rank 0 after a step checkpoint's step with (step, history so far, the ``resume`` section).
SaveStep = Callable[[int, dict[str, list], dict[str, Any]], None]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from lr to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def dropout_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The seed of dropout for one micro-batch of one process: independent streams, reproducible on resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}:{micro}".encode()).digest()[:8], "little") >> 1


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95); matrices (ndim >= 2) get weight decay, biases and norms do not."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_step(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TextData,
               generator: torch.Generator, step: int) -> float:
    """One optimizer step over grad_accum micro-batches; returns the step's loss averaged over the processes."""
    settings, rank, world = run.settings, run.distributed.rank, run.distributed.world_size
    scaler = run.precision.scaler
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=run.device)
    for micro in range(settings.grad_accum):
        x, y = get_batch(data.train, settings.batch_size, settings.seq_len, generator, rank, world)
        torch.manual_seed(dropout_seed(settings.seed, rank, step, micro))
        with no_sync(model, accumulating=micro < settings.grad_accum - 1):
            with run.precision.autocast():
                logits = model(x.to(run.device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(run.device).flatten()) / settings.grad_accum
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    scaler.step(optimizer)
    scaler.update()
    return run.distributed.mean(total)


def _evaluate(run: Run, data: TextData) -> float:
    """The held-out loss, measured by rank 0 only (NaN on the others, which never report it); by every process
    when the model is sharded (each forward gathers the weights from all)."""
    if run.distributed.is_main or (run.settings.fsdp and run.distributed.active):
        return evaluate(run.model, data.val, run.settings.seq_len)
    return math.nan


def train_loop(run: Run, data: TextData, identity: dict[str, Any], progress: Progress,
               resume: ResumeState | None = None, save_step: SaveStep | None = None) -> dict[str, list]:
    """Train ``run.model`` in place for the settings' steps (from ``resume``'s step when given).

    The held-out loss is measured at step 0, every eval_every steps and after the last step; ``progress``
    advances by step with the running and held-out loss. Every save_every steps (not the last) rank 0 calls
    ``save_step``. ``identity`` (``state.RUN_IDENTITY``) goes into each resume section. Returns the history:
    {'losses': per-step training loss, 'eval_losses': [[step, held-out loss], ...]}, on rank 0 complete.
    """
    settings = run.settings
    history = ({k: list(v) for k, v in resume.history.items()} if resume is not None
               else {"losses": [], "eval_losses": [[0, _evaluate(run, data)]]})
    model = run.distributed.wrap(run.model, run.device, settings.fsdp)
    # after wrapping: fully_shard replaces the parameters, and the optimizer must hold the ones that train
    optimizer = make_optimizer([p for p in run.model.parameters() if p.requires_grad], settings.lr,
                               settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    start = 0
    if resume is not None:
        restore(resume, optimizer, run.precision.scaler, generator)
        start = resume.step
    model.train()
    warmup, running = min(100, settings.steps // 10), None
    try:
        with peers_guard(run.distributed):
            for step in range(start, settings.steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, settings.steps, settings.lr, warmup)
                history["losses"].append(train_step(run, model, optimizer, data, generator, step))
                running = history["losses"][-1] if running is None else 0.95 * running + 0.05 * history["losses"][-1]
                if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
                    history["eval_losses"].append([step + 1, _evaluate(run, data)])
                latest_eval = history["eval_losses"][-1][1]
                progress.advance(step + 1, settings.steps, f"loss={running:.3f}, eval={latest_eval:.3f}")
                if (save_step is not None and settings.save_every and (step + 1) % settings.save_every == 0
                        and step + 1 < settings.steps and run.distributed.is_main):
                    save_step(step + 1, history, capture(step + 1, history, optimizer, run.precision.scaler,
                                                         generator, identity))
    finally:
        progress.close()
    run.model.eval()
    return history
