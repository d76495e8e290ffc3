"""Tests of ``lora_export.model.attention.LoRASelfAttention`` vs a brute-force reference."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from reference import (
    LINEAR_EPS,
    AttnConfig,
    effective_linear,
    reference_attention,
)

ATOL64, RTOL64 = 1e-9, 1e-7
ATOL32, RTOL32 = 1e-5, 1e-4
ALL_LORA = ["q", "k", "v", "o"]


# --------------------------------------------------------------------------- helpers


def _impl_cls() -> type[nn.Module]:
    """Import the class under test lazily (so reference self-tests run without it)."""
    from lora_export.model.attention import LoRASelfAttention

    return LoRASelfAttention


def _is_lora(layer: nn.Module) -> bool:
    """True if ``layer`` is a LoRA layer with a non-empty adapter."""
    return hasattr(layer, "lora_A") and int(getattr(layer, "r", 0) or 0) > 0


def _randomize_lora(module: nn.Module) -> None:
    """Give every LoRA adapter (and bias) non-trivial random values so LoRA matters."""
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v", "to_out"):
            layer = getattr(module, name)
            if _is_lora(layer):
                layer.lora_A.normal_(0.0, 0.5)
                layer.lora_B.normal_(0.0, 0.5)
            if layer.bias is not None:
                layer.bias.uniform_(-0.5, 0.5)


def _build(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs: Any) -> tuple[nn.Module, AttnConfig]:
    """Construct the module (eval, given dtype, random LoRA) and the matching config."""
    torch.manual_seed(seed)
    kwargs.setdefault("dim", 16)
    kwargs.setdefault("heads", 3)
    kwargs.setdefault("dim_head", 4)
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    module = _impl_cls()(**kwargs)
    _randomize_lora(module)
    module = module.to(dtype).eval()
    cfg = AttnConfig(
        heads=kwargs["heads"],
        dim_head=kwargs["dim_head"],
        causal=kwargs.get("causal", False),
        blindspot_size=kwargs.get("blindspot_size"),
        n_local_attn_heads=kwargs.get("n_local_attn_heads", 0),
        local_attn_window_size=kwargs.get("local_attn_window_size", 128),
        global_attn=kwargs.get("global_attn", "softmax"),
    )
    return module, cfg


def _random_mask(bsz: int, n: int, gen: torch.Generator) -> Tensor:
    """Random key-padding mask, >= 1 real token per row, some padding when n > 1."""
    mask = torch.rand(bsz, n, generator=gen) < 0.6
    for b in range(bsz):
        keep = int(torch.randint(n, (1,), generator=gen))
        mask[b, keep] = True
        if n > 1 and b == 0:
            mask[0, (keep + 1) % n] = False
    return mask


def _inputs(
    bsz: int,
    n: int,
    dim: int,
    padded: bool,
    dtype: torch.dtype = torch.float64,
    seed: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Random ``x`` and (optionally) a random padding mask."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, dim, generator=gen, dtype=torch.float64).to(dtype)
    mask = _random_mask(bsz, n, gen) if padded else None
    return x, mask


def _check(
    module: nn.Module,
    cfg: AttnConfig,
    x: Tensor,
    mask: Tensor | None,
    atol: float = ATOL64,
    rtol: float = RTOL64,
) -> None:
    """Compare the module with the reference at real query positions."""
    with torch.no_grad():
        out = module(x, mask=mask) if mask is not None else module(x)
    ref = reference_attention(x, mask, module, cfg)
    assert out.shape == ref.shape == x.shape
    real = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(out.to(torch.float64)[real], ref[real], atol=atol, rtol=rtol)


# ------------------------------------------------------------- reference self-tests


class _Plain(nn.Module):
    """Projection holder with plain ``nn.Linear`` layers (tests the reference alone)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Linear(inner, dim)


