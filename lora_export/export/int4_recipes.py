"""How an int4 build quantizes: ``Int4Recipe`` (block size, zero points, algorithm, per-layer exceptions,
embeddings) and ``apply_int4_recipe``, which runs ONNX Runtime's ``MatMulNBitsQuantizer`` on a graph in place.

Per-layer exceptions name layer groups of our pre-norm transformer graphs, found by where a weight MatMul sits
between the graph's LayerNormalization nodes (``layer_groups``): 2 per block (attention, feed-forward) and a
final one, in node order, in every graph the exporter writes (scoring, genai decoder; merged or adapters form).
``head``: the MatMuls after the final norm (the LM head); ``first`` / ``last``: those of the first / last block;
``up``: the feed-forward up-projections (the MatMuls reading a block's second norm directly).

``INT4_DEFAULT`` was picked by measurement (``tools/int4_quality.py``, results in ``tools/results/int4_quality.md``):
the smallest build of the demo model whose next-byte top-1 agreement with fp32 on held-out prose reaches 97 %.
``INT4_RECIPES["rtn"]`` is the earlier build: every weight MatMul in 4 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from ..errors import EdgeExportError

#: The layer groups a recipe may keep in higher precision (see the module docstring).
INT4_LAYER_GROUPS = ("head", "first", "last", "up")
#: The quantization algorithms of the 4-bit MatMuls: ONNX Runtime's round to nearest (``DefaultWeightOnlyQuantConfig``)
#: and half-quadratic quantization (``HQQWeightOnlyQuantConfig``, float zero points, no ``accuracy_level``).
INT4_ALGORITHMS = ("rtn", "hqq")


@dataclass(frozen=True)
class Int4Recipe:
    """One way to build int4.

    block_size: weights along the input axis sharing a scale (and zero point), a power of 2 >= 16.
    symmetric: no zero point (levels -8..7 times the scale); else a 4-bit zero point per block.
    accuracy_level: MatMulNBits' ``accuracy_level`` (0 unset, 1 fp32 compute, 4 int8 activations); rtn only.
    algorithm: one of INT4_ALGORITHMS, for the 4-bit MatMuls.
    eight_bit: layer groups (INT4_LAYER_GROUPS) built as 8-bit MatMulNBits (round to nearest, same blocks).
    float_layers: layer groups left float32 MatMuls.
    embeddings: the float embedding tables (Gathers of a constant) also 4-bit (``GatherBlockQuantized``, blocks
    along the embedding axis); rtn only.
    """

    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    algorithm: str = "rtn"
    eight_bit: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    embeddings: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of 2 >= 16, got {self.block_size}")
        if self.algorithm not in INT4_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(INT4_ALGORITHMS)}, got {self.algorithm!r}")
        unknown = sorted(set(self.eight_bit + self.float_layers) - set(INT4_LAYER_GROUPS))
        if unknown:
            raise ValueError(f"unknown layer groups {unknown}, expected some of {', '.join(INT4_LAYER_GROUPS)}")
        if self.embeddings and self.algorithm != "rtn":
            raise ValueError("embeddings are quantized by round to nearest only (ONNX Runtime's HQQ has no Gather)")

    def describe(self) -> str:
        """One line, e.g. 'rtn, blocks of 32, asymmetric, accuracy level 4; 8-bit: head, first, up'."""
        parts = [f"{self.algorithm}, blocks of {self.block_size}, {'symmetric' if self.symmetric else 'asymmetric'}"]
        if self.algorithm == "rtn":
            parts[0] += f", accuracy level {self.accuracy_level}"
        if self.eight_bit:
            parts.append(f"8-bit: {', '.join(self.eight_bit)}")
        if self.float_layers:
            parts.append(f"float: {', '.join(self.float_layers)}")
        if self.embeddings:
            parts.append("4-bit embeddings")
        return "; ".join(parts)


#: Named recipes (``quantize_int4(..., recipe=INT4_RECIPES[name])``): ``mixed``, the default, and ``rtn``, every
#: weight MatMul 4-bit as before (blocks of 32 with a 4-bit zero point, accuracy level 4).
INT4_RECIPES = {
    "mixed": Int4Recipe(eight_bit=("head", "first", "up")),
    "rtn": Int4Recipe(),
}
INT4_DEFAULT = INT4_RECIPES["mixed"]


def layer_groups(model: onnx.ModelProto, weight_nodes: Sequence[str]) -> dict[str, list[str]]:
    """{group: names} of ``weight_nodes`` (MatMuls of ``model``) for each of INT4_LAYER_GROUPS, in node order.

    Block b holds the MatMuls between its norms 2b + 1 and 2b + 3 (1-based, in node order); a MatMul in the second
    half of a block reading that norm's output directly is its up-projection. Raises EdgeExportError for a graph
    without the 2 * depth + 1 norms of our transformers, or a weight MatMul before the first.
    """
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    norms = sum(node.op_type == "LayerNormalization" for node in model.graph.node)
    if norms < 3 or norms % 2 == 0:
        raise EdgeExportError(f"cannot find the transformer blocks: {norms} LayerNormalization nodes, expected "
                              "2 per block and a final one")
    wanted, groups = set(weight_nodes), {group: [] for group in INT4_LAYER_GROUPS}
    seen = 0
    for node in model.graph.node:
        seen += node.op_type == "LayerNormalization"
        if node.name not in wanted:
            continue
        if seen == 0:
            raise EdgeExportError(f"cannot find the transformer blocks: weight MatMul {node.name} before any norm")
        if seen == norms:
            groups["head"].append(node.name)
            continue
        block = (seen - 1) // 2
        if block == 0:
            groups["first"].append(node.name)
        if block == (norms - 3) // 2:
            groups["last"].append(node.name)
        if seen % 2 == 0 and producers.get(node.input[0]) == "LayerNormalization":
            groups["up"].append(node.name)
    return groups


def _quantize(model: onnx.ModelProto, recipe: Int4Recipe, bits: int, exclude: Sequence[str],
              op_types: tuple[str, ...] = ("MatMul",)) -> None:
    """One ``MatMulNBitsQuantizer`` pass over ``model`` in place: every constant-weight node of ``op_types`` not in
    ``exclude`` to ``bits`` (8: always round to nearest)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    hqq = recipe.algorithm == "hqq" and bits == 4
    config = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=bits) if hqq else None
    MatMulNBitsQuantizer(model, bits=bits, block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                         accuracy_level=recipe.accuracy_level, nodes_to_exclude=list(exclude),
                         op_types_to_quantize=op_types, algo_config=config).process()


