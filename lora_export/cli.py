"""Command line: ``lora-train pretrain|adapt`` and ``lora-export [export|adapter|check|validate|generate|from-peft|
to-peft|compare-reports]``.

The commands only parse options and call the library (:mod:`lora_export.train`, :mod:`lora_export.export`,
:mod:`lora_export.validate`).
Bad input (a missing or unreadable file, a bad checkpoint, an impossible setting, an output that would replace
an input) prints one line ``error: ...`` to stderr and exits with status 2, like click's own usage errors; never a
traceback. Every output and option is checked before any work starts. An interrupt (Ctrl-C) prints
``error: interrupted`` and exits with 130, leaving no partial file (writes are staged, see ``lora_export.files``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .corpus import load_data
from .errors import EXIT_BAD_INPUT, EXIT_PARITY_FAILED, INTERRUPTED_EXIT, TERMINATED_EXIT, Terminated, first_line
from .export.convert import (
    EXTERNAL_DATA_THRESHOLD,
    check_adapter_file,
    check_output_path,
    export_adapter,
    export_onnx,
    export_outputs,
)
from .export.peft import from_peft, to_peft
from .export.quantize import convert_fp16, convert_ort_format, quantize_int4, quantize_int8
from .export.tracing import DEFAULT_OPSET
from .files import check_output_dir, check_outputs
from .genai.decoder import export_decoder
from .genai.generate import DEVICES, Sampling, check_generation, generate_bytes
from .layout import (
    CONFIG_FILE,
    REPORT_FILES,
    WEIGHTS_FILE,
    Form,
    data_path_of,
    default_adapter_path,
    default_genai_dir,
    default_output_path,
    default_report_dir,
    model_files,
    ort_format_outputs,
    precision_output_path,
)
from .model.checkpoint import CHECKPOINT_SUFFIXES, save_checkpoint
from .model.transformer import ModelConfig
from .parity.metrics import resolve_tolerance
from .parity.precisions import check_ort_format
from .parity.sessions import normalize_providers
from .parity.validate import validate
from .report.compare import compare_reports, load_report, render_comparison
from .train.loop import adapt, check_hyperparameters, pretrain

CommandT = TypeVar("CommandT", bound=Callable[..., Any])


def exit_on_error(command: CommandT) -> CommandT:
    """Decorate a click command: a LoraExportError (any ValueError) or OSError becomes 'error: ...' + exit 2; an
    interrupt becomes 'error: interrupted' + exit 130 (click's own would print 'Aborted!' and exit 1).

    click's own usage errors (unknown option, bad choice) are left to click, which also exits with 2.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Terminated:
            click.echo("error: terminated", err=True)
            raise SystemExit(TERMINATED_EXIT) from None
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            raise SystemExit(INTERRUPTED_EXIT) from None
        except (ValueError, OSError) as err:
            if isinstance(err, OSError) and err.filename is not None:
                message = f"{err.filename}: {err.strerror or err}"
            else:
                message = first_line(err)
            click.echo(f"error: {message}", err=True)
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def check_training_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Fail before training, not after, when the output cannot be written, would replace an input, or exists
    without ``--force``."""
    if output.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{output}: the checkpoint output must end in .pt or .safetensors")
    check_outputs([output], inputs, overwrite=force)


FORCE_HELP = "Replace outputs that exist already (without it, an existing output is an error)."


class PathsOption(click.Option):
    """A repeatable path option that also takes several paths after one flag, like argparse's ``nargs="+"``:
    ``--data a.txt dir/ b.txt`` is ``--data a.txt --data dir/ --data b.txt`` (so a shell glob works). The paths end
    at the next option or ``--``; a positional argument right after them would be read as one more path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, multiple=True, type=click.Path(path_type=Path), metavar="PATH...", **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        # click has no variadic option (nargs=-1 is for arguments only): after the flag's own value, its parser
        # entry also takes every following argument that is not an option.
        entry = parser._long_opt.get(self.opts[0]) or parser._short_opt[self.opts[0]]
        take_one = entry.process

        def take_all(value: Any, state: Any) -> None:
            take_one(value, state)
            while state.rargs and not (state.rargs[0].startswith("-") and len(state.rargs[0]) > 1):
                take_one(state.rargs.pop(0), state)

        entry.process = take_all


def data_option(help_text: str) -> Callable[[CommandT], CommandT]:
    """``--data PATH...``: text files or directories, several after one flag or the flag repeated."""
    return click.option("--data", cls=PathsOption, help=help_text)


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


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


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
    check_training_output(output, list(data), force)
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
    check_training_output(output, [base, *data], force)
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


# --------------------------------------------------------------------------- lora-export


class DefaultCommandGroup(click.Group):
    """A group that runs its ``export`` command when the first argument is not a command name.

    So ``lora-export model.pt --merge`` is ``lora-export export model.pt --merge``, while
    ``lora-export validate ...`` and the other commands work as usual and ``--help`` lists them all.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


def progress_printer(quiet: bool) -> Callable[[str], None]:
    """Stage messages on stderr (so stdout holds only the summary); silent with --quiet."""
    if quiet:
        return lambda _message: None
    return lambda message: click.echo(f"[lora-export] {message}", err=True)


def run_validation(model_path: Path, checkpoint: Path, adapter: Path | None, providers: str | None,
                   atol: float | None, rtol: float | None, report: Path | None, quiet: bool,
                   precision_models: dict[str, Path] | None = None, data: tuple[Path, ...] = (),
                   json_output: bool = False) -> None:
    """Validate, print the summary (or with ``json_output`` one JSON verdict object) and exit 0 (pass),
    1 (parity failure) or 2 (no provider could run it)."""
    started = time.perf_counter()
    result = validate(model_path, checkpoint, adapter_path=adapter,
                      providers=providers.split(",") if providers else None,
                      explicit_providers=providers is not None, atol=atol, rtol=rtol, report_dir=report,
                      progress=not quiet and not json_output, precision_models=precision_models, data=data)
    if json_output:
        worst = result.worst
        click.echo(json.dumps({
            "status": result.status, "passed": result.passed, "summary": result.summary,
            "model": str(result.model_path), "checkpoint": str(result.checkpoint_path),
            "precision": result.precision, "providers": {p.name: p.ran for p in result.providers},
            "worst": None if worst is None else {"case": worst.case, "variant": worst.variant,
                                                 "provider": worst.provider,
                                                 "tolerance_used": worst.metrics.tolerance_used},
            "failures": result.failures, "report": {k: str(v) for k, v in result.report_files.items()}}))
    else:
        click.echo(result.summary)
        click.echo(f"report: {result.report_files['html']} (validation {time.perf_counter() - started:.1f} s)")
    if result.status == "not run":  # e.g. an fp16 model on a machine without CUDA: nothing was checked
        click.echo(f"error: no execution provider here can run this {result.precision} model", err=True)
        raise SystemExit(EXIT_BAD_INPUT)
    if not result.passed:
        raise SystemExit(EXIT_PARITY_FAILED)


#: The names the help texts use to show each default output, computed by the functions that compute the real ones.
EXAMPLE_CHECKPOINT = Path("model.pt")
EXAMPLE_MODEL = default_output_path(EXAMPLE_CHECKPOINT)
EXAMPLE_ADAPTERS_MODEL = default_output_path(EXAMPLE_CHECKPOINT, Form.ADAPTERS)


EXAMPLE_GENAI_DIR = default_genai_dir(EXAMPLE_CHECKPOINT, "fp32", Form.MERGED)


def validation_options(command: CommandT) -> CommandT:
    """--providers, --atol, --rtol, --report: shared by export and validate."""
    options = [
        click.option("--providers", default=None,
                     help="Comma list of cpu, cuda. Given explicitly, a provider that cannot run is an error; "
                          "by default CPU runs and CUDA is tried, reported 'not run' when unavailable."),
        click.option("--atol", type=float, default=None,
                     help="Absolute tolerance [default: fp32 1e-4, fp16 16 * 2^-10 * the largest |logit| at each "
                          "position (given, it replaces that); int8 and int4 are judged by top-1 "
                          "agreement and eval loss]."),
        click.option("--rtol", type=float, default=None,
                     help="Relative tolerance [default: fp32 1e-3, fp16 2^-10]."),
        click.option("--json", "json_output", is_flag=True,
                     help="Print the verdict as one JSON object on stdout (status, summary, worst, failures, report "
                          "files); exit codes unchanged."),
        click.option("--report", type=click.Path(path_type=Path), default=None,
                     help=f"Report directory, made if missing [default: beside the model, "
                          f"{EXAMPLE_MODEL} -> {default_report_dir(EXAMPLE_MODEL)}/, {EXAMPLE_GENAI_DIR}/ -> "
                          f"{default_report_dir(EXAMPLE_GENAI_DIR)}/]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=DefaultCommandGroup, context_settings=HELP_OPTIONS)
@click.version_option(__version__, prog_name="lora-export")
def export_cli() -> None:
    """Export lora-export checkpoints to ONNX and prove parity with PyTorch.

    \b
    lora-export model.pt --merge               merged graph -> model.onnx, then validate
    lora-export model.pt --adapters-as-inputs  LoRA A/B as graph inputs -> model.adapters.onnx
                                               + model.adapters.onnx_adapter
    lora-export model.pt --genai               KV-cache decoder for onnxruntime-genai -> model_genai/
    lora-export generate DIR --prompt TEXT     stream generated bytes through onnxruntime-genai
    lora-export from-peft DIR --base B -o M    PEFT LoRA adapter directory -> lora-export checkpoint
    lora-export to-peft model.pt -o DIR        lora-export LoRA -> PEFT adapter directory
    """


@export_cli.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--merge", is_flag=True, help="Fold scaling*B*A into W0: a plain graph (the default form).")
@click.option("--adapters-as-inputs", is_flag=True,
              help="Keep every LoRA A/B as a graph input (ONNX Runtime multi-LoRA) and write the adapter file.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help=f"ONNX file to write (with --genai: the directory), missing directories made [default: beside the "
                   f"checkpoint, {EXAMPLE_CHECKPOINT} -> {EXAMPLE_MODEL}, with --adapters-as-inputs "
                   f"{EXAMPLE_ADAPTERS_MODEL}].")
@click.option("--adapter-output", type=click.Path(path_type=Path), default=None,
              help=f"Adapter file to write [default: beside the ONNX output, {EXAMPLE_ADAPTERS_MODEL} -> "
                   f"{default_adapter_path(EXAMPLE_ADAPTERS_MODEL)}].")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (18..23).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim.")
@click.option("--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD, show_default=True,
              help=f"Above this many bytes the fp32 model's weights go to {data_path_of(EXAMPLE_MODEL)}.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), multiple=True,
              help=f"Also write {precision_output_path(EXAMPLE_MODEL, 'int8')} (ONNX Runtime dynamic int8 of the "
                   f"weight MatMuls and embedding) and/or {precision_output_path(EXAMPLE_MODEL, 'int4')} (block-wise "
                   f"weight-only int4 MatMulNBits, for the edge) beside {EXAMPLE_MODEL}; repeatable.")
@click.option("--fp16", is_flag=True,
              help=f"Also write {precision_output_path(EXAMPLE_MODEL, 'fp16')} beside {EXAMPLE_MODEL} (fp16 weights "
                   f"and compute, fp32 I/O; GPU).")
@click.option("--ort-format", is_flag=True,
              help=f"Also write each model in ORT format with its required-operators config for reduced ORT builds: "
                   f"{EXAMPLE_MODEL} -> {' + '.join(p.name for p in ort_format_outputs(EXAMPLE_MODEL))}, "
                   f"{precision_output_path(EXAMPLE_MODEL, 'int8')} -> "
                   f"{' + '.join(p.name for p in ort_format_outputs(precision_output_path(EXAMPLE_MODEL, 'int8')))}.")
@click.option("--genai", is_flag=True,
              help=f"Write an onnxruntime-genai model directory instead: a KV-cache decoder + genai_config.json "
                   f"[-o DIR; default: {EXAMPLE_CHECKPOINT} -> {EXAMPLE_GENAI_DIR}/, "
                   f"{default_genai_dir(EXAMPLE_CHECKPOINT, 'fp32', Form.ADAPTERS)}/ with --adapters-as-inputs, "
                   f"{default_genai_dir(EXAMPLE_CHECKPOINT, 'int8', Form.MERGED)}/ with --quantize int8, ...].")
@click.option("--no-validate", is_flag=True, help="Skip the parity validation after export.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@validation_options
@click.option("--quiet", is_flag=True, help="Only the summary.")
@exit_on_error
def export_command(checkpoint: Path, merge: bool, adapters_as_inputs: bool, output: Path | None,
                   adapter_output: Path | None, opset: int, no_simplify: bool, external_data_threshold: int,
                   quantize: tuple[str, ...], fp16: bool, ort_format: bool, genai: bool, no_validate: bool, force: bool,
                   providers: str | None, atol: float | None, rtol: float | None, json_output: bool,
                   report: Path | None, quiet: bool) -> None:
    """Export CHECKPOINT (.pt or .safetensors) to ONNX, merged (default) or with the adapters as inputs, then
    validate it."""
    if merge and adapters_as_inputs:
        raise click.UsageError("--merge and --adapters-as-inputs exclude each other: choose one form")
    form = Form.of(not adapters_as_inputs)
    if genai:
        given = {"--ort-format": ort_format, "--adapter-output": adapter_output}
        unsupported = [flag for flag, value in given.items() if value]
        if unsupported:
            raise click.UsageError(f"--genai does not take {', '.join(unsupported)} yet")
        if fp16 + len(set(quantize)) > 1:
            raise click.UsageError("--genai writes one decoder: choose one of --fp16, --quantize int8, --quantize int4")
        precision = "fp16" if fp16 else quantize[0] if quantize else "fp32"
        directory = output if output is not None else default_genai_dir(checkpoint, precision, form)
        if not no_validate:
            resolve_tolerance(precision, atol, rtol)
            normalize_providers(providers.split(",") if providers else None)
            check_output_dir(report or default_report_dir(directory), REPORT_FILES.values(), [checkpoint])
        export_decoder(checkpoint, directory, merge=not adapters_as_inputs, precision=precision, opset=opset,
                       progress=progress_printer(quiet))
        click.echo(f"genai model: {directory}/ (run it: lora-export generate {directory} --prompt TEXT)",
                   err=json_output)
        if not no_validate:
            run_validation(directory, checkpoint, None, providers, atol, rtol, report, quiet,
                           json_output=json_output)
        return
    model_path, adapter_path = export_outputs(checkpoint, output, form=form,
                                              adapter_path=adapter_output)
    if not no_validate:  # the validation options, checked before the export rather than after it
        resolve_tolerance("fp32", atol, rtol)
        if providers is not None:
            wanted = normalize_providers(providers.split(","))
            if fp16 and "cuda" not in wanted:
                raise ValueError(f"--fp16 models run on CUDA, but --providers {providers} excludes it")
    wanted_builds = [name for name, wanted_build in (("int8", "int8" in quantize), ("int4", "int4" in quantize),
                                                     ("fp16", fp16)) if wanted_build]
    builds = [model_path] + [precision_output_path(model_path, name) for name in wanted_builds]
    files = model_files(model_path, adapter_path) + [f for build in builds[1:] for f in model_files(build)]
    if ort_format:
        files += [f for build in builds for f in ort_format_outputs(build)]
    check_outputs(files, [checkpoint], overwrite=force)
    if not no_validate:
        check_output_dir(report or default_report_dir(model_path), REPORT_FILES.values(), [checkpoint, *files])
    say = progress_printer(quiet)
    result = export_onnx(checkpoint, model_path, merge=not adapters_as_inputs, adapter_path=adapter_path,
                         opset=opset, simplify_graph=not no_simplify,
                         external_data_threshold=external_data_threshold, progress=say)
    click.echo(result.summary(validation_follows=not no_validate), err=json_output)  # --json: stdout is the verdict
    models = {"fp32": result.model_path}
    builders = {"int8": ("quantizing to int8 (onnxruntime.quantization)", quantize_int8),
                "int4": ("quantizing to int4 (onnxruntime MatMulNBits)", quantize_int4),
                "fp16": ("converting to fp16", convert_fp16)}
    for name in wanted_builds:
        message, build = builders[name]
        say(message)
        models[name] = build(result.model_path)
    ort_models = {}
    if ort_format:
        for precision, path in list(models.items()):
            say(f"converting {path.name} to ORT format")
            ort_path, _config = convert_ort_format(path)
            ort_models[precision] = (ort_path, check_ort_format(path, ort_path))
    for precision, path in models.items():
        if precision != "fp32":
            click.echo(f"{precision + ':':<13}{path} ({path.stat().st_size / 1e6:.2f} MB)", err=json_output)
    for precision, (ort_path, diff) in ort_models.items():
        click.echo(f"{'ORT format:':<13}{ort_path} ({ort_path.stat().st_size / 1e6:.2f} MB), matches its {precision} "
                   f".onnx on ONNX Runtime CPU (max |diff| {diff:.1e})", err=json_output)
    if not no_validate:
        run_validation(result.model_path, checkpoint, result.adapter_path, providers, atol, rtol, report, quiet,
                       precision_models=models if len(models) > 1 else None, json_output=json_output)


@export_cli.command("adapter")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="The adapters-as-inputs model (.onnx) the adapter is for.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help=f"Adapter file [default: beside the checkpoint, other.pt -> {default_adapter_path('other.pt')}].")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@exit_on_error
def adapter_command(checkpoint: Path, model_path: Path, output: Path | None, force: bool) -> None:
    """Write only the adapter of CHECKPOINT, which must share the model's base weights."""
    adapter_path = output or default_adapter_path(checkpoint)
    check_output_path(adapter_path, ".onnx_adapter")
    check_outputs(model_files(adapter_path=adapter_path), [], overwrite=force)
    path = export_adapter(checkpoint, model_path, output)
    click.echo(f"wrote {path}")


@export_cli.command("from-peft")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "base_checkpoint", type=click.Path(path_type=Path), required=True,
              help="The lora-export base checkpoint the PEFT adapter was trained on.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Checkpoint to write: .pt or .safetensors.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@exit_on_error
def from_peft_command(adapter_dir: Path, base_checkpoint: Path, output: Path, force: bool) -> None:
    """Import a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) trained on a
    lora-export base into a lora-export checkpoint, which every other command then takes."""
    check_training_output(output, [base_checkpoint, adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE], force)
    from_peft(adapter_dir, base_checkpoint, output)
    click.echo(f"wrote {output}")


@export_cli.command("to-peft")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), required=True,
              help=f"PEFT adapter directory to write, new or empty ({CONFIG_FILE} + {WEIGHTS_FILE}).")