def _split(t: Tensor, heads: int) -> Tensor:
    """``[B, N, H*d] -> [B, H, N, d]``."""
    bsz, n, _ = t.shape
    return t.reshape(bsz, n, heads, -1).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa_for_global_softmax(causal: bool) -> None:
    """Reference sanity: global softmax heads equal torch SDPA."""
    torch.manual_seed(0)
    w = _Plain(16, 2, 4).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    cfg = AttnConfig(heads=2, dim_head=4, causal=causal)
    ref = reference_attention(x, None, w, cfg)
    q, k, v = (_split(layer(x), 2) for layer in (w.to_q, w.to_k, w.to_v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ref, w.to_out(o.transpose(1, 2).reshape(2, 7, 8)))


def test_reference_matches_cumsum_for_causal_linear() -> None:
    """Reference sanity: causal linear heads equal the cumulative-sum formula."""
    torch.manual_seed(0)
    w = _Plain(16, 2, 4).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    cfg = AttnConfig(heads=2, dim_head=4, causal=True, global_attn="linear")
    ref = reference_attention(x, None, w, cfg)
    q, k, v = (_split(layer(x), 2) for layer in (w.to_q, w.to_k, w.to_v))
    q = q.softmax(-1) * 4**-0.5
    k = k.exp()
    kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
    num = torch.einsum("bhnd,bhnde->bhne", q, kv)
    den = torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(2)).clamp(min=LINEAR_EPS)
    o = (num / den.unsqueeze(-1)).transpose(1, 2).reshape(2, 7, 8)
    torch.testing.assert_close(ref, w.to_out(o))


def test_reference_matches_closed_form_noncausal_linear() -> None:
    """Reference sanity: non-causal linear heads = ``softmax(q) (softmax_n(k)^T v)``."""
    torch.manual_seed(0)
    w = _Plain(16, 2, 4).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    cfg = AttnConfig(heads=2, dim_head=4, global_attn="linear")
    ref = reference_attention(x, None, w, cfg)
    q, k, v = (_split(layer(x), 2) for layer in (w.to_q, w.to_k, w.to_v))
    o = (q.softmax(-1) * 4**-0.5) @ (k.softmax(-2).transpose(-1, -2) @ v)
    torch.testing.assert_close(ref, w.to_out(o.transpose(1, 2).reshape(1, 6, 8)))


# ------------------------------------------------------------- construction / shapes


@pytest.mark.parametrize(
    "enable_lora",
    [[], ["q", "v"], ALL_LORA, ["k"], ["o"]],
    ids=lambda e: "lora_" + ("".join(e) or "none"),
)
@pytest.mark.parametrize("r", [0, 4])
def test_submodule_kinds_and_shapes(enable_lora: list[str], r: int) -> None:
    """to_q/k/v/out are LoRA exactly for enabled letters with r > 0; shapes match."""
    module, _ = _build(dim=16, heads=3, dim_head=4, r=r, enable_lora=enable_lora)
    for letter, name in zip("qkvo", ("to_q", "to_k", "to_v", "to_out"), strict=True):
        layer = getattr(module, name)
        assert isinstance(layer, nn.Module)
        assert _is_lora(layer) == (letter in enable_lora and r > 0), name
        if not _is_lora(layer):
            assert isinstance(layer, nn.Linear), name
        expected = (16, 12) if name == "to_out" else (12, 16)
        assert tuple(layer.weight.shape) == expected, name
        if _is_lora(layer):
            assert tuple(layer.lora_A.shape) == (r, expected[1]), name
            assert tuple(layer.lora_B.shape) == (expected[0], r), name


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_scaling(use_rslora: bool) -> None:
    """Standard LoRA scaling is alpha / r; rsLoRA scaling is alpha / sqrt(r)."""
    module, _ = _build(r=4, lora_alpha=8, use_rslora=use_rslora)
    expected = 8 / math.sqrt(4) if use_rslora else 8 / 4
    for name in ("to_q", "to_k", "to_v", "to_out"):
        assert float(getattr(module, name).scaling) == pytest.approx(expected)


