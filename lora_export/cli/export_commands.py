"""``lora-export [export|adapter|check|validate|generate|from-peft|to-peft|compare-reports]``: export and validate
(``lora_export.pipeline``), adapters, PEFT in and out, generation, report comparison."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .. import __version__
from ..errors import EXIT_BAD_INPUT, EXIT_PARITY_FAILED
from ..export.adapters import base_layers_note, read_adapter
from ..export.convert import check_adapter_file, export_adapter
from ..export.core import MAX_OPSET, MIN_OPSET
from ..export.memory import Plan, check_memory
from ..export.onnx_files import EXTERNAL_DATA_THRESHOLD, load_onnx, model_file_size, size_text
from ..export.peft import from_peft, to_peft
from ..export.slots import BASE_SLOT, pack_adapters, read_pack
from ..export.tracing import DEFAULT_OPSET
from ..genai.batch import generate_batch, pair_rows
from ..genai.decoder import read_decoder_dir
from ..genai.generate import DEVICES, Sampling, check_generation, generate_bytes
from ..layout import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Form,
    data_path_of,
    default_adapter_path,
    default_genai_dir,
    default_output_path,
    default_report_dir,
    ort_format_outputs,
    precision_output_path,
)
from ..parity.results import ParityResult
from ..pipeline import EXPORTED, ExportRun, ValidationOptions, export_pipeline, genai_problem
from ..progress import SILENT, ConsoleProgress, Progress
from ..report.compare import compare_reports, load_report, render_comparison
from .options import (
    FORCE_HELP,
    HELP_OPTIONS,
    CommandT,
    data_option,
    exit_on_error,
    memory_check_option,
)


class DefaultCommandGroup(click.Group):
    """A group that runs its ``export`` command when the first argument is not a command name.

    So ``lora-export model.pt --merge`` is ``lora-export export model.pt --merge``, while
    ``lora-export validate ...`` and the other commands work as usual and ``--help`` lists them all.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)




def progress_printer(quiet: bool) -> Progress:
    """Stage messages on stderr (so stdout holds only the summary); silent with --quiet."""
    return SILENT if quiet else ConsoleProgress("lora-export")


def validation_from(providers: str | None, atol: float | None, rtol: float | None, report: Path | None,
                    quiet: bool, json_output: bool, data: tuple[Path, ...] = ()) -> ValidationOptions:
    """The validation options of the command line: ``--providers`` given is explicit (a provider that cannot run is
    an error); the progress bar only without --quiet and --json."""
    return ValidationOptions(report, providers.split(",") if providers else None, providers is not None, atol, rtol,
                             progress=not quiet and not json_output, data=data)


def print_verdict(result: ParityResult, seconds: float, json_output: bool) -> None:
    """Print the summary and the report (or with ``json_output`` one JSON verdict object) and exit 0 (pass),
    1 (parity failure) or 2 (no provider could run it)."""
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
        click.echo(f"report: {result.report_files['html']} (validation {seconds:.1f} s)")
    if result.status == "not run":  # no provider could run the model: nothing was checked
        click.echo(f"error: no execution provider here can run this {result.precision} model", err=True)
        raise SystemExit(EXIT_BAD_INPUT)
    if not result.passed:
        raise SystemExit(EXIT_PARITY_FAILED)


def show_step(step: str, run: ExportRun, *, validation_follows: bool, json_output: bool) -> None:
    """Print what an export step wrote (``pipeline.export_pipeline``'s ``on_step``); on stderr with --json, whose
    stdout is the verdict alone."""
    if run.genai_dir is not None:
        click.echo(f"genai model: {run.genai_dir}/ (run it: lora-export generate {run.genai_dir} --prompt TEXT)",
                   err=json_output)
    elif step == EXPORTED:
        click.echo(run.export.summary(validation_follows=validation_follows), err=json_output)
    else:
        for precision, path in run.models.items():
            if precision != "fp32":
                click.echo(f"{precision + ':':<13}{path} ({size_text(model_file_size(path))})", err=json_output)
        for precision, (ort_path, diff) in run.ort_models.items():
            click.echo(f"{'ORT format:':<13}{ort_path} ({ort_path.stat().st_size / 1e6:.2f} MB), matches its "
                       f"{precision} .onnx on ONNX Runtime CPU (max |diff| {diff:.1e})", err=json_output)


