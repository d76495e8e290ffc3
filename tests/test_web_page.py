"""``lora-export web``: the page runs the decoder in a real browser (headless Chromium, Debian's package, driven over
the DevTools protocol on a pipe) with onnxruntime-web's WASM backend, and the greedy bytes it streams are PyTorch's
(fp32, with and without the adapter) and the same int4 file's under onnxruntime in Python; the command writes,
serves on 127.0.0.1, stops by itself, and refuses bad input in one line. (WebGPU is not tested here: headless
Chromium's SwiftShader adapter runs it, but too slowly for the suite.)"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_CONFIG, assert_one_line_error, invoke

from lora_export.cli import web_commands  # noqa: F401  (registers `lora-export web` until cli/__init__ does)
from lora_export.export.adapters import attach_adapter
from lora_export.genai.decoder import export_decoder
from lora_export.layout import ADAPTER_FILE, MODEL_FILE
from lora_export.model.checkpoint import load_checkpoint
from lora_export.web.page import ORT_FILES, default_ort_dir, open_server, page_url, plan_page, serve, write_page

#: Installing a browser is the environment's job (``.ci/run`` installs Debian's ``chromium``), never a test's.
CHROMIUM = shutil.which("chromium")
ORT_MISSING = [name for name in ORT_FILES if not (default_ort_dir() / name).is_file()]
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or bool(ORT_MISSING),
    reason="headless Chromium not installed (Debian: apt-get install chromium)" if CHROMIUM is None else
    f"onnxruntime-web's files are missing ({default_ort_dir()}): run `npm ci --prefix lora_export/web`")
PROMPT = b"Hello, world"  # 12 bytes: past the local window of 8 ...
NEW = TINY_CONFIG["max_seq_len"] - len(PROMPT)  # ... and to the end of the context (past window + cache slack)
SERVE_SECONDS = 50  # the test's server stops by itself after this, whatever happens


#: Started before Chromium: puts the pipes given as argv[1] and argv[2] on fds 3 and 4 and becomes Chromium
#: (a shell's redirections cannot name descriptors above 9; a preexec_fn is unsafe beside the server's threads).
PLUMB = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
         "os.execv(sys.argv[3], sys.argv[3:])")


def _above_4(fd: int) -> int:
    """``fd`` moved to a descriptor above 4 (so that the child's redirections to 3 and 4 cannot overwrite it)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 5)
    os.close(fd)
    return moved


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: it reads
    NUL-terminated JSON commands on fd 3 and answers on fd 4); no websocket client needed."""

    def __init__(self, user_data: Path) -> None:
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()
        to_child, from_child = (_above_4(fd) for fd in (to_child, from_child))
        flags = ["--headless", "--no-sandbox", "--disable-dev-shm-usage", "--remote-debugging-pipe",
                 f"--user-data-dir={user_data}"]
        self.process = subprocess.Popen([sys.executable, "-c", PLUMB, str(to_child), str(from_child), CHROMIUM, *flags,
                                         "about:blank"], pass_fds=(to_child, from_child), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._id = b"", 0

    def call(self, method: str, session: str | None = None, timeout: float = 40, **params: object) -> dict:
        """Send one command and return its result; raises on an error answer or after ``timeout`` seconds."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"{method}: no answer from Chromium in {timeout} s")
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, url: str, expression: str) -> object:
        """Open ``url`` in a new tab, await the promise ``expression`` gives there, close the tab, return its value
        (an exception thrown in the page is raised here with its text)."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        try:
            deadline = time.monotonic() + 20
            while not self._has_page_api(session):  # until the page's module has set window.loraWeb
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}: the page never set window.loraWeb")
                time.sleep(0.05)
            result = self.call("Runtime.evaluate", session, expression=expression, awaitPromise=True,
                               returnByValue=True)
        finally:
            self.call("Target.closeTarget", targetId=target)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def _has_page_api(self, session: str) -> bool:
        """Whether the tab's page has loaded its module (before navigation ends there is no context to ask)."""
        try:
            found = self.call("Runtime.evaluate", session, expression="typeof window.loraWeb", returnByValue=True)
        except RuntimeError:
            return False
        return found["result"].get("value") == "object"

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One headless Chromium for the module's pages."""
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def served(model_dir: Path) -> tuple[str, threading.Thread, ThreadingHTTPServer]:
    """Write the page of ``model_dir`` and serve it on 127.0.0.1 (a free port) in a thread that stops by itself
    after SERVE_SECONDS; returns (page URL, thread, server)."""
    write_page(plan_page(model_dir))
    server = open_server(model_dir, 0)
    thread = threading.Thread(target=serve, args=(server, SERVE_SECONDS), daemon=True)
    thread.start()
    return page_url(server), thread, server


