"""``lora-export web DIR``: the browser page beside a genai decoder directory, and a server for it on 127.0.0.1.

``plan_page`` reads and checks everything before any work (the decoder directory, onnxruntime-web's files, every
adapter, the output directory); ``write_page`` then writes ``DIR/web/`` in one staged step (all files land or none):

* ``index.html``, ``decoder.js``: the page (this package's static files, copied);
* ``ort/``: onnxruntime-web's module and WASM build for each backend, copied from ``npm ci --prefix lora_export/web``
  (``default_ort_dir``) or ``--ort-dir``: ``ort.wasm.min.mjs`` + ``ort-wasm-simd-threaded.{mjs,wasm}`` (14 MB) for
  WASM, ``ort.webgpu.min.mjs`` + ``ort-wasm-simd-threaded.asyncify.{mjs,wasm}`` (27 MB) for WebGPU; a browser
  fetches only the one it uses;
* ``web.json``: the manifest ``decoder.js`` reads: model URL, cache tensors (past/present names, dtype, heads,
  head size), LoRA inputs and their rank-0 shapes, adapters, external data, context length;
* adapter form only: ``model.web.onnx``, the decoder with its LoRA inputs made required (their rank-0 default
  initializers removed: onnxruntime-web refuses to feed an input that has one), and ``adapters/<i>.bin``, each
  adapter's float32 tensors little-endian back to back (onnxruntime-web cannot read ``.onnx_adapter``), their
  names, shapes and byte offsets in ``web.json``. A merged decoder is loaded as it is (``../model.onnx``).

onnxruntime-web 1.30 runs every op of our decoders at opset 23 (``Attention``, ``Gelu``, ``LayerNormalization``;
int8's ``DynamicQuantizeLinear`` / ``MatMulInteger``; int4's ``com.microsoft.MatMulNBits``), on WASM and on
WebGPU, so no graph is lowered for the web. Its ``MatMulNBits`` computes in float32 whatever the node's
``accuracy_level`` (4 in our int4 builds: int8 activations on CPUs that have the kernel), so an int4 build's bytes
in the browser are those of onnxruntime with accuracy_level 0, and can differ from an x86 CPU's. Files of
``DIR/web/`` that are not the page's are left alone; the page's own are replaced on every run.

``open_server`` binds 127.0.0.1 only (a port in use is one ExportError line) and ``serve`` serves ``DIR`` (the page
at ``/web/``) with the cross-origin isolation headers that let onnxruntime-web use threads, until ``shutdown``,
an interrupt or ``stop_after`` seconds.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx

from ..errors import ExportError
from ..export.adapters import check_adapter, lora_input_specs, read_adapter
from ..export.core import staged_export
from ..files import check_output_dir
from ..genai.decoder import DecoderDirectory, read_decoder_dir
from ..layout import ADAPTER_FILE, MODEL_FILE, Form, decoder_outputs
from ..progress import SILENT, Progress

PACKAGE_DIR = Path(__file__).parent
PAGE_FILES = ("index.html", "decoder.js")
#: What the page loads of onnxruntime-web, per backend: its module, and the WASM build that module loads.
ORT_MODULES = {"wasm": "ort.wasm.min.mjs", "webgpu": "ort.webgpu.min.mjs"}
ORT_FILES = (*ORT_MODULES.values(), "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
WEB_DIR, ORT_DIR, ADAPTERS_DIR = "web", "ort", "adapters"
MANIFEST, WEB_MODEL = "web.json", "model.web.onnx"
HOST = "127.0.0.1"
DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def default_ort_dir() -> Path:
    """Where ``npm ci --prefix lora_export/web`` puts onnxruntime-web's files."""
    return PACKAGE_DIR / "node_modules" / "onnxruntime-web" / "dist"


def ort_files(ort_dir: str | os.PathLike | None = None) -> list[Path]:
    """onnxruntime-web's files the page loads (``ORT_FILES``), from ``ort_dir`` or ``default_ort_dir()``. Raises
    ExportError (one line saying how to get them) when one is missing."""
    directory = Path(ort_dir) if ort_dir is not None else default_ort_dir()
    missing = [name for name in ORT_FILES if not (directory / name).is_file()]
    if missing:
        raise ExportError(f"{directory}: no onnxruntime-web files ({missing[0]} missing): run `npm ci --prefix "
                          f"{PACKAGE_DIR}` or pass --ort-dir <onnxruntime-web>/dist")
    return [directory / name for name in ORT_FILES]