#: The names the help texts use to show each default output, computed by the functions that compute the real ones.
EXAMPLE_CHECKPOINT = Path("model.pt")
EXAMPLE_MODEL = default_output_path(EXAMPLE_CHECKPOINT)
EXAMPLE_ADAPTERS_MODEL = default_output_path(EXAMPLE_CHECKPOINT, Form.ADAPTERS)
EXAMPLE_SLOTS_MODEL = default_output_path(EXAMPLE_CHECKPOINT, Form.SLOTS)


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
    lora-export model.pt --adapter-slots       each batch row its own adapter -> model.slots.onnx
    lora-export pack-adapters A B -o P         stack adapter files into the slots of one pack
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
@click.option("--adapter-slots", is_flag=True,
              help=f"Write the adapter-slots graph ({EXAMPLE_CHECKPOINT} -> {EXAMPLE_SLOTS_MODEL}): every LoRA A/B "
                   "input stacked in slots plus adapter_ids [batch], so each batch row runs its own adapter in one "
                   "run (lora-export pack-adapters stacks adapter files into slots; slot 0 is the base). Writes the "
                   "trained adapter as --adapters-as-inputs does.")
@click.option("--lora-layers", "lora_layers", multiple=True, metavar="all|TARGETS|CKPT",
              help="With --adapters-as-inputs or --adapter-slots: LoRA inputs also on these layers, so one graph "
                   "takes adapters whose targets differ (a layer an adapter leaves out runs as the base): 'all' "
                   "(every adaptable layer), targets (groups q,k,v,o,ff,emb, module names, paths or patterns such "
                   "as fc1, blocks.0.attn.to_q, blocks.*.ff.fc1) or checkpoints on the same base (their LoRA "
                   "layers). Comma-separated and/or repeated; the checkpoint's own LoRA layers are always in.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help=f"ONNX file to write (with --genai: the directory), missing directories made [default: beside the "
                   f"checkpoint, {EXAMPLE_CHECKPOINT} -> {EXAMPLE_MODEL}, with --adapters-as-inputs "
                   f"{EXAMPLE_ADAPTERS_MODEL}].")
@click.option("--adapter-output", type=click.Path(path_type=Path), default=None,
              help=f"Adapter file to write [default: beside the ONNX output, {EXAMPLE_ADAPTERS_MODEL} -> "
                   f"{default_adapter_path(EXAMPLE_ADAPTERS_MODEL)}].")
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=DEFAULT_OPSET, show_default=True,
              help=f"ONNX opset ({MIN_OPSET}..{MAX_OPSET}).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim.")
@click.option("--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD, show_default=True,
              help=f"Above this many bytes the fp32 model's weights go to {data_path_of(EXAMPLE_MODEL)}.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), multiple=True,
              help=f"Also write {precision_output_path(EXAMPLE_MODEL, 'int8')} (ONNX Runtime dynamic int8 of the "
                   f"weight MatMuls and embedding) and/or {precision_output_path(EXAMPLE_MODEL, 'int4')} (block-wise "
                   f"weight-only int4 MatMulNBits, for the edge) beside {EXAMPLE_MODEL}; repeatable.")
