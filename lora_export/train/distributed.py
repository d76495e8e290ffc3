"""Many processes through torchrun: PyTorch's own process group and DistributedDataParallel, nothing hand-made.

``torchrun --nproc-per-node N $(which lora-train) adapt ...`` (and ``--nnodes M --rdzv-endpoint HOST:PORT`` on each
of M machines) starts N x M copies of the trainer with RANK, LOCAL_RANK and WORLD_SIZE in their environment.
``Distributed.from_environment`` reads them (one process when none is set), joins the process group (gloo on the
CPU, nccl on CUDA) with a timeout, so that a peer that dies or hangs ends the others with one line instead of a
hang. ``wrap`` puts the model in DDP: only parameters that train (the LoRA matrices when adapting) take part in
its gradient all-reduce, averaged over the processes. Rank 0 alone logs, evaluates and writes checkpoints.

With ``fsdp`` the model is sharded instead (``torch.distributed.fsdp.fully_shard`` per block, then the whole):
each process holds 1 / world_size of every weight, gathered for each block's forward and backward, for a base too
big for one device. Then every process evaluates (a forward needs them all) and ``full_state`` gathers the
weights back for rank 0 to write.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..errors import PeersFailedError, TrainingError, first_line

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600


def torchrun_environment() -> dict[str, str] | None:
    """torchrun's variables of this process, or None when it was not started by torchrun (none set).

    Raises TrainingError when only some are set or they are not consistent.
    """
    present = {name: os.environ[name] for name in TORCHRUN_VARIABLES if name in os.environ}
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in present]
    if missing:
        raise TrainingError(f"incomplete torchrun environment: {', '.join(missing)} not set (start the trainer "
                            "through torchrun, or unset RANK/WORLD_SIZE for one process)")
    try:
        rank, local_rank, world = (int(present[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except ValueError:
        raise TrainingError("torchrun environment: RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None
    if not (0 <= rank < world and 0 <= local_rank <= rank):
        raise TrainingError(f"torchrun environment: RANK {rank}, LOCAL_RANK {local_rank} do not fit WORLD_SIZE "
                            f"{world}")
    return present


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank of world_size (local_rank on its machine); world_size 1 alone."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs, evaluates and writes (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there is a process group (more than one process)."""
        return self.world_size > 1

    @classmethod
    def from_environment(cls) -> Distributed:
        """This process as torchrun started it (without joining any group yet); one process without torchrun."""
        env = torchrun_environment()
        if env is None:
            return cls()
        return cls(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]), world_size=int(env["WORLD_SIZE"]))

    def start(self, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Join the process group (gloo for the CPU, nccl for CUDA); every collective fails after timeout_s."""
        if not self.active or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        with peers_guard(self):
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)

    def stop(self) -> None:
        """Leave the process group (no-op alone)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
        """The model DDP-wrapped for training (the model itself alone). DDP reduces only parameters that require
        gradients, so a LoRA run all-reduces the LoRA gradients and nothing of the frozen base. ``fsdp``: the
        model sharded in place instead (its blocks, then itself), returned as it is."""
        if not self.active:
            return model
        with peers_guard(self):
            if fsdp:
                # the loss reads the logits out of place: the view FSDP warns about is never changed in place
                warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
                for block in model.blocks:
                    fully_shard(block)
                return fully_shard(model)
            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole state dict of an ``fsdp``-sharded model, on the CPU, for rank 0 (empty on the others); every
        process must call it."""
        with peers_guard(self):
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def mean(self, value: torch.Tensor) -> float:
        """The mean over the processes of a scalar tensor (the value itself alone)."""
        if self.active:
            with peers_guard(self):
                value = value.detach().clone()
                dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
                if not value.is_cuda:  # gloo has no AVG
                    value /= self.world_size
        return value.item()


@contextlib.contextmanager
def peers_guard(distributed: Distributed) -> Iterator[None]:
    """Turn a failed collective (a peer died, closed its connection or timed out) into one PeersFailedError line."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        if not distributed.active or isinstance(err, PeersFailedError):
            raise
        raise PeersFailedError(f"rank {distributed.rank} of {distributed.world_size}: another process failed or "
                               f"stopped answering: {first_line(err)[:200]}") from None


def no_sync(model: torch.nn.Module, accumulating: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` while gradients accumulate over micro-batches (all-reduce only on the last one)."""
    if accumulating and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
