"""The KV-cache decoder: an ONNX graph with past/present cache tensors and the genai_config.json that
onnxruntime-genai needs to run it (``onnxruntime_genai.Model(DIR)``).

Graph interface (genai's decoder-only defaults): ``input_ids`` int64 [batch, seq], ``attention_mask`` int64
[batch, total] (past + current; every position must be real: the decoder has no padding), ``position_ids``
int64 [batch, seq], and per cache slot ``past_key_values.<s>.key|value`` float32 [batch, heads, past, head_size]
-> ``logits`` [batch, seq, 256] and ``present.<s>.key|value``. In the adapter form the LoRA inputs of
``lora_export.export.adapters`` follow, unchanged (``.onnx_adapter`` files work as for the scoring graph); in the
slots form ``adapter_ids`` int64 [batch] and the stacked ``P.lora_A`` [lora_slots, in, r] / ``P.lora_B``
[lora_slots, r, out] (each row its own adapter: ``genai.batch``), whose defaults (one all-zero slot of rank 0) run
every row as the base.

Cache slots: per block, one slot for the global softmax heads (full history, present = past + new) and one for
the local heads, whose present keeps only the last ``window + cache_slack`` positions: genai's ``sliding_window``
with the same slack, so their cache is bounded whatever the length generated. Key positions come from
``position_ids`` (the last new position minus the keys before it), so no shape depends on ``attention_mask``, and a
key whose position falls below 0 is never visible: a row left-padded to a batch's longest prompt (``genai.batch``;
its padding given position 0) computes exactly what it computes alone. genai itself never pads on the left.

Refused (one line): linear global heads (their state is a running sum, not a sequence of keys that genai's
cache holds). Blindspot global heads and any window are expressed exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError, first_line, short_repr
from ..export.core import (
    ExportSource,
    check_opset,
    export_metadata,
    finish_graph,
    serialize_traced,
    staged_export,
    write_companions,
)
from ..export.onnx_files import (
    EXTERNAL_DATA_THRESHOLD,
    count_parameters_onnx,
    load_onnx,
    read_metadata,
    set_metadata,
    size_text,
    weights_too_big_for_memory,
    write_model_files,
)
from ..export.quantize import convert_model_fp16, quantize_model_int4, quantize_model_int8, write_precision
from ..export.tracing import DEFAULT_OPSET, TracedGraph, trace_forms
from ..files import StagedOutputs, check_empty_output_dir, parse_json, read_json
from ..layout import ADAPTER_FILE, GENAI_CONFIG, MODEL_FILE, Form, decoder_outputs
from ..model.attention import fused_attention
from ..model.transformer import VOCAB_SIZE, LoRATransformerLM, ModelConfig
from ..progress import SILENT, Progress
from .tokenizer import tokenizer_texts

#: Positions a local slot keeps beyond its window (genai's ``cache_slack``, set explicitly: its per-provider
#: default differs between CPU and CUDA).
CACHE_SLACK = 16
#: The byte genai is told is end-of-sequence (it needs one in the vocabulary): NUL, never in text. Generation
#: does not stop on it unless asked to (``min_length = max_length``).
EOS_BYTE = 0
DECODER_PRECISIONS = ("fp32", "int8", "int4", "fp16")


@dataclass(frozen=True)
class CacheSlot:
    """One past/present pair: the heads [first, first + heads) of block ``block``; ``local`` = sliding window."""

    block: int
    first: int
    heads: int
    local: bool


def cache_slots(config: ModelConfig) -> list[CacheSlot]:
    """The decoder's cache slots in graph order: per block the global heads' slot, then the local heads' slot."""
    slots = []
    local, total = config.n_local_attn_heads, config.heads
    for block in range(config.depth):
        if local < total:
            slots.append(CacheSlot(block, local, total - local, False))
        if local > 0:
            slots.append(CacheSlot(block, 0, local, True))
    return slots


def decoder_problem(config: ModelConfig) -> str | None:
    """Why a config cannot be a genai decoder, or None."""
    if config.global_attn == "linear" and config.n_local_attn_heads < config.heads:
        return ("linear global heads keep a running sum, not a sequence of keys: onnxruntime-genai's KV cache "
                "cannot hold it (export the scoring graph instead)")
    return None


