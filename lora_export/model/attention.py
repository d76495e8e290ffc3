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

Incremental decoding (causal only): ``forward(x, mask, cache=AttentionCache)`` attends the new positions to
the cached ones and extends the cache, with the same result as the full forward over the whole sequence. Local
heads keep only the last w - 1 keys (all a later query can still see), global softmax heads the full history,
linear global heads their running sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


def causal_visibility(n: int, blindspot_size: int | None, device: torch.device, start: int = 0) -> torch.Tensor:
    """[N, start + N] bool: key j visible to query i (query positions start..start+N-1, keys 0..start+N-1).

    j <= i, or floor(j/b) < floor(i/b) with a blindspot b > 1.
    """
    query = torch.arange(start, start + n, device=device)
    key = torch.arange(start + n, device=device)
    if blindspot_size is not None and blindspot_size > 1:
        return (key[None, :] // blindspot_size) < (query[:, None] // blindspot_size)
    return key[None, :] <= query[:, None]


_fused = True


@contextlib.contextmanager
def decomposed_attention() -> Iterator[None]:
    """Within the block, ``fused_attention`` computes the explicit masked softmax instead of PyTorch's fused kernel.

    For ONNX exports below opset 23: the exporter's own decomposition of a masked ``scaled_dot_product_attention``
    there does not match PyTorch (checked with torch 2.13), ours does.
    """
    global _fused
    previous, _fused = _fused, False
    try:
        yield
    finally:
        _fused = previous


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                    dropout: nn.Dropout | None = None) -> torch.Tensor:
    """Softmax attention through PyTorch's fused ``scaled_dot_product_attention``: q [B, H, N, d], k / v
    [B, H, M, d], visible bool broadcastable to [B, H, N, M] -> [B, H, N, d]; a query that sees no key outputs 0.

    The ONNX exporter writes it as one ``Attention`` node (opset 23), ONNX Runtime's fused kernel.
    """
    p = dropout.p if dropout is not None and dropout.training else 0.0
    if not _fused:
        probabilities = masked_softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, visible)
        return F.dropout(probabilities, p) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p)


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
    visible = key_keep[:, None, None, :] > 0.5
    if causal:
        visible = visible & causal_visibility(q.shape[-2], blindspot_size, q.device)
    return fused_attention(q, k, v, visible, dropout)


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
    kv_sum, k_sum = _visible_linear_sums(k.unsqueeze(-1) * v.unsqueeze(-2), k, 0, blindspot_size)
    return _linear_readout(q, kv_sum, k_sum)