def browser_greedy(browser: Browser, url: str, adapters: list[str]) -> list[dict]:
    """Greedy generation of NEW bytes after PROMPT with each of ``adapters`` in turn ("": none), driven
    through the page's own form in one tab: per run {bytes, backend, msPerByte, text, adapters}."""
    script = f"""(async () => {{
        const loaded = await window.loraWeb.ready;
        const ui = (id) => document.getElementById(id);
        const runs = [];
        for (const adapter of {json.dumps(adapters)}) {{
            ui("prompt").value = {json.dumps(PROMPT.decode())};
            ui("max-new").value = {NEW};
            ui("adapter").value = adapter;
            ui("greedy").checked = true;
            ui("generate").click();
            const run = await window.loraWeb.lastRun;
            runs.push({{...run, text: ui("output").textContent, adapters: loaded.adapters}});
        }}
        return runs;
    }})()"""
    return browser.evaluate(url, script)


def torch_greedy(model: torch.nn.Module) -> list[int]:
    return model.generate(torch.tensor([list(PROMPT)]), NEW, greedy=True)[0, len(PROMPT):].tolist()


def ort_greedy(model_path: Path, accuracy_level: int | None = None) -> list[int]:
    """Greedy bytes of a decoder graph under onnxruntime (Python, CPU), fed step by step: present -> past; with
    ``accuracy_level`` every MatMulNBits node is given that level first."""
    proto = onnx.load(model_path)
    for attribute in (a for node in proto.graph.node if node.op_type == "MatMulNBits" for a in node.attribute):
        if attribute.name == "accuracy_level" and accuracy_level is not None:
            attribute.i = accuracy_level
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}
    fresh, done, out = list(PROMPT), 0, []
    for _ in range(NEW):
        n = len(fresh)
        results = session.run(None, {"input_ids": np.array([fresh], np.int64),
                                     "attention_mask": np.ones((1, done + n), np.int64),
                                     "position_ids": np.arange(done, done + n, dtype=np.int64)[None], **past})
        fresh, done = [int(results[0][0, -1].argmax())], done + n
        past = {name.replace("present.", "past_key_values.", 1): value
                for name, value in zip(names[1:], results[1:], strict=True)}
        out += fresh
    return out


