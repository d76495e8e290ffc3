"""The byte-level tokenizer of a genai directory: onnxruntime-genai's og.Tokenizer and Hugging Face tokenizers both
open it, token id = byte value in both (GPT-2's byte alphabet from transformers as the reference), text round-trips
exactly, and genai's own generator fed og.Tokenizer's ids generates what ``generate_bytes`` generates."""

from __future__ import annotations

import random

import numpy as np
import onnxruntime_genai as og
import pytest
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lora_export.genai.generate import generate_bytes
from lora_export.layout import TOKENIZER_CONFIG, TOKENIZER_FILE

#: Bytes that no UTF-8 text contains (overlong leads, beyond U+10FFFF): reachable only as token ids.
NOT_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
#: Code point ranges of 1-, 2-, 3- (surrogates left out) and 4-byte UTF-8 characters.
PLANES = [(0x01, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]


def random_texts(count: int = 40, seed: int = 0) -> list[str]:
    """Seeded texts mixing characters of every UTF-8 length, and one with every ASCII character but NUL."""
    rng = random.Random(seed)
    texts = ["".join(chr(rng.randint(*rng.choice(PLANES))) for _ in range(rng.randint(1, 24))) for _ in range(count)]
    return [*texts, "".join(map(chr, range(1, 128))), "  two  spaces\n\ttab 'll it's"]


@pytest.fixture(scope="module")
def tokenizers(genai_merged) -> tuple[og.Tokenizer, Tokenizer]:
    """(og.Tokenizer of the merged genai directory, HF tokenizers.Tokenizer of its tokenizer.json)."""
    return og.Tokenizer(og.Model(str(genai_merged))), Tokenizer.from_file(str(genai_merged / TOKENIZER_FILE))


def og_ids(tokenizer: og.Tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text)]


def og_text(tokenizer: og.Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(np.array(ids, dtype=np.int32))


def test_both_forms_carry_the_same_tokenizer_and_genai_opens_it(genai_merged, genai_adapters):
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG):
        assert (genai_merged / name).read_bytes() == (genai_adapters / name).read_bytes()
    tokenizer = og.Tokenizer(og.Model(str(genai_adapters)))
    assert og_ids(tokenizer, "abc") == [97, 98, 99]


def test_each_byte_is_the_token_whose_id_is_its_value(tokenizers):
    """All 256 bytes, including those no text can reach: GPT-2's symbol of byte b is token b in both."""
    genai, hf = tokenizers
    symbols = bytes_to_unicode()
    assert hf.get_vocab_size(with_added_tokens=True) == 256
    for byte in range(256):
        assert genai.to_token_id(symbols[byte]) == byte
        assert hf.token_to_id(symbols[byte]) == byte
        assert hf.id_to_token(byte) == symbols[byte]


def test_text_encodes_to_its_utf8_bytes_in_both(tokenizers):
    genai, hf = tokenizers
    texts = random_texts()
    covered = {byte for text in texts for byte in text.encode()}
    assert covered == set(range(1, 256)) - NOT_IN_UTF8  # every byte a NUL-free text can hold
    for text in texts:
        assert og_ids(genai, text) == list(text.encode()), text
        assert hf.encode(text, add_special_tokens=False).ids == list(text.encode()), text
    assert hf.encode("a\x00b", add_special_tokens=False).ids == [97, 0, 98]


def test_decode_round_trips_text_and_hf_tokens_give_back_any_bytes(tokenizers):
    genai, hf = tokenizers
    for text in random_texts(seed=1):
        ids = list(text.encode())
        assert og_text(genai, ids) == text
        stream = genai.create_stream()
        assert "".join(stream.decode(i) for i in ids) == text
        assert hf.decode(ids, skip_special_tokens=False) == text
    assert hf.decode([97, 0, 98]) == "a\x00b"
    byte_of = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    rng = np.random.default_rng(0)
    for data in [bytes(range(256)), b"\xff\xfe a \x80\xc3", *(rng.bytes(int(rng.integers(1, 64))) for _ in range(20))]:
        ids = list(data)
        assert bytes(byte_of[hf.id_to_token(i)] for i in ids) == data
        assert hf.decode(ids) == data.decode("utf-8", errors="replace")


def test_genai_text_apis_lose_a_nul_and_bytes_that_are_not_utf8(tokenizers):
    """Why ``generate`` keeps the bytes as ids itself (the claims in genai/tokenizer.py's docstring)."""
    genai, _ = tokenizers
    assert og_ids(genai, "a\x00b") == [97]
    assert og_text(genai, [97, 0, 98]) == "a"
    assert og_text(genai, [97, 255, 98]) == "a\ufffd"
    stream = genai.create_stream()
    assert [stream.decode(i) for i in b"\xc3bc"] == ["", "", "c"]


def test_genai_generator_fed_tokenizer_ids_generates_what_generate_does(genai_merged, tokenizers):
    genai, _ = tokenizers
    prompt, new = "Hello wörld, ", 12
    ids = og_ids(genai, prompt)
    assert ids == list(prompt.encode())
    model = og.Model(str(genai_merged))
    params = og.GeneratorParams(model)
    length = len(ids) + new
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    generated = [int(i) for i in generator.get_sequence(0)[len(ids):]]
    assert generated == list(generate_bytes(genai_merged, prompt.encode(), max_new_bytes=new))