def apply_int4_recipe(model: onnx.ModelProto, recipe: Int4Recipe, weight_nodes: Sequence[str],
                      embedding_nodes: Sequence[str]) -> onnx.ModelProto:
    """``model`` quantized in place by ``recipe``; returns it. ``weight_nodes``: its MatMuls with a constant weight
    (all others, e.g. those reading LoRA inputs, are left alone); ``embedding_nodes``: its Gathers of a constant
    float table. Passes: the ``eight_bit`` groups to 8 bits, then (``embeddings``) the tables, then the remaining
    weight MatMuls but the ``float_layers`` to 4 bits; a pass never touches what an earlier one made
    (``MatMulNBits`` / ``GatherBlockQuantized`` are not its op types). Raises EdgeExportError (``layer_groups``);
    the quantizer's own exceptions propagate."""
    groups = layer_groups(model, weight_nodes) if recipe.eight_bit or recipe.float_layers else {}
    eight = {name for group in recipe.eight_bit for name in groups[group]}
    kept = {name for group in recipe.float_layers for name in groups[group]}
    weights = set(weight_nodes)
    others = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in weights]
    if eight - kept:
        _quantize(model, recipe, 8, [*others, *(weights - (eight - kept))])
    if recipe.embeddings:
        tables = set(embedding_nodes)
        _quantize(model, recipe, 4, [node.name for node in model.graph.node
                                     if node.op_type == "Gather" and node.name not in tables], ("Gather",))
    _quantize(model, recipe, 4, [*others, *kept])
    return model
