"""Tests of ``lora_export.model.layers``: LoRALinear, LoRAEmbedding and the model-level helpers.

References are written independently of the implementation: explicit float64 formulas
``W0 + (alpha / r) * B @ A`` (linear) and ``E0 + (B @ A).T * alpha / r`` (embedding).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_export.model.layers import (
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    base_state_dict,
    count_parameters,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)
from lora_export.model.transformer import LoRATransformerLM, ModelConfig

ATOL32, RTOL32 = 1e-5, 1e-5
ALL_TARGETS = ["q", "k", "v", "o", "ff", "emb"]




# --------------------------------------------------------------------------- helpers


def _randomize_lora(module: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every LoRA layer in ``module`` a non-zero random lora_B (and a fresh lora_A)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoRALayer) and m.r > 0:
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * std)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)


def _linear(r: int = 4, alpha: float = 8.0, seed: int = 0, **kwargs: object) -> LoRALinear:
    """A 12 -> 10 LoRALinear with random non-zero LoRA weights."""
    torch.manual_seed(seed)
    layer = LoRALinear(12, 10, r=r, lora_alpha=alpha, **kwargs)
    if r > 0:
        _randomize_lora(layer, seed)
    return layer


def _embedding(r: int = 4, alpha: float = 8.0, seed: int = 0, **kwargs: object) -> LoRAEmbedding:
    """A 20 x 6 LoRAEmbedding with random non-zero LoRA weights."""
    torch.manual_seed(seed)
    layer = LoRAEmbedding(20, 6, r=r, lora_alpha=alpha, **kwargs)
    if r > 0:
        _randomize_lora(layer, seed)
    return layer


def _ref_linear_weight(layer: LoRALinear, scaling: float) -> torch.Tensor:
    """float64 W0 + scaling * B @ A, written out independently."""
    w0, a, b = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    return w0 + scaling * (b @ a)


def _ref_embedding_weight(layer: LoRAEmbedding, scaling: float) -> torch.Tensor:
    """float64 E0 + (B @ A).T * scaling, written out independently."""
    e0, a, b = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    return e0 + (b @ a).T * scaling


def _external_from_own(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The ONNX Runtime layout of the layer's own adapter: A_t = lora_A.T, B_t = scaling * lora_B.T."""
    return layer.lora_A.detach().T.contiguous(), (layer.scaling * layer.lora_B.detach().T).contiguous()


def _tiny_model(targets: list[str] | None = None, r: int = 4, **kwargs: object) -> LoRATransformerLM:
    """A very small LoRATransformerLM (eval mode, dropout 0) with random LoRA weights."""
    torch.manual_seed(0)
    config = ModelConfig(dim=16, depth=2, heads=2, dim_head=8, n_local_attn_heads=1, local_attn_window_size=4,
                         max_seq_len=12, ff_mult=2, dropout=0.0, r=r, lora_alpha=8.0,
                         lora_targets=ALL_TARGETS if targets is None else targets, **kwargs)
    model = LoRATransformerLM(config)
    _randomize_lora(model, seed=1)
    return model.eval()


def _ids(batch: int = 2, n: int = 10, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- zero init / r = 0


def test_linear_zero_init_is_identity() -> None:
    """A fresh layer (lora_B == 0) computes exactly F.linear(x, W0, b)."""
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=4, lora_alpha=8.0)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_embedding_zero_init_is_identity() -> None:
    """A fresh embedding (lora_B == 0) computes exactly F.embedding(ids, E0)."""
    torch.manual_seed(0)
    layer = LoRAEmbedding(20, 6, r=4, lora_alpha=8.0)
    assert torch.count_nonzero(layer.lora_B) == 0
    ids = torch.randint(0, 20, (3, 7))
    assert torch.equal(layer(ids), F.embedding(ids, layer.weight))


def test_r0_linear_is_plain_linear() -> None:
    """r = 0: no LoRA parameters, trainable W0, output equal to nn.Linear, merge a no-op."""
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=0, lora_alpha=8.0)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert not hasattr(layer, "lora_A") and not hasattr(layer, "lora_B")
    assert layer.weight.requires_grad and layer.bias.requires_grad
    plain = nn.Linear(12, 10)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), plain(x))
    w = layer.weight.detach().clone()
    layer.merge(safe_merge=True)
    layer.unmerge()
    assert torch.equal(layer.weight, w) and not layer.merged
    assert list(lora_layers(layer)) == []


def test_r0_embedding_is_plain_embedding() -> None:
    """r = 0: the embedding has only its table and looks it up."""
    layer = LoRAEmbedding(20, 6, r=0)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    ids = torch.randint(0, 20, (9,))
    assert torch.equal(layer(ids), layer.weight[ids])


