"""Training data as batches: random windows drawn from one seeded stream, each process keeping its shard.

A training batch is ``batch_size`` random contiguous windows of seq_len + 1 bytes (inputs and next-byte targets)
per process. With ``world_size`` processes every process draws the starts of the whole global batch
(``batch_size * world_size`` windows) from the same seeded ``torch.Generator`` and keeps its own slice, rank r the
windows r * batch_size ... (r + 1) * batch_size - 1: so the data order depends on the global batch only, and one
process with batch_size * 2 sees exactly the windows two processes with batch_size see together. The generator's
state is the whole data position (``train.state`` stores it to resume).

The held-out loss is averaged over fixed, evenly spaced windows, so every evaluation sees the same bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.transformer import LoRATransformerLM

EVAL_WINDOWS = 64


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's shard of one global batch of random windows of data (1-D uint8): inputs x [batch_size,
    seq_len] and next-byte targets y [batch_size, seq_len], int64 on the CPU.

    Draws batch_size * world_size starts from ``generator`` whatever the rank (every process advances the stream
    alike) and keeps the rank's slice.
    """
    starts = torch.randint(len(data) - seq_len, (batch_size * world_size,), generator=generator)
    mine = starts[rank * batch_size: (rank + 1) * batch_size]
    windows = torch.stack([data[s: s + seq_len + 1] for s in mine.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: LoRATransformerLM, data: torch.Tensor, seq_len: int, n_windows: int = EVAL_WINDOWS) -> float:
    """Mean next-byte cross-entropy (nats) over up to n_windows evenly spaced windows of data (1-D uint8), in
    float32 on the model's device.

    Runs in eval mode (no dropout) and restores the model's previous mode.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts = torch.linspace(0, len(data) - seq_len - 1, n_windows).long().unique()
    windows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long().to(device)
    losses = []
    for batch in windows.split(16):
        logits = model(batch[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    model.train(was_training)
    return torch.stack(losses).sum().item() / (len(windows) * seq_len)
