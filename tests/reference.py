"""Dense, brute-force reference for ``LoRASelfAttention``.

Written only from the written attention spec (not from the implementation):
slow, loop-based and computed in float64 so that it is easy to check by eye.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

#: Denominator floor of causal linear attention: ``max(Q_i . z_i, LINEAR_EPS)``.
LINEAR_EPS = 1e-3


@dataclass(frozen=True)
class AttnConfig:
    """Hyper-parameters that define the attention pattern (weights live elsewhere)."""

    heads: int
    dim_head: int
    causal: bool = False
    blindspot_size: int | None = None
    n_local_attn_heads: int = 0
    local_attn_window_size: int = 128
    global_attn: str = "softmax"


class HasProjections(Protocol):
    """Anything exposing the four projection layers (e.g. the module under test)."""

    to_q: nn.Module
    to_k: nn.Module
    to_v: nn.Module
    to_out: nn.Module


def effective_linear(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Return float64 ``(W, b)`` of an ``nn.Linear`` or ``LoRALinear``.

    For a LoRA layer with ``r > 0``: ``W = weight + scaling * lora_B @ lora_A``.
    """
    weight = layer.weight.detach().to(torch.float64).clone()
    r = int(getattr(layer, "r", 0) or 0)
    if r > 0 and hasattr(layer, "lora_A"):
        lora_a = layer.lora_A.detach().to(torch.float64)  # [r, in]
        lora_b = layer.lora_B.detach().to(torch.float64)  # [out, r]
        weight = weight + float(layer.scaling) * (lora_b @ lora_a)
    bias = layer.bias
    bias = None if bias is None else bias.detach().to(torch.float64).clone()
    return weight, bias


def apply_linear(x: Tensor, layer: nn.Module) -> Tensor:
    """``x @ W^T + b`` with the effective float64 weights of ``layer``."""
    weight, bias = effective_linear(layer)
    y = x.to(torch.float64) @ weight.T
    if bias is not None:
        y = y + bias
    return y


def is_visible(i: int, j: int, *, local: bool, cfg: AttnConfig) -> bool:
    """Positional visibility of key ``j`` for query ``i`` (key mask not included)."""
    if local:
        w = cfg.local_attn_window_size
        if cfg.causal:
            return 0 <= i - j < w
        return abs(i - j) < w
    if not cfg.causal:
        return True
    b = cfg.blindspot_size
    if b is None or b <= 1:
        return j <= i
    return j // b < i // b


def visibility_matrix(n: int, *, local: bool, cfg: AttnConfig) -> Tensor:
    """Dense ``[n, n]`` bool matrix ``V[i, j] = is_visible(i, j)``."""
    vis = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            vis[i, j] = is_visible(i, j, local=local, cfg=cfg)
    return vis


def _softmax(t: Tensor) -> Tensor:
    """Plain, numerically stable softmax of a 1-D tensor."""
    e = torch.exp(t - t.max())
    return e / e.sum()


def softmax_head(q: Tensor, k: Tensor, v: Tensor, vis: Tensor, keymask: Tensor) -> Tensor:
    """Softmax attention of one head; ``q, k, v`` are ``[N, d]``, ``vis`` ``[N, N]``."""
    n, d = q.shape
    out = torch.zeros(n, v.shape[1], dtype=torch.float64)
    for i in range(n):
        js = [j for j in range(n) if bool(vis[i, j]) and bool(keymask[j])]
        if not js:
            continue  # no visible key -> exactly 0
        scores = torch.stack([q[i] @ k[j] for j in js]) / math.sqrt(d)
        p = _softmax(scores)
        for pj, j in zip(p, js, strict=True):
            out[i] += pj * v[j]
    return out


def _linear_q(q: Tensor) -> Tensor:
    """``softmax(q, over features) * d^-1/2`` row by row."""
    d = q.shape[1]
    return torch.stack([_softmax(q[i]) for i in range(q.shape[0])]) * d**-0.5


