"""``lora-export serve`` (issue 21): the adapter-slots decoder of the tiny model over HTTP on Ray Serve, started
through the command line in a subprocess (127.0.0.1, a free port, ``--stop-after`` as a safety net), held against
``genai.generate.generate_bytes`` (onnxruntime-genai, one request, one adapter) byte for byte: one request per
model, a mixed concurrent burst, server-sent events; the bad requests, each a 4xx with one line while the server
keeps answering; Ctrl-C stops it with exit 0 and no Ray process of its own left. The command's refusals (no Ray
started) run in-process, and its port probe against a port in TIME_WAIT. Skipped, with the reason, where Ray
cannot start."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke, same_base_other_rank

from lora_export.cli.serve_commands import check_port
from lora_export.errors import GenerationError
from lora_export.export.convert import export_adapter
from lora_export.genai.decoder import export_decoder
from lora_export.genai.generate import generate_bytes
from lora_export.layout import ADAPTER_FILE, MODEL_FILE, Form
from lora_export.model.checkpoint import save_checkpoint

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'lora-export[serve]')")

#: Prompt lengths 1 to 15 (past the window of 8), each + NEW within the tiny model's context of 32.
PROMPTS = [b"Hello, world", b"a", b"The quick brown", b"Hi th"]
NEW = 12
MODELS = ("base", "trained", "other")
READY_S, REQUEST_S, STOP_S = 120, 60, 60
NO_CLUSTER = "127.0.0.1:1"
#: What Ray itself says when it cannot start on a machine (no shared memory, no sockets, ...): skip, not fail.
RAY_CANNOT_START = re.compile(r"GCS|raylet|plasma|object.store|Failed to (start|connect)|node.?ip", re.IGNORECASE)


@dataclass
class Server:
    """A running ``lora-export serve`` process, its URL, and the pids (with their command lines) of every process
    it started (Ray's raylet, gcs_server, workers)."""

    process: subprocess.Popen
    url: str
    stderr: Path
    started: dict[int, str]


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path | None]]:
    """(tiny.pt as an adapter-slots decoder directory, {model name: its .onnx_adapter, None for the base}): the
    trained LoRA (r 4) and another of rank 2 on the same base."""
    folder = tmp_path_factory.mktemp("serve")
    slots = export_decoder(tiny_checkpoint, folder / "slots", form=Form.SLOTS)
    save_checkpoint(folder / "other.pt", same_base_other_rank(tiny_checkpoint, r=2, seed=4))
    other = export_adapter(folder / "other.pt", slots / MODEL_FILE, folder / "other.onnx_adapter")
    return slots, {"base": None, "trained": slots / ADAPTER_FILE, "other": other}


@pytest.fixture(scope="module")
def expected(served) -> dict[tuple[str, bytes], bytes]:
    """{(model, prompt): the NEW greedy bytes generate_bytes gives for that prompt and adapter alone}."""
    slots, adapters = served
    return {(name, prompt): bytes(generate_bytes(slots, prompt, max_new_bytes=NEW, adapter=adapter))
            for name, adapter in adapters.items() for prompt in PROMPTS}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every live process (zombies left out), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if entry.name.isdigit() and state != "Z":
            table[int(entry.name)] = (int(ppid), cmdline)
    return table


def descendants(root: int) -> dict[int, str]:
    """{pid: command line} of every live process below ``root``."""
    table, found, frontier = processes(), {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmdline) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = cmdline
                frontier.append(pid)
    return found


def halt(process: subprocess.Popen) -> None:
    """Stop a server that still runs: Ctrl-C, and if it has not stopped after STOP_S, kill it and every process
    below it."""
    if process.poll() is not None:
        return
    below = descendants(process.pid)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        alive = processes()
        for pid, cmdline in below.items():
            if alive.get(pid, (0, ""))[1] == cmdline:  # still the process it was, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        process.wait()


def start_server(slots: Path, adapters: dict[str, Path | None], folder: Path) -> Server:
    """``lora-export serve`` on a free port, once it has said it serves; pytest.skip where Ray cannot start.
    RAY_ADDRESS names a cluster that is not there, as a shell may: without --address the server must start a Ray
    instance of its own all the same."""
    port = free_port()
    pairs = [arg for name, path in adapters.items() if path is not None for arg in ("--adapter", f"{name}={path}")]
    command = [str(Path(sys.executable).with_name("lora-export")), "serve", str(slots), *pairs, "--host",
               "127.0.0.1", "--port", str(port), "--max-batch", "4", "--threads", "1", "--max-tokens", "16",
               "--stop-after", "240"]
    out, err = folder / "serve.out", folder / "serve.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "RAY_ADDRESS": NO_CLUSTER})
    deadline = time.monotonic() + READY_S
    while "serving http" not in out.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            halt(process)
            said = err.read_text(errors="replace").strip()
            if RAY_CANNOT_START.search(said):
                pytest.skip(f"Ray cannot start here: {said.splitlines()[-1][:300]}")
            pytest.fail(f"the server did not start (exit {process.returncode}):\n{said[-3000:]}")
        time.sleep(0.2)
    return Server(process, f"http://127.0.0.1:{port}", err, descendants(process.pid))


