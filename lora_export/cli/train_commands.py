"""``lora-train pretrain|adapt``: train a base model, then its LoRA adapters (``lora_export.train``).

Under torchrun every process runs the same command: each checks the input alike, so only rank 0 says what is
wrong (the others exit with the same code, silently); rank 0 alone prints progress and writes checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..corpus import load_data
from ..errors import EXIT_BAD_INPUT, EXIT_PEERS_FAILED, PeersFailedError
from ..files import check_outputs
from ..model.checkpoint import check_checkpoint_output, save_checkpoint
from ..model.transformer import ModelConfig
from ..train.distributed import DEFAULT_TIMEOUT_S, Distributed
from ..train.runtime import DEVICES, PRECISIONS
from ..train.stages import adapt, check_hyperparameters, pretrain, step_checkpoint_paths
from .options import FORCE_HELP, HELP_OPTIONS, CommandT, data_option, exit_on_error


def training_options(steps: int, lr: float, eval_every: int) -> Callable[[CommandT], CommandT]:
    """The options shared by pretrain and adapt (defaults differ per command)."""
    options = [
        click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
                     help="Checkpoint to write: .pt (torch zip) or .safetensors (no pickle at all)."),
        click.option("--steps", type=int, default=steps, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Windows per batch."),
        click.option("--seq-len", type=int, default=None, help="Window length in bytes [default: max_seq_len]."),
        click.option("--lr", type=float, default=lr, show_default=True, help="Peak learning rate (AdamW)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, dropout, batches."),
        data_option("Train on these text files or directories instead of the default corpus: several after one "
                    "--data (--data a.txt corpus/), or --data repeated."),
        click.option("--eval-every", type=int, default=eval_every, show_default=True,
                     help="Held-out evaluation interval in steps."),
        click.option("--quiet", is_flag=True, help="No progress bar or parameter counts."),
        click.option("--force", is_flag=True, help=FORCE_HELP),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="Where to train; auto: CUDA when a computation on it really works, else the CPU."),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
                     help="Autocast precision of the forward pass (fp16 with a gradient scaler); weights, optimizer "
                          "and checkpoints stay fp32."),
        click.option("--grad-accum", type=int, default=1, show_default=True,
                     help="Micro-batches per optimizer step (global batch = batch size x processes x this)."),
        click.option("--save-every", type=int, default=None,
                     help="Also write a resumable checkpoint <output stem>.step<N><suffix> every N steps."),
        click.option("--resume", type=click.Path(path_type=Path), default=None,
                     help="Go on from a --save-every checkpoint of this same run (settings, data, model checked)."),
        click.option("--fsdp", is_flag=True,
                     help="Under torchrun, shard the model over the processes (FSDP) instead of replicating it "
                          "(DDP): for a base too big for one device."),
        click.option("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, show_default=True,
                     help="Seconds a process waits for the others (torchrun) before the run ends with one line."),
    ]

    def decorate(command: CommandT) -> CommandT:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def distributed_errors(command: CommandT) -> CommandT:
    """Decorate a training command (inside ``exit_on_error``) for torchrun: a failed peer becomes one line and exit
    EXIT_PEERS_FAILED; on ranks other than 0 input errors exit silently (rank 0 says the same line)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PeersFailedError as err:
            click.echo(f"error: {err}", err=True)
            raise SystemExit(EXIT_PEERS_FAILED) from None
        except (ValueError, OSError):
            if Distributed.from_environment().is_main:
                raise
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def stage_options(output: Path, training: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``pretrain`` / ``adapt`` from the shared training options, checked first."""
    options = {key: training[key] for key in ("steps", "batch_size", "seq_len", "lr", "seed", "eval_every",
                                              "grad_accum", "device", "precision", "save_every", "resume")}
    check_hyperparameters(**{key: options[key] for key in ("steps", "batch_size", "seq_len", "lr", "eval_every",
                                                           "grad_accum", "save_every")})
    return {**options, "progress": not training["quiet"], "output": output,
            "dist_timeout_s": training["dist_timeout"], "fsdp": training["fsdp"]}


def check_training_outputs(output: Path, inputs: list[Path], steps: int, save_every: int | None,
                           overwrite: bool) -> None:
    """The final checkpoint and every step checkpoint, checked before any work (``check_checkpoint_output``)."""
    check_checkpoint_output(output, inputs, overwrite=overwrite)
    check_outputs(list(step_checkpoint_paths(output, steps, save_every).values()), inputs, overwrite=overwrite)


def write_result(output: Path, model: Any, training: dict[str, Any], message: str) -> None:
    """Rank 0 (or the only process) writes the final checkpoint and prints ``message``; other ranks nothing."""
    if Distributed.from_environment().is_main:
        save_checkpoint(output, model, training)
        click.echo(message)


@click.group(context_settings=HELP_OPTIONS)
def train_cli() -> None:
    """Train byte-level LoRA attention language models."""


@train_cli.command("pretrain")
@training_options(steps=1000, lr=1e-3, eval_every=100)
@click.option("--dim", type=int, default=128, show_default=True, help="Model width.")
@click.option("--depth", type=int, default=4, show_default=True, help="Number of blocks.")
@click.option("--heads", type=int, default=4, show_default=True, help="Attention heads per block.")
@click.option("--dim-head", type=int, default=32, show_default=True, help="Width of one head.")
@click.option("--local-heads", type=int, default=2, show_default=True, help="How many heads are local-window.")
@click.option("--window", type=int, default=64, show_default=True, help="Local attention window size.")
@click.option("--global-attn", type=click.Choice(["softmax", "linear"]), default="softmax", show_default=True,
              help="Attention of the global heads.")
@click.option("--blindspot", type=int, default=None, help="Blindspot block size of the global heads.")
@click.option("--max-seq-len", type=int, default=256, show_default=True, help="Longest sequence the model takes.")
@click.option("--dropout", type=float, default=0.1, show_default=True, help="Dropout inside the model.")
@exit_on_error
@distributed_errors
def pretrain_command(output: Path, data: tuple[Path, ...], force: bool, dim: int, depth: int, heads: int,
                     dim_head: int, local_heads: int, window: int, global_attn: str, blindspot: int | None,
                     max_seq_len: int, dropout: float, **training: Any) -> None:
    """Train a base model (no LoRA) from scratch.

    Default data: the Python standard library's source (first 4 MB, sorted paths).
    """
    options = stage_options(output, training)
    check_training_outputs(output, [*data, *([training["resume"]] if training["resume"] else [])],
                           training["steps"], training["save_every"], overwrite=force)
    config = ModelConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, n_local_attn_heads=local_heads,
                         local_attn_window_size=window, global_attn=global_attn, blindspot_size=blindspot,
                         max_seq_len=max_seq_len, dropout=dropout, r=0)
    model, record = pretrain(config, load_data(data, default="stdlib"), **options)
    write_result(output, model, record, f"held-out loss {record['final_eval_loss']:.4f} nats/byte; wrote {output}")


@train_cli.command("adapt")
@click.argument("base", type=click.Path(path_type=Path))
@training_options(steps=300, lr=2e-3, eval_every=50)
@click.option("--r", "--lora-r", "r", type=int, default=8, show_default=True,
              help="LoRA rank (--lora-r under torchrun, whose parser takes --r for one of its own options).")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scaling = alpha / r).")
@click.option("--targets", default="q,k,v,o,ff", show_default=True,
              help="Comma list of what to adapt: groups q, k, v, o, ff, emb (every block), or module names (fc1, "
                   "to_q, token_emb), paths (blocks.0.attn.to_q) or patterns (blocks.*.ff.fc1).")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input.")
@click.option("--rslora", is_flag=True, help="rsLoRA scaling alpha / sqrt(r).")
@exit_on_error
@distributed_errors
def adapt_command(base: Path, output: Path, data: tuple[Path, ...], force: bool, r: int, alpha: float, targets: str,
                  lora_dropout: float, rslora: bool, **training: Any) -> None:
    """Add LoRA to the BASE checkpoint and train only the adapters.

    Default data: English prose (pydoc topics). Prints the held-out loss of the base and the adapted model.
    """
    options = stage_options(output, training)
    check_training_outputs(output, [base, *data, *([training["resume"]] if training["resume"] else [])],
                           training["steps"], training["save_every"], overwrite=force)
    lora_targets = [t.strip() for t in targets.split(",") if t.strip()]
    model, record = adapt(base, r=r, lora_alpha=alpha, lora_targets=lora_targets, lora_dropout=lora_dropout,
                          use_rslora=rslora, data=load_data(data, default="prose"), **options)
    held_out = "held-out data" if data else "held-out prose"
    base_loss, adapted_loss = record["base_eval_loss"], record["adapted_eval_loss"]
    write_result(output, model, record, f"eval loss on {held_out}: base {base_loss:.4f} -> adapted "
                 f"{adapted_loss:.4f} nats/byte ({adapted_loss - base_loss:+.4f}); wrote {output}")