def _visible_linear_sums(kv: torch.Tensor, k: torch.Tensor, start: int, blindspot_size: int | None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the sums of exp(k_j)^T v_j ([B, H, N, d, d]) and exp(k_j) ([B, H, N, d]) over its visible
    keys among ``kv`` / ``k`` (keys start..start+N-1, queries at the same positions): j <= i, or with a
    blindspot b > 1 the keys before the query's block start."""
    kv_sum, k_sum = kv.cumsum(dim=2), k.cumsum(dim=2)
    if blindspot_size is not None and blindspot_size > 1:
        # Sums of all keys before the first position of the query's block (exclusive prefix sums), clamped to the
        # keys given here: earlier ones are the caller's.
        pos = torch.arange(start, start + k.shape[-2], device=k.device)
        block_start = ((pos // blindspot_size) * blindspot_size - start).clamp(min=0)
        kv_sum = F.pad(kv_sum, (0, 0, 0, 0, 1, 0)).index_select(2, block_start)
        k_sum = F.pad(k_sum, (0, 0, 1, 0)).index_select(2, block_start)
    return kv_sum, k_sum


def _linear_readout(q: torch.Tensor, kv_sum: torch.Tensor, k_sum: torch.Tensor) -> torch.Tensor:
    """out_i = Q_i . S_i / max(Q_i . z_i, eps) for q [B, H, N, d], S [B, H, N, d, d], z [B, H, N, d]."""
    numerator = (q.unsqueeze(-2) @ kv_sum).squeeze(-2)  # [B, H, N, d]
    denominator = (q * k_sum).sum(dim=-1, keepdim=True).clamp(min=LINEAR_ATTN_EPS)
    return numerator / denominator


@dataclass
class AttentionCache:
    """What one causal LoRASelfAttention keeps between decoding steps; ``length`` positions seen so far.

    local_k / local_v [B, H_local, <= w - 1, d] and local_keep [B, <= w - 1]: the last keys a later query can
    see. global_k / global_v [B, H_global, length, d], global_keep [B, length]: softmax heads' full history.
    linear_kv [B, H_global, d, d], linear_k [B, H_global, d]: linear heads' sums over the keys before the
    current blindspot block (all keys without one); pending_kv / pending_k: the current block's keys.
    Empty tensors where a head kind is absent.
    """

    length: int = 0
    local_k: torch.Tensor | None = None
    local_v: torch.Tensor | None = None
    local_keep: torch.Tensor | None = None
    global_k: torch.Tensor | None = None
    global_v: torch.Tensor | None = None
    global_keep: torch.Tensor | None = None
    linear_kv: torch.Tensor | None = None
    linear_k: torch.Tensor | None = None
    pending_kv: torch.Tensor | None = None
    pending_k: torch.Tensor | None = None


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: AttentionCache | None = None) -> torch.Tensor:
        """x [B, N, dim], mask [B, N] bool (True = real) -> [B, N, dim].

        With ``cache`` (causal only) x holds the N positions after the cache's ``length`` ones; they attend to the
        cached positions too, and the cache is extended in place.
        """
        q, k, v = (proj(x).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # [B, H, N, d]
        key_keep = torch.ones_like(x[..., 0]) if mask is None else mask.to(x.dtype)  # [B, N]
        if cache is not None:
            out = self._attend_cached(q, k, v, key_keep, cache)
            return self.dropout(self.to_out(out.transpose(1, 2).flatten(-2)))

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

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor,
                       cache: AttentionCache) -> torch.Tensor:
        """Attention of N new positions ([B, H, N, d]) over the cached ones and themselves; extends ``cache``."""
        if not self.causal:
            raise ValueError("incremental decoding needs causal attention")
        start, n, nl = cache.length, q.shape[-2], self.n_local_attn_heads
        outputs = []
        if nl > 0:
            outputs.append(self._local_cached(q[:, :nl], k[:, :nl], v[:, :nl], key_keep, cache))
        if nl < self.heads:
            qg, kg, vg = q[:, nl:], k[:, nl:], v[:, nl:]
            if self.global_attn == "softmax":
                outputs.append(self._global_softmax_cached(qg, kg, vg, key_keep, cache))
            else:
                outputs.append(self._global_linear_cached(qg, kg, vg, key_keep, cache))
        cache.length = start + n
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def _local_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor,
                      cache: AttentionCache) -> torch.Tensor:
        # The cached keys and the new ones as one sequence, with zero queries at the cached positions (their
        # outputs are dropped): the blockwise kernel then sees exactly the keys the full forward would.
        window = self.local_attn_window_size
        if cache.local_k is None:
            cache.local_k, cache.local_v = k[..., :0, :], v[..., :0, :]
            cache.local_keep = key_keep[:, :0]
        c = cache.local_k.shape[-2]
        keys, values = torch.cat([cache.local_k, k], dim=-2), torch.cat([cache.local_v, v], dim=-2)
        keep = torch.cat([cache.local_keep, key_keep], dim=-1)
        queries = torch.cat([torch.zeros_like(cache.local_k), q], dim=-2)
        out = local_attention(queries, keys, values, keep, window, True, self.attn_dropout)[..., c:, :]
        first = max(keys.shape[-2] - (window - 1), 0)  # keep the last w - 1 keys
        cache.local_k, cache.local_v, cache.local_keep = keys[..., first:, :], values[..., first:, :], keep[:, first:]
        return out

    def _global_softmax_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor,
                               cache: AttentionCache) -> torch.Tensor:
        if cache.global_k is None:
            cache.global_k, cache.global_v, cache.global_keep = k[..., :0, :], v[..., :0, :], key_keep[:, :0]
        cache.global_k = torch.cat([cache.global_k, k], dim=-2)
        cache.global_v = torch.cat([cache.global_v, v], dim=-2)
        cache.global_keep = torch.cat([cache.global_keep, key_keep], dim=-1)
        visible = (cache.global_keep[:, None, None, :] > 0.5) & causal_visibility(
            q.shape[-2], self.blindspot_size, q.device, start=cache.length)  # [B, 1, N, length + N]
        return fused_attention(q, cache.global_k, cache.global_v, visible, self.attn_dropout)

    def _global_linear_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor,
                              cache: AttentionCache) -> torch.Tensor:
        # closed: sums over the keys before the open blindspot block (all keys without a blindspot); pending: the
        # open block's keys so far. A new query sees closed, plus pending and the chunk's keys before its own
        # block start once its block lies past the open one.
        keep = key_keep[:, None, :, None] > 0.5
        q = q.softmax(dim=-1) * q.shape[-1] ** -0.5
        v = v * keep.to(v.dtype)
        k = torch.where(keep, k.exp(), torch.zeros_like(k))
        kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, N, d, d]
        if cache.linear_kv is None:
            cache.linear_kv, cache.linear_k = kv.new_zeros(kv[:, :, 0].shape), k.new_zeros(k[:, :, 0].shape)
            cache.pending_kv, cache.pending_k = torch.zeros_like(cache.linear_kv), torch.zeros_like(cache.linear_k)
        start, end, b = cache.length, cache.length + q.shape[-2], self.blindspot_size or 1
        kv_sum, k_sum = _visible_linear_sums(kv, k, start, b)
        if b > 1:
            pos = torch.arange(start, end, device=q.device)
            past_open = ((pos // b) > (start // b)).to(q.dtype)  # [N]: the query's block lies past the open one
            kv_sum = kv_sum + past_open[:, None, None] * cache.pending_kv[:, :, None]
            k_sum = k_sum + past_open[:, None] * cache.pending_k[:, :, None]
        out = _linear_readout(q, kv_sum + cache.linear_kv[:, :, None], k_sum + cache.linear_k[:, :, None])
        boundary = (end // b) * b - start  # new keys before the last block start: they close
        if b > 1 and boundary <= 0:
            cache.pending_kv, cache.pending_k = cache.pending_kv + kv.sum(dim=2), cache.pending_k + k.sum(dim=2)
        else:
            cache.linear_kv = cache.linear_kv + cache.pending_kv + kv[:, :, :boundary].sum(dim=2)
            cache.linear_k = cache.linear_k + cache.pending_k + k[:, :, :boundary].sum(dim=2)
            cache.pending_kv, cache.pending_k = kv[:, :, boundary:].sum(dim=2), k[:, :, boundary:].sum(dim=2)
        return out
