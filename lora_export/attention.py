"""LoRASelfAttention: local-window heads plus global heads, with LoRA on the chosen projections.

Per head, with q_i, k_j, v_j in R^d and a key-padding mask m_j (True = real token):

* softmax heads: p_ij = softmax_j(q_i . k_j / sqrt(d)) over the visible keys, out_i = sum_j p_ij v_j;
  a query that sees no key outputs 0.
* the first ``n_local_attn_heads`` heads are local with window w: key j is visible to query i iff
  0 <= i - j < w (causal) or |i - j| < w (non-causal). They run blockwise in O(N * w) time and memory.
* the other heads are global: all keys (non-causal), j <= i (causal), or with ``blindspot_size`` b > 1
  only keys of earlier blocks, floor(j / b) < floor(i / b). ``global_attn='linear'`` uses the linear
  attention of lucidrains' linear-attention-transformer instead of softmax.
* masked keys never contribute. Heads are concatenated (local first) and projected by ``to_out``.

Everything traces through ``torch.onnx.export`` with dynamic batch and sequence length: no Python
branch depends on a tensor value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LoRALinear

LORA_PROJECTIONS = ("q", "k", "v", "o")
LINEAR_ATTN_EPS = 1e-3


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``visible``; rows with nothing visible are all zero.

    Filling with the dtype's minimum (not -inf) keeps empty rows finite; the final product zeroes them.
    """
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1) * visible.to(scores.dtype)


def _with_neighbour_blocks(blocks: torch.Tensor, causal: bool) -> torch.Tensor:
    """[..., nb, w, d] -> [..., nb, 2w or 3w, d]: each block preceded (and followed) by its neighbour.

    Missing neighbours at the ends are zero-filled; callers mask them out through the key mask.
    """
    previous = F.pad(blocks, (0, 0, 0, 0, 1, 0))[..., :-1, :, :]
    if causal:
        return torch.cat([previous, blocks], dim=-2)
    following = F.pad(blocks, (0, 0, 0, 0, 0, 1))[..., 1:, :, :]
    return torch.cat([previous, blocks, following], dim=-2)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_keep: torch.Tensor,
    window: int,
    causal: bool,
    dropout: nn.Module,
) -> torch.Tensor:
    """Sliding-window softmax attention computed block by block.

    q, k, v: [B, H, N, d]; key_keep: [B, N] float (1 = real key). Returns [B, H, N, d].
    The sequence is padded inside to a multiple of ``window``; each block of w queries scores only the
    keys of its own block and its neighbours, so nothing of size N x N is ever built.
    """
    n, d = q.shape[-2], q.shape[-1]
    pad = (-n) % window
    q, k, v = (F.pad(t, (0, 0, 0, pad)).unflatten(-2, (-1, window)) for t in (q, k, v))
    key_keep = F.pad(key_keep, (0, pad)).unflatten(-1, (-1, window))[:, None, :, :, None]
    k, v = _with_neighbour_blocks(k, causal), _with_neighbour_blocks(v, causal)
    key_keep = _with_neighbour_blocks(key_keep, causal).squeeze(-1)  # [B, 1, nb, kw]

    # Query i of a block and key j of its neighbourhood are (i + w - j) positions apart.
    query_pos = torch.arange(window, device=q.device)[:, None]
    key_pos = torch.arange(k.shape[-2], device=q.device)[None, :]
    distance = query_pos + window - key_pos
    in_window = (distance >= 0) & (distance < window) if causal else distance.abs() < window

    scores = (q @ k.transpose(-1, -2)) * d**-0.5  # [B, H, nb, w, kw]
    visible = in_window & (key_keep[..., None, :] > 0.5)
    out = dropout(masked_softmax(scores, visible)) @ v  # [B, H, nb, w, d]
    return out.flatten(-3, -2)[..., :n, :]


def causal_visibility(n: int, blindspot_size: int | None, device: torch.device) -> torch.Tensor:
    """[N, N] bool: key j visible to query i. j <= i, or floor(j/b) < floor(i/b) with a blindspot b > 1."""
    pos = torch.arange(n, device=device)
    if blindspot_size is not None and blindspot_size > 1:
        block = pos // blindspot_size
        return block[None, :] < block[:, None]
    return pos[None, :] <= pos[:, None]


