"""The HTTP protocol of ``lora-export serve``: OpenAI-style completions, checked before any work.

``POST /v1/completions`` takes a JSON object::

    {"model": "<adapter name or the base's>", "prompt": "text", "max_tokens": 16, "temperature": 0.0,
     "top_k": 0, "seed": 0, "stream": false}

The model is byte-level: the prompt's UTF-8 bytes are its tokens and a token is one byte. ``temperature`` 0 is
greedy (the default, as reproducible as ``lora-export generate``), above 0 samples softmax(logits / temperature)
from the ``top_k`` likeliest bytes (0: all). A response (or, streaming, each server-sent event) carries
``choices[0].text`` (the bytes as UTF-8, invalid sequences replaced) and, because a byte model may emit bytes that
are not UTF-8, the exact bytes as ``choices[0].bytes_base64`` (a lora-export extension).

Everything a request can get wrong is a ``RequestError`` with an HTTP status and one line: the server answers it
with that status and stays up.
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

#: Requests larger than this are refused (413) before they are parsed.
MAX_BODY_BYTES = 1 << 20
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_k", "seed", "stream", "user"}


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Completion:
    """A checked request: the adapter slot's name, the prompt's bytes, and how to decode."""

    model: str
    prompt: bytes
    max_tokens: int
    temperature: float
    top_k: int
    seed: int
    stream: bool

    @property
    def greedy(self) -> bool:
        """Whether decoding takes the likeliest byte (temperature 0)."""
        return self.temperature == 0.0


def _number(body: dict[str, Any], name: str, default: float, kind: type, low: float, high: float) -> Any:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r:.40}")
    if not (math.isfinite(value) and low <= value <= high):
        raise RequestError(400, f"'{name}' must be between {low:g} and {high:g}, got {value!r:.40}")
    return kind(value)


def parse_completion(raw: bytes, models: list[str], context: int, max_tokens_limit: int) -> Completion:
    """Check a request body against the served ``models`` and the model's ``context`` (prompt + max_tokens bytes
    at most); RequestError (400 malformed or out of range, 404 unknown model, 413 too large) otherwise."""
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {len(raw):,} bytes is over the limit of {MAX_BODY_BYTES:,}")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r:.40}; accepted: {', '.join(sorted(FIELDS))}")
    model, prompt = body.get("model"), body.get("prompt")
    if not isinstance(model, str) or model not in models:
        raise RequestError(404, f"unknown model {model!r:.60}; served: {', '.join(models)}")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string")
    encoded = prompt.encode("utf-8", errors="surrogatepass")
    max_tokens = _number(body, "max_tokens", 16, int, 1, max_tokens_limit)
    if len(encoded) + max_tokens > context:
        raise RequestError(400, f"prompt of {len(encoded)} bytes + max_tokens {max_tokens} exceeds the model's "
                                f"context of {context} bytes")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false")
    return Completion(model=model, prompt=encoded, max_tokens=max_tokens,
                      temperature=_number(body, "temperature", 0.0, float, 0.0, 100.0),
                      top_k=_number(body, "top_k", 0, int, 0, 256), seed=_number(body, "seed", 0, int, 0, 2**63 - 1),
                      stream=stream)


def completion_id() -> str:
    """A fresh OpenAI-style completion id."""
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(request_id: str, model: str, generated: bytes, prompt_tokens: int,
                    finish_reason: str | None) -> dict[str, Any]:
    """An OpenAI ``text_completion`` object for ``generated`` bytes (whole, or one streamed piece)."""
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": generated.decode("utf-8", errors="replace"),
                     "bytes_base64": base64.b64encode(generated).decode("ascii"), "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
                  "total_tokens": prompt_tokens + len(generated)},
    }


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``data`` (JSON, or the literal ``[DONE]``)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
