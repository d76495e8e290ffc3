"""PEFT interop: Hugging Face PEFT LoRA adapter directories in and out.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For a lora-export base
wrapped with ``get_peft_model(base, LoraConfig(target_modules=[...]))`` its tensors are named

* ``base_model.model.<path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r] for a linear layer,
* ``base_model.model.<path>.lora_embedding_A`` [r, vocab] and ``.lora_embedding_B`` [dim, r] for the embedding,

which are lora-export's own ``lora_A`` / ``lora_B`` layouts, unscaled (scaling = alpha / r, or alpha / sqrt(r)
with rsLoRA, from the config). ``from_peft`` turns such a directory plus the base checkpoint into a lora-export
checkpoint; ``to_peft`` writes a checkpoint's LoRA as a directory that ``PeftModel.from_pretrained`` loads onto
the base. Per-layer ranks and alphas travel as ``rank_pattern`` / ``alpha_pattern`` (full module paths).

Any subset of the adaptable modules travels: the adapter's tensors name the modules PEFT adapted, whatever
``target_modules`` (list or regex), ``layers_to_transform`` / ``layers_pattern`` or ``exclude_modules`` chose, and
the checkpoint's ``lora_targets`` select exactly those (``compact_targets``: groups, module names, then paths).
``to_peft`` writes ``target_modules`` as a list of module names and full paths, which PEFT matches exactly.

What lora-export's model cannot represent is refused with one line naming the field (``PeftError``): another PEFT
method, DoRA, a bias other than ``none``, ``modules_to_save``, ``fan_in_fan_out``, or a module that is not a
lora-export LoRA layer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import PeftError, first_line, short_repr
from ..files import check_empty_output_dir, check_input_file, file_sha256, read_json, staged_outputs
from ..layout import CONFIG_FILE, WEIGHTS_FILE
from ..model.checkpoint import (
    base_fingerprint,
    build_model,
    check_checkpoint_output,
    read_checkpoint,
    save_checkpoint,
)
from ..model.layers import lora_layers
from ..model.transformer import (
    TARGET_GROUPS,
    LoRATransformerLM,
    ModelConfig,
    adaptable_module_paths,
    compact_targets,
    lora_module_paths,
)

PREFIX = "base_model.model."
#: PEFT's tensor name suffixes of a LoRA layer (linear, embedding) and the lora-export matrix each holds.
LORA_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                 (".lora_embedding_B", "B"))
#: PEFT config fields that must be off (false, none, empty) for lora-export to represent the adapter.
MUST_BE_OFF = ("use_dora", "modules_to_save", "fan_in_fan_out", "lora_bias", "trainable_token_indices",
               "megatron_config", "use_qalora", "target_parameters")


#: The PEFT config fields lora-export reads: PEFT's default for each and the JSON value it must be.
SETTINGS = {"r": (8, "rank"), "lora_alpha": (8, "number"), "lora_dropout": (0.0, "number"),
            "use_rslora": (False, "bool"), "rank_pattern": ({}, "rank"), "alpha_pattern": ({}, "number")}
EXPECTED = {"bool": "true or false (a JSON bool)", "rank": "a positive integer", "number": "a finite number"}


def _checked(value: Any, kind: str) -> Any:
    """``value`` as a setting of ``kind`` (see EXPECTED), or None when it is not one: a bool must be a JSON bool,
    a rank an integer >= 1 and a number a finite int or float; a bool is neither a rank nor a number."""
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind == "rank":
        return value if isinstance(value, int) and value >= 1 else None
    try:
        number = float(value)
    except OverflowError:  # an int of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def _settings(config: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """The SETTINGS fields of a PEFT config, PEFT's defaults where absent (a null pattern is empty), each strictly
    of its JSON type (``"false"`` is not False, ``true`` is not 1). Raises PeftError naming the field."""
    settings = {}
    for field, (default, kind) in SETTINGS.items():
        value = config.get(field, default)
        if field.endswith("_pattern"):
            value = {} if value is None else value
            if not isinstance(value, dict):
                raise PeftError(f"{config_path}: {field} = {short_repr(value)} must be a JSON object")
            settings[field] = {key: _checked(entry, kind) for key, entry in value.items()}
            bad = next((key for key, entry in settings[field].items() if entry is None), None)
            if bad is not None:
                raise PeftError(f"{config_path}: {field}[{short_repr(bad)}] = {short_repr(value[bad])} must be "
                                f"{EXPECTED[kind]}")
        else:
            settings[field] = _checked(value, kind)
            if settings[field] is None:
                raise PeftError(f"{config_path}: {field} = {short_repr(value)} must be {EXPECTED[kind]}")
    return settings


def _read_config(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config of a PEFT adapter directory, its checked settings); PeftError for what lora-export cannot
    represent."""
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise PeftError(f"{directory}: not a directory (a PEFT adapter directory holds {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE})")
    try:
        config = read_json(config_path)
    except ValueError as err:
        raise PeftError(str(err)) from None
    if not isinstance(config, dict):
        raise PeftError(f"{config_path}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise PeftError(f"{config_path}: peft_type {short_repr(config.get('peft_type'))} is not supported "
                        "(LORA only)")
    for field in MUST_BE_OFF:
        if config.get(field):
            raise PeftError(f"{config_path}: {field} = {short_repr(config[field])} is not supported "
                            "(lora-export adapters are plain LoRA on its own layers)")
    if config.get("bias", "none") != "none":
        raise PeftError(f"{config_path}: bias = {short_repr(config['bias'])} is not supported (none only)")
    return config, _settings(config, config_path)


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path it equals or ends with (after a
    dot); the longest matching key wins."""
    keys = [key for key in pattern if path == key or path.endswith("." + key)]
    return pattern[max(keys, key=len)] if keys else default


def _layer_part(name: str, path: Path) -> tuple[str, str]:
    """(module path, "A" or "B") of a PEFT LoRA tensor name; PeftError for any other tensor."""
    key = name.removeprefix(PREFIX)
    for suffix, part in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), part
    raise PeftError(f"{path}: tensor {short_repr(name)} is not a LoRA A/B weight")


def _check_pairs(shapes: dict[str, dict[str, tuple[int, ...]]], modules: dict[str, Any], adapter_dir: Path,
                 base_name: str) -> None:
    """Each module path names an adaptable layer of the base (``modules`` holds only those) and has lora_A [r, in]
    and lora_B [out, r] that fit it, with r at most the layer's larger dimension (more adds nothing, and bounds
    what a file may make us read)."""
    for path, pair in shapes.items():
        module = modules.get(path)
        if module is None:
            raise PeftError(f"{adapter_dir}: module {short_repr(path)} is not a LoRA layer of the lora-export base "
                            f"{base_name} (an adapter for another model?)")
        if set(pair) != {"A", "B"}:
            raise PeftError(f"{adapter_dir}: module {path} has lora_{'B' if 'A' in pair else 'A'} missing")
        a, b = pair["A"], pair["B"]
        if (len(a) != 2 or len(b) != 2 or a[1] != module.in_features or b != (module.out_features, a[0])
                or not 1 <= a[0] <= max(module.in_features, module.out_features)):
            raise PeftError(f"{adapter_dir}: module {path}: lora_A {a} / lora_B {b} do not fit its "
                            f"{module.in_features} -> {module.out_features} (another base?)")


def _read_layers(adapter_dir: Path, modules: dict[str, Any], base_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": lora_A, "B": lora_B}} (float32) of the directory's weights file, names and shapes
    checked (:func:`_check_pairs`) from the file's header before any tensor is read. Raises PeftError."""
    from safetensors import safe_open

    path = adapter_dir / WEIGHTS_FILE
    if not (path.exists() or path.is_symlink()):
        raise PeftError(f"{path}: no such file (adapter_model.bin pickles are not read: save with safetensors)")
    check_input_file(path, error=PeftError)
    try:
        with safe_open(path, framework="pt") as f:
            parts = {name: _layer_part(name, path) for name in f.keys()}
            if not parts:
                raise PeftError(f"{path}: holds no LoRA weights")
            shapes: dict[str, dict[str, tuple[int, ...]]] = {}
            for name, (layer, part) in parts.items():
                shapes.setdefault(layer, {})[part] = tuple(f.get_slice(name).get_shape())
            _check_pairs(shapes, modules, adapter_dir, base_name)
            layers: dict[str, dict[str, torch.Tensor]] = {}
            for name, (layer, part) in parts.items():
                layers.setdefault(layer, {})[part] = f.get_tensor(name).float()
    except PeftError:
        raise
    except Exception as err:  # SafetensorError, OS errors, a dtype torch cannot convert
        raise PeftError(f"{path}: not a readable safetensors file: {first_line(err)[:200]}") from None
    return layers


