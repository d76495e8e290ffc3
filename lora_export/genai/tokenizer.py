"""The byte-level tokenizer every genai directory carries: 256 tokens, token id = byte value, nothing added.

``og.Tokenizer(og.Model(DIR))`` (onnxruntime-extensions underneath) needs tokenizer.json and tokenizer_config.json;
Hugging Face ``tokenizers.Tokenizer.from_file`` and transformers' ``AutoTokenizer`` read the same two files. The
form is GPT-2's byte-level BPE without merges: byte ``b`` is the token whose string is GPT-2's printable stand-in
for ``b`` (``byte_symbols``) and whose id is ``b``; no special or added tokens (genai takes its eos / pad ids from
genai_config.json), no normalizer, no prefix space, no clean-up. The class named is ``PreTrainedTokenizerFast``:
transformers' ``GPT2Tokenizer`` would add ``<|endoftext|>`` as a 257th token. The content is built here, the same
bytes for every model.

What the text APIs do (checked with onnxruntime-genai 0.18 and tokenizers 0.23): they take and return str, so
they are exact for text and only for text.

- encode(str): both give the text's UTF-8 bytes as ids. genai's C API ends the text at its first NUL
  (``"a\\x00b"`` -> [97]); HF keeps it. Bytes that are not UTF-8 are no text: their ids are the bytes themselves
  (``list(data)``), as ``generate`` feeds them.
- decode(ids) -> str: HF replaces each invalid UTF-8 sequence with U+FFFD, as Python's ``errors="replace"`` does;
  genai's ``decode`` ends its text at the first NUL or invalid byte (written as U+FFFD; a NUL too when first) and its
  ``TokenizerStream`` holds bytes back until they complete a character, and drops a NUL, and an invalid byte
  together with the bytes held back with it (``b"\\xc3bc"`` -> "", "", "c"). The exact bytes of any ids are
  ``bytes(ids)``; through HF, ``id_to_token`` mapped back through ``byte_symbols``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..layout import TOKENIZER_CONFIG, TOKENIZER_FILE
from ..model.transformer import VOCAB_SIZE

#: tokenizer_config.json: the tokenizer.json-only class, no added tokens, decode leaves spaces as they are.
CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
          "clean_up_tokenization_spaces": False}


def byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet, indexed by byte value (256 one-character strings): printable Latin-1 bytes
    stand for themselves, the other 68 bytes, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(0x100, 0x100 + VOCAB_SIZE - len(printable)))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(VOCAB_SIZE)]


def tokenizer_json() -> dict:
    """tokenizer.json (Hugging Face tokenizers' format): byte-level BPE, vocab = ``byte_symbols`` with id = byte,
    no merges, no added tokens."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {symbol: byte for byte, symbol in enumerate(byte_symbols())}, "merges": []}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level, "model": model}


def tokenizer_texts(output_dir: Path) -> dict[Path, str]:
    """{path in ``output_dir``: content} of the tokenizer files, for ``export.core.write_companions`` to write into
    the export's stage: deterministic JSON, ASCII only (the non-ASCII symbols as ``\\u`` escapes)."""
    def text(content: dict) -> str:
        return json.dumps(content, indent=2) + "\n"

    return {output_dir / TOKENIZER_FILE: text(tokenizer_json()), output_dir / TOKENIZER_CONFIG: text(CONFIG)}