@pytest.fixture(scope="module")
def server(served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The served directory on a running server; stopped afterwards if a test has not (``halt``)."""
    running = start_server(*served, tmp_path_factory.mktemp("server"))
    yield running
    halt(running.process)


def call(url: str, method: str = "GET", path: str = "/health", body: bytes | dict | None = None,
         ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; a dict body is sent as JSON. A server that answers before
    reading the whole body (413) may reset the connection while it is sent: its answer is read all the same."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=REQUEST_S)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        try:
            connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def complete(url: str, model: str, prompt: bytes, **fields: object) -> bytes:
    """The exact bytes (choices[0].bytes_base64) of a greedy completion of NEW bytes; fails on any other status."""
    status, _, body = call(url, "POST", "/v1/completions",
                           {"model": model, "prompt": prompt.decode(), "max_tokens": NEW, **fields})
    assert status == 200, body
    answer = json.loads(body)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == NEW, answer
    generated = base64.b64decode(choice["bytes_base64"])
    assert choice["text"] == generated.decode("utf-8", errors="replace")
    return generated


def test_each_model_answers_what_generate_gives_for_its_adapter_alone(server, expected):
    status, _, body = call(server.url)
    assert status == 200 and json.loads(body)["models"] == list(MODELS)
    status, _, body = call(server.url, path="/v1/models")
    assert status == 200 and [model["id"] for model in json.loads(body)["data"]] == list(MODELS)
    for model in MODELS:
        assert complete(server.url, model, PROMPTS[0]) == expected[(model, PROMPTS[0])], model
    assert len({expected[(model, PROMPTS[0])] for model in MODELS}) == len(MODELS)  # the adapters matter


def test_a_mixed_concurrent_burst_answers_each_request_as_it_would_alone(server, expected):
    """12 requests at once over every model and prompt length: the replica batches them (up to 4 rows a run),
    each answer the bytes of its own adapter and prompt."""
    burst = [(MODELS[index % 3], PROMPTS[index % 4]) for index in range(12)]
    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(lambda pair: complete(server.url, *pair), burst))
    for pair, answer in zip(burst, answers, strict=True):
        assert answer == expected[pair], pair


def test_streamed_events_assemble_to_the_same_bytes(server, expected):
    status, headers, body = call(server.url, "POST", "/v1/completions",
                                 {"model": "other", "prompt": PROMPTS[2].decode(), "max_tokens": NEW, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), body
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert [chunk["finish_reason"] for chunk in chunks] == [None] * NEW + ["length"]
    assert b"".join(base64.b64decode(chunk["bytes_base64"]) for chunk in chunks) == expected[("other", PROMPTS[2])]


BAD_REQUESTS = [
    ({"model": "nope", "prompt": "Hi"}, 404, "unknown model 'nope'"),
    (b'{"model": "base", "prompt": ', 400, "malformed JSON"),
    ({"model": "base", "prompt": "x" * 30, "max_tokens": 4}, 400, "exceeds the model's context of 32"),
    ({"model": "base", "prompt": "Hi", "max_tokens": 10**12}, 400, "'max_tokens' must be between 1 and 16"),
    ({"model": "base", "prompt": "Hi", "temperature": -0.5}, 400, "'temperature' must be between 0"),
    (b'{"model": "base", "prompt": "' + b"x" * 10_000_000 + b'"}', 413, "over the limit"),
]


def test_bad_requests_get_a_4xx_with_one_line_and_the_server_keeps_answering(server, expected):
    for body, status, needle in BAD_REQUESTS:
        got, _, answer = call(server.url, "POST", "/v1/completions", body)
        message = json.loads(answer)["error"]["message"]
        assert got == status and needle in message and "\n" not in message, (status, answer[:300])
        assert complete(server.url, "trained", PROMPTS[1]) == expected[("trained", PROMPTS[1])]


def test_ctrl_c_stops_the_server_with_exit_0_and_no_ray_process_left(server):
    """Runs last in this file: the server is gone afterwards. Ray's daemons (by pid, with the command line they
    had, so a reused pid does not count) and workers must all be gone."""
    names = {cmdline.split()[0].rsplit("/", 1)[-1] for cmdline in server.started.values()}
    assert {"raylet", "gcs_server"} <= names, names
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(STOP_S) == 0, server.stderr.read_text()[-2000:]
    assert server.stderr.read_text().strip().endswith("stopped")
    deadline = time.monotonic() + 20
    while (left := {pid: cmdline for pid, (_, cmdline) in processes().items()
                    if server.started.get(pid) == cmdline}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left


# --------------------------------------------------------------------------- refusals, before Ray starts


@pytest.fixture
def no_ray(monkeypatch):
    """Starting the server fails the test: a refusal must come first."""
    import ray

    import lora_export.serve.app as app

    def started(*_args, **_kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(app, "start", started)
    yield
    assert not ray.is_initialized()


def test_the_command_refuses_bad_input_in_one_line_before_ray_starts(served, genai_adapters, no_ray):
    slots, adapters = served
    other = f"other={adapters['other']}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cases = [
            ([genai_adapters, "--adapter", other], "adapter-slots decoder"),
            ([slots, "--adapter", str(adapters["other"])], "write NAME=PATH"),
            ([slots, "--adapter", other, "--adapter", other], "given twice"),
            ([slots, "--adapter", f"base={adapters['other']}"], "not 'base'"),
            ([slots, "--adapter", "x=missing.onnx_adapter"], "no such adapter file"),
            ([slots, "--replicas", "0"], "must be >= 1"),
            ([slots, "--adapter", other, "--port", taken], f"cannot serve on 127.0.0.1:{taken}"),
        ]
        for args, needle in cases:
            code, _, stderr = invoke("serve", *args, "--stop-after", 1)
            assert_one_line_error(code, stderr, needle, progress_allowed=False)


@pytest.mark.skipif(os.name != "posix", reason="TIME_WAIT and SO_REUSEADDR as on POSIX")
def test_a_port_a_stopped_server_left_in_time_wait_is_free_and_a_listening_one_is_not():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server closes first: its side of the connection goes to TIME_WAIT
        with pytest.raises(GenerationError, match=f"cannot serve on 127.0.0.1:{port}: Address already in use"):
            check_port("127.0.0.1", port)
    client.close()
    check_port("127.0.0.1", port)