@dataclass
class PagePlan:
    """Everything ``write_page`` writes, read and checked: the decoder directory, the manifest, the adapters'
    blobs (file name in ``adapters/`` -> bytes), the web graph (adapter form) and onnxruntime-web's files."""

    directory: DecoderDirectory
    manifest: dict
    ort: list[Path]
    blobs: dict[str, bytes] = field(default_factory=dict)
    web_model: onnx.ModelProto | None = None

    @property
    def web_dir(self) -> Path:
        """``DIR/web/``: where the page goes."""
        return self.directory.path / WEB_DIR

    def outputs(self) -> list[Path]:
        """Every file ``write_page`` writes."""
        names = [*PAGE_FILES, MANIFEST, *(f"{ORT_DIR}/{p.name}" for p in self.ort),
                 *(f"{ADAPTERS_DIR}/{name}" for name in self.blobs), *([WEB_MODEL] if self.web_model else [])]
        return [self.web_dir / name for name in names]


def _cache_entries(proto: onnx.ModelProto) -> list[dict]:
    """The cache tensors of a decoder graph: past input and present output names, dtype, heads, head size (from the
    past input's type [batch, heads, past, head_size])."""
    entries = []
    for value in proto.graph.input:
        if value.name.startswith("past_key_values."):
            tensor = value.type.tensor_type
            dims = [d.dim_value for d in tensor.shape.dim]
            entries.append({"past": value.name, "present": value.name.replace("past_key_values.", "present.", 1),
                            "dtype": DTYPES[tensor.elem_type], "heads": dims[1], "head_size": dims[3]})
    return entries