@click.option("--force", is_flag=True,
              help=f"Write into a directory that is not empty, replacing its {CONFIG_FILE} and {WEIGHTS_FILE} "
                   f"together (its other files stay).")
@exit_on_error
def to_peft_command(checkpoint: Path, output_dir: Path, force: bool) -> None:
    """Write the LoRA of CHECKPOINT as a PEFT adapter directory that PeftModel.from_pretrained loads onto the
    lora-export base model."""
    to_peft(checkpoint, output_dir, overwrite=force)
    click.echo(f"wrote {output_dir}/ ({CONFIG_FILE}, {WEIGHTS_FILE})")


@export_cli.command("compare-reports")
@click.argument("before", type=click.Path(path_type=Path))
@click.argument("after", type=click.Path(path_type=Path))
@click.option("--json", "json_output", is_flag=True, help="Print the comparison as JSON on stdout.")
@exit_on_error
def compare_reports_command(before: Path, after: Path, json_output: bool) -> None:
    """Show what changed between two parity reports (parity.json files or report directories): verdict, errors
    per case, latency per backend."""
    diff = compare_reports(load_report(before), load_report(after))
    click.echo(json.dumps(diff, indent=2) if json_output else "\n".join(render_comparison(diff)))


@export_cli.command("check")
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@exit_on_error
def check_command(model_path: Path, adapter: Path) -> None:
    """Hold ADAPTER (.onnx_adapter) against MODEL's inputs; exit 1 naming every mismatch."""
    errors, notes = check_adapter_file(model_path, adapter)
    for note in notes:
        click.echo(f"note: {note}")
    for error in errors:
        click.echo(f"mismatch: {error}")
    if errors:
        raise SystemExit(EXIT_PARITY_FAILED)
    click.echo(f"ok: {adapter} fits {model_path}")


