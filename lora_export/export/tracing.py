"""Tracing a lora-export model to ONNX with torch.onnx's dynamo exporter, in each of its forms.

merged: the LoRA folded into the base weights, a plain graph. adapters: every LoRA layer's A_t / B_t are graph
inputs (``AdaptersAsInputs``), each layer with its own symbolic rank (``<path>.lora_rank``) and a rank-0 default
initializer, so ONNX Runtime's multi-LoRA API feeds any adapter of the same base. slots: the same inputs stacked
([lora_slots, in, r] / [lora_slots, r, out], ``SlotsAsInputs``) plus ``adapter_ids`` [batch], each row its own slot.
The LoRA inputs go on the checkpoint's LoRA layers or on any given set of adaptable layers (``lora_paths``: the
others run as the base until an adapter feeds them). ``trace_forms`` serves the scoring graph (``trace_to_onnx``)
and the KV-cache decoder (``genai.decoder``). From opset 23 on the global softmax heads become ONNX ``Attention``
nodes; below it, ``decomposed_attention`` keeps the exporter off its own (mismatching) decomposition of a masked
SDPA.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import torch
from torch import nn

from ..layout import Form, data_path_of
from ..model.attention import decomposed_attention
from ..model.layers import LoRALayer, lora_layers, merge_lora
from ..model.transformer import LoRATransformerLM, ModelConfig
from ..progress import SILENT, Progress
from .adapters import ADAPTER_IDS, SLOTS_AXIS, lora_input_specs, rank_axis

DEFAULT_OPSET = 23
FUSED_ATTENTION_OPSET = 23  # the first with the standard Attention op
INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["logits"]
#: The most slots a slots-form graph takes.
MAX_SLOTS = 65536


class AdaptersAsInputs(nn.Module):
    """A module over ``base`` whose LoRA layers take A_t / B_t from forward() arguments (graph inputs).

    forward(*inputs, A_0, B_0, A_1, B_1, ...): the first ``n_inputs`` arguments go to ``inner`` (``base`` itself
    or a module built on it), the rest are the LoRA pairs of the layers in ``layer_names`` order. ``fold``: the
    linear layers merge A_t @ B_t into their weight at run time (see ``LoRALayer.use_external_lora``).
    """

    def __init__(self, inner: nn.Module, base: LoRATransformerLM, layer_names: list[str], n_inputs: int,
                 fold: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.n_inputs = n_inputs
        self.fold = fold
        modules = dict(base.named_modules())
        self.layers: list[LoRALayer] = [modules[name] for name in layer_names]

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        inputs, lora = args[: self.n_inputs], args[self.n_inputs:]
        for layer, lora_a_t, lora_b_t in zip(self.layers, lora[0::2], lora[1::2], strict=True):
            layer.use_external_lora(lora_a_t, lora_b_t, self.fold)
        try:
            return self.inner(*inputs)
        finally:
            for layer in self.layers:
                layer.use_external_lora(None, None)


class SlotsAsInputs(AdaptersAsInputs):
    """``AdaptersAsInputs`` for the slots form: forward(*inputs, adapter_ids, A_0, B_0, A_1, B_1, ...) with
    stacked A_t [slots, in, r] and B_t [slots, r, out] per layer; row b of the batch uses slot adapter_ids[b]
    (``LoRALayer.use_lora_slots``)."""

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        inputs, adapter_ids, lora = args[: self.n_inputs], args[self.n_inputs], args[self.n_inputs + 1:]
        for layer, a_stack, b_stack in zip(self.layers, lora[0::2], lora[1::2], strict=True):
            layer.use_lora_slots(a_stack, b_stack, adapter_ids)
        try:
            return self.inner(*inputs)
        finally:
            for layer in self.layers:
                layer.use_lora_slots(None)


def base_model_of(model: LoRATransformerLM, state: dict[str, torch.Tensor]) -> LoRATransformerLM:
    """A plain (r = 0) model of the same architecture holding ``state`` (base weights): the tensors themselves,
    not copies (built on the meta device, then assigned), so the export holds the weights once."""
    config = ModelConfig.from_dict({**model.config.to_dict(), "r": 0, "rank_pattern": {}, "alpha_pattern": {}})
    with torch.device("meta"):
        base = LoRATransformerLM(config)
    base.load_state_dict(state, assign=True)
    return base.eval()


#: Tensors above this many bytes go to the external-data file (onnx's own default is 1024 as well).
EXTERNAL_TENSOR_BYTES = 1024


@dataclass
class TracedGraph:
    """A traced graph not yet serialized: the exporter's ONNX IR model, whose weights are still the torch model's
    tensors (no copy), and its LoRA layer names (empty when merged)."""

    program: torch.onnx.ONNXProgram
    layer_names: list[str]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the graph's initializers (nearly all of a model's bytes), without serializing anything."""
        values = self.program.model.graph.initializers.values()
        return sum(value.const_value.nbytes for value in values if value.const_value is not None)

    def to_proto(self) -> onnx.ModelProto:
        """The whole model as one in-memory proto (a copy of the weights: for models that fit in memory)."""
        proto = self.program.model_proto
        name_rank_axes(proto, self.layer_names)
        return proto

    def save_with_weights(self, path: Path, progress: Progress = SILENT) -> onnx.ModelProto:
        """Write the model to ``path`` and its weights to ``<name>.data`` beside it straight from the torch tensors
        (one tensor at a time: no proto of the weights is ever built), then return the graph read back without its
        weights (its initializers point into the data file). ``progress`` advances per tensor written."""
        written = 0

        def advance(_tensor: object, info: onnx_ir.external_data.CallbackInfo) -> None:
            nonlocal written
            written += 1
            progress.advance(written, info.total, "weights written")

        onnx_ir.save(self.program.model, path, external_data=data_path_of(path).name,
                     size_threshold_bytes=EXTERNAL_TENSOR_BYTES, callback=advance)
        proto = onnx.load(path, load_external_data=False)
        name_rank_axes(proto, self.layer_names)
        return proto