def test_lora_b_matters() -> None:
    """Sanity: non-zero lora_B changes the output (so the LoRA path is exercised)."""
    module, cfg = _build(causal=True, n_local_attn_heads=1, local_attn_window_size=3)
    x, _ = _inputs(2, 6, 16, padded=False)
    with torch.no_grad():
        out = module(x)
        for name in ("to_q", "to_k", "to_v", "to_out"):
            getattr(module, name).lora_B.zero_()
        out_zero = module(x)
    assert not torch.allclose(out, out_zero)
    torch.testing.assert_close(out_zero, reference_attention(x, None, module, cfg))


# ------------------------------------------------------------- main equivalence grids

_NW_CASES = [(1, 4), (4, 4), (5, 4), (7, 3), (10, 4), (6, 16), (5, 1)]
_SPLITS = [0, 1, 3]  # of 3 heads: all global, mixed, all local


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("n,w", _NW_CASES, ids=[f"N{n}_w{w}" for n, w in _NW_CASES])
@pytest.mark.parametrize("global_attn", ["softmax", "linear"])
@pytest.mark.parametrize("n_local", _SPLITS, ids=[f"local{s}" for s in _SPLITS])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_matches_reference_core(causal: bool, n_local: int, global_attn: str, n: int, w: int, padded: bool) -> None:
    """Local/global/mixed heads, windows above/below N, padding, both global kinds."""
    module, cfg = _build(
        causal=causal,
        n_local_attn_heads=n_local,
        local_attn_window_size=w,
        global_attn=global_attn,
    )
    x, mask = _inputs(3 if padded else 1, n, 16, padded)
    _check(module, cfg, x, mask)


_BLINDSPOTS = [None, 1, 2, 3, 5]


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("n", [1, 5, 11, 15])
@pytest.mark.parametrize("global_attn", ["softmax", "linear"])
@pytest.mark.parametrize("n_local", [0, 1], ids=["local0", "local1"])
@pytest.mark.parametrize("b", _BLINDSPOTS, ids=[f"b{b}" for b in _BLINDSPOTS])
def test_matches_reference_blindspot(b: int | None, n_local: int, global_attn: str, n: int, padded: bool) -> None:
    """Causal blindspot on global heads (local heads unaffected)."""
    module, cfg = _build(
        causal=True,
        blindspot_size=b,
        n_local_attn_heads=n_local,
        local_attn_window_size=3,
        global_attn=global_attn,
    )
    x, mask = _inputs(3, n, 16, padded, seed=n)
    _check(module, cfg, x, mask)


_LORA_SETS = [[], ["q", "v"], ALL_LORA, ["k", "o"]]
_RANKS = [(0, False), (2, False), (4, False), (2, True), (4, True)]


@pytest.mark.parametrize("bsz", [1, 3])
@pytest.mark.parametrize(
    "r,use_rslora",
    _RANKS,
    ids=[f"r{r}_{'rslora' if rs else 'lora'}" for r, rs in _RANKS],
)
@pytest.mark.parametrize(
    "enable_lora",
    _LORA_SETS,
    ids=["lora_" + ("".join(e) or "none") for e in _LORA_SETS],
)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_matches_reference_lora_subsets(
    causal: bool, enable_lora: list[str], r: int, use_rslora: bool, bsz: int
) -> None:
    """enable_lora subsets with non-zero lora_B, ranks, rsLoRA, batch sizes."""
    module, cfg = _build(
        r=r,
        lora_alpha=8,
        use_rslora=use_rslora,
        enable_lora=enable_lora,
        causal=causal,
        n_local_attn_heads=1,
        local_attn_window_size=2,
        blindspot_size=2 if causal else None,
        global_attn="linear" if bsz == 3 else "softmax",
    )
    x, mask = _inputs(bsz, 6, 16, padded=bsz == 3)
    _check(module, cfg, x, mask)


_BIG = list(itertools.product([False, True], [0, 2, 4], ["softmax", "linear"], [(20, 6), (13, 13), (17, 30)]))