@click.option("--fp16", is_flag=True,
              help=f"Also write {precision_output_path(EXAMPLE_MODEL, 'fp16')} beside {EXAMPLE_MODEL} (fp16 weights "
                   f"and compute, fp32 I/O; meant for GPUs, validated on every provider that runs it).")
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
@memory_check_option
@exit_on_error
def export_command(checkpoint: Path, merge: bool, adapters_as_inputs: bool, adapter_slots: bool,
                   lora_layers: tuple[str, ...], output: Path | None, adapter_output: Path | None, opset: int,
                   no_simplify: bool, external_data_threshold: int, quantize: tuple[str, ...], fp16: bool,
                   ort_format: bool, genai: bool, no_validate: bool, force: bool, providers: str | None,
                   atol: float | None, rtol: float | None, json_output: bool, report: Path | None, quiet: bool,
                   no_memory_check: bool) -> None:
    """Export CHECKPOINT (.pt or .safetensors) to ONNX, merged (default), with the adapters as inputs or in adapter
    slots, then validate it."""
    form = _form(merge, adapters_as_inputs, adapter_slots)
    layers = [entry.strip() for value in lora_layers for entry in value.split(",")]
    if lora_layers and (form is Form.MERGED or not all(layers)):
        raise click.UsageError("--lora-layers takes non-empty entries and needs --adapters-as-inputs or "
                               "--adapter-slots")
    problem = genai_problem(quantize, fp16, ort_format, adapter_output, layers) if genai else None
    if form is Form.SLOTS and (quantize or fp16 or ort_format):
        problem = "--adapter-slots does not take --quantize, --fp16 or --ort-format yet"
    if problem:
        raise click.UsageError(problem)
    validation = None if no_validate else validation_from(providers, atol, rtol, report, quiet, json_output)
    run = export_pipeline(
        checkpoint, output, form=form, lora_layers=layers, adapter_output=adapter_output, opset=opset,
        simplify_graph=not no_simplify, external_data_threshold=external_data_threshold, quantize=quantize,
        fp16=fp16, ort_format=ort_format, genai=genai, validation=validation, overwrite=force,
        progress=progress_printer(quiet), memory_check=not no_memory_check,
        on_step=lambda step, run: show_step(step, run, validation_follows=not no_validate, json_output=json_output))
    if run.parity is not None:
        print_verdict(run.parity, run.validation_seconds, json_output)


def _form(merge: bool, adapters_as_inputs: bool, adapter_slots: bool) -> Form:
    """The form the export flags choose (merged when none); a UsageError when more than one is given."""
    chosen = [flag for flag, given in (("--merge", merge), ("--adapters-as-inputs", adapters_as_inputs),
                                       ("--adapter-slots", adapter_slots)) if given]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} exclude each other: choose one form")
    return Form.SLOTS if adapter_slots else Form.of(not adapters_as_inputs)


@export_cli.command("adapter")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="The adapters-as-inputs model (.onnx) the adapter is for.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help=f"Adapter file [default: beside the checkpoint, other.pt -> {default_adapter_path('other.pt')}].")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@exit_on_error
def adapter_command(checkpoint: Path, model_path: Path, output: Path | None, force: bool) -> None:
    """Write only the adapter of CHECKPOINT, which must share the model's base weights; its LoRA layers must be
    among the model's LoRA inputs (the others run as the base)."""
    path = export_adapter(checkpoint, model_path, output, overwrite=force)
    click.echo(f"wrote {path}")
    note = base_layers_note(load_onnx(model_path), read_adapter(path)[0])
    if note:
        click.echo(f"note: {note}")


@export_cli.command("pack-adapters")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Pack to write (.onnx_adapter, with its integrity record <pack>.json naming the slots).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="The adapter-slots model (lora-export --adapter-slots) the pack is for: every adapter is held "
                   "against its base and LoRA inputs first.")
@click.option("--name", "names", multiple=True,
              help="Slot names, one per adapter in order (repeat --name) [default: each file's name without "
                   ".onnx_adapter].")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@exit_on_error
def pack_adapters_command(adapters: tuple[Path, ...], output: Path, model_path: Path | None, names: tuple[str, ...],
                          force: bool) -> None:
    """Stack ADAPTERS (.onnx_adapter files of one base) into the slots of an adapter-slots graph: slot 0 is the
    base, slot i the i-th adapter; smaller ranks are zero-padded (exact). Each batch row then picks its slot
    through adapter_ids."""
    pack = read_pack(pack_adapters(adapters, output, names or None, model=model_path, overwrite=force))
    click.echo(f"wrote {output} ({pack.size} slots: "
               + ", ".join(f"{slot} {name}" for slot, name in enumerate(pack.names)) + ")")


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
    from_peft(adapter_dir, base_checkpoint, output, overwrite=force)
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
                   "checkpoint's trained LoRA. For an adapter-slots model: that adapter in slot 1 of the 'mixed "
                   "batch' variant, or a pack (lora-export pack-adapters) whose slots it runs.")
