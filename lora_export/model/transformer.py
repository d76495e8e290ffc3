"""LoRATransformerLM: a byte-level decoder-only language model built on LoRASelfAttention.

Bytes (vocab 256, no tokenizer) -> token + learned position embedding -> ``depth`` pre-norm blocks of
causal LoRASelfAttention and a feed-forward -> final LayerNorm -> LM head -> logits [B, N, 256].
LoRA goes on the module paths that ``ModelConfig.lora_targets`` selects (:func:`lora_module_paths`: groups, module
names, paths or fnmatch patterns); r = 0 gives the plain base model.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Collection, Sequence, Set
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..errors import short_repr
from .attention import LORA_PROJECTIONS, AttentionCache, LoRASelfAttention
from .layers import LoRAEmbedding, LoRALinear, lora_layers

VOCAB_SIZE = 256
#: The target groups and the module names each one adapts (in every block; ``emb`` is the token embedding).
TARGET_GROUPS = {"q": ("to_q",), "k": ("to_k",), "v": ("to_v",), "o": ("to_out",), "ff": ("fc1", "fc2"),
                 "emb": ("token_emb",)}
LORA_TARGETS = tuple(TARGET_GROUPS)
#: Bounds of lora_targets: entries, characters of one entry, entries with fnmatch wildcards (each one is matched
#: against every adaptable module path; the others are dictionary lookups).
MAX_TARGETS = 10_000
MAX_TARGET_LENGTH = 200
MAX_TARGET_PATTERNS = 100
WILDCARDS = ("*", "?", "[")
#: The adaptable modules of each block, relative to ``blocks.{i}``.
BLOCK_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ff.fc1", "ff.fc2")


#: Inclusive bounds of the integer fields: generous for real models, small enough that no value overflows or
#: allocates without limit. Cross-field bounds (local heads <= heads, window <= max_seq_len) are checked too.
INT_RANGES = {
    "dim": (1, 1 << 16), "depth": (1, 1024), "heads": (1, 1024), "dim_head": (1, 1 << 12),
    "n_local_attn_heads": (0, 1024), "local_attn_window_size": (1, 1 << 20), "max_seq_len": (1, 1 << 20),
    "ff_mult": (1, 64), "r": (0, 1 << 12),
}
GLOBAL_ATTN = ("softmax", "linear")
MAX_PATTERN_ENTRIES = 100_000
MAX_LORA_ALPHA = 1e6


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; stored verbatim in checkpoints.

    Validated on construction (ValueError with one line): integer fields are ints in ``INT_RANGES``, with
    n_local_attn_heads <= heads and local_attn_window_size, blindspot_size <= max_seq_len; dropouts in [0, 1);
    lora_alpha finite in [0, MAX_LORA_ALPHA]; global_attn one of GLOBAL_ATTN; lora_targets a list of distinct
    entries that each select at least one module (see :func:`resolve_targets`), bounded by MAX_TARGETS,
    MAX_TARGET_LENGTH and MAX_TARGET_PATTERNS; use_rslora a bool.
    """

    dim: int = 128
    depth: int = 4
    heads: int = 4
    dim_head: int = 32
    n_local_attn_heads: int = 2
    local_attn_window_size: int = 64
    global_attn: str = "softmax"
    blindspot_size: int | None = None
    max_seq_len: int = 256
    ff_mult: int = 4
    dropout: float = 0.1
    r: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    lora_dropout: float = 0.0
    use_rslora: bool = False
    #: Per-layer exceptions, keyed by module path (``blocks.0.attn.to_q``, ``token_emb``): rank and alpha of that
    #: LoRA layer instead of ``r`` / ``lora_alpha`` (PEFT's ``rank_pattern`` / ``alpha_pattern``).
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (low, high) in INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high)
        if self.n_local_attn_heads > self.heads:
            raise ValueError(f"n_local_attn_heads must be <= heads ({self.heads}), got {self.n_local_attn_heads}")
        if self.local_attn_window_size > self.max_seq_len:
            raise ValueError(f"local_attn_window_size must be <= max_seq_len ({self.max_seq_len}), "
                             f"got {self.local_attn_window_size}")
        if self.blindspot_size is not None:
            _check_int("blindspot_size", self.blindspot_size, 1, self.max_seq_len)
        if not isinstance(self.global_attn, str) or self.global_attn not in GLOBAL_ATTN:
            raise ValueError(f"global_attn must be one of {', '.join(GLOBAL_ATTN)}, got {short_repr(self.global_attn)}")
        for name in ("dropout", "lora_dropout"):
            _check_float(name, getattr(self, name), 0.0, 1.0, high_open=True)
        _check_float("lora_alpha", self.lora_alpha, 0.0, MAX_LORA_ALPHA)
        self.lora_alpha = float(self.lora_alpha)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {short_repr(self.use_rslora)}")
        self.lora_targets = _checked_targets(self.lora_targets)
        resolve_targets(self.lora_targets, adaptable_module_paths(self))  # each entry selects a module
        for name, values, low, high in (("rank_pattern", self.rank_pattern, 1, INT_RANGES["r"][1]),
                                        ("alpha_pattern", self.alpha_pattern, 0.0, MAX_LORA_ALPHA)):
            if not isinstance(values, dict) or len(values) > MAX_PATTERN_ENTRIES:
                raise ValueError(f"{name} must be a dict of at most {MAX_PATTERN_ENTRIES} module paths, "
                                 f"got {short_repr(values)}")
            for path, value in values.items():
                if not isinstance(path, str):
                    raise ValueError(f"{name}: module paths must be strings, got {short_repr(path)}")
                (_check_int if name == "rank_pattern" else _check_float)(f"{name}[{short_repr(path)}]", value,
                                                                         low, high)
        self.alpha_pattern = {path: float(value) for path, value in self.alpha_pattern.items()}

    def to_dict(self) -> dict:
        """Plain values only, as stored in checkpoints and ONNX metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build from a stored dict; unknown keys are an error, not silently dropped. Raises ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"model config must be a dict, got {short_repr(values)}")
        known = {f.name for f in fields(cls)}
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ValueError(f"unknown model config keys: {[short_repr(k) for k in unknown[:3]]}")
        return cls(**values)


def _checked_targets(targets: object) -> list[str]:
    """``targets`` as a list, refused (ValueError, one line) unless it is a list or tuple of at most MAX_TARGETS
    distinct strings of 1..MAX_TARGET_LENGTH characters, at most MAX_TARGET_PATTERNS of them with wildcards."""
    if not isinstance(targets, list | tuple) or len(targets) > MAX_TARGETS:
        raise ValueError(f"lora_targets must be a list of at most {MAX_TARGETS} groups ({', '.join(LORA_TARGETS)}), "
                         f"module names, paths or patterns, got {short_repr(targets)}")
    for target in targets:
        if not isinstance(target, str) or not 1 <= len(target) <= MAX_TARGET_LENGTH:
            raise ValueError(f"lora_targets: unknown {short_repr(target)}, expected a group "
                             f"({', '.join(LORA_TARGETS)}) or a module name, path or pattern of 1..{MAX_TARGET_LENGTH} "
                             "characters")
    if sum(_is_pattern(target) for target in targets) > MAX_TARGET_PATTERNS:
        raise ValueError(f"lora_targets: more than {MAX_TARGET_PATTERNS} patterns (entries with * ? [)")
    if len(set(targets)) != len(targets):
        raise ValueError(f"lora_targets names a layer twice: {short_repr(list(targets))}")
    return list(targets)


def _is_pattern(target: str) -> bool:
    return any(wildcard in target for wildcard in WILDCARDS)


def _module_name(path: str) -> str:
    """The last component of a module path (``blocks.0.ff.fc1`` -> ``fc1``)."""
    return path.rsplit(".", 1)[-1]


def adaptable_module_paths(config: ModelConfig) -> list[str]:
    """Every module path of the model that can carry LoRA, in module order: ``token_emb``, then for each block i
    ``blocks.{i}.attn.to_q``, ``.to_k``, ``.to_v``, ``.to_out``, ``blocks.{i}.ff.fc1``, ``.fc2``."""
    return ["token_emb", *(f"blocks.{index}.{name}" for index in range(config.depth) for name in BLOCK_MODULES)]


def resolve_targets(targets: Sequence[str], paths: Sequence[str]) -> list[str]:
    """The module ``paths`` (in their order) that lora_targets entries select: a group (TARGET_GROUPS) its modules
    in every block; a pattern (with * ? [, fnmatch, case-sensitive, * also crossing dots) the paths it matches; an
    entry equal to a path that path; any other entry the paths whose last component equals it (``fc1``).

    Raises ValueError (one line) naming the first entry that selects nothing.
    """
    by_name: dict[str, list[str]] = {}
    for path in paths:
        by_name.setdefault(_module_name(path), []).append(path)
    known, chosen = set(paths), set()
    for target in targets:
        if target in TARGET_GROUPS:
            found = [path for name in TARGET_GROUPS[target] for path in by_name.get(name, [])]
        elif _is_pattern(target):
            matches = re.compile(fnmatch.translate(target)).match
            found = [path for path in paths if matches(path)]
        else:
            found = [target] if target in known else by_name.get(target, [])
        if not found:
            raise ValueError(f"lora_targets: unknown {short_repr(target)}: selects no module of this model (give a "
                             f"group {', '.join(LORA_TARGETS)}, or a module name, path or pattern such as fc1, "
                             "blocks.0.attn.to_q, blocks.*.ff.fc1)")
        chosen.update(found)
    return [path for path in paths if path in chosen]


def lora_module_paths(config: ModelConfig) -> list[str]:
    """The module paths that carry LoRA (rank ``r``, or their ``rank_pattern`` entry), in module order: what
    ``lora_targets`` selects among :func:`adaptable_module_paths`; none when r = 0. Every builder uses this."""
    return [] if config.r == 0 else resolve_targets(config.lora_targets, adaptable_module_paths(config))


def compact_targets(paths: Collection[str], config: ModelConfig) -> list[str]:
    """The shortest lora_targets (for ``config``'s depth) that select exactly ``paths``: the groups all of whose
    modules are in ``paths``, then the module names all of whose modules are (in module order, those no group
    covers), then the remaining paths in module order. Raises ValueError for a path that is not adaptable."""
    adaptable = adaptable_module_paths(config)
    chosen, unknown = set(paths), set(paths) - set(adaptable)
    if unknown:
        raise ValueError(f"not adaptable module paths: {short_repr(sorted(unknown))}")
    names = list(dict.fromkeys(_module_name(path) for path in adaptable))
    whole = {name for name in names
             if all(path in chosen for path in adaptable if _module_name(path) == name)}
    groups = [group for group, members in TARGET_GROUPS.items() if whole.issuperset(members)]
    in_groups = {name for group in groups for name in TARGET_GROUPS[group]}
    rest = [path for path in adaptable if path in chosen and _module_name(path) not in whole]
    return [*groups, *(name for name in names if name in whole - in_groups), *rest]


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {short_repr(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {short_repr(value)}")


def _check_float(name: str, value: object, low: float, high: float, high_open: bool = False) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {short_repr(value)}")
    if not low <= value <= high or (high_open and value == high):
        interval = f"[{low:g}, {high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {short_repr(value)}")


class FeedForward(nn.Module):
    """Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim) -> dropout; LoRA (rank ``config.r``) on a linear whose
    path (``{path}.fc1``, ``{path}.fc2``) is in ``lora_paths`` (:func:`lora_module_paths`)."""

    def __init__(self, config: ModelConfig, path: str, lora_paths: Set[str]) -> None:
        super().__init__()
        hidden = config.dim * config.ff_mult
        lora = dict(lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora)
        self.fc1 = LoRALinear(config.dim, hidden, r=config.r if f"{path}.fc1" in lora_paths else 0, **lora)
        self.act = nn.GELU()
        self.fc2 = LoRALinear(hidden, config.dim, r=config.r if f"{path}.fc2" in lora_paths else 0, **lora)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, dim] -> [B, N, dim]."""
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """x + attn(norm(x)), then x + ff(norm(x)). ``path`` is the block's module path (``blocks.0``): its projections
    and feed-forward linears carry LoRA where their paths are in ``lora_paths`` (:func:`lora_module_paths`)."""

    def __init__(self, config: ModelConfig, path: str, lora_paths: Set[str]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = LoRASelfAttention(
            dim=config.dim,
            heads=config.heads,
            r=config.r,
            lora_alpha=config.lora_alpha,
            enable_lora=[group for group in LORA_PROJECTIONS
                         if f"{path}.attn.{TARGET_GROUPS[group][0]}" in lora_paths],
            causal=True,
            dim_head=config.dim_head,
            blindspot_size=config.blindspot_size,
            n_local_attn_heads=config.n_local_attn_heads,
            local_attn_window_size=config.local_attn_window_size,
            attn_dropout=config.dropout,
            dropout=config.dropout,
            global_attn=config.global_attn,
            use_rslora=config.use_rslora,
            lora_dropout=config.lora_dropout,
        )
        self.norm2 = nn.LayerNorm(config.dim)
        self.ff = FeedForward(config, f"{path}.ff", lora_paths)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: AttentionCache | None = None) -> torch.Tensor:
        """x [B, N, dim], mask [B, N] bool (True = real token) or None -> [B, N, dim]; see LoRASelfAttention."""
        x = x + self.attn(self.norm1(x), mask, cache)
        return x + self.ff(self.norm2(x))


class DecodeCache:
    """The state of incremental decoding: one AttentionCache per block and the positions seen (``length``)."""

    def __init__(self, depth: int) -> None:
        self.layers = [AttentionCache() for _ in range(depth)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class LoRATransformerLM(nn.Module):
    """Byte-level causal LM. forward(input_ids [B, N] int64, attention_mask [B, N] or None) -> logits [B, N, 256].

    ``attention_mask`` is a key-padding mask (nonzero / True = real token); 1 <= N <= max_seq_len.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        lora_paths = set(lora_module_paths(config))
        emb_r = config.r if "token_emb" in lora_paths else 0
        self.token_emb = LoRAEmbedding(VOCAB_SIZE, config.dim, r=emb_r, lora_alpha=config.lora_alpha,
                                       use_rslora=config.use_rslora)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        # An embedding table (looked up with a Gather) rather than a sliced parameter: ONNX Runtime's dynamic
        # int8 quantization quantizes Gathers on constant tables, not Slices.
        self.pos_emb = nn.Embedding(config.max_seq_len, config.dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, f"blocks.{index}", lora_paths) for index in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, VOCAB_SIZE)
        layers = dict(lora_layers(self))
        for path in sorted({*config.rank_pattern, *config.alpha_pattern}):
            if path not in layers:
                raise ValueError(f"rank_pattern / alpha_pattern: {short_repr(path)} is not a LoRA layer of this "
                                 f"model (the targets' module paths: {', '.join(list(layers)[:4])}, ...)")
            layers[path].set_rank(config.rank_pattern.get(path, config.r),
                                  config.alpha_pattern.get(path, config.lora_alpha))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: DecodeCache | None = None) -> torch.Tensor:
        """Logits [B, N, 256] of input_ids [B, N]; with ``cache`` (from ``new_cache()``), of the N bytes after the
        cache's ``length`` ones (attention_mask [B, N] covers only those), extending the cache in place: the same
        logits as the full forward over the whole sequence at those positions."""
        start = 0 if cache is None else cache.length
        n = input_ids.shape[1]
        if start + n > self.config.max_seq_len:
            raise ValueError(f"sequence length {start + n} exceeds max_seq_len {self.config.max_seq_len}")
        positions = torch.arange(start, start + n, device=input_ids.device)
        x = self.dropout(self.token_emb(input_ids) + self.pos_emb(positions))
        mask = None if attention_mask is None else attention_mask.bool()
        for index, block in enumerate(self.blocks):
            x = block(x, mask, None if cache is None else cache.layers[index])
        return self.lm_head(self.norm(x))

    def new_cache(self) -> DecodeCache:
        """An empty DecodeCache for incremental decoding with forward(..., cache=...)."""
        return DecodeCache(self.config.depth)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> torch.Tensor:
        """Extend prompt [B, N0] by max_new_tokens bytes -> [B, N0 + max_new_tokens], decoding incrementally with a
        DecodeCache, in eval mode (no dropout; the previous mode is restored).

        The same choices as ``lora-export generate``: greedy (the argmax) by default; with ``greedy=False``, samples
        from softmax(logits / temperature) restricted to the ``top_k`` likeliest bytes (0: all), seeded by ``seed``.
        Raises ValueError (see :func:`check_generation_request`) for an empty prompt or a prompt plus budget beyond
        max_seq_len: the positions are learned, so nothing is cropped.
        """
        check_generation_request(prompt.shape[1], max_new_tokens, self.config.max_seq_len, greedy, temperature, top_k,
                                 minimum_new=0)
        generator = None if greedy else torch.Generator(device=prompt.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        ids, fresh, cache = prompt, prompt, self.new_cache()
        for _ in range(max_new_tokens):
            logits = self(fresh, cache=cache)[:, -1, :]
            if greedy:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
            fresh = next_id
        self.train(was_training)
        return ids


def check_generation_request(prompt_length: int, max_new: int, max_seq_len: int, greedy: bool, temperature: float,
                             top_k: int, minimum_new: int = 1) -> None:
    """Refuse (ValueError, one line) a generation that cannot run as asked, the same rule for PyTorch and genai: an
    empty prompt, fewer than ``minimum_new`` new bytes, a prompt plus budget beyond ``max_seq_len`` (learned
    positions: nothing is cropped), and when sampling a temperature that is not finite and > 0 or a top_k outside
    0..256."""
    if prompt_length < 1:
        raise ValueError("the prompt is empty: give at least one byte")
    if max_new < minimum_new:
        raise ValueError(f"the number of new bytes must be >= {minimum_new}, got {max_new}")
    if prompt_length + max_new > max_seq_len:
        raise ValueError(f"prompt ({prompt_length} bytes) + {max_new} new bytes exceed the model's max_seq_len "
                         f"{max_seq_len} (learned positions: nothing is cropped)")
    if not greedy and not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0 <= top_k <= VOCAB_SIZE:
        raise ValueError(f"top_k must be in 0..{VOCAB_SIZE}, got {top_k}")
