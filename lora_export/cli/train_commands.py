"""``lora-train pretrain|adapt``: train a base model, then its LoRA adapters (``lora_export.train``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from ..corpus import load_data
from ..model.checkpoint import check_checkpoint_output, save_checkpoint
from ..model.transformer import ModelConfig
from ..train.loop import adapt, check_hyperparameters, pretrain
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
    ]

    def decorate(command: CommandT) -> CommandT:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


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
def pretrain_command(output: Path, steps: int, batch_size: int, seq_len: int | None, lr: float, seed: int,
                     data: tuple[Path, ...], eval_every: int, quiet: bool, force: bool, dim: int, depth: int,
                     heads: int,
                     dim_head: int, local_heads: int, window: int, global_attn: str, blindspot: int | None,
                     max_seq_len: int, dropout: float) -> None:
    """Train a base model (no LoRA) from scratch.

    Default data: the Python standard library's source (first 4 MB, sorted paths).
    """
    check_checkpoint_output(output, list(data), overwrite=force)
    check_hyperparameters(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_every=eval_every)
    config = ModelConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, n_local_attn_heads=local_heads,
                         local_attn_window_size=window, global_attn=global_attn, blindspot_size=blindspot,
                         max_seq_len=max_seq_len, dropout=dropout, r=0)
    model, training = pretrain(config, load_data(data, default="stdlib"), steps=steps, batch_size=batch_size,
                               seq_len=seq_len, lr=lr, seed=seed, eval_every=eval_every, progress=not quiet)
    save_checkpoint(output, model, training)
    click.echo(f"held-out loss {training['final_eval_loss']:.4f} nats/byte; wrote {output}")


@train_cli.command("adapt")
@click.argument("base", type=click.Path(path_type=Path))
@training_options(steps=300, lr=2e-3, eval_every=50)
@click.option("--r", "r", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scaling = alpha / r).")
@click.option("--targets", default="q,k,v,o,ff", show_default=True,
              help="Comma list of layers to adapt: q, k, v, o, ff, emb.")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input.")
@click.option("--rslora", is_flag=True, help="rsLoRA scaling alpha / sqrt(r).")
@exit_on_error
def adapt_command(base: Path, output: Path, steps: int, batch_size: int, seq_len: int | None, lr: float, seed: int,
                  data: tuple[Path, ...], eval_every: int, quiet: bool, force: bool, r: int, alpha: float,
                  targets: str,
                  lora_dropout: float, rslora: bool) -> None:
    """Add LoRA to the BASE checkpoint and train only the adapters.

    Default data: English prose (pydoc topics). Prints the held-out loss of the base and the adapted model.
    """
    check_checkpoint_output(output, [base, *data], overwrite=force)
    check_hyperparameters(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_every=eval_every, r=r,
                          lora_alpha=alpha, lora_dropout=lora_dropout)
    lora_targets = [t.strip() for t in targets.split(",") if t.strip()]
    model, training = adapt(base, r=r, lora_alpha=alpha, lora_targets=lora_targets, lora_dropout=lora_dropout,
                            use_rslora=rslora, data=load_data(data, default="prose"), steps=steps,
                            batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, eval_every=eval_every,
                            progress=not quiet)
    save_checkpoint(output, model, training)
    held_out = "held-out data" if data else "held-out prose"
    base_loss, adapted_loss = training["base_eval_loss"], training["adapted_eval_loss"]
    click.echo(f"eval loss on {held_out}: base {base_loss:.4f} -> adapted {adapted_loss:.4f} nats/byte "
               f"({adapted_loss - base_loss:+.4f}); wrote {output}")