@data_option("Your text files or directories for the real-text cases and the generation prompt, instead of the "
             "built-in held-out prose: several after one --data (--data a.txt corpus/), or --data repeated.")
@validation_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@memory_check_option
@exit_on_error
def validate_command(model_path: Path, checkpoint: Path, adapter: Path | None, data: tuple[Path, ...],
                     providers: str | None, atol: float | None, rtol: float | None, json_output: bool,
                     report: Path | None, quiet: bool, no_memory_check: bool) -> None:
    """Compare MODEL (.onnx) on ONNX Runtime with its PyTorch CHECKPOINT; exit 0 pass, 1 fail, 2 bad input."""
    if not no_memory_check:  # the model's form is known once it is read: the costlier one is assumed
        check_memory(checkpoint, Plan(Form.ADAPTERS, genai=model_path.is_dir(), export=False))
    started = time.perf_counter()
    result = validation_from(providers, atol, rtol, report, quiet, json_output, data).run(model_path, checkpoint,
                                                                                         adapter)
    print_verdict(result, time.perf_counter() - started, json_output)


@export_cli.command("generate")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", required=True, multiple=True,
              help="Text to continue (UTF-8 bytes); repeatable: one row per --prompt / --adapter pair.")
@click.option("--adapter", "adapters", type=click.Path(path_type=Path), multiple=True,
              help="Generate with this .onnx_adapter active (repeatable: one row per adapter, or per --prompt; "
                   "'base': none; with --pack a slot name).")
@click.option("--pack", type=click.Path(path_type=Path), default=None,
              help="An adapter pack (lora-export pack-adapters) whose slots --adapter names (adapter-slots decoder).")
@click.option("--max-new-bytes", type=int, default=64, show_default=True, help="Bytes to generate.")
@click.option("--greedy/--sample", default=True, show_default=True, help="Argmax, or sample (--temperature, --top-k).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest bytes (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--stop-byte", type=click.IntRange(0, 255), default=None,
              help="Stop after generating this byte (0..255).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="Execution provider.")
@exit_on_error
def generate_command(model_dir: Path, prompts: tuple[str, ...], adapters: tuple[Path, ...], pack: Path | None,
                     max_new_bytes: int, greedy: bool, temperature: float, top_k: int, seed: int,
                     stop_byte: int | None, device: str) -> None:
    """Generate bytes from MODEL_DIR (written by `lora-export --genai`) to stdout: streamed through onnxruntime-genai
    one row at a time, or every row in one batch with an adapter-slots decoder (each row its own adapter)."""
    sampling = Sampling(greedy, temperature, top_k, seed)
    rows = pair_rows([prompt.encode() for prompt in prompts],
                     [None if str(adapter) == BASE_SLOT else adapter for adapter in adapters])
    out = click.get_binary_stream("stdout")
    if pack is not None or read_decoder_dir(model_dir).metadata.get("form") == Form.SLOTS:
        named = [adapter if pack is None or adapter is None else str(adapter) for _, adapter in rows]
        outputs = generate_batch(model_dir, [data for data, _ in rows], named, pack=pack,
                                 max_new_bytes=max_new_bytes, sampling=sampling, device=device, stop_byte=stop_byte)
        for index, ((data, adapter), generated) in enumerate(zip(rows, outputs, strict=True)):
            if len(rows) > 1:
                click.echo(f"[row {index}: adapter {adapter or BASE_SLOT}]", err=True)
            out.write(data + generated + b"\n")
        out.flush()
        return
    for data, adapter in rows:  # every run is checked before the first byte is written
        check_generation(model_dir, data, max_new_bytes, adapter, device, sampling)
    for data, adapter in rows:
        if len(rows) > 1:
            click.echo(f"[adapter {adapter or BASE_SLOT}]", err=True)
        out.write(data)
        for byte in generate_bytes(model_dir, data, max_new_bytes=max_new_bytes, adapter=adapter, device=device,
                                   sampling=sampling, stop_byte=stop_byte):
            out.write(bytes([byte]))
            out.flush()
        out.write(b"\n")
        out.flush()