def test_negative_rank_rejected() -> None:
    with pytest.raises(ValueError, match="r must be >= 0"):
        LoRALinear(4, 4, r=-1)


# --------------------------------------------------------------------------- forward vs formula


def test_linear_forward_matches_formula() -> None:
    """Unmerged forward = x (W0 + alpha/r B A)^T + b, computed in float64."""
    layer = _linear(r=4, alpha=8.0)
    x = torch.randn(3, 5, 12)
    expected = x.double() @ _ref_linear_weight(layer, 8.0 / 4).T + layer.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), expected, atol=ATOL32, rtol=RTOL32)
    # The LoRA branch must matter (otherwise this test could not fail).
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-3)


def test_embedding_forward_matches_formula() -> None:
    """Unmerged lookup = (E0 + (B A)^T alpha/r)[ids], computed in float64."""
    layer = _embedding(r=4, alpha=8.0)
    ids = torch.randint(0, 20, (3, 7))
    expected = _ref_embedding_weight(layer, 8.0 / 4)[ids]
    torch.testing.assert_close(layer(ids).double(), expected, atol=ATOL32, rtol=RTOL32)
    assert not torch.allclose(layer(ids), layer.weight[ids], atol=1e-3)


# --------------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize(("r", "alpha"), [(1, 1.0), (4, 8.0), (6, 3.0)])
def test_linear_merge_hand_computed(r: int, alpha: float) -> None:
    """merge() writes W0 + (alpha/r) * B @ A into weight and keeps the bias."""
    layer = _linear(r=r, alpha=alpha)
    expected = _ref_linear_weight(layer, alpha / r)
    bias = layer.bias.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight.detach().double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.bias, bias)


@pytest.mark.parametrize(("r", "alpha"), [(1, 1.0), (4, 8.0), (6, 3.0)])
def test_embedding_merge_hand_computed(r: int, alpha: float) -> None:
    """merge() writes E0 + (B @ A).T * alpha/r into the table."""
    layer = _embedding(r=r, alpha=alpha)
    expected = _ref_embedding_weight(layer, alpha / r)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight.detach().double(), expected, atol=1e-6, rtol=1e-6)


def test_linear_merged_equals_unmerged_forward() -> None:
    """The merged layer computes the same function as the unmerged one (fp32)."""
    layer = _linear()
    x = torch.randn(4, 6, 12)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=ATOL32, rtol=RTOL32)
    # While merged the LoRA branch is skipped: the output is exactly the plain linear of the merged weight.
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_embedding_merged_equals_unmerged_forward() -> None:
    layer = _embedding()
    ids = torch.randint(0, 20, (4, 9))
    before = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), before, atol=ATOL32, rtol=RTOL32)
    assert torch.equal(layer(ids), layer.weight[ids])


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_unmerge_restores_w0(kind: str) -> None:
    """unmerge() subtracts exactly what merge() added: W0 back within fp32 rounding."""
    layer = _linear() if kind == "linear" else _embedding()
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert (layer.weight - w0).abs().max() > 1e-2  # the merge really changed W0
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_merge_unmerge_idempotent(kind: str) -> None:
    """A second merge() or unmerge() changes nothing."""
    layer = _linear() if kind == "linear" else _embedding()
    w0 = layer.weight.detach().clone()
    layer.unmerge()  # unmerge of an unmerged layer: no-op
    assert torch.equal(layer.weight, w0)
    layer.merge()
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once) and layer.merged
    layer.unmerge()
    restored = layer.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.weight, restored) and not layer.merged


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_and_rslora(use_rslora: bool) -> None:
    """scaling is alpha/r, or alpha/sqrt(r) with rsLoRA; merge and forward use it."""
    r, alpha = 9, 6.0
    layer = _linear(r=r, alpha=alpha, use_rslora=use_rslora)
    expected_scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.scaling == pytest.approx(expected_scaling)
    x = torch.randn(5, 12)
    ref = x.double() @ _ref_linear_weight(layer, expected_scaling).T + layer.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), ref, atol=ATOL32, rtol=RTOL32)
    emb = _embedding(r=r, alpha=alpha, use_rslora=use_rslora)
    assert emb.scaling == pytest.approx(expected_scaling)
    expected_table = _ref_embedding_weight(emb, expected_scaling)
    emb.merge()
    torch.testing.assert_close(emb.weight.detach().double(), expected_table, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- safe_merge


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_safe_merge_refuses_non_finite(bad: float, kind: str) -> None:
    """safe_merge raises ValueError on NaN/Inf and leaves W0 and the merged flag untouched."""
    layer = _linear() if kind == "linear" else _embedding()
    with torch.no_grad():
        layer.lora_B[0, 0] = bad
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="safe_merge refused"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, w0)
    assert not layer.merged
    # Without safe_merge the same merge goes through and poisons W0: the check is what protects it.
    layer.merge(safe_merge=False)
    assert not torch.isfinite(layer.weight).all()


