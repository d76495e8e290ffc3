"""Write a checkpoint of a given parameter count, for benchmarks and tests of models of real size (issue 18).

    python tools/make_sized.py --params 105M -o /tmp/sized-105M.pt
    python tools/make_sized.py --params 1.23B -o /tmp/sized-1.23B.safetensors
    python tools/make_sized.py --params 405M --dtype bf16 -o /tmp/sized-405M-bf16.safetensors

The architecture is lora-export's own (``LoRATransformerLM``): LoRA r 16 on q, k, v, o and ff, a local window of
128, max_seq_len 1024, half the heads local, softmax global heads, head size 64. The width comes from the size
(``WIDTHS``) and the depth is the one whose parameter count (base + LoRA, counted on the meta device) is nearest to
``--params``. Weights are random: the base as the model initializes it, the LoRA B matrices (zeros at
initialization) drawn too, so that the merged and adapter forms differ from the base. No training. ``--dtype``
(fp32, bf16 or fp16; default fp32) is the dtype the weights are stored in: drawn in fp32, rounded when saved, as a
real model's checkpoint in half precision.

Memory: the model once (``--params`` x 4 bytes, fp32); ``save_checkpoint`` copies no weights, but for bf16 or fp16
holds their cast copy too (+ half the fp32 size). Measured at 105M (0.41 GB), fp32: 0.73 GB peak RSS for .pt and
.safetensors alike, the interpreter and torch being 0.31 GB of it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lora_export.model.checkpoint import CHECKPOINT_SUFFIXES, DTYPE_NAMES, save_checkpoint
from lora_export.model.transformer import LoRATransformerLM, ModelConfig

#: (largest parameter count, dim, heads): the width of a model of that size, as in common LMs of the size.
WIDTHS = ((60e6, 512, 8), (250e6, 768, 12), (800e6, 1024, 16), (float("inf"), 2048, 32))
DIM_HEAD = 64
SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}
#: Standard deviation of the drawn LoRA B entries: small enough that the adapted model stays near its base.
LORA_B_STD = 0.02
#: The dtypes ``--dtype`` names.
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items() if name in ("fp32", "bf16", "fp16")}


def parse_count(text: str) -> int:
    """'27M', '1.23B', '405m' or '1000000' -> a parameter count. Raises ValueError with one line."""
    text = text.strip().upper()
    scale = SUFFIXES.get(text[-1:], None)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise ValueError(f"--params: {text!r} is not a count (e.g. 27M, 105M, 1.23B)") from None
    if not 1e5 <= value <= 1e11:
        raise ValueError(f"--params: {text} is outside 100K..100B")
    return int(value)


def sized_config(depth: int, dim: int, heads: int) -> ModelConfig:
    """The issue's architecture at this depth and width."""
    return ModelConfig(dim=dim, depth=depth, heads=heads, dim_head=DIM_HEAD, n_local_attn_heads=heads // 2,
                       local_attn_window_size=128, global_attn="softmax", max_seq_len=1024, dropout=0.0, r=16,
                       lora_alpha=32.0, lora_targets=["q", "k", "v", "o", "ff"])


def count_parameters(config: ModelConfig) -> int:
    """Parameters (base + LoRA) of the model of ``config``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LoRATransformerLM(config).parameters())


def config_for(params: int) -> ModelConfig:
    """The config whose parameter count is nearest ``params``: the width of ``WIDTHS``, the depth solved from the
    count at depth 1 and 2 (it grows linearly with depth)."""
    dim, heads = next((dim, heads) for limit, dim, heads in WIDTHS if params <= limit)
    one, two = count_parameters(sized_config(1, dim, heads)), count_parameters(sized_config(2, dim, heads))
    depth = max(1, round((params - one) / (two - one)) + 1)
    return sized_config(depth, dim, heads)


def random_model(config: ModelConfig, seed: int) -> LoRATransformerLM:
    """The model of ``config`` with random base weights and random, nonzero LoRA (B drawn, in place)."""
    torch.manual_seed(seed)
    model = LoRATransformerLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_(0.0, LORA_B_STD)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="parameter count: 27M, 105M, 405M, 1.23B, ...")
    parser.add_argument("-o", "--output", required=True, type=Path, help="checkpoint to write (.pt or .safetensors)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype the weights are stored in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        params = parse_count(args.params)
    except ValueError as err:
        parser.exit(2, f"make_sized: {err}\n")
    if args.output.suffix not in CHECKPOINT_SUFFIXES:
        parser.exit(2, f"make_sized: {args.output}: the output must end in {' or '.join(CHECKPOINT_SUFFIXES)}\n")
    if args.output.exists() and not args.force:
        parser.exit(2, f"make_sized: {args.output}: exists (--force replaces it)\n")
    config = config_for(params)
    count = count_parameters(config)
    dtype = DTYPES[args.dtype]
    print(f"dim {config.dim}, depth {config.depth}, heads {config.heads}: {count:,} parameters "
          f"({count * dtype.itemsize / 1e9:.2f} GB {args.dtype})", flush=True)
    start = time.perf_counter()
    model = random_model(config, args.seed)
    save_checkpoint(args.output, model, {"made_by": "tools/make_sized.py", "seed": args.seed, "parameters": count},
                    dtype=dtype)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