def linear_head_noncausal(q: Tensor, k: Tensor, v: Tensor, keymask: Tensor) -> Tensor:
    """Non-causal linear attention: ``out_i = Q_i (K^T V)``."""
    n, d = q.shape
    big_q = _linear_q(q)
    real = [j for j in range(n) if bool(keymask[j])]
    big_k = torch.zeros(n, d, dtype=torch.float64)
    for f in range(d):  # softmax over (real) positions, per feature
        big_k[real, f] = _softmax(k[real, f])
    big_v = v.clone()
    for j in range(n):
        if not bool(keymask[j]):
            big_v[j] = 0.0
    context = torch.zeros(d, v.shape[1], dtype=torch.float64)
    for j in range(n):
        context += torch.outer(big_k[j], big_v[j])
    return torch.stack([big_q[i] @ context for i in range(n)])


def linear_head_causal(q: Tensor, k: Tensor, v: Tensor, vis: Tensor, keymask: Tensor) -> Tensor:
    """Causal linear attention with ``max(Q_i . z_i, eps)`` normalisation."""
    n, d = q.shape
    big_q = _linear_q(q)
    big_k = torch.exp(k)
    big_v = v.clone()
    for j in range(n):
        if not bool(keymask[j]):
            big_k[j] = 0.0
            big_v[j] = 0.0
    out = torch.zeros(n, v.shape[1], dtype=torch.float64)
    for i in range(n):
        js = [j for j in range(n) if bool(vis[i, j])]
        if not js:
            continue  # no visible key -> exactly 0
        s = torch.zeros(d, v.shape[1], dtype=torch.float64)
        z = torch.zeros(d, dtype=torch.float64)
        for j in js:
            s += torch.outer(big_k[j], big_v[j])
            z += big_k[j]
        out[i] = (big_q[i] @ s) / max(float(big_q[i] @ z), LINEAR_EPS)
    return out


def reference_attention(x: Tensor, mask: Tensor | None, weights: HasProjections, cfg: AttnConfig) -> Tensor:
    """Brute-force attention forward (eval mode, no dropout), float64 ``[B, N, dim]``.

    ``weights`` supplies ``to_q/to_k/to_v/to_out``; ``mask`` is a ``[B, N]`` bool
    key-padding mask (True = real token) or None.
    """
    if cfg.global_attn not in ("softmax", "linear"):
        raise ValueError(f"unknown global_attn {cfg.global_attn!r}")
    x = x.to(torch.float64)
    bsz, n, _ = x.shape
    h_count, d = cfg.heads, cfg.dim_head
    if mask is None:
        mask = torch.ones(bsz, n, dtype=torch.bool)
    q = apply_linear(x, weights.to_q).reshape(bsz, n, h_count, d)
    k = apply_linear(x, weights.to_k).reshape(bsz, n, h_count, d)
    v = apply_linear(x, weights.to_v).reshape(bsz, n, h_count, d)

    vis_local = visibility_matrix(n, local=True, cfg=cfg)
    vis_global = visibility_matrix(n, local=False, cfg=cfg)

    heads_out = torch.zeros(bsz, n, h_count * d, dtype=torch.float64)
    for b in range(bsz):
        keymask = mask[b]
        for h in range(h_count):
            qh, kh, vh = q[b, :, h], k[b, :, h], v[b, :, h]
            if h < cfg.n_local_attn_heads:
                o = softmax_head(qh, kh, vh, vis_local, keymask)
            elif cfg.global_attn == "softmax":
                o = softmax_head(qh, kh, vh, vis_global, keymask)
            elif cfg.causal:
                o = linear_head_causal(qh, kh, vh, vis_global, keymask)
            else:
                o = linear_head_noncausal(qh, kh, vh, keymask)
            heads_out[b, :, h * d : (h + 1) * d] = o
    return apply_linear(heads_out, weights.to_out)
