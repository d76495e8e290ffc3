"""Where lora-export writes: the two forms of an export and every default output name, in one place.

``model.pt`` exports to ``model.onnx`` (merged) or ``model.adapters.onnx`` + ``model.adapters.onnx_adapter``
(adapters as inputs); builds add their precision (``model.int8.onnx``), genai directories their precision and
form (``model_genai_int8_adapters/``), and each model gets its own report directory (``model_parity/``).
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

REPORT_FILES = {"json": "parity.json", "markdown": "parity.md", "html": "parity.html"}
#: A PEFT adapter directory.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: An onnxruntime-genai directory.
GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
ADAPTER_FILE = "model.onnx_adapter"
#: Its byte-level tokenizer (``genai.tokenizer``): what ``og.Tokenizer`` and Hugging Face tokenizers read.
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class Form(str, enum.Enum):
    """The forms of an export: LoRA folded into the base weights, LoRA A/B kept as graph inputs (one adapter per
    run), or stacked slots of A/B plus ``adapter_ids`` (each batch row its own adapter).

    A str enum: its value is what the graph's ``lora_export.form`` metadata and the reports hold.
    """

    MERGED = "merged"
    ADAPTERS = "adapters"
    SLOTS = "slots"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, merge: bool) -> Form:
        """The form of the public ``merge`` keyword (PEFT's word): True merged, False adapters as inputs."""
        return cls.MERGED if merge else cls.ADAPTERS

    @property
    def title(self) -> str:
        """The form as the command line names it, with its flag."""
        return {Form.MERGED: "merged (--merge)", Form.ADAPTERS: "adapters-as-inputs (--adapters-as-inputs)",
                Form.SLOTS: "adapter slots (--adapter-slots)"}[self]


def data_path_of(path: Path) -> Path:
    """The external-data file of a model: ``<name>.data`` beside it."""
    return path.with_name(path.name + ".data")


def default_output_path(checkpoint_path: str | os.PathLike, form: Form = Form.MERGED) -> Path:
    """``model.pt`` -> ``model.onnx`` (merged), ``model.adapters.onnx`` (adapters as inputs) or ``model.slots.onnx``
    (adapter slots) beside it: the forms of one checkpoint never share a default file (nor, through it, a report
    directory)."""
    return Path(checkpoint_path).with_suffix({Form.MERGED: ".onnx", Form.ADAPTERS: ".adapters.onnx",
                                              Form.SLOTS: ".slots.onnx"}[form])


def default_adapter_path(path: str | os.PathLike) -> Path:
    """The default adapter file of a model or checkpoint: ``model.adapters.onnx`` -> ``model.adapters.onnx_adapter``,
    ``other.pt`` -> ``other.onnx_adapter``."""
    return Path(path).with_suffix(".onnx_adapter")


def adapter_record_path(path: str | os.PathLike) -> Path:
    """The integrity record beside an adapter file: ``<adapter>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def model_files(model_path: Path | None = None, adapter_path: Path | None = None) -> list[Path]:
    """Every file a model and an adapter written by lora-export occupy: model, external data, adapter, its
    integrity record."""
    files = [] if model_path is None else [model_path, data_path_of(model_path)]
    return files + ([] if adapter_path is None else [adapter_path, adapter_record_path(adapter_path)])


def precision_output_path(model_path: Path, precision: str) -> Path:
    """The default output of an edge build: ``<stem>.<precision>.onnx`` beside the model."""
    return model_path.with_suffix(f".{precision}.onnx")


def ort_format_outputs(model_path: Path, output_dir: Path | None = None) -> tuple[Path, Path]:
    """(``<stem>.ort``, ``<stem>.required_operators.config``) that ``convert_ort_format`` writes."""
    directory = output_dir if output_dir is not None else model_path.parent
    return directory / model_path.with_suffix(".ort").name, directory / f"{model_path.stem}.required_operators.config"


def default_report_dir(model_path: Path) -> Path:
    """``<model stem>_parity/`` beside the model."""
    return model_path.with_name(f"{model_path.stem}_parity")


def default_genai_dir(checkpoint: Path, precision: str, form: Form) -> Path:
    """``model.pt`` -> ``model_genai``, ``model_genai_int8``, ``model_genai_adapters``, ``model_genai_fp16_adapters``
    ...: the precision and the form in the name, so no two default builds share a directory."""
    suffix = ("" if precision == "fp32" else f"_{precision}") + {Form.MERGED: "", Form.ADAPTERS: "_adapters",
                                                                  Form.SLOTS: "_slots"}[form]
    return checkpoint.with_name(f"{checkpoint.stem}_genai{suffix}")


def decoder_outputs(output_dir: Path, form: Form) -> list[Path]:
    """Every file ``export_decoder`` writes into ``output_dir``."""
    files = model_files(output_dir / MODEL_FILE) + [output_dir / name for name in (GENAI_CONFIG, TOKENIZER_FILE,
                                                                                   TOKENIZER_CONFIG)]
    return files if form is Form.MERGED else files + model_files(adapter_path=output_dir / ADAPTER_FILE)
