"""``lora-export serve``: many adapters of one base over HTTP, on Ray Serve (one machine or a Ray cluster).

Two deployments. ``Frontend`` is the HTTP ingress (FastAPI): it reads and checks each request
(``protocol.parse_completion``: a bad one is a 4xx with one line, nothing reaches a model replica), hands it to a
``ModelReplica`` through its handle and streams the answer back as server-sent events or one JSON object. A replica
that dies or fails mid-request gets the request a 503 with ``Retry-After`` (Ray Serve restarts the replica).
``ModelReplica`` holds the adapter-slots decoder (``lora-export CKPT --genai --adapter-slots``) and a pack of the
adapters registered at start (by name only: a request never names a file); ``serve.batch`` gathers the requests that
arrive together, and every decode step runs all their rows, each with its own adapter, in one ONNX Runtime run
(``genai.batch.BatchDecoder``).
"""


import asyncio
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..errors import GenerationError
from ..export.slots import BASE_SLOT, Pack, pack_adapters, read_pack
from ..genai.batch import BatchDecoder
from ..genai.decoder import read_decoder_dir
from ..genai.generate import Sampling
from ..layout import MODEL_FILE, Form
from .protocol import (
    MAX_BODY_BYTES,
    Completion,
    RequestError,
    completion_body,
    completion_id,
    error_body,
    parse_completion,
    sse,
)

APP_NAME = "lora-export"
#: How long a replica waits for more requests to join a batch.
BATCH_WAIT_S = 0.01
RETRY_AFTER_S = 2
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ServeSettings:
    """What ``lora-export serve`` serves: the slots decoder directory, the adapters by name (``.onnx_adapter``
    files), replicas, the largest batch a replica decodes at once, ONNX Runtime threads per replica (None: its
    default) and the most bytes a request may ask for (None: the model's context)."""

    model_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    replicas: int = 1
    max_batch: int = 8
    threads: int | None = None
    max_tokens: int | None = None


def check_settings(settings: ServeSettings) -> tuple[int, list[str]]:
    """Refuse (one line: GenerationError, or the decoder's / adapters' own errors) what cannot be served, before Ray
    starts: a directory that is not a slots-form decoder, adapter names that are not plain or clash with the base's,
    adapters that do not pack for it. Returns the context length and the served model names (the base first)."""
    directory = read_decoder_dir(settings.model_dir)
    if directory.metadata.get("form") != Form.SLOTS:
        raise GenerationError(f"{settings.model_dir}: serve needs the adapter-slots decoder (export it with "
                              f"--genai --adapter-slots); this one is the {directory.metadata.get('form')} form")
    for name in settings.adapters:
        if name == BASE_SLOT or not ADAPTER_NAME.fullmatch(name):
            raise GenerationError(f"adapter name {name!r:.70}: use up to 64 letters, digits, '.', '_', '-', "
                                  f"not '{BASE_SLOT}'")
    if settings.replicas < 1 or settings.max_batch < 1 or (settings.threads is not None and settings.threads < 1):
        raise GenerationError("--replicas, --max-batch and --threads must be >= 1")
    with tempfile.TemporaryDirectory(prefix="lora-export-serve.") as scratch:
        load_pack(settings, Path(scratch))  # what every replica will do, once here, failing with one line
    context = directory.config.max_seq_len
    return min(context, settings.max_tokens or context), [BASE_SLOT, *settings.adapters]


def load_pack(settings: ServeSettings, scratch: Path) -> Pack | None:
    """The served adapters packed into slots 1.. in the order given (None without adapters)."""
    if not settings.adapters:
        return None
    return read_pack(pack_adapters(list(settings.adapters.values()), scratch / "served.onnx_adapter",
                                   list(settings.adapters), model=Path(settings.model_dir) / MODEL_FILE))


def sampling_of(completion: Completion) -> Sampling:
    """The decoding a checked request asks for."""
    return Sampling(greedy=completion.greedy, temperature=completion.temperature or 1.0, top_k=completion.top_k,
                    seed=completion.seed)