def _example_inputs(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(config.max_seq_len, max(3, config.local_attn_window_size + 3))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, n), generator=generator)
    return ids, torch.ones(2, n, dtype=torch.int64)


def _torch_export(module: nn.Module, args: tuple, input_names: list[str], dynamic_shapes: tuple,
                  opset: int, output_names: list[str] = OUTPUT_NAMES) -> torch.onnx.ONNXProgram:
    """torch.onnx.export with the dynamo exporter, its console chatter and warnings silenced."""
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    fused = contextlib.nullcontext() if opset >= FUSED_ATTENTION_OPSET else decomposed_attention()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), fused:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
            )
    finally:
        torch_onnx_log.setLevel(level)
    return program


def trace_to_onnx(model: LoRATransformerLM, form: Form, opset: int,
                  lora_paths: Sequence[str] | None = None) -> TracedGraph:
    """Export ``model`` (unmerged checkpoint model) in ``form`` (``trace_forms``; ``lora_paths``: its LoRA
    layers)."""
    ids, mask = _example_inputs(model.config)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=model.config.max_seq_len)
    # a scoring pass runs many tokens through each weight: the LoRA inputs are folded into it at run time
    return trace_forms(model, form, opset, lambda base: base, (ids, mask), INPUT_NAMES,
                       [{0: batch, 1: seq}, {0: batch, 1: seq}], OUTPUT_NAMES, fold_lora=True, lora_paths=lora_paths)


def _dynamic_shapes(module: nn.Module, shapes: list[dict]) -> tuple:
    """torch.export's dynamic_shapes for ``shapes`` (one per argument): one entry per parameter of forward, so a
    forward(*args) takes them all as one tuple."""
    parameters = list(inspect.signature(module.forward).parameters.values())
    if parameters and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (tuple(shapes),)
    return tuple(shapes)