def from_peft(adapter_dir: str | os.PathLike, base_checkpoint: str | os.PathLike,
              output: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write a lora-export checkpoint (``output``, .pt or .safetensors) holding ``base_checkpoint``'s base weights
    and the PEFT adapter of ``adapter_dir``. The output is checked before any work
    (``model.checkpoint.check_checkpoint_output``): it must not replace the base or the adapter's files; one that
    exists is replaced only with ``overwrite``. Raises PeftError, CheckpointError or OutputError (one line)."""
    adapter_dir, output = Path(adapter_dir), Path(output)
    check_checkpoint_output(output, [base_checkpoint, adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE],
                            overwrite=overwrite)
    config, settings = _read_config(adapter_dir)
    payload = read_checkpoint(base_checkpoint)
    base_model = build_model(payload, base_checkpoint)
    adaptable = adaptable_module_paths(base_model.config)
    named = dict(base_model.named_modules())
    modules = {path: named[path] for path in adaptable}
    layers = _read_layers(adapter_dir, modules, Path(base_checkpoint).name)

    expected = [path for path in adaptable if path in layers]
    targets = compact_targets(expected, base_model.config)
    r, alpha = settings["r"], settings["lora_alpha"]
    rank_pattern = {path: int(layers[path]["A"].shape[0]) for path in expected if layers[path]["A"].shape[0] != r}
    alpha_pattern = {path: value for path in expected
                     if (value := _pattern_value(settings["alpha_pattern"], path, alpha)) != alpha}
    try:
        lora_config = ModelConfig.from_dict({
            **payload["config"], "r": r, "lora_alpha": alpha, "lora_targets": targets,
            "use_rslora": settings["use_rslora"], "lora_dropout": settings["lora_dropout"],
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})
    except ValueError as err:
        raise PeftError(f"{adapter_dir / CONFIG_FILE}: {err}") from None

    model = LoRATransformerLM(lora_config)
    model.load_state_dict(base_model.state_dict(), strict=False)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            layer.lora_A.copy_(layers[path]["A"])
            layer.lora_B.copy_(layers[path]["B"])
    training = {"stage": "peft-import", "peft_config": {k: v for k, v in config.items() if _plain(v)},
                "source": str(adapter_dir), "base_checkpoint": Path(base_checkpoint).name,
                "base_sha256": file_sha256(base_checkpoint), "base_fingerprint": base_fingerprint(payload["base"])}
    save_checkpoint(output, model.eval(), training)
    return output


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str) or (
        isinstance(value, list | dict) and len(json.dumps(value, default=str)) < 10_000)


def _target_modules(config: ModelConfig) -> list[str]:
    """PEFT's ``target_modules`` for the LoRA layers of ``config``: module names (PEFT adapts every module whose
    path ends in one) and full paths (PEFT adapts the module of that exact path), sorted."""
    targets = compact_targets(lora_module_paths(config), config)
    return sorted(name for target in targets for name in TARGET_GROUPS.get(target, (target,)))


def to_peft(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the LoRA of a lora-export checkpoint as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, output_dir)`` loads onto the
    checkpoint's base model (a lora-export ``LoRATransformerLM`` with r = 0). Raises PeftError / CheckpointError /
    OutputError.

    The directory must be new or empty (``files.check_empty_output_dir``); with ``overwrite`` an existing one is
    written into, its two adapter files replaced together (other files are left as they are). Missing parent
    directories are created.
    """
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    check_empty_output_dir(output_dir, (CONFIG_FILE, WEIGHTS_FILE), [checkpoint], overwrite=overwrite,
                           refusal="; pass --force to replace its adapter files")
    model = build_model(read_checkpoint(checkpoint), checkpoint)
    config = model.config
    layers = list(lora_layers(model))
    if not layers:
        raise PeftError(f"{checkpoint}: has no LoRA layers (r = 0): nothing to write as a PEFT adapter")
    tensors = {}
    for path, layer in layers:
        a, b = (".lora_embedding_A", ".lora_embedding_B") if path == "token_emb" else (".lora_A.weight",
                                                                                      ".lora_B.weight")
        tensors[PREFIX + path + a] = layer.lora_A.detach().contiguous()
        tensors[PREFIX + path + b] = layer.lora_B.detach().contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": _target_modules(config),
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "use_rslora": config.use_rslora, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True,
    }
    with staged_outputs() as stage:  # makes output_dir and missing parents, removed again if this fails
        save_file(tensors, str(stage.path(output_dir / WEIGHTS_FILE)), metadata={"format": "pt"})
        stage.path(output_dir / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n",
                                                        encoding="utf-8")
    return output_dir
