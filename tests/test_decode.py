"""Incremental decoding in PyTorch: the cached forward equals the full forward at every position, for every head
kind, window, blindspot and chunking, with padding; the local heads' cache stays bounded."""

from __future__ import annotations

import itertools

import pytest
import torch

from lora_export.model.transformer import LoRATransformerLM, ModelConfig

MAX_LEN = 40
BASE = dict(dim=24, depth=2, heads=3, dim_head=8, max_seq_len=MAX_LEN, ff_mult=2, dropout=0.0, r=2,
            lora_targets=["q", "v", "o", "ff", "emb"])
HEADS = {  # n_local_attn_heads, global_attn
    "local only": (3, "softmax"),
    "softmax only": (0, "softmax"),
    "linear only": (0, "linear"),
    "local + softmax": (1, "softmax"),
    "local + linear": (2, "linear"),
}
CHUNKS = {  # prompt length, then the sizes of the later steps
    "bytes": [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "long prompt": [23, 1, 1, 1, 1, 2, 1],
    "mixed": [1, 3, 1, 7, 2, 1, 9, 1],
    "to the end": [13, 4, 8, 1, 14],
}


def _model(n_local: int, global_attn: str, window: int, blindspot: int | None, seed: int = 0) -> LoRATransformerLM:
    torch.manual_seed(seed)
    config = ModelConfig(**BASE, n_local_attn_heads=n_local, global_attn=global_attn, local_attn_window_size=window,
                         blindspot_size=blindspot)
    model = LoRATransformerLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.2)
    return model


def _decode(model: LoRATransformerLM, ids: torch.Tensor, mask: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of ids [B, N] computed chunk by chunk through one DecodeCache -> [B, sum(chunks), 256]."""
    cache = model.new_cache()
    outputs, start = [], 0
    for size in chunks:
        outputs.append(model(ids[:, start:start + size], mask[:, start:start + size], cache=cache))
        start += size
    assert cache.length == start
    return torch.cat(outputs, dim=1)


# Local-only heads ignore the blindspot: two blindspot values suffice for them.
CASES = [(heads, window, blindspot) for heads in HEADS for window in (3, 8, 30) for blindspot in (None, 1, 3, 4)
         if HEADS[heads][0] < 3 or blindspot in (None, 3)]


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize(("heads", "window", "blindspot"), CASES, ids=[f"{h}-w{w}-b{b}" for h, w, b in CASES])
def test_cached_forward_equals_full_forward(heads, window, blindspot, chunks):
    model = _model(*HEADS[heads], window, blindspot)
    n = sum(chunks)
    generator = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 256, (2, n), generator=generator)
    mask = torch.ones(2, n, dtype=torch.int64)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        full = model(ids, mask)
        cached = _decode(model, ids, mask, chunks)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=2e-5, rtol=1e-4)


def test_local_cache_stays_bounded_and_global_grows():
    model = _model(2, "softmax", window=6, blindspot=None)
    cache = model.new_cache()
    ids = torch.randint(0, 256, (1, MAX_LEN), generator=torch.Generator().manual_seed(1))
    sizes = []
    with torch.no_grad():
        model(ids[:, :10], cache=cache)
        for t in range(10, MAX_LEN):
            model(ids[:, t:t + 1], cache=cache)
            layer = cache.layers[0]
            sizes.append((layer.local_k.shape[-2], layer.global_k.shape[-2]))
    assert {local for local, _ in sizes} == {5}  # w - 1 keys: all a later query can still see
    assert [glob for _, glob in sizes] == list(range(11, MAX_LEN + 1))


def test_linear_heads_keep_fixed_size_state():
    model = _model(0, "linear", window=4, blindspot=4)
    cache = model.new_cache()
    ids = torch.randint(0, 256, (1, MAX_LEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for start, size in zip(itertools.accumulate([0, 7, 1, 1, 9]), [7, 1, 1, 9, 2], strict=True):
            model(ids[:, start:start + size], cache=cache)
    layer = cache.layers[1]
    assert layer.linear_kv.shape == (1, 3, 8, 8) and layer.pending_k.shape == (1, 3, 8)
    assert layer.global_k is None and layer.local_k is None


def test_cache_past_max_seq_len_is_an_error():
    model = _model(1, "softmax", window=4, blindspot=None)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, MAX_LEN - 1, dtype=torch.int64), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.int64), cache=cache)
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            model(torch.zeros(1, 1, dtype=torch.int64), cache=cache)


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_generate_with_the_cache_equals_full_recompute(heads):
    """generate() decodes incrementally; every byte is still the argmax of the full forward on its prefix."""
    model = _model(*heads, window=5, blindspot=2)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=20, greedy=True)
    with torch.no_grad():
        for t in range(7, 27):
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1)), t