def _external_data(proto: onnx.ModelProto, model_dir: Path) -> list[dict]:
    """The external-data files of a graph as onnxruntime-web's ``externalData`` wants them: the location the
    graph names and its URL relative to ``web/``. Raises ExportError for a location outside the directory."""
    locations = {entry.value for tensor in proto.graph.initializer
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    for location in locations:
        if Path(location).name != location or not (model_dir / location).is_file():
            raise ExportError(f"{model_dir / MODEL_FILE}: external data {location!r} is not a file beside it")
    return [{"path": location, "url": f"../{location}"} for location in sorted(locations)]


def _adapter_blob(tensors: Mapping[str, np.ndarray]) -> tuple[bytes, list[dict]]:
    """An adapter's tensors as float32 little-endian bytes back to back, and their index (name, shape, byte
    offset; every offset a multiple of 4, as a Float32Array view needs)."""
    chunks, index, offset = [], [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        index.append({"name": name, "shape": list(tensors[name].shape), "offset": offset})
        chunks.append(data)
        offset += len(data)
    return b"".join(chunks), index


def _read_adapters(directory: DecoderDirectory, extra: Sequence[Path]) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(name, tensors) of the directory's own adapter (adapter form) and of each ``extra`` file, each checked
    against the graph; names are file stems. Raises AdapterError / ExportError."""
    form = directory.metadata.get("form")
    if form != Form.ADAPTERS:
        if extra:
            raise ExportError(f"{directory.path}: a merged decoder takes no adapter (export it --adapters-as-inputs)")
        return []
    paths = [directory.path / ADAPTER_FILE, *extra]
    named: dict[str, dict[str, np.ndarray]] = {}
    for path in paths:
        if Path(path).stem in named:
            raise ExportError(f"{path}: a second adapter named {Path(path).stem!r}; rename one of the files")
        tensors, _ = read_adapter(path)
        errors, _ = check_adapter(directory.proto, tensors)
        if errors:
            raise ExportError(f"{path}: does not fit {directory.path}: {'; '.join(errors)}")
        named[Path(path).stem] = tensors
    return list(named.items())


def _web_graph(proto: onnx.ModelProto, lora_names: set[str]) -> onnx.ModelProto:
    """A copy of the adapter-form decoder whose LoRA inputs are required: their default initializers removed."""
    web = onnx.ModelProto()
    web.CopyFrom(proto)
    kept = [tensor for tensor in web.graph.initializer if tensor.name not in lora_names]
    del web.graph.initializer[:]
    web.graph.initializer.extend(kept)
    return web


def plan_page(model_dir: str | os.PathLike, *, adapters: Sequence[str | os.PathLike] = (),
              ort_dir: str | os.PathLike | None = None) -> PagePlan:
    """Read and check what the page of ``model_dir`` needs; nothing is written. Raises ExportError (no such
    directory, not a lora-export decoder directory, no onnxruntime-web files, an output that cannot be written),
    AdapterError (an unreadable adapter) or ExportError (one that does not fit)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: no such directory (give a directory `lora-export CKPT --genai` wrote)")
    directory = read_decoder_dir(model_dir)
    ort = ort_files(ort_dir)
    named = _read_adapters(directory, [Path(p) for p in adapters])
    specs = lora_input_specs(directory.proto)
    manifest = {
        "format": 1, "precision": directory.metadata.get("precision", "fp32"),
        "form": directory.metadata.get("form"), "opset": int(directory.metadata.get("opset", 0)),
        "context_length": directory.config.max_seq_len,
        "model": WEB_MODEL if specs else f"../{MODEL_FILE}",
        "external_data": _external_data(directory.proto, model_dir),
        "ort": {**{backend: f"{ORT_DIR}/{name}" for backend, name in ORT_MODULES.items()}, "wasm_paths": f"{ORT_DIR}/"},
        "cache": _cache_entries(directory.proto),
        "lora_inputs": [{"name": name, "base_shape": [d if isinstance(d, int) else 0 for d in dims]}
                        for name, (_, dims) in sorted(specs.items())],
        "adapters": [],
    }
    plan = PagePlan(directory, manifest, ort, web_model=_web_graph(directory.proto, set(specs)) if specs else None)
    for index, (name, tensors) in enumerate(named):
        blob, tensor_index = _adapter_blob(tensors)
        plan.blobs[f"{index}.bin"] = blob
        manifest["adapters"].append({"name": name, "file": f"{ADAPTERS_DIR}/{index}.bin", "tensors": tensor_index})
    for path in plan.outputs():
        check_output_dir(path.parent, [path.name], decoder_outputs(model_dir, Form.ADAPTERS))
    return plan


def write_page(plan: PagePlan, progress: Progress = SILENT) -> Path:
    """Write the page of ``plan`` into ``DIR/web/`` in one staged step, removing adapter blobs an earlier run left
    there; returns the page (``DIR/web/index.html``). Raises ExportError (a failed write: nothing lands)."""
    web_dir = plan.web_dir
    progress.stage(f"writing the page to {web_dir}/")
    with staged_export(web_dir) as stage:
        for name in PAGE_FILES:
            shutil.copyfile(PACKAGE_DIR / name, stage.path(web_dir / name))
        for source in plan.ort:
            shutil.copyfile(source, stage.path(web_dir / ORT_DIR / source.name))
        for name, blob in plan.blobs.items():
            stage.path(web_dir / ADAPTERS_DIR / name).write_bytes(blob)
        stale = [path for path in (web_dir / ADAPTERS_DIR).glob("*.bin") if path.name not in plan.blobs]
        stale += [] if plan.web_model is not None else [web_dir / WEB_MODEL]
        for path in stale:
            stage.remove(path)
        if plan.web_model is not None:
            onnx.save_model(plan.web_model, stage.path(web_dir / WEB_MODEL))
        stage.path(web_dir / MANIFEST).write_text(json.dumps(plan.manifest, indent=1) + "\n", encoding="utf-8")
    return web_dir / PAGE_FILES[0]


class PageHandler(SimpleHTTPRequestHandler):
    """Static files with the headers onnxruntime-web wants: cross-origin isolation (SharedArrayBuffer, so WASM
    threads), JavaScript and WASM MIME types, no caching (a page rewritten by a later run is reloaded); quiet."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def open_server(root: str | os.PathLike, port: int) -> ThreadingHTTPServer:
    """A server for the files under ``root`` bound to 127.0.0.1:``port`` (0: a free port), not yet serving.
    Raises ExportError (one line) when the port is in use or cannot be bound."""
    handler = functools.partial(PageHandler, directory=str(root))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ExportError(f"{HOST}:{port} is in use: choose another --port (0 picks a free one)") from None
        raise ExportError(f"{HOST}:{port}: cannot serve there: {err.strerror or err}") from None


def page_url(server: ThreadingHTTPServer) -> str:
    """The page's address on ``server`` (serving the model directory)."""
    return f"http://{HOST}:{server.server_address[1]}/{WEB_DIR}/"


def serve(server: ThreadingHTTPServer, stop_after: float | None = None) -> None:
    """Serve until ``server.shutdown()`` (from another thread), an exception (Ctrl-C) or ``stop_after`` seconds;
    the socket is closed however it ends."""
    timer = threading.Timer(stop_after, server.shutdown) if stop_after is not None else None
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        server.serve_forever(poll_interval=0.2)
    finally:
        if timer is not None:
            timer.cancel()
        server.server_close()