@pytest.fixture(scope="module")
def adapters_dir(genai_adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared adapter-form fp32 decoder (the page is written into the copy)."""
    return Path(shutil.copytree(genai_adapters, tmp_path_factory.mktemp("web") / "adapters"))


@pytest.fixture(scope="module")
def int4_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.pt as a merged int4 decoder (the default int4 build)."""
    return export_decoder(tiny_checkpoint, tmp_path_factory.mktemp("web") / "int4", precision="int4")


@needs_browser
def test_browser_greedy_bytes_are_pytorchs_with_and_without_the_adapter(browser, adapters_dir, tiny_checkpoint):
    trained = load_checkpoint(tiny_checkpoint)
    base = load_checkpoint(tiny_checkpoint)
    attach_adapter(base, None)
    expected = {"model": torch_greedy(trained), "": torch_greedy(base)}
    assert expected["model"] != expected[""]  # the adapter really changes the bytes
    url, thread, server = served(adapters_dir)
    try:
        runs = browser_greedy(browser, url + "?backend=wasm", list(expected))
    finally:
        server.shutdown()
        thread.join(5)
    assert not thread.is_alive()
    for run, (adapter, want) in zip(runs, expected.items(), strict=True):
        assert run["backend"] == "wasm" and run["adapters"] == ["model"]
        assert run["bytes"] == want, adapter
        assert run["text"] == (PROMPT + bytes(want)).decode("utf-8", errors="replace")


@needs_browser
def test_browser_int4_bytes_are_onnxruntimes(browser, int4_dir, tiny_checkpoint):
    """The int4 build (com.microsoft MatMulNBits) at opset 23 (Attention) runs unchanged in onnxruntime-web: its
    bytes are those of the same file under onnxruntime in Python at accuracy_level 0 (the float32 compute
    onnxruntime-web does whatever the level); agreement with PyTorch is printed (int4 may differ)."""
    expected = ort_greedy(int4_dir / MODEL_FILE, accuracy_level=0)
    url, thread, server = served(int4_dir)
    try:
        [run] = browser_greedy(browser, url + "?backend=wasm", [""])
    finally:
        server.shutdown()
        thread.join(5)
    assert run["backend"] == "wasm" and run["bytes"] == expected
    reference = torch_greedy(load_checkpoint(tiny_checkpoint))
    agree = sum(a == b for a, b in zip(run["bytes"], reference, strict=True))
    print(f"int4 in the browser vs PyTorch: {agree}/{NEW} bytes agree")


@pytest.fixture(scope="module")
def fake_ort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty stand-ins for onnxruntime-web's files (``--ort-dir``): the command's own tests need no npm."""
    directory = tmp_path_factory.mktemp("ort-dist")
    for name in ORT_FILES:
        (directory / name).write_bytes(b"")
    return directory


def test_page_files_and_adapter_blob(adapters_dir, fake_ort):
    """--no-serve writes the page; the adapter blob holds the .onnx_adapter's tensors exactly (read here with
    onnxruntime's own reader) and the web graph keeps every weight but the LoRA defaults, whose inputs it keeps."""
    code, out, err = invoke("web", adapters_dir, "--no-serve", "--quiet", "--ort-dir", fake_ort)
    assert code == 0, err
    web = adapters_dir / "web"
    manifest = json.loads((web / "web.json").read_text())
    params = ort.AdapterFormat.read_adapter(str(adapters_dir / ADAPTER_FILE)).get_parameters()
    [adapter] = manifest["adapters"]
    blob = (web / adapter["file"]).read_bytes()
    assert {t["name"] for t in adapter["tensors"]} == set(params)
    for entry in adapter["tensors"]:
        count = int(np.prod(entry["shape"]))
        got = np.frombuffer(blob, "<f4", count, entry["offset"]).reshape(entry["shape"])
        np.testing.assert_array_equal(got, params[entry["name"]].numpy())
    source, web_graph = onnx.load(adapters_dir / MODEL_FILE).graph, onnx.load(web / manifest["model"]).graph
    lora = {i.name for i in source.input if i.name.endswith((".lora_A", ".lora_B"))}
    assert lora and lora <= {i.name for i in web_graph.input}
    assert {t.name for t in web_graph.initializer} == {t.name for t in source.initializer} - lora


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_web_serves_on_localhost_and_stops_by_itself(adapters_dir, fake_ort):
    port, fetched = free_port(), {}

    def fetch() -> None:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/web/", timeout=2) as response:
                    fetched.update(body=response.read().decode(), headers=dict(response.headers))
                    return
            except OSError:
                time.sleep(0.05)

    client = threading.Thread(target=fetch)
    client.start()
    started = time.monotonic()
    code, out, err = invoke("web", adapters_dir, "--port", port, "--stop-after", "2", "--quiet", "--ort-dir", fake_ort)
    client.join()
    assert code == 0, err
    assert f"http://127.0.0.1:{port}/web/" in out and time.monotonic() - started < 10
    assert 'from "./decoder.js"' in fetched["body"]
    assert fetched["headers"]["Cross-Origin-Embedder-Policy"] == "require-corp"


@pytest.mark.parametrize(("case", "needle"), [
    ("missing", "no such directory"),
    ("empty", "not a genai model directory"),
    ("port", "is in use"),
    ("ort", "no onnxruntime-web files"),
    ("merged-adapter", "merged decoder takes no adapter"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, needle, adapters_dir, int4_dir, fake_ort, tmp_path):
    model_dir = {"missing": tmp_path / "nope", "empty": tmp_path, "merged-adapter": int4_dir}.get(case) or Path(
        shutil.copytree(adapters_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("web")))
    before = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else None
    with socket.socket() as taken:  # a port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = ["web", model_dir, "--port", taken.getsockname()[1] if case == "port" else 0,
                "--ort-dir", tmp_path if case == "ort" else fake_ort]
        code, _, err = invoke(*args, *(["--adapter", adapters_dir / ADAPTER_FILE] if case == "merged-adapter" else []))
    assert_one_line_error(code, err, needle, progress_allowed=False)
    assert (sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else None) == before