def test_merge_lora_safe_merge_names_layer_path() -> None:
    """Through merge_lora(model, safe_merge=True) the error names the offending module path."""
    model = _tiny_model()
    bad = model.blocks[1].attn.to_v
    with torch.no_grad():
        bad.lora_A[0, 0] = float("inf")
    w0 = bad.weight.detach().clone()
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.to_v") as info:
        merge_lora(model, safe_merge=True)
    assert "NaN or Inf" in str(info.value)
    assert torch.equal(bad.weight, w0)
    assert not bad.merged


def test_merge_lora_refused_leaves_model_unmerged() -> None:
    """A refused safe merge must not leave the model half merged (all-or-nothing)."""
    model = _tiny_model()
    base = {k: v.clone() for k, v in base_state_dict(model).items()}
    with torch.no_grad():
        model.blocks[1].ff.fc2.lora_B[0, 0] = float("nan")  # the last LoRA layer in module order
    with pytest.raises(ValueError):
        merge_lora(model, safe_merge=True)
    half_merged = [name for name, layer in lora_layers(model) if layer.merged]
    assert half_merged == [], f"layers left merged after a refused safe merge: {half_merged}"
    for name, tensor in base_state_dict(model).items():
        assert torch.equal(tensor, base[name]), name


def test_merge_lora_and_unmerge_lora_model() -> None:
    """merge_lora / unmerge_lora visit every LoRA layer; logits are preserved, W0 restored."""
    model = _tiny_model()
    ids = _ids()
    base = {k: v.clone() for k, v in base_state_dict(model).items()}
    with torch.no_grad():
        before = model(ids)
        merge_lora(model, safe_merge=True)
        assert all(layer.merged for _, layer in lora_layers(model))
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=1e-4)
        unmerge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))
    for name, tensor in base_state_dict(model).items():
        torch.testing.assert_close(tensor, base[name], atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------- dropout


def test_lora_dropout_leaves_base_path_alone() -> None:
    """Train mode, lora_dropout=0.5, lora_B == 0: the output is exactly the base output."""
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=4, lora_alpha=8.0, lora_dropout=0.5).train()
    x = torch.randn(8, 12)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_lora_dropout_applies_to_lora_branch_only() -> None:
    """Train mode: y = x W0^T + b + s * dropout(x) A^T B^T with the same dropout mask; eval: no dropout."""
    layer = _linear(lora_dropout=0.5).train()
    x = torch.randn(8, 12)
    s = layer.scaling
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, p=0.5, training=True)
    expected = F.linear(x, layer.weight, layer.bias) + s * (dropped @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(out, expected, atol=ATOL32, rtol=RTOL32)
    no_dropout = F.linear(x, layer.weight, layer.bias) + s * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert not torch.allclose(out, no_dropout, atol=1e-3)  # dropout really acted on the LoRA branch
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout, atol=ATOL32, rtol=RTOL32)


# --------------------------------------------------------------------------- external LoRA


@pytest.mark.parametrize("fold", [False, True])
def test_external_lora_linear_equals_own(fold: bool) -> None:
    """use_external_lora(A.T, scaling * B.T), as a branch or folded into the weight, reproduces the own forward."""
    layer = _linear()
    x = torch.randn(3, 5, 12)
    own = layer(x)
    layer.use_external_lora(*_external_from_own(layer), fold=fold)
    torch.testing.assert_close(layer(x), own, atol=ATOL32, rtol=RTOL32)
    rank0 = (torch.zeros(layer.in_features, 0), torch.zeros(0, layer.out_features))  # the graph's default
    layer.use_external_lora(*rank0, fold=fold)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=ATOL32, rtol=RTOL32)
    layer.use_external_lora(None, None)
    assert layer.external_lora is None
    assert torch.equal(layer(x), own)


def test_external_lora_replaces_own_adapter() -> None:
    """An external adapter is used instead of lora_A / lora_B: equals W0 + external delta."""
    layer = _linear(seed=0)
    other = _linear(seed=5)
    with torch.no_grad():
        other.weight.copy_(layer.weight)
        other.bias.copy_(layer.bias)
    x = torch.randn(7, 12)
    layer.use_external_lora(other.lora_A.detach().T, other.scaling * other.lora_B.detach().T)
    torch.testing.assert_close(layer(x), other(x), atol=ATOL32, rtol=RTOL32)


