"""lora-export's pipelines as one call each, for Python as for the command line (which only parses and prints):

* ``validate_and_report``: ``parity.validate.validate`` and the parity reports of its result (parity.json / .md /
  .html, ``report.render.write_reports``); ``lora-export validate``.
* ``export_pipeline``: export a checkpoint (the scoring graph, or with ``genai`` a decoder directory), build its
  int8 / int4 / fp16 models and ORT-format files, validate it and write the reports; ``lora-export model.pt``.

Every output and option is checked before any work starts, so a bad one costs no export.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExportError, ParityInputError
from .export.convert import ExportResult, export_onnx, export_outputs
from .export.memory import Plan, check_memory
from .export.onnx_files import EXTERNAL_DATA_THRESHOLD
from .export.ort_session import release_memory
from .export.quantize import convert_fp16, convert_ort_format, quantize_int4, quantize_int8
from .export.tracing import DEFAULT_OPSET
from .files import check_output_dir, check_outputs
from .genai.decoder import export_decoder
from .layout import (
    REPORT_FILES,
    Form,
    default_genai_dir,
    default_report_dir,
    model_files,
    ort_format_outputs,
    precision_output_path,
)
from .parity.metrics import resolve_tolerance
from .parity.precisions import check_ort_format
from .parity.results import ParityResult
from .parity.sessions import normalize_providers
from .parity.subject import validation_inputs
from .parity.validate import validate
from .progress import SILENT, Progress
from .report.render import write_reports

#: The reduced-precision builds of a scoring graph, in the order they are built: (precision, stage message, builder).
BUILDERS = (("int8", "quantizing to int8 (onnxruntime.quantization)", quantize_int8),
            ("int4", "quantizing to int4 (onnxruntime MatMulNBits)", quantize_int4),
            ("fp16", "converting to fp16", convert_fp16))
#: The steps after which ``export_pipeline`` calls ``on_step``.
EXPORTED, BUILT = "exported", "built"


def check_report_dir(report_dir: str | os.PathLike | None, model_path: str | os.PathLike,
                     inputs: Sequence[str | os.PathLike]) -> Path:
    """The report directory (default ``<model stem>_parity/`` beside the model), refused (OutputError) before any
    work when it cannot be made or written or its files would replace one of ``inputs``."""
    directory = Path(report_dir) if report_dir is not None else default_report_dir(Path(model_path))
    check_output_dir(directory, REPORT_FILES.values(), inputs)
    return directory


def validate_and_report(model_path: str | os.PathLike, checkpoint_path: str | os.PathLike, *,
                        report_dir: str | os.PathLike | None = None, **validate_kwargs: Any) -> ParityResult:
    """``validate(model_path, checkpoint_path, **validate_kwargs)`` and its reports, written into ``report_dir``
    (default ``<model stem>_parity/`` beside the model, made if missing; all three files or none).

    The report directory is checked before the validation starts: it must be writable and its files must not
    replace a file the validation reads (``parity.subject.validation_inputs``). Returns the ParityResult with
    ``report_dir`` and ``report_files`` filled in; raises a LoraExportError (one line) as validate() does.
    """
    inputs = validation_inputs(model_path, checkpoint_path, validate_kwargs.get("adapter_path"),
                               validate_kwargs.get("data", ()))
    directory = check_report_dir(report_dir, model_path, inputs)
    result = validate(model_path, checkpoint_path, **validate_kwargs)
    try:
        result.report_files = write_reports(result, directory)
    except OSError as err:  # the disk filled up or the directory went away during the validation
        raise ParityInputError(f"{directory}: cannot write the report: {err.strerror or err}") from None
    result.report_dir = directory
    return result


@dataclass
class ValidationOptions:
    """How a model is validated (``run``; ``export_pipeline``: what it wrote): validate()'s options and the
    report directory."""

    report_dir: str | os.PathLike | None = None
    providers: Sequence[str] | None = None
    explicit_providers: bool = False
    atol: float | None = None
    rtol: float | None = None
    progress: Progress | bool = False  # of the validation: validate()'s progress
    data: Sequence[str | os.PathLike] = ()  # validate()'s data: the user's text for the cases and the prompt

    def check(self, precision: str) -> None:
        """Refuse bad options before the export: the tolerance of ``precision`` and the providers."""
        resolve_tolerance(precision, self.atol, self.rtol)
        normalize_providers(self.providers)

    def run(self, model_path: Path, checkpoint: Path, adapter_path: Path | None = None,
            precision_models: dict[str, Path] | None = None) -> ParityResult:
        """``validate_and_report`` with these options."""
        return validate_and_report(model_path, checkpoint, report_dir=self.report_dir, adapter_path=adapter_path,
                                   providers=self.providers, explicit_providers=self.explicit_providers,
                                   atol=self.atol, rtol=self.rtol, progress=self.progress,
                                   precision_models=precision_models, data=self.data)


@dataclass
class ExportRun:
    """What ``export_pipeline`` wrote and measured."""

    export: ExportResult | None = None  # the scoring graph's export; None for a genai decoder directory
    genai_dir: Path | None = None  # the genai decoder directory; None for a scoring graph
    models: dict[str, Path] = field(default_factory=dict)  # precision -> .onnx of each build (fp32: the export)
    ort_models: dict[str, tuple[Path, float]] = field(default_factory=dict)  # precision -> (.ort, max |diff| on CPU)
    parity: ParityResult | None = None  # None when not validated
    validation_seconds: float | None = None


def genai_problem(quantize: Sequence[str], fp16: bool, ort_format: bool, adapter_output: object,
                  lora_layers: Sequence[object] = ()) -> str | None:
    """Why these options cannot make one genai decoder directory, or None."""
    unsupported = [flag for flag, value in (("--ort-format", ort_format), ("--adapter-output", adapter_output),
                                            ("--lora-layers", lora_layers)) if value]
    if unsupported:
        return f"--genai does not take {', '.join(unsupported)} yet"
    if fp16 + len(set(quantize)) > 1:
        return "--genai writes one decoder: choose one of --fp16, --quantize int8, --quantize int4"
    return None


def _validated(run: ExportRun, validation: ValidationOptions | None, model_path: Path, checkpoint: Path,
               adapter_path: Path | None = None) -> ExportRun:
    """``run`` with the validation of ``model_path`` and its time, when there is one."""
    if validation is not None:
        release_memory()  # the export's model (reference cycles) is gone before the validation builds its own
        started = time.perf_counter()
        run.parity = validation.run(model_path, checkpoint, adapter_path,
                                    run.models if len(run.models) > 1 else None)
        run.validation_seconds = time.perf_counter() - started
    return run


def _export_genai(checkpoint: Path, output: str | os.PathLike | None, form: Form, precision: str, opset: int,
                  external_data_threshold: int, validation: ValidationOptions | None, progress: Progress,
                  on_step: Callable[[str, ExportRun], None], memory_check: bool) -> ExportRun:
    """The genai branch of ``export_pipeline``: one decoder directory, then its decode parity."""
    directory = Path(output) if output is not None else default_genai_dir(checkpoint, precision, form)
    if validation is not None:
        validation.check(precision)
        check_report_dir(validation.report_dir, directory, [checkpoint])
    if memory_check:
        check_memory(checkpoint, Plan(form, genai=True, builds=() if precision == "fp32" else (precision,),
                                      validate=validation is not None))
    run = ExportRun(genai_dir=export_decoder(checkpoint, directory, form=form, precision=precision,
                                             opset=opset, external_data_threshold=external_data_threshold,
                                             progress=progress))
    on_step(EXPORTED, run)
    return _validated(run, validation, directory, checkpoint)


def _check_scoring_outputs(checkpoint: Path, model_path: Path, adapter_path: Path | None, builds: list[str],
                           ort_format: bool, overwrite: bool, validation: ValidationOptions | None) -> None:
    """Refuse, before the export, a build output or report directory that cannot be written or would replace an
    input or another output (the export's own files are checked by ``export_onnx``), and validation options the
    fp32 model cannot take."""
    if validation is not None:
        validation.check("fp32")
    exported = model_files(model_path, adapter_path)
    models = [model_path] + [precision_output_path(model_path, name) for name in builds]
    built = [f for model in models[1:] for f in model_files(model)]
    if ort_format:
        built += [f for model in models for f in ort_format_outputs(model)]
    check_outputs(built, [checkpoint, *exported], overwrite=overwrite)
    if validation is not None:
        check_report_dir(validation.report_dir, model_path, [checkpoint, *exported, *built])


def _build(run: ExportRun, builds: list[str], ort_format: bool, external_data_threshold: int,
           progress: Progress) -> None:
    """The reduced-precision builds of the exported model (the file way above ``external_data_threshold``, as the
    export), then (``ort_format``) each model in ORT format, checked against its .onnx on ONNX Runtime CPU."""
    release_memory()  # the export's model, held by reference cycles until a collection, is not built on
    for precision, message, builder in BUILDERS:
        if precision in builds:
            progress.stage(message)
            run.models[precision] = builder(run.export.model_path, external_data_threshold=external_data_threshold)
    for precision, path in list(run.models.items()) if ort_format else []:
        progress.stage(f"converting {path.name} to ORT format")
        ort_path, _config = convert_ort_format(path)
        run.ort_models[precision] = (ort_path, check_ort_format(path, ort_path))


def export_pipeline(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    form: Form = Form.MERGED,
    lora_layers: Sequence[str | os.PathLike] = (),
    adapter_output: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    simplify_graph: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    quantize: Sequence[str] = (),
    fp16: bool = False,
    ort_format: bool = False,
    genai: bool = False,
    validation: ValidationOptions | None = None,
    overwrite: bool = False,
    progress: Progress = SILENT,
    on_step: Callable[[str, ExportRun], None] | None = None,
    memory_check: bool = True,
) -> ExportRun:
    """Export CHECKPOINT and validate it, as ``lora-export CHECKPOINT`` does.

    The scoring graph in ``form`` (``export_onnx``: ``lora_layers``, ``output``, ``adapter_output``, ``opset``,
    ``simplify_graph``, ``external_data_threshold``), then its builds (``quantize``: 'int8' / 'int4'; ``fp16``)
    beside it, then with ``ort_format`` each model in ORT format. With ``genai``: a decoder directory instead
    (``export_decoder``; one precision: fp32, or the one of ``quantize`` / ``fp16``; no ORT format, no separate
    adapter output, no ``lora_layers``). With ``validation`` (None: none) the model is validated and the reports
    written (``validate_and_report``; the builds go into its precision table). An existing output is replaced
    only with ``overwrite``.

    ``progress`` gets the stage lines; ``on_step(step, run)`` is called when files have landed, before the
    validation: ``EXPORTED`` after the export, ``BUILT`` after the builds (scoring graph only). Returns the
    ExportRun; raises a LoraExportError (one line) for bad input, before any work where it can be known then.
    With ``memory_check`` (the default) a run whose estimated peak memory is above what this process may use is
    refused before any work (``memory.check_memory``: MemoryLimitError); False goes ahead anyway.
    """
    checkpoint, on_step = Path(checkpoint), on_step or (lambda _step, _run: None)
    if genai:
        problem = genai_problem(quantize, fp16, ort_format, adapter_output, lora_layers)
        if problem:
            raise ExportError(problem)
        precision = "fp16" if fp16 else quantize[0] if quantize else "fp32"
        return _export_genai(checkpoint, output, form, precision, opset, external_data_threshold, validation,
                             progress, on_step, memory_check)
    model_path, adapter_path = export_outputs(checkpoint, output, form=form, adapter_path=adapter_output)
    builds = [precision for precision, _message, _builder in BUILDERS
              if precision in quantize or (precision == "fp16" and fp16)]
    _check_scoring_outputs(checkpoint, model_path, adapter_path, builds, ort_format, overwrite, validation)
    if memory_check:
        plan = Plan(form, simplify=simplify_graph, builds=tuple(builds), ort_format=ort_format,
                    validate=validation is not None)
        check_memory(checkpoint, plan, external_data_threshold=external_data_threshold)
    result = export_onnx(checkpoint, model_path, form=form, lora_layers=lora_layers, adapter_path=adapter_path,
                         opset=opset, simplify_graph=simplify_graph, external_data_threshold=external_data_threshold,
                         progress=progress, overwrite=overwrite)
    run = ExportRun(export=result, models={"fp32": result.model_path})
    on_step(EXPORTED, run)
    _build(run, builds, ort_format, external_data_threshold, progress)
    on_step(BUILT, run)
    return _validated(run, validation, result.model_path, checkpoint, result.adapter_path)