@serve.deployment(max_ongoing_requests=256)
class ModelReplica:
    """One replica: the slots decoder and the pack of the served adapters, decoding batches of requests."""

    def __init__(self, settings: ServeSettings) -> None:
        with tempfile.TemporaryDirectory(prefix="lora-export-replica.") as scratch:
            pack = load_pack(settings, Path(scratch))
        self.decoder = BatchDecoder(settings.model_dir, pack, threads=settings.threads)
        self.decode.set_max_batch_size(settings.max_batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def decode(self, completions: list[Completion]) -> AsyncIterator[list[Any]]:
        """Decode the gathered requests as one batch, one ONNX Runtime run per step: yields, per step, each
        request's new byte (StopIteration once it has its max_tokens)."""
        steps = self.decoder.steps([c.prompt for c in completions], [c.model for c in completions],
                                   [c.max_tokens for c in completions], [sampling_of(c) for c in completions])
        loop = asyncio.get_running_loop()
        while True:
            chosen = await loop.run_in_executor(None, next, steps, None)  # the event loop keeps taking requests
            if chosen is None:
                return
            yield [StopIteration if byte is None else bytes([byte]) for byte in chosen]

    async def generate(self, completion: Completion) -> AsyncIterator[bytes]:
        """The request's generated bytes, one per decode step of the batch it joined (streamed requests)."""
        async for piece in self.decode(completion):
            yield piece

    async def complete(self, completion: Completion) -> bytes:
        """The request's generated bytes at once (one reply instead of one per byte)."""
        return b"".join([piece async for piece in self.decode(completion)])


api = FastAPI(title="lora-export serve")


async def read_body(request: Request) -> bytes:
    """The request's body, refused (413) past MAX_BODY_BYTES without reading further."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the limit of {MAX_BODY_BYTES:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"request body is over the limit of {MAX_BODY_BYTES:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def refused(status: int, message: str) -> JSONResponse:
    """A one-line error response; 503 tells the client when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(api)
class Frontend:
    """The HTTP side: routes, request checks, streaming, and 503 for a replica that failed."""

    def __init__(self, replica: DeploymentHandle, models: list[str], max_tokens: int, context: int) -> None:
        self.replica, self.models, self.max_tokens, self.context = replica, models, max_tokens, context

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": self.models}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": APP_NAME}
                                           for name in self.models]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        try:
            completion = parse_completion(await read_body(request), self.models, self.context, self.max_tokens)
        except RequestError as err:
            return refused(err.status, str(err))
        request_id = completion_id()
        if completion.stream:
            pieces = self.replica.options(stream=True).generate.remote(completion)
            return StreamingResponse(self.events(pieces, completion, request_id), media_type="text/event-stream")
        try:
            generated = await self.replica.complete.remote(completion)
        except Exception as err:  # the replica died or failed: Ray Serve restarts it; the client may retry
            return refused(503, f"the model replica failed ({type(err).__name__}); retry")
        return completion_body(request_id, completion.model, generated, len(completion.prompt), "length")

    async def events(self, pieces: Any, completion: Completion, request_id: str) -> AsyncIterator[bytes]:
        """Server-sent events: one per generated byte, the finish, then [DONE]; an error event if the replica
        fails mid-stream (the status line has gone out already)."""
        try:
            async for piece in pieces:
                yield sse(completion_body(request_id, completion.model, piece, len(completion.prompt), None))
        except Exception as err:  # as in completions(): the client sees a retryable error event
            yield sse(error_body(503, f"the model replica failed ({type(err).__name__}); retry"))
            return
        yield sse(completion_body(request_id, completion.model, b"", len(completion.prompt), "length"))
        yield sse("[DONE]")


def application(settings: ServeSettings) -> serve.Application:
    """The Ray Serve application of ``settings`` (checked: ``check_settings``)."""
    max_tokens, models = check_settings(settings)
    context = read_decoder_dir(settings.model_dir).config.max_seq_len
    replica = ModelReplica.options(num_replicas=settings.replicas, ray_actor_options={"num_cpus": 0}).bind(settings)
    return Frontend.options(ray_actor_options={"num_cpus": 0}).bind(replica, models, max_tokens, context)


def start(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> str:
    """Start the server (a local Ray instance, or the cluster at ``address``) and return its URL; it serves until
    ``stop()``. The application is checked before Ray starts."""
    app = application(settings)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if not ray.is_initialized():
        # "local": a Ray instance of its own, even where RAY_ADDRESS or a `ray start` cluster would be found
        local = {"num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1"} if address is None else {}
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 **local)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "ERROR"})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop(address: str | None = None) -> None:
    """Stop the application; on the local Ray instance this process started, Serve and Ray too. On a cluster
    (``address``) only this application goes: other Serve applications there keep running."""
    if not ray.is_initialized():
        return
    if address is not None:
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
    ray.shutdown()