def trace_forms(model: LoRATransformerLM, form: Form, opset: int, build: Callable[[LoRATransformerLM], nn.Module],
                args: tuple, input_names: list[str], shapes: list[dict], output_names: list[str],
                fold_lora: bool = False, lora_paths: Sequence[str] | None = None) -> TracedGraph:
    """Export ``build(base)`` in ``form`` with the dynamo exporter, not yet serialized (``TracedGraph``).

    merged: the LoRA folded into the base first. adapters: every LoRA layer's A_t / B_t become graph inputs after
    ``input_names`` (a rank of its own per layer). ``build`` turns the plain base model into the module to export
    (the model itself, or a decoder over it) whose forward takes ``args`` (dynamic shapes ``shapes``).
    ``fold_lora``: the adapter form's linear layers merge their LoRA inputs into the weight at run time.
    ``lora_paths``: the module paths that get LoRA inputs (any adaptable modules, in module order; a layer the
    checkpoint has no LoRA on then runs as the base until an adapter feeds it); None: the checkpoint's LoRA layers.
    ``model`` is changed in place (merged) and shares its base tensors with the traced graph: no copy.
    """
    if form is Form.MERGED:
        merge_lora(model, safe_merge=True)
    base = base_model_of(model, {k: v for k, v in model.state_dict().items() if "lora_" not in k})
    if form is Form.MERGED:
        module = build(base)
        return TracedGraph(_torch_export(module, args, input_names, _dynamic_shapes(module, shapes), opset,
                                         output_names), [])
    names, lora_args, lora_names, lora_shapes = [], [], [], []
    example_rank, example_slots = 3, 3  # any size > 1: torch.export specialises 0 and 1
    slots = torch.export.Dim(SLOTS_AXIS, min=1, max=MAX_SLOTS)
    stacked = (example_slots,) if form is Form.SLOTS else ()
    modules = dict(base.named_modules())
    paths = [name for name, _ in lora_layers(model)] if lora_paths is None else list(lora_paths)
    for index, name in enumerate(paths):
        layer = modules[name]
        rank = torch.export.Dim(f"lora_rank_{index}", min=1, max=4096)  # one rank per layer
        names.append(name)
        lora_args += [torch.zeros(*stacked, layer.in_features, example_rank),
                      torch.zeros(*stacked, example_rank, layer.out_features)]
        lora_names += [f"{name}.lora_A", f"{name}.lora_B"]
        lora_shapes += ([{0: slots, 2: rank}, {0: slots, 1: rank}] if stacked else [{1: rank}, {0: rank}])
    if form is Form.SLOTS:  # adapter_ids [batch], one slot per row: the batch axis of the first input
        module: nn.Module = SlotsAsInputs(build(base), base, names, len(args))
        ids = torch.arange(args[0].shape[0]) % example_slots
        lora_args, lora_names, lora_shapes = [ids, *lora_args], [ADAPTER_IDS, *lora_names], [{0: shapes[0][0]},
                                                                                           *lora_shapes]
    else:
        module = AdaptersAsInputs(build(base), base, names, len(args), fold_lora)
    program = _torch_export(module, (*args, *lora_args), input_names + lora_names,
                            _dynamic_shapes(module, shapes + lora_shapes), opset, output_names)
    return TracedGraph(program, names)


def name_rank_axes(model: onnx.ModelProto, layer_names: list[str]) -> None:
    """Rename the exporter's per-layer rank symbols (``lora_rank_<i>``) to ``<layer path>.lora_rank``."""
    renames = {f"lora_rank_{index}": rank_axis(name) for index, name in enumerate(layer_names)}
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def add_rank0_defaults(model: onnx.ModelProto) -> None:
    """Give every LoRA input a same-named rank-0 initializer: no adapter fed = the base model. In the slots form one
    slot of rank 0 ([1, in, 0] / [1, 0, out]): with no pack fed, every row (adapter_ids all 0) is the base."""
    existing = {init.name for init in model.graph.initializer}
    for name, (elem_type, dims) in lora_input_specs(model).items():
        if name in existing:
            continue
        shape = [1 if d == SLOTS_AXIS else 0 if isinstance(d, str) else d for d in dims]
        array = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    model.ir_version = max(model.ir_version, 4)
