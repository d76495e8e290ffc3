"""LoRATransformerLM: a byte-level decoder-only language model built on LoRASelfAttention.

Bytes (vocab 256, no tokenizer) -> token + learned position embedding -> ``depth`` pre-norm blocks of
causal LoRASelfAttention and a feed-forward -> final LayerNorm -> LM head -> logits [B, N, 256].
LoRA goes on the layers named in ``ModelConfig.lora_targets``; r = 0 gives the plain base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .attention import LORA_PROJECTIONS, LoRASelfAttention
from .layers import LoRAEmbedding, LoRALinear

VOCAB_SIZE = 256
LORA_TARGETS = (*LORA_PROJECTIONS, "ff", "emb")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; stored verbatim in checkpoints."""

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

    def __post_init__(self) -> None:
        self.lora_targets = list(self.lora_targets)
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora_targets: unknown {sorted(unknown)}, expected any of {', '.join(LORA_TARGETS)}")
        for name in ("dim", "depth", "heads", "dim_head", "max_seq_len", "ff_mult", "local_attn_window_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """Plain values only, as stored in checkpoints and ONNX metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build from a stored dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values)


class FeedForward(nn.Module):
    """Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim) -> dropout; LoRA on both linears if asked."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        r = config.r if "ff" in config.lora_targets else 0
        hidden = config.dim * config.ff_mult
        lora = dict(r=r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora)
        self.fc1 = LoRALinear(config.dim, hidden, **lora)
        self.act = nn.GELU()
        self.fc2 = LoRALinear(hidden, config.dim, **lora)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, dim] -> [B, N, dim]."""
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = LoRASelfAttention(
            dim=config.dim,
            heads=config.heads,
            r=config.r,
            lora_alpha=config.lora_alpha,
            enable_lora=[t for t in config.lora_targets if t in LORA_PROJECTIONS],
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
        self.ff = FeedForward(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, dim], mask [B, N] bool (True = real token) or None -> [B, N, dim]."""
        x = x + self.attn(self.norm1(x), mask)
        return x + self.ff(self.norm2(x))


class LoRATransformerLM(nn.Module):
    """Byte-level causal LM. forward(input_ids [B, N] int64, attention_mask [B, N] or None) -> logits [B, N, 256].

    ``attention_mask`` is a key-padding mask (nonzero / True = real token); 1 <= N <= max_seq_len.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        emb_r = config.r if "emb" in config.lora_targets else 0
        self.token_emb = LoRAEmbedding(VOCAB_SIZE, config.dim, r=emb_r, lora_alpha=config.lora_alpha,
                                       use_rslora=config.use_rslora)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        # An embedding table (looked up with a Gather) rather than a sliced parameter: ONNX Runtime's dynamic
        # int8 quantization quantizes Gathers on constant tables, not Slices.
        self.pos_emb = nn.Embedding(config.max_seq_len, config.dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, VOCAB_SIZE)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n = input_ids.shape[1]
        if n > self.config.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds max_seq_len {self.config.max_seq_len}")
        positions = torch.arange(n, device=input_ids.device)
        x = self.dropout(self.token_emb(input_ids) + self.pos_emb(positions))
        mask = None if attention_mask is None else attention_mask.bool()
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend prompt [B, N0] by max_new_tokens bytes -> [B, N0 + max_new_tokens].

        Greedy takes the argmax; otherwise samples from softmax(logits / temperature), restricted to
        the top_k bytes when given. The context is cropped to the last max_seq_len bytes. Runs in eval
        mode (no dropout) and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        ids = prompt
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_seq_len:])[:, -1, :]
            if greedy:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        self.train(was_training)
        return ids
