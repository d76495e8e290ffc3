"""``lora-export serve DIR --adapter name=PATH ...``: the adapter-slots decoder in DIR over HTTP on Ray Serve
(``lora_export.serve``), until Ctrl-C or ``--stop-after`` seconds. Ray is an optional extra
(``pip install 'lora-export[serve]'``): without it the command says so in one line.

Importing this module registers the command on ``export_cli``."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import click

from ..errors import GenerationError, Terminated
from .export_commands import export_cli
from .options import exit_on_error


def parse_adapters(pairs: tuple[str, ...]) -> dict[str, Path]:
    """``name=PATH`` pairs as {name: path}; GenerationError for a pair without '=' or a name given twice."""
    adapters: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise GenerationError(f"--adapter {pair!r:.80}: write NAME=PATH (e.g. --adapter sql=sql.onnx_adapter)")
        if name in adapters:
            raise GenerationError(f"--adapter: the name {name!r:.60} is given twice")
        adapters[name] = Path(path)
    return adapters


def check_port(host: str, port: int) -> None:
    """Refuse (GenerationError) a port that is taken, before Ray starts. Probed as the HTTP server binds it
    (SO_REUSEADDR on POSIX, as uvicorn and asyncio do): a port a stopped server left in TIME_WAIT is free."""
    with socket.socket() as probe:
        if os.name == "posix":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise GenerationError(f"cannot serve on {host}:{port}: {err.strerror}") from None


@export_cli.command("serve")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Serve this .onnx_adapter as model NAME (repeatable); the base is served as 'base'.")
@click.option("--replicas", type=int, default=1, show_default=True, help="Model replicas (Ray Serve).")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Most requests a replica decodes together, one ONNX Runtime run per step for all of them.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads per replica [default: its own].")
@click.option("--max-tokens", type=int, default=None, help="Most bytes a request may ask for [default: context].")
@click.option("--address", default=None, help="A running Ray cluster to deploy on (ray start --head; 'auto').")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--stop-after", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds [default: at Ctrl-C].")
@exit_on_error
def serve_command(model_dir: Path, adapters: tuple[str, ...], replicas: int, max_batch: int, threads: int | None,
                  max_tokens: int | None, address: str | None, host: str, port: int,
                  stop_after: float | None) -> None:
    """Serve the adapter-slots decoder in MODEL_DIR (lora-export CKPT --genai --adapter-slots) over HTTP:
    POST /v1/completions (OpenAI-style; "model" names an adapter or 'base'), GET /v1/models, GET /health."""
    try:
        from ..serve.app import ServeSettings, check_settings, start, stop
    except ImportError as err:
        raise GenerationError(f"serve needs Ray Serve: pip install 'lora-export[serve]' ({err})") from None
    settings = ServeSettings(model_dir=model_dir, adapters=parse_adapters(adapters), replicas=replicas,
                             max_batch=max_batch, threads=threads, max_tokens=max_tokens)
    check_settings(settings)
    if address is None:
        check_port(host, port)
    try:
        url = start(settings, host=host, port=port, address=address)
        click.echo(f"serving {url}/v1/completions (models: {', '.join(['base', *settings.adapters])}); "
                   "Ctrl-C stops")
        deadline = None if stop_after is None else time.monotonic() + stop_after
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt as err:  # Ctrl-C is how a server is stopped: exit 0; SIGTERM keeps its own exit
        if isinstance(err, Terminated):
            raise
    finally:
        stop(address)
    click.echo("stopped", err=True)