@pytest.mark.parametrize(
    "causal,n_local,global_attn,nw",
    _BIG,
    ids=[f"c{int(c)}_l{lo}_{g}_N{nw[0]}w{nw[1]}" for c, lo, g, nw in _BIG],
)
def test_matches_reference_bigger(causal: bool, n_local: int, global_attn: str, nw: tuple[int, int]) -> None:
    """heads=4, dim_head=8, dim=32 with longer sequences and padding."""
    n, w = nw
    module, cfg = _build(
        dim=32,
        heads=4,
        dim_head=8,
        causal=causal,
        n_local_attn_heads=n_local,
        local_attn_window_size=w,
        blindspot_size=3 if causal else None,
        global_attn=global_attn,
        seed=n,
    )
    x, mask = _inputs(2, n, 32, padded=True, seed=w)
    _check(module, cfg, x, mask)


@pytest.mark.parametrize("global_attn", ["softmax", "linear"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_matches_reference_float32(causal: bool, global_attn: str) -> None:
    """Float32 module agrees with the float64 reference to ~1e-5."""
    module, cfg = _build(
        dtype=torch.float32,
        causal=causal,
        n_local_attn_heads=1,
        local_attn_window_size=3,
        blindspot_size=2 if causal else None,
        global_attn=global_attn,
    )
    x, mask = _inputs(3, 9, 16, padded=True, dtype=torch.float32)
    _check(module, cfg, x, mask, atol=ATOL32, rtol=RTOL32)


# ------------------------------------------------------------- behavioural tests


@pytest.mark.parametrize("b", [2, 3])
def test_blindspot_without_causal_raises(b: int) -> None:
    """blindspot_size > 1 with causal=False is a clear ValueError."""
    with pytest.raises(ValueError):
        _impl_cls()(dim=16, heads=2, dim_head=4, causal=False, blindspot_size=b)


@pytest.mark.parametrize("global_attn", ["softmax", "linear"])
def test_no_visible_key_gives_exact_zero(global_attn: str) -> None:
    """Causal b=4, only global heads: queries 0..3 see nothing -> to_out(0) = bias."""
    module, cfg = _build(causal=True, blindspot_size=4, n_local_attn_heads=0, global_attn=global_attn)
    x, _ = _inputs(2, 9, 16, padded=False)
    with torch.no_grad():
        out = module(x)
    _, bias = effective_linear(module.to_out)
    expected = torch.zeros(16, dtype=torch.float64) if bias is None else bias
    for i in range(4):
        assert torch.equal(out[:, i], expected.expand(2, 16)), f"position {i}"
    _check(module, cfg, x, None)


def _identity_out(module: nn.Module) -> None:
    """Make to_out the identity (requires dim == heads*dim_head, 'o' not LoRA)."""
    with torch.no_grad():
        module.to_out.weight.copy_(torch.eye(module.to_out.weight.shape[0]))
        if module.to_out.bias is not None:
            module.to_out.bias.zero_()


@pytest.mark.parametrize("global_attn", ["softmax", "linear"])
def test_per_head_zero_for_empty_rows(global_attn: str) -> None:
    """Per head: global heads with no visible key give exactly 0, local heads do not.

    Uses an identity to_out so each head's output is visible. Row 0 has no
    padding (blindspot empties block 0); row 1 pads block 0, so real queries in
    block 1 see only padded keys and must also get exactly 0 from global heads.
    """
    heads, d, b = 3, 4, 3
    module, cfg = _build(
        dim=heads * d,
        heads=heads,
        dim_head=d,
        enable_lora=["q", "k", "v"],
        causal=True,
        blindspot_size=b,
        n_local_attn_heads=1,
        local_attn_window_size=2,
        global_attn=global_attn,
    )
    _identity_out(module)
    x, _ = _inputs(2, 8, heads * d, padded=False)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :b] = False
    with torch.no_grad():
        out = module(x, mask=mask)
    zero = torch.zeros(d, dtype=torch.float64)
    for i in range(b):  # row 0, block 0: global heads empty, local head not
        assert not torch.equal(out[0, i, :d], zero), f"local head, position {i}"
        for h in range(1, heads):
            assert torch.equal(out[0, i, h * d : (h + 1) * d], zero), f"head {h} pos {i}"
    for i in range(b, 2 * b):  # row 1, block 1: visible keys (block 0) all padded
        for h in range(1, heads):
            assert torch.equal(out[1, i, h * d : (h + 1) * d], zero), f"head {h} pos {i}"
    _check(module, cfg, x, mask)


_INV_CASES = [
    (False, 0, "softmax", None),
    (False, 1, "linear", None),
    (False, 3, "softmax", None),
    (True, 0, "softmax", None),
    (True, 1, "linear", None),
    (True, 1, "softmax", 2),
    (True, 0, "linear", 3),
]


@pytest.mark.parametrize(
    "causal,n_local,global_attn,b",
    _INV_CASES,
    ids=[f"c{int(c)}_l{lo}_{g}_b{b}" for c, lo, g, b in _INV_CASES],
)
def test_masked_keys_never_contribute(causal: bool, n_local: int, global_attn: str, b: int | None) -> None:
    """Changing the inputs at padded positions leaves real positions unchanged."""
    module, _ = _build(
        causal=causal,
        n_local_attn_heads=n_local,
        local_attn_window_size=3,
        blindspot_size=b,
        global_attn=global_attn,
    )
    x, mask = _inputs(3, 10, 16, padded=True)
    assert mask is not None
    x2 = x.clone()
    x2[~mask] = 5.0 * torch.randn(int((~mask).sum()), 16, dtype=torch.float64)
    with torch.no_grad():
        out1 = module(x, mask=mask)
        out2 = module(x2, mask=mask)
    torch.testing.assert_close(out1[mask], out2[mask], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("global_attn", ["softmax", "linear"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_all_true_mask_equals_no_mask(causal: bool, global_attn: str) -> None:
    """An all-True mask is the same as mask=None."""
    module, _ = _build(
        causal=causal,
        n_local_attn_heads=1,
        local_attn_window_size=2,
        global_attn=global_attn,
    )
    x, _ = _inputs(2, 7, 16, padded=False)
    with torch.no_grad():
        a = module(x)
        b = module(x, mask=torch.ones(2, 7, dtype=torch.bool))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("global_attn", ["softmax", "linear"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_output_finite_everywhere_with_padding(causal: bool, global_attn: str) -> None:
    """No NaN/inf anywhere, including padded query positions with no visible key."""
    module, _ = _build(
        causal=causal,
        n_local_attn_heads=1,
        local_attn_window_size=1,
        blindspot_size=2 if causal else None,
        global_attn=global_attn,
    )
    x, mask = _inputs(3, 8, 16, padded=True)
    with torch.no_grad():
        out = module(x, mask=mask)
    assert torch.isfinite(out).all()


def test_dropout_off_in_eval() -> None:
    """Large dropout rates have no effect in eval mode: repeated calls are equal."""
    module, cfg = _build(
        attn_dropout=0.5,
        dropout=0.5,
        lora_dropout=0.5,
        causal=True,
        n_local_attn_heads=1,
        local_attn_window_size=3,
    )
    x, mask = _inputs(3, 8, 16, padded=True)
    with torch.no_grad():
        a = module(x, mask=mask)
        b = module(x, mask=mask)
    assert torch.equal(a, b)
    _check(module, cfg, x, mask)


def test_dropout_active_in_train() -> None:
    """Sanity: with dropout=0.5 the train-mode output differs from eval mode."""
    module, _ = _build(attn_dropout=0.5, dropout=0.5, n_local_attn_heads=1)
    x, _ = _inputs(2, 8, 16, padded=False)
    with torch.no_grad():
        ev = module(x)
        tr = module.train()(x)
    assert not torch.allclose(ev, tr)