class DecoderWithPast(nn.Module):
    """forward(input_ids, attention_mask, position_ids, past_0_key, past_0_value, ...) -> (logits, presents...).

    The same computation as ``LoRATransformerLM`` over past + new positions, for rows without padding or
    left-padded (the padding at position 0, its keys below 0: see the module docstring).
    """

    def __init__(self, model: LoRATransformerLM, cache_slack: int = CACHE_SLACK) -> None:
        super().__init__()
        self.model = model
        self.slots = cache_slots(model.config)
        self.keep_local = model.config.local_attn_window_size + cache_slack

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                positions: torch.Tensor, local: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, N, d] of the new positions ``positions`` [B, N]; past_k / past_v [B, H, P, d] the P
        positions before them (left padding: positions below 0, never visible). Returns (out [B, H, N, d],
        present_k, present_v)."""
        config = self.model.config
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        count = keys.shape[2]  # the keys end at the last new position: a left-padded row's padding falls below 0
        key_positions = positions[:, -1:] - (count - 1) + torch.arange(count, device=q.device)[None, :]
        distance = positions[:, :, None] - key_positions[:, None, :]  # [B, N, P + N]
        if local:
            visible = (distance >= 0) & (distance < config.local_attn_window_size)
        elif config.blindspot_size is not None and config.blindspot_size > 1:
            block = config.blindspot_size
            visible = torch.div(key_positions[:, None, :], block, rounding_mode="floor") < torch.div(
                positions[:, :, None], block, rounding_mode="floor")
        else:
            visible = distance >= 0
        visible = visible & (key_positions >= 0)[:, None, :]
        out = fused_attention(q, keys, values, visible[:, None])
        if local:
            keys, values = keys[:, :, -self.keep_local:], values[:, :, -self.keep_local:]
        return out, keys, values

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, _attention_mask, position_ids, *past = tensors
        model, config = self.model, self.model.config
        x = model.token_emb(input_ids) + model.pos_emb(position_ids)
        presents: list[torch.Tensor] = []
        slot_index = 0
        for index, block in enumerate(model.blocks):
            attn = block.attn
            h = block.norm1(x)
            q, k, v = (proj(h).unflatten(-1, (config.heads, config.dim_head)).transpose(1, 2)
                       for proj in (attn.to_q, attn.to_k, attn.to_v))
            outputs: dict[bool, torch.Tensor] = {}
            while slot_index < len(self.slots) and self.slots[slot_index].block == index:
                slot = self.slots[slot_index]
                heads = slice(slot.first, slot.first + slot.heads)
                out, present_k, present_v = self._attend(q[:, heads], k[:, heads], v[:, heads],
                                                         past[2 * slot_index], past[2 * slot_index + 1],
                                                         position_ids, slot.local)
                outputs[slot.local] = out
                presents += [present_k, present_v]
                slot_index += 1
            out = torch.cat([outputs[local] for local in (True, False) if local in outputs], dim=1)  # local first
            x = x + attn.to_out(out.transpose(1, 2).flatten(-2))
            x = x + block.ff(block.norm2(x))
        return (model.lm_head(model.norm(x)), *presents)


def graph_names(slots: list[CacheSlot]) -> tuple[list[str], list[str]]:
    """(input names, output names) of the decoder graph, LoRA inputs left out."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for index in range(len(slots)):
        inputs += [f"past_key_values.{index}.key", f"past_key_values.{index}.value"]
        outputs += [f"present.{index}.key", f"present.{index}.value"]
    return inputs, outputs


def trace_decoder(model: LoRATransformerLM, form: Form, opset: int) -> TracedGraph:
    """Export the decoder of an unmerged checkpoint model in ``form``, not yet serialized."""
    config = model.config
    slots = cache_slots(config)
    batch, n, past_len, past_local = 2, 3, 5, 4  # example sizes > 1: torch.export specialises 0 and 1
    generator = torch.Generator().manual_seed(0)
    args = [torch.randint(0, VOCAB_SIZE, (batch, n), generator=generator),
            torch.ones(batch, past_len + n, dtype=torch.int64),
            torch.arange(past_len, past_len + n).repeat(batch, 1)]
    dims = {name: torch.export.Dim(name, min=low, max=high) for name, low, high in (
        ("batch", 1, 4096), ("seq", 1, config.max_seq_len), ("total", 1, config.max_seq_len),
        ("past_seq", 0, config.max_seq_len), ("past_local", 0, config.max_seq_len))}
    shapes = [{0: dims["batch"], 1: dims["seq"]}, {0: dims["batch"], 1: dims["total"]},
              {0: dims["batch"], 1: dims["seq"]}]
    for slot in slots:
        length = past_local if slot.local else past_len
        # distinct tensors: the exporter would tie one tensor passed twice into a single graph input
        args += [torch.randn(batch, slot.heads, length, config.dim_head, generator=generator) for _ in range(2)]
        shapes += [{0: dims["batch"], 2: dims["past_local" if slot.local else "past_seq"]}] * 2
    input_names, output_names = graph_names(slots)
    return trace_forms(model, form, opset, DecoderWithPast, tuple(args), input_names, shapes, output_names)