def test_external_lora_embedding_equals_own() -> None:
    layer = _embedding()
    ids = torch.randint(0, 20, (4, 6))
    own = layer(ids)
    layer.use_external_lora(*_external_from_own(layer))
    torch.testing.assert_close(layer(ids), own, atol=ATOL32, rtol=RTOL32)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_external_lora_on_merged_layer_does_not_double_count(kind: str) -> None:
    """A merged layer fed an external adapter must not add it on top of the merged delta.

    Either the combination is refused, or the output is W0 + external delta (the documented
    "instead of lora_A / lora_B").
    """
    layer = _linear() if kind == "linear" else _embedding()
    inputs = torch.randn(5, 12) if kind == "linear" else torch.randint(0, 20, (5,))
    expected = layer(inputs)  # own adapter, unmerged == W0 + own delta
    a_t, b_t = _external_from_own(layer)
    layer.merge()
    try:
        layer.use_external_lora(a_t, b_t)
        out = layer(inputs)
    except (ValueError, RuntimeError):
        return  # refusing the combination is acceptable
    torch.testing.assert_close(out, expected, atol=ATOL32, rtol=RTOL32)


# --------------------------------------------------------------------------- model helpers


def test_mark_only_lora_as_trainable_gradients() -> None:
    """After mark_only_lora_as_trainable and backward, only lora_A / lora_B carry gradients."""
    model = _tiny_model(ALL_TARGETS).train()
    mark_only_lora_as_trainable(model)
    ids = _ids()
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    lora_names = []
    for name, param in model.named_parameters():
        is_lora = name.endswith(("lora_A", "lora_B"))
        assert param.requires_grad == is_lora, name
        if is_lora:
            lora_names.append(name)
            assert param.grad is not None, name
            assert torch.count_nonzero(param.grad) > 0, name
        else:
            assert param.grad is None, name
    # q, k, v, o in each of 2 blocks, fc1/fc2 in each block, token embedding: 2 * (4 + 2) + 1 layers.
    assert len(lora_names) == 2 * (2 * (4 + 2) + 1)
    assert "token_emb.lora_A" in lora_names and "blocks.1.ff.fc2.lora_B" in lora_names


def test_count_parameters_hand_checked() -> None:
    """Hand-counted parameters of a tiny model with LoRA (r=2) on q and v only."""
    torch.manual_seed(0)
    config = ModelConfig(dim=8, depth=1, heads=2, dim_head=4, n_local_attn_heads=1, local_attn_window_size=2,
                         max_seq_len=5, ff_mult=2, dropout=0.0, r=2, lora_targets=["q", "v"])
    model = LoRATransformerLM(config)
    token_emb = 256 * 8
    pos_emb = 5 * 8
    layer_norm = 8 + 8
    to_q = 8 * 8 + (2 * 8 + 8 * 2)  # W0 (no bias) + A [2, 8] + B [8, 2]
    to_k = 8 * 8
    to_v = 8 * 8 + (2 * 8 + 8 * 2)
    to_out = 8 * 8 + 8
    fc1 = 8 * 16 + 16
    fc2 = 16 * 8 + 8
    lm_head = 8 * 256 + 256
    block = layer_norm + to_q + to_k + to_v + to_out + layer_norm + fc1 + fc2
    total = token_emb + pos_emb + block + layer_norm + lm_head
    lora = 2 * (2 * 8 + 8 * 2)
    frozen = 8 * 8 + 8 * 8  # W0 of to_q and to_v
    assert count_parameters(model) == {"total": total, "trainable": total - frozen, "lora": lora}
    mark_only_lora_as_trainable(model)
    assert count_parameters(model) == {"total": total, "trainable": lora, "lora": lora}


def test_lora_and_base_state_dict_partition() -> None:
    """lora_state_dict and base_state_dict split model.state_dict() into two disjoint halves."""
    model = _tiny_model(["q", "o", "ff", "emb"])
    full = model.state_dict()
    lora, base = lora_state_dict(model), base_state_dict(model)
    assert set(lora).isdisjoint(base)
    assert set(lora) | set(base) == set(full)
    assert all(k.endswith((".lora_A", ".lora_B")) for k in lora)
    assert not any("lora_" in k for k in base)
    expected_lora = {f"{name}.{p}" for name, _ in lora_layers(model) for p in ("lora_A", "lora_B")}
    assert set(lora) == expected_lora
    assert len(expected_lora) == 2 * (2 * (2 + 2) + 1)  # q, o, fc1, fc2 per block (x2) + token_emb
    for key, value in {**lora, **base}.items():
        assert torch.equal(value, full[key]), key


def test_lora_state_dict_empty_for_r0_model() -> None:
    model = _tiny_model(r=0)
    assert lora_state_dict(model) == {}
    assert set(base_state_dict(model)) == set(model.state_dict())
    assert count_parameters(model)["lora"] == 0