@export_cli.command("validate")
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="The source checkpoint (.pt or .safetensors).")
@click.option("--adapter", type=click.Path(path_type=Path), default=None,
              help="Also validate with this .onnx_adapter active (adapters-as-inputs models); it must hold the "
                   "checkpoint's trained LoRA.")
@data_option("Your text files or directories for the real-text cases and the generation prompt, instead of the "
             "built-in held-out prose: several after one --data (--data a.txt corpus/), or --data repeated.")
@validation_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@exit_on_error
def validate_command(model_path: Path, checkpoint: Path, adapter: Path | None, data: tuple[Path, ...],
                     providers: str | None, atol: float | None, rtol: float | None, json_output: bool,
                     report: Path | None, quiet: bool) -> None:
    """Compare MODEL (.onnx) on ONNX Runtime with its PyTorch CHECKPOINT; exit 0 pass, 1 fail, 2 bad input."""
    run_validation(model_path, checkpoint, adapter, providers, atol, rtol, report, quiet, data=data,
                   json_output=json_output)


@export_cli.command("generate")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue (UTF-8 bytes).")
@click.option("--adapter", "adapters", type=click.Path(path_type=Path), multiple=True,
              help="Generate with this .onnx_adapter active (repeatable: one run per adapter).")
@click.option("--max-new-bytes", type=int, default=64, show_default=True, help="Bytes to generate.")
@click.option("--greedy/--sample", default=True, show_default=True, help="Argmax, or sample (--temperature, --top-k).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest bytes (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--stop-byte", type=click.IntRange(0, 255), default=None,
              help="Stop after generating this byte (0..255).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="Execution provider.")
@exit_on_error
def generate_command(model_dir: Path, prompt: str, adapters: tuple[Path, ...], max_new_bytes: int, greedy: bool,
                     temperature: float, top_k: int, seed: int, stop_byte: int | None, device: str) -> None:
    """Stream bytes generated by onnxruntime-genai from MODEL_DIR (written by `lora-export --genai`) to stdout."""
    sampling = Sampling(greedy, temperature, top_k, seed)
    data = prompt.encode()
    runs: list[Path | None] = list(adapters) or [None]
    for adapter in runs:  # every run is checked before the first byte is written
        check_generation(model_dir, data, max_new_bytes, adapter, device, sampling)
    for adapter in runs:
        if len(runs) > 1:
            click.echo(f"[adapter {adapter}]", err=True)
        out = click.get_binary_stream("stdout")
        out.write(data)
        for byte in generate_bytes(model_dir, data, max_new_bytes=max_new_bytes, adapter=adapter, device=device,
                                   sampling=sampling, stop_byte=stop_byte):
            out.write(bytes([byte]))
            out.flush()
        out.write(b"\n")
        out.flush()