def genai_config(config: ModelConfig, slots: list[CacheSlot], cache_slack: int = CACHE_SLACK) -> dict:
    """genai_config.json for the decoder graph of ``config`` (see the module docstring)."""
    decoder: dict = {
        "filename": MODEL_FILE,
        "num_hidden_layers": len(slots),
        "num_attention_heads": config.heads,
        "num_key_value_heads": max(slot.heads for slot in slots),
        "head_size": config.dim_head,
        "hidden_size": config.dim,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    local = [index for index, slot in enumerate(slots) if slot.local]
    if local:
        decoder["sliding_window"] = {"window_size": config.local_attn_window_size, "cache_slack": cache_slack,
                                     "slide_key_value_cache": False, "slide_inputs": False, "layers": local}
    return {
        "model": {"type": "decoder", "vocab_size": VOCAB_SIZE, "context_length": config.max_seq_len,
                  "bos_token_id": EOS_BYTE, "eos_token_id": EOS_BYTE, "pad_token_id": EOS_BYTE, "decoder": decoder},
        "search": {"max_length": config.max_seq_len, "min_length": 0, "do_sample": False, "num_beams": 1,
                   "past_present_share_buffer": False},
    }


@dataclass(frozen=True)
class DecoderDirectory:
    """A genai decoder directory as lora-export wrote it: its graph, the graph's lora_export metadata (prefix
    removed) and the model config recorded there, which gives the context length."""

    path: Path
    proto: onnx.ModelProto
    metadata: dict[str, str]
    config: ModelConfig


def _config_difference(found: object, expected: object, key: str = "") -> str | None:
    """Where a genai_config.json value departs from what lora-export writes (``expected``): one phrase naming the
    dotted key, or None when they are equal in every key, type and value."""
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            return f"{key or 'the file'} is {short_repr(found)}, lora-export writes an object"
        prefix = f"{key}." if key else ""
        for name in found:
            if name not in expected:  # repr: a key may hold control characters
                return f"{prefix}{repr(name)[1:-1][:60]}: not a key lora-export writes"
        for name, value in expected.items():
            if name not in found:
                return f"{prefix}{name} is missing"
            problem = _config_difference(found[name], value, prefix + name)
            if problem:
                return problem
        return None
    if type(found) is not type(expected) or found != expected:
        return f"{key} is {short_repr(found)}, lora-export writes {expected!r} for this model"
    return None


def read_decoder_dir(model_dir: str | os.PathLike) -> DecoderDirectory:
    """Read a genai decoder directory as data, before onnxruntime-genai opens it.

    model.onnx must carry lora_export metadata naming a decoder graph with a valid model config: graph kind and
    context length come from there. genai_config.json (read with files.read_json's size cap) must be exactly the
    config ``genai_config`` writes for that model: any other key or value (session options that load a library or
    write a profile elsewhere, another context length, another file name) is refused naming the key. Raises
    ExportError (one line).
    """
    model_dir = Path(model_dir)
    model_path, config_path = model_dir / MODEL_FILE, model_dir / GENAI_CONFIG
    if not model_path.is_file():
        raise ExportError(f"{model_dir}: not a genai model directory (no {MODEL_FILE})")
    proto = load_onnx(model_path)
    metadata = read_metadata(proto)
    if metadata.get("graph") != "decoder":
        raise ExportError(f"{model_path}: not a lora-export genai decoder graph (lora_export.graph is "
                          f"{short_repr(metadata.get('graph'))}); a scoring graph is validated as a file, not a "
                          "directory")
    try:
        config = ModelConfig.from_dict(parse_json(metadata.get("model_config", ""), "lora_export.model_config"))
    except (ValueError, TypeError) as err:
        raise ExportError(f"{model_path}: lora_export.model_config is not a model config: {first_line(err)}") from None
    try:
        found = read_json(config_path)
    except ValueError as err:
        raise ExportError(str(err)) from None
    problem = _config_difference(found, genai_config(config, cache_slots(config)))
    if problem:
        raise ExportError(f"{config_path}: {problem}; lora-export reads only the genai_config.json it writes")
    return DecoderDirectory(model_dir, proto, metadata, config)


def export_decoder(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, *, merge: bool = True,
                   form: Form | None = None, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                   external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, progress: Progress = SILENT) -> Path:
    """Write an onnxruntime-genai model directory for a checkpoint: model.onnx (KV-cache decoder, merged or with
    the adapters as inputs), genai_config.json, and in the adapter form the trained model.onnx_adapter.

    ``form`` (None: ``Form.of(merge)``): ``Form.SLOTS`` writes the adapter-slots decoder (``adapter_ids`` and
    stacked LoRA inputs; each batch row its own adapter, ``genai.batch``) with the trained model.onnx_adapter
    beside it as an ordinary adapter, one to pack with others.

    ``precision``: ``fp32``; ``int8``, ONNX Runtime dynamic int8 of the constant weights; ``int4``, block-wise
    weight-only int4 (``MatMulNBits``) of the constant MatMul weights; ``fp16``, float16 weights,
    compute and cache (past/present), float32 logits. LoRA inputs and the adapter file stay float32 in every
    precision, so one ``.onnx_adapter`` serves them all.

    Above ``external_data_threshold`` bytes the weights go to ``model.onnx.data``; above it (or protobuf's 2 GB)
    the traced graph is never serialized whole in memory: it is checked as a file once written
    (``onnx_files.check_model_file``). The int8 / int4 / fp16 conversions still work in memory.

    The directory must be new or empty (``files.check_empty_output_dir``: staging left by a killed earlier write
    does not count); it and ``opset`` (``check_opset``) are checked before any work; its files land together or
    not at all. Raises CheckpointError, ExportError, OutputError or, for a failed int8 / int4 / fp16 conversion,
    EdgeExportError (one line).
    """
    say = progress.stage
    check_opset(opset)
    checkpoint_path, output_dir, form = Path(checkpoint_path), Path(output_dir), form or Form.of(merge)
    if precision not in DECODER_PRECISIONS:
        raise ExportError(f"precision {precision!r} is not supported for the decoder: "
                          f"{', '.join(DECODER_PRECISIONS)}")
    check_empty_output_dir(output_dir, [path.name for path in decoder_outputs(output_dir, form)], [checkpoint_path])
    say("loading checkpoint")
    source = _decoder_source(checkpoint_path)
    adapter = source.adapter(form)
    slots, model_path = cache_slots(source.model.config), output_dir / MODEL_FILE
    config_text = json.dumps(genai_config(source.model.config, slots), indent=2) + "\n"

    def finish(proto: onnx.ModelProto) -> None:  # what every decoder graph carries, whatever its precision
        finish_graph(proto, form)
        set_metadata(proto, export_metadata(proto, source, form, opset, {"lora_layers": layer_names},
                                            graph="decoder", cache_slots=json.dumps([slot.__dict__ for slot in slots]),
                                            cache_slack=str(CACHE_SLACK), precision=precision))

    with staged_export(output_dir) as stage:
        traced = _traced_decoder(source, form, opset, progress)
        layer_names = traced.layer_names
        if precision != "fp32" and weights_too_big_for_memory(traced.weight_bytes, external_data_threshold):
            proto = _built_on_file(traced, finish, model_path, stage, precision, slots, progress)
        else:
            proto = _fp32_or_built_in_memory(traced, finish, model_path, stage, precision, slots,
                                             external_data_threshold, progress)
        del traced  # the exporter's graph, which holds the model's tensors
        say(f"writing {output_dir}/")
        write_companions(stage, source, texts={output_dir / GENAI_CONFIG: config_text, **tokenizer_texts(output_dir)},
                         adapter=None if form is Form.MERGED else (output_dir / ADAPTER_FILE, adapter))
    say(f"decoder: {len(proto.graph.node)} nodes, {count_parameters_onnx(proto):,} parameters, "
        f"{len(slots)} cache slots")
    return output_dir


def _decoder_source(checkpoint_path: Path) -> ExportSource:
    """The checkpoint read for export, refused (ExportError) when its model cannot be a genai decoder."""
    source = ExportSource.read(checkpoint_path)
    problem = decoder_problem(source.model.config)
    if problem:
        raise ExportError(f"{checkpoint_path}: cannot be a genai decoder: {problem}")
    return source


def _traced_decoder(source: ExportSource, form: Form, opset: int, progress: Progress) -> TracedGraph:
    """The decoder graph of ``source`` in ``form``, traced, not yet serialized. Raises ExportError."""
    progress.stage(f"exporting the KV-cache decoder ({form}, opset {opset}) with torch.onnx dynamo")
    try:
        return trace_decoder(source.model, form, opset)
    except Exception as err:  # the exporter raises many exception types
        raise ExportError(f"{source.path}: decoder export failed: {first_line(err)[:200]}") from None


def _fp32_or_built_in_memory(traced: TracedGraph, finish: Callable[[onnx.ModelProto], None], model_path: Path,
                             stage: StagedOutputs, precision: str, slots: list[CacheSlot],
                             external_data_threshold: int, progress: Progress) -> onnx.ModelProto:
    """Write the decoder into ``stage``: fp32 either way (``core.serialize_traced``; one that fits checked in
    memory), or a model that fits built in ``precision`` in memory (``_in_precision``). Returns its graph."""
    proto, too_big = serialize_traced(traced, model_path, stage, external_data_threshold, progress)
    if not too_big:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as err:  # onnx raises ValidationError and friends
            raise ExportError(f"{model_path}: decoder export failed: {first_line(err)[:200]}") from None
    finish(proto)
    proto = _in_precision(proto, precision, str(model_path), slots, progress)
    write_model_files(proto, model_path, stage, external_data_threshold, on_file=bool(too_big))
    return proto


def _built_on_file(traced: TracedGraph, finish: Callable[[onnx.ModelProto], None], model_path: Path,
                   stage: StagedOutputs, precision: str, slots: list[CacheSlot], progress: Progress
                   ) -> onnx.ModelProto:
    """A decoder too big for memory in ``precision`` (int8 / int4 / fp16): the fp32 graph and its weights written
    to a scratch folder in the stage straight from the torch tensors, then built from that file into ``stage``
    (``quantize.write_precision``; fp16 keeps its cache in float16). Returns the built graph without weights."""
    with tempfile.TemporaryDirectory(prefix=".fp32.", dir=stage.path(model_path).parent) as scratch:
        fp32 = Path(scratch) / MODEL_FILE
        progress.stage(f"writing the fp32 decoder's {size_text(traced.weight_bytes)} of weights, then building "
                       f"{precision} from them")
        proto = traced.save_with_weights(fp32, progress)
        finish(proto)
        onnx.save_model(proto, fp32)  # the graph only: its weights stay in the scratch data file
        del proto
        return write_precision(fp32, model_path, precision, stage, name=str(model_path), scratch_source=True,
                               float16_io=cache_names(slots) if precision == "fp16" else ())


def cache_names(slots: list[CacheSlot]) -> list[str]:
    """The past / present tensors of the decoder graph: float16 in the fp16 decoder."""
    input_names, output_names = graph_names(slots)
    return [tensor for tensor in input_names + output_names if tensor.startswith(("past_", "present."))]


def _in_precision(proto: onnx.ModelProto, precision: str, name: str, slots: list[CacheSlot],
                  progress: Progress) -> onnx.ModelProto:
    """The decoder graph ``proto`` (fp32) in ``precision`` (see export_decoder; fp16 keeps its cache in float16);
    ``name`` names it in errors. Raises EdgeExportError."""
    say = progress.stage
    if precision == "int8":
        say("quantizing to int8 (onnxruntime.quantization)")
        return quantize_model_int8(proto, name)
    if precision == "int4":
        say("quantizing to int4 (onnxruntime MatMulNBits)")
        return quantize_model_int4(proto, name)
    if precision == "fp16":
        say("converting to fp16 (onnxruntime.transformers.float16), cache in fp16")
        return convert_model_fp16(proto, name, float16_io=cache_names(slots))
    return proto