def global_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_keep: torch.Tensor,
    causal: bool,
    blindspot_size: int | None,
    dropout: nn.Module,
) -> torch.Tensor:
    """Full softmax attention. q, k, v: [B, H, N, d]; key_keep: [B, N] float. Returns [B, H, N, d]."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, N, N]
    visible = key_keep[:, None, None, :] > 0.5
    if causal:
        visible = visible & causal_visibility(q.shape[-2], blindspot_size, q.device)
    return dropout(masked_softmax(scores, visible)) @ v


def global_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_keep: torch.Tensor,
    causal: bool,
    blindspot_size: int | None,
) -> torch.Tensor:
    """Linear attention (lucidrains' linear-attention-transformer). Shapes as global_softmax_attention.

    Non-causal: out_i = Q_i (K^T V) with Q = softmax over features, K = softmax over positions.
    Causal: out_i = Q_i . S_i / max(Q_i . z_i, 1e-3), where S_i and z_i sum exp(k_j)^T v_j and
    exp(k_j) over the visible keys (running sums; with a blindspot, up to the query's block start).
    """
    keep = key_keep[:, None, :, None] > 0.5  # [B, 1, N, 1]
    q = q.softmax(dim=-1) * q.shape[-1] ** -0.5
    v = v * keep.to(v.dtype)
    if not causal:
        k = k.masked_fill(~keep, torch.finfo(k.dtype).min).softmax(dim=-2)
        return q @ (k.transpose(-1, -2) @ v)

    k = torch.where(keep, k.exp(), torch.zeros_like(k))
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, N, d, d]
    kv_sum, k_sum = kv.cumsum(dim=2), k.cumsum(dim=2)
    if blindspot_size is not None and blindspot_size > 1:
        # Sums of all keys before the first position of the query's block (exclusive prefix sums).
        pos = torch.arange(q.shape[-2], device=q.device)
        block_start = (pos // blindspot_size) * blindspot_size
        kv_sum = F.pad(kv_sum, (0, 0, 0, 0, 1, 0)).index_select(2, block_start)
        k_sum = F.pad(k_sum, (0, 0, 1, 0)).index_select(2, block_start)
    numerator = (q.unsqueeze(-2) @ kv_sum).squeeze(-2)  # [B, H, N, d]
    denominator = (q * k_sum).sum(dim=-1, keepdim=True).clamp(min=LINEAR_ATTN_EPS)
    return numerator / denominator


class LoRASelfAttention(nn.Module):
    """Multi-head self-attention with local-window and global heads and LoRA on q, k, v, o.

    forward(x [B, N, dim], mask [B, N] bool or None, True = real token) -> [B, N, dim].
    Outputs at padded query positions are finite but meaningless.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        r: int = 8,
        lora_alpha: float = 16,
        enable_lora: Sequence[str] = ("q", "k", "v", "o"),
        causal: bool = False,
        dim_head: int = 64,
        blindspot_size: int | None = None,
        n_local_attn_heads: int = 0,
        local_attn_window_size: int = 128,
        attn_dropout: float = 0.1,
        dropout: float = 0.1,
        global_attn: str = "softmax",
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = set(enable_lora) - set(LORA_PROJECTIONS)
        if unknown:
            raise ValueError(f"enable_lora: unknown projections {sorted(unknown)}, expected any of q, k, v, o")
        if not 0 <= n_local_attn_heads <= heads:
            raise ValueError(f"n_local_attn_heads must be in 0..{heads}, got {n_local_attn_heads}")
        if local_attn_window_size < 1:
            raise ValueError(f"local_attn_window_size must be >= 1, got {local_attn_window_size}")
        if global_attn not in ("softmax", "linear"):
            raise ValueError(f"global_attn must be 'softmax' or 'linear', got {global_attn!r}")
        if blindspot_size is not None and blindspot_size < 1:
            raise ValueError(f"blindspot_size must be >= 1 or None, got {blindspot_size}")
        if blindspot_size is not None and blindspot_size > 1 and not causal:
            raise ValueError("blindspot_size > 1 needs causal=True")

        self.heads = heads
        self.dim_head = dim_head
        self.causal = causal
        self.blindspot_size = blindspot_size
        self.n_local_attn_heads = n_local_attn_heads
        self.local_attn_window_size = local_attn_window_size
        self.global_attn = global_attn
        inner = heads * dim_head

        def projection(name: str, in_features: int, out_features: int, bias: bool) -> LoRALinear:
            # A projection without LoRA is a LoRALinear of rank 0, i.e. a plain linear layer.
            rank = r if name in enable_lora else 0
            return LoRALinear(in_features, out_features, rank, lora_alpha, lora_dropout, use_rslora, bias=bias)

        self.to_q = projection("q", dim, inner, bias=False)
        self.to_k = projection("k", dim, inner, bias=False)
        self.to_v = projection("v", dim, inner, bias=False)
        self.to_out = projection("o", inner, dim, bias=True)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # [B, H, N, d]
        key_keep = torch.ones_like(x[..., 0]) if mask is None else mask.to(x.dtype)  # [B, N]

        nl = self.n_local_attn_heads
        outputs = []
        if nl > 0:
            outputs.append(local_attention(q[:, :nl], k[:, :nl], v[:, :nl], key_keep,
                                           self.local_attn_window_size, self.causal, self.attn_dropout))
        if nl < self.heads:
            qg, kg, vg = q[:, nl:], k[:, nl:], v[:, nl:]
            if self.global_attn == "softmax":
                outputs.append(global_softmax_attention(qg, kg, vg, key_keep, self.causal,
                                                        self.blindspot_size, self.attn_dropout))
            else:
                outputs.append(global_linear_attention(qg, kg, vg, key_keep, self.causal, self.blindspot_size))
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        return self.dropout(self.to_out(out.transpose(1, 2).flatten(-2)))
